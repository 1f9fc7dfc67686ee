"""Window choice, index map and settings checks of similarity group pruning."""

import itertools
import json
import random

import pytest

from fedsoda.surgery.plan import PruneSettings, PruningPlan, choose_windows, uniform_groups


def brute_force(distances, n, p):
    best, best_cost = None, float("inf")
    for starts in itertools.combinations(range(len(distances)), p):
        if all(b - a > n for a, b in itertools.pairwise(starts)):
            cost = sum(distances[s] for s in starts)
            if cost < best_cost - 1e-12:
                best, best_cost = list(starts), cost
    return best, best_cost


@pytest.mark.parametrize("seed", range(40))
def test_window_choice_matches_brute_force(seed):
    rng = random.Random(seed)
    n, p = rng.randint(1, 3), rng.randint(1, 4)
    layers = rng.randint(p * (n + 1), p * (n + 1) + 8)
    distances = [rng.random() for _ in range(layers - n)]
    chosen = choose_windows(distances, n, p)
    _, best_cost = brute_force(distances, n, p)
    assert len(chosen) == p
    assert all(b - a > n for a, b in itertools.pairwise(chosen)), "windows overlap"
    assert sum(distances[s] for s in chosen) == pytest.approx(best_cost, abs=1e-12)


def test_exact_choice_beats_greedy_on_hand_case():
    # Windows of 2 layers (n=1) over 4 layers: starts 0,1,2. Greedy takes the smallest
    # (start 1, 0.1) and then nothing disjoint is left for p=2; the optimum is {0, 2} = 0.6.
    assert choose_windows([0.3, 0.1, 0.3], n=1, p=2) == [0, 2]


def test_index_map_and_kept_layers_by_hand():
    plan = PruningPlan(model="m", num_layers=10, adapter_layers=2, n=2, p=2, token="last",
                       samples=1, groups=[[0, 2], [5, 7]])
    assert plan.removed_layers == [1, 2, 6, 7]
    assert plan.kept_layers == [0, 3, 4, 5, 8, 9]
    assert plan.index_map == [[0, 0], [5, 3]]
    assert plan.sub_num_layers == 6
    assert plan.sub_adapter_layers == [4, 5]


def test_smollm2_default_layout_has_18_layers():
    plan = PruningPlan(model="m", num_layers=30, adapter_layers=3, n=3, p=4, token="last",
                       samples=1, groups=[[1, 4], [8, 11], [12, 15], [16, 19]])
    assert plan.sub_num_layers == 30 - 12
    assert plan.index_map == [[1, 1], [8, 5], [12, 6], [16, 7]]


def test_plan_json_round_trip(tmp_path):
    plan = PruningPlan(model="m", num_layers=10, adapter_layers=2, n=2, p=2, token="all",
                       samples=4, groups=[[0, 2], [5, 7]],
                       distances=[{"start": i, "end": i + 2, "distance": 0.1} for i in range(6)])
    plan.save(tmp_path / "plan.json")
    data = json.loads((tmp_path / "plan.json").read_text())
    for key in ("model", "num_layers", "adapter_layers", "n", "p", "token", "samples",
                "distances", "groups", "removed_layers", "kept_layers", "index_map", "seconds"):
        assert key in data
    assert PruningPlan.load(tmp_path / "plan.json") == plan


def test_plan_with_overlapping_groups_is_rejected(tmp_path):
    good = PruningPlan(model="m", num_layers=10, adapter_layers=2, n=2, p=2, token="last",
                       samples=1, groups=[[0, 2], [5, 7]])
    data = good.to_json() | {"groups": [[0, 2], [2, 4]]}
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="disjoint"):
        PruningPlan.load(tmp_path / "bad.json")


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "n .* must be >= 1"),
    ({"token": "first"}, "token"),
    ({"adapter_layers": 0}, "adapter_layers"),
])
def test_impossible_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruneSettings(**kwargs)


def test_settings_checked_against_model_size():
    with pytest.raises(ValueError, match="p <= 6"):
        PruneSettings(n=3, p=7, adapter_layers=3).check_model(30)  # 27 // 4 = 6
    with pytest.raises(ValueError, match="leaves no emulator"):
        PruneSettings(adapter_layers=30).check_model(30)
    PruneSettings(n=3, p=6, adapter_layers=3).check_model(30)


def test_uniform_groups_are_disjoint_and_inside_emulator():
    groups = uniform_groups(30, 2, 3, 4, first_adapter_layers=1)
    assert len(groups) == 4
    flat = [i for s, e in groups for i in range(s, e + 1)]
    assert len(flat) == len(set(flat)) and min(flat) >= 1 and max(flat) <= 27
