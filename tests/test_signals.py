"""SIGTERM (a scheduler, a container runtime) or Ctrl-C (SIGINT to the terminal's process group)
sent to `python -m launch.train` reaches every rank, under torchrun and under the deepspeed
launcher: each saves a checkpoint at the next step boundary, the job exits 75 ("stopped,
resumable") with one line and no traceback, no process is left behind, and relaunching the
same recipe continues the loss curve of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_utils import (
    REPO,
    complete_checkpoints,
    descendants,
    env,
    flags,
    losses,
    tiny_assets,
    train,
)

STEPS = 16  # the stop comes after step 3: room for a slow signal, few steps to relaunch
ARGS = [
    *flags(
        config="tiny_cpu.yaml",
        max_steps=str(STEPS),
        save_steps="1000",
        per_device_train_batch_size="4",
        gradient_accumulation_steps="1",
        learning_rate="1e-3",
        report_to="none",
    ),
]


def launch(strategy: str, out: Path) -> list[str]:
    model, data = tiny_assets()
    return [
        sys.executable,
        "-m",
        "launch.train",
        *flags(ngpu="2", strategy=strategy, model=model, data=data, out=str(out)),
        "--",
        *ARGS,
    ]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted curve (fsdp and zero3 agree to ~1e-6: tests/test_train.py), from
    forked workers: the launcher is what the signal tests exercise, not what this run does."""
    out = tmp_path_factory.mktemp("straight")
    train("fsdp", 2, out, *ARGS)
    return losses(out)


@pytest.mark.parametrize(
    ("strategy", "signum"),
    [
        ("fsdp", signal.SIGTERM),
        pytest.param("zero3", signal.SIGINT, marks=pytest.mark.slow),
        pytest.param("fsdp", signal.SIGINT, marks=pytest.mark.slow),
        pytest.param("zero3", signal.SIGTERM, marks=pytest.mark.slow),
    ],
    ids=["torchrun-sigterm", "deepspeed-ctrl-c", "torchrun-ctrl-c", "deepspeed-sigterm"],
)
def test_a_signal_to_the_launcher_stops_every_rank_resumably(strategy, signum, straight, tmp_path):
    out = tmp_path / "run"
    job = subprocess.Popen(
        launch(strategy, out),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        cwd=REPO,
        start_new_session=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert job.poll() is None and time.time() < deadline, job.communicate()[1][-3000:]
        time.sleep(0.05)
    ranks = [p for p in descendants(job.pid) if alive(p)]
    if signum == signal.SIGINT:
        os.killpg(job.pid, signal.SIGINT)  # Ctrl-C: the terminal signals its foreground group
    else:
        job.send_signal(signal.SIGTERM)  # a scheduler signals the job's main process
    stdout, stderr = job.communicate(timeout=600)
    assert job.returncode == 75, stderr[-3000:]
    assert "Traceback" not in stderr and stderr.count("stopped:") == 1, stderr[-3000:]
    time.sleep(0.5)
    assert not [p for p in ranks if alive(p)], "processes left behind"
    saved = complete_checkpoints(out)
    assert saved, stderr[-2000:]
    step = int(saved[-1].name.split("-")[1])
    assert 3 <= step < STEPS and len(losses(out)) == step
    # the relaunch: the same workers, forked with the launcher's environment (what resumes is
    # the recipe; the launcher only starts it, and the stop above was the launcher's part)
    res = train(strategy, 2, out, *ARGS)
    assert f"(step {step})" in res.stdout, res.stderr[-3000:]
    assert losses(out) == pytest.approx(straight, abs=1e-5)
