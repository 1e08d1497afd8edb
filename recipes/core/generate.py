"""Answer with a trained model, using the template it was trained with (for demo and chat)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastchat_data.schema import ASSISTANT, USER, Conversation, Message
from fastchat_data.tokenize import ConversationTokenizer


def reply(model, tokenizer, history: list[tuple[str, str]], question: str, template: str = "vicuna_v1.1",
          max_new_tokens: int = 64, streamer=None) -> str:  # fmt: skip
    """Greedy answer to `question` after `history` [(user, assistant), ...]."""
    messages = [
        Message(role, text) for q, a in history for role, text in ((USER, q), (ASSISTANT, a))
    ]
    conv = Conversation("chat", messages + [Message(USER, question)])
    ids = ConversationTokenizer(tokenizer, template).encode_prompt(conv)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids], device=model.device), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            streamer=streamer,
        )  # fmt: skip
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()


def trained_template(*folders, default: str = "vicuna_v1.1"):
    """The template a model or adapter folder was trained with (its camelid.json), so chat and
    evaluation render prompts the way training did; `default` for folders from elsewhere."""
    from .checkpoint import RUN_INFO

    for folder in folders:
        info = Path(folder) / RUN_INFO if folder else None
        if info and info.exists():
            template = json.loads(info.read_text()).get("template")
            if template:
                return template
    return default
