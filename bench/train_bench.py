"""Training benchmark (the training half of `make bench`).

    python -m bench.train_bench [--quick] [--out bench/results/train_bench.json]

a. Throughput, 1 process, the ~17M "small" tiny Llama (legacy tokenizer, 4,000 tokens) on the
   cleaned ShareGPT sample. FastChat = its own `SupervisedDataset` (`preprocess`: every sample
   padded to model_max_length) feeding a plain HF Trainer with its Vicuna settings (use_cpu,
   fp32); camelid = recipes/full_finetune.py, strategy single; optionally with --packing.
   Same model, data, maximum length, per-device batch, accumulation, seed and thread count.
   The runs are interleaved (round 1: FastChat, camelid, packed; round 2 the reverse order,
   ...), so a change of machine load hits both sides alike; ratios are taken per round.
b. Per-rank memory at 2 ranks of DDP, FSDP2 and ZeRO-3 on the ~91M "base" model, fp32 + AdamW,
   against the model-state count 16*Psi bytes per rank (DDP) and 16*Psi/N (full sharding).
c. Rank 0's memory during the final export (model_form.FullModel.export): FSDP2 gathering with
   cpu_offload=True (camelid's code) against a gather without it.

Every configuration runs in its own process(es), launched as users launch the recipe (python,
torchrun, deepspeed). Each process is this module in worker mode (env CAMELID_TRAIN_BENCH):
it runs full_finetune's setup/train/save/cleanup (or FastChat's recipe) and reads its own
/proc/self/status around each phase, resetting the peak (VmHWM) between phases through
/proc/self/clear_refs, so each phase's peak RSS is exact.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench import REFERENCE_TRAINER_ON_CPU, REPO, recipe_flags, result_option, write_and_report
from fastchat_data.options import entry_point, option, parse

DATA = "sharegpt_v3_sample_1000.json"
WORKER_ENV = "CAMELID_TRAIN_BENCH"
MB = 2**20
# what both sides of the comparison (FastChat's HF Trainer, camelid's recipe) train with, said
# once so they cannot drift apart; warm-up goes by each side's own name (transformers 5 reads
# a warmup_steps below 1 as a ratio)
SHARED_OPTIMISATION = dict(
    learning_rate=2e-5, weight_decay=0.0, lr_scheduler_type="cosine", logging_steps=1
)


@dataclass
class TrainBenchOptions:
    quick: bool = option(False, "shorter lengths, fewer runs (about 3 minutes)")
    out: str = result_option("train_bench.json")


# ---------------------------------------------------------------- memory of this process


def _status() -> dict[str, float]:
    text = Path("/proc/self/status").read_text()
    keys = ("VmRSS", "VmHWM", "RssFile")
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) / 1024 for k in keys}


def _reset_peak() -> bool:
    """VmHWM := VmRSS (Linux >= 4.0: `echo 5 > /proc/PID/clear_refs`)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    """Hand freed heap back to the OS, so RSS shows live memory, not what glibc keeps cached."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Phases:
    """Peak and final RSS (MiB) of each phase. The peak is VmHWM reset at the phase start, or,
    where clear_refs is not writable, the maximum of a 5 ms sampler."""

    def __init__(self):
        self.rows: dict[str, dict] = {}
        self.exact = _reset_peak()
        self._max = 0.0
        if not self.exact:
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while True:
            self._max = max(self._max, _status()["VmRSS"])
            time.sleep(0.005)

    def start(self) -> None:
        if self.exact:
            _reset_peak()
        self._max = _status()["VmRSS"]

    def end(self, name: str) -> dict:
        st = _status()
        peak = st["VmHWM"] if self.exact else max(self._max, st["VmRSS"])
        self.rows[name] = {
            "peak_mb": round(peak, 1),
            "end_mb": round(st["VmRSS"], 1),
            "end_file_mb": round(st["RssFile"], 1),
        }
        return self.rows[name]


def live_tensor_mb() -> float:
    """Bytes of every tensor storage Python can reach (deduplicated; DTensors by their local
    shard): parameters, gradients, optimizer states, DeepSpeed's partitions. Not seen: buffers
    held only in C++ (DDP's gradient buckets, autograd's saved activations)."""
    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor):
            continue
        t = getattr(obj, "_local_tensor", obj)
        try:
            if t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
        except (RuntimeError, NotImplementedError, TypeError):
            continue
        if key[0] and key not in seen:
            seen.add(key)
            total += key[1]
    return round(total / MB, 1)


# ---------------------------------------------------------------- workers


def recipe_worker(spec: dict, argv: list[str]) -> None:
    """recipes/full_finetune.py as its main() runs it (setup, train, save, cleanup), measured."""
    ph = Phases()
    import datasets  # noqa: F401  (the runtime every rank carries, before any model or data)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from recipes.core import checkpoint, loop, parallel, recipe
    from recipes.core.config import load_config

    sft = recipe.get("sft")
    cfg, notes = load_config(argv, sft.config_class)
    if cfg.strategy != "auto" and parallel.get(cfg.strategy).engine == "deepspeed":
        import deepspeed  # noqa: F401
    ph.end("runtime")
    ph.start()
    run = recipe.setup(sft, cfg, notes)
    ph.end("setup")
    rank, world_size = run.world.rank, run.world.size

    timers: dict[str, float] = {}

    def timed(fn, name):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timers[name] = timers.get(name, 0.0) + time.perf_counter() - t0

        return wrapper

    for name in ("forward", "backward", "step"):
        setattr(run.engine, name, timed(getattr(run.engine, name), name))
    run.data.batch = timed(run.data.batch, "collate")
    run.world.all_sums = timed(run.world.all_sums, "all_sum")  # all_sum goes through it too
    run.log.step = timed(run.log.step, "log")
    # the last step's checkpoint (the loop calls it through the checkpoint module)
    checkpoint.save_checkpoint = timed(checkpoint.save_checkpoint, "checkpoint")

    _trim()
    ph.start()
    t0 = time.perf_counter()
    loop.train(run)
    timers["train_total"] = time.perf_counter() - t0
    ph.end("train")
    tensors = live_tensor_mb()
    _trim()
    pre_export = _status()["VmRSS"]

    if spec.get("export") == "no_offload":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        def full_state_dict_no_offload():  # every rank gathers (and keeps) the full state dict
            opts = StateDictOptions(full_state_dict=True, cpu_offload=False)
            return get_model_state_dict(run.engine.module, options=opts)

        run.engine.full_state_dict = full_state_dict_no_offload
    ph.start()
    t0 = time.perf_counter()
    recipe.save(run)
    export_s = time.perf_counter() - t0
    ph.end("export")
    recipe.cleanup(run)
    out = Path(spec["out"]) / f"bench-rank{rank}.json"
    out.write_text(
        json.dumps(
            {
                "rank": rank,
                "world_size": world_size,
                "phases": ph.rows,
                "peak_exact": ph.exact,
                "pre_export_mb": round(pre_export, 1),
                "live_tensor_mb": tensors,
                "timers_s": timers,
                "export_s": export_s,
            }
        )
    )


def fastchat_worker(spec: dict) -> None:
    """FastChat's recipe: its SupervisedDataset (preprocess pads every sample to
    model_max_length) feeding a plain HF Trainer with its settings; fp32 on CPU, 1 process."""
    ph = Phases()
    import torch
    from fastchat.train.train import SupervisedDataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    from bench.fastchat_ref import fastchat_accepts, sharegpt_turns
    from fastchat_data.build import read_trainable
    from fastchat_data.report import Report

    ph.end("runtime")
    ph.start()
    length, model_dir = spec["max_length"], spec["model"]
    # as FastChat's train() sets its tokenizer up
    tok = AutoTokenizer.from_pretrained(
        model_dir, model_max_length=length, padding_side="right", use_fast=False
    )
    if tok.pad_token != tok.unk_token:
        tok.pad_token = tok.unk_token
    raw = [
        {"conversations": sharegpt_turns(c)}
        for c in read_trainable([spec["data"]], Report("bench"))
        if fastchat_accepts(c)
    ]
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # "WARNING: tokenization mismatch" lines
        dataset = SupervisedDataset(raw, tokenizer=tok)
    preprocess_s = time.perf_counter() - t0
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False

    seen = {"real": 0, "padded": 0}

    def collate(features):  # HF's default collator, counting what each micro-batch holds
        batch = default_data_collator(features)
        seen["real"] += int(batch["attention_mask"].sum())
        seen["padded"] += batch["input_ids"].numel()
        return batch

    steps: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            steps.append({"t": time.perf_counter(), **seen})

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=spec["batch"],
            gradient_accumulation_steps=spec["accum"],
            max_steps=spec["steps"],
            **SHARED_OPTIMISATION,
            warmup_steps=0.03,
            optim="adamw_torch",
            seed=42,
            **REFERENCE_TRAINER_ON_CPU,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=collate,
            callbacks=[Clock()],
        )
        ph.end("setup")
        ph.start()
        with contextlib.redirect_stdout(io.StringIO()):  # the per-step log dicts
            trainer.train()
        ph.end("train")
    rows = [
        {
            "step": i + 1,
            "tokens": b["real"] - a["real"],
            "padded": b["padded"] - a["padded"],
            "step_s": b["t"] - a["t"],
        }
        for i, (a, b) in enumerate(zip(steps, steps[1:]), start=1)
    ]
    mask = dataset.attention_mask
    Path(spec["out"], "bench-rank0.json").write_text(
        json.dumps(
            {
                "rank": 0,
                "phases": ph.rows,
                "peak_exact": ph.exact,
                "steps": rows,
                "preprocess_s": preprocess_s,
                "samples": len(dataset),
                "epoch_real_share": float(mask.sum() / mask.numel()),
            }
        )
    )


def worker_main() -> None:
    spec = json.loads(os.environ.pop(WORKER_ENV))
    if spec["role"] == "fastchat":
        fastchat_worker(spec)
    else:
        recipe_worker(spec, sys.argv[1:])


# ---------------------------------------------------------------- orchestration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    spec: dict, nproc: int = 1, strategy: str = "single", *, recipe_args=(), env_extra=None
) -> list[dict]:
    """One configuration in its own process(es); returns each rank's measurements."""
    from recipes.core import parallel

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    args = [str(a) for a in recipe_args]
    if nproc == 1:
        cmd = [sys.executable, "-m", "bench.train_bench", *args]
    elif parallel.get(strategy).launcher == "deepspeed":
        cmd = [
            str(bin_dir / "deepspeed"),
            "--num_gpus",
            str(nproc),
            "--master_port",
            str(_free_port()),
            "--module",
            "--no_local_rank",
            "bench.train_bench",
            *args,
        ]
    else:
        cmd = [
            str(bin_dir / "torchrun"),
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            "-m",
            "bench.train_bench",
            *args,
        ]
    threads = max(1, (os.cpu_count() or 2) // nproc)
    env = {
        **os.environ,
        WORKER_ENV: json.dumps(spec),
        "OMP_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")
        ),
        **(env_extra or {}),
    }
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / "log.txt").write_text(res.stdout + "\n--- stderr ---\n" + res.stderr)
    if res.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({res.returncode}); log: {out / 'log.txt'}\n"
            f"{res.stderr[-3000:]}"
        )
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("bench-rank*.json"))]
    if len(ranks) != nproc:
        raise RuntimeError(f"{len(ranks)} of {nproc} ranks reported; log: {out / 'log.txt'}")
    for r in ranks:
        r["wall_s"] = round(wall, 1)
    return ranks


