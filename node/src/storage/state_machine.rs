//! openraft state machine of one group: the range's [`Mvcc`] in memory, persisted in RocksDB.
//!
//! The in-memory state answers reads; every applied batch is written to the `kv` and `sm`
//! column families in one RocksDB write (unsynced: the log is the durable record, and the
//! shared WAL keeps the order). A restart rebuilds the state from those column families and
//! openraft re-applies the log above the persisted last-applied id.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use futures::{Stream, TryStreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use rocksdb::{Direction, IteratorMode, WriteBatch};

use super::{decode, encode, group_key, to_io, Engine, CF_KV, CF_SM};
use concord_transport::watch::Event;
use tokio::sync::broadcast;

use crate::leases::{LeaseMutation, LeaseTable, OwnedLease};
use crate::mvcc::{Bounds, Lineage, Mutation, Mvcc, Record, Rev, Version};
use crate::raft_types::{
    CommandResult, LogId, SnapshotData, SnapshotMeta, StoredMembership, TypeConfig,
};

const TAG_APPLIED: u8 = 1;
const TAG_MEMBERSHIP: u8 = 2;
const TAG_COUNTERS: u8 = 3;
// Tag 4 held a snapshot's bytes until snapshots were encoded only when sent.
/// The metadata of the last snapshot openraft asked for (built) or installed.
const TAG_SNAPSHOT_META: u8 = 5;
const TAG_LEASE_CLOCK: u8 = 6;
/// `TAG_OWNED_LEASE ++ id` → an owned lease.
const TAG_OWNED_LEASE: u8 = 7;
/// `TAG_REVOKED_LEASE ++ id` → whether other ranges still have to detach it.
const TAG_REVOKED_LEASE: u8 = 8;
/// The range's bounds and lineage (absent until the first split or merge: the bootstrap
/// layout says).
const TAG_BOUNDS: u8 = 9;

/// The log id a range made by a split starts at on every replica: applied, purged and in its
/// first snapshot, never a log entry, so a replica that did not apply the split itself can
/// only catch up by a snapshot. Term 0 at index 5 is no log id a running group ever writes
/// (`initialize` writes index 0; elections start at term 1).
pub fn split_start_log_id() -> LogId {
    use openraft::vote::RaftLeaderIdExt;
    let term_zero = openraft::alias::LeaderIdOf::<TypeConfig>::new_committed(0, 0);
    LogId::new(term_zero, 5)
}

type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotData>;

/// Makes [`StateMachine`] answer snapshot reads with metadata only until dropped (see
/// [`StateMachine::hold_snapshots`]).
#[derive(Debug)]
pub struct SnapshotHold(Arc<AtomicBool>);

impl Drop for SnapshotHold {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Watch events buffered per range (in revisions) before a slow watcher is cancelled.
pub const WATCH_BUFFER_DEFAULT: usize = 1024;

/// The events of one applied revision, as published to the range's watchers.
#[derive(Debug)]
pub struct RevisionEvents {
    /// The revision.
    pub revision: u64,
    /// Its events (each with its previous key-value), in write order.
    pub events: Vec<Event>,
}

/// The applied state of one range, shared between the state machine and the read path.
#[derive(Debug)]
pub struct RangeState {
    /// The key-value data.
    pub mvcc: Mvcc,
    /// The last log id applied.
    pub last_applied: Option<LogId>,
    /// The last membership applied.
    pub membership: StoredMembership,
    /// Publishes every applied revision's events, under the state's write lock: a watcher that
    /// subscribes under the read lock misses nothing after the revision it read. Replaced
    /// (closing every subscription) when a snapshot replaces the state.
    pub events: broadcast::Sender<Arc<RevisionEvents>>,
    /// Capacity of `events`, in revisions.
    pub watch_buffer: usize,
}

impl RangeState {
    /// The metadata of a snapshot of this state.
    fn snapshot_meta(&self) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
        }
    }

    /// Ends every watch channel of the replica: `events` is replaced, so each subscription
    /// sees it closed (after the events already sent) and its client re-plans or resumes.
    pub fn close_watches(&mut self) {
        self.events = broadcast::channel(self.watch_buffer).0;
    }
}

