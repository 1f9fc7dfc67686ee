"""Config values of the wrong type are one-line errors naming the key, wherever they come
from: a TOML file, ``--set``, Flower's flat run config; and the CLI's flags are the
dataclasses' fields, with their defaults."""

import json

import pytest

from fedsoda import cli
from fedsoda.federated.config import config_from_flat, load_config

# (TOML line, --set pair, flat run config, the error). Expected messages written by hand.
BAD = [
    ('rounds = "ten"', "rounds=ten", {"rounds": "ten"},
     "config key 'rounds' must be an integer, got 'ten'"),
    ("rounds = true", None, {"rounds": True}, "config key 'rounds' must be an integer, got True"),
    ("clients = 2.5", "clients=2.5", {"clients": 2.5},
     "config key 'clients' must be an integer, got "),  # 2.5, or '2.5' from --set
    ("partition = 5", None, {"partition": 5}, "config key 'partition' must be a string, got 5"),
    ('lr = "fast"', "lr=fast", {"lr": "fast"}, "config key 'lr' must be a number, got 'fast'"),
    ("activation_cache = 1", "activation_cache=maybe", {"activation_cache": 1},
     "config key 'activation_cache' must be true or false, got "),
    ('[prune]\nn = "two"', "prune.n=two", {"prune.n": "two"},
     "config key 'prune.n' must be an integer, got 'two'"),
    ("[align]\nlr = false", "align.lr=x", {"align.lr": False},
     "config key 'align.lr' must be a number, got "),
    ("prune = 3", "prune=3", {"prune": 3}, "config key 'prune' is a table; set its keys"),
    ("[prune]\nwindows = 2", "prune.windows=2", {"prune.windows": 2},
     "unknown config key 'prune.windows'"),
]


