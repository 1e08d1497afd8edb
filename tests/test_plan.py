"""The memory planner (recipes/plan.py): its model states against the ZeRO paper, its
parameter count against transformers, its activation formula against what autograd saves,
and its command line on a hand-written Llama-2-70B config."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch
from train_utils import flags, layer_saved_bytes, llama_config

from recipes import plan as P
from recipes.core import parallel

LLAMA2_70B = {  # meta-llama/Llama-2-70b-hf config.json, the fields the planner reads
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "float16",
}


def test_model_states_reproduce_the_zero_paper_table():
    # ZeRO paper (Rajbhandari et al. 2020), Figure 1: Psi = 7.5B, K = 12, N_d = 64, in GB (1e9)
    psi, n = 7.5e9, 64
    got = [sum(P.model_states_bytes(psi, stage, n).values()) / 1e9 for stage in range(4)]
    assert [round(x, 1) for x in got] == [120.0, 31.4, 16.6, 1.9]
    # exact values behind the rounding: (2+2+K)Psi, 4Psi + K Psi/N, 2Psi + 14Psi/N, 16Psi/N
    assert got == pytest.approx([120, 30 + 90 / 64, 15 + 105 / 64, 120 / 64], rel=1e-12)


def test_plan_rows_use_the_zero_model_states():
    shape = P.Shape.from_config(LLAMA2_70B)
    rows = {r.strategy: r for r in P.plan(shape, ngpu=8, nnodes=8, bf16=True)}
    psi, n = shape.params, 64
    for name, stage in (("zero2", 2), ("zero3", 3)):
        want = P.model_states_bytes(psi, stage, n)
        got = {k: rows[name].per_rank[k] for k in want}
        assert got == pytest.approx(want)
    # the torch engines keep fp32 params + grads + Adam: the same 16 Psi as ZeRO's baseline
    ddp = rows["ddp"].per_rank
    assert ddp["params"] + ddp["grads"] + ddp["optim"] == pytest.approx(16 * psi)
    fsdp = rows["fsdp"].per_rank
    assert fsdp["params"] + fsdp["grads"] + fsdp["optim"] == pytest.approx(16 * psi / n)


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # untied, multi-head
        {"tie_word_embeddings": True},
        {"num_key_value_heads": 2},  # GQA
        {"num_key_value_heads": 1, "head_dim": 48, "attention_bias": True, "mlp_bias": True},
    ],
)
def test_parameter_count_equals_transformers(overrides):
    from transformers import LlamaForCausalLM

    cfg = llama_config(vocab_size=1000, num_hidden_layers=3, **overrides)
    with torch.device("meta"):
        want = LlamaForCausalLM(cfg).num_parameters()
    assert P.Shape.from_config(cfg.to_dict()).params == want


def test_parameter_count_of_llama2_presets():
    # the published sizes: 6,738,415,616 / 13,015,864,320 / 68,976,648,192
    assert P.Shape.from_config("llama-2-7b").params == 6_738_415_616
    assert P.Shape.from_config("llama-2-13b").params == 13_015_864_320
    assert P.Shape.from_config(LLAMA2_70B).params == 68_976_648_192


@pytest.mark.parametrize("kv,dtype", [(4, torch.float32), (2, torch.float32), (4, torch.bfloat16)])
def test_layer_activations_equal_what_autograd_saves(kv, dtype):
    """Every tensor one decoder layer saves for backward (parameters excluded), deduplicated by
    storage, against the formula."""
    from transformers import LlamaForCausalLM

    cfg = llama_config(num_key_value_heads=kv)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype)
    seq, p = 64, 2 if dtype == torch.bfloat16 else 4
    saved = layer_saved_bytes(model, input_ids=torch.randint(0, 500, (1, seq)))
    shape = P.Shape.from_config(cfg.to_dict())
    # the layer's own tensors plus the rotary cos/sin the model hands every layer
    want = P.layer_activation_bytes(shape, seq, 1, p=p) + P.rope_bytes(shape, seq, 1, p=p)
    assert saved == want


def test_checkpointing_and_chunked_loss_cut_activations():
    shape = P.Shape.from_config("llama-2-7b")
    full = P.activation_bytes(shape, 2048, 1, p=2, checkpointing=False)
    ckpt = P.activation_bytes(shape, 2048, 1, p=2, checkpointing=True)
    # Korthikanti et al.: full recomputation keeps ~2sbh per layer (here plus one live layer)
    assert ckpt < full / 8
    assert ckpt > shape.layers * 2 * 2048 * shape.hidden
    assert (
        P.logits_bytes(shape, 2048, 1, p=2, chunk=1024) == P.logits_bytes(shape, 2048, 1, p=2) / 2
    )


def test_fits_and_cheapest():
    rows = P.plan("llama-2-7b", ngpu=8, bf16=True, checkpointing=True, gpu_memory=80e9)
    by = {r.strategy: r for r in rows}
    assert not by["ddp"].fits  # 16 Psi = 108 GB of model states alone
    assert by["fsdp"].fits and by["zero3"].fits
    cheapest = [r for r in rows if r.cheapest]
    assert len(cheapest) == 1 and cheapest[0].fits
    # cheapest: the first fitting row, rows in the registry's cost order
    assert cheapest[0] is next(r for r in rows if r.fits)
    row = by["fsdp"]
    assert P.fits(row, row.total) and not P.fits(row, row.total - 1)
    assert not P.fits(row, 1e12, cpu_memory=row.cpu_peak - 1)
    # sharded streaming loading: FSDP2 holds one model copy per node of 8, DDP eight
    assert by["fsdp"].load_model_copies_per_node == 1 and by["ddp"].load_model_copies_per_node == 8


def test_qlora_base_is_about_a_quarter_of_bf16():
    shape = P.Shape.from_config("llama-2-7b")
    lora = P.plan(shape, peft="lora", bf16=True, strategies=["single"])[0].per_rank["params"]
    qlora = P.plan(shape, peft="qlora", bf16=True, strategies=["single"])[0].per_rank["params"]
    adapter = 4 * P.lora_params(shape, 64)
    # QLoRA paper: double quantization costs 0.127 bits per parameter on top of the 4
    assert P.nf4_bytes_per_param() * 8 == pytest.approx(4.127, abs=1e-3)
    assert 0.25 < (qlora - adapter) / (lora - adapter) < 0.3  # bf16 embeddings and head remain


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "recipes.plan", *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=P.DS_CONFIG_DIR.parent,
    ).stdout


def test_cli_on_a_70b_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_70B))
    out = _cli(
        *flags(model=str(tmp_path), ngpu="8"),
        "--bf16",
        "--gradient_checkpointing",
        "--gpu_memory",
        "80GB",
    )
    assert "68.977B parameters" in out
    marked = [line for line in out.splitlines() if "<- cheapest that fits" in line]
    assert len(marked) == 1 and marked[0].split()[0] in parallel.names()
    assert marked[0].split()[0] not in ("ddp", "zero2", "fsdp", "zero3")  # 16 Psi / 8 > 80 GB
    assert "least communication" in out  # what "cheapest" means

    data = json.loads(
        _cli(
            *flags(model=str(tmp_path / "config.json"), ngpu="8", nnodes="4"),
            "--bf16",
            "--gradient_checkpointing",
            "--json",
        )
    )
    assert data["model"]["params"] == 68_976_648_192
    rows = {r["strategy"]: r for r in data["rows"]}
    assert set(rows) == {s.name for s in parallel.by_cost() if s.multi_process}
    for r in rows.values():
        assert r["total"] == pytest.approx(sum(r["per_rank"].values()))
        assert r["fits"] == (r["total"] <= 80e9)
    assert sum(r["cheapest"] for r in rows.values()) == 1
    assert rows["fsdp"]["fits"]  # 32 GPUs: 16 Psi / 32 = 34 GB of model states


def test_cpu_mode_measures_the_runtime():
    rows = P.plan("llama-2-7b", ngpu=2, device="cpu", strategies=["fsdp"], seq=128)
    rt = rows[0].per_rank["runtime"]
    assert 100 * P.MIB < rt < 4096 * P.MIB  # python + torch + transformers + deepspeed
    assert rows[0].per_rank["buffers"] > 0 and rows[0].total > rt + 16 * 6.7e9 / 2


# -- the strategy registry -------------------------------------------------------------------


@pytest.fixture
def toy():
    """A strategy registered from outside the planner: ddp's attributes under another name."""
    strategy = parallel.register(
        dataclasses.replace(
            parallel.DDP,
            name="toy",
            cost_rank=99,
            description="a copy of ddp",
            fastchat_fsdp=frozenset(),
        )
    )
    yield strategy
    del parallel.STRATEGIES["toy"]


