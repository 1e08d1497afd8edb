"""The data module: the cached training set, a deterministic resumable batch order, padding.

Step s of training always consumes the same global batch, so resuming at step s needs no
saved sampler state, and every rank can count the global batch's trained tokens (the loss
denominator) without communicating.
"""

from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np
import torch

from fastchat_data.build import build_dataset
from fastchat_data.tokenize import IGNORE_INDEX

from .config import ConfigError, data_paths

MEGABATCH = 50  # length grouping sorts within 50 global batches, as HF's LengthGroupedSampler does


# the training config's options that build_dataset takes under the same name
BUILD_OPTIONS = (
    "template",
    "train_on_inputs",
    "num_proc",
    "cache_dir",
    "max_source_length",
    "max_target_length",
)


def load_train_set(cfg, data_path: str, tokenizer, *, world):
    """Rank 0 tokenizes (or finds it cached); the others then load the cached Arrow files."""
    args = {name: getattr(cfg, name) for name in BUILD_OPTIONS}
    args["max_length"] = cfg.model_max_length
    paths = data_paths(data_path)  # one file, or several comma-separated
    ds, report = built_by_rank0_first(world, build_dataset, paths, tokenizer, **args)
    return ds.with_format("numpy"), report


def built_by_rank0_first(world, build, *args, **kwargs):
    """`build(...)` on rank 0 (which tokenizes, or finds it cached); then the other ranks,
    which find it in the cache. Rank 0 reports in one line, or with the whole report when
    something was dropped or cut (what a user must see)."""
    built = world.main_first(lambda: build(*args, quiet=True, **kwargs))
    if not world.main:
        return build(*args, quiet=True, **kwargs)
    _, report = built
    if report.dropped_total or report.truncated:
        report.emit()
    else:
        tokens = report.notes.get("tokens")
        how = "cached" if "hit" in str(report.notes.get("cache", "")) else "built"
        size = f", {tokens:,} tokens" if isinstance(tokens, int) else ""
        print(f"training set: {report.written:,} rows{size} ({how})", flush=True)
    return built


def pad_token_id(tokenizer) -> int:
    """The id padding uses: the tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class BatchPlan:
    """Which samples data-parallel rank r trains on at micro-step m of optimizer step s.
    `world_size` counts data-parallel ranks (ranks that share a sequence share its samples)."""

    def __init__(self, lengths: np.ndarray, trained: np.ndarray, cfg, *, world_size: int):
        self.lengths, self.trained = lengths, trained
        self.micro, self.accum, self.world = (
            cfg.per_device_train_batch_size,
            cfg.gradient_accumulation_steps,
            world_size,
        )
        self.global_size = self.micro * self.accum * self.world
        self.seed, self.group = cfg.seed, cfg.group_by_length
        if len(lengths) < self.global_size:
            raise ConfigError(
                f"the training set has {len(lengths)} conversations, fewer than one global batch "
                f"({self.micro} per device x {self.accum} accumulation x {self.world} ranks = "
                f"{self.global_size}); "
                "add data or lower the batch size"
            )
        self.steps_per_epoch = len(lengths) // self.global_size
        self._epoch, self._order = None, None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.lengths))
            used = self.steps_per_epoch * self.global_size
            if self.group:
                mega = self.global_size * MEGABATCH
                chunks = [order[i : i + mega] for i in range(0, len(order), mega)]
                order = np.concatenate(
                    [c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks]
                )
                batches = order[:used].reshape(self.steps_per_epoch, self.global_size)
                order = batches[rng.permutation(self.steps_per_epoch)].reshape(-1)
            self._epoch, self._order = epoch, order[:used]
        return self._order

    def global_batch(self, step: int) -> np.ndarray:
        epoch, s = divmod(step, self.steps_per_epoch)
        ids = self._epoch_order(epoch)[s * self.global_size : (s + 1) * self.global_size]
        return ids[np.argsort(-self.lengths[ids], kind="stable")] if self.group else ids

    def micro_batches(self, step: int, rank: int) -> list[np.ndarray]:
        """Similar lengths share a micro-step across ranks, so no rank waits on a longer one."""
        ids = self.global_batch(step)
        slots = ids.reshape(self.accum * self.world, self.micro)
        return [slots[m * self.world + rank] for m in range(self.accum)]

    def global_trained_tokens(self, step: int) -> int:
        return int(self.trained[self.global_batch(step)].sum())


def trained_token_counts(ds) -> np.ndarray:
    """Trained tokens per sample, as the shifted causal-LM loss counts them (label 0 predicts
    nothing)."""
    return np.array(
        [int((np.asarray(lab[1:]) != IGNORE_INDEX).sum()) for lab in ds["labels"]], dtype=np.int64
    )


def pack_sequences(lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Best-fit decreasing: conversations into rows of at most `capacity` tokens. Deterministic."""
    order = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row) sorted: best fit = smallest that fits
    for i in order:
        need = int(lengths[i])
        at = bisect_left(free, (need, -1))
        if at == len(free):
            rows.append([int(i)])
            room, row = capacity - need, len(rows) - 1
        else:
            room, row = free.pop(at)
            rows[row].append(int(i))
            room -= need
        insort(free, (room, row))
    return [np.array(sorted(r)) for r in rows]


