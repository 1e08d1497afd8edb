"""Tiny tokenizers and Llama models built locally (no hub is reachable), for demos, tests and
benchmarks only: no training or data code imports this module.

Two tokenizer flavours, because masking bugs hide in their difference:
- "llama": SentencePiece BPE with byte fallback and <unk>/<s>/</s>, loaded as transformers'
  LlamaTokenizer; `legacy=True` (Llama-1/2, FastChat's case) or `legacy=False`.
- "chatml": byte-level BPE with a ChatML chat template (the Llama-3 / Qwen case).
Everything is written with `save_pretrained` and must load back through `from_pretrained`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .io import default_cache_dir, replace_dir_atomic, save_tokenizer

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# name -> LlamaConfig overrides; parameter counts are for a 4,000-token vocabulary.
SIZES = {
    "tiny": dict(
        hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4
    ),  # ~1.4M
    "small": dict(
        hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6
    ),  # ~17M
    "base": dict(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12
    ),  # ~91M
}
FLAVOURS = ("llama", "llama-nonlegacy", "chatml")


def _shuffled(texts: Iterable[str], seed: int) -> list[str]:
    texts = [t for t in texts if t and t.strip()]
    random.Random(seed).shuffle(texts)
    return texts


def train_llama_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 4000,
    *,
    legacy: bool = True,
    seed: int = 0,
):
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaTokenizer

    model = io.BytesIO()
    # Llama's own SentencePiece settings: BPE, byte fallback, split digits, no normalization.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_shuffled(texts, seed)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=0.9995,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        num_threads=1,
        shuffle_input_sentence=False,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as spdir:
        Path(spdir, "tokenizer.model").write_bytes(model.getvalue())
        tok = LlamaTokenizer.from_pretrained(spdir, legacy=legacy, add_bos_token=True)
    save_tokenizer(tok, out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def train_chatml_tokenizer(
    texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 4000, *, seed: int = 0
):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_shuffled(texts, seed), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def train_tokenizer(
    texts: Iterable[str], out_dir, flavour: str = "llama", *, vocab_size: int = 4000, seed: int = 0
):
    if flavour == "chatml":
        return train_chatml_tokenizer(texts, out_dir, vocab_size, seed=seed)
    if flavour in ("llama", "llama-nonlegacy"):
        return train_llama_tokenizer(
            texts, out_dir, vocab_size, legacy=flavour == "llama", seed=seed
        )
    raise ValueError(f"unknown tokenizer flavour {flavour!r}; choose from {', '.join(FLAVOURS)}")


def build_tiny_llama(
    tokenizer_dir,
    out_dir,
    size: str | dict = "tiny",
    *,
    seed: int = 0,
    max_position_embeddings: int = 2048,
):
    """A randomly initialised Llama sized for `tokenizer_dir`, saved (with the tokenizer) to
    `out_dir`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    dims = dict(SIZES[size] if isinstance(size, str) else size)
    dims.setdefault("num_key_value_heads", dims["num_attention_heads"])
    config = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        **dims,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(tok, out_dir)
    return out_dir


def corpus_texts(records: Iterable[dict]) -> list[str]:
    """Text of ShareGPT-style records, to train a tokenizer on."""
    texts = []
    for rec in records:
        for turn in rec.get("conversations", []):
            if isinstance(turn.get("value"), str):
                texts.append(turn["value"])
    return texts


def tiny_model(
    flavour: str = "llama",
    size: str = "tiny",
    texts: Iterable[str] | None = None,
    *,
    vocab_size: int = 4000,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Build (or reuse from the cache) a tiny model + tokenizer folder; returns its path.

    The cache key covers every input, so a changed corpus or size builds a new folder.
    """
    if texts is None:
        from .identity import identity_conversations

        texts = corpus_texts(identity_conversations(n=400, seed=seed))
    texts = list(texts)
    key = hashlib.sha256(
        json.dumps(
            [flavour, size, vocab_size, seed, SIZES.get(size) if isinstance(size, str) else size]
        ).encode()
        + hashlib.sha256("\x00".join(texts).encode()).digest()
    ).hexdigest()[:16]
    name = f"{flavour}-{size if isinstance(size, str) else 'custom'}-{key}"
    out = Path(cache_dir or default_cache_dir()) / "tiny" / name
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tok_dir = Path(tmp) / "tokenizer"
        train_tokenizer(texts, tok_dir, flavour, vocab_size=vocab_size, seed=seed)
        build_tiny_llama(tok_dir, Path(tmp) / "model", size, seed=seed)
        replace_dir_atomic(Path(tmp) / "model", out)
    return out


TEMPLATE_WORDS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT:",
    "### Instruction: ### Response: ### Human: ### Assistant:",
]


def shared_data_dir(chosen: str | os.PathLike | None = None) -> Path:
    """The shared data folder: `chosen` (a --data_dir given), else $CAMELID_SHARED_DATA, else
    `../shared/data` beside the checkout (CI puts it there)."""
    if chosen:
        return Path(chosen)
    env = os.environ.get("CAMELID_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def reference_corpus(data_dir: str | os.PathLike | None = None, per_file: int = 1500) -> list[str]:
    """A deterministic text sample of the shared data (English, Chinese, code) plus the template
    words, to train the tokenizers that tests and benchmarks share."""
    from .formats import iter_conversations
    from .report import Report

    data_dir = shared_data_dir(data_dir)
    texts = list(TEMPLATE_WORDS) * 20
    for name in (
        "alpaca_data.json",
        "sharegpt_v3_sample_1000.json",
        "sharegpt_gpt4_zh_1k.jsonl",
        "alpaca_gpt4_data_zh_1k.json",
    ):
        for i, (_, conv) in enumerate(iter_conversations(data_dir / name, Report("corpus"))):
            if i >= per_file:
                break
            texts += [m.content for m in conv.messages]
    return texts
