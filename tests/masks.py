"""The mask-exactness property, shared by the tests."""

from __future__ import annotations

import functools
import re

from fastchat_data.schema import ASSISTANT, Conversation
from fastchat_data.templates import special_tokens
from fastchat_data.tokenize import IGNORE_INDEX, ConversationTokenizer


def trained_runs(labels: list[int]) -> list[list[int]]:
    runs, cur = [], []
    for lab in labels:
        if lab != IGNORE_INDEX:
            cur.append(lab)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@functools.cache
def _specials(tok) -> tuple[frozenset[int], re.Pattern]:
    """A tokenizer's special token ids, and a pattern matching their texts."""
    names = special_tokens(tok)
    ids = frozenset(tok.convert_tokens_to_ids(n) for n in names)
    return ids, re.compile("|".join(map(re.escape, names)))


class RememberedRenders:
    """Stands in for an encoder's template and keeps each conversation's rendering, so that a
    check of many conversations reads the segments the encoder used instead of rendering
    every conversation a second time (a Jinja template is the slow part)."""

    def __init__(self, template):
        self.template = template
        self.by_conversation: dict[int, list] = {}

    def render(self, conv: Conversation, eos: str) -> list:
        segments = self.template.render(conv, eos)
        self.by_conversation[id(conv)] = segments
        return segments

    def __getattr__(self, name: str):
        return getattr(self.template, name)


def assert_exact(ct: ConversationTokenizer, conv: Conversation, enc, *, segments=None) -> None:
    """The label-bearing tokens decode to exactly the assistant replies, each with its end
    token; special tokens appear exactly where the template puts them, never from message text.
    `segments`: the conversation's rendering, where the caller has it."""
    tok = ct.tokenizer
    assert len(enc.input_ids) == len(enc.labels)
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(enc.input_ids, enc.labels))
    replies = [m.content for m in conv.messages if m.role == ASSISTANT]
    runs = trained_runs(enc.labels)
    if enc.truncated:
        runs, replies = runs[:-1], replies[: len(runs) - 1]  # the last run may be cut short
    assert len(runs) == len(replies), (conv.id, len(runs), len(replies))
    if segments is None:
        segments = ct.template.render(conv, ct.eos)
    ends = [s.text.strip() for s in segments if s.literal and s.trainable]
    for run, reply, end in zip(runs, replies, ends):
        # the Rust tokenizer's own decode: what tok.decode(run, skip_special_tokens=False,
        # clean_up_tokenization_spaces=False) gives, without its per-id conversion in Python
        text = tok.backend_tokenizer.decode(run, skip_special_tokens=False)
        # A separator template trains the space after "ASSISTANT:" with the reply (FastChat's
        # masks do too); the Llama decoder drops that leading space itself.
        assert text in (reply + end, " " + reply + end), (conv.id, text[:80], reply[:80])
    special_ids, pattern = _specials(tok)
    expected = len(ct._prefix) + sum(len(pattern.findall(s.text)) for s in segments if s.literal)
    if not enc.truncated:
        assert sum(i in special_ids for i in enc.input_ids) == expected, conv.id
