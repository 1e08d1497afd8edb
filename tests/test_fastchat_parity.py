"""FastChat as the reference: same rendering, same ids, same labels, and no mismatches."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from bench.fastchat_ref import fastchat_accepts, fastchat_preprocess
from fastchat_data.build import read_trainable
from fastchat_data.report import Report
from fastchat_data.schema import SkipRecord
from fastchat_data.tokenize import IGNORE_INDEX, ConversationTokenizer

pytestmark = pytest.mark.fastchat
MAX_LENGTH = 2048


@pytest.mark.parametrize(
    ("name", "expect_mismatched"),
    [("fastchat_dummy_conversation.json", 0), ("sharegpt_v3_sample_1000.json", None)],
)
def test_ids_and_labels_identical_to_fastchat(name, expect_mismatched, llama_dir, data_dir, capsys):
    from fastchat.conversation import get_conv_template

    convs = [c for c in read_trainable([str(data_dir / name)], Report("t")) if fastchat_accepts(c)]
    ours = ConversationTokenizer(
        AutoTokenizer.from_pretrained(llama_dir), "vicuna_v1.1", max_length=MAX_LENGTH
    )
    reference = AutoTokenizer.from_pretrained(llama_dir)
    assert reference.legacy  # FastChat's masks are only right for legacy Llama tokenizers
    ref_ids, ref_labels, kept = fastchat_preprocess(convs, reference, MAX_LENGTH)

    mismatched = compared = untrainable = 0
    for conv, enc, ids, labels, ok in zip(
        convs, ours.encode_batch(convs), ref_ids, ref_labels, kept
    ):
        if isinstance(enc, SkipRecord):  # no reply starts within max_length: nothing to train on
            assert enc.reason == "no_trainable_tokens_after_truncation" and not ok, conv.id
            untrainable += 1
            continue
        fc = get_conv_template("vicuna_v1.1")
        for i, m in enumerate(conv.messages):
            fc.append_message(fc.roles[i % 2], m.content)
        assert ours.render_text(conv) == fc.get_prompt(), conv.id
        assert enc.input_ids == ids, conv.id  # FastChat tokenizes the whole prompt string
        if not ok:
            mismatched += 1  # FastChat masked this one away entirely; we train on it
            assert any(x != IGNORE_INDEX for x in enc.labels)
            continue
        assert enc.labels == labels, conv.id
        compared += 1
    with capsys.disabled():
        print(
            f"\n{name}: {len(convs)} conversations, FastChat kept {compared} (identical ids and "
            "labels), "
            f"masked {mismatched} away as 'tokenization mismatch' (camelid trains on them); "
            f"{untrainable} have no reply within {MAX_LENGTH} tokens (both skip them)"
        )
    assert compared > 0.5 * len(convs)
    if expect_mismatched is not None:
        assert mismatched == expect_mismatched


def test_fastchat_masks_away_conversations_with_a_non_legacy_tokenizer(
    llama_nonlegacy_dir, data_dir, capsys
):
    """FastChat's offset arithmetic (its `-2`, its legacy branch) breaks on tokenizers it did not
    foresee and silently trains on nothing for those conversations; camelid's masks stay exact
    (test_tokenize checks every conversation with this tokenizer)."""
    convs = [
        c for c in read_trainable([str(data_dir / "fastchat_dummy_conversation.json")], Report("t"))
    ]
    _, _, kept = fastchat_preprocess(
        convs, AutoTokenizer.from_pretrained(llama_nonlegacy_dir), MAX_LENGTH
    )
    ours = ConversationTokenizer(
        AutoTokenizer.from_pretrained(llama_nonlegacy_dir), "vicuna_v1.1", max_length=MAX_LENGTH
    )
    trained = [any(x != IGNORE_INDEX for x in e.labels) for e in ours.encode_batch(convs)]
    with capsys.disabled():
        print(
            f"\nnon-legacy tokenizer: FastChat masks away {kept.count(False)} of {len(convs)}; "
            f"camelid {trained.count(False)}"
        )
    assert kept.count(False) > 0 and all(trained)