/// The state machine of group `gid`.
#[derive(Clone)]
pub struct StateMachine {
    gid: u64,
    engine: Arc<Engine>,
    state: Arc<RwLock<RangeState>>,
    /// Orders snapshot writes: a build (run concurrently by openraft) must not overwrite a
    /// newer snapshot installed meanwhile.
    snapshot_lock: Arc<tokio::sync::Mutex<()>>,
    /// Whether [`RaftStateMachine::get_current_snapshot`] encodes the state; false while
    /// openraft starts the group (see [`StateMachine::hold_snapshots`]).
    snapshots_served: Arc<AtomicBool>,
    /// Told the ids of ranges this replica must host from now on: split off by an applied
    /// split, or named by an installed snapshot (a split this replica did not apply); told
    /// none after a merge (the node's table changed).
    hosts: Option<tokio::sync::mpsc::UnboundedSender<Vec<u64>>>,
}

/// The row of version `rev` of `key` in range `gid`: `gid ++ rev ++ key`. The key is part of
/// the row's name because a merged range holds versions of two revision sequences, which may
/// share revisions (on different keys).
fn kv_key(gid: u64, rev: Rev, key: &[u8]) -> Vec<u8> {
    let mut suffix = Vec::with_capacity(12 + key.len());
    suffix.extend_from_slice(&rev.main.to_be_bytes());
    suffix.extend_from_slice(&rev.sub.to_be_bytes());
    suffix.extend_from_slice(key);
    group_key(gid, &suffix)
}

fn lease_key(gid: u64, tag: u8, id: i64) -> Vec<u8> {
    let mut suffix = [tag; 9];
    suffix[1..].copy_from_slice(&id.to_be_bytes());
    group_key(gid, &suffix)
}

/// Every `(id, value)` row of group `gid` under lease tag `tag`.
fn scan_lease_rows<T: serde::de::DeserializeOwned>(
    engine: &Engine,
    gid: u64,
    tag: u8,
) -> io::Result<Vec<(i64, T)>> {
    let prefix = group_key(gid, &[tag]);
    let mut rows = Vec::new();
    for item in engine.db().iterator_cf(
        engine.cf(CF_SM),
        IteratorMode::From(&prefix, Direction::Forward),
    ) {
        let (key, value) = item.map_err(to_io)?;
        if !key.starts_with(&prefix) {
            break;
        }
        let id = i64::from_be_bytes(key[9..17].try_into().expect("17-byte lease key"));
        rows.push((id, decode(&value)?));
    }
    Ok(rows)
}

fn parse_kv_key(key: &[u8]) -> Rev {
    Rev {
        main: u64::from_be_bytes(key[8..16].try_into().expect("20-byte kv key")),
        sub: u32::from_be_bytes(key[16..20].try_into().expect("20-byte kv key")),
    }
}

impl StateMachine {
    /// Opens the state machine of group `gid`, rebuilding its state from `engine`; `bootstrap`
    /// is its extent until it first splits.
    pub fn open(engine: Arc<Engine>, gid: u64, bootstrap: Bounds) -> io::Result<Self> {
        let db = engine.db();
        let sm = engine.cf(CF_SM);
        let get = |tag: u8| db.get_cf(sm, group_key(gid, &[tag])).map_err(to_io);
        let last_applied: Option<LogId> =
            get(TAG_APPLIED)?.map(|b| decode(&b)).transpose()?.flatten();
        let membership: StoredMembership = get(TAG_MEMBERSHIP)?
            .map(|b| decode(&b))
            .transpose()?
            .unwrap_or_default();
        let (revision, compact_revision): (u64, u64) = get(TAG_COUNTERS)?
            .map(|b| decode(&b))
            .transpose()?
            .unwrap_or_default();
        let mut versions = Vec::new();
        let start = group_key(gid, &[]);
        for item in db.iterator_cf(
            engine.cf(CF_KV),
            IteratorMode::From(&start, Direction::Forward),
        ) {
            let (key, value) = item.map_err(to_io)?;
            if key[..8] != gid.to_be_bytes() {
                break;
            }
            let (user_key, record): (Vec<u8>, Option<Record>) = decode(&value)?;
            versions.push((
                user_key,
                Version {
                    rev: parse_kv_key(&key),
                    record,
                },
            ));
        }
        let lease_clock: u64 = get(TAG_LEASE_CLOCK)?
            .map(|b| decode(&b))
            .transpose()?
            .unwrap_or_default();
        let leases = LeaseTable::restore(
            lease_clock,
            scan_lease_rows::<OwnedLease>(&engine, gid, TAG_OWNED_LEASE)?,
            scan_lease_rows::<bool>(&engine, gid, TAG_REVOKED_LEASE)?,
        );
        let bounds = get(TAG_BOUNDS)?
            .map(|b| decode(&b))
            .transpose()?
            .unwrap_or((bootstrap, Lineage::default()));
        let mvcc = Mvcc::restore(gid, bounds, revision, compact_revision, versions, leases);
        let state = RangeState {
            mvcc,
            last_applied,
            membership,
            events: broadcast::channel(WATCH_BUFFER_DEFAULT).0,
            watch_buffer: WATCH_BUFFER_DEFAULT,
        };
        Ok(Self {
            gid,
            engine,
            state: Arc::new(RwLock::new(state)),
            snapshot_lock: Default::default(),
            snapshots_served: Arc::new(AtomicBool::new(true)),
            hosts: None,
        })
    }

