"""torch.compile benchmark: training steps/s of the ~17M tiny Llama, eager vs --compile True.

    python -m bench.compile_bench [--quick] [--steps 6] [--warmup 3] [--rounds 2]
                                  [--out bench/results/compile_bench.json]

1 process on CPU (inductor's C++ backend), the ~17M "small" tiny Llama (vocab 4,000) on
alpaca_gpt4_data_en_1k (converted, cleaned), max length 2048, batch 2 x accumulation 2,
length-grouped batches, sdpa, chunked loss: bench.packing_bench's "grouped, sdpa, chunked loss"
setting. Each measurement is a fresh process (this module in worker mode) with an empty
inductor cache, so every compiled run pays the full, cold compile. It runs the training loop's
own step (recipes.core.loop.train_step) on a single-process TorchEngine, compiling the decoder
layers exactly as recipes/full_finetune.py does (recipes.core.compile.compile_layers).

- warm-up: the first `--warmup` steps. They hold the compilation: the first forward compiles
  the layers for static shapes, the first batch of another length recompiles them with dynamic
  shapes (dynamo's automatic dynamic shapes). compile time = compiled warm-up seconds - eager
  warm-up seconds (same batches); dynamo's own count of compile seconds is reported beside it.
- steady state: the next `--steps` steps, steps/s and real tokens/s; the graphs compiled during
  them are counted (0 means the measured steps ran compiled code only).
Eager and compiled alternate within a round, the order reversed every other round (load drift).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

from bench import result_option, worker_result, write_json
from bench.packing_bench import model_and_data
from fastchat_data.options import entry_point, option, parse

VARIANTS = ("eager", "compiled")


@dataclass
class CompileBenchOptions:
    steps: int = option(6, "measured steps (after the warm-up)", minimum=1)
    warmup: int = option(3, "steps that hold the compilation", minimum=1)
    rounds: int = option(2, "rounds, eager and compiled alternating within each", minimum=1)
    quick: bool = option(False, "a short run", preset={"steps": 2, "warmup": 2, "rounds": 1})
    out: str = result_option("compile_bench.json")
    worker: str | None = option(
        None, "internal: run one measurement from a JSON [variant, settings] and print it"
    )


def settings(opts: CompileBenchOptions) -> dict:
    return {
        "max_length": 2048,
        "batch": 2,
        "accum": 2,
        "warmup": opts.warmup,
        "steps": opts.steps,
        "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)),
    }


def worker(variant: str, p: dict) -> dict:
    """One measurement, in this (fresh) process."""
    import torch
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    from bench import loop_run
    from recipes.core.compile import compile_layers
    from recipes.core.data import BatchPlan, TrainData
    from recipes.core.loop import train_step
    from recipes.core.recipe import TrainConfig

    torch.set_num_threads(p["threads"])
    model_dir, ds, pad = model_and_data(p["max_length"])
    total = p["warmup"] + p["steps"]
    cfg = TrainConfig(
        model_max_length=p["max_length"],
        per_device_train_batch_size=p["batch"],
        gradient_accumulation_steps=p["accum"],
        strategy="single",
        learning_rate=2e-5,
        report_to="none",
        compile=variant == "compiled",
    )
    data = TrainData(ds, cfg.packing, cfg.model_max_length, pad_id=pad)
    plan = BatchPlan(data.lengths, data.trained, cfg, world_size=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    with contextlib.redirect_stdout(io.StringIO()) as note:
        compile_layers(model, cfg)
        run = loop_run(cfg, model, data, plan=plan, total_steps=total)
        times, tokens, losses, graphs = [], [], [], []
        for step in range(total):
            run.step = step
            t0 = time.perf_counter()
            out = train_step(run)
            times.append(time.perf_counter() - t0)
            tokens.append(out["tokens"])
            losses.append(out["loss"])
            graphs.append(counters["stats"]["unique_graphs"])
    w, s = p["warmup"], p["steps"]
    compile_s = sum(
        sum(v)
        for k, v in torch._dynamo.utils.compilation_time_metrics.items()
        if k.endswith("compile_inner") or k.endswith("bw_compiler")  # backward: at 1st backward
    )
    return {
        "warmup_s": round(sum(times[:w]), 3),
        "steady_s": round(sum(times[w:]), 3),
        "steps_per_s": s / sum(times[w:]),
        "real_tokens_per_s": sum(tokens[w:]) / sum(times[w:]),
        "step_s": [round(t, 3) for t in times],
        "losses": losses,
        "graphs_compiled": graphs[-1],
        "graphs_compiled_in_steady_state": graphs[-1] - graphs[w - 1],
        "dynamo_compile_s": round(compile_s, 2),
        "graph_breaks": sum(counters["graph_break"].values()),
        "note": note.getvalue().strip(),
    }


def measure(variant: str, p: dict) -> dict:
    """`worker` in a fresh process with an empty inductor cache (a cold compile every time)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": str(p["threads"])}
        return worker_result(
            "bench.compile_bench", [json.dumps([variant, p])], env, what=f"{variant} worker"
        )


