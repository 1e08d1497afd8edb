"""The tiny tokenizer and model builder: real from_pretrained round trips, determinism."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastchat_data.tiny import SIZES, build_tiny_llama, train_tokenizer

TEXTS = [
    "Hello world, this is a tiny corpus.",
    "USER: hi ASSISTANT: hello",
    "中文 和 emoji 😀",
] * 50


def test_llama_tokenizer_keeps_legacy_and_specials(tmp_path, llama_dir, llama_nonlegacy_dir):
    for path, legacy in ((llama_dir, True), (llama_nonlegacy_dir, False)):
        tok = AutoTokenizer.from_pretrained(path)
        assert type(tok).__name__ == "LlamaTokenizer" and tok.legacy is legacy
        assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
        ids = tok("a</s>USER").input_ids
        assert ids[0] == tok.bos_token_id and tok.eos_token_id in ids
        after = tok.convert_ids_to_tokens(ids[ids.index(tok.eos_token_id) + 1])
        assert after.startswith("▁") is legacy  # the legacy / non-legacy difference itself
        assert (
            tok.decode(tok("中文 😀 x").input_ids, skip_special_tokens=True) == "中文 😀 x"
        )  # byte fallback


def test_chatml_tokenizer(chatml_dir):
    tok = AutoTokenizer.from_pretrained(chatml_dir)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_deterministic_for_a_seed(tmp_path):
    a = train_tokenizer(TEXTS, tmp_path / "a", "llama", vocab_size=300, seed=1)
    b = train_tokenizer(TEXTS, tmp_path / "b", "llama", vocab_size=300, seed=1)
    assert a.get_vocab() == b.get_vocab()
    build_tiny_llama(tmp_path / "a", tmp_path / "m1", "tiny", seed=1)
    build_tiny_llama(tmp_path / "a", tmp_path / "m2", "tiny", seed=1)
    m1 = AutoModelForCausalLM.from_pretrained(tmp_path / "m1")
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "m2")
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(p, q), n
    assert (tmp_path / "m1" / "model.safetensors").exists()
    assert json.loads((tmp_path / "m1" / "tokenizer_config.json").read_text())["legacy"] is True


def test_model_loads_and_runs(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    tok = AutoTokenizer.from_pretrained(llama_dir)
    n = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < n < 3_000_000  # "tiny" ~1.4M with a 4,000-token vocabulary
    out = model(**tok("hello", return_tensors="pt"))
    assert out.logits.shape[-1] == len(tok)


def test_size_presets_span_1m_to_100m():
    from transformers import LlamaConfig

    def count(dims, vocab=4000):
        cfg = LlamaConfig(vocab_size=vocab, num_key_value_heads=dims["num_attention_heads"], **dims)
        h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
        return 2 * vocab * h + n * (4 * h * h + 3 * h * i + 2 * h) + h

    sizes = {k: count(v) for k, v in SIZES.items()}
    assert 1e6 < sizes["tiny"] < 2e6 and 1e7 < sizes["small"] < 3e7 and 7e7 < sizes["base"] < 1.2e8
