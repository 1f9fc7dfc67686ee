"""The L2 norms of the clients' LoRA updates in the first rounds of a run without DP: the
scale from which to choose ``dp.clip`` (a clip far over them only adds noise, one far under
them shrinks every update).

    FEDSODA_DATA_DIR=../shared/data .venv/bin/python bench/update_norms.py configs/quickstart.toml \\
        --set rounds=5 --runs runs/dp-sst2/nodp-seed0 --out bench/update_norms.json

The clients train as in the run (Flower's simulation engine), and the run folder is an
ordinary run's (so the run is also the no-DP row of a DP comparison); the server's screening
step is wrapped here to read each accepted reply's distance from the LoRA it was sent.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from fedsoda.federated import server_app
from fedsoda.federated.config import load_config
from fedsoda.federated.simulation import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE overrides")
    parser.add_argument("--runs", default="runs/update-norms", help="the run folder")
    parser.add_argument("--out", default="bench/update_norms.json")
    args = parser.parse_args()
    cfg = load_config(args.config, [*args.set, f"out={args.runs}"])
    norms: list[list[float]] = []
    bound = server_app.bound_replies

    def measured(replies, bases, settings):
        norms.append([math.sqrt(sum(float(((t.double() - bases[r.client][k].double()) ** 2).sum())
                                    for k, t in r.update.items())) for r in replies])
        return bound(replies, bases, settings)

    server_app.bound_replies = measured  # the ServerApp runs in this process
    simulate(cfg)
    rows = [{"round": i + 1, "l2_norms": sorted(n), "median": statistics.median(n)}
            for i, n in enumerate(norms)]
    Path(args.out).write_text(json.dumps({"config": args.config, "set": args.set,
                                          "rounds": rows}, indent=1) + "\n")
    for row in rows:
        print(f"round {row['round']}: median L2 norm {row['median']:.4g}, "
              f"range {row['l2_norms'][0]:.4g} to {row['l2_norms'][-1]:.4g}")


if __name__ == "__main__":
    main()