@entry_point
def main(argv: list[str] | None = None) -> int:
    opts = parse(
        CompileBenchOptions, argv, prog="python -m bench.compile_bench", description=__doc__
    )
    if opts.worker:
        variant, p = json.loads(opts.worker)
        print(json.dumps(worker(variant, p)))
        return 0
    p = settings(opts)
    # build (or find) the model and the tokenized data once, untimed
    model_and_data(p["max_length"])
    rounds: list[dict] = []
    for r in range(opts.rounds):
        row = {}
        for name in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            row[name] = m = measure(name, p)
            print(
                f"round {r + 1} {name:9} {m['steps_per_s']:.3f} steps/s  "
                f"{m['real_tokens_per_s']:,.0f} real tok/s  warm-up {m['warmup_s']:.1f} s",
                flush=True,
            )
        rounds.append(row)
    med = {
        n: {
            k: statistics.median(r[n][k] for r in rounds)
            for k in ("steps_per_s", "real_tokens_per_s", "warmup_s", "dynamo_compile_s")
        }
        for n in VARIANTS
    }
    compile_s = statistics.median(
        r["compiled"]["warmup_s"] - r["eager"]["warmup_s"] for r in rounds
    )
    loss_diff = max(
        abs(a - b) for r in rounds for a, b in zip(r["eager"]["losses"], r["compiled"]["losses"])
    )
    summary = {
        "eager_steps_per_s": med["eager"]["steps_per_s"],
        "compiled_steps_per_s": med["compiled"]["steps_per_s"],
        "speedup": med["compiled"]["steps_per_s"] / med["eager"]["steps_per_s"],
        "eager_real_tokens_per_s": med["eager"]["real_tokens_per_s"],
        "compiled_real_tokens_per_s": med["compiled"]["real_tokens_per_s"],
        "compile_s": compile_s,
        "dynamo_compile_s": med["compiled"]["dynamo_compile_s"],
        "graphs_compiled": rounds[0]["compiled"]["graphs_compiled"],
        "graphs_compiled_in_steady_state": max(
            r["compiled"]["graphs_compiled_in_steady_state"] for r in rounds
        ),
        "graph_breaks": max(r["compiled"]["graph_breaks"] for r in rounds),
        "compile_note": rounds[0]["compiled"]["note"],
        "max_loss_diff": loss_diff,
    }
    print(
        f"\n{'':10}{'steps/s':>9}{'real tok/s':>12}{'warm-up s':>11}  "
        f"(median of {opts.rounds} rounds; {p['steps']} steps after {p['warmup']} warm-up)"
    )
    for n in VARIANTS:
        m = med[n]
        print(
            f"{n:10}{m['steps_per_s']:>9.3f}{m['real_tokens_per_s']:>12,.0f}{m['warmup_s']:>11.1f}"
        )
    print(
        f"speed-up {summary['speedup']:.2f}x; compile time {compile_s:.1f} s (compiled - eager "
        f"warm-up; dynamo counts {summary['dynamo_compile_s']:.1f} s); "
        f"{summary['graphs_compiled']} graph(s), {summary['graphs_compiled_in_steady_state']} "
        f"compiled during the measured steps, {summary['graph_breaks']} graph break(s); "
        f"max |loss eager - compiled| {loss_diff:.2e}"
    )
    print(summary["compile_note"])
    write_json(opts.out, {"settings": p, "rounds": rounds, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
