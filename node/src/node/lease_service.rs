//! The node's side of leases: keepalives held in memory by the owner range's leader, the
//! leader's periodic tick (one Raft entry carries every renewal and every expiry), the fan-out
//! of revocations to the other ranges, the check that a put's lease exists, and the check
//! that a fenced txn's token still holds its lock when the lock lives in another range. The replicated
//! lease state and its rules are in [`crate::leases`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use concord_transport::api::{
    ApiError, Consistency, Fence, KvResponse, LeaseId, LeaseRequest, LeaseResponse, RangeId,
};
use concord_transport::lease::lease_anchor;
use futures::future::join_all;
use openraft::async_runtime::watch::WatchReceiver;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{not_leader, Group, NodeInner};
use crate::leases::LEASE_TICK_MS;
use crate::mvcc::Command;
use crate::network::{CallError, PeerError, PeerReply, PeerRequest};

/// How long one internal proposal (a tick, a detach at another range) may take.
const PROPOSE_TIMEOUT_MS: u64 = 3_000;

/// Longest a keepalive waits for the tick that carries it: a tick's proposal bound and two
/// tick periods.
const CARRIED_WAIT_MS: u64 = PROPOSE_TIMEOUT_MS + 2 * LEASE_TICK_MS;

/// How many ticks' outcomes are remembered for the keepalives waiting on them.
const OUTCOMES_KEPT: usize = 64;

/// The outcomes of a range's latest ticks (number, applied), oldest first, and the number of
/// the latest tick that ended.
type Outcomes = (VecDeque<(u64, bool)>, u64);

/// Per-range lease bookkeeping of this node, used while it leads the range.
///
/// A keepalive is acknowledged only once a tick that carries its renewal has been applied
/// and the lease is still there after it: an acknowledged renewal is then in the replicated
/// lease clock, so neither a tick already in flight (which may expire the lease) nor a
/// failover (a new leader knows only what ticks carried) can take it back.
pub(super) struct LeaseKeeper {
    /// Leases kept alive since the last tick, with when (the latest keepalive of each), and
    /// the number of the tick that will carry them.
    renewals: Mutex<(HashMap<LeaseId, Instant>, u64)>,
    /// How the latest ticks ended (applied, failed or abandoned).
    outcomes: watch::Sender<Outcomes>,
    /// When this node last ticked the range, and in which term.
    last_tick: Mutex<Option<(Instant, u64)>>,
    /// A tick of this range is running.
    busy: AtomicBool,
}

impl Default for LeaseKeeper {
    fn default() -> Self {
        Self {
            renewals: Mutex::new((HashMap::new(), 1)),
            outcomes: watch::Sender::new((VecDeque::new(), 0)),
            last_tick: Mutex::default(),
            busy: AtomicBool::new(false),
        }
    }
}

impl LeaseKeeper {
    /// Records keepalives of `ids` received `at`; returns the number of the tick that will
    /// carry them.
    fn renew_all(&self, ids: impl IntoIterator<Item = (LeaseId, Instant)>) -> u64 {
        let mut guard = self.renewals.lock().expect("renewals lock");
        let (renewals, next_tick) = &mut *guard;
        for (id, at) in ids {
            let latest = renewals.entry(id).or_insert(at);
            *latest = (*latest).max(at);
        }
        *next_tick
    }

    /// Takes the renewals for a tick; returns them and the tick's number.
    fn take_renewals(&self) -> (HashMap<LeaseId, Instant>, u64) {
        let mut guard = self.renewals.lock().expect("renewals lock");
        let (renewals, next_tick) = &mut *guard;
        let tick = *next_tick;
        *next_tick += 1;
        (std::mem::take(renewals), tick)
    }

    /// Records how tick `tick` ended: `applied`, or not (what it carried is not renewed).
    fn ended(&self, tick: u64, applied: bool) {
        self.outcomes.send_modify(|(outcomes, latest)| {
            outcomes.push_back((tick, applied));
            while outcomes.len() > OUTCOMES_KEPT {
                outcomes.pop_front();
            }
            *latest = (*latest).max(tick);
        });
    }