def _peak(rank: dict) -> float:
    return max(
        v["peak_mb"] for k, v in rank["phases"].items() if k in ("runtime", "setup", "train")
    )


def fastchat_result(ranks: list[dict]) -> dict:
    r = ranks[0]
    timed = r["steps"]  # step 1 (warm-up) is already left out: rows start at the end of step 1
    tokens, padded, secs = (sum(s[k] for s in timed) for k in ("tokens", "padded", "step_s"))
    return {
        "real_tokens_per_s": tokens / secs,
        "padded_tokens_per_s": padded / secs,
        "real_token_share": tokens / padded,
        "epoch_real_share": r["epoch_real_share"],
        "step_s": [round(s["step_s"], 2) for s in timed],
        "peak_rss_mb": _peak(r),
        "train_peak_rss_mb": r["phases"]["train"]["peak_mb"],
        "preprocess_s": r["preprocess_s"],
        "samples": r["samples"],
        "wall_s": r["wall_s"],
    }


def camelid_result(ranks: list[dict], out: Path) -> dict:
    r = ranks[0]
    timed = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][
        1:
    ]  # step 1: warm-up
    tokens, secs = sum(s["tokens"] for s in timed), sum(s["step_s"] for s in timed)
    padded = sum(s["tokens"] / s["real_token_share"] for s in timed)
    t = r["timers_s"]
    loop = t["train_total"] - t.get("checkpoint", 0.0)  # the final checkpoint is not a step's time
    parts = {k: t.get(k, 0.0) for k in ("collate", "forward", "backward", "step", "all_sum", "log")}
    parts["other"] = loop - sum(parts.values())
    return {
        "real_tokens_per_s": tokens / secs,
        "padded_tokens_per_s": padded / secs,
        "real_token_share": tokens / padded,
        "step_s": [round(s["step_s"], 2) for s in timed],
        "peak_rss_mb": _peak(r),
        "train_peak_rss_mb": r["phases"]["train"]["peak_mb"],
        "time_share": {k: round(v / loop, 3) for k, v in parts.items()},
        "wall_s": r["wall_s"],
    }