def test_a_registered_strategy_gets_a_row_without_a_planner_edit(toy):
    rows = {r.strategy: r for r in P.plan("llama-2-7b", ngpu=8, bf16=True, gpu_memory=80e9)}
    assert list(rows)[-1] == "toy"  # cost_rank 99: last
    for attr in ("per_rank", "per_node_cpu", "load_model_copies_per_node", "fits", "fails"):
        assert getattr(rows["toy"], attr) == getattr(rows["ddp"], attr), attr
    # one process: a multi-process strategy runs over a one-rank mesh, and has a row as ddp does
    one = {r.strategy for r in P.plan("llama-2-7b", ngpu=1)}
    assert "ddp" in one and "toy" in one
    assert "toy" in P.option_parser()._option_string_actions["--strategy"].help


def test_the_planner_reads_attributes_not_names():
    """Strategy names appear in recipes/plan.py only in documentation and presets: decisions
    come from recipes/core/parallel.py's Strategy attributes."""
    src = (P.DS_CONFIG_DIR.parent / "recipes" / "plan.py").read_text()
    names = "|".join(parallel.names())
    assert not re.findall(rf'"({names})"', src)
    assert "startswith(" not in src.replace('o.startswith("--")', "")


def test_adapters_follow_the_registry():
    lora = [r.strategy for r in P.plan("llama-2-7b", ngpu=8, peft="lora", bf16=True)]
    assert lora == [s.name for s in parallel.by_cost() if s.adapters and s.multi_process]
    qlora = [r.strategy for r in P.plan("llama-2-7b", ngpu=8, peft="qlora", bf16=True)]
    assert qlora == [s.name for s in parallel.by_cost() if s.quantized_base and s.multi_process]
    rows = {r.strategy: r for r in P.plan("llama-2-7b", ngpu=8, peft="lora", bf16=True)}
    # ZeRO-3 with offload: the base partition and the adapter's states live on the host
    off, z3 = rows["zero3_offload"], rows["zero3"]
    assert off.per_rank["params"] == 0 and off.cpu_peak > z3.cpu_peak
    assert off.total < z3.total


