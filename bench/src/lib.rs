//! concord-bench: criterion micro-benchmarks of concord's hot paths (`cargo bench -p
//! concord-bench`, in `benches/`) and `concord-compare`, the side-by-side benchmark of concord
//! and etcd (`src/bin/compare.rs`, run by `scripts/bench-compare.sh`).
//!
//! The library part is empty on purpose.

#![warn(missing_docs)]
