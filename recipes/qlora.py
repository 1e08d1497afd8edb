"""QLoRA: a 4-bit nf4 base (double quantization) with LoRA on all its linear layers, on one GPU.

    accelerate launch recipes/qlora.py --config qlora_7b.yaml --model_name_or_path ... --data_path ...
    python recipes/qlora.py                      (the tiny model on the embedded demo data)
    accelerate launch --num_processes 4 recipes/qlora.py ...   (DDP QLoRA, one process per GPU)

Also plain LoRA (--quantization none), 8-bit loading (--quantization int8), prompt tuning and
P-tuning (--peft_method prompt_tuning | p_tuning). Same arguments, data module, loop and
checkpoint layout as the full fine-tune; checkpoints hold the adapter only, and a relaunch
resumes exactly. setup() -> train() -> save() -> cleanup().
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by accelerate launch / torchrun
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.core import loop
from recipes.core.compile import apply_liger, check_speed_options
from recipes.core.loop import Run, finish, prepare, run_info, start
from recipes.core.lora import (
    QLoraConfig,
    add_adapter,
    export_adapter,
    load_base,
    make_adapter_engine,
)


def adapter_model(run: Run):
    """A (quantized) base with a trainable adapter, its engine, and how to describe it (also
    the DPO recipe's, with --peft_method lora)."""
    cfg = run.cfg
    base = load_base(run.model_path, cfg, run.world.device)
    apply_liger(base, cfg)  # on the base model, before the adapter wraps its layers
    model = add_adapter(base, cfg)
    engine = make_adapter_engine(model, cfg, run.world, run.total_steps)
    quant = {"none": "", "int8": "8-bit ", "nf4": "4-bit nf4 ", "fp4": "4-bit fp4 "}[
        cfg.quantization
    ]
    return model, engine, f"{quant}base + {cfg.peft_method}, "


def setup(cfg: QLoraConfig, notes: list[str] | None = None) -> Run:
    check_speed_options(cfg, "qlora")  # --compile refused here; --use_liger_kernel needs a GPU
    run = prepare(cfg, notes)
    model, engine, what = adapter_model(run)
    return start(run, model, engine, what=what)


def save(run: Run) -> Path | None:
    out = Path(run.cfg.output_dir) / "adapter"
    return export_adapter(run.engine, run.world, run.tokenizer, out, info=run_info(run))


cleanup = finish


def main(argv: list[str] | None = None) -> None:
    loop.main(argv, QLoraConfig, setup, save, "exported adapter")


if __name__ == "__main__":
    main()
