"""The GPU proof kit (issue 23): one command that spends a short GPU lease on measurement.

    python3 -m bench.gpu_check [--out FILE] [--budget_s 450] [--rows ID,...] [--dry_run] [--list]

On the bare GPU image (torch, transformers, accelerate and peft there; the rest carried as
wheels by `make gpu-wheels` and installed into /tmp/site first: README "On a GPU"), in under
8 minutes. Everything is made on that machine from the working tree alone: a tokenizer
(fastchat_data.tiny.train_tokenizer on made-up words), randomly initialised Llama models from
a LlamaConfig (no hub), ShareGPT conversations and DPO pairs of those words. Every training
row is camelid's own command line (recipes/full_finetune.py, dpo.py, qlora.py; torchrun for
fsdp and zero3) run through bench/gpu_row.py, which records the process's peak
`max_memory_allocated` over all of camelid's phases and ends the run where the final
checkpoint would start (all steps done and logged). Of recipes/core only the strategy registry
(parallel.py, no torch) is imported.

What runs, in this order. A row is skipped, with the reason, when its package or device is
missing or when its estimated cost (Row.est_s, ~20 s for a 1B row: start-up, load, 7 steps;
+40 s with compile) would pass `--budget_s` (default 450 s, so that the wheels' install and
the table fit 8 minutes); a failing row keeps its log tail, and the run goes on. By the
estimates, sections 0-5 fill the budget; each row's wall_s in the JSON is there to tune them.

0. The bf16 matmul peak: 8192^3 products on random data, median of 10 timed after 3 warm-ups
   (CUDA events). It is every row's `--peak_tflops`, so MFU is against the measured peak.
1. ~1B Llama (TinyLlama-1.1B's shape: hidden 2048, 22 layers, 32 heads / 4 kv, MLP 5632,
   vocab 32,000; 1.10B parameters), full fine-tune in bf16 on 1 GPU, 16,384 tokens per
   optimizer step (8 x 2048 or 4 x 4096, no accumulation), 2 warm-up + 5 timed steps (3 + 5
   with --compile): real tokens/s and camelid's MFU (6 N tokens/s over the peak; attention
   FLOPs not counted) as medians over the timed steps; peak memory against `recipes.plan`.
   The full grid (2 strategies x 2 lengths x 2 layouts x 3 kernels x compile x Liger x
   checkpointing: 192 runs of 20-60 s) cannot fit. The subset varies one thing at a time from
   a baseline (2048, packed, flex_attention, nothing else on), most informative first: the
   kernels on packed rows (flex_attention's block mask, sdpa's dense block-diagonal mask,
   camelid's per-conversation sdpa_packed; flash_attention_2 only where flash_attn is
   installed, and it is not carried: no wheel fits), length-grouped rows with sdpa, then
   checkpointing, Liger and compile each on alone, then 4096. FSDP2 on 1 GPU: camelid runs a
   1-process `--strategy fsdp` as single (its planner lists no fsdp row for 1 GPU), so that
   row is skipped with that reason rather than reported as FSDP2 (it runs, under torchrun,
   if camelid ever plans one).
2. DPO, one row on the 1B (4 pairs x 1024 tokens per step); its first loss must be log 2
   within DPO_TOL (the policy is still the reference).
3. QLoRA (nf4, double quantisation, paged AdamW 32-bit, LoRA r 64 on all linear layers,
   checkpointing, bf16) on the Llama-2-7B shape (hidden 4096, MLP 11008, 32 heads, vocab
   32,000) at max length 512, 4 rows per step. A 7B model written and loaded would cost a
   minute of the lease, so the shape is measured with 2 and with 6 decoder layers and the
   32-layer peak and step time are extrapolated linearly in depth (the 6-layer figure plus
   26 x the per-layer increment), reported as such beside camelid's plan for all 32 layers.
   Paged AdamW keeps its states in CUDA managed memory, which max_memory_allocated does not
   count.
4. Correctness. bf16 against fp32: the 1B's losses over 20 steps (the same run with --bf16
   False), relative difference within BF16_TOL at every step. Attention kernels on packed
   rows (2 x 2048 tokens, 2 steps): the step-1 loss and gradient norm of each within
   ATTN_TOL of sdpa_packed's, on a 2-layer model of the 1B's width whose attention weights
   (q, k, v, o) are 3x their random init, so that attention is sharp and dominates the
   residual stream. A random model's loss hardly depends on context: measured on the CPU in
   fp32 (this shape, one packed row of 1024 tokens, conversations of 30-300 tokens), letting
   the conversations see each other moved the loss by 4e-3 (relative) and the gradient norm
   by 23% (1.4e-3 and 1.3% with the plain init). So the gradient norm is the sharp test and
   the loss a second one; neither proves exact masking, which tests/test_attention.py checks
   on the CPU. And the step-1 losses of the packed-2048 rows of (1), which share batches,
   must agree within GRID_TOL.
5. ZeRO-3 on 1 GPU (torchrun; DeepSpeed built from its sdist by `make gpu-wheels`).
6. The rest of the grid, as time allows (4096 grouped, combinations, compile at 4096, ...).

The result is one JSON (`--out`, default bench/results/gpu_check.json; rewritten after every
row, so a run cut short keeps what it measured) and the same as a Markdown table beside it
(.md), printed last. `--dry_run` runs the same code on the CPU with tiny shapes (hidden 64;
max lengths 1/16, at least 128; 2-3 steps a row, the correctness rows their own; ten rows;
what needs CUDA is skipped with the reason): tests/test_gpu_check.py runs five of its rows,
so that the kit does not rot between GPU loans.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import REPO, RESULTS
from fastchat_data.options import UsageError, entry_point, option, parse
from recipes.core import parallel

DEFAULT_OUT = RESULTS / "gpu_check.json"
WHEEL_MANIFEST = REPO / ".whl" / "MANIFEST.json"


@dataclass
class GPUCheckOptions:
    out: str = option(str(DEFAULT_OUT), "the JSON; the table goes beside (.md)")
    work: str | None = option(None, "scratch folder, kept (default: a temporary one, removed)")
    budget_s: float | None = option(None, "start no row past this (default 450; dry 900)")
    rows: str | None = option(
        None,
        "row ids or sections, comma-separated, or all (default: all on a GPU, the dry-run set "
        "in a dry run)",
    )
    dry_run: bool = option(False, "tiny shapes on the CPU")
    list: bool = option(False, "print the rows in order and exit")


BF16_TOL = 1e-2  # |loss_bf16 - loss_fp32| / loss_fp32 at each of the 20 steps
ATTN_TOL = {"loss": 1e-3, "grad_norm": 2e-2}  # relative to sdpa_packed, step 1
GRID_TOL = 5e-3  # step-1 loss of the 1B packed-2048 rows, relative to their median
DPO_TOL = 2e-2  # |first DPO loss - log 2|
# recipes.plan counts a 1 GB CUDA context per GPU, which max_memory_allocated does not
PLAN_CUDA_CONTEXT = 1e9
TOKENS_PER_STEP = 16384  # the 1B rows: 8 x 2048 or 4 x 4096


def llama(hidden: int, mlp: int, layers: int, *, heads: int, kv: int) -> dict:
    return dict(
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
    )


# nominal shapes (GPU) and their dry-run stand-ins (CPU)
SHAPES = {
    "1b": llama(2048, 5632, 22, heads=32, kv=4),
    "agree": llama(2048, 5632, 2, heads=32, kv=4),
    "7b": llama(4096, 11008, 32, heads=32, kv=32),
}
DRY_SHAPES = {
    "1b": llama(64, 160, 2, heads=4, kv=2),
    "agree": llama(64, 160, 1, heads=4, kv=2),
    "7b": llama(128, 344, 32, heads=4, kv=4),
}
VOCAB = 32000
INIT_STD = 0.02
AGREE_ATTN_SCALE = 3.0  # the attention-check model's q, k, v, o weights, x this after init
QLORA_DEPTHS = (2, 6)
QLORA_ARGS = (
    "--quantization nf4 --double_quant True --optim paged_adamw_32bit --lora_r 64 "
    "--lora_alpha 16 --lora_target_modules all-linear"
).split()
KERNELS = {
    "flex": "flex_attention",
    "sdpa": "sdpa",
    "sdpa_packed": "sdpa_packed",
    "fa2": "flash_attention_2",
    "eager": "eager",
}


@dataclass
class Row:
    id: str
    section: str  # sft, fsdp, zero3, dpo, qlora, bf16, attn
    recipe: str = "recipes/full_finetune.py"
    model: str = "1b"
    max_len: int = 2048  # nominal (see length() for the dry run's)
    batch: int = 8
    warmup: int = 2
    steps: int = 7  # optimizer steps in all, warm-up included
    attn: str = "flex_attention"
    packing: bool = True
    compile: bool = False
    liger: bool = False
    gc: bool = False
    strategy: str = "single"
    bf16: bool = True
    lr: float = 1e-4
    extra: tuple = ()
    est_s: float = 20.0  # GPU seconds, for the time budget
    dry: bool = False  # in the dry run's default row set
    group: str = ""  # "grid": rows whose step-1 losses must agree

    @property
    def torchrun(self) -> bool:
        return parallel.get(self.strategy).multi_process


def training_row(name: str, dry: bool = False) -> Row:
    """A 1B full fine-tune row from its name, STRATEGY-LENGTH-packed|grouped-KERNEL[-FLAG...]
    with FLAG one of gc, liger, compile, fusedce (Liger's fused linear cross-entropy, which
    needs camelid's chunked loss off)."""
    strategy, length_, layout, kernel, *flags = name.split("-")
    n = int(length_)
    packed, compiled = layout == "packed", "compile" in flags
    est = 20 + (5 if n > 2048 else 0) + (5 if "liger" in flags else 0) + (40 if compiled else 0)
    return Row(
        name,
        strategy if parallel.get(strategy).multi_process else "sft",
        max_len=n,
        batch=TOKENS_PER_STEP // n,
        attn=KERNELS[kernel],
        packing=packed,
        gc="gc" in flags,
        liger="liger" in flags or "fusedce" in flags,
        compile=compiled,
        warmup=3 if compiled else 2,
        steps=8 if compiled else 7,
        strategy=strategy,
        est_s=est + (25 if parallel.get(strategy).engine == "deepspeed" else 0),
        dry=dry,
        group="grid" if packed and n == 2048 and parallel.get(strategy).engine == "torch" else "",
        extra=("--loss_chunk_size", "0") if "fusedce" in flags else (),
    )


FIRST = """single-2048-packed-flex single-2048-packed-sdpa single-2048-packed-sdpa_packed
single-2048-packed-fa2 single-2048-grouped-sdpa single-2048-packed-flex-gc
single-2048-packed-flex-liger single-2048-packed-flex-compile single-4096-packed-flex
fsdp-2048-packed-flex""".split()
LATER = """zero3-2048-packed-flex single-4096-grouped-sdpa single-4096-packed-flex-gc
single-2048-packed-flex-compile-liger-gc single-4096-packed-flex-compile
single-2048-packed-sdpa_packed-compile single-2048-packed-flex-fusedce
single-4096-packed-sdpa_packed single-2048-grouped-sdpa-gc""".split()
DRY_TRAINING = {
    "single-2048-packed-sdpa",
    "single-2048-packed-sdpa_packed",
    "single-2048-grouped-sdpa",
}


def grid() -> list[Row]:
    """Every row, in the order they run (the module docstring says why)."""
    rows = [training_row(n, n in DRY_TRAINING) for n in FIRST]
    rows.append(
        Row(
            "dpo-1b-1024",
            "dpo",
            recipe="recipes/dpo.py",
            max_len=1024,
            batch=4,
            attn="sdpa",
            packing=False,
            steps=6,
            lr=5e-7,
            est_s=30,
            dry=True,
        )
    )
    for depth in QLORA_DEPTHS:
        rows.append(
            Row(
                f"qlora-7b-{depth}L-512",
                "qlora",
                recipe="recipes/qlora.py",
                model=f"7b-{depth}L",
                max_len=512,
                batch=4,
                attn="sdpa",
                packing=False,
                gc=True,
                steps=6,
                extra=QLORA_ARGS,
                est_s=25,
                dry=True,
            )
        )
    for bf16 in (True, False):
        rows.append(
            Row(
                f"check-{'bf16' if bf16 else 'fp32'}-20steps",
                "bf16",
                max_len=1024,
                batch=2,
                attn="sdpa",
                warmup=0,
                steps=20,
                bf16=bf16,
                est_s=25,
                dry=True,
            )
        )
    for kernel in ("sdpa_packed", "sdpa", "flex", "fa2", "eager"):
        rows.append(
            Row(
                f"attn-{kernel}",
                "attn",
                model="agree",
                batch=2,
                attn=KERNELS[kernel],
                warmup=0,
                steps=2,
                est_s=12,
                dry=kernel in ("sdpa_packed", "sdpa"),
            )
        )
    return rows + [training_row(n) for n in LATER]


# ---------------------------------------------------------------- environment


def package_versions() -> dict:
    from importlib import metadata

    names = """torch transformers accelerate peft datasets tokenizers triton liger-kernel
    bitsandbytes deepspeed flash-attn pyarrow huggingface-hub pydantic typing-extensions numpy"""
    out = {}
    for n in names.split():
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


PROBED = ("datasets", "peft", "liger_kernel", "bitsandbytes", "deepspeed", "flash_attn")
PROBE = r"""
import json, torch
cuda = torch.cuda.is_available()
def bitsandbytes():
    import bitsandbytes.functional as F
    if cuda:  # the CUDA library loads and quantizes
        F.quantize_4bit(torch.randn(64, 64, device="cuda", dtype=torch.bfloat16), quant_type="nf4")
tests = {"datasets": lambda: __import__("datasets"), "peft": lambda: __import__("peft"),
         "liger_kernel": lambda: __import__("liger_kernel.transformers"),
         "bitsandbytes": bitsandbytes, "deepspeed": lambda: __import__("deepspeed"),
         "flash_attn": lambda: __import__("flash_attn")}
out = {}
for name, fn in tests.items():
    try:
        fn()
        out[name] = None
    except BaseException as e:
        last = (str(e).strip().splitlines() or [""])[-1]
        out[name] = f"{type(e).__name__}: {last}"[:300]
print(json.dumps(out))
"""


def probe_imports(env: dict) -> dict:
    """Package -> None if it imports (bitsandbytes: and quantizes on the GPU), else why not."""
    res = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return dict.fromkeys(PROBED, f"import probe failed: {res.stderr.strip()[-300:]}")


def wheel_manifest() -> dict:
    try:
        return json.loads(WHEEL_MANIFEST.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def matmul_peak(cuda: bool) -> dict:
    """bf16 matrix products on random data: TFLOP/s of the median timed product."""
    import torch

    if cuda:
        n, warm, reps, dtype = 8192, 3, 10, "bfloat16"
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    else:  # the dry run: a small product, only so that MFU has a denominator
        n, warm, reps, dtype = 256, 1, 5, "float32 (CPU, dry run)"
        a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(warm):
        a @ b
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
    del a, b
    if cuda:
        torch.cuda.empty_cache()
    flop = 2 * n**3
    return {
        "tflops": flop / statistics.median(times) / 1e12,
        "n": n,
        "dtype": dtype,
        "timed": reps,
        "min_max": [flop / max(times) / 1e12, flop / min(times) / 1e12],
    }


def machine(cuda: bool) -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "packages": package_versions(),
        "gpu": None,
    }
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpus=torch.cuda.device_count(),
            gpu_memory_gb=round(p.total_memory / 1e9, 1),
            sms=p.multi_processor_count,
            cuda=torch.version.cuda,
        )
        query = ["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm", "--format=csv"]
        try:
            info["nvidia_smi"] = subprocess.run(
                query, capture_output=True, text=True, timeout=20
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return info


# ---------------------------------------------------------------- assets


def length(nominal: int, dry: bool) -> int:
    """A row's max length: the dry run's are 1/16, at least 128 (the Vicuna system prompt
    alone is ~40 tokens)."""
    return max(nominal // 16, 128) if dry else nominal


def lexicon(rng: random.Random, n: int = 3000) -> list[str]:
    cons, vow = "bcdfghjklmnprstvwz", "aeiou"
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(cons) + rng.choice(vow) for _ in range(rng.randint(1, 3))))
    return sorted(words)


