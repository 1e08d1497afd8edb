"""Memory benchmark: the planner's CPU prediction (recipes/plan.py --device cpu) against the
measured peak RSS of each rank of the real recipe, per phase (load, train, export).

    python -m bench.memory_bench [--quick] [--out bench/results/memory_bench.json]

Models: tiny Llamas with the shared 4,000-token tokenizer (fastchat_data/tiny.py): "small"
(~17M), "base" (~91M) and "large" (~471M: hidden 1,024, intermediate 2,816, 36 layers, 16
heads). Strategies ddp, fsdp, fsdp_offload, zero2, zero3 at 2 ranks (and 4 ranks for small);
--quick runs only the small rows. Each run is recipes/full_finetune.py as users start it
(torchrun, or the deepspeed launcher), fp32 on CPU, 2 steps of batch 1 at 128 tokens (the
cleaned ShareGPT sample, whose conversations fill the 128 tokens), then the export. Each rank
writes `phase_peak_rss_mb` {load, train, export} to OUT/ranks/rank*.json (recipes/core/loop.py:
VmHWM reset between phases); without that key every phase falls back to the whole-run
`peak_rss_mb`.

glibc keeps freed heap in RSS; the runs set MALLOC_MMAP_THRESHOLD_=65536 so that large blocks go
back to the OS when freed and RSS tracks the memory in use, which is what the planner predicts
(bench/train_bench.py does the same). One run at a time; a run the planner predicts not to fit
in the machine's available memory is skipped and reported, never started.

Targets (issue 10): the planner within 15% of the measured training peak of every rank; the sum
over ranks of the load-phase peak at most 1.3 fp32 model copies plus the ranks' runtime; ZeRO-3's
per-rank peak within 1.2x of FSDP2's.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bench import REPO, recipe_flags, result_option, write_and_report
from fastchat_data.options import UsageError, entry_point, option, parse
from recipes.core import parallel

BIN = Path(sys.executable).parent
MB = 2**20
SEQ, STEPS = 128, 2
STRATEGIES = ("ddp", "fsdp", "fsdp_offload", "zero2", "zero3")  # the default selection
LARGE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=36, num_attention_heads=16)
MODELS = {"small": "small", "base": "base", "large": LARGE}
LIVE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}
PHASES = ("load", "train", "export")


@dataclass
class MemoryBenchOptions:
    quick: bool = option(False, "only the ~17M rows (a few minutes)")
    out: str = result_option("memory_bench.json")
    models: str | None = option(None, "comma-separated subset of small,base,large")
    strategies: str = option(",".join(STRATEGIES), "comma-separated strategies to run")
    rescore: bool = option(False, "no runs: the measurements in --out against the current planner")
    update: bool = option(
        False, "merge these rows into an existing --out (e.g. after a skipped row)"
    )
    loading: Literal["auto", "full", "streaming"] = option(
        "auto", "the planner's loading model; auto: what the recipe does (streaming)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(strategy: str, nproc: int, args: list[str]) -> list[str]:
    recipe = [str(REPO / "recipes" / "full_finetune.py"), "--strategy", strategy, *args]
    if parallel.get(strategy).launcher == "deepspeed":
        return [
            str(BIN / "deepspeed"),
            "--num_gpus",
            str(nproc),
            "--master_port",
            str(_free_port()),
            *recipe,
        ]
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), *recipe]


def mem_available() -> float:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M).group(1)) * 1024


def recipe_args(model: Path, data: Path, cache: Path, *, out: Path) -> list[str]:
    return recipe_flags(
        model,
        data,
        cache,
        max_length=SEQ,
        batch=1,
        accum=1,
        steps=STEPS,
        output_dir=out,
        learning_rate=2e-5,
        logging_steps=1,
    )


def warm_dataset(model: Path, data: Path, cache: Path, *, out: Path) -> None:
    """Tokenize the training set once here, so that no run's rank 0 builds it while measured."""
    from transformers import AutoTokenizer

    from recipes.core.config import load_config
    from recipes.core.data import load_train_set
    from recipes.core.recipe import TrainConfig
    from recipes.core.world import init_world

    cfg, _ = load_config(
        [*recipe_args(model, data, cache, out=out), "--strategy", "single"], TrainConfig
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        load_train_set(
            cfg, str(data), AutoTokenizer.from_pretrained(model), world=init_world("single")
        )


# What the recipe does: recipes/core/loading.py loads sharded (each rank its own rows) wherever
# the strategy declares `sharded_load`, a full copy per rank elsewhere; the planner's
# "streaming" model reads the same attribute.
RECIPE_LOADING = "streaming"


def run_one(model: Path, data: Path, cache: Path, *, strategy: str, nproc: int, out: Path) -> dict:
    env = {
        **os.environ,
        **LIVE_MALLOC,
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc)),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO),
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")
        ),
    }
    cmd = command(strategy, nproc, recipe_args(model, data, cache, out=out))
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.txt").write_text(res.stdout + "\n--- stderr ---\n" + res.stderr)
    if res.returncode != 0:
        return {
            "error": f"exit {res.returncode}: " + res.stderr.strip().splitlines()[-1][-300:]
            if res.stderr.strip()
            else f"exit {res.returncode}",
            "wall_s": round(wall, 1),
        }
    ranks = [json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank*.json"))]
    measured = []
    for r in sorted(ranks, key=lambda r: r["rank"]):
        phases = r.get("phase_peak_rss_mb")
        exact = phases is not None
        phases = (
            {k: phases[k] for k in PHASES} if exact else dict.fromkeys(PHASES, r["peak_rss_mb"])
        )
        measured.append({"rank": r["rank"], "per_phase": exact, **phases})
    return {"ranks": measured, "wall_s": round(wall, 1)}


def predict(model: Path, strategy: str, nproc: int, *, runtime: float, loading: str) -> dict:
    from recipes import plan as P

    shape = P.Shape.from_config(model)
    row = P.plan(
        shape,
        ngpu=nproc,
        strategies=[strategy],
        seq=SEQ,
        batch=1,
        device="cpu",
        runtime=runtime,
        loading=loading,
    )[0]
    return {
        "row": row,
        "phases_mb": {k: v / MB for k, v in row.process_phases.items()},
        "export_other_mb": row.process_export_other / MB,
        "params": shape.params,
    }


def build_models(names: list[str], cache: Path) -> dict[str, Path]:
    from fastchat_data.tiny import reference_corpus, tiny_model

    corpus = reference_corpus()
    return {
        n: tiny_model("llama", MODELS[n], texts=corpus, vocab_size=4000, cache_dir=cache)
        for n in names
    }


def check_targets(rows: list[dict]) -> dict:
    ok = [r for r in rows if "ranks" in r]
    train = [abs(x["train"] / x["pred_train"] - 1) for r in ok for x in r["ranks"]]
    # the sharded loaders; DDP and ZeRO-2 keep a full copy per rank by design
    load = [r["load_sum_copies"] for r in ok if parallel.get(r["strategy"]).sharded_load]
    z3 = {}
    for r in ok:
        if parallel.get(r["strategy"]) is parallel.ZERO3:
            same = [x for x in ok if (x["model"], x["nproc"]) == (r["model"], r["nproc"])]
            f = next((x for x in same if parallel.get(x["strategy"]) is parallel.FSDP), None)
            if f:
                peak = lambda run: max(max(x[k] for k in PHASES) for x in run["ranks"])  # noqa: E731
                z3[f"{r['model']} x{r['nproc']}"] = peak(r) / peak(f)
    return {
        "train_within_15pct": all(e <= 0.15 for e in train),
        "train_max_error": max(train, default=None),
        "load_sum_at_most_1_3_copies": all(c <= 1.3 for c in load),
        "load_max_copies": max(load, default=None),
        "zero3_within_1_2x_fsdp": all(v <= 1.2 for v in z3.values()),
        "zero3_over_fsdp": z3,
    }


def report(res: dict) -> None:
    s = res["settings"]
    print(
        f"\n== per-rank peak RSS (MiB), measured / planner (--device cpu), fp32 + AdamW, "
        f"batch 1 x {SEQ} tokens, {STEPS} steps; loading {s['loading']}"
    )
    rts = "; ".join(
        f"{m} {v['torch']:,.0f} / {v['deepspeed']:,.0f}" for m, v in s["runtime_mb"].items()
    )
    print(
        "runtime (imports, gloo, one tiny step, the run's tokenizer and data), MiB, "
        f"torch / with deepspeed: {rts}"
    )
    print(
        f"{'model':8}{'strategy':14}{'rank':>4}{'load':>8}{'pred':>8}{'ratio':>7}{'train':>8}"
        f"{'pred':>8}{'ratio':>7}{'export':>8}{'pred':>8}{'ratio':>7}"
    )
    for r in res["rows"]:
        who = f"{r['model']:8}{r['strategy'] + ' x' + str(r['nproc']):14}"
        if "ranks" not in r:
            print(f"{who}  {r.get('skipped') or r.get('error')}")
            continue
        for x in r["ranks"]:
            cells = "".join(
                f"{x[k]:>8,.0f}{x['pred_' + k]:>8,.0f}{x[k] / x['pred_' + k]:>7.2f}" for k in PHASES
            )
            print(f"{who}{x['rank']:>4}{cells}")
            who = " " * 22
        whole_run = "" if r["ranks"][0]["per_phase"] else "  [no phase_peak_rss_mb: whole-run peak]"
        print(
            f"{'':22}    load summed over ranks: {r['load_sum_copies']:.2f} fp32 model copies "
            f"beyond the runtime ({r['model_fp32_mb']:,.0f} MiB each){whole_run}"
        )
    t = res["targets"]
    print("\ntargets:")
    print(
        "  planner within 15% of every rank's training peak: "
        f"{'met' if t['train_within_15pct'] else 'NOT met'} "
        f"(largest error {t['train_max_error']:.1%})"
        if t["train_max_error"] is not None
        else "  no runs"
    )
    if t["load_max_copies"] is not None:
        print(
            "  load summed over ranks <= 1.3 model copies + runtime: "
            f"{'met' if t['load_sum_at_most_1_3_copies'] else 'NOT met'} "
            f"(largest {t['load_max_copies']:.2f} copies)"
        )
    z = ", ".join(f"{k} {v:.2f}x" for k, v in t["zero3_over_fsdp"].items())
    print(
        "  ZeRO-3 peak within 1.2x of FSDP2's: "
        f"{'met' if t['zero3_within_1_2x_fsdp'] else 'NOT met'} ({z})"
    )


def attach_predictions(row: dict, pred: dict) -> None:
    """The planner's per-phase prediction next to each rank's measurement."""
    row["pred_mb"], row["pred_export_other_mb"] = pred["phases_mb"], pred["export_other_mb"]
    for x in row["ranks"]:
        for k in PHASES:
            x["pred_" + k] = pred["phases_mb"][k]
        if x["rank"] != 0:  # only rank 0 keeps the gathered model
            x["pred_export"] = pred["export_other_mb"]


def rescore(out: Path) -> dict:
    """The stored measurements against the current planner (no run)."""
    res = json.loads(out.read_text())
    cache = REPO / ".cache" / "tiny"
    for row in res["rows"]:
        if "ranks" in row:
            model = cache / res["settings"]["models"][row["model"]]
            pred = predict(
                model,
                row["strategy"],
                row["nproc"],
                runtime=row["runtime_mb"] * MB,
                loading=res["settings"]["loading"],
            )
            attach_predictions(row, pred)
    res["targets"] = check_targets(res["rows"])
    out.write_text(json.dumps(res, indent=2))
    return res


@entry_point
def main(argv: list[str] | None = None) -> int:
    opts = parse(MemoryBenchOptions, argv, prog="python -m bench.memory_bench", description=__doc__)
    if opts.rescore:
        res = rescore(Path(opts.out))
        report(res)
        print(f"\nrescored: {opts.out}")
        return 0

    from fastchat_data.commands import clean
    from fastchat_data.tiny import shared_data_dir
    from recipes import plan as P

    names = opts.models.split(",") if opts.models else (["small"] if opts.quick else list(MODELS))
    runs = [(m, n) for m in names for n in ((2, 4) if m == "small" else (2,))]
    strategies = opts.strategies.split(",")
    try:  # the registry's names (recipes/core/parallel.py)
        for strategy in strategies:
            parallel.get(strategy)
    except parallel.UnknownStrategy as e:
        raise UsageError(f"--strategies: {e}") from None
    cache = REPO / ".cache"
    t_start = time.perf_counter()
    models = build_models(names, cache)
    os.environ.update(LIVE_MALLOC)  # for the runtime measurements, as for the runs
    loading = RECIPE_LOADING if opts.loading == "auto" else opts.loading
    res: dict = {
        "settings": {
            "quick": opts.quick,
            "seq": SEQ,
            "steps": STEPS,
            "malloc_env": LIVE_MALLOC,
            "loading": loading,
            "runtime_mb": {},
            "cpu_count": os.cpu_count(),
            "models": {n: str(models[n].name) for n in names},
        },
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="memory_bench-") as tmp:
        tmp = Path(tmp)
        data = tmp / "sharegpt_clean.json"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            clean(str(shared_data_dir() / "sharegpt_v3_sample_1000.json"), str(data))
        runtimes = {}
        for name in names:
            warm_dataset(models[name], data, cache, out=tmp / "warm")
            # the process floor of this run: imports, gloo, one tiny step, tokenizer, data
            argv = recipe_args(models[name], data, cache, out=tmp / "floor")
            runtimes[name] = {
                ds: P.measure_runtime(deepspeed=ds, recipe_argv=argv) for ds in (False, True)
            }
            res["settings"]["runtime_mb"][name] = {
                "torch": runtimes[name][False] / MB,
                "deepspeed": runtimes[name][True] / MB,
            }
        for model_name, nproc in runs:
            for strategy in strategies:
                runtime = runtimes[model_name][parallel.get(strategy).engine == "deepspeed"]
                pred = predict(
                    models[model_name], strategy, nproc, runtime=runtime, loading=loading
                )
                row = {
                    "model": model_name,
                    "params": pred["params"],
                    "strategy": strategy,
                    "nproc": nproc,
                    "model_fp32_mb": 4 * pred["params"] / MB,
                    "runtime_mb": runtime / MB,
                    "pred_mb": pred["phases_mb"],
                    "pred_export_other_mb": pred["export_other_mb"],
                }
                ph = pred["phases_mb"]  # all ranks at once; only rank 0 holds the export copy
                need = MB * max(
                    ph["load"] * nproc,
                    ph["train"] * nproc,
                    ph["export"] + pred["export_other_mb"] * (nproc - 1),
                )
                print(
                    f"{model_name} {strategy} x{nproc}: "
                    f"predicted {need / MB:,.0f} MiB over ranks ...",
                    end=" ",
                    flush=True,
                )
                if need > 0.8 * mem_available():  # others share this machine: keep a margin
                    avail = mem_available() / 2**30
                    row["skipped"] = (
                        f"skipped: predicted {need / 2**30:.1f} GiB "
                        f"> 80% of available {avail:.1f} GiB"
                    )
                else:
                    row.update(
                        run_one(
                            models[model_name],
                            data,
                            cache,
                            strategy=strategy,
                            nproc=nproc,
                            out=tmp / f"{model_name}-{strategy}-{nproc}",
                        )
                    )
                if "ranks" in row:
                    attach_predictions(row, pred)
                    load_sum = sum(x["load"] for x in row["ranks"]) - nproc * row["runtime_mb"]
                    row["load_sum_copies"] = load_sum / row["model_fp32_mb"]
                    peaks = ", ".join(f"{x['train']:,.0f}" for x in row["ranks"])
                    print(f"train peak {peaks} MiB ({row['wall_s']:.0f} s)", flush=True)
                else:
                    print(row.get("skipped") or row.get("error"), flush=True)
                res["rows"].append(row)
    res["settings"]["wall_s"] = round(time.perf_counter() - t_start, 1)
    out = Path(opts.out)
    if opts.update and out.exists():  # rerun rows replace their namesakes; the others are kept
        old = json.loads(out.read_text())
        done = {(r["model"], r["strategy"], r["nproc"]) for r in res["rows"]}
        kept = [r for r in old["rows"] if (r["model"], r["strategy"], r["nproc"]) not in done]
        res["rows"] = kept + res["rows"]
        for key in ("runtime_mb", "models"):
            res["settings"][key] = {**old["settings"][key], **res["settings"][key]}
        res["settings"]["wall_s"] += old["settings"].get("wall_s", 0)
        res["settings"]["quick"] = old["settings"]["quick"] and opts.quick
    order = {m: i for i, m in enumerate(MODELS)}
    res["rows"].sort(
        key=lambda r: (order[r["model"]], r["nproc"], parallel.get(r["strategy"]).cost_rank)
    )
    res["targets"] = check_targets(res["rows"])
    write_and_report(out, res, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
