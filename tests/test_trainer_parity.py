"""The full fine-tune against transformers' Trainer (what FastChat's train.py runs on): with the
same flags, the same initial weights and the same batches, the same per-step learning rates,
losses and gradient norms, warm-up, gradient accumulation and padding included.

Both sides get the same tokenized rows (camelid's cached training set) and take them in the
same order: Trainer's sampler yields camelid's batch order (a deterministic function of the seed
and --group_by_length, recipes/core/data.py BatchPlan), epoch by epoch. Everything else is
Trainer's own: its optimizer and weight-decay groups, its scheduler and warm-up rounding, its
loss normalisation over the accumulated batch (num_items_in_batch), its gradient clipping, its
epoch arithmetic, HF's padding collator (right padding with unk, as FastChat pads).

Deliberate differences, none of them exercised here:
- the batch order: camelid's is its own (resumable without sampler state; its length grouping
  is not Trainer's LengthGroupedSampler), so Trainer is given camelid's;
- an epoch is whole global batches only (Trainer takes a last, smaller optimizer step over the
  remainder), so that step s always consumes the same global batch on any number of ranks;
- a step with a non-finite loss or gradient norm is skipped (weights and schedule untouched,
  within --max_bad_steps) or stops the run; Trainer applies it;
- with --logging_steps N > 1 the printed line shows that step's loss, Trainer's the mean since
  its last log; metrics.jsonl and the trackers get every step's (what is compared here).
"""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch
from conftest import requires_shared
from train_utils import flags

from bench import REFERENCE_TRAINER_ON_CPU
from fastchat_data.build import build_dataset
from recipes import full_finetune
from recipes.core.config import load_config
from recipes.core.data import BatchPlan, TrainData
from recipes.core.recipe import TrainConfig

pytestmark = requires_shared

CONVERSATIONS = 40  # 134 to 253 tokens; each epoch of 6 global batches of 6 leaves 4 out
# the flags both runs share (paths are added); 3 micro-batches of 2 rows per optimizer step
COMMON = (
    "--strategy single --report_to none --model_max_length 256 --per_device_train_batch_size 2 "
    "--gradient_accumulation_steps 3 --learning_rate 2e-3 --seed 7 --save_steps 1000"
)
# name -> (flags, steps both must run). Each warm-up ratio x steps is fractional, which Trainer
# rounds up (3, 2 and 3 warm-up steps below); gradients are clipped at every step (norms 2-11).
CONFIGS = {
    # random batch order (most padding), cosine, weight decay, clipping at 0.5; 8 steps cross
    # into the second epoch (a new order)
    "cosine": (
        "--lr_scheduler_type cosine --warmup_ratio 0.3 --max_steps 8 --group_by_length False "
        "--weight_decay 0.1 --max_grad_norm 0.5",
        8,
    ),
    # steps from epochs: 1.4 x 6 = 8.4 -> 9 (Trainer's math.ceil); length-grouped batches;
    # transformers' own loss (--loss_chunk_size 0) instead of camelid's chunked one
    "linear_epochs": (
        "--lr_scheduler_type linear --warmup_ratio 0.2 --num_train_epochs 1.4 "
        "--group_by_length True --loss_chunk_size 0",
        9,
    ),
    # constant after warm-up; other Adam betas and epsilon
    "constant_with_warmup": (
        "--lr_scheduler_type constant_with_warmup --warmup_ratio 0.25 --max_steps 10 "
        "--group_by_length True --weight_decay 0.05 --adam_beta1 0.8 --adam_beta2 0.99 "
        "--adam_epsilon 1e-6",
        10,
    ),
}

# camelid's options that transformers' TrainingArguments names and means the same
SAME_AS_TRAINER = (
    "seed",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "num_train_epochs",
    "learning_rate",
    "lr_scheduler_type",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
)


@pytest.fixture(scope="module")
def conversations(data_dir, tmp_path_factory):
    rows = json.loads((data_dir / "fastchat_dummy_conversation.json").read_text())
    path = tmp_path_factory.mktemp("data") / "conversations.json"
    path.write_text(json.dumps(rows[:CONVERSATIONS]))
    return path


def camelid(argv: list[str], out) -> list[dict]:
    """The recipe as a user runs it (in this process): its metrics.jsonl rows."""
    assert full_finetune.main([*argv, "--output_dir", str(out)]) == 0
    assert signal.getsignal(signal.SIGTERM) is not None  # the run put its handlers back
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


class PlanSampler(torch.utils.data.Sampler):
    """camelid's batch order, epoch by epoch: step s's micro-batches one after the other."""

    def __init__(self, plan: BatchPlan):
        self.plan, self.epoch = plan, 0

    def set_epoch(self, epoch: int) -> None:  # Trainer calls it at each epoch's start
        self.epoch = epoch

    def __len__(self) -> int:
        return self.plan.steps_per_epoch * self.plan.global_size

    def __iter__(self):
        first = self.epoch * self.plan.steps_per_epoch
        for step in range(first, first + self.plan.steps_per_epoch):
            for ids in self.plan.micro_batches(step, 0):
                yield from (int(i) for i in ids)


