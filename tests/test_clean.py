"""ShareGPT cleaning: one test per rule on hand-written records, then the real ShareGPT sample."""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastchat_data.clean import clean, clean_text
from fastchat_data.formats import iter_conversations, parse_sharegpt
from fastchat_data.report import Report
from fastchat_data.schema import DataError, validate

SHAREGPT_HTML = (
    '<div class="markdown prose w-full break-words dark:prose-invert light"><p>Use '
    "<code>my_func</code>"
    ' with snake_case names:</p><pre><div class="bg-black mb-4 rounded-md">'
    '<div class="flex items-center">'
    '<span class="">python</span><button class="flex ml-auto gap-2"><svg></svg>Copy code'
    "</button></div>"
    '<div class="p-4 overflow-y-auto"><code class="!whitespace-pre hljs language-python">'
    '<span class="hljs-keyword">def</span> <span class="hljs-title function_">f</span>(x_1):\n'
    '    <span class="hljs-keyword">return</span> x_1 * 2  # &lt;div&gt;\n</code></div></div></pre>'
    "<ol><li>one</li><li>two</li></ol></div>"
)


def rec(*turns, id="r", system=None):
    """A ShareGPT record: a string turn answers the turn before it; a tuple is (from, value)."""
    conv = [("system", system)] if system else []
    for t in turns:
        if not isinstance(t, tuple):
            t = ("gpt" if conv and conv[-1][0] == "human" else "human", t)
        conv.append(t)
    return {"id": id, "conversations": [{"from": f, "value": v} for f, v in conv]}


def run(tmp_path, records, **kw):
    """The report and the records written; when nothing survives, clean refuses to write an
    empty file (exit 2 on the command line), and its error carries the report."""
    src, out = tmp_path / "in.json", tmp_path / "out.json"
    src.write_text(json.dumps(records))
    out.unlink(missing_ok=True)
    try:
        rep = clean(str(src), str(out), **kw)
    except DataError as e:
        if not records and "is an empty JSON array: no records" in str(e):
            return None, []
        if "no conversation is kept" not in str(e):
            raise
        assert not out.exists()
        rep, written = e.report, []
    else:
        written = json.loads(out.read_text())
        assert written
    assert rep.read == len(records) == rep.written + rep.dropped_total  # nothing lost silently
    return rep, written


def values(record):
    return [t["value"] for t in record["conversations"]]


Q, A = "What is the capital of France?", "Paris is the capital of France."
LIMIT = "Too many requests in 1 hour. Try again later."  # ChatGPT's rate limit, saved as a reply


# -- text repairs ---------------------------------------------------------------------------
def test_html_page_becomes_markdown(tmp_path):
    rep, out = run(tmp_path, [rec(Q, SHAREGPT_HTML)])
    text = values(out[0])[1]
    assert text == (
        "Use `my_func` with snake_case names:\n\n```python\ndef f(x_1):\n"
        "    return x_1 * 2  # <div>\n```\n\n1. one\n2. two"
    )
    assert rep.notes["repairs"] == {"html_to_markdown": 1, "copy_code_fence": 1}


def test_markdown_with_tags_is_left_alone():
    table = "| a | b |\n| --- | --- |\n| x<br>y | `snake_case` |"
    code = '<div class="x">\n  <span>hi</span>\n</div>\n```html\n<div>kept</div>\n```'
    readme = '<div align="center">\n\n```js\nlet a_b = 1;\n```\n\n</div>'
    for text in (table, code, readme, "Use <b>bold</b> here", "a_b * c_d"):
        repairs = Counter()
        assert clean_text(text, repairs) == text
        assert not +repairs


