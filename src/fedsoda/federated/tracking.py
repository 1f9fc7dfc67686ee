"""A run's figures as TensorBoard event files (``RUN/tensorboard``; ``tensorboard --logdir
runs/``): every number of each round's ``metrics.jsonl`` entry as it is written, and the
summary's at the end. Local and offline; a folder of `fedsoda compare` runs opens as one
TensorBoard, each run a line of its own (``METHOD-seedS/tensorboard``)."""

from __future__ import annotations

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


class Tracker:
    """The event files of one run folder; ``round`` and ``summary`` write, ``close`` flushes."""

    def __init__(self, out: Path | str, enabled: bool = True) -> None:
        self.writer = SummaryWriter(str(Path(out) / "tensorboard")) if enabled else None

    def round(self, entry: dict) -> None:
        if self.writer is None:
            return
        step = int(entry["round"])
        for tag, value in scalars({k: v for k, v in entry.items() if k != "round"}).items():
            self.writer.add_scalar(f"round/{tag}", value, step)
        self.writer.flush()

    def summary(self, summary: dict, config_toml: str) -> None:
        if self.writer is None:
            return
        step = int(summary.get("rounds", 0))
        for tag, value in scalars(summary).items():
            self.writer.add_scalar(f"summary/{tag}", value, step)
        self.writer.add_text("config", "```toml\n" + config_toml + "\n```", step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
