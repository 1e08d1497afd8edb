"""Splitting long conversations by a token budget: chunks fit, are greedy, and every pair is
accounted for (written, or dropped and counted)."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastchat_data.clean import clean
from fastchat_data.formats import iter_conversations, to_sharegpt
from fastchat_data.report import Report
from fastchat_data.schema import ASSISTANT, TOOL, USER, Conversation, DataError, Message, SkipRecord
from fastchat_data.split_long import plan_chunks, split_long
from fastchat_data.templates import TEMPLATES
from fastchat_data.tokenize import IGNORE_INDEX, ConversationTokenizer, Encoded

FLAVOURS = ["llama", "chatml"]  # vicuna_v1.1 on a SentencePiece tokenizer; a ChatML chat template


def conv(*texts, id="c", system="", tool_rounds=()):
    """Alternating user/assistant turns; the pairs in `tool_rounds` start with a tool turn."""
    roles = [USER, ASSISTANT]
    msgs = [Message(roles[i % 2], t) for i, t in enumerate(texts)]
    for p in tool_rounds:
        msgs[2 * p].role = TOOL
    return Conversation(id, msgs, system=system)


def pairs_of(c: Conversation) -> list[tuple[str, str]]:
    return [
        (c.messages[p].content, c.messages[p + 1].content) for p in range(0, len(c.messages), 2)
    ]


def length(encoder, c: Conversation, i: int, j: int) -> int:
    (enc,) = encoder.encode_batch([Conversation(c.id, c.messages[2 * i : 2 * j], c.system)])
    return len(enc.input_ids)


def naive_greedy(encoder, c: Conversation, budget: int):
    """The definition, one encode per step: add rounds (a user turn and the pairs answering it,
    tool outputs included) while the chunk fits. Returns pair ranges, and the first pair of
    each round too long alone."""
    n = len(c.messages) // 2
    starts = [p for p in range(n) if p == 0 or c.messages[2 * p].role == USER] + [n]
    i, chunks, over = 0, [], []
    while i < len(starts) - 1:
        j = i
        while j < len(starts) - 1 and length(encoder, c, starts[i], starts[j + 1]) <= budget:
            j += 1
        if j == i:
            over.append(starts[i])
            i += 1
        else:
            chunks.append((starts[i], starts[j]))
            i = j
    return chunks, over


def run(tmp_path, records, tokenizer, template, **kw):
    src, out = tmp_path / "in.json", tmp_path / "out.json"
    src.write_text(json.dumps(records))
    rep = split_long(str(src), str(out), tokenizer, template=template, **kw)
    pairs = rep.notes["pairs"]
    assert pairs["read"] == pairs["written"] + pairs["dropped"]  # nothing lost silently
    return rep, [c for _, c in iter_conversations(out, Report("t"))]


# -- the search, against the definition, on a tokenizer-free length model --------------------
class FakeEncoder:
    """Tokens: a head, then per pair len(user)+1 masked and len(reply)+1 trained; the first pair
    of a chunk costs a little extra, so lengths are not additive (as with real tokenizers)."""

    def __init__(self, head: int):
        self.head = head

    def encode_batch(self, convs):
        out = []
        for c in convs:
            ids = [0] * (self.head + len(c.messages[0].content) % 3)
            labels = [IGNORE_INDEX] * len(ids)
            for m in c.messages:
                ids += [1] * (len(m.content) + 1)
                labels += [1 if m.role == ASSISTANT else IGNORE_INDEX] * (len(m.content) + 1)
            out.append(Encoded(ids, labels))
        return out


_pair = st.tuples(st.integers(0, 40), st.integers(0, 40), st.booleans())  # sizes, tool round


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(_pair, min_size=1, max_size=12), min_size=1, max_size=5),
    st.integers(5, 150),
    st.integers(0, 20),
)
def test_search_matches_naive_greedy(sizes, budget, head):
    encoder = FakeEncoder(head)
    convs = []
    for k, pairs in enumerate(sizes):
        texts = [t for a, b, _ in pairs for t in ("u" * a, "r" * b)]
        tools = [p for p, (_, _, tool) in enumerate(pairs) if tool and p > 0]
        convs.append(conv(*texts, id=str(k), tool_rounds=tools))
    for c, (chunks, over) in zip(convs, plan_chunks(encoder, convs, budget)):
        assert (chunks, [a for (a, _), _ in over]) == naive_greedy(encoder, c, budget)
        assert all(tokens > budget for _, tokens in over)


# -- hand-written conversations, real tokenizer ----------------------------------------------
def test_greedy_chunks_ids_and_system_prompt(tmp_path, tokenizers):
    tok, template = tokenizers["llama"]
    encoder = ConversationTokenizer(tok, template)
    texts = []
    for k in range(6):
        texts += [f"Question {k}: what is {k} times {k}?", f"It is {k * k}. " * (k % 3 + 1)]
    c = conv(*texts, id="x", system="Answer with numbers.")
    budget = length(encoder, c, 0, 2) + 3
    rep, out = run(tmp_path, [to_sharegpt(c)], tok, template, max_length=budget)
    chunks, over = naive_greedy(encoder, c, budget)
    assert over == [] and len(chunks) > 2
    assert [o.id for o in out] == [f"x_{k}" for k in range(len(chunks))]
    assert [o.messages for o in out] == [c.messages[2 * i : 2 * j] for i, j in chunks]
    assert all(o.system == "Answer with numbers." for o in out)
    assert all(len(e.input_ids) <= budget for e in encoder.encode_batch(out))
    assert rep.notes["conversations_split"] == 1 and rep.dropped_total == 0


def test_short_conversation_is_one_chunk(tmp_path, tokenizers):
    tok, template = tokenizers["chatml"]
    records = [to_sharegpt(conv("Hi", "Hello!", id="s"))]
    rep, out = run(tmp_path, records, tok, template, max_length=2048)
    assert [(o.id, [m.content for m in o.messages]) for o in out] == [("s_0", ["Hi", "Hello!"])]
    assert rep.notes["pairs"] == {"read": 1, "written": 1, "dropped": 0}


@pytest.mark.parametrize("keep", [False, True])
def test_pair_over_budget(tmp_path, tokenizers, keep):
    tok, template = tokenizers["llama"]
    c = conv("Short one?", "Yes.", "Long one?", "word " * 300, "Short again?", "Yes.", id="o")
    rep, out = run(tmp_path, [to_sharegpt(c)], tok, template, max_length=100, keep_oversized=keep)
    if keep:
        assert [len(o.messages) for o in out] == [2, 2, 2]
        assert rep.notes["oversized_pairs_kept"] == 1 and rep.dropped_total == 0
        assert rep.notes["pairs"] == {"read": 3, "written": 3, "dropped": 0}
    else:
        # the pairs around the dropped one are never joined
        assert [o.messages for o in out] == [c.messages[0:2], c.messages[4:6]]
        assert rep.dropped == {"pair_over_budget": 1}
        assert "id o: pair 1 alone is" in rep.examples["pair_over_budget"][0]
        assert rep.notes["pairs"] == {"read": 3, "written": 2, "dropped": 1}


def test_trailing_user_turn_and_invalid_records_are_counted(tmp_path, tokenizers):
    tok, template = tokenizers["llama"]
    records = [
        to_sharegpt(conv("Q1?", "A1.", "Unanswered?", id="t")),
        to_sharegpt(conv("Q1?", "", "Q2?", "A2.", id="empty")),
        {
            "id": "bad",
            "conversations": [
                {"from": "gpt", "value": "A."},
                {"from": "human", "value": "Q?"},
                {"from": "gpt", "value": "B."},
            ],
        },
    ]
    rep, out = run(tmp_path, records, tok, template, max_length=512)
    assert [o.id for o in out] == ["t_0"]
    assert rep.dropped == {"trailing_user_turn": 1, "empty_value": 1, "broken_alternation": 1}
    assert rep.notes["pairs"] == {"read": 4, "written": 1, "dropped": 3}
    with pytest.raises(DataError, match="trailing_user_turn"):
        run(tmp_path, records, tok, template, max_length=512, strict=True)


def test_function_call_stays_with_its_output(tmp_path, tokenizers):
    tok, template = tokenizers["llama"]
    call, output = '{"name": "weather", "arguments": {"city": "Paris"}}', '{"celsius": 21}'
    texts = ["Weather in Paris?", call, output, "It is 21 degrees.", "And in words?", "Mild."]
    c = conv(*texts, id="w", tool_rounds=[1])
    encoder = ConversationTokenizer(tok, template)
    budget = length(encoder, c, 0, 2)  # the first round, and not a token more
    rep, out = run(tmp_path, [to_sharegpt(c)], tok, template, max_length=budget)
    assert [o.messages for o in out] == [c.messages[:4], c.messages[4:]]
    assert rep.notes["pairs"] == {"read": 3, "written": 3, "dropped": 0}
    rep, out = run(tmp_path, [to_sharegpt(c)], tok, template, max_length=budget - 1)
    assert [o.messages for o in out] == [c.messages[4:]]
    assert rep.dropped == {"pair_over_budget": 2} and "pairs 0-1 (one round)" in str(rep.examples)


def test_tool_data_chunks_start_with_a_user_turn(tmp_path, tokenizers, data_dir):
    tok, template = tokenizers["chatml"]
    src = data_dir / "glaive_toolcall_en_300_sharegpt.json"
    rep = split_long(str(src), str(tmp_path / "out.json"), tok, template=template, max_length=384)
    chunks = [c for _, c in iter_conversations(tmp_path / "out.json", Report("t"))]
    assert rep.notes["conversations_split"] > 20
    assert (
        rep.notes["pairs"]["read"] == rep.notes["pairs"]["written"] + rep.notes["pairs"]["dropped"]
    )
    assert all(c.messages[0].role == USER for c in chunks)
    encoder = ConversationTokenizer(tok, template)
    assert all(len(e.input_ids) <= 384 for e in encoder.encode_batch(chunks))


class RefusingTemplate:
    """Vicuna, except that it cannot render a conversation mentioning "boom"."""

    name = "refusing"

    def render(self, c, eos):
        if any("boom" in m.content for m in c.messages):
            raise SkipRecord("chat_template_error", "boom")
        return TEMPLATES["vicuna_v1.1"].render(c, eos)


def test_conversation_the_template_cannot_render_is_counted(tmp_path, tokenizers):
    tok, _ = tokenizers["llama"]
    records = [
        to_sharegpt(conv("Q?", "A.", "boom?", "A.", id="b")),
        to_sharegpt(conv("Q?", "A.", id="ok")),
    ]
    rep, out = run(tmp_path, records, tok, RefusingTemplate(), max_length=512)
    assert [o.id for o in out] == ["ok_0"] and rep.dropped == {"chat_template_error": 1}
    assert rep.notes["pairs"] == {"read": 3, "written": 1, "dropped": 2}


# -- the cleaned ShareGPT sample ---------------------------------------------------------------
@pytest.fixture(scope="module")
def cleaned(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "sharegpt_clean.json"
    clean(str(data_dir / "sharegpt_v3_sample_1000.json"), str(out))
    return out


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_real_sample_chunks_fit_are_greedy_and_account_for_every_pair(
    flavour, tokenizers, cleaned, tmp_path
):
    tok, template = tokenizers[flavour]
    budget = 512
    out = tmp_path / "split.json"
    rep = split_long(str(cleaned), str(out), tok, template=template, max_length=budget)
    source = {c.id: c for _, c in iter_conversations(cleaned, Report("t"))}
    chunks = [c for _, c in iter_conversations(out, Report("t"))]
    pairs = rep.notes["pairs"]
    print(f"\n{flavour}: {rep.written} chunks; pairs {pairs}; dropped {dict(rep.dropped)}")
    assert rep.read == len(source) and rep.written == len(chunks)
    assert pairs["read"] == sum(len(c.messages) // 2 for c in source.values())
    assert pairs["read"] == pairs["written"] + pairs["dropped"]
    assert pairs["written"] == sum(len(c.messages) // 2 for c in chunks)
    assert pairs["dropped"] == rep.dropped["pair_over_budget"] == rep.dropped_total

    encoder = ConversationTokenizer(tok, template)
    assert all(len(e.input_ids) <= budget for e in encoder.encode_batch(chunks))

    # Map chunks back onto their source pairs: in order, contiguous, ids <id>_0, <id>_1, ...
    by_source: dict[str, list] = {}
    for ch in chunks:
        sid, k = ch.id.rsplit("_", 1)
        assert int(k) == len(by_source.setdefault(sid, [])) and ch.system == source[sid].system
        by_source[sid].append(ch)
    # A chunk plus the next chunk's first pair must not fit; a dropped pair alone must not.
    grown, dropped = [], []
    for sid, src in source.items():
        src_pairs = pairs_of(src)
        p, prev = 0, None
        for ch in by_source.get(sid, []):
            mine = pairs_of(ch)
            if prev is not None and src_pairs[p] == mine[0]:
                grown.append(Conversation(prev.id, prev.messages + ch.messages[:2], prev.system))
            while src_pairs[p] != mine[0]:
                dropped.append(conv(*src_pairs[p], system=src.system))
                p += 1
            assert src_pairs[p : p + len(mine)] == mine
            p, prev = p + len(mine), ch
        dropped += [conv(*pair, system=src.system) for pair in src_pairs[p:]]
    assert len(dropped) == pairs["dropped"]
    assert len(grown) > 100 and all(len(e.input_ids) > budget for e in encoder.encode_batch(grown))
    sample = random.Random(0).sample(dropped, min(40, len(dropped)))
    assert all(len(e.input_ids) > budget for e in encoder.encode_batch(sample))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_real_sample_matches_naive_greedy(flavour, tokenizers, cleaned):
    tok, template = tokenizers[flavour]
    encoder = ConversationTokenizer(tok, template)
    convs = [c for _, c in iter_conversations(cleaned, Report("t"))]
    convs = sorted(convs, key=lambda c: -len(c.messages))[:8]  # the most pairs
    for c, (chunks, over) in zip(convs, plan_chunks(encoder, convs, 1024)):
        assert (chunks, [a for (a, _), _ in over]) == naive_greedy(encoder, c, 1024), c.id