    /// Waits (at most [`CARRIED_WAIT_MS`]) until tick `tick` has ended; true if it was
    /// applied.
    async fn carried(&self, tick: u64) -> bool {
        let mut outcomes = self.outcomes.subscribe();
        let wait = outcomes.wait_for(|(_, latest)| *latest >= tick);
        // Bound to a local: the result borrows `outcomes`, which must outlive it.
        let applied = match tokio::time::timeout(Duration::from_millis(CARRIED_WAIT_MS), wait).await
        {
            Ok(Ok(state)) => state.0.iter().any(|&(t, applied)| t == tick && applied),
            _ => false,
        };
        applied
    }

    /// Milliseconds since the previous tick in `term`; 0 on the first tick of a term (time
    /// spent electing this leader is not counted: expiries are delayed, never advanced).
    fn advance(&self, now: Instant, term: u64) -> u64 {
        let mut last = self.last_tick.lock().expect("last tick lock");
        let advance = match *last {
            Some((at, t)) if t == term => now.duration_since(at).as_millis() as u64,
            _ => 0,
        };
        *last = Some((now, term));
        advance
    }

    /// Time since the previous tick (counted against a lease's remaining TTL).
    fn since_tick(&self) -> u64 {
        self.last_tick
            .lock()
            .expect("last tick lock")
            .map_or(0, |(at, _)| at.elapsed().as_millis() as u64)
    }

    /// This node no longer leads the range: the renewals not carried yet never will be, so
    /// their keepalives are answered as not renewed.
    fn forget(&self) {
        *self.last_tick.lock().expect("last tick lock") = None;
        let (renewals, tick) = self.take_renewals();
        if !renewals.is_empty() {
            self.ended(tick, false);
        }
    }
}

/// Ticks every range this node leads, every [`LEASE_TICK_MS`], until the node goes.
pub(super) async fn lease_loop(inner: Weak<NodeInner>) {
    let mut interval = super::ticker(Duration::from_millis(LEASE_TICK_MS));
    // Dropped (aborting its ticks) when the loop is aborted at shutdown.
    let mut ticks = JoinSet::new();
    loop {
        interval.tick().await;
        while ticks.try_join_next().is_some() {}
        let Some(inner) = inner.upgrade() else { return };
        for group in inner.groups() {
            // A frozen range keeps its lease clock still until the merge moves its leases.
            if !group.raft.is_leader() || group.frozen() {
                group.keeper.forget();
                continue;
            }
            if group.keeper.busy.swap(true, Ordering::AcqRel) {
                continue;
            }
            let inner = inner.clone();
            ticks.spawn(async move {
                inner.lease_tick(&group).await;
                group.keeper.busy.store(false, Ordering::Release);
            });
        }
    }
}

impl NodeInner {
    /// One lease tick of a range this node leads: advance the clock, carry the renewals,
    /// expire (all in one entry), then push pending revocations to the other ranges.
    async fn lease_tick(&self, group: &Group) {
        let term = group.raft.metrics().borrow_watched().current_term;
        let owns_leases = {
            let state = group.state.read().expect("range state lock");
            let owns = state.mvcc.leases().owned().next().is_some();
            owns
        };
        let (renewals, tick_number) = group.keeper.take_renewals();
        // Measured after the renewals are taken (each arrived before it) and as close to the
        // proposal as can be: a grant proposed before this tick starts its TTL here.
        let now = Instant::now();
        let advance_ms = group.keeper.advance(now, term);
        if advance_ms > 4 * LEASE_TICK_MS {
            // The lease clock jumps: every lease loses that much at once (a stalled node).
            tracing::warn!(range = group.id, term, advance_ms, "lease clock jump");
        }
        let needed = owns_leases || !renewals.is_empty();
        let mut applied = false;
        if needed {
            let tick = Command::LeaseTick {
                advance_ms,
                renewals: renewals
                    .iter()
                    .map(|(id, at)| (*id, now.saturating_duration_since(*at).as_millis() as u64))
                    .collect(),
            };
            let timeout = Duration::from_millis(PROPOSE_TIMEOUT_MS);
            match tokio::time::timeout(timeout, group.raft.client_write(tick)).await {
                Ok(Ok(_)) => applied = true,
                failed => {
                    tracing::debug!(range = group.id, "lease tick failed: {failed:?}");
                    // The advance is lost (expiries only get later). The renewals go to the
                    // next tick, but their keepalives are answered as failed: this entry may
                    // still commit, and expire what they renewed.
                    group.keeper.renew_all(renewals);
                }
            }
        }
        // With nothing to carry, the tick needed no entry: its keepalives (none) are done.
        group.keeper.ended(tick_number, applied || !needed);
        // Read after the tick: what it expired is fenced and detached at once.
        let pending = {
            let state = group.state.read().expect("range state lock");
            let pending = state.mvcc.leases().pending_detach();
            pending
        };
        if !pending.is_empty() {
            self.finish_revocation(group, pending).await;
        }
    }

