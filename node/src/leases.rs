//! The lease state of one range: a pure part of [`crate::mvcc::Mvcc`], no I/O, no clock.
//!
//! **Time.** A range keeps a replicated *lease clock* (milliseconds). Only the range's leader
//! advances it, with `LeaseTick` entries that say how much time passed on the leader since its
//! previous tick; a lease expires when the clock passes its `expires_at`. A new leader resumes
//! from the replicated clock, so a leader change neither expires live leases (a renewal is
//! checkpointed by the next tick) nor hands dead ones a fresh TTL: the time lost in a failover
//! is at most the election plus one tick, and it only ever delays an expiry.
//!
//! **A grant's TTL starts at the first tick after it**, not at the clock value it is applied
//! at: the clock stands still between ticks, and a tick that takes long to commit (a slow
//! quorum, a busy leader) can advance it by seconds at once, time that passed before the
//! grant arrived. Every entry after a tick in the log was proposed after that tick measured
//! its time, so the first tick after a grant measured its time no earlier than the grant
//! arrived (up to the instant between a tick's measurement and its proposal, which the one
//! tick of margin a grant gets covers).
//!
//! **Keepalives** are not Raft entries: the leader collects renewed ids in memory and the next
//! tick carries them, one entry for any number of renewals, each with its age (how long
//! before the tick the keepalive arrived), so a renewal counts from its keepalive, not from
//! the tick; the same entry revokes every lease that expired, so there is no fixed revoke
//! rate. A keepalive is answered only once the tick carrying it is applied and the lease
//! still exists after it, so an acknowledged renewal survives a failover and cannot be
//! overtaken by an expiry already in flight (a keepalive waits about one tick).
//!
//! **Revocation across ranges, in two phases.** The owner range revokes a lease (expiry or
//! explicit); the id stays *pending* while the owner's leader (retrying each tick until done)
//! 1. *fences* it in every other range (`LeaseFence`): from then on that range refuses puts
//!    and fenced txns naming it, but keeps its keys;
//! 2. once every range has fenced it, *detaches* it everywhere (`LeaseDetach` in the others,
//!    `LeaseDetached` in the owner), deleting its keys.
//!
//! So a lease's keys disappear only when no range accepts writes under it any more: a lock
//! holder's key is gone only after every range refuses the holder's fenced writes, and a
//! successor that sees the lock free can never be overtaken by a write of the old holder
//! still in flight. A put checked against a live lease but applied after the fence is
//! refused, so it cannot leave an orphan key either.
//!
//! **Invariants:** a lease id is owned or revoked, never both, and is never granted twice; the
//! attached-key index holds exactly the live keys whose record names the lease.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use concord_transport::api::{ApiError, LeaseId, LeaseStatus};
use serde::{Deserialize, Serialize};

/// The leader ticks the lease clock this often. A grant's TTL gets one tick of margin on top,
/// from the first tick after the grant.
pub const LEASE_TICK_MS: u64 = 250;

/// A lease owned by this range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnedLease {
    /// The TTL it was granted with.
    pub ttl_ms: u64,
    /// The lease clock value at which it expires; `None` from its grant until the first tick
    /// after it, which starts the TTL.
    pub expires_at_ms: Option<u64>,
}

/// A change to persist, produced next to the key-value mutations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseMutation {
    /// The lease clock moved.
    Clock(u64),
    /// An owned lease was granted or renewed (`Some`), or revoked (`None`).
    Owned(LeaseId, Option<OwnedLease>),
    /// The lease is revoked here; `true` while other ranges are still to be told (owner only).
    Revoked(LeaseId, bool),
}

