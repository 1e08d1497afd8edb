"""Preference pairs as training units and their sequence log-likelihoods: what DPO and the
reward model train on (recipes/core/objectives/dpo.py, reward.py) and what `recipes.eval
--pairs` scores.

A unit is one pair; its micro-batch holds the chosen rows then the rejected rows (one
forward for both, as TRL's concatenated forward does).
"""

from __future__ import annotations

import numpy as np
import torch

from fastchat_data.tokenize import IGNORE_INDEX

from .config import data_paths
from .data import built_by_rank0_first, collate, pad_token_id
from .logging import progress


def load_pairs(cfg, tokenizer, world, *, with_reference: bool) -> PairData:
    """The pairs of --data_path as training units: rank 0 tokenizes them (or finds them
    cached); the others then read the cache."""
    from fastchat_data.preference import build_preference_dataset

    paths = data_paths(cfg.data_path)
    args = dict(template=cfg.template, max_length=cfg.model_max_length, cache_dir=cfg.cache_dir)
    ds, _ = built_by_rank0_first(world, build_preference_dataset, paths, tokenizer, **args)
    return PairData(ds.with_format("numpy"), pad_token_id(tokenizer), with_reference)


class PairData:
    """Tokenized pairs (fastchat_data.preference.build_preference_dataset) as the loop's
    training units: `lengths` and `trained` count both sides, `batch(ids)` stacks chosen rows
    over rejected rows, padded to the longest, with the reference log-probs once known."""

    def __init__(self, ds, pad_id: int, with_reference: bool = True):
        self.ds, self.pad_id, self.packing = ds, pad_id, False
        self.with_reference = with_reference  # False: batches never carry reference log-probs
        chosen = np.asarray(ds["chosen_length"], dtype=np.int64)
        rejected = np.asarray(ds["rejected_length"], dtype=np.int64)
        self.lengths = chosen + rejected
        self.trained = np.array(
            [
                int((np.asarray(a) != IGNORE_INDEX).sum() + (np.asarray(b) != IGNORE_INDEX).sum())
                for a, b in zip(ds["chosen_labels"], ds["rejected_labels"])
            ]
        )
        self.units = [np.array([i]) for i in range(len(ds))]
        self.reference: torch.Tensor | None = None  # (pairs, 2): chosen, rejected

    def batch(self, unit_ids, with_reference: bool | None = None) -> dict[str, torch.Tensor]:
        pairs = [self.ds[int(u)] for u in unit_ids]
        out = collate(
            [
                {"input_ids": p[f"{side}_input_ids"], "labels": p[f"{side}_labels"]}
                for side in ("chosen", "rejected")
                for p in pairs
            ],
            self.pad_id,
        )
        if self.with_reference if with_reference is None else with_reference:
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


