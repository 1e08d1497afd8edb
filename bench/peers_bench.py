"""Peers benchmark: camelid's training throughput against TRL's SFTTrainer and LLaMA-Factory.

    .venv/bin/python -m bench.peers_bench [--quick] [--steps 4] [--rounds 2] [--systems a,b]
        [--out bench/results/peers_bench.json]

Needs the peers' virtualenvs (bench/peers_env.sh builds them from bench/peers_requirements.txt):
.bench-venv/trl (TRL 1.16.0, transformers 5.24.0 as camelid) and .bench-venv/llamafactory
(LLaMA-Factory with its own pins). The peers never import into camelid's process or venv: every
run, camelid's too, is a fresh process of this file in worker mode (`--peer NAME --spec FILE`),
camelid's with camelid's python, a peer's with its bench venv's python running this file as a
plain script (so camelid's packages are not even on its path). A missing venv or a failing
peer is recorded with its reason in the table and the JSON, never skipped silently.

Same for every system: the ~17M "small" tiny Llama (fastchat_data.tiny, vocab 4,000) in fp32,
one process on CPU, sdpa attention, max length 2048, micro-batch 2 x accumulation 2, AdamW,
lr 2e-5, the same number of optimizer steps, OMP/MKL threads and torch threads equal. Data: the
cleaned ShareGPT sample (long conversations) and alpaca_gpt4_data_en_1k (short), converted and
cleaned by camelid, tokenized with the vicuna_v1.1 template (bench.packing_bench's recipe).

Metric: real (non-padding) tokens per optimizer step / the step's time, median over the steps
after the first (warm-up); then the median over interleaved rounds (order reversed every other
round, against load drift), as bench.packing_bench and bench.train_bench do.
- camelid: bench.packing_bench.measure (the training loop's own train_step on a TorchEngine)
  with its variants "grouped, sdpa, chunked loss" (length-grouped batches) and "packed,
  sdpa_packed, chunked, cap longest" (packed rows, one sdpa call per conversation); each step is
  timed around recipes.core.loop.train_step (collation included).
- TRL: a TrainerCallback times on_step_begin -> on_step_end (the Trainer prefetches and
  collates a step's micro-batches before on_step_begin, so collation is outside this window;
  the end-to-end interval between steps is kept in the JSON too); real tokens per step are
  counted from each micro-batch the Trainer trains on (attention_mask sum, or, padding-free,
  the flattened row, which holds no padding). Before training, the first packed batch is
  checked against separate forwards of its sequences (max |logit difference|), which shows
  whether this attention implementation keeps packed conversations apart.
- LLaMA-Factory: its own pipeline (run_exp: dataset_info.json, its "vicuna" template, its
  tokenization, neat_packing), timed by the same callback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

# A peer's run is this file as a plain script with the peer's python (launch), where camelid is
# not importable, by design: there nothing of camelid is imported, option() is the bare default
# and the script reads its two internal options itself (the end of this file).
PEER_SCRIPT = __name__ == "__main__" and not __package__
if PEER_SCRIPT:

    def option(default=None, help=""):
        return default

    def entry_point(main):
        return main

else:
    from fastchat_data.options import UsageError, entry_point, option, parse

REPO = Path(__file__).resolve().parents[1]
BENCH_VENV = Path(os.environ.get("CAMELID_BENCH_VENV", REPO / ".bench-venv"))
FILES = {"sharegpt_v3_sample_1000.json": "long", "alpaca_gpt4_data_en_1k.json": "short"}
WARMUP = 1  # optimizer steps left out of the median

# name -> how to run it. camelid's variants are bench.packing_bench.variants() keys.
SYSTEMS: dict[str, dict] = {
    "camelid grouped (sdpa)": {"peer": "camelid", "variant": "grouped, sdpa, chunked loss"},
    "camelid packed (sdpa_packed)": {
        "peer": "camelid",
        "variant": "packed, sdpa_packed, chunked, cap longest",
    },
    "TRL packing=bfd (padding-free)": {"peer": "trl", "packing": True, "packing_strategy": "bfd"},
    "TRL padding_free": {"peer": "trl", "packing": False, "padding_free": True},
    "LLaMA-Factory neat_packing": {"peer": "llamafactory", "packing": True, "neat_packing": True},
}
PEER_VENVS = {"trl": "trl", "llamafactory": "llamafactory"}


@dataclass
class PeersBenchOptions:
    quick: bool = option(False, "3 steps (2 timed), accumulation 1, 1 round")
    steps: int | None = option(None, "optimizer steps per run, the first a warm-up (4)", minimum=2)
    rounds: int | None = option(None, "interleaved rounds (2)", minimum=1)
    accum: int | None = option(None, "gradient accumulation steps (2)", minimum=1)
    systems: str | None = option(None, "comma-separated subset of: " + "; ".join(SYSTEMS))
    files: str | None = option(None, "comma-separated subset of: " + ", ".join(FILES))
    timeout: int = option(900, "seconds per run", minimum=1)
    out: str = option(str(REPO / "bench" / "results" / "peers_bench.json"), "the JSON result")
    peer: str | None = option(
        None, "internal: run one system's worker (camelid, trl, llamafactory)"
    )
    spec: str | None = option(None, "internal: the worker's spec (a JSON file)")


# ---------------------------------------------------------------- workers (one process per run)


def _steps_summary(steps: list[dict]) -> dict:
    timed = steps[WARMUP:]
    rates = [s["real_tokens"] / s["seconds"] for s in timed]
    secs = sum(s["seconds"] for s in timed)
    return {
        "real_tokens_per_s": statistics.median(rates) if rates else None,
        "real_tokens_per_s_total": sum(s["real_tokens"] for s in timed) / secs if secs else None,
        "real_token_share": (
            sum(s["real_tokens"] for s in timed) / max(1, sum(s["padded_tokens"] for s in timed))
        ),
        "timed_steps": len(timed),
    }


def camelid_dataset(data: str, model: str, cache: str, *, max_length: int):
    """camelid's tokenized data set (build_dataset, vicuna_v1.1; a cache hit after the first)."""
    from transformers import AutoTokenizer

    from fastchat_data.build import build_dataset

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds, _ = build_dataset(
            data, model, "vicuna_v1.1", max_length=max_length, cache_dir=cache, quiet=True
        )
    tok = AutoTokenizer.from_pretrained(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return ds.with_format("numpy"), pad


def run_camelid(spec: dict) -> dict:
    """bench.packing_bench.measure, each train_step timed (recipes.core.loop.train_step wrapped:
    measure imports it from the module when called)."""
    import torch
    import transformers

    from bench import packing_bench
    from recipes.core import loop

    torch.set_num_threads(spec["threads"])
    ds, pad = camelid_dataset(
        spec["data"], spec["model"], spec["cache"], max_length=spec["max_length"]
    )
    steps: list[dict] = []
    inner = loop.train_step

    def timed(run):
        t0 = time.perf_counter()
        out = inner(run)
        dt = time.perf_counter() - t0
        steps.append(
            {
                "seconds": dt,
                "real_tokens": out["tokens"],
                "loss": out["loss"],
                "padded_tokens": round(out["tokens"] / out["real_token_share"]),
            }
        )
        return out

    loop.train_step = timed
    try:
        p = {k: spec[k] for k in ("max_length", "batch", "accum", "steps")}
        agg = packing_bench.measure(
            packing_bench.variants()[spec["variant"]], ds, Path(spec["model"]), pad=pad, p=p
        )
    finally:
        loop.train_step = inner
    return {
        "steps": steps,
        "measure": agg,
        "samples": len(ds),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


class _Counter:
    """Tokens of the micro-batches trained on since the last reset (fed by training_step)."""

    def __init__(self):
        self.real = self.padded = self.trained = 0

    def add(self, inputs: dict) -> None:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if mask is not None and mask.dim() == 2:  # 1 = token, 0 = padding
            self.real += int((mask != 0).sum())
        elif mask is not None and mask.dim() == 4:
            # LLaMA-Factory's neat_packing for sdpa: a block-diagonal float mask; a token attends
            # to itself (diagonal entry 0), a padding position to nothing (the dtype's minimum)
            self.real += int((mask[:, 0].diagonal(dim1=-2, dim2=-1) == 0).sum())
        else:  # padding-free: one flattened row; the collator pads nothing (pad_to_multiple_of off)
            self.real += ids.numel()
        self.padded += ids.numel()
        self.trained += int((inputs["labels"][:, 1:] != -100).sum())


def _step_timer(counter: _Counter, steps: list[dict]):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Per optimizer step: on_step_begin -> on_step_end, and the real tokens trained on."""

        t0 = last_end = samples = units = None

        def on_train_begin(self, args, state, control, *, train_dataloader=None, **kw):
            with contextlib.suppress(TypeError, AttributeError):
                self.units = len(train_dataloader.dataset)  # rows trained on (packed or not)

        def on_step_begin(self, args, state, control, **kw):
            counter.__init__()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            steps.append(
                {
                    "seconds": now - self.t0,
                    "real_tokens": counter.real,
                    "padded_tokens": counter.padded,
                    "trained_tokens": counter.trained,
                    "end_to_end_s": now - self.last_end if self.last_end else None,
                }
            )
            self.last_end = now

    return StepTimer()


def _check_packed(model, batch: dict) -> dict:
    """A padding-free/packed batch against separate forwards of its sequences: whether the
    attention implementation keeps the packed conversations apart (max |logit difference|)."""
    import torch

    pos = batch["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist() + [pos.numel()]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        packed = model(**inputs).logits[0]
        diff = 0.0
        for s, e in list(zip(starts, starts[1:]))[:4]:
            alone = model(input_ids=batch["input_ids"][:, s:e]).logits[0]
            diff = max(diff, float((packed[s:e] - alone).abs().max()))
    model.train(was_training)
    return {
        "sequences": len(starts) - 1,
        "checked": min(4, len(starts) - 1),
        "max_abs_logit_diff": diff,
        "separate": diff < 1e-3,
    }


def peer_training_args(spec: dict) -> dict:
    """The Trainer settings every peer runs with, written once so that the peers are timed on
    the same optimisation: the spec's batch, accumulation and steps, camelid's defaults for
    the rest (fp32 on the CPU, no gradient checkpointing)."""
    return dict(
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=spec["accum"],
        max_steps=spec["steps"],
        learning_rate=2e-5,
        weight_decay=0.0,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=42,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,  # TRL defaults: True, True
    )


def run_trl(spec: dict) -> dict:
    """TRL's SFTTrainer on camelid's tokenization of the same conversations.

    The data is given as camelid's token ids and labels (a processed data set: TRL skips its
    own tokenization and uses the `labels` column as is), not as text or messages. Reason:
    vicuna_v1.1 is a separator template that the tiny tokenizer has no chat template for, and
    rendering it to text would let TRL re-tokenize the string whole (different ids at turn
    boundaries) and, being plain text, train on every token (TRL's assistant-only loss needs
    a Jinja template with {% generation %} markers). With the ids and labels camelid builds,
    both sides train on exactly the same tokens with exactly the same assistant-only masks,
    so the benchmark compares the training engines, not the tokenizers. Tokenization happens
    before training and is outside the measured steps either way."""
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(spec["threads"])
    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_parquet(spec["tokens"])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype=torch.float32, attn_implementation="sdpa"
    )
    packing = spec.get("packing", False)
    cfg = SFTConfig(
        output_dir=spec["tmp"],
        **peer_training_args(spec),
        packing=packing,
        packing_strategy=spec.get("packing_strategy", "bfd"),
        padding_free=spec.get("padding_free", False),
        # padding-free without packing refuses a max_length: camelid's ids are cut at 2048 already
        max_length=spec["max_length"] if packing else None,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    counter, steps = _Counter(), []

    class Trainer(SFTTrainer):
        def training_step(self, model, inputs, *a, **kw):
            counter.add(inputs)
            return super().training_step(model, inputs, *a, **kw)

    trainer = Trainer(
        model=model,
        args=cfg,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[_step_timer(counter, steps)],
    )
    first = next(iter(trainer.get_train_dataloader()))
    check = _check_packed(model, first) if "position_ids" in first else None
    trainer.train()
    return {
        "steps": steps,
        "packed_check": check,
        "samples": len(ds),
        "units": len(trainer.train_dataset),
        "activation_checkpointing": model.is_gradient_checkpointing,
        "padding_free": trainer.padding_free,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
        },
    }


def worker_main(peer: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    fn = {"camelid": run_camelid, "trl": run_trl, "llamafactory": run_llamafactory}[peer]
    try:
        res = {"ok": True, **fn(spec)}
    except Exception as e:  # recorded in the table; the traceback goes to the log
        traceback.print_exc()
        res = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    Path(spec["out"]).write_text(json.dumps(res, indent=2, default=str))


# FastChat's vicuna_v1.1 as LLaMA-Factory slots: "SYSTEM USER: q ASSISTANT: a</s>USER: ..."
# (the space before a reply goes with the reply, the end token is trained), after the
# tokenizer's BOS as camelid adds it. LLaMA-Factory's own "vicuna" template differs only in
# that whitespace and has no BOS.
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def run_llamafactory(spec: dict) -> dict:
    """LLaMA-Factory's own SFT pipeline (run_exp): it reads the cleaned ShareGPT file through a
    dataset_info.json, renders it with the template below and tokenizes it itself (assistant
    turns trained, as its supervised processor does), packs with neat_packing (conversations
    kept apart by a 4D block-diagonal mask, which its collator builds for sdpa)."""
    import importlib
    from importlib.metadata import version

    import torch

    # LLaMA-Factory imports torchaudio unconditionally (llamafactory/data/mm_plugin.py), and
    # transformers imports torchvision wherever it is installed: a build of either that does
    # not match this torch stops the import. Say which, with their own errors.
    problems = []
    for mod in ("torchvision", "torchaudio"):
        try:
            importlib.import_module(mod)
        except Exception as e:  # OSError, RuntimeError, ImportError: whatever the build raises
            last = (str(e).strip().splitlines() or [""])[-1][:200]
            problems.append(
                f"{mod} {version(mod)} does not load with torch {torch.__version__} "
                f"({type(e).__name__}: {last})"
            )
    try:
        import llamafactory
        import transformers
        from llamafactory.data.formatter import EmptyFormatter, StringFormatter
        from llamafactory.data.template import register_template
        from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer
        from llamafactory.train.tuner import run_exp
    except Exception as e:
        raise RuntimeError(
            "; ".join(
                problems
                + [
                    f"so importing llamafactory {version('llamafactory')} "
                    f"fails: {type(e).__name__}: {e}"
                ]
            )
        ) from e

    torch.set_num_threads(spec["threads"])
    register_template(
        name="camelid_vicuna_v1.1",
        format_prefix=EmptyFormatter(slots=[{"bos_token"}]),
        format_system=StringFormatter(slots=["{{content}} "]),
        format_user=StringFormatter(slots=["USER: {{content}} ASSISTANT:"]),
        format_assistant=StringFormatter(slots=[" {{content}}", {"eos_token"}]),
        default_system=VICUNA_SYSTEM,
    )
    tmp = Path(spec["tmp"])
    tmp.mkdir(parents=True, exist_ok=True)
    tags = {
        "role_tag": "from",
        "content_tag": "value",
        "user_tag": "human",
        "assistant_tag": "gpt",
        "system_tag": "system",
    }
    (tmp / "dataset_info.json").write_text(
        json.dumps(
            {
                "bench": {
                    "file_name": spec["data"],
                    "formatting": "sharegpt",
                    "columns": {"messages": "conversations", "system": "system"},
                    "tags": tags,
                }
            }
        )
    )
    counter, steps = _Counter(), []
    inner = CustomSeq2SeqTrainer.training_step

    def training_step(self, model, inputs, *a, **kw):
        counter.add(inputs)
        return inner(self, model, inputs, *a, **kw)

    CustomSeq2SeqTrainer.training_step = training_step
    timer = _step_timer(counter, steps)
    args = dict(
        stage="sft",
        do_train=True,
        model_name_or_path=spec["model"],
        finetuning_type="full",
        template="camelid_vicuna_v1.1",
        dataset="bench",
        dataset_dir=str(tmp),
        cutoff_len=spec["max_length"],
        packing=spec.get("packing", False),
        neat_packing=spec.get("neat_packing", False),
        flash_attn="sdpa",
        overwrite_cache=True,
        output_dir=str(tmp / "out"),
        overwrite_output_dir=True,
        **peer_training_args(spec),
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        plot_loss=False,
        dataloader_num_workers=0,
    )
    run_exp(args, callbacks=[timer])
    return {
        "steps": steps,
        "samples": timer.samples,
        "units": timer.units,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "llamafactory": llamafactory.__version__,
        },
    }


# ---------------------------------------------------------------- the benchmark


def peer_python(peer: str) -> Path | None:
    """The interpreter a system runs with: camelid's own, or its bench venv's."""
    if peer == "camelid":
        return Path(sys.executable)
    exe = BENCH_VENV / PEER_VENVS[peer] / "bin" / "python"
    return exe if exe.exists() else None


def env_failure(peer: str) -> str | None:
    """Why a peer's venv cannot run it (recorded by bench/peers_env.sh), if it cannot."""
    note = BENCH_VENV / f"{PEER_VENVS[peer]}.failed"
    return note.read_text().strip() if note.exists() else None


def launch(name: str, spec: dict, tmp: Path, *, threads: int, timeout: int) -> dict:
    """One run of `name` in a fresh process; its result, or why there is none."""
    peer = SYSTEMS[name]["peer"]
    exe = peer_python(peer)
    if exe is None:
        why = env_failure(peer) if peer != "camelid" else None
        return {
            "ok": False,
            "error": why
            or f"no bench venv {BENCH_VENV / PEER_VENVS[peer]} (build it with bench/peers_env.sh)",
        }
    tag = f"{spec['file_tag']}-{name}-r{spec['round']}".replace(" ", "_").replace("/", "_")
    run_dir = tmp / "".join(c if c.isalnum() or c in "-_.=" else "_" for c in tag)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        **spec,
        **SYSTEMS[name],
        "tmp": str(run_dir / "work"),
        "out": str(run_dir / "result.json"),
        "threads": threads,
    }
    (run_dir / "spec.json").write_text(json.dumps(spec))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DISABLE_VERSION_CHECK": "1",
        "HF_DATASETS_CACHE": str(tmp / "hf_datasets"),
        "PYTHONUNBUFFERED": "1",
    }
    if peer == "camelid":  # camelid's package from the repo, as `python -m bench...` sees it
        cmd = [str(exe), "-m", "bench.peers_bench"]
    else:  # this file as a plain script: the repo (camelid) is not on the peer's sys.path
        env.pop("PYTHONPATH", None)
        cmd = [str(exe), str(Path(__file__).resolve())]
    cmd += ["--peer", peer, "--spec", str(run_dir / "spec.json")]
    t0 = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        try:
            rc = subprocess.run(
                cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    out = run_dir / "result.json"
    if out.exists():
        res = json.loads(out.read_text())
    else:
        tail = (run_dir / "log.txt").read_text().strip().splitlines()[-3:]
        res = {
            "ok": False,
            "error": f"exit {rc} after {wall:.0f} s, no result: " + " | ".join(tail),
        }
    res["wall_s"] = round(wall, 1)
    if res.get("ok"):
        res.update(_steps_summary(res["steps"]))
        if not res["timed_steps"]:
            res.update(ok=False, error=f"only {len(res['steps'])} step(s) ran, none after warm-up")
    return res


def prepare(
    tmp: Path, cache: Path, max_length: int, *, names: list[str]
) -> tuple[Path, dict[str, dict]]:
    """The tiny model, and per file: the cleaned ShareGPT JSON (camelid's convert + clean) and
    camelid's tokenization of it (ids + assistant-only labels) as Parquet for TRL."""
    from fastchat_data.commands import clean, convert
    from fastchat_data.tiny import reference_corpus, shared_data_dir, tiny_model

    model = tiny_model("llama", "small", texts=reference_corpus(), vocab_size=4000, cache_dir=cache)
    files = {}
    for name in names:
        tag = FILES[name]
        src, clean_json = shared_data_dir() / name, tmp / f"{tag}_clean.json"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            if name.startswith("alpaca"):  # Alpaca records -> ShareGPT first (bench.packing_bench)
                convert(str(src), str(tmp / f"{tag}_sharegpt.json"))
                src = tmp / f"{tag}_sharegpt.json"
            clean(str(src), str(clean_json))
        ds, _ = camelid_dataset(str(clean_json), str(model), str(cache), max_length=max_length)
        ds = ds.with_format(None).filter(lambda r: r["length"] > 0)
        tokens = tmp / f"{tag}_tokens.parquet"
        ds.select_columns(["input_ids", "labels"]).to_parquet(str(tokens))
        lengths = ds["length"]
        files[name] = {
            "tag": tag,
            "data": str(clean_json),
            "tokens": str(tokens),
            "conversations": len(lengths),
            "tokens_total": int(sum(lengths)),
            "mean_length": sum(lengths) / len(lengths),
            "max_length_seen": max(lengths),
        }
    return model, files


CAMELID_PACKED, CAMELID_GROUPED = "camelid packed (sdpa_packed)", "camelid grouped (sdpa)"


def summarize(rounds: list[dict], names: list[str]) -> dict:
    """Median real tok/s over rounds; camelid / row ratios taken per round, then the median."""
    out = {}
    for name in names:
        runs = [r[name] for r in rounds if name in r]
        good = [x for x in runs if x.get("ok")]
        row: dict = {"ok": bool(good), "rounds_ok": len(good), "rounds": len(runs)}
        if not good:
            row["error"] = runs[0].get("error") if runs else "not run"
            out[name] = row
            continue
        row["real_tokens_per_s"] = statistics.median(x["real_tokens_per_s"] for x in good)
        row["real_token_share"] = statistics.median(x["real_token_share"] for x in good)
        for base, key in (
            (CAMELID_PACKED, "camelid_packed_over_this"),
            (CAMELID_GROUPED, "camelid_grouped_over_this"),
        ):
            ratios = [
                r[base]["real_tokens_per_s"] / r[name]["real_tokens_per_s"]
                for r in rounds
                if r.get(base, {}).get("ok") and r.get(name, {}).get("ok")
            ]
            row[key] = statistics.median(ratios) if ratios else None
        first = good[0]
        for k in ("packed_check", "versions", "units", "samples"):
            if first.get(k) is not None:
                row[k] = first[k]
        out[name] = row
    return out


def report(results: dict) -> None:
    s = results["settings"]
    print(
        f"\n== peers: 1 process, {s['model']}, fp32, sdpa, max length {s['max_length']}, "
        f"batch {s['batch']} x accumulation {s['accum']}, {s['steps']} steps "
        f"({s['steps'] - WARMUP} timed), {s['threads']} threads, {s['rounds']} interleaved "
        "round(s); real tok/s = median over timed steps, then over rounds"
    )
    failed: list[str] = []
    head = (
        f"{'file':8}{'system':34}{'real tok/s':>11}{'real share':>11}{'packed/this':>12}"
        f"{'grouped/this':>13}"
    )
    print(head)
    for f in results["files"].values():
        for name, row in f["summary"].items():
            if not row["ok"]:
                print(f"{f['tag']:8}{name:34}{'n/a':>11}  could not run (below)")
                failed.append(f"{f['tag']} {name}: {row['error']}")
                continue
            ratios = "".join(
                f"{row[k]:>{w}.2f}x" if row[k] is not None else f"{'-':>{w + 1}}"
                for k, w in (("camelid_packed_over_this", 11), ("camelid_grouped_over_this", 12))
            )
            print(
                f"{f['tag']:8}{name:34}{row['real_tokens_per_s']:>11,.0f}"
                f"{row['real_token_share']:>11.1%}{ratios}"
            )
    print(
        "packed/this, grouped/this: camelid packed (sdpa_packed) resp. grouped (sdpa) real tok/s "
        "over the row's, per round, median over rounds"
    )
    for line in failed:
        print("could not run: " + line)
    for f in results["files"].values():
        for name, row in f["summary"].items():
            if row.get("packed_check"):
                c = row["packed_check"]
                print(
                    f"{f['tag']:8}{name}: packed batch vs separate forwards, max |logit diff| "
                    f"{c['max_abs_logit_diff']:.2e} over {c['checked']} sequence(s): "
                    f"{'kept apart' if c['separate'] else 'CROSS-CONTAMINATED'}"
                )


def save(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))


