"""Offline conversion of sharded checkpoints into Hugging Face folders."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_utils import complete_checkpoints, flags, forked_job, train
from transformers import AutoModelForCausalLM

ARGS = [
    *flags(
        config="tiny_cpu.yaml",
        max_steps=2,
        save_steps=2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
    ),
]


def convert(*args) -> subprocess.CompletedProcess:
    """`python -m recipes.convert_checkpoint args...`, forked from the warm interpreter."""
    cmd = [sys.executable, "-m", "recipes.convert_checkpoint", *map(str, args)]
    return forked_job(cmd, "single", 1)


def weights(folder) -> dict:
    files = sorted(folder.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_offline_conversion_equals_the_runs_export(strategy, tmp_path):
    run = tmp_path / "run"
    train(strategy, 2, run, *ARGS)
    ckpt = complete_checkpoints(run)[-1]
    res = convert(ckpt, tmp_path / "hf", "--max_shard_size", "200KB")
    assert res.returncode == 0, res.stderr[-3000:]
    converted, exported = weights(tmp_path / "hf"), weights(run / "model")
    assert converted.keys() == exported.keys()
    for k in exported:
        assert torch.equal(converted[k], exported[k]), k
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert torch.equal(model.lm_head.weight, exported["lm_head.weight"])


def test_single_process_checkpoint_and_errors(tmp_path):
    run = tmp_path / "run"
    train(
        "single",
        1,
        run,
        *ARGS[:-4],
        *flags(per_device_train_batch_size=4, gradient_accumulation_steps=2),
    )
    ckpt = complete_checkpoints(run)[-1]
    assert convert(ckpt, tmp_path / "hf").returncode == 0
    converted, exported = weights(tmp_path / "hf"), weights(run / "model")
    assert all(torch.equal(converted[k], exported[k]) for k in exported)
    res = convert(tmp_path, tmp_path / "x")
    assert res.returncode == 2 and "is not a camelid checkpoint" in res.stderr
    (ckpt / "COMPLETE").unlink()
    res = convert(ckpt, tmp_path / "x")
    assert res.returncode == 2 and "is incomplete" in res.stderr
