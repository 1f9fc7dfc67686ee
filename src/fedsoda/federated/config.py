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
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from fedsoda.align.settings import AlignSettings
from fedsoda.data.scheme import PartitionScheme
from fedsoda.dp_settings import DPSettings
from fedsoda.federated.robust_settings import RobustSettings
from fedsoda.methods.assignment import BY_BUDGETS
from fedsoda.methods.hier_settings import HierFedLoRASettings
from fedsoda.methods.pruner_settings import FedPrunerSettings
from fedsoda.surgery.plan import PruneSettings
from fedsoda.wire_settings import WireSettings

TASKS = ("sst2", "boolq", "gsm8k")
WANDB_MODES = ("", "offline", "online")


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
    # false: skip the method's pre-alignment (with realign_every = 0, the FedSODA paper's
    # alignment ablation, Tables 3, 5 and 6)
    pre_align: bool = True
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
    # FedRA: layers each client can hold, "LAYERSxCOUNT,..." in client order ("": all layers).
    client_layers: str = ""
    # The most examples a client's declared count is believed to be (0: no cap); a reply
    # claiming more than its client declared at the handshake is rejected.
    max_examples: int = 0
    # Deadlines and quorum: seconds each exchange with the clients may take (0: no deadline;
    # a silent client then holds the round up to Flower's message TTL), and the fewest
    # accepted replies a round needs (at most the clients it sent to) to count; a round
    # under quorum stops the run with the last checkpoint intact.
    round_timeout: float = 0.0
    min_replies: int = 1
    # Nodes the run starts with (0: every client's); the others may connect later and join
    # at the next round's start. A sampled client not connected yet sits that round out.
    min_nodes: int = 0
    # Every round's figures as TensorBoard event files in RUN/tensorboard (fedsoda.federated.tracking).
    tensorboard: bool = True
    # The same figures to Weights & Biases (optional extra '.[wandb]'): "" off, "offline"
    # (no network; RUN/wandb, `wandb sync` uploads it later) or "online".
    wandb: str = ""
    # Flower's simulation engine (`fedsoda run`; `flwr run .` takes them as its federation
    # config): Ray resources of one client, and the CPUs Ray may use, so sim_cpus / client_cpus
    # clients train at once. On a GPU machine client_gpus = 0.5 puts two clients on a GPU.
    client_cpus: int = 1
    client_gpus: float = 0.0
    sim_cpus: int = 2
    prune: PruneSettings = field(default_factory=PruneSettings)
    align: AlignSettings = field(default_factory=AlignSettings)
    fedpruner: FedPrunerSettings = field(default_factory=FedPrunerSettings)
    hierfedlora: HierFedLoRASettings = field(default_factory=HierFedLoRASettings)
    wire: WireSettings = field(default_factory=WireSettings)  # LoRA's encoding, both ways
    robust: RobustSettings = field(default_factory=RobustSettings)  # aggregation rule, norm bound
    dp: DPSettings = field(default_factory=DPSettings)  # clipping and noise of client updates

    def _check_task_alignment(self, recipe) -> None:
        """Gradient matching and the option KL need answers to rank and an emulator LoRA."""
        from fedsoda.data.tasks import get_task  # deferred with fedsoda.methods (torch)

        align, task = self.align, get_task(self.task)
        if (align.match_epochs or align.option_weight) and not task.is_classification:
            raise ValueError(f"align.match_epochs and align.option_weight rank a task's answer "
                             f"options; {self.task} has none")
        if align.match_epochs and (recipe is None or not recipe.aligns
                                   or recipe.emulator_lora == "none"):
            raise ValueError(f"align.match_epochs trains the server's emulator LoRA; {self.method} "
                             "has none (fedsoda, fedot and fedbiot do)")
        if align.calibrate and (recipe is None or len(task.options) != 2):
            raise ValueError(f"align.calibrate cuts the full LLM's margin between two answer "
                             f"options; {self.task} with {self.method} has no such margin (sst2 "
                             "or boolq, with fedsoda, fedot, fedbiot or fedpetuning)")

    def __post_init__(self) -> None:
        # Deferred: fedsoda.methods loads torch, and `fedsoda --help` reads this module's fields.
        from fedsoda.methods import ORDER, RECIPES

        if self.method not in ORDER:
            raise ValueError(f"method must be one of {', '.join(ORDER)}, got {self.method!r}")
        if not self.pre_align and not getattr(RECIPES.get(self.method), "pre_align", False):
            aligning = ", ".join(name for name, recipe in RECIPES.items() if recipe.pre_align)
            raise ValueError(f"pre_align = false removes the pre-alignment of {aligning}; "
                             f"{self.method} has none to remove")
        if self.realign_every == 0 and getattr(RECIPES.get(self.method), "realign", "") == "every_round":
            raise ValueError(f"{self.method} realigns after every round by its recipe, so realign_every "
                             "= 0 would be ignored; for the ablation without realignment use fedsoda "
                             "(fedsoda compare --methods fedsoda-no_realign)")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        self._check_task_alignment(RECIPES.get(self.method))
        if self.clients < 1 or not 1 <= self.clients_per_round <= self.clients:
            raise ValueError(f"need 1 <= clients_per_round ({self.clients_per_round}) <= clients "
                             f"({self.clients})")
        for name in ("rounds", "local_steps", "batch_size", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.mu < 0:
            raise ValueError(f"lr must be > 0 and mu >= 0, got lr={self.lr} mu={self.mu}")
        if self.wandb not in WANDB_MODES:
            raise ValueError(f"wandb must be one of {', '.join(map(repr, WANDB_MODES))}, got {self.wandb!r}")
        if self.client_cpus <= 0 or self.client_gpus < 0 or self.sim_cpus < self.client_cpus:
            raise ValueError(f"need client_cpus > 0, client_gpus >= 0 and sim_cpus >= client_cpus, "
                             f"got {self.client_cpus}, {self.client_gpus} and {self.sim_cpus}")
        if self.round_timeout < 0 or self.min_replies < 1:
            raise ValueError(f"round_timeout must be >= 0 (0: none) and min_replies >= 1, got "
                             f"{self.round_timeout} and {self.min_replies}")
        if not 0 <= self.min_nodes <= self.clients:
            raise ValueError(f"min_nodes must be in 0..clients ({self.clients}; 0: all), got "
                             f"{self.min_nodes}")
        if min(self.realign_every, self.eval_every, self.eval_limit, self.max_examples) < 0:
            raise ValueError("realign_every, eval_every, eval_limit and max_examples must be >= 0")
        if self.client_layers and self.method != "fedra":
            raise ValueError(f"client_layers is FedRA's setting; method {self.method} gives every "
                             "client the same model")
        whole_layers = self.method == "fedlora_exclusive" or (
            self.method == "fedra" and self.client_layers.strip() == BY_BUDGETS)
        if whole_layers and self.fedpruner.granularity != "layer":
            raise ValueError(f"{self.method} trains whole layers: fedpruner.granularity must "
                             f"be \"layer\", got {self.fedpruner.granularity!r}")
        if self.method == "hierfedlora":
            self._check_hierfedlora()
        if self.dp.enabled and self.method in ("fedpruner", "fedpruner_plus"):
            raise ValueError("dp privatizes LoRA updates only; FedPruner's clients also reply "
                             "with similarity matrices of their data every round. Turn dp off "
                             "(dp.clip = 0) or use another method")
        from fedsoda.methods.assignment import capacities

        capacities(self.client_layers, self.clients, num_layers=10**6)  # format and count
        PartitionScheme.parse(self.partition)

    def _check_hierfedlora(self) -> None:
        if self.clients_per_round != self.clients:
            raise ValueError(f"hierfedlora: every device takes part in every global round; "
                             f"set clients_per_round = clients ({self.clients})")
        if self.min_nodes not in (0, self.clients):
            raise ValueError("hierfedlora groups every client by its label mix before round 1; "
                             "set min_nodes = 0 (wait for all clients)")
        if self.hierfedlora.groups > self.clients:
            raise ValueError(f"hierfedlora.groups ({self.hierfedlora.groups}) cannot exceed "
                             f"clients ({self.clients})")

    @property
    def data_folder(self) -> str | None:
        return self.data_dir or None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path | str) -> None:
        Path(path).write_text(tomli_w.dumps(self.to_dict()))


KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
TABLES = {"prune": PruneSettings, "align": AlignSettings,  # [prune], [align], [fedpruner], ...
          "fedpruner": FedPrunerSettings, "hierfedlora": HierFedLoRASettings,
          "wire": WireSettings, "robust": RobustSettings, "dp": DPSettings}


def field_types(cls) -> dict[str, type]:
    """``name -> type`` of a settings dataclass's plain fields (int, float, str, bool): the
    keys a config may set, and the flags of `fedsoda run`, `prune` and `plan`."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if hints[f.name] in KINDS}


def _kind(key: str) -> type:
    """The type of config key ``key`` (``rounds``, ``prune.n``), or a one-line error."""
    if key in TABLES:
        example = next(iter(field_types(TABLES[key])))
        raise ValueError(f"config key {key!r} is a table; set its keys, e.g. {key}.{example}")
    section, dot, name = key.partition(".")
    owner = TABLES.get(section) if dot else RunConfig
    kinds = field_types(owner) if owner else {}
    if (name if dot else key) not in kinds:
        raise ValueError(f"unknown config key {key!r}")
    return kinds[name if dot else key]


def _checked(key: str, value):
    """``value`` as key's type, or a one-line error naming the key. A bool is not an integer
    here (TOML's ``true`` is no round count); an integer is a fine float."""
    kind = _kind(key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise ValueError(f"config key {key!r} must be {KINDS[kind]}, got {value!r}")


def _coerce(key: str, text: str):
    """Parse a ``--set`` value to the key's type."""
    kind = _kind(key)
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"config key {key!r} must be true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if kind is str:
        return text
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"config key {key!r} must be {KINDS[kind]}, got {text!r}") from None


def _flat(values: dict) -> dict:
    """``{"prune": {"n": 2}}`` (a TOML table) as ``{"prune.n": 2}``; other keys as they are."""
    flat = {}
    for key, value in values.items():
        if key in TABLES and isinstance(value, dict):
            flat.update({f"{key}.{name}": inner for name, inner in value.items()})
        else:
            flat[key] = value
    return flat


def _apply(config: RunConfig, values: dict) -> RunConfig:
    top, nested = {}, {section: {} for section in TABLES}
    for key, value in _flat(values).items():
        checked = _checked(key, value)
        section, _, name = key.partition(".")
        if name:
            nested[section][name] = checked
        else:
            top[key] = checked
    for section, changes in nested.items():
        if changes:
            top[section] = dataclasses.replace(getattr(config, section), **changes)
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
            try:
                values = tomllib.load(handle)
            except tomllib.TOMLDecodeError as error:
                raise ValueError(f"config file {path} is not valid TOML: {error}") from None
        config = _apply(config, values)
    config = _apply(config, {k: v for k, v in flags.items() if v is not None})
    pairs = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        pairs[key] = _coerce(key, value)
    return with_method_schedule(_apply(config, pairs))


def config_from_flat(values: dict) -> RunConfig:
    """A config from Flower's flat run config (``prune.n``-style keys for nested settings)."""
    return with_method_schedule(_apply(RunConfig(), values))


def with_method_schedule(config: RunConfig) -> RunConfig:
    """The realignment period the method runs with: FedOT never realigns, FedBiOT every round.

    The one place a recipe's schedule is applied; a method without a Recipe (FedRA) has no
    emulator to realign, so its period is 0.
    """
    from fedsoda.methods import RECIPES  # deferred, as in RunConfig.__post_init__

    recipe = RECIPES.get(config.method)
    if recipe is None:
        return dataclasses.replace(config, realign_every=0)
    return dataclasses.replace(config, realign_every=recipe.realign_every(config.realign_every))