# -- fits: GPU and host ----------------------------------------------------------------------


def test_fits_means_gpu_and_host_memory():
    """The cheapest row must fit the host too (issue 17): 7B on 8 GPUs with 200 GB of host
    memory, where ZeRO-2 fits the GPUs but loads one fp32 copy per rank (253 GB)."""
    rows = P.plan(
        "llama-2-7b", ngpu=8, bf16=True, checkpointing=True, gpu_memory=80e9, cpu_memory=200e9
    )
    by = {r.strategy: r for r in rows}
    assert by["zero2"].total <= 80e9 and by["zero2"].fails == ["host"] and not by["zero2"].fits
    assert by["ddp"].fails == ["gpu", "host"]
    cheapest = next(r for r in rows if r.cheapest)
    assert cheapest.cpu_peak <= 200e9 and cheapest.total <= 80e9
    assert cheapest is next(r for r in rows if r.fits)
    # 70B on 8 GPUs with 1 TB: the offloading rows fit the GPUs, not the host: nothing fits
    rows = P.plan(
        LLAMA2_70B, ngpu=8, bf16=True, checkpointing=True, gpu_memory=80e9, cpu_memory=1e12
    )
    assert not any(r.fits or r.cheapest for r in rows)
    assert {r.strategy: r.fails for r in rows}["fsdp_offload"] == ["host"]


