"""The `fedsoda prune` and `fedsoda build` commands end to end on a tiny model."""

import json

import pytest

from fedsoda import cli
from fedsoda.surgery.build import open_sub_llm


def test_impossible_settings_fail_before_the_model_loads(tiny_model_dir, shared_data, monkeypatch,
                                                         capsys):
    def no_loading(*_args, **_kwargs):
        raise AssertionError("the model must not be loaded for impossible settings")

    monkeypatch.setattr("fedsoda.surgery.sgp.load", no_loading)
    base = ["prune", "--model", str(tiny_model_dir), "--data-dir", str(shared_data)]
    for extra, message in [(["--n", "3", "--p", "3"], "use p <= 1"),  # 7-layer emulator // 4
                           (["--n", "0"], "must be >= 1"),
                           (["--adapter-layers", "12"], "leaves no emulator")]:
        assert cli.main(base + extra) == 2
        assert message in capsys.readouterr().err


def test_missing_model_and_data_are_clear(tmp_path, shared_data, capsys):
    assert cli.main(["prune", "--model", str(tmp_path / "nope.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["prune", "--model", "smollm2-135m", "--data-dir", str(tmp_path / "x")]) == 2
    assert "data folder" in capsys.readouterr().err


def test_prune_then_build(tiny_model_dir, shared_data, tmp_path):
    plan_path = tmp_path / "plan.json"
    assert cli.main(["prune", "--model", str(tiny_model_dir), "--data-dir", str(shared_data),
                     "--n", "2", "--p", "2", "--adapter-layers", "2", "--samples", "8",
                     "--seq-len", "32", "--out", str(plan_path)]) == 0
    plan = json.loads(plan_path.read_text())
    assert plan["samples"] == 8 and len(plan["distances"]) == 6 and plan["sub_num_layers"] == 6
    assert cli.main(["build", "--model", str(tiny_model_dir), "--plan", str(plan_path),
                     "--data-dir", str(shared_data), "--out", str(tmp_path / "sub"),
                     "--samples", "16", "--heldout", "8", "--seq-len", "32", "--epochs", "2",
                     "--lr", "0.01"]) == 0
    report = json.loads((tmp_path / "sub" / "align.json").read_text())
    for key in ("kl_before", "kl_after", "rep_before", "rep_after", "seconds", "storage_bytes"):
        assert key in report
    assert report["kl_after"] < report["kl_before"]
    sub = open_sub_llm(tmp_path / "sub")
    assert sub.plan.groups == plan["groups"]


def test_build_rejects_plan_for_another_model(tiny_model_dir, shared_data, tmp_path, capsys):
    plan = {"model": "m", "num_layers": 30, "adapter_layers": 3, "n": 3, "p": 1, "token": "last",
            "samples": 1, "groups": [[0, 3]]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert cli.main(["build", "--model", str(tiny_model_dir), "--plan", str(tmp_path / "plan.json"),
                     "--data-dir", str(shared_data), "--out", str(tmp_path / "sub")]) == 2
    assert "30-layer" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["prune", "--token", "middle"], ["build"]])
def test_argument_errors(argv):
    with pytest.raises(SystemExit):
        cli.main(argv)


def test_eval_applies_an_adapters_threshold_and_refuses_a_bad_one_before_loading(
        tmp_path, shared_data, monkeypatch, capsys):
    from fedsoda.commands.data_eval import adapter_cut
    from fedsoda.data.tasks import get_task

    def no_loading(*_args, **_kwargs):
        raise AssertionError("the model must not load for a bad threshold file")

    monkeypatch.setattr("fedsoda.commands.data_eval.load_for_eval", no_loading)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert adapter_cut(str(adapter), get_task("sst2")) is None  # no file: the plain score
    (adapter / "calibration.json").write_text(json.dumps(
        {"cut": -0.25, "n": 320, "options": [" negative", " positive"]}))
    assert adapter_cut(str(adapter), get_task("sst2"))["cut"] == -0.25
    base = ["eval", "--adapter", str(adapter), "--data-dir", str(shared_data)]
    assert cli.main(base + ["--task", "boolq"]) == 2
    assert "not boolq's options" in capsys.readouterr().err
    (adapter / "calibration.json").write_text('{"n": 320}')
    assert cli.main(base + ["--task", "sst2"]) == 2
    assert "is not a threshold a run wrote" in capsys.readouterr().err
    assert cli.main(["eval", "--task", "gsm8k", "--calibrate", "320", "--data-dir",
                     str(shared_data)]) == 2
    assert "two answer options" in capsys.readouterr().err
