#!/usr/bin/env bash
# Starts a 3-process concord cluster on loopback (separate `concord node` processes, fsync on)
# for benchmarks, and stops it. Sourced by the bench scripts:
#   source scripts/cluster.sh; cluster_start DIR; ...; cluster_stop
# Ports: CONCORD_BENCH_PORT (default 27101) and the two after it; refused if taken.
# Binaries: CONCORD_BIN_DIR (default ./target/release); more `concord node` flags:
# CONCORD_NODE_ARGS (e.g. "--leader-balance-ms 0").
cluster_pids=()

cluster_start() {
  local dir=$1 base=${CONCORD_BENCH_PORT:-27101} peers="" id
  for id in 1 2 3; do
    if ss -Hlun "sport = :$((base + id - 1))" 2>/dev/null | grep -q .; then
      echo "port $((base + id - 1)) is taken; set CONCORD_BENCH_PORT" >&2
      return 1
    fi
    peers+="${peers:+,}$id=127.0.0.1:$((base + id - 1))"
  done
  for id in 1 2 3; do
    "${CONCORD_BIN_DIR:-./target/release}/concord" node --id "$id" --listen "127.0.0.1:$((base + id - 1))" \
      --peers "$peers" --data-dir "$dir/node-$id" --cert-dir "$dir/certs" \
      --client-config "$dir/concordctl.toml" ${CONCORD_NODE_ARGS:-} >"$dir/node-$id.log" 2>&1 &
    cluster_pids+=($!)
  done
  for _ in $(seq 1 300); do
    # Ready when every node answers and every range it hosts has a leader.
    if [ -f "$dir/concordctl.toml" ] &&
      "${CONCORD_BIN_DIR:-./target/release}/concordctl" --config "$dir/concordctl.toml" status -o json 2>/dev/null |
      grep -q '"node_id"' &&
      ! "${CONCORD_BIN_DIR:-./target/release}/concordctl" --config "$dir/concordctl.toml" status -o json 2>/dev/null |
      grep -q -e '"leader":null' -e '"error"'; then
      return 0
    fi
    sleep 0.1
  done
  echo "cluster in $dir did not come up; logs:" >&2
  tail -n 20 "$dir"/node-*.log >&2
  return 1
}

cluster_stop() {
  local pid
  for pid in "${cluster_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${cluster_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  cluster_pids=()
}
