"""The memory planner (recipes/plan.py): its model states against the ZeRO paper, its
parameter count against transformers, its activation formula against what autograd saves,
and its command line on a hand-written Llama-2-70B config."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from recipes import plan as P

LLAMA2_70B = {  # meta-llama/Llama-2-70b-hf config.json, the fields the planner reads
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
    "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "tie_word_embeddings": False,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "float16",
}  # fmt: skip


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
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=344,
                      num_hidden_layers=3, num_attention_heads=4, **overrides)  # fmt: skip
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
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=500, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, inside = {}, [False]

    def pack(t):
        if inside[0] and t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    layer = model.model.layers[0]
    layer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *a: inside.__setitem__(0, False))
    seq, p = 64, 2 if dtype == torch.bfloat16 else 4
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=torch.randint(0, 500, (1, seq)), use_cache=False)
    shape = P.Shape.from_config(cfg.to_dict())
    # the layer's own tensors plus the rotary cos/sin the model hands every layer
    want = P.layer_activation_bytes(shape, seq, 1, p) + P.rope_bytes(shape, seq, 1, p)
    assert sum(saved.values()) == want


def test_checkpointing_and_chunked_loss_cut_activations():
    shape = P.Shape.from_config("llama-2-7b")
    full = P.activation_bytes(shape, 2048, 1, 2, checkpointing=False)
    ckpt = P.activation_bytes(shape, 2048, 1, 2, checkpointing=True)
    # Korthikanti et al.: full recomputation keeps ~2sbh per layer (here plus one live layer)
    assert ckpt < full / 8
    assert ckpt > shape.layers * 2 * 2048 * shape.hidden
    assert P.logits_bytes(shape, 2048, 1, 2, chunk=1024) == P.logits_bytes(shape, 2048, 1, 2) / 2


def test_fits_and_cheapest():
    rows = P.plan("llama-2-7b", ngpu=8, bf16=True, checkpointing=True, gpu_memory=80e9)
    by = {r.strategy: r for r in rows}
    assert not by["ddp"].fits  # 16 Psi = 108 GB of model states alone
    assert by["fsdp"].fits and by["zero3"].fits
    cheapest = [r for r in rows if r.cheapest]
    assert len(cheapest) == 1 and cheapest[0].fits
    # cheapest: the first fitting row in STRATEGIES' order
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
    return subprocess.run([sys.executable, "-m", "recipes.plan", *args], capture_output=True,
                          text=True, check=True, cwd=P.DS_CONFIG_DIR.parent).stdout  # fmt: skip


def test_cli_on_a_70b_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_70B))
    out = _cli("--model", str(tmp_path), "--ngpu", "8", "--bf16", "--gradient_checkpointing",
               "--gpu_memory", "80GB")  # fmt: skip
    assert "68.977B parameters" in out
    marked = [line for line in out.splitlines() if "<- cheapest that fits" in line]
    assert len(marked) == 1 and marked[0].split()[0] in P.STRATEGIES
    assert marked[0].split()[0] not in ("ddp", "zero2", "fsdp", "zero3")  # 16 Psi / 8 > 80 GB

    data = json.loads(_cli("--model", str(tmp_path / "config.json"), "--ngpu", "8", "--nnodes",
                           "4", "--bf16", "--gradient_checkpointing", "--json"))  # fmt: skip
    assert data["model"]["params"] == 68_976_648_192
    rows = {r["strategy"]: r for r in data["rows"]}
    assert set(rows) == set(P.STRATEGIES) - {"single"}
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
