"""Differential privacy of a client's LoRA update, with Flower's DP helpers, and the privacy
it buys, with Opacus's RDP accountant.

A client's update (trained LoRA minus the LoRA it was sent) is clipped to L2 norm ``C``
(Flower's ``compute_clip_model_update``, the FlatClip of McMahan et al. 2018) and gets
Gaussian noise of std ``sigma * C`` (Flower's ``compute_stdv`` with one client: each client
noises its own update, so the server sees only noised updates). Each reply is then one
Gaussian mechanism of noise multiplier ``sigma`` on that client's data; a client that sent
``T`` replies has the composition of ``T`` of them. Against the server, which knows who it
sampled, there is no amplification by subsampling, so the accountant is stepped with
sample rate 1.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv, get_norm
from opacus.accountants import RDPAccountant

from fedsoda.dp_settings import DPSettings


def privatize(trained: dict[str, torch.Tensor], start: dict[str, torch.Tensor],
              settings: DPSettings, seed: int) -> tuple[dict[str, torch.Tensor], float]:
    """``trained`` with its update from ``start`` clipped to ``settings.clip`` and noised;
    and the update's norm before clipping. The noise is drawn from a generator seeded with
    ``seed`` (Flower's own helper draws from numpy's global state), so a run stays
    reproducible bit for bit."""
    names = sorted(trained)
    missing = [n for n in names if n not in start]
    if missing:
        raise KeyError(f"no LoRA was sent for trained tensors {missing[:2]}")
    params = [trained[n].detach().cpu().float().numpy().copy() for n in names]
    sent = [start[n].detach().cpu().float().numpy() for n in names]
    norm = get_norm([p - s for p, s in zip(params, sent, strict=True)])
    if norm > 0:  # Flower's clip divides by the norm; a zero update needs no clipping
        compute_clip_model_update(params, sent, settings.clip)
    std = compute_stdv(settings.noise, settings.clip, 1)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, array in zip(names, params, strict=True):
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if std > 0:
            tensor = tensor + torch.randn(tensor.shape, generator=generator) * std
        out[name] = tensor
    return out, norm


def epsilon(settings: DPSettings, releases: int) -> float:
    """Epsilon at ``settings.delta`` for a client that sent ``releases`` noised updates
    (infinite without noise, 0 for a client that sent none)."""
    if releases == 0:
        return 0.0
    if settings.noise == 0:
        return float("inf")
    accountant = RDPAccountant()
    for _ in range(releases):
        accountant.step(noise_multiplier=settings.noise, sample_rate=1.0)
    return float(accountant.get_epsilon(settings.delta))
