"""The fastchat_data commands as Python functions; `cli.py` exposes them through fire.

Each reads records, writes its output atomically, and returns a Report (printed, and written
as JSON with `report=PATH`).
"""

from __future__ import annotations

import math
import random
import sys
from collections import Counter

from .build import build_dataset, load_tokenizer, read_trainable
from .clean import clean
from .formats import WRITERS, check_format, iter_conversations
from .identity import identity_conversations
from .io import check_outputs, input_paths, write_records
from .preference import build_pairs, convert_pairs, pair
from .report import Report
from .schema import ASSISTANT, DataError, SkipRecord, check_count, validate
from .split_long import split_long
from .templates import check_template_name
from .tokenize import IGNORE_INDEX, ConversationTokenizer


def _writer(to: str):
    if to not in WRITERS:
        raise DataError(
            "--to", "value", f"unknown output format {to!r}; choose from {', '.join(WRITERS)}"
        )
    return WRITERS[to]


def read_convertible(paths: list[str], rep: Report, fmt: str | None):
    """Every record that parses. Format tools keep records that `build` would skip (an empty
    reply, a leading gpt turn): they convert data, they do not judge it. Such records are
    counted in the report's notes, so the user learns about them before training."""
    untrainable = Counter()
    for path in paths:
        for _, conv in iter_conversations(path, rep, fmt):
            try:
                validate(conv)
            except SkipRecord as e:
                untrainable[e.reason] += 1
            yield conv
    if untrainable:
        rep.notes["kept_but_untrainable"] = dict(untrainable)
        rep.notes["hint"] = (
            "build skips these; `clean` repairs leading gpt turns and drops empty ones"
        )


def _convert(
    command: str, data, out: str, to: str, fmt: str | None, strict: bool, report: str | None,
    in_place: bool,
) -> Report:  # fmt: skip
    check_outputs(input_paths(data), {"--out": out, "--report": report}, in_place)
    check_format(fmt)
    rep = Report(command, strict=strict)
    write, seen, dup = _writer(to), set(), 0

    def records():
        nonlocal dup
        for conv in read_convertible(input_paths(data), rep, fmt):
            dup += conv.id in seen
            seen.add(conv.id)
            yield write(conv)

    rep.written = write_records(out, records())
    rep.notes["duplicate_ids"] = dup
    return rep.emit(report)


def convert(data, out: str, to: str = "sharegpt", fmt: str | None = None, strict: bool = False,
            report: str | None = None, in_place: bool = False) -> Report:  # fmt: skip
    """Any supported format (Alpaca, ShareGPT, messages) -> ShareGPT or OpenAI messages.
    `out` may be an input file only with `in_place` (the new file replaces it atomically)."""
    return _convert("convert", data, out, to, fmt, strict, report, in_place)


def merge(data, out: str, to: str = "sharegpt", fmt: str | None = None, strict: bool = False,
          report: str | None = None, in_place: bool = False) -> Report:  # fmt: skip
    """Concatenate several files (comma-separated, any supported formats) into one."""
    return _convert("merge", data, out, to, fmt, strict, report, in_place)


def _load_all(data, rep: Report, fmt: str | None, trainable: bool = False) -> list:
    read = read_trainable if trainable else read_convertible
    return list(read(input_paths(data), rep, fmt))


def split(data, train: str, test: str, test_size: float = 0.05, seed: int = 0, to: str = "sharegpt",
          fmt: str | None = None, strict: bool = False, report: str | None = None) -> Report:  # fmt: skip
    """Seeded train/test split; `test_size` is a fraction (< 1) or a count."""
    check_outputs(input_paths(data), {"--train": train, "--test": test, "--report": report})
    if (
        isinstance(test_size, bool)
        or not isinstance(test_size, int | float)
        or not (0 < test_size < 1 or (test_size >= 1 and test_size == int(test_size)))
    ):
        raise DataError(
            "--test_size",
            "value",
            f"expects a fraction in (0, 1) or a count >= 1, got {test_size!r}",
        )
    check_count("--seed", seed, minimum=0)
    check_format(fmt)
    rep = Report("split", strict=strict)
    write, convs = _writer(to), _load_all(data, rep, fmt)
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    n_test = int(test_size) if test_size >= 1 else math.ceil(len(convs) * test_size)
    test_idx = set(order[:n_test])
    n_tr = write_records(train, (write(c) for i, c in enumerate(convs) if i not in test_idx))
    n_te = write_records(test, (write(c) for i, c in enumerate(convs) if i in test_idx))
    rep.written = n_tr + n_te
    rep.notes.update({"train": f"{n_tr} -> {train}", "test": f"{n_te} -> {test}", "seed": seed})
    return rep.emit(report)


