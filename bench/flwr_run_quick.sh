#!/bin/bash
# `fedsoda run --quick` against `flwr run .` with the same resolved config on SmolLM2-135M:
# the adapters' sha256, whether the metrics are equal, and Flower deprecation lines.
#   FEDSODA_DATA_DIR=../shared/data bash bench/flwr_run_quick.sh [WORK_DIR]
# Both give the same client resources (1 CPU a client, 2 for Ray): torch threads per client
# change SmolLM2's float sums, so Flower's default (2 CPUs a client) gives other bits.
set -euo pipefail
cd "$(dirname "$0")/.."
export FEDSODA_DATA_DIR=${FEDSODA_DATA_DIR:-$(cd .. && pwd)/shared/data}
W=$(realpath -m "${1:-/tmp/flwr-run-quick}"); rm -rf "$W"; mkdir -p "$W/home"
START=$(date +%s)
FEDSODA_CACHE=$W/cache-a .venv/bin/fedsoda run --quick --out "$W/a" > "$W/a.out" 2>&1
echo "fedsoda run --quick: $(( $(date +%s) - START )) s" | tee "$W/result.txt"
.venv/bin/python - "$W" <<'PY'
import sys, tomli_w
from fedsoda.federated.config import load_config
work = sys.argv[1]
config = load_config(f"{work}/a/config.toml").to_dict() | {"out": f"{work}/b"}
open(f"{work}/run.toml", "w").write(tomli_w.dumps(config))
PY
PORT=$(.venv/bin/python -c "from fedsoda.federated.flower_run import free_port; print(free_port())")
printf '[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:%s"\ninsecure = true\n' "$PORT" > "$W/home/config.toml"
export FLWR_HOME=$W/home FEDSODA_CACHE=$W/cache-b PATH=$PWD/.venv/bin:$PATH
setsid flower-superlink --insecure --simulation --isolation subprocess \
    --disable-runtime-dependency-installation --host 127.0.0.1 --port "$PORT" > "$W/superlink.log" 2>&1 &
LINK=$!
trap 'kill -TERM -- -$LINK 2>/dev/null || true' EXIT
for _ in $(seq 300); do (echo > "/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.2; done
START=$(date +%s)
flwr run . sim --run-config "$W/run.toml" --stream --federation-config \
    "num-supernodes=2 client-resources-num-cpus=1 client-resources-num-gpus=0.0 init-args-num-cpus=2" \
    > "$W/b.out" 2>&1
echo "flwr run .: $(( $(date +%s) - START )) s" | tee -a "$W/result.txt"
sha256sum "$W"/{a,b}/adapter/adapter_model.safetensors | tee -a "$W/result.txt"
echo "Flower deprecation lines: $(cat "$W"/{a,b}.out | grep -i deprecat | grep -ci 'flwr\|flower\|run_simulation' || true)" | tee -a "$W/result.txt"
.venv/bin/python - "$W" <<'PY' | tee -a "$W/result.txt"
import json, sys
def rows(path): return [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in open(path)]
print("metrics equal:", rows(f"{sys.argv[1]}/a/metrics.jsonl") == rows(f"{sys.argv[1]}/b/metrics.jsonl"))
PY
