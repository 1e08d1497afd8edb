"""Two source trees on the same machine, one run: the training throughput of an old tree (before
a restructure) against this one, interleaved step by step, so that a change of machine load
hits both alike.

    python -m bench.compare_trees --baseline /work/baseline [--rounds 8]
    make bench-compare BASELINE=/work/baseline

The measurement is bench.packing_bench's core, run by each tree's OWN bench module: the ~17M
"small" tiny Llama on alpaca_gpt4_data_en_1k (converted, cleaned), max length 2048, batch 2 x
accumulation 2, one process per tree, the variant `--variant` (default: length-grouped batches,
sdpa, chunked loss: the full fine-tune's defaults). The tree's `packing_bench.measure` builds
that tree's config, engine and Run and calls that tree's `recipes.core.loop.train_step`
(collate, forward, backward, optimizer step), so everything timed is the tree's own code.

Interleaving: both trees' processes start together and set up (model, data, engine: untimed),
then take turns. Each tree's `train_step` is wrapped (measure imports it from recipes.core.loop
when called, as bench/peers_bench.py relies on) so that it waits for the driver's word before
each step and reports the step's seconds and real tokens after it; while one tree steps, the
other waits idle. Round r is step r in both trees: the same global batch (the batch plan is a
function of the seed), old then new, new then old in the next round, and so on. Round 0 is the
warm-up and is not counted. Per round the ratio new / old is taken; the table shows each
side's median and range over rounds and the median ratio with its range.

Each process runs with PYTHONPATH and cwd set to its tree and checks that it imported that
tree's `recipes` and `bench`. Nothing is written into either tree's sources: the tiny model and
the tokenized data are cached under .cache/compare_trees/<side> of this tree, and Python writes
no bytecode (PYTHONDONTWRITEBYTECODE).

The work of each round is the same on both sides (same batch, same model: "same batches" in
the report checks the token counts). The losses agree at the warm-up step; from the next step
on they may differ where the trees' schedules differ (6496c84 rounded the warm-up steps down,
the skeleton rounds them up as Trainer does), which changes the numbers, not the work.

Target: the new tree within 3% of the old (median real tokens/s ratio >= 0.97).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import REPO, result_option, write_json
from fastchat_data.options import UsageError, entry_point, option, parse

DEFAULT_VARIANT = "grouped, sdpa, chunked loss"
METRICS = ("steps_per_s", "real_tokens_per_s")
TARGET = 0.97


@dataclass
class CompareTreesOptions:
    baseline: str | None = option(
        None, "the old tree (a checkout with its own bench/packing_bench.py); env BASELINE"
    )
    new: str = option(str(REPO), "the new tree (default: this one)")
    rounds: int = option(8, "interleaved rounds (timed steps), at least 3", minimum=3)
    variant: str = option(DEFAULT_VARIANT, "a bench.packing_bench variant")
    max_length: int = option(2048, "row length (tokens)", minimum=16)
    # one thread: on a shared machine a second thread waits on whichever core is busy
    threads: int = option(1, "torch threads per process", minimum=1)
    out: str = result_option("compare_trees.json")


# Runs inside the measured tree (its bench.packing_bench, its recipes). Protocol on stdout:
# "STEP {json}" after each step; before each step it reads one line ("go") from stdin.
CHILD = """
import json, sys, time
from pathlib import Path

spec = json.loads(sys.argv[1])
import torch

import bench.packing_bench as pb
import recipes
from recipes.core import loop

tree = Path(spec["tree"]).resolve()
for mod in (pb, recipes, loop):
    if tree not in Path(mod.__file__).resolve().parents:
        sys.exit(f"{mod.__name__} came from {mod.__file__}, not from {tree}")
pb.REPO = Path(spec["cache_root"])  # model_and_data caches under REPO/.cache: outside the tree
torch.set_num_threads(spec["threads"])
model, ds, pad = pb.model_and_data(spec["p"]["max_length"])
inner = loop.train_step