class TrainData:
    """The training set seen as units: one conversation each, or with packing, several
    conversations per row that do not attend to each other.

    Packed rows hold at most `row_tokens` tokens, by default as many as the longest
    conversation (never more than `capacity`); a conversation longer than `row_tokens` has a
    row of its own. sdpa and eager compute a packed row's whole width x width attention,
    masked blocks included, so a row no wider than the widest length-grouped row costs no more
    attention per token than that row, while a row of `capacity` tokens of short conversations
    would cost up to capacity / length times more."""

    def __init__(
        self, ds, packing: bool, capacity: int, *, pad_id: int, row_tokens: int | None = None
    ):
        self.ds, self.packing, self.pad_id = ds, packing, pad_id
        lengths = np.asarray(ds["length"], dtype=np.int64)
        trained = trained_token_counts(ds)
        if packing:
            self.row_tokens = min(capacity, row_tokens or int(lengths.max(initial=1)))
            self.units = pack_sequences(lengths, self.row_tokens)
        else:
            self.row_tokens = None
            self.units = [np.array([i]) for i in range(len(lengths))]
        self.lengths = np.array([lengths[u].sum() for u in self.units], dtype=np.int64)
        self.trained = np.array([trained[u].sum() for u in self.units], dtype=np.int64)

    def batch(self, unit_ids) -> dict[str, torch.Tensor]:
        rows = [[self.ds[int(i)] for i in self.units[int(u)]] for u in unit_ids]
        if self.packing:
            return collate_packed(rows, self.pad_id)
        return collate([r[0] for r in rows], self.pad_id)


def collate_packed(rows: list[list[dict]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows: position_ids restart at 0 for each conversation and no attention_mask is
    given, which transformers reads as separate sequences (a block-diagonal causal mask, the
    same mechanism as its DataCollatorWithFlattening). No conversation sees another."""
    width = max(sum(len(c["input_ids"]) for c in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        at = 0
        for conv in row:
            n = len(conv["input_ids"])
            ids[i, at : at + n] = torch.as_tensor(conv["input_ids"])
            labels[i, at : at + n] = torch.as_tensor(conv["labels"])
            labels[i, at] = IGNORE_INDEX  # never predicted from the previous conversation
            positions[i, at : at + n] = torch.arange(n)
            at += n
        positions[i, at:] = torch.arange(width - at)  # padding: a sequence of its own, untrained
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row of this micro-batch (not to model_max_length, as FastChat does)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"])
        labels[i, :n] = torch.as_tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
