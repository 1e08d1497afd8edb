"""Merge an adapter into its full-precision base: a standalone Hugging Face model folder.

    python -m recipes.merge --adapter runs/qlora/adapter --out runs/qlora/merged [--base PATH]

The base defaults to the one the adapter was trained on (adapter_config.json). It is loaded
unquantized: merging into a 4-bit base would round the merged weights back to 4 bits. The
merged tokenizer's chat template is the template the adapter was trained with, and
generation_config.json stops at the token that ends a reply. `--out` is never the adapter,
its run or the base: the output guard (fastchat_data/outputs.py) refuses before anything is
loaded.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from fastchat_data.io import save_tokenizer
from fastchat_data.options import UsageError, entry_point, option, parse
from fastchat_data.outputs import StagedDir, guard_dir
from recipes.core.config import ConfigError
from recipes.core.generate import save_for_inference, trained_template
from recipes.core.lora import load_adapter, read_adapter_config
from recipes.core.quiet import quiet, verbose_option, verbose_requested
from recipes.core.run_folder import RUN_INFO, written_by_command

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge(adapter: str, out: str, base: str | None = None, *, dtype: str = "float32") -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    guard_dir(
        out, [adapter, *([base] if base else [])], "--out", marker=written_by_command("merge")
    )
    base = base or read_adapter_config(adapter).base_model_name_or_path
    if not base or not Path(base).exists():
        raise ConfigError(f"base model {base!r} not found; pass --base PATH")
    # checked before minutes of loading: the merge writes a new folder, never over its inputs
    staged = StagedDir(out, inputs=[adapter, base], marker=written_by_command("merge"))
    model = load_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[dtype]), adapter)
    if not hasattr(model, "merge_and_unload"):
        raise ConfigError(f"{adapter} is a prompt-learning adapter: it has no weights to merge")
    merged = model.merge_and_unload()
    with staged as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok_src = adapter if (Path(adapter) / "tokenizer_config.json").exists() else base
        tokenizer = AutoTokenizer.from_pretrained(tok_src)
        # the record of this folder: what it was merged from (the adapter's own counts of its
        # weights describe the adapter, not this model)
        info = {"written_by": "merge", "adapter": str(adapter), "base": str(base), "dtype": dtype}
        # The template the adapter was trained with, read as chat and eval read it (the
        # adapter's chat template, camelid.json for older adapters): the merged chat template.
        template = trained_template(adapter, default=None)
        if template is None:  # an adapter from elsewhere that names none: its tokenizer as is
            save_tokenizer(tokenizer, tmp)
        else:
            info["template"] = template
            info.update(save_for_inference(tokenizer, template, tmp))
        (tmp / RUN_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False))
    return staged.final


@dataclass
class MergeOptions:
    """Merge an adapter into its full-precision base."""

    adapter: str = option(help="the adapter folder (a recipe's export)")
    out: str = option(help="the merged model's folder (a new one, or one merge wrote before)")
    base: str | None = option(None, "full-precision base model folder; none: the adapter's own")
    dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32", "the merged weights' dtype"
    )
    verbose: bool = verbose_option()


@entry_point
def main(argv: list[str] | None = None) -> int:
    quiet(verbose_requested(argv))
    argv = ["--base" if a == "--model" else a for a in (sys.argv[1:] if argv is None else argv)]
    a = parse(MergeOptions, argv, prog="python -m recipes.merge", description=__doc__)
    if not Path(a.adapter).is_dir():
        raise UsageError(f"--adapter {a.adapter} is not a folder")
    print(f"merged model: {merge(a.adapter, a.out, a.base, dtype=a.dtype)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