def trainer(cfg, model_path: str, rows: list[dict], plan: BatchPlan, out) -> tuple[list, list]:
    """transformers' Trainer with the same flags: its per-step logs and the row ids it took."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(model_path, padding_side="right")
    tok.pad_token = tok.unk_token  # FastChat's padding
    pad = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
    taken: list[int] = []

    def collate(features):
        taken.extend(f["idx"] for f in features)
        return pad([{k: v for k, v in f.items() if k != "idx"} for f in features])

    class PlanTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return PlanSampler(plan)

    args = TrainingArguments(
        output_dir=str(out),
        **{name: getattr(cfg, name) for name in SAME_AS_TRAINER},
        warmup_steps=cfg.warmup_ratio,  # below 1: a ratio (transformers 5's warmup_ratio)
        optim="adamw_torch",
        logging_steps=1,
        remove_unused_columns=False,  # keeps "idx" for the collator
        **REFERENCE_TRAINER_ON_CPU,
    )
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    run = PlanTrainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    # camelid decays tensors of 2 or more dimensions; Trainer by name and layer type
    decayed = set(run.get_decay_parameter_names(model))
    assert decayed == {n for n, p in model.named_parameters() if p.ndim >= 2}
    run.train()
    return [r for r in run.state.log_history if "loss" in r], taken


@pytest.mark.parametrize("name", list(CONFIGS))
def test_losses_and_learning_rates_equal_trainer(name, llama_dir, conversations, tmp_path):
    settings, steps = CONFIGS[name]
    argv = [
        *COMMON.split(),
        *settings.split(),
        *flags(
            model_name_or_path=str(llama_dir),
            data_path=str(conversations),
            cache_dir=str(tmp_path / "cache"),
        ),
    ]
    ours = camelid(argv, tmp_path / "camelid")

    cfg, _ = load_config(argv, TrainConfig)
    ds, _ = build_dataset(
        str(conversations),
        str(llama_dir),
        template=cfg.template,
        max_length=cfg.model_max_length,
        cache_dir=cfg.cache_dir,
        quiet=True,
    )
    data = TrainData(ds.with_format("numpy"), False, cfg.model_max_length, pad_id=0)
    plan = BatchPlan(data.lengths, data.trained, cfg, world_size=1)
    rows = [
        {"idx": i, "input_ids": list(r["input_ids"]), "labels": list(r["labels"])}
        for i, r in enumerate(ds)
    ]
    theirs, taken = trainer(cfg, str(llama_dir), rows, plan, tmp_path / "trainer")

    # the same batches: camelid's first step (recorded by the run) and Trainer's, row for row
    first = json.loads((tmp_path / "camelid" / "ranks" / "rank0.json").read_text())["sample_ids"]
    assert taken[: plan.global_size] == first
    order = [int(i) for s in range(steps) for m in plan.micro_batches(s, 0) for i in m]
    assert taken[: len(order)] == order  # (its data loader collates one micro-batch ahead)
    # rows of many lengths, so padding and the loss's token count matter
    assert len({len(r["input_ids"]) for r in rows}) > 10
    assert min(r["real_token_share"] for r in ours) < 1

    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, steps + 1))
    lr_ours, lr_theirs = [r["lr"] for r in ours], [r["learning_rate"] for r in theirs]
    loss_ours, loss_theirs = [r["loss"] for r in ours], [r["loss"] for r in theirs]
    norm_ours, norm_theirs = [r["grad_norm"] for r in ours], [r["grad_norm"] for r in theirs]
    d_lr = max(abs(a - b) for a, b in zip(lr_ours, lr_theirs))
    d_loss = max(abs(a - b) for a, b in zip(loss_ours, loss_theirs))
    d_norm = max(abs(a - b) / b for a, b in zip(norm_ours, norm_theirs))
    print(
        f"\n{name}: {steps} steps, max |d lr| {d_lr:.2e}, max |d loss| {d_loss:.2e}, "
        f"max relative d grad_norm {d_norm:.2e}"
    )
    assert d_lr <= 1e-12, list(zip(lr_ours, lr_theirs))
    assert d_loss <= 1e-5, list(zip(loss_ours, loss_theirs))
    assert d_norm <= 1e-4, list(zip(norm_ours, norm_theirs))
    # the runs learned, clipping was active, and warm-up started from zero
    assert loss_ours[-1] < loss_ours[0] and lr_theirs[0] == 0.0
    assert min(norm_theirs) > cfg.max_grad_norm
    warmup = math.ceil(cfg.warmup_ratio * steps)
    assert lr_theirs[warmup] == pytest.approx(cfg.learning_rate)
