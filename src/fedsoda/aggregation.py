"""Aggregation of client LoRA updates: plain functions over tensor dicts, no runtime.

``fedavg`` averages updates that all hold the same tensors. ``layerwise_fedavg`` is the rule
for heterogeneous clients (FedRA, FedPruner, HierFedLoRA): each tensor is averaged over the
replies that contain it, weighted by their example counts, and a tensor no reply contains
keeps its global value. With every reply holding every tensor the two are the same,
bit for bit.
"""

from __future__ import annotations

import torch


def _weighted_mean(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    # Accumulated in float64 in the given order (the caller fixes it: bitwise reproducible).
    total = float(sum(weights))
    return sum((t.double() * (w / total) for t, w in zip(tensors, weights, strict=True)),
               start=torch.zeros_like(tensors[0], dtype=torch.float64)).float()


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Average of tensor dicts weighted by ``weights`` (client example counts)."""
    if not states or len(states) != len(weights) or sum(weights) <= 0:
        raise ValueError("FedAvg needs at least one state and positive total weight")
    return {key: _weighted_mean([s[key] for s in states], weights) for key in states[0]}


def layerwise_fedavg(global_state: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]],
                     weights: list[float]) -> dict[str, torch.Tensor]:
    """Per tensor of ``global_state``: the weighted mean over the ``states`` holding it, or the
    global value if none does. A key in a state but not in ``global_state`` is an error
    (screening rejects such replies first)."""
    if len(states) != len(weights) or any(w <= 0 for w in weights):
        raise ValueError("layer-wise FedAvg needs one positive weight per state")
    unknown = sorted({key for s in states for key in s} - set(global_state))
    if unknown:
        raise KeyError(f"tensors not in the global state: {unknown[:3]}")
    merged = {}
    for key, value in global_state.items():
        held = [(s[key], w) for s, w in zip(states, weights, strict=True) if key in s]
        merged[key] = (_weighted_mean([t for t, _ in held], [w for _, w in held]) if held
                       else value.clone())
    return merged
