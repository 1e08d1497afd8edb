"""FastChat's own `preprocess` (fastchat.train.train), the reference camelid is compared with.

FastChat is installed with --no-deps (requirements-reference.txt): only its preprocess and
conversation templates are used; its train() no longer runs on transformers 5.
"""

from __future__ import annotations

import contextlib
import io

from fastchat_data.schema import Conversation
from fastchat_data.tokenize import IGNORE_INDEX


def sharegpt_turns(conv: Conversation) -> list[dict]:
    names = {"user": "human", "assistant": "gpt"}
    return [{"from": names[m.role], "value": m.content} for m in conv.messages]


def fastchat_accepts(conv: Conversation) -> bool:
    """What FastChat's preprocess can take at all: no system prompt, only human/gpt turns
    (it raises KeyError on others)."""
    return not conv.system and all(m.role in ("user", "assistant") for m in conv.messages)


def fastchat_preprocess(convs: list[Conversation], tokenizer, max_length: int, *, batch: int = 64):
    """FastChat's input_ids and labels, padding removed, and whether it kept each sample
    (a "tokenization mismatch" sets every label to -100)."""
    from fastchat.train.train import preprocess

    tokenizer.pad_token = tokenizer.unk_token  # as FastChat's train() does
    tokenizer.padding_side = (
        "right"  # ditto (its masks assume it; LlamaTokenizer pads left by default)
    )
    tokenizer.model_max_length = max_length
    ids_out, labels_out, kept = [], [], []
    for i in range(0, len(convs), batch):
        chunk = convs[i : i + batch]
        with contextlib.redirect_stdout(
            io.StringIO()
        ):  # one "WARNING: tokenization mismatch" line each
            out = preprocess([sharegpt_turns(c) for c in chunk], tokenizer)
        for ids, labels, mask in zip(out["input_ids"], out["labels"], out["attention_mask"]):
            n = int(mask.sum())
            ids_out.append(ids[:n].tolist())
            labels_out.append(labels[:n].tolist())
            kept.append(bool((labels != IGNORE_INDEX).any()))
    return ids_out, labels_out, kept