def pair_loss_share(
    losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, *, pairs: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """This micro-batch's share of the global batch's mean pair loss (`pairs` pairs in all),
    and the reward statistics preference users read beside it (TRL's names), shares too."""
    stats = {
        "rewards/chosen": chosen.sum() / pairs,
        "rewards/rejected": rejected.sum() / pairs,
        "rewards/margin": (chosen - rejected).sum() / pairs,
        "rewards/accuracy": (chosen > rejected).float().sum() / pairs,
    }
    return losses.sum() / pairs, {k: v.item() for k, v in stats.items()}


def pair_batches(tokenizer, pairs_path, template, *, max_length, batch_size, cache_dir):
    """Held-out preference pairs, tokenized as in training, as batches of `batch_size` pairs
    (chosen rows over rejected rows, no reference log-probs), made as they are read: what
    both scorers read. Returns (number of batches, the batches)."""
    from fastchat_data.preference import build_preference_dataset

    ds, _ = build_preference_dataset(
        [pairs_path],
        tokenizer,
        template=template,
        max_length=max_length,
        cache_dir=cache_dir,
        quiet=True,
    )
    data = PairData(ds.with_format("numpy"), pad_token_id(tokenizer), with_reference=False)
    n = len(data.units)
    starts = range(0, n, batch_size)
    return len(starts), (data.batch(list(range(i, min(i + batch_size, n)))) for i in starts)


def _pair_scorer(name: str, label: str, margins_of, *, doc: str):
    """A held-out pair scorer: `margins_of(model, batch, device)` gives each batch's chosen-minus-
    rejected margins, by name suffix ("" for the main score); the scorer reads the pairs
    (pair_batches), gathers the margins and summarises each as `accuracy{suffix}` (how often
    the chosen reply wins) and `mean_margin{suffix}`. The log-probability and the reward
    scorers are this one loop with their own margins."""

    @torch.no_grad()
    def scores(
        model,
        tokenizer,
        pairs_path: str,
        *,
        template="vicuna_v1.1",
        max_length: int = 2048,
        batch_size: int = 4,
        cache_dir: str | None = None,
    ) -> dict:
        device = next(model.parameters()).device
        margins: dict[str, list[float]] = {}
        count, pairs = pair_batches(
            tokenizer,
            pairs_path,
            template,
            max_length=max_length,
            batch_size=batch_size,
            cache_dir=cache_dir,
        )
        for batch in progress(pairs, label, total=count):
            for suffix, batch_margins in margins_of(model, batch, device).items():
                margins.setdefault(suffix, []).extend(batch_margins)
        n = len(margins.get("", []))
        result = {"pairs": n}
        for suffix, m in margins.items():
            result[f"accuracy{suffix}"] = sum(x > 0 for x in m) / n
            result[f"mean_margin{suffix}"] = sum(m) / n
        return result

    scores.__name__ = scores.__qualname__ = name
    scores.__doc__ = doc
    return scores


def _logp_margins(model, batch: dict, device) -> dict[str, list[float]]:
    batch = {k: v.to(device) for k, v in batch.items()}
    logps, tokens = sequence_logps(PlainForward(model), batch)
    chosen, rejected = logps.double().cpu().chunk(2)
    n_chosen, n_rejected = tokens.cpu().chunk(2)
    per_token = chosen / n_chosen.clamp(min=1) - rejected / n_rejected.clamp(min=1)
    return {"": (chosen - rejected).tolist(), "_per_token": per_token.tolist()}


def _reward_margins(model, batch: dict, device) -> dict[str, list[float]]:
    out = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        use_cache=False,
    )
    chosen, rejected = out.logits.squeeze(-1).double().cpu().chunk(2)
    return {"": (chosen - rejected).tolist()}


preference_scores = _pair_scorer(
    "preference_scores",
    "preference pairs",
    _logp_margins,
    doc="""How often `model` prefers the chosen reply of held-out pairs: its summed log-probability
    above the rejected one's (`accuracy`), and per reply token (`accuracy_per_token`, blind to
    length), with the mean margin of each.""",
)
reward_scores = _pair_scorer(
    "reward_scores",
    "reward pairs",
    _reward_margins,
    doc="""How often a reward model (a sequence-classification model with one output) scores the
    chosen reply of held-out pairs above the rejected one, and the mean margin. Rows are
    padded as in training; the model pools its config's last non-pad token.""",
)


def format_preference_table(rows: list[dict]) -> str:
    head = f"{'model':<44}{'pairs':>7}{'accuracy':>10}{'margin':>10}"
    if any("accuracy_per_token" in r for r in rows):
        head += f"{'acc/token':>11}{'margin/token':>14}"
    lines = [head]
    for r in rows:
        name = r["model"] if len(r["model"]) <= 42 else "..." + r["model"][-39:]
        line = f"{name:<44}{r['pairs']:>7}{r['accuracy']:>10.3f}{r['mean_margin']:>10.2f}"
        if "accuracy_per_token" in r:  # a reward model's row has no per-token score
            line += f"{r['accuracy_per_token']:>11.3f}{r['mean_margin_per_token']:>14.4f}"
        lines.append(line)
    return "\n".join(lines)