def paced(run):
    if sys.stdin.readline().strip() != "go":
        sys.exit("stopped by the driver")
    t0 = time.perf_counter()
    out = inner(run)
    seconds = time.perf_counter() - t0
    row = {"step": run.step, "seconds": seconds, "tokens": out["tokens"], "loss": out["loss"],
           "grad_norm": out["grad_norm"]}
    print("STEP " + json.dumps(row), flush=True)
    return out


loop.train_step = paced
print("READY", flush=True)
pb.measure(pb.variants()[spec["variant"]], ds, model, pad=pad, p=spec["p"])
"""


def tree_commit(tree: Path) -> str | None:
    res = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return (res.stdout.strip() or None) if res.returncode == 0 else None


class Tree:
    """One tree's training process: set up once, then one step whenever asked."""

    def __init__(self, side: str, tree: Path, spec: dict, *, logs: Path):
        self.side, self.tree = side, tree
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
        self.log = logs / f"{side}.log"
        self._err = open(self.log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(child)],
            cwd=tree,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
        )

    def _line(self, prefix: str) -> str:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                tail = self.log.read_text()[-3000:]
                raise RuntimeError(
                    f"{self.side} ({self.tree}) stopped ({self.proc.returncode}):\n{tail}"
                )
            if line.startswith(prefix):
                return line[len(prefix) :].strip()

    def ready(self) -> None:
        self._line("READY")

    def step(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return json.loads(self._line("STEP "))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._err.close()


def summarize(rounds: list[dict]) -> dict:
    """Per metric: each side's median and range over rounds, the per-round ratios new / old
    (median and range), and the pooled ratio (all timed steps' totals)."""
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
            "ratio_quartiles": statistics.quantiles(ratios, n=4),
            "ratios": [round(x, 4) for x in ratios],
        }
    total = {
        side: (sum(r[side]["tokens"] for r in rounds), sum(r[side]["seconds"] for r in rounds))
        for side in ("old", "new")
    }
    summary["pooled"] = {
        side: {"steps_per_s": len(rounds) / secs, "real_tokens_per_s": tokens / secs}
        for side, (tokens, secs) in total.items()
    }
    summary["pooled"]["ratio"] = total["old"][1] / total["new"][1]  # same steps, same tokens
    return summary


def report(res: dict) -> None:
    s, p = res["settings"], res["settings"]["p"]
    print(
        f"\n== old {s['baseline']} ({s['baseline_commit']}) vs new {s['new']} "
        f"({s['new_commit']}): {s['variant']}, 1 process each, {s['threads']} thread(s), "
        f"max length {p['max_length']}, batch {p['batch']} x {p['accum']}; "
        f"{len(res['rounds'])} interleaved rounds of one step (after 1 warm-up step)"
    )
    print(
        f"{'':18}{'old median':>11}{'(min - max)':>18}{'new median':>11}{'(min - max)':>18}"
        f"{'new/old':>9}{'(min - max)':>16}"
    )
    for m in METRICS:
        x = res["summary"][m]
        old_range = f"{x['old_min']:,.3g} - {x['old_max']:,.3g}"
        new_range = f"{x['new_min']:,.3g} - {x['new_max']:,.3g}"
        ratio_range = f"{x['ratio_min']:.3f} - {x['ratio_max']:.3f}"
        print(
            f"{m:18}{x['old_median']:>11,.3g}{old_range:>18}{x['new_median']:>11,.3g}"
            f"{new_range:>18}{x['ratio_median']:>9.3f}{ratio_range:>16}"
        )
    pooled = res["summary"]["pooled"]
    print(
        f"pooled over all timed steps: old {pooled['old']['real_tokens_per_s']:,.1f}, new "
        f"{pooled['new']['real_tokens_per_s']:,.1f} real tok/s, new/old {pooled['ratio']:.3f}"
    )
    q1, _, q3 = res["summary"]["real_tokens_per_s"]["ratio_quartiles"]
    print(f"new/old per round, middle half: {q1:.3f} - {q3:.3f}")
    ratio = res["summary"]["real_tokens_per_s"]["ratio_median"]
    verdict = "met" if ratio >= TARGET else "NOT met"
    print(
        f"target: new within {1 - TARGET:.0%} of old (median ratio >= {TARGET}): {verdict} "
        f"({ratio:.3f}); same batches on both sides: {res['same_tokens']}, "
        f"same losses: {res['same_losses']}"
    )