def epoch_real_share(
    ds, pad_id: int, max_length: int, *, batch: int, accum: int, packing: bool
) -> float:
    """The real-token share of a whole camelid epoch, from the batch plan (as collate pads)."""
    from recipes.core.data import BatchPlan, TrainData
    from recipes.core.recipe import TrainConfig

    kw = {"packing": True} if packing else {}
    cfg = TrainConfig(
        model_max_length=max_length,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        **kw,
    )
    data = TrainData(ds, packing, max_length, pad_id=pad_id)
    plan = BatchPlan(data.lengths, data.trained, cfg, world_size=1)
    real = padded = 0
    for s in range(plan.steps_per_epoch):
        for ids in plan.micro_batches(s, 0):
            real += int(data.lengths[ids].sum())
            padded += int(data.lengths[ids].max()) * len(ids)
    return real / padded


def recipe_args(model, data, cache, *, max_length, batch, accum, steps, extra=()) -> list:
    return [
        *recipe_flags(
            model,
            data,
            cache,
            max_length=max_length,
            batch=batch,
            accum=accum,
            steps=steps,
            warmup_ratio=0.03,
            **SHARED_OPTIMISATION,
        ),
        *extra,
    ]


def throughput(
    p: dict,
    model: Path,
    data: Path,
    *,
    tmp: Path,
    cache: Path,
    configs: list[str],
    rounds: int,
    tag: str,
) -> dict:
    """FastChat vs camelid (and camelid --packing) on `data`, `rounds` interleaved rounds."""
    from transformers import AutoTokenizer

    from fastchat_data.build import build_dataset

    L, b, acc, steps = p["max_length"], p["batch"], p["accum"], p["steps"]
    with contextlib.redirect_stderr(io.StringIO()):  # the build report (a cache hit after this)
        ds, _ = build_dataset(
            str(data), str(model), "vicuna_v1.1", max_length=L, cache_dir=str(cache), quiet=True
        )
    ds = ds.with_format("numpy")
    tok = AutoTokenizer.from_pretrained(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    res: dict = {"data": data.name, "camelid_samples": len(ds), "rounds": []}
    for name in configs[1:]:
        res[f"{name}_epoch_real_share"] = epoch_real_share(
            ds, pad, L, batch=b, accum=acc, packing=name == "camelid_packed"
        )
    for rnd in range(rounds):
        row = {}
        for name in configs if rnd % 2 == 0 else configs[::-1]:
            out = tmp / f"{tag}{rnd}-{name}"
            print(f"  {tag} round {rnd + 1}: {name} ...", end=" ", flush=True)
            if name == "fastchat":
                spec = {
                    "role": "fastchat",
                    "out": str(out),
                    "model": str(model),
                    "data": str(data),
                    "max_length": L,
                    "batch": b,
                    "accum": acc,
                    "steps": steps,
                }
                row[name] = fastchat_result(launch(spec))
            else:
                extra = ["--packing", True] if name == "camelid_packed" else []
                args = recipe_args(
                    model,
                    data,
                    cache,
                    max_length=L,
                    batch=b,
                    accum=acc,
                    steps=steps,
                    extra=["--strategy", "single", "--output_dir", out, *extra],
                )
                ranks = launch({"role": "recipe", "out": str(out)}, 1, "single", recipe_args=args)
                row[name] = camelid_result(ranks, out)
            print(
                f"{row[name]['real_tokens_per_s']:,.0f} real tok/s ({row[name]['wall_s']:.0f} s)",
                flush=True,
            )
        for name in configs[1:]:
            row[f"{name}_vs_fastchat"] = (
                row[name]["real_tokens_per_s"] / row["fastchat"]["real_tokens_per_s"]
            )
        res["rounds"].append(row)
    res["fastchat_epoch_real_share"] = res["rounds"][0]["fastchat"]["epoch_real_share"]
    for name in configs[1:]:
        res[f"{name}_vs_fastchat"] = statistics.median(
            r[f"{name}_vs_fastchat"] for r in res["rounds"]
        )
        # what removing padding alone buys, at equal cost per processed token
        res[f"{name}_padding_bound"] = (
            res[f"{name}_epoch_real_share"] / res["fastchat_epoch_real_share"]
        )
    return res


# glibc keeps freed heap in RSS (and FSDP's per-layer gather/free churn fragments it); with a
# fixed 64 KiB mmap threshold every large block goes back to the OS when freed, so RSS tracks
# the memory actually in use, which is what the model-state formula predicts.
LIVE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}
# memory runs: name -> (strategy, export variant, glibc's default malloc instead of LIVE_MALLOC)
MEM_RUNS = {
    "ddp": ("ddp", None, False),
    "fsdp": ("fsdp", None, False),
    "zero3": ("zero3", None, False),
    "fsdp_no_offload": ("fsdp", "no_offload", False),
    "fsdp_glibc_default": ("fsdp", None, True),
}


