"""FedPruner's macro and micro steps: layers into groups, then one representative per group.

Method notes (``papers/fedpruner-method.md``), sections 2.3 and 2.4:
- ``spectral_groups``: the paper's graph partition of the complete layer graph weighted by
  the similarity (CKA) through the Laplacian ``L = D - W`` and its eigendecomposition;
- ``contiguous_groups``: the notes' default, runs of consecutive layers that minimise the
  kernel k-means within-group scatter, by an exact dynamic programme;
- ``selection_probabilities`` and ``select_representatives``: importance-aware selection of
  exactly one layer per group.

Groups are lists of full-model layer indices, sorted within, and the groups are sorted by
their first layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

SELECTION_RULES = ("proportional", "softmax")
SELECTION_MODES = ("argmax", "sample")


def spectral_groups(similarity, k: int, seed: int = 0, restarts: int = 10) -> list[list[int]]:
    """Partition the layers into ``k`` groups by normalised spectral clustering.

    ``W`` is the similarity without its diagonal, ``D`` its degrees and ``L = D - W``. The
    layers are embedded by the generalised eigenvectors ``L v = lambda D v`` of the ``k``
    smallest eigenvalues (the relaxed normalised cut of Shi and Malik, which the notes name)
    and the embedding is clustered by seeded k-means. Normalised rather than the ratio cut of
    the plain eigenvectors of ``L``: the notes' paper-literal option is the normalised cut,
    and it weighs each group by its volume (summed similarity) rather than its number of
    layers, so it also keeps the within-group similarity high; CKA gives the first layers a
    much smaller degree than the rest, which is where the two differ. Von Luxburg (2007,
    "A tutorial on spectral clustering") recommends this form for the same reasons.
    """
    weights = _check_similarity(similarity)
    count = _check_k(k, weights.shape[0])
    if k == 1:
        return [list(range(count))]
    if k == count:
        return [[layer] for layer in range(count)]
    np.fill_diagonal(weights, 0.0)
    degrees = np.maximum(weights.sum(axis=1), 1e-12)  # an isolated layer stays finite
    scale = 1.0 / np.sqrt(degrees)
    # L v = lambda D v  <=>  (I - D^-1/2 W D^-1/2) u = lambda u with v = D^-1/2 u.
    normalised = np.eye(count) - scale[:, None] * weights * scale[None, :]
    _, vectors = np.linalg.eigh(normalised)  # ascending eigenvalues
    embedding = scale[:, None] * vectors[:, :k]
    labels = kmeans(embedding, k, seed=seed, restarts=restarts)
    return _sorted_groups([np.flatnonzero(labels == c).tolist() for c in range(k)])


def contiguous_groups(similarity, k: int) -> list[list[int]]:
    """The ``k`` runs of consecutive layers with the minimal summed within-group scatter.

    ``cost(g) = |g| - (1/|g|) sum_{p,q in g} S[p, q]`` (the kernel k-means scatter with kernel
    ``S``, whose diagonal is 1 for CKA), minimised exactly by the dynamic programme
    ``D[k][j] = min_{i<j} D[k-1][i] + cost({i+1..j})`` in ``O(k L^2)``. Ties go to the
    earliest cut.
    """
    matrix = _check_similarity(similarity)
    count = _check_k(k, matrix.shape[0])
    prefix = np.zeros((count + 1, count + 1))
    prefix[1:, 1:] = matrix.cumsum(axis=0).cumsum(axis=1)

    def cost(start: int, end: int) -> float:  # layers start..end-1
        block = prefix[end, end] - prefix[start, end] - prefix[end, start] + prefix[start, start]
        return (end - start) - block / (end - start)

    best = np.full((k + 1, count + 1), np.inf)
    cut = np.zeros((k + 1, count + 1), dtype=int)
    best[0, 0] = 0.0
    for groups in range(1, k + 1):
        for end in range(groups, count - (k - groups) + 1):
            for start in range(groups - 1, end):
                value = best[groups - 1, start] + cost(start, end)
                if value < best[groups, end] - 1e-12:
                    best[groups, end], cut[groups, end] = value, start
    bounds = [count]
    for groups in range(k, 0, -1):
        bounds.append(cut[groups, bounds[-1]])
    bounds.reverse()
    return [list(range(bounds[i], bounds[i + 1])) for i in range(k)]


def segmentation_cost(similarity, groups: Sequence[Sequence[int]]) -> float:
    """Summed ``cost(g)`` of ``contiguous_groups`` over the groups (any partition)."""
    matrix = _check_similarity(similarity)
    return float(sum(len(g) - matrix[np.ix_(g, g)].sum() / len(g) for g in groups))


def selection_probabilities(importance: Sequence[float], groups: Sequence[Sequence[int]],
                            rule: str = "proportional", temperature: float = 1.0,
                            eps: float = 1e-12) -> list[float]:
    """Per layer, the probability of being its group's representative (sums to 1 per group).

    ``proportional`` (the notes' default): ``p_l = (I_l + eps) / sum_{m in G(l)} (I_m + eps)``,
    importance must be non-negative, and a group of zero importance becomes uniform.
    ``softmax``: ``p_l = softmax_{G(l)}(I_l / temperature)``.
    """
    if rule not in SELECTION_RULES:
        raise ValueError(f"unknown selection rule {rule!r}; choose from {', '.join(SELECTION_RULES)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    scores = np.asarray(importance, dtype=np.float64)
    _check_partition(groups, len(scores))
    if not np.isfinite(scores).all():
        raise ValueError("importance must be finite")
    if rule == "proportional" and (scores < 0).any():
        raise ValueError("proportional selection needs non-negative importance; "
                         "clip it or use rule='softmax'")
    probabilities = np.zeros_like(scores)
    for group in groups:
        members = scores[list(group)]
        if rule == "proportional":
            weights = members + eps
        else:
            weights = np.exp((members - members.max()) / temperature)
        probabilities[list(group)] = weights / weights.sum()
    return probabilities.tolist()


def select_representatives(probabilities: Sequence[float], groups: Sequence[Sequence[int]],
                           mode: str = "argmax",
                           rng: np.random.Generator | None = None) -> list[int]:
    """Exactly one layer per group, in the order of ``groups``.

    ``argmax`` takes the likeliest layer (ties: the lower index); ``sample`` draws one from
    the group's probabilities with ``rng`` (required, so every draw is seeded by the caller).
    ``sorted(...)`` of the result is the sub-model's layers.
    """
    if mode not in SELECTION_MODES:
        raise ValueError(f"unknown selection mode {mode!r}; choose from {', '.join(SELECTION_MODES)}")
    if mode == "sample" and rng is None:
        raise ValueError("mode='sample' needs rng, a numpy Generator")
    values = np.asarray(probabilities, dtype=np.float64)
    _check_partition(groups, len(values))
    chosen = []
    for group in groups:
        members = sorted(group)
        weights = values[members]
        if (weights < 0).any() or not np.isclose(weights.sum(), 1.0, atol=1e-6):
            raise ValueError(f"probabilities of group {members} must be non-negative and sum "
                             f"to 1, got {weights.tolist()}")
        if mode == "argmax":
            chosen.append(members[int(np.argmax(weights))])  # argmax returns the first maximum
        else:
            chosen.append(members[int(rng.choice(len(members), p=weights / weights.sum()))])
    return chosen


def kmeans(points: np.ndarray, k: int, seed: int = 0, restarts: int = 10,
           iterations: int = 100) -> np.ndarray:
    """Labels ``[N]`` of seeded k-means++ (Lloyd's iterations), the best of ``restarts`` runs.

    Every cluster is kept non-empty (an emptied one takes the point farthest from its
    centre), so the result always has exactly ``k`` clusters when ``k <= N``.
    """
    generator = np.random.default_rng(seed)
    best_labels, best_inertia = None, np.inf
    for _ in range(restarts):
        centres = _kmeans_plus_plus(points, k, generator)
        for _ in range(iterations):
            distances = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
            labels = _non_empty(distances.argmin(axis=1), distances, k)
            updated = np.stack([points[labels == c].mean(axis=0) for c in range(k)])
            if np.allclose(updated, centres):
                break
            centres = updated
        inertia = ((points - centres[labels]) ** 2).sum()
        if inertia < best_inertia - 1e-12:
            best_labels, best_inertia = labels, inertia
    return best_labels


def _kmeans_plus_plus(points: np.ndarray, k: int, generator: np.random.Generator) -> np.ndarray:
    centres = [points[generator.integers(len(points))]]
    for _ in range(1, k):
        nearest = np.min([((points - c) ** 2).sum(axis=1) for c in centres], axis=0)
        total = nearest.sum()
        # All points on the centres already (duplicates): any point will do.
        index = generator.choice(len(points), p=nearest / total) if total > 0 else \
            generator.integers(len(points))
        centres.append(points[index])
    return np.stack(centres)


def _non_empty(labels: np.ndarray, distances: np.ndarray, k: int) -> np.ndarray:
    labels = labels.copy()
    for cluster in range(k):
        if (labels == cluster).any():
            continue
        sizes = np.bincount(labels, minlength=k)
        movable = np.flatnonzero(sizes[labels] > 1)
        own = distances[movable, labels[movable]]
        labels[movable[int(np.argmax(own))]] = cluster
    return labels


def _check_similarity(similarity) -> np.ndarray:
    if isinstance(similarity, torch.Tensor):
        similarity = similarity.detach().cpu().double().numpy()
    matrix = np.array(similarity, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"similarity must be a non-empty square matrix, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError("similarity has non-finite entries")
    if not np.allclose(matrix, matrix.T, atol=1e-6):
        raise ValueError("similarity must be symmetric")
    if (matrix < -1e-9).any():
        raise ValueError("similarity must be non-negative (edge weights of the layer graph)")
    return np.clip((matrix + matrix.T) / 2, 0.0, None)


def _check_k(k: int, count: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= count:
        raise ValueError(f"the number of groups must be an integer in 1..{count} "
                         f"(the number of layers), got {k!r}")
    return count


def _check_partition(groups: Sequence[Sequence[int]], count: int) -> None:
    layers = sorted(layer for group in groups for layer in group)
    if layers != list(range(count)) or any(len(group) == 0 for group in groups):
        raise ValueError(f"groups must be non-empty and cover each of the {count} layers "
                         f"exactly once, got {[list(g) for g in groups]}")


def _sorted_groups(groups: list[list[int]]) -> list[list[int]]:
    return sorted((sorted(group) for group in groups), key=lambda group: group[0])
