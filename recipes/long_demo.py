"""`make long-demo`: a LongChat-style long-context run on real data, on CPU.

1. the shared ShareGPT sample, cleaned (python -m fastchat_data clean), its conversations
   joined into multi-thousand-token ones;
2. a tiny Llama with a 2,048-position context, trained at twice that: each row split over 2
   processes (--sequence_parallel_size 2, FSDP2 on gloo) with linear RoPE scaling (factor 2);
3. the export loaded by plain transformers: its config carries the scaling, and the held-out
   long conversations' loss at 4,096 tokens is printed before and after training.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from fastchat_data.options import entry_point, option
from recipes.core.quiet import verbose_option
from recipes.demo import data_dir_option, out_option, start

ROPE = {"rope_type": "linear", "factor": 2.0}


@dataclass
class LongDemoOptions:
    out: str = out_option("long-demo")
    data_dir: str | None = data_dir_option("sharegpt_v3_sample_1000.json")
    max_length: int = option(4096, "tokens per row (the model's own context is 2,048)", minimum=16)
    max_steps: int = option(20, "training steps", minimum=1)
    verbose: bool = verbose_option()


def joined(records: list[dict], min_chars: int) -> list[dict]:
    """Consecutive conversations joined until each holds at least `min_chars` characters."""
    out, turns, chars = [], [], 0
    for record in records:
        turns += record["conversations"]
        chars += sum(len(t["value"]) for t in record["conversations"])
        if chars >= min_chars:
            out.append({"id": f"long_{len(out)}", "conversations": turns})
            turns, chars = [], 0
    return out


def heldout_loss(model_dir: Path, data: Path, max_length: int, *, scaled: bool):
    """Mean loss over the assistant tokens of held-out long conversations, by plain
    transformers (with the training template, so the labels are the training masks')."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fastchat_data.formats import iter_conversations
    from fastchat_data.report import Report
    from fastchat_data.tokenize import IGNORE_INDEX, ConversationTokenizer, Encoded

    config = AutoConfig.from_pretrained(model_dir)
    if scaled:  # the untrained model read at the trained length, scaled as training will
        config.rope_parameters = {**config.rope_parameters, **ROPE}
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoder = ConversationTokenizer(tokenizer, "vicuna_v1.1", max_length=max_length)
    total, count, scored = 0.0, 0, 0
    with torch.no_grad():
        conversations = [c for _, c in iter_conversations(data, Report("heldout"))]
        # a conversation whose first max_length tokens hold no reply has nothing to score
        for row in (r for r in encoder.encode_batch(conversations) if isinstance(r, Encoded)):
            ids, labels = torch.tensor([row.input_ids]), torch.tensor([row.labels])
            out = model(input_ids=ids, labels=labels)
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            total, count, scored = total + out.loss.item() * n, count + n, scored + 1
    return total / count, scored


@entry_point
def main(argv: list[str] | None = None) -> int:
    opts, out = start(LongDemoOptions, argv, "python -m recipes.long_demo", doc=__doc__)
    from fastchat_data.commands import clean
    from fastchat_data.io import write_records
    from fastchat_data.tiny import reference_corpus, shared_data_dir, tiny_model
    from launch import train as launcher

    shared = shared_data_dir(opts.data_dir)
    print("\n== 1. data: the ShareGPT sample cleaned, conversations joined into long ones")
    cleaned = out / "data" / "sharegpt_clean.json"
    clean(str(shared / "sharegpt_v3_sample_1000.json"), str(cleaned))
    long = joined(json.loads(cleaned.read_text()), min_chars=opts.max_length)
    heldout = out / "data" / "long_heldout.json"
    write_records(out / "data" / "long_train.json", long[:-8])
    write_records(heldout, long[-8:])
    sizes = sorted(sum(len(t["value"]) for t in r["conversations"]) for r in long)
    print(f"{len(long)} long conversations, {sizes[len(sizes) // 2]:,} characters (median)")
    model = tiny_model("llama", "tiny", texts=reference_corpus(shared), vocab_size=4000)
    context = json.loads((model / "config.json").read_text())["max_position_embeddings"]

    print(
        f"\n== 2. train at {opts.max_length:,} tokens a row (the model's context: {context:,}): "
        "2 processes, FSDP2, --sequence_parallel_size 2, linear RoPE scaling x2"
    )
    run = out / "run"
    code = launcher.main(
        [
            *("--ngpu", "2", "--strategy", "fsdp", "--model", str(model)),
            *("--data", str(out / "data" / "long_train.json"), "--out", str(run), "--"),
            *("--sequence_parallel_size", "2", "--rope_scaling", json.dumps(ROPE)),
            *("--model_max_length", str(opts.max_length)),
            *("--max_steps", str(opts.max_steps), "--learning_rate", "2e-3"),
            *("--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2"),
            *("--gradient_checkpointing", "True", "--logging_steps", "5"),
            *("--overwrite_output_dir", "True", "--report_to", "none"),
        ]
    )
    if code:
        return code

    print("\n== 3. the export, loaded by plain transformers (no camelid import to load it)")
    saved = json.loads((run / "model" / "config.json").read_text())["rope_parameters"]
    print(f"config.json rope_parameters: {saved}")
    before, n = heldout_loss(model, heldout, opts.max_length, scaled=True)
    after, _ = heldout_loss(run / "model", heldout, opts.max_length, scaled=False)
    print(
        f"held-out loss on {n} long conversations at {opts.max_length:,} tokens: "
        f"{before:.3f} before training, {after:.3f} after"
    )
    print(f"\nlong demo done: {run / 'model'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
