"""Runs meant to compare share one FedPruner calibration (``fedpruner.calibration``): the
memory model and probe peak of an earlier run's budgets.json, checked before anything loads."""

import json
from types import SimpleNamespace

import pytest

from fedsoda.commands.run import check_calibration
from fedsoda.federated.config import load_config
from fedsoda.methods.fedpruner import calibration
from fedsoda.methods.pruner_settings import FedPrunerSettings

LAYER = {"memory_model": {"a": 1.0, "b": 2.0, "points": [[6, 10], [30, 58]]},
         "full_model_peak_bytes": 58, "probe_peak_bytes": 7,
         "budgets": [14, 29], "layers": [4, 12]}  # the earlier run's own sizing


def cfg_with(path: str) -> SimpleNamespace:
    return SimpleNamespace(fedpruner=FedPrunerSettings(calibration=path))


def test_a_given_calibration_supplies_the_measurements_only(tmp_path):
    given = tmp_path / "earlier" / "budgets.json"
    given.parent.mkdir()
    given.write_text(json.dumps(LAYER))
    notes = calibration(cfg_with(str(given)), tmp_path / "run" / "budgets.json", "memory_model")
    assert notes == {k: LAYER[k] for k in ("memory_model", "full_model_peak_bytes", "probe_peak_bytes")}


def test_the_runs_own_calibration_wins_and_none_means_measure(tmp_path):
    own = tmp_path / "budgets.json"
    assert calibration(cfg_with(""), own, "memory_model") is None
    own.write_text(json.dumps({"memory_model": {"a": 9}}))
    assert calibration(cfg_with(str(tmp_path / "absent.json")), own, "memory_model") == {
        "memory_model": {"a": 9}}


def test_a_calibration_of_the_other_granularity_is_refused(tmp_path):
    given = tmp_path / "budgets.json"
    given.write_text(json.dumps(LAYER))
    with pytest.raises(ValueError, match="holds no block_memory_model .*FedPruner run"):
        calibration(cfg_with(str(given)), tmp_path / "run.json", "block_memory_model")


def test_preflight_refuses_a_missing_or_foreign_calibration(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_calibration(load_config(None, ["method=fedpruner",
                                             f"fedpruner.calibration={tmp_path / 'x.json'}"]))
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "budgets.json").write_text(json.dumps(LAYER))
    load_config(None, ["method=fedpruner", "batch_size=4"]).save(earlier / "config.toml")
    same = load_config(None, ["method=fedpruner", "batch_size=4",
                              f"fedpruner.calibration={earlier / 'budgets.json'}"])
    check_calibration(same)
    with pytest.raises(ValueError, match="measured with other batch_size"):
        check_calibration(load_config(None, ["method=fedpruner", "batch_size=8",
                                             f"fedpruner.calibration={earlier / 'budgets.json'}"]))


def test_a_reused_probe_peak_needs_the_same_probe_settings(tmp_path):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "budgets.json").write_text(json.dumps({**LAYER, "probe_peak_bytes": 2**28}))
    load_config(None, ["method=fedpruner", "fedpruner.probe_dtype=bfloat16"]).save(earlier / "config.toml")
    given = f"fedpruner.calibration={earlier / 'budgets.json'}"
    check_calibration(load_config(None, ["method=fedpruner", "fedpruner.probe_dtype=bfloat16", given]))
    with pytest.raises(ValueError, match="other fedpruner.probe_dtype"):
        check_calibration(load_config(None, ["method=fedpruner", given]))
    with pytest.raises(ValueError, match="probe_dtype must be one of"):
        load_config(None, ["method=fedpruner", "fedpruner.probe_dtype=float16"])
