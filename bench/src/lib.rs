//! concord-bench: criterion micro-benchmarks of concord's hot paths (`cargo bench -p
//! concord-bench`). The side-by-side comparison harness against etcd belongs here too, later.
//!
//! The library part is empty on purpose: the benchmarks live in `benches/`.

#![warn(missing_docs)]
