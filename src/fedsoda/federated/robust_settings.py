"""How the server aggregates replies (the ``[robust]`` table of a run config): a light module,
so that the config and the CLI can read it without loading torch or flwr."""

from __future__ import annotations

from dataclasses import dataclass

RULES = ("fedavg", "median", "trimmed_mean", "krum", "multikrum")
NORM_ACTIONS = ("reject", "clip")


@dataclass(frozen=True)
class RobustSettings:
    """The aggregation rule, applied layer by layer over the replies that hold each layer,
    and a bound on how far one reply may move the global LoRA."""

    rule: str = "fedavg"  # FedAvg (weighted by examples), or one of the robust rules
    trim: float = 0.2  # trimmed_mean: the share cut off at each end, per coordinate
    malicious: int = 1  # krum / multikrum: f, the attackers the rule must withstand
    keep: int = 0  # multikrum: replies averaged (0: n - f of the n that hold a layer)
    # A reply whose RMS distance from the LoRA it was sent exceeds norm_bound times the
    # round's median is rejected or clipped to that distance (0: no bound).
    norm_bound: float = 0.0
    norm_action: str = "reject"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"robust.rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if self.norm_action not in NORM_ACTIONS:
            raise ValueError(f"robust.norm_action must be reject or clip, got {self.norm_action!r}")
        if not 0 <= self.trim < 0.5:
            raise ValueError(f"robust.trim must be in [0, 0.5), got {self.trim}")
        if self.malicious < 0 or self.keep < 0:
            raise ValueError("robust.malicious and robust.keep must be >= 0")
        if self.norm_bound and self.norm_bound < 1:
            raise ValueError(f"robust.norm_bound is a factor of the round's median distance: 0 "
                             f"(off) or >= 1, got {self.norm_bound}")
