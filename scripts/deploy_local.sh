#!/usr/bin/env bash
# A whole Flower deployment on this machine: one SuperLink, N SuperNodes (one data
# partition each), `flwr run` of this repository's app with the given run config, then a
# check of the run folder. Every process the script starts is stopped when it exits.
#
#   scripts/deploy_local.sh [options] [KEY=VALUE ...]
#
#   KEY=VALUE        run-config overrides, keys as in [tool.flwr.app.config] of
#                    pyproject.toml (prune.n=2, align.samples=16, ...). Values that are not
#                    TOML numbers or booleans are quoted for you: model=/path/to/model works.
#   --nodes N        SuperNodes to start (default: the `clients` override, else 2); the
#                    script passes clients=N, and clients_per_round=N unless you set it
#   --port P         first of N+1 consecutive TCP ports: P for the SuperLink, P+1+K for
#                    SuperNode K (default: free ports picked at random)
#   --workdir DIR    Flower homes, logs, SuperNode caches and (unless `out` is given) the run
#                    folder DIR/run (default: a new temporary folder, kept afterwards)
#   --timeout S      give up on the run after S seconds (default 3600)
#   --node-data PAT  each SuperNode brings its own data: SuperNode K trains on PAT with {k}
#                    replaced by K (a JSON Lines file, or a folder, in the task's schema),
#                    passed as node config data-path; without it, partition K of data_dir
#   --tls            TLS and SuperNode authentication: a throw-away CA, server certificate
#                    and one key pair per SuperNode in WORKDIR/tls (scripts/tls_material.py),
#                    the SuperLink with --enable-supernode-auth, every SuperNode registered
#                    with `flwr supernode register` before it starts
#
# Without --tls this is the insecure local demo; docs/deployment.md says how to secure a real
# deployment with its own CA. Exit status 0 only if the run finished successfully
# and its folder holds config.toml, metrics.jsonl (one line per round), summary.json and
# adapter/.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${FEDSODA_BIN:-$REPO/.venv/bin}
[ -x "$BIN/flwr" ] || BIN=$(dirname "$(command -v flwr)")
# SuperLink and SuperNodes start flower-superexec, flwr-serverapp and flwr-clientapp by name.
export PATH="$BIN:$PATH"

nodes="" port="" workdir="" timeout_s=3600 node_data="" tls=""
overrides=()
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) nodes=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        --workdir) workdir=$2; shift 2 ;;
        --timeout) timeout_s=$2; shift 2 ;;
        --node-data) node_data=$2; shift 2 ;;
        --tls) tls=1; shift ;;
        -h|--help) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *=*) overrides+=("$1"); shift ;;
        *) echo "deploy_local: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

# --- run config -------------------------------------------------------------------------
"$BIN/python" - "$REPO/pyproject.toml" "${overrides[@]+"${overrides[@]}"}" <<'EOF' || exit 2
import sys, tomllib

def flat(table, prefix=""):
    for key, value in table.items():
        if isinstance(value, dict):
            yield from flat(value, f"{prefix}{key}.")
        else:
            yield prefix + key

with open(sys.argv[1], "rb") as handle:
    known = set(flat(tomllib.load(handle)["tool"]["flwr"]["app"]["config"]))
unknown = [pair.split("=")[0] for pair in sys.argv[2:] if pair.split("=")[0] not in known]
if unknown:
    sys.exit(f"deploy_local: unknown run-config keys {', '.join(unknown)}; the keys are those "
             "of [tool.flwr.app.config] in pyproject.toml")
