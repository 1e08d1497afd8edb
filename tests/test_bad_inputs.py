"""Bad inputs, the way a user meets them: each row makes an input, runs the command line as a
subprocess, and expects ONE line `error: <file>: <where>: <what>` on stderr, exit status 2, no
traceback, and every input file byte-identical afterwards.

The rows run two at a time in a module fixture (the machine has 2 cores); each parametrized
test then checks its own row's result.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import pytest

from fastchat_data.build import build_dataset
from fastchat_data.io import write_records
from fastchat_data.schema import DataError

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def sharegpt(*turns, **extra) -> dict:
    names = ["human", "gpt"]
    return {
        **extra,
        "conversations": [{"from": names[i % 2], "value": t} for i, t in enumerate(turns)],
    }


GOOD = [sharegpt("Who are you?", "I am Camelid."), sharegpt("Hi", "Hello!", "Again?", "Sure.")]


def js(value) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def jsonl(*records) -> bytes:
    return b"".join(js(r) + b"\n" for r in records)


GOOD_JSON = js(GOOD)
UNUSABLE = js([sharegpt("only a question"), sharegpt("q", ""), {"conversations": []}])
WRONG_TYPES = js(["a string", {"conversations": "not a list"}, sharegpt("q", 42)])
# the last line cut inside the three bytes of "本"
CUT_UTF8 = jsonl(GOOD[0]) + js(sharegpt("q", "日本"))[:-5]
CUT_ASCII = jsonl(GOOD[0]) + js(GOOD[1])[:30]
LATIN1 = json.dumps([sharegpt("héllo", "olá")], ensure_ascii=False).encode("latin-1")
GBK_JSONL = jsonl(GOOD[0]) + json.dumps(sharegpt("你好", "好"), ensure_ascii=False).encode("gbk")
BAD_TEMPLATE_YAML = b"system: Be brief.\nuser: USER\nassistent: ASSISTANT\n"

TRAIN = (PY, str(REPO / "recipes" / "full_finetune.py"), "--strategy", "single", "--report_to",
         "none", "--output_dir", "{o}/run", "--cache_dir", "{o}/cache")  # fmt: skip
DATA = (PY, "-m", "fastchat_data")
ZERO2 = TRAIN[:3] + ("zero2",) + TRAIN[4:]


def row(rid, files, cmd, expect, names, marks=()):
    """files: name -> bytes (or ("symlink", target), or ("dir", {name: bytes}));
    cmd: the arguments after DATA or TRAIN ({d}: input folder, {o}: output folder, {tok}: a
    tokenizer and model folder, {ro}: a folder nobody may write); expect: a fragment of the
    error line; names: what the line must name (the file or the option)."""
    return pytest.param(rid, files, cmd, expect, names, id=rid, marks=marks)


ROWS = [
    # outputs that are inputs
    row("convert_out_is_input", {"a.json": GOOD_JSON}, DATA + ("convert", "--data", "{d}/a.json", "--out", "{d}/a.json"),
        "--out: is also an input file; add --in_place", "a.json"),
    row("convert_out_is_input_via_symlink", {"a.json": GOOD_JSON, "l.json": ("symlink", "a.json")},
        DATA + ("convert", "--data", "{d}/l.json", "--out", "{d}/a.json"), "is also an input file", "a.json"),
    row("convert_out_is_input_relative", {"a.json": GOOD_JSON, "sub": ("dir", {})},
        DATA + ("convert", "--data", "a.json", "--out", "sub/../a.json"), "is also an input file", "a.json"),
    row("merge_out_is_second_input", {"a.json": GOOD_JSON, "b.jsonl": jsonl(*GOOD)},
        DATA + ("merge", "--data", "{d}/a.json,{d}/b.jsonl", "--out", "{d}/b.jsonl"), "is also an input file", "b.jsonl"),
    row("clean_out_is_input", {"a.json": GOOD_JSON}, DATA + ("clean", "--data", "{d}/a.json", "--out", "{d}/a.json"),
        "is also an input file", "a.json"),
    row("split_long_out_is_input", {"a.json": GOOD_JSON},
        DATA + ("split_long", "--data", "{d}/a.json", "--out", "{d}/a.json", "--tokenizer", "{tok}"),
        "is also an input file", "a.json"),
    row("sample_out_is_input", {"a.json": GOOD_JSON}, DATA + ("sample", "--data", "{d}/a.json", "--out", "{d}/a.json", "--n", "1"),
        "is also an input file", "a.json"),
    row("split_train_is_input", {"a.json": GOOD_JSON},
        DATA + ("split", "--data", "{d}/a.json", "--train", "{d}/a.json", "--test", "{o}/t.json"), "--train: is also an input", "a.json"),
    row("split_train_is_test", {"a.json": GOOD_JSON},
        DATA + ("split", "--data", "{d}/a.json", "--train", "{o}/t.json", "--test", "{o}/t.json"), "--test: is also --train", "t.json"),
    row("stats_report_is_input", {"a.json": GOOD_JSON}, DATA + ("stats", "--data", "{d}/a.json", "--report", "{d}/a.json"),
        "--report: is also an input file", "a.json"),
    row("build_out_holds_input", {"a.json": GOOD_JSON},
        DATA + ("build", "--data", "{d}/a.json", "--tokenizer", "{tok}", "--out", "{d}", "--cache_dir", "{o}/c"),
        "holds the input", "a.json"),
    row("build_out_is_a_foreign_folder", {"a.json": GOOD_JSON, "mine": ("dir", {"notes.txt": b"keep me"})},
        DATA + ("build", "--data", "{d}/a.json", "--tokenizer", "{tok}", "--out", "{d}/mine", "--cache_dir", "{o}/c"),
        "did not write; refusing to replace it", "mine"),
    row("build_out_is_a_file", {"a.json": GOOD_JSON, "out.bin": b"precious"},
        DATA + ("build", "--data", "{d}/a.json", "--tokenizer", "{tok}", "--out", "{d}/out.bin", "--cache_dir", "{o}/c"),
        "is a file; --out names a folder", "out.bin"),
    row("build_report_is_input", {"a.json": GOOD_JSON},
        DATA + ("build", "--data", "{d}/a.json", "--tokenizer", "{tok}", "--report", "{d}/a.json", "--cache_dir", "{o}/c"),
        "--report: is also an input file", "a.json"),
    # records that parse but none of which can be trained
    row("build_all_unusable", {"u.json": UNUSABLE},
        DATA + ("build", "--data", "{d}/u.json", "--tokenizer", "{tok}", "--cache_dir", "{o}/c"),
        "all 3 records: no conversation is trainable (skipped ", "u.json"),
    row("build_all_wrong_types", {"w.json": WRONG_TYPES},
        DATA + ("build", "--data", "{d}/w.json", "--tokenizer", "{tok}", "--cache_dir", "{o}/c"),
        "no conversation is trainable (skipped 2 malformed_record, 1 non_string_value)", "w.json"),
    row("strict_record_is_a_string", {"s.jsonl": jsonl(GOOD[0], "a string")},
        DATA + ("stats", "--data", "{d}/s.jsonl", "--strict"), "line 2: malformed_record: a str, not an object", "s.jsonl"),
    row("strict_conversations_not_a_list", {"c.json": js([GOOD[0], {"id": "x", "conversations": {"a": 1}}])},
        DATA + ("convert", "--data", "{d}/c.json", "--out", "{o}/o.json", "--strict"),
        "record 1: malformed_record: 'conversations' is a dict, not a list", "c.json"),
    row("strict_value_a_number", {"n.json": js([sharegpt("q", 3.5)])},
        DATA + ("clean", "--data", "{d}/n.json", "--out", "{o}/o.json", "--strict"),
        "record 0: non_string_value: turn 1 value is float", "n.json"),
    row("strict_missing_output", {"m.json": js([{"instruction": "Say hi", "input": ""}])},
        DATA + ("stats", "--data", "{d}/m.json", "--strict"), "record 0: missing_field: output is missing", "m.json"),
    row("unknown_record_keys", {"k.json": js([{"question": "q", "answer": "a"}])},
        DATA + ("convert", "--data", "{d}/k.json", "--out", "{o}/o.json"), "record 0: cannot tell the format", "k.json"),
    row("top_level_object", {"t.json": b'{\n  "conversations": []\n}\n'},
        DATA + ("stats", "--data", "{d}/t.json"), "top level: expected a JSON array of records or JSON Lines, found one JSON object (keys: conversations)", "t.json"),
    # broken files
    row("malformed_json_array", {"b.json": b'[{"instruction": "a", "output": "b"},\n {"instruction": }]'},
        DATA + ("convert", "--data", "{d}/b.json", "--out", "{o}/o.json"), "line 2 column 18: malformed JSON", "b.json"),
    row("malformed_jsonl_line", {"b.jsonl": jsonl(*GOOD) + b"{broken\n" + jsonl(GOOD[0])},
        DATA + ("merge", "--data", "{d}/b.jsonl", "--out", "{o}/o.json"), "line 3 column 2: malformed JSON", "b.jsonl"),
    row("jsonl_cut_inside_utf8_char", {"cut.jsonl": CUT_UTF8},
        DATA + ("stats", "--data", "{d}/cut.jsonl"), f"line 2 byte {len(js(sharegpt('q', '日本'))) - 6}: the file ends in the middle of a UTF-8 character", "cut.jsonl"),
    row("jsonl_cut_mid_line", {"cut.jsonl": CUT_ASCII},
        DATA + ("build", "--data", "{d}/cut.jsonl", "--tokenizer", "{tok}", "--cache_dir", "{o}/c"),
        "line 2 column ", "cut.jsonl"),
    row("json_array_cut", {"cut.json": GOOD_JSON[:-20]},
        DATA + ("clean", "--data", "{d}/cut.json", "--out", "{o}/o.json"), "(the text ends early: truncated file?)", "cut.json"),
    row("latin1_json", {"l1.json": LATIN1},
        DATA + ("convert", "--data", "{d}/l1.json", "--out", "{o}/o.json"), f"line 1 byte {LATIN1.index(0xE9) + 1}: not valid UTF-8 (byte 0xe9)", "l1.json"),
    row("gbk_jsonl", {"g.jsonl": GBK_JSONL},
        DATA + ("split", "--data", "{d}/g.jsonl", "--train", "{o}/tr.json", "--test", "{o}/te.json"),
        "line 2 byte ", "g.jsonl"),
    row("empty_file", {"e.json": b""}, DATA + ("stats", "--data", "{d}/e.json"), "file: is empty: no records", "e.json"),
    row("whitespace_file", {"w.json": b" \n\n "}, DATA + ("sample", "--data", "{d}/w.json", "--out", "{o}/o.json", "--n", "1"),
        "holds only white space", "w.json"),
    row("data_is_a_directory", {"dir": ("dir", {})}, DATA + ("stats", "--data", "{d}/dir"), "file: is a directory, not a data file", "dir"),
    row("data_missing", {}, DATA + ("convert", "--data", "{d}/nope.json", "--out", "{o}/o.json"), "file: does not exist", "nope.json"),
    row("second_input_bad", {"a.json": GOOD_JSON, "z.json": b"[1, 2"},
        DATA + ("merge", "--data", "{d}/a.json,{d}/z.json", "--out", "{o}/o.json"), "malformed JSON", "z.json"),
    # outputs that cannot be written
    row("out_is_a_directory", {"a.json": GOOD_JSON, "o": ("dir", {})},
        DATA + ("convert", "--data", "{d}/a.json", "--out", "{d}/o"), "--out: is a folder; give a file name", "/o"),
    row("out_in_read_only_dir", {"a.json": GOOD_JSON},
        DATA + ("convert", "--data", "{d}/a.json", "--out", "{ro}/o.json"), "output: cannot be written", "o.json"),
    row("out_under_a_file", {"a.json": GOOD_JSON},
        DATA + ("clean", "--data", "{d}/a.json", "--out", "{d}/a.json/o.json"), "--out: cannot be written", "a.json/o.json"),
    row("identity_out_is_a_directory", {"o": ("dir", {})}, DATA + ("identity", "--out", "{d}/o"),
        "is a folder; give a file name", "/o"),
    row("report_in_read_only_dir", {"a.json": GOOD_JSON},
        DATA + ("stats", "--data", "{d}/a.json", "--report", "{ro}/r.json"), "output: cannot be written", "r.json"),
    # options
    row("unknown_to", {"a.json": GOOD_JSON}, DATA + ("convert", "--data", "{d}/a.json", "--out", "{o}/o.json", "--to", "xml"),
        "to 'xml' is not one of sharegpt, messages", "command line"),
    row("unknown_fmt", {"a.json": GOOD_JSON}, DATA + ("stats", "--data", "{d}/a.json", "--fmt", "yaml"),
        "fmt 'yaml' is not one of alpaca, sharegpt", "command line"),
    row("tokenizer_missing", {"a.json": GOOD_JSON},
        DATA + ("build", "--data", "{d}/a.json", "--tokenizer", "{d}/no-such-tok", "--cache_dir", "{o}/c"),
        "--tokenizer: does not exist", "no-such-tok"),
    row("tokenizer_dir_without_tokenizer", {"a.json": GOOD_JSON, "tok": ("dir", {"README": b"nothing"})},
        DATA + ("split_long", "--data", "{d}/a.json", "--out", "{o}/o.json", "--tokenizer", "{d}/tok"),
        "--tokenizer: holds no tokenizer", "tok"),
    row("tokenizer_is_a_file", {"a.json": GOOD_JSON}, DATA + ("stats", "--data", "{d}/a.json", "--tokenizer", "{d}/a.json"),
        "--tokenizer: is a file", "a.json"),
    row("tokenizer_json_broken", {"a.json": GOOD_JSON, "tok": ("dir", {"tokenizer.json": b"{not json"})},
        DATA + ("inspect", "--data", "{d}/a.json", "--tokenizer", "{d}/tok"), "--tokenizer: cannot be loaded", "tok"),
    row("unknown_template_build", {"a.json": GOOD_JSON},
        DATA + ("build", "--data", "{d}/a.json", "--tokenizer", "{tok}", "--template", "vicuna_v2", "--cache_dir", "{o}/c"),
        "unknown template; choose from vicuna_v1.1", "--template"),
    row("unknown_template_inspect", {"a.json": GOOD_JSON},
        DATA + ("inspect", "--data", "{d}/a.json", "--tokenizer", "{tok}", "--template", "chatml"), "unknown template", "--template"),
    row("template_file_unknown_key", {"a.json": GOOD_JSON, "t.yaml": BAD_TEMPLATE_YAML},
        DATA + ("stats", "--data", "{d}/a.json", "--tokenizer", "{tok}", "--template", "{d}/t.yaml"),
        "template: unknown template keys ['assistent']", "t.yaml"),
    row("template_file_missing", {"a.json": GOOD_JSON},
        DATA + ("build", "--data", "{d}/a.json", "--tokenizer", "{tok}", "--template", "{d}/t.yaml", "--cache_dir", "{o}/c"),
        "template file: does not exist", "t.yaml"),
    row("max_length_zero", {"a.json": GOOD_JSON},
        DATA + ("build", "--data", "{d}/a.json", "--tokenizer", "{tok}", "--max_length", "0", "--cache_dir", "{o}/c"),
        "--max_length: value: expects a whole number >= 1, got 0", "--max_length"),
    row("max_length_negative", {"a.json": GOOD_JSON},
        DATA + ("split_long", "--data", "{d}/a.json", "--out", "{o}/o.json", "--tokenizer", "{tok}", "--max_length", "-5"),
        "expects a whole number >= 1, got -5", "--max_length"),
    row("max_length_not_a_number", {"a.json": GOOD_JSON},
        DATA + ("inspect", "--data", "{d}/a.json", "--tokenizer", "{tok}", "--max_length", "long"),
        "max_length expects an integer, got 'long'", "command line"),
    row("max_length_below_template_prompt", {"a.json": GOOD_JSON},
        DATA + ("build", "--data", "{d}/a.json", "--tokenizer", "{tok}", "--max_length", "3", "--cache_dir", "{o}/c"),
        "template vicuna_v1.1: too small: the template puts at least", "max_length 3"),
    row("split_long_budget_below_template_prompt", {"a.json": GOOD_JSON},
        DATA + ("split_long", "--data", "{d}/a.json", "--out", "{o}/o.json", "--tokenizer", "{tok}", "--max_length", "2"),
        "too small", "max_length 2"),
    row("sample_n_not_a_number", {"a.json": GOOD_JSON}, DATA + ("sample", "--data", "{d}/a.json", "--out", "{o}/o.json", "--n", "abc"),
        "n expects an integer, got 'abc'", "command line"),
    row("split_test_size_zero", {"a.json": GOOD_JSON},
        DATA + ("split", "--data", "{d}/a.json", "--train", "{o}/a.json", "--test", "{o}/b.json", "--test_size", "0"),
        "expects a fraction in (0, 1) or a count >= 1, got 0", "--test_size"),
    row("inspect_index_out_of_range", {"a.json": GOOD_JSON},
        DATA + ("inspect", "--data", "{d}/a.json", "--tokenizer", "{tok}", "--index", "7"), "index 7: no such conversation", "a.json"),
    # the training recipe
    row("train_config_unknown_key", {"c.yaml": b"learning_rat: 1.0e-5\n"}, TRAIN + ("--config", "{d}/c.yaml"),
        "unknown key 'learning_rat' (did you mean learning_rate?)", "c.yaml"),
    row("train_config_wrong_type", {"c.yaml": b"per_device_train_batch_size: two\n"}, TRAIN + ("--config", "{d}/c.yaml"),
        "per_device_train_batch_size expects int, got 'two'", "per_device_train_batch_size"),
    row("train_config_float_for_int", {"c.yaml": b"gradient_accumulation_steps: 2.5\n"}, TRAIN + ("--config", "{d}/c.yaml"),
        "gradient_accumulation_steps expects int, got 2.5", "gradient_accumulation_steps"),
    row("train_config_list_for_path", {"c.yaml": b"data_path: [a.json, b.json]\n"}, TRAIN + ("--config", "{d}/c.yaml"),
        "data_path expects str, got ['a.json', 'b.json']", "data_path"),
    row("train_config_bad_bool", {"c.yaml": b"bf16: maybe\n"}, TRAIN + ("--config", "{d}/c.yaml"),
        "bf16 expects True or False, got 'maybe'", "bf16"),
    row("train_config_missing", {}, TRAIN + ("--config", "{d}/nope.yaml"), "config file", "nope.yaml"),
    row("train_unknown_template", {}, TRAIN + ("--template", "vicuna_v9"), "template 'vicuna_v9' is not one of", "template"),
    row("train_model_max_length_zero", {}, TRAIN + ("--model_max_length", "0"), "model_max_length must be at least 1, got 0",
        "model_max_length"),
    row("train_learning_rate_nan", {}, TRAIN + ("--learning_rate", "nan"), "learning_rate must be a finite number", "learning_rate"),
    row("train_data_missing", {}, TRAIN + ("--data_path", "{d}/nope.json"), "data_path: ", "nope.json"),
    row("train_data_is_a_directory", {"dir": ("dir", {})}, TRAIN + ("--data_path", "{d}/dir"), "is a directory", "dir"),
    row("train_model_dir_without_model", {"m": ("dir", {"notes.txt": b"no weights"})},
        TRAIN + ("--model_name_or_path", "{d}/m"), "is a folder without a model", "/m"),
    row("train_data_all_unusable", {"u.json": UNUSABLE},
        TRAIN + ("--model_name_or_path", "{tok}", "--data_path", "{d}/u.json"), "no conversation is trainable", "u.json"),
    row("train_max_length_below_template_prompt", {"a.json": GOOD_JSON},
        TRAIN + ("--model_name_or_path", "{tok}", "--data_path", "{d}/a.json", "--model_max_length", "4"),
        "too small", "max_length 4"),
    row("train_deepspeed_config_malformed", {"ds.json": b'{"zero_optimization": {"stage": 2}'},
        ZERO2 + ("--deepspeed", "{d}/ds.json"), "ds.json", "ds.json"),
    row("train_deepspeed_missing_strategy_from_it", {}, TRAIN[:2] + TRAIN[4:] + ("--deepspeed", "{d}/nope.json"),
        "does not exist", "nope.json"),
    row("train_deepspeed_config_missing", {}, ZERO2 + ("--deepspeed", "{d}/nope.json"), "does not exist", "nope.json"),
    row("train_config_is_a_directory", {"cfg": ("dir", {})}, TRAIN + ("--config", "{d}/cfg"), "directory", "cfg"),
    row("train_config_malformed_yaml", {"c.yaml": b"learning_rate: [1\n"}, TRAIN + ("--config", "{d}/c.yaml"),
        "c.yaml", "c.yaml"),
    row("train_config_not_a_mapping", {"c.yaml": b"- learning_rate\n- 1\n"}, TRAIN + ("--config", "{d}/c.yaml"),
        "c.yaml", "c.yaml"),
]  # fmt: skip

ACCEPTED = [
    row("bom_json_array", {"bom.json": b"\xef\xbb\xbf" + GOOD_JSON}, DATA + ("stats", "--data", "{d}/bom.json"),
        "read 2  written 2", "bom.json"),
    row("bom_jsonl", {"bom.jsonl": b"\xef\xbb\xbf" + jsonl(*GOOD)},
        DATA + ("convert", "--data", "{d}/bom.jsonl", "--out", "{o}/o.jsonl"), "read 2  written 2", "bom.jsonl"),
    row("crlf_jsonl_with_blank_lines", {"w.jsonl": jsonl(*GOOD).replace(b"\n", b"\r\n\r\n")},
        DATA + ("stats", "--data", "{d}/w.jsonl"), "read 2  written 2", "w.jsonl"),
]  # fmt: skip


def _materialize(folder: Path, files: dict) -> None:
    for name, content in files.items():
        path = folder / name
        if isinstance(content, tuple) and content[0] == "symlink":
            path.symlink_to(content[1])
        elif isinstance(content, tuple) and content[0] == "dir":
            path.mkdir()
            _materialize(path, content[1])
        else:
            path.write_bytes(content)


def _snapshot(folder: Path) -> dict:
    """Every entry under `folder`: file hashes, link targets, folders (nothing may change)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            out[key] = "link -> " + os.readlink(path)
        elif path.is_dir():
            out[key] = "dir"
        else:
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _read_only_dir(tmp: Path) -> Path:
    """A folder this process cannot write to: permissions, or for root (who ignores them) /sys."""
    if os.geteuid() == 0:
        return Path("/sys")
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


