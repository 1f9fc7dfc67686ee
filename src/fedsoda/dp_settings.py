"""Client-level differential privacy on the LoRA update (the ``[dp]`` table of a run config):
a light module, so that the config and the CLI can read it without loading torch or flwr."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DPSettings:
    """Each client clips its update (the LoRA it trained minus the LoRA it was sent) to L2
    norm ``clip`` and adds Gaussian noise of standard deviation ``noise * clip`` to it before
    the update leaves the client: local DP, so the server only ever sees noised updates. The
    run reports the (epsilon, ``delta``) this gives each client against the server."""

    clip: float = 0.0  # L2 bound of one client's update (0: no DP)
    noise: float = 0.0  # noise multiplier sigma: noise std = sigma * clip
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and math.isfinite(self.noise)):
            raise ValueError(f"dp.clip and dp.noise must be finite, got {self.clip} and {self.noise}")
        if self.clip < 0 or self.noise < 0:
            raise ValueError(f"dp.clip and dp.noise must be >= 0, got {self.clip} and {self.noise}")
        if self.noise > 0 and self.clip == 0:
            raise ValueError("dp.noise needs dp.clip > 0: noise is calibrated to the clipping norm")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp.delta must be in (0, 1), got {self.delta}")

    @property
    def enabled(self) -> bool:
        return self.clip > 0
