"""HierFedLoRA's joint choice of every group's intra-group aggregation frequency ``tau_m``
and fine-tuning depth ``d_m`` (method notes ``hierfedlora-method.md`` 2.3-2.4; the paper's
formulation could not be recovered, this is the notes' reconstruction).

Time model: one intra-group round of group ``m`` at depth ``d`` takes
``t_m(d) = max_i [E c(d) / v_i + 2 d s / bw_i]`` over its devices (``c(d)``: a local step at
depth ``d`` as measured on this machine, the notes' ``f + d g``; ``v_i``: the device's speed
relative to this machine; ``s``: one layer's LoRA bytes; ``bw_i``: bytes per second).
Progress of group ``m`` in a global round is
``N_m tau_m phi(d_m)``, ``phi(d) = (d / L)^gamma``. With a common deadline ``T`` for the
global round (``tau_m t_m(d_m) <= T``, ``1 <= tau_m <= cap_m``) the rate
``sum_m N_m tau_m phi(d_m) / T`` is maximised exactly on the candidate grid: for a fixed
``T`` the groups are separable, and an optimal ``T`` is one of the ``k t_m(d)``.
The cap falls with the group's non-IID degree: ``cap_m = 1 + floor((tau_max - 1)
max(0, 1 - kl_m / kl_ref))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def depth_grid(num_layers: int, every: bool = False) -> tuple[int, ...]:
    """Candidate depths: ``ceil(L/4), ceil(L/2), ceil(3L/4), L``, or every depth ``1..L``."""
    if num_layers < 1:
        raise ValueError(f"a model has at least one layer, got {num_layers}")
    if every:
        return tuple(range(1, num_layers + 1))
    return tuple(sorted({math.ceil(num_layers * q / 4) for q in (1, 2, 3, 4)}))


def tau_caps(kl: list[float], tau_max: int = 4, kl_ref: float = 0.1) -> list[int]:
    """The most intra-group rounds each group may run, from its KL to the global labels."""
    if tau_max < 1 or kl_ref <= 0:
        raise ValueError(f"need tau_max >= 1 and kl_ref > 0, got {tau_max}, {kl_ref}")
    return [1 + math.floor((tau_max - 1) * max(0.0, 1.0 - k / kl_ref)) for k in kl]


def round_times(step_seconds, speed: np.ndarray, bandwidth: np.ndarray, groups, depths,
                steps: int, layer_bytes: float) -> np.ndarray:
    """``[group, depth]`` seconds of one intra-group round: the slowest member's ``steps``
    local steps at that depth plus its LoRA of ``d`` layers down and up. ``step_seconds[j]``
    is a step at ``depths[j]`` measured on this machine (the notes' ``f + d g``, measured
    rather than modelled); a device of relative ``speed`` takes ``step_seconds / speed``."""
    step_seconds = np.asarray(step_seconds, dtype=float)
    times = np.zeros((len(groups), len(depths)))
    for m, members in enumerate(groups):
        idx = list(members)
        for j, d in enumerate(depths):
            per_device = (steps * step_seconds[j] / speed[idx]
                          + 2 * d * layer_bytes / bandwidth[idx])
            times[m, j] = per_device.max()
    return times


@dataclass(frozen=True)
class Schedule:
    deadline: float  # T, seconds of a global round
    tau: tuple[int, ...]  # intra-group rounds per group
    depth: tuple[int, ...]  # fine-tuned layers per group, counted from the output
    rate: float  # sum_m N_m tau_m phi(d_m) / T


def progress(size: float, tau: int, depth: int, num_layers: int, gamma: float) -> float:
    return size * tau * (depth / num_layers) ** gamma


def solve(times: np.ndarray, sizes, caps, depths, num_layers: int, gamma: float = 0.5,
          fixed_tau: bool = False) -> Schedule:
    """The rate-maximising ``(tau_m, d_m)`` (module docstring). Ties: the larger summed
    depth, then the shorter deadline. ``fixed_tau``: every group runs exactly its cap (the
    fixed-frequency ablation), only depths are chosen."""
    times = np.asarray(times, dtype=float)
    if times.shape != (len(sizes), len(depths)) or (times <= 0).any():
        raise ValueError(f"times must be positive, [groups={len(sizes)}, depths={len(depths)}], "
                         f"got shape {times.shape}")
    # Every group must fit its rounds (one, or exactly its cap) at some depth.
    floor = (times.min(1) * (np.asarray(caps) if fixed_tau else 1)).max()
    candidates = sorted({k * t for t in times.ravel() for k in range(1, max(caps) + 1)
                         if k * t >= floor - 1e-12})
    best = None
    for deadline in candidates:
        tau, depth, total = [], [], 0.0
        for m, size in enumerate(sizes):
            options = []
            for j, d in enumerate(depths):
                fits = math.floor(deadline / times[m, j] + 1e-9)
                if fits >= (caps[m] if fixed_tau else 1):
                    k = min(caps[m], fits)
                    options.append((progress(size, k, d, num_layers, gamma), d, k))
            gain, d, k = max(options)  # ties: the deeper (then larger tau) option
            tau.append(k)
            depth.append(d)
            total += gain
        key = (total / deadline, sum(depth), -deadline)
        if best is None or key > best[0]:
            best = (key, Schedule(deadline=deadline, tau=tuple(tau), depth=tuple(depth),
                                  rate=total / deadline))
    return best[1]


def device_tiers(clients: int, shares, seed: int) -> list[int]:
    """Each device's tier: ``round(share * clients)`` devices per tier (largest remainders
    make up the total), dealt to the devices in a seeded random order, so that tiers do not
    follow the data partition's client order and every method of a seed gets the same."""
    quotas = [share * clients for share in shares]
    counts = [math.floor(q) for q in quotas]
    for t in sorted(range(len(shares)), key=lambda t: (counts[t] - quotas[t], t))[: clients - sum(counts)]:
        counts[t] += 1
    order = np.random.default_rng(seed).permutation(clients)
    tiers = [0] * clients
    dealt = [t for t, count in enumerate(counts) for _ in range(count)]
    for device, tier in zip(order, dealt, strict=True):
        tiers[int(device)] = tier
    return tiers


def round_speeds(base, jitter: float, seed: int, round_number: int) -> np.ndarray:
    """The devices' speeds in one global round: each its tier's speed times a lognormal
    factor of mean 1 and log-sd ``jitter``, seeded by (seed, round)."""
    base = np.asarray(base, dtype=float)
    if jitter == 0:
        return base.copy()
    z = np.random.default_rng([seed, round_number, 7919]).standard_normal(len(base))
    return base * np.exp(jitter * z - jitter**2 / 2)


def device_depth(speed: float, fastest: float, depths) -> int:
    """LEGEND-style depth from capability: the shallowest candidate depth at or above
    ``L * speed / fastest`` (the fastest device fine-tunes every layer)."""
    need = depths[-1] * speed / fastest
    return next(d for d in depths if d >= need - 1e-9)
