"""FedPruner's settings (the ``[fedpruner]`` table of a run config): a light module, so that
the config and the CLI can read them without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

GROUPINGS = ("spectral", "contiguous")
SELECTIONS = ("argmax", "sample")
GRANULARITIES = ("layer", "block")
PROBE_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class FedPrunerSettings:
    """How FedPruner sizes, groups and picks each client's layers (method notes, section 2)."""

    # Per-client memory budgets in client order: fractions of the full-model LoRA step's
    # measured peak ("0.25x4,0.5x4,1.0x2", the default) or sizes ("200MiBx4,...").
    budgets: str = "0.25x4,0.5x4,1.0x2"
    # A sub-model's predicted peak times (1 + headroom) must fit the budget: one measurement
    # moves by 10-25 MiB between processes on SmolLM2 (bench/budgets_smollm2.json).
    headroom: float = 0.05
    reselect_every: int = 1  # rounds between similarity probes (the paper: every round)
    probe_samples: int = 16  # examples of its own data a client runs the probe on
    skip_first: bool = True  # leave each sample's first token out of CKA (attention sink)
    # How the probe stores each layer's kept rows until CKA (which runs in float64 either
    # way). bfloat16 halves what it holds; measured on BoolQ it moves no CKA entry by more
    # than 0.0012 and no spectral group (README, FedPruner+ on BoolQ).
    probe_dtype: str = "float32"
    grouping: str = "spectral"  # the paper's graph-Laplacian partition, or "contiguous" (DP)
    selection: str = "argmax"  # one layer per group: most important, or sampled by probability
    # "layer": FedPruner, whole decoder layers; "block": FedPruner+ (method notes 2.7), each
    # layer's attention and MLP blocks are units, grouped and picked separately.
    granularity: str = "layer"
    # A budgets.json of an earlier run whose measured memory model (and probe peak) this run
    # reuses instead of measuring: the full-model peak moves by up to 7% between processes
    # (892 vs 963 MB on SmolLM2), so runs meant to compare should share one ("": measure).
    calibration: str = ""

    def __post_init__(self) -> None:
        if self.grouping not in GROUPINGS or self.selection not in SELECTIONS:
            raise ValueError(f"fedpruner.grouping must be one of {GROUPINGS} and selection one "
                             f"of {SELECTIONS}, got {self.grouping!r}, {self.selection!r}")
        if not 0 <= self.headroom < 1:
            raise ValueError(f"fedpruner.headroom must be in [0, 1), got {self.headroom}")
        if self.probe_dtype not in PROBE_DTYPES:
            raise ValueError(f"fedpruner.probe_dtype must be one of {PROBE_DTYPES}, got "
                             f"{self.probe_dtype!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"fedpruner.granularity must be one of {GRANULARITIES}, got "
                             f"{self.granularity!r}")
        if min(self.reselect_every, self.probe_samples) < 1:
            raise ValueError("fedpruner.reselect_every and probe_samples must be >= 1")
