"""Readers, converters and bad input."""

from __future__ import annotations

import json

import pytest
from records import sharegpt, sharegpt_turns

from fastchat_data import commands
from fastchat_data.formats import iter_conversations, to_messages, to_sharegpt
from fastchat_data.io import read_records
from fastchat_data.report import Report
from fastchat_data.schema import ASSISTANT, SYSTEM, TOOL, USER, DataError, SkipRecord, validate


def write(tmp_path, name, obj, lines=False):
    p = tmp_path / name
    p.write_text(
        "\n".join(json.dumps(o) for o in obj) if lines else json.dumps(obj), encoding="utf-8"
    )
    return p


def read(path, fmt=None, strict=False):
    rep = Report("t", strict=strict)
    return [c for _, c in iter_conversations(path, rep, fmt)], rep


def test_alpaca_follows_fastchat_rule_history_and_system(tmp_path):
    p = write(
        tmp_path,
        "a.json",
        [
            {"instruction": "Add", "input": "2 and 3", "output": "5"},
            {
                "instruction": "Hi",
                "input": "",
                "output": "Hello",
                "system": "Be brief.",
                "history": [["q1", "a1"], ["q2", "a2"]],
            },
        ],
    )
    convs, rep = read(p)
    assert rep.notes["format"] == "alpaca"
    assert [(m.role, m.content) for m in convs[0].messages] == [
        (USER, "Add\nInput:\n2 and 3"),
        (ASSISTANT, "5"),
    ]
    c = convs[1]
    assert c.system == "Be brief."
    assert [m.content for m in c.messages] == ["q1", "a1", "q2", "a2", "Hi", "Hello"]
    assert to_sharegpt(c)["system"] == "Be brief."


def test_sharegpt_aliases_system_turn_and_tools(tmp_path):
    p = write(
        tmp_path,
        "s.jsonl",
        [
            {
                "id": "x",
                "conversations": [
                    {"from": "system", "value": "S"},
                    {"from": "user", "value": "u"},
                    {"from": "assistant", "value": "a"},
                ],
            },
            sharegpt_turns(
                ("human", "h"),
                ("function_call", "{}"),
                ("observation", "r"),
                ("gpt", "g"),
                tools="[]",
            ),
        ],
        lines=True,
    )
    convs, rep = read(p)
    assert rep.read == 2 and rep.dropped_total == 0
    assert convs[0].id == "x" and convs[0].system == "S"
    assert [m.role for m in convs[1].messages] == [USER, ASSISTANT, TOOL, ASSISTANT]
    assert convs[1].id == "s_1" and "tools" in convs[1].system
    validate(convs[1])


def test_messages_round_trip(tmp_path):
    rec = {
        "id": "m",
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": [{"type": "text", "text": "a"}]},
        ],
    }
    convs, _ = read(write(tmp_path, "m.json", [rec]))
    out = to_messages(convs[0])
    assert out["messages"][0] == {"role": SYSTEM, "content": "sys"}
    assert out["messages"][2] == {"role": ASSISTANT, "content": "a"}
    again, _ = read(write(tmp_path, "m2.json", [out]))
    assert to_messages(again[0]) == out


def test_human_assistant_text(data_dir):
    convs, rep = read(data_dir / "oasst1_val_qlora_953.jsonl")
    assert rep.read == 953 and len(convs) == 953
    for c in convs:
        validate(c)


def test_malformed_json_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2 column \d+: malformed JSON"):
        list(read_records(p))
    q = tmp_path / "bad.json"
    q.write_text('[{"instruction": "a",\n "output": }]')
    with pytest.raises(DataError, match=r"bad.json: line 2 column \d+"):
        list(read_records(q))