@pytest.mark.parametrize(
    "raw, want, repair",
    [
        ("```pythonCopy codeprint(1)\n```", "```python\nprint(1)\n```", "copy_code_fence"),
        ("```\nbashCopy code\nls -l\n```", "```bash\nls -l\n```", "copy_code_fence"),
        ("```Copy code\nx = 1\n```", "```\nx = 1\n```", "copy_code_fence"),
        ("See:\n```jsCopy code```\nDone", "See:\n\nDone", "empty_copy_code_block"),
        ("glsl\nCopy code\nfloat x;", "glsl\nfloat x;", "copy_code_line"),
        ("2 / 2Sure, here it is.", "Sure, here it is.", "regenerate_counter"),
        ("1 / 1\n\nHello", "Hello", "regenerate_counter"),
        ("Text Copy123 chars / 20 words", "Text", "copy_chars_noise"),
        ("1 / 2 cup of flour, or 10 / 5?", "1 / 2 cup of flour, or 10 / 5?", None),
        ("Is 3 / 4Copy code a fraction?", "Is 3 / 4Copy code a fraction?", None),
    ],
)
def test_page_noise_repairs(raw, want, repair):
    repairs = Counter()
    assert clean_text(raw, repairs) == want
    assert +repairs == (Counter({repair: 1}) if repair else Counter())


# -- structure -------------------------------------------------------------------------------
def test_leading_non_user_turns_and_trailing_user_turn_go(tmp_path):
    r = rec(("gpt", "Hi, how can I help?"), ("gpt", "Still there?"), Q, A, "And Germany?")
    rep, out = run(tmp_path, [r])
    assert values(out[0]) == [Q, A]
    assert rep.notes["turns_removed"] == {"leading_non_user": 2, "trailing_user": 1}
    assert rep.truncated == 1


def test_leading_system_turn_is_the_system_prompt(tmp_path):
    _, out = run(tmp_path, [rec(Q, A, system="You are terse.")])
    assert out[0]["system"] == "You are terse." and values(out[0]) == [Q, A]


def test_broken_alternation_is_dropped(tmp_path):
    rep, out = run(tmp_path, [rec(Q, A, ("gpt", "More."), Q + "?", A)])
    assert out == [] and rep.dropped == {"broken_alternation": 1}
    example = rep.examples["broken_alternation"][0]
    assert "record 0" in example and "id r: turn 2 is assistant" in example


def test_cut_before_empty_or_blocked_reply_keeps_earlier_pairs(tmp_path):
    records = [
        rec(Q, A, "Q2?", "\u200b", "Q3?", "A3.", id="zwsp"),  # ShareGPT's invisible replies
        rec("And Spain?", "Madrid.", "Q2?", LIMIT, id="limit"),
        rec(Q, "  ", id="empty"),
        rec("Hello there, friend", "!" + LIMIT, id="only_limit"),
    ]
    rep, out = run(tmp_path, records)
    assert [(r["id"], values(r)) for r in out] == [
        ("zwsp", [Q, A]),
        ("limit", ["And Spain?", "Madrid."]),
    ]
    assert rep.dropped == {"empty_turn": 1, "blocked_response": 1}
    assert rep.notes["turns_removed"] == {
        "from_empty_turn_on": 3,
        "from_blocked_response_on": 1,
        "trailing_user": 2,
    }


def test_no_complete_pair(tmp_path):
    records = [rec(("gpt", "An answer without a question.")), rec("A question only?")]
    rep, out = run(tmp_path, records)
    assert out == [] and rep.dropped == {"no_complete_pair": 2}


def test_blocked_words_default_custom_and_disabled(tmp_path):
    records = [
        rec(Q, "As a model trained by OpenAI, ..."),
        rec(Q, A, id="s", system="You are ChatGPT."),
    ]
    rep, out = run(tmp_path, records)
    assert out == [] and rep.dropped == {"blocked_word": 2}
    assert "'ChatGPT' in the system prompt" in rep.examples["blocked_word"][1]
    rep, out = run(tmp_path, records, blocked_words=["paris"])
    assert rep.dropped == {"blocked_word": 1} and out[0]["id"] == "r"
    rep, out = run(tmp_path, records, blocked_words=[])
    assert len(out) == 2 and rep.dropped_total == 0


def test_too_short_and_too_long_count_characters(tmp_path):
    records = [rec("Hi", "Hello!", id="short"), rec(Q, A, id="ok"), rec(Q, A * 100, id="long")]
    rep, out = run(tmp_path, records, max_chars=1000)
    assert [r["id"] for r in out] == ["ok"]
    assert rep.dropped == {"too_short": 1, "too_long": 1}


