"""HierFedLoRA's settings (the ``[hierfedlora]`` table of a run config): a light module, so
that the config and the CLI can read them without loading torch.

Every default is the method notes' (``hierfedlora-method.md``), which reconstruct the paper
from its abstract. The comparison's baselines are settings of the same method, so that they
run on the same runtime, device tiers and simulated clock:

- FedLoRA (flat FedAvg, LoRA on every layer): ``groups = 1, tau = "1", depth = "full"``;
- depth-only flat FedLoRA (LEGEND-style): ``groups = 1, tau = "1", depth = "device"``;
- group-based FedLoRA (fixed tau, full depth): ``tau = "2", depth = "full"``;
- ablations: ``grouping = "random"``; ``tau = "2"`` (depth optimised); ``depth = "full"``
  (tau optimised).
"""

from __future__ import annotations

from dataclasses import dataclass

GROUPINGS = ("near_iid", "random")
DEPTH_GRIDS = ("quarters", "every")
WEIGHTS = ("size", "size_tau")


def parse_tiers(spec: str) -> list[tuple[float, float, float]]:
    """``"SPEED:MBPS:SHARE,..."`` -> ``[(speed, bytes_per_second, share), ...]``; speeds are
    relative to this machine (1.0: a step takes what it measured here), shares sum to 1."""
    tiers = []
    for part in spec.split(","):
        fields = part.strip().split(":")
        try:
            speed, mbps, share = (float(f) for f in fields)
        except ValueError:
            raise ValueError(f"hierfedlora.tiers: {part.strip()!r} is not SPEED:MBPS:SHARE "
                             "(e.g. 1.0:20:0.2)") from None
        if min(speed, mbps, share) <= 0:
            raise ValueError(f"hierfedlora.tiers: speed, bandwidth and share must be > 0 in "
                             f"{part.strip()!r}")
        tiers.append((speed, mbps * 1e6, share))
    if abs(sum(t[2] for t in tiers) - 1.0) > 1e-6:
        raise ValueError(f"hierfedlora.tiers: the shares must sum to 1, got "
                         f"{sum(t[2] for t in tiers):g}")
    return tiers


def _choice(value: str, what: str, words: tuple[str, ...]) -> None:
    if value in words or (value.isdigit() and int(value) >= 1):
        return
    raise ValueError(f"hierfedlora.{what} must be one of {words} or a whole number >= 1, "
                     f"got {value!r}")


@dataclass(frozen=True)
class HierFedLoRASettings:
    """Groups, intra-group frequency, depth and the simulated devices (method notes 2-3)."""

    groups: int = 4  # M near-IID groups (the notes: 8 for 80 devices, 10 per group)
    grouping: str = "near_iid"  # min-max KL (greedy + swaps), or "random" (the ablation)
    label_noise: float = 0.0  # Laplace scale added to the declared label histograms
    # Intra-group rounds per global round: "auto" (joint optimisation) or one number for all.
    tau: str = "auto"
    # Layers fine-tuned, counted from the output: "auto" (joint optimisation), "full", a
    # number, or "device" (each device its own, from its speed: LEGEND-style depth-only).
    depth: str = "auto"
    tau_max: int = 4
    kl_ref: float = 0.1  # nats: a group this far from the global labels gets tau = 1
    gamma: float = 0.5  # progress per round grows as (depth / L) ** gamma
    depth_grid: str = "quarters"  # candidate depths: ceil(L/4, L/2, 3L/4), L; or "every"
    # Simulated devices: speed relative to this machine, link MB/s, share of the devices.
    tiers: str = "1.0:20:0.2,0.5:10:0.5,0.25:5:0.3"
    # Each device's speed varies from round to round by a lognormal factor of this sigma;
    # the solver sees an exponential average (weight 0.5) of the speeds seen so far.
    jitter: float = 0.1
    weights: str = "size"  # global aggregation: group examples N_m, or N_m * tau_m
    # Measured step time and peak per depth (JSON from a run folder's timings.json); ""
    # measures once on this machine and keeps the figures in the model cache.
    timings: str = ""

    def __post_init__(self) -> None:
        if self.groups < 1 or self.tau_max < 1 or self.kl_ref <= 0 or self.gamma <= 0:
            raise ValueError("hierfedlora: groups and tau_max must be >= 1, kl_ref and gamma > 0")
        if self.grouping not in GROUPINGS or self.depth_grid not in DEPTH_GRIDS \
                or self.weights not in WEIGHTS:
            raise ValueError(f"hierfedlora: grouping must be one of {GROUPINGS}, depth_grid one "
                             f"of {DEPTH_GRIDS}, weights one of {WEIGHTS}")
        if self.label_noise < 0 or self.jitter < 0:
            raise ValueError("hierfedlora: label_noise and jitter must be >= 0")
        _choice(self.tau, "tau", ("auto",))
        _choice(self.depth, "depth", ("auto", "full", "device"))
        if self.depth == "device" and self.tau == "auto":
            raise ValueError("hierfedlora: depth = \"device\" gives every device its own depth; "
                             "set tau to a number (the depth-only baseline uses tau = \"1\")")
        parse_tiers(self.tiers)


# The comparison's rows for HierFedLoRA and the baselines and ablations made of its settings
# (module docstring), with their titles.
VARIANTS = {"hierfedlora": "HierFedLoRA", "hier_flat": "FedLoRA (flat)",
            "hier_depth_only": "FedLoRA, depth only", "hier_group": "Group FedLoRA",
            "hier_random_groups": "HierFedLoRA, random groups",
            "hier_fixed_tau": "HierFedLoRA, fixed tau", "hier_fixed_depth": "HierFedLoRA, fixed depth",
            "hier_other": "HierFedLoRA, other settings"}


def variant(groups: int, grouping: str, tau: str, depth: str) -> str:
    """Which row of ``VARIANTS`` a run with these settings is."""
    if groups == 1:
        flat = {("1", "full"): "hier_flat", ("1", "device"): "hier_depth_only"}
        return flat.get((tau, depth), "hier_other")
    if grouping == "random":
        return "hier_random_groups" if (tau, depth) == ("auto", "auto") else "hier_other"
    return {("auto", "auto"): "hierfedlora", ("auto", "full"): "hier_fixed_depth"}.get(
        (tau, depth), "hier_group" if depth == "full" else
        "hier_fixed_tau" if depth == "auto" and tau.isdigit() else "hier_other")
