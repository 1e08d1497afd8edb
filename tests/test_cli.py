"""The command line as a user types it."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from train_utils import flags

from fastchat_data.cli import options_class
from fastchat_data.commands import COMMANDS

REPO = Path(__file__).resolve().parents[1]


def run(*args, cwd=None):
    """The command line, run from `cwd` (this checkout's package, wherever that is)."""
    return subprocess.run(
        [sys.executable, "-m", "fastchat_data", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help(command, tmp_path):
    """Every flag with its description and type, its default where it has one; nothing
    written."""
    res = run(command, "--help", cwd=tmp_path)
    assert res.returncode == 0 and f"fastchat_data {command}" in res.stdout, res.stderr
    text, bare = " ".join(res.stdout.split()), "".join(res.stdout.split())  # lines wrap
    for f in dataclasses.fields(options_class(COMMANDS[command])):
        assert f.metadata["help"] and f"--{f.name} " in text, f.name
        assert "".join(f.metadata["help"].split()) in bare, f.name
    assert "(default: " in text and not list(tmp_path.iterdir())


def test_program_help_lists_every_command_and_flag(tmp_path):
    res = run("--help", cwd=tmp_path)
    assert res.returncode == 0 and not list(tmp_path.iterdir()), res.stderr
    text, bare = " ".join(res.stdout.split()), "".join(res.stdout.split())  # lines wrap
    for name, fn in COMMANDS.items():
        assert f"{name}: " in text
        for f in dataclasses.fields(options_class(fn)):
            assert "".join(f.metadata["help"].split()) in bare, (name, f.name)


def test_options_are_the_functions_parameters():
    """The command line cannot drift from the Python functions: one option per parameter, with
    its default; the parameters before `*` may go without their flag."""
    for name, fn in COMMANDS.items():
        params = inspect.signature(fn).parameters
        fields = {f.name: f for f in dataclasses.fields(options_class(fn))}
        assert list(fields) == list(params), name
        for p in params.values():
            default = fields[p.name].default
            assert default == (dataclasses.MISSING if p.default is p.empty else p.default)
            positional = p.kind is p.POSITIONAL_OR_KEYWORD
            assert fields[p.name].metadata["positional"] == positional, (name, p.name)


def test_types_come_from_annotations(tmp_path, data_dir):
    """fire typed by value: `--out 2024` was the int 2024, `--name 42` a number."""
    src = data_dir / "fastchat_dummy_conversation.json"
    res = run("convert", src, "2024", "--to=messages", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "2024").read_text())[0]["messages"][0]["role"] == "user"
    assert (
        run("identity", "--out", "i.json", "--n", "2", "--name", "007", cwd=tmp_path).returncode
        == 0
    )
    assert "007" in (tmp_path / "i.json").read_text()


def test_build_command_writes_dataset_and_report(tmp_path, llama_dir, data_dir):
    out, report = tmp_path / "train", tmp_path / "report.json"
    res = run(
        "build",
        *flags(
            data=data_dir / "fastchat_dummy_conversation.json",
            tokenizer=llama_dir,
            template="vicuna_v1.1",
            max_length=256,
            out=out,
            report=report,
            cache_dir=tmp_path / "cache",
        ),
    )
    assert res.returncode == 0, res.stderr
    assert "[build] read 500  written 500" in res.stderr
    assert len(datasets.load_from_disk(str(out))) == 500
    assert json.loads(report.read_text())["written"] == 500


def test_convert_command_to_messages(tmp_path, data_dir):
    out = tmp_path / "m.jsonl"
    res = run(
        "convert",
        *flags(data=data_dir / "alpaca_gpt4_data_zh_1k.json", out=out, to="messages"),
    )
    assert res.returncode == 0, res.stderr
    first = json.loads(out.read_text().splitlines()[0])
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]


def test_malformed_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{broken\n')
    res = run("convert", "--data", bad, "--out", tmp_path / "o.json")
    assert res.returncode == 2
    assert f"error: {bad}: line 2 column 2: malformed JSON" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "o.json").exists()


def test_strict_names_the_record(tmp_path):
    src = tmp_path / "s.json"
    src.write_text(
        json.dumps(
            [{"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}]
        )
    )
    res = run("stats", "--data", src, "--strict")
    assert res.returncode == 2 and "s.json: record 0: unknown_role" in res.stderr


def test_inspect_marks_trained_spans(llama_dir, data_dir):
    res = run(
        "inspect",
        *flags(
            data=data_dir / "fastchat_dummy_conversation.json",
            tokenizer=llama_dir,
            index=0,
            color="false",
        ),
    )
    assert res.returncode == 0, res.stderr
    body = res.stdout.split("\n", 1)[1]  # after the header line
    assert (
        body.startswith("<s> A chat between")
        and "USER: Who are you? ASSISTANT:⟦I am Vicuna" in body
    )
    assert body.count("⟦") == 2 and body.rstrip().endswith("You too!</s>⟧")


def test_identity_then_stats(tmp_path, llama_dir):
    out = tmp_path / "id.json"
    assert run("identity", "--out", out, "--name", "Llamita", "--n", 30).returncode == 0
    assert "Llamita" in out.read_text()
    res = run("stats", "--data", out, "--tokenizer", llama_dir, "--report", tmp_path / "r.json")
    assert res.returncode == 0
    notes = json.loads((tmp_path / "r.json").read_text())["notes"]
    assert notes["conversations"] == 30 and sum(notes["token_histogram"].values()) == 30


def test_demo_runs_end_to_end(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "fastchat_data.demo", "--out", tmp_path / "demo"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "second build (cache): 300 rows" in res.stdout and "⟦" in res.stdout
    assert len(datasets.load_from_disk(str(tmp_path / "demo" / "train"))) == 300