    /// Until the returned hold is dropped, [`RaftStateMachine::get_current_snapshot`] answers
    /// with the metadata of the current state and no bytes. openraft reads the current
    /// snapshot twice while it starts a group: for its metadata, and to install it if it is
    /// newer than what is applied, which a snapshot of the current state never is. Encoding
    /// the whole range twice at every start would be wasted; the node holds snapshots
    /// around `Raft::new`.
    pub fn hold_snapshots(&self) -> SnapshotHold {
        self.snapshots_served.store(false, Ordering::Release);
        SnapshotHold(self.snapshots_served.clone())
    }

    /// Where to send the ids of ranges this replica must host from now on (see `hosts`).
    pub fn set_hosts(&mut self, hosts: tokio::sync::mpsc::UnboundedSender<Vec<u64>>) {
        self.hosts = Some(hosts);
    }

    fn tell_hosts(&self, ids: Vec<u64>) {
        if let Some(hosts) = &self.hosts {
            // The node is going: nothing to host.
            let _ = hosts.send(ids);
        }
    }

    /// Writes a range's bounds row.
    fn write_bounds(batch: &mut WriteBatch, engine: &Engine, mvcc: &Mvcc) {
        let row = (mvcc.bounds(), mvcc.lineage());
        batch.put_cf(
            engine.cf(CF_SM),
            group_key(mvcc.range_id(), &[TAG_BOUNDS]),
            encode(&row),
        );
    }

    /// Replaces every lease row of range `gid` by `leases`.
    fn rewrite_leases(batch: &mut WriteBatch, engine: &Engine, gid: u64, leases: &LeaseTable) {
        let cf_sm = engine.cf(CF_SM);
        for tag in [TAG_OWNED_LEASE, TAG_REVOKED_LEASE] {
            batch.delete_range_cf(cf_sm, group_key(gid, &[tag]), group_key(gid, &[tag + 1]));
        }
        let put = |batch: &mut WriteBatch, change: &LeaseMutation| {
            write_lease_row(batch, engine, gid, change)
        };
        put(batch, &LeaseMutation::Clock(leases.clock_ms()));
        for (id, lease) in leases.owned() {
            put(batch, &LeaseMutation::Owned(id, Some(*lease)));
        }
        for (id, pending) in leases.revoked() {
            put(batch, &LeaseMutation::Revoked(id, pending));
        }
    }

    /// Persists a split: the new range's versions move from this group's rows to its own,
    /// and the new range gets every row a replica needs to start it (see
    /// [`split_start_log_id`]); this range's bounds and lease rows are rewritten. Where the
    /// new range already has rows here (`hosted`: this replica applies the split late, and
    /// the new range's leader has already filled a replica of it here), those are newer
    /// than the split and stay as they are: only this range's part is written.
    fn write_split(&self, batch: &mut WriteBatch, state: &RangeState, right: &Mvcc, hosted: bool) {
        let engine = &self.engine;
        let cf_kv = engine.cf(CF_KV);
        let new = right.range_id();
        for (key, v) in right.versions() {
            batch.delete_cf(cf_kv, kv_key(self.gid, v.rev, key));
            if !hosted {
                batch.put_cf(cf_kv, kv_key(new, v.rev, key), encode(&(key, &v.record)));
            }
        }
        Self::write_bounds(batch, engine, &state.mvcc);
        Self::rewrite_leases(batch, engine, self.gid, state.mvcc.leases());
        if hosted {
            tracing::info!(
                range = self.gid,
                new_range = new,
                "split applied after the new range's replica here was started: its rows stay"
            );
            return;
        }
        Self::write_bounds(batch, engine, right);
        Self::rewrite_leases(batch, engine, new, right.leases());
        let start = split_start_log_id();
        let membership = StoredMembership::new(Some(start), state.membership.membership().clone());
        write_counter_rows(batch, engine, right, &Some(start), &membership);
        super::log_store::seed_split_log(batch, engine, new, start);
    }