def test_duplicate_ids_and_duplicate_first_exchange(tmp_path):
    records = [
        rec(Q, A, id="a"),
        rec("Another question here", "Another answer", id="a"),  # same id
        rec(Q, A, "Follow-up?", "Yes.", id="b"),  # same first exchange as "a"
        rec(("gpt", "preamble"), "Third question", "Third answer", id="c"),
        rec("Third question", "Third answer", id="d"),  # duplicate once cleaned
    ]
    rep, out = run(tmp_path, records)
    assert [r["id"] for r in out] == ["a", "c"]
    assert rep.dropped == {"duplicate_id": 1, "duplicate_content": 2}
    assert "same first exchange as id c" in rep.examples["duplicate_content"][1]


def test_unreadable_records_are_counted_and_strict_raises(tmp_path):
    records = [
        rec(Q, A),
        {"id": "x", "conversations": [{"from": "robot", "value": "beep"}]},
        rec(Q, A, id="dup"),
    ]
    rep, out = run(tmp_path, records)
    assert rep.dropped == {"unknown_role": 1, "duplicate_content": 1} and len(out) == 1
    with pytest.raises(DataError, match="record 1"):
        run(tmp_path, records, strict=True)


_turn = st.tuples(
    st.sampled_from(["human", "gpt", "gpt", "human", "system"]),
    st.sampled_from(
        [
            "",
            "\u200b",
            "Tell me about OpenAI",
            "2 / 2A long enough answer",
            "short",
            Q,
            A,
            SHAREGPT_HTML,
        ]
    ),
)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.lists(_turn, max_size=7), max_size=6))
def test_any_input_cleans_to_trainable_records_with_full_accounting(tmp_path, convs):
    records = [
        {"id": str(i % 4), "conversations": [{"from": f, "value": v} for f, v in c]}
        for i, c in enumerate(convs)
    ]
    rep, out = run(tmp_path, records)
    for r in out:
        validate(parse_sharegpt(r, "x"))  # starts with a user turn, alternates, nothing empty
        assert not any("openai" in v.lower() or v.startswith("2 / 2") for v in values(r))


# -- the real ShareGPT sample ---------------------------------------------------------------
_FENCED = re.compile(r"```.*?(?:```|\Z)|`[^`\n]*`", re.S)


def test_real_sharegpt_sample(tmp_path, data_dir):
    src, out = data_dir / "sharegpt_v3_sample_1000.json", tmp_path / "clean.json"
    start = time.perf_counter()
    rep = clean(str(src), str(out), report=str(tmp_path / "report.json"))
    elapsed = time.perf_counter() - start
    print(f"\nclean: {elapsed:.2f}s; dropped by reason: {dict(rep.dropped)}; notes: {rep.notes}")
    assert elapsed < 15  # ~1s: only the few HTML pages are parsed
    assert rep.read == 1000 == rep.written + rep.dropped_total
    assert dict(rep.dropped) == {"no_complete_pair": 9, "empty_turn": 6, "duplicate_content": 6}
    assert json.loads((tmp_path / "report.json").read_text())["dropped_total"] == 21

    written = [c for _, c in iter_conversations(out, Report("t"))]
    assert len(written) == rep.written and len({c.id for c in written}) == len(written)
    for c in written:
        validate(c)  # starts with a user turn, alternates, ends with a reply, nothing empty
        for m in c.messages:
            outside_code = _FENCED.sub("", m.content)
            assert not re.search(r"<(div|span)\b", outside_code, re.I), (c.id, outside_code[:200])
            assert "Copy code" not in m.content, c.id
    # every turn is accounted for: written, or removed and counted
    raw = {r["id"]: r["conversations"] for r in json.loads(src.read_text())}
    read_turns = sum(sum(t["from"] != "system" for t in raw[c.id]) for c in written)
    assert read_turns == sum(len(c.messages) for c in written) + sum(
        rep.notes["turns_removed"].values()
    )
    assert rep.notes["turns_removed"]["leading_non_user"] == 326
    assert sum(bool(c.system) for c in written) == 1
