"""`fedsoda run` checks everything it can before Ray starts or weights load; a run that fails
the checks returns 2 with a one-line error and leaves no run folder behind."""

import shutil

import pytest
import transformers

from fedsoda import cli

OK = ["--set", "prune.n=2", "--set", "prune.p=2"]  # fits the 10-layer tiny model


@pytest.fixture
def started(monkeypatch):
    """The simulations started (a stand-in records them), and no weights may load."""
    runs = []

    def simulate(cfg, resume=False):
        runs.append((cfg, resume))
        return {}

    def no_weights(*_args, **_kwargs):
        raise AssertionError("weights must not load before the checks pass")

    monkeypatch.setattr("fedsoda.federated.flower_run.run_with_flwr", simulate)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    return runs


@pytest.fixture
def data(tmp_path, shared_data):
    """A small local data folder: 40 SST-2 rows each split, the shared WikiText-2."""
    folder = tmp_path / "data"
    (folder / "sst2").mkdir(parents=True)
    for split in ("train", "validation"):
        rows = (shared_data / "sst2" / f"{split}.jsonl").read_text().splitlines()[:40]
        (folder / "sst2" / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    shutil.copytree(shared_data / "wikitext2", folder / "wikitext2",
                    ignore=shutil.ignore_patterns("tokenized"))
    return folder


def run(tiny_model_dir, data, out, *extra) -> list[str]:
    return ["run", "--model", str(tiny_model_dir), "--data-dir", str(data), "--out", str(out),
            "--rounds", "1", *extra]


def refused(argv, capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedsoda run: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(("extra", "message"), [
    ([], "with n=3 use p <= 1"),  # the defaults, 4 windows of 4 layers, need 16 emulator layers
    (["--set", "prune.adapter_layers=10"] + OK, "leaves no emulator in a model of 10 layers"),
    (["--method", "fedot", "--set", "prune.adapter_layers=1"] + OK, "needs adapter_layers > 1"),
    (["--set", "rounds=ten"], "config key 'rounds' must be an integer, got 'ten'"),
    (["--set", "align.samples=100000"] + OK, "align.samples=100000 but WikiText-2 validation has"),
    (["--method", "fedra", "--clients", "2", "--clients-per-round", "2", "--set",
      "client_layers=4x1,12x1"],
     "every capacity must be in 1..10"),  # the tiny model has 10 layers
    (["--method", "fedra", "--clients", "3", "--clients-per-round", "3", "--set",
      "client_layers=4x2"], "lists 2 clients"),
    (["--set", "client_layers=4x10"] + OK, "client_layers is FedRA's setting"),
    (["--method", "fedra", "--clients", "2", "--clients-per-round", "2", "--set",
      "client_layers=budgets", "--set", "fedpruner.granularity=block"],
     "fedra trains whole layers: fedpruner.granularity must be \"layer\""),
    (["--method", "fedpruner", "--set", "fedpruner.budgets=0.25x4"], "budgets"),
    (["--method", "fedpruner", "--set", "fedpruner.grouping=random"], "fedpruner.grouping"),
    (["--method", "hierfedlora", "--clients", "4", "--clients-per-round", "4", "--set",
      "hierfedlora.depth=12"], "hierfedlora.depth 12 exceeds the model's 10 layers"),
    (["--method", "hierfedlora", "--clients", "4", "--clients-per-round", "4", "--set",
      "hierfedlora.timings=/nowhere/timings.json"], "/nowhere/timings.json does not exist"),
    (["--method", "hierfedlora", "--clients", "4", "--clients-per-round", "2"],
     "set clients_per_round = clients (4)"),
])
def test_bad_settings_stop_the_run_before_anything_starts(extra, message, tiny_model_dir, data,
                                                          tmp_path, started, capsys):
    out = tmp_path / "run"
    assert message in refused(run(tiny_model_dir, data, out, *extra), capsys)
    assert started == [] and not out.exists()


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: (d / "sst2" / "validation.jsonl").unlink(), "split 'validation' not found"),
    (lambda d: shutil.rmtree(d / "wikitext2"), "'wikitext2' split 'validation' not found"),
    (lambda d: shutil.rmtree(d), "does not exist"),
    (lambda d: add_row(d, '{"sentence": "fine", "label": "positive"}'),
     "train.jsonl:41: field 'label' is str, expected int"),
    (lambda d: add_row(d, '{"sentence": "fine", "label": 1'), "train.jsonl:41: not JSON"),
    (lambda d: add_row(d, '{"sentence": "fine", "label": 7}'), "row 41 is no sst2 example"),
])
def test_missing_or_malformed_data_stops_the_run(damage, message, tiny_model_dir, data, tmp_path,
                                                 started, capsys):
    damage(data)
    out = tmp_path / "run"
    assert message in refused(run(tiny_model_dir, data, out, *OK), capsys)
    assert started == [] and not out.exists()