def test_bad_records_are_counted_with_reasons_or_raised_under_strict(tmp_path):
    p = write(
        tmp_path,
        "s.json",
        [
            sharegpt("q", "a"),
            sharegpt_turns(("narrator", "q")),
            sharegpt(3, "a"),
            sharegpt_turns(("human", "q"), ("human", "q")),
            sharegpt("q", "  "),
            "not an object",
        ],
    )
    rep = Report("t")
    from fastchat_data.build import read_trainable

    kept = list(read_trainable([str(p)], rep))
    assert len(kept) == 1 and rep.read == 6
    assert rep.dropped == {
        "unknown_role": 1,
        "non_string_value": 1,
        "broken_alternation": 1,
        "empty_value": 1,
        "malformed_record": 1,
    }
    assert (
        "record 1" in rep.examples["unknown_role"][0]
        and "narrator" in rep.examples["unknown_role"][0]
    )
    with pytest.raises(DataError, match=r"s.json: record 1: unknown_role"):
        list(read_trainable([str(p)], Report("t", strict=True)))


def test_unknown_format_is_a_clear_error(tmp_path):
    p = write(tmp_path, "x.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="cannot tell the format.*--fmt"):
        read(p)


def test_validate_rules():
    from fastchat_data.schema import Conversation, Message

    with pytest.raises(SkipRecord, match="no_final_assistant_turn"):
        validate(Conversation("x", [Message(USER, "q")]))
    with pytest.raises(SkipRecord, match="no_turns"):
        validate(Conversation("x", []))


def test_all_alpaca_records_convert(tmp_path, data_dir):
    out = tmp_path / "alpaca_sharegpt.jsonl"
    rep = commands.convert(str(data_dir / "alpaca_data.json"), str(out))
    assert rep.read == rep.written == 52_002
    assert rep.notes["kept_but_untrainable"] == {
        "empty_value": 28
    }  # 28 records have an empty output
    rows = [json.loads(line) for line in out.open()]
    assert len(rows) == 52_002
    src = json.loads((data_dir / "alpaca_data.json").read_text())
    with_input = [i for i, r in enumerate(src) if r["input"].strip()]
    assert len(with_input) == 20_679
    i = with_input[0]
    assert (
        rows[i]["conversations"][0]["value"]
        == src[i]["instruction"] + "\nInput:\n" + src[i]["input"]
    )
    assert rows[i]["conversations"][1] == {"from": "gpt", "value": src[i]["output"]}


def test_convert_to_messages_and_back(tmp_path, data_dir):
    out = tmp_path / "m.jsonl"
    commands.convert(str(data_dir / "fastchat_dummy_conversation.json"), str(out), to="messages")
    back = tmp_path / "s.json"
    commands.convert(str(out), str(back))
    orig = json.loads((data_dir / "fastchat_dummy_conversation.json").read_text())
    assert [r["conversations"] for r in json.loads(back.read_text())] == [
        r["conversations"] for r in orig
    ]


def test_outputs_are_atomic(tmp_path, monkeypatch):
    from fastchat_data import io

    target = tmp_path / "out.jsonl"
    target.write_text("previous complete file\n")

    def boom():
        yield {"a": 1}
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        io.write_records(target, boom())
    assert target.read_text() == "previous complete file\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_split_sample_merge(tmp_path, data_dir):
    src = str(data_dir / "fastchat_dummy_conversation.json")
    tr, te = tmp_path / "tr.jsonl", tmp_path / "te.jsonl"
    commands.split(src, str(tr), str(te), test_size=0.1, seed=3)
    ids_tr = [json.loads(x)["id"] for x in tr.open()]
    ids_te = [json.loads(x)["id"] for x in te.open()]
    assert len(ids_te) == 50 and len(ids_tr) == 450 and not set(ids_tr) & set(ids_te)
    commands.split(
        src, str(tmp_path / "tr2.jsonl"), str(tmp_path / "te2.jsonl"), test_size=0.1, seed=3
    )
    assert (tmp_path / "te2.jsonl").read_text() == te.read_text()
    commands.sample(src, str(tmp_path / "s.jsonl"), n=20, seed=1)
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 20
    rep = commands.merge(f"{tr},{te}", str(tmp_path / "all.jsonl"))
    assert rep.written == 500 and rep.notes["duplicate_ids"] == 0


def test_reader_takes_a_bom_and_a_pretty_printed_data_object(tmp_path):
    rec = {"instruction": "a", "output": "b"}
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps([rec]).encode())
    assert list(read_records(bom)) == [("record 0", rec)]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [rec, rec]}, indent=2))
    assert [r for _, r in read_records(wrapped)] == [rec, rec]


