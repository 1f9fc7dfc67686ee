"""Per-round accounting (bytes and parameters actually serialized) and the run summary."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord

from fedsoda import phases, progress_feed
from fedsoda.federated.dp import epsilon
from fedsoda.federated.messages import blobs_record, record_bytes, record_params, to_record
from fedsoda.methods.fedpruner import selection_counts

log = logging.getLogger("fedsoda.server")


class RoundLog:
    """Counts what one round sends and receives, and which replies were rejected."""

    def __init__(self, round_number: int) -> None:
        self.round = round_number
        self.bytes_down = self.bytes_up = self.params_down = self.params_up = 0
        self.bytes_join = 0  # one-time: a returning client's first emulator LoRA of this run
        self.loss_sum = self.weight_sum = 0.0
        self.rejected: list[dict] = []
        self.accepted = 0

    def down(self, record: ArrayRecord) -> None:
        self.bytes_down += record_bytes(record)
        self.params_down += record_params(record)

    def join(self, record: ArrayRecord) -> None:
        self.bytes_join += record_bytes(record)

    def up(self, record: ArrayRecord) -> None:
        self.bytes_up += record_bytes(record)
        self.params_up += record_params(record)

    def loss(self, value: float, weight: float) -> None:
        self.accepted += 1
        self.loss_sum += value * weight
        self.weight_sum += weight

    def reject(self, partition: int, reason: str) -> None:
        log.warning("round %d: rejected the reply of client %d: %s", self.round, partition, reason)
        self.rejected.append({"client": partition, "reason": reason})

    def finish(self, accuracy: float | None, realigned: bool, seconds: float,
               submodel_bytes_total: int, scored: dict | None = None) -> dict:
        """The round's metrics.jsonl entry; ``scored`` is the evaluation, on evaluation rounds."""
        entry = {"round": self.round,
                 "train_loss": self.loss_sum / self.weight_sum if self.weight_sum else None,
                 "bytes_down": self.bytes_down, "bytes_up": self.bytes_up,
                 "params_down": self.params_down, "params_up": self.params_up,
                 "realigned": realigned, "seconds": seconds,
                 "submodel_bytes_total": submodel_bytes_total, "rejected": self.rejected}
        if accuracy is not None:
            entry["accuracy"] = accuracy
        for key in ("option_shares", "auc", "best_threshold_accuracy", "calibrated_accuracy",
                    "calibration", "fidelity"):
            if scored and key in scored:
                entry[key] = scored[key]
        return entry

    def line(self, entry: dict) -> str:
        """One line for the log: round, clients, loss, accuracy, bytes sent."""
        acc = f"{entry['accuracy']:.4f}" if "accuracy" in entry else "-"
        loss = f"{entry['train_loss']:.4f}" if entry["train_loss"] is not None else "-"
        return (f"[fedsoda] round {self.round}: clients {self.accepted} accepted, "
                f"{len(self.rejected)} rejected; loss {loss} accuracy {acc} "
                f"down {self.bytes_down / 2**20:.2f} MiB up {self.bytes_up / 2**20:.2f} MiB"
                f"{' realigned' if entry['realigned'] else ''} ({entry['seconds']:.0f} s)")


class RunProgress:
    """A live bar over the rounds showing clients, loss, accuracy and bytes sent so far.

    Each finished round is also printed as a plain line above the bar, so the log of a run
    without a terminal (CI, a file) still has every figure. With a progress feed
    (``fedsoda.progress_feed``: the server runs in a process of Flower's) the bar is drawn by
    the process that reads the feed.
    """

    def __init__(self, method: str, rounds: int, done: int, sent_bytes: int = 0) -> None:
        from rich.progress import Progress

        self.sent = sent_bytes
        self.start = {"description": f"[bold]{method}[/bold] rounds", "total": rounds,
                      "done": done, "status": "waiting for the first round"}
        self.progress = None if progress_feed.active() else Progress(*phases.columns())
        if self.progress is not None:
            self.task = self.progress.add_task(
                self.start["description"], total=rounds, completed=done,
                status=self.start["status"])

    def __enter__(self) -> RunProgress:
        if self.progress is None:
            progress_feed.emit("start", name="rounds", **self.start)
            return self
        self.progress.start()
        phases.share(self.progress)  # evaluation bars become rows of this display
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is None:
            progress_feed.emit("end", name="rounds")
            return
        phases.share(None)
        self.progress.stop()

    def round_done(self, log: RoundLog, entry: dict) -> None:
        self.sent += entry["bytes_down"] + entry["bytes_up"]
        accuracy = f"{entry['accuracy']:.4f}" if "accuracy" in entry else "-"
        loss = f"{entry['train_loss']:.3f}" if entry["train_loss"] is not None else "-"
        status = (f"clients {log.accepted} | loss {loss} | accuracy {accuracy} | "
                  f"sent {self.sent / 2**20:.1f} MiB")
        line = log.line(entry)
        if self.progress is None:
            print(line, flush=True)  # Flower's log of the run keeps it too
            progress_feed.emit("advance", name="rounds", done=entry["round"], status=status,
                               line=line)
            return
        self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        self.progress.update(self.task, completed=entry["round"], status=status)


