"""`make demo`: the whole pipeline on embedded data, on CPU, nothing downloaded.

1. the data tools on generated identity conversations (fastchat_data.demo);
2. a Vicuna-style full fine-tune of the tiny Llama, 2 processes, FSDP on gloo (make train-vicuna);
3. one chat reply from the exported Hugging Face folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    from fastchat_data import demo as data_demo
    from launch import train as launcher

    data_demo.main(["--out", "runs/demo"])
    print("\n== 6. train: make train-vicuna NGPU=2 STRATEGY=fsdp (the tiny model, identity data)")
    out = REPO / "runs" / "demo" / "vicuna"
    rc = launcher.main(["--ngpu", "2", "--strategy", "fsdp", "--out", str(out), "--",
                        "--max_steps", "60", "--overwrite_output_dir", "True", "--logging_steps", "10"])  # fmt: skip
    if rc != 0:
        return rc

    print(
        "\n== 7. chat with the exported model (plain transformers, no camelid import needed to load it)"
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipes.core.generate import reply

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    question = "Who are you?"
    print(f"USER: {question}\nASSISTANT: {reply(model, tokenizer, [], question)}")
    print(f"\nexported model: {out / 'model'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