def test_reader_names_the_line_of_bytes_that_are_not_utf8(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(
        b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n'
    )
    with pytest.raises(DataError, match=r"x.jsonl: line 2 byte 21: not valid UTF-8 \(byte 0xe9\)"):
        list(read_records(p))
    p.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xe6\x97')
    with pytest.raises(DataError, match="line 2 byte 18: the file ends in the middle of a UTF-8"):
        list(read_records(p))


def test_reports_describe_each_input_and_every_lossy_conversion(tmp_path, data_dir):
    glaive, alpaca = data_dir / "glaive_toolcall_en_300_sharegpt.json", tmp_path / "a.jsonl"
    alpaca.write_text(json.dumps({"instruction": "Add", "input": "2, 3", "output": "5", "x": 1}))
    rep = commands.merge(f"{glaive},{alpaca}", str(tmp_path / "m.json"), to="messages")
    assert rep.inputs == [
        {"path": str(glaive), "format": "sharegpt", "records": 300},
        {"path": str(alpaca), "format": "alpaca", "records": 1},
    ]
    assert rep.notes["format"] == "mixed (see inputs)"
    tools = "'tools' -> system prompt text (after 'You have access to the following tools:')"
    calls = "'function_call' turns -> assistant replies (the call becomes reply text)"
    assert rep.converted == {
        tools: 300,
        calls: 153,
        "'instruction' + 'input' -> one user turn": 1,
        "field 'x' -> dropped": 1,
    }
    text = rep.format()
    assert f"input {glaive}: sharegpt, 300 records" in text and f"converted {calls}: in 153" in text
    assert "dropped fields no output format keeps (records): field 'x' (1)" in text


def test_sample_reports_the_sample(tmp_path):
    src = write(tmp_path, "s.json", [sharegpt("q", "a"), sharegpt_turns(("gpt", "leading reply"))])
    rep = commands.sample(str(src), str(tmp_path / "o.json"), n=1, seed=0)
    picked = json.loads((tmp_path / "o.json").read_text())[0]
    untrainable = picked["conversations"][0]["from"] == "gpt"
    assert rep.notes.get("kept_but_untrainable") == (
        {"broken_alternation": 1} if untrainable else None
    )
    assert "asked" not in rep.notes
    rep = commands.sample(str(src), str(tmp_path / "o.json"), n=9)
    assert rep.written == 2 and rep.notes["asked"] == (
        "asked for 9, the input has 2 usable records: wrote 2"
    )


def test_a_turn_without_a_role_key_is_named_as_missing(tmp_path):
    """A messages turn written ShareGPT's way ("from") names the key it lacks, not 'role None';
    a role that is there but null is still an unknown role."""
    records = [
        {"messages": [{"from": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": None, "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    rep = Report("t")
    kept = list(iter_conversations(str(write(tmp_path, "m.json", records)), rep))
    assert len(kept) == 1 and rep.dropped == {"missing_field": 1, "unknown_role": 1}
    assert rep.examples["missing_field"][0].endswith("record 0: message 0 has no 'role'")
    shared = write(tmp_path, "s.json", [{"conversations": [{"value": "q"}]}, sharegpt("q", "a")])
    rep = Report("t")
    assert len(list(iter_conversations(str(shared), rep))) == 1
    assert rep.examples["missing_field"][0].endswith("turn 0 has no 'from' or 'role'")
