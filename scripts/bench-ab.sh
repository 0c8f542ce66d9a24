#!/usr/bin/env bash
# Before against after on one machine, side by side: starts the 3-process cluster of
# scripts/cluster.sh (fsync on) from two directories of release binaries in turn (A B, B A,
# A B, ...), runs the same concord-loadgen workload once on each, and prints one JSON line per
# run with the build's label, the cluster's range count after the run and the nodes' CPU time
# per operation added ("build":"A","ranges_after":8,"node_cpu_us_per_op":93). Medians are
# left to the reader (or `jq`).
#   scripts/bench-ab.sh DIR_A DIR_B ROUNDS -- LOADGEN_ARGS...
# e.g. scripts/bench-ab.sh /tmp/before target/release 3 -- --workload put --clients 64 --duration 10s
# CONCORD_NODE_ARGS_A / CONCORD_NODE_ARGS_B add node arguments to one side only, to compare
# settings of one build: DIR_A and DIR_B may then be the same directory.
# CONCORD_AB_WARMUP=30s runs the same workload for that long first, unmeasured, so that what
# a sustained load changes (splits by load, leader moves) has happened before the measured run.
set -euo pipefail
[ $# -ge 4 ] && [ "$4" = "--" ] || { sed -n 2,13p "$0"; exit 2; }
cd "$(dirname "$0")/.."
a=$1 b=$2 rounds=$3
shift 4
source scripts/cluster.sh
trap 'cluster_stop' EXIT
one() {
  local bin=$1 label=$2 dir
  shift 2
  dir=$(mktemp -d target/concord-ab.XXXXXX)
  local node_args_var=CONCORD_NODE_ARGS_$label
  CONCORD_NODE_ARGS="${CONCORD_NODE_ARGS:-} ${!node_args_var:-}" CONCORD_BIN_DIR=$bin cluster_start "$dir"
  # Every range has a leader now; leader balancing (a round a second) settles within a few.
  sleep 3
  local out ranges cpu_before cpu_after
  if [ -n "${CONCORD_AB_WARMUP:-}" ]; then
    # The same arguments with the warm-up's duration in place of the run's.
    local warm=() skip=0 arg
    for arg in "$@"; do
      if [ "$skip" = 1 ]; then skip=0; continue; fi
      case $arg in --duration) skip=1; continue ;; --duration=*) continue ;; esac
      warm+=("$arg")
    done
    timeout 300 "$bin/concord-loadgen" run --target concord --config "$dir/concordctl.toml" -o json \
      "${warm[@]}" --duration "$CONCORD_AB_WARMUP" >/dev/null
  fi
  cpu_before=$(nodes_cpu_ticks)
  out=$(timeout 300 "$bin/concord-loadgen" run --target concord --config "$dir/concordctl.toml" -o json "$@")
  cpu_after=$(nodes_cpu_ticks)
  # How many ranges the cluster ended with (it starts with 3; more: some split by load).
  ranges=$("$bin/concordctl" --config "$dir/concordctl.toml" ranges -o json | jq length)
  # The nodes' CPU time (user + system) per operation: steadier than throughput on a shared
  # machine, and what a CPU-saving change should lower.
  local cpu_us_per_op
  cpu_us_per_op=$(jq -r --argjson ticks $((cpu_after - cpu_before)) --argjson hz "$(getconf CLK_TCK)" \
    'if .ops > 0 then ($ticks * 1000000 / $hz / .ops | floor) else null end' <<<"$out")
  sed "s/^{/{\"build\":\"$label\",\"ranges_after\":$ranges,\"node_cpu_us_per_op\":$cpu_us_per_op,/" <<<"$out"
  cluster_stop
  rm -rf "$dir"
}
# User + system CPU ticks of the running cluster's node processes, summed.
nodes_cpu_ticks() {
  local pid total=0 stat
  for pid in "${cluster_pids[@]}"; do
    stat=$(cat "/proc/$pid/stat")
    # Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
    read -r -a f <<<"${stat##*) }"
    total=$((total + f[11] + f[12]))
  done
  echo "$total"
}
for r in $(seq 1 "$rounds"); do
  if [ $((r % 2)) -eq 1 ]; then one "$a" A "$@"; one "$b" B "$@"; else one "$b" B "$@"; one "$a" A "$@"; fi
done
