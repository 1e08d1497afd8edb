"""Did fine-tuning help? Mean perplexity on held-out conversations, the QLoRA course's way.

    python -m recipes.eval --model BASE --data heldout.json --adapter runs/qlora/adapter \\
        [--shots 3] [--generate 50] [--out eval.json]

Rows: the base zero-shot, the base with `--shots` solved examples before each question
(few-shot), and the base with each adapter. Perplexity of a conversation = exp(mean negative
log-likelihood of its assistant tokens, as the training masks define them); the table shows
the mean over conversations (the reference's number) and the median. `--generate N` also
answers the first N questions greedily and scores the answers against the references with
ROUGE-1/2/L (rouge-score) and BLEU-4 (sacrebleu). Printed as a table and written as JSON.

    python -m recipes.eval --model SFT --compare runs/dpo/model --pairs heldout_pairs.json
    python -m recipes.eval --model M [--adapter A] --lm_eval camelid_alpaca_mc [--lm_eval_limit N]

`--pairs`: preference accuracy, how often each model gives the chosen reply of held-out pairs a
higher log-likelihood than the rejected one (summed, and per reply token); with
`--reward_model`, the models are reward models (recipes/reward.py) and a pair counts when the
chosen reply scores higher. `--lm_eval`:
lm-evaluation-harness tasks (recipes/harness.py), offline on local task files.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from fastchat_data.build import read_trainable
from fastchat_data.options import UsageError, entry_point, option, parse
from fastchat_data.outputs import guard_file, write_text
from fastchat_data.report import Report
from fastchat_data.schema import ASSISTANT, Conversation, SkipRecord
from fastchat_data.tokenize import IGNORE_INDEX, ConversationTokenizer
from recipes.core.config import ConfigError
from recipes.core.data import collate, pad_token_id
from recipes.core.generate import load_for_inference, trained_template
from recipes.core.logging import progress
from recipes.core.metrics import text_scores
from recipes.core.preference import format_preference_table, preference_scores, reward_scores
from recipes.core.quiet import quiet, verbose_option, verbose_requested


def load_conversations(path: str, limit: int | None) -> list[Conversation]:
    report = Report("eval")
    convs = list(read_trainable([path], report))
    if report.dropped_total:
        report.emit()  # counted, never silent
    if not convs:
        raise ConfigError(f"{path}: no usable conversation to evaluate")
    return convs[:limit] if limit else convs


def with_shots(conv: Conversation, shots: list[Conversation]) -> Conversation:
    """The solved examples as earlier turns of the same conversation."""
    messages = [m for s in shots for m in s.messages] + list(conv.messages)
    return Conversation(conv.id, messages, system=conv.system)


def only_last_replies(labels: list[int], keep_from_run: int) -> list[int]:
    """Mask the first `keep_from_run` trained runs (the shots' answers): only the
    conversation's own replies count."""
    out, run, inside = list(labels), -1, False
    for i, lab in enumerate(labels):
        if lab != IGNORE_INDEX and not inside:
            run += 1
        inside = lab != IGNORE_INDEX
        if inside and run < keep_from_run:
            out[i] = IGNORE_INDEX
    return out


def encode_with_shots(encoder: ConversationTokenizer, conv: Conversation, shots: list) -> tuple:
    """(Encoded with the shots' answers masked, shots used). Shots that would push the
    conversation past max_length are left out for it, last first: the conversation itself is
    what is scored. Raises SkipRecord if nothing is left to score."""
    for n in range(len(shots), -1, -1):
        enc = encoder.encode(with_shots(conv, shots[:n]) if n else conv)
        if not enc.truncated or n == 0:
            runs = sum(m.role == ASSISTANT for s in shots[:n] for m in s.messages)
            enc.labels = only_last_replies(enc.labels, runs) if n else enc.labels
            return enc, n
    raise AssertionError("unreachable")


@torch.no_grad()
def perplexities(
    model, encoder: ConversationTokenizer, convs, *, shots, batch_size: int
) -> tuple[list, dict]:
    """Per-conversation perplexity, and counts: conversations cut by max_length, shots left out."""
    rows, counts = [], {"truncated": 0, "shots_left_out": 0}
    for conv in convs:
        try:
            enc, used = encode_with_shots(encoder, conv, shots)
        except SkipRecord:  # nothing left to score after truncation: counted as cut, not scored
            counts["truncated"] += 1
            rows.append(None)
            continue
        counts["truncated"] += bool(enc.truncated)
        counts["shots_left_out"] += len(shots) - used
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
    pad = pad_token_id(encoder.tokenizer)
    order = sorted(
        (i for i, r in enumerate(rows) if r), key=lambda i: len(rows[i]["input_ids"])
    )  # less padding
    result = [math.nan] * len(rows)
    for start in progress(range(0, len(order), batch_size), "perplexity"):
        idx = order[start : start + batch_size]
        batch = {k: v.to(model.device) for k, v in collate([rows[i] for i in idx], pad).items()}
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits.float()
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
        counted = (targets != IGNORE_INDEX).sum(1)
        for j, i in enumerate(idx):
            if counted[j] > 0:
                result[i] = math.exp((nll[j].sum() / counted[j]).item())
    return result, counts


@torch.no_grad()
def answers(
    model, encoder: ConversationTokenizer, convs, *, shots, max_new_tokens: int
) -> tuple[list, list]:
    """Greedy answers to each conversation's last question, and the reference answers."""
    preds, refs = [], []
    tok = encoder.tokenizer
    for conv in progress(convs, "generating"):
        last = max(i for i, m in enumerate(conv.messages) if m.role == ASSISTANT)
        question = Conversation(conv.id, list(conv.messages[:last]), system=conv.system)
        budget = (encoder.max_length or 1 << 30) - max_new_tokens
        for n in range(len(shots), -1, -1):  # shots that do not fit are left out, last first
            ids = encoder.encode_prompt(with_shots(question, shots[:n]) if n else question)
            if len(ids) <= budget:
                break
        ids = ids[-budget:]  # still too long: keep the end, where the question is
        out = model.generate(
            torch.tensor([ids], device=model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=pad_token_id(tok),
        )
        preds.append(tok.decode(out[0, len(ids) :], skip_special_tokens=True).strip())
        refs.append(conv.messages[last].content)
    return preds, refs


def evaluate(opts: EvalOptions, template) -> dict:
    """The perplexity rows on --data (zero-shot, few-shot, each adapter), with --generate's
    text scores; `template`: --template, or the one training used."""
    from peft import PeftModel
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per model load would bury the table
    shots = opts.shots
    for p in [
        opts.model,
        opts.data,
        *opts.adapter,
        *([opts.shots_from] if opts.shots_from else []),
    ]:
        if not Path(p).exists():
            raise ConfigError(f"{p} does not exist")
    convs = load_conversations(opts.data, None)
    pool = load_conversations(opts.shots_from, None) if opts.shots_from else None
    if shots and pool is None:  # shots from the held-out file's tail, then not evaluated
        if len(convs) <= shots:
            raise ConfigError(
                f"{opts.data} has {len(convs)} conversations: too few to take {shots} shots from"
            )
        convs, pool = convs[:-shots], convs[-shots:]
    convs = convs[: opts.max_samples] if opts.max_samples else convs
    shot_convs = list(pool[:shots]) if shots else []
    tokenizer = AutoTokenizer.from_pretrained(opts.model)
    encoder = ConversationTokenizer(tokenizer, template, max_length=opts.max_length)

    variants = [("zero-shot", None, [])]
    if shots:
        variants.append((f"few-shot ({shots} examples)", None, shot_convs))
    variants += [(f"adapter {Path(a).parent.name}/{Path(a).name}", a, []) for a in opts.adapter]
    rows, model = [], None
    for name, adapter, these_shots in variants:
        if model is None or adapter or isinstance(model, PeftModel):  # attaching changes the base
            model = load_for_inference(opts.model, opts.quantization, adapter)
        ppl, counts = perplexities(
            model, encoder, convs, shots=these_shots, batch_size=opts.batch_size
        )
        if these_shots and counts["shots_left_out"]:  # never a few-shot row of zero-shot numbers
            offered = len(these_shots) * len(convs)
            used = offered - counts["shots_left_out"]
            name = (
                f"few-shot ({len(these_shots)} examples: {used:,} of {offered:,} fit "
                f"--max_length {opts.max_length})"
            )
        finite = [p for p in ppl if math.isfinite(p)] or [math.nan]
        row = {
            "model": name,
            "adapter": adapter,
            "mean_perplexity": statistics.fmean(finite),
            "median_perplexity": statistics.median(finite),
            "samples": sum(map(math.isfinite, ppl)),
            **counts,
        }
        if opts.generate:
            preds, refs = answers(
                model,
                encoder,
                convs[: opts.generate],
                shots=these_shots,
                max_new_tokens=opts.max_new_tokens,
            )
            row.update(text_scores(preds, refs))
            row["examples"] = [
                {"prediction": p, "reference": r} for p, r in list(zip(preds, refs))[:3]
            ]
        rows.append(row)
    return {
        "model": opts.model,
        "data": opts.data,
        "template": template if isinstance(template, str) else "custom",
        "quantization": opts.quantization,
        "rows": rows,
    }


def preference_rows(opts: EvalOptions, template) -> list[dict]:
    """Preference accuracy on --pairs of --model, the model with each --adapter, and each
    --compare model (--reward_model: the share of pairs whose chosen reply scores higher)."""
    from transformers import AutoTokenizer

    for path in [opts.pairs, *opts.compare]:
        if not Path(path).exists():
            raise ConfigError(f"{path} does not exist")
    variants = [
        # reward adapters: their base is the SFT model, whose score head would be random
        *([] if opts.reward_model and opts.adapter else [(opts.model, None)]),
        *[(opts.model, a) for a in opts.adapter],
        *[(o, None) for o in opts.compare],
    ]
    rows = []
    for path, adapter in variants:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(path, adapter))
        if opts.reward_model:
            model, scorer = load_reward_for_inference(path, adapter, tokenizer), reward_scores
        else:
            quantized = opts.quantization if path == opts.model else "none"
            model, scorer = load_for_inference(path, quantized, adapter), preference_scores
        scores = scorer(
            model,
            tokenizer,
            opts.pairs,
            template=template,
            max_length=opts.max_length,
            batch_size=opts.batch_size,
        )
        name = f"{Path(path).parent.name}/{Path(path).name}" + (
            f" + {Path(adapter).name}" if adapter else ""
        )
        rows.append({"model": name, "path": str(path), "adapter": adapter, **scores})
    return rows


def tokenizer_folder(path: str, adapter: str | None) -> str:
    """The adapter's own tokenizer where its run saved one, else the model's."""
    return adapter if adapter and (Path(adapter) / "tokenizer_config.json").exists() else path


def load_reward_for_inference(path: str, adapter: str | None = None, tokenizer=None):
    """A reward model folder (one-output sequence classification), or its SFT base with a reward
    adapter (peft's SEQ_CLS task, its score head saved with it; `tokenizer`: the one the rows
    are scored with), or one line saying why not."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from recipes.core.data import pad_token_id

    if adapter is None:
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "num_labels", None) != 1 or config.pad_token_id is None:
            raise ConfigError(
                f"--reward_model: {path} is not a reward model (a sequence-classification model "
                "with one output and a pad_token_id; recipes/reward.py exports one)"
            )
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    else:
        from recipes.core.lora import load_adapter, read_adapter_config

        task = getattr(read_adapter_config(adapter), "task_type", None)
        if task != "SEQ_CLS":  # peft's TaskType is a str enum: equal to its name
            raise ConfigError(
                f"--reward_model: {adapter} is not a reward adapter (peft task {task}, not "
                "SEQ_CLS; recipes/reward.py --peft_method lora writes one)"
            )
        base = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=torch.float32
        )
        # as the reward recipe set it: batched scoring pools each row's last non-pad token
        base.config.pad_token_id = pad_token_id(tokenizer)
        model = load_adapter(base, adapter)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def format_table(result: dict) -> str:
    text_cols = [c for c in ("rouge1", "rouge2", "rougeL", "bleu") if c in result["rows"][0]]
    head = f"{'model':<44}{'mean ppl':>12}{'median':>12}{'samples':>9}" + "".join(
        f"{c:>8}" for c in text_cols
    )
    lines = [head]
    for r in result["rows"]:
        name = r["model"] if len(r["model"]) <= 42 else "..." + r["model"][-39:]
        lines.append(
            f"{name:<44}{r['mean_perplexity']:>12,.2f}{r['median_perplexity']:>12,.2f}{r['samples']:>9}"
            + "".join(f"{r[c]:>8.1f}" for c in text_cols)
        )
    return "\n".join(lines)


@dataclass
class EvalOptions:
    """Did fine-tuning help? Held-out perplexity, preference accuracy, lm-eval tasks."""

    model: str = option(help="the (base) model folder")
    data: str | None = option(
        None, "held-out conversations (any fastchat_data format; optional with --lm_eval)"
    )
    adapter: list[str] = option(
        default_factory=list, help="adapter folder(s) to score on the model, one row each"
    )
    template: str | None = option(None, "name or YAML/JSON file; none: the one training used")
    shots: int = option(0, "add a few-shot row with this many solved examples")
    shots_from: str | None = option(None, "file to take the examples from; none: the data's tail")
    max_samples: int | None = option(None, "score at most N conversations; none: all")
    generate: int = option(0, "also score N generated answers (ROUGE, BLEU)")
    max_new_tokens: int = option(128, "--generate: tokens per answer")
    max_length: int = option(2048, "tokens per scored conversation")
    batch_size: int = option(4, "conversations per forward pass")
    quantization: Literal["none", "nf4"] = option(
        "none", "load the base in 4-bit nf4 (as QLoRA trained it) or unquantized"
    )
    out: str | None = option(None, "write the results as JSON here; none: print only")
    lm_eval: str | None = option(
        None,
        "also run lm-evaluation-harness on these comma-separated tasks (local: "
        "camelid_alpaca_mc, camelid_alpaca_mc_davinci, or the tag camelid; recipes/harness.py)",
    )
    lm_eval_limit: int | None = option(None, "lm-eval: at most N examples per task")
    lm_eval_data: str | None = option(
        None, "lm-eval's local tasks: the folder with alpaca_gpt4_data_en_1k.json, alpaca_data.json"
    )
    pairs: str | None = option(
        None,
        "held-out preference pairs: how often each model prefers the chosen reply (its "
        "log-likelihood above the rejected one's)",
    )
    compare: list[str] = option(
        default_factory=list,
        help="with --pairs: other model folders to score alike, e.g. the DPO export",
    )
    reward_model: bool = option(
        False,
        "with --pairs: --model (and --compare) are reward models (recipes/reward.py), or "
        "--adapter names reward adapters on --model (its SFT base); a pair counts when the "
        "chosen reply scores higher",
    )
    verbose: bool = verbose_option()

    def check(self) -> None:
        if not (self.data or self.lm_eval or self.pairs):
            raise UsageError(
                "give --data (perplexity), --pairs (preference accuracy), --lm_eval TASKS, or "
                "several"
            )
        for name in ("batch_size", "max_length", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("shots", "generate"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name} must be 0 or more, got {getattr(self, name)}")
        if self.reward_model and not self.pairs:
            raise UsageError("--reward_model scores --pairs: give --pairs FILE")
        if self.reward_model and (self.data or self.lm_eval):
            raise UsageError("--reward_model scores --pairs only (no --data, --lm_eval)")
        if self.max_samples is not None and self.max_samples < 1:
            raise UsageError(f"--max_samples must be at least 1, got {self.max_samples}")
        inputs = [self.model, self.data, self.pairs, self.shots_from, *self.adapter, *self.compare]
        for path in inputs:
            if path and not Path(path).exists():
                raise UsageError(f"{path} does not exist")
        if self.out:  # before minutes of scoring: never an input, never a read-only file
            guard_file(self.out, [p for p in inputs if p], "--out")


@entry_point
def main(argv: list[str] | None = None) -> int:
    quiet(verbose_requested(argv))
    a = parse(EvalOptions, argv, prog="python -m recipes.eval", description=__doc__)
    a.check()
    template = a.template or trained_template(*a.adapter, a.model)
    result = {"model": a.model}
    if a.data:
        result = evaluate(a, template)
        print(format_table(result))
    if a.lm_eval:
        from recipes import harness

        tasks = [t.strip() for t in a.lm_eval.split(",") if t.strip()]
        result["lm_eval"] = harness.run(
            a.model,
            a.adapter,
            tasks,
            limit=a.lm_eval_limit,
            batch_size=a.batch_size,
            quantization=a.quantization,
            data_dir=a.lm_eval_data,
        )
        print(harness.format_tables(result["lm_eval"]))
    if a.pairs:
        result["preference"] = preference_rows(a, template)
        print(format_preference_table(result["preference"]))
    if a.out:
        write_text(a.out, json.dumps(result, indent=2, ensure_ascii=False), flag="--out")
        print(f"written: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
