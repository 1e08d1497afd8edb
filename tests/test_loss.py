"""The chunked loss: transformers' ForCausalLMLoss numbers and gradients, without its logits."""

from __future__ import annotations

import pytest
import torch
from train_utils import llama_config
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaForCausalLM

from recipes.core.data import collate_packed
from recipes.core.loss import chunked_causal_lm_loss, forward_with_loss

VOCAB = 1000
# narrower than the tiny size: these tests compare losses over many chunkings
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_key_value_heads=2)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(**SMALL, tie_word_embeddings=False))


def padded_batch(seed: int = 1, prompt: int = 11) -> dict:
    """Two rows of different lengths, right-padded, labels only on part of each row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 29:] = 0
    labels = ids.clone()
    labels[:, :prompt] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def packed_batch(seed: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    convs = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (13, 21, 8)]
    rows = [[{"input_ids": c, "labels": [-100] * 4 + c[4:]} for c in convs]]
    return collate_packed(rows, pad_id=0)


def loss_and_grads(model, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters()}
    return loss.detach(), grads


def assert_same(ref, got):
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    assert ref[1].keys() == got[1].keys()
    for name in ref[1]:
        torch.testing.assert_close(
            got[1][name],
            ref[1][name],
            atol=1e-6,
            rtol=1e-5,
            msg=lambda m, name=name: f"{name}: {m}",
        )


@pytest.mark.parametrize("chunk", [1, 7, 1024])
@pytest.mark.parametrize("make_batch", [padded_batch, packed_batch])
@pytest.mark.parametrize("num_items", [None, 123, torch.tensor(77)])
def test_same_loss_and_gradients_as_transformers(chunk, make_batch, num_items):
    model = tiny_llama()
    batch = make_batch()
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    ref = loss_and_grads(model, lambda: model(**batch, use_cache=False, **extra).loss)
    got = loss_and_grads(
        model,
        lambda: forward_with_loss(model, model, chunk, **batch, use_cache=False, **extra).loss,
    )
    assert_same(ref, got)
    # a token sum over num_items_in_batch: not the mean of this batch's tokens
    if num_items is not None:
        mean = model(**batch, use_cache=False).loss.detach()
        trained = int((batch["labels"][:, 1:] != -100).sum())
        torch.testing.assert_close(got[0] * num_items / trained, mean, atol=1e-5, rtol=1e-5)


def test_only_one_position_of_logits_is_computed():
    model = tiny_llama()
    batch = padded_batch()
    out = forward_with_loss(model, model, 16, **batch, use_cache=False)
    assert out.logits.shape == (2, 1, VOCAB)  # not (2, 40, VOCAB)
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda m, a, o: shapes.append(tuple(o.shape)))
    try:
        forward_with_loss(model, model, 16, **batch, use_cache=False).loss.backward()
    finally:
        handle.remove()
    trained = int((batch["labels"][:, 1:] != -100).sum())  # 29 + 18 = 47 rows: 16, 16, 15
    assert shapes[0] == (2, 1, VOCAB)
    assert shapes[1:4] == [(16, VOCAB), (16, VOCAB), (trained - 32, VOCAB)]
    assert shapes[4:] == shapes[1:4][::-1]  # recomputed in backward, chunk by chunk, last first


def test_nothing_to_train_still_backpropagates():
    model = tiny_llama()
    batch = padded_batch()
    batch["labels"][:] = -100
    ref = loss_and_grads(model, lambda: model(**batch, num_items_in_batch=10).loss)
    got = loss_and_grads(
        model, lambda: forward_with_loss(model, model, 8, **batch, num_items_in_batch=10).loss
    )
    assert got[0].item() == 0.0
    assert_same(ref, got)


def test_chunk_size_zero_is_transformers_loss():
    model = tiny_llama()
    batch = padded_batch()
    out = forward_with_loss(model, model, 0, **batch)
    assert out.logits.shape == (2, 40, VOCAB)
    torch.testing.assert_close(out.loss, model(**batch).loss)


def test_direct_function_matches_cross_entropy_on_hidden_states():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9))
    labels[0, :4] = -100
    ref_logits = head(hidden)[:, :-1].reshape(-1, 50)
    ref = (
        torch.nn.functional.cross_entropy(ref_logits, labels[:, 1:].reshape(-1), reduction="sum")
        / 5
    )
    got = chunked_causal_lm_loss(hidden, head, labels, num_items_in_batch=5, chunk_size=4)
    torch.testing.assert_close(got, ref)
    g_ref = torch.autograd.grad(ref, [hidden, head.weight])
    g_got = torch.autograd.grad(got, [hidden, head.weight])
    for a, b in zip(g_ref, g_got):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_soft_capped_logits_are_refused():
    """Gemma 2 soft-caps its logits after the output embedding: the chunked loss would train
    another objective, so it stops with a message instead."""
    torch.manual_seed(0)
    cfg = Gemma2Config(
        **SMALL,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=16,
        final_logit_softcapping=2.0,
    )
    model = Gemma2ForCausalLM(cfg)
    batch = padded_batch()
    with pytest.raises(RuntimeError, match="loss_chunk_size 0"):
        forward_with_loss(model, model, 16, **batch, use_cache=False)


# ------------------------------------------------ 2 ranks: FSDP2 and ZeRO-3 through the engines


def rank_batches(rank: int) -> list[dict]:
    """Each rank its own micro-batches (different lengths, a packed one among them), with
    different numbers of labelled tokens: ranks project different numbers of loss chunks
    unless chunk_count evens them out (under ZeRO-3 an uneven count would hang)."""
    return [padded_batch(seed=10 + rank, prompt=11 + 12 * rank), packed_batch(seed=20 + rank)]


def full_grad(engine, param) -> torch.Tensor:
    """The whole gradient of one parameter, whatever the strategy sharded."""
    if engine.strategy.engine == "deepspeed":
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(param).detach().clone()
    grad = param.grad
    return (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()


def worker(strategy: str, chunk: int, out: str) -> None:
    """One rank of a 2-rank job: 2 optimizer steps through make_engine, recording the losses
    and every parameter's full gradient at the first step. (Not the weights after a step: Adam
    turns a gradient of ~1e-9 into a step of lr * sign, so rounding noise would dominate.)"""
    from pathlib import Path

    from recipes.core.engines import make_engine
    from recipes.core.recipe import TrainConfig
    from recipes.core.world import init_world

    world = init_world(strategy)
    cfg = TrainConfig(
        strategy=strategy,
        loss_chunk_size=chunk,
        learning_rate=1e-3,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        warmup_ratio=0.0,
        lr_scheduler_type="constant",
    )
    engine = make_engine(tiny_llama(), cfg, world, total_steps=2)
    every = [rank_batches(r) for r in range(world.size)]
    record = {"loss": [], "grads": None}
    for step in range(2):
        batches = [b[step] for b in every]
        num_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        with engine.sync_gradients(True):
            output = engine.forward(
                **batches[world.rank], num_items_in_batch=num_items, use_cache=False
            )
            loss = output.loss
            engine.backward(loss)
        record["logit_positions"] = output.logits.shape[1]
        record["loss"].append(world.all_sum(loss.item()))
        if step == 0:
            record["grads"] = {n: full_grad(engine, p) for n, p in engine.module.named_parameters()}
        engine.step(True)
    if world.main:
        torch.save(record, Path(out) / f"{strategy}-{chunk}.pt")


def launch(strategy: str, chunk: int, out) -> dict:
    """This file's worker on 2 ranks, forked as tests/train_utils.train forks a job (with
    torchrun's environment, and DeepSpeed's --local_rank under ZeRO-3)."""
    import sys
    from pathlib import Path

    from train_utils import REPO, env, forked_job

    argv = [sys.executable, str(Path(__file__)), "--strategy", strategy, "--worker", str(chunk)]
    worker_env = {**env(), "PYTHONPATH": str(REPO)}  # the worker imports bench (not installed)
    res = forked_job([*argv, str(out)], strategy, 2, environ=worker_env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return torch.load(Path(out) / f"{strategy}-{chunk}.pt", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_two_ranks_same_gradients_as_transformers_loss(strategy, tmp_path):
    """Under FSDP2 and ZeRO-3 the output embedding's weight is sharded: the chunked loss calls
    the module, so its hooks gather it and its gradient is reduced like any other."""
    ref, got = launch(strategy, 0, tmp_path), launch(strategy, 8, tmp_path)
    torch.testing.assert_close(
        torch.tensor(got["loss"]), torch.tensor(ref["loss"]), atol=1e-5, rtol=1e-5
    )
    assert ref["logit_positions"] > 1 and got["logit_positions"] == 1  # the chunked path ran
    assert ref["grads"].keys() == got["grads"].keys() and "lm_head.weight" in got["grads"]
    for name, grad in ref["grads"].items():
        assert grad.abs().sum() > 0, name  # a real gradient, reduced over both ranks
        torch.testing.assert_close(
            got["grads"][name], grad, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


if __name__ == "__main__":
    import sys

    # as job_command starts it: --strategy S --worker CHUNK OUT (and --local_rank=N first
    # under the deepspeed launcher)
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    if argv[:1] == ["--strategy"] and argv[2:3] == ["--worker"]:
        worker(argv[1], int(argv[3]), argv[4])


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_adapters_same_loss_and_gradients(method):
    """QLoRA's engines share this forward: LoRA goes through the chunked loss; prompt tuning
    (virtual tokens prepended, so hidden states outnumber labels) keeps transformers' loss."""
    peft = pytest.importorskip("peft")
    if method == "lora":
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    else:
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    model = peft.get_peft_model(tiny_llama(), config)
    batch = padded_batch()
    extra = {"num_items_in_batch": 50}
    ref = loss_and_grads(model, lambda: model(**batch, use_cache=False, **extra).loss)
    out = forward_with_loss(model, model, 8, **batch, use_cache=False, **extra)
    got = loss_and_grads(model, lambda: out.loss)
    assert (out.logits.shape[1] == 1) == (method == "lora")
    ref_grads = {n: g for n, g in ref[1].items() if g is not None}
    assert ref_grads and all(got[1][n] is not None for n in ref_grads)
    assert_same((ref[0], ref_grads), (got[0], {n: got[1][n] for n in ref_grads}))
