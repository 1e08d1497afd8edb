"""Bad inputs, the way a user meets them: each row makes an input, runs the command line in a
process of its own (a fork of a warm interpreter, tests/forked.py), and expects ONE line
`error: <file>: <where>: <what>` on stderr, exit status 2, no traceback, and every input file
byte-identical afterwards.

The rows run two at a time in a module fixture (the machine has 2 cores); each parametrized
test then checks its own row's result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import pytest
from forked import fork_servers
from records import GLAIVE_TURNS, sharegpt, sharegpt_turns
from train_utils import flags

from fastchat_data.build import build_dataset
from fastchat_data.io import write_records
from fastchat_data.schema import DataError

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


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
DEEP = b"[" + b"[" * 100_000 + b"]" * 100_000 + b"]"
# half of an emoji, escaped: valid JSON, not a character
LONE_SURROGATE = js([sharegpt("hi HALF", "x")]).replace(b"HALF", b"\\ud83d")
GLAIVE = js([sharegpt_turns(*GLAIVE_TURNS, tools='[{"name": "weather"}]', score=3)])
ALPACA = js([{"instruction": "Add", "input": "2 and 3", "output": "5"}])
LONG = js([sharegpt("q", "a " * 3000, system="Be brief.")])

DATA = (PY, "-m", "fastchat_data")


def data(args: str) -> tuple:
    """A data command line: the words after `python -m fastchat_data`, split as a shell does."""
    return DATA + tuple(shlex.split(args))


def train(args: str, *, recipe="full_finetune", strategy="single", model="{tok}") -> tuple:
    """`python recipes/<recipe>.py` writing under {o}, then `args`; `strategy` or `model` None:
    that option is not given."""
    given = {"strategy": strategy, "model_name_or_path": model}
    return (
        PY,
        str(REPO / "recipes" / f"{recipe}.py"),
        *flags(**{name: value for name, value in given.items() if value is not None}),
        *flags(report_to="none", output_dir="{o}/run", cache_dir="{o}/cache"),
        *shlex.split(args),
    )


def tool(module: str, args: str) -> tuple:
    """A camelid tool's command line: `python -m module` and its arguments."""
    return (PY, "-m", module, *shlex.split(args))


