"""Preference data (prompt, chosen reply, rejected reply) for DPO-style training.

Readers for the three common shapes, detected from the first record of each file (or named
with `fmt`):

- "pairs": `{prompt, chosen, rejected}` strings, optionally `system`; an Alpaca-style
  `{instruction, input, history?, chosen, rejected}` record reads the same way, its prompt made
  as SFT makes it. The prompt may also be a list of messages.
- "messages": UltraFeedback style, `chosen` and `rejected` as message lists
  (`[{role, content}, ...]`) that share the prompt messages; `prompt` may be a string or a
  message list, given apart or repeated at the head of both lists.
- "sharegpt": LLaMA-Factory's `{conversations, chosen, rejected}` with the replies as turn
  objects (`{"from": "gpt", "value": ...}`) or strings.

Each record becomes a PreferencePair: the prompt (messages ending in a user turn), the system
prompt, and the two replies. A record that cannot be one (a missing field, a wrong type, empty
or identical replies, a prompt that does not end in a user turn) is skipped and counted by
reason, or stops the command with a DataError under `strict`.

`build_preference_dataset` tokenizes each side as SFT does (the same template rendering and
ConversationTokenizer), checks that the prompt tokens of both sides are identical, trains only
on the final reply, and caches the result in Arrow like `build_dataset`.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from .build import TokenizedSet, check_tokenizer, raw_row, read_valid
from .formats import (
    SHAREGPT_NAMES,
    _from_turns,
    _role,
    _text,
    alpaca_prompt,
    iter_parsed,
    parse_alpaca,
    parse_sharegpt,
)
from .io import (
    check_inputs,
    check_outputs,
    read_records,
    write_records,
)
from .report import Report, nothing_trainable, refuse_empty
from .schema import (
    ASSISTANT,
    SYSTEM,
    TOOL,
    USER,
    Conversation,
    DataError,
    Message,
    SkipRecord,
    check_count,
    validate,
)
from .tokenize import IGNORE_INDEX, ConversationTokenizer

PREFERENCE_CACHE_VERSION = "1"  # bump when the preference encoding changes
PREFERENCE_COLUMNS = (
    "id",
    "chosen_input_ids",
    "chosen_labels",
    "rejected_input_ids",
    "rejected_labels",
    "chosen_length",
    "rejected_length",
    "prompt_length",
)
SHAPES = ("pairs", "messages", "sharegpt")
SIDES = ("chosen", "rejected")


@dataclass
class PreferencePair:
    """One prompt and two replies to it; `prompt` alternates user -> assistant and ends with a
    user turn (or a tool output, which stands on the user side)."""

    id: str
    system: str
    prompt: list[Message]
    chosen: str
    rejected: str
    extra: dict = field(default_factory=dict)
    # what the reader changed on the way in (see Conversation.converted)
    converted: set[str] = field(default_factory=set, compare=False, repr=False)

    def conversation(self, side: str) -> Conversation:
        """The prompt followed by the `side` ("chosen" or "rejected") reply, as SFT reads it."""
        if side not in SIDES:
            raise ValueError(f"side is 'chosen' or 'rejected', not {side!r}")
        reply = self.chosen if side == "chosen" else self.rejected
        return Conversation(
            id=self.id, messages=[*self.prompt, Message(ASSISTANT, reply)], system=self.system
        )


# -- readers ---------------------------------------------------------------------------------


def _reply(value, what: str) -> str:
    """A reply: a string, text parts, or one turn object `{"from": "gpt", "value": ...}`."""
    if isinstance(value, dict):
        who = value.get("from", value.get("role"))
        if who is not None and _role(who, what) != ASSISTANT:
            raise SkipRecord(
                "malformed_record", f"{what} is a {who!r} turn, not an assistant reply"
            )
        return _text(value.get("value", value.get("content")), f"{what} value")
    if (
        isinstance(value, list)
        and value
        and all(isinstance(t, dict) and "type" not in t for t in value)
    ):
        raise SkipRecord(
            "malformed_record", f"{what} is a list of turns; this file reads as shape 'pairs'"
        )
    return _text(value, what)


def _turns(value, what: str) -> list[tuple[str, str]]:
    """A message list (`role`/`content` or `from`/`value`) as (role, text) pairs."""
    if not isinstance(value, list):
        if value is None:
            raise SkipRecord("missing_field", f"{what} is missing")
        raise SkipRecord("malformed_record", f"{what} is a {type(value).__name__}, not a list")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise SkipRecord("malformed_record", f"{what}[{i}] is not an object")
        who = m.get("role", m.get("from"))
        out.append(
            (
                _role(who, f"{what}[{i}]"),
                _text(m.get("content", m.get("value")), f"{what}[{i}] content"),
            )
        )
    return out


def _prompt_turns(value, what: str = "prompt") -> list[tuple[str, str]]:
    if isinstance(value, list) and all(isinstance(m, dict) and "type" not in m for m in value):
        return _turns(value, what)
    return [(USER, _text(value, what))]


def _pair(conv: Conversation, chosen: str, rejected: str) -> PreferencePair:
    return PreferencePair(
        conv.id, conv.system, conv.messages, chosen, rejected, conv.extra, conv.converted
    )


def parse_pair_strings(rec: dict, rid: str) -> PreferencePair:
    """`{prompt, chosen, rejected, system?}` or `{instruction, input?, history?, chosen,
    rejected}`."""
    chosen, rejected = _reply(rec.get("chosen"), "chosen"), _reply(rec.get("rejected"), "rejected")
    if "prompt" not in rec and "instruction" in rec:
        conv = parse_alpaca({**rec, "output": ""}, rid)  # the SFT prompt; its empty reply dropped
        conv.messages = conv.messages[:-1]
        return _pair(conv, chosen, rejected)
    system = _text(rec.get("system") or "", "system")
    conv = _from_turns(str(rec.get("id", rid)), _prompt_turns(rec.get("prompt")), system, extra={})
    return _pair(conv, chosen, rejected)


def parse_pair_messages(rec: dict, rid: str) -> PreferencePair:
    """`chosen` / `rejected` message lists ending in the reply; the prompt is `prompt` (a string or
    messages), the messages both lists share before their reply, or both."""
    prompt = _prompt_turns(rec["prompt"]) if rec.get("prompt") is not None else []
    system = _text(rec.get("system") or "", "system")
    rid = str(rec.get("id", rid))
    sides = []
    for side in SIDES:
        turns = _turns(rec.get(side), side)
        if prompt and turns[: len(prompt)] == prompt:
            turns = turns[len(prompt) :]  # the prompt repeated at the head of the list
        if not turns or turns[-1][0] != ASSISTANT:
            raise SkipRecord("malformed_record", f"{side} does not end with an assistant reply")
        sides.append(_from_turns(rid, prompt + turns, system, extra={}))
    chosen, rejected = sides
    if chosen.messages[:-1] != rejected.messages[:-1] or chosen.system != rejected.system:
        raise SkipRecord(
            "prompts_differ", "chosen and rejected do not share the messages before their reply"
        )
    return _pair(
        Conversation(rid, chosen.messages[:-1], chosen.system),
        chosen.messages[-1].content,
        rejected.messages[-1].content,
    )


def parse_pair_sharegpt(rec: dict, rid: str) -> PreferencePair:
    """LLaMA-Factory's ShareGPT preference records: `conversations` is the prompt."""
    conv = parse_sharegpt(rec, rid)
    return _pair(conv, _reply(rec.get("chosen"), "chosen"), _reply(rec.get("rejected"), "rejected"))


