"""The fastchat_data commands as Python functions; `cli.py` makes each one a command line.

Each checks its inputs and options, then reads records, writes its output atomically, and
returns a Report (printed, and written as JSON with `report=PATH`). A command line's options
are the function's parameters: typed by their annotations, described by the "Options:" section
of the docstring (or, for the options most commands share, cli.OPTION_HELP); the parameters
before `*` may also be given without their flag, in order.
"""

from __future__ import annotations

import math
import random
import sys
from collections import Counter
from typing import Literal

from .build import build_dataset, check_tokenizer, load_tokenizer, read_trainable
from .clean import clean
from .formats import WRITERS, Format, check_format, iter_conversations
from .identity import identity_conversations
from .io import check_inputs, check_outputs, write_records
from .preference import build_pairs, convert_pairs, pair
from .report import Report, nothing_trainable, refuse_empty
from .schema import ASSISTANT, DataError, SkipRecord, check_count, validate
from .split_long import split_long
from .templates import check_template_name
from .tokenize import IGNORE_INDEX, ConversationTokenizer

Paths = str | list[str]  # a path, several joined by commas, or (from Python) a list of paths
OutFormat = Literal["sharegpt", "messages"]
MAX_IDENTITY = 1_000_000  # 20 questions, 6 answers: more is repetition, not data


def _writer(to: str):
    if to not in WRITERS:
        raise DataError(
            "--to", "value", f"unknown output format {to!r}; choose from {', '.join(WRITERS)}"
        )
    return WRITERS[to]


def count_untrainable(convs, rep: Report):
    """`convs`, passed through; those `build` would skip (an empty reply, a leading gpt turn)
    are counted in `rep`'s notes. Format tools keep them (they convert data, they do not judge
    it), and the user learns about them before training."""
    reasons = Counter()
    for conv in convs:
        try:
            validate(conv)
        except SkipRecord as e:
            reasons[e.reason] += 1
        yield conv
    if reasons:
        rep.notes["kept_but_untrainable"] = dict(reasons)
        rep.notes["hint"] = (
            "build skips these; `clean` repairs leading gpt turns and drops empty ones"
        )


def read_parsed(paths: list[str], rep: Report, fmt: str | None):
    """Every record of `paths` that parses, as a Conversation."""
    for path in paths:
        for _, conv in iter_conversations(path, rep, fmt):
            yield conv


def read_convertible(paths: list[str], rep: Report, fmt: str | None):
    """Every record that parses, the untrainable ones counted (see count_untrainable)."""
    return count_untrainable(read_parsed(paths, rep, fmt), rep)


def _converter(command: str, doc: str):
    """`convert` and `merge` are one command under two names (each file's format is detected
    on its own in both; merge's name says the inputs are several): their signature, which the
    command line is made from, and their work are written once, here."""

    def run(
        data: Paths,
        out: str,
        *,
        to: OutFormat = "sharegpt",
        fmt: Format | None = None,
        strict: bool = False,
        report: str | None = None,
        in_place: bool = False,
    ) -> Report:
        paths = check_inputs(data)
        check_outputs(paths, {"--out": out, "--report": report}, in_place)
        check_format(fmt)
        write = _writer(to)
        rep = Report(command, strict=strict)
        seen, dup = set(), 0

        def records():
            nonlocal dup
            for conv in read_convertible(paths, rep, fmt):
                dup += conv.id in seen
                seen.add(conv.id)
                yield write(conv)

        rep.written = write_records(out, refuse_empty(records(), paths, rep))
        rep.notes["duplicate_ids"] = dup
        return rep.emit(report)

    run.__name__ = run.__qualname__ = command
    run.__doc__ = doc
    return run


convert = _converter(
    "convert",
    """Convert Alpaca, ShareGPT, OpenAI messages or "### Human:" text to ShareGPT or messages.

    Records `build` would skip are kept and counted in the report; what the conversion changes
    on the way ('tools' into system prompt text, 'function_call' turns into replies, fields no
    format keeps) is listed with the number of records it happened in.""",
)
merge = _converter(
    "merge",
    """Concatenate several files (comma-separated, of any supported formats) into one.

    Each file's format is detected on its own; the report describes each input file.""",
)


