"""Direct preference optimisation: DPO (sigmoid), length-normalised DPO and IPO.

The reference is the starting model itself: its log-probabilities of every pair are scored
once before training (split over the ranks, on the initial weights even when a run resumes;
for LoRA the base, which a fresh adapter leaves unchanged) and cached beside the tokenized
pairs, so no second model is ever held in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from fastchat_data.options import option

from ..config import ConfigError
from ..logging import progress, took
from ..preference import PairData, load_pairs, pair_loss_share, sequence_logps
from .base import Units

LOSS_TYPES = ("sigmoid", "ipo", "sigmoid_norm")
REFERENCE = "reference-{key}.safetensors"  # beside the cached, tokenized pairs


@dataclass
class DPOArgs:
    """DPO"""

    beta: float = option(0.1, "how far the policy may move from the reference (DPO's beta)")
    loss_type: Literal["sigmoid", "sigmoid_norm", "ipo"] = option(
        "sigmoid", "sigmoid (DPO), sigmoid_norm (per-token DPO) or ipo"
    )

    @staticmethod
    def check(cfg) -> None:
        if not (math.isfinite(cfg.beta) and 0 < cfg.beta <= 1e4):
            raise ConfigError(f"beta must be a finite number in (0, 10000], got {cfg.beta}")


def dpo_losses(
    policy: torch.Tensor,
    reference: torch.Tensor,
    tokens: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards beta * (log pi - log ref) of each side.

    Rows are [chosen..., rejected...]. sigmoid: -log sigmoid(beta * margin) (DPO);
    sigmoid_norm: the same on log-ratios averaged per reply token (length-normalised);
    ipo: (margin_per_token - 1 / (2 beta))^2, IPO with TRL's per-token averaging."""
    ratios = policy - reference
    chosen, rejected = ratios.chunk(2)
    if loss_type in ("ipo", "sigmoid_norm"):
        n_chosen, n_rejected = tokens.clamp(min=1).to(ratios.dtype).chunk(2)
        margin = chosen / n_chosen - rejected / n_rejected
    else:
        margin = chosen - rejected
    if loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    elif loss_type in ("sigmoid", "sigmoid_norm"):
        losses = -F.logsigmoid(beta * margin)
    else:
        raise ValueError(f"loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    return losses, beta * chosen.detach(), beta * rejected.detach()


def dpo_objective(run, batch: dict) -> tuple[torch.Tensor, dict]:
    """The loss of this micro-batch's pairs as a share of the global batch's mean, and the
    statistics DPO users read beside it (each a share of its global mean too)."""
    reference = batch.pop("reference_logps")
    policy, tokens = sequence_logps(run.engine, batch)
    losses, chosen, rejected = dpo_losses(
        policy, reference.to(policy.dtype), tokens, beta=run.cfg.beta, loss_type=run.cfg.loss_type
    )
    return pair_loss_share(losses, chosen, rejected, pairs=run.plan.global_size)


def weights_key(path: str) -> str:
    """The weights a reference was computed from: config and weight files by name, size and
    modification time (hashing a 70B model's bytes would take minutes)."""
    folder = Path(path)
    parts = [(folder / "config.json").read_text()]
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def reference_path(run) -> Path:
    cfg = run.cfg
    key = json.dumps(
        {
            "model": weights_key(run.model_path),
            "bf16": cfg.bf16,
            "quantization": getattr(cfg, "quantization", "none"),
        },
        sort_keys=True,
    )
    folder = Path(run.data.ds.cache_files[0]["filename"]).parent
    return folder / REFERENCE.format(key=hashlib.sha256(key.encode()).hexdigest()[:16])


@torch.no_grad()
def score_pairs(engine, data: PairData, ids: list[int], *, micro: int, world) -> dict[int, tuple]:
    """(chosen, rejected) summed log-probs of pairs `ids` (this rank's share). Every rank runs
    the same number of forwards: FSDP2 and ZeRO-3 gather parameters collectively."""
    steps = max(world.gather_objects(-(-len(ids) // micro)))
    scores = {}
    for s in progress(range(steps), "reference log-probs", main=world.main):
        part = ids[s * micro : (s + 1) * micro] or [0]  # an idle rank still joins the forward
        batch = {k: v.to(world.device) for k, v in data.batch(part, with_reference=False).items()}
        logps, _ = sequence_logps(engine, batch)
        chosen, rejected = logps.float().cpu().chunk(2)
        if s * micro < len(ids):
            scores.update({i: (float(c), float(r)) for i, c, r in zip(part, chosen, rejected)})
    return scores


def _bnb_layer(module) -> bool:
    # bitsandbytes' 4-bit layers in eval mode on CPU repack their weights for an inference
    # kernel (which needs widths divisible by its block): keep them as training uses them;
    # they hold no dropout
    return type(module).__module__.startswith("bitsandbytes")


def compute_reference(run) -> None:
    """The reference log-probs of every pair: read from the cache beside the tokenized pairs,
    or scored now with the model's initial weights (split over ranks) and written there."""
    from safetensors.torch import load_file, save_file

    world, data = run.world, run.data
    path = reference_path(run)
    if not path.exists():
        n = len(data.units)
        share = list(range(world.rank, n, world.size))
        modes = {m: m.training for m in run.engine.module.modules()}
        for m in modes:  # dropout off, as at inference; bitsandbytes layers see _bnb_layer
            m.train(_bnb_layer(m))
        started = time.perf_counter()
        scores = score_pairs(
            run.engine, data, share, micro=run.cfg.per_device_train_batch_size, world=world
        )
        for m, mode in modes.items():
            m.train(mode)
        merged = {k: v for part in world.gather_objects(scores) for k, v in part.items()}
        if world.main:
            table = torch.tensor([merged[i] for i in range(n)], dtype=torch.float32)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            save_file({"reference_logps": table}, str(tmp))
            os.replace(tmp, path)  # atomic: a killed run never leaves half a table
            print(
                f"reference log-probs of {n} pairs scored in "
                f"{took(time.perf_counter() - started)}: {path}"
            )
        world.barrier()
    elif world.main:
        print(f"reference log-probs: cached {path}")
    data.reference = load_file(str(path))["reference_logps"]
    if data.reference.shape != (len(data.units), 2):
        raise RuntimeError(
            f"{path}: holds {tuple(data.reference.shape)} scores for "
            f"{len(data.units)} pairs; delete it to recompute"
        )


class DPO:
    name = "dpo"
    section = DPOArgs
    units = Units("pairs", rows=2)  # a chosen and a rejected row, batched together

    def check(self, cfg) -> None:
        pass  # DPOArgs checks its options; `units` refuses --packing

    def data(self, cfg, tokenizer, world) -> PairData:
        return load_pairs(cfg, tokenizer, world, with_reference=True)

    def before_resume(self, run) -> None:
        compute_reference(run)

    def loss(self, run, batch: dict):
        return dpo_objective(run, batch)

    def describe(self, cfg) -> str:
        return f"DPO ({cfg.loss_type}, beta {cfg.beta}), "


OBJECTIVE = DPO()