PAIR_PARSERS = {
    "pairs": parse_pair_strings,
    "messages": parse_pair_messages,
    "sharegpt": parse_pair_sharegpt,
}
Shape = Literal["pairs", "messages", "sharegpt"]
# the record fields each reader uses; any other is dropped (and reported)
PAIR_FIELDS = {
    "pairs": {"prompt", "chosen", "rejected", "system", "id", "instruction", "input", "history"},
    "messages": {"prompt", "chosen", "rejected", "system", "id"},
    "sharegpt": {"conversations", "chosen", "rejected", "system", "tools", "id", "model", "lang"},
}


def check_shape(fmt: str | None) -> None:
    if fmt is not None and fmt not in PAIR_PARSERS:
        raise DataError(
            "--fmt", "value", f"unknown preference shape {fmt!r}; choose from {', '.join(SHAPES)}"
        )


def _is_message_list(value) -> bool:
    return isinstance(value, list) and any(
        isinstance(m, dict) and ("role" in m or "from" in m) for m in value
    )


def detect_shape(rec) -> str | None:
    if not isinstance(rec, dict) or not ({"chosen", "rejected"} & set(rec)):
        return None
    if "conversations" in rec:
        return "sharegpt"
    if _is_message_list(rec.get("chosen")) or _is_message_list(rec.get("rejected")):
        return "messages"
    return "pairs"


