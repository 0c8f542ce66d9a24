#!/usr/bin/env bash
# Measures concord dev (3 nodes, 3 ranges at start, fsync on) with concord-loadgen: put with 1 and 64
# clients, then linearizable and serializable gets with 64 clients. Prints one JSON line per run.
#   scripts/bench-dev.sh [DURATION]      (default 10s per run)
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10s}
./scripts/install-deps.sh
cargo build --release --bins -q
dir=$(mktemp -d /tmp/concord-bench.XXXXXX)
./target/release/concord dev --data-dir "$dir" >"$dir/dev.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 300); do
  grep -q "client config" "$dir/dev.log" 2>/dev/null && break
  kill -0 "$pid" || { cat "$dir/dev.log"; exit 1; }
  sleep 0.1
done
cfg="$dir/concordctl.toml"
run() { ./target/release/concord-loadgen run --target concord --config "$cfg" --duration "$duration" -o json "$@"; }
run --workload put --clients 1
run --workload put --clients 64
run --workload get --clients 64 --consistency linearizable
run --workload get --clients 64 --consistency serializable
