"""Differential privacy of a client's LoRA update, with Flower's DP helpers, and the privacy
it buys, with Opacus's RDP accountant.

A client's update (trained LoRA minus the LoRA it was sent) is clipped to L2 norm ``C``
(Flower's ``compute_clip_model_update``, the FlatClip of McMahan et al. 2018) and gets
Gaussian noise of std ``sigma * C`` (Flower's ``compute_stdv`` with one client: each client
noises its own update, so the server sees only noised updates). The noise comes from the
operating system's randomness, never from a seed the server knows or chooses: the server
could otherwise draw the same noise and subtract it. A DP run is therefore not reproducible
bit for bit, by design.

Accounting. Neighbouring datasets are any two datasets of one client (replace-one): their
clipped updates can differ by up to ``2C``, so each reply is a Gaussian mechanism of noise
multiplier ``sigma / 2``; a client that sent ``T`` replies has the composition of ``T`` of
them. Against the server, which knows whom it sampled, subsampling amplifies nothing, so the
accountant is stepped with sample rate 1.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import numpy as np
import torch
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv, get_norm
from opacus.accountants import RDPAccountant

from fedsoda.dp_settings import DPSettings
from fedsoda.federated.messages import MessageError


def privatize(trained: dict[str, torch.Tensor], start: dict[str, torch.Tensor],
              settings: DPSettings, seed: int | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """``trained`` with its update from ``start`` clipped to ``settings.clip`` and noised;
    and the update's norm before clipping (for the client's own use: it is not private).

    ``seed`` is for tests only: a run never passes one, so its noise comes from
    ``secrets`` and nobody else can draw it again."""
    names = sorted(trained)
    missing = [n for n in names if n not in start]
    if missing:
        raise MessageError(f"no LoRA was sent for trained tensors {missing[:2]}")
    params = [trained[n].detach().cpu().float().numpy().copy() for n in names]
    sent = [start[n].detach().cpu().float().numpy() for n in names]
    norm = get_norm([p - s for p, s in zip(params, sent, strict=True)])
    if norm > 0:  # Flower's clip divides by the norm; a zero update needs no clipping
        compute_clip_model_update(params, sent, settings.clip)
    std = compute_stdv(settings.noise, settings.clip, 1)
    generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
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
    for _ in range(releases):  # sensitivity 2C (replace-one): the multiplier is sigma / 2
        accountant.step(noise_multiplier=settings.noise / 2, sample_rate=1.0)
    return float(accountant.get_epsilon(settings.delta))


RELEASES = "dp_releases.json"


def save_releases(out: Path, releases: dict[str, int]) -> None:
    """The updates each client sent so far, written (atomically) as soon as a round's replies
    are in: a round that crashes or stops before its checkpoint still spent them."""
    tmp = out / (RELEASES + ".tmp")
    tmp.write_text(json.dumps(releases, sort_keys=True))
    tmp.replace(out / RELEASES)


def merged_releases(releases: dict[str, int], out: Path) -> dict[str, int]:
    """The checkpoint's counts, raised to what ``save_releases`` last wrote (never lowered)."""
    path = out / RELEASES
    saved = json.loads(path.read_text()) if path.exists() else {}
    return {pid: max(releases.get(pid, 0), int(saved.get(pid, 0)))
            for pid in sorted(set(releases) | set(saved))}