EOF
declare -A given=()
for pair in "${overrides[@]+"${overrides[@]}"}"; do given[${pair%%=*}]=${pair#*=}; done
if [ -z "$nodes" ]; then nodes=${given[clients]:-2}; fi
if [ -n "${given[clients]:-}" ] && [ "${given[clients]}" != "$nodes" ]; then
    echo "deploy_local: clients=${given[clients]} but --nodes $nodes: one SuperNode serves" \
         "one partition, so they must match" >&2
    exit 2
fi
[ -n "${given[clients]:-}" ] || overrides+=("clients=$nodes")
[ -n "${given[clients_per_round]:-}" ] || overrides+=("clients_per_round=$nodes")

workdir=${workdir:-$(mktemp -d "${TMPDIR:-/tmp}/fedsoda-deploy.XXXXXX")}
mkdir -p "$workdir"
workdir=$(cd "$workdir" && pwd)
[ -n "${given[out]:-}" ] || overrides+=("out=$workdir/run")

# The ServerApp and ClientApps run in processes started by the SuperLink and the SuperNodes,
# whose working folder is not the caller's: make paths absolute here.
toml_value() {  # $1 key, $2 value -> a TOML literal
    local key=$1 value=$2
    case "$key" in
        out|data_dir) if [ -n "$value" ]; then value=$(realpath -m -- "$value"); fi ;;
        model) if [ -e "$value" ]; then value=$(realpath -- "$value"); fi ;;
    esac
    if [[ $value =~ ^[+-]?[0-9]+$ || $value =~ ^[+-]?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?$ \
          || $value == true || $value == false || $value == \"*\" || $value == \'*\' ]]; then
        printf '%s' "$value"
    else
        value=${value//\\/\\\\}
        printf '"%s"' "${value//\"/\\\"}"
    fi
}
# One --run-config string for all pairs: flwr 1.42 merges separate --run-config options with a
# shallow dict update, so `-c prune.n=2 -c prune.p=2` would keep only prune.p.
run_config=""
for pair in "${overrides[@]}"; do
    key=${pair%%=*}
    [ "$key" = out ] && out=$(realpath -m -- "${pair#*=}")
    run_config+="${run_config:+ }$key=$(toml_value "$key" "${pair#*=}")"
done

# --- ports ------------------------------------------------------------------------------
if [ -z "$port" ]; then
    ports=($("$BIN/python" - "$nodes" <<'EOF'
import random, socket, sys
count = int(sys.argv[1]) + 1
for _ in range(200):
    base = random.randrange(20000, 60000 - count)
    try:
        for p in range(base, base + count):
            with socket.socket() as s:
                s.bind(("127.0.0.1", p))
    except OSError:
        continue
    print(*range(base, base + count))
    break
EOF
))
    [ ${#ports[@]} -eq $((nodes + 1)) ] || { echo "deploy_local: no free ports" >&2; exit 1; }
else
    ports=($(seq "$port" $((port + nodes))))
fi
link_port=${ports[0]}

# --- cleanup: every process started here, and what they started --------------------------
started=()
descendants() {  # the process ids below $1, deepest first
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        descendants "$child"
        echo "$child"
    done
}
cleanup() {
    local status=$? pid all=() left
    trap - EXIT INT TERM
    for pid in "${started[@]+"${started[@]}"}"; do
        all+=($(descendants "$pid") "$pid")
    done
    if [ ${#all[@]} -gt 0 ]; then
        echo "deploy_local: stopping ${#all[@]} processes" >&2
        kill -TERM "${all[@]}" 2>/dev/null || true
        for _ in $(seq 50); do
            left=()
            for pid in "${all[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
            [ ${#left[@]} -eq 0 ] && break
            sleep 0.2
        done
        [ ${#left[@]} -eq 0 ] || kill -KILL "${left[@]}" 2>/dev/null || true
    fi
    echo "deploy_local: logs in $workdir/logs" >&2
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- security: insecure demo, or TLS with SuperNode authentication ----------------------------
mkdir -p "$workdir/logs" "$workdir/home/cli"
link_security=(--insecure) cli_security="insecure = true"
if [ -n "$tls" ]; then
    "$BIN/python" "$REPO/scripts/tls_material.py" "$workdir/tls" "$nodes"
    link_security=(--ssl-ca-certfile "$workdir/tls/ca.crt" --ssl-certfile "$workdir/tls/server.pem"
                   --ssl-keyfile "$workdir/tls/server.key" --enable-supernode-auth)
    cli_security="root-certificates = \"$workdir/tls/ca.crt\""
fi
node_security() {  # $1: SuperNode K -> its flags
    if [ -n "$tls" ]; then
        echo --root-certificates "$workdir/tls/ca.crt" --auth-supernode-private-key "$workdir/tls/node-$1"
    else
        echo --insecure
    fi
}
# The CLI reads its SuperLink connections from $FLWR_HOME/config.toml (Flower >= 1.26).
cat >"$workdir/home/cli/config.toml" <<EOF
[superlink]
default = "fedsoda-local"

[superlink.fedsoda-local]
address = "127.0.0.1:$link_port"
$cli_security
EOF

# --- SuperLink and SuperNodes ------------------------------------------------------------
FLWR_HOME="$workdir/home/superlink" "$BIN/flower-superlink" "${link_security[@]}" \
    --disable-runtime-dependency-installation --host 127.0.0.1 --port "$link_port" \
    >"$workdir/logs/superlink.log" 2>&1 &
started+=($!)
echo "deploy_local: SuperLink on 127.0.0.1:$link_port (pid $!)"
listening=""
for _ in $(seq 300); do
    (echo >"/dev/tcp/127.0.0.1/$link_port") 2>/dev/null && { listening=1; break; }
    kill -0 "${started[0]}" 2>/dev/null || break
    sleep 0.2
done
if [ -z "$listening" ]; then
    tail -20 "$workdir/logs/superlink.log" >&2
    echo "deploy_local: the SuperLink does not listen on port $link_port" >&2
    exit 1
fi

for k in $(seq 0 $((nodes - 1))); do
    if [ -n "$tls" ]; then  # only registered SuperNodes may connect
        FLWR_HOME="$workdir/home/cli" "$BIN/flwr" supernode register "$workdir/tls/node-$k.pub" \
            fedsoda-local >>"$workdir/logs/register.log" 2>&1 || {
            tail -5 "$workdir/logs/register.log" >&2
            echo "deploy_local: registering SuperNode $k failed" >&2
            exit 1
        }
    fi
    mkdir -p "$workdir/node-$k/cache"
    # Each SuperNode is its own device: its own Flower home and its own fedsoda cache (where
    # the ClientApp keeps the sub-LLM it received).
    FLWR_HOME="$workdir/node-$k/flwr" FEDSODA_CACHE="$workdir/node-$k/cache" \
        "$BIN/flower-supernode" $(node_security "$k") --superlink "127.0.0.1:$link_port" \
        --host 127.0.0.1 --port "${ports[k + 1]}" \
        --node-config "partition-id=$k num-partitions=$nodes${node_data:+ data-path=\"$(realpath -m -- "${node_data//\{k\}/$k}")\"}" \
        >"$workdir/logs/supernode-$k.log" 2>&1 &
    started+=($!)
    echo "deploy_local: SuperNode $k (partition $k of $nodes) on 127.0.0.1:${ports[k + 1]} (pid $!)"
done

# --- the run -----------------------------------------------------------------------------
export FLWR_HOME="$workdir/home/cli"

began=$(date +%s)
echo "deploy_local: flwr run $REPO fedsoda-local --run-config '$run_config' --stream"
# In the background, so that a signal to this script stops it at once (bash runs traps only
# between foreground commands); `tail` shows the log as it streams.
timeout "$timeout_s" "$BIN/flwr" run "$REPO" fedsoda-local --run-config "$run_config" --stream \
    >"$workdir/logs/run.log" 2>&1 &
run_pid=$!
started+=("$run_pid")
tail -n +1 -f --pid="$run_pid" "$workdir/logs/run.log" &
tail_pid=$!
started+=("$tail_pid")
run_status=0
wait "$run_pid" || run_status=$?
wait "$tail_pid" || true
run_id=$(sed -n 's/.*Successfully started run \([0-9][0-9]*\).*/\1/p' "$workdir/logs/run.log" | head -1)
if [ -z "$run_id" ]; then
    echo "deploy_local: flwr run did not start a run (status $run_status)" >&2
    exit 1
fi
if [ "$run_status" = 124 ]; then
    echo "deploy_local: run $run_id still going after ${timeout_s}s; stopping it" >&2
    "$BIN/flwr" stop "$run_id" fedsoda-local || true
    exit 1
fi
# The log stream ends when the run ends; its status says how.
status=""
for _ in $(seq 100); do
    status=$("$BIN/flwr" ls fedsoda-local --run-id "$run_id" --format json 2>/dev/null \
        | "$BIN/python" -c 'import json, sys; print(json.load(sys.stdin)["runs"][0]["status"])' \
        2>/dev/null || true)
    case "$status" in finished*) break ;; esac
    sleep 0.5
done
echo "deploy_local: run $run_id: ${status:-unknown status} after $(( $(date +%s) - began ))s"
if [ "$status" != finished:completed ]; then
    echo "deploy_local: the run did not complete; see the log above and $workdir/logs" >&2
    exit 1
fi

# --- the run folder ----------------------------------------------------------------------
"$BIN/python" - "$out" <<'EOF'
import json, sys, tomllib
from pathlib import Path

out = Path(sys.argv[1])
missing = [name for name in ("config.toml", "metrics.jsonl", "summary.json",
                             "adapter/adapter_config.json") if not (out / name).is_file()]
if missing:
    sys.exit(f"deploy_local: run folder {out} lacks {', '.join(missing)}")
rounds = tomllib.loads((out / "config.toml").read_text())["rounds"]
lines = (out / "metrics.jsonl").read_text().splitlines()
if len(lines) != rounds:
    sys.exit(f"deploy_local: {out}/metrics.jsonl has {len(lines)} rounds, expected {rounds}")
summary = json.loads((out / "summary.json").read_text())
print(f"deploy_local: run folder {out}: {rounds} rounds, final accuracy "
      f"{summary['accuracy']}, {summary['wall_seconds']:.0f}s in the ServerApp")
EOF
