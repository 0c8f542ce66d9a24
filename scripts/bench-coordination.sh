#!/usr/bin/env bash
# The coordination benchmarks of issue 3 on a 3-process cluster on loopback (fsync on):
# lock-contention, membership, lease-churn and watch-fanout. One JSON line per run.
#   scripts/bench-coordination.sh [quick|full]
# quick (smoke, ~1 min): small sizes. full: the sizes published in
# docs/benchmarks/coordination.md (100,000 leases, 10,000 and 100,000 watchers).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-full}
./scripts/install-deps.sh
cargo build --release --bins -q
source scripts/cluster.sh
dir=$(mktemp -d /tmp/concord-coord.XXXXXX)
trap 'cluster_stop; rm -rf "$dir"' EXIT
cluster_start "$dir"
run() {
  ./target/release/concord-loadgen run --target concord --config "$dir/concordctl.toml" -o json "$@"
}
if [ "$mode" = quick ]; then
  run --workload lock-contention --clients 8 --locks 2 --duration 3s
  run --workload membership --members 100 --watchers 4 --churn 10 --ttl 5 --duration 3s
  run --workload lease-churn --leases 1000 --ttl 5 --churn 20 --clients 16 --duration 5s
  run --workload watch-fanout --watchers 100 --rate 50 --connections 2 --duration 3s
else
  run --workload lock-contention --clients 32 --locks 8 --duration 15s
  run --workload membership --members 10000 --watchers 16 --churn 20 --ttl 30 --clients 64 --duration 20s
  run --workload lease-churn --leases 100000 --ttl 60 --churn 50 --clients 64 --connections 4 --duration 30s
  run --workload watch-fanout --watchers 10000 --rate 100 --connections 8 --duration 15s
  run --workload watch-fanout --watchers 100000 --rate 100 --connections 8 --duration 15s
fi
