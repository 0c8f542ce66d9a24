#!/usr/bin/env bash
# Builds concord (release) and runs a local 3-node, 3-range cluster in ./concord-dev until
# Ctrl-C. Extra arguments go to `concord dev` (e.g. --nodes 5 --ranges 16 --data-dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --release --bins
echo "binaries: $PWD/target/release (export PATH=\"$PWD/target/release:\$PATH\" to use concordctl)"
exec ./target/release/concord dev "$@"
