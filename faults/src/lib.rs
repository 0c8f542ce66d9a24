//! concord under faults, as etcd's robustness tests and Jepsen test etcd, ZooKeeper and
//! Consul: a cluster of `concord node` processes on test hosts in Linux network namespaces
//! ([`netns`], [`cluster`]), faults from a seeded schedule ([`nemesis`]: kill -9, pauses,
//! partitions, a lossy network, splits, merges and replica moves ([`reshape`])), a workload that records what its clients saw
//! ([`workload`], [`history`]), and checkers of what must hold whatever the faults
//! ([`linearizability`], [`watches`], [`locks`], [`leases`]). [`campaign`] puts them together; `concord-faults run` is its
//! command line, and `tests/nemeses.rs` the fixed-seed selection that `cargo test` runs.

pub mod campaign;
pub mod cluster;
pub mod history;
pub mod leases;
pub mod linearizability;
pub mod locks;
pub mod nemesis;
pub mod netns;
pub mod reshape;
pub mod watches;
pub mod workload;
