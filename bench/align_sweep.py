"""Alignment knobs side by side: one model load, one teacher cache, several settings.

    python bench/align_sweep.py --plan plan.json --data-dir ../shared/data --out sweep.json

Each setting starts from the same freshly built sub-LLM (same seed) and reports the
held-out KL(full || sub) before and after, and the alignment time.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
import time

from fedsoda.align.oda import AlignSettings, align, measure, public_caches
from fedsoda.models import load
from fedsoda.surgery.build import make_sub_llm
from fedsoda.surgery.lora import load_lora_state
from fedsoda.surgery.plan import PruningPlan
from fedsoda.surgery.plugback import plug_adapter

GRID = [
    {"alpha": 1.0, "beta": 1.0, "lr": 1e-3},
    {"alpha": 1e-4, "beta": 1.0, "lr": 1e-3},
    {"alpha": 1e-4, "beta": 1.0, "lr": 3e-3},
    {"alpha": 0.0, "beta": 1.0, "lr": 3e-3},
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--plan", required=True)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="sweep.json")
    args = parser.parse_args()
    plan = PruningPlan.load(args.plan)
    full, tokenizer = load(args.model)
    # This sweep chose the weights of the paper's plain MSE; pin it and the KL weight it ran
    # with, so it reproduces after the defaults moved to the relative loss.
    base = AlignSettings(rep_loss="mse", alpha=1e-4, beta=1.0)
    with tempfile.TemporaryDirectory() as tmp:
        sub = make_sub_llm(full, plan, tmp, tokenizer, seed=base.seed)
        initial = sub.emulator_lora()
        teacher = plug_adapter(copy.deepcopy(full), sub.adapter_lora(), plan)
        began = time.perf_counter()
        train_cache, held_cache = public_caches(teacher, plan, tokenizer, base, args.data_dir)
        cache_seconds = time.perf_counter() - began
        before = measure(teacher, sub.model, plan, held_cache, base.rep_loss)
        results = []
        for knobs in GRID:
            load_lora_state(sub.model, initial)
            settings = dataclasses.replace(base, **knobs)
            run = align(teacher, sub.model, plan, train_cache, settings, settings.epochs)
            after = measure(teacher, sub.model, plan, held_cache, base.rep_loss)
            results.append({**knobs, "kl_before": before["kl"], "kl_after": after["kl"],
                            "rep_after": after["rep"], "seconds": run["seconds"],
                            "steps": run["steps"]})
            print(json.dumps(results[-1]), flush=True)
    report = {"model": args.model, "cache_seconds": cache_seconds, "before": before,
              "results": results}
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
