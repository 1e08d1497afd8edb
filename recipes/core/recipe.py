"""Recipes: an objective, a model form and a set of defaults, run through one interface
(torchtune's): setup -> train -> save -> cleanup.

    recipes/full_finetune.py   sft,   the full model         (FastChat's Vicuna defaults)
    recipes/qlora.py           sft,   a LoRA adapter on nf4  (the QLoRA reference's defaults)
    recipes/dpo.py             dpo,   the full model         (alignment-handbook's defaults)
    recipes/reward.py          reward, the full model + score head (TRL RewardTrainer's loss)
    recipes/grpo.py            grpo,  the full model         (TRL GRPOTrainer's names)

The entry points are three lines each and never import each other; `launch.train --recipe`
starts any of them through the one command builder (launch/train.py). A recipe's config is
composed of the shared sections, its objective's section and its defaults
(recipes/core/config.py); the model form (full or adapter) is chosen by --peft_method, so the
QLoRA recipe is the SFT objective with an adapter by default, and DPO trains either.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fastchat_data.options import InputError, RunStopped

from . import config as config_module
from . import objectives, sequence_parallel
from .compile import check_liger
from .loop import Hooks, NonFiniteError, finish, prepare, restore_signal_handlers, run_info, start
from .loop import train as train_loop
from .model_form import model_form
from .quiet import quiet, verbose_requested
from .world import shutdown

RECIPES_DIR = Path(__file__).resolve().parents[1]


def _bf16_where_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass(frozen=True)
class Recipe:
    name: str
    objective: str
    config_name: str
    script: str  # under recipes/: what the launchers start
    gpu_config: str  # the YAML in recipes/configs it runs with on GPUs by default
    cpu_config: str  # ... and without GPUs (the tiny model)
    summary: str
    defaults: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return RECIPES_DIR / self.script

    @functools.cached_property
    def config_class(self) -> type:
        objective = objectives.get(self.objective)
        sections = (*config_module.SECTIONS, *([objective.section] if objective.section else []))
        return config_module.compose(
            self.config_name,
            sections,
            self.defaults,
            doc=self.summary,
            checks=(
                functools.partial(objectives.refuse_unsupported, objective),
                objective.check,
                sequence_parallel.check,
            ),
        )


RECIPES = {
    r.name: r
    for r in (
        Recipe(
            "sft",
            "sft",
            "TrainConfig",
            "full_finetune.py",
            "vicuna_7b.yaml",
            "tiny_cpu.yaml",
            "The full fine-tune (FastChat's Vicuna recipe and flag names).",
        ),
        Recipe(
            "qlora",
            "sft",
            "QLoraConfig",
            "qlora.py",
            "qlora_7b.yaml",
            "qlora_tiny_cpu.yaml",
            "QLoRA: a 4-bit nf4 base with LoRA on all its linear layers (the QLoRA reference "
            "recipe's defaults: NTU ADL 2023 HW3 on top of artidoro/qlora).",
            {
                "peft_method": "lora",
                "quantization": "nf4",
                "optim": "paged_adamw_32bit",
                "learning_rate": 1e-4,
                "lr_scheduler_type": "linear",
                "warmup_ratio": 0.0,
                "max_grad_norm": 0.3,
                "per_device_train_batch_size": 1,
                "gradient_accumulation_steps": 4,
                "max_steps": 250,
                "max_source_length": 256,
                "max_target_length": 128,
                "gradient_checkpointing": True,
                "bf16": _bf16_where_supported,
                "save_steps": 50,
                "output_dir": "runs/qlora",
            },
        ),
        Recipe(
            "dpo",
            "dpo",
            "DPOConfig",
            "dpo.py",
            "dpo_7b.yaml",
            "dpo_tiny_cpu.yaml",
            "Preference tuning after SFT: DPO, length-normalised DPO or IPO, on the full model "
            "or a LoRA / QLoRA adapter (--peft_method lora).",
            {
                "learning_rate": 5e-7,
                "warmup_ratio": 0.1,
                "num_train_epochs": 1.0,
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 8,
                "output_dir": "runs/dpo",
            },
        ),
        Recipe(
            "reward",
            "reward",
            "RewardConfig",
            "reward.py",
            "reward_7b.yaml",
            "reward_tiny_cpu.yaml",
            "A reward model after SFT: the model with a one-output score head trained on "
            "preference pairs with the Bradley-Terry loss (TRL's RewardTrainer), exported as a "
            "transformers sequence-classification folder; or a LoRA / QLoRA adapter on it "
            "(--peft_method lora), the score head trained whole and saved with the adapter.",
            {
                "learning_rate": 1e-5,
                "warmup_ratio": 0.03,
                "num_train_epochs": 1.0,
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 8,
                "output_dir": "runs/reward",
            },
        ),
        Recipe(
            "grpo",
            "grpo",
            "GRPOConfig",
            "grpo.py",
            "grpo_7b.yaml",
            "grpo_tiny_cpu.yaml",
            "Online RL after SFT: GRPO or RLOO with rewards computed by functions named on the "
            "command line (--reward_funcs module:function), on the full model or a LoRA / QLoRA "
            "adapter (--peft_method lora).",
            {
                "learning_rate": 1e-6,
                "warmup_ratio": 0.0,
                "lr_scheduler_type": "linear",
                "num_train_epochs": 1.0,
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 4,
                "max_grad_norm": 1.0,
                "output_dir": "runs/grpo",
            },
        ),
    )
}


# the composed configs by the names FastChat-style code and the tests know them by
TrainConfig = RECIPES["sft"].config_class
QLoraConfig = RECIPES["qlora"].config_class
DPOConfig = RECIPES["dpo"].config_class
RewardConfig = RECIPES["reward"].config_class
GRPOConfig = RECIPES["grpo"].config_class


def get(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise config_module.ConfigError(
            f"recipe {name!r} is not one of {', '.join(RECIPES)}"
        ) from None


# ---------------------------------------------------------------------------- the interface


def setup(recipe: Recipe, cfg, notes=(), *, hooks: Hooks | None = None):
    """Everything before the first step: refusals first, then the process group, data, the
    model in its form, resume."""
    check_liger(cfg)  # --use_liger_kernel: refused before anything loads
    objective = objectives.get(recipe.objective)
    run = prepare(cfg, objective, notes, hooks=hooks)
    run.form = model_form(cfg)
    model, engine, what = run.form.build(run)
    return start(run, model, engine, what=objective.describe(cfg) + what)


def train(run) -> None:
    train_loop(run)


def save(run) -> Path | None:
    """The export: a Hugging Face model folder, or a peft adapter folder."""
    from .logging import PHASES

    PHASES.next("export")
    return run.form.export(run, run_info(run))


def cleanup(run) -> None:
    finish(run)


def main(name: str, argv: list[str] | None = None, hooks: Hooks | None = None) -> int:
    """A recipe's command line: its config, then setup -> train -> save -> cleanup. Bad
    settings or data stop every rank before anything trains, with one line from rank 0 and
    exit status 2; a run that stops (a non-finite step: 3; SIGTERM / Ctrl-C after saving a
    checkpoint: 75) says why in one line. The last line of a run names what it produced."""
    quiet(verbose_requested(argv))
    # a recipe reads local folders only (model_name_or_path must hold config.json): no hub calls,
    # so a mistyped path fails at once instead of after a minute of retries
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    recipe = get(name)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    run = None
    try:
        cfg, notes = config_module.load_config(argv, recipe.config_class)
        run = setup(recipe, cfg, notes, hooks=hooks)
        train(run)
        exported = save(run)
    except (InputError, RunStopped) as e:
        if rank0:
            label = "stopped" if isinstance(e, RunStopped) else "error"
            print(f"{label}: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        if isinstance(e, NonFiniteError):  # every rank stops here: leave together
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
        if run is not None:
            restore_signal_handlers(run)
        shutdown()
        return e.exit_status
    except KeyboardInterrupt:
        if rank0:
            print(
                "interrupted: stopped at once (second Ctrl-C); the newest checkpoint is the "
                "last one saved",
                file=sys.stderr,
                flush=True,
            )
        return 130
    cleanup(run)
    if exported:
        print(f"{run.form.exported}: {exported}", flush=True)
    return 0


def script(name: str, module: str):
    """The `main(argv, hooks)` of a recipe's script (recipes/dpo.py, ...): `main` above for
    recipe `name`; when that script is the program (`module`, its `__name__`, is "__main__"),
    it runs and exits with main's status.
    Each script keeps only what must run before `recipes` can be imported (its sys.path line,
    for torchrun / deepspeed / accelerate starting it as a file) and this call."""

    def recipe_main(argv: list[str] | None = None, hooks: Hooks | None = None) -> int:
        return main(name, argv, hooks)

    recipe_main.__name__ = recipe_main.__qualname__ = "main"
    recipe_main.__doc__ = f"Recipe {name!r}: " + (main.__doc__ or "")
    if module == "__main__":
        sys.exit(recipe_main())
    return recipe_main
