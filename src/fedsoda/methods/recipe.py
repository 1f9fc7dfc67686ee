"""What a method is: the same runtime, data and LoRA settings, and a different recipe.

Every method of the comparison (FedSODA paper, section 6.1.3) is described by the same few
choices, so the server, the clients and the accounting run one code path for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

PRUNING = ("sgp", "uniform", "none")
REALIGN = ("every_r", "every_round", "never")


@dataclass(frozen=True)
class Recipe:
    """How a method builds the client model and keeps it aligned."""

    name: str
    pruning: str  # "sgp" (similarity groups), "uniform" (layer dropping) or "none"
    first_adapter_layers: int  # bottom layers in the adapter; the rest are the last layers
    quantization: str  # how clients hold the model: "nf4" or "bf16"
    emulator_lora: str  # server-trained LoRA: "starts" (s_i), "all" (emulator layers), "none"
    pre_align: bool  # distil the emulator on public data before training
    realign: str  # "every_r" (the run's realign_every), "every_round" or "never"

    def __post_init__(self) -> None:
        if self.pruning not in PRUNING or self.realign not in REALIGN:
            raise ValueError(f"recipe {self.name}: pruning must be in {PRUNING}, realign in {REALIGN}")
        if self.pruning == "none" and self.aligns:
            raise ValueError(f"recipe {self.name}: nothing to align without pruning")

    @property
    def aligns(self) -> bool:
        """Whether the server ever distils the emulator (and so uses the align settings)."""
        return self.pre_align or self.realign != "never"

    def as_run(self, pre_align: bool, realign_every: int) -> Recipe:
        """The recipe a run follows: without pre-alignment when the run turns it off
        (``pre_align = false``), and never realigning when its period is 0, so the paper's
        alignment ablation (Tables 3, 5, 6) is this recipe with one or both steps removed and
        its table columns say which."""
        return replace(self, pre_align=self.pre_align and pre_align,
                       realign=self.realign if realign_every else "never")

    def realign_every(self, configured: int) -> int:
        """The realignment period this method runs with (0: never)."""
        return {"every_r": configured, "every_round": 1, "never": 0}[self.realign]

    def comm_per_round(self, adapter: float, emulator: float, realign_every: int) -> float:
        """One client's steady-state traffic in a round, down plus up, in the unit given
        (parameters or bytes): the adapter LoRA both ways, and the emulator LoRA down once per
        realignment period.

        A run sends a little less: a client's first emulator LoRA goes with its one-time
        download, no realignment follows the last round, and a client that missed several
        realignments gets only the latest.
        """
        every = self.realign_every(realign_every)
        return 2 * adapter + (emulator / every if every else 0)

    def adapter_split(self, adapter_layers: int) -> tuple[int, int]:
        """``(first, last)`` adapter layers for a total of ``adapter_layers``."""
        if self.first_adapter_layers >= adapter_layers:
            raise ValueError(f"{self.name} trains {self.first_adapter_layers} bottom layer(s); it "
                             f"needs adapter_layers > {self.first_adapter_layers}, got {adapter_layers}")
        return self.first_adapter_layers, adapter_layers - self.first_adapter_layers

    @property
    def columns(self) -> dict[str, bool]:
        """The check marks of the FedSODA paper's Table 2."""
        return {"pruning": self.pruning != "none", "pre_align": self.pre_align,
                "realign": self.realign != "never"}
