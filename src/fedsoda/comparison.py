"""The comparison table (the FedSODA paper's Table 2 layout) and plots, from finished runs.

A run folder holds ``summary.json`` and ``metrics.jsonl`` (written by `fedsoda run`); runs of
the same method (different seeds) are pooled into a mean and a spread.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from fedsoda.clock_report import plot_accuracy_time, time_table
from fedsoda.methods import ORDER, RECIPES, TITLES
from fedsoda.methods.hier_settings import VARIANTS, variant
from fedsoda.spread import cell, mean_spread, percent

# FedPruner+ is FedPruner's block granularity, a row of its own; HierFedLoRA's baselines and
# ablations are settings of it, each a row after it.
ROWS = (*ORDER[: ORDER.index("fedpruner") + 1], "fedpruner_plus",
        *[name for name in ORDER[ORDER.index("fedpruner") + 1:] if name != "hierfedlora"],
        *VARIANTS)


# A row of runs with another setting: "fedsoda @ nf4", "fedsoda @ no pre-alignment".
SETTING = " @ "


# What an alignment ablation leaves out, in the order of the paper's ablation tables.
LEFT_OUT = ("no pre-alignment", "no realignment")


def paper_rank(method: str) -> tuple[int, int, str]:
    """Position in the paper's table (methods it does not have come last), each method's
    other settings after its own row: wire formats, then its ablations as the paper orders
    them (one step left out, then both)."""
    base, _, setting = method.partition(SETTING)
    return ((ROWS.index(base) if base in ROWS else len(ROWS)),
            sum(step in setting for step in LEFT_OUT), setting)


def title(row: str) -> str:
    base, _, setting = row.partition(SETTING)
    return TITLES.get(base, base) + (f" ({setting})" if setting else "")


def ablation(summary: dict) -> list[str]:
    """The alignment steps a recipe method's run left out (the FedSODA paper's ablation)."""
    recipe = RECIPES.get(summary["method"])
    if recipe is None:
        return []
    left_out = (recipe.pre_align and not summary.get("pre_align", True),
                recipe.realign != "never" and summary.get("realign_every") == 0)
    return [step for step, out in zip(LEFT_OUT, left_out, strict=True) if out]


def alignment(summary: dict) -> list[str]:
    """How a run aligned, where not on WikiText-2 (``align.data``, ``align.match_epochs``), and
    whether the server fitted the full LLM's threshold on kept-back rows (``align.calibrate``)."""
    parts = []
    if summary.get("align_data", "wikitext") != "wikitext":
        matched = summary.get("match_epochs", 0)
        parts.append("aligned on task rows" + (f", gradient matching {matched} epochs" if matched else ""))
    if summary.get("calibrate"):
        parts.append("threshold fitted on kept-back rows")
    return parts


def row_of(summary: dict) -> str:
    """The table row a run belongs to: its method, FedPruner+ apart from FedPruner, and a
    row of its own for each alignment ablation, wire format other than fp32 and DP setting."""
    if summary["method"] == "hierfedlora":
        base = variant(len(summary["groups"]), summary["grouping"], summary["tau_setting"],
                       summary["depth_setting"])
    else:
        base = "fedpruner_plus" if summary.get("granularity") == "block" else summary["method"]
    wire, dp = summary.get("wire", "fp32"), summary.get("dp")
    variants = ablation(summary) + alignment(summary) + ([] if wire == "fp32" else [wire]) + (
        [f"DP clip {dp['clip']:g}, sigma {dp['noise']:g}"] if dp else [])
    return f"{base}{SETTING}{', '.join(variants)}" if variants else base


def read_run(folder: Path | str) -> dict:
    """A finished run: its summary and its per-round metrics."""
    folder = Path(folder)
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{folder} is not a finished run (no summary.json); finish it "
                                f"with `fedsoda run --resume {folder}`")
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    return {"folder": str(folder), "summary": json.loads(summary_path.read_text()),
            "metrics": metrics}


def per_client_comm(summary: dict) -> float:
    """Parameters one client sends and receives in a mean round (the paper's per-round count)."""
    return summary["comm_params_per_round"] / summary["clients_per_round"]


