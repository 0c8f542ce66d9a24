//! Replica moves: adding a range's replica on another node and removing one, with openraft
//! membership changes.
//!
//! - **Move** (at the range's leader, [`NodeInner::move_replica`]): the leader first makes
//!   sure its log starts after a snapshot (it builds one and purges the log up to it), so
//!   that the new replica is caught up by a snapshot and never replays the range's history
//!   from index 0 (the replay would apply commands against bounds the new replica does not
//!   have). It then adds the receiver as a learner and waits until it has caught up, and
//!   replaces the leaving voter with it in one joint-consensus change (openraft's
//!   `change_membership`): both the old and the new voter sets must commit the change, so
//!   the range never drops below a quorum. A leader that is itself the leaving voter first
//!   hands its leadership to the voter its log reached furthest (not one on a dead node) and
//!   answers `NotLeader`.
//! - **Receiving** ([`NodeInner::host_replica`]): a node that gets a Raft message for a range
//!   it does not host starts an empty replica of it, which the leader fills with a snapshot.
//! - **Removal** ([`replica_gc_loop`]): a replica that is not in its own view of the range's
//!   membership, or hears no leader, asks the range's leader whether it is still a replica;
//!   the leader says no only when neither its committed nor its latest membership names the
//!   node. Then the node shuts the replica down and deletes its rows. A removed replica is
//!   never told by Raft itself (the leader stops talking to it), hence the question.

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use concord_transport::api::{ApiError, KvResponse, MoveResponse, NodeId, RangeId};
use openraft::async_runtime::watch::WatchReceiver;
use openraft::error::{ClientWriteError, RaftError};
use openraft::BasicNode;

use super::{not_leader, Group, NodeInner, UnderWay, PLACEMENT_GROUP};
use crate::network::{PeerError, PeerReply, PeerRequest};
use crate::raft_types::LogId;

/// How often a node looks for replicas of its that were removed.
pub const REPLICA_GC_INTERVAL_MS: u64 = 2_000;
/// How long building a snapshot and purging the log before a move may take.
pub const SNAPSHOT_PREPARE_TIMEOUT_MS: u64 = 30_000;
/// How long a new learner may take to catch up.
pub const LEARNER_CATCH_UP_TIMEOUT_MS: u64 = 60_000;
/// How often a move looks whether its node's placement view has its target down.
pub const MOVE_TARGET_CHECK_MS: u64 = 500;
/// How long asking a peer whether this node is still a replica may take.
pub const IS_REPLICA_TIMEOUT_MS: u64 = 2_000;
/// How long a cleanup membership change (leaving a joint configuration, removing stray
/// learners or a failed move's) may take: a leader cut off from its majority would otherwise
/// hold the replica sweep, and every other group's, for as long as the cut lasts.
pub const SWEEP_CHANGE_TIMEOUT_MS: u64 = 5_000;

fn unavailable(range_id: RangeId, reason: impl std::fmt::Display) -> ApiError {
    ApiError::Unavailable {
        range_id,
        reason: reason.to_string(),
    }
}

/// Maps a failed membership change.
fn membership_error(
    range_id: RangeId,
    e: RaftError<crate::raft_types::TypeConfig, ClientWriteError<crate::raft_types::TypeConfig>>,
) -> ApiError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            not_leader(range_id, f.leader_id)
        }
        other => unavailable(range_id, other),
    }
}

