//! The placement service: the node registry and range table, replicated in the placement
//! group (group 0), heartbeats, and the scheduler that moves replicas.
//!
//! - **Heartbeats.** Every node sends one [`Heartbeat`] per [`HEARTBEAT_INTERVAL_MS`] to the
//!   placement group's leader: its address and zone, and a [`RangeReport`] for every range it
//!   leads (descriptor, learners, keys, bytes, reads and writes per second). One message per
//!   node, not per range. The reply is the leader's [`PlacementReport`] (what `concordctl
//!   nodes` shows): every node's address and state, the range table and the leader of each
//!   range; the node keeps what it routes by as its [`PlacementView`] (for the ranges it does
//!   not host).
//! - **Replicated state.** The leader writes, as Raft entries of the placement group, a node's
//!   record when it first heartbeats or changes address, a range's descriptor when a report
//!   shows a new epoch or new voters, an operator's decommission, and every scheduler decision.
//!   Liveness (the heartbeats' times) stays in the leader's memory: a new leader waits
//!   `down_after` before calling any node down.
//! - **Scheduler.** Every [`SCHEDULE_INTERVAL_MS`] the leader derives each node's state (up,
//!   suspect, down, decommissioning), plans with [`plan_replica_moves`] (a pure function), records
//!   each move, and asks the range's leader to carry it out (`replica_service`), at most
//!   [`MOVES_IN_FLIGHT_MAX`] at a time. The placement group is planned with the ranges (its
//!   voters from the leader's own membership) and moved by the leader itself. It also plans one merge at a time with [`plan_merge`]
//!   (small cold neighbours made by splits, or a frozen range left by an interrupted merge)
//!   and asks the left range's leader to carry it out (`merge_service`).
//! - **Registry after splits and merges.** A report's descriptor is stored when it is newer
//!   than the stored one and no stored range overlapping it has a higher epoch (a lagging
//!   leader's report of an extent since merged away is ignored); the stored ranges it covers
//!   whole at a lower epoch (merged into it) are deleted. A frozen range is not stored.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use concord_placement::merges::{is_small, plan_merge, MergeLimits, RangeSize};
use concord_placement::replicas::{
    plan_replica_moves, NodeState, NodeView, RangeReplicas, ReplicaMove,
};
use concord_placement::RangeDescriptor;
use concord_transport::api::{
    ApiError, DeleteRequest, KeySpan, KvRequest, KvResponse, NodeCapacity, NodeId, NodeInfo,
    PlacementReport, PutRequest, RangeId, RangeLoad, RangeRequest, TxnOp, TxnRequest,
};
use openraft::async_runtime::watch::WatchReceiver;
use serde::{Deserialize, Serialize};

use super::{NodeInner, PLACEMENT_GROUP};
use crate::mvcc::Command;
use crate::network::{PeerReply, PeerRequest};
use crate::storage::{decode, encode};

/// How often a node heartbeats to the placement leader.
pub const HEARTBEAT_INTERVAL_MS: u64 = 1_000;
/// How long a heartbeat may take.
pub const HEARTBEAT_TIMEOUT_MS: u64 = 2_000;
/// A node silent this long is suspect: it keeps its replicas but receives none.
pub const SUSPECT_AFTER_MS: u64 = 3_000;
/// How often the placement leader plans replica moves.
pub const SCHEDULE_INTERVAL_MS: u64 = 1_000;
/// Replica moves under way at once, cluster-wide.
pub const MOVES_IN_FLIGHT_MAX: usize = 2;
/// A new placement leader plans nothing until it has been leading this long (every node has
/// heartbeated to it).
pub const PLAN_GRACE_MS: u64 = 3 * HEARTBEAT_INTERVAL_MS;
/// A frozen range is taken for an interrupted merge, to finish, after this long (a merge
/// under way, an operator's included, normally finishes well within it).
pub const FROZEN_GRACE_MS: u64 = 10_000;
/// How long one replica move may take (catching a learner up included).
pub const MOVE_TIMEOUT_MS: u64 = 120_000;

const NODES_PREFIX: &[u8] = b"/placement/nodes/";
const DECOMMISSION_PREFIX: &[u8] = b"/placement/decommission/";
const RANGES_PREFIX: &[u8] = b"/placement/ranges/";
const MERGED_PREFIX: &[u8] = b"/placement/merged/";
const DECISIONS_KEY: &[u8] = b"/placement/decisions";

/// Settings of the placement service on a node.
#[derive(Debug, Clone)]
pub struct PlacementSettings {
    /// A node silent this long is down: its replicas are re-created elsewhere.
    pub down_after_ms: u64,
    /// This node's zone label (replicas of a range spread across zones).
    pub zone: Option<String>,
    /// A node of the cluster to join (a node started with `--join` bootstraps nothing).
    pub join: Option<SocketAddr>,
    /// Whether the placement leader moves replicas (tests turn it off to move by hand).
    pub schedule: bool,
    /// How long two neighbouring ranges must stay small and cold before they merge, in
    /// milliseconds; 0 turns automatic merges off (see `concord_placement::merges`).
    pub merge_after_ms: u64,
    /// The memory this node offers the cluster, in bytes (`None`: the machine's `MemTotal`).
    /// Its heartbeats report it as the node's total memory, and the scheduler gives nodes
    /// replicas in proportion to it (in whole GiB, at least 1).
    pub memory_bytes: Option<u64>,
    /// How long a replica move waits for its receiver to hold the range's snapshot, in
    /// milliseconds (`replica_service::LEARNER_CATCH_UP_TIMEOUT_MS` by default); past it the
    /// move fails and the receiver is removed again.
    pub learner_catch_up_ms: u64,
}