def plot_curve(metrics: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    evaluated = [m for m in metrics if "accuracy" in m]
    left.plot([m["round"] for m in evaluated], [m["accuracy"] for m in evaluated], marker="o")
    left.set_xlabel("round")
    left.set_ylabel("accuracy (full LLM + adapter)")
    right.bar([m["round"] for m in metrics], [(m["bytes_down"] + m["bytes_up"]) / 2**20 for m in metrics])
    right.set_xlabel("round")
    right.set_ylabel("MiB sent (down + up)")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_fidelity(fidelity: dict, path: Path, title: str) -> None:
    """The gradient-fidelity probe by round (``fidelity.json``): the cosine between the client
    model's and the full LLM's adapter gradients, overall (and under the option loss) and per
    adapter layer, beside the norm ratio and the emulator's relative output error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = sorted(fidelity, key=int)
    x = [int(r) for r in rounds]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(x, [fidelity[r]["cosine"] for r in rounds], marker="o", color="k", label="all")
    for layer in fidelity[rounds[0]]["layers"]:
        left.plot(x, [fidelity[r]["layers"][layer]["cosine"] for r in rounds], marker=".",
                  alpha=0.6, label=f"layer {layer}")
    if all("options" in fidelity[r] for r in rounds):  # the loss over the options alone
        left.plot(x, [fidelity[r]["options"]["cosine"] for r in rounds], marker="D", color="r",
                  linestyle="--", label="all, option loss")
    left.set_xlabel("round (0: before training)")
    left.set_ylabel("gradient cosine, client vs full")
    left.legend(fontsize=7)
    right.plot(x, [fidelity[r]["norm_ratio"] for r in rounds], marker="o", label="norm ratio")
    errors = [fidelity[r]["emulator_error"] for r in rounds]
    if None not in errors:
        right.plot(x, errors, marker="s", label="emulator output rel. error")
    right.set_xlabel("round (0: before training)")
    right.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_selection(summary: dict, path: Path, title: str) -> None:
    """FedPruner's picture: the averaged CKA matrix the groups came from, beside how often
    each layer (FedPruner+: each attention and MLP block) was chosen in each round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    similarity = np.array(summary["similarity"])
    blocks = summary.get("granularity") == "block"
    table, layers = summary["clients_by_round"], len(summary["layer_selections"])
    maps = [("attention blocks", selection_counts(table, layers, "attn")),
            ("MLP blocks", selection_counts(table, layers, "mlp"))] if blocks else [
        ("layers", selection_counts(table, layers))]
    figure, axes = plt.subplots(1, 1 + len(maps), figsize=(5 + 4.5 * len(maps), 4.4))
    shown = axes[0].imshow(similarity[0] if blocks else similarity, vmin=0, vmax=1, cmap="viridis")
    axes[0].set_title("averaged linear CKA (last probe)")
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("layer")
    figure.colorbar(shown, ax=axes[0], shrink=0.8)
    for axis, (label, counts) in zip(axes[1:], maps, strict=True):
        heat = axis.imshow(counts, aspect="auto", cmap="magma", origin="upper",
                           extent=(0.5, counts.shape[1] + 0.5, counts.shape[0] - 0.5, -0.5))
        axis.set_title(f"clients holding each of the {label}")
        axis.set_xlabel("round")
        axis.set_ylabel("layer")
        figure.colorbar(heat, ax=axis, shrink=0.8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_summary(cfg, out: Path, method, server, state, task, rows, wall_seconds: float) -> dict:
    """``summary.json``: the run's figures (same definitions for every method) and what the
    method reports of its clients (``method.summary``); also exports the adapter."""
    metrics = state.metrics
    final = next((m["accuracy"] for m in reversed(metrics) if "accuracy" in m), None)
    own = method.summary(server, cfg, state, out, task, rows)
    files = own.pop("client_download_files")
    summary = {
        "method": cfg.method, **{k: own.pop(k) for k in ("pruning", "pre_align", "realign")},
        "realign_every": cfg.realign_every, "partition": cfg.partition, "seed": cfg.seed,
        "model": cfg.model, "task": cfg.task, "rounds": cfg.rounds, "wire": cfg.wire.label,
        "clients": cfg.clients, "clients_per_round": cfg.clients_per_round,
        "accuracy": final, "accuracy_sub": own.pop("accuracy_sub"), "eval_examples": len(rows),
        "trainable_params": own.pop("trainable_params"),
        "comm_params_per_round": sum(m["params_down"] + m["params_up"] for m in metrics) / len(metrics),
        "comm_bytes_total": sum(m["bytes_down"] + m["bytes_up"] for m in metrics),
        # Sent, all clients: 0 for weights a client kept from an earlier run (content hash).
        "submodel_download_bytes": metrics[-1]["submodel_bytes_total"],
        # What one client needs to join, cached or not: its model files and the emulator LoRA.
        "client_download_bytes": record_bytes(blobs_record({str(i): p for i, p in enumerate(files)}))
        + record_bytes(to_record(state.emulator)),
        **own,
        "rejected_replies": sum(len(m["rejected"]) for m in metrics),
        "wall_seconds": wall_seconds,  # this process's: a resumed run's counts from the resume
        "round_seconds_total": sum(m["seconds"] for m in metrics),  # every round, resumed or not
    }
    if cfg.dp.enabled:  # what the most-sampled client spent, against the server
        most = max(state.releases.values(), default=0)
        summary["dp"] = {"clip": cfg.dp.clip, "noise": cfg.dp.noise, "delta": cfg.dp.delta,
                         "max_releases": most,
                         # None without noise: clipping alone guarantees nothing
                         "epsilon": epsilon(cfg.dp, most) if cfg.dp.noise else None}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_curve(metrics, out / "curve.png", f"{cfg.method} on {cfg.task}, {cfg.clients} clients")
    if (out / "fidelity.json").exists():  # offsite methods probe their gradient fidelity
        plot_fidelity(json.loads((out / "fidelity.json").read_text()), out / "fidelity.png",
                      f"{cfg.method} on {cfg.task}, seed {cfg.seed}: gradient fidelity")
    if summary.get("clients_by_round") and summary.get("similarity"):  # FedPruner
        plot_selection(summary, out / "selection.png", f"{cfg.method} on {cfg.task}, seed {cfg.seed}")
    return summary
