"""`fedsoda compare` and `fedsoda report`: every method on the same data and seeds, one table.

Each run writes its own folder ``OUT/<method>-seed<S>``; a finished one is skipped and an
interrupted one resumed, so an interrupted comparison continues where it stopped. A folder
whose run has other settings than the ones asked for is refused before anything runs.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from fedsoda.comparison import write_report


def _split(text: str, kind=str) -> list:
    items = [kind(item.strip()) for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"expected a comma-separated list, got {text!r}")
    return items


# The FedSODA paper's alignment ablation (Tables 3, 5 and 6) as names `--methods` takes
# beside the methods': fedsoda-no_prealign, fedsoda-no_realign, fedsoda-no_align.
ABLATIONS = {"no_prealign": {"pre_align": False}, "no_realign": {"realign_every": 0},
             "no_align": {"pre_align": False, "realign_every": 0}}


def method_item(item: str) -> tuple[str, dict]:
    """``fedsoda-no_realign`` -> ``("fedsoda", {"realign_every": 0})``; a method name as is."""
    from fedsoda.methods import RECIPES

    method, _, ablation = item.partition("-")
    if ablation and ablation not in ABLATIONS:
        raise ValueError(f"{item!r}: an ablation is METHOD-{'|'.join(ABLATIONS)}, e.g. fedsoda-no_align")
    settings = ABLATIONS.get(ablation, {})
    recipe = RECIPES.get(method)
    if "realign_every" in settings and getattr(recipe, "realign", "never") != "every_r":
        raise ValueError(f"{item!r}: {method} has no realignment period to turn off (only "
                         f"{', '.join(n for n, r in RECIPES.items() if r.realign == 'every_r')} "
                         "realigns every realign_every rounds)")
    return method, settings


# Where the data lives and where the run is written are not settings of the experiment.
NOT_SETTINGS = ("out", "data_dir")


def settings_differ(saved, wanted) -> list[str]:
    """The settings in which a run folder's config differs from the requested one.

    The alignment settings count only for methods that align (FedPETuning never does).
    """
    from fedsoda.methods import RECIPES

    old, new = dataclasses.asdict(saved), dataclasses.asdict(wanted)
    recipe = RECIPES.get(wanted.method)  # a method without a Recipe does not align
    skip = NOT_SETTINGS + (() if recipe and recipe.aligns else ("align",))
    differ = []
    for key in new:
        if key in skip:
            continue
        if isinstance(new[key], dict):
            differ += [f"{key}.{k}: {old[key].get(k)!r} -> {v!r}"
                       for k, v in new[key].items() if old[key].get(k) != v]
        elif old.get(key) != new[key]:
            differ.append(f"{key}: {old.get(key)!r} -> {new[key]!r}")
    return differ


def compare_command(args: argparse.Namespace) -> list[dict]:
    from fedsoda.commands.run import with_data_dir
    from fedsoda.federated.config import load_config
    from fedsoda.methods import ORDER

    out = Path(args.out)
    plans = []  # every config is checked before the first run starts
    for seed in _split(args.seeds, int):
        for item in _split(args.methods or ",".join(ORDER)):
            folder = out / f"{item}-seed{seed}"
            method, ablation = method_item(item)
            flags = {**ablation, "method": method, "task": args.task, "partition": args.partition,
                     "seed": seed, "out": str(folder), "rounds": args.rounds,
                     "clients": args.clients, "clients_per_round": args.clients_per_round,
                     "eval_every": args.eval_every, "eval_limit": args.eval_limit,
                     "data_dir": args.data_dir}
            plans.append((folder, with_data_dir(load_config(args.config, args.set, **flags))))
    for folder, cfg in plans:
        if (folder / "config.toml").exists():
            differ = settings_differ(load_config(folder / "config.toml"), cfg)
            if differ:
                raise ValueError(f"{folder} holds a run with other settings ({'; '.join(differ)}); "
                                 "delete that folder or compare into another --out")
    from fedsoda.federated.flower_run import run_with_flwr  # flwr loads only now

    for folder, cfg in plans:
        if (folder / "summary.json").exists():
            print(f"[fedsoda] {folder} is finished; kept", flush=True)
            continue
        resume = (folder / "checkpoint").exists()
        print(f"[fedsoda] {'resuming' if resume else 'running'} {cfg.method} seed {cfg.seed} "
              f"-> {folder}", flush=True)
        run_with_flwr(load_config(folder / "config.toml") if resume else cfg, resume=resume)
    rows = write_report([folder for folder, _ in plans], out)
    print((out / "table.md").read_text())
    return rows


def report_command(args: argparse.Namespace) -> list[dict]:
    out = Path(args.out) if args.out else Path(args.runs[0]).parent
    rows = write_report(args.runs, out)
    print((out / "table.md").read_text())
    print(f"[fedsoda] wrote {out / 'table.md'}, {out / 'table.json'} and {out / 'compare.png'}")
    return rows
