"""The rest of the RLHF pipeline: a reward model (TRL RewardTrainer's loss, strategy parity,
held-out accuracy from recipes.eval) and GRPO / RLOO (the loss and its gradient against TRL's
formulas, strategy parity, a run on arithmetic rewards that checkpoints and resumes exactly)."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
from test_dpo import MAX_LEN, dpo_args, pair_batch, pairs  # noqa: F401  (pairs: a module fixture)
from train_utils import GRPO as GRPO_SCRIPT
from train_utils import REWARD, flags, losses, ranks, train

from recipes.core.objectives.reward import load_reward_model, reward_losses


def metric_rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- reward model


def test_reward_loss_and_accuracy_by_hand():
    rewards = torch.tensor([1.5, -0.25, 0.0, 0.5, 2.0, 0.0])  # chosen 3, rejected 3
    losses, chosen, rejected = reward_losses(rewards)
    by_hand = [math.log(1 + math.exp(-(c - r))) for c, r in [(1.5, 0.5), (-0.25, 2.0), (0, 0)]]
    assert losses.tolist() == pytest.approx(by_hand, abs=1e-6)
    assert ((chosen > rejected).float().mean()) == pytest.approx(1 / 3)
    centred, _, _ = reward_losses(rewards, 0.1)
    extra = [0.1 * (c + r) ** 2 for c, r in [(1.5, 0.5), (-0.25, 2.0), (0, 0)]]
    assert centred.tolist() == pytest.approx([a + b for a, b in zip(by_hand, extra)], abs=1e-6)


@pytest.mark.parametrize("center", [None, 0.01])
def test_reward_loss_equals_trl_reward_trainer(pairs, center):  # noqa: F811
    trl = pytest.importorskip("trl", reason="TRL is the reference (requirements-reference.txt)")
    batch, data = pair_batch(pairs, n=4)
    torch.manual_seed(0)
    model = load_reward_model(pairs["model"], data.pad_id).eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    # TRL's compute_loss, unbound, on an object holding only what it reads in eval mode
    accelerator = types.SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t)
    from collections import defaultdict

    holder = types.SimpleNamespace(
        model=model,
        args=types.SimpleNamespace(center_rewards_coefficient=center),
        accelerator=accelerator,
        _metrics={"eval": defaultdict(list), "train": defaultdict(list)},
        _total_train_tokens=0,
    )
    theirs = trl.RewardTrainer.compute_loss(holder, model, dict(inputs))
    out = model(**inputs, use_cache=False)
    mine, chosen, rejected = reward_losses(out.logits.squeeze(-1), center or 0.0)
    assert mine.mean().item() == pytest.approx(theirs.item(), abs=1e-6)
    accuracy = holder._metrics["eval"]["accuracy"][0]
    assert (chosen > rejected).float().mean().item() == pytest.approx(accuracy)
    # batched scoring pools each row's last real token: the same score as the row alone
    lengths = inputs["attention_mask"].sum(-1)
    for i in (0, len(lengths) - 1):
        alone = model(input_ids=inputs["input_ids"][i : i + 1, : lengths[i]]).logits
        assert alone.item() == pytest.approx(out.logits[i].item(), abs=1e-5)


@pytest.fixture(scope="module")
def reward_run(pairs, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("reward-single")
    train("single", 1, out, *dpo_args(pairs, 24, 2), recipe=REWARD)  # 2 epochs of 48 pairs
    return out


def test_reward_model_trains_exports_and_evaluates(pairs, reward_run, tmp_path, capsys):  # noqa: F811
    from transformers import AutoConfig, AutoModelForSequenceClassification

    rows = metric_rows(reward_run)
    assert {"rewards/accuracy", "rewards/margin"} <= set(rows[-1])
    assert sum(r["loss"] for r in rows[-3:]) < sum(r["loss"] for r in rows[:3])
    exported = reward_run / "model"
    config = AutoConfig.from_pretrained(exported)
    assert config.num_labels == 1 and config.pad_token_id is not None
    AutoModelForSequenceClassification.from_pretrained(exported)  # plain transformers
    # accuracy through recipes.eval, on the 48 pairs it was trained on (the tiny model's
    # tokenizer knows only their words; a held-out measure on real data is in NOTES-rlhf.md)
    from recipes import eval as eval_cli

    out = tmp_path / "eval.json"
    seen = str(pairs["data"])
    args = ["--model", str(exported), "--reward_model", "--pairs", seen]
    assert eval_cli.main([*args, "--max_length", str(MAX_LEN), "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["preference"]
    assert row["pairs"] == 48 and row["accuracy"] > 0.9 and row["mean_margin"] > 1, row
    # a causal LM is refused in one line
    capsys.readouterr()
    assert eval_cli.main(["--model", str(pairs["model"]), "--reward_model", "--pairs", seen]) == 2
    assert "is not a reward model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def reward_single(pairs, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("reward-4-steps")
    train("single", 1, out, *dpo_args(pairs, 4, 2), recipe=REWARD)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
def test_reward_two_ranks_match_one_process(pairs, reward_single, strategy, tmp_path):  # noqa: F811
    """The score head is new, so every strategy loads the model whole and shards it after:
    the same initial head on every rank (one seed), the same steps as one process."""
    train(strategy, 2, tmp_path, *dpo_args(pairs, 4, 1), recipe=REWARD)
    assert [r["world_size"] for r in ranks(tmp_path)] == [2, 2]
    ref, got = losses(reward_single), losses(tmp_path)
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-4, (ref, got)


def test_reward_lora_trains_the_head_and_loads_with_peft(pairs, tmp_path):  # noqa: F811
    """--peft_method lora: LoRA layers on the SFT model plus the new score head trained whole
    (peft's SEQ_CLS); the adapter folder loads with plain transformers + peft and scores as
    the run's last step did."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    args = [*dpo_args(pairs, 24, 2), *flags(peft_method="lora", lora_r=8, lora_alpha=16)]
    args[args.index("--learning_rate") + 1] = "5e-3"
    train("single", 1, tmp_path, *args, recipe=REWARD)  # 2 epochs of 48 pairs
    losses = [r["loss"] for r in metric_rows(tmp_path)]
    assert sum(losses[12:]) < sum(losses[:12]), losses  # the second epoch's pairs score better
    adapter = tmp_path / "adapter"
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    heads = [k for k in saved if ".score." in k]
    assert heads and any("lora_A" in k for k in saved), sorted(saved)[:8]
    base = AutoModelForSequenceClassification.from_pretrained(pairs["model"], num_labels=1)
    fresh = base.score.weight.detach().clone()
    model = PeftModel.from_pretrained(base, adapter).eval()
    head = model.base_model.model.score
    trained = getattr(head, "modules_to_save", {"default": head})["default"].weight
    torch.testing.assert_close(trained, saved[heads[0]])
    assert not torch.equal(trained, fresh)  # the head trained (a fresh one is random)
    # recipes.eval scores the adapter on its SFT base: one row, the adapter's
    from recipes import eval as eval_cli

    out, seen = tmp_path / "eval.json", str(pairs["data"])
    args = ["--model", str(pairs["model"]), "--adapter", str(adapter), "--reward_model"]
    args += ["--pairs", seen, "--max_length", str(MAX_LEN), "--out", str(out)]
    assert eval_cli.main(args) == 0
    (row,) = json.loads(out.read_text())["preference"]
    assert row["adapter"] == str(adapter) and row["pairs"] == 48 and row["accuracy"] > 0.5, row


# ---------------------------------------------------------------------------- GRPO / RLOO

ARITH = "recipes.core.rewards.arithmetic"


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory):
    """64 arithmetic prompts and a tiny model whose tokenizer knows their words and numbers."""
    from fastchat_data.tiny import TEMPLATE_WORDS, tiny_model
    from recipes.core.rewards.arithmetic import problems

    folder = tmp_path_factory.mktemp("arithmetic")
    records = problems(64, seed=0)
    (folder / "prompts.json").write_text(json.dumps(records))
    texts = [r["prompt"] + " " + r["answer"] for r in records] + TEMPLATE_WORDS * 20
    texts += [str(i) for i in range(41)] * 20
    model = tiny_model("llama", "tiny", texts=texts, vocab_size=1000, cache_dir=folder / "cache")
    return {"data": folder / "prompts.json", "model": model}


