//! The client protocol: requests, responses and errors with stable codes.
//!
//! Every request is one frame on its own bi-stream, answered by one [`ClientResponse`] frame.
//! Key-value requests name the range they are meant for ([`RangeId`] and epoch, from the route
//! table); a node that does not hold that range, or holds a newer epoch, says so with an error
//! the client acts on ([`ApiError::StaleEpoch`], [`ApiError::NotLeader`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::lease::{LeaseId, LeaseRequest, LeaseResponse, LeaseStatus};
use crate::lease::{LEASE_TTL_MAX_MS, LEASE_TTL_MIN_MS};

/// Identifies a range and its Raft group.
pub type RangeId = u64;
/// Identifies a node.
pub type NodeId = u64;

/// How a read is served (docs/consistency.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Consistency {
    /// The range's leader answers under its leader lease, or after a ReadIndex round.
    #[default]
    Linearizable,
    /// A follower obtains a read index from the leader, waits until applied, answers locally.
    Follower,
    /// Any replica answers from its local state: may be stale, never torn.
    Serializable,
}

impl std::str::FromStr for Consistency {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "linearizable" => Ok(Self::Linearizable),
            "follower" => Ok(Self::Follower),
            "serializable" => Ok(Self::Serializable),
            other => Err(format!(
                "unknown consistency {other:?} (linearizable, follower, serializable)"
            )),
        }
    }
}

/// A key with its value and MVCC metadata, as etcd reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The value (empty when the read was keys-only).
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Revision at which the key was created (since its last deletion).
    pub create_revision: u64,
    /// Revision of the key's last modification.
    pub mod_revision: u64,
    /// Number of modifications since creation (1 after the first put).
    pub version: u64,
    /// The lease the key is attached to; 0 for none.
    pub lease: i64,
}

/// Which keys an operation touches.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeySpan {
    /// The key, or the first key of the interval.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// `None`: the single key; `Some(empty)`: every key `>= key`; `Some(end)`: `[key, end)`.
    #[serde(with = "serde_bytes")]
    pub end: Option<Vec<u8>>,
}

impl KeySpan {
    /// The single key `key`.
    pub fn key(key: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            end: None,
        }
    }
    /// Every key starting with `prefix`.
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> Self {
        let key = prefix.into();
        let end = concord_placement::prefix_end(&key);
        Self {
            key,
            end: Some(end),
        }
    }
    /// Every key in `[start, end)`; an empty `end` is unbounded.
    pub fn interval(start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) -> Self {
        Self {
            key: start.into(),
            end: Some(end.into()),
        }
    }
    /// The span as a half-open interval `[start, end)` (empty end = unbounded).
    pub fn bounds(&self) -> (Vec<u8>, Vec<u8>) {
        match &self.end {
            None => {
                let mut end = self.key.clone();
                end.push(0);
                (self.key.clone(), end)
            }
            Some(end) => (self.key.clone(), end.clone()),
        }
    }
    /// Whether `k` is in the span.
    pub fn contains(&self, k: &[u8]) -> bool {
        match &self.end {
            None => k == self.key.as_slice(),
            Some(end) => k >= self.key.as_slice() && (end.is_empty() || k < end.as_slice()),
        }
    }
}

/// Put a value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutRequest {
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The value.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Attach to this lease (0: none). The lease must exist; when it expires or is revoked
    /// the key is deleted.
    pub lease: i64,
    /// Return the previous key-value, if any.
    pub prev_kv: bool,
}

/// Read keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRequest {
    /// The keys to read.
    pub span: KeySpan,
    /// Read at this revision; 0 for the latest.
    pub revision: u64,
    /// At most this many keys; 0 for no limit.
    pub limit: u64,
    /// Leave values out.
    pub keys_only: bool,
    /// Only count the keys.
    pub count_only: bool,
    /// Return keys in descending order.
    pub descending: bool,
}

impl RangeRequest {
    /// A plain read of `span` at the latest revision.
    pub fn new(span: KeySpan) -> Self {
        Self {
            span,
            revision: 0,
            limit: 0,
            keys_only: false,
            count_only: false,
            descending: false,
        }
    }
}

/// Delete keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRequest {
    /// The keys to delete.
    pub span: KeySpan,
    /// Return the deleted key-values.
    pub prev_kv: bool,
}

/// What a txn compare looks at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    /// The value (an absent key compares as never equal).
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The version (0 for an absent key).
    Version(u64),
    /// The create revision (0 for an absent key).
    CreateRevision(u64),
    /// The mod revision (0 for an absent key).
    ModRevision(u64),
}

/// How a txn compare compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    /// `=`
    Equal,
    /// `!=`
    NotEqual,
    /// `<`
    Less,
    /// `>`
    Greater,
}

