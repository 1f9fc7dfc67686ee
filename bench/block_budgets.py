"""FedPruner+'s block memory model on SmolLM2-135M: fitted to single-kind runs, checked on
every mixed ``(K^A, K^F)`` pair that a budget allows.

    FEDSODA_DATA_DIR=../shared/data nice -n 19 python bench/block_budgets.py \
        --out bench/block_budgets_smollm2.json

``fedsoda.budgets.calibrate_blocks`` measures five training steps in fresh processes (the
full model, then MLP blocks only and attention blocks only at L/5 and L layers) and fits
``peak = a + b_attn*K^A + b_mlp*K^F``. For each budget fraction of the full-model peak, every
pair ``pairs_for`` returns is then measured on a client model built as a client builds it
(attention and MLP blocks each evenly spread, ``fedsoda.budgets.spread_blocks``) and set beside its
prediction: the budget holds when every measured peak is at or under it. ``--repeat`` pairs
are measured a second time to show the measurement's spread, and ``--long-steps`` once more
with as many steps as a client trains in a round (a peak that grows with steps would show).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from fedsoda.accounting import client_peak_memory
from fedsoda.budgets import MiB, calibrate_blocks, spread_blocks
from fedsoda.surgery.layered import layered_folder


def mib(value: float) -> float:
    return round(value / MiB, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--folder", default=None, help="a layered folder to use instead of writing one")
    parser.add_argument("--data-dir", default=os.environ.get("FEDSODA_DATA_DIR"))
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--fractions", default="0.25,0.5")
    parser.add_argument("--headroom", type=float, default=0.0,
                        help="as fedpruner.headroom (runs: 0.05); 0 checks the bare model")
    parser.add_argument("--repeat", type=int, default=3, help="pairs measured twice")
    parser.add_argument("--long-steps", type=int, default=10)
    parser.add_argument("--out", default="bench/block_budgets_smollm2.json")
    args = parser.parse_args()
    began = time.perf_counter()
    settings = {"task": args.task, "batch_size": args.batch_size, "max_tokens": args.max_tokens,
                "data_dir": args.data_dir}
    with tempfile.TemporaryDirectory() as tmp:
        folder = layered_folder(args.model, tmp, args.folder)
        total = len(list(folder.glob("layer-*.safetensors")))
        memory = calibrate_blocks(folder, headroom=args.headroom, **settings)
        full = memory.points[0][2]
        fitted = {"a_mib": mib(memory.a), "b_attn_mib": mib(memory.b_attn),
                  "b_mlp_mib": mib(memory.b_mlp),
                  "points_mib": [(ka, kf, mib(p)) for ka, kf, p in memory.points]}
        print(json.dumps(fitted), flush=True)
        rows = []
        for fraction in (float(f) for f in args.fractions.split(",")):
            budget = int(fraction * full)
            for k_attn, k_mlp in memory.pairs_for(budget, total):
                layers, blocks = spread_blocks(k_attn, k_mlp, total)
                peak = client_peak_memory(folder, layers=layers, blocks=blocks, **settings)
                rows.append({"fraction": fraction, "budget_mib": mib(budget), "k_attn": k_attn,
                             "k_mlp": k_mlp, "predicted_mib": mib(memory.needs(k_attn, k_mlp)),
                             "measured_mib": mib(peak), "peak_over_budget": round(peak / budget, 4),
                             "layers": layers, "blocks": blocks})
                print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("layers", "blocks")}),
                      flush=True)
        worst = sorted(rows, key=lambda row: -row["peak_over_budget"])[: args.repeat]
        repeats = [{"k_attn": r["k_attn"], "k_mlp": r["k_mlp"], "first_mib": r["measured_mib"],
                    "again_mib": mib(client_peak_memory(folder, layers=r["layers"], blocks=r["blocks"],
                                                        **settings)),
                    f"steps_{args.long_steps}_mib": mib(client_peak_memory(
                        folder, layers=r["layers"], blocks=r["blocks"], steps=args.long_steps,
                        **settings))} for r in worst]
        for row in repeats:
            print(json.dumps(row), flush=True)
    results = {"args": vars(args), "num_layers": total,
               "model": fitted,
               "full_model_peak_mib": mib(full),
               "max_peak_over_budget": max(r["peak_over_budget"] for r in rows),
               "max_measured_over_predicted": round(max(r["measured_mib"] / r["predicted_mib"]
                                                        for r in rows), 4),
               "pairs": rows, "repeats": repeats,
               "note": "CPU peak RSS above the probe's RSS after imports and data loading, "
                       "allocator pinned (fedsoda.accounting.PINNED_ALLOCATOR); 2 steps unless "
                       "named",
               "seconds": round(time.perf_counter() - began, 1)}
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out} in {results['seconds']} s; largest peak/budget "
          f"{results['max_peak_over_budget']}")


if __name__ == "__main__":
    main()