def iter_pairs(
    path: str | os.PathLike, report: Report, fmt: str | None = None
) -> Iterator[tuple[str, PreferencePair]]:
    """Yield (where, PreferencePair) for each readable record of `path`; count the rest."""
    check_shape(fmt)

    def unknown(rec) -> str:
        return (
            f"not a preference record (keys {sorted(rec)}): expected prompt/chosen/rejected, "
            "chosen/rejected message lists, or conversations with chosen/rejected; name the "
            "shape with --fmt"
        )

    yield from iter_parsed(
        str(path),
        report,
        PAIR_PARSERS,
        fmt=fmt,
        detect=detect_shape,
        unknown=unknown,
        fields=PAIR_FIELDS,
    )


def validate_pair(pair: PreferencePair) -> PreferencePair:
    """Raise SkipRecord unless `pair` can be trained on."""
    for side in SIDES:
        if not getattr(pair, side).strip():
            raise SkipRecord("empty_reply", f"the {side} reply is empty")
    if pair.chosen.strip() == pair.rejected.strip():
        raise SkipRecord("identical_replies", "chosen and rejected are the same text")
    if not pair.prompt:
        raise SkipRecord("no_prompt", "there is no prompt before the replies")
    if pair.prompt[-1].role not in (USER, TOOL):
        raise SkipRecord(
            "prompt_not_ending_in_user_turn", f"the prompt ends with a {pair.prompt[-1].role} turn"
        )
    validate(pair.conversation("chosen"))  # roles, alternation, empty prompt turns
    return pair


def read_pairs(
    paths: list[str], report: Report, fmt: str | None = None
) -> Iterator[PreferencePair]:
    """Pairs from `paths` that pass `validate_pair`; the rest are counted in `report`."""
    return read_valid(paths, report, fmt, iterate=iter_pairs, check=validate_pair)


# -- writers ---------------------------------------------------------------------------------


def _message_dicts(pair: PreferencePair) -> list[dict]:
    msgs = [{"role": SYSTEM, "content": pair.system}] if pair.system else []
    return msgs + [{"role": m.role, "content": m.content} for m in pair.prompt]


def to_pairs(pair: PreferencePair) -> dict:
    """Shape "pairs": the prompt a string when it is one user turn, else a message list."""
    out = {"id": pair.id, **pair.extra}
    if pair.system:
        out["system"] = pair.system
    single = len(pair.prompt) == 1 and pair.prompt[0].role == USER
    out["prompt"] = (
        pair.prompt[0].content
        if single
        else [{"role": m.role, "content": m.content} for m in pair.prompt]
    )
    out["chosen"], out["rejected"] = pair.chosen, pair.rejected
    return out


def to_preference_messages(pair: PreferencePair) -> dict:
    """Shape "messages": each side the whole conversation, as UltraFeedback (binarized) has it."""
    head = _message_dicts(pair)
    return {
        "id": pair.id,
        "chosen": head + [{"role": ASSISTANT, "content": pair.chosen}],
        "rejected": head + [{"role": ASSISTANT, "content": pair.rejected}],
    }


