"""Answer with a trained model, using the template it was trained with (for demo and chat); and
what an export carries so that any tool renders that template too: the tokenizer's chat
template and generation_config.json's stop tokens."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch

from fastchat_data.io import save_tokenizer
from fastchat_data.schema import ASSISTANT, USER, Conversation, DataError, Message
from fastchat_data.templates import (
    CHAT_TEMPLATE,
    TEMPLATES,
    SeparatorTemplate,
    get_template,
    jinja_chat_template,
    reply_end,
)
from fastchat_data.tokenize import ConversationTokenizer

from .run_folder import RUN_INFO


def load_for_inference(path: str, quantization: str = "none", adapter: str | None = None):
    """A model as training loaded it (`quantization` nf4: through the QLoRA loader), on the
    GPU in bf16 if there is one, with `adapter` attached, in eval mode (for eval and chat)."""
    from .lora import load_adapter, load_base

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    model = load_base(path, device, quantization=quantization, bf16=bf16)
    if quantization == "none":
        model.to(device)
    if adapter:
        model = load_adapter(model, adapter)
    return model.eval()


def reply(
    model,
    tokenizer,
    history: list[tuple[str, str]],
    *,
    question: str,
    template: str = "vicuna_v1.1",
    max_new_tokens: int = 64,
    streamer=None,
) -> str:
    """Greedy answer to `question` after `history` [(user, assistant), ...]."""
    messages = [
        Message(role, text) for q, a in history for role, text in ((USER, q), (ASSISTANT, a))
    ]
    conv = Conversation("chat", messages + [Message(USER, question)])
    encoder = ConversationTokenizer(tokenizer, template)
    ids = encoder.encode_prompt(conv)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids], device=model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            streamer=streamer,
            **stop_kwargs(encoder),
        )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()


def stop_ids(template, tokenizer) -> tuple[list[int], str]:
    """The token ids that end a reply (the template's end tokens, then the tokenizer's eos) and,
    for a template whose reply ends in plain text instead of a special token, that text."""
    tokens, text = reply_end(template, tokenizer)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens] + [tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None)), text


def stop_kwargs(encoder: ConversationTokenizer) -> dict:
    """`generate` arguments that stop where the template ends a reply."""
    ids, text = stop_ids(encoder.template, encoder.tokenizer)
    kwargs = {"eos_token_id": ids}
    if text.strip():
        kwargs.update(stop_strings=[text], tokenizer=encoder.tokenizer)
    return kwargs


def save_for_inference(tokenizer, template, folder: Path) -> dict:
    """Save `tokenizer` into `folder` with `template` (the training template) as its chat
    template, and, in a model folder (config.json), set generation_config.json's eos_token_id
    to the tokens that end a reply. Returns what camelid.json records about it.

    A template whose reply ends in plain text (a sep2 without `{eos}` or a special token) has
    no stop token: generation_config keeps the tokenizer's eos and camelid.json names the text
    (`stop.text`), which a server takes as a stop string."""
    from transformers import GenerationConfig

    try:
        if isinstance(template, str | dict):
            template = get_template(template, tokenizer)
        jinja = jinja_chat_template(template, tokenizer)
    except DataError as e:  # never lose a trained model over its chat template
        warnings.warn(f"{folder}: no chat template written: {e}", stacklevel=2)
        save_tokenizer(tokenizer, folder)
        return {"chat_template": False}
    before = tokenizer.chat_template
    tokenizer.chat_template = jinja
    try:
        save_tokenizer(tokenizer, folder)
    finally:
        tokenizer.chat_template = before
    ids, text = stop_ids(template, tokenizer)
    folder = Path(folder)
    if (folder / "config.json").exists() and ids:
        if (folder / "generation_config.json").exists():
            config = GenerationConfig.from_pretrained(folder)
        else:
            config = GenerationConfig(bos_token_id=tokenizer.bos_token_id)
        config.eos_token_id = ids[0] if len(ids) == 1 else ids
        if config.pad_token_id is None:
            config.pad_token_id = (
                tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[0]
            )
        config.save_pretrained(folder)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    return {"chat_template": True, "stop": {"token_ids": ids, "tokens": tokens, "text": text}}


def _tokenizer_has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists():
        return True
    config = folder / "tokenizer_config.json"
    return config.exists() and bool(json.loads(config.read_text()).get("chat_template"))


def portable(template) -> str | dict:
    """A template object as camelid.json and --template take it: a built-in's name, the
    fields of a custom one, `chat_template` for the tokenizer's own."""
    if isinstance(template, SeparatorTemplate):
        if TEMPLATES.get(template.name) == template:
            return template.name
        return dataclasses.asdict(template)
    return CHAT_TEMPLATE


def trained_template(*folders, default: str | None = "vicuna_v1.1"):
    """The template a model or adapter folder was trained with, so chat and evaluation render
    prompts the way training did; `default` for folders that say nothing.

    Read as any tool reads it, from the folder's tokenizer: its chat template (camelid's own
    Jinja gives back the template it was made from, with training's exact masks; any other is
    used as it is, `chat_template`). camelid.json decides only for exports made before chat
    templates were written (no `"chat_template": true` there): their tokenizer's chat template,
    if any, is the base model's, not the one trained with."""
    for folder in folders:
        if not folder:
            continue
        folder = Path(folder)
        info_path = folder / RUN_INFO
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        if info.get("template") and not info.get("chat_template"):
            return info["template"]  # an older export
        if _tokenizer_has_chat_template(folder):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
            return portable(get_template(CHAT_TEMPLATE, tokenizer))
        if info.get("template"):
            return info["template"]
    return default
