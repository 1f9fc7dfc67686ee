"""HierFedLoRA's (tau_m, d_m) solver against brute force and a hand-computed case."""

import itertools
import math

import numpy as np
import pytest

from fedsoda.schedule import depth_grid, progress, round_times, solve, tau_caps


def brute_force(times, sizes, caps, depths, num_layers, gamma=0.5) -> float:
    """Every (tau_m, d_m) of every group; the deadline is the slowest group's tau t."""
    best = 0.0
    per_group = [[(k, j) for k in range(1, caps[m] + 1) for j in range(len(depths))]
                 for m in range(len(sizes))]
    for choice in itertools.product(*per_group):
        deadline = max(k * times[m][j] for m, (k, j) in enumerate(choice))
        total = sum(progress(sizes[m], k, depths[j], num_layers, gamma) for m, (k, j) in enumerate(choice))
        best = max(best, total / deadline)
    return best


def test_the_grid_solver_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(40):
        groups, depths = int(rng.integers(1, 4)), depth_grid(8)
        # Deeper is slower: each depth adds 0-100% to the one before.
        growth = (1 + rng.uniform(0, 1, size=(groups, 4))).cumprod(1)
        times = rng.uniform(1, 10, size=(groups, 1)) * growth
        sizes = rng.integers(10, 100, size=groups).tolist()
        caps = rng.integers(1, 5, size=groups).tolist()
        found = solve(times, sizes, caps, depths, 8)
        assert found.rate == pytest.approx(brute_force(times, sizes, caps, depths, 8), rel=1e-12)
        # The schedule keeps its deadline and its rate is what it claims.
        assert all(k * times[m][depths.index(d)] <= found.deadline + 1e-9
                   for m, (k, d) in enumerate(zip(found.tau, found.depth, strict=True)))
        claimed = sum(progress(sizes[m], k, d, 8, 0.5) for m, (k, d) in
                      enumerate(zip(found.tau, found.depth, strict=True))) / found.deadline
        assert claimed == pytest.approx(found.rate)


def test_a_hand_computed_schedule():
    # Two groups of 50 examples, L = 4, depths 1..4 (every), gamma 0.5, caps 4 and 1.
    # Group 0 (fast): t(d) = 1 + d; group 1 (slow): t(d) = 4 + 2d.
    # Group 1 has cap 1: its best for a deadline T is the deepest d with 4 + 2d <= T.
    # T = 12 (group 1 at d = 4): group 0 fits floor(12 / (1 + d)) rounds, capped at 4:
    #   d=1: 4 rounds * sqrt(1/4) = 2.0; d=2: 4 * 0.707 = 2.83; d=3: 3 * 0.866 = 2.60; d=4: 2 * 1 = 2
    #   -> d=2, tau=4: rate = 50 (2.83 + 1) / 12 = 15.95
    # T = 8 (group 1 at d = 2, 0.707): group 0 d=1: 4 * 0.5 = 2; d=2: 2 * 0.707 = 1.41;
    #   d=3: 2 * 0.866 = 1.73; d=4: 1 * 1 = 1 -> 2.0; rate = 50 (2 + 0.707) / 8 = 16.92
    # T = 6 (group 1 at d = 1, 0.5): group 0 d=1: 3 * 0.5 = 1.5; d=2: 2 * 0.707 = 1.41;
    #   d=3: 1 * 0.866; d=4: 1 * 1 -> 1.5; rate = 50 (1.5 + 0.5) / 6 = 16.67
    # T = 10 (group 1 at d = 3, 0.866): group 0 d=1: 4 * 0.5 = 2; d=2: 3 * 0.707 = 2.12;
    #   d=3: 2 * 0.866 = 1.73; d=4: 2 -> 2.12; rate = 50 (2.12 + 0.866) / 10 = 14.93
    # Deadlines between those gain nothing for group 1 and only stretch T: T = 8 wins.
    times = np.array([[2, 3, 4, 5], [6, 8, 10, 12]], dtype=float)
    found = solve(times, [50, 50], [4, 1], depth_grid(4, every=True), 4)
    assert (found.deadline, found.tau, found.depth) == (8.0, (4, 1), (1, 2))
    assert found.rate == pytest.approx(50 * (4 * 0.5 + math.sqrt(0.5)) / 8)


def test_caps_grid_and_round_times_by_hand():
    assert tau_caps([0.0, 0.05, 0.1, 0.3]) == [4, 2, 1, 1]  # 1 + floor(3 * (1 - kl / 0.1))
    assert depth_grid(30) == (8, 15, 23, 30) and depth_grid(1) == (1,)
    # Two devices in one group: a step at depth 2 takes 1.2 s here; device 0 runs at this
    # machine's speed, device 1 at half; 10 steps; LoRA 1 MB a layer at 1 and 2 MB/s.
    # Depth 2: device 0 10 * 1.2 / 1 + 2 * 2 * 1 / 1 = 16 s; device 1 10 * 1.2 / 0.5 + 4 / 2
    # = 26 s: the round takes 26 s. Depth 1 (a step 1.1 s): 11 + 2 = 13 and 22 + 1 = 23 s.
    times = round_times([1.1, 1.2], np.array([1.0, 0.5]), np.array([1e6, 2e6]),
                        [(0, 1)], (1, 2), steps=10, layer_bytes=1e6)
    assert times.tolist() == [[pytest.approx(23.0), pytest.approx(26.0)]]
    with pytest.raises(ValueError, match="positive"):
        solve(np.zeros((1, 1)), [1], [1], (1,), 1)