def to_preference_sharegpt(pair: PreferencePair) -> dict:
    """Shape "sharegpt", as LLaMA-Factory reads it."""
    out = {"id": pair.id, **pair.extra}
    if pair.system:
        out["system"] = pair.system
    out["conversations"] = [
        {"from": SHAREGPT_NAMES[m.role], "value": m.content} for m in pair.prompt
    ]
    out["chosen"] = {"from": "gpt", "value": pair.chosen}
    out["rejected"] = {"from": "gpt", "value": pair.rejected}
    return out


PAIR_WRITERS = {
    "pairs": to_pairs,
    "messages": to_preference_messages,
    "sharegpt": to_preference_sharegpt,
}


# -- tokenizing ------------------------------------------------------------------------------


def _reply_start(labels: list[int]) -> int | None:
    """Where the last run of trained tokens (the final reply and its end token) starts."""
    j = len(labels)
    while j > 0 and labels[j - 1] == IGNORE_INDEX:
        j -= 1
    if j == 0:
        return None
    while j > 0 and labels[j - 1] != IGNORE_INDEX:
        j -= 1
    return j


def encode_pairs(
    pairs: list[PreferencePair], encoder: ConversationTokenizer, max_length: int | None
) -> list[dict | SkipRecord]:
    """Each pair as a row (see PREFERENCE_COLUMNS, plus `truncated`), or a SkipRecord.

    Both sides are encoded as SFT encodes the conversation prompt + reply; the first
    `prompt_length` ids must be the same on both sides. Labels keep only the final reply (with
    the end token SFT trains); a side over `max_length` loses the end of its reply."""
    convs = [p.conversation(side) for p in pairs for side in SIDES]
    encoded = encoder.encode_batch(convs)
    rows: list[dict | SkipRecord] = []
    for k, pair in enumerate(pairs):
        sides = encoded[2 * k : 2 * k + 2]
        bad = next((e for e in sides if isinstance(e, SkipRecord)), None)
        if bad is not None:
            rows.append(bad)
            continue
        starts = [_reply_start(e.labels) for e in sides]
        if None in starts:
            rows.append(SkipRecord("no_trainable_tokens", "a side has no reply tokens"))
            continue
        n = starts[0]
        if starts[1] != n or sides[0].input_ids[:n] != sides[1].input_ids[:n]:
            rows.append(
                SkipRecord(
                    "prompt_tokens_differ",
                    f"the prompt encodes to {starts[0]} tokens before chosen and {starts[1]} "
                    "before rejected, or to other ids (the tokenizer merges across the "
                    "prompt/reply boundary)",
                )
            )
            continue
        if max_length is not None and n >= max_length:
            rows.append(
                SkipRecord("prompt_too_long", f"{n} prompt tokens, max_length {max_length}")
            )
            continue
        row, cut = {"id": pair.id, "prompt_length": n}, []
        for side, enc in zip(SIDES, sides):
            ids, labels = enc.input_ids, [IGNORE_INDEX] * n + enc.labels[n:]
            if max_length is not None and len(ids) > max_length:
                ids, labels = ids[:max_length], labels[:max_length]
                cut.append(side)
            row[f"{side}_input_ids"], row[f"{side}_labels"] = ids, labels
            row[f"{side}_length"] = len(ids)
        row["truncated"] = ",".join(cut)
        rows.append(row)
    return rows


NO_PAIRS = "no preference pair is usable"


def _raw_row(pair: PreferencePair) -> dict:
    prompt = Conversation(pair.id, pair.prompt, pair.system)
    return {**raw_row(prompt), "chosen": pair.chosen, "rejected": pair.rejected}


