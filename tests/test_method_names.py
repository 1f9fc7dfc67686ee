"""Method names, display titles and the paper's order come from fedsoda.methods alone; the
CLI's defaults, the comparison table and the config follow them."""

import argparse

from fedsoda import cli
from fedsoda.comparison import ROWS, paper_rank
from fedsoda.methods import ORDER, RECIPES, TITLES, fedbiot, fedot, fedpetuning, fedsoda
from fedsoda.methods.hier_settings import VARIANTS, variant

# The FedSODA paper's Table 2, top to bottom, as the paper spells the methods.
PAPER = {"fedpetuning": "FedPETuning", "fedot": "FedOT", "fedbiot": "FedBiOT", "fedsoda": "FedSODA"}


def test_titles_and_order_come_from_the_method_modules():
    assert [name for name in ORDER if name in PAPER] == list(PAPER)
    assert {name: TITLES[name] for name in PAPER} == PAPER
    assert [m.TITLE for m in (fedpetuning, fedot, fedbiot, fedsoda)] == list(PAPER.values())
    # FedPruner+ is a row of the comparison (FedPruner's block granularity), not a method;
    # so are HierFedLoRA's baselines and ablations (its settings), after HierFedLoRA.
    assert set(TITLES) == set(ORDER) | {"fedpruner_plus"} | set(VARIANTS)
    assert set(RECIPES) <= set(ORDER)
    assert [paper_rank(name) for name in PAPER] == [(0, 0, ""), (1, 0, ""), (2, 0, ""), (3, 0, "")]
    assert paper_rank("fedx") == (len(ROWS), 0, "") and set(ROWS) == set(TITLES)
    # A wire format's row sorts right after its method's fp32 row, before the next method.
    rows = sorted(["fedot", "fedsoda @ nf4", "fedsoda", "fedbiot"], key=paper_rank)
    assert rows == ["fedot", "fedbiot", "fedsoda", "fedsoda @ nf4"]
    assert ROWS[ROWS.index("fedpruner") + 1] == "fedpruner_plus"
    assert ROWS[ROWS.index("hierfedlora") + 1] == "hier_flat" and ROWS[-1] == "hier_other"


def test_hierfedlora_rows_follow_its_settings():
    rows = {(1, "near_iid", "1", "full"): "hier_flat",
            (1, "near_iid", "1", "device"): "hier_depth_only",
            (4, "near_iid", "2", "full"): "hier_group",
            (4, "random", "auto", "auto"): "hier_random_groups",
            (4, "near_iid", "2", "auto"): "hier_fixed_tau",
            (4, "near_iid", "auto", "full"): "hier_fixed_depth",
            (4, "near_iid", "auto", "auto"): "hierfedlora",
            (4, "random", "2", "full"): "hier_other"}
    for settings, row in rows.items():
        assert variant(*settings) == row, settings


def test_compare_runs_every_method_in_the_papers_order_by_default(tmp_path, monkeypatch, capsys):
    started = []
    monkeypatch.setattr("fedsoda.federated.flower_run.run_with_flwr",
                        lambda cfg, resume=False: started.append(cfg.method))

    def report(_folders, out):
        (out / "table.md").write_text("table\n")

    monkeypatch.setattr("fedsoda.commands.compare.write_report", report)
    (tmp_path / "out").mkdir()
    assert cli.main(["compare", "--out", str(tmp_path / "out")]) == 0
    assert started == list(ORDER)


def test_bench_measures_every_method_with_a_recipe_by_default(monkeypatch):
    from fedsoda.commands import bench

    asked = []
    monkeypatch.setattr(bench, "run_bench", lambda model, methods, *_a, **_k: asked.append(methods))
    args = cli.parser().parse_args(["bench"])
    bench.bench_command(args)
    bench.bench_command(argparse.Namespace(**{**vars(args), "methods": "fedot, fedsoda"}))
    assert asked == [[name for name in ORDER if name in RECIPES], ["fedot", "fedsoda"]]
    assert asked[0][:4] == list(PAPER)