def test_cli_names_the_limit_that_fails(capsys):
    P.main("--model llama-2-70b --ngpu 8 --bf16 --gradient_checkpointing --cpu_memory 1TB".split())
    out = capsys.readouterr().out
    assert "cheapest that fits" not in out.replace('"cheapest that fits" is', "")
    lines = {line.split()[0]: line for line in out.splitlines()[2:9]}
    assert lines["fsdp_offload"].endswith("no: host") and lines["fsdp"].endswith("no: GPU")
    assert lines["ddp"].endswith("no: GPU and host")
    assert "nothing fits" in out and "for the host" in out


# -- the command line ------------------------------------------------------------------------


def test_columns_follow_the_values(capsys):
    """70B in MiB with --device cpu: values past 100,000 keep their columns apart (issue 19)."""
    P.main("--model llama-2-70b --ngpu 8 --device cpu --runtime_mb 900 --cpu_memory 2TB".split())
    lines = capsys.readouterr().out.splitlines()
    head = lines[1]
    fits_at = head.index("fits")
    n = len(re.split(r"\s{2,}", head[:fits_at].strip()))  # names with a space: "act full"
    for line in lines[2:9]:
        cells = line[:fits_at].split()
        assert len(cells) == n, line  # no two values run together
        assert all(c.replace(",", "").replace(".", "").isdigit() for c in cells[1:]), line
    assert any(len(c) > 9 for line in lines[2:9] for c in line.split()), "no wide value tested"


def test_every_option_has_help():
    parser = P.option_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    flags = set(parser._option_string_actions)
    for flag in (
        "--model",
        "--ngpu",
        "--nnodes",
        "--strategy",
        "--model_max_length",
        "--per_device_train_batch_size",
        "--bf16",
        "--gradient_checkpointing",
        "--gpu_memory",
        "--cpu_memory",
        "--loss_chunk_size",
        "--loading",
        "--peft",
        "--lora_r",
        "--device",
        "--runtime_mb",
        "--json",
        "--sequence_parallel_size",
    ):
        assert flag in flags  # the flags users type today, and the new one


