"""Local training of a client: plain functions, no federated runtime (FedAvg is in
``fedsoda.aggregation``).

A client trains only its adapter LoRA on its private examples with the task loss (on answer
tokens) plus the FedProx term ``mu/2 * ||w - w_global||^2``, with AdamW (0.9, 0.95).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Sequence

import torch
from torch import nn

from fedsoda.activation_cache import (
    ActivationCache,
    answer_cross_entropy,
    cached_prefix,
    frozen_fingerprint,
    frozen_split,
    split_answer_loss,
    uncacheable_reason,
)
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


def probe_batches(encoded: list[dict[str, list[int]]], pad_id: int, size: int = 8) -> list[dict]:
    """The similarity probe's inputs (FedPruner): batches of ``size`` examples, no labels."""
    return [{k: v for k, v in collate(encoded[start: start + size], pad_id).items() if k != "labels"}
            for start in range(0, len(encoded), size)]


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over answer tokens; the LM head runs only where labels exist."""
    base = unwrap(model)
    hidden = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        use_cache=False).last_hidden_state
    return answer_cross_entropy(base.lm_head, hidden, batch["labels"])


def proximal_term(params: dict[str, nn.Parameter], anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """``||w - w_global||^2`` over the trainable tensors."""
    return sum(((p - anchor[name]).pow(2).sum() for name, p in params.items()),
               start=torch.zeros(()))


def client_threads() -> int:
    """Intra-op threads for client training: ``FEDSODA_THREADS``, else ``OMP_NUM_THREADS``
    (Ray sets it to a simulated client's CPUs), else the CPUs this process may use that other
    processes leave idle (1-minute load average), at least one.

    More threads than idle cores is far slower than fewer: each of the thousands of small ops
    of a step ends at a barrier that waits for whichever thread the scheduler parked
    (bench/README.md: a FedSODA step took 6x longer on 2 threads than on 1 on 2 busy cores).
    """
    for name in ("FEDSODA_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(name, "").strip().isdigit() and int(os.environ[name]) > 0:
            return int(os.environ[name])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - busy)))


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count (``client_threads()`` unless given); returns it."""
    threads = threads or client_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


class LocalTrainer:
    """A client's local optimisation, built once and stepped many times.

    The frozen layers below the first trainable one run without autograd; with an
    ``ActivationCache`` their output is taken from the cache (see ``fedsoda.activation_cache``).
    """

    def __init__(self, model: nn.Module, layers: list[int], lr: float, mu: float, pad_id: int,
                 cache: ActivationCache | None = None) -> None:
        self.model, self.layers, self.mu, self.pad_id = model, list(layers), mu, pad_id
        set_trainable(model, self.layers)
        self.named = {plain_name(name): p for name, p in model.named_parameters() if p.requires_grad}
        self.anchor = {name: p.detach().clone() for name, p in self.named.items()}
        # foreach: one kernel per op for all LoRA tensors instead of a Python loop over them.
        self.optimizer = torch.optim.AdamW(self.named.values(), lr=lr, betas=(0.9, 0.95),
                                           foreach=True)
        self.split = frozen_split(model, self.layers)
        self.cache = cache if cache is not None and uncacheable_reason(self.split) is None else None
        if self.cache is not None:
            self.cache.bind(frozen_fingerprint(self.split))
        self.device = next(model.parameters()).device
        model.train()

    def batch(self, examples: Sequence[dict[str, list[int]]], picks: list[int]) -> dict:
        batch = collate([examples[i] for i in picks], self.pad_id)
        return {key: value.to(self.device) for key, value in batch.items()}

    def loss(self, batch: dict[str, torch.Tensor], picks: list[int]) -> torch.Tensor:
        """Task loss of one mini-batch (row ``i`` is example ``picks[i]``)."""
        hidden = (cached_prefix(self.split, batch, picks, self.cache)
                  if self.cache is not None else None)
        return split_answer_loss(self.split, batch, hidden)

    def step(self, examples: Sequence[dict[str, list[int]]], picks: list[int]) -> float:
        """One AdamW step on ``examples[picks]``; returns the task loss."""
        task_loss = self.loss(self.batch(examples, picks), picks)
        loss = task_loss + 0.5 * self.mu * proximal_term(self.named, self.anchor) if self.mu \
            else task_loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"client loss is {loss.item()}; lower the learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return task_loss.item()

    def finish(self) -> dict[str, torch.Tensor]:
        """The trained LoRA tensors; the model is left frozen and in eval mode."""
        self.model.eval()
        set_trainable(self.model, [])
        return lora_state(self.model, self.layers)


def local_train(model: nn.Module, layers: list[int], examples: Sequence[dict[str, list[int]]],
                steps: int, batch_size: int, lr: float, mu: float, seed: int,
                pad_id: int, cache: ActivationCache | None = None) -> dict:
    """Train the LoRA of ``layers`` for ``steps`` AdamW steps on random mini-batches.

    ``cache`` (optional) holds the frozen layers' outputs of ``examples`` by index; it must
    belong to this model and these examples. Returns the mean loss, the updated LoRA tensors
    and the time taken.
    """
    if not examples:
        raise ValueError("a client with no examples cannot train")
    began = time.perf_counter()
    trainer = LocalTrainer(model, layers, lr, mu, pad_id, cache)
    rng = random.Random(seed)
    losses = [trainer.step(examples, rng.sample(range(len(examples)), min(batch_size, len(examples))))
              for _ in range(steps)]
    return {"loss": sum(losses) / len(losses), "state": trainer.finish(),
            "seconds": time.perf_counter() - began}

