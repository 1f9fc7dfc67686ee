"""The ``fedsoda`` command. Each sub-command's flags mirror its function's signature."""

from __future__ import annotations

import argparse
import sys

from fedsoda.align.oda import AlignSettings
from fedsoda.data.sources import DataNotFoundError, MalformedDataError
from fedsoda.models import ModelNotFoundError
from fedsoda.surgery.plan import PruneSettings


def _add_prune(commands) -> None:
    parser = commands.add_parser("prune", help="similarity group pruning: write a pruning plan")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None, help="local data folder (or FEDSODA_DATA_DIR)")
    parser.add_argument("--n", type=int, default=3, help="layers pruned per group")
    parser.add_argument("--p", type=int, default=4, help="number of groups")
    parser.add_argument("--adapter-layers", type=int, default=3)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--token", choices=["last", "all"], default="last")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="ignore a cached plan")
    parser.add_argument("--out", default="plan.json")


def _add_build(commands) -> None:
    parser = commands.add_parser("build", help="NF4 sub-LLM with LoRA, pre-aligned (ODA)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--plan", required=True)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    defaults = AlignSettings()
    for field in ("samples", "heldout", "seq_len", "batch_size", "epochs", "seed"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(defaults, field))
    for field in ("lr", "alpha", "beta"):
        parser.add_argument(f"--{field}", type=float, default=getattr(defaults, field))


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="fedsoda", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)
    _add_prune(commands)
    _add_build(commands)
    return root


def run(args: argparse.Namespace) -> None:
    # Imported here so that `fedsoda --help` and argument errors stay instant.
    from fedsoda.commands import model_prep

    if args.command == "prune":
        settings = PruneSettings(n=args.n, p=args.p, adapter_layers=args.adapter_layers,
                                 samples=args.samples, token=args.token, seq_len=args.seq_len)
        model_prep.prune(args.model, settings, args.data_dir, args.out, args.seed,
                         use_cache=not args.no_cache)
    elif args.command == "build":
        settings = AlignSettings(samples=args.samples, heldout=args.heldout, seq_len=args.seq_len,
                                 batch_size=args.batch_size, epochs=args.epochs, lr=args.lr,
                                 alpha=args.alpha, beta=args.beta, seed=args.seed)
        model_prep.build(args.model, args.plan, args.data_dir, args.out, settings, args.device)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, KeyError, ModelNotFoundError, DataNotFoundError,
            MalformedDataError) as error:
        print(f"fedsoda {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