/// One condition of a txn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    /// The key compared.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The comparison.
    pub op: CompareOp,
    /// What the key's current state is compared with.
    pub target: CompareTarget,
}

/// One operation of a txn branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOp {
    /// Put.
    Put(PutRequest),
    /// Read (at the txn's own point; `revision` must be 0).
    Range(RangeRequest),
    /// Delete.
    Delete(DeleteRequest),
}

/// Compare-and-swap: if every compare holds, run `success`, else `failure`. Atomic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRequest {
    /// Conditions, all of which must hold.
    pub compares: Vec<Compare>,
    /// Operations run when the conditions hold.
    pub success: Vec<TxnOp>,
    /// Operations run otherwise.
    pub failure: Vec<TxnOp>,
    /// Run only while a lock holder still holds its lock (see [`Fence`]); else the txn is
    /// refused with [`ApiError::Fenced`] and nothing runs.
    pub fence: Option<Fence>,
}

/// A fencing condition: the txn runs only while the contender that holds `token` is still
/// the holder of the lock whose contenders' keys live under `prefix` — its key is there, it
/// has the lowest create revision, and its lease is live in the txn's range. A paused
/// ex-holder's fenced writes are refused even in other ranges than the lock: contenders do
/// not take over an expired holder's lock until its lease is detached from every range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    /// The lock's key prefix (all of it in one range).
    #[serde(with = "serde_bytes")]
    pub prefix: Vec<u8>,
    /// The holder's fencing token: the create revision of its key.
    pub token: u64,
    /// The lease the holder's key is attached to.
    pub lease: LeaseId,
}

impl TxnRequest {
    /// Every key (or key span) the txn touches, for range checks.
    pub fn spans(&self) -> Vec<KeySpan> {
        let mut spans: Vec<KeySpan> = self
            .compares
            .iter()
            .map(|c| KeySpan::key(c.key.clone()))
            .collect();
        for op in self.success.iter().chain(&self.failure) {
            spans.push(match op {
                TxnOp::Put(p) => KeySpan::key(p.key.clone()),
                TxnOp::Range(r) => r.span.clone(),
                TxnOp::Delete(d) => d.span.clone(),
            });
        }
        spans
    }
    /// Every put of both branches.
    pub fn puts(&self) -> impl Iterator<Item = &PutRequest> {
        self.success
            .iter()
            .chain(&self.failure)
            .filter_map(|op| match op {
                TxnOp::Put(p) => Some(p),
                _ => None,
            })
    }
    /// Number of operations (compares + both branches), checked against `txn_ops_max`.
    pub fn op_count(&self) -> usize {
        self.compares.len() + self.success.len() + self.failure.len()
    }
}

/// A key-value request addressed to one range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvRequest {
    /// Put.
    Put(PutRequest),
    /// Read, at a consistency level.
    Range(RangeRequest, Consistency),
    /// Delete.
    Delete(DeleteRequest),
    /// Compare-and-swap transaction.
    Txn(TxnRequest),
    /// Drop revisions older than `revision` (capped at the range's own revision).
    Compact {
        /// The compaction point.
        revision: u64,
    },
    /// A lease operation.
    Lease(LeaseRequest),
    /// Split the range at key `at` (an operator's request; see [`SplitResponse`]): keys from
    /// `at` on move to a new range on the same replicas. `at` must lie strictly inside the
    /// range (not at its start).
    Split {
        /// The first key of the new range.
        #[serde(with = "serde_bytes")]
        at: Vec<u8>,
    },
    /// Move the range's replica on node `from` to node `to` (an operator's request, also what
    /// the placement scheduler asks of a range's leader; see [`MoveResponse`]): `to` is added as
    /// a learner, caught up, then replaces `from` among the voters in one joint-consensus change.
    MoveReplica {
        /// A voter of the range now.
        from: NodeId,
        /// A node without a replica of the range.
        to: NodeId,
    },
    /// Merge the range's right neighbour into it (an operator's request, also what the
    /// placement scheduler asks of a range's leader; see [`MergeResponse`]): the neighbour is
    /// frozen, then its whole state joins this range, which takes over its keys.
    Merge,
    /// Freeze the range for a merge into its left neighbour `into` and hand over its final
    /// state (asked by that neighbour's leader, node to node; see [`FrozenResponse`]).
    Freeze {
        /// The left neighbour.
        into: RangeId,
    },
}

/// Which range a response reflects and at which revision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseHeader {
    /// The range.
    pub range_id: RangeId,
    /// The range's revision the response reflects.
    pub revision: u64,
}

/// Result of a put.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutResponse {
    /// Range and revision (the put's own revision).
    pub header: ResponseHeader,
    /// The previous key-value, when asked for and present.
    pub prev_kv: Option<KeyValue>,
}