def text(rng: random.Random, words: list[str], n: int) -> str:
    return " ".join(rng.choice(words) + ("." if i % 13 == 12 else "") for i in range(max(n, 1)))


def conversation(rng, words, tokens: int, *, per_word: float, cid: str) -> dict:
    n_words = max(int(tokens / per_word), 8)
    turns = rng.randint(1, 3)
    conv = []
    for _ in range(turns):
        share = n_words // turns
        human = max(share // 5, 2)
        conv.append({"from": "human", "value": text(rng, words, human)})
        conv.append({"from": "gpt", "value": text(rng, words, max(share - human, 2))})
    return {"id": cid, "conversations": conv}


@dataclass
class Assets:
    models: dict = field(default_factory=dict)  # name -> folder (weights + tokenizer)
    plan_configs: dict = field(default_factory=dict)  # name -> folder with config.json only
    data: dict = field(default_factory=dict)  # name -> file
    per_word: float = 1.0
    seconds: float = 0.0


def model_specs(dry: bool) -> dict:
    """Model name -> its LlamaConfig dimensions: every row's model, and the 32-layer 7B."""
    shapes = DRY_SHAPES if dry else SHAPES
    specs = {}
    for name in {r.model for r in grid()} | {"7b-32L"}:
        base, _, depth = name.partition("-")
        specs[name] = dict(shapes[base])
        if depth:
            specs[name]["num_hidden_layers"] = int(depth.rstrip("L"))
    return specs


def build_assets(work: Path, dry: bool, cuda: bool, *, rows: list[Row]) -> Assets:
    """Tokenizer, models (random init, saved in bf16: camelid loads them in fp32) and data."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fastchat_data.tiny import TEMPLATE_WORDS, save_tokenizer, train_tokenizer

    t0 = time.perf_counter()
    rng = random.Random(0)
    words = lexicon(rng)
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer_config.json").exists():
        corpus = [text(rng, words, 60) for _ in range(1500)] + TEMPLATE_WORDS * 20
        train_tokenizer(corpus, tok_dir, "llama", vocab_size=4000)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    sample = text(random.Random(1), words, 2000)
    assets = Assets(per_word=len(tok(sample, add_special_tokens=False).input_ids) / 2000)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    common = dict(
        vocab_size=max(len(tok), 512 if dry else VOCAB),
        tie_word_embeddings=False,
        max_position_embeddings=length(4096, dry),
        initializer_range=INIT_STD,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=pad,
    )

    specs = model_specs(dry)
    for name, dims in sorted(specs.items()):  # configs only, for camelid's planner
        LlamaConfig(**common, **dims).save_pretrained(work / "plan" / name)
        assets.plan_configs[name] = work / "plan" / name
    for name in sorted({r.model for r in rows}):
        out = work / "models" / name
        if not (out / "config.json").exists():
            torch.manual_seed(0)
            with torch.device("cuda" if cuda else "cpu"):
                model = LlamaForCausalLM(LlamaConfig(**common, **specs[name]))
            if name == "agree":  # sharp attention that dominates the residual stream
                with torch.no_grad():
                    for layer in model.model.layers:
                        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                            getattr(layer.self_attn, proj).weight.mul_(AGREE_ATTN_SCALE)
            model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
            save_tokenizer(tok, out)
            del model
        assets.models[name] = out
    if cuda:
        torch.cuda.empty_cache()

    drng, per_word = random.Random(2), assets.per_word
    (work / "data").mkdir(parents=True, exist_ok=True)
    for name, n_records in (("sft-2048", 64 if dry else 200), ("sft-4096", 32 if dry else 120)):
        top = length(int(name[4:]), dry)
        recs = [
            conversation(
                drng, words, drng.randint(top // 8, top), per_word=per_word, cid=f"{name}-{i}"
            )
            for i in range(n_records)
        ]
        assets.data[name] = work / "data" / f"{name}.json"
        assets.data[name].write_text(json.dumps(recs))
    quarter = length(1024, dry) // 4  # DPO: prompt, chosen and rejected of ~1/4 the length each

    def words_for(tokens: int) -> int:
        return int(tokens / per_word)

    pairs = [
        {
            "prompt": text(drng, words, words_for(quarter)),
            "chosen": text(drng, words, words_for(drng.randint(quarter // 2, quarter))),
            "rejected": text(drng, words, words_for(drng.randint(quarter // 2, quarter))),
        }
        for _ in range(24 if dry else 48)
    ]
    assets.data["pairs"] = work / "data" / "pairs.json"
    assets.data["pairs"].write_text(json.dumps(pairs))
    assets.seconds = time.perf_counter() - t0
    return assets


# ---------------------------------------------------------------- rows


def row_settings(row: Row, dry: bool) -> dict:
    steps, warmup = row.steps, row.warmup
    if dry:  # 2-3 steps a row; the correctness rows keep their steps
        steps = {"bf16": 20, "attn": 2}.get(row.section, 3 if row.warmup else 2)
        warmup = min(row.warmup, 1)
    return {
        "max_len": length(row.max_len, dry),
        "batch": row.batch,
        "steps": steps,
        "warmup": warmup,
    }


def data_for(row: Row, assets: Assets) -> Path:
    if row.section == "dpo":
        return assets.data["pairs"]
    return assets.data["sft-4096" if row.max_len == 4096 else "sft-2048"]


def command(
    row: Row, s: dict, assets: Assets, *, out: Path, record: Path, peak: float | None, dry: bool
) -> list[str]:
    """The recipe's command line, under bench/gpu_row.py (and torchrun for fsdp / zero3)."""
    opts = {
        "model_name_or_path": assets.models[row.model],
        "data_path": data_for(row, assets),
        "output_dir": out,
        "overwrite_output_dir": True,
        "strategy": row.strategy,
        "max_steps": s["steps"],
        "model_max_length": s["max_len"],
        "per_device_train_batch_size": s["batch"],
        "gradient_accumulation_steps": 1,
        "packing": row.packing,
        "attn_implementation": row.attn,
        "gradient_checkpointing": row.gc,
        "bf16": row.bf16 and not (dry and row.section == "qlora"),  # (as qlora_tiny_cpu.yaml)
        "report_to": "none",
        "save_steps": 10**6,  # the first checkpoint is the final one: gpu_row stops there
        "logging_steps": 1,
        "learning_rate": row.lr,
        "warmup_ratio": 0,
        "seed": 42,
    }
    if row.section != "qlora":
        opts.update(compile=row.compile, use_liger_kernel=row.liger)
    if row.packing:
        opts["packing_row_tokens"] = s["max_len"]
    else:
        opts["group_by_length"] = True
    if peak:
        opts["peak_tflops"] = f"{peak:.6g}"
    args = [x for k, v in opts.items() for x in (f"--{k}", str(v))] + list(row.extra)
    if dry and row.section == "qlora":  # the dry run's tiny LoRA (a later flag wins)
        args += ["--lora_r", "8", "--lora_alpha", "16"]
    launch = [sys.executable]
    if row.torchrun:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    wrapper = [str(REPO / "bench" / "gpu_row.py"), "--record", str(record), "--stop_at_checkpoint"]
    return [*launch, *wrapper, "--", row.recipe, *args]


def plan_prediction(row: Row, s: dict, assets: Assets, *, model: str | None = None) -> dict:
    """camelid's planner (`python -m recipes.plan ... --json`) for this row's setting, from
    the model's config.json alone."""
    batch = s["batch"] * (2 if row.section == "dpo" else 1)  # DPO: chosen + rejected rows
    cmd = [
        sys.executable,
        "-m",
        "recipes.plan",
        "--model",
        str(assets.plan_configs[model or row.model]),
        "--ngpu",
        "1",
        "--model_max_length",
        str(s["max_len"]),
        "--per_device_train_batch_size",
        str(batch),
        "--json",
    ]
    cmd += ["--bf16"] if row.bf16 else []
    cmd += ["--gradient_checkpointing"] if row.gc else []
    cmd += ["--peft", "qlora", "--lora_r", "64"] if row.section == "qlora" else []
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    if res.returncode:
        return {"error": res.stderr.strip()[-300:]}
    by = {r["strategy"]: r for r in json.loads(res.stdout)["rows"]}
    got = by.get(row.strategy)
    return {
        "strategies": sorted(by),
        "strategy": row.strategy if got else None,
        "total_gb": got["total"] / 1e9 if got else None,
    }


def finite(x) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def summarise(s: dict, metrics: list[dict], record: dict) -> dict:
    timed = metrics[s["warmup"] :] or metrics

    def med(key: str) -> float | None:
        if not timed or not all(key in m for m in timed):
            return None
        return finite(statistics.median([m[key] for m in timed]))

    def gb(mb) -> float | None:
        return mb * 2**20 / 1e9 if mb else None

    return {
        "steps_done": len(metrics),
        "steps_timed": len(timed),
        "tokens_per_s": med("tokens_per_s"),
        "mfu": med("mfu"),
        "step_s": med("step_s"),
        "tokens_per_step": med("tokens"),
        "real_token_share": med("real_token_share"),
        "losses": [finite(m.get("loss")) for m in metrics],
        "grad_norms": [finite(m.get("grad_norm")) for m in metrics],
        "peak_gb": gb(record.get("peak_allocated_mb")),
        "segments_gb": [round(gb(x) or 0.0, 3) for x in record.get("segments_mb", [])],
        "peak_reserved_gb": gb(record.get("peak_reserved_mb")),
        "peak_rss_gb": gb(record.get("peak_rss_mb")),
        "stopped": record.get("stopped"),
        "modules": record.get("modules", []),
    }


def run_row(
    row: Row,
    s: dict,
    assets: Assets,
    *,
    work: Path,
    env: dict,
    peak: float | None,
    dry: bool,
    timeout: float,
) -> dict:
    runs = work / "runs"
    out, record, log = runs / row.id, runs / f"{row.id}.record.json", runs / f"{row.id}.log"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    record.unlink(missing_ok=True)
    cmd = command(row, s, assets, out=out, record=record, peak=peak, dry=dry)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
        )
        try:
            rc, timed_out = proc.wait(timeout=max(timeout, 1)), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, timed_out = proc.wait(), True
    tail = log.read_text(errors="replace")[-2500:]
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    metrics = [json.loads(x) for x in lines if x.strip()]
    rec = json.loads(record.read_text()) if record.exists() else {}
    result = {
        "wall_s": round(time.perf_counter() - t0, 1),
        "command": " ".join(cmd[cmd.index("--") + 1 :]),
    }
    if timed_out:
        result.update(status="failed", reason=f"killed after {timeout:.0f} s (time budget)")
    elif rc != 0 or len(metrics) < s["steps"]:
        why = f"exit status {rc}" if rc else f"{len(metrics)} of {s['steps']} steps logged"
        result.update(status="failed", reason=why)
    else:
        result["status"] = "ok"
    if result["status"] != "ok":
        result["log_tail"] = tail
    if metrics:
        result.update(summarise(s, metrics, rec))
    shutil.rmtree(out, ignore_errors=True)  # a run that ended normally left its checkpoint
    return result