impl Default for PlacementSettings {
    fn default() -> Self {
        Self {
            down_after_ms: 30_000,
            zone: None,
            join: None,
            schedule: true,
            merge_after_ms: 300_000,
            memory_bytes: None,
            learner_catch_up_ms: super::replica_service::LEARNER_CATCH_UP_TIMEOUT_MS,
        }
    }
}

/// A node's entry in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node.
    pub id: NodeId,
    /// Where it listens.
    pub addr: String,
    /// Its zone label.
    pub zone: Option<String>,
}

/// What the leader of a range reports about it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RangeReport {
    /// Bounds, epoch and voters, as applied at the leader.
    pub descriptor: RangeDescriptor,
    /// Learners (a move under way).
    pub learners: Vec<NodeId>,
    /// Keys with stored history.
    pub keys: u64,
    /// Bytes of keys and values.
    pub bytes: u64,
    /// Reads served per second since the last heartbeat.
    pub reads_per_sec: u64,
    /// Writes applied per second since the last heartbeat.
    pub writes_per_sec: u64,
    /// Whether the range is frozen for a merge.
    pub frozen: bool,
}

/// A scheduler decision, as recorded in the placement group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Decision {
    /// Move a replica.
    Move(ReplicaMove),
    /// Merge range `left`'s right neighbour into it.
    Merge {
        /// The merging range.
        left: RangeId,
    },
}

impl Decision {
    /// The range whose leader carries the decision out.
    fn range(&self) -> RangeId {
        match self {
            Self::Move(m) => m.range,
            Self::Merge { left } => *left,
        }
    }

    /// What that leader is asked.
    fn request(&self) -> KvRequest {
        match self {
            Self::Move(m) => KvRequest::MoveReplica {
                from: m.from,
                to: m.to,
            },
            Self::Merge { .. } => KvRequest::Merge,
        }
    }
}

/// One node's heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The sender.
    pub node: NodeRecord,
    /// Its capacity now (kept by the leader in memory, like the heartbeat's time).
    pub capacity: NodeCapacity,
    /// The ranges it leads.
    pub ranges: Vec<RangeReport>,
}

/// What a node keeps of the placement leader's last [`PlacementReport`], for routing the
/// ranges it does not host (node addresses go to the peer pool).
#[derive(Debug, Clone, Default)]
pub struct PlacementView {
    /// The placement group's leader.
    pub leader: NodeId,
    /// The range table as placement stores it (it may lag a split or move by a heartbeat).
    pub ranges: Vec<RangeDescriptor>,
    /// The last reported leader of each range.
    pub leaders: BTreeMap<RangeId, NodeId>,
    /// Nodes being drained (down or decommissioning): they receive no leaderships.
    pub draining: BTreeSet<NodeId>,
    /// Ranges merged away: never hosted again.
    pub merged: BTreeSet<RangeId>,
    /// The placement group's voters.
    pub placement_voters: BTreeSet<NodeId>,
    /// A node's fair share of the cluster's writes: the writes per second of every range, as
    /// their leaders last reported them, over the nodes that are not drained (0 when no range
    /// has reported). A load split weighs a hot range against it ([`super::split_service`]).
    pub writes_per_sec_per_node: f64,
    /// Writes per second of the ranges each node leads, as their leaders last reported them.
    pub writes_per_sec_led: BTreeMap<NodeId, f64>,
}

impl From<&PlacementReport> for PlacementView {
    fn from(report: &PlacementReport) -> Self {
        Self {
            leader: report.leader,
            ranges: report.ranges.iter().map(|r| r.descriptor.clone()).collect(),
            // The placement group is no range of the table, but nodes without a replica of it
            // (past the first three) route to its leader too.
            leaders: report
                .ranges
                .iter()
                .filter_map(|r| Some((r.descriptor.id, r.leader?)))
                .chain([(PLACEMENT_GROUP, report.leader)])
                .collect(),
            draining: report
                .nodes
                .iter()
                .filter(|n| n.state.evacuated())
                .map(|n| n.id)
                .collect(),
            merged: report.merged.iter().copied().collect(),
            placement_voters: report
                .nodes
                .iter()
                .filter(|n| n.placement)
                .map(|n| n.id)
                .collect(),
            writes_per_sec_per_node: writes_per_sec_per_node(report),
            writes_per_sec_led: writes_per_sec_led(&report.ranges),
        }
    }
}

/// The writes per second of the ranges each node leads, summed over a report's ranges by
/// their reported leader (see [`PlacementView::writes_per_sec_led`]).
fn writes_per_sec_led(ranges: &[RangeLoad]) -> BTreeMap<NodeId, f64> {
    let mut led = BTreeMap::new();
    for range in ranges {
        if let Some(leader) = range.leader {
            *led.entry(leader).or_default() += range.writes_per_sec as f64;
        }
    }
    led
}