    /// Stores `versions` as rows of this group.
    fn put_versions<'a>(
        &self,
        batch: &mut WriteBatch,
        versions: impl Iterator<Item = (&'a [u8], &'a Version)>,
    ) {
        let cf_kv = self.engine.cf(CF_KV);
        for (key, v) in versions {
            batch.put_cf(
                cf_kv,
                kv_key(self.gid, v.rev, key),
                encode(&(key, &v.record)),
            );
        }
    }

    /// Persists a merge: the versions of the keys taken in (the right range's `right`
    /// extent) become this group's rows, this range's bounds and lease rows are rewritten.
    /// The right range's own rows are dropped with its group, when its replica here is
    /// destroyed.
    fn write_merge(&self, batch: &mut WriteBatch, state: &RangeState, right: &Bounds) {
        self.put_versions(batch, state.mvcc.versions_within(right));
        Self::write_bounds(batch, &self.engine, &state.mvcc);
        Self::rewrite_leases(batch, &self.engine, self.gid, state.mvcc.leases());
    }

    /// Sets how many revisions of events a watcher may fall behind before it is cancelled.
    pub fn set_watch_buffer(&self, revisions: usize) {
        let mut state = self.state.write().expect("range state lock");
        state.watch_buffer = revisions.max(1);
        state.close_watches();
    }

    /// The shared state, for the read path.
    pub fn state(&self) -> Arc<RwLock<RangeState>> {
        self.state.clone()
    }

    fn write_counters(&self, batch: &mut WriteBatch, state: &RangeState) {
        write_counter_rows(
            batch,
            &self.engine,
            &state.mvcc,
            &state.last_applied,
            &state.membership,
        );
    }

    fn write_lease(&self, batch: &mut WriteBatch, change: &LeaseMutation) {
        write_lease_row(batch, &self.engine, self.gid, change)
    }

    /// The log id of the stored snapshot, if any.
    fn stored_snapshot_id(&self) -> io::Result<Option<LogId>> {
        let db = self.engine.db();
        let bytes = db
            .get_cf(
                self.engine.cf(CF_SM),
                group_key(self.gid, &[TAG_SNAPSHOT_META]),
            )
            .map_err(to_io)?;
        Ok(bytes
            .map(|b| decode::<SnapshotMeta>(&b))
            .transpose()?
            .and_then(|m| m.last_log_id))
    }

    fn put_snapshot_meta(&self, batch: &mut WriteBatch, meta: &SnapshotMeta) {
        let sm = self.engine.cf(CF_SM);
        batch.put_cf(sm, group_key(self.gid, &[TAG_SNAPSHOT_META]), encode(meta));
    }
}

/// Persists the applied log id, the membership and the MVCC counters of range
/// `mvcc.range_id()`.
fn write_counter_rows(
    batch: &mut WriteBatch,
    engine: &Engine,
    mvcc: &Mvcc,
    last_applied: &Option<LogId>,
    membership: &StoredMembership,
) {
    let sm = engine.cf(CF_SM);
    let gid = mvcc.range_id();
    batch.put_cf(sm, group_key(gid, &[TAG_APPLIED]), encode(last_applied));
    batch.put_cf(sm, group_key(gid, &[TAG_MEMBERSHIP]), encode(membership));
    let counters = (mvcc.revision(), mvcc.compact_revision());
    batch.put_cf(sm, group_key(gid, &[TAG_COUNTERS]), encode(&counters));
}

