"""`fedsoda run`: resolve and check the config, then run the apps in Flower's simulation
engine through a local SuperLink and `flwr run` (``fedsoda.federated.flower_run``).

Everything that can be checked is checked before Ray starts or any weights load (``preflight``):
the config, the pruning settings against the model's config.json, every row of the task's data
files and the public paragraphs the method draws, and the run folder. A run that fails them
writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
from pathlib import Path

from fedsoda.budgets import budgets_from_spec
from fedsoda.data.public import wikitext_paragraphs
from fedsoda.data.sources import MalformedDataError, data_dir, split_file
from fedsoda.data.task import load_rows
from fedsoda.data.tasks import get_task
from fedsoda.federated.config import RunConfig, field_types, load_config
from fedsoda.methods import BUDGETED, RECIPES
from fedsoda.methods.assignment import capacities
from fedsoda.methods.client_model import layout_plan
from fedsoda.models import load_config as model_config

QUICK = [  # same code path, small everything: 2 clients, 2 rounds, one realignment
    "clients=2", "clients_per_round=2", "rounds=2", "local_steps=2", "realign_every=1",
    "eval_every=1", "eval_limit=64", "prune.samples=16", "align.samples=16",
    "align.heldout=8", "align.seq_len=64", "align.realign_samples=8",
]
RUN_MARKERS = ("subllm", "checkpoint", "metrics.jsonl")  # what a started run leaves behind


def run_command(args: argparse.Namespace) -> dict:
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in a folder and --overwrite removes it: "
                         "give one of them")
    if args.resume:
        cfg = resumed_config(args)
    else:
        flags = {name: getattr(args, name) for name in field_types(RunConfig)}
        if args.quick and not flags["out"]:
            flags["out"] = "runs/quick"
        overrides = (QUICK if args.quick else []) + list(args.set)
        cfg = load_config(args.config, overrides, **flags)
    cfg = with_data_dir(cfg)
    preflight(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    if args.overwrite:
        clear_run(Path(cfg.out))
    from fedsoda.federated.flower_run import run_with_flwr  # flwr loads only now

    summary = run_with_flwr(cfg, resume=bool(args.resume))
    print(json.dumps(summary, indent=2))
    return summary


RESUME_MAY_CHANGE = ("rounds", "eval_every")  # more rounds, other evaluation rounds


def _flat_settings(cfg: RunConfig) -> dict:
    flat = {}
    for key, value in dataclasses.asdict(cfg).items():
        flat.update({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict)
                    else {key: value})
    return flat


def resumed_config(args: argparse.Namespace) -> RunConfig:
    """The config of the run in ``--resume RUN_DIR`` (its folder is RUN_DIR, wherever the
    config says it was), with the flags and ``--set`` pairs given, which may change only
    ``RESUME_MAY_CHANGE``; any other change is refused, not ignored."""
    folder = Path(args.resume)
    saved = folder / "config.toml"
    if not saved.exists():
        raise FileNotFoundError(f"{saved} not found: --resume needs a run folder")
    if args.config or args.quick:
        raise ValueError("--resume takes the run's settings from RUN_DIR/config.toml: drop "
                         f"{'the config file' if args.config else '--quick'}")
    flags = {name: getattr(args, name) for name in field_types(RunConfig)}
    if flags.pop("out") not in (None, str(folder)):
        raise ValueError(f"--resume continues the run in {folder}: drop --out")
    before = load_config(saved)
    after = load_config(saved, list(args.set), **flags)
    old, new = _flat_settings(before), _flat_settings(after)
    for key in sorted(k for k in new if new[k] != old[k] and k not in RESUME_MAY_CHANGE):
        raise ValueError(f"--resume keeps the run's settings: {key} is {old[key]!r} there, not "
                         f"{new[key]!r}; only {' and '.join(RESUME_MAY_CHANGE)} may change "
                         "(start a new run for other settings)")
    return dataclasses.replace(after, out=str(folder))


def with_data_dir(cfg):
    """The data folder as an absolute path (``FEDSODA_DATA_DIR`` if the config names none):
    clients run in other processes, whose working folder may differ."""
    folder = cfg.data_dir or os.environ.get("FEDSODA_DATA_DIR", "")
    if folder:
        cfg = dataclasses.replace(cfg, data_dir=str(Path(folder).expanduser().resolve()))
    return cfg


def preflight(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> None:
    """Check what can be checked before Ray starts or weights load; creates nothing. Raises
    ``ValueError`` or ``FileNotFoundError`` with a one-line message."""
    check_run_folder(Path(cfg.out), resume, overwrite)
    check_model(cfg)
    check_data(cfg)
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise ValueError(f"wandb={cfg.wandb!r} needs Weights & Biases: pip install -e '.[wandb]' "
                         "(or leave wandb unset)")


def run_markers(out: Path) -> list[str]:
    """What a started run left in ``out``; empty if none did."""
    return [name for name in RUN_MARKERS if (out / name).exists()]


def check_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """A fresh run does not start in a folder another run has used, unless told to remove it."""
    found = run_markers(out)
    if resume or not found:
        return
    if not overwrite:
        raise ValueError(f"{out} already holds a run ({', '.join(found)}): continue it with "
                         f"--resume {out}, or remove it and start afresh with --overwrite")
    if not (out / "config.toml").is_file():
        raise ValueError(f"{out} holds {', '.join(found)} but no config.toml, so it is no run "
                         "folder fedsoda wrote; --overwrite leaves it alone: choose another --out")


def clear_run(out: Path) -> None:
    """``--overwrite``, after the pre-flight checks passed: empty the folder of the run in
    ``out`` (``check_run_folder`` made sure fedsoda wrote it). A folder no run used is kept."""
    if not run_markers(out):
        return
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def check_model(cfg: RunConfig) -> None:
    """The pruning settings (or FedRA's per-client layer counts) against the model's layer
    count, read from its config alone."""
    num_layers = model_config(cfg.model).num_hidden_layers
    recipe = RECIPES.get(cfg.method)
    if recipe is not None:
        layout_plan(recipe, cfg.model, num_layers, cfg.prune)
    elif cfg.method in BUDGETED:  # the budgets' form and count; their sizes need the model
        budgets_from_spec(cfg.fedpruner.budgets, cfg.clients, full_peak=2**40)
        check_calibration(cfg)
    elif cfg.method == "hierfedlora":
        check_hierfedlora(cfg, num_layers)
    else:
        capacities(cfg.client_layers, cfg.clients, num_layers)


def check_calibration(cfg: RunConfig) -> None:
    """A reused FedPruner calibration exists and was measured for the same client step."""
    path = Path(cfg.fedpruner.calibration) if cfg.fedpruner.calibration else None
    if path is None:
        return
    if not path.is_file():
        raise FileNotFoundError(f"fedpruner.calibration: {path} does not exist; give a run "
                                "folder's budgets.json or leave it empty to measure")
    saved = path.parent / "config.toml"
    if saved.is_file():  # the run it came from: its client step must be this run's
        theirs = load_config(saved)
        differ = [name for name in ("model", "task", "batch_size", "max_tokens")
                  if getattr(theirs, name) != getattr(cfg, name)]
        if "probe_peak_bytes" in json.loads(path.read_text()):  # the probe's peak: its settings too
            differ += [f"fedpruner.{name}" for name in ("probe_samples", "probe_dtype")
                       if getattr(theirs.fedpruner, name) != getattr(cfg.fedpruner, name)]
        if differ:
            raise ValueError(f"fedpruner.calibration {path} was measured with other "
                             f"{', '.join(differ)}; measure afresh (leave it empty)")


def check_hierfedlora(cfg: RunConfig, num_layers: int) -> None:
    """A fixed depth within the model, and a given cost table that exists."""
    depth = cfg.hierfedlora.depth
    if depth.isdigit() and int(depth) > num_layers:
        raise ValueError(f"hierfedlora.depth {depth} exceeds the model's {num_layers} layers")
    if cfg.hierfedlora.timings and not Path(cfg.hierfedlora.timings).is_file():
        raise FileNotFoundError(f"hierfedlora.timings: {cfg.hierfedlora.timings} does not exist; "
                                "give a run folder's timings.json or leave it empty to measure")


def check_data(cfg: RunConfig) -> None:
    """With a local data folder: every row of the task's train and evaluation files, and
    enough WikiText-2 paragraphs for what the method draws (the hub is reached only in the run)."""
    if data_dir(cfg.data_folder) is None:  # raises if a named folder does not exist
        return
    task = get_task(cfg.task)
    for split in (task.train_split, task.eval_split):
        for number, row in enumerate(load_rows(task, split, cfg.data_folder), start=1):
            try:
                task.to_example(row)
            except (KeyError, IndexError, TypeError, ValueError) as error:
                path = split_file(task.name, split, cfg.data_folder)
                raise MalformedDataError(f"{path}: row {number} is no {task.name} example "
                                         f"({type(error).__name__}: {error})") from None
    recipe = RECIPES.get(cfg.method)
    needs = []  # (split, paragraphs drawn, the setting that draws them)
    if recipe is not None and recipe.pruning == "sgp":
        needs.append(("validation", cfg.prune.samples, "prune.samples"))
    if recipe is not None and recipe.aligns:
        needs += [("validation", cfg.align.samples, "align.samples"),
                  ("test", cfg.align.heldout, "align.heldout")]
    for split, count, key in needs:
        available = len(wikitext_paragraphs(split, cfg.data_folder))
        if count > available:
            raise ValueError(f"{key}={count} but WikiText-2 {split} has {available} paragraphs")