/// Result of a read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeResponse {
    /// Range and revision.
    pub header: ResponseHeader,
    /// The keys found (empty when count-only).
    pub kvs: Vec<KeyValue>,
    /// How many keys matched (before the limit).
    pub count: u64,
    /// Whether the limit cut the result short.
    pub more: bool,
}

/// Result of a delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteResponse {
    /// Range and revision.
    pub header: ResponseHeader,
    /// Number of keys deleted.
    pub deleted: u64,
    /// The deleted key-values, when asked for.
    pub prev_kvs: Vec<KeyValue>,
}

/// Result of one txn operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOpResponse {
    /// A put's result.
    Put(PutResponse),
    /// A read's result.
    Range(RangeResponse),
    /// A delete's result.
    Delete(DeleteResponse),
}

/// Result of a txn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResponse {
    /// Range and revision.
    pub header: ResponseHeader,
    /// Whether the compares held (the success branch ran).
    pub succeeded: bool,
    /// One result per operation of the branch that ran.
    pub responses: Vec<TxnOpResponse>,
}

/// Result of a compaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactResponse {
    /// Range and revision.
    pub header: ResponseHeader,
    /// The compaction point now in effect.
    pub compact_revision: u64,
}

/// The result of a [`KvRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvResponse {
    /// A put's result.
    Put(PutResponse),
    /// A read's result.
    Range(RangeResponse),
    /// A delete's result.
    Delete(DeleteResponse),
    /// A txn's result.
    Txn(TxnResponse),
    /// A compaction's result.
    Compact(CompactResponse),
    /// A lease operation's result.
    Lease(LeaseResponse),
    /// A split's result.
    Split(SplitResponse),
    /// A replica move's result.
    Moved(MoveResponse),
    /// A merge's (or a freeze's) result.
    Merge(MergeResponse),
    /// A frozen range's final state, for the range merging it.
    Frozen(FrozenResponse),
}

/// Result of a merge: the range now also holds the keys of `merged_range_id` (its former right
/// neighbour, gone), at `epoch` (above both ranges' epochs before) and at a revision at least
/// both ranges' revisions before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeResponse {
    /// The merging range and its revision after the merge.
    pub header: ResponseHeader,
    /// The range merged into it.
    pub merged_range_id: RangeId,
    /// The merged range's epoch.
    pub epoch: u64,
}

/// A frozen range's final state, encoded by the node (opaque to clients).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrozenResponse {
    /// The frozen range and its final revision.
    pub header: ResponseHeader,
    /// Its state as of the freeze.
    #[serde(with = "serde_bytes")]
    pub state: Vec<u8>,
}

/// Result of a replica move: the range's voters once it is done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveResponse {
    /// The range and its revision after the move.
    pub header: ResponseHeader,
    /// Its voters now.
    pub voters: Vec<NodeId>,
}

/// Result of a split: the range keeps `[start, at)`, the new range holds `[at, end)`; both
/// are at `epoch` (one above the range's epoch before the split) and at the range's revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitResponse {
    /// The split range and its revision at the split.
    pub header: ResponseHeader,
    /// The id of the new range (and of its Raft group).
    pub new_range_id: RangeId,
    /// The split key: the first key of the new range.
    #[serde(with = "serde_bytes")]
    pub at: Vec<u8>,
    /// The epoch of both halves.
    pub epoch: u64,
}

impl KvResponse {
    /// The response's header.
    pub fn header(&self) -> ResponseHeader {
        match self {
            Self::Put(r) => r.header,
            Self::Range(r) => r.header,
            Self::Delete(r) => r.header,
            Self::Txn(r) => r.header,
            Self::Compact(r) => r.header,
            Self::Lease(r) => r.header(),
            Self::Split(r) => r.header,
            Self::Moved(r) => r.header,
            Self::Merge(r) => r.header,
            Self::Frozen(r) => r.header,
        }
    }
}

/// One request frame of the client protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRequest {
    /// A key-value request for one range.
    Kv {
        /// The range the client believes holds the keys.
        range_id: RangeId,
        /// The epoch of the client's descriptor of that range.
        epoch: u64,
        /// The request.
        request: KvRequest,
    },
    /// Open a watch channel of one range: the client then sends
    /// [`WatchControl`](crate::watch::WatchControl) frames (create / cancel watches) on the
    /// same stream, and the node answers with [`WatchMessage`](crate::watch::WatchMessage)
    /// frames instead of one response.
    Watch {
        /// The range.
        range_id: RangeId,
        /// The epoch of the client's descriptor of that range.
        epoch: u64,
    },
    /// The route table: ranges, replicas, leader hints, node addresses.
    Routes,
    /// Cluster status as this node sees it.
    Status,
    /// The placement service's view: nodes (state, replica and leader counts) and ranges (size
    /// and load), from the placement leader.
    Placement,
    /// Drain node `node`: the placement service moves every replica off it (it then holds none
    /// and can be stopped without unavailability).
    Decommission {
        /// The node.
        node: NodeId,
    },
    /// Configure fail point `name` of this node with `actions` (the `fail` crate's syntax,
    /// e.g. `return`, `5%return`, `off`): how fault campaigns crash a node at a dangerous
    /// place at the moment they choose. Refused by a node built without the `failpoints`
    /// feature (every release build).
    FailPoint {
        /// The fail point.
        name: String,
        /// What it does from now on.
        actions: String,
    },
}