def _features():
    import datasets

    ids = datasets.Sequence(datasets.Value("int32"))
    n = datasets.Value("int32")
    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "chosen_input_ids": ids,
            "chosen_labels": ids,
            "rejected_input_ids": ids,
            "rejected_labels": ids,
            "chosen_length": n,
            "rejected_length": n,
            "prompt_length": n,
            "truncated": datasets.Value("string"),
            "skip": datasets.Value("string"),
        }
    )


def _encode_rows(batch: dict, encoder: ConversationTokenizer, max_length: int) -> dict:
    pairs = [
        PreferencePair(i, s, [Message(r, c) for r, c in zip(roles, contents)], ch, rj)
        for i, s, roles, contents, ch, rj in zip(
            batch["id"],
            batch["system"],
            batch["roles"],
            batch["contents"],
            batch["chosen"],
            batch["rejected"],
        )
    ]
    out = {k: [] for k in (*PREFERENCE_COLUMNS, "truncated", "skip")}
    for pair, row in zip(pairs, encode_pairs(pairs, encoder, max_length)):
        if isinstance(row, SkipRecord):
            row = {
                "id": pair.id,
                "chosen_input_ids": [],
                "chosen_labels": [],
                "rejected_input_ids": [],
                "rejected_labels": [],
                "chosen_length": 0,
                "rejected_length": 0,
                "prompt_length": 0,
                "truncated": "",
                "skip": f"{row.reason}\t{row.detail}",
            }
        else:
            row["skip"] = ""
        for k in out:
            out[k].append(row[k])
    return out


@dataclass(frozen=True, kw_only=True)
class PairSet(TokenizedSet):
    """Preference pairs for DPO. Rows: id, chosen_input_ids, chosen_labels, rejected_input_ids,
    rejected_labels, chosen_length, rejected_length, prompt_length. Cached by the data's bytes,
    the tokenizer, the template, max_length and fmt."""

    command: ClassVar[str] = "build_pairs"
    unit: ClassVar[str] = "pair"
    key_prefix: ClassVar[str] = "pref-"
    batch_size: ClassVar[int] = 256
    nothing: ClassVar[tuple[str, ...]] = (NO_PAIRS,)
    encode = staticmethod(_encode_rows)
    features = staticmethod(_features)

    def check_format(self) -> None:
        check_shape(self.fmt)

    def encoder(self, tok) -> ConversationTokenizer:
        encoder = ConversationTokenizer(tok, self.template)
        encoder.check_budget(self.max_length)
        return encoder

    def cache_key(self) -> dict:
        return {
            "kind": "preference",
            "version": PREFERENCE_CACHE_VERSION,
            "max_length": self.max_length,
            "format": self.fmt,
        }

    def read_rows(self, paths: list[str], report: Report) -> list[dict]:
        return [_raw_row(p) for p in read_pairs(paths, report, self.fmt)]

    def encode_kwargs(self) -> dict:
        return {"max_length": self.max_length}

    @staticmethod
    def row_lengths(ds) -> list[int]:
        return [*ds["chosen_length"], *ds["rejected_length"]]

    def add_notes(self, report: Report) -> None:
        if report.truncated:
            report.notes["truncation"] = (
                f"{report.truncated:,} pairs had a side cut at --max_length {self.max_length}, "
                "losing the end of its reply: raise --max_length"
            )


def build_preference_dataset(
    data: str | list[str], tokenizer, template: str = "vicuna_v1.1", **options
):
    """Tokenize preference pairs; returns (datasets.Dataset, Report). `options`: those of
    PairSet (max_length, cache_dir, strict, quiet, out, fmt, num_proc, report_path); `out`
    copies the set to a folder, cached under `cache_dir`/datasets."""
    return PairSet(template=template, **options).build(data, tokenizer)


# -- commands --------------------------------------------------------------------------------


def _norm(text: str) -> str:
    return " ".join(text.split())


def _alpaca_fields(rec, what: str = "record") -> tuple[str, str, str, str]:
    if not isinstance(rec, dict):
        raise SkipRecord("malformed_record", f"a {type(rec).__name__}, not an object")
    return (
        _text(rec.get("instruction"), "instruction"),
        _text(rec.get("input") or "", "input"),
        _text(rec.get("output"), "output"),
        _text(rec.get("system") or "", "system"),
    )


