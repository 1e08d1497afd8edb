"""DPO benchmark: a DPO step against an SFT step on the same sequences, and the memory a
precomputed reference saves over a live reference model.

    python -m bench.dpo_bench [--quick] [--pairs 256] [--steps 12]
                              [--out bench/results/dpo_bench.json]

Three variants of the ~17M tiny Llama, one process, fp32, each in a fresh process (peak RSS of
the training phase, VmHWM reset when training starts):

- sft: the full fine-tune on the pairs' 2N conversations (prompt + chosen, prompt + rejected),
  two conversations per pair in every micro-batch: the same rows a DPO step runs;
- dpo: recipes/dpo.py as shipped, reference log-probs precomputed once (not timed here);
- dpo_live_reference: the same recipe with the reference kept as a second, frozen model and
  scored in every step (what TRL does without precompute_ref_log_probs).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import REPO, result_option, worker_result, write_and_report
from fastchat_data.options import UsageError, entry_point, option, parse

VARIANTS = ("sft", "dpo", "dpo_live_reference")


@dataclass
class DPOBenchOptions:
    pairs: int = option(256, "preference pairs to train on", minimum=2)
    steps: int = option(12, "optimizer steps per variant (the first 2 not timed)", minimum=3)
    quick: bool = option(False, "a short run", preset={"pairs": 32, "steps": 5})
    out: str = result_option("dpo_bench.json")
    worker: list[str] = option(
        help="internal: VARIANT SPEC_JSON: run that variant in this process and print its result",
        default_factory=list,
    )


def prepare_inputs(n_pairs: int, cache: Path) -> dict:
    from fastchat_data.preference import pair
    from fastchat_data.tiny import reference_corpus, shared_data_dir, tiny_model

    data = shared_data_dir()
    folder = cache / "dpo-bench"
    folder.mkdir(parents=True, exist_ok=True)
    all_pairs = folder / "all_pairs.json"
    if not all_pairs.exists():
        pair(
            str(data / "alpaca_gpt4_data_en_1k.json"),
            str(data / "alpaca_data.json"),
            str(all_pairs),
        )
    records = json.loads(all_pairs.read_text())[:n_pairs]
    pairs = folder / f"pairs_{n_pairs}.json"
    pairs.write_text(json.dumps(records))
    convs = folder / f"conversations_{n_pairs}.json"  # the same sequences, as SFT data
    convs.write_text(
        json.dumps(
            [
                {"instruction": r["prompt"], "input": "", "output": r[side]}
                for r in records
                for side in ("chosen", "rejected")
            ]
        )
    )
    model = tiny_model("llama", "small", texts=reference_corpus(data), vocab_size=4000)
    return {"pairs": str(pairs), "conversations": str(convs), "model": str(model)}


def live_reference_objective(reference):
    """recipes/dpo.py's objective with the reference kept as a second, frozen model and
    scored in every step instead of once before training."""
    import torch

    from recipes.core.objectives.dpo import DPO, dpo_losses
    from recipes.core.preference import PlainForward, sequence_logps

    class LiveReference(DPO):
        def before_resume(self, run) -> None:
            run.data.reference = torch.zeros(len(run.data.units), 2)  # unused: scored live

        def loss(self, run, batch):
            batch.pop("reference_logps", None)
            with torch.no_grad():
                ref, _ = sequence_logps(PlainForward(reference), dict(batch))
            policy, tokens = sequence_logps(run.engine, batch)
            cfg = run.cfg
            losses, _, _ = dpo_losses(policy, ref, tokens, beta=cfg.beta, loss_type=cfg.loss_type)
            return losses.sum() / run.plan.global_size, {}

        def describe(self, cfg) -> str:
            return "DPO with a live reference model, "

    return LiveReference()


def worker(variant: str, spec: dict) -> dict:
    from transformers import AutoModelForCausalLM

    from recipes.core import loop, recipe
    from recipes.core.config import load_config
    from recipes.core.model_form import model_form

    out = Path(spec["out"]) / variant
    common = [
        "--strategy",
        "single",
        "--model_name_or_path",
        spec["model"],
        "--output_dir",
        str(out),
        "--overwrite_output_dir",
        "True",
        "--report_to",
        "none",
        "--max_steps",
        str(spec["steps"]),
        "--model_max_length",
        "512",
        "--gradient_accumulation_steps",
        "2",
        "--save_steps",
        "100000",
        "--learning_rate",
        "1e-5",
        "--logging_steps",
        "100000",
        "--cache_dir",
        spec["cache"],
    ]
    if variant == "sft":  # two conversations per pair: the rows of a DPO micro-batch of 2 pairs
        sft = recipe.get("sft")
        cfg, _ = load_config(
            [*common, "--data_path", spec["conversations"], "--per_device_train_batch_size", "4"],
            sft.config_class,
        )
        run = recipe.setup(sft, cfg)
    else:
        dpo = recipe.get("dpo")
        cfg, _ = load_config(
            [*common, "--data_path", spec["pairs"], "--per_device_train_batch_size", "2"],
            dpo.config_class,
        )
        if variant == "dpo":
            run = recipe.setup(dpo, cfg)
        else:  # recipe.setup's steps, with the live-reference objective
            reference = AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path)
            reference.requires_grad_(False).eval()
            run = loop.prepare(cfg, live_reference_objective(reference))
            run.form = model_form(cfg)
            model, engine, _ = run.form.build(run)
            run = loop.start(run, model, engine)
    recipe.train(run)
    recipe.cleanup(run)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    info = json.loads((out / "ranks" / "rank0.json").read_text())
    timed = rows[2:]  # the first steps warm up the allocator and caches
    return {
        "variant": variant,
        "step_s": statistics.median(r["step_s"] for r in timed),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "train_peak_rss_mb": info["phase_peak_rss_mb"]["train"],
        "steps": len(rows),
    }


def measure(variant: str, spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return worker_result("bench.dpo_bench", [variant, json.dumps(spec)], env, what=variant)


@entry_point
def main(argv: list[str] | None = None) -> int:
    opts = parse(DPOBenchOptions, argv, prog="python -m bench.dpo_bench", description=__doc__)
    if opts.worker:
        if len(opts.worker) != 2:
            raise UsageError(f"--worker: a variant and a JSON spec, got {len(opts.worker)} values")
        print(json.dumps(worker(opts.worker[0], json.loads(opts.worker[1]))))
        return 0
    started = time.perf_counter()
    cache = REPO / ".cache" / "bench"
    # a fresh run folder per benchmark run: a recipe resumes from a complete checkpoint it
    # finds in its output_dir, so a kept folder would report the previous run's steps again
    with tempfile.TemporaryDirectory(prefix="dpo_bench-") as out:
        spec = {
            **prepare_inputs(opts.pairs, cache),
            "steps": opts.steps,
            "cache": str(cache),
            "out": out,
        }
        rows = {v: measure(v, spec) for v in VARIANTS}
    sft, pre, live = rows["sft"], rows["dpo"], rows["dpo_live_reference"]
    result = {
        "rows": list(rows.values()),
        "dpo_step_vs_sft": pre["step_s"] / sft["step_s"],
        "live_reference_step_vs_precomputed": live["step_s"] / pre["step_s"],
        "memory_saved_mb": live["train_peak_rss_mb"] - pre["train_peak_rss_mb"],
        "settings": {
            "pairs": opts.pairs,
            "steps": opts.steps,
            "model": "tiny llama small (~17M)",
            "micro_batch": "2 pairs = 4 rows",
            "accumulation": 2,
            "max_length": 512,
            "wall_s": round(time.perf_counter() - started, 1),
        },
    }
    write_and_report(opts.out, result, report)
    return 0


def report(result: dict) -> None:
    print(f"{'variant':<22}{'step s':>9}{'tok/s':>9}{'train peak RSS MB':>19}")
    for r in result["rows"]:
        print(
            f"{r['variant']:<22}{r['step_s']:>9.3f}{r['tokens_per_s']:>9,.0f}"
            f"{r['train_peak_rss_mb']:>19,.0f}"
        )
    print(
        f"DPO step / SFT step on the same rows: {result['dpo_step_vs_sft']:.2f}x; live reference "
        f"step / precomputed: {result['live_reference_step_vs_precomputed']:.2f}x; precomputing "
        f"saves {result['memory_saved_mb']:,.0f} MB of peak RSS in training"
    )


if __name__ == "__main__":
    sys.exit(main())
