"""A run's figures as TensorBoard event files (``RUN/tensorboard``; ``tensorboard --logdir
runs/``): every number of each round's ``metrics.jsonl`` entry as it is written, and the
summary's at the end. Local and offline; a folder of `fedsoda compare` runs opens as one
TensorBoard, each run a line of its own (``METHOD-seedS/tensorboard``).

With ``wandb = "offline"`` or ``"online"`` the same numbers go to Weights & Biases (project
``fedsoda``, the run named after its folder and grouped by the folder above it, so a
comparison's runs form one group); the W&B run id is derived from the run folder, so a
resumed run continues its W&B run."""

from __future__ import annotations

import hashlib
import importlib
import math
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


def scalars(values: dict, prefix: str = "") -> dict[str, float]:
    """Every number in ``values`` under a ``/``-joined tag: nested tables flattened, a list
    as its length (``rejected/count``), booleans as 0 or 1; strings and non-finite values
    left out (TensorBoard plots finite numbers)."""
    flat: dict[str, float] = {}
    for key, value in values.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(scalars(value, f"{tag}/"))
        elif isinstance(value, list):
            flat[f"{tag}/count"] = float(len(value))
        elif isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
            flat[tag] = float(value)
    return flat


def wandb_run(out: Path, mode: str, config: dict):
    """A W&B run for the run folder ``out`` (``mode`` "offline" or "online")."""
    try:
        # Deferred: an optional extra, and its import starts nothing until init.
        wandb = importlib.import_module("wandb")
    except ImportError:
        raise ImportError(f"wandb={mode!r} needs Weights & Biases: pip install -e '.[wandb]'") from None
    folder = out.resolve()
    return wandb.init(project="fedsoda", name=folder.name, group=folder.parent.name,
                      dir=str(folder), mode=mode, config=config, resume="allow",
                      id=hashlib.sha256(str(folder).encode()).hexdigest()[:16])


class Tracker:
    """The event files of one run folder (and its W&B run); ``round`` and ``summary``
    write, ``close`` flushes."""

    def __init__(self, out: Path | str, enabled: bool = True, wandb: str = "",
                 config: dict | None = None) -> None:
        self.writer = SummaryWriter(str(Path(out) / "tensorboard")) if enabled else None
        self.wandb = wandb_run(Path(out), wandb, config or {}) if wandb else None

    def round(self, entry: dict) -> None:
        step = int(entry["round"])
        values = {f"round/{tag}": value
                  for tag, value in scalars({k: v for k, v in entry.items() if k != "round"}).items()}
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        # A resumed W&B run already holds its earlier rounds, and W&B drops steps below its own.
        if self.wandb is not None and step >= self.wandb.step:
            self.wandb.log(values, step=step)

    def summary(self, summary: dict, config_toml: str) -> None:
        step = int(summary.get("rounds", 0))
        values = {f"summary/{tag}": value for tag, value in scalars(summary).items()}
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.add_text("config", "```toml\n" + config_toml + "\n```", step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
