#!/usr/bin/env bash
# concord, etcd and ZooKeeper side by side on this machine (the comparison harness):
#   [BENCH_OUT=DIR] scripts/bench-compare.sh quick|full [--only NAME,...]
# full (about half an hour): writes docs/benchmarks/README.md, raw.jsonl and the charts.
# quick (a few minutes, CI's smoke test): the same runs, seconds each, report under
# target/bench-quick/. Installs etcd-server and zookeeper (Debian) if missing; builds the release binaries
# unless CONCORD_BIN_DIR points at built ones. The clusters' data go under target/.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
case "$mode" in
  quick) out=target/bench-quick ;;
  full) out=docs/benchmarks ;;
  *) echo "usage: [BENCH_OUT=DIR] $0 quick|full [--only NAME,...]" >&2; exit 2 ;;
esac
out=${BENCH_OUT:-$out}
shift
./scripts/install-deps.sh bench
bin_dir=${CONCORD_BIN_DIR:-target/release}
if [ -z "${CONCORD_BIN_DIR:-}" ]; then
  cargo build --release --bins -q
fi
exec "$bin_dir/concord-compare" --mode "$mode" --bin-dir "$bin_dir" --out "$out" --work-dir target "$@"