impl NodeInner {
    /// Moves `group`'s replica on `from` to `to` (this node must lead the group).
    pub(super) async fn move_replica(
        &self,
        group: &Group,
        from: NodeId,
        to: NodeId,
    ) -> Result<KvResponse, ApiError> {
        let range_id = group.id;
        if let Err(f) = group.raft.as_leader() {
            return Err(not_leader(range_id, f.leader_id));
        }
        let _under_way = UnderWay::new(&group.moves_under_way);
        let metrics = group.raft.metrics().borrow_watched().clone();
        let voters: BTreeSet<NodeId> = metrics.membership_config.membership().voter_ids().collect();
        let done = |voters: BTreeSet<NodeId>| {
            let header = group.state.read().expect("range state lock").mvcc.header();
            Ok(KvResponse::Moved(MoveResponse {
                header,
                voters: voters.into_iter().collect(),
            }))
        };
        if voters.contains(&to) && !voters.contains(&from) {
            return done(voters);
        }
        if from == to || !voters.contains(&from) || voters.contains(&to) {
            return Err(ApiError::InvalidRequest(format!(
                "range {range_id} has voters {voters:?}: cannot move a replica from node {from} to node {to}"
            )));
        }
        if from == self.config.id {
            // The leader leaves: hand over first, to the voter furthest along (a voter on a
            // dead node, behind, cannot take over); the client retries there.
            let matched = |v: &NodeId| {
                metrics
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(v).copied().flatten())
            };
            let heir = voters
                .iter()
                .filter(|v| **v != from)
                .max_by_key(|v| matched(v))
                .copied()
                .ok_or_else(|| {
                    ApiError::InvalidRequest(format!("range {range_id} has no other voter"))
                })?;
            group
                .raft
                .trigger()
                .transfer_leader(heir)
                .await
                .map_err(|e| unavailable(range_id, e))?;
            return Err(not_leader(range_id, Some(heir)));
        }
        let addr = self.node_addr(to).await.ok_or_else(|| {
            ApiError::InvalidRequest(format!(
                "node {to} is unknown (not in the placement registry)"
            ))
        })?;
        self.start_log_after_snapshot(group).await?;
        let catch_up = Duration::from_millis(self.config.placement.learner_catch_up_ms);
        let catching_up = async {
            group
                .raft
                .add_learner(to, BasicNode::new(addr.to_string()), true)
                .await
                .map_err(|e| membership_error(range_id, e))?;
            self.wait_learner_holds_snapshot(group, to).await
        };
        let added = tokio::time::timeout(catch_up, async {
            tokio::select! {
                caught_up = catching_up => caught_up,
                down = self.until_reported_down(range_id, to) => Err(down),
            }
        })
        .await;
        let failure = match added {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(unavailable(
                range_id,
                format!("node {to} did not catch up within {catch_up:?}"),
            )),
        };
        if let Some(e) = failure {
            // Leave no half-added learner behind (where this node no longer leads, the new
            // leader's replica sweep removes it).
            if let Err(removing) = remove_learners(group, BTreeSet::from([to])).await {
                tracing::debug!(
                    range = range_id,
                    to,
                    "removing the move's learner: {removing}"
                );
            }
            return Err(e);
        }
        // The learner has caught up; the voters are still the old ones.
        crate::storage::crash_point("move-learner-added");
        // A test's way to fail the move here, as a leadership lost at this point would.
        fail::fail_point!("move-fails-after-learner", |_| Err(ApiError::Internal(
            "fail point move-fails-after-learner".into()
        )));
        let mut new_voters = voters;
        new_voters.remove(&from);
        new_voters.insert(to);
        group
            .raft
            .change_membership(new_voters.clone(), false)
            .await
            .map_err(|e| membership_error(range_id, e))?;
        tracing::info!(range = range_id, from, to, "replica moved");
        done(new_voters)
    }

    /// Waits until learner `to` of `group` (led here) has matched the log up to its purge
    /// point, that is, holds the snapshot the move started from. openraft's blocking
    /// `add_learner` returns once a learner is within `replication_lag_threshold` (5,000)
    /// entries of the leader, counting one that has matched nothing as at index 0: a
    /// receiver that is down, or whose snapshot has not arrived, passed for caught up, and
    /// the move made a voter of it. It also returns when this node stops leading. Unbounded
    /// here: the move's catch-up time bounds it.
    async fn wait_learner_holds_snapshot(&self, group: &Group, to: NodeId) -> Result<(), ApiError> {
        let range_id = group.id;
        let me = self.config.id;
        let purged = group
            .raft
            .metrics()
            .borrow_watched()
            .purged
            .map_or(0, |p| p.index);
        let metrics = group
            .raft
            .wait(None)
            .metrics(
                |m| {
                    let matched = m
                        .replication
                        .as_ref()
                        .and_then(|r| r.get(&to).cloned().flatten());
                    m.current_leader != Some(me) || matched.is_some_and(|l| l.index >= purged)
                },
                "learner holds the snapshot",
            )
            .await
            .map_err(|e| unavailable(range_id, format!("waiting for node {to}: {e}")))?;
        if metrics.current_leader != Some(me) {
            return Err(not_leader(range_id, metrics.current_leader));
        }
        Ok(())
    }

    /// Resolves once this node's placement view (the placement leader's last report, which
    /// every heartbeat brings) has `node` down or being drained: a move to it would wait out
    /// its whole catch-up time (a minute by default) while holding its range as moving, and
    /// the scheduler, which plans around that node, could not replace it until then.
    async fn until_reported_down(&self, range_id: RangeId, node: NodeId) -> ApiError {
        let mut tick = super::ticker(Duration::from_millis(MOVE_TARGET_CHECK_MS));
        loop {
            tick.tick().await;
            let draining = self
                .placement
                .read()
                .expect("placement lock")
                .as_ref()
                .is_some_and(|view| view.draining.contains(&node));
            if draining {
                return unavailable(
                    range_id,
                    format!("node {node} is down or being drained (the placement service says so)"),
                );
            }
        }
    }

    /// Where node `node` listens: known here, or asked of the placement leader (a node that
    /// joined a moment ago is registered there before its address reaches every node).
    async fn node_addr(&self, node: NodeId) -> Option<std::net::SocketAddr> {
        if let Some(addr) = self.peers.addr(node) {
            return Some(addr);
        }
        let report = self.placement_report().await.ok()?;
        let record = report.nodes.iter().find(|n| n.id == node)?;
        let addr = record.addr.parse().ok()?;
        self.peers.learn(node, addr);
        Some(addr)
    }

    /// Builds a snapshot of `group` and purges its log up to it, so that a new replica is
    /// caught up by that snapshot (see the module documentation).
    async fn start_log_after_snapshot(&self, group: &Group) -> Result<(), ApiError> {
        let range_id = group.id;
        let timeout = Some(Duration::from_millis(SNAPSHOT_PREPARE_TIMEOUT_MS));
        let applied = {
            let metrics = group.raft.metrics().borrow_watched().clone();
            if metrics.purged.is_some() {
                return Ok(());
            }
            metrics.last_applied.map_or(0, |l| l.index)
        };
        group
            .raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| unavailable(range_id, e))?;
        let metrics = group
            .raft
            .wait(timeout)
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= applied),
                "snapshot built",
            )
            .await
            .map_err(|e| unavailable(range_id, format!("no snapshot to send: {e}")))?;
        let upto = metrics.snapshot.map_or(0, |s| s.index);
        group
            .raft
            .trigger()
            .purge_log(upto)
            .await
            .map_err(|e| unavailable(range_id, e))?;
        group
            .raft
            .wait(timeout)
            .metrics(|m| m.purged.is_some(), "log purged")
            .await
            .map_err(|e| unavailable(range_id, format!("log not purged: {e}")))?;
        Ok(())
    }

    /// The group `id`, started here from storage if this node does not host it yet: a range
    /// a split made (its rows written by the split), or one a leader is adding this node to
    /// (started empty; the leader's snapshot fills it).
    pub(super) async fn host_replica(&self, id: RangeId) -> Result<Arc<Group>, String> {
        let _opening = self.opening.lock().await;
        if let Ok(group) = self.group(id) {
            return Ok(group);
        }
        // A leader that has not seen the merge yet, or an old lineage, may still name it.
        if self.retired(id) {
            return Err(format!("range {id} was merged away"));
        }
        let started = std::time::Instant::now();
        let group = Arc::new(self.opener.open(id).await.map_err(|e| e.to_string())?);
        self.groups
            .write()
            .expect("groups lock")
            .insert(id, group.clone());
        let open_ms = started.elapsed().as_millis() as u64;
        tracing::info!(range = id, open_ms, "hosting a new replica");
        Ok(group)
    }

    /// Answers `IsReplica` at the group's leader.
    pub(super) fn is_replica_here(
        &self,
        group: &Group,
        node: NodeId,
        named_at: Option<LogId>,
    ) -> PeerReply {
        if let Err(f) = group.raft.as_leader() {
            return PeerReply::Error(PeerError::NotLeader(f.leader_id));
        }
        let latest = group
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .clone();
        let committed = group
            .state
            .read()
            .expect("range state lock")
            .membership
            .clone();
        let names =
            |m: &crate::raft_types::StoredMembership| m.membership().get_node(&node).is_some();
        let removed_since = named_at.is_none_or(|at| committed.log_id().is_some_and(|c| c > at));
        PeerReply::IsReplica(names(&latest) || names(&committed) || !removed_since)
    }

    /// Whether this node's replica of `group` may have been removed: it is not in its own
    /// latest membership (an empty replica awaiting its snapshot is not either), it knows no
    /// leader, or the placement service's table (for the placement group, its list of the
    /// group's voters) does not list it (a voter removed while it held only the joint
    /// configuration still names itself and keeps its last leader).
    fn maybe_removed(&self, group: &Group) -> bool {
        let me = self.config.id;
        let metrics = group.raft.metrics().borrow_watched().clone();
        let named = metrics
            .membership_config
            .membership()
            .get_node(&me)
            .is_some();
        let placed = match self.placement.read().expect("placement lock").as_ref() {
            None => true,
            Some(view) if group.id == PLACEMENT_GROUP => view.placement_voters.contains(&me),
            Some(view) => view
                .ranges
                .iter()
                .find(|d| d.id == group.id)
                .is_none_or(|d| d.replicas.contains(&me)),
        };
        !named || !placed || metrics.current_leader.is_none()
    }

    /// Asks the range's leader whether this node is still a replica of `group`: `Some(false)`
    /// only on the leader's word.
    async fn still_replica(&self, group: &Group) -> Option<bool> {
        let me = self.config.id;
        let mut ask: Vec<NodeId> = Vec::new();
        if let Some(leader) = group.raft.metrics().borrow_watched().current_leader {
            ask.push(leader);
        }
        if let Some(leader) = self.leader_hint(group.id) {
            ask.push(leader);
        }
        let table = self.table();
        if let Some(d) = table.get(group.id) {
            ask.extend(d.replicas.iter().copied());
        }
        ask.retain(|n| *n != me);
        ask.dedup();
        let named_at = {
            let metrics = group.raft.metrics().borrow_watched().clone();
            let latest = &metrics.membership_config;
            latest.membership().get_node(&me).and(*latest.log_id())
        };
        let timeout = Duration::from_millis(IS_REPLICA_TIMEOUT_MS);
        for node in ask {
            let request = PeerRequest::IsReplica { node: me, named_at };
            if let Ok(PeerReply::IsReplica(answer)) =
                self.peers.call(node, group.id, request, timeout).await
            {
                return Some(answer);
            }
        }
        None
    }

    /// Whether `group` was merged away: the placement view no longer lists it, and lists
    /// another range holding its first key at a higher epoch (the registry drops a merged
    /// range once the merging range reports its new extent, which it does only after applying
    /// the merge; a range split off one not yet in the view has a higher epoch than what the
    /// view shows for its keys). Also true of a replica that lagged and never applied the
    /// freeze. A replica still waiting for its first snapshot has no extent to go by.
    fn merged_away(&self, group: &Group) -> bool {
        if group.id == PLACEMENT_GROUP || !group.has_state() {
            return false;
        }
        let bounds = group.bounds();
        let placement = self.placement.read().expect("placement lock");
        let Some(view) = placement.as_ref() else {
            return false;
        };
        let listed = view.ranges.iter().any(|d| d.id == group.id);
        let covered = view
            .ranges
            .iter()
            .any(|d| d.id != group.id && d.contains(&bounds.start) && d.epoch > bounds.epoch);
        !listed && covered
    }

    /// Finishes a membership change a previous leader left half done: openraft leaves a
    /// range in the joint configuration when its leader changes between the joint and the
    /// uniform entry of a move, and nothing else takes it out. The range moves on to the newer
    /// of the two voter sets (the move's target).
    async fn leave_joint(&self, group: &Group) {
        let target = {
            let metrics = group.raft.metrics().borrow_watched().clone();
            let joint = metrics
                .membership_config
                .membership()
                .get_joint_config()
                .clone();
            match joint.as_slice() {
                [_, .., newest] => newest.clone(),
                _ => return,
            }
        };
        let change = openraft::ChangeMembers::ReplaceAllVoters(target.clone());
        match bounded_change(group, change).await {
            Ok(()) => {
                tracing::info!(range = group.id, voters = ?target, "left a joint configuration")
            }
            Err(e) => tracing::debug!(range = group.id, "leaving a joint configuration: {e}"),
        }
    }

    /// Removes the learners a failed move left in `group` (led here): a move whose leader
    /// lost its leadership, or failed, between adding the receiver as a learner and the
    /// membership change. The placement scheduler never moves a range with a learner (a
    /// move is under way), so a stray one would pin the range's replicas for ever. The
    /// membership is read before the move count, so a learner seen here belongs to no move
    /// under way then; one whose move made it a voter since is refused by openraft (it
    /// removes learners only). A move to the same node starting meanwhile finds its learner
    /// removed under it and fails; the scheduler plans it again.
    async fn drop_stray_learners(&self, group: &Group) {
        // A joint configuration is `leave_joint`'s.
        let joint = group
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .get_joint_config()
            .len()
            > 1;
        let learners: BTreeSet<NodeId> = group.learners().into_iter().collect();
        if joint || learners.is_empty() || group.moving() {
            return;
        }
        match remove_learners(group, learners.clone()).await {
            Ok(()) => tracing::info!(range = group.id, ?learners, "removed stray learners"),
            Err(e) => tracing::debug!(range = group.id, "removing stray learners: {e}"),
        }
    }

    /// Shuts this node's replica of `id` down and deletes it (`why` is for the log).
    async fn remove_replica(&self, id: RangeId, why: &str) {
        let _opening = self.opening.lock().await;
        let Some(group) = self.groups.write().expect("groups lock").remove(&id) else {
            return;
        };
        if let Err(e) = group.raft.shutdown().await {
            tracing::warn!(range = id, "shutting a removed replica down: {e}");
        }
        // Its watch channels end (they hold the group, which would otherwise serve them its
        // last revision for ever): their clients resume at a replica that still has it.
        group.close_watches();
        drop(group);
        if let Err(e) = self.engine.destroy_group(id).await {
            tracing::error!(range = id, "deleting a removed replica: {e}");
        }
        tracing::info!(range = id, "removed this node's replica ({why})");
        self.complete_table();
    }
}

