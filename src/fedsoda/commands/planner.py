"""`fedsoda plan`: every method's Table 2 figures for a paper-scale model, from its config."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedsoda.models import LORA_TARGETS
from fedsoda.surgery.lora import LoraSpec
from fedsoda.surgery.plan import LAYOUT_FIELDS, PruneSettings
from fedsoda.wire_settings import FORMATS

TARGET_PRESETS = {"all": LORA_TARGETS, "mlp": ("gate_proj", "up_proj", "down_proj")}


def _gib(value: int) -> str:
    return f"{value / 2**30:.2f} GiB"


def lora_targets(text: str) -> tuple[str, ...]:
    """``all``, ``mlp`` or a comma-separated list of projection names."""
    targets = TARGET_PRESETS.get(text) or tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if not targets or unknown:
        raise ValueError(f"--lora-targets: unknown projections {unknown}; use all, mlp or names "
                         f"from {', '.join(LORA_TARGETS)}")
    return targets


def print_wire_table(result: dict) -> None:
    """Bytes per client and round in each wire format, in MiB (the unit the paper's MB/round
    figures turn out to be in: 4 bits x its parameter count), beside the paper's figure."""
    print(f"\nbytes per client and round, MiB (block {result['assumptions']['wire_block']}):")
    print(f"{'method':<12} " + " ".join(f"{fmt:>8}" for fmt in FORMATS) + f" {'4b no scales':>12}")
    for name, m in result["methods"].items():
        flat = m["comm_params_per_round"] / 2 / 2**20  # half a byte a value, no block scales
        print(f"{name:<12} " + " ".join(f"{m['comm_bytes_per_round'][fmt] / 2**20:>8.3f}"
                                        for fmt in FORMATS) + f" {flat:>12.3f}")
    if result.get("paper_mb_per_round"):
        print(f"paper (FedSODA, n=3 p=4 r=5): {result['paper_mb_per_round']} MB/round")


def plan_command(args: argparse.Namespace) -> dict:
    from fedsoda.planner import plan_methods

    settings = PruneSettings(**{name: getattr(args, name) for name in LAYOUT_FIELDS})
    spec = LoraSpec(r=args.lora_r, alpha=2 * args.lora_r, targets=lora_targets(args.lora_targets))
    result = plan_methods(args.model_config, settings, spec=spec, realign_every=args.realign_every,
                          batch=args.batch_size, seq=args.seq_len, block=args.wire_block)
    print(f"{result['model']} ({result['num_layers']} layers), per client:")
    print(f"{'method':<12} {'trainable':>12} {'comm/round':>12} {'model size':>12} {'step memory':>12}")
    for name, m in result["methods"].items():
        print(f"{name:<12} {m['trainable_params'] / 1e6:>11.2f}M {m['comm_params_per_round'] / 1e6:>11.2f}M "
              f"{_gib(m['client_model_bytes']):>12} {_gib(m['step_memory_bytes']):>12}")
    print_wire_table(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result
