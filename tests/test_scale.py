"""Scale: sharded loading (no rank holds the whole model), FSDP2 variants, ZeRO buffers sized
from the model, FastChat's --fsdp flags, and two launcher invocations as two nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_utils import REPO, env, flags, losses, ranks, run_in_repo, tiny_assets, train

from recipes.core.config import ConfigError, fsdp_strategy, load_config
from recipes.core.ds_config import deepspeed_config
from recipes.core.recipe import TrainConfig
from recipes.core.world import free_port

TWO = [
    *flags(
        config="tiny_cpu.yaml",
        learning_rate="1e-3",
        save_steps="100",
        max_steps=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
    ),
]


@pytest.fixture(scope="module")
def full_load(tmp_path_factory):
    """Today's path: every rank loads the whole model, then FSDP2 shards it."""
    out = tmp_path_factory.mktemp("full_load")
    train("fsdp", 2, out, *TWO, "--sharded_load", "False")
    return losses(out)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "fsdp_grad_op", "fsdp_offload", "zero3"])
def test_sharded_load_trains_exactly_like_the_full_load(strategy, full_load, tmp_path):
    train(strategy, 2, tmp_path, *TWO)
    info = ranks(tmp_path)
    assert [r["world_size"] for r in info] == [2, 2]
    assert not set(info[0]["sample_ids"]) & set(info[1]["sample_ids"])
    phases = {"load", "setup", "train", "export"}
    assert all(set(r["phase_peak_rss_mb"]) == phases for r in info)
    assert losses(tmp_path) == pytest.approx(full_load, abs=1e-6)


@pytest.mark.slow
def test_tied_embeddings_load_tied_and_export_tied(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tied = tmp_path / "tied"
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tied)
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(tied)
    args = [*TWO, "--model_name_or_path", str(tied)]
    train("fsdp", 2, tmp_path / "sharded", *args)
    # one process, same global batch (4 x 2 accumulation): 2-rank FSDP agrees to ~1e-6
    single = [*TWO[:-1], 2, "--model_name_or_path", str(tied)]
    train("single", 1, tmp_path / "single", *single)
    assert losses(tmp_path / "sharded") == pytest.approx(losses(tmp_path / "single"), abs=1e-5)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded" / "model")
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()


def test_zero_buffers_are_sized_from_the_hidden_size(tmp_path):
    ds = deepspeed_config(TrainConfig(strategy="zero3"), hidden_size=4096)["zero_optimization"]
    assert ds["reduce_bucket_size"] == 4096**2
    assert ds["stage3_prefetch_bucket_size"] == int(0.9 * 4096**2)
    assert ds["stage3_param_persistence_threshold"] == 40960
    mine = tmp_path / "ds.json"
    mine.write_text(
        json.dumps(
            {
                "zero_optimization": {
                    "stage": 3,
                    "reduce_bucket_size": 12345,
                    "stage3_prefetch_bucket_size": "auto",
                }
            }
        )
    )
    ds = deepspeed_config(TrainConfig(strategy="zero3", deepspeed=str(mine)), hidden_size=64)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 12345  # the user's number wins
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    z2 = deepspeed_config(TrainConfig(strategy="zero2"), hidden_size=64)["zero_optimization"]
    assert z2["reduce_bucket_size"] == 64 * 64