/// The cluster's writes per second over its nodes that are not drained (see
/// [`PlacementView::writes_per_sec_per_node`]).
fn writes_per_sec_per_node(report: &PlacementReport) -> f64 {
    let writes: u64 = report.ranges.iter().map(|r| r.writes_per_sec).sum();
    let nodes = report.nodes.iter().filter(|n| !n.state.evacuated()).count();
    writes as f64 / nodes.max(1) as f64
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum HeartbeatReply {
    /// Taken; here is the placement service's view (the same as `concordctl nodes` shows).
    Accepted(PlacementReport),
    /// This node does not lead the placement group; try the hinted one.
    NotLeader {
        /// The leader, if known.
        leader: Option<NodeRecord>,
    },
}

/// The placement leader's memory: heartbeats and reports since it took over.
#[derive(Default)]
pub(super) struct LeaderMemory {
    /// The placement group's term this memory belongs to.
    term: u64,
    /// When this node became leader in that term.
    since: Option<Instant>,
    heartbeats: BTreeMap<NodeId, (Instant, NodeCapacity)>,
    reports: BTreeMap<RangeId, (NodeId, RangeReport)>,
    moves: BTreeMap<RangeId, ReplicaMove>,
    /// Since when each range has been small and cold (merge candidates).
    small_since: BTreeMap<RangeId, Instant>,
    /// Since when each range has been reported frozen.
    frozen_since: BTreeMap<RangeId, Instant>,
    /// The range carrying out a merge of its right neighbour, if any.
    merging: Option<RangeId>,
}

/// What the placement group holds: the registry, decommissions, the stored range table and
/// the ranges merged away.
struct PlacementState {
    nodes: BTreeMap<NodeId, NodeRecord>,
    decommissioned: BTreeSet<NodeId>,
    ranges: BTreeMap<RangeId, RangeDescriptor>,
    merged: BTreeSet<RangeId>,
}

impl LeaderMemory {
    /// Whether this leader took over too recently to plan: a new leader first hears every
    /// node out.
    fn in_grace(&self) -> bool {
        let leading_for = self.since.map_or(Duration::ZERO, |s| s.elapsed());
        leading_for < Duration::from_millis(PLAN_GRACE_MS)
    }

    /// The stored ranges without a report since this leader took over or since their last
    /// move or merge (no leader, or a stale descriptor), and those with a move under way.
    fn unreported_or_moving(
        &self,
        ranges: &BTreeMap<RangeId, RangeDescriptor>,
    ) -> BTreeSet<RangeId> {
        let unreported = ranges.keys().filter(|id| !self.reports.contains_key(id));
        let mut busy: BTreeSet<RangeId> = unreported.copied().collect();
        busy.extend(self.moves.keys().copied());
        busy
    }
}

impl NodeInner {
    /// The placement group here, if this node leads it; resets the leader memory on a new term.
    fn placement_leader_group(&self) -> Option<Arc<super::Group>> {
        let group = self.group(PLACEMENT_GROUP).ok()?;
        group.raft.as_leader().ok()?;
        let term = group.raft.metrics().borrow_watched().current_term;
        let mut memory = self.placement_memory.lock().expect("placement memory lock");
        if memory.term != term || memory.since.is_none() {
            *memory = LeaderMemory {
                term,
                since: Some(Instant::now()),
                ..Default::default()
            };
        }
        Some(group)
    }

    /// What the placement group holds, as applied here.
    fn placement_state(&self, group: &super::Group) -> PlacementState {
        let state = group.state.read().expect("range state lock");
        let scan = |prefix: &[u8]| {
            state
                .mvcc
                .range(&RangeRequest::new(KeySpan::prefix(prefix.to_vec())))
                .map(|r| r.kvs)
                .unwrap_or_default()
        };
        // The ids named by the keys under `prefix`.
        let ids = |prefix: &[u8]| -> BTreeSet<u64> {
            scan(prefix)
                .iter()
                .filter_map(|kv| {
                    std::str::from_utf8(&kv.key[prefix.len()..])
                        .ok()?
                        .parse()
                        .ok()
                })
                .collect()
        };
        PlacementState {
            nodes: scan(NODES_PREFIX)
                .into_iter()
                .filter_map(|kv| decode::<NodeRecord>(&kv.value).ok())
                .map(|r| (r.id, r))
                .collect(),
            decommissioned: ids(DECOMMISSION_PREFIX),
            ranges: scan(RANGES_PREFIX)
                .into_iter()
                .filter_map(|kv| decode::<RangeDescriptor>(&kv.value).ok())
                .map(|d| (d.id, d))
                .collect(),
            merged: ids(MERGED_PREFIX),
        }
    }

    /// Whether range `id` was merged away (the placement view says, or this node removed its
    /// replica for it): it is never hosted here again.
    pub(super) fn retired(&self, id: RangeId) -> bool {
        if self.retired.lock().expect("retired lock").contains(&id) {
            return true;
        }
        let placement = self.placement.read().expect("placement lock");
        placement.as_ref().is_some_and(|v| v.merged.contains(&id))
    }

    /// Serves a heartbeat (at the placement leader).
    pub(super) async fn handle_heartbeat(&self, beat: Heartbeat) -> HeartbeatReply {
        let Some(group) = self.placement_leader_group() else {
            return HeartbeatReply::NotLeader {
                leader: self.placement_leader_record(),
            };
        };
        if let Ok(addr) = beat.node.addr.parse() {
            self.peers.learn(beat.node.id, addr);
        }
        {
            let limits = self.merge_limits();
            let now = Instant::now();
            let mut memory = self.placement_memory.lock().expect("placement memory lock");
            memory.heartbeats.insert(beat.node.id, (now, beat.capacity));
            for report in &beat.ranges {
                let id = report.descriptor.id;
                memory.reports.insert(id, (beat.node.id, report.clone()));
                if is_small(report.keys, report.bytes, report.writes_per_sec, &limits) {
                    memory.small_since.entry(id).or_insert(now);
                } else {
                    memory.small_since.remove(&id);
                }
                if report.frozen {
                    memory.frozen_since.entry(id).or_insert(now);
                } else {
                    memory.frozen_since.remove(&id);
                }
            }
        }
        let PlacementState { nodes, ranges, .. } = self.placement_state(&group);
        let mut writes = Vec::new();
        let mut deletes = BTreeSet::new();
        if nodes.get(&beat.node.id) != Some(&beat.node) {
            writes.push((node_key(beat.node.id), encode(&beat.node)));
        }
        for report in beat.ranges.iter().filter(|r| !r.frozen) {
            let d = &report.descriptor;
            let newer = match ranges.get(&d.id) {
                None => true,
                Some(stored) => d.epoch > stored.epoch || (d.epoch == stored.epoch && stored != d),
            };
            let others = ranges.values().filter(|s| s.id != d.id);
            let superseded = others
                .clone()
                .any(|s| s.epoch > d.epoch && s.overlaps(&d.start, &d.end));
            if newer && !superseded {
                writes.push((range_key(d.id), encode(d)));
                // Ranges merged into it.
                deletes.extend(
                    others
                        .filter(|s| s.epoch < d.epoch && d.covers(&s.start, &s.end))
                        .map(|s| s.id),
                );
            }
        }
        // One entry for the whole heartbeat. A range merged away is recorded as merged in the
        // same entry that drops it: no node hosts it again, even from an old lineage.
        let mut ops: Vec<TxnOp> = writes
            .into_iter()
            .map(|(key, value)| TxnOp::Put(put_request(key, value)))
            .collect();
        for id in deletes {
            ops.push(TxnOp::Put(put_request(
                registry_key(MERGED_PREFIX, id),
                Vec::new(),
            )));
            ops.push(TxnOp::Delete(DeleteRequest {
                span: KeySpan::key(range_key(id)),
                prev_kv: false,
            }));
        }
        if !ops.is_empty() {
            let txn = TxnRequest {
                compares: Vec::new(),
                success: ops,
                failure: Vec::new(),
                fence: None,
            };
            if let Err(e) = self
                .propose_anywhere(PLACEMENT_GROUP, Command::Txn(txn))
                .await
            {
                tracing::debug!("placement write: {e}");
            }
        }
        HeartbeatReply::Accepted(self.build_report(&group))
    }

    /// A node's fair share of the cluster's writes per second, and the writes per second of
    /// the ranges this node leads, from the last placement report (0 before the first; see
    /// [`PlacementView::writes_per_sec_per_node`]).
    pub(super) fn write_shares(&self) -> (f64, f64) {
        let view = self.placement.read().expect("placement lock");
        view.as_ref().map_or((0.0, 0.0), |view| {
            let led = view.writes_per_sec_led.get(&self.config.id);
            (view.writes_per_sec_per_node, led.copied().unwrap_or(0.0))
        })
    }

    /// The placement leader as this node knows it, with its address.
    fn placement_leader_record(&self) -> Option<NodeRecord> {
        let leader = match self.group(PLACEMENT_GROUP) {
            Ok(g) => g.raft.metrics().borrow_watched().current_leader,
            Err(_) => self
                .placement
                .read()
                .expect("placement lock")
                .as_ref()
                .map(|v| v.leader),
        }?;
        let addr = self.peers.addr(leader)?;
        Some(NodeRecord {
            id: leader,
            addr: addr.to_string(),
            zone: None,
        })
    }

    /// Writes `key = value` in the placement group, at its leader.
    async fn placement_put(&self, key: Vec<u8>, value: Vec<u8>) -> Result<KvResponse, ApiError> {
        let cmd = Command::Put(put_request(key, value));
        self.propose_anywhere(PLACEMENT_GROUP, cmd).await
    }

    /// Marks `node` decommissioning (the scheduler then drains it).
    pub(super) async fn decommission(&self, node: NodeId) -> Result<(), ApiError> {
        let key = registry_key(DECOMMISSION_PREFIX, node);
        self.placement_put(key, Vec::new()).await.map(|_| ())
    }

    /// The placement service's view with stats (at the placement leader, asked of it
    /// otherwise).
    pub(super) async fn placement_report(&self) -> Result<PlacementReport, ApiError> {
        if let Some(group) = self.placement_leader_group() {
            return Ok(self.build_report(&group));
        }
        let leader = self
            .placement_leader_record()
            .ok_or_else(|| ApiError::Unavailable {
                range_id: PLACEMENT_GROUP,
                reason: "no placement leader known".into(),
            })?;
        let timeout = Duration::from_millis(HEARTBEAT_TIMEOUT_MS);
        match self
            .peers
            .call(
                leader.id,
                PLACEMENT_GROUP,
                PeerRequest::PlacementReport,
                timeout,
            )
            .await
        {
            Ok(PeerReply::Placement(report)) => Ok(report),
            Ok(other) => Err(ApiError::Unavailable {
                range_id: PLACEMENT_GROUP,
                reason: format!("placement leader answered {other:?}"),
            }),
            Err(e) => Err(ApiError::Unavailable {
                range_id: PLACEMENT_GROUP,
                reason: e.to_string(),
            }),
        }
    }

    /// The report, if this node leads the placement group.
    pub(super) fn placement_report_here(&self) -> Option<PlacementReport> {
        let group = self.placement_leader_group()?;
        Some(self.build_report(&group))
    }

    fn build_report(&self, group: &super::Group) -> PlacementReport {
        let PlacementState {
            nodes,
            decommissioned,
            ranges,
            merged,
        } = self.placement_state(group);
        let views = self.node_views(&nodes, &decommissioned);
        let memory = self.placement_memory.lock().expect("placement memory lock");
        let now = Instant::now();
        let mut replicas: BTreeMap<NodeId, u64> = BTreeMap::new();
        for d in ranges.values() {
            for v in &d.replicas {
                *replicas.entry(*v).or_default() += 1;
            }
        }
        let placement_voters = placement_replicas(group).0.voters;
        for v in &placement_voters {
            *replicas.entry(*v).or_default() += 1;
        }
        let mut leaders: BTreeMap<NodeId, u64> = BTreeMap::new();
        for (leader, _) in memory.reports.values() {
            *leaders.entry(*leader).or_default() += 1;
        }
        let nodes = views
            .iter()
            .map(|v| NodeInfo {
                id: v.id,
                addr: nodes[&v.id].addr.clone(),
                zone: v.zone.clone(),
                state: v.state,
                heartbeat_age_ms: memory
                    .heartbeats
                    .get(&v.id)
                    .map(|(at, _)| now.duration_since(*at).as_millis() as u64),
                replicas: replicas.get(&v.id).copied().unwrap_or(0),
                placement: placement_voters.contains(&v.id),
                leaders: leaders.get(&v.id).copied().unwrap_or(0),
                capacity: memory.heartbeats.get(&v.id).map(|(_, c)| *c),
            })
            .collect();
        let mut ranges: Vec<RangeLoad> = ranges
            .into_values()
            .map(|descriptor| {
                let report = memory.reports.get(&descriptor.id);
                RangeLoad {
                    leader: report.map(|(leader, _)| *leader),
                    keys: report.map_or(0, |(_, r)| r.keys),
                    bytes: report.map_or(0, |(_, r)| r.bytes),
                    reads_per_sec: report.map_or(0, |(_, r)| r.reads_per_sec),
                    writes_per_sec: report.map_or(0, |(_, r)| r.writes_per_sec),
                    descriptor,
                }
            })
            .collect();
        ranges.sort_by(|a, b| a.descriptor.start.cmp(&b.descriptor.start));
        PlacementReport {
            leader: self.config.id,
            nodes,
            ranges,
            moves: memory.moves.values().copied().collect(),
            merged: merged.into_iter().collect(),
        }
    }

    /// Each registered node's state, from the heartbeats this leader received.
    fn node_views(
        &self,
        nodes: &BTreeMap<NodeId, NodeRecord>,
        decommissioned: &BTreeSet<NodeId>,
    ) -> Vec<NodeView> {
        let memory = self.placement_memory.lock().expect("placement memory lock");
        let now = Instant::now();
        let down_after = Duration::from_millis(self.config.placement.down_after_ms);
        let suspect_after = Duration::from_millis(SUSPECT_AFTER_MS);
        let leading_for = memory
            .since
            .map_or(Duration::ZERO, |s| now.duration_since(s));
        nodes
            .values()
            .map(|record| {
                let silent_for = memory
                    .heartbeats
                    .get(&record.id)
                    .map_or(leading_for, |(at, _)| now.duration_since(*at));
                let state = if decommissioned.contains(&record.id) {
                    NodeState::Decommissioning
                } else if silent_for >= down_after {
                    NodeState::Down
                } else if silent_for >= suspect_after {
                    NodeState::Suspect
                } else {
                    NodeState::Up
                };
                NodeView {
                    id: record.id,
                    zone: record.zone.clone(),
                    state,
                    weight: memory
                        .heartbeats
                        .get(&record.id)
                        .map_or(1, |(_, c)| (c.memory_total_bytes >> 30).max(1)),
                }
            })
            .collect()
    }

    /// One scheduling round at the placement leader: the moves to start now.
    fn plan_moves(&self) -> Vec<ReplicaMove> {
        let Some(group) = self.placement_leader_group() else {
            return Vec::new();
        };
        // Checked before the placement state is scanned.
        if self
            .placement_memory
            .lock()
            .expect("placement memory lock")
            .in_grace()
        {
            return Vec::new();
        }
        let PlacementState {
            nodes,
            decommissioned,
            ranges,
            ..
        } = self.placement_state(&group);
        let views = self.node_views(&nodes, &decommissioned);
        let memory = self.placement_memory.lock().expect("placement memory lock");
        // A range without a fresh report (none since a move, or no leader) is not moved: its
        // stored voters may be stale.
        let mut busy = memory.unreported_or_moving(&ranges);
        busy.extend(
            memory
                .reports
                .iter()
                .filter(|(_, (_, r))| !r.learners.is_empty())
                .map(|(id, _)| *id),
        );
        let mut replicas: Vec<RangeReplicas> = ranges
            .values()
            .map(|d| RangeReplicas {
                range: d.id,
                voters: d.replicas.clone(),
                leader: memory.reports.get(&d.id).map(|(leader, _)| *leader),
            })
            .collect();
        // The placement group moves like a range (off down and decommissioned nodes, and
        // for balance), by this node, its leader, from its own membership.
        let (placement, changing) = placement_replicas(&group);
        if changing {
            busy.insert(PLACEMENT_GROUP);
        }
        replicas.push(placement);
        let room = MOVES_IN_FLIGHT_MAX.saturating_sub(memory.moves.len());
        plan_replica_moves(&views, &replicas, &busy, room)
    }

    /// The merge limits of this node's split settings and merge delay.
    fn merge_limits(&self) -> MergeLimits {
        let split = &self.config.split;
        MergeLimits::from_split(
            split.keys_max,
            split.bytes_max,
            split.writes_per_sec_max,
            self.config.placement.merge_after_ms,
        )
    }

    /// One merge planning round at the placement leader: the range to merge its right
    /// neighbour into it now, if any.
    fn plan_merge_now(&self) -> Option<RangeId> {
        let group = self.placement_leader_group()?;
        {
            // Checked before the placement state is scanned: most rounds stop here.
            let memory = self.placement_memory.lock().expect("placement memory lock");
            if memory.merging.is_some() || memory.in_grace() {
                return None;
            }
        }
        let ranges = self.placement_state(&group).ranges;
        let limits = self.merge_limits();
        let memory = self.placement_memory.lock().expect("placement memory lock");
        let now = Instant::now();
        let mut table: Vec<&RangeDescriptor> = ranges.values().collect();
        table.sort_by(|a, b| a.start.cmp(&b.start));
        let sizes: Vec<RangeSize> = table
            .iter()
            .map(|d| {
                let report = memory.reports.get(&d.id).map(|(_, r)| r);
                RangeSize {
                    id: d.id,
                    keys: report.map_or(0, |r| r.keys),
                    bytes: report.map_or(0, |r| r.bytes),
                    writes_per_sec: report.map_or(0, |r| r.writes_per_sec),
                    small_for_ms: memory
                        .small_since
                        .get(&d.id)
                        .map_or(0, |at| now.duration_since(*at).as_millis() as u64),
                    frozen: memory.frozen_since.get(&d.id).is_some_and(|at| {
                        now.duration_since(*at) >= Duration::from_millis(FROZEN_GRACE_MS)
                    }),
                    made_by_split: d.id > super::SPLIT_RANGE_ID_BASE,
                }
            })
            .collect();
        // Unreported ranges (no leader, or a move just changed them) and moving ones wait.
        let busy = memory.unreported_or_moving(&ranges);
        plan_merge(&sizes, &busy, &limits)
    }

    /// Records `decision` in the placement group, then has its range's leader carry it out;
    /// afterwards the range waits for its next report (its descriptor changed).
    async fn carry_out(self: Arc<Self>, decision: Decision) {
        let range = decision.range();
        let leader = if range == PLACEMENT_GROUP {
            Some(self.config.id)
        } else {
            let memory = self.placement_memory.lock().expect("placement memory lock");
            memory.reports.get(&range).map(|(leader, _)| *leader)
        };
        let result = async {
            self.placement_put(DECISIONS_KEY.to_vec(), encode(&decision))
                .await?;
            let leader = leader.ok_or_else(|| ApiError::Unavailable {
                range_id: range,
                reason: "no leader reported".into(),
            })?;
            self.operate_at(leader, range, decision.request()).await
        }
        .await;
        match result {
            Ok(_) => tracing::info!(range, ?decision, "carried out"),
            Err(e) => tracing::warn!(range, ?decision, "not carried out: {e}"),
        }
        let mut memory = self.placement_memory.lock().expect("placement memory lock");
        match decision {
            Decision::Move(_) => {
                memory.moves.remove(&range);
            }
            Decision::Merge { .. } => {
                memory.merging = None;
                memory.small_since.remove(&range);
            }
        }
        memory.reports.remove(&range);
    }

    /// Asks node `leader` (this one or a peer), the leader of range `range`, to carry out the
    /// range operation `request` (a replica move or a merge).
    async fn operate_at(
        &self,
        leader: NodeId,
        range: RangeId,
        request: KvRequest,
    ) -> Result<KvResponse, ApiError> {
        if leader == self.config.id {
            let group = self.group(range)?;
            return self.operate(&group, request).await;
        }
        let timeout = Duration::from_millis(MOVE_TIMEOUT_MS);
        let request = PeerRequest::Operate(request);
        match self.peers.call(leader, range, request, timeout).await {
            Ok(PeerReply::Operated(result)) => result,
            Ok(other) => Err(ApiError::Internal(format!("unexpected reply {other:?}"))),
            Err(e) => Err(ApiError::Unavailable {
                range_id: range,
                reason: e.to_string(),
            }),
        }
    }

    /// This node's heartbeat: its record and a report per range it leads. `last` holds the
    /// read and write counters of the previous heartbeat, for the rates.
    fn heartbeat(&self, meter: &mut super::RateMeter) -> Heartbeat {
        let now = Instant::now();
        let mut ranges = Vec::new();
        for group in self.groups() {
            if group.id == PLACEMENT_GROUP {
                continue;
            }
            // Every hosted range keeps its counters' baseline, so that a node that has just
            // taken a leadership reports what it served since the last heartbeat, not 0 (which
            // would make the cluster's writes, and a node's share of them, look smaller).
            let (reads_per_sec, writes_per_sec) = meter.rates(&group, now);
            if group.raft.as_leader().is_err() || !group.has_state() {
                continue;
            }
            let (keys, bytes) = {
                let state = group.state.read().expect("range state lock");
                (state.mvcc.key_count() as u64, state.mvcc.stored_bytes())
            };
            ranges.push(RangeReport {
                descriptor: group.descriptor(),
                learners: group.learners(),
                keys,
                bytes,
                reads_per_sec: reads_per_sec as u64,
                writes_per_sec: writes_per_sec as u64,
                frozen: group.frozen(),
            });
        }
        meter.forget_older_than(now);
        let mut capacity = super::node_capacity();
        if let Some(bytes) = self.config.placement.memory_bytes {
            capacity.memory_total_bytes = bytes;
        }
        Heartbeat {
            capacity,
            node: NodeRecord {
                id: self.config.id,
                addr: self.advertised_addr.to_string(),
                zone: self.config.placement.zone.clone(),
            },
            ranges,
        }
    }

    /// Sends `beat` to the placement leader (here, a known leader, or any node that may know
    /// it) and takes the view it answers with. A node without a replica of the placement
    /// group knows its leader only from the last report it took: when that leader is
    /// unreachable (dead, or its process stopped), the node asks the group's other voters,
    /// which know the new leader from Raft, instead of calling the dead one for ever.
    async fn send_heartbeat(&self, beat: Heartbeat) -> Result<(), String> {
        let timeout = Duration::from_millis(HEARTBEAT_TIMEOUT_MS);
        let mut target = self.placement_leader_record();
        let mut unreachable = BTreeSet::new();
        for _ in 0..3 {
            let reply = match &target {
                Some(leader) if leader.id == self.config.id => {
                    self.handle_heartbeat(beat.clone()).await
                }
                Some(leader) => match self
                    .peers
                    .call(
                        leader.id,
                        PLACEMENT_GROUP,
                        PeerRequest::Heartbeat(beat.clone()),
                        timeout,
                    )
                    .await
                {
                    Ok(PeerReply::Heartbeat(reply)) => reply,
                    Ok(other) => return Err(format!("unexpected reply {other:?}")),
                    Err(e) => {
                        tracing::debug!(leader = leader.id, "placement leader unreachable: {e}");
                        unreachable.insert(leader.id);
                        self.heartbeat_anyone(&beat, &mut unreachable).await?
                    }
                },
                None => self.heartbeat_anyone(&beat, &mut unreachable).await?,
            };
            match reply {
                HeartbeatReply::Accepted(report) => {
                    self.take_view(report);
                    return Ok(());
                }
                HeartbeatReply::NotLeader { leader } => {
                    if let Some(l) = &leader {
                        if let Ok(addr) = l.addr.parse() {
                            self.peers.learn(l.id, addr);
                        }
                    }
                    let known_bad = leader.as_ref().is_some_and(|l| unreachable.contains(&l.id));
                    if leader.is_none() || leader == target || known_bad {
                        return Err("the placement group has no leader now".into());
                    }
                    target = leader;
                }
            }
        }
        Err("placement leader hints went round in circles".into())
    }

    /// Sends `beat` to some node that may know the placement leader, skipping the nodes in
    /// `unreachable` (and adding those that fail to it): the placement group's voters first
    /// (they know its leader from Raft; another node knows it only from its last report),
    /// then every other known peer (over the pooled connections), else the node given by
    /// `--join` (on a one-off connection).
    async fn heartbeat_anyone(
        &self,
        beat: &Heartbeat,
        unreachable: &mut BTreeSet<NodeId>,
    ) -> Result<HeartbeatReply, String> {
        let timeout = Duration::from_millis(HEARTBEAT_TIMEOUT_MS);
        let request = || PeerRequest::Heartbeat(beat.clone());
        let unpack = |reply: PeerReply| match reply {
            PeerReply::Heartbeat(reply) => Ok(reply),
            other => Err(format!("unexpected reply {other:?}")),
        };
        let voters = self
            .placement
            .read()
            .expect("placement lock")
            .as_ref()
            .map(|view| view.placement_voters.clone())
            .unwrap_or_default();
        let others = self
            .peers
            .addrs()
            .into_keys()
            .filter(|id| !voters.contains(id));
        let peers: Vec<NodeId> = voters
            .iter()
            .copied()
            .chain(others)
            .filter(|id| *id != self.config.id && !unreachable.contains(id))
            .collect();
        for peer in peers {
            match self
                .peers
                .call(peer, PLACEMENT_GROUP, request(), timeout)
                .await
            {
                Ok(reply) => return unpack(reply),
                // Not asked again in this heartbeat, nor followed to by a hint.
                Err(_) => {
                    unreachable.insert(peer);
                }
            }
        }
        let addr = self
            .config
            .placement
            .join
            .ok_or("no node to ask for the placement leader")?;
        unpack(
            self.peers
                .call_addr(addr, PLACEMENT_GROUP, request(), timeout)
                .await?,
        )
    }

    /// Adopts the placement leader's report: node addresses, the range table and leaders.
    fn take_view(&self, report: PlacementReport) {
        for n in &report.nodes {
            if let Ok(addr) = n.addr.parse() {
                self.peers.learn(n.id, addr);
            }
        }
        *self.placement.write().expect("placement lock") = Some(PlacementView::from(&report));
        self.complete_table();
    }
}

/// The placement group as the scheduler sees it, from the membership applied at `group`'s
/// replica here (its leader's, when planning): its voters and leader, and whether a
/// membership change is under way (a learner catching up, or a joint configuration).
fn placement_replicas(group: &super::Group) -> (RangeReplicas, bool) {
    let metrics = group.raft.metrics().borrow_watched().clone();
    let membership = metrics.membership_config.membership();
    let changing =
        membership.learner_ids().next().is_some() || membership.get_joint_config().len() > 1;
    let replicas = RangeReplicas {
        range: PLACEMENT_GROUP,
        voters: membership.voter_ids().collect(),
        leader: metrics.current_leader,
    };
    (replicas, changing)
}

/// A put of `key = value` without a lease.
fn put_request(key: Vec<u8>, value: Vec<u8>) -> PutRequest {
    PutRequest {
        key,
        value,
        lease: 0,
        prev_kv: false,
    }
}

/// The registry key of `id` under `prefix` (zero-padded: keys sort by id).
fn registry_key(prefix: &[u8], id: u64) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(format!("{id:020}").as_bytes());
    key
}

