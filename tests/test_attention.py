"""--attn_implementation: every implementation that runs here trains on the same loss as eager,
and in a packed row no conversation attends to another."""

from __future__ import annotations

import pytest
import torch
from train_utils import llama_config
from transformers import LlamaForCausalLM

from recipes.core.attention import PACKED_SDPA, attention_kwargs, register, resolve, unavailable
from recipes.core.config import ConfigError, load_config
from recipes.core.data import collate, collate_packed
from recipes.core.recipe import TrainConfig

VOCAB = 500
LENGTHS = (37, 80, 21)  # one packed row of three conversations
register()
IMPLEMENTATIONS = ("eager", "sdpa", PACKED_SDPA, "flex_attention", "flash_attention_2")
TRAINABLE = [n for n in IMPLEMENTATIONS if not unavailable(n)]
# flex_attention compiles (about 20 s on this CPU) and has no CPU backward: forward only, slow
FORWARD_ONLY = [] if "flex_attention" in TRAINABLE else ["flex_attention"]


def model(impl: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = llama_config(hidden_size=64, intermediate_size=128, num_key_value_heads=2)
    return LlamaForCausalLM._from_config(cfg, attn_implementation=impl)


def conversations(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    convs = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]
    return [{"input_ids": c, "labels": [-100] * 5 + c[5:]} for c in convs]


def batch(layout: str, convs: list[dict]) -> dict:
    if layout == "packed":
        return collate_packed([convs], pad_id=0)
    return collate(convs, pad_id=0)  # one conversation per row, right-padded


def loss_and_grads(impl: str, layout: str, grads: bool = True):
    m = model(impl)
    b = batch(layout, conversations())
    with torch.set_grad_enabled(grads):
        loss = m(**b, use_cache=False).loss
    if not grads:
        return loss, {}
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in m.named_parameters()}


# fp32 throughout: the implementations compute the same softmax(QK^T)V and differ only in
# summation order (sdpa's CPU kernel is a blocked online softmax), ~1e-7 relative per op; two
# layers keep that far below 1e-5, while a mask that lets one key through moves the loss ~1e-2.
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("impl", [i for i in TRAINABLE if i != "eager"])
def test_same_loss_and_gradients_as_eager(impl, layout):
    ref_loss, ref_grads = loss_and_grads("eager", layout)
    loss, grads = loss_and_grads(impl, layout)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, **TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("impl", FORWARD_ONLY)
def test_same_loss_as_eager_forward_only(impl, layout):
    torch.testing.assert_close(
        loss_and_grads(impl, layout, grads=False)[0],
        loss_and_grads("eager", layout, False)[0],
        **TOL,
    )


def logits_by_conversation(m, convs, **extra) -> list[torch.Tensor]:
    b = collate_packed([convs], pad_id=0)
    with torch.no_grad():
        logits = m(
            input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False, **extra
        ).logits[0]
    return list(torch.split(logits, LENGTHS))


@pytest.mark.parametrize(
    "impl", TRAINABLE + [pytest.param(i, marks=pytest.mark.slow) for i in FORWARD_ONLY]
)
def test_no_attention_across_conversations(impl):
    m = model(impl)
    convs = conversations()
    changed = [dict(c) for c in convs]
    changed[1]["input_ids"] = conversations(seed=1)[1]["input_ids"]  # another middle conversation
    before, after = logits_by_conversation(m, convs), logits_by_conversation(m, changed)
    assert (after[1] - before[1]).abs().max() > 1e-2  # the perturbation is real
    # those before it and after it see nothing of it (the one after is what a leak would hit)
    torch.testing.assert_close(after[0], before[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(after[2], before[2], atol=1e-6, rtol=0)


def test_a_leak_would_be_seen():
    """Control: with an explicit all-ones attention_mask transformers does not look for
    packing, the row is one causal sequence, and the third conversation sees the second."""
    m = model("sdpa")
    convs = conversations()
    changed = [dict(c) for c in convs]
    changed[1]["input_ids"] = conversations(seed=1)[1]["input_ids"]
    ones = torch.ones(1, sum(LENGTHS), dtype=torch.long)
    before = logits_by_conversation(m, convs, attention_mask=ones)
    after = logits_by_conversation(m, changed, attention_mask=ones)
    assert (after[2] - before[2]).abs().max() > 1e-2


def test_auto_picks_what_runs_here():
    assert resolve("auto", packing=False, cuda=False) == "sdpa"
    assert resolve("auto", packing=True, cuda=False) == PACKED_SDPA  # flex cannot train on CPU
    if unavailable("flash_attention_2", cuda=True):  # no flash_attn package: flex for packing
        assert resolve("auto", packing=True, cuda=True) == "flex_attention"
        assert resolve("auto", packing=False, cuda=True) == "sdpa"
    assert resolve("eager", packing=True) == "eager"
    expected = PACKED_SDPA if not torch.cuda.is_available() else resolve("auto", True)
    assert attention_kwargs(TrainConfig(packing=True)) == {"attn_implementation": expected}


@pytest.mark.parametrize("name", ["flex_attention", "flash_attention_2"])
def test_an_implementation_that_cannot_train_here_is_an_error(name):
    if not unavailable(name):
        pytest.skip(f"{name} runs here")
    with pytest.raises(ConfigError, match=name):
        resolve(name, packing=True)


def test_unknown_implementation_is_a_config_error():
    with pytest.raises(ConfigError, match="attn_implementation 'flash3'"):
        load_config(["--attn_implementation", "flash3"], TrainConfig)
    with pytest.raises(ConfigError, match="loss_chunk_size"):
        load_config(["--loss_chunk_size", "-1"], TrainConfig)
    cfg, _ = load_config(["--attn_implementation", "eager", "--loss_chunk_size", "0"], TrainConfig)
    assert (cfg.attn_implementation, cfg.loss_chunk_size) == ("eager", 0)


def test_sdpa_packed_calls_sdpa_once_per_conversation():
    """The point of sdpa_packed: no work between conversations (sum of n_i^2, not width^2)."""
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    calls = []

    class Spy(TorchFunctionMode):  # sees every torch function call, changes none
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                calls.append(
                    (args[0].shape[2], kwargs.get("attn_mask") is None, kwargs.get("is_causal"))
                )
            return func(*args, **kwargs)

    m = model(PACKED_SDPA)
    b = batch("packed", conversations())
    with torch.no_grad(), Spy():
        m(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False)
    assert calls == [(n, True, True) for n in LENGTHS] * m.config.num_hidden_layers


def test_packed_rows_are_no_wider_than_the_longest_conversation():
    """sdpa and eager pay width^2 per packed row: by default a row holds no more tokens than
    the longest conversation, the widest row length grouping would build."""
    from recipes.core.data import TrainData

    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 300, (200,), generator=rng).tolist()
    ds = {"length": lengths, "labels": [[-100] + [1] * (n - 1) for n in lengths]}
    data = TrainData(ds, packing=True, capacity=2048, pad_id=0)
    assert data.row_tokens == max(lengths)
    assert max(data.lengths) <= max(lengths)
    assert sorted(i for u in data.units for i in u.tolist()) == list(range(200))
    assert sum(lengths) / (max(lengths) * len(data.units)) > 0.9  # still nearly full rows
    wide = TrainData(ds, packing=True, capacity=2048, pad_id=0, row_tokens=2048)
    assert wide.row_tokens == 2048 and len(wide.units) < len(data.units)
    assert TrainData(ds, packing=False, capacity=2048, pad_id=0).row_tokens is None
