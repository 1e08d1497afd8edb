"""Sequence-parallel benchmark: the longest row a rank can train at fixed memory, sp=1 vs sp=2.

    python -m bench.sp_bench [--lengths 2048,4096] [--out bench/results/sp_bench.json]

Each run is recipes/full_finetune.py under torchrun with FSDP2, as users start it: one process
(sp=1) or two sharing each row (--sequence_parallel_size 2), fp32 on CPU, one step of one row
(the identity conversations joined into rows longer than the longest length, cut to
--model_max_length), no activation checkpointing. Per run: each rank's measured peak RSS of
the train phase (OUT/ranks/rank*.json, VmHWM reset between phases; MALLOC_MMAP_THRESHOLD_
as bench/memory_bench.py sets it, so RSS tracks the memory in use).

The row: per rank, the measured bytes each further token of a row costs (the slope of the
train-phase peak between the two lengths: model states and the runtime cancel out), and from
it, at the per-rank memory sp=1 needed for the longer length, the longest row sp=2 trains
(extrapolated along its own measured slope), then measured: sp=2 run at that length, its peak
against the budget. The planner's prediction of the slope (recipes/plan.py: activations,
logits, all-to-all buffers) stands beside the measured one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import REPO, recipe_flags, result_option
from fastchat_data.options import UsageError, entry_point, option, parse

BIN = Path(sys.executable).parent
MB = 2**20
# ~3.2M parameters: enough activation per token (88 KB fp32 over 4 layers) that the slope
# stands far above the allocator's noise, small enough for a CPU
SHAPE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4)


@dataclass
class SPBenchOptions:
    lengths: str = option("2048,4096", "two row lengths (tokens), comma-separated")
    out: str = result_option("sp_bench.json")
    work: str = option(
        str(REPO / ".cache" / "sp_bench"),
        "working folder: the model, the rows, the tokenized cache, each run's output",
    )


def long_rows(folder: Path, per: int = 100, rows: int = 4) -> Path:
    from fastchat_data.identity import long_identity_conversations
    from fastchat_data.io import write_records

    path = folder / "long.json"
    write_records(path, long_identity_conversations(n=per * rows, per=per))
    return path


def run(model: Path, data: Path, cache: Path, *, out: Path, length: int, sp: int) -> dict:
    args = recipe_flags(
        model,
        data,
        cache,
        max_length=length,
        batch=1,
        accum=1,
        steps=1,
        output_dir=out,
        group_by_length=False,
        sequence_parallel_size=sp,
    )
    recipe = [str(REPO / "recipes" / "full_finetune.py"), "--strategy", "fsdp"]
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(sp), *recipe]
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO),
    }
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time (never a resumed one)
    t0 = time.perf_counter()
    res = subprocess.run(
        [*cmd, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=3600
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.txt").write_text(res.stdout + "\n--- stderr ---\n" + res.stderr)
    if res.returncode:
        raise SystemExit(f"{cmd} failed:\n{res.stderr[-3000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank*.json"))]
    return {
        "length": length,
        "sp": sp,
        "train_peak_mb": [r["phase_peak_rss_mb"]["train"] for r in ranks],
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def planned_slope(model: Path, sp: int, lengths: list[int]) -> float:
    """The planner's per-rank bytes per token of a row (what grows with the length)."""
    from recipes import plan as P

    shape = P.Shape.from_config(str(model / "config.json"))
    a, b = lengths

    def grows(seq):
        return (
            P.activation_bytes(shape, seq, 1, p=4, checkpointing=False, sp=sp)
            + P.logits_bytes(shape, seq, 1, p=4, chunk=512, sp=sp)
            + P.all_to_all_bytes(shape, seq, 1, p=4, sp=sp)
        )

    return (grows(b) - grows(a)) / (b - a)


@entry_point
def main(argv: list[str] | None = None) -> int:
    opts = parse(SPBenchOptions, argv, prog="python -m bench.sp_bench", description=__doc__)
    try:
        lengths = sorted(int(x) for x in opts.lengths.split(","))
    except ValueError:
        raise UsageError(f"--lengths: two integers, got {opts.lengths!r}") from None
    if len(lengths) != 2:
        raise UsageError("--lengths: give two lengths")
    from fastchat_data.tiny import reference_corpus, tiny_model

    work = Path(opts.work)
    work.mkdir(parents=True, exist_ok=True)
    model = tiny_model("llama", SHAPE, texts=reference_corpus(), cache_dir=work)
    data = long_rows(work)
    runs = [
        run(model, data, work / "cache", out=work / f"sp{sp}_{n}", length=n, sp=sp)
        for sp in (1, 2)
        for n in lengths
    ]
    a, b = lengths
    result = {"model": SHAPE, "lengths": lengths, "runs": runs, "rows": {}}
    for sp in (1, 2):
        at = {r["length"]: max(r["train_peak_mb"]) for r in runs if r["sp"] == sp}
        slope = (at[b] - at[a]) * MB / (b - a)
        result["rows"][sp] = {
            "peak_mb": at,
            "bytes_per_token": round(slope),
            "planned_bytes_per_token": round(planned_slope(model, sp, lengths)),
        }
    budget = result["rows"][1]["peak_mb"][b]  # what sp=1 needs per rank for the longer row
    two = result["rows"][2]
    longest = b + (budget - two["peak_mb"][b]) * MB / two["bytes_per_token"]
    result["budget_mb"] = budget
    result["longest_at_budget"] = {1: b, 2: int(longest)}
    # and measured there: sp=2 at that length (a multiple of 2)
    check = run(
        model, data, work / "cache", out=work / "sp2_check", length=int(longest) // 2 * 2, sp=2
    )
    result["runs"].append(check)
    result["check"] = {"length": check["length"], "peak_mb": max(check["train_peak_mb"])}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=1))
    print(f"per-rank train peak (MB) at {a} / {b} tokens, bytes per token (measured / planned):")
    for sp in (1, 2):
        r = result["rows"][sp]
        print(
            f"  sp={sp}: {r['peak_mb'][a]:.0f} / {r['peak_mb'][b]:.0f} MB, "
            f"{r['bytes_per_token']:,} / {r['planned_bytes_per_token']:,} B/token"
        )
    print(
        f"longest row at {budget:.0f} MB per rank: sp=1 {b:,} tokens, sp=2 ~{int(longest):,} "
        "tokens (extrapolated along its measured slope); "
        f"measured at {check['length']:,}: {result['check']['peak_mb']:.0f} MB per rank"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
