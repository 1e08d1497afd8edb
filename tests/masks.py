"""The mask-exactness property, shared by the tests."""

from __future__ import annotations

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


def assert_exact(ct: ConversationTokenizer, conv: Conversation, enc) -> None:
    """The label-bearing tokens decode to exactly the assistant replies, each with its end
    token; special tokens appear exactly where the template puts them, never from message text."""
    tok = ct.tokenizer
    assert len(enc.input_ids) == len(enc.labels)
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(enc.input_ids, enc.labels))
    replies = [m.content for m in conv.messages if m.role == ASSISTANT]
    runs = trained_runs(enc.labels)
    if enc.truncated:
        runs, replies = runs[:-1], replies[: len(runs) - 1]  # the last run may be cut short
    assert len(runs) == len(replies), (conv.id, len(runs), len(replies))
    segments = ct.template.render(conv, ct.eos)
    ends = [s.text.strip() for s in segments if s.literal and s.trainable]
    for run, reply, end in zip(runs, replies, ends):
        text = tok.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        # A separator template trains the space after "ASSISTANT:" with the reply (FastChat's
        # masks do too); the Llama decoder drops that leading space itself.
        assert text in (reply + end, " " + reply + end), (conv.id, text[:80], reply[:80])
    names = special_tokens(tok)
    special_ids = {tok.convert_tokens_to_ids(n) for n in names}
    pattern = re.compile("|".join(map(re.escape, names)))
    expected = len(ct._prefix) + sum(len(pattern.findall(s.text)) for s in segments if s.literal)
    if not enc.truncated:
        assert sum(i in special_ids for i in enc.input_ids) == expected, conv.id