def row_note(row: Row, r: dict) -> str:
    parts = []
    if r.get("tokens_per_step"):
        parts.append(f"{r['tokens_per_step']:,.0f} tok/step")
    if r.get("real_token_share") is not None and r["real_token_share"] < 0.995:
        parts.append(f"{r['real_token_share']:.0%} real (rest padding)")
    if row.compile:
        parts.append(f"{row.warmup} warm-up steps hold the compile")
    if "--loss_chunk_size" in row.extra:
        parts.append("Liger fused linear CE (chunked loss off)")
    notes = {
        "dpo": "plan: as SFT with chosen + rejected rows",
        "qlora": "paged AdamW states (managed memory) not in peak",
        "zero3": "DeepSpeed ZeRO-3, 1 process (torchrun)",
    }
    if row.section in notes:
        parts.append(notes[row.section])
    return "; ".join(parts)


# ---------------------------------------------------------------- skips


def skip_reason(row: Row, cuda: bool, probe: dict, *, manifest: dict) -> str | None:
    """Why this row cannot run here (a device or a package missing), or None."""

    def missing(pkg: str, dist: str) -> str | None:
        err = probe.get(pkg)
        if err is None:
            return None
        why = manifest.get("dropped", {}).get(dist) or manifest.get("not_carried", {}).get(dist)
        return f"{dist} unavailable ({err})" + (f"; not carried: {why[:120]}" if why else "")

    why = missing("datasets", "datasets")
    if why:
        return why + " (every recipe tokenizes through datasets)"
    if row.attn == "flash_attention_2":
        return (
            "flash_attention_2 needs a CUDA GPU"
            if not cuda
            else missing("flash_attn", "flash-attn")
        )
    if row.attn == "flex_attention" and not cuda:
        return "flex_attention needs a CUDA GPU (torch has no flex_attention backward on CPU)"
    if row.liger:
        if not cuda:
            return "Liger's kernels are Triton GPU kernels: needs a CUDA GPU"
        if missing("liger_kernel", "liger-kernel"):
            return missing("liger_kernel", "liger-kernel")
    if row.compile and not cuda:
        return "compile rows run on the GPU only (inductor's CPU build takes minutes here)"
    if row.section == "qlora":
        return missing("bitsandbytes", "bitsandbytes") or missing("peft", "peft")
    if parallel.get(row.strategy).engine == "deepspeed":
        if not cuda:
            return "the ZeRO-3 row runs on the GPU only (DeepSpeed's CPU start-up is ~30 s a row)"
        return missing("deepspeed", "deepspeed")
    return None


