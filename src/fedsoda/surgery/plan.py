"""The pruning plan of similarity group pruning (FedSODA Algorithm 1).

Layout of the full model with ``L`` decoder layers: the adapter is the last ``L_A`` layers
(and, for FedOT, also the first ``first_adapter_layers``); the emulator is everything between,
layers ``F..L_E-1`` with ``L_E = L - L_A``. A candidate group is a window ``[l, l+n]`` inside the
emulator; the plan removes ``l+1..l+n`` from each of ``p`` pairwise disjoint windows and keeps
``l``. The windows are the ``p`` disjoint ones with the least summed distance, chosen exactly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

TOKENS = ("last", "all")  # which tokens' distances a sample contributes
LAYOUT_FIELDS = ("n", "p", "adapter_layers")  # the settings that fix which layers stay


@dataclass(frozen=True)
class PruneSettings:
    """How much to prune and how to measure layer similarity."""

    n: int = 3  # layers removed per group (window length is n + 1)
    p: int = 4  # number of groups
    adapter_layers: int = 3  # L_A, the last layers that clients train
    samples: int = 64  # public paragraphs averaged over
    token: str = "last"  # "last": last real token of each sample; "all": every real token
    seq_len: int = 128  # public samples are truncated to this many tokens

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n (layers pruned per group) must be >= 1, got {self.n}")
        if self.p < 0:
            raise ValueError(f"p (number of groups) must be >= 0, got {self.p}")
        if self.adapter_layers < 1:
            raise ValueError(f"adapter_layers must be >= 1, got {self.adapter_layers}")
        if self.token not in TOKENS:
            raise ValueError(f"token must be 'last' or 'all', got {self.token!r}")
        if self.samples < 1 or self.seq_len < 2:
            raise ValueError("samples must be >= 1 and seq_len >= 2")

    def check_model(self, num_layers: int) -> None:
        """Raise a clear error if these settings cannot prune a model of ``num_layers``."""
        if self.adapter_layers >= num_layers:
            raise ValueError(
                f"adapter_layers={self.adapter_layers} leaves no emulator in a model of "
                f"{num_layers} layers; use at most {num_layers - 1}"
            )
        emulator = num_layers - self.adapter_layers
        if self.p * (self.n + 1) > emulator:
            most = emulator // (self.n + 1)
            raise ValueError(
                f"cannot place p={self.p} disjoint windows of n+1={self.n + 1} layers in an "
                f"emulator of {emulator} layers (model {num_layers} layers, adapter "
                f"{self.adapter_layers}); with n={self.n} use p <= {most}"
            )


def choose_windows(distances: list[float], n: int, p: int) -> list[int]:
    """Starts of the ``p`` disjoint windows ``[l, l+n]`` with the least summed distance.

    ``distances[l]`` is the distance of window ``[l, l+n]``; windows must fit in
    ``len(distances) + n`` layers. Exact dynamic programme over the layer prefix:
    ``best[i][k]`` is the least cost of ``k`` windows inside layers ``0..i-1``.
    """
    num = len(distances) + n  # layers the windows may cover
    if p * (n + 1) > num:
        raise ValueError(f"{p} disjoint windows of {n + 1} layers do not fit in {num} layers")
    inf = float("inf")
    best = [[inf] * (p + 1) for _ in range(num + 1)]
    took = [[False] * (p + 1) for _ in range(num + 1)]
    for i in range(num + 1):
        best[i][0] = 0.0
    for i in range(1, num + 1):
        for k in range(1, p + 1):
            best[i][k] = best[i - 1][k]
            start = i - n - 1  # a window ending at layer i-1 starts here
            if start >= 0 and best[start][k - 1] + distances[start] < best[i][k]:
                best[i][k] = best[start][k - 1] + distances[start]
                took[i][k] = True
    starts, i, k = [], num, p
    while k > 0:
        if took[i][k]:
            starts.append(i - n - 1)
            i, k = i - n - 1, k - 1
        else:
            i -= 1
    return sorted(starts)


@dataclass(frozen=True)
class PruningPlan:
    """Which layers the sub-LLM keeps, and where each pruned window starts in both models."""

    model: str
    num_layers: int
    adapter_layers: int
    n: int
    p: int
    token: str
    samples: int
    distances: list[dict] = field(default_factory=list)  # {"start", "end", "distance"}
    groups: list[list[int]] = field(default_factory=list)  # [start, end] in the full model
    seconds: float = 0.0
    model_hash: str = ""
    data_hash: str = ""
    method: str = "sgp"  # "sgp", "uniform" (layer dropping) or "none" (full model)
    first_adapter_layers: int = 0  # FedOT trains the first layer too

    def __post_init__(self) -> None:
        self.validate()

    @property
    def emulator_layers(self) -> int:
        """End of the emulator: layers ``first_adapter_layers..emulator_layers-1``."""
        return self.num_layers - self.adapter_layers

    @property
    def full_adapter_layers(self) -> list[int]:
        """Full-model indices of the adapter layers (bottom ones first)."""
        return (list(range(self.first_adapter_layers))
                + list(range(self.emulator_layers, self.num_layers)))

    @property
    def removed_layers(self) -> list[int]:
        return sorted(i for start, end in self.groups for i in range(start + 1, end + 1))

    @property
    def kept_layers(self) -> list[int]:
        """Original indices of the sub-LLM's layers, in sub-LLM order."""
        removed = set(self.removed_layers)
        return [i for i in range(self.num_layers) if i not in removed]

    @property
    def index_map(self) -> list[list[int]]:
        """``[t_i, s_i]``: window start in the full model and its position in the sub-LLM."""
        kept = self.kept_layers
        return [[start, kept.index(start)] for start, _ in self.groups]

    @property
    def sub_num_layers(self) -> int:
        return len(self.kept_layers)

    @property
    def sub_adapter_layers(self) -> list[int]:
        """Sub-LLM indices of the adapter layers (bottom ones, then the last ``adapter_layers``)."""
        return (list(range(self.first_adapter_layers))
                + list(range(self.sub_num_layers - self.adapter_layers, self.sub_num_layers)))

    @property
    def sub_emulator_layers(self) -> list[int]:
        """Sub-LLM indices of the kept emulator layers."""
        return list(range(self.first_adapter_layers, self.sub_num_layers - self.adapter_layers))

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(
            emulator_layers=self.emulator_layers,
            removed_layers=self.removed_layers,
            kept_layers=self.kept_layers,
            index_map=self.index_map,
            sub_num_layers=self.sub_num_layers,
        )
        return data

    def save(self, path: Path | str) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path | str) -> PruningPlan:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"pruning plan {path} does not exist; make one with "
                                    "`fedsoda prune ... --out plan.json`")
        data = json.loads(path.read_text())
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})

    def validate(self) -> None:
        """Reject a plan whose groups overlap, leave the emulator, or break the layout."""
        bottom = self.first_adapter_layers
        if self.adapter_layers < 1 or bottom < 0 or self.adapter_layers + bottom > self.num_layers:
            raise ValueError(f"plan has adapter_layers={self.adapter_layers} and "
                             f"first_adapter_layers={bottom} of {self.num_layers}")
        if self.p and self.adapter_layers + bottom == self.num_layers:
            raise ValueError("a plan that prunes needs emulator layers between the adapter layers")
        last = bottom - 1
        for start, end in sorted(self.groups):
            if end - start != self.n or start <= last or end > self.emulator_layers - 1:
                raise ValueError(f"plan group [{start}, {end}] is not a disjoint window of "
                                 f"n={self.n} inside emulator layers {bottom}..{self.emulator_layers - 1}")
            last = end
        if len(self.groups) != self.p:
            raise ValueError(f"plan has {len(self.groups)} groups but p={self.p}")


