"""Time to accuracy on the simulated clock, against a hand-made case."""

from fedsoda.clock_report import plot_accuracy_time, time_table, time_to
from fedsoda.comparison import paper_rank, row_of


def run(tau, depth, groups, seed, evals, comm=2**20):
    """A finished run's summary and metrics: ``evals`` is [(clock, accuracy), ...]."""
    summary = {"method": "hierfedlora", "groups": [[0]] * groups, "grouping": "near_iid",
               "tau_setting": tau, "depth_setting": depth, "seed": seed, "comm_bytes_total": comm,
               "depth_costs": {"8": {"peak_bytes": 100 * 2**20}, "30": {"peak_bytes": 300 * 2**20}},
               "model": "m", "task": "sst2", "partition": "dirichlet:0.5", "clients": 4}
    metrics = [{"round": i + 1, "simulated_clock": clock, "accuracy": accuracy,
                "depth": [8 if depth == "auto" else 30] * groups}
               for i, (clock, accuracy) in enumerate(evals)]
    return {"summary": summary, "metrics": metrics}


def test_time_to_the_weakest_final_accuracy_and_speed_up(tmp_path):
    # Flat FedLoRA ends at 0.80 (mean of 0.78 and 0.82), the weakest: the target. Seed 0
    # reaches it at 300 s (0.81 >= 0.80), seed 1 at 200 s (0.82): mean 250 s.
    # HierFedLoRA: 0.75 at 50 s, 0.85 at 100 s: 100 s. Speed-up 250 / 100 = 2.50x.
    flat = [run("1", "full", 1, 0, [(100, 0.70), (200, 0.79), (300, 0.81), (400, 0.78)]),
            run("1", "full", 1, 1, [(100, 0.70), (200, 0.82), (300, 0.80), (400, 0.82)])]
    hier = [run("auto", "auto", 2, 0, [(50, 0.75), (100, 0.85), (150, 0.86)], comm=3 * 2**20)]
    assert row_of(flat[0]["summary"]) == "hier_flat" and row_of(hier[0]["summary"]) == "hierfedlora"
    assert time_to(flat[0], 0.80) == 300 and time_to(hier[0], 0.9) is None
    table = time_table(flat + hier, row_of, paper_rank)
    assert "Target: 80.0%" in table
    lines = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert "| 100 s | 2.50x | 150 s | 3.0 MiB | 8: 100 MiB |" in lines["| HierFedLoRA"]
    # one seed: its final accuracy with no spread (not "86.0 ± 0.0")
    assert lines["| HierFedLoRA"].startswith("| HierFedLoRA | 86.0 | 100 s |")
    assert "| 80.0 ± 2.8 | 250 s | 1.00x | 400 s | 1.0 MiB | 30: 300 MiB | 0,1 |" in lines["| FedLoRA (flat)"]
    assert plot_accuracy_time(flat + hier, tmp_path / "t.png", row_of, paper_rank)
    assert (tmp_path / "t.png").stat().st_size > 0
    # Depth-only FedLoRA: one group whose deepest member trains 30 layers, the other 8.
    depth_only = run("1", "device", 1, 0, [(100, 0.80)])
    depth_only["metrics"][0]["member_depths"] = [[30, 8, 8]]
    depth_line = time_table(flat + [depth_only], row_of, paper_rank).splitlines()[-1]
    assert "| 8: 100 MiB, 30: 300 MiB |" in depth_line
    assert time_table([{"summary": {"method": "fedra"}, "metrics": [{"round": 1}]}], row_of,
                      paper_rank) == ""
