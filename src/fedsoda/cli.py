"""The ``fedsoda`` command. Each sub-command's flags mirror its function's signature."""

from __future__ import annotations

import argparse
import dataclasses
import sys

# Light imports only: `fedsoda --help` must not load torch or flwr (a test checks). Hence
# no fedsoda.methods here, and no RunConfig() (its checks import fedsoda.methods).
from fedsoda.align.settings import AlignSettings
from fedsoda.federated.config import RunConfig, field_types
from fedsoda.surgery.plan import LAYOUT_FIELDS, TOKENS, PruneSettings
from fedsoda.wire_settings import WireSettings

PRUNE_NOTES = {"n": "layers pruned per group", "p": "number of groups"}
BUILD_ALIGN = ("samples", "heldout", "seq_len", "batch_size", "epochs", "seed", "lr", "alpha", "beta")


def _add_fields(parser: argparse.ArgumentParser, cls, names: tuple[str, ...] | None = None,
                defaults: bool = True, choices: dict | None = None, notes: dict | None = None) -> None:
    """One flag per field of a settings dataclass (``--seq-len`` for ``seq_len``), typed as the
    field. Its default is the dataclass's; with ``defaults=False`` it is None, so that a
    config file's value stands unless the flag is given."""
    kinds, values, choices, notes = field_types(cls), _defaults(cls), choices or {}, notes or {}
    for name in names or tuple(kinds):
        kind, value = kinds[name], values[name]
        flag = f"--{name.replace('_', '-')}"
        note = f"{notes[name]}; default: {value}" if name in notes else f"default: {value}"
        default = value if defaults else None
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=note)
        else:
            parser.add_argument(flag, type=kind, default=default, choices=choices.get(name),
                                help=note)


