"""Layer similarity by angular distance between decoder-layer outputs (FedSODA Algorithm 1)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import nn

from fedsoda.models import decoder_layers, layer_output
from fedsoda.surgery.plan import PruneSettings, PruningPlan, choose_windows


@contextmanager
def capture_layer_outputs(model: nn.Module, indices: Iterable[int]):
    """Record the output of the given decoder layers during forward passes.

    Hooks are used because ``hidden_states[-1]`` of HF models is taken after the final norm.
    Yields a dict ``{index: tensor}`` that each forward pass overwrites.
    """
    layers = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for index in indices:
        def hook(_module, _inputs, output, index=index):
            captured[index] = layer_output(output)
        handles.append(layers[index].register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``arccos(cos(a, b)) / pi`` along the last dimension, in float64."""
    cosine = nn.functional.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12)
    return torch.arccos(cosine.clamp(-1.0, 1.0)) / math.pi


def _per_sample(distance: torch.Tensor, mask: torch.Tensor, token: str) -> torch.Tensor:
    """Reduce token distances ``[B, T]`` to one per sample: last real token, or mean of all."""
    if token == "last":
        last = mask.long().cumsum(dim=1).argmax(dim=1)  # index of the last real token
        return distance.gather(1, last[:, None]).squeeze(1)
    weights = mask.double()
    return (distance * weights).sum(dim=1) / weights.sum(dim=1)


@torch.no_grad()
def window_distances(model: nn.Module, batches: Iterable[dict], n: int, emulator_layers: int,
                     token: str = "last", on_batch: Callable[[int], None] | None = None) -> list[float]:
    """Mean over samples of ``d(l, l+n)`` for every window start ``0 <= l <= L_E-1-n``.

    ``batches`` yields dicts with ``input_ids`` and ``attention_mask``. With ``token="all"``
    each sample's distance is the mean over its real tokens, then samples are averaged.
    ``on_batch(done)`` is told how many batches are done.
    """
    starts = range(emulator_layers - n)
    totals = torch.zeros(len(starts), dtype=torch.float64)
    count = 0
    needed = sorted({i for s in starts for i in (s, s + n)})
    with capture_layer_outputs(model, needed) as outputs:
        for done, batch in enumerate(batches, 1):
            mask = batch["attention_mask"]
            model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False)
            for j, start in enumerate(starts):
                distance = angular_distance(outputs[start], outputs[start + n])
                totals[j] += _per_sample(distance, mask, token).sum()
            count += mask.shape[0]
            if on_batch is not None:
                on_batch(done)
    return (totals / count).tolist()


def similarity_plan(model: nn.Module, batches: list[dict], settings: PruneSettings,
                    model_name: str, model_hash: str = "", data_hash: str = "",
                    on_batch: Callable[[int], None] | None = None) -> PruningPlan:
    """Measure window distances on public batches and choose the groups to prune."""
    num = len(decoder_layers(model))
    settings.check_model(num)
    began = time.perf_counter()
    emulator = num - settings.adapter_layers
    distances = window_distances(model, batches, settings.n, emulator, settings.token, on_batch)
    starts = choose_windows(distances, settings.n, settings.p)
    return PruningPlan(
        model=model_name,
        num_layers=num,
        adapter_layers=settings.adapter_layers,
        n=settings.n,
        p=settings.p,
        token=settings.token,
        samples=sum(len(b["input_ids"]) for b in batches),
        distances=[{"start": s, "end": s + settings.n, "distance": d}
                   for s, d in enumerate(distances)],
        groups=[[s, s + settings.n] for s in starts],
        seconds=time.perf_counter() - began,
        model_hash=model_hash,
        data_hash=data_hash,
    )