def _run_row(param, base: Path, tok: Path) -> dict:
    rid, files, cmd, _, _ = param.values
    d, o = base / rid / "in", base / rid / "out"
    d.mkdir(parents=True)
    o.mkdir()
    _materialize(d, files)
    before = _snapshot(d)
    subs = {"d": str(d), "o": str(o), "tok": str(tok), "ro": str(_read_only_dir(base / rid))}
    argv = [part.format(**subs) for part in cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
    res = subprocess.run(argv, cwd=d, capture_output=True, text=True, timeout=240, env=env)
    return {"res": res, "changed": before != _snapshot(d), "before": before}


RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def results(tmp_path_factory, llama_dir) -> dict:
    """Every row run once, two at a time."""
    base = tmp_path_factory.mktemp("bad_inputs")
    rows = ROWS + ACCEPTED
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = pool.map(lambda p: (p.values[0], _run_row(p, base, llama_dir)), rows)
        RESULTS.update(done)
    return RESULTS


@pytest.mark.parametrize("rid, files, cmd, expect, names", ROWS)
def test_bad_input_is_one_clear_error(results, rid, files, cmd, expect, names):
    res = results[rid]["res"]
    output = res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in output, output[-3000:]
    assert res.returncode == 2, output[-3000:]
    assert len(errors) == 1, res.stderr[-3000:]
    assert expect in errors[0] and names in errors[0], errors[0]
    assert not results[rid]["changed"], f"an input changed: {results[rid]['before']}"


@pytest.mark.parametrize("rid, files, cmd, expect, names", ACCEPTED)
def test_odd_but_valid_input_is_read(results, rid, files, cmd, expect, names):
    res = results[rid]["res"]
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert expect in res.stderr + res.stdout and "error:" not in res.stderr
    assert not results[rid]["changed"]


def _is_clear(res) -> bool:
    errors = sum(line.startswith("error:") for line in res.stderr.splitlines())
    return res.returncode == 2 and errors == 1 and "Traceback" not in res.stdout + res.stderr


def test_summary(results, capsys):
    """The line for the README: every row an error, none a traceback, no input changed."""
    ran = {p.values[0]: results[p.values[0]] for p in ROWS}
    clear = sum(_is_clear(r["res"]) for r in ran.values())
    tracebacks = sum("Traceback" in r["res"].stdout + r["res"].stderr for r in ran.values())
    changed = sum(r["changed"] for r in ran.values())
    line = (f"{len(ROWS)} bad inputs: {clear} clear errors, {tracebacks} tracebacks, {changed} inputs "
            f"changed; {len(ACCEPTED)} odd but valid inputs read")  # fmt: skip
    with capsys.disabled():
        print("\n" + line)
    assert clear == len(ROWS) and tracebacks == 0 and changed == 0


# -- in-process checks of what the table cannot show ------------------------------------------


def test_in_place_replaces_the_input_atomically(tmp_path):
    src = tmp_path / "a.json"
    src.write_bytes(js([{"instruction": "Say hi", "output": "Hi"}]))
    res = subprocess.run([*DATA, "convert", "--data", src, "--out", src, "--in_place"],
                         capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(src.read_text())[0]["conversations"][1] == {"from": "gpt", "value": "Hi"}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left behind


def test_a_writer_that_fails_half_way_keeps_the_old_file(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text("old\n")

    def records():
        yield {"id": 1}
        raise DataError("in.json", "line 2", "malformed JSON")

    with pytest.raises(DataError):
        write_records(out, records())
    assert out.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["o.jsonl"]


def test_build_replaces_only_its_own_output_folder(tmp_path, llama_dir):
    src, out, cache = tmp_path / "a.json", tmp_path / "train", tmp_path / "c"
    src.write_bytes(GOOD_JSON)
    for _ in range(2):  # the second run replaces the folder the first one wrote
        build_dataset(str(src), str(llama_dir), out=str(out), cache_dir=str(cache), quiet=True)
    assert len(datasets.load_from_disk(str(out))) == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    with pytest.raises(DataError, match="did not write; refusing to replace it"):
        build_dataset(str(src), str(llama_dir), out=str(tmp_path / "other"), cache_dir=str(cache))
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep"


def test_output_file_gets_ordinary_permissions(tmp_path):
    out = tmp_path / "o.json"
    write_records(out, [{"id": 1}])
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize(
    "ds, args, expect",
    [
        ({"bf16": {"enabled": True}}, [], "bf16.enabled is True but the command line says --bf16 False"),
        ({"train_micro_batch_size_per_gpu": 3}, ["--per_device_train_batch_size", "4"],
         "train_micro_batch_size_per_gpu is 3 but the command line says 4"),
        ({"gradient_accumulation_steps": 8}, ["--gradient_accumulation_steps", "2"],
         "gradient_accumulation_steps is 8 but the command line says 2"),
    ],
)  # fmt: skip
def test_deepspeed_json_that_contradicts_the_command_line(tmp_path, ds, args, expect):
    """In-process: a single-process ZeRO run reaches this check too (by hand, --strategy zero2
    --deepspeed FILE exits 2 with this line), but only after ~30 s of start-up."""
    from recipes.core.config import ConfigError, load_config
    from recipes.core.distributed import deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **ds}))
    cfg, _ = load_config(["--deepspeed", str(path), *args])
    assert cfg.strategy == "zero2"
    with pytest.raises(ConfigError, match=expect):
        deepspeed_config(cfg)