# ---------------------------------------------------------------- checks


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def checks(results: dict[str, dict], audit: dict) -> list[dict]:
    """The correctness checks over the rows that ran (pass: None where they could not)."""
    from bench.gpu_wheels import dist_of_module, on_image_or_carried

    out = []
    ok = {k: v for k, v in results.items() if v.get("status") == "ok" and v.get("losses")}

    def add(name: str, passed, **kw) -> None:
        out.append({"check": name, "pass": passed, **kw})

    b, f = ok.get("check-bf16-20steps"), ok.get("check-fp32-20steps")
    name = "bf16 losses vs fp32, every step"
    if b and f and None not in b["losses"] + f["losses"]:
        diffs = [rel(x, y) for x, y in zip(b["losses"], f["losses"])]
        worst = max(diffs)
        add(
            name,
            worst <= BF16_TOL,
            n=len(diffs),
            value=worst,
            tolerance=BF16_TOL,
            detail=f"worst at step {diffs.index(worst) + 1}; loss {b['losses'][0]:.4f} -> "
            f"{b['losses'][-1]:.4f} (bf16), {f['losses'][0]:.4f} -> {f['losses'][-1]:.4f} (fp32)",
        )
    else:
        add(name, None, detail="not run (a row was skipped or failed)")

    first = {k: v for k, v in ok.items() if None not in (v["losses"][0], v["grad_norms"][0])}
    ref = first.get("attn-sdpa_packed")
    others = {k: v for k, v in first.items() if k.startswith("attn-") and v is not ref}
    name = "attention kernels agree on packed rows (step 1, vs sdpa_packed)"
    if ref and others:
        worst, detail = {"loss": 0.0, "grad_norm": 0.0}, []
        for k, v in sorted(others.items()):
            d = {
                key: rel(
                    v[f"{key}es" if key == "loss" else "grad_norms"][0],
                    ref[f"{key}es" if key == "loss" else "grad_norms"][0],
                )
                for key in worst
            }
            worst = {key: max(worst[key], d[key]) for key in worst}
            detail.append(f"{k[5:]}: loss {d['loss']:.1e}, grad norm {d['grad_norm']:.1e}")
        passed = all(worst[key] <= ATTN_TOL[key] for key in worst)
        add(
            name,
            passed,
            n=len(others) + 1,
            value=worst,
            tolerance=ATTN_TOL,
            detail="; ".join(detail),
        )
    else:
        add(name, None, detail="fewer than two kernels ran")

    grid_rows = {k: v["losses"][0] for k, v in first.items() if v.get("group") == "grid"}
    if len(grid_rows) >= 2:
        mid = statistics.median(grid_rows.values())
        worst = max(rel(x, mid) for x in grid_rows.values())
        add(
            "1B packed-2048 rows: the same step-1 loss",
            worst <= GRID_TOL,
            n=len(grid_rows),
            value=worst,
            tolerance=GRID_TOL,
            detail=", ".join(f"{k}: {x:.5f}" for k, x in grid_rows.items()),
        )

    d = first.get("dpo-1b-1024")
    if d:
        v = abs(d["losses"][0] - math.log(2))
        add(
            "DPO first loss is log 2 (policy = reference)",
            v <= DPO_TOL,
            value=v,
            tolerance=DPO_TOL,
            detail=f"first loss {d['losses'][0]:.5f}",
        )

    # what the runs imported of what camelid's own code imports: on the image or carried?
    bad: dict[str, list] = {}
    for k, v in ok.items():
        for m in v.get("modules", []):
            if m in audit and not on_image_or_carried(dist_of_module(m)):
                bad.setdefault(m, []).append(k)
    ran = [k for k, v in ok.items() if v.get("modules")]
    add(
        "camelid's imports on these runs are on the GPU image or carried",
        not bad if ran else None,
        n=len(ran),
        value={m: r[:3] for m, r in bad.items()},
        detail="modules the runs imported that recipes/ or fastchat_data/ import, against "
        "bench.gpu_wheels' image list + carried wheels",
    )
    return out


