"""One command-line convention: every entry point answers --help (exit 0, each option with its
default), and the recipes' command line (HfArgumentParser under load_config) keeps its rules:
--print_config reruns as the same run, bad input is one ConfigError line, never argparse's
usage-and-exit."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from train_utils import flags, forked_job

from fastchat_data.options import option
from recipes.core.config import ConfigError, config_parser, load_config
from recipes.core.recipe import DPOConfig, GRPOConfig, QLoraConfig, RewardConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]


def python(*args) -> subprocess.CompletedProcess:
    """`python args...` as a fork of the warm interpreter (tests/forked.py): the recipes import
    torch before they parse a flag, ~5 s of CPU a fresh process."""
    return forked_job([sys.executable, *map(str, args)], "single", 1, timeout=300)


# -- --help of every entry point ------------------------------------------------------------------

# the script, options it must list, and a default it must show
RECIPES = [
    (
        "recipes/full_finetune.py",
        TrainConfig,
        ["--learning_rate", "--fsdp", "--print_config"],
        "--learning_rate FLOAT",
    ),
    ("recipes/qlora.py", QLoraConfig, ["--lora_r", "--quantization", "--config"], "(default: nf4)"),
    ("recipes/dpo.py", DPOConfig, ["--beta", "--loss_type", "--lora_r"], "(default: 5e-07)"),
    ("recipes/reward.py", RewardConfig, ["--center_rewards_coefficient"], "(default: 1e-05)"),
    ("recipes/grpo.py", GRPOConfig, ["--num_generations", "--reward_funcs"], "(default: 1e-06)"),
]


@pytest.mark.parametrize(("script", "cls", "options", "default"), RECIPES, ids=lambda x: str(x))
def test_recipe_help_lists_every_option_with_its_default(script, cls, options, default):
    res = python(script, "--help")
    assert res.returncode == 0, res.stderr[-2000:]
    help_text = " ".join(res.stdout.split())  # argparse wraps lines
    for f in dataclasses.fields(cls):
        assert f"--{f.name} " in help_text, f.name
    assert all(o in help_text for o in options) and default in help_text
    assert "(default: " in help_text and "Traceback" not in res.stderr


@pytest.mark.parametrize("cls", [TrainConfig, QLoraConfig, DPOConfig, RewardConfig, GRPOConfig])
def test_every_field_has_a_one_line_help(cls):
    parser = config_parser(cls)
    by_dest = {a.dest: a for a in parser._actions if a.option_strings[0] == f"--{a.dest}"}
    for f in dataclasses.fields(cls):
        text = by_dest[f.name].help
        assert text and "\n" not in text, f"{cls.__name__}.{f.name} has no help"
    # building the parser leaves the classes' own declared types alone (HfArgumentParser
    # narrows `int | None` to int on the Field objects it is given)
    declared = {f.name: f.type for f in dataclasses.fields(TrainConfig)}["max_source_length"]
    assert type(None) in typing.get_args(declared)


def test_subclass_default_shows_in_help_and_recipe_values_become_defaults(capsys):
    with pytest.raises(SystemExit) as stop:
        load_config(["--config", "qlora_tiny_cpu.yaml", "--help"], cls=QLoraConfig)
    assert stop.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    recipe = yaml.safe_load((REPO / "recipes/configs/qlora_tiny_cpu.yaml").read_text())
    assert (
        "--max_steps INT optimizer steps to train; -1: num_train_epochs decides "
        f"(default: {recipe['max_steps']})" in out
    )


@pytest.mark.parametrize(
    ("module", "expect"),
    [
        ("launch.train", ["--ngpu", "--strategy", "--recipe", "(default: fsdp)"]),
        ("recipes.eval", ["--model", "--data", "--adapter", "--max_length", "(default: 2048)"]),
        ("recipes.merge", ["--adapter", "--out", "--base", "(default: float32)"]),
        ("recipes.chat", ["--model", "--template", "--max_new_tokens", "(default: 256)"]),
        ("recipes.plan", ["--model", "--ngpu", "--strategy"]),
    ],
)
def test_tool_help(module, expect, capsys):
    """In-process (the same main() that `python -m` runs), to save a start-up per tool."""
    import importlib

    with pytest.raises(SystemExit) as stop:
        importlib.import_module(module).main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert stop.value.code == 0 and all(e in out for e in expect), out


BENCHES_WITH_RESULTS = sorted(
    p.stem
    for p in (REPO / "bench").glob("*.py")
    if p.stem != "__init__" and "result_option(" in p.read_text()
)


@pytest.mark.parametrize("module", BENCHES_WITH_RESULTS)
def test_a_benchmark_refuses_an_unwritable_out_when_it_reads_its_options(module, tmp_path):
    """Refused by `parse`, before the benchmark runs: not after minutes of measuring."""
    import importlib

    from fastchat_data.options import InputError, parse

    bench = importlib.import_module(f"bench.{module}")
    (options,) = [
        value
        for value in vars(bench).values()
        if dataclasses.is_dataclass(value)
        and "out" in {f.name for f in dataclasses.fields(value)}
        and value.__module__ == bench.__name__
    ]
    with pytest.raises(InputError, match=r": --out: is a folder; give a file name$"):
        parse(options, ["--out", str(tmp_path)])
    assert parse(options, ["--out", str(tmp_path / "r.json")]).out == str(tmp_path / "r.json")


def test_a_preset_flag_sets_its_values_and_the_flags_given_win():
    """A benchmark's --quick sets shorter counts, but never over a count the user gave: before,
    `--quick --steps 10` silently ran 3 steps."""
    from bench.packing_bench import PackingBenchOptions
    from fastchat_data.options import UsageError, parse

    plain = parse(PackingBenchOptions, [])
    assert (plain.steps, plain.rounds) == (4, 2)
    quick = parse(PackingBenchOptions, ["--quick"])
    assert (quick.steps, quick.rounds) == (3, 1)
    mixed = parse(PackingBenchOptions, ["--steps", "10", "--quick", "True"])
    assert (mixed.steps, mixed.rounds) == (10, 1)
    assert parse(PackingBenchOptions, ["--quick", "False"]).steps == 4
    with pytest.raises(UsageError, match="--steps 1: give 2 or more"):
        parse(PackingBenchOptions, ["--quick", "--steps", "1"])  # the minimums still hold

    @dataclasses.dataclass
    class Broken:
        quick: bool = option(False, "a short run", preset={"stepz": 1})

    with pytest.raises(TypeError, match=r"--quick: its preset names no option \['stepz'\]"):
        parse(Broken, ["--quick"])


@pytest.mark.parametrize("args", [["--help"], ["build", "--help"]])
def test_fastchat_data_help(args):
    res = subprocess.run(
        [sys.executable, "-m", "fastchat_data", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-2000:]
    assert (
        ("--max_length" in out and "default: 2048" in out) if args[0] == "build" else "build" in out
    )


# -- --print_config -------------------------------------------------------------------------------

TEMPLATE = {
    "name": "mine",
    "system": "A chat.",
    "user": "USER",
    "assistant": "ASSISTANT",
    "sep": " ",
    "sep2": "</s>",
}


@pytest.mark.parametrize(
    ("cls", "args"),
    [
        (
            TrainConfig,
            [
                "--fsdp",
                "full_shard auto_wrap",
                "--bf16",
                *flags(learning_rate="3e-5", lazy_preprocess="True"),
            ],
        ),
        (QLoraConfig, ["--quantization", "none", "--max_source_length", "none", "--lora_r=8"]),
        (DPOConfig, ["--beta", "0.2", "--peft_method", "lora", "--num_train_epochs", "2"]),
    ],
    ids=lambda x: getattr(x, "__name__", None),
)
def test_print_config_reruns_as_the_same_run(tmp_path, capsys, cls, args):
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text("[]")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"template": TEMPLATE, "max_steps": 7}))
    argv = ["--config", recipe, "--data_path", f"{tmp_path}/a.json,{tmp_path}/b.json", *args]
    argv = list(map(str, argv))
    cfg, _ = load_config(argv, cls=cls)
    with pytest.raises(SystemExit) as stop:
        load_config([*argv, "--print_config"], cls=cls)
    printed = capsys.readouterr().out
    assert stop.value.code == 0
    saved = tmp_path / "resolved.yaml"
    saved.write_text(printed)
    again, notes = load_config(["--config", str(saved)], cls=cls)
    assert again.run_fingerprint() == cfg.run_fingerprint() and again == cfg
    assert again.template == TEMPLATE and again.max_steps == 7 and not notes
    assert set(yaml.safe_load(printed)) == {f.name for f in dataclasses.fields(cls)}
    assert cfg.data_path == f"{tmp_path}/a.json,{tmp_path}/b.json"


# -- the rules load_config keeps ------------------------------------------------------------------


def test_values_flags_and_launcher_arguments():
    cfg, notes = load_config(
        [
            "--bf16",
            "--packing",
            "False",
            "--output-dir=runs/x",
            "--local_rank=1",
            "--local-rank",
            "0",
            "--max_steps",
            "-1",
            "--no_group_by_length",
            *flags(quantization="none", max_source_length="null"),
        ],
        cls=QLoraConfig,
    )
    assert cfg.bf16 is True and cfg.packing is False and cfg.output_dir == "runs/x"
    assert cfg.max_steps == -1 and cfg.group_by_length is False and notes == []
    assert cfg.quantization == "none" and cfg.max_source_length is None  # text stays text
    # a value that looks like an option (argparse alone would take it for one)
    with pytest.raises(
        ConfigError, match=r"learning_rate must be a finite number in \[0, 1\], got -1e-05"
    ):
        load_config(["--learning_rate", "-1e-5"], TrainConfig)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--learning_rate", "abc"], "command line: learning_rate expects a number, got 'abc'"),
        (["--bf16", "maybe"], "command line: bf16 expects True or False, got 'maybe'"),
        (
            ["--learning", "1e-3"],
            "command line: unknown option 'learning' (did you mean learning_rate?)",
        ),
        (["--model_max_length"], "command line: --model_max_length: expected one argument"),
        (["--fp16"], "--fp16: fp16 is not supported"),
        (["stray"], "command line: unexpected argument 'stray'"),
    ],
)
def test_bad_command_line_is_one_config_error_not_usage(argv, message, capsys):
    with pytest.raises(ConfigError) as err:
        load_config(argv, TrainConfig)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert capsys.readouterr().err == ""  # argparse printed no usage


def test_unknown_key_exits_2_with_a_suggestion_and_no_traceback():
    res = python("recipes/qlora.py", "--lora_rank", "8")
    assert res.returncode == 2
    assert "error: command line: unknown option 'lora_rank' (did you mean lora_r?)" in res.stderr
    assert "Traceback" not in res.stderr and "usage:" not in res.stderr
    assert res.stderr.count("error:") == 1
