"""Loss benchmark: peak memory and time of the causal-LM loss, transformers' vs chunked.

    python -m bench.loss_bench [--quick] [--tokens 2048] [--vocab 32000]
                               [--out bench/results/loss_bench.json]

Two measurements, each variant in a fresh process (torch's CPU allocator keeps no statistics,
so the peak is the process's peak RSS, VmHWM, reset through /proc/self/clear_refs just before
the measured step, with glibc returning every block over 64 KiB to the OS when freed):

a. the loss alone: hidden states (tokens x hidden, requiring grad) -> output embedding
   (hidden -> vocab) -> loss -> backward. transformers = ForCausalLMLoss on the full logits
   (what model(labels=...) runs); chunked = recipes.core.loss.chunked_causal_lm_loss.
b. a whole training forward + backward of a tiny Llama with the same 32K head, through
   model(**batch, labels=...) vs recipes.core.loss.forward_with_loss (what the engines call).

All positions carry a label (the worst case for the chunked loss: it skips unlabelled ones).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import REPO, result_option, write_json
from fastchat_data.options import UsageError, entry_point, option, parse

MB = 2**20


@dataclass
class LossBenchOptions:
    tokens: int = option(2048, "labelled tokens (one row)", minimum=2)
    vocab: int = option(32000, "vocabulary: the output embedding's rows", minimum=2)
    hidden: int = option(
        256, "hidden size (the tiny Llama's, and the loss-alone hidden states')", minimum=1
    )
    chunks: str = option(
        "0,4096,1024,512", "comma-separated chunk sizes (rows); 0: transformers' full logits"
    )
    quick: bool = option(False, "a short run", preset={"tokens": 1024, "chunks": "0,512"})
    out: str = result_option("loss_bench.json")


def _status(key: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) / 1024


def worker(spec: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.loss.loss_utils import ForCausalLMLoss

    from recipes.core.loss import chunked_causal_lm_loss, forward_with_loss

    torch.manual_seed(0)
    n, vocab, hidden_size, chunk = spec["tokens"], spec["vocab"], spec["hidden"], spec["chunk"]
    labels = torch.randint(0, vocab, (1, n))
    if spec["what"] == "loss":
        head = torch.nn.Linear(hidden_size, vocab, bias=False)
        hidden = torch.randn(1, n, hidden_size, requires_grad=True)

        def step():
            if chunk == 0:
                logits = head(hidden)
                loss = ForCausalLMLoss(logits, labels, vocab, num_items_in_batch=n - 1)
            else:
                loss = chunked_causal_lm_loss(
                    hidden, head, labels, num_items_in_batch=n - 1, chunk_size=chunk
                )
            loss.backward()
            return loss
    else:
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(cfg)
        batch = {
            "input_ids": torch.randint(0, vocab, (1, n)),
            "labels": labels,
            "use_cache": False,
            "num_items_in_batch": n - 1,
        }

        def step():
            loss = forward_with_loss(model, model, chunk, **batch).loss
            loss.backward()
            return loss

    step()  # warm-up: lazy initialisations, the first allocations
    for p in [t for t in (locals().get("head"), locals().get("model")) if t is not None]:
        p.zero_grad(
            set_to_none=False
        )  # gradients stay allocated: only the loss's own memory counts
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - t0
    return {
        "peak_increase_mb": round(_status("VmHWM") - before, 1),
        "seconds": round(seconds, 3),
        "loss": float(loss),
    }


def run(spec: dict) -> dict:
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "CAMELID_LOSS_BENCH": json.dumps(spec),
    }
    res = subprocess.run(
        [sys.executable, "-m", "bench.loss_bench"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


@entry_point
def main(argv: list[str] | None = None) -> int:
    if "CAMELID_LOSS_BENCH" in os.environ:
        print(json.dumps(worker(json.loads(os.environ["CAMELID_LOSS_BENCH"]))))
        return 0
    opts = parse(LossBenchOptions, argv, prog="python -m bench.loss_bench", description=__doc__)
    try:
        chunks = [int(c) for c in opts.chunks.split(",")]
    except ValueError:
        raise UsageError(f"--chunks: comma-separated integers, got {opts.chunks!r}") from None
    full_logits_mb = opts.tokens * opts.vocab * 4 / MB
    results = {
        "tokens": opts.tokens,
        "vocab": opts.vocab,
        "hidden": opts.hidden,
        "fp32_logits_mb": round(full_logits_mb, 1),
        "rows": [],
    }
    print(
        f"tokens {opts.tokens}, vocab {opts.vocab}, hidden {opts.hidden}, fp32; one full "
        f"fp32 logits tensor = {full_logits_mb:,.0f} MiB"
    )
    print(f"{'':8}{'variant':26}{'peak MiB':>10}{'vs HF':>8}{'seconds':>9}{'loss':>10}")
    for what in ("loss", "model"):
        ref = None
        for chunk in chunks:
            spec = {
                "what": what,
                "tokens": opts.tokens,
                "vocab": opts.vocab,
                "hidden": opts.hidden,
                "chunk": chunk,
            }
            r = {**spec, **run(spec)}
            ref = ref or r
            r["vs_transformers"] = round(r["peak_increase_mb"] / ref["peak_increase_mb"], 3)
            results["rows"].append(r)
            name = "transformers" if chunk == 0 else f"chunked, {chunk} rows"
            print(
                f"{what:8}{name:26}{r['peak_increase_mb']:>10,.0f}{r['vs_transformers']:>7.2f}x"
                f"{r['seconds']:>9.3f}{r['loss']:>10.5f}"
            )
    write_json(opts.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
