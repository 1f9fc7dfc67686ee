"""The comparison table from hand-made run folders."""

import json

import pytest

from fedsoda.cli import main
from fedsoda.comparison import _tier_cell, markdown_table, read_run, rounds_table, table_rows, tier_peaks


def fake_run(folder, method, seed, accuracy, comm_per_round=2_000_000.0, **changes):
    folder.mkdir(parents=True)
    summary = {"method": method, "pruning": method != "fedpetuning", "pre_align": True,
               "realign": method in ("fedsoda", "fedbiot"), "partition": "iid", "seed": seed,
               "model": "m", "task": "sst2", "rounds": 2, "clients": 10, "clients_per_round": 5,
               "accuracy": accuracy, "accuracy_sub": accuracy - 0.1, "eval_examples": 872,
               "trainable_params": 244_224, "comm_params_per_round": comm_per_round,
               "comm_bytes_total": 100, "client_model_bytes": 92_067_328,
               "client_peak_memory_bytes": 2**20, "wall_seconds": 1.0, **changes}
    (folder / "summary.json").write_text(json.dumps(summary))
    metrics = [{"round": 1, "bytes_down": 10, "bytes_up": 10},
               {"round": 2, "bytes_down": 10, "bytes_up": 10, "accuracy": accuracy}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return folder


def test_rows_pool_seeds_into_mean_and_sample_spread(tmp_path):
    runs = [read_run(fake_run(tmp_path / f"fedsoda-{s}", "fedsoda", s, a))
            for s, a in ((0, 0.80), (1, 0.84), (2, 0.82))]
    runs.append(read_run(fake_run(tmp_path / "fedot-0", "fedot", 0, 0.75)))
    rows = table_rows(runs)
    assert [r["method"] for r in rows] == ["fedot", "fedsoda"]  # the paper's order
    soda = rows[1]
    assert soda["accuracy"] == pytest.approx(0.82)
    assert soda["accuracy_spread"] == pytest.approx(0.02)  # sqrt((0.02² + 0.02² + 0) / 2)
    assert soda["seeds"] == [0, 1, 2]
    assert soda["comm_params_per_round_per_client"] == pytest.approx(400_000)  # 2M / 5 clients
    assert rows[0]["accuracy_spread"] is None  # one seed: no spread, not a spread of 0


def test_report_writes_table_and_plot_and_refuses_mixed_settings(tmp_path, capsys):
    a = fake_run(tmp_path / "a", "fedsoda", 0, 0.81)
    # 2 rounds x 5 clients x 2.5 MiB: 2.50 MiB per client and round.
    b = fake_run(tmp_path / "b", "fedbiot", 0, 0.83, comm_per_round=5_000_000.0,
                 comm_bytes_total=2 * 5 * 5 * 2**19)
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "table.md").read_text()
    assert "| FedBiOT | ✓ | ✓ | ✓ | 83.0 | 73.0 | 244.2K | 1.00M | 2.50 MiB | 87.8 MiB |" in table
    assert "| FedBiOT | 83.0 | – | – | – |" in table  # the by-round table: its round 2
    assert (tmp_path / "report" / "compare.png").stat().st_size > 0
    c = fake_run(tmp_path / "c", "fedot", 0, 0.7, task="boolq")
    assert main(["report", str(a), str(c)]) == 2
    assert "differ in task" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no summary.json" in capsys.readouterr().err
    assert "rejected replies" not in table  # every reply of both runs was accepted


def test_the_report_names_runs_that_lost_replies(tmp_path):
    a = fake_run(tmp_path / "a", "fedsoda", 0, 0.81)
    b = fake_run(tmp_path / "b", "fedsoda", 1, 0.80)
    lost = [{"client": 5, "reason": "client error: out of memory"}, {"client": 2, "reason": "deadline"}]
    rows = [{"round": 1, "bytes_down": 10, "bytes_up": 10, "rejected": []},
            {"round": 2, "bytes_down": 10, "bytes_up": 10, "accuracy": 0.8, "rejected": lost}]
    (b / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in rows))
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "table.md").read_text()
    assert f"- {b}: 2 rejected replies (by round: 2: 2)" in table
    assert f"- {a}:" not in table


def with_rounds(folder, evaluations):
    """Replace a fake run's metrics: ``{round: extra metrics}`` for its evaluation rounds."""
    metrics = [{"round": r, "bytes_down": 10, "bytes_up": 10, **extra}
               for r, extra in sorted(evaluations.items())]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return read_run(folder)