def memory(p: dict, base: Path, data: Path, *, tmp: Path, cache: Path) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    psi, n = sum(t.numel() for t in model.parameters()), 2
    res: dict = {
        "parameters": psi,
        "ranks": n,
        "model_fp32_mb": 4 * psi / MB,
        "malloc_env": LIVE_MALLOC,
        "formula_mb": {
            "replicated_16psi": 16 * psi / MB,
            "sharded_16psi_over_n": 16 * psi / n / MB,
        },
        "runs": {},
    }
    from recipes.core import parallel

    for name in p["mem_runs"]:
        strategy, export, default_malloc = MEM_RUNS[name]
        env = {} if default_malloc else LIVE_MALLOC
        shards = n if parallel.get(strategy).shards_params else 1  # what a rank holds 1/shards of
        out = tmp / f"b-{name}"
        print(f"  {name} x {n} ...", end=" ", flush=True)
        args = recipe_args(
            base,
            data,
            cache,
            max_length=p["mem_length"],
            batch=1,
            accum=1,
            steps=p["mem_steps"],
            extra=["--strategy", strategy, "--output_dir", out],
        )
        ranks = launch(
            {"role": "recipe", "out": str(out), "export": export},
            n,
            strategy,
            recipe_args=args,
            env_extra=env,
        )
        res["runs"][name] = [
            {
                "rank": r["rank"],
                "strategy": strategy,
                "shards": shards,
                "runtime_mb": r["phases"]["runtime"]["end_mb"],
                "setup_peak_mb": r["phases"]["setup"]["peak_mb"],
                "train_peak_mb": r["phases"]["train"]["peak_mb"],
                "train_end_file_mb": r["phases"]["train"]["end_file_mb"],
                "after_train_mb": r["pre_export_mb"],
                "live_tensor_mb": r["live_tensor_mb"],
                "export_peak_mb": r["phases"]["export"]["peak_mb"],
                "export_increase_mb": r["phases"]["export"]["peak_mb"] - r["pre_export_mb"],
                "export_s": round(r["export_s"], 1),
                "wall_s": r["wall_s"],
                "peak_exact": r["peak_exact"],
            }
            for r in ranks
        ]
        peaks = ", ".join(f"{x['train_peak_mb']:,.0f}" for x in res["runs"][name])
        print(f"train peak {peaks} MiB ({ranks[0]['wall_s']:.0f} s)", flush=True)
    return res