def _defaults(cls) -> dict:
    """A dataclass's field defaults, read without making one."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def _from_fields(cls, args: argparse.Namespace, names: tuple[str, ...] | None = None):
    """The dataclass from the flags ``_add_fields`` added."""
    return cls(**{name: getattr(args, name) for name in names or tuple(field_types(cls))})


def _add_prune(commands) -> None:
    parser = commands.add_parser("prune", help="similarity group pruning: write a pruning plan")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None, help="local data folder (or FEDSODA_DATA_DIR)")
    _add_fields(parser, PruneSettings, choices={"token": TOKENS}, notes=PRUNE_NOTES)
    parser.add_argument("--seed", type=int, default=0, help="which public samples are drawn")
    parser.add_argument("--no-cache", action="store_true", help="ignore a cached plan")
    parser.add_argument("--out", default="plan.json")


def _add_build(commands) -> None:
    parser = commands.add_parser("build", help="NF4 sub-LLM with LoRA, pre-aligned (ODA)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--plan", required=True)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    _add_fields(parser, AlignSettings, BUILD_ALIGN)


def _add_data(commands) -> None:
    data = commands.add_parser("data", help="data set tools").add_subparsers(dest="data_command",
                                                                              required=True)
    parser = data.add_parser("partition", help="split a task's train set across clients")
    parser.add_argument("--task", required=True, choices=["sst2", "boolq", "gsm8k"])
    parser.add_argument("--clients", type=int, default=10)
    scheme = parser.add_mutually_exclusive_group()
    scheme.add_argument("--dirichlet", type=float, metavar="BETA", help="label skew concentration")
    scheme.add_argument("--iid", action="store_true", help="IID (the default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--plot", default=None, help="PNG of per-client label counts")
    parser.add_argument("--rounds", type=int, default=0,
                        help="also list each round's sampled clients and their label mix")
    parser.add_argument("--clients-per-round", type=int, default=None,
                        help="clients sampled a round, as in `fedsoda run` (default: all)")
    parser.add_argument("--out", default=None)


def _add_eval(commands) -> None:
    parser = commands.add_parser("eval", help="accuracy of a model (or perplexity on WikiText-2)")
    parser.add_argument("--model", default="smollm2-135m",
                        help="model spec, or a `fedsoda build` folder to score the NF4 sub-LLM")
    parser.add_argument("--adapter", default=None, help="PEFT adapter folder for the full model")
    parser.add_argument("--task", required=True, choices=["sst2", "boolq", "gsm8k", "wikitext2"])
    parser.add_argument("--limit", type=int, default=None, help="first N examples (windows)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--calibrate", type=int, default=0, metavar="N",
                        help="also the accuracy at the option threshold fitted on the N training "
                             "rows a run with align.data = \"task\" keeps back (320 by default)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="weights and compute of the full model (bfloat16: ~2x faster on CPUs "
                             "with AVX512-BF16)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=None)


def _add_run(commands) -> None:
    parser = commands.add_parser("run", help="federated fine-tuning in Flower's simulation engine")
    parser.add_argument("config", nargs="?", default=None, help="TOML config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set align.lr=1e-3 (repeatable)")
    parser.add_argument("--quick", action="store_true",
                        help="2 clients, 2 rounds, small alignment and evaluation subsets")
    parser.add_argument("--resume", metavar="RUN_DIR", default=None,
                        help="continue a run from its last complete round")
    parser.add_argument("--overwrite", action="store_true",
                        help="empty the folder of the run already in --out, then start afresh")
    _add_fields(parser, RunConfig, defaults=False)  # the config file's value stands otherwise


def _add_compare(commands) -> None:
    parser = commands.add_parser("compare", help="run every method on the same data and seeds; "
                                                 "write the comparison table and plot")
    parser.add_argument("config", nargs="?", default=None, help="TOML config shared by all runs")
    parser.add_argument("--task", default="sst2", choices=["sst2", "boolq", "gsm8k"])
    parser.add_argument("--methods", default=None,
                        help="comma-separated (default: every method, in the paper's order); "
                             "fedsoda-no_prealign, fedsoda-no_realign, fedsoda-no_align: "
                             "the alignment ablation")
    parser.add_argument("--partition", default=None, help="iid | dirichlet:BETA")
    parser.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2")
    for flag in ("rounds", "clients", "clients-per-round", "eval-every", "eval-limit"):
        parser.add_argument(f"--{flag}", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", required=True)
    report = commands.add_parser("report", help="the comparison table and plot of finished runs")
    report.add_argument("runs", nargs="+", help="run folders (with summary.json)")
    report.add_argument("--out", default=None, help="default: the first run's parent folder")


def _add_plan(commands) -> None:
    parser = commands.add_parser("plan", help="Table 2 figures of every method for a paper-scale "
                                              "model, from its config alone (no weights)")
    parser.add_argument("--model-config", required=True,
                        help="llama3-8b | qwen2-7b | mistral-7b | path to a config.json")
    run = _defaults(RunConfig)  # a client step and schedule as a run has them
    parser.add_argument("--batch-size", type=int, default=run["batch_size"])
    parser.add_argument("--seq-len", type=int, default=run["max_tokens"], help="training tokens")
    parser.add_argument("--realign-every", type=int, default=run["realign_every"],
                        help="FedSODA's r")
    _add_fields(parser, PruneSettings, LAYOUT_FIELDS, notes=PRUNE_NOTES)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-targets", default="all",
                        help="projections with LoRA: all (ours: the seven), mlp (gate, up, down: "
                             "what the paper's 1.3M trainable parameters on LLaMA3-8B imply), "
                             "or a comma-separated list")
    parser.add_argument("--wire-block", type=int, default=WireSettings().block,
                        help="values per absmax block of the int8 and nf4 wire formats")
    parser.add_argument("--out", default=None)


def _add_bench(commands) -> None:
    parser = commands.add_parser("bench", help="client step time, memory, storage and comm of "
                                               "every method, side by side on this machine")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default=None,
                        help="comma-separated (default: every method with a Recipe)")
    parser.add_argument("--quick", action="store_true", help="fewer steps; under 5 minutes")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after warm-up")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: FEDSODA_THREADS, else the idle cores)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="bench.json")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="fedsoda", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)
    _add_prune(commands)
    _add_build(commands)
    _add_data(commands)
    _add_eval(commands)
    _add_run(commands)
    _add_compare(commands)
    _add_plan(commands)
    _add_bench(commands)
    return root


def run(args: argparse.Namespace) -> None:
    # Imported here so that `fedsoda --help` and argument errors stay instant.
    from fedsoda.commands import data_eval, model_prep

    if args.command == "prune":
        model_prep.prune(args.model, _from_fields(PruneSettings, args), args.data_dir, args.out,
                         args.seed, use_cache=not args.no_cache)
    elif args.command == "build":
        settings = _from_fields(AlignSettings, args, BUILD_ALIGN)
        model_prep.build(args.model, args.plan, args.data_dir, args.out, settings, args.device)
    elif args.command == "data":
        scheme = f"dirichlet:{args.dirichlet}" if args.dirichlet is not None else "iid"
        data_eval.partition_command(args.task, args.clients, scheme, args.seed, args.data_dir,
                                    args.plot, args.out, args.rounds, args.clients_per_round)
    elif args.command == "run":
        from fedsoda.commands.run import run_command

        run_command(args)
    elif args.command == "compare":
        from fedsoda.commands.compare import compare_command

        compare_command(args)
    elif args.command == "report":
        from fedsoda.commands.compare import report_command

        report_command(args)
    elif args.command == "plan":
        from fedsoda.commands.planner import plan_command

        plan_command(args)
    elif args.command == "bench":
        from fedsoda.commands.bench import bench_command

        bench_command(args)
    elif args.command == "eval":
        data_eval.eval_command(args.model, args.adapter, args.task, args.limit, args.batch_size,
                               args.data_dir, args.out, args.dtype, args.calibrate)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        run(args)
    # ModelNotFoundError and DataNotFoundError are FileNotFoundErrors, MalformedDataError a
    # ValueError (importing them here would load torch).
    except (ValueError, FileNotFoundError, KeyError) as error:
        print(f"fedsoda {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C: what stopped, and how to go on (no traceback)
        print(f"fedsoda {args.command}: {stop or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
