"""FedLoRA-exclusive end to end on a tiny random model: only the clients whose budget holds
the full model train, a round that samples none of them leaves the LoRA as it was. FedRA
sized by the same budgets and memory model."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fedsoda.data.partition import sample_round
from fedsoda.federated.config import RunConfig
from fedsoda.federated.simulation import simulate
from fedsoda.methods.layered import calibrated_peaks
from fedsoda.methods.pruner_settings import FedPrunerSettings
from test_federated_sim import tiny_config

MiB = 2**20


def calibrated(out, a_mib: float, b_mib: float, layers: int = 10) -> None:
    """A run folder whose memory model is calibrated as ``fedsoda.budgets.calibrate`` leaves
    it: measured at L/5 and at all L layers, the latter the full-model peak."""
    out.mkdir(parents=True)
    full = (a_mib + layers * b_mib) * MiB
    (out / "budgets.json").write_text(json.dumps({
        "memory_model": {"a": a_mib * MiB, "b": b_mib * MiB,
                         "points": [[2, (a_mib + 2 * b_mib) * MiB], [layers, full]]},
        "full_model_peak_bytes": full}))


@pytest.mark.slow
def test_only_the_clients_that_hold_the_full_model_train(tiny_model_dir, shared_data, tmp_path):
    out = tmp_path / "exclusive"
    calibrated(out, a_mib=100, b_mib=10)  # the full model: 200 MiB, measured
    # The default 5% headroom would ask 210 MiB of a prediction, but 200 MiB was measured:
    # client 3's budget of 1.0 holds it; 150 MiB (5 layers) does not.
    cfg = tiny_config(tiny_model_dir, shared_data, out, method="fedlora_exclusive", clients=4,
                      clients_per_round=2, rounds=4, eval_every=0, seed=0,
                      fedpruner=FedPrunerSettings(budgets="150MiBx3,1.0"))
    sampled = [sample_round(0, 4, 2, r) for r in range(1, 5)]
    assert any(3 in s for s in sampled) and any(3 not in s for s in sampled)  # both kinds
    summary = simulate(cfg)
    assert summary["eligible_clients"] == [3] and summary["client_layer_counts"] == [0, 0, 0, 10]
    assert summary["rounds_without_training"] == sum(3 not in s for s in sampled)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for entry, clients in zip(rounds, sampled, strict=True):
        assert (entry["train_loss"] is None) == (3 not in clients), (entry, clients)
        assert (entry["bytes_up"] == 0) == (3 not in clients)
    # The full model's peak is the calibration's 200 MiB, not a second measurement: client 3's
    # budget (1.0) is that very figure, so its peak/budget is exactly 1.
    assert sorted(summary["by_capacity"]) == ["10"]
    assert summary["by_capacity"]["10"]["client_peak_memory_bytes"] == 200 * MiB
    assert summary["max_peak_over_budget"] == 1.0
    # The exported adapter has a LoRA on every layer, trained (B moved off zero).
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(t) > 0 for t in lora_b)


def test_no_client_holding_the_full_model_is_an_error_before_training(tiny_model_dir, shared_data,
                                                                     tmp_path):
    out = tmp_path / "none"
    calibrated(out, a_mib=100, b_mib=10)
    cfg = tiny_config(tiny_model_dir, shared_data, out, method="fedlora_exclusive", clients=2,
                      clients_per_round=2, rounds=1, fedpruner=FedPrunerSettings(budgets="0.8x2"))
    with pytest.raises(Exception, match=r"no client's budget holds the full model \(200\.0 MiB"):
        simulate(cfg)


def test_exclusive_trains_whole_layers():
    with pytest.raises(ValueError, match="granularity"):
        RunConfig(method="fedlora_exclusive", fedpruner=FedPrunerSettings(granularity="block"))


def test_calibrated_peaks_key_layer_counts_and_block_pairs():
    # Hand-written notes as budgets.json holds them (JSON lists): two layer dry runs and
    # three block dry runs; each keeps its measured bytes under its shape.
    notes = {"memory_model": {"a": 0, "b": 0, "points": [[2, 120], [10, 200]]},
             "block_memory_model": {"points": [[10, 10, 200], [0, 10, 170], [10, 0, 160]]}}
    assert calibrated_peaks(notes) == {(2,): 120, (10,): 200, (10, 10): 200, (0, 10): 170,
                                       (10, 0): 160}
    assert calibrated_peaks({"memory_model": None}) == {}  # FedRA: no calibration


def test_fedra_sized_by_budgets_draws_as_many_layers_as_each_budget_holds(
        tiny_model_dir, shared_data, tmp_path):
    out = tmp_path / "fedra"
    calibrated(out, a_mib=100, b_mib=10)  # k layers: 100 + 10 k MiB; the full model 200 MiB
    # Headroom 0: 150 MiB holds (150 - 100) / 10 = 5 layers, 1.0 (200 MiB) all 10.
    cfg = tiny_config(tiny_model_dir, shared_data, out, method="fedra", clients=3,
                      clients_per_round=3, rounds=1, eval_every=0, client_layers="budgets",
                      fedpruner=FedPrunerSettings(budgets="150MiBx2,1.0", headroom=0.0))
    summary = simulate(cfg)
    assert summary["client_layer_counts"] == [5, 5, 10]
    assert summary["budgets_bytes"] == [150 * MiB, 150 * MiB, 200 * MiB]
    held = json.loads((out / "checkpoint" / "state.json").read_text())["method"]["layers"]
    assert {pid: len(layers) for pid, layers in held.items()} == {"0": 5, "1": 5, "2": 10}
    # 10 layers: the calibration's 200 MiB against a budget of that figure; the 5-layer step
    # (measured: tens of MiB on the tiny model) stays far under 150 MiB.
    assert summary["by_capacity"]["10"]["client_peak_memory_bytes"] == 200 * MiB
    assert summary["by_capacity"]["5"]["client_peak_memory_bytes"] < 150 * MiB
    assert summary["max_peak_over_budget"] == 1.0
