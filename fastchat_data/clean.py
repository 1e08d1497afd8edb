"""ShareGPT cleaning: FastChat's clean_sharegpt rules, with every drop counted by reason.

Per conversation, in order:
1. leading non-user turns go (a leading system turn is already the system prompt);
2. each turn is repaired: HTML -> markdown when the turn is a scraped HTML page, and ChatGPT's
   page noise goes ("pythonCopy code" fences, a leading "2 / 2" regenerate counter,
   "Copy123 chars / 45 words", empty "Copy code" blocks);
3. the conversation is cut before its first unusable turn (an empty one, or a blocked response
   such as ChatGPT's rate-limit message): the pairs before it are kept;
4. a trailing user turn goes.
Then a conversation is dropped for broken alternation, no complete pair left, a blocked word,
too few or too many characters, an id already written, or a first exchange already written.
Removed turns and repairs are counted in the report's notes; `truncated` counts conversations
written with turns removed.
"""

from __future__ import annotations

import re
from collections import Counter

import bs4
import markdownify

from .formats import Format, check_format, iter_conversations, to_sharegpt
from .io import check_inputs, check_outputs, write_records
from .report import Report, refuse_empty
from .schema import ASSISTANT, USER, Conversation, Message, SkipRecord, check_count

BLOCKED_WORDS = ("openai", "chatgpt")
# FastChat's blocked responses: ChatGPT's rate-limit message saved as a reply.
BLOCKED_RESPONSES = (
    "Too many requests in 1 hour. Try again later.",
    "!Too many requests in 1 hour. Try again later.",
)

# A scraped ChatGPT page is wrapped in a block tag. Text that merely contains tags (code, a
# table with <br>) is markdown already: markdownify would mangle it, so it is left alone.
_HTML_START = re.compile(r"\s*<(div|p|span|pre|ol|ul|h[1-6]|table|blockquote)\b[^>]*>", re.I)
# Opening div/span tags go before markdownify, as in FastChat: the code block's header div
# would put the language and "Copy code" on lines of their own, and spans split identifiers.
_DIV_SPAN = re.compile(r"<(?:div|span)\b[^>]*>", re.I)
_LANG = r"[ \t]*\n?[ \t]*([\w#+.-]*)[ \t]*\n?[ \t]*(?:Copy code)+"
# (name, pattern, replacement), applied in this order. A regenerate counter is glued to the text
# or ends its line ("2 / 2Sure"); "1 / 2 cup" is text. "Copy code" on a line of its own is a
# code block copied from the page as plain text.
REPAIRS = [
    ("regenerate_counter", re.compile(r"^\s*\d+ / \d+(?![\d ])"), ""),
    ("empty_copy_code_block", re.compile(r"```" + _LANG + r"\s*```"), ""),
    ("copy_code_fence", re.compile(r"```" + _LANG + r"[ \t]*\n?"), "```\\1\n"),
    ("copy_code_line", re.compile(r"^[ \t]*Copy code[ \t]*(?:\n|$)", re.M), ""),
    ("copy_chars_noise", re.compile(r"Copy\d+ chars / \d+ words"), ""),
]


def looks_like_html(text: str) -> bool:
    return _HTML_START.match(text) is not None and text.rstrip().endswith(">") and "```" not in text


def html_to_markdown(text: str) -> str:
    # No escaping: a model trained on "snake\_case" learns to write the backslash.
    options = dict(heading_style="ATX", escape_underscores=False, escape_asterisks=False)
    return markdownify.markdownify(_DIV_SPAN.sub("", text), **options)


def clean_text(text: str, repairs: Counter) -> str:
    """One turn's text, repaired; each repair counted in `repairs`."""
    if looks_like_html(text):
        try:
            text = html_to_markdown(text)
        except (bs4.builder.ParserRejectedMarkup, AssertionError) as e:
            raise SkipRecord("html_parse_error", f"{type(e).__name__}: {e}") from None
        repairs["html_to_markdown"] += 1
    for name, pattern, repl in REPAIRS:
        text, n = pattern.subn(repl, text)
        repairs[name] += n
    return text.strip()


def _is_empty(text: str) -> bool:
    # FastChat's test is "empty, or starts with a non-printable character" (invisible replies).
    return not any(ch.isprintable() and not ch.isspace() for ch in text)


def _blocked_pattern(words) -> re.Pattern | None:
    """The blocked words as one pattern: a comma-separated string or a list; None, "", "none"
    or "false" (`--blocked_words False`, as before) block nothing."""
    if words is False or words is None:
        return None
    if not isinstance(words, list | tuple):
        if str(words).strip().lower() in ("", "none", "false"):
            return None
        words = str(words).split(",")
    words = [str(w).strip() for w in words if str(w).strip()]
    return re.compile("|".join(map(re.escape, words)), re.I) if words else None


