//! openraft's type configuration for concord's range groups. openraft stays behind this
//! module and `storage/`, `network.rs`: an upgrade touches those only.

use std::io::Cursor;

use concord_transport::api::{ApiError, KvResponse};
use serde::{Deserialize, Serialize};

use crate::mvcc::Command;

/// The outcome of applying a [`Command`], returned to the proposer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult(pub Result<KvResponse, ApiError>);

openraft::declare_raft_types!(
    /// Type configuration of every range group.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = openraft::BasicNode,
);

/// Snapshot payload type moved between replicas.
pub type SnapshotData = Cursor<Vec<u8>>;
/// One range group's Raft handle.
pub type Raft = openraft::Raft<TypeConfig, crate::storage::StateMachine>;
/// A log id.
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
/// A vote.
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
/// A log entry.
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
/// Membership as stored with the log id that introduced it.
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
