"""Runs that never fail silently: non-finite steps stop (or are skipped within a budget),
damaged or tampered checkpoints are detected on resume, one job per output directory."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_utils import (
    command,
    complete_checkpoints,
    env,
    flags,
    launched,
    losses,
    run_in_repo,
    tiny_assets,
    train,
)

BASE = ["--config", "tiny_cpu.yaml", "--learning_rate", "1e-3", "--save_total_limit", "2"]
ONE = [*BASE, "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2]
TWO = [*BASE, "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 1]


def poisoned(step: str) -> dict:
    return {"nan_at": step}


def run_with(strategy, nproc, out, *args, faults=None):
    """A run that may fail, forked as `train` forks it (one process, or a one-node job of
    forked workers); what the launchers do with a failing rank is tested through `launched`."""
    return train(strategy, nproc, out, *args, faults=faults, check=False)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> list[float]:
    """The uninterrupted single-process curve of ONE that the faulted runs are held to."""
    out = tmp_path_factory.mktemp("straight")
    train("single", 1, out, *ONE, "--max_steps", 6, "--save_steps", 2)
    return losses(out)


def dcp_weights_finite(ckpt: Path) -> bool:
    import torch.distributed.checkpoint as dcp

    from recipes.core.safe_load import SafeFileSystemReader

    meta = SafeFileSystemReader(ckpt / "dcp").read_metadata().state_dict_metadata
    for key, info in meta.items():
        if key.startswith("model.") and hasattr(info, "size"):
            t = torch.empty(info.size, dtype=info.properties.dtype)
            dcp.load(
                {"model": {key[6:]: t}},
                storage_reader=SafeFileSystemReader(ckpt / "dcp"),
                no_dist=True,
            )
            if not torch.isfinite(t).all():
                return False
    return True


def assert_stopped_at_nonfinite(res, out: Path, step: int, last_good: str):
    assert res.returncode == 3, res.stdout[-2000:] + res.stderr[-3000:]
    assert res.stderr.count("stopped:") == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"step {step}: non-finite" in res.stderr and last_good in res.stderr
    assert not (out / "model").exists()  # never exported
    assert complete_checkpoints(out)[-1].name == last_good


def test_poisoned_batch_single_process(tmp_path):
    out = tmp_path / "run"
    res = run_with(
        "single", 1, out, *ONE, "--max_steps", 6, "--save_steps", 2, faults=poisoned("5")
    )
    assert_stopped_at_nonfinite(res, out, 5, "step-00000004")
    assert "on samples [" in res.stderr
    assert dcp_weights_finite(complete_checkpoints(out)[-1])


@pytest.mark.parametrize("strategy", ["single", pytest.param("zero3", marks=pytest.mark.slow)])
def test_nonfinite_weights_after_an_update_are_never_saved(strategy, tmp_path):
    """A degenerate update (finite loss and gradients, NaN weights after the step): the run
    stops at that step, saves nothing from it and exports nothing."""
    out = tmp_path / "run"
    nproc, args = (1, ONE) if strategy == "single" else (2, TWO)
    res = run_with(
        strategy,
        nproc,
        out,
        *args,
        *flags(max_steps=6, save_steps=2),
        faults={"nan_weight_at": 3},
    )
    assert res.returncode == 3, res.stderr[-3000:]
    assert re.search(r"step 3: the update made \d weight tensor\(s\) non-finite", res.stderr)
    assert "Traceback" not in res.stderr and not (out / "model").exists()
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000002"]


def test_a_full_disk_during_a_save_stops_in_one_line_and_resumes(straight, tmp_path):
    out = tmp_path / "run"
    args = [*ONE, "--max_steps", 6, "--save_steps", 2]
    res = run_with("single", 1, out, *args, faults={"full_disk_at": 4})
    assert res.returncode == 3, res.stderr[-3000:]
    assert "checkpoint" in res.stderr and "could not be written: No space left" in res.stderr
    assert "Traceback" not in res.stderr
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000002"]
    assert not list((out / "checkpoints").glob(".tmp-*"))  # nothing half-written is left
    res = train("single", 1, out, *args)
    assert "(step 2)" in res.stdout
    assert losses(out) == pytest.approx(straight, abs=1e-6)


def test_degenerate_optimizer_settings_are_refused_up_front(tmp_path):
    for args, message in (
        (["--adam_epsilon", "0"], "adam_epsilon must be a finite number in (0, 1]"),
        (["--adam_beta2", "1"], "adam_beta2 must be a finite number in [0, 1)"),
        (["--learning_rate", "1e4"], "learning_rate must be a finite number in [0, 1]"),
        (["--max_grad_norm", "0"], "max_grad_norm must be a finite number > 0"),
        (["--seed", "-1"], "seed must be a whole number from 0 to 2^32 - 1"),
        (["--lr_scheduler_type", "reduce_lr_on_plateau"], "is not one of linear, cosine"),
    ):
        res = run_with("single", 1, tmp_path / "run", *ONE, "--max_steps", 2, *args)
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr[-2000:])
        assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_poisoned_batch_on_one_rank_stops_every_rank(strategy, tmp_path):
    """One message, exit status 3: under torchrun as users launch it (make train-vicuna); the
    ZeRO-3 ranks forked (what DeepSpeed's launcher does with a failing rank: the
    multi-process error test below)."""
    out = tmp_path / "run"
    recipe = ["--report_to", "none", *map(str, TWO), "--max_steps", "5", "--save_steps", "2"]
    run = launched if strategy == "fsdp" else run_with
    res = run(strategy, 2, out, *recipe, faults=poisoned("3:1"))
    assert_stopped_at_nonfinite(res, out, 3, "step-00000002")
    # the message names the poisoned rank's samples: those rank 1 trained on at step 3
    named = json.loads(res.stderr.split("on samples ")[1].split("]")[0] + "]")
    assert len(named) == 4


def test_bad_steps_within_the_budget_are_skipped_and_counted(straight, tmp_path):
    out = tmp_path / "skip"
    res = run_with(
        "single",
        1,
        out,
        *ONE,
        *flags(max_steps=6, save_steps=100, max_bad_steps=1),
        faults=poisoned("3"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step 3: non-finite" in res.stderr and "1 of --max_bad_steps 1" in res.stderr
    got = losses(out)
    assert got[2] != got[2] and all(x == x for x in got[3:])  # NaN logged at step 3, then finite
    assert got[:2] == straight[:2]  # identical until the poisoned step


def flip_byte(path: Path, at: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    data[min(at, len(data) - 1)] ^= 0xFF
    path.write_bytes(bytes(data))


def relaunch_after_damage(strategy, nproc, out, args, damage, recipe=None):
    """Train 6 steps (checkpoints 4 and 6 kept), damage step 6, relaunch: resumes from 4."""
    kw = {"recipe": recipe} if recipe else {}
    train(strategy, nproc, out, *args, "--max_steps", 6, "--save_steps", 2, **kw)
    damage(out / "checkpoints" / "step-00000006")
    res = train(strategy, nproc, out, *args, "--max_steps", 6, "--save_steps", 2, **kw)
    assert "step-00000006 failed verification" in res.stderr, res.stderr[-3000:]
    assert "(step 4)" in res.stdout
    assert (out / "checkpoints" / "damaged-step-00000006").is_dir()  # kept, not deleted
    return res


def test_damaged_dcp_shard_falls_back_to_the_previous_checkpoint(straight, tmp_path):
    out = tmp_path / "run"
    res = relaunch_after_damage(
        "single", 1, out, ONE, lambda c: flip_byte(c / "dcp" / "__0_0.distcp")
    )
    assert "__0_0.distcp does not match its checksum" in res.stderr
    assert losses(out) == pytest.approx(straight, abs=1e-6)


@pytest.mark.slow
def test_damaged_deepspeed_shard_falls_back(tmp_path):
    def damage(ckpt):
        flip_byte(next((ckpt / "deepspeed" / "state").glob("*optim_states.pt")))

    res = relaunch_after_damage("zero3", 2, tmp_path / "run", TWO, damage)
    assert "optim_states.pt does not match its checksum" in res.stderr


def test_damaged_adapter_falls_back(tmp_path):
    from train_utils import QLORA

    args = ["--config", "qlora_tiny_cpu.yaml", "--save_total_limit", 3]
    res = relaunch_after_damage(
        "single",
        1,
        tmp_path / "run",
        args,
        lambda c: flip_byte(c / "adapter" / "adapter_model.safetensors", at=200),
        recipe=QLORA,
    )
    assert "adapter_model.safetensors does not match its checksum" in res.stderr


def test_save_total_limit_keeps_the_newest(tmp_path):
    out = tmp_path / "run"
    train("single", 1, out, *ONE, "--max_steps", 6, "--save_steps", 1, "--save_total_limit", 1)
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000006"]
    manifest = json.loads((complete_checkpoints(out)[-1] / "COMPLETE").read_text())
    assert {"trainer_state.json", "scheduler.json", "rng-rank0.safetensors"} <= set(
        manifest["files"]
    )
    assert not list(complete_checkpoints(out)[-1].rglob("*.pt"))  # camelid writes no pickles


def test_second_run_into_the_same_output_dir_refuses(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        command(
            "single",
            1,
            out,
            *ONE,
            *flags(max_steps=200, save_steps=1000),
            faults={"step_delay": 0.2},
        ),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not (out / "metrics.jsonl").exists():
            assert first.poll() is None
            time.sleep(0.1)
        res = run_with("single", 1, out, *ONE, "--max_steps", 200, "--save_steps", 1000)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert f"is in use by another run (pid {first.pid} on" in res.stderr, res.stderr[-2000:]
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
@pytest.mark.parametrize(("bad", "strategy"), [("config", "fsdp"), ("data", "zero3")])
def test_multi_process_error_is_printed_once_without_launcher_traceback(bad, strategy, tmp_path):
    """Under torchrun and under DeepSpeed's launcher: one error line, the rank's exit status."""
    if bad == "config":
        args, message = ["--", "--learning_rat", "1"], "unknown option 'learning_rat'"
    else:  # found by rank 0 while the other rank waits for the training set
        data = tmp_path / "unusable.json"
        data.write_text(json.dumps([{"conversations": [{"from": "gpt", "value": ""}]}, {"x": 1}]))
        args, message = ["--data", str(data)], "no conversation is trainable"
    model, tiny_data = tiny_assets()
    if "--data" not in args:
        args = ["--data", tiny_data, *args]
    res = run_in_repo(
        [
            sys.executable,
            "-m",
            "launch.train",
            *flags(ngpu="2", strategy=strategy, model=model, out=str(tmp_path / "run")),
            *args,
        ]
    )
    assert res.returncode == 2
    assert res.stderr.count(message) == 1 and res.stderr.count("error:") == 1, res.stderr
    assert "Traceback" not in res.stderr and "ChildFailedError" not in res.stderr
