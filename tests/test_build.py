"""Building the training set: datasets on disk, the cache, parallelism, reports."""

from __future__ import annotations

import functools
import json
import time

import datasets
import pytest

from fastchat_data.build import build_dataset
from fastchat_data.tokenize import IGNORE_INDEX


def test_build_rows_cache_and_out(tmp_path, llama_dir, data_dir):
    src = str(data_dir / "fastchat_dummy_conversation.json")
    cache = tmp_path / "cache"
    ds, rep = build_dataset(
        src,
        str(llama_dir),
        "vicuna_v1.1",
        max_length=512,
        out=str(tmp_path / "train"),
        cache_dir=str(cache),
    )
    assert rep.read == 500 and rep.written == len(ds) == 500 and rep.dropped_total == 0
    assert set(ds.column_names) == {"id", "input_ids", "labels", "length"}
    row = ds[0]
    assert row["length"] == len(row["input_ids"]) == len(row["labels"])
    assert any(x != IGNORE_INDEX for x in row["labels"])
    assert rep.notes["cache"].startswith("built")
    again = datasets.load_from_disk(str(tmp_path / "train"))
    assert again["input_ids"] == ds["input_ids"]
    assert json.loads((tmp_path / "train" / "report.json").read_text())["written"] == 500

    t0 = time.perf_counter()
    ds2, rep2 = build_dataset(
        src, str(llama_dir), "vicuna_v1.1", max_length=512, cache_dir=str(cache)
    )
    assert time.perf_counter() - t0 < 2.0  # no re-tokenization: loaded from Arrow
    assert rep2.notes["cache"].startswith("hit") and ds2["labels"] == ds["labels"]
    _, rep3 = build_dataset(
        src, str(llama_dir), "vicuna_v1.1", max_length=256, cache_dir=str(cache)
    )
    assert rep3.notes["cache"].startswith("built")  # another max_length is another key


def test_parallel_build_matches_serial(tmp_path, chatml_dir, data_dir):
    src = str(data_dir / "sharegpt_gpt4_zh_1k.jsonl")
    build = functools.partial(build_dataset, src, str(chatml_dir), "chat_template", max_length=1024)
    serial, rep1 = build(cache_dir=str(tmp_path / "a"))
    parallel, rep2 = build(cache_dir=str(tmp_path / "b"), num_proc=2)
    assert serial["input_ids"] == parallel["input_ids"] and serial["labels"] == parallel["labels"]
    assert rep1.to_dict()["dropped"] == rep2.to_dict()["dropped"]
    assert rep1.truncated == rep2.truncated > 0
    assert rep1.read == rep1.written + rep1.dropped_total


def test_bad_records_reported_in_build(tmp_path, llama_dir):
    src = tmp_path / "d.json"
    src.write_text(
        json.dumps(
            [
                {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
                {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
            ]
        )
    )
    report_path = tmp_path / "report.json"
    ds, rep = build_dataset(
        str(src), str(llama_dir), cache_dir=str(tmp_path / "c"), report_path=str(report_path)
    )
    assert len(ds) == 1 and rep.dropped == {"broken_alternation": 1}
    saved = json.loads(report_path.read_text())
    assert saved["read"] == 2 and saved["dropped"] == {"broken_alternation": 1}
    from fastchat_data.schema import DataError

    with pytest.raises(DataError, match=r"d.json: record 1: broken_alternation"):
        build_dataset(str(src), str(llama_dir), cache_dir=str(tmp_path / "c"), strict=True)


def test_missing_inputs_are_clear_errors(tmp_path, llama_dir):
    from fastchat_data.schema import DataError

    with pytest.raises(DataError, match="nope.json: file: does not exist"):
        build_dataset(str(tmp_path / "nope.json"), str(llama_dir), cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="no-tokenizer: --tokenizer: does not exist"):
        build_dataset(
            str(tmp_path / "nope.json"), str(tmp_path / "no-tokenizer"), cache_dir=str(tmp_path)
        )


def test_a_damaged_cache_is_named_and_built_again(tmp_path, llama_dir, data_dir, capsys):
    """A cached set cut short (a full disk, a killed copy) or missing a file is never loaded
    into training nor a traceback: the build says which cache and rebuilds it."""
    src, cache = str(data_dir / "fastchat_dummy_conversation.json"), str(tmp_path / "c")
    ds, _ = build_dataset(src, str(llama_dir), cache_dir=cache, quiet=True)
    expected = ds["input_ids"]
    del ds  # its memory map must not outlive the cut below (that would be a bus error)
    (arrow,) = (tmp_path / "c" / "datasets").glob("*/data-*.arrow")
    cut = arrow.read_bytes()[: arrow.stat().st_size // 2]
    arrow.unlink()  # a new file: any old mapping keeps the old one
    arrow.write_bytes(cut)
    again, rep = build_dataset(src, str(llama_dir), cache_dir=cache, quiet=True)
    assert "is damaged" in capsys.readouterr().err and rep.notes["cache"].startswith("built")
    assert again["input_ids"] == expected
    _, rep = build_dataset(src, str(llama_dir), cache_dir=cache, quiet=True)
    assert rep.notes["cache"].startswith("hit")
