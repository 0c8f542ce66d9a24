//! concord-node: a storage node of concord.
//!
//! - [`mvcc`]: the pure MVCC state machine of one range.
//! - [`storage`]: RocksDB storage of every group, with the group-commit writer.
//! - [`network`]: Raft traffic between nodes over QUIC.
//! - [`node`]: the node itself: groups, client protocol, reads at each consistency level.
//! - [`dev`]: `concord dev`, a local cluster in one process.

#![warn(missing_docs)]

pub mod dev;
pub mod leases;
pub mod mvcc;
pub mod network;
pub mod node;
pub mod raft_types;
pub mod storage;

pub use node::{
    split_point, stored_ranges, BoundNode, CompactionSettings, Node, NodeConfig, PlacementSettings,
    RaftSettings, SplitSettings, StartError, RANGES_DEFAULT,
};
