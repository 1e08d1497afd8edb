"""RL cost benchmark: seconds per GRPO step, split into generation and update, camelid's grpo
recipe against TRL's GRPOTrainer on the same model, prompts and settings.

    python -m bench.rl_bench [--quick] [--steps 8] [--rounds 2] [--prompts_per_step 4]
                             [--num_generations 8] [--max_completion_length 16] [--beta 0.04]
                             [--out bench/results/rl_bench.json]

Both sides, on this machine's CPUs, fp32, one process each (a fresh subprocess per run, so
neither's imports or allocator state reach the other's timing), runs alternating camelid, TRL,
camelid, TRL, ... so that a drift in the machine's load reaches both:

- the model: the tiny Llama whose tokenizer knows the arithmetic problems' words and numbers
  (fastchat_data.tiny.tiny_model, as recipes/rl_demo.py and tests/test_rlhf.py build it), not
  fine-tuned: it rarely samples a stop token, so both sides generate every completion to
  --max_completion_length and sample the same number of tokens per step;
- the prompts: recipes.core.rewards.arithmetic.problems, each rendered with camelid's training
  template (vicuna_v1.1) as a user turn with the reply open; TRL gets the rendered text, which
  its tokenizer call turns back into the same ids (checked, and written to the JSON);
- per step: --prompts_per_step prompts x --num_generations completions, one optimizer step
  (camelid: per_device_train_batch_size = prompts; TRL: per_device_train_batch_size =
  completions, steps_per_generation 1, num_iterations 1), the same beta, epsilon 0.2,
  loss_type grpo, group-scaled advantages, temperature 1, top_k 0, top_p 1, AdamW at a
  constant 1e-5;
- rewards: recipes.core.rewards.arithmetic close + format, on both sides as they are (their
  signature is TRL's reward-function signature: prompts, completions, dataset columns as
  keyword arguments, **kwargs).

How each side's split is measured:

- camelid: its own metrics.jsonl, per step: time/generate_s (the sampling: the module's
  `generate` for each prompt) and time/update_s (the rest of the step: rewards, the policy's and
  the reference's forward, backward, optimizer step; recipes/core/objectives/grpo.py);
- TRL: a TrainerCallback times each optimizer step from on_step_begin to on_step_end (the
  batch's generation and scoring in _prepare_inputs, forward, backward, optimizer step; not the
  logging after it), and GRPOTrainer._generate is wrapped to time generation (tokenizing the
  prompts, `generate` on all prompt x G rows at once, decoding); update = step - generation.

The first --warmup steps of every run are not timed (allocator, caches, lazy imports). The
figures are medians over the timed steps of all rounds, and beside them each side's best run
(the run whose median step is the lowest: on a shared machine other sessions' load moves whole
runs by 2-3x while the steps within one run agree, so the least disturbed run is the nearest to
a side's own cost). One thread by default: with two OpenMP threads on two busy cores every
small op waits for a descheduled thread, which hits many small `generate` calls (camelid's, one
per prompt) far harder than one large one (TRL's); --threads 2 on an idle machine.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench import REFERENCE_TRAINER_ON_CPU, REPO, flags, result_option, worker_result, write_json
from fastchat_data.options import entry_point, option, parse

REWARDS = "recipes.core.rewards.arithmetic"
REWARD_NAMES = ("close", "format")
TEMPLATE = "vicuna_v1.1"  # camelid's default training template (recipes/core/config.py)
SIDES = ("camelid", "trl")


@dataclass
class RLBenchOptions:
    steps: int = option(8, "optimizer steps per run", minimum=1)
    warmup: int = option(1, "first steps of each run not timed", minimum=0)
    rounds: int = option(2, "runs per side, alternating camelid, TRL, camelid, TRL, ...", minimum=1)
    prompts_per_step: int = option(
        4, "prompts per step (each sampled num_generations times)", minimum=1
    )
    num_generations: int = option(8, "completions per prompt (G)", minimum=2)
    max_completion_length: int = option(16, "tokens per completion at most", minimum=1)
    beta: float = option(0.04, "KL weight (> 0: both sides also score a frozen reference)")
    threads: int = option(
        1, "torch / OpenMP threads of each run (see the module's note)", minimum=1
    )
    quick: bool = option(False, "a short run", preset={"steps": 4, "max_completion_length": 8})
    out: str = result_option("rl_bench.json")
    worker: str | None = option(None, "internal: run one side from a JSON spec and print it")


# ---------------------------------------------------------------- inputs


def prepare_inputs(n_prompts: int, folder: Path) -> dict:
    """The prompts file both sides train on and the tiny model (built as recipes/rl_demo.py
    builds its base model, so its tokenizer has every problem's words and numbers)."""
    from fastchat_data.tiny import TEMPLATE_WORDS, tiny_model
    from recipes.core.rewards.arithmetic import problems

    records = problems(n_prompts, seed=0)
    prompts = folder / "prompts.json"
    prompts.write_text(json.dumps(records))
    texts = [r["prompt"] + " " + r["answer"] for r in records] + [str(i) for i in range(41)] * 20
    model = tiny_model("llama", "tiny", texts=texts + TEMPLATE_WORDS * 20, vocab_size=1000)
    return {"prompts": str(prompts), "model": str(model)}


def rendered_prompts(model: str, records: list[dict]) -> tuple[list[str], list[list[int]]]:
    """Each prompt as camelid's grpo objective encodes it (the training template, a user turn,
    the reply open), as text for TRL and as camelid's ids."""
    from transformers import AutoTokenizer

    from fastchat_data.schema import USER, Conversation, Message
    from fastchat_data.tokenize import ConversationTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    encoder = ConversationTokenizer(tokenizer, TEMPLATE)
    ids = [
        encoder.encode_prompt(Conversation(str(i), [Message(USER, r["prompt"])]))
        for i, r in enumerate(records)
    ]
    # special tokens dropped: TRL's tokenizer call adds the BOS again
    return [tokenizer.decode(x, skip_special_tokens=True) for x in ids], ids


# ---------------------------------------------------------------- workers (one process per run)


def same_on_both_sides(spec: dict) -> dict:
    """The settings camelid's recipe and TRL's GRPOConfig take under the same names and must
    both be given for a fair timing: steps, G, completion length, the loss and its clipping,
    sampling temperature, the optimizer's rate and schedule, the seed."""
    return dict(
        max_steps=spec["steps"],
        num_generations=spec["num_generations"],
        max_completion_length=spec["max_completion_length"],
        beta=spec["beta"],
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        temperature=1.0,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        seed=0,
    )


def run_camelid(spec: dict) -> dict:
    """recipes/grpo.py as a user runs it; the per-step split from its metrics.jsonl."""
    out = Path(spec["out"])
    funcs = ",".join(f"{REWARDS}:{name}" for name in REWARD_NAMES)
    argv = [
        *("--strategy", "single", "--model_name_or_path", spec["model"]),
        *("--data_path", spec["prompts"], "--output_dir", str(out)),
        *("--overwrite_output_dir", "True", "--report_to", "none", "--reward_funcs", funcs),
        *flags(**same_on_both_sides(spec)),
        *("--model_max_length", "128", "--warmup_ratio", "0"),
        *("--per_device_train_batch_size", str(spec["prompts_per_step"])),
        *("--gradient_accumulation_steps", "1", "--template", TEMPLATE),
        *("--save_steps", "100000", "--logging_steps", "100000"),
        *("--cache_dir", str(out.parent / "cache")),
    ]
    res = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "grpo.py"), *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=spec["env"],
    )
    if res.returncode != 0:
        raise RuntimeError(f"camelid grpo failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "steps": [
            {
                "generate_s": r["time/generate_s"],
                "update_s": r["time/update_s"],
                "step_s": r["time/generate_s"] + r["time/update_s"],
                "completion_length": r["completion_length"],
                "reward": r["reward"],
            }
            for r in rows
        ]
    }


