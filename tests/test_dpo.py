"""DPO: TRL's numbers, a cached reference equal to a live one, strategy parity, exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_train import kill_when
from train_utils import (
    REPO,
    assert_same_curve,
    command,
    flags,
    losses,
    moved,
    ranks,
    train,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastchat_data.preference import build_preference_dataset, pair
from fastchat_data.tiny import TEMPLATE_WORDS, shared_data_dir, tiny_model
from recipes.core.data import pad_token_id
from recipes.core.loss import sequence_logps_from_logits
from recipes.core.objectives.dpo import dpo_losses
from recipes.core.preference import PairData, PlainForward, preference_scores, sequence_logps

DPO = REPO / "recipes" / "dpo.py"
N_PAIRS = 48
MAX_LEN = 192


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """The first 48 Alpaca pairs (GPT-4 chosen, text-davinci-003 rejected) and a tiny model
    whose tokenizer knows their words."""
    folder = tmp_path_factory.mktemp("pairs")
    data = shared_data_dir()
    pair(
        str(data / "alpaca_gpt4_data_en_1k.json"),
        str(data / "alpaca_data.json"),
        str(folder / "all.json"),
    )
    records = json.loads((folder / "all.json").read_text())[:N_PAIRS]
    (folder / "pairs.json").write_text(json.dumps(records))
    texts = [r[k] for r in records for k in ("prompt", "chosen", "rejected")] + TEMPLATE_WORDS * 20
    model = tiny_model("llama", "tiny", texts=texts, vocab_size=2000, cache_dir=folder / "cache")
    return {"data": folder / "pairs.json", "model": model, "cache": folder / "cache"}


def pair_batch(pairs, n: int = 4, max_len: int = MAX_LEN) -> tuple[dict, PairData]:
    tok = AutoTokenizer.from_pretrained(pairs["model"])
    ds, _ = build_preference_dataset(
        [str(pairs["data"])], tok, max_length=max_len, cache_dir=str(pairs["cache"]), quiet=True
    )
    data = PairData(ds.with_format("numpy"), pad_token_id(tok))
    return data.batch(list(range(n)), with_reference=False), data


def perturbed(path, seed: int = 0):
    """The policy: the reference's weights moved a little, so that log-ratios are not zero."""
    model = AutoModelForCausalLM.from_pretrained(path)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sigmoid_norm"])
def test_loss_rewards_and_gradients_equal_trl(pairs, loss_type, tmp_path):
    pytest.importorskip("trl", reason="TRL is the reference (requirements-reference.txt)")
    import datasets
    from trl import DPOConfig, DPOTrainer

    # 96 tokens: TRL sums per-token log-probs in float32, which at an untrained model's ~-8 per
    # token loses ~3e-5 on a 1,100-token sum (camelid sums in float64); shorter rows keep TRL's
    # own rounding well under the 1e-5 compared here
    batch, _ = pair_batch(pairs, max_len=96)
    beta = 0.3
    # camelid
    policy, ref = perturbed(pairs["model"]), AutoModelForCausalLM.from_pretrained(pairs["model"])
    with torch.no_grad():
        ref_logps, _ = sequence_logps(PlainForward(ref, 64), dict(batch))
    logps, tokens = sequence_logps(PlainForward(policy, 64), dict(batch))
    losses_, chosen, rejected = dpo_losses(logps, ref_logps, tokens, beta=beta, loss_type=loss_type)
    losses_.mean().backward()
    ours = {n: p.grad.clone() for n, p in policy.named_parameters()}
    # TRL, on the same rows: its completion mask is where camelid's labels are set
    trl_policy = perturbed(pairs["model"])
    tok = AutoTokenizer.from_pretrained(pairs["model"])
    tok.pad_token = tok.pad_token or tok.eos_token
    raw = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 4)
    args = DPOConfig(
        output_dir=str(tmp_path),
        beta=beta,
        loss_type=[loss_type],
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=4,
        bf16=False,
        precompute_ref_log_probs=False,
    )
    trainer = DPOTrainer(
        model=trl_policy,
        ref_model=AutoModelForCausalLM.from_pretrained(pairs["model"]),
        args=args,
        train_dataset=raw,
        processing_class=tok,
    )
    trainer.model.train()
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": (batch["labels"] != -100).long(),
    }
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    loss.backward()
    metrics = trainer._metrics["train"]
    assert abs(loss.item() - losses_.mean().item()) < 1e-5
    assert abs(metrics["rewards/chosen"][-1] - chosen.mean().item()) < 1e-5
    assert abs(metrics["rewards/rejected"][-1] - rejected.mean().item()) < 1e-5
    assert abs(metrics["rewards/accuracies"][-1] - (chosen > rejected).float().mean().item()) < 1e-6
    worst = max((ours[n] - p.grad).abs().max().item() for n, p in trainer.model.named_parameters())
    assert worst < 1e-5 and any(g.abs().max() > 1e-3 for g in ours.values())


