"""Gradient matching: align the emulator so that the adapter learns through the sub-LLM what
it would learn through the full LLM.

ODA distils the emulator's hidden states and output distribution, and the fidelity probe
shows that this leaves the gradient that ranks a task's answers (the option loss's, see
``fedsoda.fidelity``) nearly orthogonal between the two models (README, "Gradient
fidelity"). This aligns that gradient itself: with the adapter LoRA held fixed, the emulator
LoRA of the sub-LLM is trained to maximise the cosine between the option-loss gradient w.r.t.
the adapter LoRA through the sub-LLM and through the full LLM, on task examples no client
holds. Second-order (the loss is a function of a gradient), so each step back-propagates
through a backward pass; the full LLM's gradients are taken once per batch, since the
adapter does not change while the emulator aligns.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fedsoda.fidelity import adapter_gradients, option_loss, ranking_loss
from fedsoda.surgery.lora import layer_of, plain_name, rename_layers, set_trainable

# Batches whose gradients are summed into one matching step: one batch's is too noisy a target.
GROUP = 4


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten().float() for t in tensors])


def match_steps(batches: int, epochs: int, group: int = GROUP) -> int:
    """The optimizer steps ``match_gradients`` takes over ``batches`` batches."""
    return epochs * math.ceil(batches / group)


def match_gradients(teacher: nn.Module, full_layers: list[int], student: nn.Module,
                    adapter_layers: list[int], emulator_layers: list[int], batches: list[dict],
                    option_ids: list[int], lr: float, epochs: int, group: int = GROUP, seed: int = 0,
                    on_step: Callable[[int, int, float], None] | None = None,
                    loss: str = "options") -> dict:
    """Train the student's emulator LoRA (``emulator_layers``) so that its option-loss
    gradient w.r.t. the adapter LoRA (``adapter_layers``, the full LLM's ``full_layers``)
    points where the teacher's does, summed over ``group`` batches a step (one batch's
    gradient is too noisy a target). ``loss``: ``options`` (the option loss) or ``ranking``
    (the pairwise ranking loss, without the option loss's calibration part). Returns the
    cosines by step."""
    if not option_ids:
        raise ValueError("gradient matching needs a task whose options are one token each")
    task_loss = {"options": option_loss, "ranking": ranking_loss}[loss]

    def loss_of(model, batch):
        return task_loss(model, batch, option_ids)

    targets = [adapter_gradients(teacher, full_layers, [batch], loss_of)["grads"]
               for batch in batches]
    rename = dict(zip(adapter_layers, full_layers, strict=True))
    set_trainable(student, [*adapter_layers, *emulator_layers])
    named = [(plain_name(n), p) for n, p in student.named_parameters() if p.requires_grad]
    adapter = [p for n, p in named if layer_of(n) in rename]
    emulator = [p for n, p in named if layer_of(n) not in rename]
    if not emulator or not adapter:
        set_trainable(student, [])
        raise ValueError("gradient matching needs adapter and emulator LoRA on the student")
    order = list(rename_layers({n: p for n, p in named if layer_of(n) in rename}, rename))
    optimizer = torch.optim.AdamW(emulator, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    indices, rng = list(range(len(batches))), random.Random(seed)
    began, cosines = time.perf_counter(), []
    steps = match_steps(len(indices), epochs, group)
    student.eval()  # no dropout: the same function of the weights as the probe's
    try:
        for _ in range(epochs):
            rng.shuffle(indices)
            for start in range(0, len(indices), group):
                picked = indices[start: start + group]
                cosine = _cosine(student, adapter, picked, batches, loss_of,
                                 _flat([sum(targets[i][name] for i in picked) for name in order]))
                if not math.isfinite(cosine.item()):
                    raise FloatingPointError(f"gradient cosine is {cosine.item()} at step "
                                             f"{len(cosines)}")
                optimizer.zero_grad(set_to_none=True)
                with sdpa_kernel(SDPBackend.MATH):
                    (1 - cosine).backward(inputs=emulator)
                optimizer.step()
                cosines.append(cosine.item())
                if on_step is not None:
                    on_step(len(cosines), steps, cosine.item())
    finally:
        set_trainable(student, [])
    return {"steps": len(cosines), "cosines": cosines, "seconds": time.perf_counter() - began}


def _cosine(student, adapter, picked, batches, loss_of, target) -> torch.Tensor:
    """Cosine (with its graph) between the student's adapter gradient summed over the
    ``picked`` batches and ``target``."""
    total = None
    with sdpa_kernel(SDPBackend.MATH):  # CPU flash attention has no second derivative
        for index in picked:
            grads = torch.autograd.grad(loss_of(student, batches[index]), adapter,
                                        create_graph=True)
            flat = _flat(list(grads))
            total = flat if total is None else total + flat
    return torch.nn.functional.cosine_similarity(total, target, dim=0)
