"""`fedsoda compare` and `fedsoda report`: every method on the same data and seeds, one table.

Each run writes its own folder ``OUT/<method>-seed<S>``; a finished one is skipped and an
interrupted one resumed, so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedsoda.comparison import markdown_table, read_run, write_report


def _split(text: str, kind=str) -> list:
    items = [kind(item.strip()) for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"expected a comma-separated list, got {text!r}")
    return items


def compare_command(args: argparse.Namespace) -> list[dict]:
    from fedsoda.commands.run import with_data_dir
    from fedsoda.federated.config import load_config

    out = Path(args.out)
    plans = []  # every config is checked before the first run starts
    for seed in _split(args.seeds, int):
        for method in _split(args.methods):
            folder = out / f"{method}-seed{seed}"
            flags = {"method": method, "task": args.task, "partition": args.partition,
                     "seed": seed, "out": str(folder), "rounds": args.rounds,
                     "clients": args.clients, "clients_per_round": args.clients_per_round,
                     "eval_every": args.eval_every, "eval_limit": args.eval_limit,
                     "data_dir": args.data_dir}
            plans.append((folder, with_data_dir(load_config(args.config, args.set, **flags))))
    from fedsoda.federated.simulation import simulate  # flwr and ray load only now

    for folder, cfg in plans:
        if (folder / "summary.json").exists():
            print(f"[fedsoda] {folder} is finished; kept", flush=True)
            continue
        resume = (folder / "checkpoint").exists()
        print(f"[fedsoda] {'resuming' if resume else 'running'} {cfg.method} seed {cfg.seed} "
              f"-> {folder}", flush=True)
        simulate(load_config(folder / "config.toml") if resume else cfg, resume=resume)
    rows = write_report([folder for folder, _ in plans], out)
    print(markdown_table(rows, [read_run(folder) for folder, _ in plans]))
    return rows


def report_command(args: argparse.Namespace) -> list[dict]:
    out = Path(args.out) if args.out else Path(args.runs[0]).parent
    rows = write_report(args.runs, out)
    print(markdown_table(rows, [read_run(folder) for folder in args.runs]))
    print(f"[fedsoda] wrote {out / 'table.md'}, {out / 'table.json'} and {out / 'compare.png'}")
    return rows
