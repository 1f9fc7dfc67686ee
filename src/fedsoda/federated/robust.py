"""Aggregation that one bad participant cannot take over (``[robust]`` in a run config).

Two defences, both on screened replies:
- **A norm bound.** Each reply's RMS distance from the LoRA it was sent (root mean square
  over the values it holds, so clients holding different layers compare) is set against the
  round's median; a reply more than ``norm_bound`` times that median away is rejected, or
  clipped back to that distance. The median is the lower median: with two replies, a wild
  one never sets the bar itself.
- **A robust rule**, applied to each unit (one layer's attention or MLP LoRA) over the
  replies that hold it, with Flower's aggregation functions: coordinate-wise median,
  trimmed mean, Krum or multi-Krum. FedAvg is ``fedsoda.aggregation.layerwise_fedavg``,
  unchanged, so a run without ``[robust]`` aggregates exactly as before.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import defaultdict

import numpy as np
import torch
from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg

from fedsoda.aggregation import layerwise_fedavg
from fedsoda.federated.robust_settings import RobustSettings
from fedsoda.federated.screening import Reply, block_of
from fedsoda.surgery.lora import layer_of


def rms_distance(update: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    """Root mean square of ``update - base`` over every value ``update`` holds."""
    total = sum(float(((t.double() - base[k].double()) ** 2).sum()) for k, t in update.items())
    count = sum(t.numel() for t in update.values())
    return math.sqrt(total / count) if count else 0.0


def bound_replies(replies: list[Reply], bases: dict[int, dict[str, torch.Tensor]],
                  settings: RobustSettings) -> tuple[list[Reply], dict[int, str]]:
    """The replies the norm bound keeps (clipped ones changed), and why the others were
    rejected, by client. ``bases[client]``: the LoRA that client was sent."""
    if not settings.norm_bound or len(replies) < 2:
        return replies, {}
    distances = [rms_distance(r.update, bases[r.client]) for r in replies]
    median = statistics.median_low(distances)
    if median <= 0:
        return replies, {}
    limit = settings.norm_bound * median
    kept, rejected = [], {}
    for reply, distance in zip(replies, distances, strict=True):
        if distance <= limit:
            kept.append(reply)
        elif settings.norm_action == "clip":
            base, scale = bases[reply.client], limit / distance
            kept.append(dataclasses.replace(reply, update={
                k: base[k] + (t - base[k]) * scale for k, t in reply.update.items()}))
        else:
            rejected[reply.client] = (f"update RMS distance {distance:.3g} is over "
                                      f"{settings.norm_bound:g} x the round's median {median:.3g}")
    return kept, rejected


def _units(state: dict[str, torch.Tensor]) -> dict[tuple[int, str], list[str]]:
    """Tensor names by (layer, block): what a client holds or does not, as a whole."""
    units: dict[tuple[int, str], list[str]] = defaultdict(list)
    for key in state:
        units[(layer_of(key), block_of(key))].append(key)
    return units


def _robust_unit(arrays: list[tuple[list[np.ndarray], int]], settings: RobustSettings) -> list:
    n = len(arrays)
    if settings.rule == "median":
        return aggregate_median(arrays)
    if settings.rule == "trimmed_mean":
        return aggregate_trimmed_avg(arrays, settings.trim)
    keep = 0 if settings.rule == "krum" else (settings.keep or max(1, n - settings.malicious))
    return aggregate_krum(arrays, settings.malicious, min(keep, n))


def aggregate(base: dict[str, torch.Tensor], updates: list[dict[str, torch.Tensor]],
              weights: list[float], settings: RobustSettings) -> dict[str, torch.Tensor]:
    """``base`` with every unit some update holds replaced by the rule's aggregate of the
    updates that hold it (FedAvg: weighted by ``weights``, the example counts)."""
    if settings.rule == "fedavg":
        return layerwise_fedavg(base, updates, weights)
    merged = {k: v.clone() for k, v in base.items()}
    for keys in _units(base).values():
        holders = [(u, w) for u, w in zip(updates, weights, strict=True) if keys[0] in u]
        if not holders:
            continue
        arrays = [([u[k].double().numpy() for k in keys], int(w)) for u, w in holders]
        for key, value in zip(keys, _robust_unit(arrays, settings), strict=True):
            merged[key] = torch.from_numpy(np.asarray(value, dtype=np.float32).copy())
    return merged