def table_rows(runs: list[dict]) -> list[dict]:
    """One row per method: accuracy mean and spread over seeds, and the cost columns."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        by_method[row_of(run["summary"])].append(run["summary"])
    settings = {(s["task"], s["model"], s.get("partition"), s["rounds"]) for s in
                (r["summary"] for r in runs)}
    if len(settings) > 1:
        raise ValueError(f"runs differ in task, model, partition or rounds: {sorted(map(str, settings))}; "
                         "compare runs of one setting at a time")
    rows = []
    for method in sorted(by_method, key=paper_rank):
        group = by_method[method]
        accuracy = mean_spread([s["accuracy"] for s in group])
        sub = mean_spread([s["accuracy_sub"] for s in group])
        first = group[0]
        rows.append({
            "method": method, "seeds": sorted(s.get("seed", 0) for s in group),
            "pruning": first.get("pruning"), "pre_align": first.get("pre_align"),
            "realign": first.get("realign"), "accuracy": accuracy[0], "accuracy_spread": accuracy[1],
            "accuracy_sub": sub[0], "accuracy_sub_spread": sub[1],
            "trainable_params": first["trainable_params"],
            "comm_params_per_round_per_client": statistics.fmean(per_client_comm(s) for s in group),
            "comm_bytes_total": statistics.fmean(s["comm_bytes_total"] for s in group),
            "comm_bytes_per_round_per_client": statistics.fmean(
                s["comm_bytes_total"] / s["rounds"] / s["clients_per_round"] for s in group),
            "client_model_bytes": first["client_model_bytes"],
            "client_peak_memory_bytes": statistics.fmean(s["client_peak_memory_bytes"] for s in group),
            "wall_seconds": statistics.fmean(s["wall_seconds"] for s in group),
        })
    return rows


def _count(value: float) -> str:
    return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}K"


def _size(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def _traffic(value: float) -> str:
    return f"{value / 2**20:.2f} MiB" if value >= 2**20 else f"{value / 2**10:.1f} KiB"


def markdown_table(rows: list[dict], runs: list[dict]) -> str:
    """Table 2 of the FedSODA paper, for our model: one line per method."""
    first = runs[0]["summary"]
    mark = {True: "✓", False: "", None: "?"}
    lines = [
        f"{first['model']}, {first['task']}, {first['clients']} clients "
        f"({first['clients_per_round']} a round), {first.get('partition', 'iid')}, "
        f"{first['rounds']} rounds; accuracy of the full LLM with the plugged adapter on "
        f"{first['eval_examples']} validation examples, mean ± spread (sample std) over seeds.",
        "",
        "| Method | Pruning | Pre-align | Realign | Accuracy | Sub-model acc. | # Tr. Params "
        "| # Comm. Params (/round/client) | Comm. bytes (/round/client) | Client model size "
        "| Client peak memory | Seeds |",
        "|---|:-:|:-:|:-:|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {title(row['method'])} | {mark[row['pruning']]} "
            f"| {mark[row['pre_align']]} | {mark[row['realign']]} "
            f"| {percent(row['accuracy'], row['accuracy_spread'])} "
            f"| {percent(row['accuracy_sub'], row['accuracy_sub_spread'])} "
            f"| {_count(row['trainable_params'])} | {_count(row['comm_params_per_round_per_client'])} "
            f"| {_traffic(row['comm_bytes_per_round_per_client'])} "
            f"| {_size(row['client_model_bytes'])} | {_size(row['client_peak_memory_bytes'])} "
            f"| {','.join(map(str, row['seeds']))} |")
    return "\n".join(lines) + "\n"


# Threshold-free figures of the last evaluation, where the runs recorded them: the cell's
# header and how a mean of the values is printed.
# name -> (column, scale, decimals, with the seeds' spread): the figures of the last round.
FINAL_FIGURES = {"best_threshold_accuracy": ("best-threshold acc.", 100, 1, True),
                 # align.calibrate: the margin cut where it is right most often on the rows the
                 # server keeps back
                 "calibrated_accuracy": ("calibrated acc.", 100, 1, True),
                 "auc": ("AUC", 1, 3, True),
                 # fedsoda.fidelity: the client model's adapter gradient against the full LLM's,
                 # under the answer loss and under the pairwise ranking loss
                 "grad_cosine": ("grad. cosine", 1, 2, False),
                 "ranking_cosine": ("ranking cosine", 1, 2, False)}
# Figures that get a column only where some run recorded them (a setting most runs lack).
WHERE_RECORDED = {"calibrated_accuracy"}


def _evaluated(metrics: list[dict]) -> dict[int, dict]:
    """A run's evaluated rounds by number, the probe's cosines lifted to the top."""
    def cosines(fidelity: dict) -> dict:
        ranking = fidelity.get("ranking", {})
        return {"grad_cosine": fidelity["cosine"]} | (
            {"ranking_cosine": ranking["cosine"]} if "cosine" in ranking else {})

    return {m["round"]: m | (cosines(m["fidelity"]) if "fidelity" in m else {})
            for m in metrics if "accuracy" in m}


def _final_cell(values: list[float], scale: float, decimals: int, spread: bool) -> str:
    """Mean over seeds, with the sample s.d. where asked and there are several seeds."""
    mean, sd = mean_spread(values)
    return cell(mean, sd if spread else None, scale, decimals)


def rounds_table(runs: list[dict]) -> str:
    """Accuracy by evaluation round, and how the final adapter decides, one line per method.

    Accuracy cuts the option margin at 0. The best-threshold accuracy and the AUC of that
    margin (``evaluate.options.margin_report``) tell a better ranking from a moved threshold;
    the option shares say where the threshold went. Each cell is a mean over the method's
    seeds; best-threshold accuracy and AUC also give the seeds' sample s.d.
    """
    by_method: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        by_method[row_of(run["summary"])].append(_evaluated(run["metrics"]))
    rounds = sorted(set.intersection(*(set(e) for group in by_method.values() for e in group)))
    if not rounds:
        raise ValueError("the runs share no evaluation round")
    lasts = [e[rounds[-1]] for group in by_method.values() for e in group]
    figures = {key: figure for key, figure in FINAL_FIGURES.items()
               if key not in WHERE_RECORDED or any(key in last for last in lasts)}
    header = [f"round {r}" for r in rounds] + [figure[0] for figure in figures.values()]
    lines = ["| Method | " + " | ".join(header) + " | option shares (last round) |",
             "|---|" + "---|" * (len(header) + 1)]
    for method in sorted(by_method, key=paper_rank):
        group = by_method[method]
        cells = [f"{100 * statistics.fmean(e[r]['accuracy'] for e in group):.1f}" for r in rounds]
        last = [e[rounds[-1]] for e in group]
        for key, (_, *shown) in figures.items():
            recorded = all(key in entry for entry in last)
            cells.append(_final_cell([entry[key] for entry in last], *shown) if recorded else "–")
        if all("option_shares" in entry for entry in last):
            options = last[0]["option_shares"]
            cells.append(", ".join(
                f"{option} {100 * statistics.fmean(e['option_shares'][option] for e in last):.0f}%"
                for option in options))
        else:
            cells.append("–")
        lines.append(f"| {title(method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean_peak(summaries: list[dict], k: int) -> float:
    """Mean measured peak of ``k`` layers over the runs that had clients of ``k`` layers."""
    return statistics.fmean(s["by_capacity"][str(k)]["client_peak_memory_bytes"] for s in summaries
                            if str(k) in s["by_capacity"])


def tier_peaks(summary: dict) -> dict[float, int]:
    """Budget tier (budget / full-model peak, to 0.01) -> the largest measured training-step
    peak of its clients: from each client and round (FedPruner, FedPruner+), else from each
    client's layer count (FedRA by budgets, FedLoRA-exclusive: a client of 0 layers trains
    nothing). Empty without budgets. By tier, not by layers held: a FedPruner+ 50% client
    touches all 30 layers with half their blocks and would share the full model's entry."""
    if "budgets_bytes" not in summary:
        return {}
    full, budgets = summary["full_model_peak_bytes"], summary["budgets_bytes"]
    if "clients_by_round" in summary:
        peaks = [(int(pid), entry["peak_bytes"]) for clients in summary["clients_by_round"].values()
                 for pid, entry in clients.items()]
    else:
        by = summary["by_capacity"]
        peaks = [(pid, by[str(k)]["client_peak_memory_bytes"])
                 for pid, k in enumerate(summary["client_layer_counts"]) if k]
    out: dict[float, int] = {}
    for pid, peak in peaks:
        tier = round(budgets[pid] / full, 2)
        out[tier] = max(out.get(tier, 0), peak)
    return out