def _load_all(paths: list[str], rep: Report, fmt: str | None, *, trainable: bool = False) -> list:
    read = read_trainable if trainable else read_convertible
    return list(read(paths, rep, fmt))


def _check_test_size(test_size) -> None:
    ok = (
        not isinstance(test_size, bool)
        and isinstance(test_size, int | float)
        and math.isfinite(test_size)
        and (0 < test_size < 1 or (test_size >= 1 and test_size == int(test_size)))
    )
    if not ok:
        raise DataError(
            "--test_size",
            "value",
            f"expects a fraction in (0, 1) or a count >= 1, got {test_size!r}",
        )


def split(
    data: Paths,
    train: str,
    test: str,
    *,
    test_size: float = 0.05,
    seed: int = 0,
    to: OutFormat = "sharegpt",
    fmt: Format | None = None,
    strict: bool = False,
    report: str | None = None,
) -> Report:
    """Seeded train/test split of the records of `data`, in their original order.

    Options:
        train: the training records' file (.jsonl: JSON Lines, else a JSON array)
        test: the test records' file
        test_size: the test set: a fraction of the records (< 1), or a count (>= 1)
    """
    paths = check_inputs(data)
    check_outputs(paths, {"--train": train, "--test": test, "--report": report})
    _check_test_size(test_size)
    check_count("--seed", seed, minimum=0)
    check_format(fmt)
    write = _writer(to)
    rep = Report("split", strict=strict)
    convs = _load_all(paths, rep, fmt)
    if not convs:
        raise nothing_trainable(paths, rep, "no record can be written")
    n_test = int(test_size) if test_size >= 1 else math.ceil(len(convs) * test_size)
    if n_test >= len(convs):
        raise DataError(
            ",".join(paths),
            f"--test_size {test_size:g}",
            f"puts all {len(convs):,} records in the test set, leaving none to train on",
        )
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    test_idx = set(order[:n_test])
    n_tr = write_records(train, (write(c) for i, c in enumerate(convs) if i not in test_idx))
    n_te = write_records(test, (write(c) for i, c in enumerate(convs) if i in test_idx))
    rep.written = n_tr + n_te
    rep.notes.update({"train": f"{n_tr} -> {train}", "test": f"{n_te} -> {test}", "seed": seed})
    return rep.emit(report)


def sample(
    data: Paths,
    out: str,
    n: int,
    *,
    seed: int = 0,
    to: OutFormat = "sharegpt",
    fmt: Format | None = None,
    strict: bool = False,
    report: str | None = None,
    in_place: bool = False,
) -> Report:
    """A seeded random sample of `n` conversations, in their original order.

    The report's counts (untrainable records included) are the sample's; asked for more than
    the input holds, it writes them all and says so.

    Options:
        n: how many conversations to sample
    """
    paths = check_inputs(data)
    check_outputs(paths, {"--out": out, "--report": report}, in_place)
    check_count("--n", n)
    check_count("--seed", seed, minimum=0)
    check_format(fmt)
    write = _writer(to)
    rep = Report("sample", strict=strict)
    convs = list(read_parsed(paths, rep, fmt))
    if not convs:
        raise nothing_trainable(paths, rep, "no record can be written")
    keep = sorted(random.Random(seed).sample(range(len(convs)), min(n, len(convs))))
    chosen = list(count_untrainable((convs[i] for i in keep), rep))
    if n > len(convs):
        rep.notes["asked"] = (
            f"asked for {n:,}, the input has {len(convs):,} usable records: wrote {len(convs):,}"
        )
    rep.written = write_records(out, (write(c) for c in chosen))
    return rep.emit(report)