def add_row(data, line: str) -> None:
    with open(data / "sst2" / "train.jsonl", "a") as handle:
        handle.write(line + "\n")


def test_sound_settings_reach_the_simulation_and_create_nothing_first(tiny_model_dir, data,
                                                                      tmp_path, started):
    out = tmp_path / "run"
    assert cli.main(run(tiny_model_dir, data, out, *OK)) == 0
    (cfg, resume), = started
    assert (cfg.out, cfg.prune.n, cfg.rounds, resume) == (str(out), 2, 1, False)
    assert not out.exists()  # the stand-in simulation wrote nothing, so nothing did


@pytest.mark.parametrize("marker", ["subllm", "checkpoint", "metrics.jsonl"])
def test_a_fresh_run_refuses_a_folder_with_another_run(marker, tiny_model_dir, data, tmp_path,
                                                       started, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text("rounds = 3\n")
    if marker.endswith(".jsonl"):
        (out / marker).write_text('{"round": 1}\n')
    else:
        (out / marker).mkdir()
    err = refused(run(tiny_model_dir, data, out, *OK), capsys)
    assert f"--resume {out}" in err and "--overwrite" in err
    assert started == [] and sorted(p.name for p in out.iterdir()) == sorted(["config.toml", marker])


def test_overwrite_empties_the_old_run_folder_first(tiny_model_dir, data, tmp_path, started,
                                                    monkeypatch):
    out = tmp_path / "run"
    (out / "subllm" / "model").mkdir(parents=True)
    (out / "config.toml").write_text("rounds = 3\n")
    (out / "metrics.jsonl").write_text('{"round": 1}\n')
    (out / "notes.txt").write_text("old\n")
    left = []
    monkeypatch.setattr("fedsoda.federated.flower_run.run_with_flwr",
                        lambda cfg, resume=False: left.extend(out.iterdir()) or {})
    assert cli.main(run(tiny_model_dir, data, out, *OK, "--overwrite")) == 0
    assert out.is_dir() and left == []


def test_overwrite_leaves_a_folder_fedsoda_did_not_write(tiny_model_dir, data, tmp_path, started,
                                                         capsys):
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)  # no config.toml beside it
    assert "no config.toml" in refused(run(tiny_model_dir, data, out, *OK, "--overwrite"), capsys)
    assert (out / "checkpoint").is_dir() and started == []


def test_resume_takes_the_saved_config_and_is_checked_too(tiny_model_dir, data, tmp_path, started,
                                                          capsys):
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / "config.toml").write_text(f'model = "{tiny_model_dir}"\ndata_dir = "{data}"\n'
                                     f'out = "{out}"\n[prune]\nn = 2\np = 2\n')
    assert cli.main(["run", "--resume", str(out)]) == 0
    (cfg, resume), = started
    assert resume and cfg.prune.p == 2
    (out / "config.toml").write_text(f'model = "{tiny_model_dir}"\nout = "{out}"\n')
    assert "use p <= 1" in refused(["run", "--resume", str(out)], capsys)
    assert "give one of them" in refused(["run", "--resume", str(out), "--overwrite"], capsys)
    assert len(started) == 1


def test_resume_runs_in_the_folder_given_and_refuses_changes_it_would_ignore(
        tiny_model_dir, data, tmp_path, started, capsys):
    out = tmp_path / "moved"
    (out / "checkpoint").mkdir(parents=True)
    # The config says the run was written elsewhere (the folder was moved since).
    (out / "config.toml").write_text(f'model = "{tiny_model_dir}"\ndata_dir = "{data}"\n'
                                     f'out = "{tmp_path / "elsewhere"}"\nrounds = 4\nlr = 0.001\n'
                                     '[prune]\nn = 2\np = 2\n')
    assert cli.main(["run", "--resume", str(out), "--rounds", "8", "--set", "eval_every=2"]) == 0
    (cfg, resume), = started
    assert (cfg.out, cfg.rounds, cfg.eval_every, resume) == (str(out), 8, 2, True)
    for extra, message in ((["--lr", "0.01"], "lr is 0.001 there, not 0.01"),
                           (["--set", "prune.n=3"], "prune.n is 2 there, not 3"),
                           (["--out", str(tmp_path / "x")], "drop --out"),
                           (["--quick"], "drop --quick")):
        assert message in refused(["run", "--resume", str(out), *extra], capsys)
    assert len(started) == 1