def grpo_args(assets, steps, accum, *extra):
    return [
        *flags(
            model_name_or_path=assets["model"],
            data_path=assets["data"],
            model_max_length=128,
            max_completion_length=8,
            num_generations=4,
            max_steps=steps,
            learning_rate="1e-3",
            lr_scheduler_type="constant",
            per_device_train_batch_size=2,
            gradient_accumulation_steps=accum,
            save_steps=100,
            reward_funcs=f"{ARITH}:close,{ARITH}:format",
        ),
        *extra,
    ]


def trl_advantages(rewards, G, kind):
    """TRL's formulas, written out again: GRPOTrainer (scale_rewards="group") and RLOOTrainer."""
    grouped = rewards.view(-1, G)
    if kind == "grpo":
        mean = grouped.mean(1).repeat_interleave(G)
        std = grouped.std(1).repeat_interleave(G)  # TRL's nanstd: the unbiased std
        return (rewards - mean) / (std + 1e-4)
    baselines = (grouped.sum(1, keepdim=True) - grouped) / (G - 1)
    return rewards - baselines.view(-1)


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_advantages_equal_trl_formulas(kind):
    from recipes.core.objectives.grpo import group_advantages

    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25, 2.0, 2.0, 2.0, 2.0, -1.0, 3.0, 0.0, 1.0])
    mine, std = group_advantages(rewards, 4, kind)
    torch.testing.assert_close(mine, trl_advantages(rewards, 4, kind), atol=1e-6, rtol=0)
    assert mine[4:8].abs().max() == 0  # a group whose rewards are equal teaches nothing
    assert std[0] == pytest.approx(float(rewards[:4].std()))