/// Makes membership change `change` in `group` (led here), within
/// [`SWEEP_CHANGE_TIMEOUT_MS`].
async fn bounded_change(
    group: &Group,
    change: openraft::ChangeMembers<NodeId, BasicNode>,
) -> Result<(), String> {
    let change = group.raft.change_membership(change, false);
    match tokio::time::timeout(Duration::from_millis(SWEEP_CHANGE_TIMEOUT_MS), change).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("not done within {SWEEP_CHANGE_TIMEOUT_MS} ms")),
    }
}

/// Removes `learners` from `group`'s membership (led here), within
/// [`SWEEP_CHANGE_TIMEOUT_MS`]; openraft refuses a node that is a voter.
async fn remove_learners(group: &Group, learners: BTreeSet<NodeId>) -> Result<(), String> {
    bounded_change(group, openraft::ChangeMembers::RemoveNodes(learners)).await
}

/// Looks for replicas of this node that were removed from their range, and deletes them.
pub(super) async fn replica_gc_loop(inner: Weak<NodeInner>) {
    let mut ticker = super::ticker(Duration::from_millis(REPLICA_GC_INTERVAL_MS));
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        for group in inner.groups() {
            if inner.retired(group.id) || inner.merged_away(&group) {
                inner.retired.lock().expect("retired lock").insert(group.id);
                inner.remove_replica(group.id, "merged away").await;
                continue;
            }
            if group.raft.is_leader() {
                inner.leave_joint(&group).await;
                inner.drop_stray_learners(&group).await;
                continue;
            }
            if !inner.maybe_removed(&group) {
                continue;
            }
            if inner.still_replica(&group).await == Some(false) {
                inner.remove_replica(group.id, "moved away").await;
            }
        }
    }
}
