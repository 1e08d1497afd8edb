"""What an objective is: the contract between a training objective and the shared loop.

An objective names its training units (conversations, preference pairs, ...), builds them
from the data, may prepare anything that must be computed on the initial weights before a
checkpoint is resumed (DPO's reference log-probabilities), and turns one micro-batch into a
loss (a share of the global batch's mean) and additive statistics. It may declare its own
config section (a dataclass of options, composed into the recipe's config) and its own
checks. It never sees how processes share the model: that is the engine's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..config import ConfigError


@dataclass(frozen=True)
class Units:
    """What an objective trains on, and what its units can take: declared once, as a Strategy
    declares what it supports, and refused once (objectives.refuse_unsupported, a check of
    every recipe's config) instead of in each objective's `check`."""

    noun: str  # one training unit, for the log ("conversations", "pairs")
    rows: int = 1  # sequences a unit puts in a batch (a pair: a chosen and a rejected row)
    packs: bool = False  # several units may share one row (--packing)
    # a unit's rows may be split over sequence-parallel ranks (--sequence_parallel_size > 1):
    # the loss, a sum over tokens, is the sum of the shards' losses (sequence_parallel.py)
    splits: bool = False


class Objective(Protocol):
    name: str  # the registry key, and what --objective / a recipe names
    section: type | None  # its options (a dataclass), or None
    units: Units
    # optional: step_times(run, seconds, stats) -> dict, more statistics from this rank's
    # seconds in the step (micro-batches, backward and optimizer step) and its summed `stats`,
    # each a share of the mean over ranks like `stats` (GRPO splits generation from update)

    def check(self, cfg) -> None:
        """Refuse settings it cannot train with beyond what `units` declares (a ConfigError
        naming them)."""

    def data(self, cfg, tokenizer, world):
        """The training units: an object with `lengths`, `trained` (per unit, numpy),
        `units` (sample ids per unit), `packing`, and `batch(unit_ids) -> dict of tensors`."""

    def before_resume(self, run) -> None:
        """Work on the initial weights, before any checkpoint is loaded (may be nothing)."""

    def loss(self, run, batch: dict) -> tuple[torch.Tensor, dict]:
        """This micro-batch's loss as a share of the global batch's mean, and statistics
        (each a share of its global mean), summed over micro-batches and ranks by the loop."""

    def describe(self, cfg) -> str:
        """A few words for the start-up line ("DPO (sigmoid, beta 0.1), ")."""


# A refusal more than one objective's `check` makes, worded once.


def refuse_other_peft(cfg, trains: str) -> None:
    """Refuse a --peft_method other than none or lora; `trains` says what the recipe trains
    ("the reward recipe trains the full model or a LoRA / QLoRA adapter")."""
    if cfg.peft_method not in ("none", "lora"):
        raise ConfigError(
            f"{trains}; --peft_method {cfg.peft_method} is not supported (none or lora)"
        )
