"""Two source trees on the same machine, one run: the training throughput of an old tree (before
a restructure) against this one, interleaved, so that a change of machine load hits both alike.

    python -m bench.compare_trees --baseline /work/baseline [--rounds 3] [--steps 4]
    make bench-compare BASELINE=/work/baseline

The measurement is bench.packing_bench's core, run by each tree's OWN bench module: the ~17M
"small" tiny Llama on alpaca_gpt4_data_en_1k (converted, cleaned), max length 2048, batch 2 x
accumulation 2, one process, the variant `--variant` (default: length-grouped batches, sdpa,
chunked loss: the full fine-tune's defaults). `packing_bench.measure` builds that tree's
config, engine and Run and times that tree's `recipes.core.loop.train_step` (collate, forward,
backward, optimizer step); step 1 is a warm-up. So everything measured is the tree's own code:
its loop, engine, objective, loss, data collation.

Each measurement is a fresh process with PYTHONPATH and cwd set to its tree (the process checks
that it imported that tree's `recipes` and `bench`). Rounds alternate the order (old, new; then
new, old; ...). Per round the ratio new / old is taken; the table shows each side's median and
spread (min - max) and the median ratio with its range over rounds. Nothing is written into the
baseline tree: the tiny model and the tokenized data are cached under .cache/compare_trees/<side>
of this tree, and Python writes no bytecode there (PYTHONDONTWRITEBYTECODE).

Target: the new tree within 3% of the old (median ratio >= 0.97).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import write_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VARIANT = "grouped, sdpa, chunked loss"
METRICS = ("steps_per_s", "real_tokens_per_s")
TARGET = 0.97

# Run inside the measured tree (its bench.packing_bench, its recipes); prints one JSON line.
CHILD = """
import json, sys
from pathlib import Path

spec = json.loads(sys.argv[1])
import torch

import bench.packing_bench as pb
import recipes

tree = Path(spec["tree"]).resolve()
for mod in (pb, recipes):
    if tree not in Path(mod.__file__).resolve().parents:
        sys.exit(f"{mod.__name__} came from {mod.__file__}, not from {tree}")
