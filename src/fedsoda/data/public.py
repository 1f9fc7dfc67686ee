"""Public data for pruning and alignment: WikiText-2 paragraphs (FedSODA section 2)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import torch

from fedsoda.data.sources import read_jsonl, split_file


def is_paragraph(text: str, min_chars: int) -> bool:
    """Real prose: not a ``= Heading =`` line and not a short fragment."""
    stripped = text.strip()
    return len(stripped) >= min_chars and not stripped.startswith("=")


def wikitext_paragraphs(split: str = "validation", data_dir: str | Path | None = None,
                        min_chars: int = 200) -> list[str]:
    """All WikiText-2 paragraphs of a split (offline: validation and test only)."""
    rows = read_jsonl(split_file("wikitext2", split, data_dir), {"text": str})
    return [row["text"].strip() for row in rows if is_paragraph(row["text"], min_chars)]


def sample_paragraphs(paragraphs: list[str], count: int, seed: int = 0) -> list[str]:
    if count > len(paragraphs):
        raise ValueError(f"asked for {count} public samples but only {len(paragraphs)} exist")
    return random.Random(seed).sample(paragraphs, count)


def texts_hash(texts: list[str], seq_len: int) -> str:
    digest = hashlib.sha256(f"seq_len={seq_len}".encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def public_batches(tokenizer, split: str, count: int, seq_len: int, batch_size: int,
                   data_dir: str | Path | None, seed: int) -> tuple[list[dict], str]:
    """``count`` random WikiText-2 paragraphs of ``split`` as batches, and their content hash."""
    texts = sample_paragraphs(wikitext_paragraphs(split, data_dir), count, seed)
    return tokenize_batches(tokenizer, texts, seq_len, batch_size), texts_hash(texts, seq_len)


def tokenize_batches(tokenizer, texts: list[str], seq_len: int, batch_size: int) -> list[dict]:
    """Right-padded ``input_ids``/``attention_mask`` batches, each text cut to ``seq_len``."""
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], max_length=seq_len, truncation=True,
                            padding_side="right",
                            padding=True, return_tensors="pt")
        batches.append({"input_ids": encoded["input_ids"],
                        "attention_mask": encoded["attention_mask"].to(torch.long)})
    return batches
