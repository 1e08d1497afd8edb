"""Shared fixtures: tiny tokenizers trained on the shared data, built once and cached."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from fastchat_data.tiny import reference_corpus, shared_data_dir, tiny_model

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"  # persistent across local runs; a fresh CI clone builds anew
DATA = shared_data_dir()

requires_shared = pytest.mark.skipif(not DATA.exists(), reason=f"shared data not found at {DATA}")


def pytest_configure(config):
    """Under xdist the workers share the cores (three on two, see the Makefile): one thread
    each, as train_utils.env() gives the processes the tests start. With torch's default of
    one thread a core, the in-process files (test_trainer_parity, test_attention, test_loss,
    test_compile) took 9-20% more CPU and 11-20% more time: threads waiting on cores that other
    workers held."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"  # read when torch is imported; inherited by children
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.exists():
        pytest.fail(
            f"the shared data folder {DATA} is missing (CI puts ../shared beside the checkout)"
        )
    return DATA


@pytest.fixture(scope="session")
def corpus(data_dir) -> list[str]:
    return reference_corpus(data_dir)


def _model(flavour: str, corpus) -> Path:
    return tiny_model(flavour, "tiny", texts=corpus, vocab_size=4000, cache_dir=CACHE)


@pytest.fixture(scope="session")
def llama_dir(corpus) -> Path:
    """Llama-style SentencePiece tokenizer, legacy=True (FastChat's case), with a tiny Llama."""
    return _model("llama", corpus)


@pytest.fixture(scope="session")
def llama_nonlegacy_dir(corpus) -> Path:
    return _model("llama-nonlegacy", corpus)


@pytest.fixture(scope="session")
def chatml_dir(corpus) -> Path:
    """Byte-level BPE tokenizer with a ChatML chat template, with a tiny Llama."""
    return _model("chatml", corpus)


@pytest.fixture(scope="session")
def tokenizers(llama_dir, llama_nonlegacy_dir, chatml_dir) -> dict:
    """flavour -> (loaded tokenizer, template name)."""
    from transformers import AutoTokenizer

    return {
        "llama": (AutoTokenizer.from_pretrained(llama_dir), "vicuna_v1.1"),
        "llama-nonlegacy": (AutoTokenizer.from_pretrained(llama_nonlegacy_dir), "vicuna_v1.1"),
        "chatml": (AutoTokenizer.from_pretrained(chatml_dir), "chat_template"),
    }


@pytest.fixture(scope="session", autouse=True)
def remove_leftover_deepspeed_buffers():
    """Runs killed on purpose (kill -9 tests) cannot remove DeepSpeed's /dev/shm buffers
    themselves (recipes/core/distributed.py does at a normal exit): remove what this session
    left, so a long suite never fills memory with them."""
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*")) if shm.exists() else set()
    yield
    for path in set(shm.glob("deepspeed_allreduce_buffer_*")) - before if shm.exists() else []:
        path.unlink(missing_ok=True)