def qlora_extrapolation(results: dict, plan_full: dict | None) -> dict | None:
    """The 32-layer 7B from the 2- and 6-layer runs: linear in depth."""
    (d0, d1), layers = QLORA_DEPTHS, SHAPES["7b"]["num_hidden_layers"]
    a, b = (results.get(f"qlora-7b-{d}L-512", {}) for d in QLORA_DEPTHS)
    if a.get("status") != "ok" or b.get("status") != "ok":
        return None
    out = {
        "measured_layers": [d0, d1],
        "layers": layers,
        "method": f"linear in depth through the {d0}- and {d1}-layer runs of the 7B shape",
    }
    if a.get("peak_gb") and b.get("peak_gb"):
        per = (b["peak_gb"] - a["peak_gb"]) / (d1 - d0)
        out.update(peak_gb=b["peak_gb"] + per * (layers - d1), per_layer_gb=per)
    if a.get("step_s") and b.get("step_s") and b.get("tokens_per_step"):
        step = b["step_s"] + (b["step_s"] - a["step_s"]) / (d1 - d0) * (layers - d1)
        out.update(step_s=step, tokens_per_s=b["tokens_per_step"] / step if step > 0 else None)
    if plan_full:
        out["plan_total_gb"] = plan_full.get("total_gb")
    return out


