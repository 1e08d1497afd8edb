"""Packing benchmark: real tokens/s of length-grouped batches vs packed rows, and the loss.

    python -m bench.packing_bench [--quick] [--steps 4] [--rounds 2]
                                  [--out bench/results/packing_bench.json]

1 process, the ~17M "small" tiny Llama (vocab 4,000), alpaca_gpt4_data_en_1k (converted,
cleaned), max length 2048, batch 2 x accumulation 2, sdpa, as bench.train_bench's short-data
run. Each variant runs the training loop's own step (recipes.core.loop.train_step: collate,
engine forward / backward / optimizer step) on a single-process TorchEngine, over the same
first steps of the same batch plan as the recipe; step 1 is a warm-up. Variants (variants()):
the state before issue 13 (length-grouped and packed rows of up to 2,048 tokens, sdpa,
transformers' loss), then the chunked loss, the per-row token cap (TrainData's default: the
longest conversation) and sdpa_packed (one sdpa call per conversation). Variants are
interleaved in rounds (order reversed every other round) against load drift.
"""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import REPO, result_option, write_json
from fastchat_data.options import entry_point, option, parse


@dataclass
class PackingBenchOptions:
    steps: int = option(4, "optimizer steps per variant, the first a warm-up", minimum=2)
    rounds: int = option(2, "interleaved rounds (order reversed every other round)", minimum=1)
    quick: bool = option(False, "a short run", preset={"steps": 3, "rounds": 1})
    out: str = result_option("packing_bench.json")


def model_and_data(max_length: int):
    """The ~17M model and the cleaned alpaca_gpt4_data_en_1k sample, tokenized (cached after
    the first call): (model folder, dataset in numpy format, pad id)."""
    import tempfile

    from transformers import AutoTokenizer

    from fastchat_data.build import build_dataset
    from fastchat_data.commands import clean, convert
    from fastchat_data.tiny import reference_corpus, shared_data_dir, tiny_model

    cache = REPO / ".cache"
    model = tiny_model("llama", "small", texts=reference_corpus(), vocab_size=4000, cache_dir=cache)
    with (
        tempfile.TemporaryDirectory() as tmp,
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        convert(str(shared_data_dir() / "alpaca_gpt4_data_en_1k.json"), f"{tmp}/s.json")
        clean(f"{tmp}/s.json", f"{tmp}/c.json")
        ds, _ = build_dataset(
            f"{tmp}/c.json",
            str(model),
            "vicuna_v1.1",
            max_length=max_length,
            cache_dir=str(cache),
            quiet=True,
        )
    tok = AutoTokenizer.from_pretrained(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return model, ds.with_format("numpy"), pad


def variants() -> dict[str, dict]:
    """name -> packing, attention implementation, loss chunk size, per-row token cap."""
    return {
        "grouped, sdpa, HF loss (before)": {"packing": False, "attn": "sdpa", "chunk": 0},
        "packed, sdpa, HF loss (before)": {
            "packing": True,
            "attn": "sdpa",
            "chunk": 0,
            "row_tokens": "capacity",
        },
        "grouped, sdpa, chunked loss": {"packing": False, "attn": "sdpa", "chunk": 512},
        "packed, sdpa, chunked, cap longest": {"packing": True, "attn": "sdpa", "chunk": 512},
        "packed, sdpa_packed, chunked, cap longest": {
            "packing": True,
            "attn": "sdpa_packed",
            "chunk": 512,
        },
    }


def measure(spec: dict, ds, model_dir: Path, *, pad: int, p: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from bench import loop_run
    from recipes.core.attention import register
    from recipes.core.data import BatchPlan, TrainData
    from recipes.core.loop import train_step
    from recipes.core.recipe import TrainConfig

    cfg = TrainConfig(
        model_max_length=p["max_length"],
        per_device_train_batch_size=p["batch"],
        gradient_accumulation_steps=p["accum"],
        packing=spec["packing"],
        strategy="single",
        loss_chunk_size=spec["chunk"],
        learning_rate=2e-5,
        report_to="none",
    )
    rows = p["max_length"] if spec.get("row_tokens") == "capacity" else None
    data = TrainData(ds, cfg.packing, cfg.model_max_length, pad_id=pad, row_tokens=rows)
    plan = BatchPlan(data.lengths, data.trained, cfg, world_size=1)
    torch.manual_seed(0)
    register()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=spec["attn"]
    )
    run = loop_run(cfg, model, data, plan=plan, total_steps=p["steps"])
    times, tokens = [], []
    for step in range(p["steps"]):
        run.step = step
        t0 = time.perf_counter()
        out = train_step(run)
        times.append(time.perf_counter() - t0)
        tokens.append(out["tokens"])
    secs, real = sum(times[1:]), sum(tokens[1:])
    return {
        "real_tokens_per_s": real / secs,
        "row_tokens": data.row_tokens,
        "units": len(data.units),
        "real_tokens": real,
        "seconds": round(secs, 2),
    }


@entry_point
def main(argv: list[str] | None = None) -> int:
    opts = parse(
        PackingBenchOptions, argv, prog="python -m bench.packing_bench", description=__doc__
    )
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    p = {"max_length": 2048, "batch": 2, "accum": 2, "steps": opts.steps}
    model, ds, pad = model_and_data(p["max_length"])
    names = list(variants())
    rounds: list[dict] = []
    for r in range(opts.rounds):
        row = {}
        for name in names if r % 2 == 0 else names[::-1]:
            row[name] = measure(variants()[name], ds, model, pad=pad, p=p)
            print(
                f"round {r + 1} {name:44} {row[name]['real_tokens_per_s']:>8,.0f} real tok/s",
                flush=True,
            )
        rounds.append(row)
    summary = {}
    base_name = names[0]
    print(
        f"\n{'':44}{'row cap':>8}{'rows':>6}{'real tok/s':>12}{'vs first':>10}  "
        f"(median of {opts.rounds} rounds)"
    )
    for name in names:
        tps = statistics.median(r[name]["real_tokens_per_s"] for r in rounds)
        base = statistics.median(r[base_name]["real_tokens_per_s"] for r in rounds)
        first = rounds[0][name]
        summary[name] = {
            "real_tokens_per_s": tps,
            "vs_first": tps / base,
            "row_tokens": first["row_tokens"],
            "units": first["units"],
        }
        cap = first["row_tokens"] or "-"
        print(f"{name:44}{cap:>8}{first['units']:>6}{tps:>12,.0f}{tps / base:>9.2f}x")
    write_json(opts.out, {"settings": p, "rounds": rounds, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
