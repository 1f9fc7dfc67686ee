"""Layer grouping and representative selection (fedsoda.surgery.grouping).

Expected values: known block structure, brute force over every contiguous segmentation with
its cost summed by explicit loops, and probabilities worked out by hand.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from fedsoda.surgery.grouping import (
    contiguous_groups,
    segmentation_cost,
    select_representatives,
    selection_probabilities,
    spectral_groups,
)


def block_similarity(labels: list[int], inside: float = 0.85, across: float = 0.15,
                     noise: float = 0.05, seed: int = 0) -> np.ndarray:
    """Symmetric similarity with unit diagonal: ``inside`` within a label, ``across`` between."""
    generator = np.random.default_rng(seed)
    labels = np.asarray(labels)
    matrix = np.where(labels[:, None] == labels[None, :], inside, across)
    jitter = generator.uniform(-noise, noise, matrix.shape)
    matrix = matrix + (jitter + jitter.T) / 2
    np.fill_diagonal(matrix, 1.0)
    return matrix


def groups_of(labels: list[int]) -> list[list[int]]:
    found: dict[int, list[int]] = {}
    for layer, label in enumerate(labels):
        found.setdefault(label, []).append(layer)
    return sorted(found.values(), key=lambda group: group[0])


def random_cka_like(count: int, seed: int) -> np.ndarray:
    """Linear CKA of random, partly shared features: symmetric, in [0, 1], unit diagonal."""
    generator = np.random.default_rng(seed)
    base = generator.normal(size=(40, 5))
    features = [base @ generator.normal(size=(5, 5)) + generator.uniform(0, 3) * generator.normal(
        size=(40, 5)) for _ in range(count)]
    centred = [f - f.mean(axis=0) for f in features]
    matrix = np.ones((count, count))
    for i, j in itertools.combinations(range(count), 2):
        a, b = centred[i], centred[j]
        matrix[i, j] = matrix[j, i] = (np.linalg.norm(b.T @ a) ** 2
                                       / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)))
    return matrix


def explicit_cost(similarity: np.ndarray, groups: list[list[int]]) -> float:
    total = 0.0
    for group in groups:
        inner = sum(similarity[p, q] for p in group for q in group)
        total += len(group) - inner / len(group)
    return total


def brute_force_segmentation(similarity: np.ndarray, k: int) -> tuple[float, list[list[int]]]:
    count = len(similarity)
    best = (math.inf, [])
    for cuts in itertools.combinations(range(1, count), k - 1):
        bounds = [0, *cuts, count]
        groups = [list(range(bounds[i], bounds[i + 1])) for i in range(k)]
        cost = explicit_cost(similarity, groups)
        if cost < best[0]:
            best = (cost, groups)
    return best


# ---------------------------------------------------------------- spectral

@pytest.mark.parametrize("labels", [
    [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2],                # contiguous blocks of 3, 5, 4
    [0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3, 0],                # interleaved: groups need not be runs
    [0, 0, 1, 1, 1, 1, 1, 1, 2, 3, 3, 3, 3, 4, 4, 4],    # a singleton block among others
])
def test_spectral_groups_recover_a_noisy_block_diagonal(labels):
    similarity = block_similarity(labels)
    k = len(set(labels))
    assert spectral_groups(similarity, k) == groups_of(labels)
    assert spectral_groups(torch.tensor(similarity), k) == groups_of(labels)


def test_spectral_groups_are_deterministic_and_sorted():
    similarity = random_cka_like(10, seed=4)
    first = spectral_groups(similarity, 4, seed=7)
    assert first == spectral_groups(similarity, 4, seed=7)
    assert len(first) == 4 and sorted(sum(first, [])) == list(range(10))
    assert all(group == sorted(group) for group in first)
    assert [group[0] for group in first] == sorted(group[0] for group in first)


def test_spectral_groups_extremes_and_bad_k():
    similarity = random_cka_like(6, seed=1)
    assert spectral_groups(similarity, 6) == [[0], [1], [2], [3], [4], [5]]
    assert spectral_groups(similarity, 1) == [[0, 1, 2, 3, 4, 5]]
    for k in (0, 7, 2.5, -1):
        with pytest.raises(ValueError, match="number of groups"):
            spectral_groups(similarity, k)


def test_spectral_groups_always_return_k_groups_even_with_duplicate_layers():
    similarity = np.ones((5, 5))  # every layer alike: one point in the embedding
    groups = spectral_groups(similarity, 3)
    assert len(groups) == 3 and sorted(sum(groups, [])) == list(range(5))


def test_a_bad_similarity_is_rejected():
    similarity = random_cka_like(4, seed=2)
    asymmetric = similarity.copy()
    asymmetric[0, 1] += 0.3
    with pytest.raises(ValueError, match="symmetric"):
        spectral_groups(asymmetric, 2)
    with pytest.raises(ValueError, match="square"):
        contiguous_groups(similarity[:3], 2)
    negative = similarity.copy()
    negative[0, 1] = negative[1, 0] = -0.5
    with pytest.raises(ValueError, match="non-negative"):
        spectral_groups(negative, 2)


# ---------------------------------------------------------------- contiguous

@pytest.mark.parametrize("count", range(1, 9))
def test_contiguous_groups_match_brute_force(count):
    for seed in range(3):
        similarity = random_cka_like(count, seed=100 * count + seed)
        for k in range(1, count + 1):
            cost, expected = brute_force_segmentation(similarity, k)
            groups = contiguous_groups(similarity, k)
            assert explicit_cost(similarity, groups) == pytest.approx(cost, abs=1e-9)
            assert groups == expected
            assert segmentation_cost(similarity, groups) == pytest.approx(cost, abs=1e-9)


def test_contiguous_groups_hand_case_and_bad_k():
    # Layers 0-1 and 2-4 are alike; the cut goes between 1 and 2.
    similarity = block_similarity([0, 0, 1, 1, 1], noise=0.0)
    assert contiguous_groups(similarity, 2) == [[0, 1], [2, 3, 4]]
    assert contiguous_groups(similarity, 5) == [[0], [1], [2], [3], [4]]
    assert contiguous_groups(similarity, 1) == [[0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="number of groups"):
        contiguous_groups(similarity, 6)


# ---------------------------------------------------------------- selection

def test_proportional_probabilities_by_hand():
    groups = [[0, 1, 2], [3, 4]]
    probabilities = selection_probabilities([0.1, 0.3, 0.6, 0.2, 0.2], groups)
    assert probabilities == pytest.approx([0.1, 0.3, 0.6, 0.5, 0.5], abs=1e-9)
    # A group whose importance is all zero becomes uniform instead of 0/0.
    zero = selection_probabilities([0.0, 0.0, 0.0, 1.0, 3.0], groups)
    assert zero == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.25, 0.75], abs=1e-9)


def test_softmax_probabilities_by_hand():
    groups = [[0, 1], [2]]
    # exp(0) : exp(ln 3) = 1 : 3; at temperature 0.5, 1 : 9.
    assert selection_probabilities([0.0, math.log(3), 5.0], groups, rule="softmax") == \
        pytest.approx([0.25, 0.75, 1.0], abs=1e-12)
    assert selection_probabilities([0.0, math.log(3), 5.0], groups, rule="softmax",
                                   temperature=0.5) == pytest.approx([0.1, 0.9, 1.0], abs=1e-12)
    # Non-contiguous groups: probabilities land on the layers' own positions.
    assert selection_probabilities([1.0, 2.0, 3.0, 6.0], [[0, 2], [1, 3]]) == \
        pytest.approx([0.25, 0.25, 0.75, 0.75], abs=1e-9)


def test_selection_probabilities_reject_bad_input():
    with pytest.raises(ValueError, match="non-negative"):
        selection_probabilities([-0.1, 0.2], [[0, 1]])
    with pytest.raises(ValueError, match="exactly once"):
        selection_probabilities([0.1, 0.2, 0.3], [[0, 1]])
    with pytest.raises(ValueError, match="exactly once"):
        selection_probabilities([0.1, 0.2], [[0, 1], [1]])
    with pytest.raises(ValueError, match="unknown selection rule"):
        selection_probabilities([0.1, 0.2], [[0, 1]], rule="rank")
    with pytest.raises(ValueError, match="temperature"):
        selection_probabilities([0.1, 0.2], [[0, 1]], rule="softmax", temperature=0.0)


def test_argmax_takes_one_per_group_and_the_lower_index_on_ties():
    groups = [[0, 1, 2], [3, 4]]
    assert select_representatives([0.2, 0.5, 0.3, 0.5, 0.5], groups) == [1, 3]
    assert select_representatives([0.4, 0.3, 0.6, 0.7], [[0, 2], [1, 3]]) == [2, 3]


def test_sampling_follows_the_probabilities_and_the_seed():
    groups = [[0, 1, 2], [3, 4]]
    probabilities = [0.2, 0.0, 0.8, 0.0, 1.0]
    draws = [select_representatives(probabilities, groups, "sample", np.random.default_rng(seed))
             for seed in range(4000)]
    assert all(draw[1] == 4 and draw[0] in (0, 2) for draw in draws)  # zero never drawn
    assert np.mean([draw[0] == 2 for draw in draws]) == pytest.approx(0.8, abs=0.02)
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    assert [select_representatives(probabilities, groups, "sample", rng_a) for _ in range(10)] == \
        [select_representatives(probabilities, groups, "sample", rng_b) for _ in range(10)]


def test_select_representatives_rejects_bad_input():
    groups = [[0, 1], [2]]
    with pytest.raises(ValueError, match="needs rng"):
        select_representatives([0.5, 0.5, 1.0], groups, mode="sample")
    with pytest.raises(ValueError, match="unknown selection mode"):
        select_representatives([0.5, 0.5, 1.0], groups, mode="top")
    with pytest.raises(ValueError, match="sum to 1"):
        select_representatives([0.5, 0.2, 1.0], groups)
