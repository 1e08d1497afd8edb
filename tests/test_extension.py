"""Adding a strategy or an objective is one declaration each, with no edit anywhere else: this
file registers a toy strategy (DDP under another name, another launcher-independent cost) and
a toy objective (SFT whose loss also counts the prompt tokens, with an option of its own), and
trains a recipe made of them end to end through the shared recipe interface; the planner and
the launcher's command builder know the toy strategy too."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from unittest import mock

import pytest
from train_utils import flags, tiny_assets

from fastchat_data.options import option
from launch.train import LaunchOptions, job_command
from recipes.core import objectives, parallel
from recipes.core import recipe as recipes
from recipes.core.config import ConfigError, load_config
from recipes.core.data import TrainData, load_train_set, pad_token_id
from recipes.core.objectives.base import Units
from recipes.plan import plan

# -- the toy strategy: one declaration --------------------------------------------------------
TOY_STRATEGY = parallel.Strategy(
    "toy_ddp", "DDP, declared again under another name", "torch", cost_rank=99
)


# -- the toy objective: one class and its option section ---------------------------------------
@dataclass
class ToyArgs:
    """Toy objective"""

    prompt_weight: float = option(1.0, "how much the prompt tokens count beside the reply's")

    @staticmethod
    def check(cfg) -> None:
        if cfg.prompt_weight < 0:
            raise ConfigError(f"prompt_weight must be >= 0, got {cfg.prompt_weight}")


class PromptAndReply:
    name, section, units = "prompt_and_reply", ToyArgs, Units("conversations")

    def check(self, cfg) -> None:
        pass

    def data(self, cfg, tokenizer, world):
        cfg = dataclasses.replace(cfg, train_on_inputs=True)  # the prompt has labels too
        train_set, _ = load_train_set(cfg, cfg.data_path, tokenizer, world=world)
        return TrainData(train_set, False, cfg.model_max_length, pad_id=pad_token_id(tokenizer))

    def before_resume(self, run) -> None:
        pass

    def loss(self, run, batch):
        tokens = run.plan.global_trained_tokens(run.step)
        out = run.engine.forward(**batch, num_items_in_batch=tokens, use_cache=False)
        share = run.cfg.gradient_accumulation_steps * run.world.dp_size  # micro-batches per step
        return out.loss * run.cfg.prompt_weight, {"toy/weight": run.cfg.prompt_weight / share}

    def describe(self, cfg) -> str:
        return f"toy objective (prompt weight {cfg.prompt_weight}), "


@pytest.fixture
def registered():
    parallel.register(TOY_STRATEGY)
    objectives.register(PromptAndReply())
    yield
    del parallel.STRATEGIES[TOY_STRATEGY.name]
    del objectives.OBJECTIVES["prompt_and_reply"]


def test_a_toy_strategy_and_objective_train_end_to_end(registered, tmp_path):
    toy = recipes.Recipe(
        "toy",
        "prompt_and_reply",
        "ToyConfig",
        "full_finetune.py",
        "tiny_cpu.yaml",
        "tiny_cpu.yaml",
        "A toy recipe.",
    )
    model, data = tiny_assets()
    argv = [
        *flags(
            config="tiny_cpu.yaml",
            strategy="toy_ddp",
            max_steps="3",
            model_name_or_path=model,
            data_path=data,
            prompt_weight="0.5",
            output_dir=str(tmp_path / "run"),
            report_to="none",
        ),
    ]
    cfg, _ = load_config(argv, toy.config_class)
    with pytest.raises(ConfigError, match="prompt_weight must be >= 0"):
        load_config([*argv, "--prompt_weight", "-1"], toy.config_class)
    # a shell that exports MASTER_ADDR for its cluster (and no RANK) still starts a plain
    # process: a one-rank group on this machine, not a rendezvous that waits for RANK
    # (patch.dict restores the whole environment after: init_world writes the one-rank
    # group's variables into it)
    with mock.patch.dict(os.environ, {"MASTER_ADDR": "192.0.2.1"}):  # TEST-NET: nothing answers
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
            os.environ.pop(name, None)
        run = recipes.setup(toy, cfg)
        assert run.world.strategy is TOY_STRATEGY and run.engine.model is not run.engine.module
        recipes.train(run)
        exported = recipes.save(run)
        recipes.cleanup(run)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["toy/weight"] == 0.5
    assert (exported / "model.safetensors").exists()


def test_the_planner_and_the_launcher_know_a_new_strategy(registered):
    rows = plan("llama-2-7b", 2, strategies=["toy_ddp", "ddp"])
    toy, ddp = (next(r for r in rows if r.strategy == n) for n in ("toy_ddp", "ddp"))
    assert toy.total == ddp.total
    opts = LaunchOptions(ngpu=2, strategy="toy_ddp")
    command = job_command(opts, recipe_args=["--max_steps", "1"])
    assert "torch.distributed.run" in command and "toy_ddp" in command


@pytest.mark.parametrize("name", ["dpo", "reward", "grpo"])
def test_what_an_objectives_units_cannot_take_is_refused_by_its_config(name):
    """--packing and sequence parallelism are checked once, from each objective's Units, when
    the config is read: one line naming the objective and the ones that can."""
    config = recipes.RECIPES[name].config_class
    noun = objectives.get(name).units.noun
    refusal = (
        rf"^--packing: the {name} objective does not pack its {noun} several to a row \(sft does\)"
    )
    with pytest.raises(ConfigError, match=refusal):
        load_config(["--packing", "True"], config)
    with pytest.raises(ConfigError, match=rf"the {name} objective does not train on split seq"):
        load_config(["--sequence_parallel_size", "2"], config)
    cfg, _ = load_config(["--packing", "False"], config)
    assert not cfg.packing


def test_the_sft_recipes_take_packing_and_split_sequences():
    for name in ("sft", "qlora"):
        cfg, _ = load_config(["--packing", "True"], recipes.RECIPES[name].config_class)
        assert cfg.packing
    cfg, _ = load_config(["--sequence_parallel_size", "2"], recipes.RECIPES["sft"].config_class)
    assert cfg.sequence_parallel_size == 2


def test_an_objective_without_its_units_is_refused_when_registered():
    class NoUnits(PromptAndReply):
        name, units = "no_units", None

    with pytest.raises(TypeError, match=r"'no_units': declare `units = Units\(...\)`"):
        objectives.register(NoUnits())
    assert "no_units" not in objectives.OBJECTIVES


def test_the_refusal_names_every_objective_that_can(registered):
    class Packer(PromptAndReply):
        name, units = "packer", Units("conversations", packs=True)

    objectives.register(Packer())
    try:
        with pytest.raises(ConfigError, match=r"several to a row \(sft, packer do\)"):
            load_config(["--packing", "True"], recipes.RECIPES["dpo"].config_class)
    finally:
        del objectives.OBJECTIVES["packer"]
