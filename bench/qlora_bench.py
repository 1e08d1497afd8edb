"""QLoRA benchmark (the QLoRA part of `make bench`).

    python -m bench.qlora_bench [--quick] [--out bench/results/qlora_bench.json]

a. Bytes of the base model, 4-bit nf4 with double quantization (as recipes/qlora.py loads it)
   against bf16, from the loaded models' own tensors: the linear layers bitsandbytes quantizes,
   and the whole model (embeddings, head and norms stay 16-bit). On the ~17M "small" tiny
   Llama and, unless --quick, on Llama-2-7B's shape: one decoder layer of its size with its
   32,000-token embeddings and head is built (random weights), loaded both ways and measured;
   the 7B figure adds the measured layer 31 more times (layers are identical in size).
b. Step time and peak memory of QLoRA (nf4 + LoRA, paged AdamW) vs LoRA (full-precision base)
   vs the full fine-tune, on the same model, data and batches ("small", and unless --quick the
   ~91M "base", where the model's states outweigh the ~1.2 GB runtime): each run is the recipe
   launched as a user launches it (`python recipes/...py`), in its own process; the step time is
   the median of its own metrics.jsonl after the first 2 steps, the peak its rank record's RSS.
   CPU, fp32 compute: the figures compare the three methods on this machine, not on a GPU.
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

import torch

from bench import REPO, result_option, write_json
from fastchat_data.options import entry_point, option, parse

DATA = "alpaca_gpt4_data_en_1k.json"


@dataclass
class QLoraBenchOptions:
    quick: bool = option(False, "the small model only, fewer steps")
    out: str = result_option("qlora_bench.json")


LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, vocab_size=32000)
LLAMA_7B_LAYERS = 32


def model_bytes(model) -> dict:
    """Bytes of every parameter and buffer as loaded (bitsandbytes' packed 4-bit weights and
    their quantization constants included), split into the quantized linear layers and the rest."""
    head = model.get_output_embeddings()  # bitsandbytes' Linear4bit subclasses torch.nn.Linear
    quantized_part, rest = 0, 0
    for module in model.modules():
        own = sum(
            t.numel() * t.element_size()
            for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        )
        if isinstance(module, torch.nn.Linear) and module is not head:
            state = getattr(module.weight, "quant_state", None)
            if state is not None:  # absmax (double-quantized), code book, nested constants
                own += sum(
                    t.numel() * t.element_size()
                    for t in state.as_dict(packed=True).values()
                    if isinstance(t, torch.Tensor)
                )
            quantized_part += own
        else:
            rest += own
    return {"linear": quantized_part, "total": quantized_part + rest}


def base_bytes(path: Path) -> dict:
    """bf16 and nf4 + double quantization, both through recipes/qlora.py's own loader."""
    from recipes.core.attention import attention_kwargs
    from recipes.core.lora import load_base
    from recipes.core.recipe import QLoraConfig

    cpu, cfg = torch.device("cpu"), QLoraConfig()  # the recipe's --attn_implementation
    kw = dict(bf16=True, attention=attention_kwargs(cfg))
    bf16 = model_bytes(load_base(str(path), cpu, quantization="none", **kw))
    nf4 = model_bytes(load_base(str(path), cpu, quantization="nf4", double_quant=True, **kw))
    return {
        "bf16": bf16,
        "nf4": nf4,
        "ratio_linear": nf4["linear"] / bf16["linear"],
        "ratio_total": nf4["total"] / bf16["total"],
    }


def llama_7b_bytes(tmp: Path) -> dict:
    """Llama-2-7B's bytes, bf16 vs nf4: one full-size decoder layer (plus embeddings and head)
    measured, the other 31 layers added as copies of the measured one."""
    one = base_bytes(one_layer_7b(tmp / "llama7b-1layer"))
    out = {}
    for kind in ("bf16", "nf4"):
        layer_rest = (
            2 * LLAMA_7B["hidden_size"] * 2
        )  # the layer's two RMSNorm weights, 16-bit in both
        per_layer = one[kind]["linear"] + layer_rest
        out[kind] = {
            "linear": one[kind]["linear"] * LLAMA_7B_LAYERS,
            "total": one[kind]["total"] + (LLAMA_7B_LAYERS - 1) * per_layer,
        }
    return {
        **out,
        "ratio_linear": out["nf4"]["linear"] / out["bf16"]["linear"],
        "ratio_total": out["nf4"]["total"] / out["bf16"]["total"],
        "measured_layers": 1,
    }