@pytest.mark.parametrize(
    ("flags", "strategy"),
    [
        ("full_shard auto_wrap", "fsdp"),
        ("full_shard auto_wrap offload", "fsdp_offload"),
        ("full_shard offload auto_wrap", "fsdp_offload"),
        ("shard_grad_op auto_wrap", "fsdp_grad_op"),
        ("no_shard", "ddp"),
        ("hybrid_shard auto_wrap", None),
        ("shard_grad_op offload", None),
        ("full_shard shard_grad_op", None),
        ("auto_wrap", None),
    ],
)
def test_every_fastchat_fsdp_flag_maps_or_errors(flags, strategy):
    if strategy is None:
        with pytest.raises(ConfigError, match="--fsdp"):
            fsdp_strategy(flags)
        with pytest.raises(ConfigError, match="--fsdp"):
            load_config(["--fsdp", flags], TrainConfig)
    else:
        assert fsdp_strategy(flags) == strategy
        cfg, notes = load_config(["--fsdp", flags], TrainConfig)
        assert cfg.strategy == strategy and any(strategy in n for n in notes)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_two_launcher_invocations_as_two_nodes_match_one_node(strategy, full_load, tmp_path):
    """Two "nodes" on this machine, one process each: torchrun's c10d rendezvous on 127.0.0.1
    (fsdp), or the DeepSpeed launcher's ssh-less multi-node mode with a two-host hostfile."""
    port, out = free_port(), tmp_path / "two_nodes"
    if strategy == "zero3":
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
        nodes_args = ["--hostfile", str(hostfile), "--no_ssh"]
    else:
        nodes_args = ["--nnodes", "2", "--rdzv_id", f"test-{os.getpid()}"]
    recipe_args = ["--report_to", "none", *map(str, TWO)]
    model, data = tiny_assets()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "launch.train",
                *flags(ngpu="1", strategy=strategy, model=model, data=data),
                *nodes_args,
                *flags(
                    node_rank=str(r), master_addr="127.0.0.1", master_port=str(port), out=str(out)
                ),
                "--",
                *recipe_args,
            ],
            env=env(),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    outputs = [p.communicate(timeout=900)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    info = ranks(out)
    assert sorted(r["rank"] for r in info) == [0, 1] and {r["world_size"] for r in info} == {2}
    assert not set(info[0]["sample_ids"]) & set(info[1]["sample_ids"])
    assert losses(out) == pytest.approx(full_load, abs=1e-6)  # two processes on one node


def test_launcher_dry_run_knows_the_new_strategies():
    for strategy in ("fsdp_offload", "fsdp_grad_op"):
        res = run_in_repo(
            [
                sys.executable,
                "-m",
                "launch.train",
                *flags(ngpu="2", strategy=strategy),
                "--dry_run",
            ]
        )
        assert (
            res.returncode == 0
            and "torch.distributed.run" in res.stdout
            and f"--strategy {strategy}" in res.stdout
        )


def test_ds_configs_leave_buffer_sizes_to_the_model():
    for name in ("zero2", "zero3", "zero3_offload"):
        zero = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())["zero_optimization"]
        assert zero["reduce_bucket_size"] == "auto"
        if zero["stage"] == 3:
            assert zero["stage3_prefetch_bucket_size"] == "auto"
            assert zero["stage3_param_persistence_threshold"] == "auto"
    assert Path(REPO / "ds_configs").is_dir()


def test_launcher_preflight_refuses_what_clearly_does_not_fit(tmp_path):
    """On GPUs `make train-vicuna` asks the planner first (here with 80 GB given by hand)."""
    from launch.train import LaunchOptions, preflight
    from recipes.plan import PRESETS

    model = tmp_path / "llama-2-70b"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"model_type": "llama", **PRESETS["llama-2-70b"]})
    )
    recipe = [
        *flags(bf16="True", gradient_checkpointing="True", per_device_train_batch_size="1"),
    ]

    def ask(strategy, which="sft", data=None):
        opts = LaunchOptions(
            config="vicuna_7b.yaml" if which == "sft" else "dpo_7b.yaml",
            strategy=strategy,
            ngpu=8,
            recipe=which,
            data=data,
            model=str(model),
        )
        return preflight(opts, recipe, 80 * 2**30)

    refusal = ask("ddp")
    assert (
        refusal
        and "ddp needs ~" in refusal
        and "fsdp_offload" in refusal
        and "--skip_preflight" in refusal
    )
    assert ask("fsdp_offload") is None
    pairs = tmp_path / "pairs.json"  # DPO needs its data named to resolve its settings
    pairs.write_text("[]")
    dpo_refusal = ask("ddp", "dpo", str(pairs))
    assert dpo_refusal and "ddp needs ~" in dpo_refusal