pb.REPO = Path(spec["cache_root"])  # model_and_data caches under REPO/.cache: outside the tree
torch.set_num_threads(spec["threads"])
model, ds, pad = pb.model_and_data(spec["p"]["max_length"])
out = pb.measure(pb.variants()[spec["variant"]], ds, model, pad, spec["p"])
print("RESULT " + json.dumps(out))
"""


def tree_commit(tree: Path) -> str | None:
    res = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return res.stdout.strip() or None if res.returncode == 0 else None


def measure(side: str, tree: Path, spec: dict, timeout: float) -> dict:
    """One fresh process in `tree`: steps/s and real tokens/s of its training step."""
    cache_root = REPO / ".cache" / "compare_trees" / side
    cache_root.mkdir(parents=True, exist_ok=True)
    child = {**spec, "tree": str(tree), "cache_root": str(cache_root)}
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": str(spec["threads"]),
        "PYTHONUNBUFFERED": "1",
    }
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(child)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    wall = time.perf_counter() - t0
    lines = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"{side} ({tree}) failed ({res.returncode}):\n{res.stderr[-3000:]}")
    out = json.loads(lines[-1][len("RESULT ") :])
    timed = spec["p"]["steps"] - 1  # step 1 is measure()'s warm-up
    return {
        "steps_per_s": timed / out["seconds"],
        "real_tokens_per_s": out["real_tokens_per_s"],
        "real_tokens": out["real_tokens"],
        "seconds": out["seconds"],
        "wall_s": round(wall, 1),
    }


def summarize(rounds: list[dict]) -> dict:
    summary = {}
    for m in METRICS:
        old = [r["old"][m] for r in rounds]
        new = [r["new"][m] for r in rounds]
        ratios = [r["new"][m] / r["old"][m] for r in rounds]
        summary[m] = {
            "old_median": statistics.median(old),
            "old_min": min(old),
            "old_max": max(old),
            "new_median": statistics.median(new),
            "new_min": min(new),
            "new_max": max(new),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "ratios": ratios,
        }
    return summary


def report(res: dict) -> None:
    s, p = res["settings"], res["settings"]["p"]
    print(
        f"\n== old {s['baseline']} ({s['baseline_commit']}) vs new {s['new']} "
        f"({s['new_commit']}): {s['variant']}, 1 process, {s['threads']} thread(s), "
        f"max length {p['max_length']}, batch {p['batch']} x {p['accum']}, "
        f"{p['steps'] - 1} timed steps after 1 warm-up, {len(res['rounds'])} interleaved rounds"
    )
    print(
        f"{'':20}{'old median':>12}{'(min - max)':>20}{'new median':>12}{'(min - max)':>20}"
        f"{'new/old':>9}{'(min - max)':>16}"
    )
    for m in METRICS:
        x = res["summary"][m]
        old_range = f"{x['old_min']:,.2f} - {x['old_max']:,.2f}"
        new_range = f"{x['new_min']:,.2f} - {x['new_max']:,.2f}"
        ratio_range = f"{x['ratio_min']:.3f} - {x['ratio_max']:.3f}"
        print(
            f"{m:20}{x['old_median']:>12,.2f}{old_range:>20}{x['new_median']:>12,.2f}"
            f"{new_range:>20}{x['ratio_median']:>9.3f}{ratio_range:>16}"
        )
    ratio = res["summary"]["real_tokens_per_s"]["ratio_median"]
    verdict = "met" if ratio >= TARGET else "NOT met"
    print(
        f"target: new within {1 - TARGET:.0%} of old (median ratio >= {TARGET}): {verdict} "
        f"({ratio:.3f}); same real tokens trained on both sides: {res['same_tokens']}"
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--baseline",
        default=os.environ.get("BASELINE"),
        required="BASELINE" not in os.environ,
        help="the old tree (a checkout with its own bench/packing_bench.py); env BASELINE",
    )
    ap.add_argument("--new", default=str(REPO), help="the new tree (default: this one)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (at least 3)")
    ap.add_argument("--steps", type=int, default=4, help="steps per run, the first a warm-up")
    ap.add_argument("--variant", default=DEFAULT_VARIANT, help="a bench.packing_bench variant")
    ap.add_argument("--max_length", type=int, default=2048)
    # one thread: on a shared machine a second thread waits on whichever core is busy
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per measurement")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "compare_trees.json"))
    a = ap.parse_args(argv)
    if a.rounds < 1 or a.steps < 2:
        ap.error("--rounds >= 1 and --steps >= 2 (the first step is a warm-up)")
    trees = {"old": Path(a.baseline).resolve(), "new": Path(a.new).resolve()}
    for side, tree in trees.items():
        if not (tree / "bench" / "packing_bench.py").is_file():
            ap.error(f"{side} tree {tree}: no bench/packing_bench.py")
    from bench.packing_bench import variants

    if a.variant not in variants():
        ap.error(f"--variant: one of {', '.join(map(repr, variants()))}")
    p = {"max_length": a.max_length, "batch": 2, "accum": 2, "steps": a.steps}
    spec = {"p": p, "variant": a.variant, "threads": a.threads}
    t_start = time.perf_counter()
    rounds = []
    for r in range(a.rounds):
        row = {}
        for side in ("old", "new") if r % 2 == 0 else ("new", "old"):
            row[side] = m = measure(side, trees[side], spec, a.timeout)
            print(
                f"round {r + 1} {side}: {m['steps_per_s']:.3f} steps/s, "
                f"{m['real_tokens_per_s']:,.1f} real tok/s ({m['wall_s']:.0f} s)",
                flush=True,
            )
        rounds.append(row)
    res = {
        "settings": {
            "baseline": str(trees["old"]),
            "baseline_commit": tree_commit(trees["old"]),
            "new": str(trees["new"]),
            "new_commit": tree_commit(trees["new"]),
            "variant": a.variant,
            "threads": a.threads,
            "p": p,
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
            "command": " ".join(["python -m bench.compare_trees", *(argv or sys.argv[1:])]),
        },
        "rounds": rounds,
        "summary": summarize(rounds),
        "same_tokens": len({r[s]["real_tokens"] for r in rounds for s in r}) == 1,
        "target_met": None,
    }
    res["target_met"] = res["summary"]["real_tokens_per_s"]["ratio_median"] >= TARGET
    res["settings"]["wall_s"] = round(time.perf_counter() - t_start, 1)
    report(res)
    write_json(a.out, res)
    return res


if __name__ == "__main__":
    main()