def one_layer_7b(out: Path) -> Path:
    """A Llama with one decoder layer of Llama-2-7B's size, random weights, saved in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=1, max_position_embeddings=4096, tie_word_embeddings=False, **LLAMA_7B
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(out, safe_serialization=True)
    return out


def run_recipe(
    name: str, recipe: str, model: Path, *, data: Path, out: Path, steps: int, extra: list[str]
) -> dict:
    cmd = [
        sys.executable,
        str(REPO / "recipes" / recipe),
        "--model_name_or_path",
        str(model),
        "--data_path",
        str(data),
        "--output_dir",
        str(out),
        "--max_steps",
        str(steps),
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "1",
        "--model_max_length",
        "512",
        "--save_steps",
        "100000",
        "--report_to",
        "none",
        "--logging_steps",
        "1",
        "--bf16",
        "False",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if res.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{res.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rank = json.loads((out / "ranks" / "rank0.json").read_text())
    timed = rows[2:] or rows
    trained = next((ln for ln in res.stdout.splitlines() if "parameters" in ln), "")
    return {
        "method": name,
        "step_s": statistics.median(r["step_s"] for r in timed),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "peak_rss_mb": rank["peak_rss_mb"],
        "final_loss": rows[-1]["loss"],
        "startup_line": trained.strip(),
        "wall_s": time.perf_counter() - t0,
    }


def report(results: dict) -> str:
    lines = [
        "== a. base model bytes, 4-bit nf4 + double quantization vs bf16 (target <= 0.3x)",
        f"{'model':<28}{'bf16 MiB':>10}{'nf4 MiB':>10}{'linear x':>10}{'whole x':>10}",
    ]
    for name, r in results["bytes"].items():
        lines.append(
            f"{name:<28}{r['bf16']['total'] / 2**20:>10.1f}{r['nf4']['total'] / 2**20:>10.1f}"
            f"{r['ratio_linear']:>10.3f}{r['ratio_total']:>10.3f}"
        )
    s = results["settings"]
    for model, runs in results["methods"].items():
        lines += [
            "",
            f"== b. one process, {model}, {s['data']}, batch 4, max length 512, "
            f"{runs[0]['steps']} steps, fp32 compute",
            f"{'method':<34}{'step s':>9}{'tok/s':>9}{'peak RSS MB':>13}{'step vs full':>14}"
            f"{'mem vs full':>13}",
        ]
        full = next(r for r in runs if r["method"].startswith("full"))
        for r in runs:
            lines.append(
                f"{r['method']:<34}{r['step_s']:>9.3f}{r['tokens_per_s']:>9,.0f}"
                f"{r['peak_rss_mb']:>13,.0f}{r['step_s'] / full['step_s']:>13.2f}x"
                f"{r['peak_rss_mb'] / full['peak_rss_mb']:>12.2f}x"
            )
    return "\n".join(lines)


@entry_point
def main(argv: list[str] | None = None) -> int:
    opts = parse(QLoraBenchOptions, argv, prog="python -m bench.qlora_bench", description=__doc__)
    from fastchat_data.tiny import reference_corpus, shared_data_dir, tiny_model

    cache = REPO / ".cache"
    small = tiny_model("llama", "small", texts=reference_corpus(), vocab_size=4000, cache_dir=cache)
    steps = 6 if opts.quick else 20
    results: dict = {
        "settings": {"data": DATA, "quick": opts.quick, "cpu_count": os.cpu_count()},
        "bytes": {},
    }
    with tempfile.TemporaryDirectory(prefix="qlora_bench-") as tmp:
        tmp = Path(tmp)
        print("a. base bytes: small", flush=True)
        results["bytes"]["llama small (~17M)"] = base_bytes(small)
        if not opts.quick:
            print("a. base bytes: Llama-2-7B shape (one layer measured)", flush=True)
            results["bytes"]["Llama-2-7B shape"] = llama_7b_bytes(tmp)
        data = shared_data_dir() / DATA
        qlora_tiny = ["--config", "qlora_tiny_cpu.yaml"]
        methods = [
            (
                "full fine-tune (AdamW)",
                "full_finetune.py",
                ["--config", "tiny_cpu.yaml", "--strategy", "single"],
            ),
            (
                "LoRA r16, fp32 base (AdamW)",
                "qlora.py",
                [*qlora_tiny, "--quantization", "none", "--optim", "adamw_torch"],
            ),
            ("QLoRA r16, nf4 base (paged AdamW)", "qlora.py", qlora_tiny),
        ]
        results["methods"] = {}
        models = [("llama small (~17M)", small, steps)]
        if not opts.quick:  # where the model's own states, not the runtime, dominate memory
            base = tiny_model(
                "llama", "base", texts=reference_corpus(), vocab_size=4000, cache_dir=cache
            )
            models.append(("llama base (~91M)", base, 6))
        for label, model, n_steps in models:
            runs = results["methods"][label] = []
            for name, recipe, extra in methods:
                print(f"b. {label}: {name}", flush=True)
                out = tmp / label.split()[1] / recipe.split(".")[0] / name[:4]
                runs.append(
                    {
                        **run_recipe(
                            name,
                            recipe,
                            model,
                            data=data,
                            out=out,
                            steps=n_steps,
                            extra=[*extra, "--gradient_checkpointing", "False"],
                        ),
                        "steps": n_steps,
                    }
                )
    table = report(results)
    print("\n" + table)
    write_json(opts.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
