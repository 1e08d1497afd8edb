"""Ulysses sequence parallelism (recipes/core/sequence_parallel.py): a row split over sp ranks
trains as the whole row in one process, conversations packed in a row stay apart, refused
settings say so in one line; and --rope_scaling reaches the exported config."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from train_utils import flags, layer_saved_bytes, llama_config, losses, ranks, tiny_assets, train

from recipes.core.config import ConfigError, load_config
from recipes.core.recipe import TrainConfig
from recipes.core.sequence_parallel import check_heads, shard_batch

# ---------------------------------------------------------------------------- one process


@pytest.mark.parametrize("sp", [2, 3, 4])
def test_shards_count_each_label_once_at_its_global_position(sp):
    torch.manual_seed(0)
    labels = torch.randint(0, 50, (2, 11))
    labels[:, :2] = -100
    labels[0, 6] = -100  # a packed row's second conversation starts here
    positions = torch.cat([torch.arange(6), torch.arange(5)]).expand(2, -1)
    batch = {"input_ids": torch.arange(22).view(2, 11), "labels": labels, "position_ids": positions}
    shards = [shard_batch(batch, sp, r) for r in range(sp)]
    assert len({s["input_ids"].shape[1] for s in shards}) == 1  # equal shards
    whole = {k: torch.cat([s[k] for s in shards], dim=1) for k in shards[0]}
    assert whole["input_ids"].shape[1] % sp == 0 and whole["input_ids"].shape[1] - 11 < sp
    assert torch.equal(whole["input_ids"][:, :11], batch["input_ids"])
    # target t is label t+1: the last token of a shard predicts the first label of the next
    assert torch.equal(whole["shifted_labels"][:, :10], labels[:, 1:])
    assert (whole["shifted_labels"][:, 10:] == -100).all()  # the padding trains nothing
    # every label is counted once, as the loop's denominator counts it
    assert int((whole["shifted_labels"] != -100).sum()) == int((labels[:, 1:] != -100).sum())
    # global positions; the padding continues the last sequence (it comes after every token)
    assert torch.equal(whole["position_ids"][:, :11], positions)
    assert torch.equal(
        whole["position_ids"][0, 10:], torch.arange(4, 4 + whole["input_ids"].shape[1] - 10)
    )


def test_unpacked_rows_get_their_positions_and_no_mask():
    batch = {
        "input_ids": torch.ones(2, 4, dtype=torch.long),
        "labels": torch.ones(2, 4, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
    }
    shards = [shard_batch(batch, 2, r) for r in range(2)]
    assert all("attention_mask" not in s for s in shards)  # right padding is causal-safe
    assert torch.equal(shards[1]["position_ids"], torch.tensor([[2, 3], [2, 3]]))


def test_head_counts_it_does_not_divide_are_refused_with_the_numbers():
    check_heads({"num_attention_heads": 8, "num_key_value_heads": 2}, 2)
    with pytest.raises(ConfigError, match="does not divide the 8 attention heads"):
        check_heads({"num_attention_heads": 8, "num_key_value_heads": 8}, 3)
    with pytest.raises(ConfigError, match="does not divide the 2 key/value heads"):
        check_heads({"num_attention_heads": 8, "num_key_value_heads": 2}, 4)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1]", "give a JSON object"),
        ("nope", "is not JSON"),
        ('{"rope_type": "bogus", "factor": 2}', "rope_type 'bogus' is not one of"),
        ('{"rope_type": "linear"}', "Missing required keys"),
        ('{"rope_type": "linear", "factor": 0.5}', "factor must be a number >= 1"),
    ],
)
def test_bad_rope_scaling_is_refused(text, message):
    model, data = tiny_assets()
    argv = ["--model_name_or_path", model, "--data_path", data, "--rope_scaling", text]
    with pytest.raises(ConfigError, match=message):
        load_config(argv, TrainConfig)


# ---------------------------------------------------------------------------- two processes


def _spawned(fn, nprocs: int = 2, *args):
    """fn(rank, world, *args) on `nprocs` processes of one gloo group."""
    import torch.multiprocessing as mp

    from recipes.core.world import free_port

    # the workers read the rendezvous from the environment they inherit; this test process's
    # own environment is restored after (a leftover MASTER_ADDR misleads later runs). Forked,
    # not spawned: a spawned worker imports torch and transformers again (~5 s of CPU each)
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    with mock.patch.dict(os.environ, rendezvous):
        mp.start_processes(_init_then, args=(nprocs, fn, *args), nprocs=nprocs, start_method="fork")


def _init_then(rank, world, fn, *args):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _attention_worker(rank, world):
    import torch.distributed as dist

    from recipes.core import sequence_parallel as sp
    from recipes.core.attention import sdpa_packed_attention, sdpa_packed_mask

    sp.register(sdpa_packed_attention, sdpa_packed_mask)
    sp.use_group(dist.new_group(list(range(world))))
    torch.manual_seed(0)
    # GQA (8 query heads on 4 key/value heads); two conversations, the second crossing shards
    q = torch.randn(2, 8, 24, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 4, 24, 16, dtype=torch.float64, requires_grad=True) for _ in "kv")
    positions = torch.cat([torch.arange(5), torch.arange(19)]).expand(2, -1)
    weight = torch.randn(2, 24, 8, 16, dtype=torch.float64)
    ref, _ = sdpa_packed_attention(None, q, k, v, None, position_ids=positions)
    (ref * weight).sum().backward()
    n = 24 // world
    mine = slice(rank * n, (rank + 1) * n)
    parts = [t.detach()[:, :, mine].clone().requires_grad_() for t in (q, k, v)]
    out, _ = sp.ulysses_attention(None, *parts, None, position_ids=positions[:, mine])
    (out * weight[:, mine]).sum().backward()
    torch.testing.assert_close(out, ref[:, mine], rtol=0, atol=1e-12)
    # the all-to-all's backward sends each gradient back to the rank whose tokens made it
    for part, whole in zip(parts, (q, k, v)):
        torch.testing.assert_close(part.grad, whole.grad[:, :, mine], rtol=0, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_attention_and_its_gradients_equal_the_whole_row(world):
    _spawned(_attention_worker, world)


def _isolation_worker(rank, world, model_path):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from recipes.core import sequence_parallel as sp
    from recipes.core.attention import sdpa_packed_attention, sdpa_packed_mask

    sp.register(sdpa_packed_attention, sdpa_packed_mask)
    sp.use_group(dist.new_group(list(range(world))))
    model = AutoModelForCausalLM.from_pretrained(
        model_path, attn_implementation=sp.NAME, dtype=torch.float64
    )
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, 40))
    labels = ids.clone()
    # conversation A: tokens 0..11, B: 12..39 (B starts on rank 0's shard and ends on rank 1's)
    positions = torch.cat([torch.arange(12), torch.arange(28)])[None]
    a, b = slice(0, 12), slice(12, 40)

    def token_losses(ids):
        batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
        shard = shard_batch(batch, world, rank)
        logits = model(input_ids=shard["input_ids"], position_ids=shard["position_ids"]).logits
        mine = F.cross_entropy(logits[0], shard["shifted_labels"][0], reduction="none")
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine)
        return torch.cat(parts)

    base = token_losses(ids)
    other = ids.clone()
    other[0, a] = torch.randint(3, model.config.vocab_size, (12,))
    moved = token_losses(other)
    # B's per-token losses do not move when A's tokens change (A's last target, B's first
    # token, is the one loss that reads across: packing never trains it, see collate_packed)
    torch.testing.assert_close(moved[13:39], base[13:39], rtol=0, atol=1e-12)
    assert (moved[:11] - base[:11]).abs().max() > 1e-3  # A's own losses did move
    other = ids.clone()
    other[0, b] = torch.randint(3, model.config.vocab_size, (28,))
    moved = token_losses(other)
    torch.testing.assert_close(moved[:11], base[:11], rtol=0, atol=1e-12)
    assert (moved[13:39] - base[13:39]).abs().max() > 1e-3


@pytest.mark.slow
def test_packed_conversations_do_not_attend_to_each_other_across_shards():
    _spawned(_isolation_worker, 2, tiny_assets()[0])


# ---------------------------------------------------------------------------- the recipe


def long_conversations(folder: Path, per: int = 8) -> str:
    """The identity conversations joined `per` at a time: 50 conversations of ~600 tokens."""
    from fastchat_data.identity import identity_conversations
    from fastchat_data.io import write_records

    records = identity_conversations(n=400, seed=0)
    joined = [
        {
            "id": f"long_{i}",
            "conversations": [turn for r in records[i : i + per] for turn in r["conversations"]],
        }
        for i in range(0, len(records), per)
    ]
    path = folder / "long.json"
    write_records(path, joined)
    return str(path)


def long_args(data: str, steps: int = 3) -> list:
    return [
        *flags(
            config="tiny_cpu.yaml",
            data_path=data,
            model_max_length=1024,
            packing="True",
            packing_row_tokens=1024,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            learning_rate="1e-3",
            max_steps=steps,
            save_steps=100,
        ),
    ]


def with_accumulation(args: list, accum: int) -> list:
    args = list(args)
    args[args.index("--gradient_accumulation_steps") + 1] = accum
    return args


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    return long_conversations(tmp_path_factory.mktemp("long"))


@pytest.fixture(scope="module")
def one_process(long_data, tmp_path_factory):
    """One process, the same global batches: 2 rows x 2 accumulation (x dp ranks)."""
    outs = {}
    for accum in (2, 4):
        outs[accum] = tmp_path_factory.mktemp(f"one{accum}")
        train("single", 1, outs[accum], *with_accumulation(long_args(long_data), accum))
    return outs


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero3", "ddp"])
def test_sp2_trains_as_one_process(strategy, long_data, one_process, tmp_path):
    res = train(strategy, 2, tmp_path, *long_args(long_data), "--sequence_parallel_size", 2)
    assert "rows split over 2, 1 data-parallel" in res.stdout
    ref, got = losses(one_process[2]), losses(tmp_path)
    assert len(got) == 3 and max(abs(a - b) for a, b in zip(ref, got)) < 1e-5, (ref, got)
    # the two ranks of the sp group train on the same samples, each its own shard
    info = ranks(tmp_path)
    assert [(r["dp_rank"], r["sp_rank"]) for r in info] == [(0, 0), (0, 1)]
    assert info[0]["sample_ids"] == info[1]["sample_ids"]
    # the run's reported tokens are the one process's (counted once per sp group)
    assert [r["tokens"] for r in metrics(one_process[2])] == [
        r["tokens"] for r in metrics(tmp_path)
    ]
    # the export is a plain transformers model (no "ulysses" in it) with the same weights
    from transformers import AutoModelForCausalLM

    got, want = (
        AutoModelForCausalLM.from_pretrained(d / "model") for d in (tmp_path, one_process[2])
    )
    ids = torch.randint(
        3, want.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(got(ids).logits, want(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_sp2_times_dp2_on_four_ranks_trains_as_one_process(long_data, one_process, tmp_path):
    args = [*long_args(long_data), "--sequence_parallel_size", 2]
    res = train("fsdp", 4, tmp_path, *args)
    assert "rows split over 2, 2 data-parallel" in res.stdout
    ref, got = losses(one_process[4]), losses(tmp_path)
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-5, (ref, got)
    info = ranks(tmp_path)
    assert [(r["dp_rank"], r["sp_rank"]) for r in info] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert info[0]["sample_ids"] == info[1]["sample_ids"]
    assert info[2]["sample_ids"] == info[3]["sample_ids"]
    assert not set(info[0]["sample_ids"]) & set(info[2]["sample_ids"])


@pytest.mark.slow
def test_sp2_run_killed_then_relaunched_continues_the_same_curve(long_data, tmp_path):
    from test_train import kill_when
    from train_utils import command, complete_checkpoints

    args = [*long_args(long_data, steps=4), "--sequence_parallel_size", 2, "--save_steps", 2]
    train("fsdp", 2, tmp_path / "straight", *args)
    out = tmp_path / "killed"
    kill_when(command("fsdp", 2, out, *args, faults={"step_delay": 1.0}), out / "metrics.jsonl", 3)
    assert [p.name for p in complete_checkpoints(out)][-1] == "step-00000002"
    res = train("fsdp", 2, out, *args)
    assert "(step 2)" in res.stdout
    assert losses(out) == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)


@pytest.mark.slow
def test_refused_head_count_exits_2_with_one_line(tmp_path):
    res = train("ddp", 1, tmp_path, "--sequence_parallel_size", 3, check=False)
    assert res.returncode == 2
    lines = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert lines == [
        f"error: --sequence_parallel_size 3 does not divide the 4 attention heads of "
        f"{tiny_assets()[0]} (each rank attends with 1/3 of them); use a divisor of 4"
    ], res.stderr[-2000:]
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_rope_scaling_is_trained_with_and_exported(long_data, tmp_path):
    from transformers import AutoModelForCausalLM

    data = long_data
    scaling = {"rope_type": "linear", "factor": 4}
    args = [*long_args(data, steps=1), "--packing", "False"]
    train("single", 1, tmp_path / "plain", *args)
    train("single", 1, tmp_path / "scaled", *args, "--rope_scaling", json.dumps(scaling))
    saved = json.loads((tmp_path / "scaled" / "model" / "config.json").read_text())
    assert {k: saved["rope_parameters"][k] for k in scaling} == scaling
    # plain transformers loads the export with the scaled rotary embedding
    scaled = AutoModelForCausalLM.from_pretrained(tmp_path / "scaled" / "model")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain" / "model")
    torch.testing.assert_close(
        scaled.model.rotary_emb.inv_freq * 4, plain.model.rotary_emb.inv_freq
    )
    # and training ran with it: the same weights (step 1's loss is before any update) give
    # another loss on the same long rows. A freshly initialised model predicts nearly
    # uniformly, so positions move its loss only slightly; one process on CPU is
    # deterministic, so without the scaling the two losses would be bit-identical
    first = losses(tmp_path / "plain")[0], losses(tmp_path / "scaled")[0]
    assert abs(first[0] - first[1]) > 1e-6, first


def _saved_bytes_worker(rank, world, kv, rows):
    """What one decoder layer saves for backward on one rank of an sp group, against the
    planner's formula (recipes/plan.py: layer_activation_bytes with sp)."""
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    from recipes import plan as P
    from recipes.core import sequence_parallel as sp
    from recipes.core.attention import sdpa_packed_attention, sdpa_packed_mask

    sp.register(sdpa_packed_attention, sdpa_packed_mask)
    sp.use_group(dist.new_group(list(range(world))))
    cfg = llama_config(num_key_value_heads=kv, attn_implementation=sp.NAME)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    seq = 64
    batch = {
        "input_ids": torch.randint(0, 500, (rows, seq)),
        "labels": torch.zeros(rows, seq, dtype=torch.long),
        "attention_mask": torch.ones(rows, seq, dtype=torch.long),  # collate's padding mask
    }
    shard = shard_batch(batch, world, rank)
    saved = layer_saved_bytes(
        model, input_ids=shard["input_ids"], position_ids=shard["position_ids"]
    )
    shape = P.Shape.from_config(cfg.to_dict())
    want = P.layer_activation_bytes(shape, seq, rows, p=4, sp=world) + P.rope_bytes(
        shape, seq, rows, p=4, sp=world
    )
    assert saved == want, (saved, want)