@pytest.mark.parametrize(("toml", "pair", "flat", "message"), BAD)
def test_a_wrongly_typed_key_is_a_one_line_error_from_every_source(toml, pair, flat, message,
                                                                     tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(toml + "\n")
    errors = []
    with pytest.raises(ValueError) as toml_error:
        load_config(path)
    errors.append(str(toml_error.value))
    if pair:
        with pytest.raises(ValueError) as set_error:
            load_config(None, [pair])
        errors.append(str(set_error.value))
    with pytest.raises(ValueError) as flat_error:
        config_from_flat(flat)
    errors.append(str(flat_error.value))
    for error in errors:
        assert error.startswith(message) and "\n" not in error


@pytest.mark.parametrize("argv", [["--set", "rounds=ten"], ["CONFIG"]])
def test_the_cli_prints_the_key_error_on_one_line(argv, tmp_path, capsys, monkeypatch):
    def never(*_args, **_kwargs):
        raise AssertionError("the run must not start")

    monkeypatch.setattr("fedsoda.federated.flower_run.run_with_flwr", never)
    path = tmp_path / "c.toml"
    path.write_text('rounds = "ten"\n')
    argv = [str(path) if arg == "CONFIG" else arg for arg in argv]
    assert cli.main(["run", *argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == "fedsoda run: error: config key 'rounds' must be an integer, got 'ten'\n"
    assert not (tmp_path / "run").exists()


def test_an_integer_is_a_float_and_a_bool_is_a_bool(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("lr = 1\nactivation_cache = false\n[align]\nbeta = 0\n")
    cfg = load_config(path, ["mu=1"])
    assert (cfg.lr, cfg.mu, cfg.align.beta) == (1.0, 1.0, 0.0)
    assert all(isinstance(v, float) for v in (cfg.lr, cfg.mu, cfg.align.beta))
    assert cfg.activation_cache is False
    assert config_from_flat({"lr": 2, "align.lr": 1}).align.lr == 1.0


@pytest.mark.parametrize(("method", "asked", "runs"), [
    ("fedsoda", 3, 3), ("fedbiot", 3, 1), ("fedot", 3, 0), ("fedpetuning", 3, 0), ("fedra", 3, 0)])
def test_the_method_schedule_is_applied_by_the_config(method, asked, runs):
    assert load_config(None, [f"method={method}", f"realign_every={asked}"]).realign_every == runs
    assert config_from_flat({"method": method, "realign_every": asked}).realign_every == runs


def test_run_flags_are_the_run_config_fields():
    args = cli.parser().parse_args(["run", "--max-tokens", "64", "--no-activation-cache",
                                    "--clients-per-round", "3", "--lr", "0.5"])
    assert (args.max_tokens, args.activation_cache, args.clients_per_round, args.lr) == (
        64, False, 3, 0.5)
    # Not given: None, so that a config file's value stands.
    assert args.rounds is None and args.method is None and args.out is None


def test_prune_and_plan_flags_default_to_the_designs_settings():
    # DESIGN section 2: n=3, p=4, 64 samples, last token, L_A=3; a run's batch 8 x 256
    # tokens and r=5.
    prune = cli.parser().parse_args(["prune"])
    assert (prune.n, prune.p, prune.adapter_layers, prune.samples, prune.token, prune.seq_len) == (
        3, 4, 3, 64, "last", 128)
    plan = cli.parser().parse_args(["plan", "--model-config", "llama3-8b"])
    assert (plan.n, plan.p, plan.adapter_layers, plan.batch_size, plan.seq_len,
            plan.realign_every) == (3, 4, 3, 8, 256, 5)
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["prune", "--token", "middle"])


def test_run_passes_every_flag_into_the_config(tiny_model_dir, shared_data, tmp_path,
                                               monkeypatch):
    seen = []
    monkeypatch.setattr("fedsoda.federated.flower_run.run_with_flwr",
                        lambda cfg, resume=False: seen.append(cfg) or {})
    assert cli.main(["run", "--model", str(tiny_model_dir), "--data-dir", str(shared_data),
                     "--out", str(tmp_path / "run"), "--max-tokens", "64",
                     "--no-activation-cache", "--set", "prune.n=2", "--set", "prune.p=2"]) == 0
    (cfg,) = seen
    assert (cfg.max_tokens, cfg.activation_cache, cfg.prune.n) == (64, False, 2)


def test_plan_takes_the_layout_flags(tmp_path):
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--model-config", "mistral-7b", "--n", "2", "--p", "5",
                     "--adapter-layers", "4", "--out", str(out)]) == 0
    assumptions = json.loads(out.read_text())["assumptions"]
    assert (assumptions["n"], assumptions["p"], assumptions["adapter_layers"]) == (2, 5, 4)


def test_fedbiot_refuses_a_realignment_period_of_zero_instead_of_ignoring_it(tmp_path, capsys):
    # FedBiOT's recipe realigns every round; before, realign_every = 0 was silently read as 1.
    assert load_config(None, ["method=fedbiot", "realign_every=7"]).realign_every == 1
    with pytest.raises(ValueError, match="fedbiot realigns after every round by its recipe"):
        load_config(None, ["method=fedbiot", "realign_every=0"])
    out = tmp_path / "run"
    assert cli.main(["run", "--method", "fedbiot", "--realign-every", "0", "--out", str(out)]) == 2
    assert "fedsoda-no_realign" in capsys.readouterr().err and not out.exists()


def test_a_run_refuses_the_option_kl_it_could_not_apply():
    # WikiText-2 has no answers: the weight would be silently ignored.
    with pytest.raises(ValueError, match='need labelled task examples the server keeps back: '
                                         'set align.data = "task"'):
        load_config(None, ["align.option_weight=1.0"])
    with pytest.raises(ValueError, match="need labelled task examples"):
        load_config(None, ["align.calibrate=true"])
    with pytest.raises(ValueError, match="need labelled task examples"):
        load_config(None, ["align.match_epochs=2"])
    assert load_config(None, ["align.option_weight=1.0", "align.data=task"]).align.reserved == 320


def test_task_alignment_is_refused_where_it_has_nothing_to_rank_or_train(tmp_path, capsys):
    with pytest.raises(ValueError, match="gsm8k has none"):
        load_config(None, ["task=gsm8k", "align.data=task", "align.match_epochs=2"])
    with pytest.raises(ValueError, match="fedpetuning has none"):
        load_config(None, ["method=fedpetuning", "align.data=task", "align.match_epochs=2"])
    with pytest.raises(ValueError, match="align.data must be one of"):
        load_config(None, ["align.data=pile"])
    out = tmp_path / "run"
    assert cli.main(["run", "--method", "fedpruner", "--set", "align.data=task", "--set",
                     "align.match_epochs=1", "--out", str(out)]) == 2
    assert "fedpruner has none" in capsys.readouterr().err and not out.exists()
    # A threshold needs two answer options and a method whose server evaluates the full LLM.
    with pytest.raises(ValueError, match="align.calibrate cuts .* gsm8k with fedsoda has no such margin"):
        load_config(None, ["task=gsm8k", "align.data=task", "align.calibrate=true"])
    with pytest.raises(ValueError, match="fedpruner has no such margin"):
        load_config(None, ["method=fedpruner", "align.data=task", "align.calibrate=true"])
    for method in ("fedpetuning", "fedot"):
        assert load_config(None, [f"method={method}", "task=boolq", "align.data=task",
                                  "align.calibrate=true"]).align.calibrate
    # Without matching, the data setting alone is fine for any task (representation losses).
    assert load_config(None, ["task=gsm8k", "align.data=task"]).align.reserved == 320