def test_rounds_table_averages_seeds_per_round_and_reports_the_last_decision(tmp_path):
    shares = {"negative": 0.25, "positive": 0.75}
    runs = [
        with_rounds(fake_run(tmp_path / "s0", "fedsoda", 0, 0.8), {
            5: {"accuracy": 0.70}, 10: {"accuracy": 0.80, "auc": 0.90,
                                        "best_threshold_accuracy": 0.82, "option_shares": shares,
                                        "fidelity": {"cosine": 0.5, "ranking": {"cosine": 0.4}}}}),
        with_rounds(fake_run(tmp_path / "s1", "fedsoda", 1, 0.8), {
            5: {"accuracy": 0.74}, 10: {"accuracy": 0.86, "auc": 0.80, "best_threshold_accuracy": 0.86,
                                        "option_shares": {"negative": 0.45, "positive": 0.55},
                                        "fidelity": {"cosine": 0.2, "ranking": {"cosine": 0.1}}}}),
        # FedOT was also evaluated at round 7 (not shared by all runs) and recorded no margin.
        with_rounds(fake_run(tmp_path / "o0", "fedot", 0, 0.7), {
            5: {"accuracy": 0.6}, 7: {"accuracy": 0.65}, 10: {"accuracy": 0.7}}),
    ]
    lines = rounds_table(runs).splitlines()
    assert lines[0] == ("| Method | round 5 | round 10 | best-threshold acc. | AUC | grad. cosine "
                        "| ranking cosine | option shares (last round) |")
    assert lines[2] == "| FedOT | 60.0 | 70.0 | – | – | – | – | – |"
    # FedSODA: (70 + 74) / 2, (80 + 86) / 2, (82 + 86) / 2 ± sqrt(2 * 2^2) = 2.83,
    # (0.9 + 0.8) / 2 ± sqrt(2 * 0.05^2) = 0.0707, (0.5 + 0.2) / 2, (0.4 + 0.1) / 2, (25 + 45) / 2 %.
    assert lines[3] == ("| FedSODA | 72.0 | 83.0 | 84.0 ± 2.8 | 0.850 ± 0.071 | 0.35 | 0.25 "
                        "| negative 35%, positive 65% |")
    with pytest.raises(ValueError, match="no evaluation round"):
        rounds_table([with_rounds(fake_run(tmp_path / "x", "fedot", 0, 0.7), {3: {"accuracy": 0.7}}),
                      runs[0]])


def test_the_calibrated_accuracy_is_a_column_only_where_a_run_recorded_it(tmp_path):
    runs = [with_rounds(fake_run(tmp_path / f"s{seed}", "fedsoda", seed, 0.8),
                        {10: {"accuracy": 0.8, "calibrated_accuracy": value}})
            for seed, value in ((0, 0.81), (1, 0.83), (2, 0.82))]
    runs.append(with_rounds(fake_run(tmp_path / "o0", "fedot", 0, 0.7), {10: {"accuracy": 0.7}}))
    lines = rounds_table(runs).splitlines()
    assert lines[0].startswith("| Method | round 10 | best-threshold acc. | calibrated acc. | AUC |")
    # (81 + 83 + 82) / 3 = 82.0, sample s.d. 1.0
    assert lines[3].startswith("| FedSODA | 80.0 | – | 82.0 ± 1.0 | – |")
    assert lines[2].startswith("| FedOT | 70.0 | – | – | – |")
    assert "calibrated" not in rounds_table(runs[3:]).splitlines()[0]


def test_compare_refuses_a_folder_run_with_other_settings(tmp_path, capsys):
    import dataclasses

    from fedsoda.commands.compare import settings_differ
    from fedsoda.federated.config import RunConfig

    folder = tmp_path / "out" / "fedsoda-seed0"
    folder.mkdir(parents=True)
    RunConfig(method="fedsoda", lr=3e-4, out=str(folder)).save(folder / "config.toml")
    assert main(["compare", "--task", "sst2", "--methods", "fedsoda", "--rounds", "10",
                 "--out", str(tmp_path / "out")]) == 2
    assert "other settings (lr: 0.0003 -> 0.0001)" in capsys.readouterr().err

    # Alignment settings count only for methods that align.
    pet = RunConfig(method="fedpetuning")
    other_align = dataclasses.replace(pet, align=dataclasses.replace(pet.align, alpha=0.5))
    assert settings_differ(other_align, pet) == []
    soda = RunConfig(method="fedsoda")
    other_soda = dataclasses.replace(soda, align=dataclasses.replace(soda.align, alpha=0.5))
    assert settings_differ(other_soda, soda) == ["align.alpha: 0.5 -> 1.0"]
    assert settings_differ(dataclasses.replace(soda, out="elsewhere", data_dir="x"), soda) == []