/// One node in the placement service's registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node.
    pub id: NodeId,
    /// Its QUIC address.
    pub addr: String,
    /// Its zone label, if any.
    pub zone: Option<String>,
    /// Up, suspect, down or decommissioning.
    pub state: concord_placement::replicas::NodeState,
    /// Milliseconds since its last heartbeat reached the placement leader (`None`: none since
    /// that leader took over).
    pub heartbeat_age_ms: Option<u64>,
    /// Replicas it holds: voters of the range table's ranges, plus one if it is a voter of
    /// the placement group.
    pub replicas: u64,
    /// Whether it is a voter of the placement group.
    pub placement: bool,
    /// Ranges it leads.
    pub leaders: u64,
    /// Its capacity, as its last heartbeat reported it (`None`: no heartbeat since the
    /// placement leader took over).
    pub capacity: Option<NodeCapacity>,
}

/// What a node has room for. A range's whole state is held in memory (and in RocksDB), so a
/// node's capacity is its memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCapacity {
    /// The machine's memory (`MemTotal`).
    pub memory_total_bytes: u64,
    /// Memory the machine can still give (`MemAvailable`).
    pub memory_available_bytes: u64,
    /// The node process's resident memory (`concord dev`: all its nodes together).
    pub resident_bytes: u64,
}

/// One range with the size and load its leader last reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeLoad {
    /// The range's descriptor (bounds, epoch, voters).
    pub descriptor: concord_placement::RangeDescriptor,
    /// Its leader, if reported.
    pub leader: Option<NodeId>,
    /// Keys with stored history.
    pub keys: u64,
    /// Bytes of keys and values stored.
    pub bytes: u64,
    /// Reads served per second (over the last heartbeat interval).
    pub reads_per_sec: u64,
    /// Writes applied per second (over the last heartbeat interval).
    pub writes_per_sec: u64,
}

/// The placement service's view (answer to [`ClientRequest::Placement`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementReport {
    /// The placement group's leader that answered.
    pub leader: NodeId,
    /// The node registry.
    pub nodes: Vec<NodeInfo>,
    /// The range table with stats, in key order.
    pub ranges: Vec<RangeLoad>,
    /// Replica moves under way.
    pub moves: Vec<concord_placement::replicas::ReplicaMove>,
    /// Ranges merged away: never hosted again.
    pub merged: Vec<RangeId>,
}

/// A node and where to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddr {
    /// The node.
    pub id: NodeId,
    /// Its QUIC address (`host:port`).
    pub addr: String,
}

/// The route table a client caches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteTable {
    /// Ranges in key order.
    pub ranges: Vec<concord_placement::RangeDescriptor>,
    /// Last known leader per range.
    pub leaders: BTreeMap<RangeId, NodeId>,
    /// Every node's address.
    pub nodes: Vec<NodeAddr>,
}

/// One range as a node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeStatus {
    /// The range.
    pub id: RangeId,
    /// First key (inclusive).
    #[serde(with = "serde_bytes")]
    pub start: Vec<u8>,
    /// End key (exclusive; empty = unbounded).
    #[serde(with = "serde_bytes")]
    pub end: Vec<u8>,
    /// Its epoch.
    pub epoch: u64,
    /// Replica nodes.
    pub replicas: Vec<NodeId>,
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// The Raft term this node is in.
    pub term: u64,
    /// The range's revision on this node.
    pub revision: u64,
    /// Keys with any stored history (live or deleted, until compacted) on this node.
    pub keys: u64,
    /// The last log index applied on this node.
    pub applied_index: u64,
    /// The last log index covered by this node's newest snapshot (0: none).
    pub snapshot_index: u64,
    /// Log entries at or below this index are purged on this node (0: none).
    pub purged_index: u64,
}

/// Group-commit counters of a node's storage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageCounters {
    /// WAL syncs performed.
    pub fsyncs: u64,
    /// Log appends (from any group) made durable by those syncs.
    pub appends: u64,
}

/// Cluster status as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusResponse {
    /// The answering node.
    pub node_id: NodeId,
    /// Every node's address.
    pub nodes: Vec<NodeAddr>,
    /// Every range hosted by the answering node.
    pub ranges: Vec<RangeStatus>,
    /// The answering node's storage counters.
    pub storage: StorageCounters,
    /// The answering node's process and watch gauges.
    pub process: ProcessStats,
}