def run_trl(spec: dict) -> dict:
    """TRL's GRPOTrainer on the same model, prompts and settings; timed as the module says."""
    import time

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from recipes.core.rewards import arithmetic

    torch.manual_seed(0)
    records = json.loads(Path(spec["prompts"]).read_text())
    texts, camelid_ids = rendered_prompts(spec["model"], records)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    same_ids = tokenizer(text=texts)["input_ids"] == camelid_ids
    dataset = Dataset.from_list(
        [{"prompt": t, "answer": r["answer"]} for t, r in zip(texts, records)]
    )
    args = GRPOConfig(
        **same_on_both_sides(spec),
        output_dir=spec["out"],
        bf16=False,
        fp16=False,
        # TRL counts completions: a step's prompts x G, generated once and used once
        per_device_train_batch_size=spec["prompts_per_step"] * spec["num_generations"],
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        top_k=0,  # as camelid samples (fixed in its generate call): no filtering
        top_p=1.0,
        warmup_steps=0,
        logging_steps=1,
        **REFERENCE_TRAINER_ON_CPU,
    )
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    steps, generation = [], [0.0]

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            generation[0] = 0.0
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.started
            steps.append({"step_s": seconds, "generate_s": generation[0]})

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[getattr(arithmetic, name) for name in REWARD_NAMES],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    generate = trainer._generate

    def timed_generate(*a, **k):
        started = time.perf_counter()
        try:
            return generate(*a, **k)
        finally:
            generation[0] += time.perf_counter() - started

    trainer._generate = timed_generate
    trainer.train()
    logged = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    for s, h in zip(steps, logged):
        s["update_s"] = s["step_s"] - s["generate_s"]
        s["completion_length"] = h["completions/mean_length"]
        s["reward"] = h.get("reward")
    return {"steps": steps, "prompt_ids_match_camelid": same_ids}