def test_a_method_without_a_sub_model_accuracy_shows_a_dash(tmp_path):
    # FedRA's clients hold a different random sub-model each round: no sub-model accuracy.
    ra = fake_run(tmp_path / "fedra", "fedra", 0, 0.85, pruning=False, pre_align=False,
                  realign=False, accuracy_sub=None)
    pe = fake_run(tmp_path / "fedpetuning", "fedpetuning", 0, 0.89)
    assert main(["report", str(ra), str(pe), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "table.md").read_text()
    assert "| FedRA |  |  |  | 85.0 | – | 244.2K |" in table
    assert "| FedPETuning |  | ✓ |  | 89.0 | 79.0 |" in table


def test_fedpruner_plus_is_a_row_of_its_own_and_the_memory_table_shows_budgets(tmp_path):
    MiB = 2**20
    layered = {"pruning": False, "pre_align": False, "realign": False, "accuracy_sub": None}
    runs = [fake_run(tmp_path / "fp-0", "fedpruner", 0, 0.86, **layered, probe_peak_bytes=200 * MiB,
                     max_peak_over_budget=0.9,
                     by_capacity={"5": {"client_peak_memory_bytes": 230 * MiB},
                                  "30": {"client_peak_memory_bytes": 900 * MiB}}),
            fake_run(tmp_path / "fp-1", "fedpruner", 1, 0.88, **layered, probe_peak_bytes=210 * MiB,
                     max_peak_over_budget=0.95,
                     by_capacity={"5": {"client_peak_memory_bytes": 240 * MiB},
                                  "30": {"client_peak_memory_bytes": 920 * MiB}}),
            fake_run(tmp_path / "fpp-0", "fedpruner", 0, 0.80, **layered, granularity="block",
                     probe_peak_bytes=220 * MiB, max_peak_over_budget=0.97,
                     by_capacity={"7": {"client_peak_memory_bytes": 300 * MiB}}),
            fake_run(tmp_path / "pe-0", "fedpetuning", 0, 0.89)]
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "table.md").read_text()
    assert "| FedPruner |  |  |  | 87.0 ± 1.4 |" in table  # two seeds: 86, 88
    assert "| FedPruner+ |  |  |  | 80.0 |" in table
    # The means over seeds (235 = (230 + 240) / 2, 205 = (200 + 210) / 2) and the worst ratio.
    assert "| FedPruner | 5: 235 MiB, 30: 910 MiB | – | 205 MiB | 0.950 |" in table  # no budgets kept
    assert "| FedPruner+ | 7: 300 MiB | – | 220 MiB | 0.970 |" in table
    assert "FedPETuning | 1" not in table.split("Client memory")[1]  # no sub-models: no line


def test_a_wire_format_is_a_row_of_its_own_after_its_methods_fp32_row(tmp_path):
    runs = [read_run(fake_run(tmp_path / name, "fedsoda", 0, acc, **extra))
            for name, acc, extra in (("nf4", 0.80, {"wire": "nf4", "comm_bytes_total": 2 * 5 * 1536}),
                                     ("fp32", 0.81, {}), ("int8", 0.79, {"wire": "int8 EF none"}))]
    rows = table_rows(runs)
    assert [r["method"] for r in rows] == ["fedsoda", "fedsoda @ int8 EF none", "fedsoda @ nf4"]
    table = markdown_table(rows, runs)
    assert "| FedSODA (nf4) | ✓ | ✓ | ✓ | 80.0 |" in table and "| 1.5 KiB |" in table