def report_throughput(a: dict, s: dict, title: str) -> None:
    print(
        f"\n== {title}: 1 process, {s['model_a']}, {a['data']} (cleaned), "
        f"max length {s['max_length']}, batch {s['batch']} x accumulation {s['accum']}, "
        f"{s['steps'] - 1} timed steps after 1 warm-up, {len(a['rounds'])} interleaved round(s)"
    )
    labels = {
        "fastchat": "FastChat (pad to max)",
        "camelid": "camelid",
        "camelid_packed": "camelid --packing",
    }
    print(
        f"{'':26}{'real tok/s':>11}{'all tok/s':>10}{'pad share':>10}{'epoch pad':>10}"
        f"{'peak RSS':>9}{'vs FastChat':>12}"
    )
    for i, rnd in enumerate(a["rounds"]):
        for key, label in labels.items():
            if key not in rnd:
                continue
            r, who = rnd[key], f"r{i + 1} {label}"
            epoch = a[f"{key}_epoch_real_share"]
            ratio = f"{rnd[key + '_vs_fastchat']:.2f}x" if key != "fastchat" else ""
            print(
                f"{who:26}{r['real_tokens_per_s']:>11,.0f}{r['padded_tokens_per_s']:>10,.0f}"
                f"{1 - r['real_token_share']:>10.1%}{1 - epoch:>10.1%}{r['peak_rss_mb']:>9,.0f}"
                f"{ratio:>12}"
            )
    print(
        f"camelid / FastChat real tokens/s, median over rounds: {a['camelid_vs_fastchat']:.2f}x "
        f"(target >= 3x); padding alone bounds it at {a['camelid_padding_bound']:.2f}x "
        f"(epoch real-token share {a['camelid_epoch_real_share']:.1%} "
        f"vs {a['fastchat_epoch_real_share']:.1%})"
    )
    if "camelid_packed_vs_fastchat" in a:
        share = statistics.mean(r["camelid_packed"]["real_token_share"] for r in a["rounds"])
        print(
            f"camelid --packing: {a['camelid_packed_vs_fastchat']:.2f}x; real-token share with "
            f"packing {share:.1%} in the timed steps, "
            f"{a['camelid_packed_epoch_real_share']:.1%} over an epoch (target >= 95%)"
        )
    elif s["packing_available"] is False:
        print("camelid --packing: not available (no --packing option in recipes/core/config.py)")
    shares = a["rounds"][-1]["camelid"]["time_share"]
    print("camelid step time: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))


def report(results: dict) -> None:
    s = results["settings"]
    report_throughput(results["throughput"], s, "a. throughput")
    if "throughput_short" in results:
        report_throughput(results["throughput_short"], s, "a'. supplementary, short conversations")
    m = results["memory"]
    psi, n = m["parameters"], m["ranks"]
    print(
        f"\n== b. per-rank memory (MiB), {n} ranks, {s['model_b']} ({psi / 1e6:.1f}M params), "
        f"fp32 + AdamW, length {s['mem_length']}, batch 1, {s['mem_steps']} steps, "
        f"{' '.join(f'{k}={v}' for k, v in m['malloc_env'].items())}"
    )
    print(
        "formula: fp32 training has no separate master copy: params 4 + grads 4 + Adam m,v 8 = "
        "16 bytes per\nparameter (ZeRO's mixed-precision count (2+2+K) with K=12 is also 16); "
        "DDP replicates them: 16*Psi per rank;\nFSDP / ZeRO-3 shard all three: 16*Psi/N. "
        "After a step the gradients are freed: 12*Psi (/N) in tensors.\n"
        "runtime = the process before any model or data (python, torch, transformers, deepspeed)."
    )
    print(
        f"{'':25}{'runtime':>8}{'setup pk':>9}{'train pk':>9}{'pk-runtime':>11}{'16Psi/N':>8}"
        f"{'tensors':>8}{'12Psi/N':>8}{'mmapped':>8}"
    )
    for name, runs in m["runs"].items():
        if MEM_RUNS[name][1]:  # the export variants: section c only
            continue
        for r in runs:
            shards = r["shards"]
            who = f"{name} rank {r['rank']}"
            print(
                f"{who:25}{r['runtime_mb']:>8,.0f}{r['setup_peak_mb']:>9,.0f}"
                f"{r['train_peak_mb']:>9,.0f}{r['train_peak_mb'] - r['runtime_mb']:>11,.0f}"
                f"{16 * psi / shards / MB:>8,.0f}{r['live_tensor_mb']:>8,.0f}"
                f"{12 * psi / shards / MB:>8,.0f}{r['train_end_file_mb']:>8,.0f}"
            )
    print(
        "  tensors: storage Python can reach after training "
        "(params + Adam states + DeepSpeed buffers);\n"
        "  mmapped: file-backed RSS at the end of training "
        "(the safetensors file every rank maps to load the model)"
    )
    print(
        f"\n== c. export (model_form.FullModel.export), {n} ranks, "
        f"one fp32 copy of the model = {m['model_fp32_mb']:,.0f} MiB"
    )
    print(f"{'':32}{'before':>8}{'peak':>8}{'increase':>9}{'copies':>7}{'seconds':>8}")
    labels = {
        "fsdp": "fsdp, cpu_offload=True",
        "fsdp_no_offload": "fsdp, no cpu_offload",
        "ddp": "ddp",
        "zero3": "zero3",
        "fsdp_glibc_default": "fsdp, glibc default malloc",
    }
    for name, label in labels.items():
        for r in m["runs"].get(name, []):
            who = f"{label} r{r['rank']}"
            print(
                f"{who:32}{r['after_train_mb']:>8,.0f}{r['export_peak_mb']:>8,.0f}"
                f"{r['export_increase_mb']:>9,.0f}"
                f"{r['export_increase_mb'] / m['model_fp32_mb']:>7.2f}{r['export_s']:>8.1f}"
            )
    print(
        "  before = RSS after training (freed heap trimmed); increase = export peak - before. On "
        "CPU the\n  'offload' copies nothing (the gathered tensors are CPU tensors already): what "
        "differs is that with\n  cpu_offload=True only rank 0 keeps the gathered state dict, "
        "without it every rank keeps a full copy."
    )


@entry_point
def main(argv: list[str] | None = None) -> int:
    if WORKER_ENV in os.environ:
        worker_main()
        return 0
    opts = parse(TrainBenchOptions, argv, prog="python -m bench.train_bench", description=__doc__)

    from fastchat_data.commands import clean, convert
    from fastchat_data.tiny import reference_corpus, shared_data_dir, tiny_model
    from recipes.core.recipe import TrainConfig

    has_packing = "packing" in TrainConfig.__dataclass_fields__
    # each setting: (--quick, the full run); the full run takes FastChat's model_max_length and
    # per-device batch, accumulation 2 (FastChat: 16)
    settings = {
        "max_length": (512, 2048),
        "batch": (2, 2),
        "accum": (1, 2),
        "steps": (3, 3),
        "rounds": (1, 2),
        "mem_length": (128, 256),
        "mem_steps": (2, 3),
        "mem_runs": (
            ["ddp", "fsdp", "zero3", "fsdp_no_offload"],
            ["ddp", "fsdp", "zero3", "fsdp_no_offload", "fsdp_glibc_default"],
        ),
        "short_data": (None, "alpaca_gpt4_data_en_1k.json"),
    }
    p = {name: quick if opts.quick else full for name, (quick, full) in settings.items()}
    t_start = time.perf_counter()
    cache = REPO / ".cache"
    corpus = reference_corpus()
    small = tiny_model("llama", "small", texts=corpus, vocab_size=4000, cache_dir=cache)
    base = tiny_model("llama", "base", texts=corpus, vocab_size=4000, cache_dir=cache)
    results: dict = {
        "settings": {
            "model_a": "llama small (~17M, legacy tokenizer, vocab 4000)",
            "model_b": "llama base",
            "data": DATA,
            "quick": opts.quick,
            "cpu_count": os.cpu_count(),
            "packing_available": has_packing,
            **p,
        }
    }
    configs = ["fastchat", "camelid"] + (["camelid_packed"] if has_packing else [])
    with tempfile.TemporaryDirectory(prefix="train_bench-") as tmp:
        tmp = Path(tmp)
        data = tmp / "sharegpt_clean.json"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            clean(str(shared_data_dir() / DATA), str(data))
        print("a. throughput: FastChat vs camelid", flush=True)
        results["throughput"] = throughput(
            p, small, data, tmp=tmp, cache=cache, configs=configs, rounds=p["rounds"], tag="a"
        )
        if p["short_data"]:
            short = tmp / f"{Path(p['short_data']).stem}_clean.json"
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                convert(str(shared_data_dir() / p["short_data"]), str(tmp / "short_sharegpt.json"))
                clean(str(tmp / "short_sharegpt.json"), str(short))
            results["throughput_short"] = throughput(
                p, small, short, tmp=tmp, cache=cache, configs=configs, rounds=1, tag="short"
            )
        print("b/c. per-rank memory and export", flush=True)
        results["memory"] = memory(p, base, data, tmp=tmp, cache=cache)
    results["settings"]["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_and_report(opts.out, results, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
