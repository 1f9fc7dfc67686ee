"""Near-IID client groups for HierFedLoRA (method notes ``hierfedlora-method.md`` 2.2; the
paper's grouping algorithm could not be recovered, this is the notes' reconstruction).

Each client declares a label histogram (``n_i q_i``). A group's pooled distribution is
``q_G = sum n_i q_i / N_G`` and its non-IID degree ``KL(q_G || q)`` against the global ``q``
(additive smoothing ``eps`` before normalising). The grouping minimises the largest degree
(ties: their sum): clients go, largest first, to the group whose degree they raise least
(groups hold at most ``ceil(N / M)``), then pairwise swaps between groups run while one
lowers ``max(d_a, d_b)`` (or keeps it and lowers ``d_a + d_b``), up to ``passes`` passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

EPS = 1e-6


def kl_to(counts: np.ndarray, reference: np.ndarray, eps: float = EPS) -> float:
    """``KL(p || q)`` in nats of the distributions of two count (or probability) vectors,
    each smoothed by ``eps`` and normalised."""
    p = np.asarray(counts, dtype=float) + eps
    q = np.asarray(reference, dtype=float) + eps
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


@dataclass(frozen=True)
class Grouping:
    groups: tuple[tuple[int, ...], ...]  # client ids per group, ascending
    kl: tuple[float, ...]  # each group's KL(q_G || q), nats

    @property
    def worst(self) -> float:
        return max(self.kl)


def _check(histograms, m: int) -> np.ndarray:
    counts = np.asarray(histograms, dtype=float)
    if counts.ndim != 2 or len(counts) < 1 or (counts < 0).any():
        raise ValueError("label histograms must be a [clients, classes] array of counts >= 0")
    if not 1 <= m <= len(counts):
        raise ValueError(f"groups must be between 1 and the {len(counts)} clients, got {m}")
    return counts


def grouping_of(counts: np.ndarray, groups) -> Grouping:
    """The groups (sorted) and their degrees."""
    total = counts.sum(0)
    groups = tuple(tuple(sorted(g)) for g in groups)
    return Grouping(groups=groups, kl=tuple(kl_to(counts[list(g)].sum(0), total) for g in groups))


def near_iid_groups(histograms, m: int, passes: int = 20) -> Grouping:
    """``m`` groups of clients whose pooled label distributions are closest to the global
    one: greedy min-KL assignment, then pairwise swaps (module docstring)."""
    counts = _check(histograms, m)
    total, cap = counts.sum(0), math.ceil(len(counts) / m)
    sizes = counts.sum(1)
    alone = [kl_to(c, total) for c in counts]
    order = sorted(range(len(counts)), key=lambda i: (-sizes[i], -alone[i], i))
    members: list[list[int]] = [[] for _ in range(m)]
    pooled = np.zeros((m, counts.shape[1]))
    for i in order:
        open_groups = [g for g in range(m) if len(members[g]) < cap]
        best = min(open_groups, key=lambda g: (kl_to(pooled[g] + counts[i], total), len(members[g]), g))
        members[best].append(i)
        pooled[best] += counts[i]
    for _ in range(passes):
        if not _swap_pass(counts, total, members, pooled):
            break
    return grouping_of(counts, members)


def _swap_pass(counts, total, members, pooled) -> bool:
    """One pass over every pair of clients in different groups; True if any swap was made."""
    swapped = False
    degree = [kl_to(p, total) for p in pooled]
    for a in range(len(members)):
        for b in range(a + 1, len(members)):
            for i in list(members[a]):
                for j in list(members[b]):
                    if i not in members[a] or j not in members[b]:
                        continue
                    new_a = pooled[a] - counts[i] + counts[j]
                    new_b = pooled[b] - counts[j] + counts[i]
                    da, db = kl_to(new_a, total), kl_to(new_b, total)
                    before, after = max(degree[a], degree[b]), max(da, db)
                    if after < before - 1e-12 or (after <= before + 1e-12
                                                  and da + db < degree[a] + degree[b] - 1e-12):
                        members[a][members[a].index(i)], members[b][members[b].index(j)] = j, i
                        pooled[a], pooled[b], degree[a], degree[b] = new_a, new_b, da, db
                        swapped = True
    return swapped


def random_groups(histograms, m: int, seed: int) -> Grouping:
    """The ablation: clients dealt into ``m`` groups of near-equal size in a seeded random order."""
    counts = _check(histograms, m)
    order = np.random.default_rng(seed).permutation(len(counts))
    return grouping_of(counts, [order[g::m].tolist() for g in range(m)])


def noisy_histograms(histograms, scale: float, seed: int) -> np.ndarray:
    """Label histograms with Laplace noise of ``scale`` added to every count (clipped at 0),
    for clients that do not reveal exact counts; ``scale = 0`` returns them unchanged."""
    counts = np.asarray(histograms, dtype=float)
    if scale < 0:
        raise ValueError(f"the Laplace noise scale must be >= 0, got {scale}")
    if scale == 0:
        return counts
    noise = np.random.default_rng(seed).laplace(0.0, scale, size=counts.shape)
    return np.clip(counts + noise, 0.0, None)
