"""Readers (Alpaca, ShareGPT, OpenAI messages, "### Human:" text) and writers (ShareGPT, messages).

Each reader maps one raw record to a Conversation, or raises SkipRecord with a reason.
Readers check structure only; `schema.validate` checks that a conversation is trainable.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .io import read_records
from .report import Report
from .schema import ASSISTANT, SYSTEM, TOOL, USER, Conversation, DataError, Message, SkipRecord

# ShareGPT "from" and OpenAI "role" names, with the aliases found in the wild.
ROLE_ALIASES = {
    **dict.fromkeys(("human", "user"), USER),
    **dict.fromkeys(("gpt", "assistant", "chatgpt", "bard", "bing", "model"), ASSISTANT),
    "function_call": ASSISTANT,
    "system": SYSTEM,
    **dict.fromkeys(("observation", "tool", "function", "ipython"), TOOL),
}
TOOLS_PREAMBLE = "You have access to the following tools:\n"
FORMATS = ("alpaca", "sharegpt", "messages", "human_assistant_text")
Format = Literal["alpaca", "sharegpt", "messages", "human_assistant_text"]
# role names kept as they are (a writer gives them back): any other alias loses something
CANONICAL_ROLES = {"human", "user", "gpt", "assistant", "system", "observation", "tool"}
TURN_FIELDS = {"from", "value", "role", "content"}
# the record fields each reader uses; any other is dropped (and reported)
FIELDS = {
    "alpaca": {"instruction", "input", "output", "history", "system", "id"},
    "sharegpt": {"conversations", "id", "system", "tools", "model", "lang"},
    "messages": {"messages", "id"},
    "human_assistant_text": {"input", "output", "id", "lang"},
}


def _text(value, what: str, converted: set | None = None) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        raise SkipRecord("missing_field", f"{what} is missing")
    # OpenAI content parts: [{"type": "text", "text": ...}, ...]
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" for p in value
    ):
        if converted is not None and len(value) != 1:
            converted.add("content parts -> one text")
        return "".join(str(p.get("text", "")) for p in value)
    raise SkipRecord("non_string_value", f"{what} is {type(value).__name__}, not a string")


def _not_a_list(key: str, value) -> str:
    return (
        f"'{key}' is missing"
        if value is None
        else f"'{key}' is a {type(value).__name__}, not a list"
    )


def _role(name, what: str, converted: set | None = None) -> str:
    role = ROLE_ALIASES.get(name.lower()) if isinstance(name, str) else None
    if role is None:
        raise SkipRecord("unknown_role", f"{what} has role {name!r}")
    if converted is not None and name.lower() not in CANONICAL_ROLES:
        becomes = "assistant replies" if role == ASSISTANT else f"{role} turns"
        how = " (the call becomes reply text)" if name.lower() == "function_call" else ""
        converted.add(f"'{name}' turns -> {becomes}{how}")
    return role


def _with_tools(system: str, tools, converted: set | None = None) -> str:
    if not tools:
        return system
    if converted is not None:
        converted.add(f"'tools' -> system prompt text (after {TOOLS_PREAMBLE.strip()!r})")
    tools = tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)
    return (system + "\n\n" if system else "") + TOOLS_PREAMBLE + tools


def _from_turns(
    rid: str,
    turns: list[tuple[str, str]],
    system: str,
    *,
    extra: dict,
    converted: set | None = None,
) -> Conversation:
    """Turns as (role, text): a leading system turn becomes the system prompt."""
    if turns and turns[0][0] == SYSTEM:
        system = (system + "\n\n" if system else "") + turns[0][1]
        turns = turns[1:]
    for i, (role, _) in enumerate(turns):
        if role == SYSTEM:
            raise SkipRecord("misplaced_system_turn", f"turn {i} is a system turn after the first")
    return Conversation(
        id=rid,
        messages=[Message(r, t) for r, t in turns],
        system=system,
        extra=extra,
        converted=converted if converted is not None else set(),
    )


def _turn_fields(turn: dict, converted: set) -> None:
    for key in turn.keys() - TURN_FIELDS:
        converted.add(f"turn field {key!r} -> dropped")


@dataclass(frozen=True)
class TurnList:
    """Where a format keeps its turns: the list `field` of turn objects, each turn's role and
    text under the first of `role_keys` / `text_keys` it holds, and the words errors use."""

    field: str
    noun: str
    role_keys: tuple[str, ...]
    text_keys: tuple[str, ...]


# ShareGPT dumps in the wild also spell their turns OpenAI's way ("role", "content").
SHAREGPT_TURNS = TurnList("conversations", "turn", ("from", "role"), ("value", "content"))
MESSAGES_TURNS = TurnList("messages", "message", ("role",), ("content",))


def _first(turn: dict, keys: tuple[str, ...]):
    return next((turn[k] for k in keys if k in turn), None)


def _turns(rec: dict, layout: TurnList) -> tuple[list, set]:
    """The (role, text) turns of `rec`, laid out as `layout` says, and what was converted on the
    way: ShareGPT's 'conversations' and OpenAI's 'messages' are read by this one loop."""
    items = rec.get(layout.field)
    if not isinstance(items, list):
        raise SkipRecord("malformed_record", _not_a_list(layout.field, items))
    turns, converted = [], set()
    for i, t in enumerate(items):
        what = f"{layout.noun} {i}"
        if not isinstance(t, dict):
            raise SkipRecord("malformed_record", f"{what} is not an object")
        if not any(k in t for k in layout.role_keys):  # a messages turn with ShareGPT's "from"
            keys = " or ".join(repr(k) for k in layout.role_keys)
            raise SkipRecord("missing_field", f"{what} has no {keys}")
        text = _text(_first(t, layout.text_keys), f"{what} {layout.text_keys[0]}", converted)
        turns.append((_role(_first(t, layout.role_keys), what, converted), text))
        _turn_fields(t, converted)
    return turns, converted


def parse_sharegpt(rec: dict, rid: str) -> Conversation:
    turns, converted = _turns(rec, SHAREGPT_TURNS)
    system = _with_tools(_text(rec.get("system") or "", "system"), rec.get("tools"), converted)
    extra = {k: rec[k] for k in ("model", "lang") if k in rec}
    return _from_turns(str(rec.get("id", rid)), turns, system, extra=extra, converted=converted)


def parse_messages(rec: dict, rid: str) -> Conversation:
    turns, converted = _turns(rec, MESSAGES_TURNS)
    return _from_turns(str(rec.get("id", rid)), turns, "", extra={}, converted=converted)


def alpaca_prompt(instruction: str, inp: str) -> str:
    # FastChat's rule (data/convert_alpaca.py); FastChat tests len(input.strip()) > 1, which
    # silently drops one-character inputs such as "5": we keep any non-blank input.
    return instruction + "\nInput:\n" + inp if inp.strip() else instruction


def parse_alpaca(rec: dict, rid: str) -> Conversation:
    instruction = _text(rec.get("instruction"), "instruction")
    inp = _text(rec.get("input") or "", "input")
    output = _text(rec.get("output"), "output")
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise SkipRecord("malformed_record", "'history' is not a list")
    turns = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise SkipRecord("malformed_record", f"history[{i}] is not a [question, answer] pair")
        turns += [
            (USER, _text(pair[0], f"history[{i}][0]")),
            (ASSISTANT, _text(pair[1], f"history[{i}][1]")),
        ]
    turns += [(USER, alpaca_prompt(instruction, inp)), (ASSISTANT, output)]
    system = _text(rec.get("system") or "", "system")
    converted = {"'instruction' + 'input' -> one user turn"} if inp.strip() else set()
    return _from_turns(str(rec.get("id", rid)), turns, system, extra={}, converted=converted)


_HA_SPLIT = re.compile(r"###\s*(Human|Assistant):\s?")


def parse_human_assistant_text(rec: dict, rid: str) -> Conversation:
    """`{"input": "### Human: q ### Assistant:", "output": a}`, as in the QLoRA / oasst1 eval
    files."""
    prompt = _text(rec.get("input"), "input")
    output = _text(rec.get("output"), "output")
    parts = _HA_SPLIT.split(prompt)
    if parts[0].strip():
        raise SkipRecord("malformed_record", "text before the first '### Human:' marker")
    turns = []
    for who, text in zip(parts[1::2], parts[2::2]):
        turns.append((USER if who == "Human" else ASSISTANT, text.strip()))
    if not turns or turns[-1] != (ASSISTANT, ""):
        raise SkipRecord("malformed_record", "input does not end with '### Assistant:'")
    turns[-1] = (ASSISTANT, output)
    return _from_turns(
        str(rec.get("id", rid)), turns, "", extra={"lang": rec["lang"]} if "lang" in rec else {}
    )


PARSERS = {
    "alpaca": parse_alpaca,
    "sharegpt": parse_sharegpt,
    "messages": parse_messages,
    "human_assistant_text": parse_human_assistant_text,
}


def check_format(fmt: str | None) -> None:
    """A DataError unless `fmt` (a Python caller's; the command line checks its choices) is
    one of FORMATS or None."""
    if fmt is not None and fmt not in PARSERS:
        raise DataError(
            "--fmt", "value", f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}"
        )


def detect_format(rec) -> str | None:
    if not isinstance(rec, dict):
        return None
    if "conversations" in rec:
        return "sharegpt"
    if "messages" in rec:
        return "messages"
    if "instruction" in rec:
        return "alpaca"
    if "input" in rec and "output" in rec and "### Human:" in str(rec["input"]):
        return "human_assistant_text"
    return None


def iter_parsed(
    path: str, report: Report, parsers: dict, *, fmt: str | None, detect, unknown, fields: dict
) -> Iterator:
    """Yield (where, parsed) for each readable record of `path`, parsed by `parsers[fmt]`, or by
    the parser `detect(first record)` names; count the rest in `report`, and the input file,
    its format and records in `report.inputs`. `unknown(record)` is the message for a first
    record no parser fits; `fields[fmt]` are the record fields the parser uses (any other is
    reported as dropped)."""
    stem = Path(path).stem
    parser = parsers.get(fmt) if fmt else None
    entry = report.input_file(path)
    if fmt:
        report.set_format(entry, fmt)
    for index, (where, rec) in enumerate(read_records(path)):
        report.read += 1
        entry["records"] += 1
        try:
            if not isinstance(rec, dict):
                raise SkipRecord("malformed_record", f"a {type(rec).__name__}, not an object")
            if parser is None:
                fmt = detect(rec)
                if fmt is None:
                    raise DataError(path, where, unknown(rec))
                parser = parsers[fmt]
                report.set_format(entry, fmt)
            parsed = parser(rec, f"{stem}_{index}")
        except SkipRecord as e:
            report.skip(path, where, e)
            continue
        for key in rec.keys() - fields[fmt]:
            parsed.converted.add(f"field {key!r} -> dropped")
        report.converted.update(parsed.converted)
        yield where, parsed


def iter_conversations(
    path: str | os.PathLike, report: Report, fmt: str | None = None
) -> Iterator[tuple[str, Conversation]]:
    """Yield (where, Conversation) for each readable record of `path`; count the rest in
    `report`."""
    check_format(fmt)

    def unknown(rec) -> str:
        return f"cannot tell the format from keys {sorted(rec)}; name it with --fmt"

    yield from iter_parsed(
        str(path), report, PARSERS, fmt=fmt, detect=detect_format, unknown=unknown, fields=FIELDS
    )


SHAREGPT_NAMES = {USER: "human", ASSISTANT: "gpt", TOOL: "observation"}


def to_sharegpt(conv: Conversation) -> dict:
    out = {"id": conv.id, **conv.extra}  # keeps e.g. `lang` and `model` through clean / split
    if conv.system:
        out["system"] = conv.system  # top-level, as LLaMA-Factory does; FastChat ignores it
    out["conversations"] = [
        {"from": SHAREGPT_NAMES[m.role], "value": m.content} for m in conv.messages
    ]
    return out


def to_messages(conv: Conversation) -> dict:
    msgs = [{"role": SYSTEM, "content": conv.system}] if conv.system else []
    msgs += [{"role": m.role, "content": m.content} for m in conv.messages]
    return {"id": conv.id, "messages": msgs}


WRITERS = {"sharegpt": to_sharegpt, "messages": to_messages}
