"""Preference tuning after SFT: DPO (sigmoid), length-normalised DPO and IPO, on the full model
or a LoRA / QLoRA adapter, under every strategy the SFT recipes run under.

    python -m fastchat_data pair --out pairs.json        (the Alpaca GPT-4 vs davinci pairs)
    torchrun --nproc_per_node 4 recipes/dpo.py --model_name_or_path SFT_MODEL --data_path pairs.json
    make train-dpo NGPU=4 STRATEGY=zero3 MODEL=... DATA=...     (the same launcher as SFT)
    python recipes/dpo.py --peft_method lora --quantization nf4 ...   (QLoRA DPO, one GPU)

The reference model is the starting model itself: its log-probabilities of every pair are
computed once before training (split over the ranks), cached beside the tokenized pairs, and
never held as a second model. setup() -> train() -> save() -> cleanup().
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script by torchrun / deepspeed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.core import checkpoint, loop
from recipes.core.compile import check_speed_options
from recipes.core.config import ConfigError, TrainConfig, option
from recipes.core.data import built_by_rank0_first, pad_token_id
from recipes.core.loop import Run, finish, prepare, run_info, start
from recipes.core.lora import (
    QLoraConfig,
    export_adapter,
)
from recipes.core.preference import LOSS_TYPES, PairData, compute_reference, dpo_objective
from recipes.full_finetune import full_model
from recipes.qlora import adapter_model


@dataclass
class DPOConfig(QLoraConfig):
    """The SFT settings plus DPO's; a full fine-tune unless --peft_method lora."""

    beta: float = option(0.1, "how far the policy may move from the reference (DPO's beta)")
    loss_type: str = option("sigmoid", "sigmoid (DPO), sigmoid_norm (per-token DPO) or ipo")
    peft_method: str = option(
        "none", "none: the full model; lora: an adapter (QLoRA with --quantization nf4)"
    )
    quantization: str = option(
        "none", "with --peft_method lora, the base's weights: nf4 or fp4 (4-bit), int8, none"
    )
    # full fine-tune optimisation (TrainConfig's), with DPO's small learning rate
    optim: str = "adamw_torch"
    learning_rate: float = 5e-7
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 8
    max_source_length: int | None = None
    max_target_length: int | None = None
    gradient_checkpointing: bool = False
    bf16: bool = option(False, "bf16 mixed precision (fp16 is not supported)")
    save_steps: int = 500
    output_dir: str = "runs/dpo"

    def check(self) -> DPOConfig:
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type {self.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        if not self.beta > 0:
            raise ConfigError(f"beta must be positive, got {self.beta}")
        if self.packing:
            raise ConfigError("DPO batches pairs of rows; it does not pack (--packing False)")
        if not self.data_path:
            raise ConfigError("--data_path: give preference pairs (prompt, chosen, rejected); "
                              "`python -m fastchat_data pair` makes them from Alpaca")  # fmt: skip
        if self.peft_method == "none":
            if self.quantization != "none":
                raise ConfigError("a quantized base trains an adapter: add --peft_method lora")
            TrainConfig.check(self)
            return self
        if self.peft_method != "lora":
            raise ConfigError(f"peft_method {self.peft_method!r}: DPO trains the full model (none) "
                              "or a LoRA adapter (lora)")  # fmt: skip
        QLoraConfig.check(self)
        return self


def pair_data(cfg: DPOConfig, data_path: str, tokenizer, world) -> PairData:
    """Rank 0 tokenizes the pairs (or finds them cached); the others then read the cache."""
    from fastchat_data.io import input_paths
    from fastchat_data.preference import build_preference_dataset

    paths = input_paths(data_path)
    args = dict(template=cfg.template, max_length=cfg.model_max_length, cache_dir=cfg.cache_dir)
    ds, _ = built_by_rank0_first(world, build_preference_dataset, paths, tokenizer, **args)
    return PairData(ds.with_format("numpy"), pad_token_id(tokenizer))


def setup(cfg: DPOConfig, notes: list[str] | None = None) -> Run:
    check_speed_options(cfg, "full_finetune" if cfg.peft_method == "none" else "qlora")
    run = prepare(cfg, notes, build_data=pair_data)
    run.objective = dpo_objective
    if cfg.peft_method == "none":
        model, engine, what = full_model(run), None, ""
    else:
        model, engine, what = adapter_model(run)
    return start(run, model, engine, what=f"DPO ({cfg.loss_type}, beta {cfg.beta}), {what}",
                 before_resume=compute_reference)  # fmt: skip


def save(run: Run) -> Path | None:
    out = Path(run.cfg.output_dir)
    if run.cfg.peft_method == "none":
        return checkpoint.export_hf(run.engine, run.world, run.tokenizer, out / "model",
                                    info=run_info(run))  # fmt: skip
    return export_adapter(run.engine, run.world, run.tokenizer, out / "adapter", info=run_info(run))


cleanup = finish


def main(argv: list[str] | None = None) -> None:
    loop.main(argv, DPOConfig, setup, save, "exported model")


if __name__ == "__main__":
    main()
