"""Tiny random models of each supported family, and paths to the shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

FAMILY_CONFIGS = {
    "llama": {},
    "qwen2": {},
    "mistral": {"sliding_window": 16},
    "gemma3_text": {"sliding_window": 8, "head_dim": 16, "query_pre_attn_scalar": 16},
}


def tiny_model(family: str = "llama", layers: int = 10, seed: int = 0, vocab: int = 96):
    """A randomly initialised causal LM small enough to train in a test (hidden 32)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        family, vocab_size=vocab, hidden_size=32, intermediate_size=64,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, tie_word_embeddings=True, **FAMILY_CONFIGS[family])
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def random_batches(count: int = 2, batch: int = 3, seq: int = 12, vocab: int = 96, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (batch, seq), generator=generator)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq - 4:] = 0  # one right-padded row
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test writes caches under a temporary folder unless FEDSODA_CACHE is set."""
    if not os.environ.get("FEDSODA_TEST_SHARED_CACHE"):
        monkeypatch.setenv("FEDSODA_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not present")
    return SHARED_DATA


def save_tiny_model_dir(folder: Path, family: str = "llama", layers: int = 10,
                        extra_words: tuple[str, ...] = ()) -> Path:
    """A tiny model folder with a word-level tokenizer, loadable by ``fedsoda.models.load``;
    ``extra_words`` join its vocabulary (SST-2's answers, for an option loss)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["the", "of", "and", "in", "to", "a", "was", "is", "for", "on", "as", "with", "by",
             "he", "at", "that", "from", "his", "it", "an", "were", "are", "which", "this",
             *extra_words]
    vocab = {token: i for i, token in enumerate(["<unk>", "<pad>", "<eos>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        pad_token="<pad>", eos_token="<eos>")
    tiny_model(family, layers=layers).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny_probe_setup(tiny_model_dir, shared_data, tmp_path, monkeypatch) -> tuple[Path, dict]:
    """The tiny model (10 layers) as a layered folder and the probe settings the real-peak
    tests measure with: one thread per probe process, a batch of 32 x 64 tokens (a layer's
    cost, a few MiB, stands above the probe's run-to-run spread)."""
    from fedsoda.models import load
    from fedsoda.surgery.layered import save_layered

    monkeypatch.setenv("FEDSODA_THREADS", "1")
    model, tokenizer = load(str(tiny_model_dir))
    folder = save_layered(model, tmp_path / "layered", tokenizer)
    return folder, {"task": "sst2", "batch_size": 32, "max_tokens": 64, "data_dir": str(shared_data)}
