"""Perplexity on WikiText-2: the public-data view of how much a model was damaged.

The local WikiText-2 files drop blank lines, so the text is the non-empty lines joined by
newlines; it is cut into non-overlapping windows of ``seq_len`` tokens.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedsoda.models import unwrap


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, lines: list[str], seq_len: int = 512,
               batch_size: int = 4, max_windows: int | None = None) -> dict:
    ids = tokenizer("\n".join(line.strip() for line in lines), add_special_tokens=False)["input_ids"]
    windows = [ids[i: i + seq_len] for i in range(0, len(ids) - 1, seq_len)]
    windows = [w for w in windows if len(w) == seq_len] or windows[:1]
    if max_windows is not None:
        windows = windows[:max_windows]
    base = unwrap(model)
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = torch.tensor(windows[start: start + batch_size])
        hidden = base.model(input_ids=batch, use_cache=False).last_hidden_state
        logits = base.lm_head(hidden[:, :-1]).float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           batch[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += batch[:, 1:].numel()
    return {"perplexity": math.exp(total / count), "tokens": count, "windows": len(windows),
            "seq_len": seq_len}
