//! Leader balancing, the node's shell around [`concord_placement::balance`].
//!
//! Every `leader_balance_interval_ms` each node reads its groups' Raft metrics (who leads
//! each range, which peers answered this node's heartbeats lately), plans with
//! [`plan_leader_moves`] and carries out the moves that start at itself with openraft's
//! leader transfer. Every node plans from nearly the same view (its own replicas, and the
//! leaders the placement service reports for the ranges it does not host), so the nodes agree
//! on the plan without talking about it.
//!
//! A transfer is safe for writes in flight: the target is elected only once its log holds
//! everything the old leader appended, so those entries commit under the new leader and their
//! callers get their answers; a write that arrives during the hand-over is refused before it is
//! appended and the client retries it at the new leader (`NotLeader`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Weak;
use std::time::{Duration, Instant};

use concord_placement::balance::{plan_leader_moves, RangeLeadership};
use concord_transport::api::{NodeId, RangeId};
use openraft::async_runtime::watch::WatchReceiver;
use openraft::Instant as _;

use super::{NodeInner, PLACEMENT_GROUP};

/// A peer counts as live if it acknowledged one of this node's heartbeats this recently.
pub const PEER_ACK_FRESH_MS: u64 = 1_000;
/// A range is handed only to a replica whose log is at most this many entries behind the
/// leader's: it catches up at once, and the range is not left without a writable leader while
/// the target fetches a snapshot.
pub const TRANSFER_LAG_ENTRIES_MAX: u64 = 64;
/// Leader moves planned per round (each node carries out those that start at itself).
pub const LEADER_MOVES_PER_ROUND_MAX: usize = 16;
/// A range this node handed over is not handed over again for this many rounds, so a
/// transfer that is still under way is not requested twice.
pub const MOVED_COOLDOWN_ROUNDS: u32 = 5;

/// Balances leaders every `interval` until the node goes; returns at once for a zero interval.
pub(super) async fn leader_balance_loop(inner: Weak<NodeInner>, interval: Duration) {
    if interval.is_zero() {
        return;
    }
    let mut ticker = super::ticker(interval);
    let mut moved: BTreeMap<RangeId, Instant> = BTreeMap::new();
    let cooldown = interval * MOVED_COOLDOWN_ROUNDS;
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        moved.retain(|_, at| now.duration_since(*at) < cooldown);
        for (range, to) in inner.leader_moves_from_here(&moved) {
            let Ok(group) = inner.group(range) else {
                continue;
            };
            // A merge or a replica move led here would fail and have to start again at the
            // new leader.
            if group.merging() || group.moving() {
                continue;
            }
            tracing::info!(range, to, "leader balance: handing leadership over");
            if let Err(e) = group.raft.trigger().transfer_leader(to).await {
                tracing::warn!(range, to, "leader transfer: {e}");
            }
            moved.insert(range, now);
        }
    }
}

impl NodeInner {
    /// The moves of this round's plan that this node carries out: ranges it leads, not in
    /// `cooling`, to a live replica that is nearly caught up.
    fn leader_moves_from_here(
        &self,
        cooling: &BTreeMap<RangeId, Instant>,
    ) -> Vec<(RangeId, NodeId)> {
        let me = self.config.id;
        let fresh = Duration::from_millis(PEER_ACK_FRESH_MS);
        let mut live = BTreeSet::from([me]);
        // Per led range: how far each replica's log is behind the leader's.
        let mut lag: BTreeMap<RangeId, BTreeMap<NodeId, u64>> = BTreeMap::new();
        let groups = self.groups();
        let mut view = Vec::with_capacity(groups.len());
        // The placement group does little work: it is not counted, and not moved.
        for group in groups.iter().filter(|g| g.id != PLACEMENT_GROUP) {
            let id = &group.id;
            let watched = group.raft.metrics();
            let metrics = watched.borrow_watched();
            if metrics.current_leader == Some(me) {
                for (peer, acked) in metrics.heartbeat.iter().flatten() {
                    if acked.as_ref().is_some_and(|at| at.elapsed() < fresh) {
                        live.insert(*peer);
                    }
                }
                let last = metrics.last_log_index.unwrap_or(0);
                let behind = metrics.replication.iter().flatten().map(|(peer, matched)| {
                    let matched = matched.as_ref().map_or(0, |m| m.index);
                    (*peer, last.saturating_sub(matched))
                });
                lag.insert(*id, behind.collect());
            }
            view.push(RangeLeadership {
                range: *id,
                voters: metrics.membership_config.membership().voter_ids().collect(),
                leader: metrics.current_leader,
            });
        }
        // Ranges without a replica here, as the placement service last reported them: with
        // more nodes than replicas per range, no node sees every range by itself. Their
        // leaders heartbeat to placement, so they count as live.
        for d in self.table().ranges() {
            if groups.iter().any(|g| g.id == d.id) {
                continue;
            }
            let leader = self.leader_hint(d.id);
            live.extend(leader);
            view.push(RangeLeadership {
                range: d.id,
                voters: d.replicas.clone(),
                leader,
            });
        }
        // A node being drained gives its leaderships up with its replicas; none go to it.
        if let Some(placement) = self.placement.read().expect("placement lock").as_ref() {
            live.retain(|n| !placement.draining.contains(n));
        }
        plan_leader_moves(&view, &live, LEADER_MOVES_PER_ROUND_MAX)
            .into_iter()
            .filter(|m| m.from == me && !cooling.contains_key(&m.range))
            .filter(|m| {
                lag.get(&m.range)
                    .and_then(|peers| peers.get(&m.to))
                    .is_some_and(|behind| *behind <= TRANSFER_LAG_ENTRIES_MAX)
            })
            .map(|m| (m.range, m.to))
            .collect()
    }
}