/// The lease state of one range.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseTable {
    clock_ms: u64,
    owned: BTreeMap<LeaseId, OwnedLease>,
    /// Every id revoked here.
    revoked: BTreeSet<LeaseId>,
    /// The revoked ids other ranges have not all fenced and detached yet (owner only): kept
    /// apart so that a tick does not scan every id ever revoked.
    pending: BTreeSet<LeaseId>,
    /// Lease → live keys of this range attached to it. Derived from the key records: not
    /// serialized, rebuilt by [`LeaseTable::attach`] on restore.
    #[serde(skip)]
    attached: HashMap<LeaseId, BTreeSet<Vec<u8>>>,
}

impl LeaseTable {
    /// Rebuilds a table from persisted parts (the attached-key index is filled by `attach`).
    pub fn restore(
        clock_ms: u64,
        owned: impl IntoIterator<Item = (LeaseId, OwnedLease)>,
        revoked: impl IntoIterator<Item = (LeaseId, bool)>,
    ) -> Self {
        let mut table = Self {
            clock_ms,
            owned: owned.into_iter().collect(),
            ..Self::default()
        };
        for (id, pending) in revoked {
            table.revoked.insert(id);
            if pending {
                table.pending.insert(id);
            }
        }
        table
    }

    /// The lease clock.
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms
    }

    /// Owned leases, ascending.
    pub fn owned(&self) -> impl Iterator<Item = (LeaseId, &OwnedLease)> {
        self.owned.iter().map(|(id, l)| (*id, l))
    }

    /// Whether this range owns lease `id`.
    pub fn owns(&self, id: LeaseId) -> bool {
        self.owned.contains_key(&id)
    }

    /// The granted TTL and the time left of an owned lease (the whole TTL until it starts).
    pub fn time_to_live(&self, id: LeaseId) -> Option<(u64, u64)> {
        self.owned.get(&id).map(|l| {
            let left = l
                .expires_at_ms
                .map_or(l.ttl_ms, |at| at.saturating_sub(self.clock_ms));
            (l.ttl_ms, left)
        })
    }

    /// Revoked ids here (every id, with whether it still awaits other ranges' detach).
    pub fn revoked(&self) -> impl Iterator<Item = (LeaseId, bool)> + '_ {
        self.revoked
            .iter()
            .map(|id| (*id, self.pending.contains(id)))
    }

    /// Where lease `id` is in its life, as seen by its owner range.
    pub fn status(&self, id: LeaseId) -> LeaseStatus {
        if self.owned.contains_key(&id) {
            LeaseStatus::Alive
        } else if self.pending.contains(&id) {
            LeaseStatus::Detaching
        } else {
            LeaseStatus::Gone
        }
    }

    /// Revoked leases other ranges have not all detached yet.
    pub fn pending_detach(&self) -> Vec<LeaseId> {
        self.pending.iter().copied().collect()
    }

    /// Whether a put with lease `id` must be refused here.
    pub fn is_revoked(&self, id: LeaseId) -> bool {
        self.revoked.contains(&id)
    }

    /// The live keys of this range attached to `id`.
    pub fn attached_keys(&self, id: LeaseId) -> Vec<Vec<u8>> {
        self.attached
            .get(&id)
            .map(|keys| keys.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Moves `key` from lease `old` to lease `new` in the index (0 = no lease).
    pub fn attach(&mut self, key: &[u8], old: LeaseId, new: LeaseId) {
        if old == new {
            return;
        }
        if old != 0 {
            if let Some(keys) = self.attached.get_mut(&old) {
                keys.remove(key);
                if keys.is_empty() {
                    self.attached.remove(&old);
                }
            }
        }
        if new != 0 {
            self.attached.entry(new).or_default().insert(key.to_vec());
        }
    }

    /// Creates lease `id`; its TTL starts at the next tick.
    pub fn grant(
        &mut self,
        id: LeaseId,
        ttl_ms: u64,
        out: &mut Vec<LeaseMutation>,
    ) -> Result<(), ApiError> {
        if self.owned.contains_key(&id) || self.revoked.contains(&id) {
            return Err(ApiError::LeaseExists { id });
        }
        let lease = OwnedLease {
            ttl_ms,
            expires_at_ms: None,
        };
        self.owned.insert(id, lease);
        out.push(LeaseMutation::Owned(id, Some(lease)));
        Ok(())
    }

    /// Revokes owned leases `ids` (unknown ids are skipped): refused here from now on, pending
    /// until fenced and detached everywhere. Their keys stay until [`LeaseTable::detached`].
    pub fn revoke(&mut self, ids: &[LeaseId], out: &mut Vec<LeaseMutation>) {
        for id in ids {
            if self.owned.remove(id).is_some() {
                out.push(LeaseMutation::Owned(*id, None));
                self.revoked.insert(*id);
                self.pending.insert(*id);
                out.push(LeaseMutation::Revoked(*id, true));
            }
        }
    }

    /// Advances the clock by `advance_ms`, starts the TTL of leases granted since the previous
    /// tick, renews `renewals` (id, milliseconds since its keepalive) for their full TTL from
    /// the keepalive, and revokes what expired. A renewal never shortens a lease. Returns the
    /// expired ids.
    pub fn tick(
        &mut self,
        advance_ms: u64,
        renewals: &[(LeaseId, u64)],
        out: &mut Vec<LeaseMutation>,
    ) -> Vec<LeaseId> {
        if advance_ms > 0 {
            self.clock_ms += advance_ms;
            out.push(LeaseMutation::Clock(self.clock_ms));
        }
        let clock_ms = self.clock_ms;
        for (id, age_ms) in renewals {
            if let Some(lease) = self.owned.get_mut(id) {
                // An unstarted lease gets more below than a renewal would give it.
                let Some(at) = lease.expires_at_ms else {
                    continue;
                };
                let renewed = (clock_ms + lease.ttl_ms).saturating_sub(*age_ms);
                if renewed > at {
                    lease.expires_at_ms = Some(renewed);
                    out.push(LeaseMutation::Owned(*id, Some(*lease)));
                }
            }
        }
        let mut expired = Vec::new();
        for (id, lease) in &mut self.owned {
            match lease.expires_at_ms {
                Some(at) if at <= clock_ms => expired.push(*id),
                Some(_) => {}
                None => {
                    lease.expires_at_ms = Some(clock_ms + lease.ttl_ms + LEASE_TICK_MS);
                    out.push(LeaseMutation::Owned(*id, Some(*lease)));
                }
            }
        }
        self.revoke(&expired, out);
        expired
    }

    /// Another range revoked `ids`: refuse them here from now on (phase 1; the keys stay).
    /// Idempotent.
    pub fn fence(&mut self, ids: &[LeaseId], out: &mut Vec<LeaseMutation>) {
        for id in ids {
            if self.revoked.insert(*id) {
                out.push(LeaseMutation::Revoked(*id, false));
            }
        }
    }

    /// Every range refuses `ids` (phase 2): fence them if not yet, and return the keys of this
    /// range to delete. Idempotent.
    pub fn detach(&mut self, ids: &[LeaseId], out: &mut Vec<LeaseMutation>) -> Vec<Vec<u8>> {
        self.fence(ids, out);
        let mut keys = Vec::new();
        for id in ids {
            keys.extend(self.attached.remove(id).unwrap_or_default());
        }
        keys
    }

    /// Every other range has fenced and detached `ids` (owner only): no longer pending;
    /// returns the owner's own keys of them to delete.
    pub fn detached(&mut self, ids: &[LeaseId], out: &mut Vec<LeaseMutation>) -> Vec<Vec<u8>> {
        let mut keys = Vec::new();
        for id in ids {
            if self.pending.remove(id) {
                out.push(LeaseMutation::Revoked(*id, false));
            }
            if self.revoked.contains(id) {
                keys.extend(self.attached.remove(id).unwrap_or_default());
            }
        }
        keys
    }

    /// A split: hands the owned and pending leases for which `moves` holds (their anchor is
    /// in the new range) to a new table, which it returns. Both keep the clock and every
    /// revoked id (a revoked lease stays refused in both halves). The attached-key indexes
    /// are the caller's to rebuild.
    pub fn split_off(&mut self, moves: impl Fn(LeaseId) -> bool) -> LeaseTable {
        let (gone, kept) = std::mem::take(&mut self.owned)
            .into_iter()
            .partition(|(id, _)| moves(*id));
        self.owned = kept;
        let (pending_gone, pending_kept) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|id| moves(*id));
        self.pending = pending_kept;
        LeaseTable {
            clock_ms: self.clock_ms,
            owned: gone,
            revoked: self.revoked.clone(),
            pending: pending_gone,
            attached: HashMap::new(),
        }
    }

    /// A merge: takes in the table of the right neighbour `right` (whose leases are anchored
    /// in its keys, disjoint from this table's). Its owned leases keep their remaining time:
    /// their deadlines move from its clock to this one. Revoked and pending ids are the
    /// union, so a lease refused in either half stays refused. The attached-key index is the
    /// caller's to rebuild.
    pub fn absorb(&mut self, right: LeaseTable) {
        for (id, mut lease) in right.owned {
            lease.expires_at_ms = lease
                .expires_at_ms
                .map(|at| self.clock_ms + at.saturating_sub(right.clock_ms));
            self.owned.insert(id, lease);
        }
        self.revoked.extend(right.revoked);
        self.pending.extend(right.pending);
        // Owned and revoked stay disjoint: a range fences a lease only after its owner has
        // revoked it.
        self.check_invariants();
    }

    /// Empties the attached-key index (before rebuilding it).
    pub fn clear_attached(&mut self) {
        self.attached.clear();
    }

    /// Crashes on a broken invariant (STYLE.md 6).
    pub fn check_invariants(&self) {
        if cfg!(debug_assertions) {
            for id in self.owned.keys() {
                assert!(
                    !self.revoked.contains(id),
                    "lease {id} is owned and revoked"
                );
            }
            assert!(!self.owned.contains_key(&0) && !self.revoked.contains(&0));
            assert!(
                self.pending.is_subset(&self.revoked),
                "a pending id is revoked"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_expires_when_the_clock_passes_its_ttl() {
        let mut t = LeaseTable::default();
        let out = &mut Vec::new();
        t.grant(7, 1_000, out).unwrap();
        t.attach(b"a", 0, 7);
        // Not started yet: the whole TTL is left, whatever the clock does.
        assert_eq!(t.time_to_live(7), Some((1_000, 1_000)));
        assert_eq!(t.tick(0, &[], out), vec![]);
        assert_eq!(t.tick(999 + LEASE_TICK_MS, &[], out), vec![]);
        assert_eq!(t.time_to_live(7), Some((1_000, 1)));
        assert_eq!(t.tick(1, &[], out), vec![7]);
        assert!(t.is_revoked(7) && !t.owns(7));
        assert_eq!(t.pending_detach(), vec![7]);
        assert_eq!(t.status(7), LeaseStatus::Detaching);
        // The key stays until every range refuses the lease.
        assert_eq!(t.attached_keys(7), vec![b"a".to_vec()]);
        assert_eq!(t.detached(&[7], out), vec![b"a".to_vec()]);
        assert!(t.pending_detach().is_empty() && t.is_revoked(7));
        assert_eq!(t.status(7), LeaseStatus::Gone);
        t.check_invariants();
    }

    #[test]
    fn a_renewal_restarts_the_full_ttl_from_the_tick() {
        let mut t = LeaseTable::default();
        let out = &mut Vec::new();
        t.grant(1, 1_000, out).unwrap();
        t.tick(0, &[], out);
        t.tick(900, &[(1, 0)], out);
        assert_eq!(t.time_to_live(1), Some((1_000, 1_000)));
        assert_eq!(t.tick(999, &[], out), Vec::<LeaseId>::new());
        // A renewal arriving in the tick that would expire the lease keeps it.
        assert_eq!(t.tick(1, &[(1, 0)], out), Vec::<LeaseId>::new());
        // A renewal counts from its keepalive: 300 ms before this tick.
        t.tick(500, &[(1, 300)], out);
        assert_eq!(t.time_to_live(1), Some((1_000, 700)));
        // An older keepalive never shortens the lease.
        t.tick(0, &[(1, 900)], out);
        assert_eq!(t.time_to_live(1), Some((1_000, 700)));
        assert!(t.owns(1));
    }

    /// Regression (campaign seed 20261123, "lease expired early"): a grant applied while the
    /// previous tick was slow to commit took the clock of that tick's start as its own, so the
    /// next tick, counting the time that passed before the grant arrived, expired it seconds
    /// early.
    #[test]
    fn a_lease_granted_while_a_tick_is_slow_keeps_its_full_ttl() {
        let mut t = LeaseTable::default();
        let out = &mut Vec::new();
        // A tick measured the leader's time, then took 2.9 s to commit; the grant arrived
        // just after it committed and the next tick counts those 2.9 s and 0.1 s more.
        t.tick(0, &[], out);
        t.grant(1, 1_000, out).unwrap();
        assert_eq!(t.tick(3_000, &[], out), Vec::<LeaseId>::new());
        assert_eq!(t.time_to_live(1), Some((1_000, 1_000 + LEASE_TICK_MS)));
        // From its first tick on the lease runs out as any other.
        assert_eq!(t.tick(1_000 + LEASE_TICK_MS, &[], out), vec![1]);
    }

    #[test]
    fn a_lease_granted_before_a_failover_starts_at_the_new_leaders_first_tick() {
        let mut t = LeaseTable::default();
        let out = &mut Vec::new();
        t.tick(500, &[], out);
        t.grant(2, 1_000, out).unwrap();
        // The new leader's first tick counts no time (its election is not lease time).
        t.tick(0, &[], out);
        assert_eq!(t.time_to_live(2), Some((1_000, 1_000 + LEASE_TICK_MS)));
        // A renewal in the same tick as the start never shortens it.
        let mut u = LeaseTable::default();
        u.grant(2, 1_000, out).unwrap();
        u.tick(100, &[(2, 0)], out);
        assert_eq!(u.time_to_live(2), Some((1_000, 1_000 + LEASE_TICK_MS)));
    }

    #[test]
    fn ids_are_never_reused() {
        let mut t = LeaseTable::default();
        let out = &mut Vec::new();
        t.grant(3, 1_000, out).unwrap();
        assert_eq!(t.grant(3, 1_000, out), Err(ApiError::LeaseExists { id: 3 }));
        t.revoke(&[3], out);
        assert_eq!(t.grant(3, 1_000, out), Err(ApiError::LeaseExists { id: 3 }));
        t.fence(&[4], out);
        assert_eq!(t.grant(4, 1_000, out), Err(ApiError::LeaseExists { id: 4 }));
    }

    #[test]
    fn a_key_moved_to_another_lease_is_not_deleted_with_the_old_one() {
        let mut t = LeaseTable::default();
        let out = &mut Vec::new();
        t.attach(b"k", 0, 1);
        t.attach(b"j", 0, 1);
        t.attach(b"k", 1, 2);
        // Fencing refuses the lease but keeps its keys; detaching deletes them.
        t.fence(&[1], out);
        assert!(t.is_revoked(1));
        assert_eq!(t.attached_keys(1), vec![b"j".to_vec()]);
        assert_eq!(t.detach(&[1], out), vec![b"j".to_vec()]);
        assert_eq!(t.attached_keys(2), vec![b"k".to_vec()]);
        // Detach is idempotent.
        assert!(t.detach(&[1], out).is_empty());
    }
}
