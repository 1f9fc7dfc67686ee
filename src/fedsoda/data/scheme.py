"""How a task's train set is split across clients, named as in a config (``iid``,
``dirichlet:0.5``); apart from the partitioners so that reading a config stays light."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PartitionScheme:
    """``iid`` or ``dirichlet:BETA`` (smaller beta, stronger label skew)."""

    kind: str = "iid"
    beta: float = 0.0

    @classmethod
    def parse(cls, text: str) -> PartitionScheme:
        if text == "iid":
            return cls("iid")
        name, _, value = text.partition(":")
        if name == "dirichlet":
            try:
                beta = float(value)
            except ValueError:
                beta = -1.0
            if beta > 0:
                return cls("dirichlet", beta)
        raise ValueError(f"partition {text!r} is not 'iid' or 'dirichlet:BETA' with BETA > 0")

    def __str__(self) -> str:
        return "iid" if self.kind == "iid" else f"dirichlet:{self.beta:g}"
