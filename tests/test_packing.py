"""Packing: conversations share a row but never attend to each other."""

from __future__ import annotations

import numpy as np
import torch
from train_utils import flags, losses, train
from transformers import AutoModelForCausalLM

from recipes.core.data import collate_packed, pack_sequences


def test_pack_sequences_fits_everything_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 512, size=2000)
    packs = pack_sequences(lengths, 512)
    flat = np.concatenate(packs)
    assert sorted(flat.tolist()) == list(range(2000))
    assert all(lengths[p].sum() <= 512 for p in packs)
    assert lengths.sum() / (512 * len(packs)) > 0.95  # rows are nearly full


def test_a_conversation_longer_than_the_cap_has_a_row_of_its_own():
    """--packing_row_tokens below the longest conversation: the long ones alone (no attention
    cost beyond length grouping's), the short ones still packed under the cap."""
    packs = pack_sequences(np.array([10, 3, 2, 12]), 5)
    assert sorted(p.tolist() for p in packs) == [[0], [1, 2], [3]]


def test_logits_packed_equal_logits_alone(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, attn_implementation="sdpa").eval()
    torch.manual_seed(0)
    convs = [torch.randint(3, model.config.vocab_size, (n,)).tolist() for n in (17, 9, 30)]
    rows = [[{"input_ids": c, "labels": c} for c in convs]]
    batch = collate_packed(rows, pad_id=0)
    assert "attention_mask" not in batch
    with torch.no_grad():
        # use_cache=False: with a KV cache transformers does not look for packed sequences
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits[0]
        at = 0
        for c in convs:
            alone = model(input_ids=torch.tensor([c])).logits[0]
            torch.testing.assert_close(packed[at : at + len(c)], alone, atol=1e-5, rtol=1e-5)
            at += len(c)
    # and the loss of a packed row never predicts one conversation's first token from another's end
    starts = [0, 17, 26]
    assert all(batch["labels"][0, s] == -100 for s in starts)


def test_training_with_packing(tmp_path):
    out = tmp_path / "packed"
    res = train(
        "single",
        1,
        out,
        *flags(
            config="tiny_cpu.yaml",
            max_steps=6,
            packing="True",
            model_max_length=256,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=1,
        ),
    )
    assert "packed rows" in res.stdout
    got = losses(out)
    assert len(got) == 6 and got[-1] < got[0]
