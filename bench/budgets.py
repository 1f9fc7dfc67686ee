"""FedPruner's memory model on SmolLM2-135M: calibrated at two layer counts, checked at a third.

    FEDSODA_DATA_DIR=../shared/data nice -n 19 python bench/budgets.py \
        --out bench/budgets_smollm2.json

The model is written as a layered folder (``fedsoda.surgery.layered``) in a temporary
directory; ``fedsoda.budgets.calibrate`` measures a client training step (bf16 weights, LoRA
on every layer, AdamW, FedProx) on evenly spread layers in a fresh process at each of
``--sizes`` and fits ``peak(k) = a + b*k``; the step is then measured at ``--check`` layers
(the full model: the full-model LoRA step's peak that budget fractions refer to) and
compared with the prediction. For each fraction of that peak the JSON gives the layer count
``K`` the model allows; ``--verify`` also measures the peak at each such ``K`` below the full
model, to show the budget holds. The analytic figures from the config alone sit beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from transformers import AutoConfig

from fedsoda.budgets import MemoryModel, MiB, analytic, calibrate, measure_peak
from fedsoda.data.task import IGNORE_INDEX, load_rows, widest_examples
from fedsoda.data.tasks import get_task
from fedsoda.models import load, num_layers
from fedsoda.surgery.layered import save_layered
from fedsoda.training import client_threads


def mib(value: float) -> float:
    return round(value / MiB, 1)


def probe_batch_shape(tokenizer, task_name: str, batch_size: int, max_tokens: int,
                      data_dir: str | None) -> tuple[int, int]:
    """Padded length and labelled tokens per example of the batch the memory probe trains
    on: the evaluation split's widest (``fedsoda.data.task.widest_examples``)."""
    task = get_task(task_name)
    rows = load_rows(task, task.eval_split, data_dir)
    examples = widest_examples(task, rows, tokenizer, max_tokens, batch_size)
    width = max(len(example["input_ids"]) for example in examples)
    labelled = max(sum(label != IGNORE_INDEX for label in example["labels"][1:]) for example in examples)
    return width, labelled


def fit_report(memory: MemoryModel, fractions: list[float], full: int, total: int) -> dict:
    """The layer count each fraction of ``full`` allows, and its predicted peak."""
    out = {}
    for fraction in fractions:
        k = memory.layers_for(int(fraction * full), total)
        out[str(fraction)] = {"layers": k, "predicted_peak_mib": mib(memory.peak(k))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("FEDSODA_DATA_DIR"))
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--sizes", default="6,12")
    parser.add_argument("--check", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fractions", default="0.25,0.5,1.0")
    parser.add_argument("--headroom", type=float, default=0.05)
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--out", default="bench/budgets_smollm2.json")
    args = parser.parse_args()
    began = time.perf_counter()
    settings = {"task": args.task, "batch_size": args.batch_size, "max_tokens": args.max_tokens,
                "data_dir": args.data_dir}
    sizes = tuple(int(k) for k in args.sizes.split(","))
    fractions = [float(f) for f in args.fractions.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = load(args.model)
        total = num_layers(model)
        folder = save_layered(model, Path(tmp) / "layered", tokenizer)
        config = AutoConfig.from_pretrained(folder)
        del model
        repeats = []
        for _ in range(args.repeats):
            memory = calibrate(folder, sizes=sizes, **settings)
            measured = measure_peak(folder, args.check, **settings)
            predicted = memory.peak(args.check)
            repeats.append({"a_mib": mib(memory.a), "b_mib": mib(memory.b),
                            "points_mib": {k: mib(p) for k, p in memory.points},
                            "check_layers": args.check, "predicted_peak_mib": mib(predicted),
                            "measured_peak_mib": mib(measured),
                            "relative_error": round((predicted - measured) / measured, 4),
                            "memory": memory, "full": measured})
            print(json.dumps({k: v for k, v in repeats[-1].items() if k not in ("memory", "full")}),
                  flush=True)
        first, full = repeats[0]["memory"], repeats[0]["full"]
        (k1, p1), _ = first.points
        b = (full - p1) / (args.check - k1)
        through_full = MemoryModel(a=p1 - b * k1, b=b, source="measured",
                                   points=((k1, p1), (args.check, full)))
        fits = {}
        for name, fitted in ((f"fit_{k1}_{sizes[1]}", first), (f"fit_{k1}_{args.check}", through_full)):
            for headroom in (0.0, args.headroom):
                memory = MemoryModel(fitted.a, fitted.b, "measured", fitted.points, headroom)
                fits[f"{name}_headroom_{headroom}"] = fit_report(memory, fractions, full, total)
        verified = {}
        if args.verify:
            wanted = sorted({row["layers"] for fit in fits.values() for row in fit.values()} - {args.check})
            verified = {k: mib(measure_peak(folder, k, **settings)) for k in wanted}
            print(json.dumps({"verified_peaks_mib": verified}), flush=True)
    width, labelled = probe_batch_shape(tokenizer, args.task, args.batch_size, args.max_tokens,
                                        args.data_dir)
    figures = {"max_tokens_every_token_labelled": analytic(config, args.batch_size, args.max_tokens),
               "probe_batch_shape": analytic(config, args.batch_size, width, labelled)}
    results = {
        "args": vars(args), "threads": client_threads(), "num_layers": total,
        "repeats": [{k: v for k, v in r.items() if k not in ("memory", "full")} for r in repeats],
        "budgets_mib": {str(f): mib(int(f * full)) for f in fractions},
        "layers_for_budgets": fits,
        "verified_peaks_mib": verified,
        "probe_batch": {"padded_length": width, "labelled_tokens_per_example": labelled},
        "analytic": {name: {"a_mib": mib(m.a), "b_mib": mib(m.b),
                            "peak_mib_at_check": mib(m.peak(args.check))}
                     for name, m in figures.items()},
        "note": "CPU: peak RSS above the probe's RSS after imports and data loading "
                "(fedsoda.accounting). Budgets are fractions of the first repeat's full-model "
                "peak. Analytic: once at the safe bound (every sequence max_tokens long, every "
                "token labelled), once at the shape of the batches the probe draws (padded to "
                "the longest example, the answer tokens labelled)",
        "seconds": round(time.perf_counter() - began, 1),
    }
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out} in {results['seconds']} s")


if __name__ == "__main__":
    main()