/// Gauges of a node's process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStats {
    /// Resident memory of the process (`VmRSS`); in `concord dev` all nodes share one process.
    pub rss_bytes: u64,
    /// Watches open on this node now (over all watch channels).
    pub watchers: u64,
    /// Watchers cancelled for falling behind since start (they resume).
    pub watch_overflows: u64,
}

/// A successful reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientReply {
    /// To [`ClientRequest::Kv`].
    Kv(KvResponse),
    /// To [`ClientRequest::Routes`].
    Routes(RouteTable),
    /// To [`ClientRequest::Status`].
    Status(StatusResponse),
    /// To [`ClientRequest::Placement`] and [`ClientRequest::Decommission`].
    Placement(PlacementReport),
    /// To [`ClientRequest::FailPoint`]: configured.
    FailPointSet,
}

/// One response frame of the client protocol.
pub type ClientResponse = Result<ClientReply, ApiError>;

/// A client-visible error. Each variant has a stable [`ApiError::code`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApiError {
    /// This node is not the leader of the range; retry at the hinted node.
    #[error("not leader of range {range_id} (leader hint: {leader_hint:?})")]
    NotLeader {
        /// The range.
        range_id: RangeId,
        /// The leader, if known.
        leader_hint: Option<NodeId>,
    },
    /// The client's descriptor of the range is out of date; refresh routes.
    #[error("stale epoch for range {range_id}: the node has epoch {current_epoch}")]
    StaleEpoch {
        /// The range.
        range_id: RangeId,
        /// The epoch the node holds.
        current_epoch: u64,
    },
    /// This node holds no replica of the range.
    #[error("range {range_id} not found on this node")]
    RangeNotFound {
        /// The range.
        range_id: RangeId,
    },
    /// A key of the request lies outside the range the request was sent to.
    #[error("key outside range {range_id}")]
    KeyOutsideRange {
        /// The range.
        range_id: RangeId,
    },
    /// A txn's keys span more than one range.
    #[error("txn keys span ranges {ranges:?}; a txn must stay within one range")]
    CrossRange {
        /// The ranges involved.
        ranges: Vec<RangeId>,
    },
    /// A key exceeds the size limit.
    #[error("key of {size} bytes exceeds the limit of {max} bytes")]
    KeyTooLarge {
        /// The key's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A value exceeds the size limit.
    #[error("value of {size} bytes exceeds the limit of {max} bytes")]
    ValueTooLarge {
        /// The value's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The request frame exceeds the size limit.
    #[error("request of {size} bytes exceeds the limit of {max} bytes")]
    RequestTooLarge {
        /// The request's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A txn has too many operations.
    #[error("txn with {ops} operations exceeds the limit of {max}")]
    TooManyTxnOps {
        /// The txn's operation count.
        ops: usize,
        /// The limit.
        max: usize,
    },
    /// A watch channel already carries the most watches allowed.
    #[error("a watch channel carries at most {max} watches")]
    TooManyWatches {
        /// The limit.
        max: usize,
    },
    /// The requested revision has been compacted.
    #[error("revision has been compacted (compact revision {compact_revision})")]
    Compacted {
        /// The oldest readable revision.
        compact_revision: u64,
    },
    /// The requested revision is in the future.
    #[error("revision {revision} is newer than the range's revision {current}")]
    FutureRevision {
        /// The requested revision.
        revision: u64,
        /// The range's current revision.
        current: u64,
    },
    /// The request is invalid (a bad span, a read at a revision inside a txn, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The frame could not be decoded.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The frame's wire version is not spoken by this node.
    #[error("unsupported wire version {got}; this node speaks {supported}")]
    UnsupportedVersion {
        /// The version received.
        got: u8,
        /// The version spoken.
        supported: u8,
    },
    /// The range cannot serve now (no quorum, election in progress, shutting down).
    #[error("range {range_id} unavailable: {reason}")]
    Unavailable {
        /// The range.
        range_id: RangeId,
        /// Why.
        reason: String,
    },
    /// A write was proposed but its outcome is unknown (leadership changed while it was in
    /// flight): it may or may not have been applied. Not retried automatically.
    #[error("outcome of the write to range {range_id} is unknown: {reason}")]
    Indeterminate {
        /// The range.
        range_id: RangeId,
        /// Why.
        reason: String,
    },
    /// The lease does not exist (never granted, expired or revoked).
    #[error("lease {id} not found")]
    LeaseNotFound {
        /// The lease.
        id: LeaseId,
    },
    /// A lease with this id exists or existed; ids are never reused.
    #[error("lease {id} already exists")]
    LeaseExists {
        /// The lease.
        id: LeaseId,
    },
    /// A watcher fell too far behind and was cancelled; resume from `resume_revision`.
    #[error("watch of range {range_id} cancelled: the watcher fell behind; resume from revision {resume_revision}")]
    WatchOverflow {
        /// The range.
        range_id: RangeId,
        /// The first revision not delivered.
        resume_revision: u64,
    },
    /// A fenced txn's token no longer holds its lock; nothing was applied.
    #[error("fencing token {token} no longer holds the lock")]
    Fenced {
        /// The token of the refused write.
        token: u64,
    },
    /// Something failed inside the node.
    #[error("internal error: {0}")]
    Internal(String),
    /// The range is frozen for a merge into its left neighbour `into` and serves nothing until
    /// that range has taken its keys in; then the routes name `into`. Nothing was applied:
    /// refresh routes and send the request again, after a pause.
    #[error("range {range_id} is merging into range {into}")]
    Merging {
        /// The frozen range.
        range_id: RangeId,
        /// The range taking it in.
        into: RangeId,
    },
}

impl ApiError {
    /// Whether the error says the client's route was out of date (the range split or is
    /// merging, or the request went to a node or range that does not hold the keys): refresh
    /// routes and send it again where the keys are now. Nothing was applied.
    pub fn is_stale_route(&self) -> bool {
        matches!(
            self,
            Self::StaleEpoch { .. }
                | Self::RangeNotFound { .. }
                | Self::KeyOutsideRange { .. }
                | Self::Merging { .. }
        )
    }

    /// The stable code of this error, for scripts and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotLeader { .. } => "NOT_LEADER",
            Self::StaleEpoch { .. } => "STALE_EPOCH",
            Self::RangeNotFound { .. } => "RANGE_NOT_FOUND",
            Self::KeyOutsideRange { .. } => "KEY_OUTSIDE_RANGE",
            Self::CrossRange { .. } => "CROSS_RANGE",
            Self::KeyTooLarge { .. } => "KEY_TOO_LARGE",
            Self::ValueTooLarge { .. } => "VALUE_TOO_LARGE",
            Self::RequestTooLarge { .. } => "REQUEST_TOO_LARGE",
            Self::TooManyTxnOps { .. } => "TOO_MANY_TXN_OPS",
            Self::TooManyWatches { .. } => "TOO_MANY_WATCHES",
            Self::Compacted { .. } => "COMPACTED",
            Self::FutureRevision { .. } => "FUTURE_REVISION",
            Self::InvalidRequest(_) => "INVALID_REQUEST",
            Self::Malformed(_) => "MALFORMED",
            Self::UnsupportedVersion { .. } => "UNSUPPORTED_VERSION",
            Self::Unavailable { .. } => "UNAVAILABLE",
            Self::Indeterminate { .. } => "INDETERMINATE",
            Self::LeaseNotFound { .. } => "LEASE_NOT_FOUND",
            Self::LeaseExists { .. } => "LEASE_EXISTS",
            Self::WatchOverflow { .. } => "WATCH_OVERFLOW",
            Self::Fenced { .. } => "FENCED",
            Self::Internal(_) => "INTERNAL",
            Self::Merging { .. } => "MERGING",
        }
    }
}