def clean_conversation(
    conv: Conversation,
    blocked: re.Pattern | None = None,
    min_chars: int = 16,
    *,
    max_chars: int = 200_000,
) -> tuple[Conversation, Counter, Counter]:
    """(cleaned conversation, repairs, removed turns by cause), or SkipRecord with the reason."""
    repairs, removed = Counter(), Counter()
    lead = next((i for i, m in enumerate(conv.messages) if m.role == USER), len(conv.messages))
    removed["leading_non_user"] = lead
    turns, cut, cut_at = [], None, None
    for i, m in enumerate(conv.messages[lead:], lead):
        text = clean_text(m.content, repairs)
        if _is_empty(text):
            cut = "empty_turn"
        elif m.role == ASSISTANT and text.startswith(BLOCKED_RESPONSES):
            cut = "blocked_response"
        if cut:
            removed[f"from_{cut}_on"], cut_at = len(conv.messages) - i, i
            break
        if (m.role == ASSISTANT) != (len(turns) % 2 == 1):
            expected = "a reply" if len(turns) % 2 else "a user turn"
            raise SkipRecord(
                "broken_alternation", f"id {conv.id}: turn {i} is {m.role}, not {expected}"
            )
        turns.append(Message(m.role, text))
    if turns and turns[-1].role != ASSISTANT:
        turns.pop()
        removed["trailing_user"] += 1
    if not turns:
        roles = " ".join(m.role for m in conv.messages[:5])
        why = f"cut at turn {cut_at}" if cut else f"roles {roles}"
        raise SkipRecord(cut or "no_complete_pair", f"id {conv.id}: no pair left ({why})")
    if blocked:
        for i, text in enumerate([conv.system] + [m.content for m in turns]):
            if hit := blocked.search(text):
                where = "the system prompt" if i == 0 else f"a {turns[i - 1].role} turn"
                raise SkipRecord("blocked_word", f"id {conv.id}: {hit.group()!r} in {where}")
    chars = sum(len(m.content) for m in turns)
    if chars < min_chars:
        raise SkipRecord("too_short", f"id {conv.id}: {chars} characters < {min_chars}")
    if chars > max_chars:
        raise SkipRecord("too_long", f"id {conv.id}: {chars:,} characters > {max_chars:,}")
    return Conversation(conv.id, turns, conv.system, conv.extra), repairs, +removed


def clean(
    data: str | list[str],
    out: str,
    *,
    fmt: Format | None = None,
    blocked_words: str | list[str] | None = ",".join(BLOCKED_WORDS),
    min_chars: int = 16,
    max_chars: int = 200_000,
    strict: bool = False,
    report: str | None = None,
    in_place: bool = False,
) -> Report:
    """Clean ShareGPT-style conversations by FastChat's clean_sharegpt rules, every drop counted
    by reason.

    HTML to markdown, "Copy code" fences, regenerate counters, leading gpt and trailing human
    turns, alternation, length, blocked words, duplicate ids and content (the rules:
    fastchat_data/clean.py); written as ShareGPT.

    Options:
        blocked_words: drop conversations holding any of these words (comma-separated, any
            case; "none": block nothing)
        min_chars: drop conversations with fewer characters of turns than this
        max_chars: drop conversations with more characters of turns than this
    """
    paths = check_inputs(data)
    check_outputs(paths, {"--out": out, "--report": report}, in_place)
    check_format(fmt)
    check_count("--max_chars", max_chars, minimum=1)
    check_count(
        "--min_chars",
        min_chars,
        minimum=0,
        maximum=max_chars,
        why_not_more="--max_chars is less, every conversation would be dropped",
    )
    rep = Report("clean", strict=strict)
    blocked = _blocked_pattern(blocked_words)
    repairs, removed, ids, first_exchanges = Counter(), Counter(), set(), {}

    def kept():
        for path in paths:
            for where, conv in iter_conversations(path, rep, fmt):
                try:
                    conv, fixes, lost = clean_conversation(
                        conv, blocked, min_chars, max_chars=max_chars
                    )
                    if conv.id in ids:
                        raise SkipRecord("duplicate_id", f"id {conv.id} already written")
                    first = (conv.messages[0].content, conv.messages[1].content)
                    if first in first_exchanges:
                        detail = f"id {conv.id}: same first exchange as id {first_exchanges[first]}"
                        raise SkipRecord("duplicate_content", detail)
                except SkipRecord as e:
                    rep.skip(path, where, e)
                    continue
                ids.add(conv.id)
                first_exchanges[first] = conv.id
                repairs.update(fixes)
                removed.update(lost)
                rep.truncated += bool(lost)
                yield to_sharegpt(conv)

    rep.written = write_records(
        out, refuse_empty(kept(), paths, rep, what="no conversation is kept")
    )
    rep.notes["turns_removed"] = dict(sorted(removed.items()))
    rep.notes["repairs"] = dict(sorted((+repairs).items()))
    return rep.emit(report)
