"""--bf16 True trains under every strategy: 1 process, DDP, FSDP2 and ZeRO-3 on 2 CPU ranks.

What --bf16 does (and what is checked that it really does, from inside the running recipe):
- 1 process and DDP: fp32 parameters (master weights), the forward under torch.autocast(bf16):
  matmuls run in bf16, norms / softmax / the loss stay fp32 (TorchEngine.forward).
- FSDP2: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): fp32 sharded parameters,
  gathered and computed in bf16, gradients reduced in fp32.
- ZeRO-3: DeepSpeed's bf16 mode: bf16 module parameters (partitioned), an fp32 master copy in
  the optimizer; the export holds the bf16 parameters.
A recipe wrapper records, on each rank, the dtypes one attention projection sees in its first
forward and the dtype of the parameters the optimizer updates (`probe`, below).

Tolerances, from the precision and measured on this machine (4 steps, lr 1e-3, loss 7.05 ->
6.34, OMP_NUM_THREADS=1):
- bf16 keeps 8 significant bits: each rounding is off by up to 2^-9 (~2e-3) relative. The
  per-token losses are computed in fp32 from logits whose matmuls accumulate in fp32, and the
  step loss averages ~700 tokens, so independent rounding errors shrink by ~sqrt(700); the
  loss at step 1 (same weights, forward only) moved by 2e-5 .. 7e-5. Each AdamW step then
  applies updates computed from slightly different gradients, and the weights drift apart:
  measured max |loss_bf16 - loss_fp32| over 4 steps: 4.6e-4 (1 process = DDP, bitwise),
  9.2e-4 (FSDP2: norms in bf16 too), 1.04e-3 (ZeRO-3: bf16 weights, rounded once more at load).
  Bound: BF16_VS_FP32 = 5e-3 (5x the worst measured), 0.08% of the loss, 0.7% of its 0.71
  drop over these steps: a strategy that skipped an update, trained a rank on the wrong
  samples or lost a layer's gradients misses it by orders of magnitude.
- Strategies against each other in bf16: the same bf16 rounding applied to reductions in
  another order (per-rank micro-batches, sharded / bucketed gradient reduction) and to
  different casts (autocast vs FSDP2's bf16 parameters vs ZeRO-3's bf16 weights). Measured
  max pairwise difference 5.9e-4 (ZeRO-3 vs 1 process, step 4). Bound: BETWEEN = 5e-3 again
  (8x the measured; 8e-4 relative, well inside the ~1e-2 relative the precision could allow).
- Not a no-op: fp32 runs agree across strategies to ~1e-6 (tests/test_train.py checks 1e-4),
  while every bf16 run moved away from fp32 by >= 4.6e-4 somewhere in 4 steps; requiring more
  than NOT_FP32 = 1e-5 (46x below the smallest measured) shows the arithmetic changed, beside
  the direct dtype checks.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from train_utils import REPO, flags, losses, ranks, train

BF16_VS_FP32 = 5e-3
BETWEEN = 5e-3
NOT_FP32 = 1e-5
STEPS = 4
BASE = [
    *flags(
        config="tiny_cpu.yaml",
        learning_rate="1e-3",
        save_steps="100",
        max_steps=STEPS,
        per_device_train_batch_size=4,
    ),
]
ONE = [*BASE, "--gradient_accumulation_steps", 2]  # global batch 8 = 4 x 2 x 1 rank
TWO = [*BASE, "--gradient_accumulation_steps", 1]  # = 4 x 1 x 2 ranks

# The full fine-tune, with a forward hook that records what --bf16 really did on this rank.
PROBE = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
from recipes.core import recipe
from recipes.core.loop import Hooks


class Probe(Hooks):
    def started(self, run):
        proj = run.engine.module.model.layers[0].self_attn.q_proj
        seen = {{}}

        def hook(module, args, out):
            if not seen:
                opt = run.engine.optimizer  # ZeRO-3 keeps its fp32 master partitions apart
                flat = getattr(opt, "fp32_partitioned_groups_flat", None)
                groups = opt.param_groups
                params = flat if flat is not None else [p for g in groups for p in g["params"]]
                dtypes = ",".join({{str(p.dtype) for p in params}})
                seen.update(input=str(args[0].dtype), weight=str(module.weight.dtype),
                            output=str(out.dtype), optimizer=dtypes)
                name = f"dtypes-rank{{run.world.rank}}.json"
                Path(run.cfg.output_dir, name).write_text(json.dumps(seen))

        proj.register_forward_hook(hook)


sys.exit(recipe.main("sft", sys.argv[1:], hooks=Probe()))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("probe") / "full_finetune_probe.py"
    path.write_text(PROBE)
    return path


def run_all(probe: Path, root: Path, jobs: dict[str, tuple]) -> dict[str, Path]:
    """name -> (strategy, processes, args): all at once (each is mostly start-up on CPU)."""

    def one(item):
        name, (strategy, nproc, args) = item
        train(strategy, nproc, root / name, *args, recipe=probe)
        return name, root / name

    with ThreadPoolExecutor(len(jobs)) as pool:
        return dict(pool.map(one, jobs.items()))


@pytest.fixture(scope="module")
def single(probe, tmp_path_factory) -> dict[str, Path]:
    return run_all(
        probe,
        tmp_path_factory.mktemp("single"),
        {
            "fp32": ("single", 1, ONE),
            "bf16": ("single", 1, [*ONE, "--bf16", "True"]),
        },
    )


@pytest.fixture(scope="module")
def two_ranks(probe, tmp_path_factory) -> dict[str, Path]:
    return run_all(
        probe,
        tmp_path_factory.mktemp("two"),
        {s: (s, 2, [*TWO, "--bf16", "True"]) for s in ("ddp", "fsdp", "zero3")},
    )


def dtypes(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("dtypes-rank*.json"))]


def export_dtypes(out: Path) -> set[torch.dtype]:
    with safe_open(out / "model" / "model.safetensors", "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == STEPS
    return max(abs(x - y) for x, y in zip(a, b))


# what one attention projection sees in forward, and what the optimizer updates
FP32 = {
    "input": "torch.float32",
    "weight": "torch.float32",
    "output": "torch.float32",
    "optimizer": "torch.float32",
}
AUTOCAST = {**FP32, "output": "torch.bfloat16"}  # fp32 weights, bf16 matmul
BF16_PARAMS = {
    "input": "torch.bfloat16",
    "weight": "torch.bfloat16",
    "output": "torch.bfloat16",
    "optimizer": "torch.float32",
}  # bf16 compute, fp32 master weights
EXPECTED = {"ddp": AUTOCAST, "fsdp": BF16_PARAMS, "zero3": BF16_PARAMS}


def test_bf16_one_process(single):
    fp32, bf16 = losses(single["fp32"]), losses(single["bf16"])
    assert fp32[0] - fp32[-1] > 0.3 and bf16[0] - bf16[-1] > 0.3  # both really train
    assert NOT_FP32 < max_diff(bf16, fp32) < BF16_VS_FP32, (fp32, bf16)
    assert dtypes(single["fp32"]) == [FP32]
    assert dtypes(single["bf16"]) == [AUTOCAST]
    assert export_dtypes(single["bf16"]) == {torch.float32}  # the fp32 master weights


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
def test_bf16_two_ranks_agree_with_one_process(strategy, single, two_ranks):
    out = two_ranks[strategy]
    info = ranks(out)  # a real 2-rank job whose ranks trained on different samples
    assert [r["world_size"] for r in info] == [2, 2] and [r["rank"] for r in info] == [0, 1]
    assert not set(info[0]["sample_ids"]) & set(info[1]["sample_ids"])
    assert dtypes(out) == [EXPECTED[strategy]] * 2
    assert export_dtypes(out) == {torch.bfloat16 if strategy == "zero3" else torch.float32}
    fp32, bf16, got = losses(single["fp32"]), losses(single["bf16"]), losses(out)
    assert NOT_FP32 < max_diff(got, fp32) < BF16_VS_FP32, (fp32, got)
    assert max_diff(got, bf16) < BETWEEN, (bf16, got)


@pytest.mark.slow
def test_bf16_strategies_agree_with_each_other(two_ranks):
    got = {s: losses(out) for s, out in two_ranks.items()}
    for a in got:
        for b in got:
            assert max_diff(got[a], got[b]) < BETWEEN, (a, b, got)
