"""Peak memory of FedPruner's similarity probe, by layers and by blocks, with the kept rows
stored in float32 and in bfloat16 (``fedpruner.probe_dtype``).

    FEDSODA_DATA_DIR=../shared/data nice -n 19 python bench/probe_peaks.py --task boolq \
        --out bench/probe_peaks_boolq.json

Each figure is ``fedsoda.accounting.similarity_peak_memory``: a fresh process with the
allocator pinned, running what a client's probe handler runs (the layered model one layer
at a time, the global LoRA of every layer in hand, then the CKA matrices). The smallest
budget must hold it with the run's headroom (``fedsoda.methods.fedpruner.similarity_peak``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from fedsoda.accounting import similarity_peak_memory
from fedsoda.budgets import MiB
from fedsoda.surgery.layered import layered_folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--folder", default=None, help="a layered folder to use instead of writing one")
    parser.add_argument("--data-dir", default=os.environ.get("FEDSODA_DATA_DIR"))
    parser.add_argument("--task", default="boolq")
    parser.add_argument("--samples", type=int, default=16, help="as fedpruner.probe_samples")
    parser.add_argument("--max-tokens", type=int, default=256, help="the run's max_tokens")
    parser.add_argument("--out", default="bench/probe_peaks_boolq.json")
    args = parser.parse_args()
    began = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = layered_folder(args.model, tmp, args.folder)
        for units in (False, True):
            for dtype in ("float32", "bfloat16"):
                peak = similarity_peak_memory(folder, args.task, args.samples, args.max_tokens,
                                              args.data_dir, units=units, dtype=dtype)
                rows.append({"probe": "blocks" if units else "layers", "probe_dtype": dtype,
                             "peak_mib": round(peak / MiB, 1)})
                print(json.dumps(rows[-1]), flush=True)
    result = {"model": args.model, "task": args.task, "samples": args.samples,
              "max_tokens": args.max_tokens, "rows": rows,
              "seconds": round(time.perf_counter() - began, 1)}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