    /// The two phases of revoking `ids` (owned by `group`, led here): fence them in every
    /// other range, then detach them everywhere (deleting their keys). True when done; else
    /// the next tick tries again (every step is idempotent).
    pub(super) async fn finish_revocation(&self, group: &Group, ids: Vec<LeaseId>) -> bool {
        let owner = group.id;
        let fence = |epoch| Command::LeaseFence {
            ids: ids.clone(),
            epoch,
        };
        let detach = |epoch| Command::LeaseDetach {
            ids: ids.clone(),
            epoch,
        };
        if self.on_other_ranges(owner, fence).await.is_none() {
            return false;
        }
        let Some(epoch) = self.on_other_ranges(owner, detach).await else {
            return false;
        };
        match self
            .propose(group, Command::LeaseDetached { ids, epoch })
            .await
        {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(range = owner, "lease detached: {e}");
                false
            }
        }
    }

    /// Applies the command `make` builds for each range's epoch at every range but `owner`;
    /// when all succeeded, the owner's epoch in the table they were sent by. Every range means
    /// the ranges of a complete table: a range whose extent is not the table's any more (it
    /// split or merged since, and this node has not heard) refuses its command, and a table
    /// that changed during the round does not count either; the next tick tries again, so a
    /// range just split off is never passed over.
    async fn on_other_ranges(&self, owner: RangeId, make: impl Fn(u64) -> Command) -> Option<u64> {
        let table = self.complete_table()?;
        let owner_epoch = table.get(owner)?.epoch;
        let others = table.ranges().iter().filter(|d| d.id != owner);
        let results = join_all(others.map(|d| self.propose_anywhere(d.id, make(d.epoch)))).await;
        let done =
            results.iter().all(Result::is_ok) && self.complete_table().as_ref() == Some(&table);
        done.then_some(owner_epoch)
    }

    /// Runs `here` if this node leads range `range_id`; otherwise sends `request` to the
    /// range's leader (as this node's replica knows it, or as the placement service last
    /// reported it for a range this node does not host) and takes the answer out of its reply
    /// with `unpack` (which hands back a reply it does not expect).
    pub(super) async fn at_leader<T, F>(
        &self,
        range_id: RangeId,
        here: impl FnOnce(Arc<Group>) -> F,
        request: PeerRequest,
        unpack: impl FnOnce(PeerReply) -> Result<Result<T, ApiError>, PeerReply>,
    ) -> Result<T, ApiError>
    where
        F: std::future::Future<Output = Result<T, ApiError>>,
    {
        let leader = match self.group(range_id) {
            Ok(group) => match group.raft.as_leader() {
                Ok(_) => return here(group).await,
                Err(f) => f.leader_id,
            },
            Err(_) => self.leader_hint(range_id),
        }
        .ok_or_else(|| not_leader(range_id, None))?;
        let timeout = Duration::from_millis(PROPOSE_TIMEOUT_MS);
        match self.peers.call(leader, range_id, request, timeout).await {
            Ok(PeerReply::Error(PeerError::NotLeader(hint))) => Err(not_leader(range_id, hint)),
            Ok(PeerReply::Error(PeerError::NoSuchGroup(_))) => {
                Err(ApiError::RangeNotFound { range_id })
            }
            Ok(reply) => unpack(reply).unwrap_or_else(|other| {
                Err(ApiError::Internal(format!(
                    "unexpected peer reply {other:?}"
                )))
            }),
            Err(e) => Err(peer_failure(range_id, e)),
        }
    }

    /// Proposes an internal command to range `range_id` at its leader, here or on a peer.
    pub(super) async fn propose_anywhere(
        &self,
        range_id: RangeId,
        cmd: Command,
    ) -> Result<KvResponse, ApiError> {
        let local = cmd.clone();
        self.at_leader(
            range_id,
            move |group| async move { self.propose(&group, local).await },
            PeerRequest::Propose(cmd),
            |reply| match reply {
                PeerReply::Proposed(result) => Ok(result),
                other => Err(other),
            },
        )
        .await
    }

    /// Whether lease `id` exists, asked linearizably of its owner range's leader.
    pub(super) async fn check_lease_alive(&self, id: LeaseId) -> Result<(), ApiError> {
        let range_id = self.table().locate(&lease_anchor(id)).id;
        let alive = self
            .at_leader(
                range_id,
                |group| async move { self.lease_alive_here(&group, id).await },
                PeerRequest::LeaseAlive { id },
                |reply| match reply {
                    PeerReply::LeaseAlive(alive) => Ok(Ok(alive)),
                    other => Err(other),
                },
            )
            .await?;
        alive.then_some(()).ok_or(ApiError::LeaseNotFound { id })
    }

    /// Whether `fence`'s token holds its lock, asked linearizably of the leader of the range
    /// holding the lock's keys.
    pub(super) async fn check_fence_holder(&self, fence: &Fence) -> Result<(), ApiError> {
        let range_id = self.table().locate(&fence.prefix).id;
        let holds = self
            .at_leader(
                range_id,
                |group| async move { self.fence_holds_here(&group, fence).await },
                PeerRequest::FenceHolds(fence.clone()),
                |reply| match reply {
                    PeerReply::FenceHolds(holds) => Ok(Ok(holds)),
                    other => Err(other),
                },
            )
            .await?;
        holds
            .then_some(())
            .ok_or(ApiError::Fenced { token: fence.token })
    }

    /// Whether `fence` holds, read linearizably here (this node leads the lock's range).
    pub(super) async fn fence_holds_here(
        &self,
        group: &Group,
        fence: &Fence,
    ) -> Result<bool, ApiError> {
        self.read_barrier(group, Consistency::Linearizable).await?;
        let state = group.state.read().expect("range state lock");
        Ok(state.mvcc.fence_holds(fence))
    }

    /// Whether this node, as leader of the lease's owner range, knows lease `id` as live.
    pub(super) async fn lease_alive_here(
        &self,
        group: &Group,
        id: LeaseId,
    ) -> Result<bool, ApiError> {
        self.read_barrier(group, Consistency::Linearizable).await?;
        let state = group.state.read().expect("range state lock");
        Ok(state.mvcc.leases().owns(id))
    }

    /// Serves the lease requests that are not Raft writes: keepalive, time-to-live, status,
    /// list, attached keys. `None` for grant and revoke, which the caller proposes.
    pub(super) async fn serve_lease_read(
        &self,
        group: &Group,
        request: &LeaseRequest,
    ) -> Option<Result<KvResponse, ApiError>> {
        let result = match request {
            LeaseRequest::Grant { .. }
            | LeaseRequest::GrantWithPut { .. }
            | LeaseRequest::Revoke { .. } => return None,
            LeaseRequest::KeepAlive { id } => self.keep_alive(group, *id).await,
            LeaseRequest::KeepAliveMany { ids } => self.keep_alive_many(group, ids).await,
            LeaseRequest::TimeToLive { id } => self.time_to_live(group, *id).await,
            LeaseRequest::Status { id } => {
                self.read_leases(group, |mvcc| LeaseResponse::Status {
                    header: mvcc.header(),
                    id: *id,
                    status: mvcc.leases().status(*id),
                })
                .await
            }
            LeaseRequest::List => {
                self.read_leases(group, |mvcc| LeaseResponse::List {
                    header: mvcc.header(),
                    ids: mvcc.leases().owned().map(|(id, _)| id).collect(),
                })
                .await
            }
            LeaseRequest::AttachedKeys { id } => {
                self.read_leases(group, |mvcc| LeaseResponse::AttachedKeys {
                    header: mvcc.header(),
                    keys: mvcc.leases().attached_keys(*id),
                })
                .await
            }
        };
        Some(result.map(KvResponse::Lease))
    }

    /// Renews lease `id`: answered once the next tick has carried the renewal into the
    /// replicated lease clock and the lease is still there after it (see [`LeaseKeeper`]).
    /// Only a leader sure of its lease (the barrier) takes the renewal.
    async fn keep_alive(&self, group: &Group, id: LeaseId) -> Result<LeaseResponse, ApiError> {
        // The renewal counts from the keepalive's arrival (never later than the client's own
        // idea of it).
        let received = Instant::now();
        self.owned_lease_ttl(group, id).await?;
        let tick = group.keeper.renew_all([(id, received)]);
        self.wait_carried(group, tick).await?;
        let (ttl_ms, _) = self.owned_lease_ttl(group, id).await?;
        Ok(LeaseResponse::KeptAlive { id, ttl_ms })
    }

    /// Waits until tick `tick` of `group` has been applied; `Unavailable` if it was not (the
    /// keepalives it carried are not acknowledged: the client renews again).
    async fn wait_carried(&self, group: &Group, tick: u64) -> Result<(), ApiError> {
        if group.keeper.carried(tick).await {
            return Ok(());
        }
        Err(ApiError::Unavailable {
            range_id: group.id,
            reason: "the lease tick carrying the renewal was not applied".into(),
        })
    }

    /// Renews every lease of `ids` this range owns, with one barrier for all.
    async fn keep_alive_many(
        &self,
        group: &Group,
        ids: &[LeaseId],
    ) -> Result<LeaseResponse, ApiError> {
        let received = Instant::now();
        if let Err(f) = group.raft.as_leader() {
            return Err(not_leader(group.id, f.leader_id));
        }
        self.read_barrier(group, Consistency::Linearizable).await?;
        let known: HashSet<LeaseId> = {
            let state = group.state.read().expect("range state lock");
            let leases = state.mvcc.leases();
            ids.iter().copied().filter(|id| leases.owns(*id)).collect()
        };
        let tick = group
            .keeper
            .renew_all(known.iter().map(|id| (*id, received)));
        // Answered once the renewals are in the replicated clock (see `keep_alive`).
        self.wait_carried(group, tick).await?;
        self.read_barrier(group, Consistency::Linearizable).await?;
        let (mut renewed, mut missing) = (Vec::with_capacity(ids.len()), Vec::new());
        {
            let state = group.state.read().expect("range state lock");
            for id in ids {
                match state.mvcc.leases().time_to_live(*id) {
                    Some((ttl_ms, _)) if known.contains(id) => renewed.push((*id, ttl_ms)),
                    _ => missing.push(*id),
                }
            }
        }
        Ok(LeaseResponse::KeptAliveMany { renewed, missing })
    }

    async fn time_to_live(&self, group: &Group, id: LeaseId) -> Result<LeaseResponse, ApiError> {
        let (granted_ttl_ms, remaining_ms) = self.owned_lease_ttl(group, id).await?;
        Ok(LeaseResponse::TimeToLive {
            header: group.state.read().expect("range state lock").mvcc.header(),
            id,
            granted_ttl_ms,
            remaining_ms: remaining_ms.saturating_sub(group.keeper.since_tick()),
        })
    }

    /// The granted and remaining TTL of lease `id`, read linearizably at the owner's leader.
    async fn owned_lease_ttl(&self, group: &Group, id: LeaseId) -> Result<(u64, u64), ApiError> {
        if let Err(f) = group.raft.as_leader() {
            return Err(not_leader(group.id, f.leader_id));
        }
        self.read_barrier(group, Consistency::Linearizable).await?;
        let state = group.state.read().expect("range state lock");
        state
            .mvcc
            .leases()
            .time_to_live(id)
            .ok_or(ApiError::LeaseNotFound { id })
    }

    /// A linearizable read of the range's lease table.
    async fn read_leases(
        &self,
        group: &Group,
        read: impl FnOnce(&crate::mvcc::Mvcc) -> LeaseResponse,
    ) -> Result<LeaseResponse, ApiError> {
        self.read_barrier(group, Consistency::Linearizable).await?;
        let state = group.state.read().expect("range state lock");
        Ok(read(&state.mvcc))
    }
}

/// The API error for a failed peer call about `range_id`.
fn peer_failure(range_id: RangeId, error: CallError) -> ApiError {
    match error {
        CallError::Remote {
            error: PeerError::NotLeader(hint),
            ..
        } => not_leader(range_id, hint),
        e => ApiError::Unavailable {
            range_id,
            reason: e.to_string(),
        },
    }
}
