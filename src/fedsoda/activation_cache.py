"""Train a client's adapter without re-running its frozen emulator: the split and the cache.

A client trains the LoRA of its adapter layers only. Everything below the first trainable
layer (the sub-emulator, with the server's emulator LoRA) is frozen, so

- it runs under ``torch.no_grad`` (no autograd graph, no saved activations), and
- its output for an example, the hidden state entering the first adapter layer, is the same
  every time the example is drawn until the emulator LoRA changes (a realignment). The
  :class:`ActivationCache` keeps these hidden states per example; a cached step runs only the
  adapter layers, the final norm and the LM head (as ``align.oda.teacher_logits`` runs a
  teacher's tail from cached activations).

The cache is keyed by a fingerprint of the frozen layers' LoRA tensors, so any emulator LoRA
update invalidates it. It keeps at most ``max_bytes`` in memory and spills the rest to disk
(up to ``max_disk_bytes``) when given a folder; beyond both budgets it stops caching and the
prefix is simply run again.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from fedsoda.data.task import IGNORE_INDEX
from fedsoda.models import decoder_layers, num_layers, unwrap
from fedsoda.surgery.lora import lora_state
from fedsoda.surgery.subllm import keep_layers

MiB = 2**20


@dataclass(frozen=True)
class FrozenSplit:
    """A client model cut below its first trainable layer; both parts share its modules."""

    model: nn.Module  # the (PEFT-wrapped) client model
    first_trainable: int  # layers 0..first_trainable-1 are frozen
    prefix: nn.Module | None  # causal LM view of the frozen layers, final norm removed
    tail: nn.Module  # causal LM view of the layers from first_trainable on

    @property
    def frozen_layers(self) -> list[int]:
        return list(range(self.first_trainable))


def frozen_split(model: nn.Module, trainable_layers: list[int]) -> FrozenSplit:
    """Views of ``model`` below and from its lowest trainable layer (built once, not per step)."""
    if not trainable_layers:
        raise ValueError("a client model needs at least one trainable layer")
    first, total = min(trainable_layers), num_layers(model)
    if first == 0:  # FedPETuning, FedOT: the first layer trains, nothing below is frozen
        return FrozenSplit(model=model, first_trainable=0, prefix=None, tail=unwrap(model))
    prefix = keep_layers(model, list(range(first)), share=True)
    prefix.model.norm = nn.Identity()  # the adapter's input is the raw layer output
    tail = keep_layers(model, list(range(first, total)), share=True)
    return FrozenSplit(model=model, first_trainable=first, prefix=prefix, tail=tail)


def run_prefix(split: FrozenSplit, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Output of the last frozen layer, ``[B, T, H]``, without an autograd graph."""
    with torch.no_grad():
        return split.prefix.model(input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"],
                                  use_cache=False).last_hidden_state


def answer_cross_entropy(lm_head: nn.Module, last_hidden: torch.Tensor,
                         labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of next-token predictions at answer tokens; the LM head runs only
    there (the rest of the sequence has no label)."""
    targets = labels[:, 1:]
    where = targets != IGNORE_INDEX
    logits = lm_head(last_hidden[:, :-1][where]).float()
    return F.cross_entropy(logits, targets[where])


def split_answer_loss(split: FrozenSplit, batch: dict[str, torch.Tensor],
                      hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over answer tokens; the tail starts from ``hidden`` when given.

    Same value as ``training.answer_loss`` on the whole model. The LM head runs only where
    labels exist.
    """
    mask = batch["attention_mask"]
    if split.prefix is None:
        out = split.tail.model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False)
    else:
        hidden = run_prefix(split, batch) if hidden is None else hidden
        out = split.tail.model(inputs_embeds=hidden, attention_mask=mask, use_cache=False)
    return answer_cross_entropy(split.tail.lm_head, out.last_hidden_state, batch["labels"])


def uncacheable_reason(split: FrozenSplit) -> str | None:
    """Why the frozen prefix's output is not a function of the input alone (or None)."""
    if split.prefix is None:
        return "no frozen layers below the first trainable layer"
    if getattr(unwrap(split.model).config, "attention_dropout", 0.0):
        return "attention dropout is on"
    for layer in decoder_layers(split.model)[: split.first_trainable]:
        if any(isinstance(m, nn.Dropout) and m.p > 0 for m in layer.modules()):
            return "a frozen layer has dropout (LoRA dropout > 0)"
    return None