def pair(
    chosen: str,
    rejected: str,
    out: str,
    *,
    heldout: int = 0,
    heldout_out: str | None = None,
    seed: int = 0,
    keep_identical: bool = False,
    strict: bool = False,
    report: str | None = None,
) -> Report:
    """Preference pairs from two Alpaca files answering the same instructions.

    The records of `chosen` (e.g. alpaca_gpt4_data_en_1k.json, GPT-4) are matched on
    instruction + input (white space normalised) to those of `rejected` (e.g. alpaca_data.json,
    text-davinci-003).
    Writes {id, prompt, chosen, rejected} records (.jsonl: JSON Lines, else a JSON array).
    Unmatched records, records repeated whole and (unless --keep_identical) pairs whose two
    outputs are the same are dropped and counted. --heldout N puts a seeded random N pairs in
    --heldout_out instead (for evaluation), whole prompts at a time: no prompt is on both sides.

    Options:
        chosen: the Alpaca file whose outputs are preferred
        rejected: the Alpaca file whose outputs are rejected
        out: the pairs' file (.jsonl: JSON Lines, else a JSON array)
        heldout: how many pairs to hold out for evaluation (0: none)
        heldout_out: the held-out pairs' file (needed with --heldout)
        seed: random seed of the held-out choice
        keep_identical: keep pairs whose two outputs are the same text
    """
    check_inputs(chosen, "--chosen")
    check_inputs(rejected, "--rejected")
    check_outputs(
        [chosen, rejected], {"--out": out, "--heldout_out": heldout_out, "--report": report}
    )
    check_count("--heldout", heldout, minimum=0)
    check_count("--seed", seed, minimum=0)
    if heldout and not heldout_out:
        raise DataError(
            "--heldout_out",
            "value",
            f"is needed with --heldout {heldout}: the file for the held-out pairs",
        )
    rep = Report("pair", strict=strict)
    index: dict[tuple[str, str], str] = {}
    conflicting, bad_rejected = 0, Counter()
    inputs = {path: rep.input_file(path, "alpaca") for path in (chosen, rejected)}
    for where, rec in read_records(rejected):
        inputs[rejected]["records"] += 1
        try:
            instruction, inp, output, _ = _alpaca_fields(rec)
        except SkipRecord as e:
            if strict:
                raise DataError(rejected, where, str(e)) from None
            bad_rejected[e.reason] += 1
            continue
        k = (_norm(instruction), _norm(inp))
        if k in index and index[k] != output:
            conflicting += 1  # the first answer stays
        index.setdefault(k, output)
    records, keys, seen = [], [], set()
    matched = unmatched = identical = duplicates = 0
    stem = Path(chosen).stem
    for i, (where, rec) in enumerate(read_records(chosen)):
        rep.read += 1
        inputs[chosen]["records"] += 1
        try:
            instruction, inp, output, system = _alpaca_fields(rec)
        except SkipRecord as e:
            rep.skip(chosen, where, e)
            continue
        key = (_norm(instruction), _norm(inp))
        other = index.get(key)
        if other is None:
            unmatched += 1
            rep.drop("unmatched", f"{chosen}: {where}: instruction not found in {rejected}")
            continue
        matched += 1
        same = output.strip() == other.strip()
        identical += same
        if (key, system, output) in seen:  # would weigh twice, and could sit on both sides
            duplicates += 1
            rep.drop("duplicate_pair", f"{chosen}: {where}: the same record again")
            continue
        seen.add((key, system, output))
        if same and not keep_identical:
            rep.drop("identical_replies", f"{chosen}: {where}: both files give the same output")
            continue
        rec_out = {"id": str(rec.get("id", f"{stem}_{i}"))}
        if system:
            rec_out["system"] = system
        rec_out.update(prompt=alpaca_prompt(instruction, inp), chosen=output, rejected=other)
        records.append(rec_out)
        keys.append(key)
    if not records:
        raise nothing_trainable([chosen], rep, "no pair can be made")
    if heldout and heldout >= len(records):
        raise DataError(
            chosen,
            f"--heldout {heldout}",
            f"leaves no training pairs: only {len(records)} pairs were made",
        )
    # held out by prompt: pairs that share a prompt stay on one side of the split
    groups: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    held: set[int] = set()
    for group in order:
        if len(held) + len(group) <= heldout:
            held.update(group)
    n_train = write_records(out, (r for i, r in enumerate(records) if i not in held))
    rep.written = n_train
    rep.notes.update(
        {
            "matched": matched,
            "unmatched": unmatched,
            "identical": identical,
            "duplicates": duplicates,
            "rejected_records": len(index),
        }
    )
    if conflicting:
        rep.notes["rejected_conflicting_duplicates"] = conflicting
    if bad_rejected:
        rep.notes["rejected_file_skipped"] = dict(bad_rejected)
    rep.notes["train"] = f"{n_train} -> {out}"
    if heldout:
        n_held = write_records(heldout_out, (r for i, r in enumerate(records) if i in held))
        rep.written += n_held
        rep.notes.update({"heldout": f"{n_held} -> {heldout_out}", "seed": seed})
    elif seed:
        rep.notes["seed"] = f"{seed} unused: it chooses the held-out pairs (--heldout N)"
    if heldout_out and not heldout:
        rep.notes["heldout_out"] = f"{heldout_out} not written: --heldout is 0"
    return rep.emit(report)