@pytest.mark.slow
@pytest.mark.parametrize("kv,rows", [(4, 1), (2, 1), (2, 2)])
def test_what_a_layer_saves_is_what_the_planner_counts(kv, rows):
    _spawned(_saved_bytes_worker, 2, kv, rows)


def test_launcher_preflight_counts_the_sequence_split(tmp_path):
    """A 7B at 256K tokens per row on 8 x 80 GB: FSDP2 alone needs ~144 GB per GPU (refused
    before starting); with the row split over the 8 GPUs, ~35 GB (allowed)."""
    from launch.train import LaunchOptions, preflight
    from recipes.plan import PRESETS

    model = tmp_path / "llama-2-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", **PRESETS["llama-2-7b"]}))
    opts = LaunchOptions(config="vicuna_7b.yaml", strategy="fsdp", ngpu=8, model=str(model))
    recipe = ["--bf16", "True", "--gradient_checkpointing", "True", "--model_max_length", "262144"]
    recipe += ["--per_device_train_batch_size", "1"]
    refusal = preflight(opts, recipe, 80 * 2**30)
    assert refusal and "fsdp needs ~144" in refusal and "--sequence_parallel_size" in refusal
    split = [*recipe, "--sequence_parallel_size", "8"]
    assert preflight(opts, split, 80 * 2**30) is None
    # (the pre-flight ran: at 8x the length the split row does not fit either)
    longer = [*split, "--model_max_length", str(8 * 262144)]
    assert "fsdp needs ~" in preflight(opts, longer, 80 * 2**30)


