#!/usr/bin/env bash
# concord and etcd side by side on this machine (issue 4's comparison harness):
#   scripts/bench-compare.sh [quick|full] [--only NAME]
# full (about 20 minutes): writes docs/benchmarks/README.md and its charts.
# quick (about a minute, CI's smoke test): the same runs, seconds each, report under
# target/bench-quick/. Installs etcd-server (Debian) if missing; builds the release binaries
# unless CONCORD_BIN_DIR points at built ones.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-full}
shift || true
./scripts/install-deps.sh bench
bin_dir=${CONCORD_BIN_DIR:-target/release}
if [ -z "${CONCORD_BIN_DIR:-}" ]; then
  cargo build --release --bins -q
fi
if [ "$mode" = full ]; then
  out=docs/benchmarks
else
  out=target/bench-quick
fi
exec "$bin_dir/concord-compare" --mode "$mode" --bin-dir "$bin_dir" --out "$out" "$@"