def build_pairs(
    data: str | list[str],
    tokenizer: str,
    *,
    out: str | None = None,
    template: str = "vicuna_v1.1",
    max_length: int = 2048,
    fmt: Shape | None = None,
    num_proc: int = 1,
    cache_dir: str | None = None,
    strict: bool = False,
    report: str | None = None,
) -> Report:
    """Tokenize preference pairs for DPO into a `datasets` folder, cached like build.

    Rows: chosen_/rejected_input_ids, chosen_/rejected_labels, chosen_/rejected_length,
    prompt_length; both sides rendered by the SFT template and tokenizer, sharing the prompt's
    token ids, labels on the final reply only.

    Options:
        out: the preference set's folder (none: only the cache)
        max_length: the most tokens a side may have; a longer reply loses its end
        fmt: the input's shape: pairs, messages or sharegpt (default: detected from each file's
            first record)
    """
    check_tokenizer(tokenizer)
    _, rep = build_preference_dataset(
        check_inputs(data),
        tokenizer,
        template,
        max_length=max_length,
        cache_dir=cache_dir,
        strict=strict,
        out=out,
        fmt=fmt,
        num_proc=num_proc,
        report_path=report,
    )
    return rep


def convert_pairs(
    data: str | list[str],
    out: str,
    *,
    to: Shape = "pairs",
    fmt: Shape | None = None,
    strict: bool = False,
    report: str | None = None,
) -> Report:
    """Preference data from any shape to another: pairs ({prompt, chosen, rejected}), messages
    (UltraFeedback-style lists) or sharegpt (LLaMA-Factory). Unusable pairs are dropped and
    counted.

    Options:
        to: the output shape
        fmt: the input's shape (default: detected from each file's first record)
    """
    if to not in PAIR_WRITERS:
        raise DataError(
            "--to", "value", f"unknown preference shape {to!r}; choose from {', '.join(SHAPES)}"
        )
    check_shape(fmt)
    paths = check_inputs(data)
    check_outputs(paths, {"--out": out, "--report": report})
    rep = Report("convert_pairs", strict=strict)
    write = PAIR_WRITERS[to]
    pairs = (write(p) for p in read_pairs(paths, rep, fmt))
    rep.written = write_records(out, refuse_empty(pairs, paths, rep, what=NO_PAIRS))
    return rep.emit(report)
