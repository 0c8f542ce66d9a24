#!/usr/bin/env bash
# The placement benchmarks of issue 5, on 3-process clusters on loopback (fsync on, 3
# replicas), printed as one JSON line per measurement:
#   scripts/bench-placement.sh [quick|full]
# 1. Load split: `put` throughput on a cluster that starts with one range and never splits
#    (--split-writes 0) against one that splits by load (the default, 2,000 writes/s sustained),
#    A/B/A/B once the second has split. Its warm-up is a `verify` run (every acknowledged write
#    read back) that goes on while the range splits; another goes on while the split ranges are
#    merged back by hand (`concordctl ranges merge 1`).
# 2. Rebalance: fill a 3-node cluster with 1 GiB (full; 64 MiB quick) by a `verify` run with
#    16 KiB values, join nodes 4 and 5, and time until the placement service has spread the
#    replicas evenly (no node more than one replica from another), while another `verify` run
#    goes on through the moves.
# quick: seconds per run (a smoke test). full: the figures in docs/benchmarks/placement.md.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-full}
./scripts/install-deps.sh
bin=${CONCORD_BIN_DIR:-target/release}
if [ -z "${CONCORD_BIN_DIR:-}" ]; then
  cargo build --release --bins -q
fi
export CONCORD_BIN_DIR=$bin
source scripts/cluster.sh
work=$(mktemp -d /tmp/concord-placement.XXXXXX)
joined=()
stop_all() {
  local pid
  for pid in "${joined[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${joined[@]}"; do wait "$pid" 2>/dev/null || true; done
  joined=()
  cluster_stop
}
trap 'stop_all; [ -n "${KEEP_WORK:-}" ] || rm -rf "$work"' EXIT

if [ "$mode" = quick ]; then
  run_for=3s warm_for=20s fill_ops=4096 rounds=1
else
  run_for=10s warm_for=40s fill_ops=65536 rounds=2
fi

loadgen() { # CONFIG ARGS...: one run, its JSON object on stdout
  local config=$1
  shift
  "$bin/concord-loadgen" run --target concord --config "$config" -o json "$@"
}
ranges_of() { "$bin/concordctl" --config "$1" ranges -o json | jq length; }
check_verified() { # JSON of a verify run: fails the benchmark on a lost write
  local lost
  lost=$(jq -r '.lost' <<<"$1")
  if [ "$lost" != 0 ]; then
    echo "verify lost $lost acknowledged writes: $1" >&2
    exit 1
  fi
}

# 1. Load split.
one="$work/one" split="$work/split"
mkdir -p "$one" "$split"
CONCORD_BENCH_PORT=27201 CONCORD_NODE_ARGS="--ranges 1 --split-writes 0" cluster_start "$one"
CONCORD_BENCH_PORT=27211 CONCORD_NODE_ARGS="--ranges 1" cluster_start "$split"
for attempt in 1 2 3; do
  warm=$(loadgen "$split/concordctl.toml" --workload verify --clients 64 --duration "$warm_for")
  check_verified "$warm"
  n=$(ranges_of "$split/concordctl.toml")
  jq -c --argjson ranges "$n" '{bench: "load-split-warmup", acknowledged, lost, ops_per_sec, ranges_after: $ranges}' <<<"$warm"
  [ "$n" -gt 1 ] && break
done
for round in $(seq 1 "$rounds"); do
  for side in one split; do
    dir="$work/$side"
    r=$(loadgen "$dir/concordctl.toml" --workload put --clients 64 --value-size 256 --duration "$run_for")
    n=$(ranges_of "$dir/concordctl.toml")
    jq -c --arg side "$side" --argjson round "$round" --argjson ranges "$n" \
      '{bench: "load-split", side: $side, round: $round, ranges: $ranges, ops_per_sec, p50_us, p99_us, errors}' <<<"$r"
  done
done
# Merges under traffic: a verify run goes on while range 1 takes its split-off neighbours
# back in, one by one, until it is the only range.
loadgen "$split/concordctl.toml" --workload verify --clients 16 --duration 20s >"$work/merging.json" &
merging=$!
merges=0
while [ "$(ranges_of "$split/concordctl.toml")" -gt 1 ] && [ "$merges" -lt 64 ]; do
  # Refused once range 1 holds everything (the routes may lag the last merge by a moment).
  "$bin/concordctl" --config "$split/concordctl.toml" ranges merge 1 -o json >/dev/null || break
  merges=$((merges + 1))
done
wait "$merging"
check_verified "$(cat "$work/merging.json")"
jq -c --argjson merges "$merges" --argjson ranges "$(ranges_of "$split/concordctl.toml")" \
  '{bench: "merge-traffic", merges: $merges, ranges_after: $ranges, acknowledged, lost, ops_per_sec, errors}' \
  "$work/merging.json"
stop_all

# 2. Rebalance 3 -> 5 nodes.
grow="$work/grow"
mkdir -p "$grow"
base=27221
CONCORD_BENCH_PORT=$base CONCORD_NODE_ARGS="" cluster_start "$grow"
config="$grow/concordctl.toml"
fill=$(loadgen "$config" --workload verify --clients 64 --value-size 16384 --ops "$fill_ops" --duration 20m)
check_verified "$fill"
jq -c '{bench: "rebalance-fill", acknowledged, lost, ops_per_sec}' <<<"$fill"
# Let size splits settle: the range count stays the same over 10 s (bounded).
previous=0
for _ in $(seq 1 12); do
  n=$(ranges_of "$config")
  [ "$n" = "$previous" ] && break
  previous=$n
  sleep 10
done
bytes=$("$bin/concordctl" --config "$config" ranges -o json | jq '[.[].bytes] | add')
started=$(date +%s.%N)
for id in 4 5; do
  "$bin/concord" node --id "$id" --listen "127.0.0.1:$((base + id - 1))" --join "127.0.0.1:$base" \
    --data-dir "$grow/node-$id" --cert-dir "$grow/certs" >"$grow/node-$id.log" 2>&1 &
  joined+=($!)
done
loadgen "$config" --workload verify --clients 16 --duration 60s >"$work/during.json" &
during=$!
balanced=""
for _ in $(seq 1 900); do
  spread=$("$bin/concordctl" --config "$config" nodes -o json |
    jq '[.[] | select(.state == "up") | .replicas] | if length == 5 then max - min else 99 end')
  if [ "$spread" -le 1 ]; then
    balanced=$(awk -v now="$(date +%s.%N)" -v t0="$started" 'BEGIN { printf "%.1f", now - t0 }')
    break
  fi
  sleep 1
done
wait "$during"
check_verified "$(cat "$work/during.json")"
jq -c '{bench: "rebalance-traffic", acknowledged, lost, ops_per_sec, errors}' "$work/during.json"
nodes=$("$bin/concordctl" --config "$config" nodes -o json | jq -c '[.[] | {id, replicas, leaders}]')
echo "{\"bench\": \"rebalance\", \"ranges\": $n, \"bytes\": $bytes, \"seconds\": ${balanced:-null}, \"nodes\": $nodes}"
[ -n "$balanced" ] || { echo "not balanced within 15 minutes" >&2; exit 1; }
