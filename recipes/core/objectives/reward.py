"""A reward model: the SFT model with a one-output head (AutoModelForSequenceClassification,
num_labels=1) trained on preference pairs with the Bradley-Terry loss of TRL's RewardTrainer,

    loss = -log sigmoid(r_chosen - r_rejected) [+ c * (r_chosen + r_rejected)^2],

where r is the head's score of the last non-padding token of prompt + reply. The pairs are the
ones DPO reads (recipes/core/preference.py); one forward scores the chosen rows and the
rejected rows together. The export is a plain transformers sequence-classification folder
whose config names its pad token, so batched scoring (padded rows) pools the right token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastchat_data.options import option

from ..config import ConfigError
from ..data import pad_token_id
from ..preference import PairData, load_pairs, pair_loss_share
from .base import Units, refuse_other_peft


@dataclass
class RewardArgs:
    """Reward model"""

    center_rewards_coefficient: float = option(
        0.0,
        "add c * mean((r_chosen + r_rejected)^2), which keeps rewards centred on 0 "
        "(TRL's center_rewards_coefficient; 0: off)",
    )

    @staticmethod
    def check(cfg) -> None:
        c = cfg.center_rewards_coefficient
        if not (math.isfinite(c) and c >= 0):
            raise ConfigError(f"center_rewards_coefficient must be a finite number >= 0, got {c}")


def reward_losses(
    rewards: torch.Tensor, center_rewards_coefficient: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses from the scores of rows [chosen..., rejected...], and the two halves.
    TRL's RewardTrainer.compute_loss is the mean of these losses over its batch."""
    chosen, rejected = rewards.float().chunk(2)
    losses = -F.logsigmoid(chosen - rejected)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    return losses, chosen.detach(), rejected.detach()


def load_reward_model(path: str, pad_id: int, dtype=torch.float32, **kwargs):
    """The model folder with a fresh one-output score head (or its trained one, if it is a
    reward model already), with pad_token_id set so padded rows pool their last real token;
    `kwargs` go to from_pretrained (a LoRA / QLoRA base: attention, quantization)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    # transformers reports the new head and the dropped LM head as a table of "missing" and
    # "unexpected" weights: expected here, so checked below and said in one line instead
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=dtype, output_loading_info=True, **kwargs
        )
    finally:
        hf_logging.set_verbosity(level)
    missing = [k for k in info["missing_keys"] if not k.startswith("score.")]
    if missing:
        raise ConfigError(
            f"model_name_or_path: {path}: the checkpoint has no weights for "
            f"{', '.join(missing[:5])}; give the SFT model folder"
        )
    model.config.pad_token_id = pad_id
    model.new_head = any(k.startswith("score.") for k in info["missing_keys"])
    return model


class Reward:
    """Reads and batches pairs as DPO does (recipes/core/preference.py); needs no reference
    model."""

    name = "reward"
    section = RewardArgs
    units = Units("pairs", rows=2)  # a chosen and a rejected row, scored in one forward
    peft_task = "SEQ_CLS"  # an adapter (--peft_method lora) trains the new score head whole

    def check(self, cfg) -> None:
        refuse_other_peft(
            cfg,
            "the reward recipe trains the full model or a LoRA / QLoRA adapter with its score head",
        )

    def data(self, cfg, tokenizer, world) -> PairData:
        return load_pairs(cfg, tokenizer, world, with_reference=False)

    def load_model(self, run):
        """Loaded whole on every rank (the score head is new, so the sharded loaders, which
        read every parameter from the files, do not apply); the engine shards it after."""
        model = load_reward_model(run.model_path, pad_token_id(run.tokenizer))
        if run.world.main and model.new_head:
            print("reward model: a new score head (one output), initialised from --seed")
        return model

    def base_loader(self, run):
        """An adapter's base (recipes/core/model_form.py): the SFT model with the score head."""
        pad_id = pad_token_id(run.tokenizer)

        def load(path, **kwargs):
            model = load_reward_model(path, pad_id, **kwargs)
            if run.world.main and model.new_head:
                print("reward model: a new score head (one output), trained whole with the adapter")
            return model

        return load

    def before_resume(self, run) -> None:
        pass

    def loss(self, run, batch: dict):
        """The mean loss of the global batch's pairs, as this micro-batch's share."""
        batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
        out = run.engine.forward(**batch, use_cache=False)
        losses, chosen, rejected = reward_losses(
            out.logits.squeeze(-1), run.cfg.center_rewards_coefficient
        )
        return pair_loss_share(losses, chosen, rejected, pairs=run.plan.global_size)

    def describe(self, cfg) -> str:
        c = cfg.center_rewards_coefficient
        return "reward model (Bradley-Terry" + (f", centring {c}" if c else "") + "), "


OBJECTIVE = Reward()