# ---------------------------------------------------------------- report


def fmt(x, spec: str, none: str = "") -> str:
    return none if x is None else format(x, spec)


def table(report: dict) -> str:
    m, mm = report["machine"], report["matmul"]
    pk = m["packages"]
    dry = " (DRY RUN on the CPU, tiny shapes)" if report["dry_run"] else ""
    lines = [
        f"camelid GPU check, {report['date']}{dry}",
        f"machine: {m.get('gpu') or 'no GPU'}; torch {pk.get('torch')}, transformers "
        f"{pk.get('transformers')}, python {m['python']}",
        f"matmul peak (measured, {mm['dtype']}, n={mm['n']}): {mm['tflops']:.1f} TFLOP/s; "
        "MFU = camelid's 6 N tokens/s over it (attention FLOPs not counted)",
        f"elapsed {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget",
        "",
        "| row | status | tok/s | MFU | peak GB | plan GB | peak/plan | s | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        pred = (r.get("plan") or {}).get("total_gb")
        ratio = (
            r["peak_gb"] / (pred - PLAN_CUDA_CONTEXT / 1e9) if r.get("peak_gb") and pred else None
        )
        note = r.get("note", "") if r["status"] == "ok" else r.get("reason", "")
        cells = [
            r["id"],
            r["status"],
            fmt(r.get("tokens_per_s"), ",.0f"),
            fmt(r.get("mfu"), ".1%"),
            fmt(r.get("peak_gb"), ".2f"),
            fmt(pred, ".2f"),
            fmt(ratio, ".2f"),
            fmt(r.get("wall_s"), ".0f"),
            note[:160],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    q = report.get("qlora_7b")
    if q:
        lines += [
            "",
            f"QLoRA, 7B shape with 32 layers, extrapolated ({q['method']}): peak "
            f"{fmt(q.get('peak_gb'), '.2f', '?')} GB (camelid's plan: "
            f"{fmt(q.get('plan_total_gb'), '.2f', '?')} GB), "
            f"{fmt(q.get('tokens_per_s'), ',.0f', '?')} tok/s",
        ]
    lines += ["", "| check | result | value | tolerance | detail |", "|---|---|---|---|---|"]
    for c in report["checks"]:
        value, tol = c.get("value"), c.get("tolerance")
        value = json.dumps(value) if isinstance(value, dict) else fmt(value, ".2e")
        tol = json.dumps(tol) if isinstance(tol, dict) else fmt(tol, ".0e")
        result = {True: "pass", False: "FAIL", None: "not run"}[c["pass"]]
        lines.append(f"| {c['check']} | {result} | {value} | {tol} | {c.get('detail', '')[:200]} |")
    lines += [
        "",
        "peak GB: max_memory_allocated over the whole run (1e9 bytes). plan GB: the total "
        "of `python -m recipes.plan`, which counts a 1 GB CUDA context that "
        "max_memory_allocated does not: peak/plan divides by plan - 1 GB.",
    ]
    return "\n".join(lines)


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    out.with_suffix(".md").write_text(table(report) + "\n")


# ---------------------------------------------------------------- main


@entry_point
def main(argv: list[str] | None = None) -> int:
    opts = parse(GPUCheckOptions, argv, prog="python -m bench.gpu_check", description=__doc__)
    t0 = time.perf_counter()
    rows = grid()
    if opts.list:
        for r in rows:
            print(f"{r.id:<42} {r.section:<6} ~{r.est_s:>3.0f} s{'  (dry run)' if r.dry else ''}")
        return 0

    import torch

    dry = opts.dry_run
    cuda = torch.cuda.is_available() and not dry
    if not cuda and not dry:
        print("no CUDA GPU here: the full shapes need one; --dry_run checks the kit on the CPU")
        return 2
    budget = opts.budget_s or (900.0 if dry else 450.0)
    if opts.rows and opts.rows != "all":
        wanted = set(opts.rows.split(","))
        unknown = wanted - {r.id for r in rows} - {r.section for r in rows}
        if unknown:
            raise UsageError(
                f"--rows: unknown rows or sections: {', '.join(sorted(unknown))} "
                "(--list shows them)"
            )
        selected = {r.id for r in rows if r.id in wanted or r.section in wanted}
    else:
        selected = {r.id for r in rows if r.dry or not dry or opts.rows == "all"}
    work = Path(opts.work) if opts.work else Path(tempfile.mkdtemp(prefix="camelid-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(opts.out)
    env = {
        **os.environ,
        "CAMELID_CACHE": str(work / "cache"),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    if dry:  # two cores, shared: one thread a process
        env["OMP_NUM_THREADS"] = "1"
        env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
        torch.set_num_threads(1)

    manifest, probe = wheel_manifest(), {}
    report = {
        "kit": "camelid bench/gpu_check.py (issue 23)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": dry,
        "budget_s": budget,
        "elapsed_s": 0.0,
        "machine": machine(cuda),
        "matmul": matmul_peak(cuda),
        "wheels": {k: manifest.get(k) for k in ("carried", "dropped", "not_carried")},
        "tolerances": {"bf16": BF16_TOL, "attention": ATTN_TOL, "grid": GRID_TOL, "dpo": DPO_TOL},
        "rows": [],
        "checks": [],
        "qlora_7b": None,
    }
    peak = report["matmul"]["tflops"]
    print(f"matmul peak {peak:.2f} TFLOP/s ({report['matmul']['dtype']})", flush=True)
    # the import probe (bitsandbytes quantizes on the GPU) starts after the matmul timing
    prober = threading.Thread(target=lambda: probe.update(probe_imports(env)), daemon=True)
    prober.start()
    assets = build_assets(work, dry, cuda, rows=[r for r in rows if r.id in selected])
    report["assets"] = {
        "seconds": round(assets.seconds, 1),
        "tokens_per_word": assets.per_word,
        "models": sorted(assets.models),
    }
    prober.join()
    report["imports"] = probe

    from bench.gpu_wheels import camelid_imports

    audit, results = camelid_imports(), {}
    for row in rows:
        s = row_settings(row, dry)
        entry = {
            "id": row.id,
            "section": row.section,
            "group": row.group,
            "config": {**asdict(row), **s},
        }
        why = skip_reason(row, cuda, probe, manifest=manifest)
        if why is None and row.id not in selected:
            why = "not in this run's row set (--rows" + (", dry run)" if dry else ")")
        elapsed = time.perf_counter() - t0
        if why is None and not dry and elapsed + row.est_s > budget:
            why = (
                f"time budget: {budget - elapsed:.0f} s of {budget:.0f} left, "
                f"the row needs ~{row.est_s:.0f}"
            )
        if why:
            entry.update(status="skipped", reason=why)
        else:
            if row.section != "attn":
                entry["plan"] = plan_prediction(row, s, assets)
            print(f"[{elapsed:4.0f} s] {row.id} ...", flush=True)
            entry.update(
                run_row(
                    row, s, assets, work=work, env=env, peak=peak, dry=dry, timeout=budget - elapsed
                )
            )
            entry["note"] = row_note(row, entry)
            print(
                f"         {entry['status']} in {entry['wall_s']} s: tok/s "
                f"{fmt(entry.get('tokens_per_s'), ',.0f', '-')}, peak "
                f"{fmt(entry.get('peak_gb'), '.2f', '-')} GB {entry.get('reason', '')}",
                flush=True,
            )
        results[row.id] = entry
        report["rows"].append(entry)
        report["elapsed_s"] = time.perf_counter() - t0
        report["checks"] = checks(results, audit)
        write(report, out)

    qrow = next(r for r in rows if r.section == "qlora")
    full = plan_prediction(qrow, row_settings(qrow, dry), assets, model="7b-32L")
    report["qlora_7b"] = qlora_extrapolation(results, full)
    report["elapsed_s"] = time.perf_counter() - t0
    report["checks"] = checks(results, audit)
    for r in report["rows"]:  # checked above; the JSON keeps no import lists
        r.pop("modules", None)
    write(report, out)
    print("\n" + table(report) + f"\n\nwritten: {out} and {out.with_suffix('.md')}")
    if not opts.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(c["pass"] is False for c in report["checks"]) else 0


if __name__ == "__main__":
    sys.exit(main())
