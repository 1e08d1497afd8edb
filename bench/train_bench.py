"""`make bench` (training part): camelid's full fine-tune against FastChat's recipe, and the
per-rank memory of DDP / FSDP / ZeRO-3 against the model-state formula.

FastChat's recipe = its `preprocess` (every sample padded to model_max_length) feeding a plain
HF Trainer with its settings (its own train() no longer runs on transformers 5). Both run in
their own process, one after the other, on the same model, data, length and batch size.

    python -m bench.train_bench [--quick] [--out bench/results/train_bench.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = "sharegpt_v3_sample_1000.json"


def fastchat_worker(
    model_dir: str, data: str, max_length: int, steps: int, batch: int, out: str
) -> None:
    """FastChat's recipe on CPU: preprocess (pad to max length) + HF Trainer, 1 process."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from bench.fastchat_ref import fastchat_accepts, fastchat_preprocess
    from fastchat_data.build import read_trainable
    from fastchat_data.report import Report

    tok = AutoTokenizer.from_pretrained(model_dir)
    convs = [c for c in read_trainable([data], Report("b")) if fastchat_accepts(c)]
    ids, labels, _ = fastchat_preprocess(convs, tok, max_length)
    pad = tok.pad_token_id

    def padded(seq, value):
        return torch.tensor(seq + [value] * (max_length - len(seq)))

    rows = [{"input_ids": padded(i, pad), "labels": padded(lab, -100), "attention_mask": padded([1] * len(i), 0)}
            for i, lab in zip(ids, labels)]  # fmt: skip
    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, use_cpu=True, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
            max_steps=steps, learning_rate=2e-5, weight_decay=0.0, lr_scheduler_type="cosine",
            save_strategy="no", report_to=[], logging_steps=1000, disable_tqdm=True, seed=42,
        )  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        Trainer(model=model, args=args, train_dataset=rows, callbacks=[Clock()]).train()
    real = statistics.mean(len(i) for i in ids)
    step_s = statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:]))  # warm-up excluded
    Path(out).write_text(json.dumps({
        "real_tokens_per_s": real * batch / step_s, "real_token_share": real / max_length, "step_s": step_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))  # fmt: skip


def run(cmd: list[str]) -> None:
    env_cmd = {
        "OMP_NUM_THREADS": "2",
        "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
    }
    import os

    res = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **env_cmd}
    )
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{res.stderr[-3000:]}")


def camelid(model: Path, data: Path, out: Path, strategy: str, nproc: int, *args) -> dict:
    recipe = [str(REPO / "recipes" / "full_finetune.py"), "--model_name_or_path", str(model), "--data_path", str(data),
              "--output_dir", str(out), "--strategy", strategy, "--report_to", "none", "--save_steps", "100000",
              "--learning_rate", "2e-5", "--overwrite_output_dir", "True", *map(str, args)]  # fmt: skip
    if nproc == 1:
        run([sys.executable, *recipe])
    elif strategy.startswith("zero"):
        run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc), *recipe])
    else:
        run(
            [
                str(Path(sys.executable).parent / "torchrun"),
                "--standalone",
                "--nproc_per_node",
                str(nproc),
                *recipe,
            ]
        )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][
        1:
    ]  # warm-up excluded
    ranks = [json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank*.json"))]
    return {
        "real_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
        "real_token_share": statistics.mean(r["real_token_share"] for r in rows),
        "peak_rss_mb": [r["peak_rss_mb"] for r in ranks],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "train_bench.json"))
    ap.add_argument("--fastchat-worker", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.fastchat_worker:
        m, d, length, steps, batch, out = args.fastchat_worker
        fastchat_worker(m, d, int(length), int(steps), int(batch), out)
        return {}

    from fastchat_data.commands import clean
    from fastchat_data.tiny import reference_corpus, shared_data_dir, tiny_model

    corpus = reference_corpus()
    small = tiny_model("llama", "small", texts=corpus, vocab_size=4000, cache_dir=REPO / ".cache")
    # --quick: 512 tokens; the full run uses FastChat's model_max_length, 2,048
    max_length, batch, steps = (512, 4, 4) if args.quick else (2048, 4, 6)
    results: dict = {"settings": {"model": "llama small (~17M)", "data": DATA, "max_length": max_length,
                                  "per_device_batch": batch, "timed_steps": steps - 1}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "sharegpt_clean.json"
        clean(str(shared_data_dir() / DATA), str(data))
        worker_out = tmp / "fastchat.json"
        run([sys.executable, "-m", "bench.train_bench", "--fastchat-worker", str(small), str(data), str(max_length),
             str(steps), str(batch), str(worker_out)])  # fmt: skip
        results["fastchat"] = json.loads(worker_out.read_text())
        common = ["--model_max_length", max_length, "--per_device_train_batch_size", batch,
                  "--gradient_accumulation_steps", 1, "--max_steps", steps]  # fmt: skip
        results["camelid"] = camelid(small, data, tmp / "c", "single", 1, *common)
        results["camelid_packed"] = camelid(
            small, data, tmp / "p", "single", 1, *common, "--packing", "True"
        )

        base = tiny_model("llama", "base", texts=corpus, vocab_size=4000, cache_dir=REPO / ".cache")
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(base)
        psi = sum(
            p.numel()
            for p in __import__("transformers").AutoModelForCausalLM.from_config(cfg).parameters()
        )
        mem = {"parameters": psi}
        for strategy in ("ddp", "fsdp", "zero3"):
            mem[strategy] = camelid(base, data, tmp / strategy, strategy, 2, "--model_max_length", 256,
                                    "--per_device_train_batch_size", 1, "--gradient_accumulation_steps", 1,
                                    "--max_steps", 3)["peak_rss_mb"]  # fmt: skip
        results["memory"] = mem

    fc, cm, pk = results["fastchat"], results["camelid"], results["camelid_packed"]
    print(f"\ntraining, 1 process, {results['settings']}")
    print(f"{'':22} {'real tok/s':>11} {'real tokens/batch':>18} {'peak RSS MB':>12}")
    for name, r in (("FastChat (pad to max)", fc), ("camelid", cm), ("camelid --packing", pk)):
        rss = r["peak_rss_mb"][0] if isinstance(r["peak_rss_mb"], list) else r["peak_rss_mb"]
        print(
            f"{name:22} {r['real_tokens_per_s']:>11,.0f} {r['real_token_share']:>18.1%} {rss:>12,.0f}"
        )
    print(f"camelid / FastChat real tokens/s: {cm['real_tokens_per_s'] / fc['real_tokens_per_s']:.1f}x "
          f"(packed: {pk['real_tokens_per_s'] / fc['real_tokens_per_s']:.1f}x)")  # fmt: skip
    psi = mem["parameters"]
    print(f"\nper-rank peak RSS, 2 ranks, llama base ({psi / 1e6:.0f}M params), fp32 + AdamW: model states "
          f"16*Psi = {16 * psi / 2**20:,.0f} MB per rank replicated (DDP), 16*Psi/2 = {8 * psi / 2**20:,.0f} MB sharded")  # fmt: skip
    for strategy in ("ddp", "fsdp", "zero3"):
        print(f"  {strategy:6} ranks: {', '.join(f'{m:,.0f} MB' for m in mem[strategy])}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"written: {out}")
    return results


if __name__ == "__main__":
    main()