/// Persists one lease-table change of range `gid`.
fn write_lease_row(batch: &mut WriteBatch, engine: &Engine, gid: u64, change: &LeaseMutation) {
    let sm = engine.cf(CF_SM);
    match change {
        LeaseMutation::Clock(ms) => {
            batch.put_cf(sm, group_key(gid, &[TAG_LEASE_CLOCK]), encode(ms))
        }
        LeaseMutation::Owned(id, Some(lease)) => {
            batch.put_cf(sm, lease_key(gid, TAG_OWNED_LEASE, *id), encode(lease))
        }
        LeaseMutation::Owned(id, None) => batch.delete_cf(sm, lease_key(gid, TAG_OWNED_LEASE, *id)),
        LeaseMutation::Revoked(id, pending) => {
            batch.put_cf(sm, lease_key(gid, TAG_REVOKED_LEASE, *id), encode(pending))
        }
    }
}

/// Sends the events of the revision an entry just wrote (if any) to the range's watchers.
fn publish_events(state: &RangeState, mutations: &[Mutation]) {
    if state.events.receiver_count() == 0 {
        return;
    }
    let events: Vec<Event> = mutations
        .iter()
        .filter_map(|m| match m {
            Mutation::Put { rev, key, .. } => state.mvcc.event(key, *rev),
            _ => None,
        })
        .collect();
    if !events.is_empty() {
        let revision = state.mvcc.revision();
        // No receiver left since the check: nothing to do.
        let _ = state
            .events
            .send(Arc::new(RevisionEvents { revision, events }));
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;

    /// Records the current state's metadata as the snapshot, without its bytes. The state
    /// is already in RocksDB (every apply writes it), and openraft keeps only a built
    /// snapshot's metadata: to know up to where it may purge the log. The bytes are needed
    /// only when a follower behind the purged log or a new replica is sent a snapshot, and
    /// [`RaftStateMachine::get_current_snapshot`] encodes them then. Encoding every range at
    /// every 100,000 entries, on all its replicas at once, made throughput dip to zero for a
    /// second (docs/benchmarks/analysis.md).
    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let meta = self.state.read().expect("range state lock").snapshot_meta();
        let _order = self.snapshot_lock.lock().await;
        let newer = match (self.stored_snapshot_id()?, meta.last_log_id) {
            (Some(stored), Some(built)) => built.index() > stored.index(),
            (None, _) => true,
            (Some(_), None) => false,
        };
        if newer {
            let mut batch = WriteBatch::default();
            self.put_snapshot_meta(&mut batch, &meta);
            self.engine.write(batch);
        }
        Ok(Snapshot {
            meta,
            snapshot: SnapshotData::default(),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        let state = self.state.read().expect("range state lock");
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        // Gather the batch first: the lock must not be held across an await.
        let mut items = Vec::new();
        while let Some(item) = entries.try_next().await? {
            items.push(item);
        }
        super::crash_point("apply-before");
        let mut batch = WriteBatch::default();
        let mut mutations = Vec::new();
        let mut replies = Vec::new();
        let mut split_into = Vec::new();
        let mut merged = false;
        // Taken at the first split of the batch, released once the batch is written.
        let mut new_rows = None;
        {
            let cf_kv = self.engine.cf(CF_KV);
            // Held across the batch so readers see whole batches (never a torn txn).
            let mut state = self.state.write().expect("range state lock");
            for (entry, responder) in items {
                let log_id = entry.log_id();
                if let Some(applied) = &state.last_applied {
                    assert!(
                        log_id.index() > applied.index(),
                        "applied index went backwards"
                    );
                }
                let result = match entry.payload {
                    EntryPayload::Blank => None,
                    EntryPayload::Normal(cmd) => Some(state.mvcc.apply(&cmd, &mut mutations)),
                    EntryPayload::Membership(m) => {
                        state.membership = StoredMembership::new(Some(log_id), m);
                        None
                    }
                };
                state.last_applied = Some(log_id);
                publish_events(&state, &mutations);
                for m in mutations.drain(..) {
                    match m {
                        Mutation::Put { rev, key, record } => {
                            batch.put_cf(cf_kv, kv_key(self.gid, rev, &key), encode(&(key, record)))
                        }
                        Mutation::Remove { rev, key } => {
                            batch.delete_cf(cf_kv, kv_key(self.gid, rev, &key))
                        }
                        Mutation::Lease(change) => self.write_lease(&mut batch, &change),
                        Mutation::Split(right) => {
                            // Applied in memory, nothing of it on disk yet.
                            super::crash_point("split-apply");
                            new_rows.get_or_insert_with(|| self.engine.lock_new_rows());
                            let hosted = self.engine.has_rows(right.range_id());
                            self.write_split(&mut batch, &state, &right, hosted);
                            split_into.push(right.range_id());
                            // Watchers of the range resume from the route table (their
                            // spans may now reach into the new range).
                            state.close_watches();
                        }
                        Mutation::Frozen => {
                            super::crash_point("freeze-apply");
                            Self::write_bounds(&mut batch, &self.engine, &state.mvcc);
                            // Watchers move on to the merging range (by `StaleEpoch`).
                            state.close_watches();
                        }
                        Mutation::Merge(right) => {
                            super::crash_point("merge-apply");
                            self.write_merge(&mut batch, &state, &right);
                            merged = true;
                            // Watchers re-plan over the range's new extent (by `StaleEpoch`):
                            // the watches of the keys taken in join them on this range, and
                            // no bookmark of the range goes out before they have.
                            state.close_watches();
                        }
                    }
                }
                if let Some(responder) = responder {
                    replies.push((responder, result));
                }
            }
            self.write_counters(&mut batch, &state);
        }
        self.engine.write(batch);
        drop(new_rows);
        if !split_into.is_empty() || merged {
            // On disk, but the new range not started and the node's table not changed.
            super::crash_point("split-or-merge-applied");
            // Ranges to start, or none: the node's table changed either way.
            self.tell_hosts(split_into);
        }
        for (responder, result) in replies {
            let result = result.unwrap_or_else(|| {
                Err(concord_transport::api::ApiError::Internal(
                    "no command".into(),
                ))
            });
            responder.send(CommandResult(result));
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> io::Result<()> {
        super::crash_point("snapshot-install");
        let data = snapshot.into_inner();
        let mut mvcc = tokio::task::spawn_blocking(move || decode::<Mvcc>(&data))
            .await
            .map_err(to_io)??;
        mvcc.rebuild_lease_index();
        assert_eq!(mvcc.range_id(), self.gid, "snapshot of another range");
        let _order = self.snapshot_lock.lock().await;
        let mut batch = WriteBatch::default();
        let (from, to) = super::group_span(self.gid);
        batch.delete_range_cf(self.engine.cf(CF_KV), from, to);
        self.put_versions(&mut batch, mvcc.versions());
        Self::rewrite_leases(&mut batch, &self.engine, self.gid, mvcc.leases());
        Self::write_bounds(&mut batch, &self.engine, &mvcc);
        let split_into = mvcc.split_into();
        let watch_buffer = self.state.read().expect("range state lock").watch_buffer;
        let new_state = RangeState {
            mvcc,
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            events: broadcast::channel(watch_buffer).0,
            watch_buffer,
        };
        self.write_counters(&mut batch, &new_state);
        self.put_snapshot_meta(&mut batch, meta);
        {
            // Not overwritten by a split applied late here (see `write_split`).
            let _new_rows = self.engine.lock_new_rows();
            self.engine.write(batch);
        }
        self.engine.commit().sync().await?;
        *self.state.write().expect("range state lock") = new_state;
        // A split this replica skipped: the node starts the missing ranges empty, and their
        // leaders send them a snapshot.
        self.tell_hosts(split_into);
        Ok(())
    }

    /// A snapshot of the current state (newer than or as new as the last one built: openraft
    /// records the progress of a follower sent it at its metadata, and any state applied
    /// here is committed). Copied under the range's lock, encoded off the async workers.
    /// `None` until a snapshot was first built or installed, as openraft expects of a
    /// group that has purged nothing.
    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        if self.stored_snapshot_id()?.is_none() {
            return Ok(None);
        }
        let (meta, mvcc) = {
            let state = self.state.read().expect("range state lock");
            let meta = state.snapshot_meta();
            if !self.snapshots_served.load(Ordering::Acquire) {
                return Ok(Some(Snapshot {
                    meta,
                    snapshot: SnapshotData::default(),
                }));
            }
            (meta, state.mvcc.clone())
        };
        let data = tokio::task::spawn_blocking(move || encode(&mvcc))
            .await
            .map_err(to_io)?;
        Ok(Some(Snapshot {
            meta,
            snapshot: SnapshotData::new(data),
        }))
    }
}
