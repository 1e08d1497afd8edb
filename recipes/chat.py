"""Chat with a model (and optionally an adapter) in the terminal, tokens streamed as they come.

    python -m recipes.chat --model runs/vicuna/model
    python -m recipes.chat --model BASE --adapter runs/qlora/adapter --template vicuna_v1.1

Multi-turn, rendered with the same template as training: the model's chat template (an
export's is the template it was trained with; camelid.json for exports older than that), and
a reply stops at the token the template ends replies with. `/reset` starts a new conversation,
`/exit` (or end of input) quits.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from threading import Thread
from typing import Literal

import torch

from fastchat_data.options import UsageError, entry_point, option, parse
from fastchat_data.schema import ASSISTANT, USER, Conversation, Message
from fastchat_data.tokenize import ConversationTokenizer
from recipes.core.data import pad_token_id
from recipes.core.generate import load_for_inference, stop_kwargs, trained_template
from recipes.core.quiet import quiet, verbose_option, verbose_requested


def stream_reply(
    model,
    encoder: ConversationTokenizer,
    conv: Conversation,
    *,
    max_new_tokens: int,
    temperature: float,
    out=sys.stdout,
) -> str:
    """Generate the next assistant reply, writing tokens to `out` as they are produced."""
    from transformers import TextIteratorStreamer

    tok = encoder.tokenizer
    ids = torch.tensor([encoder.encode_prompt(conv)], device=model.device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    sampling = (
        dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    )
    kwargs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        streamer=streamer,
        pad_token_id=pad_token_id(tok),
        **stop_kwargs(encoder),
        **sampling,
    )
    worker = Thread(target=model.generate, kwargs=kwargs)
    worker.start()
    pieces = []
    for piece in streamer:
        out.write(piece)
        out.flush()
        pieces.append(piece)
    worker.join()
    out.write("\n")
    return "".join(pieces).strip()


@dataclass
class ChatOptions:
    """Chat with a model (and optionally an adapter) in the terminal."""

    model: str = option(help="model folder (the base, with --adapter)")
    adapter: str | None = option(None, "an adapter folder to load on the model")
    template: str | None = option(None, "name or YAML/JSON file; none: the one it was trained with")
    system: str = option("", "a system text (empty: the template's)")
    max_new_tokens: int = option(256, "tokens per reply at most", minimum=1)
    temperature: float = option(0.0, "sampling temperature; 0: greedy")
    quantization: Literal["none", "nf4"] = option(
        "none", "load the model in 4-bit nf4 (as QLoRA trained it) or unquantized"
    )
    verbose: bool = verbose_option()


@entry_point
def main(argv: list[str] | None = None) -> int:
    quiet(verbose_requested(argv))
    a = parse(ChatOptions, argv, prog="python -m recipes.chat", description=__doc__)
    if a.max_new_tokens < 1 or not (a.temperature >= 0 and a.temperature < float("inf")):
        raise UsageError("--max_new_tokens must be at least 1 and --temperature a number >= 0")
    for path in (a.model, a.adapter):
        if path and not Path(path).is_dir():
            raise UsageError(f"{path} is not a model folder")
    from transformers import AutoTokenizer

    model = load_for_inference(a.model, a.quantization, a.adapter)
    encoder = ConversationTokenizer(
        AutoTokenizer.from_pretrained(a.adapter or a.model),
        a.template or trained_template(a.adapter, a.model),
    )
    print("camelid chat: /reset starts over, /exit quits", flush=True)
    messages: list[Message] = []
    while True:
        try:
            line = input("USER: ").strip()
        except EOFError:
            print()
            return 0
        if line == "/exit":
            return 0
        if line == "/reset":
            messages = []
            print("(new conversation)", flush=True)
            continue
        if not line:
            continue
        messages.append(Message(USER, line))
        print("ASSISTANT: ", end="", flush=True)
        conv = Conversation("chat", list(messages), system=a.system)
        answer = stream_reply(
            model, encoder, conv, max_new_tokens=a.max_new_tokens, temperature=a.temperature
        )
        messages.append(Message(ASSISTANT, answer))


if __name__ == "__main__":
    sys.exit(main())
