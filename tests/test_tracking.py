"""Weights & Biases beside TensorBoard: the same numbers per round and in the summary, the
run named and grouped after its folders, a resumed run continuing its W&B run without
re-sending rounds it already has; a missing install is a one-line error before any run."""

import hashlib
import sys
import types

import pytest

from fedsoda.federated.tracking import Tracker


class RecordingRun:
    """What a W&B run is told (the part of ``wandb.Run`` the tracker uses)."""

    def __init__(self, step: int = 0) -> None:
        self.step, self.logged, self.summary, self.finished = step, [], {}, False

    def log(self, values: dict, step: int) -> None:
        self.logged.append((step, values))
        self.step = step + 1

    def finish(self) -> None:
        self.finished = True


class Calls(list):
    run: RecordingRun


def test_rounds_and_summary_reach_wandb(tmp_path, monkeypatch):
    calls = Calls()
    calls.run = RecordingRun()
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(
        init=lambda **kw: calls.append(kw) or calls.run))
    out = tmp_path / "compare-sst2" / "fedsoda-seed0"
    tracker = Tracker(out, enabled=False, wandb="offline", config={"lr": 3e-4})
    tracker.round({"round": 1, "accuracy": 0.8, "option_shares": {"positive": 0.6}, "wire": "nf4"})
    tracker.round({"round": 2, "train_loss": 0.5})
    tracker.summary({"rounds": 2, "final_accuracy": 0.81}, "rounds = 2\n")
    tracker.close()
    (init,) = calls
    assert (init["project"], init["name"], init["group"], init["mode"]) == (
        "fedsoda", "fedsoda-seed0", "compare-sst2", "offline")
    assert init["dir"] == str(out.resolve()) and init["config"] == {"lr": 3e-4}
    assert init["id"] == hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]
    assert calls.run.logged == [(1, {"round/accuracy": 0.8, "round/option_shares/positive": 0.6}),
                                (2, {"round/train_loss": 0.5})]
    assert calls.run.summary == {"summary/rounds": 2.0, "summary/final_accuracy": 0.81}
    assert calls.run.finished


def test_a_resumed_run_does_not_resend_rounds_wandb_has(tmp_path, monkeypatch):
    run = RecordingRun(step=3)  # W&B already holds rounds 1 and 2
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: run))
    tracker = Tracker(tmp_path / "run", enabled=False, wandb="offline")
    for number in (1, 2, 3):
        tracker.round({"round": number, "accuracy": 0.1 * number})
    assert [step for step, _ in run.logged] == [3]


def test_missing_wandb_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install -e '\.\[wandb\]'"):
        Tracker(tmp_path / "run", enabled=False, wandb="online")


def test_wandb_setting_is_checked():
    from fedsoda.federated.config import load_config

    with pytest.raises(ValueError, match="wandb must be one of"):
        load_config(None, ["wandb=yes"])


def test_real_wandb_offline_writes_its_run_file(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the optional extra '.[wandb]' is not installed")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "runs" / "fedsoda-seed0"
    out.mkdir(parents=True)
    tracker = Tracker(out, enabled=False, wandb="offline")
    tracker.round({"round": 1, "accuracy": 0.8})
    tracker.summary({"rounds": 1}, "")
    tracker.close()
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0
