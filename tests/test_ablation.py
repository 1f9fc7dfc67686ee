"""The FedSODA paper's alignment ablation (Tables 3, 5 and 6): FedSODA with and without
pre-alignment and realignment, as run settings, `fedsoda compare` names and table rows."""

import json

import pytest

from fedsoda import cli
from fedsoda.comparison import paper_rank, row_of, title
from fedsoda.federated.config import RunConfig, load_config
from fedsoda.federated.simulation import simulate
from fedsoda.methods import RECIPES
from test_federated_sim import tiny_config

# (pre_align, realign_every) of each compare name -> the paper's check marks and our row.
FOUR = {"fedsoda": (True, 5, "fedsoda"),
        "fedsoda-no_prealign": (False, 5, "fedsoda @ no pre-alignment"),
        "fedsoda-no_realign": (True, 0, "fedsoda @ no realignment"),
        "fedsoda-no_align": (False, 0, "fedsoda @ no pre-alignment, no realignment")}


@pytest.mark.parametrize("name", FOUR)
def test_a_run_follows_the_recipe_less_what_it_turns_off(name):
    pre_align, every, row = FOUR[name]
    recipe = RECIPES["fedsoda"].as_run(pre_align, every)
    assert recipe.columns == {"pruning": True, "pre_align": pre_align, "realign": every > 0}
    assert recipe.aligns is (pre_align or every > 0)  # no public data cached for neither
    summary = {"method": "fedsoda", **recipe.columns, "realign_every": every}
    assert row_of(summary) == row


def test_the_other_recipes_keep_their_own_schedule():
    # FedOT never realigns, so its period 0 is its own row; FedBiOT realigns every round.
    assert RECIPES["fedot"].as_run(True, 0) == RECIPES["fedot"]
    assert RECIPES["fedbiot"].as_run(True, 1) == RECIPES["fedbiot"]
    assert row_of({"method": "fedot", "pre_align": True, "realign_every": 0}) == "fedot"
    assert row_of({"method": "fedbiot", "pre_align": False, "realign_every": 1}) == \
        "fedbiot @ no pre-alignment"
    assert title("fedsoda @ no pre-alignment, no realignment") == \
        "FedSODA (no pre-alignment, no realignment)"
    # The ablation rows come right after FedSODA's own, before FedRA.
    rows = sorted(["fedra", *(row for *_, row in FOUR.values()), "fedbiot"], key=paper_rank)
    assert rows == ["fedbiot", "fedsoda", "fedsoda @ no pre-alignment", "fedsoda @ no realignment",
                    "fedsoda @ no pre-alignment, no realignment", "fedra"]


def test_only_a_method_that_pre_aligns_can_skip_it():
    assert not RunConfig(method="fedot", pre_align=False).pre_align
    for method in ("fedpetuning", "fedra", "fedpruner", "hierfedlora"):
        with pytest.raises(ValueError, match=f"pre-alignment of fedot, fedbiot, fedsoda; {method} has none"):
            load_config(None, [f"method={method}", "pre_align=false", "clients_per_round=10"])


def test_compare_runs_the_four_rows_in_folders_of_their_names(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr("fedsoda.federated.flower_run.run_with_flwr",
                        lambda cfg, resume=False: started.append((cfg.out, cfg.pre_align, cfg.realign_every)))
    monkeypatch.setattr("fedsoda.commands.compare.write_report",
                        lambda _folders, out: (out / "table.md").write_text("table\n"))
    out = tmp_path / "ablation"
    out.mkdir()
    assert cli.main(["compare", "--methods", ",".join(FOUR), "--seeds", "0,1", "--out", str(out)]) == 0
    assert started == [(str(out / f"{name}-seed{seed}"), pre, every)
                       for seed in (0, 1) for name, (pre, every, _) in FOUR.items()]


@pytest.mark.parametrize(("names", "message"), [
    ("fedsoda,fedsoda-no_pre", "an ablation is METHOD-no_prealign|no_realign|no_align"),
    ("fedot-no_realign", "fedot has no realignment period to turn off (only fedsoda"),
    ("fedbiot-no_align", "fedbiot has no realignment period"),
    ("fedpetuning-no_prealign", "fedpetuning has none to remove"),
])
def test_an_ablation_that_changes_nothing_is_refused_before_any_run(names, message, tmp_path,
                                                                    monkeypatch, capsys):
    started = []
    monkeypatch.setattr("fedsoda.federated.flower_run.run_with_flwr",
                        lambda cfg, resume=False: started.append(cfg))
    assert cli.main(["compare", "--methods", names, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err and started == []


def test_without_both_no_alignment_runs_and_the_summary_says_so(tiny_model_dir, shared_data, tmp_path):
    out = tmp_path / "no_align"
    cfg = tiny_config(tiny_model_dir, shared_data, out, rounds=2, realign_every=0,
                      pre_align=False, eval_every=0)
    summary = simulate(cfg)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not (out / "align.json").exists()  # pre-alignment skipped
    assert [r["realigned"] for r in rounds] == [False, False]
    assert (summary["pre_align"], summary["realign"]) == (False, False)
    assert row_of(summary) == "fedsoda @ no pre-alignment, no realignment"
