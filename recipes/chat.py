"""Chat with a model (and optionally an adapter) in the terminal, tokens streamed as they come.

    python -m recipes.chat --model runs/vicuna/model
    python -m recipes.chat --model BASE --adapter runs/qlora/adapter --template vicuna_v1.1

Multi-turn, rendered with the same template as training: the model's chat template (an
export's is the template it was trained with; camelid.json for exports older than that), and
a reply stops at the token the template ends replies with. `/reset` starts a new conversation,
`/exit` (or end of input) quits.
"""

from __future__ import annotations

import argparse
import sys
from threading import Thread

import torch

from fastchat_data.schema import ASSISTANT, USER, Conversation, Message
from fastchat_data.tokenize import ConversationTokenizer
from recipes.core.config import ConfigError, HelpFormatter
from recipes.core.data import pad_token_id
from recipes.core.generate import stop_kwargs, trained_template


def stream_reply(model, encoder: ConversationTokenizer, conv: Conversation, max_new_tokens: int,
                 temperature: float, out=sys.stdout) -> str:  # fmt: skip
    """Generate the next assistant reply, writing tokens to `out` as they are produced."""
    from transformers import TextIteratorStreamer

    tok = encoder.tokenizer
    ids = torch.tensor([encoder.encode_prompt(conv)], device=model.device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    sampling = (
        dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    )
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                  streamer=streamer, pad_token_id=pad_token_id(tok), **stop_kwargs(encoder),
                  **sampling)  # fmt: skip
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.chat", description=__doc__,
                                formatter_class=HelpFormatter, allow_abbrev=False)  # fmt: skip
    p.add_argument("--model", required=True, help="model folder (the base, with --adapter)")
    p.add_argument("--adapter", help="an adapter folder to load on the model (default: none)")
    p.add_argument(
        "--template", help="name or YAML/JSON file (default: the one it was trained with)"
    )
    p.add_argument("--system", default="", help="a system text (default: the template's)")
    p.add_argument("--max_new_tokens", type=int, default=256, help="tokens per reply at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--quantization", default="none", choices=["none", "nf4"],
                   help="load the model in 4-bit nf4 (as QLoRA trained it) or unquantized")  # fmt: skip
    a = p.parse_args(argv)
    from transformers import AutoTokenizer

    from recipes.eval import load_model

    try:
        model = load_model(a.model, a.quantization, a.adapter)
        encoder = ConversationTokenizer(
            AutoTokenizer.from_pretrained(a.adapter or a.model),
            a.template or trained_template(a.adapter, a.model),
        )
    except (ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
        answer = stream_reply(model, encoder, Conversation("chat", list(messages), system=a.system),
                              a.max_new_tokens, a.temperature)  # fmt: skip
        messages.append(Message(ASSISTANT, answer))


if __name__ == "__main__":
    sys.exit(main())
