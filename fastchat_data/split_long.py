"""Split conversations longer than a token budget into chunks that fit, measured exactly.

A chunk is the system prompt and consecutive (user, assistant) pairs, filled greedily: pairs are
added while the chunk, rendered with the real template and encoded by the real tokenizer
(ConversationTokenizer), stays within `max_length` tokens. A pair is never split, nor a function
call from its output: chunks start at user turns, never at tool turns.

Measuring without O(n^2) encodes: each conversation is encoded whole once (those that fit are
done). Its trained runs (the assistant replies) give each pair's token cost, from which the end
of a chunk is estimated; the estimated end and the one after it are then encoded exactly, and
the bracket [fits, does not fit] narrows until it closes, usually at once. A pair estimated too
long is encoded alone. Encodes are batched across conversations; the work is about twice that
of encoding the data once.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from itertools import accumulate, islice
from typing import Any

from .build import check_tokenizer, load_tokenizer
from .formats import Format, check_format, iter_conversations, to_sharegpt
from .io import check_inputs, check_outputs, write_records
from .report import Report, refuse_empty
from .schema import ASSISTANT, USER, Conversation, SkipRecord, check_count, validate
from .templates import check_template_name
from .tokenize import IGNORE_INDEX, ConversationTokenizer

BATCH = 256  # conversations measured together
# what a drop reason counts, where it is not a conversation (the report's units)
UNITS = {"pair_over_budget": "pair", "trailing_user_turn": "turn"}


def _pair_costs(labels: list[int], n: int, total: int) -> list[int]:
    """Tokens per pair in the whole conversation: pair k ends where its reply's trained run ends."""
    trained = [lab != IGNORE_INDEX for lab in labels] + [False]
    ends = [t for t in range(1, len(trained)) if trained[t - 1] and not trained[t]]
    if len(ends) != n:
        # Replies that do not map to runs (an odd template): spread evenly, measuring corrects it.
        return [total // n] * n
    return [b - a for a, b in zip([0, *ends], ends)]


def _rounds(conv: Conversation) -> list[int]:
    """The pairs where a round starts, and the number of pairs: a round is a user turn and what
    answers it, so a function call is never split from its output (a tool turn)."""
    n = len(conv.messages) // 2
    return [p for p in range(n) if p == 0 or conv.messages[2 * p].role == USER] + [n]


def _plan(bounds: list[int], budget: int):
    """Greedy chunks of one conversation whose rounds start at pairs `bounds` (and the last
    ends at bounds[-1]): a generator that yields the pair ranges (a, b) it needs measured, is
    sent their encodings, and returns (chunks, over): the pair ranges that fit, and
    ((a, b), tokens) for each round that alone exceeds the budget.
    Assumes what any template gives: a chunk is no shorter than a chunk it contains."""
    n = len(bounds) - 1  # below, i and j count rounds

    def span(i, j):  # rounds -> pairs
        return bounds[i], bounds[j]

    (whole,) = yield [span(0, n)]
    known = {(0, n): len(whole.input_ids)}
    if known[0, n] <= budget:
        return [span(0, n)], []
    pair_cum = list(accumulate(_pair_costs(whole.labels, bounds[-1], known[0, n]), initial=0))
    cum = [pair_cum[b] for b in bounds]
    offset, i, chunks, over = 0, 0, [], []  # offset: measured minus estimated (template overhead)

    def fits(a, b):  # True, False, or None when not known yet
        if (a, b) in known:
            return known[a, b] <= budget
        return False if known.get((b - 1, b), 0) > budget else None  # holds a round too long alone

    while i < n:
        lo, hi = i, n + 1  # rounds [i, lo) fit; [i, hi) do not (n + 1: nothing is known yet)
        while hi - lo > 1:
            best = bisect_right(cum, budget - offset + cum[i]) - 1  # estimated last end that fits
            guess = min(max(best, lo + 1), hi - 1)
            # Expected to fit: is it the last that does? Not expected to: it settles the bracket.
            ends = [j for j in ((guess, guess + 1) if guess <= best else (guess,)) if j < hi]
            # A round estimated too long alone is measured alone: that settles it and its chunk.
            todo = []
            for j in ends:
                if fits(i, j) is None:
                    alone = (j - 1, j) not in known and cum[j] - cum[j - 1] + offset > budget
                    todo.append((j - 1, j) if alone else (i, j))
            if todo:
                for key, enc in zip(todo, (yield [span(*key) for key in todo])):
                    known[key] = len(enc.input_ids)
                    offset = known[key] - (cum[key[1]] - cum[key[0]])
            for j in ends:
                if lo < j < hi and (ok := fits(i, j)) is not None:
                    lo, hi = (j, hi) if ok else (lo, j)
        if lo == i:
            over.append((span(i, i + 1), known[i, i + 1]))
            i += 1
        else:
            chunks.append(span(i, lo))
            i = lo
    return chunks, over


def _chunk(conv: Conversation, i: int, j: int, *, k: int | None = None) -> Conversation:
    cid = conv.id if k is None else f"{conv.id}_{k}"
    return Conversation(cid, conv.messages[2 * i : 2 * j], conv.system, conv.extra)


def plan_chunks(encoder: ConversationTokenizer, convs: list[Conversation], budget: int) -> list:
    """For each conversation, (chunks, over) as `_plan` returns them, or the SkipRecord that
    stopped its encoding."""
    plans = [_plan(_rounds(c), budget) for c in convs]
    results: list = [None] * len(convs)
    asks = {k: next(p) for k, p in enumerate(plans)}
    while asks:
        flat = [(k, ab) for k, ranges in asks.items() for ab in ranges]
        encoded = encoder.encode_batch([_chunk(convs[k], *ab) for k, ab in flat])
        answers = defaultdict(list)
        for (k, _), enc in zip(flat, encoded):
            answers[k].append(enc)
        asks = {}
        for k, encs in answers.items():
            failed = next((e for e in encs if isinstance(e, SkipRecord)), None)
            if failed:
                results[k] = failed
                continue
            try:
                asks[k] = plans[k].send(encs)
            except StopIteration as done:
                results[k] = done.value
    return results


def split_long(
    data: str | list[str],
    out: str,
    tokenizer: str | Any,
    *,
    template: str = "vicuna_v1.1",
    max_length: int = 2048,
    fmt: Format | None = None,
    keep_oversized: bool = False,
    strict: bool = False,
    report: str | None = None,
    in_place: bool = False,
) -> Report:
    """Split conversations longer than a token budget into chunks that fit.

    Chunks are measured with the real tokenizer and template and written as ShareGPT with ids
    `<id>_<k>`; (user, assistant) pairs stay together, and a function call stays with its
    output.

    A pair (or a round of function calls) that alone exceeds the budget is dropped and counted
    per pair ("pair_over_budget"), or with --keep_oversized written as a chunk of its own; a
    trailing user turn is dropped ("trailing_user_turn"). The report counts conversations,
    chunks and pairs apart: pairs read == written + dropped.

    Options:
        tokenizer: the tokenizer folder whose tokens are counted (from Python, also a loaded
            tokenizer)
        max_length: the most tokens a chunk may have, template included
        keep_oversized: write a pair that alone is over --max_length as a chunk of its own
            instead of dropping it
    """
    check_tokenizer(tokenizer)
    paths = check_inputs(data)
    check_outputs(paths, {"--out": out, "--report": report}, in_place)
    check_format(fmt)
    check_count("--max_length", max_length)
    check_template_name(template)
    rep = Report("split_long", strict=strict, units=dict(UNITS))
    encoder = ConversationTokenizer(load_tokenizer(tokenizer), template)
    encoder.check_budget(max_length)
    pairs = {"read": 0, "written": 0, "dropped": 0}
    split_convs = oversized_kept = 0

    def readable():
        for path in paths:
            for where, conv in iter_conversations(path, rep, fmt):
                if conv.messages and conv.messages[-1].role != ASSISTANT:
                    last = f"id {conv.id}: turn {len(conv.messages) - 1}"
                    rep.skip(path, where, SkipRecord("trailing_user_turn", last))
                    conv.messages = conv.messages[:-1]
                n = len(conv.messages) // 2
                pairs["read"] += n
                try:
                    yield path, where, validate(conv)
                except SkipRecord as e:
                    pairs["dropped"] += n
                    rep.skip(path, where, e)

    def chunks():
        nonlocal split_convs, oversized_kept
        items = readable()
        while batch := list(islice(items, BATCH)):
            convs = [conv for _, _, conv in batch]
            for (path, where, conv), result in zip(batch, plan_chunks(encoder, convs, max_length)):
                if isinstance(result, SkipRecord):
                    pairs["dropped"] += len(conv.messages) // 2
                    detail = f"id {conv.id}: {result.detail}"
                    rep.skip(path, where, SkipRecord(result.reason, detail))
                    continue
                ranges, over = result
                for (a, b), tokens in over:
                    if keep_oversized:
                        oversized_kept += b - a
                    else:
                        pairs["dropped"] += b - a
                        what = f"pair {a}" if b == a + 1 else f"pairs {a}-{b - 1} (one round)"
                        detail = f"id {conv.id}: {what} alone is {tokens} tokens > {max_length}"
                        rep.skip(path, where, SkipRecord("pair_over_budget", detail), n=b - a)
                if keep_oversized:
                    ranges = sorted(ranges + [ab for ab, _ in over])
                split_convs += len(ranges) > 1
                for c, (i, j) in enumerate(ranges):
                    pairs["written"] += j - i
                    yield to_sharegpt(_chunk(conv, i, j, k=c))

    rep.written = write_records(
        out, refuse_empty(chunks(), paths, rep, what="no chunk can be written")
    )
    name = getattr(encoder.template, "name", str(template))
    rep.notes.update(
        {
            "template": name,
            "max_length": max_length,
            "pairs": pairs,
            "conversations_split": split_convs,
        }
    )
    if keep_oversized:
        rep.notes["oversized_pairs_kept"] = oversized_kept
    dropped = sum(n for reason, n in rep.dropped.items() if reason not in UNITS)
    rep.headline = (
        f"[split_long] conversations read {rep.read:,}, dropped {dropped:,}, split "
        f"{split_convs:,}; chunks written {rep.written:,}; pairs read {pairs['read']:,}, "
        f"written {pairs['written']:,}, dropped {pairs['dropped']:,}"
    )
    return rep.emit(report)