def test_task_alignment_is_a_row_of_its_own_not_a_seed_of_the_quickstart(tmp_path):
    task = {"align_data": "task", "match_epochs": 8}
    runs = [read_run(fake_run(tmp_path / name, "fedsoda", seed, acc, **extra))
            for name, seed, acc, extra in (("t0", 0, 0.80, task), ("t1", 1, 0.84, task),
                                           ("w0", 0, 0.79, {"align_data": "wikitext"}),
                                           ("old", 1, 0.81, {}),
                                           ("t2", 2, 0.82, {"align_data": "task"}),
                                           ("c0", 0, 0.83, task | {"calibrate": True}))]
    rows = table_rows(runs)
    assert [(r["method"], r["seeds"]) for r in rows] == [
        ("fedsoda", [0, 1]), ("fedsoda @ aligned on task rows", [2]),
        ("fedsoda @ aligned on task rows, gradient matching 8 epochs", [0, 1]),
        ("fedsoda @ aligned on task rows, gradient matching 8 epochs, threshold fitted on "
         "kept-back rows", [0])]
    assert rows[2]["accuracy"] == pytest.approx(0.82)  # (0.80 + 0.84) / 2


def test_each_dp_setting_is_a_row_of_its_own_not_a_seed_of_the_plain_run(tmp_path):
    dp = lambda noise: {"dp": {"clip": 1.15, "noise": noise, "delta": 1e-5, "epsilon": 5.0}}  # noqa: E731
    runs = [read_run(fake_run(tmp_path / name, "fedsoda", 0, acc, **extra))
            for name, acc, extra in (("s4", 0.49, dp(4.0)), ("plain", 0.81, {}),
                                     ("s1", 0.52, dp(1.0)),
                                     ("nf4-s1", 0.5, {"wire": "nf4", **dp(1.0)}))]
    rows = table_rows(runs)
    assert [r["method"] for r in rows] == [
        "fedsoda", "fedsoda @ DP clip 1.15, sigma 1", "fedsoda @ DP clip 1.15, sigma 4",
        "fedsoda @ nf4, DP clip 1.15, sigma 1"]
    assert [r["accuracy_spread"] for r in rows] == [None] * 4  # one run a row: no false spread
    table = markdown_table(rows, runs)
    assert "| FedSODA (DP clip 1.15, sigma 4) | ✓ | ✓ | ✓ | 49.0 |" in table


def test_tracking_flattens_every_number_of_a_round():
    from fedsoda.federated.tracking import scalars

    entry = {"accuracy": 0.8, "realigned": True, "rejected": [{"client": 1}, {"client": 2}],
             "option_shares": {"negative": 0.4, "positive": 0.6}, "wire": "nf4",
             "fidelity": {"cosine": 0.5, "layers": {"27": {"cosine": 0.1}}, "emulator_error": None},
             "auc": float("nan")}
    assert scalars(entry) == {"accuracy": 0.8, "realigned": 1.0, "rejected/count": 2.0,
                              "option_shares/negative": 0.4, "option_shares/positive": 0.6,
                              "fidelity/cosine": 0.5, "fidelity/layers/27/cosine": 0.1}


def test_the_largest_peak_by_budget_tier_over_clients_and_rounds():
    MiB = 2**20
    # FedPruner+-like: budgets 25/50/100% of a 1000 MiB full-model peak; per client and round
    # its peak. The 50% client (id 1) touched every layer, as the 100% client did.
    plus = {"full_model_peak_bytes": 1000 * MiB, "budgets_bytes": [250 * MiB, 500 * MiB, 1000 * MiB],
            "clients_by_round": {"1": {"0": {"peak_bytes": 210 * MiB}, "1": {"peak_bytes": 460 * MiB}},
                                 "2": {"0": {"peak_bytes": 220 * MiB}, "2": {"peak_bytes": 1000 * MiB}}}}
    assert tier_peaks(plus) == {0.25: 220 * MiB, 0.5: 460 * MiB, 1.0: 1000 * MiB}
    # FedLoRA-exclusive-like: only the 100% client holds layers; the others train nothing.
    exclusive = {"full_model_peak_bytes": 1000 * MiB, "budgets_bytes": [250 * MiB, 1000 * MiB],
                 "client_layer_counts": [0, 30],
                 "by_capacity": {"30": {"client_peak_memory_bytes": 990 * MiB}}}
    assert tier_peaks(exclusive) == {1.0: 990 * MiB}
    assert tier_peaks({"by_capacity": {}}) == {}  # FedRA by layer counts: no budgets
    # The report's cell: per tier the mean over seeds of the largest, against the full peak.
    other = {**plus, "clients_by_round": {"1": {"0": {"peak_bytes": 240 * MiB}}}}
    assert _tier_cell([plus, other]) == ("25%: 230 MiB (0.230x full), 50%: 460 MiB (0.460x full), "
                                         "100%: 1000 MiB (1.000x full)")