def test_an_objective_that_does_not_split_sequences_is_refused(tmp_path, capsys):
    from recipes.core.recipe import main

    pairs = tmp_path / "pairs.json"
    pairs.write_text("[]")
    argv = ["--model_name_or_path", tiny_assets()[0], "--data_path", str(pairs)]
    argv += ["--strategy", "ddp", "--sequence_parallel_size", "2", "--output_dir", str(tmp_path)]
    assert main("dpo", argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --sequence_parallel_size 2: the dpo objective does not train on split "
        "sequences (sft does); use --sequence_parallel_size 1"
    ]


def _loss_worker(rank, world, model_path):
    """Both loss paths on shards (camelid's chunked loss, and transformers' own through its
    shift_labels) sum over the sp group to the whole row's loss."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from recipes.core import sequence_parallel as sp
    from recipes.core.attention import register, sdpa_packed_attention, sdpa_packed_mask
    from recipes.core.loss import forward_with_loss

    register()
    sp.register(sdpa_packed_attention, sdpa_packed_mask)
    sp.use_group(dist.new_group(list(range(world))))

    def model(name):
        kw = dict(attn_implementation=name, dtype=torch.float64)
        return AutoModelForCausalLM.from_pretrained(model_path, **kw)

    whole, split = model("sdpa_packed"), model(sp.NAME)
    torch.manual_seed(0)
    ids = torch.randint(3, whole.config.vocab_size, (2, 41))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[:, 20] = -100  # a packed conversation's first token
    positions = torch.cat([torch.arange(20), torch.arange(21)]).expand(2, -1)
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
    n = int((labels[:, 1:] != -100).sum())
    want = forward_with_loss(whole, whole, 512, **batch, num_items_in_batch=n).loss
    for chunk in (512, 0):
        shard = sp.shard_batch(batch, world, rank)
        got = forward_with_loss(split, split, chunk, **shard, num_items_in_batch=n).loss
        total = got.detach().clone()
        dist.all_reduce(total)
        # the loss itself is float32 (both paths upcast the logits to float32, not 64)
        torch.testing.assert_close(total, want.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_both_loss_paths_sum_over_shards_to_the_whole_row():
    _spawned(_loss_worker, 2, tiny_assets()[0])
