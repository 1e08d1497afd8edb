"""Elastic launch: a job started with `--nnodes 1:2 --max_restarts 1` on two "nodes" (two
launchers on this machine with one rendezvous id and endpoint, one gloo CPU process each)
loses node 1 mid-run (its launcher and worker killed by SIGKILL after a checkpoint exists);
torchrun's agent on node 0 restarts its worker at world size 1, which resumes from the newest
checkpoint with twice the accumulation (the launcher's --global_batch_size) and finishes the
run on the loss curve of an uninterrupted one."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from train_utils import (
    FAULTS,
    REPO,
    complete_checkpoints,
    descendants,
    env,
    losses,
    run_in_repo,
    train,
    with_assets,
)

from launch.train import LaunchOptions, job_command
from recipes.core.world import free_port

STEPS = 8
BASE = [
    "--config",
    "tiny_cpu.yaml",
    "--learning_rate",
    "1e-3",
    "--save_steps",
    1,
    "--save_total_limit",
    0,
    "--logging_steps",
    1,
    "--per_device_train_batch_size",
    4,
    "--max_steps",
    STEPS,
]
NODE = (
    "import json, sys; from launch.train import launch; "
    "sys.exit(launch(json.loads(sys.argv[1]), 'ddp', 1, script=sys.argv[2]))"
)


def node(out: Path, rank: int, port: int, rdzv_id: str) -> subprocess.Popen:
    """One node of the elastic job, through launch.train's command builder and job runner
    (what `python -m launch.train --nnodes 1:2 --max_restarts 1 ...` runs); each step pauses
    0.4 s (tests/fault_recipe.py) so that the kill lands mid-run."""
    recipe_args = ["--output_dir", str(out), "--report_to", "none", *with_assets(BASE)]
    recipe_args += ["--global_batch_size", "8"]  # what launch.train adds for 1:2 (test below)
    program = [str(FAULTS), "--recipe", "sft", "--step_delay", "0.4", "--"]
    job = LaunchOptions(strategy="ddp", nnodes="1:2", max_restarts=1, elastic_wait=3)
    at_node = dataclasses.replace(job, node_rank=rank, master_port=port, rdzv_id=rdzv_id)
    cmd = job_command(at_node, recipe_args=recipe_args, program=program)
    log = open(out.parent / f"node{rank}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-c", NODE, json.dumps(cmd), str(FAULTS)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env(),
        cwd=REPO,
        start_new_session=True,
    )


def kill_node(process: subprocess.Popen) -> None:
    """A lost node: its launcher and every process under it, at once."""
    for pid in [process.pid, *descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def world_sizes(out: Path) -> dict[int, int]:
    """The world size that wrote each checkpoint, by step."""
    sizes = {}
    for ckpt in complete_checkpoints(out):
        state = json.loads((ckpt / "trainer_state.json").read_text())
        sizes[state["step"]] = state["world_size"]
    return sizes


def dry_run(*args: str) -> subprocess.CompletedProcess:
    """`python -m launch.train --dry_run` of a one-GPU-per-node DDP job on the tiny assets,
    4 rows per device, no accumulation: `args` are launcher options."""
    model, data = with_assets([])[1::2][:2]
    return run_in_repo(
        [
            *(sys.executable, "-m", "launch.train", "--strategy", "ddp", "--ngpu", "1"),
            *(*args, "--dry_run", "--model", model, "--data", data, "--"),
            *("--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1"),
        ],
        timeout=120,
    )


def test_launch_train_passes_the_elastic_range_and_keeps_the_global_batch():
    res = dry_run("--nnodes", "1:2", "--max_restarts", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    command = res.stdout.splitlines()[-1]
    assert "--nnodes 1:2 " in command and "--max_restarts 1 " in command, command
    assert "--rdzv_backend c10d" in command and command.endswith("--global_batch_size 8"), command


def test_an_elastic_range_the_global_batch_does_not_split_over_is_refused():
    res = dry_run("--nnodes", "2:3")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [
        "error: --nnodes 2:3: the global batch 12 does not split over 2 node(s) (2 "
        "data-parallel ranks x 4 per device); choose a range, or a --global_batch_size, that "
        "every node count of the range divides"
    ], res.stderr


def test_global_batch_size_sets_the_accumulation_for_the_ranks_there_are():
    from types import SimpleNamespace

    from recipes.core.config import ConfigError, accumulation_for

    cfg = SimpleNamespace(
        global_batch_size=16, per_device_train_batch_size=4, gradient_accumulation_steps=1
    )
    assert [accumulation_for(cfg, n) for n in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(ConfigError, match="does not split over 3 data-parallel ranks"):
        accumulation_for(cfg, 3)
    cfg.global_batch_size = 0  # unset: the accumulation given
    assert accumulation_for(cfg, 3) == 1


@pytest.mark.slow
def test_a_lost_node_restarts_on_the_one_left_on_the_same_curve(tmp_path):
    begun = time.monotonic()
    reference = tmp_path / "reference" / "run"
    train("single", 1, reference, *BASE, "--gradient_accumulation_steps", 2)
    out = tmp_path / "elastic" / "run"
    out.parent.mkdir()
    port, rdzv_id = free_port(), f"elastic-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    print(f"uninterrupted run: {started - begun:.1f} s")
    host = node(out, 0, port, rdzv_id)  # node 0 hosts the rendezvous store
    time.sleep(1)
    lost = node(out, 1, port, rdzv_id)
    try:
        while not any(s >= 2 for s in world_sizes(out)) and time.monotonic() - started < 120:
            assert lost.poll() is None and host.poll() is None, "a node ended before the kill"
            time.sleep(0.2)
        kill_node(lost)
        print(f"node 1 killed at {time.monotonic() - started:.1f} s")
        killed_at = max(world_sizes(out))
        code = host.wait(timeout=180)
    finally:
        for process in (host, lost):
            if process.poll() is None:
                kill_node(process)
    log = "\n".join((out.parent / f"node{r}.log").read_text() for r in (0, 1))
    print(f"elastic job: {time.monotonic() - started:.1f} s, node 1 killed after step {killed_at}")
    assert code == 0, (out.parent / "node0.log").read_text()[-4000:]
    sizes = world_sizes(out)
    assert sizes[1] == 2 and sizes[STEPS] == 1, sizes  # two nodes, then the one left
    assert "ddp on 2 x cpu" in log and "ddp on 1 x cpu" in log, log[-4000:]
    assert "note: moved: written by ddp x 2, resumed by ddp x 1" in log, log[-4000:]
    got, want = losses(out), losses(reference)
    assert len(got) == len(want) == STEPS
    worst = max(abs(a - b) for a, b in zip(got, want))
    print(f"max |loss - uninterrupted| over steps 1..{STEPS}: {worst:.1e}")
    assert worst < 1e-5, (got, want)


@pytest.mark.slow
def test_a_stop_asked_for_is_not_restarted(tmp_path):
    """SIGTERM to a job with --max_restarts: its ranks save and exit 75, and torchrun's agent
    does not restart them (a restart would resume and train on after the stop)."""
    out = tmp_path / "run"
    model, data = with_assets([])[1::2][:2]
    job = subprocess.Popen(
        [
            *(sys.executable, "-m", "launch.train", "--strategy", "ddp", "--ngpu", "1"),
            *("--max_restarts", "2", "--model", model, "--data", data, "--out", str(out)),
            *("--", *map(str, BASE), "--max_steps", "400", "--report_to", "none"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(),
        cwd=REPO,
    )
    try:
        metrics, deadline = out / "metrics.jsonl", time.monotonic() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0]
            time.sleep(0.05)
        job.send_signal(signal.SIGTERM)
        log = job.communicate(timeout=120)[0]
    finally:
        if job.poll() is None:
            kill_node(job)
    assert job.returncode == 75, log[-3000:]
    assert log.count("ddp on 1 x cpu") == 1 and "resumed from" not in log, log[-3000:]
