"""The streaming JSON reader (fastchat_data/jsonfile.py): the records json.loads would give,
syntax errors at json.loads' line and column, across block boundaries, and a bad file stopped
after a bounded read, not read whole."""

from __future__ import annotations

import json
import random
import re

import pytest

from fastchat_data import jsonfile
from fastchat_data.io import read_records
from fastchat_data.schema import DataError

REC = {"instruction": "Give three tips.", "input": "", "output": "Eat well. Sleep. Move."}


def _text(rng: random.Random) -> str:
    pieces = ["a", "é", "日本", "😀", "\n", '"', "\\", " ", "\u2028"]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 20)))


def _record(rng: random.Random) -> dict:
    extra = rng.choice([1, -2.5e10, None, True, [1, [2, {"x": "y"}]], {"k": _text(rng)}])
    return {"instruction": _text(rng), "extra": extra, "output": _text(rng)}


@pytest.mark.parametrize("block", [1, 2, 3, 7, 64, 4096])
def test_records_equal_json_loads_across_block_boundaries(tmp_path, monkeypatch, block):
    monkeypatch.setattr(jsonfile, "BLOCK", block)
    rng = random.Random(block)
    for trial in range(30):
        recs = [_record(rng) for _ in range(rng.randint(1, 12))]
        shape = trial % 4
        path = tmp_path / ("r.jsonl" if shape == 3 else "r.json")
        ascii_only = rng.random() < 0.5
        if shape == 0:
            text = json.dumps(recs, ensure_ascii=ascii_only)
        elif shape == 1:
            text = json.dumps(recs, indent=2, ensure_ascii=ascii_only)
        elif shape == 2:
            text = json.dumps({"meta": [1, {"a": 2}], "data": recs}, indent=1, ensure_ascii=False)
        else:
            text = "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in recs)
        path.write_text(text, encoding="utf-8")
        assert [r for _, r in read_records(path)] == recs


@pytest.mark.parametrize("block", [3, 64, 1 << 20])
def test_syntax_errors_are_where_json_loads_puts_them(tmp_path, monkeypatch, block):
    monkeypatch.setattr(jsonfile, "BLOCK", block)
    rng = random.Random(0)
    text = json.dumps([_record(rng) for _ in range(40)], indent=2, ensure_ascii=False)
    for cut in rng.sample(range(1, len(text) - 1), 40):
        broken = text[:cut] + "}" + text[cut + 1 :]
        try:
            json.loads(broken)
        except json.JSONDecodeError as e:
            expected = f"line {e.lineno} column {e.colno}"
        else:
            continue
        path = tmp_path / "b.json"
        path.write_text(broken, encoding="utf-8")
        with pytest.raises(DataError) as got:
            list(read_records(path))
        message = str(got.value)
        # the same place; past the array's end the message says "extra data" instead
        assert expected in message or "after" in message, (message, expected)


def test_a_newline_free_file_is_not_read_whole(tmp_path, monkeypatch):
    """Garbage fails in its first block; a record (or a JSON Lines line) that runs on fails
    after MAX_RECORD_BYTES, not at the end of the file."""
    monkeypatch.setattr(jsonfile, "BLOCK", 1 << 16)
    monkeypatch.setattr(jsonfile, "MAX_RECORD_BYTES", 1 << 18)
    read = []
    real = jsonfile._Source.read

    def counted(self):
        block = real(self)
        read.append(len(block))
        return block

    monkeypatch.setattr(jsonfile._Source, "read", counted)
    size = 16 << 20
    cases = {
        "garbage.json": (b"x" * size, "line 1 column 1: malformed JSON: Expecting value"),
        "endless.json": (b'[{"instruction": "' + b"a" * size, "runs past"),
        "endless.jsonl": (b'{"instruction": "' + b"a" * size, "without an end of line"),
        "endless_object.json": (b'{"instruction": "' + b"a" * size, "runs past"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        read.clear()
        with pytest.raises(DataError, match=message):
            list(read_records(path))
        assert sum(read) < 4 * jsonfile.MAX_RECORD_BYTES, (name, sum(read))


def test_records_are_handed_out_before_the_file_is_read(tmp_path, monkeypatch):
    """The first record of a large array comes after one block, not after the whole file."""
    monkeypatch.setattr(jsonfile, "BLOCK", 1 << 12)
    path = tmp_path / "big.json"
    path.write_text(json.dumps([REC] * 20_000))
    reader = read_records(path)
    assert next(reader) == ("record 0", REC)
    assert reader.gi_frame.f_locals["f"].tell() <= 2 * (1 << 12)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"null", "found null"),
        (b"42", "found a single JSON number (42)"),
        (b"[]", "is an empty JSON array: no records"),
        (b" {}\n", "holds one empty JSON object: no records"),
        (b'"text"', "found a single JSON string ('text')"),
        (b'{\n "conversations": []\n}', "found one JSON object (keys: conversations)"),
        (json.dumps([REC]).encode() + b" x", "extra data after the JSON array at line 1 column"),
        (json.dumps([REC]).encode()[:-1], "the array ends after record 0 without ']'"),
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (b'[{"a": "\\udc00"}]', "holds an unpaired surrogate escape \\udc00"),
        (b"\xff\xfe[\x00]\x00", "is UTF-16 text"),
        (b'[{"a": "caf\xe9"}]', "line 1 byte 12: not valid UTF-8 (byte 0xe9)"),
    ],
)
def test_files_that_hold_no_records_are_refused(tmp_path, content, message):
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(message)):
        list(read_records(path))


def test_odd_but_valid_layouts(tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps(REC))  # one record on one line: JSON Lines of one record
    assert list(read_records(one)) == [("line 1", REC)]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 2, "data": [REC, REC]}))
    assert [r for _, r in read_records(wrapped)] == [REC, REC]
    blank_first = tmp_path / "blank.json"
    blank_first.write_text("\n\n" + json.dumps(REC) + "\n" + json.dumps(REC) + "\n")
    assert [w for w, _ in read_records(blank_first)] == ["line 3", "line 4"]
