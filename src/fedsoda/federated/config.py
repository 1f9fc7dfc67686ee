"""Run configuration: frozen dataclasses, read from TOML and ``--set key=value``, checked
before any model loads.

A TOML file has top-level keys for the run and ``[prune]`` / ``[align]`` tables::

    # fedsoda run configs/quickstart.toml
    method = "fedsoda"
    rounds = 10
    [align]
    lr = 3e-3
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from fedsoda.align.oda import AlignSettings
from fedsoda.data.partition import PartitionScheme
from fedsoda.methods import RECIPES, get_recipe
from fedsoda.surgery.plan import PruneSettings

METHODS = tuple(RECIPES)
TASKS = ("sst2", "boolq", "gsm8k")


@dataclass(frozen=True)
class RunConfig:
    """One federated run. Defaults are FedSODA's (section 6.1.2) at SmolLM2 scale."""

    method: str = "fedsoda"
    model: str = "smollm2-135m"
    task: str = "sst2"
    clients: int = 10  # N, one data partition each
    clients_per_round: int = 10
    rounds: int = 10
    local_steps: int = 10  # optimizer steps per client per round
    batch_size: int = 8
    lr: float = 1e-4  # client AdamW (0.9, 0.95)
    mu: float = 0.01  # FedProx proximal weight
    realign_every: int = 5  # r (FedSODA); 0 turns realignment off; FedOT/FedBiOT fix their own
    partition: str = "iid"  # iid | dirichlet:BETA
    seed: int = 0
    max_tokens: int = 256  # training sequence length (prompt + answer)
    # Clients keep the frozen sub-emulator's output per example between realignments
    # (fedsoda.activation_cache); results match the uncached path within float tolerance.
    activation_cache: bool = True
    eval_every: int = 5  # rounds between evaluations of the full LLM + adapter (0: end only)
    eval_limit: int = 0  # first N validation examples (0: all)
    data_dir: str = ""  # local data folder ("" -> FEDSODA_DATA_DIR, else the hub)
    out: str = "runs/default"
    prune: PruneSettings = field(default_factory=PruneSettings)
    align: AlignSettings = field(default_factory=AlignSettings)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.clients < 1 or not 1 <= self.clients_per_round <= self.clients:
            raise ValueError(f"need 1 <= clients_per_round ({self.clients_per_round}) <= clients "
                             f"({self.clients})")
        for name in ("rounds", "local_steps", "batch_size", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.mu < 0:
            raise ValueError(f"lr must be > 0 and mu >= 0, got lr={self.lr} mu={self.mu}")
        if min(self.realign_every, self.eval_every, self.eval_limit) < 0:
            raise ValueError("realign_every, eval_every and eval_limit must be >= 0")
        PartitionScheme.parse(self.partition)

    @property
    def data_folder(self) -> str | None:
        return self.data_dir or None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path | str) -> None:
        Path(path).write_text(tomli_w.dumps(self.to_dict()))


def _coerce(value: str, like):
    """Parse a ``--set`` value to the type of the field's current value."""
    if isinstance(like, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {value!r}")
        return value.lower() in ("true", "1")
    if isinstance(like, int):
        return int(value)
    if isinstance(like, float):
        return float(value)
    return value


def _apply(config: RunConfig, values: dict) -> RunConfig:
    top, nested = {}, {"prune": {}, "align": {}}
    known = {f.name for f in dataclasses.fields(RunConfig)}
    for key, value in values.items():
        section, _, name = key.partition(".")
        if name and section in nested:
            nested[section][name] = value
        elif key in nested and isinstance(value, dict):
            nested[key].update(value)
        elif key in known:
            top[key] = value
        else:
            raise ValueError(f"unknown config key {key!r}")
    for section, changes in nested.items():
        if changes:
            current = getattr(config, section)
            fields = {f.name for f in dataclasses.fields(current)}
            unknown = sorted(set(changes) - fields)
            if unknown:
                raise ValueError(f"unknown config key {section}.{unknown[0]}")
            top[section] = dataclasses.replace(current, **changes)
    return dataclasses.replace(config, **top)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                **flags) -> RunConfig:
    """Defaults, then the TOML file, then ``flags`` (CLI options), then ``--set`` pairs."""
    config = RunConfig()
    if path:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        with open(path, "rb") as handle:
            config = _apply(config, tomllib.load(handle))
    config = _apply(config, {k: v for k, v in flags.items() if v is not None})
    pairs = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        section, _, name = key.partition(".")
        owner = getattr(config, section, None) if name else config
        field_name = name or key
        if not dataclasses.is_dataclass(owner) or field_name not in {
                f.name for f in dataclasses.fields(owner)}:
            raise ValueError(f"unknown config key {key!r}")
        pairs[key] = _coerce(value, getattr(owner, field_name))
    return with_method_schedule(_apply(config, pairs))


def config_from_flat(values: dict) -> RunConfig:
    """A config from Flower's flat run config (``prune.n``-style keys for nested settings)."""
    return with_method_schedule(_apply(RunConfig(), values))


def with_method_schedule(config: RunConfig) -> RunConfig:
    """The realignment period the method runs with: FedOT never realigns, FedBiOT every round."""
    recipe = get_recipe(config.method)
    return dataclasses.replace(config, realign_every=recipe.realign_every(config.realign_every))
