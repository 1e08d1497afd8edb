"""The data module: the cached training set, a deterministic resumable batch order, padding.

Step s of training always consumes the same global batch, so resuming at step s needs no
saved sampler state, and every rank can count the global batch's trained tokens (the loss
denominator) without communicating.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastchat_data.build import build_dataset
from fastchat_data.identity import identity_conversations
from fastchat_data.io import write_records
from fastchat_data.tiny import TEMPLATE_WORDS, corpus_texts, default_cache_dir, tiny_model
from fastchat_data.tokenize import IGNORE_INDEX

from .config import ConfigError, TrainConfig

MEGABATCH = 50  # length grouping sorts within 50 global batches, as HF's LengthGroupedSampler does


def default_model_and_data(cfg: TrainConfig, world) -> tuple[str, str]:
    """With no model or data given: the tiny Llama and the embedded identity conversations."""
    cache = Path(cfg.cache_dir or default_cache_dir())
    records = identity_conversations(n=400, seed=0)
    data = cache / "demo" / "identity.json"
    model = None
    if world.main:
        if cfg.data_path is None:
            write_records(data, records)
        if cfg.model_name_or_path is None:
            model = tiny_model("llama", "tiny", texts=corpus_texts(records) + TEMPLATE_WORDS * 20, cache_dir=cache)
    world.barrier()
    if model is None and cfg.model_name_or_path is None:  # other ranks: now a cache hit
        model = tiny_model("llama", "tiny", texts=corpus_texts(records) + TEMPLATE_WORDS * 20, cache_dir=cache)
    return str(cfg.model_name_or_path or model), str(cfg.data_path or data)


def load_train_set(cfg: TrainConfig, data_path: str, tokenizer, world):
    """Rank 0 tokenizes (or finds it cached); the others then load the cached Arrow files."""
    args = dict(template=cfg.template, max_length=cfg.model_max_length, train_on_inputs=cfg.train_on_inputs,
                num_proc=cfg.num_proc, cache_dir=cfg.cache_dir)  # fmt: skip
    if world.main:
        ds, report = build_dataset(data_path, tokenizer, **args)
    world.barrier()
    if not world.main:
        ds, report = build_dataset(data_path, tokenizer, quiet=True, **args)
    return ds.with_format("numpy"), report


class BatchPlan:
    """Which samples rank r trains on at micro-step m of optimizer step s."""

    def __init__(self, lengths: np.ndarray, trained: np.ndarray, cfg: TrainConfig, world_size: int):
        self.lengths, self.trained = lengths, trained
        self.micro, self.accum, self.world = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, world_size
        self.global_size = self.micro * self.accum * self.world
        self.seed, self.group = cfg.seed, cfg.group_by_length
        if len(lengths) < self.global_size:
            raise ConfigError(
                f"the training set has {len(lengths)} conversations, fewer than one global batch "
                f"({self.micro} per device x {self.accum} accumulation x {self.world} ranks = {self.global_size}); "
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
                order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks])
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
    """Trained tokens per sample, as the shifted causal-LM loss counts them (label 0 predicts nothing)."""
    return np.array([int((np.asarray(lab[1:]) != IGNORE_INDEX).sum()) for lab in ds["labels"]], dtype=np.int64)


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
