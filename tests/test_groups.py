"""HierFedLoRA's near-IID client groups (fedsoda.data.groups) on hand-made histograms."""

import math

import numpy as np
import pytest

from fedsoda.data.groups import kl_to, near_iid_groups, noisy_histograms, random_groups


def test_kl_by_hand():
    # All mass on one of two classes: p = [1 + e, e] / (1 + 2e) against [1/2, 1/2] after the
    # smoothing e = 1e-6, i.e. log 2 less about e (1 + log 2 - log 2e).
    e = 1e-6
    p1, p2 = (1 + e) / (1 + 2 * e), e / (1 + 2 * e)
    assert kl_to([1, 0], [1, 1]) == pytest.approx(p1 * math.log(2 * p1) + p2 * math.log(2 * p2), rel=1e-9)
    first_order = math.log(2) - e * (1 + math.log(2) - math.log(2 * e))
    assert kl_to([1, 0], [1, 1]) == pytest.approx(first_order, abs=1e-10)
    assert kl_to([3, 1], [1, 1]) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-5)
    assert kl_to([5, 5], [1, 1]) == pytest.approx(0.0)


def test_a_perfect_split_is_found_where_greedy_alone_misses_it():
    # Clients 2, 4, 5 pool to [4+2+0, 0+3+3] = [6, 6] and 0, 1, 3 to [2+4+0, 2+2+2] = [6, 6]:
    # both groups have the global distribution, KL 0. Greedy assignment alone ends at 0.163.
    histograms = [[2, 2], [4, 2], [4, 0], [0, 2], [2, 3], [0, 3]]
    assert near_iid_groups(histograms, 2, passes=0).worst > 0.1
    grouping = near_iid_groups(histograms, 2)
    assert sorted(grouping.groups) == [(0, 1, 3), (2, 4, 5)] and grouping.worst < 1e-9


def test_pathological_two_class_clients_pair_up():
    # Eight one-class clients, four of each class: each of four groups gets one of each.
    histograms = [[10, 0]] * 4 + [[0, 10]] * 4
    grouping = near_iid_groups(histograms, 4)
    assert all(sorted(np.argmax(histograms, 1)[list(g)]) == [0, 1] for g in grouping.groups)
    assert grouping.worst < 1e-9
    assert sorted(sum(grouping.groups, ())) == list(range(8))


def test_never_worse_than_random_groups_and_every_client_placed_once():
    rng = np.random.default_rng(3)
    for trial in range(20):
        histograms = rng.integers(0, 20, size=(12, 3))
        histograms[:, 0] += 1
        found = near_iid_groups(histograms, 3)
        assert sorted(sum(found.groups, ())) == list(range(12)) and all(len(g) == 4 for g in found.groups)
        assert found.worst <= random_groups(histograms, 3, seed=trial).worst + 1e-12


def test_bad_inputs_and_noise():
    with pytest.raises(ValueError, match="between 1 and the 2 clients"):
        near_iid_groups([[1, 0], [0, 1]], 3)
    with pytest.raises(ValueError, match="counts >= 0"):
        near_iid_groups([[1, -1]], 1)
    noisy = noisy_histograms([[5, 0], [0, 5]], scale=1.0, seed=0)
    assert (noisy >= 0).all() and not np.array_equal(noisy, [[5, 0], [0, 5]])
    assert np.array_equal(noisy_histograms([[5, 0]], 0.0, seed=0), [[5, 0]])