def _histogram(values: list[int], edges: list[int]) -> list[tuple[str, int]]:
    counts = Counter()
    for v in values:
        label = next((f"<= {e}" for e in edges if v <= e), f"> {edges[-1]}")
        counts[label] += 1
    labels = [f"<= {e}" for e in edges] + [f"> {edges[-1]}"]
    return [(lab, counts[lab]) for lab in labels]


def stats(
    data: Paths,
    *,
    tokenizer: str | None = None,
    template: str = "vicuna_v1.1",
    fmt: Format | None = None,
    strict: bool = False,
    report: str | None = None,
) -> Report:
    """Records, turns, characters and (given a tokenizer) the token-length histogram, printed
    to standard output.

    Options:
        tokenizer: a tokenizer folder, for token counts (none: characters only)
        template: the conversation template the token counts are taken with (needs
            --tokenizer): vicuna_v1.1, alpaca, qlora_oasst, chat_template (the tokenizer's
            own), or a YAML/JSON file of template fields
    """
    if tokenizer is not None:
        check_tokenizer(tokenizer)
    paths = check_inputs(data)
    check_outputs(paths, {"--report": report})
    check_format(fmt)
    check_template_name(template)
    rep = Report("stats", strict=strict)
    # a tokenizer or template that cannot work fails before the data is read
    enc = ConversationTokenizer(load_tokenizer(tokenizer), template) if tokenizer else None
    convs = _load_all(paths, rep, fmt, trainable=True)
    if not convs:
        raise nothing_trainable(paths, rep)
    turns = [len(c.messages) for c in convs]
    chars = [sum(len(m.content) for m in c.messages) + len(c.system) for c in convs]
    rep.notes.update(
        {
            "conversations": len(convs),
            "turns": sum(turns),
            "turns_per_conversation": round(sum(turns) / max(len(convs), 1), 2),
            "chars_mean": round(sum(chars) / max(len(chars), 1), 1),
            "chars_max": max(chars, default=0),
            "with_system_prompt": sum(bool(c.system) for c in convs),
        }
    )
    if enc is None and template != "vicuna_v1.1":
        rep.notes["template"] = f"{template} unused: token counts need --tokenizer"
    if enc is not None:
        lengths, trained = [], 0
        for i in range(0, len(convs), 1000):
            for e in enc.encode_batch(convs[i : i + 1000]):
                if not isinstance(e, Exception):
                    lengths.append(len(e.input_ids))
                    trained += sum(x != IGNORE_INDEX for x in e.labels)
        lengths.sort()
        rep.notes.update(
            {
                "tokens": sum(lengths),
                "trained_tokens": trained,
                "tokens_p50": lengths[len(lengths) // 2] if lengths else 0,
                "tokens_p95": lengths[int(len(lengths) * 0.95)] if lengths else 0,
                "tokens_max": max(lengths, default=0),
                "token_histogram": dict(_histogram(lengths, [128, 256, 512, 1024, 2048, 4096])),
            }
        )
    rep.written = len(convs)  # counted, not written: the headline says so
    rep.headline = (
        f"[stats] read {rep.read:,}  trainable {rep.written:,}  dropped {rep.dropped_total:,}"
    )
    return rep.emit(report, stream=sys.stdout)


TRAINED, MASKED, RESET = "\033[1;32m", "\033[2m", "\033[0m"


def render_masks(tokenizer, input_ids: list[int], labels: list[int], *, color: bool) -> str:
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


def inspect(
    data: Paths,
    tokenizer: str,
    *,
    template: str = "vicuna_v1.1",
    index: int = 0,
    id: str | None = None,
    max_length: int | None = None,
    color: bool | None = None,
    fmt: Format | None = None,
) -> str:
    """Show one conversation as the model trains on it: trained tokens green (or inside ⟦…⟧),
    masked ones dim.

    Options:
        index: which trainable conversation to show, counting from 0
        id: the id of the conversation to show (instead of --index)
        max_length: cut the conversation at this many tokens, as build would (none: no cut)
        color: colour the output (default: when standard output is a terminal)
    """
    check_count("--index", index, minimum=0)
    check_count("--max_length", max_length, allow_none=True)
    check_tokenizer(tokenizer)
    paths = check_inputs(data)
    check_format(fmt)
    check_template_name(template)
    tok = load_tokenizer(tokenizer)
    encoder = ConversationTokenizer(tok, template, max_length=max_length)
    rep = Report("inspect")
    pick, trainable = None, 0
    for conv in read_trainable(paths, rep, fmt):  # read only as far as the one shown
        if (conv.id == str(id)) if id is not None else trainable == index:
            pick = conv
            break
        trainable += 1
    if pick is None:
        where = f"id {id}" if id is not None else f"index {index}"
        have = f"{trainable:,} trainable conversations of {rep.read:,} records"
        raise DataError(",".join(paths), where, f"no such conversation ({have})")
    try:
        enc = encoder.encode(pick)
    except SkipRecord as e:
        raise DataError(",".join(paths), f"id {pick.id}", str(e)) from None
    color = sys.stdout.isatty() if color is None else color
    legend = "⟦trained⟧ / masked"
    if color:
        legend = f"{TRAINED}trained{RESET} / {MASKED}masked{RESET}"
    n_trained = sum(x != IGNORE_INDEX for x in enc.labels)
    replies = sum(m.role == ASSISTANT for m in pick.messages)
    cut = f" (truncated: {enc.truncated})" if enc.truncated else ""
    text = (
        f"id {pick.id}: {len(enc.input_ids)} tokens, {n_trained} trained, "
        f"{replies} assistant replies{cut}   [{legend}]\n"
        + render_masks(tok, enc.input_ids, enc.labels, color=color)
    )
    print(text)
    return text


def identity(
    out: str,
    *,
    name: str = "Camelid",
    org: str = "the camelid developers",
    n: int = 200,
    seed: int = 0,
    report: str | None = None,
) -> Report:
    """Identity conversations ("Who are you?") for an assistant called `name`, made by `org`.

    Options:
        name: the assistant's name in the answers
        org: who made it, in the answers
        n: how many conversations to write
    """
    check_outputs([], {"--out": out, "--report": report})
    check_count(
        "--n",
        n,
        maximum=MAX_IDENTITY,
        why_not_more="the data is 20 questions and their answers, more would be repetition",
    )
    check_count("--seed", seed, minimum=0)
    rep = Report("identity")
    rep.written = write_records(out, identity_conversations(str(name), str(org), n, seed=seed))
    rep.read = rep.written
    return rep.emit(report)


def build(
    data: Paths,
    tokenizer: str,
    *,
    out: str | None = None,
    template: str = "vicuna_v1.1",
    max_length: int = 2048,
    fmt: Format | None = None,
    train_on_inputs: bool = False,
    num_proc: int = 1,
    cache_dir: str | None = None,
    strict: bool = False,
    report: str | None = None,
    max_source_length: int | None = None,
    max_target_length: int | None = None,
) -> Report:
    """Tokenize with assistant-only masks into a `datasets` folder: the training set.

    Rows: input_ids, labels, length; cached in Arrow by data, tokenizer, template and lengths,
    so a second run loads at once. An existing --out folder is replaced only if a previous
    build wrote it.

    Options:
        out: the training set's folder (none: only the cache)
        train_on_inputs: train on the prompts too, not only on the replies
        max_source_length: cut each prompt turn to this many tokens (QLoRA's limit; none: no
            cut)
        max_target_length: cut each reply to this many tokens (none: no cut)
    """
    check_tokenizer(tokenizer)
    _, rep = build_dataset(
        check_inputs(data),
        tokenizer,
        template,
        max_length=max_length,
        out=out,
        fmt=fmt,
        train_on_inputs=train_on_inputs,
        num_proc=num_proc,
        cache_dir=cache_dir,
        strict=strict,
        report_path=report,
        max_source_length=max_source_length,
        max_target_length=max_target_length,
    )
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