LLAMA_CONFIG = json.dumps(
    {
        "model_type": "llama",
        "vocab_size": 100,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
).encode()
HUGE_VOCAB = json.dumps({"model_type": "llama", "vocab_size": 10**12, "hidden_size": 8}).encode()
FAKE_ADAPTER = {"adapter_config.json": b'{"peft_type": "LORA", "base_model_name_or_path": "x"}'}
FAKE_CHECKPOINT = {
    "trainer_state.json": b'{"step": 1, "config": {}}',
    "COMPLETE": b'{"step": 1, "files": {}}',
}
PAIRS = js([{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}])
PROMPTS = js([{"prompt": "2 + 2?", "answer": "4"}, {"prompt": "3 + 2?", "answer": "5"}])
PLAN_LLAMA = {
    "model_type": "llama",
    "vocab_size": 1000,
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
PLAN_CONFIGS = {
    "ok.json": js(PLAN_LLAMA),
    "broken.json": b"{not json",
    "null.json": b"null",
    "42.json": b"42",
    "list.json": b"[]",
    "binary.json": b"\xff\xfe\x00\x01\x80",
    "keys.json": b'{"hidden_size": 64}',
    "gpt2.json": b'{"model_type": "gpt2", "n_embd": 768}',
    "moe.json": js({**PLAN_LLAMA, "num_local_experts": 8}),
    "huge.json": js({**PLAN_LLAMA, "hidden_size": 10**30}),
    "nan.json": js({**PLAN_LLAMA, "vocab_size": float("nan")}),
    "gqa.json": js({**PLAN_LLAMA, "num_key_value_heads": 3}),
}


def row(rid, files, cmd, expect, names, marks=()):
    """files: name -> bytes (or ("symlink", target), ("hardlink", name), ("fifo",),
    ("mode", mode, bytes), or ("dir", {name: bytes}));
    cmd: the command line ({d}: input folder, {o}: output folder, {tok}: a
    tokenizer and model folder, {ro}: a folder nobody may write); expect: a fragment of the
    error line; names: what the line must name (the file or the option)."""
    return pytest.param(rid, files, cmd, expect, names, id=rid, marks=marks)


ROWS = [
    # outputs that are inputs
    row(
        "convert_out_is_input",
        {"a.json": GOOD_JSON},
        data("convert --data {d}/a.json --out {d}/a.json"),
        "--out: is also an input file; add --in_place",
        "a.json",
    ),
    row(
        "convert_out_is_input_via_symlink",
        {"a.json": GOOD_JSON, "l.json": ("symlink", "a.json")},
        data("convert --data {d}/l.json --out {d}/a.json"),
        "is also an input file",
        "a.json",
    ),
    row(
        "convert_out_is_input_relative",
        {"a.json": GOOD_JSON, "sub": ("dir", {})},
        data("convert --data a.json --out sub/../a.json"),
        "is also an input file",
        "a.json",
    ),
    row(
        "merge_out_is_second_input",
        {"a.json": GOOD_JSON, "b.jsonl": jsonl(*GOOD)},
        data("merge --data {d}/a.json,{d}/b.jsonl --out {d}/b.jsonl"),
        "is also an input file",
        "b.jsonl",
    ),
    row(
        "clean_out_is_input",
        {"a.json": GOOD_JSON},
        data("clean --data {d}/a.json --out {d}/a.json"),
        "is also an input file",
        "a.json",
    ),
    row(
        "split_long_out_is_input",
        {"a.json": GOOD_JSON},
        data("split_long --data {d}/a.json --out {d}/a.json --tokenizer {tok}"),
        "is also an input file",
        "a.json",
    ),
    row(
        "sample_out_is_input",
        {"a.json": GOOD_JSON},
        data("sample --data {d}/a.json --out {d}/a.json --n 1"),
        "is also an input file",
        "a.json",
    ),
    row(
        "split_train_is_input",
        {"a.json": GOOD_JSON},
        data("split --data {d}/a.json --train {d}/a.json --test {o}/t.json"),
        "--train: is also an input",
        "a.json",
    ),
    row(
        "split_train_is_test",
        {"a.json": GOOD_JSON},
        data("split --data {d}/a.json --train {o}/t.json --test {o}/t.json"),
        "--test: is also --train",
        "t.json",
    ),
    row(
        "stats_report_is_input",
        {"a.json": GOOD_JSON},
        data("stats --data {d}/a.json --report {d}/a.json"),
        "--report: is also an input file",
        "a.json",
    ),
    row(
        "build_out_holds_input",
        {"a.json": GOOD_JSON},
        data("build --data {d}/a.json --tokenizer {tok} --out {d} --cache_dir {o}/c"),
        "holds the input",
        "a.json",
    ),
    row(
        "build_out_is_a_foreign_folder",
        {"a.json": GOOD_JSON, "mine": ("dir", {"notes.txt": b"keep me"})},
        data("build --data {d}/a.json --tokenizer {tok} --out {d}/mine --cache_dir {o}/c"),
        "did not write; refusing to replace it",
        "mine",
    ),
    row(
        "build_out_is_a_file",
        {"a.json": GOOD_JSON, "out.bin": b"precious"},
        data("build --data {d}/a.json --tokenizer {tok} --out {d}/out.bin --cache_dir {o}/c"),
        "is a file; --out names a folder",
        "out.bin",
    ),
    row(
        "build_report_is_input",
        {"a.json": GOOD_JSON},
        data("build --data {d}/a.json --tokenizer {tok} --report {d}/a.json --cache_dir {o}/c"),
        "--report: is also an input file",
        "a.json",
    ),
    # records that parse but none of which can be trained
    row(
        "build_all_unusable",
        {"u.json": UNUSABLE},
        data("build --data {d}/u.json --tokenizer {tok} --cache_dir {o}/c"),
        "all 3 records: no conversation is trainable (skipped ",
        "u.json",
    ),
    row(
        "build_all_wrong_types",
        {"w.json": WRONG_TYPES},
        data("build --data {d}/w.json --tokenizer {tok} --cache_dir {o}/c"),
        "no conversation is trainable (skipped 2 malformed_record, 1 non_string_value)",
        "w.json",
    ),
    row(
        "strict_record_is_a_string",
        {"s.jsonl": jsonl(GOOD[0], "a string")},
        data("stats --data {d}/s.jsonl --strict"),
        "line 2: malformed_record: a str, not an object",
        "s.jsonl",
    ),
    row(
        "strict_conversations_not_a_list",
        {"c.json": js([GOOD[0], {"id": "x", "conversations": {"a": 1}}])},
        data("convert --data {d}/c.json --out {o}/o.json --strict"),
        "record 1: malformed_record: 'conversations' is a dict, not a list",
        "c.json",
    ),
    row(
        "strict_value_a_number",
        {"n.json": js([sharegpt("q", 3.5)])},
        data("clean --data {d}/n.json --out {o}/o.json --strict"),
        "record 0: non_string_value: turn 1 value is float",
        "n.json",
    ),
    row(
        "strict_missing_output",
        {"m.json": js([{"instruction": "Say hi", "input": ""}])},
        data("stats --data {d}/m.json --strict"),
        "record 0: missing_field: output is missing",
        "m.json",
    ),
    row(
        "unknown_record_keys",
        {"k.json": js([{"question": "q", "answer": "a"}])},
        data("convert --data {d}/k.json --out {o}/o.json"),
        "record 0: cannot tell the format",
        "k.json",
    ),
    row(
        "top_level_object",
        {"t.json": b'{\n  "conversations": []\n}\n'},
        data("stats --data {d}/t.json"),
        "top level: expected a JSON array of records or JSON Lines, found one JSON object (keys: "
        "conversations)",
        "t.json",
    ),
    # broken files
    row(
        "malformed_json_array",
        {"b.json": b'[{"instruction": "a", "output": "b"},\n {"instruction": }]'},
        data("convert --data {d}/b.json --out {o}/o.json"),
        "line 2 column 18: malformed JSON",
        "b.json",
    ),
    row(
        "malformed_jsonl_line",
        {"b.jsonl": jsonl(*GOOD) + b"{broken\n" + jsonl(GOOD[0])},
        data("merge --data {d}/b.jsonl --out {o}/o.json"),
        "line 3 column 2: malformed JSON",
        "b.jsonl",
    ),
    row(
        "jsonl_cut_inside_utf8_char",
        {"cut.jsonl": CUT_UTF8},
        data("stats --data {d}/cut.jsonl"),
        f"line 2 byte {len(js(sharegpt('q', '日本'))) - 6}: the file ends in the middle of a UTF-8 "
        "character",
        "cut.jsonl",
    ),
    row(
        "jsonl_cut_mid_line",
        {"cut.jsonl": CUT_ASCII},
        data("build --data {d}/cut.jsonl --tokenizer {tok} --cache_dir {o}/c"),
        "line 2 column ",
        "cut.jsonl",
    ),
    row(
        "json_array_cut",
        {"cut.json": GOOD_JSON[:-20]},
        data("clean --data {d}/cut.json --out {o}/o.json"),
        "(the text ends early: truncated file?)",
        "cut.json",
    ),
    row(
        "latin1_json",
        {"l1.json": LATIN1},
        data("convert --data {d}/l1.json --out {o}/o.json"),
        f"line 1 byte {LATIN1.index(0xE9) + 1}: not valid UTF-8 (byte 0xe9)",
        "l1.json",
    ),
    row(
        "gbk_jsonl",
        {"g.jsonl": GBK_JSONL},
        data("split --data {d}/g.jsonl --train {o}/tr.json --test {o}/te.json"),
        "line 2 byte ",
        "g.jsonl",
    ),
    row(
        "empty_file",
        {"e.json": b""},
        data("stats --data {d}/e.json"),
        "file: is empty: no records",
        "e.json",
    ),
    row(
        "whitespace_file",
        {"w.json": b" \n\n "},
        data("sample --data {d}/w.json --out {o}/o.json --n 1"),
        "holds only white space",
        "w.json",
    ),
    row(
        "data_is_a_directory",
        {"dir": ("dir", {})},
        data("stats --data {d}/dir"),
        "file: is a directory, not a data file",
        "dir",
    ),
    row(
        "data_missing",
        {},
        data("convert --data {d}/nope.json --out {o}/o.json"),
        "file: does not exist",
        "nope.json",
    ),
    row(
        "second_input_bad",
        {"a.json": GOOD_JSON, "z.json": b"[1, 2"},
        data("merge --data {d}/a.json,{d}/z.json --out {o}/o.json"),
        "malformed JSON",
        "z.json",
    ),
    # outputs that cannot be written
    row(
        "out_is_a_directory",
        {"a.json": GOOD_JSON, "o": ("dir", {})},
        data("convert --data {d}/a.json --out {d}/o"),
        "--out: is a folder; give a file name",
        "/o",
    ),
    row(
        "out_in_read_only_dir",
        {"a.json": GOOD_JSON},
        data("convert --data {d}/a.json --out {ro}/o.json"),
        "output: cannot be written",
        "o.json",
    ),
    row(
        "out_under_a_file",
        {"a.json": GOOD_JSON},
        data("clean --data {d}/a.json --out {d}/a.json/o.json"),
        "--out: cannot be written",
        "a.json/o.json",
    ),
    row(
        "identity_out_is_a_directory",
        {"o": ("dir", {})},
        data("identity --out {d}/o"),
        "is a folder; give a file name",
        "/o",
    ),
    row(
        "report_in_read_only_dir",
        {"a.json": GOOD_JSON},
        data("stats --data {d}/a.json --report {ro}/r.json"),
        "output: cannot be written",
        "r.json",
    ),
    # options
    row(
        "unknown_to",
        {"a.json": GOOD_JSON},
        data("convert --data {d}/a.json --out {o}/o.json --to xml"),
        "to 'xml' is not one of sharegpt, messages",
        "command line",
    ),
    row(
        "unknown_fmt",
        {"a.json": GOOD_JSON},
        data("stats --data {d}/a.json --fmt yaml"),
        "fmt 'yaml' is not one of alpaca, sharegpt",
        "command line",
    ),
    row(
        "tokenizer_missing",
        {"a.json": GOOD_JSON},
        data("build --data {d}/a.json --tokenizer {d}/no-such-tok --cache_dir {o}/c"),
        "--tokenizer: does not exist",
        "no-such-tok",
    ),
    row(
        "tokenizer_dir_without_tokenizer",
        {"a.json": GOOD_JSON, "tok": ("dir", {"README": b"nothing"})},
        data("split_long --data {d}/a.json --out {o}/o.json --tokenizer {d}/tok"),
        "--tokenizer: holds no tokenizer",
        "tok",
    ),
    row(
        "tokenizer_is_a_file",
        {"a.json": GOOD_JSON},
        data("stats --data {d}/a.json --tokenizer {d}/a.json"),
        "--tokenizer: is a file",
        "a.json",
    ),
    row(
        "tokenizer_json_broken",
        {"a.json": GOOD_JSON, "tok": ("dir", {"tokenizer.json": b"{not json"})},
        data("inspect --data {d}/a.json --tokenizer {d}/tok"),
        "--tokenizer: cannot be loaded",
        "tok",
    ),
    row(
        "unknown_template_build",
        {"a.json": GOOD_JSON},
        data("build --data {d}/a.json --tokenizer {tok} --template vicuna_v2 --cache_dir {o}/c"),
        "unknown template; choose from vicuna_v1.1",
        "--template",
    ),
    row(
        "unknown_template_inspect",
        {"a.json": GOOD_JSON},
        data("inspect --data {d}/a.json --tokenizer {tok} --template chatml"),
        "unknown template",
        "--template",
    ),
    row(
        "template_file_unknown_key",
        {"a.json": GOOD_JSON, "t.yaml": BAD_TEMPLATE_YAML},
        data("stats --data {d}/a.json --tokenizer {tok} --template {d}/t.yaml"),
        "template: unknown template keys ['assistent']",
        "t.yaml",
    ),
    row(
        "template_file_missing",
        {"a.json": GOOD_JSON},
        data("build --data {d}/a.json --tokenizer {tok} --template {d}/t.yaml --cache_dir {o}/c"),
        "template file: does not exist",
        "t.yaml",
    ),
    row(
        "max_length_zero",
        {"a.json": GOOD_JSON},
        data("build --data {d}/a.json --tokenizer {tok} --max_length 0 --cache_dir {o}/c"),
        "--max_length: value: expects a whole number >= 1, got 0",
        "--max_length",
    ),
    row(
        "max_length_negative",
        {"a.json": GOOD_JSON},
        data("split_long --data {d}/a.json --out {o}/o.json --tokenizer {tok} --max_length -5"),
        "expects a whole number >= 1, got -5",
        "--max_length",
    ),
    row(
        "max_length_not_a_number",
        {"a.json": GOOD_JSON},
        data("inspect --data {d}/a.json --tokenizer {tok} --max_length long"),
        "max_length expects an integer, got 'long'",
        "command line",
    ),
    row(
        "max_length_below_template_prompt",
        {"a.json": GOOD_JSON},
        data("build --data {d}/a.json --tokenizer {tok} --max_length 3 --cache_dir {o}/c"),
        "template vicuna_v1.1: too small: the template puts at least",
        "max_length 3",
    ),
    row(
        "split_long_budget_below_template_prompt",
        {"a.json": GOOD_JSON},
        data("split_long --data {d}/a.json --out {o}/o.json --tokenizer {tok} --max_length 2"),
        "too small",
        "max_length 2",
    ),
    row(
        "sample_n_not_a_number",
        {"a.json": GOOD_JSON},
        data("sample --data {d}/a.json --out {o}/o.json --n abc"),
        "n expects an integer, got 'abc'",
        "command line",
    ),
    row(
        "split_test_size_zero",
        {"a.json": GOOD_JSON},
        data("split --data {d}/a.json --train {o}/a.json --test {o}/b.json --test_size 0"),
        "expects a fraction in (0, 1) or a count >= 1, got 0",
        "--test_size",
    ),
    row(
        "inspect_index_out_of_range",
        {"a.json": GOOD_JSON},
        data("inspect --data {d}/a.json --tokenizer {tok} --index 7"),
        "index 7: no such conversation",
        "a.json",
    ),
    # files that hold no records (issue 17.3): refused, naming the file and what it holds
    row(
        "top_level_null",
        {"n.json": b"null\n"},
        data("convert --data {d}/n.json --out {o}/o.json"),
        "top level: expected a JSON array of records or JSON Lines, found null",
        "n.json",
    ),
    row(
        "top_level_number",
        {"n.json": b"42"},
        data("convert --data {d}/n.json --out {o}/o.json"),
        "found a single JSON number (42)",
        "n.json",
    ),
    row(
        "top_level_empty_array",
        {"n.json": b"[]"},
        data("convert --data {d}/n.json --out {o}/o.json"),
        "top level: is an empty JSON array: no records",
        "n.json",
    ),
    row(
        "top_level_empty_object",
        {"n.json": b"{}"},
        data("merge --data {d}/n.json --out {o}/o.json"),
        "top level: holds one empty JSON object: no records",
        "n.json",
    ),
    row(
        "top_level_string",
        {"n.json": b'"text"'},
        data("sample --data {d}/n.json --out {o}/o.json --n 1"),
        "found a single JSON string ('text')",
        "n.json",
    ),
    row(
        "jsonl_of_one_boolean",
        {"n.jsonl": b"true\n"},
        data("clean --data {d}/n.jsonl --out {o}/o.json"),
        "found a JSON boolean (true)",
        "n.jsonl",
    ),
    row(
        "records_that_are_not_objects",
        {"n.json": b"[1, 2, 3]"},
        data("convert --data {d}/n.json --out {o}/o.json"),
        "all 3 records: no record can be written (skipped 3 malformed_record)",
        "n.json",
    ),
    row(
        "all_records_of_another_format",
        {"a.json": GOOD_JSON},
        data("convert --data {d}/a.json --out {o}/o.json --fmt alpaca"),
        "no record can be written (skipped 2 missing_field)",
        "a.json",
    ),
    row(
        "split_long_nothing_fits",
        {"a.json": GOOD_JSON},
        data("split_long --data {d}/a.json --out {o}/o.json --tokenizer {tok} --max_length 40"),
        "no chunk can be written (skipped 3 pair_over_budget (pairs))",
        "a.json",
    ),
    # broken files beyond the first table (issue 17.5, 17.6)
    row(
        "deeply_nested_array",
        {"d.json": DEEP},
        data("convert --data {d}/d.json --out {o}/o.json"),
        "record 0 at line 1 column 2: malformed JSON: nested too deeply",
        "d.json",
    ),
    row(
        "deeply_nested_jsonl",
        {"d.jsonl": DEEP + b"\n"},
        data("stats --data {d}/d.jsonl"),
        "line 1: malformed JSON: nested too deeply",
        "d.jsonl",
    ),
    row(
        "deeply_nested_in_a_record",
        {"d.json": b'[{"conversations": ' + DEEP + b"}]"},
        data("build --data {d}/d.json --tokenizer {tok} --cache_dir {o}/c"),
        "nested too deeply",
        "d.json",
    ),
    row(
        "unpaired_surrogate_escape",
        {"s.json": LONE_SURROGATE},
        data("convert --data {d}/s.json --out {o}/o.json"),
        "record 0: holds an unpaired surrogate escape \\ud83d",
        "s.json",
    ),
    row(
        "utf16_with_bom",
        {"u.json": GOOD_JSON.decode().encode("utf-16")},
        data("stats --data {d}/u.json"),
        "file: is UTF-16 text (its byte order mark is FF FE); save it as UTF-8",
        "u.json",
    ),
    row(
        "utf16_without_bom",
        {"u.json": GOOD_JSON.decode().encode("utf-16-le")},
        data("stats --data {d}/u.json"),
        "(NUL characters: is it UTF-16 text? save it as UTF-8)",
        "u.json",
    ),
    row(
        "extra_data_after_array",
        {"x.json": GOOD_JSON + b"\n[]\n"},
        data("convert --data {d}/x.json --out {o}/o.json"),
        "top level: extra data after the JSON array at line 2 column 1",
        "x.json",
    ),
    row(
        "two_arrays_in_one_file",
        {"x.json": GOOD_JSON + GOOD_JSON},
        data("stats --data {d}/x.json"),
        f"extra data after the JSON array at line 1 column {len(GOOD_JSON) + 1}",
        "x.json",
    ),
    row(
        "array_not_closed",
        {"x.json": GOOD_JSON[:-1]},
        data("stats --data {d}/x.json"),
        "the array ends after record 1 without ']' (the text ends early: truncated file?)",
        "x.json",
    ),
    row(
        "garbage_from_the_first_byte",
        {"g.json": b"x" * 100_000},
        data("stats --data {d}/g.json"),
        "line 1 column 1: malformed JSON: Expecting value",
        "g.json",
    ),
    row(
        "comma_split_part_missing",
        {"a.json": GOOD_JSON},
        data("convert --data {d}/a.json,{d}/b.json --out {o}/o.json"),
        "file: does not exist (--data",
        "b.json",
    ),
    row(
        "comma_name_that_does_not_exist",
        {"a.json": GOOD_JSON},
        data("convert --data {d}/x,y.json --out {o}/o.json"),
        "was read as 2 files separated by commas, since no file has that whole name",
        "x,y.json",
    ),
    row(
        "data_empty_string",
        {},
        data("stats --data ''"),
        "--data: value: names no file",
        "--data",
    ),
    row(
        "data_dev_null",
        {},
        data("stats --data /dev/null"),
        "file: is empty: no records",
        "/dev/null",
    ),
    row(
        "build_data_is_a_fifo",
        {"p.json": ("fifo",)},
        data("build --data {d}/p.json --tokenizer {tok} --cache_dir {o}/c"),
        "is a pipe or a device: the build reads its input twice",
        "p.json",
    ),
    # a command line that cannot be read is refused before anything is written (issue 17.3)
    row(
        "misspelt_flag_build",
        {"a.json": GOOD_JSON},
        data("build {d}/a.json {tok} --out {o}/train --max_lenght 256 --cache_dir {o}/c"),
        "unknown option 'max_lenght' (did you mean max_length?)",
        "max_lenght",
    ),
    row(
        "misspelt_flag_convert",
        {"a.json": GOOD_JSON},
        data("convert --data {d}/a.json --out {o}/o.json --too messages"),
        "unknown option 'too' (did you mean to?)",
        "too",
    ),
    row(
        "unknown_command",
        {"a.json": GOOD_JSON},
        data("convrt {d}/a.json {o}/o.json"),
        "unknown command 'convrt' (did you mean convert?)",
        "convrt",
    ),
    row(
        "missing_required_option",
        {"a.json": GOOD_JSON},
        data("convert --data {d}/a.json"),
        "the following arguments are required: --out",
        "--out",
    ),
    row(
        "option_given_twice",
        {"a.json": GOOD_JSON, "b.json": GOOD_JSON},
        data("convert --data {d}/a.json --data {d}/b.json --out {o}/o.json"),
        "--data is given twice; give it once",
        "--data",
    ),
    row(
        "bool_that_is_not",
        {"a.json": GOOD_JSON},
        data("convert {d}/a.json {o}/o.json --strict maybe"),
        "strict expects True or False, got 'maybe'",
        "strict",
    ),
    row(
        "stray_argument",
        {"a.json": GOOD_JSON},
        data("convert {d}/a.json {o}/o.json extra"),
        "unexpected argument 'extra'",
        "extra",
    ),
    # absurd values
    row(
        "max_length_nan",
        {"a.json": GOOD_JSON},
        data("build --data {d}/a.json --tokenizer {tok} --max_length nan --cache_dir {o}/c"),
        "max_length expects an integer, got 'nan'",
        "max_length",
    ),
    row(
        "max_length_fraction",
        {"a.json": GOOD_JSON},
        data("split_long {d}/a.json {o}/o.json {tok} --max_length 2048.5"),
        "max_length expects an integer, got '2048.5'",
        "max_length",
    ),
    row(
        "max_length_minus_one",
        {"a.json": GOOD_JSON},
        data("inspect --data {d}/a.json --tokenizer {tok} --max_length -1"),
        "expects a whole number >= 1, got -1",
        "--max_length",
    ),
    row(
        "test_size_nan",
        {"a.json": GOOD_JSON},
        data("split --data {d}/a.json --train {o}/a.json --test {o}/b.json --test_size nan"),
        "expects a fraction in (0, 1) or a count >= 1, got nan",
        "--test_size",
    ),
    row(
        "test_size_inf",
        {"a.json": GOOD_JSON},
        data("split --data {d}/a.json --train {o}/a.json --test {o}/b.json --test_size inf"),
        "got inf",
        "--test_size",
    ),
    row(
        "test_size_takes_everything",
        {"a.json": GOOD_JSON},
        data("split --data {d}/a.json --train {o}/a.json --test {o}/b.json --test_size 2"),
        "puts all 2 records in the test set, leaving none to train on",
        "--test_size 2",
    ),
    row(
        "sample_n_zero",
        {"a.json": GOOD_JSON},
        data("sample {d}/a.json {o}/o.json 0"),
        "expects a whole number >= 1, got 0",
        "--n",
    ),
    row(
        "seed_negative",
        {"a.json": GOOD_JSON},
        data("sample {d}/a.json {o}/o.json 1 --seed -1"),
        "expects a whole number >= 0, got -1",
        "--seed",
    ),
    row(
        "num_proc_zero",
        {"a.json": GOOD_JSON},
        data("build --data {d}/a.json --tokenizer {tok} --num_proc 0 --cache_dir {o}/c"),
        "expects a whole number >= 1, got 0",
        "--num_proc",
    ),
    row(
        "num_proc_beyond_the_cpus",
        {"a.json": GOOD_JSON},
        data("build_pairs --data {d}/a.json --tokenizer {tok} --num_proc 100000 --cache_dir {o}/c"),
        "100000 is more than this machine's",
        "--num_proc",
    ),
    row(
        "identity_n_absurd",
        {},
        data("identity --out {o}/i.json --n 1000000000000000000"),
        "is over 1,000,000",
        "--n",
    ),
    row(
        "min_chars_over_max_chars",
        {"a.json": GOOD_JSON},
        data("clean {d}/a.json {o}/o.json --min_chars 500 --max_chars 100"),
        "every conversation would be dropped",
        "--min_chars",
    ),
    row(
        "inspect_index_negative",
        {"a.json": GOOD_JSON},
        data("inspect --data {d}/a.json --tokenizer {tok} --index -1"),
        "got -1",
        "--index",
    ),
    row(
        "inspect_id_missing",
        {"a.json": GOOD_JSON},
        data("inspect --data {d}/a.json --tokenizer {tok} --id nope"),
        "id nope: no such conversation (2 trainable conversations of 2 records)",
        "a.json",
    ),
    row(
        "template_file_is_a_list",
        {"a.json": GOOD_JSON, "t.yaml": b"- a\n- b\n"},
        data("build --data {d}/a.json --tokenizer {tok} --template {d}/t.yaml --cache_dir {o}/c"),
        "template file: holds a list, not fields",
        "t.yaml",
    ),
    row(
        "pair_nothing_matches",
        {"a.json": GOOD_JSON, "b.json": ALPACA},
        data("pair {d}/a.json {d}/b.json {o}/p.json"),
        "no pair can be made (skipped 2 missing_field)",
        "a.json",
    ),
    # outputs (issue 17.2): read-only, hard links, devices, one output twice
    row(
        "out_read_only_file",
        {"a.json": GOOD_JSON, "ro.json": ("mode", 0o444, b"keep me")},
        data("convert {d}/a.json {d}/ro.json"),
        "--out: is read-only; refusing to replace it",
        "ro.json",
    ),
    row(
        "out_hard_link_to_input",
        {"a.json": GOOD_JSON, "h.json": ("hardlink", "a.json")},
        data("convert {d}/a.json {d}/h.json"),
        "--out: is also an input file",
        "h.json",
    ),
    row(
        "report_is_also_out",
        {"a.json": GOOD_JSON},
        data("convert {d}/a.json {o}/o.json --report {o}/o.json"),
        "--report: is also --out",
        "o.json",
    ),
    row(
        "report_is_input_via_symlink",
        {"a.json": GOOD_JSON, "l.json": ("symlink", "a.json")},
        data("stats --data {d}/a.json --report {d}/l.json"),
        "--report: is also an input file",
        "l.json",
    ),
    row(
        "out_is_a_full_device",
        {"a.json": GOOD_JSON},
        data("convert {d}/a.json /dev/full"),
        "output: cannot be written: No space left on device",
        "/dev/full",
    ),
    row(
        "build_out_is_the_tokenizer",
        {"a.json": GOOD_JSON},
        data("build {d}/a.json {tok} --out {tok} --cache_dir {o}/c"),
        "is a folder that this command did not write",
        "--out",
    ),
    row(
        "cache_dir_is_a_file",
        {"a.json": GOOD_JSON},
        data("build {d}/a.json {tok} --cache_dir {d}/a.json"),
        "cache: cannot be written",
        "a.json",
    ),
    # every command refuses a file without records, not only convert
    row(
        "build_empty_array",
        {"n.json": b"[]"},
        data("build {d}/n.json {tok} --cache_dir {o}/c"),
        "is an empty JSON array: no records",
        "n.json",
    ),
    row(
        "build_pairs_empty_object",
        {"n.json": b"{}"},
        data("build_pairs {d}/n.json {tok} --cache_dir {o}/c"),
        "holds one empty JSON object: no records",
        "n.json",
    ),
    row(
        "pair_chosen_is_null",
        {"n.json": b"null", "b.json": ALPACA},
        data("pair {d}/n.json {d}/b.json {o}/p.json"),
        "found null",
        "n.json",
    ),
    row(
        "convert_pairs_number",
        {"n.json": b"42"},
        data("convert_pairs {d}/n.json {o}/p.json"),
        "found a single JSON number (42)",
        "n.json",
    ),
    row(
        "split_string",
        {"n.json": b'"text"'},
        data("split {d}/n.json {o}/a.json {o}/b.json"),
        "found a single JSON string",
        "n.json",
    ),
    row(
        "inspect_empty_array",
        {"n.json": b"[ ]"},
        data("inspect {d}/n.json {tok}"),
        "is an empty JSON array: no records",
        "n.json",
    ),
    row(
        "split_long_null",
        {"n.jsonl": b"null\n"},
        data("split_long {d}/n.jsonl {o}/o.json {tok}"),
        "found null",
        "n.jsonl",
    ),
    # more broken layouts
    row(
        "trailing_comma_in_array",
        {"t.json": b'[{"instruction": "a", "output": "b"},]'},
        data("convert {d}/t.json {o}/o.json"),
        "line 1 column 38: malformed JSON: Expecting value (in record 1)",
        "t.json",
    ),
    row(
        "pretty_printed_json_lines",
        {"p.jsonl": json.dumps(GOOD[0], indent=1).encode()},
        data("stats {d}/p.jsonl"),
        "line 1 column 2: malformed JSON",
        "p.jsonl",
    ),
    row(
        "data_symlink_loop",
        {"l.json": ("symlink", "l.json")},
        data("stats {d}/l.json"),
        "file: does not exist",
        "l.json",
    ),
    row(
        "template_file_not_utf8",
        {"a.json": GOOD_JSON, "t.yaml": b"system: caf\xe9\n"},
        data("stats {d}/a.json --tokenizer {tok} --template {d}/t.yaml"),
        "template file: cannot be read",
        "t.yaml",
    ),
    # more options
    row(
        "convert_pairs_unknown_shape",
        {"a.json": GOOD_JSON},
        data("convert_pairs {d}/a.json {o}/o.json --to xml"),
        "to 'xml' is not one of pairs, messages, sharegpt",
        "command line",
    ),
    row(
        "max_source_length_zero",
        {"a.json": GOOD_JSON},
        data("build {d}/a.json {tok} --max_source_length 0 --cache_dir {o}/c"),
        "expects a whole number >= 1, got 0",
        "--max_source_length",
    ),
    row(
        "heldout_without_its_file",
        {"b.json": ALPACA},
        data("pair {d}/b.json {d}/b.json {o}/p.json --heldout 1"),
        "--heldout_out: value: is needed with --heldout 1",
        "--heldout_out",
    ),
    row(
        "chat_template_missing",
        {"a.json": GOOD_JSON},
        data("inspect {d}/a.json {tok} --template chat_template"),
        "the tokenizer has no chat template",
        "chat_template",
    ),
    # more outputs
    row(
        "heldout_out_is_out",
        {"b.json": ALPACA},
        data(
            "pair {d}/b.json {d}/b.json {o}/p.json --keep_identical --heldout 1 "
            "--heldout_out {o}/p.json"
        ),
        "--heldout_out: is also --out",
        "p.json",
    ),
    row(
        "report_is_a_folder",
        {"a.json": GOOD_JSON, "r": ("dir", {})},
        data("stats {d}/a.json --report {d}/r"),
        "--report: is a folder; give a file name",
        "/r",
    ),
    row(
        "out_read_only_system_file",
        {"a.json": GOOD_JSON},
        data("convert {d}/a.json /proc/version"),
        "--out: is read-only; refusing to replace it",
        "/proc/version",
    ),
    row(
        "out_symlink_to_read_only_file",
        {
            "a.json": GOOD_JSON,
            "ro.json": ("mode", 0o444, b"keep"),
            "l.json": ("symlink", "ro.json"),
        },
        data("convert {d}/a.json {d}/l.json"),
        "is read-only; refusing to replace it",
        "ro.json",
    ),
    row(
        "split_test_is_input_via_hard_link",
        {"a.json": GOOD_JSON, "h.json": ("hardlink", "a.json")},
        data("split {d}/a.json {o}/t.json {d}/h.json"),
        "--test: is also an input file",
        "h.json",
    ),
    row(
        "identity_out_read_only",
        {"i.json": ("mode", 0o444, b"keep")},
        data("identity --out {d}/i.json"),
        "is read-only",
        "i.json",
    ),
    # the training recipe
    row(
        "train_config_unknown_key",
        {"c.yaml": b"learning_rat: 1.0e-5\n"},
        train("--config {d}/c.yaml"),
        "unknown key 'learning_rat' (did you mean learning_rate?)",
        "c.yaml",
    ),
    row(
        "train_config_wrong_type",
        {"c.yaml": b"per_device_train_batch_size: two\n"},
        train("--config {d}/c.yaml"),
        "per_device_train_batch_size expects an integer, got 'two'",
        "per_device_train_batch_size",
    ),
    row(
        "train_config_float_for_int",
        {"c.yaml": b"gradient_accumulation_steps: 2.5\n"},
        train("--config {d}/c.yaml"),
        "gradient_accumulation_steps expects an integer, got 2.5",
        "gradient_accumulation_steps",
    ),
    row(
        "train_config_list_for_path",
        {"c.yaml": b"data_path: [a.json, b.json]\n"},
        train("--config {d}/c.yaml"),
        "data_path expects text, got ['a.json', 'b.json']",
        "data_path",
    ),
    row(
        "train_config_bad_bool",
        {"c.yaml": b"bf16: maybe\n"},
        train("--config {d}/c.yaml"),
        "bf16 expects True or False, got 'maybe'",
        "bf16",
    ),
    row(
        "train_config_missing",
        {},
        train("--config {d}/nope.yaml"),
        "config file",
        "nope.yaml",
    ),
    row(
        "train_unknown_template",
        {},
        train("--template vicuna_v9"),
        "template 'vicuna_v9' is not one of",
        "template",
    ),
    row(
        "train_model_max_length_zero",
        {},
        train("--model_max_length 0"),
        "model_max_length must be at least 1, got 0",
        "model_max_length",
    ),
    row(
        "train_learning_rate_nan",
        {},
        train("--learning_rate nan"),
        "learning_rate must be a finite number",
        "learning_rate",
    ),
    row(
        "train_data_missing",
        {},
        train("--data_path {d}/nope.json"),
        "data_path: ",
        "nope.json",
    ),
    row(
        "train_data_is_a_directory",
        {"dir": ("dir", {})},
        train("--data_path {d}/dir"),
        "is a directory",
        "dir",
    ),
    row(
        "train_model_dir_without_model",
        {"m": ("dir", {"notes.txt": b"no weights"})},
        train("--model_name_or_path {d}/m"),
        "is a folder without a model",
        "/m",
    ),
    row(
        "train_data_all_unusable",
        {"u.json": UNUSABLE},
        train("--model_name_or_path {tok} --data_path {d}/u.json"),
        "no conversation is trainable",
        "u.json",
    ),
    row(
        "train_max_length_below_template_prompt",
        {"a.json": GOOD_JSON},
        train("--model_name_or_path {tok} --data_path {d}/a.json --model_max_length 4"),
        "too small",
        "max_length 4",
    ),
    row(
        "train_deepspeed_config_malformed",
        {"ds.json": b'{"zero_optimization": {"stage": 2}'},
        train("--deepspeed {d}/ds.json", strategy="zero2"),
        "ds.json",
        "ds.json",
    ),
    row(
        "train_deepspeed_missing_strategy_from_it",
        {},
        train("--deepspeed {d}/nope.json", strategy=None),
        "does not exist",
        "nope.json",
    ),
    row(
        "train_deepspeed_config_missing",
        {},
        train("--deepspeed {d}/nope.json", strategy="zero2"),
        "does not exist",
        "nope.json",
    ),
    row(
        "train_config_is_a_directory",
        {"cfg": ("dir", {})},
        train("--config {d}/cfg"),
        "directory",
        "cfg",
    ),
    row(
        "train_config_malformed_yaml",
        {"c.yaml": b"learning_rate: [1\n"},
        train("--config {d}/c.yaml"),
        "c.yaml",
        "c.yaml",
    ),
    row(
        "train_config_not_a_mapping",
        {"c.yaml": b"- learning_rate\n- 1\n"},
        train("--config {d}/c.yaml"),
        "c.yaml",
        "c.yaml",
    ),
    # the recipes beyond the data: model folders, settings that would crash later
    row(
        "train_model_config_malformed",
        {"m": ("dir", {"config.json": b'{"model_type": "llama",'})},
        train("--model_name_or_path {d}/m"),
        "malformed JSON",
        "config.json",
    ),
    row(
        "train_model_without_tokenizer",
        {"m": ("dir", {"config.json": LLAMA_CONFIG}), "a.json": GOOD_JSON},
        train("--model_name_or_path {d}/m --data_path {d}/a.json"),
        "its tokenizer cannot be loaded",
        "/m",
    ),
    row(
        "train_model_absurd_vocabulary",
        {"m": ("dir", {"config.json": HUGE_VOCAB})},
        train("--model_name_or_path {d}/m"),
        "vocab_size is 1000000000000",
        "config.json",
    ),
    row(
        "train_no_model_given",
        {"a.json": GOOD_JSON},
        train("--data_path {d}/a.json", model=None),
        "--model_name_or_path: give the model folder",
        "model_name_or_path",
    ),
    row("train_no_data_given", {}, train(""), "--data_path: give the training data", "data_path"),
    row(
        "train_adam_epsilon_zero",
        {},
        train("--adam_epsilon 0"),
        "adam_epsilon must be a finite number in (0, 1]",
        "adam_epsilon",
    ),
    row(
        "train_adam_beta2_one",
        {},
        train("--adam_beta2 1"),
        "adam_beta2 must be a finite number in [0, 1)",
        "adam_beta2",
    ),
    row(
        "train_learning_rate_absurd",
        {},
        train("--learning_rate 1e4"),
        "learning_rate must be a finite number in [0, 1]",
        "learning_rate",
    ),
    row(
        "train_seed_negative",
        {},
        train("--seed -1"),
        "seed must be a whole number from 0 to 2^32 - 1",
        "seed",
    ),
    row(
        "train_scheduler_the_loop_cannot_drive",
        {},
        train("--lr_scheduler_type reduce_lr_on_plateau"),
        "lr_scheduler_type 'reduce_lr_on_plateau' is not one of",
        "lr_scheduler_type",
    ),
    row(
        "train_max_grad_norm_zero",
        {},
        train("--max_grad_norm 0"),
        "max_grad_norm must be a finite number > 0",
        "max_grad_norm",
    ),
    row(
        "train_lora_rank_zero",
        {},
        train("--peft_method lora --lora_r 0"),
        "lora_r must be at least 1",
        "lora_r",
    ),
    row(
        "train_lora_dropout_above_one",
        {},
        train("--peft_method lora --lora_dropout 1.5"),
        "lora_dropout must be a finite number in [0, 1)",
        "lora_dropout",
    ),
    row(
        "train_quantized_without_adapter",
        {},
        train("--quantization nf4"),
        "add --peft_method lora",
        "quantization",
    ),
    row(
        "train_adapter_under_fsdp",
        {},
        train("--peft_method lora --strategy fsdp"),
        "adapters train with strategy",
        "fsdp",
    ),
    row(
        "train_compile_under_zero3",
        {},
        train("--strategy zero3 --compile True", strategy="zero2"),
        "ZeRO-3 gathers each parameter",
        "zero3",
    ),
    row(
        "train_sequence_of_strategies_unknown",
        {},
        train("--strategy zero4"),
        "strategy 'zero4' is not one of",
        "zero4",
    ),
    row(
        "train_report_to_unknown",
        {},
        train("--report_to wandb,neptune"),
        "report_to 'wandb,neptune'",
        "report_to",
    ),
    row(
        "dpo_beta_infinite",
        {"p.json": PAIRS},
        train("--data_path {d}/p.json --beta inf", recipe="dpo"),
        "beta must be a finite number in (0, 10000]",
        "beta",
    ),
    # the tools: outputs that are inputs, absurd values
    row(
        "eval_out_is_the_data",
        {"a.json": GOOD_JSON},
        tool("recipes.eval", "--model {tok} --data {d}/a.json --out {d}/a.json"),
        "is also an input file",
        "a.json",
    ),
    row(
        "eval_out_is_the_pairs",
        {"p.json": PAIRS},
        tool("recipes.eval", "--model {tok} --pairs {d}/p.json --out {d}/p.json"),
        "is also an input file",
        "p.json",
    ),
    row(
        "eval_batch_size_zero",
        {"a.json": GOOD_JSON},
        tool("recipes.eval", "--model {tok} --data {d}/a.json --batch_size 0"),
        "--batch_size must be at least 1",
        "batch_size",
    ),
    row("eval_nothing_to_do", {}, tool("recipes.eval", "--model {tok}"), "give --data", "--data"),
    # counts of steps and rounds below what the command can do (a ZeroDivisionError before)
    row(
        "bench_packing_negative_steps",
        {},
        tool("bench.packing_bench", "--steps -3"),
        "--steps -3: give 2 or more",
        "--steps",
    ),
    # a result path that cannot be written: refused before the benchmark runs, not after it
    row(
        "bench_out_is_a_folder",
        {"results": ("dir", {})},
        tool("bench.packing_bench", "--out {d}/results"),
        "--out: is a folder; give a file name",
        "results",
    ),
    row(
        "bench_out_is_read_only",
        {"r.json": ("mode", 0o444, b"{}")},
        tool("bench.compile_bench", "--out {d}/r.json"),
        "--out: is read-only",
        "r.json",
    ),
    row(
        "bench_compare_trees_zero_rounds",
        {},
        tool("bench.compare_trees", "--baseline {d} --rounds 0"),
        "--rounds 0: give 3 or more",
        "--rounds",
    ),
    row(
        "demo_zero_steps",
        {},
        tool("recipes.demo", "--max_steps 0"),
        "give 1 or more",
        "--max_steps",
    ),
    row(
        "rl_demo_negative_steps",
        {},
        tool("recipes.rl_demo", "--grpo_steps -1"),
        "--grpo_steps -1: give 1 or more",
        "--grpo_steps",
    ),
    row(
        "eval_reward_adapter_config_not_json",
        {"ad": ("dir", {"adapter_config.json": b"{not json"}), "p.json": PAIRS},
        tool("recipes.eval", "--model {tok} --adapter {d}/ad --reward_model --pairs {d}/p.json"),
        "not a peft config",
        "adapter_config.json",
    ),
    row(
        "eval_reward_adapter_weights_not_safetensors",
        {
            "ad": (
                "dir",
                {
                    "adapter_config.json": b'{"peft_type": "LORA", "task_type": "SEQ_CLS"}',
                    "adapter_model.safetensors": b"garbage",
                },
            ),
            "p.json": PAIRS,
        },
        tool("recipes.eval", "--model {tok} --adapter {d}/ad --reward_model --pairs {d}/p.json"),
        "not a safetensors file",
        "adapter_model.safetensors",
    ),
    row(
        "merge_out_is_the_adapter",
        {"ad": ("dir", FAKE_ADAPTER)},
        tool("recipes.merge", "--adapter {d}/ad --out {d}/ad"),
        "is also an input folder",
        "ad",
    ),
    row(
        "merge_out_is_the_adapters_run",
        {"run": ("dir", {"adapter": ("dir", FAKE_ADAPTER)})},
        tool("recipes.merge", "--adapter {d}/run/adapter --out {d}/run"),
        "holds the input",
        "run",
    ),
    row(
        "convert_out_is_the_checkpoint",
        {"ck": ("dir", FAKE_CHECKPOINT)},
        tool("recipes.convert_checkpoint", "{d}/ck {d}/ck"),
        "is also an input folder",
        "ck",
    ),
    row(
        "convert_out_is_the_run_folder",
        {"run": ("dir", {"checkpoints": ("dir", {"step-00000001": ("dir", FAKE_CHECKPOINT)})})},
        tool("recipes.convert_checkpoint", "{d}/run/checkpoints/step-00000001 {d}/run"),
        "holds the input",
        "run",
    ),
    row(
        "convert_shard_size_malformed",
        {"ck": ("dir", FAKE_CHECKPOINT)},
        tool("recipes.convert_checkpoint", "{d}/ck {o}/hf --max_shard_size 2gigs"),
        "--max_shard_size '2gigs'",
        "max_shard_size",
    ),
    row(
        "convert_not_a_checkpoint",
        {"x": ("dir", {})},
        tool("recipes.convert_checkpoint", "{d}/x {o}/hf"),
        "is not a camelid checkpoint",
        "/x",
    ),
    row(
        "chat_model_missing",
        {},
        tool("recipes.chat", "--model {d}/nope"),
        "is not a model folder",
        "nope",
    ),
    row(
        "plan_config_nested_too_deep",
        {"m": ("dir", {"config.json": b"[" * 200_000 + b"]" * 200_000})},
        tool("recipes.plan", "--model {d}/m"),
        "nested too deeply",
        "config.json",
    ),
    row(
        "plan_ngpu_zero",
        {},
        tool("recipes.plan", "--model llama-2-7b --ngpu 0"),
        "--ngpu 0",
        "ngpu",
    ),
    row(
        "plan_gpu_memory_nonsense",
        {},
        tool("recipes.plan", "--model llama-2-7b --gpu_memory abc"),
        "not a size",
        "gpu_memory",
    ),
    row(
        "launch_ngpu_zero",
        {},
        tool("launch.train", "--ngpu 0 --strategy fsdp"),
        "--ngpu 0: give at least 1 process",
        "ngpu",
    ),
    row(
        "launch_single_on_two",
        {},
        tool("launch.train", "--ngpu 2 --strategy single"),
        "runs one process",
        "single",
    ),
    row(
        "launch_unknown_recipe",
        {},
        tool("launch.train", "--recipe kto"),
        "--recipe 'kto' is not one of",
        "kto",
    ),
    # the recipes' settings that contradict each other or the objective
    row(
        "train_model_missing",
        {},
        train("--model_name_or_path {d}/nope"),
        "model_name_or_path: ",
        "nope does not exist",
    ),
    row(
        "train_option_misspelt",
        {},
        train("--learning_rat 1e-3"),
        "unknown option 'learning_rat' (did you mean learning_rate?)",
        "learning_rat",
    ),
    row(
        "train_fp16",
        {},
        train("--fp16 True"),
        "fp16 is not supported",
        "--fp16",
    ),
    row(
        "train_batch_larger_than_the_data",
        {"a.json": GOOD_JSON},
        train("--data_path {d}/a.json --per_device_train_batch_size 300"),
        "fewer than one global batch",
        "per device",
    ),
    row(
        "dpo_packing",
        {"p.json": PAIRS},
        train("--data_path {d}/p.json --packing True", recipe="dpo"),
        "does not pack",
        "--packing",
    ),
    row(
        "dpo_loss_type_unknown",
        {"p.json": PAIRS},
        train("--data_path {d}/p.json --loss_type kto", recipe="dpo"),
        "loss_type 'kto' is not one of",
        "kto",
    ),
    row(
        "dpo_beta_zero",
        {"p.json": PAIRS},
        train("--data_path {d}/p.json --beta 0", recipe="dpo"),
        "beta must be a finite number in (0, 10000]",
        "got 0.0",
    ),
    row(
        "dpo_quantized_full_model",
        {"p.json": PAIRS},
        train("--data_path {d}/p.json --quantization nf4", recipe="dpo"),
        "add --peft_method lora",
        "quantization nf4",
    ),
    row(
        "grpo_one_generation",
        {"q.json": PROMPTS},
        train("--data_path {d}/q.json --num_generations 1", recipe="grpo"),
        "num_generations must be at least 2",
        "got 1",
    ),
    row(
        "grpo_reward_function_missing",
        {"q.json": PROMPTS},
        train(
            "--data_path {d}/q.json --reward_funcs recipes.core.rewards.arithmetic:nope",
            recipe="grpo",
        ),
        "has no function nope",
        "--reward_funcs",
    ),
    row(
        "grpo_reward_module_missing",
        {"q.json": PROMPTS},
        train("--data_path {d}/q.json --reward_funcs no_such_module:f", recipe="grpo"),
        "cannot import no_such_module",
        "--reward_funcs",
    ),
    row(
        "grpo_temperature_zero",
        {"q.json": PROMPTS},
        train("--data_path {d}/q.json --temperature 0", recipe="grpo"),
        "temperature must be a finite number > 0",
        "got 0.0",
    ),
    row(
        "grpo_completion_longer_than_rows",
        {"q.json": PROMPTS},
        train(
            "--data_path {d}/q.json --max_completion_length 200 --model_max_length 128",
            recipe="grpo",
        ),
        "must exceed max_completion_length",
        "(200)",
    ),
    row(
        "sp_on_one_process",
        {"a.json": GOOD_JSON},
        train("--data_path {d}/a.json --sequence_parallel_size 2", strategy="single"),
        "strategy single runs one",
        "--sequence_parallel_size 2",
    ),
    row(
        "sp_eager_attention",
        {"a.json": GOOD_JSON},
        train(
            "--data_path {d}/a.json --sequence_parallel_size 2 --attn_implementation eager".strip(),
            strategy=None,
        ),
        "sequence parallelism runs its own attention",
        "eager",
    ),
    row(
        "sp_compiled",
        {"a.json": GOOD_JSON},
        train(
            "--data_path {d}/a.json --sequence_parallel_size 2 --compile True".strip(),
            strategy=None,
        ),
        "drop --compile",
        "--sequence_parallel_size 2",
    ),
    row(
        "sp_adapter",
        {"a.json": GOOD_JSON},
        train(
            "--data_path {d}/a.json --sequence_parallel_size 2 --peft_method lora".strip(),
            strategy=None,
        ),
        "drop --peft_method lora",
        "--sequence_parallel_size 2",
    ),
    row(
        "sp_heads_not_divided",
        {"a.json": GOOD_JSON},
        train("--data_path {d}/a.json --sequence_parallel_size 3", strategy=None),
        "does not divide the 4 attention heads",
        "--sequence_parallel_size 3",
    ),
    row(
        "sp_size_zero",
        {"a.json": GOOD_JSON},
        train("--data_path {d}/a.json --sequence_parallel_size 0", strategy=None),
        "sequence_parallel_size must be at least 1",
        "got 0",
    ),
    # the launcher's node and restart options
    row(
        "launch_nodes_range_reversed",
        {},
        tool("launch.train", "--strategy ddp --nnodes 2:1"),
        "--nnodes 2:1: give 1 <= MIN <= MAX nodes",
        "nnodes",
    ),
    row(
        "launch_nodes_range_from_zero",
        {},
        tool("launch.train", "--strategy ddp --nnodes 0:2"),
        "--nnodes 0:2: give 1 <= MIN <= MAX nodes",
        "nnodes",
    ),
    row(
        "launch_nodes_not_numbers",
        {},
        tool("launch.train", "--strategy ddp --nnodes a:b"),
        "--nnodes 'a:b': give a node count N or an elastic range",
        "nnodes",
    ),
    row(
        "launch_nodes_three_parts",
        {},
        tool("launch.train", "--strategy ddp --nnodes 1:2:3"),
        "--nnodes '1:2:3': give a node count N or an elastic range",
        "nnodes",
    ),
    row(
        "launch_restarts_negative",
        {},
        tool("launch.train", "--strategy ddp --max_restarts -1"),
        "--max_restarts -1: give 0 or more",
        "max_restarts",
    ),
    row(
        "launch_elastic_wait_negative",
        {},
        tool("launch.train", "--strategy ddp --elastic_wait -5"),
        "--elastic_wait -5: give 0 or more seconds",
        "elastic_wait",
    ),
    row(
        "launch_elastic_under_deepspeed",
        {},
        tool("launch.train", "--strategy ddp --nnodes 1:2 --strategy zero3"),
        "deepspeed launcher, which has no elastic",
        "zero3",
    ),
    row(
        "launch_restarts_under_deepspeed",
        {},
        tool("launch.train", "--strategy ddp --max_restarts 1 --strategy zero2"),
        "deepspeed launcher, which has no",
        "zero2",
    ),
    row(
        "launch_node_rank_out_of_range",
        {},
        tool("launch.train", "--strategy ddp --nnodes 1:2 --node_rank 2"),
        "--node_rank 2 of --nnodes 1:2: out of range",
        "node_rank",
    ),
    # the planner's model configs and budgets
    row(
        "plan_model_missing",
        {},
        tool("recipes.plan", "--model {d}/absent"),
        "no such file or folder",
        "absent",
    ),
    row(
        "plan_folder_without_config",
        {},
        tool("recipes.plan", "--model {d}"),
        "no config.json in this folder",
        "--model",
    ),
    row(
        "plan_config_is_a_folder",
        {"folder": ("dir", {"config.json": ("dir", {})})},
        tool("recipes.plan", "--model {d}/folder"),
        "folder/config.json: a folder, not a config.json",
        "folder",
    ),
    row(
        "plan_config_broken",
        {"broken.json": PLAN_CONFIGS["broken.json"]},
        tool("recipes.plan", "--model {d}/broken.json"),
        "not valid JSON",
        "broken.json",
    ),
    row(
        "plan_config_null",
        {"null.json": PLAN_CONFIGS["null.json"]},
        tool("recipes.plan", "--model {d}/null.json"),
        "holds null, not an object",
        "null.json",
    ),
    row(
        "plan_config_number",
        {"42.json": PLAN_CONFIGS["42.json"]},
        tool("recipes.plan", "--model {d}/42.json"),
        "holds the number 42, not an object",
        "42.json",
    ),
    row(
        "plan_config_list",
        {"list.json": PLAN_CONFIGS["list.json"]},
        tool("recipes.plan", "--model {d}/list.json"),
        "holds a list, not an object",
        "list.json",
    ),
    row(
        "plan_config_binary",
        {"binary.json": PLAN_CONFIGS["binary.json"]},
        tool("recipes.plan", "--model {d}/binary.json"),
        "binary.json: not",
        "binary.json",
    ),
    row(
        "plan_config_without_llama_keys",
        {"keys.json": PLAN_CONFIGS["keys.json"]},
        tool("recipes.plan", "--model {d}/keys.json"),
        "not a Llama-shaped config: no vocab_size, intermediate_size",
        "keys.json",
    ),
    row(
        "plan_config_gpt2",
        {"gpt2.json": PLAN_CONFIGS["gpt2.json"]},
        tool("recipes.plan", "--model {d}/gpt2.json"),
        "model_type 'gpt2' is not Llama-shaped",
        "gpt2.json",
    ),
    row(
        "plan_config_moe",
        {"moe.json": PLAN_CONFIGS["moe.json"]},
        tool("recipes.plan", "--model {d}/moe.json"),
        "num_local_experts says a mixture of experts",
        "moe.json",
    ),
    row(
        "plan_config_huge",
        {"huge.json": PLAN_CONFIGS["huge.json"]},
        tool("recipes.plan", "--model {d}/huge.json"),
        "hidden_size is the number 1000000000000000000000000000000",
        "huge.json",
    ),
    row(
        "plan_config_nan",
        {"nan.json": PLAN_CONFIGS["nan.json"]},
        tool("recipes.plan", "--model {d}/nan.json"),
        "vocab_size is the number nan",
        "nan.json",
    ),
    row(
        "plan_config_gqa",
        {"gqa.json": PLAN_CONFIGS["gqa.json"]},
        tool("recipes.plan", "--model {d}/gqa.json"),
        "num_attention_heads 4 is not a multiple of num_key_value_heads 3",
        "gqa.json",
    ),
    row(
        "plan_model_a_device",
        {},
        tool("recipes.plan", "--model /dev/zero"),
        "/dev/zero: not a regular file",
        "/dev/zero",
    ),
    row(
        "plan_ngpu_not_a_number",
        {"ok.json": PLAN_CONFIGS["ok.json"]},
        tool("recipes.plan", "--model {d}/ok.json --ngpu abc"),
        "ngpu expects an integer, got 'abc'",
        "ngpu",
    ),
    row(
        "plan_nnodes_zero",
        {"ok.json": PLAN_CONFIGS["ok.json"]},
        tool("recipes.plan", "--model {d}/ok.json --nnodes 0"),
        "--nnodes 0: must be a whole number from 1",
        "nnodes",
    ),
    row(
        "plan_gpu_memory_zero",
        {"ok.json": PLAN_CONFIGS["ok.json"]},
        tool("recipes.plan", "--model {d}/ok.json --gpu_memory 0"),
        "--gpu_memory '0': a memory size is more than 0",
        "gpu_memory",
    ),
    row(
        "plan_gpu_memory_nan",
        {"ok.json": PLAN_CONFIGS["ok.json"]},
        tool("recipes.plan", "--model {d}/ok.json --gpu_memory nan"),
        "--gpu_memory 'nan': not a size",
        "gpu_memory",
    ),
    row(
        "plan_gpu_memory_absurd",
        {"ok.json": PLAN_CONFIGS["ok.json"]},
        tool("recipes.plan", "--model {d}/ok.json --gpu_memory 1e30"),
        "--gpu_memory '1e30': a memory size is more than 0 and at most 1 PB",
        "gpu_memory",
    ),
    row(
        "plan_cpu_memory_infinite",
        {"ok.json": PLAN_CONFIGS["ok.json"]},
        tool("recipes.plan", "--model {d}/ok.json --cpu_memory 1e999"),
        "--cpu_memory '1e999': a memory size",
        "cpu_memory",
    ),
    row(
        "plan_max_length_zero",
        {"ok.json": PLAN_CONFIGS["ok.json"]},
        tool("recipes.plan", "--model {d}/ok.json --model_max_length 0"),
        "--model_max_length 0: must be a whole number from 1",
        "model_max_length",
    ),
    row(
        "plan_max_length_absurd",
        {"ok.json": PLAN_CONFIGS["ok.json"]},
        tool(
            "recipes.plan",
            "--model {d}/ok.json --model_max_length 1111111111111111111111111111111111111111",
        ),
        "--model_max_length '1111",
        "model_max_length",
    ),
    row(
        "plan_batch_negative",
        {"ok.json": PLAN_CONFIGS["ok.json"]},
        tool("recipes.plan", "--model {d}/ok.json --batch -1"),
        "--per_device_train_batch_size -1: must be a whole number from 1",
        "per_device_train_batch_size",
    ),
    row(
        "plan_loss_chunk_negative",
        {"ok.json": PLAN_CONFIGS["ok.json"]},
        tool("recipes.plan", "--model {d}/ok.json --loss_chunk_size -1"),
        "--loss_chunk_size -1",
        "loss_chunk_size",
    ),
    row(
        "plan_runtime_nan",
        {"ok.json": PLAN_CONFIGS["ok.json"]},
        tool("recipes.plan", "--model {d}/ok.json --runtime_mb nan --device cpu"),
        "--runtime_mb nan",
        "runtime_mb",
    ),
    row(
        "plan_strategy_unknown",
        {"ok.json": PLAN_CONFIGS["ok.json"]},
        tool("recipes.plan", "--model {d}/ok.json --strategy foo"),
        "--strategy 'foo': not one of single, ddp",
        "foo",
    ),
    row(
        "plan_adapter_under_fsdp",
        {"ok.json": PLAN_CONFIGS["ok.json"]},
        tool("recipes.plan", "--model {d}/ok.json --strategy fsdp --peft lora"),
        "--strategy fsdp: does not train adapters",
        "peft lora",
    ),
    row(
        "plan_peft_unknown",
        {"ok.json": PLAN_CONFIGS["ok.json"]},
        tool("recipes.plan", "--model {d}/ok.json --peft dora"),
        "peft 'dora' is not one of lora, qlora",
        "dora",
    ),
    row(
        "plan_option_misspelt",
        {"ok.json": PLAN_CONFIGS["ok.json"]},
        tool("recipes.plan", "--model {d}/ok.json --gpu_mem 80"),
        "unknown option 'gpu_mem' (did you mean gpu_memory?)",
        "gpu_mem",
    ),
    row(
        "plan_sp_not_dividing_ranks",
        {"ok.json": PLAN_CONFIGS["ok.json"]},
        tool("recipes.plan", "--model {d}/ok.json --ngpu 8 --sequence_parallel_size 3"),
        "--sequence_parallel_size 3 does not divide the 8 ranks",
        "ngpu 8",
    ),
    row(
        "plan_sp_not_dividing_heads",
        {"ok.json": PLAN_CONFIGS["ok.json"]},
        tool("recipes.plan", "--model {d}/ok.json --ngpu 8 --sequence_parallel_size 8"),
        "does not divide the model's 4 attention heads",
        "sequence_parallel_size 8",
    ),
    row(
        "plan_auto_length_without_budget",
        {"ok.json": PLAN_CONFIGS["ok.json"]},
        tool("recipes.plan", "--model {d}/ok.json --model_max_length auto --device cpu"),
        "--model_max_length auto: the longest length needs a budget (--cpu_memory)",
        "cpu_memory",
    ),
]

ACCEPTED = [
    row(
        "bom_json_array",
        {"bom.json": b"\xef\xbb\xbf" + GOOD_JSON},
        data("stats --data {d}/bom.json"),
        "read 2  trainable 2",
        "bom.json",
    ),
    row(
        "bom_jsonl",
        {"bom.jsonl": b"\xef\xbb\xbf" + jsonl(*GOOD)},
        data("convert --data {d}/bom.jsonl --out {o}/o.jsonl"),
        "read 2  written 2",
        "bom.jsonl",
    ),
    row(
        "crlf_jsonl_with_blank_lines",
        {"w.jsonl": jsonl(*GOOD).replace(b"\n", b"\r\n\r\n")},
        data("stats --data {d}/w.jsonl"),
        "read 2  trainable 2",
        "w.jsonl",
    ),
    row(
        "bom_crlf_pretty_array",
        {"p.json": b"\xef\xbb\xbf" + json.dumps(GOOD, indent=1).replace("\n", "\r\n").encode()},
        data("stats --data {d}/p.json"),
        "read 2  trainable 2",
        "p.json",
    ),
    row(
        "data_wrapped_in_an_object",
        {"w.json": json.dumps({"version": 1, "data": GOOD}, indent=2).encode()},
        data("stats --data {d}/w.json"),
        "read 2  trainable 2",
        "w.json",
    ),
    row(
        "comma_in_a_file_name",
        {"a,b.json": GOOD_JSON},
        data("stats --data {d}/a,b.json"),
        "read 2  trainable 2",
        "a,b.json",
    ),
    row(
        "positional_options",
        {"a.json": GOOD_JSON},
        data("convert {d}/a.json {o}/o.json"),
        "read 2  written 2",
        "a.json",
    ),
    row(
        "out_named_like_a_number",
        {"a.json": GOOD_JSON},
        data("convert {d}/a.json --out {o}/2024"),
        "read 2  written 2",
        "a.json",
    ),
    row(
        "mixed_formats_each_described",
        {"a.json": ALPACA, "b.jsonl": jsonl(*GOOD)},
        data("merge --data {d}/a.json,{d}/b.jsonl --out {o}/o.json"),
        "b.jsonl: sharegpt, 2 records",
        "a.json: alpaca, 1 records",
    ),
    row(
        "lossy_conversion_reported",
        {"g.json": GLAIVE},
        data("convert {d}/g.json {o}/o.json"),
        "converted 'function_call' turns -> assistant replies (the call becomes reply text): in 1 "
        "records",
        "converted 'tools' -> system prompt text",
    ),
    row(
        "sample_more_than_there_is",
        {"a.json": GOOD_JSON},
        data("sample {d}/a.json {o}/o.json 5"),
        "asked for 5, the input has 2 usable records: wrote 2",
        "written 2",
    ),
    row(
        "split_long_counts_each_unit",
        {"a.json": GOOD_JSON},
        data("split_long {d}/a.json {o}/o.json {tok}"),
        "[split_long] conversations read 2, dropped 0, split 0; chunks written 2; pairs read 3, "
        "written 3, dropped 0",
        "pairs",
    ),
    row(
        "max_length_huge",
        {"a.json": GOOD_JSON},
        data("build {d}/a.json {tok} --max_length 1000000000000000000 --cache_dir {o}/c"),
        "written 2",
        "truncated 0",
    ),
    row(
        "num_proc_unused_says_so",
        {"a.json": GOOD_JSON},
        data("build {d}/a.json {tok} --num_proc 2 --cache_dir {o}/c"),
        "num_proc: 2 unused: 2 conversations are tokenized in one process",
        "written 2",
    ),
    row(
        "truncation_says_how_to_avoid_it",
        {"l.json": LONG},
        data("build {d}/l.json {tok} --max_length 300 --cache_dir {o}/c"),
        "truncation: 1 conversations cut: 1 cut at --max_length 300 lose their end: raise "
        "--max_length, or split them first",
        "template_system: unused",
    ),
    row(
        "stats_template_without_tokenizer",
        {"a.json": GOOD_JSON},
        data("stats {d}/a.json --template alpaca"),
        "template: alpaca unused: token counts need --tokenizer",
        "trainable 2",
    ),
    row(
        "inspect_color_flag_alone",
        {"a.json": GOOD_JSON},
        data("inspect {d}/a.json {tok} --color"),
        "\033[1;32m",
        "id a_0",
    ),
]


def _materialize(folder: Path, files: dict) -> None:
    for name, content in files.items():
        path = folder / name
        kind = content[0] if isinstance(content, tuple) else "bytes"
        if kind == "symlink":
            path.symlink_to(content[1])
        elif kind == "hardlink":
            os.link(folder / content[1], path)
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "mode":
            path.write_bytes(content[2])
            path.chmod(content[1])
        elif kind == "dir":
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
        elif stat.S_ISFIFO(path.stat().st_mode):
            out[key] = "fifo"
        else:
            mode = oct(path.stat().st_mode & 0o777)
            out[key] = f"{hashlib.sha256(path.read_bytes()).hexdigest()} {mode}"
    return out


def _read_only_dir(tmp: Path) -> Path:
    """A folder this process cannot write to: permissions, or for root (who ignores them) /sys."""
    if os.geteuid() == 0:
        return Path("/sys")
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


ROW_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "NO_COLOR": "1"}


def _run_row(param, base: Path, tok: Path, servers) -> dict:
    rid, files, cmd, _, _ = param.values
    d, o = base / rid / "in", base / rid / "out"
    d.mkdir(parents=True)
    o.mkdir()
    _materialize(d, files)
    before = _snapshot(d)
    subs = {"d": str(d), "o": str(o), "tok": str(tok), "ro": str(_read_only_dir(base / rid))}
    argv = [part.format(**subs) for part in cmd]
    server = servers.get()
    try:
        res = server.run(argv, cwd=d, timeout=240)
    finally:
        servers.put(server)
    return {
        "res": res,
        "changed": before != _snapshot(d),
        "before": before,
        "outputs": _snapshot(o),
    }


RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def results(tmp_path_factory, llama_dir) -> dict:
    """Every row run once, two at a time, each a fork of a warm interpreter (tests/forked.py)."""
    base = tmp_path_factory.mktemp("bad_inputs")
    rows = ROWS + ACCEPTED
    with fork_servers(2, ROW_ENV) as servers, ThreadPoolExecutor(max_workers=2) as pool:
        done = pool.map(lambda p: (p.values[0], _run_row(p, base, llama_dir, servers)), rows)
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
    assert not any(name.endswith("metrics.jsonl") for name in results[rid]["outputs"])  # no step
    if cmd[: len(DATA)] == DATA:  # a refused data command writes nothing at all
        assert not results[rid]["outputs"], f"written: {results[rid]['outputs']}"


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
    line = (
        f"{len(ROWS)} bad inputs: {clear} clear errors, {tracebacks} tracebacks, {changed} inputs "
        f"changed; {len(ACCEPTED)} odd but valid inputs read"
    )
    with capsys.disabled():
        print("\n" + line)
    assert clear == len(ROWS) and tracebacks == 0 and changed == 0


# -- in-process checks of what the table cannot show ------------------------------------------


def test_in_place_replaces_the_input_atomically(tmp_path):
    src = tmp_path / "a.json"
    src.write_bytes(js([{"instruction": "Say hi", "output": "Hi"}]))
    res = subprocess.run(
        [*DATA, "convert", "--data", src, "--out", src, "--in_place"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
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
        (
            {"bf16": {"enabled": True}},
            [],
            "bf16.enabled is True but the command line says --bf16 False",
        ),
        (
            {"train_micro_batch_size_per_gpu": 3},
            ["--per_device_train_batch_size", "4"],
            "train_micro_batch_size_per_gpu is 3 but the command line says 4",
        ),
        (
            {"gradient_accumulation_steps": 8},
            ["--gradient_accumulation_steps", "2"],
            "gradient_accumulation_steps is 8 but the command line says 2",
        ),
    ],
)
def test_deepspeed_json_that_contradicts_the_command_line(tmp_path, ds, args, expect):
    """In-process: a single-process ZeRO run reaches this check too (by hand, --strategy zero2
    --deepspeed FILE exits 2 with this line), but only after ~30 s of start-up."""
    from recipes.core.config import ConfigError, load_config
    from recipes.core.ds_config import deepspeed_config
    from recipes.core.recipe import TrainConfig

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **ds}))
    cfg, _ = load_config(["--deepspeed", str(path), *args], TrainConfig)
    assert cfg.strategy == "zero2"
    with pytest.raises(ConfigError, match=expect):
        deepspeed_config(cfg)


