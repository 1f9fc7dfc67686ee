"""Does an adapter trained on the sub-LLM transfer to the full LLM?  Settings side by side.

    FEDSODA_DATA_DIR=../shared/data python bench/transfer_sweep.py --out bench/transfer_sweep.json

One model load, one SGP plan, one teacher cache. It measures, on SST-2 validation:
- ``zero_shot``: the full LLM as it is;
- ``oracle``: adapter LoRA trained directly on the full LLM's adapter layers (the ceiling any
  offsite method can reach with this adapter);
- for each alignment setting: a fresh NF4 sub-LLM, pre-aligned with that setting, its adapter
  LoRA trained centrally for ``--steps`` on the sub-LLM, then plugged into the full LLM.

Every trained adapter sees the same mini-batches (same seed), so the differences are the
alignment's. Centralised training stands in for the federated rounds (IID FedAvg of short
local runs behaves much like it) and costs a fraction of a simulation.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import tempfile
import time

from fedsoda.align.oda import AlignSettings, pre_align, public_caches
from fedsoda.commands.model_prep import prune
from fedsoda.data.task import EncodedExamples, load_rows, pad_id
from fedsoda.data.tasks import get_task
from fedsoda.evaluate.tasks import evaluate, evaluation_rows
from fedsoda.models import load
from fedsoda.surgery.build import make_sub_llm
from fedsoda.surgery.lora import load_lora_state
from fedsoda.surgery.plan import PruneSettings
from fedsoda.surgery.plugback import plug_adapter, to_full_names
from fedsoda.training import configure_threads, local_train

# Each entry: a name, AlignSettings overrides (None: no alignment) and the client lr.
GRID = {
    "unaligned": (None, 1e-3),
    "mse-1e-4": ({"rep_loss": "mse", "alpha": 1e-4}, 1e-3),
    "relative-1": ({"rep_loss": "relative", "alpha": 1.0}, 1e-3),
    "relative-only": ({"rep_loss": "relative", "alpha": 1.0, "beta": 0.0}, 1e-3),
    "relative-only-3ep": ({"rep_loss": "relative", "alpha": 1.0, "beta": 0.0, "epochs": 3}, 1e-3),
    "relative-kl0.1": ({"rep_loss": "relative", "alpha": 1.0, "beta": 0.1}, 1e-3),
    "relative-only-lr1e-2": ({"rep_loss": "relative", "alpha": 1.0, "beta": 0.0, "lr": 1e-2},
                             1e-3),
    "relative-only-client3e-4": ({"rep_loss": "relative", "alpha": 1.0, "beta": 0.0}, 3e-4),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--adapter-layers", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-limit", type=int, default=0)
    parser.add_argument("--settings", default=",".join(GRID),
                        help=f"comma-separated subset of {', '.join(GRID)}")
    parser.add_argument("--no-oracle", action="store_true")
    parser.add_argument("--out", default="transfer_sweep.json")
    args = parser.parse_args()
    names = args.settings.split(",")
    if unknown := sorted(set(names) - set(GRID)):
        parser.error(f"unknown settings {unknown}; choose from {', '.join(GRID)}")
    configure_threads()
    task = get_task("sst2")
    full, tokenizer = load(args.model)
    plan = prune(args.model, PruneSettings(adapter_layers=args.adapter_layers), args.data_dir,
                 None, loaded=(full, tokenizer))
    rows = evaluation_rows(task, args.data_dir, args.eval_limit or None)
    train_rows = load_rows(task, task.train_split, args.data_dir)
    random.Random(0).shuffle(train_rows)
    examples = EncodedExamples(task, train_rows[:args.steps * args.batch_size * 2], tokenizer, 256)
    pad = pad_id(tokenizer)
    base = AlignSettings()
    results: dict = {"plan": {"kept": plan.kept_layers, "adapter_layers": plan.adapter_layers},
                     "steps": args.steps, "batch_size": args.batch_size, "eval_n": len(rows)}

    def record(name: str, value: dict) -> None:
        results[name] = value
        print(json.dumps({name: value}), flush=True)
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)

    with tempfile.TemporaryDirectory() as tmp:
        sub = make_sub_llm(full, plan, f"{tmp}/sub", tokenizer, seed=base.seed)
        initial_adapter = to_full_names(sub.adapter_lora(), plan)
        teacher = plug_adapter(copy.deepcopy(full), sub.adapter_lora(), plan)
        record("zero_shot", {"accuracy": evaluate(teacher, tokenizer, task, rows)["accuracy"]})
        public, heldout = public_caches(teacher, plan, tokenizer, base, args.data_dir)
        if not args.no_oracle:
            trained = local_train(teacher, plan.full_adapter_layers, examples, args.steps,
                                  args.batch_size, 1e-3, 0.0, 0, pad)
            record("oracle", {"accuracy": evaluate(teacher, tokenizer, task, rows)["accuracy"],
                              "loss": trained["loss"], "train_seconds": trained["seconds"]})
            load_lora_state(teacher, initial_adapter)
        for name in names:
            overrides, lr = GRID[name]
            sub = make_sub_llm(full, plan, f"{tmp}/{name}", tokenizer, seed=base.seed)
            began = time.perf_counter()
            report = {}
            if overrides is not None:
                settings = dataclasses.replace(base, **overrides)
                report = pre_align(teacher, sub.model, plan, public, heldout, settings,
                                   lora_layers=sub.emulator_layers)
            trained = local_train(sub.model, sub.adapter_layers, examples, args.steps,
                                  args.batch_size, lr, 0.0, 0, pad)
            load_lora_state(teacher, to_full_names(trained["state"], plan))
            accuracy = evaluate(teacher, tokenizer, task, rows)["accuracy"]
            load_lora_state(teacher, initial_adapter)
            record(name, {"accuracy": accuracy, "loss": trained["loss"], "lr": lr,
                          "align": overrides, "kl_before": report.get("kl_before"),
                          "kl_after": report.get("kl_after"), "rep_before": report.get("rep_before"),
                          "rep_after": report.get("rep_after"),
                          "seconds": time.perf_counter() - began})


if __name__ == "__main__":
    main()