@entry_point
def main(argv: list[str] | None = None) -> int:
    opts = parse(
        CompareTreesOptions, argv, prog="python -m bench.compare_trees", description=__doc__
    )
    baseline = opts.baseline if opts.baseline is not None else os.environ.get("BASELINE")
    if baseline is None:
        raise UsageError("--baseline: the old tree is needed (or env BASELINE)")
    if opts.rounds < 3:
        raise UsageError("--rounds: at least 3")
    trees = {"old": Path(baseline).resolve(), "new": Path(opts.new).resolve()}
    for side, tree in trees.items():
        if not (tree / "bench" / "packing_bench.py").is_file():
            raise UsageError(f"{side} tree {tree}: no bench/packing_bench.py")
    from bench.packing_bench import variants

    if opts.variant not in variants():
        raise UsageError(f"--variant: one of {', '.join(map(repr, variants()))}")
    p = {"max_length": opts.max_length, "batch": 2, "accum": 2, "steps": opts.rounds + 1}
    spec = {"p": p, "variant": opts.variant, "threads": opts.threads}
    t_start, load_before = time.perf_counter(), os.getloadavg()
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="compare_trees-") as logs:
        procs = {side: Tree(side, tree, spec, logs=Path(logs)) for side, tree in trees.items()}
        try:
            for proc in procs.values():
                proc.ready()
            print("both trees set up; round 0 is the warm-up", flush=True)
            for r in range(opts.rounds + 1):
                row = {}
                for side in ("old", "new") if r % 2 == 0 else ("new", "old"):
                    m = procs[side].step()
                    m["steps_per_s"] = 1 / m["seconds"]
                    m["real_tokens_per_s"] = m["tokens"] / m["seconds"]
                    row[side] = m
                ratio = row["new"]["real_tokens_per_s"] / row["old"]["real_tokens_per_s"]
                print(
                    f"round {r}{' (warm-up)' if r == 0 else ''}: "
                    + ", ".join(
                        f"{side} {row[side]['seconds']:.2f} s ({row[side]['tokens']} tokens)"
                        for side in ("old", "new")
                    )
                    + f", new/old {ratio:.3f}",
                    flush=True,
                )
                if r:
                    rounds.append(row)
                else:
                    warmup = row
        finally:
            for proc in procs.values():
                proc.close()
    res = {
        "settings": {
            "baseline": str(trees["old"]),
            "baseline_commit": tree_commit(trees["old"]),
            "new": str(trees["new"]),
            "new_commit": tree_commit(trees["new"]),
            "variant": opts.variant,
            "threads": opts.threads,
            "p": p,
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "command": " ".join(["python -m bench.compare_trees", *(argv or sys.argv[1:])]),
        },
        "warmup": warmup,
        "rounds": rounds,
        "summary": summarize(rounds),
        "same_tokens": all(r["old"]["tokens"] == r["new"]["tokens"] for r in rounds),
        "same_losses": all(abs(r["old"]["loss"] - r["new"]["loss"]) < 1e-4 for r in rounds),
    }
    res["target_met"] = res["summary"]["real_tokens_per_s"]["ratio_median"] >= TARGET
    res["settings"]["wall_s"] = round(time.perf_counter() - t_start, 1)
    report(res)
    write_json(opts.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