def _trl_holder(beta, loss_type, epsilon, epsilon_high, max_completion_length, logps_fn):
    """What TRL's GRPOTrainer._compute_loss reads, and nothing more: TRL's own code computes the
    loss from the per-token log-probs our `logps_fn` gives it."""
    from collections import defaultdict

    accelerator = types.SimpleNamespace(
        reduce=lambda t, reduction="sum": t, gather=lambda t: t, gather_for_metrics=lambda t: t
    )
    return types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda model, ids, mask, keep, **_: (
            logps_fn(model, ids, mask, keep),
            torch.zeros(ids.shape[0], keep),
            None,
        ),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        max_completion_length=max_completion_length,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        model=types.SimpleNamespace(training=True),
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None),
        accelerator=accelerator,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )


@pytest.mark.parametrize(
    "loss_type, beta, epsilon_high",
    [("grpo", 0.0, None), ("grpo", 0.04, 0.28), ("dr_grpo", 0.1, None)],
)
def test_grpo_loss_and_gradient_equal_trl(arithmetic, loss_type, beta, epsilon_high):
    """Fixed prompts, completions, masks and rewards; an old policy apart from the current one
    (as after a first update), so the clip acts: camelid's loss and gradient against TRL's
    GRPOTrainer._compute_loss, or (TRL unreachable) against its formulas written out here."""
    from transformers import AutoModelForCausalLM

    from recipes.core.objectives.grpo import (
        completion_mask,
        group_advantages,
        policy_loss_terms,
        summed_loss,
        token_logps,
    )

    G, C, T, eps = 4, 6, 0.7, 0.2
    model = AutoModelForCausalLM.from_pretrained(arithmetic["model"])
    reference = AutoModelForCausalLM.from_pretrained(arithmetic["model"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    vocab = model.config.vocab_size
    prompts = torch.randint(5, vocab, (2, 5), generator=g).repeat_interleave(G, 0)
    completions = torch.randint(5, vocab, (2 * G, C), generator=g)
    stop = [2]
    completions[1, 2] = completions[6, 0] = completions[3, 5] = 2  # stops at different places
    mask = completion_mask(completions, stop)
    assert mask.sum(-1).tolist()[:4] == [6, 3, 6, 6] and mask[6].sum() == 1
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25, 0.0, 2.0, 1.0, 0.5])
    input_ids = torch.cat([prompts, completions], 1)
    attention_mask = torch.cat([torch.ones_like(prompts), mask], 1)

    def full_logps(m, ids, att, keep):  # independent: full logits, TRL's slicing
        logits = m(input_ids=ids, attention_mask=att).logits[:, :-1][:, -keep:] / T
        return torch.log_softmax(logits.float(), -1).gather(-1, ids[:, -keep:, None]).squeeze(-1)

    with torch.no_grad():
        ref_logps = full_logps(reference, input_ids, attention_mask, C)
        current = full_logps(model, input_ids, attention_mask, C)
    old = current + torch.randn(current.shape, generator=g) * 0.3  # ratios well outside the clip

    # camelid
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        logits_to_keep=C + 1,
    )
    logps = token_logps(out.logits[:, :-1], completions, T)
    advantages, _ = group_advantages(rewards, G, "grpo")
    per_token, _, clipped = policy_loss_terms(
        logps,
        old,
        ref_logps,
        advantages=advantages,
        mask=mask,
        beta=beta,
        epsilon=eps,
        epsilon_high=epsilon_high,
    )
    mine = summed_loss(per_token, mask, loss_type, max_completion_length=C) / len(rewards)
    assert 0 < clipped.sum() < mask.sum()  # the clip acts on some tokens, not all
    mine.backward()
    my_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    # the reference computation
    inputs = {
        "prompt_ids": prompts,
        "prompt_mask": torch.ones_like(prompts),
        "completion_ids": completions,
        "completion_mask": mask,
        "advantages": trl_advantages(rewards, G, "grpo"),
        "old_per_token_logps": old,
        "ref_per_token_logps": ref_logps,
    }
    try:
        from trl import GRPOTrainer
    except ImportError:
        GRPOTrainer = None
    if GRPOTrainer is not None:
        holder = _trl_holder(beta, loss_type, eps, epsilon_high, C, full_logps)
        theirs = GRPOTrainer._compute_loss(holder, model, inputs)
        region = holder._metrics["train"]["clip_ratio/region_mean"][0]
        assert clipped.sum().item() / mask.sum().item() == pytest.approx(region)
    else:  # TRL's formulas, written out
        lp = full_logps(model, input_ids, attention_mask, C)
        ratio = torch.exp(lp - old)
        adv = inputs["advantages"][:, None]
        high = eps if epsilon_high is None else epsilon_high
        loss_t = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + high) * adv)
        d = ref_logps - lp
        loss_t = loss_t + beta * (torch.exp(d) - d - 1)
        m = mask.float()
        if loss_type == "grpo":
            theirs = ((loss_t * m).sum(-1) / m.sum(-1)).mean()
        else:
            theirs = (loss_t * m).sum() / (len(rewards) * C)
    assert mine.item() == pytest.approx(theirs.item(), abs=1e-5)
    theirs.backward()
    for mine_g, p in zip(my_grads, model.parameters()):
        torch.testing.assert_close(mine_g, p.grad, atol=1e-5, rtol=1e-4)


