"""Preference tuning's shared pieces: pairs as training units, the DPO losses, and the
reference model's log-probabilities, computed once before training and cached.

A unit is one pair; its micro-batch holds the chosen rows then the rejected rows (one
forward for both, as TRL's concatenated forward does). The reference is the model's own
initial weights (for LoRA, the base: a fresh adapter adds nothing), scored before any
checkpoint is resumed, so no second model is ever held in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastchat_data.tokenize import IGNORE_INDEX

from .data import collate, pad_token_id

LOSS_TYPES = ("sigmoid", "ipo", "sigmoid_norm")
REFERENCE = "reference-{key}.safetensors"  # beside the cached, tokenized pairs


class PairData:
    """Tokenized pairs (fastchat_data.preference.build_preference_dataset) as the loop's
    training units: `lengths` and `trained` count both sides, `batch(ids)` stacks chosen rows
    over rejected rows, padded to the longest, with the reference log-probs once known."""

    def __init__(self, ds, pad_id: int):
        self.ds, self.pad_id, self.packing, self.noun = ds, pad_id, False, "pairs"
        chosen = np.asarray(ds["chosen_length"], dtype=np.int64)
        rejected = np.asarray(ds["rejected_length"], dtype=np.int64)
        self.lengths = chosen + rejected
        self.trained = np.array([int((np.asarray(a) != IGNORE_INDEX).sum() + (np.asarray(b) != IGNORE_INDEX).sum())
                                 for a, b in zip(ds["chosen_labels"], ds["rejected_labels"])])  # fmt: skip
        self.units = [np.array([i]) for i in range(len(ds))]
        self.reference: torch.Tensor | None = None  # (pairs, 2): chosen, rejected

    def batch(self, unit_ids, with_reference: bool = True) -> dict[str, torch.Tensor]:
        pairs = [self.ds[int(u)] for u in unit_ids]
        out = collate([{"input_ids": p[f"{side}_input_ids"], "labels": p[f"{side}_labels"]}
                       for side in ("chosen", "rejected") for p in pairs], self.pad_id)  # fmt: skip
        if with_reference:
            if self.reference is None:
                raise RuntimeError("reference log-probabilities are not computed yet")
            ref = self.reference[torch.as_tensor([int(u) for u in unit_ids])]
            out["reference_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
        return out


class PlainForward:
    """An engine's forward for one plain model (evaluation, tests): chunked, no full logits."""

    def __init__(self, model, chunk_size: int = 512):
        self.model, self.chunk_size = model, chunk_size

    def forward(self, **batch):
        from .loss import forward_with_loss

        return forward_with_loss(self.model, self.model, self.chunk_size, **batch)


def sequence_logps(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label log-probs per row, and trained tokens per row (chunked: no full logits)."""
    out = engine.forward(**batch, use_cache=False, return_sequence_logps=True)
    tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
    return out.loss, tokens


def dpo_losses(policy: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor, beta: float,
               loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
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
    losses, chosen, rejected = dpo_losses(policy, reference.to(policy.dtype), tokens,
                                          run.cfg.beta, run.cfg.loss_type)  # fmt: skip
    pairs = run.plan.global_size
    stats = {
        "rewards/chosen": chosen.sum() / pairs,
        "rewards/rejected": rejected.sum() / pairs,
        "rewards/margin": (chosen - rejected).sum() / pairs,
        "rewards/accuracy": (chosen > rejected).float().sum() / pairs,
    }
    return losses.sum() / pairs, {k: v.item() for k, v in stats.items()}


def model_fingerprint(path: str) -> str:
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
    key = json.dumps({"model": model_fingerprint(run.model_path), "bf16": cfg.bf16,
                      "quantization": getattr(cfg, "quantization", "none")}, sort_keys=True)  # fmt: skip
    folder = Path(run.data.ds.cache_files[0]["filename"]).parent
    return folder / REFERENCE.format(key=hashlib.sha256(key.encode()).hexdigest()[:16])


@torch.no_grad()
def score_pairs(engine, data: PairData, ids: list[int], micro: int, world) -> dict[int, tuple]:
    """(chosen, rejected) summed log-probs of pairs `ids` (this rank's share). Every rank runs
    the same number of forwards: FSDP2 and ZeRO-3 gather parameters collectively."""
    steps = max(world.gather_objects(-(-len(ids) // micro)))
    scores = {}
    for s in range(steps):
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
        scores = score_pairs(run.engine, data, share, run.cfg.per_device_train_batch_size, world)
        for m, mode in modes.items():
            m.train(mode)
        merged = {k: v for part in world.gather_objects(scores) for k, v in part.items()}
        if world.main:
            table = torch.tensor([merged[i] for i in range(n)], dtype=torch.float32)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            save_file({"reference_logps": table}, str(tmp))
            os.replace(tmp, path)  # atomic: a killed run never leaves half a table
            print(f"reference log-probs of {n} pairs: {path}")
        world.barrier()
    elif world.main:
        print(f"reference log-probs: cached {path}")
    data.reference = load_file(str(path))["reference_logps"]
    if data.reference.shape != (len(data.units), 2):
        raise RuntimeError(f"{path}: holds {tuple(data.reference.shape)} scores for "
                           f"{len(data.units)} pairs; delete it to recompute")  # fmt: skip


@torch.no_grad()
def preference_scores(model, tokenizer, pairs_path: str, template="vicuna_v1.1", max_length: int = 2048,
                      batch_size: int = 4, cache_dir: str | None = None) -> dict:  # fmt: skip
    """How often `model` prefers the chosen reply of held-out pairs: its summed log-probability
    above the rejected one's (`accuracy`), and per reply token (`accuracy_per_token`, blind to
    length), with the mean margin of each."""
    from fastchat_data.preference import build_preference_dataset

    ds, _ = build_preference_dataset([pairs_path], tokenizer, template=template, max_length=max_length,
                                     cache_dir=cache_dir, quiet=True)  # fmt: skip
    data = PairData(ds.with_format("numpy"), pad_token_id(tokenizer))

    device = next(model.parameters()).device
    margins, per_token = [], []
    for start in range(0, len(data.units), batch_size):
        ids = list(range(start, min(start + batch_size, len(data.units))))
        batch = {k: v.to(device) for k, v in data.batch(ids, with_reference=False).items()}
        logps, tokens = sequence_logps(PlainForward(model), batch)
        chosen, rejected = logps.double().cpu().chunk(2)
        n_chosen, n_rejected = tokens.cpu().chunk(2)
        margins += (chosen - rejected).tolist()
        per_token += (chosen / n_chosen.clamp(min=1) - rejected / n_rejected.clamp(min=1)).tolist()
    n = len(margins)
    return {"pairs": n, "accuracy": sum(m > 0 for m in margins) / n, "mean_margin": sum(margins) / n,
            "accuracy_per_token": sum(m > 0 for m in per_token) / n,
            "mean_margin_per_token": sum(per_token) / n}  # fmt: skip


def format_preference_table(rows: list[dict]) -> str:
    head = f"{'model':<44}{'pairs':>7}{'accuracy':>10}{'margin':>10}{'acc/token':>11}{'margin/token':>14}"
    lines = [head]
    for r in rows:
        name = r["model"] if len(r["model"]) <= 42 else "..." + r["model"][-39:]
        lines.append(f"{name:<44}{r['pairs']:>7}{r['accuracy']:>10.3f}{r['mean_margin']:>10.2f}"
                     f"{r['accuracy_per_token']:>11.3f}{r['mean_margin_per_token']:>14.4f}")  # fmt: skip
    return "\n".join(lines)