def sample(data, out: str, n: int, seed: int = 0, to: str = "sharegpt", fmt: str | None = None,
           strict: bool = False, report: str | None = None, in_place: bool = False) -> Report:  # fmt: skip
    """A seeded random sample of `n` conversations, in their original order."""
    check_outputs(input_paths(data), {"--out": out, "--report": report}, in_place)
    check_count("--n", n)
    check_count("--seed", seed, minimum=0)
    check_format(fmt)
    rep = Report("sample", strict=strict)
    write, convs = _writer(to), _load_all(data, rep, fmt)
    keep = sorted(random.Random(seed).sample(range(len(convs)), min(n, len(convs))))
    rep.written = write_records(out, (write(convs[i]) for i in keep))
    return rep.emit(report)


def _histogram(values: list[int], edges: list[int]) -> list[tuple[str, int]]:
    counts = Counter()
    for v in values:
        label = next((f"<= {e}" for e in edges if v <= e), f"> {edges[-1]}")
        counts[label] += 1
    labels = [f"<= {e}" for e in edges] + [f"> {edges[-1]}"]
    return [(lab, counts[lab]) for lab in labels]


def stats(data, tokenizer: str | None = None, template: str = "vicuna_v1.1", fmt: str | None = None,
          strict: bool = False, report: str | None = None) -> Report:  # fmt: skip
    """Records, turns, characters and (given a tokenizer) the token-length histogram."""
    check_outputs(input_paths(data), {"--report": report})
    check_format(fmt)
    check_template_name(template)
    rep = Report("stats", strict=strict)
    # a tokenizer or template that cannot work fails before the data is read
    enc = ConversationTokenizer(load_tokenizer(tokenizer), template) if tokenizer else None
    convs = _load_all(data, rep, fmt, trainable=True)
    turns = [len(c.messages) for c in convs]
    chars = [sum(len(m.content) for m in c.messages) + len(c.system) for c in convs]
    rep.notes.update({
        "conversations": len(convs), "turns": sum(turns),
        "turns_per_conversation": round(sum(turns) / max(len(convs), 1), 2),
        "chars_mean": round(sum(chars) / max(len(chars), 1), 1), "chars_max": max(chars, default=0),
        "with_system_prompt": sum(bool(c.system) for c in convs),
    })  # fmt: skip
    if enc is not None:
        lengths, trained = [], 0
        for i in range(0, len(convs), 1000):
            for e in enc.encode_batch(convs[i : i + 1000]):
                if not isinstance(e, Exception):
                    lengths.append(len(e.input_ids))
                    trained += sum(x != IGNORE_INDEX for x in e.labels)
        lengths.sort()
        rep.notes.update({
            "tokens": sum(lengths), "trained_tokens": trained,
            "tokens_p50": lengths[len(lengths) // 2] if lengths else 0,
            "tokens_p95": lengths[int(len(lengths) * 0.95)] if lengths else 0, "tokens_max": max(lengths, default=0),
            "token_histogram": dict(_histogram(lengths, [128, 256, 512, 1024, 2048, 4096])),
        })  # fmt: skip
    rep.written = len(convs)
    return rep.emit(report, stream=sys.stdout)


TRAINED, MASKED, RESET = "\033[1;32m", "\033[2m", "\033[0m"


def render_masks(tokenizer, input_ids: list[int], labels: list[int], color: bool) -> str:
    """The token stream with trained spans green (or ⟦…⟧) and masked spans dim (or plain)."""
    out, run, run_trained = [], [], None

    def flush():
        if run:
            text = tokenizer.decode(
                run, skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            if color:
                out.append((TRAINED if run_trained else MASKED) + text + RESET)
            else:
                out.append(f"⟦{text}⟧" if run_trained else text)

    for tok_id, lab in zip(input_ids, labels):
        trained = lab != IGNORE_INDEX
        if trained != run_trained:
            flush()
            run, run_trained = [], trained
        run.append(tok_id)
    flush()
    return "".join(out)


def inspect(data, tokenizer: str, template: str = "vicuna_v1.1", index: int = 0, id: str | None = None,
            max_length: int | None = None, color: bool | None = None, fmt: str | None = None) -> str:  # fmt: skip
    """Show one conversation as the model trains on it: trained tokens green (or inside ⟦…⟧)."""
    check_count("--index", index, minimum=0)
    check_count("--max_length", max_length, allow_none=True)
    check_format(fmt)
    check_template_name(template)
    tok = load_tokenizer(tokenizer)
    encoder = ConversationTokenizer(tok, template, max_length=max_length)
    rep = Report("inspect")
    convs = _load_all(data, rep, fmt, trainable=True)
    if id is not None:  # fire reads `--id 7` as a number; ids are text
        pick = [c for c in convs if c.id == str(id)]
    else:
        pick = convs[index : index + 1]
    if not pick:
        raise DataError(
            ",".join(input_paths(data)),
            f"id {id}" if id is not None else f"index {index}",
            "no such conversation",
        )
    try:
        enc = encoder.encode(pick[0])
    except SkipRecord as e:
        raise DataError(",".join(input_paths(data)), f"id {pick[0].id}", str(e)) from None
    if isinstance(color, str):  # fire passes `--color false` through as a string
        color = color.lower() in ("1", "true", "yes", "always")
    color = sys.stdout.isatty() if color is None else color
    legend = f"{TRAINED}trained{RESET} / {MASKED}masked{RESET}" if color else "⟦trained⟧ / masked"
    n_trained = sum(x != IGNORE_INDEX for x in enc.labels)
    replies = sum(m.role == ASSISTANT for m in pick[0].messages)
    text = (
        f"id {pick[0].id}: {len(enc.input_ids)} tokens, {n_trained} trained, {replies} assistant replies"
        f"{f' (truncated: {enc.truncated})' if enc.truncated else ''}   [{legend}]\n"
        + render_masks(tok, enc.input_ids, enc.labels, color)
    )
    print(text)
    return text


def identity(out: str, name: str = "Camelid", org: str = "the camelid developers", n: int = 200, seed: int = 0,
             report: str | None = None) -> Report:  # fmt: skip
    """Identity conversations ("Who are you?") for an assistant called `name`, made by `org`."""
    check_outputs([], {"--out": out, "--report": report})
    check_count("--n", n)
    check_count("--seed", seed, minimum=0)
    name, org = str(name), str(org)  # fire reads `--name 42` as a number
    rep = Report("identity")
    rep.written = write_records(out, identity_conversations(name, org, n, seed))
    rep.read = rep.written
    return rep.emit(report)


def build(data, tokenizer: str, out: str | None = None, template: str = "vicuna_v1.1", max_length: int = 2048,
          fmt: str | None = None, train_on_inputs: bool = False, num_proc: int = 1, cache_dir: str | None = None,
          strict: bool = False, report: str | None = None, max_source_length: int | None = None,
          max_target_length: int | None = None) -> Report:  # fmt: skip
    """Tokenize with assistant-only masks into a `datasets` folder (rows: input_ids, labels, length).
    max_source_length / max_target_length cap each prompt / reply turn (QLoRA recipes' limits).
    `out` is a folder; an existing one is replaced only if a previous build wrote it."""
    check_format(fmt)
    _, rep = build_dataset(input_paths(data), tokenizer, template, max_length, out, fmt, train_on_inputs,
                           num_proc, cache_dir, strict, report, max_source_length=max_source_length,
                           max_target_length=max_target_length)  # fmt: skip
    return rep


COMMANDS = {
    f.__name__: f
    for f in (
        convert,
        clean,
        split_long,
        merge,
        split,
        sample,
        stats,
        inspect,
        identity,
        build,
        pair,
        build_pairs,
        convert_pairs,
    )
}