def test_a_closed_pipe_ends_quietly():
    """`... --json | head -1`: the reader goes away; no BrokenPipe traceback, status 141."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "recipes.plan", "--model", "llama-2-70b", "--ngpu", "8", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=P.DS_CONFIG_DIR.parent,
    )
    proc.stdout.close()  # before it writes: its first write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == P.EXIT_BROKEN_PIPE and err == ""


def test_errors_leave_no_traceback_from_the_shell(tmp_path):
    (tmp_path / "config.json").write_text("[]")
    res = subprocess.run(
        [sys.executable, "-m", "recipes.plan", "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=P.DS_CONFIG_DIR.parent,
    )
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "holds a list" in res.stderr, res.stderr


def test_the_python_api_raises_plan_error():
    with pytest.raises(P.PlanError, match="--ngpu 0"):
        P.plan("llama-2-7b", ngpu=0)
    with pytest.raises(ValueError, match="--gpu_memory"):
        P.plan("llama-2-7b", gpu_memory=float("nan"))
    with pytest.raises(P.PlanError, match="hidden_size"):
        P.plan({"vocab_size": 10})
    # the launcher's pre-flight call, keywords as launch/train.py passes them
    rows = P.plan(
        "llama-2-7b",
        8,
        1,
        seq=2048,
        batch=1,
        bf16=True,
        checkpointing=True,
        gpu_memory=80 * 2**30,
        loss_chunk=512,
    )
    assert all(
        isinstance(r.strategy, str) and r.total > 0 and r.fits in (True, False) for r in rows
    )


# -- sequence parallelism --------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_sequence_parallel_splits_the_activations(checkpointing, batch):
    """sp=2: each rank holds the activations of half the tokens, plus, per layer kept, the
    attention output's second copy (the kernel's, head-sharded, and o_proj's, sequence-sharded)."""
    shape = P.Shape.from_config("llama-2-7b")
    seq, p = 32768, 2
    whole = P.activation_bytes(shape, seq, batch, p=p, checkpointing=checkpointing)
    half = P.activation_bytes(shape, seq // 2, batch, p=p, checkpointing=checkpointing)
    kept = 1 if checkpointing else shape.layers  # layers whose attention output is saved
    sp2 = P.activation_bytes(shape, seq, batch, p=p, checkpointing=checkpointing, sp=2)
    assert sp2 == half + kept * p * (seq // 2) * batch * shape.q_dim
    assert 0.5 < sp2 / whole < 0.53
    # and every further doubling halves exactly
    assert P.activation_bytes(shape, seq, batch, p=p, checkpointing=checkpointing, sp=4) == sp2 / 2
    # logits rows: the local ones (here all of them: no chunking)
    assert (
        P.logits_bytes(shape, seq, batch, p=p, chunk=0, sp=2)
        == P.logits_bytes(shape, seq, batch, p=p) / 2
    )
    # all-to-all: one layer's q, k, v send buffers, in the activation dtype
    assert P.all_to_all_bytes(shape, seq, batch, p=p, sp=1) == 0
    assert P.all_to_all_bytes(shape, seq, batch, p=p, sp=2) == p * seq // 2 * batch * (
        shape.q_dim + 2 * shape.kv_dim
    )


def test_sequence_parallel_rows_keep_model_states_sharded_over_all_ranks():
    one, two = (
        P.plan(
            "llama-2-7b",
            ngpu=8,
            bf16=True,
            checkpointing=True,
            seq=32768,
            sp=sp,
            strategies=["fsdp"],
        )[0]
        for sp in (1, 2)
    )
    for key in ("params", "grads", "optim", "buffers"):
        assert one.per_rank[key] == two.per_rank[key]
    assert two.data_parallel == 4 and two.ranks == 8
    assert two.per_rank["a2a"] > 0 and two.per_rank["activations"] < one.per_rank["activations"]


def test_sequence_parallel_refusals():
    with pytest.raises(P.PlanError, match="--sequence_parallel_size 3 does not divide the 8 ranks"):
        P.plan("llama-2-7b", ngpu=8, sp=3)
    with pytest.raises(P.PlanError, match="the model's 8 key/value heads"):
        P.plan(LLAMA2_70B, ngpu=8, nnodes=2, sp=16)
    with pytest.raises(P.PlanError, match="the model's 40 attention heads"):
        P.plan("llama-2-13b", ngpu=16, sp=16)
    with pytest.raises(
        P.PlanError, match="--sequence_parallel_size 16: must be a whole number from 1 to 8"
    ):
        P.plan("llama-2-7b", ngpu=8, sp=16)


def test_auto_length_is_the_longest_that_fits():
    kw = dict(ngpu=8, bf16=True, checkpointing=True, gpu_memory=80e9, strategies=["fsdp"])
    best = {sp: P.plan("llama-2-7b", seq="auto", sp=sp, **kw)[0] for sp in (1, 2, 4)}
    for sp, row in best.items():
        n = row.max_length
        assert n % sp == 0 and row.seq == n and row.fits
        assert P.plan("llama-2-7b", seq=n, sp=sp, **kw)[0].fits
        assert not P.plan("llama-2-7b", seq=n + sp, sp=sp, **kw)[0].fits
    # activations dominate: the length grows almost as sp (the a2a buffers and the second
    # attention-output copy take the rest)
    assert best[2].max_length >= 1.8 * best[1].max_length
    assert best[4].max_length >= 3.4 * best[1].max_length
    # nothing fits: no length, and the row says so
    ddp = P.plan("llama-2-7b", seq="auto", **{**kw, "strategies": ["ddp"]})[0]
    assert ddp.max_length is None and not ddp.fits


def test_auto_length_in_the_table_and_json(capsys):
    argv = "--model llama-2-7b --ngpu 8 --bf16 --gradient_checkpointing --model_max_length auto"
    argv = [*argv.split(), "--sequence_parallel_size", "4"]
    P.main([*argv, "--json"])
    data = json.loads(capsys.readouterr().out)
    rows = {r["strategy"]: r for r in data["rows"]}
    assert data["setup"]["model_max_length"] == "auto" and rows["ddp"]["max_length"] is None
    assert rows["fsdp"]["max_length"] > 400_000 and rows["fsdp"]["sp"] == 4
    P.main(argv)
    out = capsys.readouterr().out
    assert "max len" in out and f"{rows['fsdp']['max_length']:,}" in out
    assert "4,096 positions" in out and "a2a" in out
