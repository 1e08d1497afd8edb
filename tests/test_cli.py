"""The command line as a user types it."""

from __future__ import annotations

import json
import subprocess
import sys

import datasets
import pytest

from fastchat_data.commands import COMMANDS


def run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "fastchat_data", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help(command):
    res = run(command, "--help")
    assert res.returncode == 0 and f"fastchat_data {command}" in res.stdout + res.stderr


def test_build_command_writes_dataset_and_report(tmp_path, llama_dir, data_dir):
    out, report = tmp_path / "train", tmp_path / "report.json"
    res = run("build", "--data", data_dir / "fastchat_dummy_conversation.json", "--tokenizer", llama_dir,
              "--template", "vicuna_v1.1", "--max_length", 256, "--out", out, "--report", report,
              "--cache_dir", tmp_path / "cache")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "[build] read 500  written 500" in res.stderr
    assert len(datasets.load_from_disk(str(out))) == 500
    assert json.loads(report.read_text())["written"] == 500


def test_convert_command_to_messages(tmp_path, data_dir):
    out = tmp_path / "m.jsonl"
    res = run(
        "convert",
        "--data",
        data_dir / "alpaca_gpt4_data_zh_1k.json",
        "--out",
        out,
        "--to",
        "messages",
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
        "--data",
        data_dir / "fastchat_dummy_conversation.json",
        "--tokenizer",
        llama_dir,
        "--index",
        0,
        "--color",
        "false",
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
