"""`fedsoda plan`: every method's Table 2 figures for a paper-scale model, from its config."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedsoda.surgery.plan import LAYOUT_FIELDS, PruneSettings


def _gib(value: int) -> str:
    return f"{value / 2**30:.2f} GiB"


def plan_command(args: argparse.Namespace) -> dict:
    from fedsoda.planner import plan_methods

    settings = PruneSettings(**{name: getattr(args, name) for name in LAYOUT_FIELDS})
    result = plan_methods(args.model_config, settings, realign_every=args.realign_every,
                          batch=args.batch_size, seq=args.seq_len)
    print(f"{result['model']} ({result['num_layers']} layers), per client:")
    print(f"{'method':<12} {'trainable':>12} {'comm/round':>12} {'model size':>12} {'step memory':>12}")
    for name, m in result["methods"].items():
        print(f"{name:<12} {m['trainable_params'] / 1e6:>11.2f}M {m['comm_params_per_round'] / 1e6:>11.2f}M "
              f"{_gib(m['client_model_bytes']):>12} {_gib(m['step_memory_bytes']):>12}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result
