"""Supervised fine-tuning: the causal-LM loss on the assistant tokens of conversations."""

from __future__ import annotations

from ..data import TrainData, load_train_set, pad_token_id
from .base import Units


class SFT:
    name = "sft"
    section = None
    units = Units("conversations", packs=True, splits=True)

    def check(self, cfg) -> None:
        pass

    def data(self, cfg, tokenizer, world) -> TrainData:
        """Conversations, tokenized with assistant-only labels, one or several per row."""
        train_set, _ = load_train_set(cfg, cfg.data_path, tokenizer, world=world)
        return TrainData(
            train_set,
            cfg.packing,
            cfg.model_max_length,
            pad_id=pad_token_id(tokenizer),
            row_tokens=cfg.packing_row_tokens,
        )

    def before_resume(self, run) -> None:
        pass

    def loss(self, run, batch: dict):
        """A token sum divided by the whole global batch's trained tokens
        (num_items_in_batch), so micro-batches and ranks add up to the global mean."""
        global_tokens = run.plan.global_trained_tokens(run.step)
        # use_cache=False: no KV cache in training (with one, packed rows would not be detected)
        out = run.engine.forward(**batch, num_items_in_batch=global_tokens, use_cache=False)
        return out.loss, {}

    def describe(self, cfg) -> str:
        return ""


OBJECTIVE = SFT()