/// Size and count limits of requests (DESIGN.md "Limits"); every one configurable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestLimits {
    /// Largest key, in bytes.
    pub key_bytes_max: usize,
    /// Largest value, in bytes.
    pub value_bytes_max: usize,
    /// Largest request frame, in bytes.
    pub request_bytes_max: usize,
    /// Most operations (compares + both branches) in one txn.
    pub txn_ops_max: usize,
    /// Most watches on one watch channel (one client's watches of one range).
    pub watches_per_channel_max: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            key_bytes_max: 4 << 10,
            value_bytes_max: 1 << 20,
            request_bytes_max: 2 << 20,
            txn_ops_max: 128,
            watches_per_channel_max: 100_000,
        }
    }
}

impl RequestLimits {
    fn check_key(&self, key: &[u8]) -> Result<(), ApiError> {
        if key.len() > self.key_bytes_max {
            return Err(ApiError::KeyTooLarge {
                size: key.len(),
                max: self.key_bytes_max,
            });
        }
        Ok(())
    }

    fn check_span(&self, span: &KeySpan) -> Result<(), ApiError> {
        self.check_key(&span.key)?;
        if let Some(end) = &span.end {
            self.check_key(end)?;
            if !end.is_empty() && end.as_slice() <= span.key.as_slice() {
                return Err(ApiError::InvalidRequest(
                    "span end must be after its start".into(),
                ));
            }
        }
        Ok(())
    }

