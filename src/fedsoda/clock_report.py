"""Time to accuracy on the simulated clock (HierFedLoRA and the baselines made of its
settings): a table and a plot from finished runs, for ``fedsoda report``.

Every round of these runs records ``simulated_clock``, the seconds the tiered devices would
have taken so far (``fedsoda.methods.hierfedlora.round_done``). The target is the accuracy
the weakest row ends at (its mean over seeds); a run reaches it at the first evaluation
whose accuracy is at or above it, so the time is only as fine as ``eval_every``. Speed-ups
are against flat FedLoRA (the ``hier_flat`` row), where it is among the runs.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from fedsoda.methods import TITLES
from fedsoda.spread import mean_spread, percent


def clocked(runs: list[dict]) -> list[dict]:
    """The runs whose rounds carry a simulated clock."""
    return [r for r in runs if r["metrics"] and "simulated_clock" in r["metrics"][-1]]


def _evaluations(run: dict) -> list[tuple[float, float]]:
    return [(m["simulated_clock"], m["accuracy"]) for m in run["metrics"] if "accuracy" in m]


def time_to(run: dict, target: float) -> float | None:
    """Simulated seconds until the run's first evaluation at or above ``target``."""
    return next((clock for clock, accuracy in _evaluations(run) if accuracy >= target - 1e-12), None)


def _by_row(runs: list[dict], row_of) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        grouped[row_of(run["summary"])].append(run)
    return grouped


def _round_depths(round_: dict) -> list[int]:
    """Every member's depth where the round records it (``member_depths``), else each
    group's deepest (runs from before it was recorded)."""
    if "member_depths" in round_:
        return [depth for group in round_["member_depths"] for depth in group]
    return round_.get("depth", [])


def _depth_peaks(group: list[dict]) -> str:
    """Measured training-step peak at each depth the row's runs trained at."""
    used = sorted({d for run in group for m in run["metrics"] for d in _round_depths(m)})
    costs = group[0]["summary"]["depth_costs"]
    return ", ".join(f"{d}: {costs[str(d)]['peak_bytes'] / 2**20:.0f} MiB" for d in used
                     if str(d) in costs)


def time_table(runs: list[dict], row_of, rank) -> str:
    """Final accuracy, simulated time to the weakest row's final accuracy and the speed-up
    against flat FedLoRA, total simulated time, LoRA bytes moved and peak by depth."""
    grouped = _by_row(clocked(runs), row_of)
    if not grouped:
        return ""
    final = {row: mean_spread([_evaluations(r)[-1][1] for r in group])
             for row, group in grouped.items()}
    target = min(mean for mean, _ in final.values())
    reach = {}
    for row, group in grouped.items():
        times = [time_to(r, target) for r in group]
        reach[row] = None if any(t is None for t in times) else statistics.fmean(times)
    flat = reach.get("hier_flat")
    lines = [f"Target: {100 * target:.1f}% (the weakest row's final accuracy); times are "
             "simulated seconds on the device tiers (means over seeds).", "",
             "| Method | final acc. | time to target | speed-up vs FedLoRA | simulated total "
             "| LoRA moved | peak by depth | Seeds |", "|---|---|---|---|---|---|---|---|"]
    for row in sorted(grouped, key=rank):
        group = grouped[row]
        speed = f"{flat / reach[row]:.2f}x" if flat and reach[row] else "–"
        total = statistics.fmean(r["metrics"][-1]["simulated_clock"] for r in group)
        moved = statistics.fmean(r["summary"]["comm_bytes_total"] for r in group)
        lines.append(
            f"| {TITLES.get(row, row)} | {percent(*final[row])} "
            f"| {f'{reach[row]:.0f} s' if reach[row] is not None else 'not reached'} | {speed} "
            f"| {total:.0f} s | {moved / 2**20:.1f} MiB | {_depth_peaks(group)} "
            f"| {','.join(str(r['summary']['seed']) for r in group)} |")
    return "\n".join(lines) + "\n"


def plot_accuracy_time(runs: list[dict], path: Path, row_of, rank) -> bool:
    """Accuracy against simulated time, one line per run; False if no run has a clock."""
    grouped = _by_row(clocked(runs), row_of)
    if not grouped:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 3.8))
    for i, row in enumerate(sorted(grouped, key=rank)):
        for j, run in enumerate(grouped[row]):
            points = _evaluations(run)
            axis.plot([p[0] / 60 for p in points], [p[1] for p in points], marker="o",
                      color=f"C{i}", label=TITLES.get(row, row) if j == 0 else None)
    axis.set_xlabel("simulated minutes on the device tiers")
    axis.set_ylabel("accuracy (full LLM + adapter)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    first = runs[0]["summary"]
    axis.set_title(f"{first['model']} on {first['task']}, {first.get('partition', 'iid')}, "
                   f"{first['clients']} devices")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
