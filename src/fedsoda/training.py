"""Local training of a client and FedAvg: plain functions, no federated runtime.

A client trains only its adapter LoRA on its private examples with the task loss (on answer
tokens) plus the FedProx term ``mu/2 * ||w - w_global||^2``, with AdamW (0.9, 0.95).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fedsoda.data.task import IGNORE_INDEX
from fedsoda.models import unwrap
from fedsoda.surgery.lora import lora_state, plain_name, set_trainable


def collate(encoded: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (padding ignored)."""
    width = max(len(e["input_ids"]) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, example in enumerate(encoded):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over answer tokens; the LM head runs only where labels exist."""
    base = unwrap(model)
    hidden = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    where = targets != IGNORE_INDEX
    logits = base.lm_head(hidden[:, :-1][where]).float()
    return F.cross_entropy(logits, targets[where])


def proximal_term(params: dict[str, nn.Parameter], anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """``||w - w_global||^2`` over the trainable tensors."""
    return sum(((p - anchor[name]).pow(2).sum() for name, p in params.items()),
               start=torch.zeros(()))


def local_train(model: nn.Module, layers: list[int], examples: Sequence[dict[str, list[int]]],
                steps: int, batch_size: int, lr: float, mu: float, seed: int,
                pad_id: int) -> dict:
    """Train the LoRA of ``layers`` for ``steps`` AdamW steps on random mini-batches.

    Returns the mean loss, the updated LoRA tensors and the time taken.
    """
    if not examples:
        raise ValueError("a client with no examples cannot train")
    set_trainable(model, layers)
    named = {plain_name(name): p for name, p in model.named_parameters() if p.requires_grad}
    anchor = {name: p.detach().clone() for name, p in named.items()}
    optimizer = torch.optim.AdamW(named.values(), lr=lr, betas=(0.9, 0.95))
    rng = random.Random(seed)
    began, losses = time.perf_counter(), []
    model.train()
    for _ in range(steps):
        picks = rng.sample(range(len(examples)), min(batch_size, len(examples)))
        batch = collate([examples[i] for i in picks], pad_id)
        task_loss = answer_loss(model, batch)
        loss = task_loss + 0.5 * mu * proximal_term(named, anchor) if mu else task_loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"client loss is {loss.item()}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(task_loss.item())
    model.eval()
    set_trainable(model, [])
    return {"loss": sum(losses) / len(losses), "state": lora_state(model, layers),
            "seconds": time.perf_counter() - began}


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Average of tensor dicts weighted by ``weights`` (client example counts)."""
    if not states or len(states) != len(weights) or sum(weights) <= 0:
        raise ValueError("FedAvg needs at least one state and positive total weight")
    total = float(sum(weights))
    return {key: sum((s[key].double() * (w / total) for s, w in zip(states, weights, strict=True)),
                     start=torch.zeros_like(states[0][key], dtype=torch.float64)).float()
            for key in states[0]}
