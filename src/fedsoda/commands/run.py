"""`fedsoda run`: resolve and check the config, then run the apps in the simulation engine."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

QUICK = [  # same code path, small everything: 2 clients, 2 rounds, one realignment
    "clients=2", "clients_per_round=2", "rounds=2", "local_steps=2", "realign_every=1",
    "eval_every=1", "eval_limit=64", "prune.samples=16", "align.samples=16",
    "align.heldout=8", "align.seq_len=64", "align.realign_samples=8",
]


def run_command(args: argparse.Namespace) -> dict:
    from fedsoda.federated.config import RunConfig, field_types, load_config

    if args.resume:
        saved = Path(args.resume) / "config.toml"
        if not saved.exists():
            raise FileNotFoundError(f"{saved} not found: --resume needs a run folder")
        cfg = load_config(saved)
    else:
        flags = {name: getattr(args, name) for name in field_types(RunConfig)}  # the CLI's flags
        if args.quick and not flags["out"]:
            flags["out"] = "runs/quick"
        overrides = (QUICK if args.quick else []) + list(args.set)
        cfg = load_config(args.config, overrides, **flags)
    cfg = with_data_dir(cfg)
    from fedsoda.federated.simulation import simulate  # flwr and ray load only now

    summary = simulate(cfg, resume=bool(args.resume))
    print(json.dumps(summary, indent=2))
    return summary


def with_data_dir(cfg):
    """The data folder as an absolute path (``FEDSODA_DATA_DIR`` if the config names none):
    clients run in other processes, whose working folder may differ."""
    data_dir = cfg.data_dir or os.environ.get("FEDSODA_DATA_DIR", "")
    if data_dir:
        cfg = dataclasses.replace(cfg, data_dir=str(Path(data_dir).expanduser().resolve()))
    return cfg