@entry_point
def main(argv: list[str] | None = None) -> int:
    opts = parse(PeersBenchOptions, argv, prog="python -m bench.peers_bench", description=__doc__)
    if opts.peer:
        worker_main(opts.peer, opts.spec)
        return 0
    steps = opts.steps or (3 if opts.quick else 4)
    rounds = opts.rounds or (1 if opts.quick else 2)
    names = [n.strip() for n in opts.systems.split(",")] if opts.systems else list(SYSTEMS)
    files = [f.strip() for f in opts.files.split(",")] if opts.files else list(FILES)
    for n in names:
        if n not in SYSTEMS:
            raise UsageError(f"--systems: unknown system {n!r}")
    for n in files:
        if n not in FILES:
            raise UsageError(f"--files: unknown file {n!r}")
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    accum = opts.accum or (1 if opts.quick else 2)
    p = {"max_length": 2048, "batch": 2, "accum": accum, "steps": steps}
    t_start = time.perf_counter()
    out = Path(opts.out)
    cache = REPO / ".cache"
    results: dict = {
        "settings": {
            "model": "llama small (~17M, legacy tokenizer, vocab 4000)",
            "threads": threads,
            "rounds": rounds,
            "warmup_steps": WARMUP,
            "cpu_count": os.cpu_count(),
            "bench_venv": str(BENCH_VENV),
            "complete": False,
            "systems": {n: SYSTEMS[n] for n in names},
            **p,
        },
        "files": {},
    }
    with tempfile.TemporaryDirectory(prefix="peers_bench-") as tmp:
        tmp = Path(tmp)
        model, prepared = prepare(tmp, cache, p["max_length"], names=files)
        for fname in files:
            f = prepared[fname]
            print(
                f"{fname}: {f['conversations']} conversations, mean {f['mean_length']:.0f} tokens",
                flush=True,
            )
            rows: list[dict] = []
            for r in range(rounds):
                row = {}
                for name in names if r % 2 == 0 else names[::-1]:
                    spec = {
                        **p,
                        "model": str(model),
                        "cache": str(cache),
                        "data": f["data"],
                        "tokens": f["tokens"],
                        "file_tag": f["tag"],
                        "round": r + 1,
                    }
                    res = launch(name, spec, tmp, threads=threads, timeout=opts.timeout)
                    row[name] = res
                    what = (
                        f"{res['real_tokens_per_s']:>8,.0f} real tok/s"
                        if res.get("ok")
                        else f"failed: {res['error'][:200]}"
                    )
                    print(f"  round {r + 1} {name:34} {what} ({res['wall_s']:.0f} s)", flush=True)
                    # written after every run (settings.complete false until the end)
                    done = [*rows, row]
                    results["files"][fname] = {
                        **f,
                        "rounds": done,
                        "summary": summarize(done, names),
                    }
                    save(results, out)
                rows.append(row)
    results["settings"].update(complete=True, wall_s=round(time.perf_counter() - t_start, 1))
    report(results)
    save(results, out)
    print(f"written: {out} ({results['settings']['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    if PEER_SCRIPT:  # a peer's worker (launch): --peer NAME --spec FILE
        argv = sys.argv[1:]
        worker_main(argv[argv.index("--peer") + 1], argv[argv.index("--spec") + 1])
        sys.exit(0)
    sys.exit(main())
