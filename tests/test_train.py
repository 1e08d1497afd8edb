"""The full fine-tune on CPU: strategy parity, exact resume after kill -9, exports, bad input."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from train_utils import command, complete_checkpoints, descendants, env, flags, losses, ranks, train
from transformers import AutoModelForCausalLM

# The tiny model on the identity data; global batch 8 = 4 x 2 accumulation x 1 rank
# = 4 x 1 x 2 ranks.
BASE = ["--config", "tiny_cpu.yaml", "--learning_rate", "1e-3", "--save_steps", "100"]


def one_rank(steps):
    return [
        *BASE,
        *flags(max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=2),
    ]


def two_ranks(steps):
    return [
        *BASE,
        *flags(max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=1),
    ]


def logits(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(0)
    return model(torch.randint(3, model.config.vocab_size, (2, 24))).logits


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    train("single", 1, out, *one_rank(10))
    return out


# Every two-rank run saves every 2 steps, keeping the newest 2: each is both the parity run
# against one process and the uninterrupted curve a killed run of its strategy must follow.
TWO_RANK_RUN = [*two_ranks(10), "--save_steps", 2, "--save_total_limit", 2]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """`two_rank_run(strategy)`: the run folder of 10 steps on two ranks (run on first use)."""
    runs = {}

    def run(strategy: str) -> Path:
        if strategy not in runs:
            runs[strategy] = tmp_path_factory.mktemp(strategy) / "run"
            train(strategy, 2, runs[strategy], *TWO_RANK_RUN)
        return runs[strategy]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
def test_two_ranks_match_one_process(strategy, reference, two_rank_run):
    out = two_rank_run(strategy)
    # a real 2-rank job whose ranks trained on different samples
    info = ranks(out)
    assert [r["world_size"] for r in info] == [2, 2] and [r["rank"] for r in info] == [0, 1]
    assert not set(info[0]["sample_ids"]) & set(info[1]["sample_ids"])
    ref, got = losses(reference), losses(out)
    assert len(got) == 10 and ref[-1] < ref[0]
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-4, (ref, got)
    # the exported folder is a plain HF model that gives the same logits
    assert (out / "model" / "model.safetensors").exists()
    torch.testing.assert_close(
        logits(out / "model"), logits(reference / "model"), atol=1e-4, rtol=1e-4
    )


def kill_when(cmd, metrics, step):
    """Start `cmd` (with a step delay: tiny steps take ms, the kill must land mid-run), kill -9
    the launcher and every worker once `step` steps are logged."""
    proc = subprocess.Popen(
        cmd,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline, killed = time.time() + 600, []
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            killed = [proc.pid, *descendants(proc.pid)]
            for pid in killed:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    time.sleep(1)
    assert len(killed) >= 3 and not any(
        Path(f"/proc/{pid}/cmdline").exists() and Path(f"/proc/{pid}/cmdline").read_bytes()
        for pid in killed
    )


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_kill_9_then_relaunch_continues_the_same_loss_curve(strategy, two_rank_run, tmp_path):
    straight = two_rank_run(strategy)
    out = tmp_path / "killed"
    slowed = command(strategy, 2, out, *TWO_RANK_RUN, faults={"step_delay": 0.5})
    kill_when(slowed, out / "metrics.jsonl", 5)  # between saves (steps 4 and 6)
    assert [p.name for p in complete_checkpoints(out)][-1] == "step-00000004"
    res = train(strategy, 2, out, *TWO_RANK_RUN)
    assert "resumed from" in res.stdout and "(step 4)" in res.stdout
    assert losses(out) == pytest.approx(losses(straight), abs=1e-6)
    assert len(complete_checkpoints(out)) == 2  # save_total_limit
    torch.testing.assert_close(
        logits(out / "model"), logits(straight / "model"), atol=1e-5, rtol=1e-5
    )


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    cmd = command("single", 1, out, *one_rank(200), "--save_steps", 1000)
    proc = subprocess.Popen(
        cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    while not (
        (out / "metrics.jsonl").exists()
        and len((out / "metrics.jsonl").read_text().splitlines()) >= 3
    ):
        assert proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, stdout[-2000:]  # stopped, resumable
    assert "stopped: a stop was requested (SIGTERM or Ctrl-C): checkpoint" in stdout
    assert "Traceback" not in stdout
    step = int(complete_checkpoints(out)[-1].name.split("-")[1])
    assert step >= 3 and len(losses(out)) == step


def test_half_written_checkpoint_is_never_resumed(tmp_path):
    out = tmp_path / "run"
    train("single", 1, out, *one_rank(4), "--save_steps", 2)
    ckpts = out / "checkpoints"
    (ckpts / ".tmp-step-00000006").mkdir()  # a save that was killed halfway
    broken = ckpts / "step-00000008"
    broken.mkdir()  # no COMPLETE marker
    assert complete_checkpoints(out)[-1].name == "step-00000004"


def test_deepspeed_config_contradicting_the_command_line(tmp_path):
    import json

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    from recipes.core.config import ConfigError
    from recipes.core.ds_config import deepspeed_config
    from recipes.core.recipe import TrainConfig

    with pytest.raises(
        ConfigError, match="bf16.enabled is True but the command line says --bf16 False"
    ):
        deepspeed_config(TrainConfig(strategy="zero2", deepspeed=str(ds), bf16=False))
    ds.write_text(json.dumps({"fp16": {"enabled": True}, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="enables fp16"):
        deepspeed_config(TrainConfig(strategy="zero3", deepspeed=str(ds)))
    filled = deepspeed_config(TrainConfig(strategy="zero3", per_device_train_batch_size=3))
    assert filled["train_micro_batch_size_per_gpu"] == 3 and filled["bf16"]["enabled"] is False


def test_output_dir_of_another_run_is_refused(tmp_path):
    out = tmp_path / "run"
    train("single", 1, out, *one_rank(2), "--save_steps", 2)
    res = train(
        "single", 1, out, *one_rank(2), "--save_steps", 2, "--learning_rate", "5e-4", check=False
    )
    assert (
        res.returncode == 2
        and "holds checkpoints of another run (settings differ: learning_rate 0.001 -> 0.0005)"
        in res.stderr
    )
    # the refusal never suggests --overwrite_output_dir: it takes the run's checkpoints away
    assert "another --output_dir" in res.stderr and "overwrite" not in res.stderr
    # asked for, overwriting starts afresh: the old run's checkpoints move aside (kept, never
    # resumed)
    res = train(
        "single",
        1,
        out,
        *one_rank(1),
        *flags(save_steps=1, learning_rate="5e-4", overwrite_output_dir="True"),
    )
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000001"] and len(
        losses(out)
    ) == 1
    (aside,) = (out / "replaced").iterdir()
    assert "moved to" in res.stdout and (aside / "checkpoints" / "step-00000002").is_dir()


def test_fastchat_flags_are_mapped(tmp_path):
    from recipes.core.config import load_config
    from recipes.core.recipe import TrainConfig

    cfg, notes = load_config(
        [
            *flags(
                fsdp="full_shard auto_wrap",
                fsdp_transformer_layer_cls_to_wrap="LlamaDecoderLayer",
                lazy_preprocess="True",
                bf16="True",
                model_max_length="1024",
            ),
        ],
        TrainConfig,
    )
    assert cfg.strategy == "fsdp" and cfg.bf16 and cfg.model_max_length == 1024
    assert any("decoder layer" in n for n in notes)
