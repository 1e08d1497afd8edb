"""Merge an adapter into its full-precision base: a standalone Hugging Face model folder.

    python -m recipes.merge --adapter runs/qlora/adapter --out runs/qlora/merged [--base PATH]

The base defaults to the one the adapter was trained on (adapter_config.json). It is loaded
unquantized: merging into a 4-bit base would round the merged weights back to 4 bits. The
merged tokenizer's chat template is the template the adapter was trained with, and
generation_config.json stops at the token that ends a reply.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from fastchat_data.io import save_tokenizer
from recipes.core.checkpoint import RUN_INFO
from recipes.core.config import ConfigError, HelpFormatter
from recipes.core.generate import save_for_inference, trained_template
from recipes.core.lora import load_adapter, read_adapter_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge(adapter: str, out: str, base: str | None = None, dtype: str = "float32") -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = base or read_adapter_config(adapter).base_model_name_or_path
    if not base or not Path(base).exists():
        raise ConfigError(f"base model {base!r} not found; pass --base PATH")
    model = load_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[dtype]), adapter)
    if not hasattr(model, "merge_and_unload"):
        raise ConfigError(f"{adapter} is a prompt-learning adapter: it has no weights to merge")
    merged = model.merge_and_unload()
    out = Path(out)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tok_src = adapter if (Path(adapter) / "tokenizer_config.json").exists() else base
    tokenizer = AutoTokenizer.from_pretrained(tok_src)
    info_path = Path(adapter) / RUN_INFO
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    # The template the adapter was trained with, read as chat and eval read it (the adapter's
    # chat template, camelid.json for older adapters): the merged model's chat template.
    template = trained_template(adapter, default=None)
    if template is None:  # an adapter from elsewhere that names none: its tokenizer as it is
        save_tokenizer(tokenizer, tmp)
    else:
        info.setdefault("template", template)
        info.update(save_for_inference(tokenizer, template, tmp))
    if info:  # camelid.json: the record of the run
        (tmp / RUN_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.merge", description=__doc__,
                                formatter_class=HelpFormatter, allow_abbrev=False)  # fmt: skip
    p.add_argument("--adapter", required=True, help="the adapter folder (a recipe's export)")
    p.add_argument("--out", required=True, help="the merged model's folder (replaced if it exists)")
    p.add_argument("--model", "--base", dest="base",
                   help="full-precision base model folder (default: the adapter's own base)")  # fmt: skip
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="the merged weights' dtype")  # fmt: skip
    a = p.parse_args(argv)
    try:
        out = merge(a.adapter, a.out, a.base, a.dtype)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged model: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
