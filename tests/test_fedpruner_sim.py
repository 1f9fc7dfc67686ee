"""FedPruner end to end in the simulation engine on a tiny random model."""

import json

import pytest

from fedsoda.federated.config import RunConfig
from fedsoda.federated.simulation import simulate
from fedsoda.methods.fedpruner import selection_counts
from fedsoda.methods.pruner_settings import FedPrunerSettings
from test_federated_sim import tiny_config

MiB = 2**20


def calibrated(out, a_mib: float, b_mib: float) -> None:
    """A run folder whose memory model is already calibrated (what a resumed run reads): the
    tiny model's per-layer cost is far below RSS noise, so it cannot be measured."""
    out.mkdir(parents=True)
    (out / "budgets.json").write_text(json.dumps({
        "memory_model": {"a": a_mib * MiB, "b": b_mib * MiB,
                         "points": [[2, (a_mib + 2 * b_mib) * MiB], [4, (a_mib + 4 * b_mib) * MiB]]},
        "full_model_peak_bytes": (a_mib + 10 * b_mib) * MiB}))


def test_budgets_size_the_sub_models_and_the_probe_picks_one_layer_per_group(
        tiny_model_dir, shared_data, tmp_path):
    out = tmp_path / "fedpruner"
    calibrated(out, a_mib=100, b_mib=10)
    # peak(k) = 100 + 10 k MiB: 125 MiB holds 2 layers, 130 MiB 3, the full 200 MiB all 10.
    cfg = tiny_config(tiny_model_dir, shared_data, out, method="fedpruner", clients=4,
                      clients_per_round=4, rounds=2, eval_every=0,
                      fedpruner=FedPrunerSettings(budgets="125MiBx2,130MiB,1.0", headroom=0.0))
    summary = simulate(cfg)
    state = json.loads((out / "checkpoint" / "state.json").read_text())["method"]
    assert summary["client_layer_counts"] == [2, 2, 3, 10]
    assert len(state["similarity"]) == 10 and state["probed_clients"] == [0, 1, 2, 3]
    groups = {int(k): g for k, g in state["groups"].items()}
    assert sorted(groups) == [2, 3, 10] and groups[10] == [[i] for i in range(10)]
    for k, partition in groups.items():  # a partition of all ten layers into k groups
        assert len(partition) == k and sorted(sum(partition, [])) == list(range(10))
    for pid, layers in state["layers"].items():
        k = summary["client_layer_counts"][int(pid)]
        assert len(layers) == k and all(sum(layer in g for layer in layers) == 1 for g in groups[k])
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rejected"] == [] for r in rounds)
    assert sorted(summary["by_capacity"]) == ["10", "2", "3"]
    assert sum(summary["layer_selections"]) == 2 * (2 + 2 + 3 + 10)  # two rounds of draws
    # Every round, every client: its budget, layers, the measured peak of its layer count and
    # of the probe it ran; the summary's worst ratio is the largest of them.
    table = summary["clients_by_round"]
    assert sorted(table) == ["1", "2"] and all(sorted(r) == ["0", "1", "2", "3"] for r in table.values())
    budgets = [125 * MiB, 125 * MiB, 130 * MiB, 200 * MiB]
    ratios = []
    for entry_by_client in table.values():
        for pid, entry in entry_by_client.items():
            k = len(entry["layers"])
            assert entry["budget_bytes"] == budgets[int(pid)]
            assert entry["peak_bytes"] == summary["by_capacity"][str(k)]["client_peak_memory_bytes"]
            assert entry["probe_peak_bytes"] == summary["probe_peak_bytes"] > 0
            ratios.append(max(entry["peak_bytes"], entry["probe_peak_bytes"]) / budgets[int(pid)])
    assert summary["max_peak_over_budget"] == pytest.approx(max(ratios))
    assert (out / "selection.png").stat().st_size > 0  # CKA matrix beside the layer x round map


def test_a_budget_under_one_layer_names_the_smallest_that_works(tiny_model_dir, shared_data,
                                                                 tmp_path):
    out = tmp_path / "small"
    calibrated(out, a_mib=100, b_mib=10)
    cfg = tiny_config(tiny_model_dir, shared_data, out, method="fedpruner", clients=2,
                      clients_per_round=2, rounds=1,
                      fedpruner=FedPrunerSettings(budgets="105MiBx2", headroom=0.0))
    with pytest.raises(Exception, match="110"):  # a + b = 110 MiB
        simulate(cfg)


def test_fedpruner_settings_are_checked():
    with pytest.raises(ValueError, match="grouping"):
        RunConfig(method="fedpruner", fedpruner=FedPrunerSettings(grouping="random"))


def test_selection_counts_by_hand():
    table = {"1": {"0": {"layers": [0, 2]}, "1": {"layers": [2, 3]}},
             "2": {"0": {"layers": [1, 2], "blocks": ["attn", "attn+mlp"]}}}
    assert selection_counts(table, 4).tolist() == [[1, 0], [0, 1], [2, 1], [1, 0]]
    assert selection_counts(table, 4, "mlp").tolist() == [[1, 0], [0, 0], [2, 1], [1, 0]]
    assert selection_counts(table, 4, "attn").tolist() == [[1, 0], [0, 1], [2, 1], [1, 0]]


def test_a_probe_the_smallest_budget_cannot_hold_is_an_error(tmp_path):
    from fedsoda.methods.fedpruner import similarity_peak

    cfg = RunConfig(method="fedpruner", fedpruner=FedPrunerSettings(headroom=0.05))
    # 230 MiB * 1.05 = 241.5 MiB: a 241 MiB budget cannot hold the probe, 242 MiB can.
    notes = {"probe_peak_bytes": 230 * MiB, "budgets": [241 * MiB, 900 * MiB]}
    with pytest.raises(ValueError, match=r"peaks at 230\.0 MiB.*smallest budget \(241\.0 MiB\)"):
        similarity_peak(cfg, tmp_path, tmp_path, notes)
    assert similarity_peak(cfg, tmp_path, tmp_path, {**notes, "budgets": [242 * MiB]}) == 230 * MiB
