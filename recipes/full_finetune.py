"""Vicuna-style full fine-tune: one recipe for 1 process, DDP, FSDP2 and DeepSpeed ZeRO-2/3.

    torchrun --nproc_per_node 4 recipes/full_finetune.py --config vicuna_7b.yaml --data_path ...
    make train-vicuna NGPU=4 STRATEGY=fsdp   (launch/ picks torchrun or the deepspeed launcher)

setup() -> train() -> save() -> cleanup(), read top to bottom. The shared pieces (arguments,
data module, engines, checkpoints, the loop, logging) live in recipes/core.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by torchrun / deepspeed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.core import checkpoint, loop
from recipes.core.compile import apply_liger, check_speed_options, compile_layers
from recipes.core.config import TrainConfig
from recipes.core.loading import load_model
from recipes.core.loop import Run, finish, prepare, run_info, start


def full_model(run: Run):
    """The whole model, every weight trained (also the DPO recipe's, with --peft_method none)."""
    cfg = run.cfg
    # FSDP2 and ZeRO-3 load sharded (no rank holds the whole model); others one copy per rank
    model = load_model(run.model_path, cfg, run.world)
    apply_liger(model, cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    # after activation checkpointing, before the engine shards (torchtune's order)
    compile_layers(model, cfg, main=run.world.main)
    return model


def setup(cfg: TrainConfig, notes: list[str] | None = None) -> Run:
    check_speed_options(cfg)  # --compile / --use_liger_kernel: refused before anything loads
    run = prepare(cfg, notes)
    return start(run, full_model(run))


def save(run: Run) -> Path | None:
    out = Path(run.cfg.output_dir) / "model"
    return checkpoint.export_hf(run.engine, run.world, run.tokenizer, out, info=run_info(run))


cleanup = finish


def main(argv: list[str] | None = None) -> None:
    loop.main(argv, TrainConfig, setup, save, "exported model")


if __name__ == "__main__":
    main()