def uniform_groups(num_layers: int, adapter_layers: int, n: int, p: int,
                   first_adapter_layers: int = 0) -> list[list[int]]:
    """Uniform dropping: ``p`` windows of ``n + 1`` layers spread evenly over the emulator.

    Offsite-tuning itself drops single layers at evenly spaced positions. Here the dropped
    layers come in the same blocks as SGP removes (keep each window's start, drop the ``n``
    after it), so the baselines differ from FedSODA only in where the blocks sit, and their
    alignment has the same ``p`` intermediate terms. ``first_adapter_layers`` excludes layers
    at the bottom too (FedOT trains the first layer).
    """
    lo, hi = first_adapter_layers, num_layers - adapter_layers  # emulator is [lo, hi)
    span = hi - lo
    if p == 0:
        return []
    if p * (n + 1) > span:
        raise ValueError(f"{p} windows of {n + 1} layers do not fit in {span} emulator layers")
    stride = span / p
    groups = []
    for i in range(p):
        start = lo + int(round(i * stride + (stride - n - 1) / 2))
        start = max(start, groups[-1][1] + 1 if groups else lo)
        groups.append([start, start + n])
    return groups


def uniform_plan(model: str, num_layers: int, adapter_layers: int, n: int, p: int,
                 first_adapter_layers: int = 0) -> PruningPlan:
    """The plan of Offsite-tuning layer dropping (FedOT, FedBiOT): same ``n`` and ``p`` as SGP,
    windows spread evenly instead of chosen by similarity."""
    groups = uniform_groups(num_layers, adapter_layers, n, p, first_adapter_layers)
    return PruningPlan(model=model, num_layers=num_layers, adapter_layers=adapter_layers, n=n,
                       p=p, token="", samples=0, groups=groups, method="uniform",
                       first_adapter_layers=first_adapter_layers)


def unpruned_plan(model: str, num_layers: int) -> PruningPlan:
    """No pruning, every layer trained (FedPETuning): the "sub-LLM" is the full model."""
    return PruningPlan(model=model, num_layers=num_layers, adapter_layers=num_layers, n=1, p=0,
                       token="", samples=0, method="none")
