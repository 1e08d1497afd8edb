"""What a newcomer tries first: every entry point answers --help, lists its options, and writes
nothing (no run folder, no cache, no data), from a folder of their own. One interpreter runs
them all in-process (tests/help_probe.py), to keep it cheap."""

from __future__ import annotations

import os

from help_probe import helps
from train_utils import REPO

# module (as `python -m` runs it, or a recipe script's module), an option its help must list
ENTRY_POINTS = {
    "recipes.full_finetune": "--learning_rate",
    "recipes.qlora": "--lora_r",
    "recipes.dpo": "--beta",
    "recipes.reward": "--center_rewards_coefficient",
    "recipes.grpo": "--num_generations",
    "recipes.rl_demo": "--grpo_steps",
    "recipes.core.rewards.arithmetic": "--seed",
    "recipes.demo": "--assets_only",
    "recipes.qlora_demo": "--data_dir",
    "recipes.dpo_demo": "--data_dir",
    "recipes.long_demo": "--max_length",
    "recipes.eval": "--pairs",
    "recipes.merge": "--adapter",
    "recipes.chat": "--temperature",
    "recipes.plan": "--sequence_parallel_size",
    "recipes.convert_checkpoint": "--max_shard_size",
    "launch.train": "--ngpu",
    "fastchat_data.demo": "--name",
    "fastchat_data.cli": "convert",
}


def snapshot(*folders) -> set:
    return {str(p) for folder in folders if folder.exists() for p in folder.rglob("*")}


def test_every_entry_point_answers_help_and_writes_nothing(tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    cwd.mkdir()
    before = snapshot(REPO / "runs", REPO / ".cache" / "demo")
    env = {
        **os.environ,
        "HOME": str(home),
        "CAMELID_CACHE": str(home / "cache"),
        "PYTHONPATH": str(REPO),
    }
    results = helps(list(ENTRY_POINTS), cwd=cwd, env=env)
    for name, (code, text) in results.items():
        listed = ENTRY_POINTS[name] in text
        assert code in (0, None) and listed, f"{name}: exit {code}, help: {text[-300:]}"
    assert not list(cwd.iterdir()) and not snapshot(home), "--help wrote files"
    assert snapshot(REPO / "runs", REPO / ".cache" / "demo") == before