fn node_key(id: NodeId) -> Vec<u8> {
    registry_key(NODES_PREFIX, id)
}

fn range_key(id: RangeId) -> Vec<u8> {
    registry_key(RANGES_PREFIX, id)
}

/// Heartbeats to the placement leader until the node goes.
pub(super) async fn heartbeat_loop(inner: Weak<NodeInner>) {
    let mut ticker = super::ticker(Duration::from_millis(HEARTBEAT_INTERVAL_MS));
    let mut meter = super::RateMeter::default();
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let beat = inner.heartbeat(&mut meter);
        if let Err(e) = inner.send_heartbeat(beat).await {
            tracing::debug!("heartbeat: {e}");
        }
    }
}

/// Plans and starts replica moves while this node leads the placement group.
pub(super) async fn schedule_loop(inner: Weak<NodeInner>) {
    let mut ticker = super::ticker(Duration::from_millis(SCHEDULE_INTERVAL_MS));
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if !inner.config.placement.schedule {
            return;
        }
        for m in inner.plan_moves() {
            tracing::info!(
                range = m.range,
                from = m.from,
                to = m.to,
                "scheduling a replica move"
            );
            inner
                .placement_memory
                .lock()
                .expect("placement memory lock")
                .moves
                .insert(m.range, m);
            tokio::spawn(inner.clone().carry_out(Decision::Move(m)));
        }
        if let Some(left) = inner.plan_merge_now() {
            tracing::info!(range = left, "scheduling a merge of its right neighbour");
            inner
                .placement_memory
                .lock()
                .expect("placement memory lock")
                .merging = Some(left);
            tokio::spawn(inner.clone().carry_out(Decision::Merge { left }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(id: RangeId, leader: Option<NodeId>, writes_per_sec: u64) -> RangeLoad {
        RangeLoad {
            descriptor: RangeDescriptor {
                id,
                start: vec![id as u8],
                end: vec![id as u8 + 1],
                epoch: 1,
                replicas: vec![1, 2, 3],
            },
            leader,
            keys: 0,
            bytes: 0,
            reads_per_sec: 0,
            writes_per_sec,
        }
    }

    #[test]
    fn a_nodes_led_writes_sum_the_ranges_it_was_reported_leading() {
        let ranges = [
            range(1, Some(1), 3_000),
            range(2, Some(2), 2_000),
            range(3, Some(1), 1_000),
            // No leader reported: counted for no node.
            range(4, None, 500),
        ];
        let led = writes_per_sec_led(&ranges);
        assert_eq!(led, BTreeMap::from([(1, 4_000.0), (2, 2_000.0)]));
    }
}