    fn check_put(&self, put: &PutRequest) -> Result<(), ApiError> {
        self.check_key(&put.key)?;
        if put.value.len() > self.value_bytes_max {
            return Err(ApiError::ValueTooLarge {
                size: put.value.len(),
                max: self.value_bytes_max,
            });
        }
        Ok(())
    }

    /// Checks a request against the limits; nothing of a refused request is applied.
    pub fn check(&self, request: &KvRequest) -> Result<(), ApiError> {
        match request {
            KvRequest::Put(p) => self.check_put(p),
            KvRequest::Range(r, _) => self.check_span(&r.span),
            KvRequest::Delete(d) => self.check_span(&d.span),
            KvRequest::Compact { .. } => Ok(()),
            KvRequest::Split { at } => self.check_key(at),
            KvRequest::MoveReplica { .. } | KvRequest::Merge | KvRequest::Freeze { .. } => Ok(()),
            KvRequest::Lease(l) => {
                if let LeaseRequest::GrantWithPut { put, .. } = l {
                    self.check_put(put)?;
                }
                check_lease(l)
            }
            KvRequest::Txn(t) => {
                if t.op_count() > self.txn_ops_max {
                    return Err(ApiError::TooManyTxnOps {
                        ops: t.op_count(),
                        max: self.txn_ops_max,
                    });
                }
                for c in &t.compares {
                    self.check_key(&c.key)?;
                    if let CompareTarget::Value(v) = &c.target {
                        if v.len() > self.value_bytes_max {
                            return Err(ApiError::ValueTooLarge {
                                size: v.len(),
                                max: self.value_bytes_max,
                            });
                        }
                    }
                }
                for branch in [&t.success, &t.failure] {
                    check_branch_keys(branch)?;
                }
                if let Some(fence) = &t.fence {
                    self.check_key(&fence.prefix)?;
                    if fence.lease == 0 || fence.token == 0 || fence.prefix.is_empty() {
                        return Err(ApiError::InvalidRequest(
                            "a fence names a lock prefix, a token and a lease".into(),
                        ));
                    }
                }
                for op in t.success.iter().chain(&t.failure) {
                    match op {
                        TxnOp::Put(p) => self.check_put(p)?,
                        TxnOp::Range(r) => {
                            self.check_span(&r.span)?;
                            if r.revision != 0 {
                                return Err(ApiError::InvalidRequest(
                                    "a read inside a txn reads at the txn's revision".into(),
                                ));
                            }
                        }
                        TxnOp::Delete(d) => self.check_span(&d.span)?,
                    }
                }
                Ok(())
            }
        }
    }
}

/// Most lease ids in one `KeepAliveMany`.
pub const KEEPALIVE_BATCH_MAX: usize = 10_000;

fn check_lease(request: &LeaseRequest) -> Result<(), ApiError> {
    if request.owner() == Some(0) {
        return Err(ApiError::InvalidRequest("lease id 0 means no lease".into()));
    }
    if let LeaseRequest::KeepAliveMany { ids } = request {
        if ids.is_empty() || ids.len() > KEEPALIVE_BATCH_MAX || ids.contains(&0) {
            return Err(ApiError::InvalidRequest(format!(
                "a keepalive batch names 1..={KEEPALIVE_BATCH_MAX} lease ids, none 0"
            )));
        }
    }
    if let LeaseRequest::GrantWithPut { id, put, .. } = request {
        if put.lease != *id {
            return Err(ApiError::InvalidRequest(
                "the key put with a new lease is attached to that lease".into(),
            ));
        }
    }
    if let LeaseRequest::Grant { ttl_ms, .. } | LeaseRequest::GrantWithPut { ttl_ms, .. } = request
    {
        if !(LEASE_TTL_MIN_MS..=LEASE_TTL_MAX_MS).contains(ttl_ms) {
            return Err(ApiError::InvalidRequest(format!(
                "lease TTL of {ttl_ms} ms is outside {LEASE_TTL_MIN_MS}..={LEASE_TTL_MAX_MS} ms"
            )));
        }
    }
    Ok(())
}

