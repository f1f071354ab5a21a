#!/usr/bin/env bash
# docs/deployment.md's Deployment Engine recipe on one machine (loopback): node data, a SuperLink,
# three SuperNodes with their own data and ports, a connection, and the quick preset run
# through it. tests/e2e/test_deployment.py runs this file, so the recipe cannot drift.
# Usage: bash scripts/deployment_loopback.sh [WORKDIR [key=value ...]]   (PORT=9091 BIN=.venv/bin
# by default); the key=value pairs change the run-config of step 5 (the last of a key wins).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="$(realpath -m "${1:-deployment-demo}")"
if [ "$#" -gt 0 ]; then shift; fi
PORT="${PORT:-9091}"
BIN="${BIN:-.venv/bin}"
mkdir -p "$WORK"
# Flower starts its helpers (flower-superexec, flwr-serverapp, ...) by name: this bin first.
export PATH="$(realpath "$BIN"):$PATH"
export FLWR_HOME="$WORK/flwr-home" FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
PIDS=()
trap 'for pid in "${PIDS[@]}"; do kill -- "-$pid" 2>/dev/null || true; done' EXIT

# 1. Each node's own data (here: the quick preset's synthetic set in 3 shards).
"$BIN/python" -m flower_app.data.node_data --out "$WORK/node-data" --run-config configs/quick.toml num-clients=3

# 2. The SuperLink (coordinator); a database file, not :memory:.
setsid "$BIN/flower-superlink" --insecure --database "$WORK/state.db" --host 127.0.0.1 --port "$PORT" > "$WORK/superlink.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 120); do  # up to a minute for /health to answer
  kill -0 "${PIDS[0]}" 2>/dev/null || { tail -3 "$WORK/superlink.log"; exit 1; }
  "$BIN/python" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health', timeout=1)" 2>/dev/null && break
  sleep 0.5
done

# 3. Three SuperNodes; each needs its own --port (the ClientApp API) on a shared host.
for i in 0 1 2; do
  setsid "$BIN/flower-supernode" --insecure --superlink "127.0.0.1:$PORT" --port "$((PORT + 10 + i))" \
    --node-config "partition-id=$i num-partitions=3 data-dir=\"$WORK/node-data/partition-$i\"" > "$WORK/supernode-$i.log" 2>&1 &
  PIDS+=($!)
done

# 4. A connection named loopback for flwr.
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "loopback"

[superlink.loopback]
address = "127.0.0.1:$PORT"
insecure = true
TOML

# 5. The quick preset with num-clients = the 3 SuperNodes; exits non-zero if the run failed.
"$BIN/fl-run" configs/quick.toml num-clients=3 fraction-train=1.0 num-server-rounds=2 \
  output-dir="$WORK/results" run-name=deployed "$@" --connection loopback