def test_cached_reference_equals_a_live_reference_model(pairs, tmp_path):
    out = tmp_path / "run"
    res = train(
        "single",
        1,
        out,
        *flags(
            model_name_or_path=pairs["model"],
            data_path=pairs["data"],
            model_max_length=MAX_LEN,
            max_steps=1,
            cache_dir=pairs["cache"],
        ),
        recipe=DPO,
    )
    assert (
        "reference log-probs of 48 pairs" in res.stdout
        or "reference log-probs: cached" in res.stdout
    )
    from safetensors.torch import load_file

    cached = next((pairs["cache"] / "datasets").glob("pref-*/reference-*.safetensors"))
    table = load_file(str(cached))["reference_logps"]
    batch, data = pair_batch(pairs, n=N_PAIRS)
    live = AutoModelForCausalLM.from_pretrained(pairs["model"])
    with torch.no_grad():
        logits = live(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    chosen, rejected = sequence_logps_from_logits(logits, batch["labels"]).chunk(2)
    assert table.shape == (len(data.units), 2) == (N_PAIRS, 2)
    torch.testing.assert_close(table, torch.stack([chosen, rejected], 1), atol=1e-4, rtol=1e-5)
    # step 1: the policy is the reference, so the loss is log 2 and the rewards are zero
    assert abs(losses(out)[0] - math.log(2)) < 1e-6


def dpo_args(pairs, steps, accum):
    """A run on the preference pairs: DPO here, the reward model in test_rlhf."""
    return [
        *flags(
            model_name_or_path=pairs["model"],
            data_path=pairs["data"],
            cache_dir=pairs["cache"],
            model_max_length=MAX_LEN,
            max_steps=steps,
            learning_rate="1e-3",
            per_device_train_batch_size=2,
            gradient_accumulation_steps=accum,
            save_steps=100,
        ),
    ]


def dpo_run_args(pairs, accum):
    """8 steps at global batch 4, saving (and keeping) every 2: the runs parity, kill and move
    tests share."""
    return [*dpo_args(pairs, 8, accum), *flags(save_steps=2, save_total_limit=0)]


@pytest.fixture(scope="module")
def one_process(pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo-single")
    train("single", 1, out, *dpo_run_args(pairs, 2), recipe=DPO)
    return out


@pytest.fixture(scope="module")
def two_rank_run(pairs, tmp_path_factory):
    """`two_rank_run(strategy)`: 8 DPO steps on two ranks (run on first use), the parity run
    against one process and the uninterrupted curve killed and moved runs must follow."""
    runs = {}

    def run(strategy: str) -> Path:
        if strategy not in runs:
            runs[strategy] = tmp_path_factory.mktemp(f"dpo-{strategy}") / "run"
            train(strategy, 2, runs[strategy], *dpo_run_args(pairs, 1), recipe=DPO)
        return runs[strategy]

    return run


def metric_rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_learns_and_logs_rewards(pairs, one_process):
    rows = metric_rows(one_process)
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-6
    # the tuned model prefers the chosen replies of the pairs it trained on more than it did
    tok = AutoTokenizer.from_pretrained(pairs["model"])
    seen = pairs["data"].with_name("seen.json")
    seen.write_text(json.dumps(json.loads(pairs["data"].read_text())[:16]))
    before, after = (
        preference_scores(
            AutoModelForCausalLM.from_pretrained(m),
            tok,
            str(seen),
            max_length=MAX_LEN,
            cache_dir=str(pairs["cache"]),
        )
        for m in (pairs["model"], one_process / "model")
    )
    assert after["mean_margin"] > before["mean_margin"] + 1, (before, after)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
        assert key in rows[-1], rows[-1]
    assert rows[-1]["rewards/margin"] > 0
    assert (one_process / "model" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
def test_two_ranks_match_one_process(pairs, one_process, two_rank_run, strategy):
    out = two_rank_run(strategy)
    info = ranks(out)
    assert [r["world_size"] for r in info] == [2, 2]
    assert not set(info[0]["sample_ids"]) & set(info[1]["sample_ids"])
    ref, got = losses(one_process), losses(out)
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-4, (ref, got)


@pytest.mark.slow
def test_kill_9_then_relaunch_continues_the_same_loss_curve(pairs, two_rank_run, tmp_path):
    args = dpo_run_args(pairs, 1)
    out = tmp_path / "killed"
    kill_when(command("fsdp", 2, out, *args, recipe=DPO), out / "metrics.jsonl", 5)
    res = train("fsdp", 2, out, *args, recipe=DPO)
    assert "resumed from" in res.stdout and "(step 4)" in res.stdout
    assert "reference log-probs: cached" in res.stdout  # never rescored from trained weights
    assert losses(out) == pytest.approx(losses(two_rank_run("fsdp")), abs=1e-6)


@pytest.mark.slow
def test_a_dpo_run_moves_from_fsdp_two_to_one_process(pairs, two_rank_run, tmp_path):
    """Policy, optimizer, data position and the cached reference log-probs written by FSDP2 x 2
    resume in one process (2 per device x 2 accumulation: the same global batch)."""
    straight = two_rank_run("fsdp")
    out = Path(moved(straight, tmp_path / "moved", step=4))
    res = train("single", 1, out, *dpo_run_args(pairs, 2), recipe=DPO)
    assert "(step 4)" in res.stdout and "reference log-probs: cached" in res.stdout, res.stdout
    assert "note: moved: written by fsdp x 2, resumed by single x 1" in res.stdout
    assert_same_curve(losses(out), losses(straight), at=4)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_lora_and_qlora_dpo_export_an_adapter(pairs, quantization, tmp_path):
    train(
        "single",
        1,
        tmp_path,
        *dpo_args(pairs, 2, 2),
        *flags(peft_method="lora", quantization=quantization, lora_r=8, optim="adamw_torch"),
        recipe=DPO,
    )
    rows = metric_rows(tmp_path)
    # the reference is the base: a fresh adapter adds nothing, so step 1 is at log 2; on a
    # 4-bit base the no-grad scoring pass and the training forward round apart (measured 1.2e-4)
    assert abs(rows[0]["loss"] - math.log(2)) < (1e-5 if quantization == "none" else 1e-3)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