def frozen_fingerprint(split: FrozenSplit) -> str:
    """Hash of what can change in the frozen layers: their (emulator) LoRA tensors.

    The base weights of a client model never change, so a new fingerprint means a new
    emulator LoRA (a realignment) and every cached activation is stale.
    """
    digest = hashlib.sha256(f"first_trainable={split.first_trainable}".encode())
    for name, tensor in sorted(lora_state(split.model, split.frozen_layers).items()):
        digest.update(name.encode() + b"\0")
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


class ActivationCache:
    """Per-example outputs of the frozen prefix (real tokens only), for one emulator state."""

    def __init__(self, max_bytes: int = 256 * MiB, spill_dir: Path | str | None = None,
                 max_disk_bytes: int = 4096 * MiB) -> None:
        self.max_bytes, self.max_disk_bytes = max_bytes, max_disk_bytes
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        if self.spill_dir is not None and self.spill_dir.exists():
            shutil.rmtree(self.spill_dir)  # left by an earlier process; its index is gone
        self.fingerprint: str | None = None
        self._memory: dict[int, torch.Tensor] = {}
        self._disk: dict[int, Path] = {}
        self.memory_bytes = self.disk_bytes = 0
        self.hits = self.misses = self.invalidations = 0

    def __len__(self) -> int:
        return len(self._memory) + len(self._disk)

    def bind(self, fingerprint: str) -> None:
        """Use the cache for the emulator state ``fingerprint``; a different one empties it."""
        if fingerprint != self.fingerprint:
            if self.fingerprint is not None:
                self.invalidate()
            self.fingerprint = fingerprint

    def invalidate(self) -> None:
        """Forget every activation (the emulator LoRA changed)."""
        self._memory.clear()
        self._disk.clear()
        if self.spill_dir is not None and self.spill_dir.exists():
            shutil.rmtree(self.spill_dir)
        self.memory_bytes = self.disk_bytes = 0
        self.fingerprint = None
        self.invalidations += 1

    def get(self, key: int) -> torch.Tensor | None:
        if key in self._memory:
            return self._memory[key]
        if key in self._disk:
            return torch.load(self._disk[key], weights_only=True)
        return None

    def put(self, key: int, hidden: torch.Tensor) -> bool:
        """Keep ``hidden`` for example ``key``; False if both budgets are full."""
        size = hidden.numel() * hidden.element_size()
        if self.memory_bytes + size <= self.max_bytes:
            self._memory[key] = hidden
            self.memory_bytes += size
            return True
        if self.spill_dir is not None and self.disk_bytes + size <= self.max_disk_bytes:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            path = self.spill_dir / f"{key}.pt"
            torch.save(hidden.cpu(), path)
            self._disk[key] = path
            self.disk_bytes += size
            return True
        return False

    def stats(self) -> dict[str, int]:
        return {"entries": len(self), "hits": self.hits, "misses": self.misses,
                "memory_bytes": self.memory_bytes, "disk_bytes": self.disk_bytes,
                "invalidations": self.invalidations}


def cached_prefix(split: FrozenSplit, batch: dict[str, torch.Tensor], keys: list[int],
                  cache: ActivationCache) -> torch.Tensor:
    """The prefix output for ``batch`` (row ``i`` is example ``keys[i]``), from the cache where
    it holds the example and by running the prefix on each missing example alone otherwise
    (so the result does not depend on what the cache held).

    Rows are right-padded; positions past an example's length are zeros, which the attention
    mask hides from every real token, so the loss equals the uncached one.
    """
    mask = batch["attention_mask"]
    lengths = mask.sum(dim=1).tolist()
    rows: list[torch.Tensor | None] = [cache.get(key) for key in keys]
    missing = [i for i, row in enumerate(rows) if row is None]
    cache.hits += len(keys) - len(missing)
    cache.misses += len(missing)
    for i in missing:
        # Each missing example runs alone, unpadded: a batch's kernels (their blocking, the
        # padded width, the companions) change the last bits of every row, so an activation
        # computed within whichever rows happened to miss would make the cache's content,
        # and every later step, depend on the cache's history (in simulation: on which actor
        # served the client before). Alone, an example's activation is a function of the
        # example and the emulator only, and a run is bitwise reproducible.
        n = lengths[i]
        rows[i] = run_prefix(split, {"input_ids": batch["input_ids"][i: i + 1, :n],
                                     "attention_mask": mask[i: i + 1, :n]})[0].clone()
        cache.put(keys[i], rows[i])
    device = mask.device
    hidden = torch.zeros((len(keys), mask.shape[1], rows[0].shape[-1]), dtype=rows[0].dtype,
                         device=device)
    for i, row in enumerate(rows):
        hidden[i, : lengths[i]] = row.to(device)
    return hidden