def test_outputs_that_are_not_plain_files(tmp_path):
    """A FIFO --out is streamed into (a reader gets the records), a symlink --out is written
    through (the link stays), and --out 2024 is a file called 2024, not a number."""
    src = tmp_path / "a.json"
    src.write_bytes(GOOD_JSON)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = {}
    with ThreadPoolExecutor(max_workers=1) as pool:
        reader = pool.submit(lambda: fifo.read_bytes())
        res = subprocess.run([*data(f"convert {src} {fifo}")], capture_output=True, text=True)
        got["fifo"] = reader.result(timeout=60)
    assert res.returncode == 0, res.stderr
    assert len(json.loads(got["fifo"])) == 2 and stat.S_ISFIFO(fifo.lstat().st_mode)
    link, target = tmp_path / "link.json", tmp_path / "target.json"
    link.symlink_to(target.name)
    res = subprocess.run([*data(f"convert {src} {link}")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert link.is_symlink() and len(json.loads(target.read_text())) == 2
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([*data(f"convert {src} --out 2024")], cwd=tmp_path, env=env)
    assert res.returncode == 0 and len(json.loads((tmp_path / "2024").read_text())) == 2


def test_a_refused_command_leaves_an_existing_output_alone(tmp_path):
    """A misspelt flag used to be found after the output was written with the defaults."""
    src, out = tmp_path / "a.json", tmp_path / "o.json"
    src.write_bytes(GOOD_JSON)
    out.write_text("previous")
    res = subprocess.run([*data(f"convert {src} {out} --too messages")], capture_output=True)
    assert res.returncode == 2 and out.read_text() == "previous"
