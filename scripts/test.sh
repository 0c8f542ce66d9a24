#!/usr/bin/env bash
# The whole test suite: installs the system packages the build needs, builds every binary
# (the multi-process tests spawn `concord` and `concordctl`), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
# With --tests, the binaries are built with the same feature resolution as `cargo test`
# (dev-dependencies included), so RocksDB is compiled once, not once per resolution.
cargo build --workspace --bins --tests
# One test at a time per binary: the cluster tests start several nodes each, and this is
# meant to pass on a 2-core machine.
cargo test --workspace -- --test-threads=1