/// As in etcd: within one txn branch a key is written at most once (two puts, or a put
/// and a delete covering it, would give one key two versions at one revision).
fn check_branch_keys(ops: &[TxnOp]) -> Result<(), ApiError> {
    let mut puts: Vec<&[u8]> = ops
        .iter()
        .filter_map(|op| match op {
            TxnOp::Put(p) => Some(p.key.as_slice()),
            _ => None,
        })
        .collect();
    puts.sort_unstable();
    if let Some(w) = puts.windows(2).find(|w| w[0] == w[1]) {
        return Err(ApiError::InvalidRequest(format!(
            "duplicate key {:?} in a txn branch",
            String::from_utf8_lossy(w[0])
        )));
    }
    for op in ops {
        if let TxnOp::Delete(d) = op {
            if let Some(k) = puts.iter().find(|k| d.span.contains(k)) {
                return Err(ApiError::InvalidRequest(format!(
                    "key {:?} is both put and deleted in a txn branch",
                    String::from_utf8_lossy(k)
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte fields are (de)serialized as byte strings (`serde_bytes`), which postcard writes
    /// exactly as it wrote them as sequences of `u8` before: frames and stored log entries of
    /// either encoding read the same.
    #[test]
    fn byte_fields_keep_the_encoding_of_a_u8_sequence() {
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct PlainPut {
            key: Vec<u8>,
            value: Vec<u8>,
            lease: i64,
            prev_kv: bool,
        }
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct PlainSpan {
            key: Vec<u8>,
            end: Option<Vec<u8>>,
        }
        let value: Vec<u8> = (0..=255).chain(0..44).collect();
        let put = PutRequest {
            key: b"members/node-17".to_vec(),
            value: value.clone(),
            lease: 7,
            prev_kv: true,
        };
        let plain = PlainPut {
            key: put.key.clone(),
            value,
            lease: 7,
            prev_kv: true,
        };
        let bytes = postcard::to_allocvec(&put).unwrap();
        assert_eq!(bytes, postcard::to_allocvec(&plain).unwrap());
        assert_eq!(postcard::from_bytes::<PutRequest>(&bytes).unwrap(), put);
        assert_eq!(postcard::from_bytes::<PlainPut>(&bytes).unwrap(), plain);
        for span in [
            KeySpan::key("a"),
            KeySpan::prefix("ab"),
            KeySpan::interval("a", "z"),
        ] {
            let plain = PlainSpan {
                key: span.key.clone(),
                end: span.end.clone(),
            };
            let bytes = postcard::to_allocvec(&span).unwrap();
            assert_eq!(bytes, postcard::to_allocvec(&plain).unwrap());
            assert_eq!(postcard::from_bytes::<KeySpan>(&bytes).unwrap(), span);
        }
    }

    #[test]
    fn txn_branches_write_a_key_once() {
        let limits = RequestLimits::default();
        let put = |k: &str| {
            TxnOp::Put(PutRequest {
                key: k.into(),
                value: vec![],
                lease: 0,
                prev_kv: false,
            })
        };
        let del = |s: KeySpan| {
            TxnOp::Delete(DeleteRequest {
                span: s,
                prev_kv: false,
            })
        };
        let txn = |ops: Vec<TxnOp>| {
            KvRequest::Txn(TxnRequest {
                fence: None,
                compares: vec![],
                success: ops,
                failure: vec![],
            })
        };
        assert!(limits
            .check(&txn(vec![put("a"), put("b"), del(KeySpan::key("c"))]))
            .is_ok());
        assert_eq!(
            limits
                .check(&txn(vec![put("a"), put("a")]))
                .unwrap_err()
                .code(),
            "INVALID_REQUEST"
        );
        assert_eq!(
            limits
                .check(&txn(vec![put("p/1"), del(KeySpan::prefix("p/"))]))
                .unwrap_err()
                .code(),
            "INVALID_REQUEST"
        );
    }

    #[test]
    fn limits_refuse_oversize_and_too_many_ops() {
        let limits = RequestLimits::default();
        let put = |k: usize, v: usize| {
            KvRequest::Put(PutRequest {
                key: vec![b'k'; k],
                value: vec![0; v],
                lease: 0,
                prev_kv: false,
            })
        };
        assert!(limits.check(&put(4096, 1 << 20)).is_ok());
        assert_eq!(
            limits.check(&put(4097, 1)).unwrap_err().code(),
            "KEY_TOO_LARGE"
        );
        assert_eq!(
            limits.check(&put(1, (1 << 20) + 1)).unwrap_err().code(),
            "VALUE_TOO_LARGE"
        );
        let txn = TxnRequest {
            fence: None,
            compares: vec![],
            success: (0..129)
                .map(|_| {
                    TxnOp::Delete(DeleteRequest {
                        span: KeySpan::key("a"),
                        prev_kv: false,
                    })
                })
                .collect(),
            failure: vec![],
        };
        assert_eq!(
            limits.check(&KvRequest::Txn(txn)).unwrap_err().code(),
            "TOO_MANY_TXN_OPS"
        );
    }

    #[test]
    fn spans() {
        assert!(KeySpan::prefix("ab").contains(b"ab"));
        assert!(KeySpan::prefix("ab").contains(b"abz"));
        assert!(!KeySpan::prefix("ab").contains(b"ac"));
        assert!(KeySpan::prefix("").contains(b"\xff"));
        assert!(KeySpan::key("a").contains(b"a") && !KeySpan::key("a").contains(b"a\0"));
        assert_eq!(KeySpan::key("a").bounds(), (b"a".to_vec(), b"a\0".to_vec()));
    }
}