# ---------------------------------------------------------------- the comparison


def measure(side: str, spec: dict) -> dict:
    """One run of `side` in a fresh process: its per-step rows."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(spec["threads"]),
        "PYTHONPATH": str(REPO),
        "TOKENIZERS_PARALLELISM": "false",
    }
    return worker_result("bench.rl_bench", [json.dumps({**spec, "side": side})], env, what=side)


def summary(runs: list[dict], warmup: int) -> dict:
    timed = [s for r in runs for s in r["steps"][warmup:]]
    keys = ("generate_s", "update_s", "step_s")
    med = {k: statistics.median(s[k] for s in timed) for k in keys}
    per_run = [
        {k: statistics.median(s[k] for s in r["steps"][warmup:]) for k in keys} for r in runs
    ]
    best = min(per_run, key=lambda r: r["step_s"])
    return {
        **med,
        **{f"best_run_{k}": best[k] for k in keys},
        "completion_length": statistics.mean(s["completion_length"] for s in timed),
        "timed_steps": len(timed),
        "per_run_step_s": [
            statistics.median(s["step_s"] for s in r["steps"][warmup:]) for r in runs
        ],
    }


@entry_point
def main(argv: list[str] | None = None) -> int:
    opts = parse(RLBenchOptions, argv, prog="python -m bench.rl_bench", description=__doc__)
    if opts.worker:
        spec = json.loads(opts.worker)
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
        if spec["side"] == "camelid":
            result = run_camelid({**spec, "env": env})
        else:
            import torch

            torch.set_num_threads(spec["threads"])
            result = run_trl(spec)
        print(json.dumps(result))
        return 0
    if opts.steps <= opts.warmup:
        from fastchat_data.options import UsageError

        raise UsageError(f"--steps ({opts.steps}) must exceed --warmup ({opts.warmup})")
    # a fresh folder per benchmark run: a recipe resumes from a checkpoint it finds in its
    # output_dir, and would report the previous run's steps again
    with tempfile.TemporaryDirectory(prefix="rl_bench-") as tmp:
        folder = Path(tmp)
        spec = {
            **prepare_inputs(opts.prompts_per_step * opts.steps, folder),
            **{
                k: getattr(opts, k)
                for k in (
                    "steps",
                    "prompts_per_step",
                    "num_generations",
                    "max_completion_length",
                    "beta",
                    "threads",
                )
            },
        }
        runs = {side: [] for side in SIDES}
        for i in range(opts.rounds):
            for side in SIDES:
                print(f"round {i + 1}/{opts.rounds}: {side} ...", flush=True)
                runs[side].append(measure(side, {**spec, "out": str(folder / f"{side}-{i}")}))
    rows = {side: summary(runs[side], opts.warmup) for side in SIDES}
    cam, trl = rows["camelid"], rows["trl"]
    ratio = {
        k: cam[k] / trl[k]
        for k in (
            "generate_s",
            "update_s",
            "step_s",
            "best_run_generate_s",
            "best_run_update_s",
            "best_run_step_s",
        )
    }
    import torch
    import transformers
    import trl as trl_module

    result = {
        "rows": rows,
        "camelid_over_trl": ratio,
        "trl_prompt_ids_match_camelid": all(r["prompt_ids_match_camelid"] for r in runs["trl"]),
        "runs": runs,
        "settings": {
            "model": "tiny llama (fastchat_data.tiny 'tiny', vocab 1000), not fine-tuned",
            "device": "cpu, fp32",
            "threads": opts.threads,
            "warmup_steps_not_timed": opts.warmup,
            "rounds": opts.rounds,
            "prompts_per_step": opts.prompts_per_step,
            **same_on_both_sides(spec),
            "rewards": [f"{REWARDS}:{n}" for n in REWARD_NAMES],
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "trl": trl_module.__version__,
            },
        },
    }
    print(
        f"\n{opts.prompts_per_step} prompts x G {opts.num_generations}, "
        f"{opts.max_completion_length} tokens, beta {opts.beta}, {opts.threads} threads, "
        f"median of {cam['timed_steps']} timed steps per side ({opts.rounds} runs each)"
    )
    print(f"{'':<12}{'all runs: median step':>33}{'best run: median step':>33}")
    head = ("generate s", "update s", "step s") * 2
    print(f"{'':<12}" + "".join(f"{h:>11}" for h in head) + f"{'compl. len':>12}")
    keys = ("generate_s", "update_s", "step_s")
    keys = (*keys, *(f"best_run_{k}" for k in keys))
    for side in SIDES:
        r = rows[side]
        print(
            f"{side:<12}"
            + "".join(f"{r[k]:>11.3f}" for k in keys)
            + f"{r['completion_length']:>12.1f}"
        )
    print(f"{'camelid/TRL':<12}" + "".join(f"{ratio[k]:>10.2f}x" for k in keys))
    write_json(opts.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