def by_step(out):
    return {r["step"]: r for r in metric_rows(out)}


def test_grpo_runs_checkpoints_and_resumes_exactly(arithmetic, tmp_path):
    """4 steps straight, against 2 steps then a relaunch to 4 (the sampling seeds come from the
    step, which the checkpoint holds): the same completions, rewards, gradients and weights."""
    from safetensors.torch import load_file

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = grpo_args(arithmetic, 4, 1, "--beta", "0.04")
    train("single", 1, straight, *args, recipe=GRPO_SCRIPT)
    train("single", 1, resumed, *grpo_args(arithmetic, 2, 1, "--beta", "0.04"), recipe=GRPO_SCRIPT)
    res = train("single", 1, resumed, *args, recipe=GRPO_SCRIPT)
    assert "resumed from" in res.stdout and "(step 2)" in res.stdout
    a, b = by_step(straight), by_step(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    keys = ["loss", "grad_norm", "reward", "reward_std", "kl", "completion_length", "rewards/close"]
    for step in (3, 4):
        assert {k: b[step][k] for k in keys} == {k: a[step][k] for k in keys}
    # it learned something real: rewards were spread (advantages not all zero), gradients flowed
    assert all(a[s]["reward_std"] > 0 and a[s]["grad_norm"] > 0 for s in a)
    assert a[4]["kl"] > 0 and a[1]["kl"] == pytest.approx(0, abs=1e-6)  # the start is the reference
    for key in ("clip_fraction", "time/generate_s", "time/update_s", "rewards/format"):
        assert key in a[4]
    assert all(a[s]["time/update_s"] > 0 and a[s]["time/generate_s"] > 0 for s in a)
    w1, w2 = (load_file(str(o / "model" / "model.safetensors")) for o in (straight, resumed))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_grpo_lora_trains_an_adapter_that_loads_with_peft(arithmetic, tmp_path):
    """--peft_method lora: completions sampled through peft's generate, the reference (beta > 0)
    the base; the adapter export loads with plain transformers + peft and generates."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    args = grpo_args(arithmetic, 3, 1, "--beta", "0.04", "--peft_method", "lora", "--lora_r", 4)
    train("single", 1, tmp_path, *args, recipe=GRPO_SCRIPT)
    rows = by_step(tmp_path)
    assert sorted(rows) == [1, 2, 3] and all(r["grad_norm"] > 0 for r in rows.values())
    assert rows[3]["kl"] > 0  # the adapter moved the policy away from the base
    base = AutoModelForCausalLM.from_pretrained(arithmetic["model"])
    model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    out = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 5)


def test_eval_refuses_a_policy_adapter_as_a_reward_adapter(arithmetic, tmp_path, capsys):
    """A causal-LM adapter given to recipes.eval --reward_model: one line, exit 2."""
    from recipes import eval as eval_cli

    args = grpo_args(arithmetic, 1, 1, "--peft_method", "lora", "--lora_r", 4)
    train("single", 1, tmp_path, *args, recipe=GRPO_SCRIPT)
    pair_file = tmp_path / "pairs.json"
    pair_file.write_text(json.dumps([{"prompt": "1+1?", "chosen": "2", "rejected": "3"}]))
    argv = ["--model", str(arithmetic["model"]), "--adapter", str(tmp_path / "adapter")]
    capsys.readouterr()
    assert eval_cli.main([*argv, "--reward_model", "--pairs", str(pair_file)]) == 2
    assert "is not a reward adapter (peft task CAUSAL_LM" in capsys.readouterr().err


@pytest.fixture(scope="module")
def grpo_single(arithmetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo-single")
    args = grpo_args(arithmetic, 3, 2, "--advantage", "rloo", "--beta", "0.04")
    train("single", 1, out, *args, recipe=GRPO_SCRIPT)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3", "zero3_offload"])
def test_grpo_two_ranks_match_one_process(arithmetic, grpo_single, strategy, tmp_path):
    """Each prompt is sampled from its own seed, whichever rank holds it: 2 ranks sample what
    one process samples and take the same steps (FSDP2 and ZeRO-3: generation through their
    hooks, every rank stepping until all have stopped; ZeRO-3's reference partitioned too)."""
    args = grpo_args(arithmetic, 3, 1, "--advantage", "rloo", "--beta", "0.04")
    train(strategy, 2, tmp_path, *args, recipe=GRPO_SCRIPT)
    assert [r["world_size"] for r in ranks(tmp_path)] == [2, 2]
    assert_same_steps(by_step(grpo_single), by_step(tmp_path), (1, 2, 3))


def assert_same_steps(a: dict, b: dict, steps) -> None:
    for step in steps:
        for key in ("loss", "grad_norm", "reward", "kl", "completion_length"):
            assert abs(a[step][key] - b[step][key]) < 1e-4, (step, key, a[step], b[step])


@pytest.mark.slow
def test_grpo_zero3_relaunched_takes_the_same_steps(arithmetic, grpo_single, tmp_path):
    """2 steps under ZeRO-3 on 2 ranks, then a relaunch to 3: DeepSpeed's checkpoint and the
    step's sampling seeds continue the run that one process takes straight (within 1e-4; a
    straight ZeRO-3 run, measured once, gives bitwise the same metrics and weights)."""
    args = ("--advantage", "rloo", "--beta", "0.04")
    train("zero3", 2, tmp_path, *grpo_args(arithmetic, 2, 1, *args), recipe=GRPO_SCRIPT)
    res = train("zero3", 2, tmp_path, *grpo_args(arithmetic, 3, 1, *args), recipe=GRPO_SCRIPT)
    assert "resumed from" in res.stdout and "(step 2)" in res.stdout, res.stdout[-2000:]
    b = by_step(tmp_path)
    assert sorted(b) == [1, 2, 3]
    assert_same_steps(by_step(grpo_single), b, (1, 2, 3))


def test_grpo_prompt_file_without_prompts_is_one_line(arithmetic, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "2 + 2?", "answer": "4"}, {"question": "no prompt"}]))
    args = grpo_args(arithmetic, 1, 1)
    args[args.index("--data_path") + 1] = bad
    res = train("single", 1, tmp_path / "run", *args, recipe=GRPO_SCRIPT, check=False)
    assert res.returncode == 2 and "record 1 has none" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
