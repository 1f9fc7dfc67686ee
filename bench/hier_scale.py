"""How one HierFedLoRA global round's cost and memory grow with the number of simulated
devices (issue 16: the paper runs 80).

    FEDSODA_DATA_DIR=../shared/data .venv/bin/python bench/hier_scale.py --out bench/hier_scale.json

For each device count one run of one global round (one intra-group round, depth 8: the
top quarter of SmolLM2's layers; 1 local step; groups of 10) goes through Flower's
simulation engine, as `fedsoda run` does. Recorded per count: the round's real seconds
(training, aggregation and the final evaluation on ``--eval-limit`` examples), the server
process's peak RSS (``VmHWM``, reset before each count: the ServerApp runs in this
process) and the peak of the RSS summed over this process and every process under it
(Ray's workers, sampled every 0.2 s).
The clients share one read-only copy of the weights per Ray worker (the worker's model
cache), so memory should grow only with the LoRA and data each client adds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading
import time
from pathlib import Path

import psutil

from fedsoda.accounting import peak_since_window, start_peak_window
from fedsoda.federated.config import load_config
from fedsoda.federated.simulation import simulate


class TreeSampler(threading.Thread):
    """The peak, over time, of the RSS summed over this process and its descendants."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.running = 0, True

    def run(self) -> None:
        me = psutil.Process()
        while self.running:
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:  # a worker that just ended
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.2)


def one(count: int, args, folder: Path) -> dict:
    out = folder / f"devices-{count}"
    cfg = load_config(None, [
        "method=hierfedlora", f"model={args.model}", f"clients={count}",
        f"clients_per_round={count}", "rounds=1", "local_steps=1", "eval_every=0",
        f"eval_limit={args.eval_limit}", "partition=dirichlet:0.5", f"out={out}",
        f"data_dir={args.data_dir}", f"hierfedlora.groups={max(1, count // 10)}",
        "hierfedlora.tau=1", f"hierfedlora.depth={args.depth}"])
    sampler = TreeSampler()
    sampler.start()
    start_peak_window()  # VmHWM from here: each count's own peak
    began = time.perf_counter()
    summary = simulate(dataclasses.replace(cfg, sim_cpus=args.parallel))
    wall = time.perf_counter() - began
    sampler.running = False
    sampler.join()
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return {"devices": count, "groups": len(summary["groups"]), "round_seconds": metrics["seconds"],
            "run_wall_seconds": wall, "bytes_down": metrics["bytes_down"], "bytes_up": metrics["bytes_up"],
            "server_peak_rss_bytes": peak_since_window(),
            "all_processes_peak_rss_bytes": sampler.peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--counts", default="10,20,40,80")
    parser.add_argument("--depth", default="8")
    parser.add_argument("--eval-limit", type=int, default=32)
    parser.add_argument("--parallel", type=int, default=2, help="Ray workers (CPUs)")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--runs", default="runs/hier-scale", help="where the run folders go")
    parser.add_argument("--out", default="bench/hier_scale.json")
    args = parser.parse_args()
    rows = []
    for count in (int(c) for c in args.counts.split(",")):
        rows.append(one(count, args, Path(args.runs)))
        print(json.dumps(rows[-1]), flush=True)
        Path(args.out).write_text(json.dumps({"model": args.model, "depth": args.depth,
                                              "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