def _tier_cell(group: list[dict]) -> str:
    """Per tier, the mean over seeds of its largest peak, and that against the tier's budget."""
    tiers = [tier_peaks(s) for s in group]
    full = [s["full_model_peak_bytes"] for s in group if "full_model_peak_bytes" in s]
    if not full:
        return "–"
    cells = []
    for tier in sorted({t for found in tiers for t in found}):
        peak = statistics.fmean(found[tier] for found in tiers if tier in found)
        cells.append(f"{100 * tier:.0f}%: {peak / 2**20:.0f} MiB "
                     f"({peak / statistics.fmean(full):.3f}x full)")
    return ", ".join(cells) or "–"


def memory_table(runs: list[dict]) -> str:
    """For runs whose clients hold different sub-models (FedRA, FedPruner, FedLoRA-exclusive):
    each layer count's measured training-step peak, each budget tier's largest, the
    similarity probe's, and the largest peak/budget ratio any client reached in any round
    (means over seeds); empty otherwise."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        if "by_capacity" in run["summary"]:
            by_method[row_of(run["summary"])].append(run["summary"])
    if not by_method:
        return ""
    lines = ["| Method | measured peak by layers held | largest peak by budget | similarity probe "
             "| max peak/budget |", "|---|---|---|---|---|"]
    for method in sorted(by_method, key=paper_rank):
        group = by_method[method]
        counts = sorted({int(k) for s in group for k in s["by_capacity"]})
        peaks = ", ".join(f"{k}: {_mean_peak(group, k) / 2**20:.0f} MiB" for k in counts)
        probe = [s["probe_peak_bytes"] for s in group if "probe_peak_bytes" in s]
        ratio = [s["max_peak_over_budget"] for s in group if "max_peak_over_budget" in s]
        lines.append(f"| {title(method)} | {peaks} | {_tier_cell(group)} "
                     f"| {f'{statistics.fmean(probe) / 2**20:.0f} MiB' if probe else '–'} "
                     f"| {f'{max(ratio):.3f}' if ratio else '–'} |")
    return "\n".join(lines) + "\n"


def plot_comparison(runs: list[dict], path: Path) -> None:
    """Accuracy against rounds and against cumulative bytes (down + up), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(10, 3.6))
    colours = {m: f"C{i}" for i, m in enumerate(ROWS)}
    labelled = set()
    for run in sorted(runs, key=lambda r: paper_rank(row_of(r["summary"]))):  # legend order
        method = row_of(run["summary"])
        total, points = 0, []
        for m in run["metrics"]:
            total += m["bytes_down"] + m["bytes_up"]
            if "accuracy" in m:
                points.append((m["round"], total / 2**20, m["accuracy"]))
        label = None if method in labelled else title(method)
        labelled.add(method)
        style = {"color": colours.get(method), "marker": "o", "label": label}
        by_round.plot([p[0] for p in points], [p[2] for p in points], **style)
        by_bytes.plot([p[1] for p in points], [p[2] for p in points], **style)
    by_round.set_xlabel("round")
    by_bytes.set_xlabel("cumulative MiB sent (down + up, all clients)")
    by_bytes.set_xscale("log")
    for axis in (by_round, by_bytes):
        axis.set_ylabel("accuracy (full LLM + adapter)")
        axis.grid(alpha=0.3)
    by_round.legend()
    first = runs[0]["summary"]
    figure.suptitle(f"{first['model']} on {first['task']}, {first.get('partition', 'iid')}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def rejected_note(runs: list[dict]) -> str:
    """A line per run that lost replies (a client error, a deadline, a screened reply): its
    rounds trained on fewer clients than the config says, which a mean over seeds would hide
    (a seed whose clients Ray killed for memory from round 13 on lost 32 of 100 replies)."""
    lines = []
    for run in runs:
        lost = {m["round"]: len(m.get("rejected") or []) for m in run["metrics"] if m.get("rejected")}
        if lost:
            rounds = ", ".join(f"{r}: {n}" for r, n in sorted(lost.items()))
            lines.append(f"- {run['folder']}: {sum(lost.values())} rejected replies (by round: {rounds})")
    return ("\nRuns that lost replies (see each run's metrics.jsonl for why):\n\n"
            + "\n".join(lines) + "\n") if lines else ""


def write_report(run_folders: list[Path | str], out: Path | str) -> list[dict]:
    """``table.md``, ``table.json`` and ``compare.png`` for the given finished runs."""
    if not run_folders:
        raise ValueError("no run folders given")
    runs = [read_run(folder) for folder in run_folders]
    rows = table_rows(runs)
    memory = memory_table(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(
        markdown_table(rows, runs) + "\nAccuracy (%) of the full LLM + adapter by round; for the "
        "last round also the accuracy at the option margin's best threshold (and, where a run "
        "fitted one on its kept-back rows, at that threshold), the margin's AUC and "
        "how often each option won (means over seeds):\n\n" + rounds_table(runs)
        + (f"\nClient memory (CPU peak RSS of a training step in a fresh process); the largest "
           f"peak/budget is over every client and round of every seed:\n\n{memory}" if memory else "")
        + rejected_note(runs))
    (out / "table.json").write_text(json.dumps({"rows": rows, "runs": [r["folder"] for r in runs]},
                                               indent=2) + "\n")
    plot_comparison(runs, out / "compare.png")
    timed = time_table(runs, row_of, paper_rank)
    if timed:  # HierFedLoRA and its baselines: time to accuracy on the simulated clock
        with open(out / "table.md", "a") as handle:
            handle.write("\nTime to accuracy on the simulated device tiers:\n\n" + timed)
        plot_accuracy_time(runs, out / "accuracy_time.png", row_of, paper_rank)
    return rows
