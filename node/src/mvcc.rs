//! The MVCC key-value state of one range: a pure state machine, no I/O.
//!
//! Modelled on etcd's mvcc: every write bumps the range's *revision*; each key keeps its
//! history of versions `(revision, value | tombstone)`; a read at revision R sees, per key, the
//! newest version at or below R. Applying a command returns its response and appends the
//! [`Mutation`]s that the storage shell persists in the same write as the applied log index
//! (STYLE.md 1: a pure core, an I/O shell).
//!
//! **Invariant:** the revision only grows, and every version's revision is at most the
//! range's revision; histories are sorted by revision. Checked on every write.
//!
//! A write at revision R may produce several versions (a txn, a multi-key delete); they share
//! the main revision R and are told apart by a sub-revision, as in etcd.
//!
//! **Bounds.** A range holds the keys of `[start, end)` at an *epoch* ([`Bounds`]). A split
//! ([`Command::Split`]) hands the keys from the split key on, with their whole history and the
//! leases anchored there, to a new range, and bumps both halves' epoch; both keep the range's
//! revision, so a key's revisions never go backwards across a split. A command is applied
//! only if every key it names is inside the bounds *when it applies*: one proposed before a
//! split and applied after it is refused with `StaleEpoch` (the client retries it at the right
//! range), never applied to keys the range no longer holds. The lease commands that reach a
//! range's keys without naming them (`LeaseFence`, `LeaseDetach`, `LeaseDetached`) name the
//! epoch they were made for instead, and a range at another epoch refuses them the same way:
//! the owner of a lease sends them to every range of its table, and a range that split since
//! would otherwise apply them to half the keys the owner meant, passing the other half over.
//!
//! **Merges**, in two steps on two logs. The right range is *frozen* ([`Command::Freeze`]):
//! from that entry on it refuses every command (reads too, on the node) with `StaleEpoch`, so
//! its state is final. Its left neighbour then applies [`Command::Merge`], which carries that
//! whole final state: the left range takes the keys with their histories, the leases (their
//! deadlines moved to its own lease clock) and the bounds, at an epoch above both, and its
//! revision becomes the higher of the two, so every later write is above every version of
//! either side and a key's revisions never go backwards across a merge either. The merge is
//! refused unless the right range's state says it was frozen into this range and this range
//! still ends where it starts; a frozen range whose merge never came can be frozen into the
//! range that ends there now (the only one that can merge it).

use std::collections::BTreeMap;
use std::ops::Bound;

use concord_placement::{interval_within, key_within};
use concord_transport::api::{
    ApiError, CompactResponse, Compare, CompareOp, CompareTarget, DeleteRequest, DeleteResponse,
    Fence, KeySpan, KeyValue, KvResponse, LeaseId, LeaseResponse, MergeResponse, PutRequest,
    PutResponse, RangeId, RangeRequest, RangeResponse, ResponseHeader, SplitResponse, TxnOp,
    TxnOpResponse, TxnRequest, TxnResponse,
};
use concord_transport::lease::lease_anchor;
use concord_transport::watch::{Event, EventKind};
use serde::{Deserialize, Serialize};

use crate::leases::{LeaseMutation, LeaseTable};

/// A write command replicated through a range's Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Put one key.
    Put(PutRequest),
    /// Delete a key, prefix or interval (clipped to the range by the node).
    Delete(DeleteRequest),
    /// Compare-and-swap transaction.
    Txn(TxnRequest),
    /// A txn with a [`Fence`](concord_transport::api::Fence): refused unless the fence's
    /// lease is live here and, when the lock's keys are in this range (`holder_here`), the
    /// token is the lowest live key under the lock prefix. When they are in another range,
    /// the node checked the holder there before proposing.
    FencedTxn {
        /// The txn (its `fence` is set).
        txn: TxnRequest,
        /// Whether the lock prefix lies in this range.
        holder_here: bool,
    },
    /// Compact revisions older than `revision`.
    Compact {
        /// The compaction point (capped at the range's revision).
        revision: u64,
    },
    /// Create a lease owned by this range.
    LeaseGrant {
        /// The lease.
        id: LeaseId,
        /// Its TTL.
        ttl_ms: u64,
    },
    /// Revoke an owned lease now.
    LeaseRevoke {
        /// The lease.
        id: LeaseId,
    },
    /// The leader's lease tick: advance the lease clock, renew, expire (see `leases`).
    LeaseTick {
        /// Time passed on the leader since its previous tick.
        advance_ms: u64,
        /// Leases kept alive since the previous tick, each with the milliseconds between its
        /// keepalive and the tick.
        renewals: Vec<(LeaseId, u64)>,
    },
    /// Leases revoked by their owner range, phase 1: refuse them here from now on (their keys
    /// stay until the detach).
    LeaseFence {
        /// The leases.
        ids: Vec<LeaseId>,
        /// The epoch of the extent the owner sent it to: refused (`StaleEpoch`) by a range
        /// whose extent changed since, so that no part of the keyspace is passed over.
        epoch: u64,
    },
    /// Leases revoked by their owner range and fenced in every range, phase 2: delete their
    /// keys here (and refuse them, if not yet).
    LeaseDetach {
        /// The leases.
        ids: Vec<LeaseId>,
        /// The epoch of the extent the owner sent it to (as in `LeaseFence`).
        epoch: u64,
    },
    /// Every other range has fenced and detached these leases (owner range only): delete
    /// the owner's own keys of them; they are no longer pending.
    LeaseDetached {
        /// The leases.
        ids: Vec<LeaseId>,
        /// The epoch of the owner's extent when the others were detached (as in
        /// `LeaseFence`): a split of the owner since then hands keys to a range not yet told.
        epoch: u64,
    },
    /// Split the range at `at` (strictly inside it): the keys from `at` on, and the leases
    /// anchored there, move to range `new_range` (see the module docs).
    Split {
        /// The first key of the new range.
        #[serde(with = "serde_bytes")]
        at: Vec<u8>,
        /// The new range's id (allocated by the placement group, never reused).
        new_range: RangeId,
    },
    /// Freeze the range for a merge into its left neighbour `into` (see the module docs).
    Freeze {
        /// The range that will merge this one.
        into: RangeId,
    },
    /// Merge the frozen right neighbour, whose final state this is (see the module docs).
    Merge {
        /// The right neighbour's state as of its freeze.
        right: Box<Mvcc>,
    },
    /// Create a lease owned by this range and put a key attached to it, at one revision: an
    /// ephemeral key in one entry. The key and the lease's anchor both lie in the range;
    /// `put.lease` is `id`. A refused grant (the id was used) applies nothing.
    LeaseGrantPut {
        /// The lease.
        id: LeaseId,
        /// Its TTL.
        ttl_ms: u64,
        /// The key put with it.
        put: PutRequest,
    },
}

impl Command {
    /// The first key a client write names (the key a load split weighs it by); `None` for
    /// the node's own commands.
    pub fn first_key(&self) -> Option<&[u8]> {
        match self {
            Self::Put(p) | Self::LeaseGrantPut { put: p, .. } => Some(&p.key),
            Self::Delete(d) => Some(&d.span.key),
            Self::Txn(t) | Self::FencedTxn { txn: t, .. } => txn_first_key(t),
            _ => None,
        }
    }
}

/// The first key a txn names: its first compare's, or else its first operation's.
fn txn_first_key(t: &TxnRequest) -> Option<&[u8]> {
    if let Some(c) = t.compares.first() {
        return Some(&c.key);
    }
    t.success
        .iter()
        .chain(&t.failure)
        .next()
        .map(|op| match op {
            TxnOp::Put(p) => p.key.as_slice(),
            TxnOp::Range(r) => r.span.key.as_slice(),
            TxnOp::Delete(d) => d.span.key.as_slice(),
        })
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match self {
            Self::Put(p) => write!(f, "put {:?} ({} bytes)", text(&p.key), p.value.len()),
            Self::Delete(d) => write!(
                f,
                "delete {:?}..{:?}",
                text(&d.span.key),
                d.span.end.as_deref().map(text)
            ),
            Self::Txn(t) => write!(f, "txn ({} ops)", t.op_count()),
            Self::FencedTxn { txn, .. } => write!(f, "fenced txn ({} ops)", txn.op_count()),
            Self::Compact { revision } => write!(f, "compact {revision}"),
            Self::LeaseGrant { id, ttl_ms } => write!(f, "lease grant {id} ({ttl_ms} ms)"),
            Self::LeaseGrantPut { id, ttl_ms, put } => write!(
                f,
                "lease grant {id} ({ttl_ms} ms) with put {:?} ({} bytes)",
                text(&put.key),
                put.value.len()
            ),
            Self::LeaseRevoke { id } => write!(f, "lease revoke {id}"),
            Self::LeaseTick {
                advance_ms,
                renewals,
            } => write!(
                f,
                "lease tick +{advance_ms} ms ({} renewals)",
                renewals.len()
            ),
            Self::LeaseFence { ids, .. } => write!(f, "lease fence ({} leases)", ids.len()),
            Self::LeaseDetach { ids, .. } => write!(f, "lease detach ({} leases)", ids.len()),
            Self::LeaseDetached { ids, .. } => write!(f, "lease detached ({} leases)", ids.len()),
            Self::Split { at, new_range } => {
                write!(f, "split at {:?} into range {new_range}", text(at))
            }
            Self::Freeze { into } => write!(f, "freeze for a merge into range {into}"),
            Self::Merge { right } => write!(f, "merge range {}", right.range_id),
        }
    }
}

/// Position of a version: the write's main revision and its index within that write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Rev {
    /// The range revision of the write.
    pub main: u64,
    /// Index of this version within the write.
    pub sub: u32,
}

/// A live value of a key at some revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The value.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Revision at which this incarnation of the key was created.
    pub create_revision: u64,
    /// Modifications since creation.
    pub version: u64,
    /// Attached lease, 0 for none.
    pub lease: i64,
}

/// One version in a key's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// When it was written.
    pub rev: Rev,
    /// The value, or `None` for a deletion (tombstone).
    pub record: Option<Record>,
}

/// A change for the storage shell to persist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// Store version `rev` of `key`.
    Put {
        /// Version position.
        rev: Rev,
        /// The key.
        key: Vec<u8>,
        /// The value, or `None` for a tombstone.
        record: Option<Record>,
    },
    /// Forget version `rev` of `key` (compaction).
    Remove {
        /// Version position.
        rev: Rev,
        /// The key.
        key: Vec<u8>,
    },
    /// A change to the lease table.
    Lease(LeaseMutation),
    /// A split: the new range's whole state (its versions left this range; the shell moves
    /// them, and rewrites this range's bounds and lease table).
    Split(Box<Mvcc>),
    /// The range froze for a merge: its bounds row changed and its watchers must move on.
    Frozen,
    /// A merge took in the right neighbour with these bounds: the versions of its keys are now
    /// this range's (the shell stores them as this range's rows, and rewrites this range's
    /// bounds and lease table).
    Merge(Bounds),
}

/// Where a range's keys went and came from: the ranges split off it, the range it is frozen
/// into for a merge, and the ranges merged into it. Persisted with the bounds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    /// The ranges split off this one, oldest first: a replica that catches up by a snapshot
    /// taken after a split learns from it which ranges it must now also host.
    pub split_into: Vec<RangeId>,
    /// Set by a freeze: the range that will merge this one. A frozen range serves nothing.
    pub frozen_into: Option<RangeId>,
    /// The ranges merged into this one, oldest first (never hosted again).
    pub merged_from: Vec<RangeId>,
}

/// The keys a range holds, `[start, end)` (an empty `end` is unbounded), and the epoch of that
/// extent: bumped by every split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bounds {
    /// First key, inclusive.
    #[serde(with = "serde_bytes")]
    pub start: Vec<u8>,
    /// First key after the range, exclusive; empty means unbounded.
    #[serde(with = "serde_bytes")]
    pub end: Vec<u8>,
    /// Bumped by every split.
    pub epoch: u64,
}

impl Default for Bounds {
    /// The whole keyspace at epoch 1.
    fn default() -> Self {
        Self {
            start: Vec::new(),
            end: Vec::new(),
            epoch: 1,
        }
    }
}

impl Bounds {
    /// Whether `key` is inside.
    pub fn contains(&self, key: &[u8]) -> bool {
        key_within(key, &self.start, &self.end)
    }

    /// Whether every key of `span` is inside.
    pub fn contains_span(&self, span: &KeySpan) -> bool {
        let (from, to) = span.bounds();
        interval_within(&from, &to, &self.start, &self.end)
    }

    /// The error for a request to range `range_id` made for another extent.
    pub fn stale(&self, range_id: RangeId) -> ApiError {
        ApiError::StaleEpoch {
            range_id,
            current_epoch: self.epoch,
        }
    }

    /// `StaleEpoch` for range `range_id` unless `epoch` is this extent's.
    pub fn check_epoch(&self, range_id: RangeId, epoch: u64) -> Result<(), ApiError> {
        if epoch != self.epoch {
            return Err(self.stale(range_id));
        }
        Ok(())
    }

    /// Whether `key` may split the range: inside and not its first key.
    pub fn splits_at(&self, key: &[u8]) -> bool {
        self.contains(key) && key > self.start.as_slice()
    }
}

/// The MVCC state of one range.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mvcc {
    range_id: RangeId,
    bounds: Bounds,
    lineage: Lineage,
    revision: u64,
    compact_revision: u64,
    /// Key → its versions, oldest first. A key whose history is empty is removed.
    index: BTreeMap<Vec<u8>, Vec<Version>>,
    /// Leases owned or revoked here, and the keys attached to each.
    leases: LeaseTable,
}

fn kv(key: &[u8], rev: Rev, record: &Record, keys_only: bool) -> KeyValue {
    KeyValue {
        key: key.to_vec(),
        value: if keys_only {
            Vec::new()
        } else {
            record.value.clone()
        },
        create_revision: record.create_revision,
        mod_revision: rev.main,
        version: record.version,
        lease: record.lease,
    }
}

/// The watch event of version `at` of `key`'s `history`, with the version before it (if
/// live and still stored) as `prev_kv`.
fn event_of(key: &[u8], history: &[Version], at: usize) -> Event {
    let prev_kv = at.checked_sub(1).and_then(|i| {
        history[i]
            .record
            .as_ref()
            .map(|r| kv(key, history[i].rev, r, false))
    });
    let rev = history[at].rev;
    match &history[at].record {
        Some(record) => Event {
            kind: EventKind::Put,
            kv: kv(key, rev, record, false),
            prev_kv,
        },
        None => Event {
            kind: EventKind::Delete,
            kv: KeyValue {
                key: key.to_vec(),
                value: Vec::new(),
                create_revision: 0,
                mod_revision: rev.main,
                version: 0,
                lease: 0,
            },
            prev_kv,
        },
    }
}

fn span_bounds(span: &KeySpan) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    match &span.end {
        None => (
            Bound::Included(span.key.clone()),
            Bound::Included(span.key.clone()),
        ),
        Some(end) if end.is_empty() => (Bound::Included(span.key.clone()), Bound::Unbounded),
        Some(end) => (
            Bound::Included(span.key.clone()),
            Bound::Excluded(end.clone()),
        ),
    }
}

/// The state of a write in progress: its revision and the next sub-revision.
struct WriteCursor {
    main: u64,
    sub: u32,
}

impl WriteCursor {
    fn next(&mut self) -> Rev {
        let rev = Rev {
            main: self.main,
            sub: self.sub,
        };
        self.sub += 1;
        rev
    }
}

impl Mvcc {
    /// An empty range state.
    pub fn new(range_id: RangeId) -> Self {
        Self {
            range_id,
            ..Self::default()
        }
    }

    /// Rebuilds a range from persisted versions (in any order), its persisted counters and
    /// its lease table.
    pub fn restore(
        range_id: RangeId,
        (bounds, lineage): (Bounds, Lineage),
        revision: u64,
        compact_revision: u64,
        versions: impl IntoIterator<Item = (Vec<u8>, Version)>,
        leases: LeaseTable,
    ) -> Self {
        let mut index: BTreeMap<Vec<u8>, Vec<Version>> = BTreeMap::new();
        for (key, v) in versions {
            index.entry(key).or_default().push(v);
        }
        for history in index.values_mut() {
            history.sort_by_key(|v| v.rev);
        }
        let mut mvcc = Self {
            range_id,
            bounds,
            lineage,
            revision,
            compact_revision,
            index,
            leases,
        };
        mvcc.rebuild_lease_index();
        mvcc.check_invariants();
        mvcc
    }

    /// Fills the attached-key index of the lease table from the live records (after a
    /// restore or a snapshot install: the index is derived, never persisted).
    pub fn rebuild_lease_index(&mut self) {
        let live: Vec<(Vec<u8>, LeaseId)> = self
            .index
            .iter()
            .filter_map(|(k, h)| {
                let record = h.last()?.record.as_ref()?;
                (record.lease != 0).then(|| (k.clone(), record.lease))
            })
            .collect();
        for (key, lease) in live {
            self.leases.attach(&key, 0, lease);
        }
    }

    /// The lease table.
    pub fn leases(&self) -> &LeaseTable {
        &self.leases
    }

    /// The response header of this range at its current revision.
    pub fn header(&self) -> ResponseHeader {
        ResponseHeader {
            range_id: self.range_id,
            revision: self.revision,
        }
    }

    /// The range this state belongs to.
    pub fn range_id(&self) -> RangeId {
        self.range_id
    }

    /// The keys the range holds, and their epoch.
    pub fn bounds(&self) -> &Bounds {
        &self.bounds
    }

    /// Where the range's keys went and came from.
    pub fn lineage(&self) -> &Lineage {
        &self.lineage
    }

    /// The ranges split off this one (oldest first) that a replica of it must host: not
    /// those merged back since.
    pub fn split_into(&self) -> Vec<RangeId> {
        let merged = &self.lineage.merged_from;
        let live = self.lineage.split_into.iter();
        live.filter(|id| !merged.contains(id)).copied().collect()
    }

    /// Whether the range froze for a merge (it serves nothing from then on).
    pub fn frozen(&self) -> bool {
        self.lineage.frozen_into.is_some()
    }

    /// `StaleEpoch` unless this range serves requests made for its extent at `epoch`: the
    /// epoch is current and the range is not frozen.
    pub fn check_epoch(&self, epoch: u64) -> Result<(), ApiError> {
        self.check_not_frozen()?;
        self.bounds.check_epoch(self.range_id, epoch)
    }

    /// `Merging` if the range froze for a merge: it serves nothing, and its clients wait for
    /// the merge rather than give up (see [`ApiError::Merging`]).
    fn check_not_frozen(&self) -> Result<(), ApiError> {
        match self.lineage.frozen_into {
            Some(into) => Err(ApiError::Merging {
                range_id: self.range_id,
                into,
            }),
            None => Ok(()),
        }
    }

    /// Whether every key `cmd` names lies inside the bounds, and a command made for one
    /// extent was made for this one (see the module docs).
    fn names_keys_inside(&self, cmd: &Command) -> bool {
        let b = &self.bounds;
        match cmd {
            Command::Put(p) => b.contains(&p.key),
            Command::Delete(d) => b.contains_span(&d.span),
            Command::Txn(txn) => txn.spans().iter().all(|s| b.contains_span(s)),
            // A holder checked here must still be here: its lock's keys may have moved.
            Command::FencedTxn { txn, holder_here } => {
                let fence = txn.fence.as_ref().expect("a fenced txn has a fence");
                txn.spans().iter().all(|s| b.contains_span(s))
                    && (!holder_here || b.contains_span(&KeySpan::prefix(fence.prefix.clone())))
            }
            Command::LeaseGrant { id, .. } | Command::LeaseRevoke { id } => {
                b.contains(&lease_anchor(*id))
            }
            Command::LeaseGrantPut { id, put, .. } => {
                b.contains(&lease_anchor(*id)) && b.contains(&put.key)
            }
            Command::Split { at, .. } => b.contains(at),
            Command::Freeze { .. } | Command::Merge { .. } => true,
            // Made for one extent: the keys they reach are those of that extent.
            Command::LeaseFence { epoch, .. }
            | Command::LeaseDetach { epoch, .. }
            | Command::LeaseDetached { epoch, .. } => *epoch == b.epoch,
            Command::Compact { .. } | Command::LeaseTick { .. } => true,
        }
    }

    /// Hands the keys from `at` on (with their history) and the leases anchored there to a
    /// new range `new_range`, which it returns; both halves get the next epoch.
    fn split_off(&mut self, at: &[u8], new_range: RangeId) -> Mvcc {
        let epoch = self.bounds.epoch + 1;
        let right_bounds = Bounds {
            start: at.to_vec(),
            end: std::mem::take(&mut self.bounds.end),
            epoch,
        };
        self.bounds.end = at.to_vec();
        self.bounds.epoch = epoch;
        let index = self.index.split_off(at);
        let leases = self
            .leases
            .split_off(|id| right_bounds.contains(&lease_anchor(id)));
        self.lineage.split_into.push(new_range);
        let mut right = Mvcc {
            range_id: new_range,
            bounds: right_bounds,
            lineage: Lineage::default(),
            revision: self.revision,
            compact_revision: self.compact_revision,
            index,
            leases,
        };
        self.leases.clear_attached();
        self.rebuild_lease_index();
        right.rebuild_lease_index();
        right.check_invariants();
        right
    }

    /// Takes in the frozen right neighbour `right` (see the module docs).
    fn absorb(&mut self, right: Mvcc) {
        self.bounds.end = right.bounds.end;
        self.bounds.epoch = self.bounds.epoch.max(right.bounds.epoch) + 1;
        self.revision = self.revision.max(right.revision);
        self.compact_revision = self.compact_revision.max(right.compact_revision);
        self.index.extend(right.index);
        self.leases.absorb(right.leases);
        self.lineage.merged_from.push(right.range_id);
        self.leases.clear_attached();
        self.rebuild_lease_index();
    }

    /// The range's current revision.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The oldest revision still readable.
    pub fn compact_revision(&self) -> u64 {
        self.compact_revision
    }

    /// Number of keys with any history (live or tombstoned).
    pub fn key_count(&self) -> usize {
        self.index.len()
    }

    /// Bytes of every stored key and value (each key counted once per version), the size
    /// a split threshold is measured against. Walks the whole index.
    pub fn stored_bytes(&self) -> u64 {
        self.index
            .iter()
            .map(|(k, h)| {
                h.iter()
                    .map(|v| (k.len() + v.record.as_ref().map_or(0, |r| r.value.len())) as u64)
                    .sum::<u64>()
            })
            .sum()
    }

    /// The key that halves the range's key count, if it has at least two keys (so it is never
    /// the range's first key).
    pub fn middle_key(&self) -> Option<Vec<u8>> {
        if self.index.len() < 2 {
            return None;
        }
        self.index.keys().nth(self.index.len() / 2).cloned()
    }

    /// Every stored version, for snapshots and tests.
    pub fn versions(&self) -> impl Iterator<Item = (&[u8], &Version)> {
        self.versions_within(&Bounds::default())
    }

    /// The stored versions of the keys within `bounds`' extent.
    pub fn versions_within(&self, bounds: &Bounds) -> impl Iterator<Item = (&[u8], &Version)> {
        let extent = KeySpan::interval(bounds.start.clone(), bounds.end.clone());
        self.index
            .range(span_bounds(&extent))
            .flat_map(|(k, h)| h.iter().map(move |v| (k.as_slice(), v)))
    }

    /// Crashes on a broken invariant (STYLE.md 6); cheap enough for debug builds only.
    fn check_invariants(&self) {
        if cfg!(debug_assertions) {
            assert!(
                self.compact_revision <= self.revision,
                "compact revision above revision"
            );
            for (key, history) in &self.index {
                assert!(!history.is_empty(), "empty history for {key:?}");
                assert!(
                    history.windows(2).all(|w| w[0].rev < w[1].rev),
                    "history of {key:?} not sorted"
                );
                assert!(
                    history.last().expect("non-empty").rev.main <= self.revision,
                    "version above revision"
                );
                assert!(self.bounds.contains(key), "{key:?} outside the range");
            }
            self.leases.check_invariants();
        }
    }

    /// The live record of `key` at revision `at`, with its revision.
    fn live_at(&self, key: &[u8], at: u64) -> Option<(Rev, &Record)> {
        let history = self.index.get(key)?;
        let v = history.iter().rev().find(|v| v.rev.main <= at)?;
        v.record.as_ref().map(|r| (v.rev, r))
    }

    /// The watch event of version `rev` of `key` (with the version before it as `prev_kv`,
    /// unless compacted away). `None` if that version is not (or no longer) stored.
    pub fn event(&self, key: &[u8], rev: Rev) -> Option<Event> {
        let history = self.index.get(key)?;
        let at = history.binary_search_by_key(&rev, |v| v.rev).ok()?;
        Some(event_of(key, history, at))
    }

    /// The events of `span` at revisions `from..=` the current one, grouped by revision in
    /// ascending order (for a watch starting in the past). `from` must be above the compact
    /// revision: older history is incomplete.
    pub fn history(&self, span: &KeySpan, from: u64) -> Vec<(u64, Vec<Event>)> {
        let mut events: Vec<(Rev, Event)> = self
            .index
            .range(span_bounds(span))
            .flat_map(|(k, h)| {
                let first = h.partition_point(|v| v.rev.main < from);
                (first..h.len()).map(move |at| (h[at].rev, event_of(k, h, at)))
            })
            .collect();
        events.sort_unstable_by_key(|(rev, _)| *rev);
        let mut out: Vec<(u64, Vec<Event>)> = Vec::new();
        for (rev, event) in events {
            match out.last_mut() {
                Some((main, batch)) if *main == rev.main => batch.push(event),
                _ => out.push((rev.main, vec![event])),
            }
        }
        out
    }

    /// Reads `req` at its revision (0 = latest).
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, ApiError> {
        let at = if req.revision == 0 {
            self.revision
        } else {
            req.revision
        };
        if at > self.revision {
            return Err(ApiError::FutureRevision {
                revision: at,
                current: self.revision,
            });
        }
        if at < self.compact_revision {
            return Err(ApiError::Compacted {
                compact_revision: self.compact_revision,
            });
        }
        Ok(self.range_at(req, at))
    }

    fn range_at(&self, req: &RangeRequest, at: u64) -> RangeResponse {
        let matches = self
            .index
            .range(span_bounds(&req.span))
            .filter_map(|(k, _)| self.live_at(k, at).map(|(rev, rec)| (k, rev, rec)));
        let matched: Vec<_> = if req.descending {
            matches.collect::<Vec<_>>().into_iter().rev().collect()
        } else {
            matches.collect()
        };
        let count = matched.len() as u64;
        let limit = if req.limit == 0 {
            usize::MAX
        } else {
            req.limit as usize
        };
        let kvs = if req.count_only {
            Vec::new()
        } else {
            matched
                .iter()
                .take(limit)
                .map(|(k, rev, rec)| kv(k, *rev, rec, req.keys_only))
                .collect()
        };
        RangeResponse {
            header: self.header(),
            kvs,
            count,
            more: count > limit as u64,
        }
    }

    fn put_at(
        &mut self,
        cursor: &mut WriteCursor,
        put: &PutRequest,
        out: &mut Vec<Mutation>,
    ) -> PutResponse {
        let prev = self
            .live_at(&put.key, u64::MAX)
            .map(|(rev, rec)| (rev, rec.clone()));
        let record = Record {
            value: put.value.clone(),
            create_revision: prev
                .as_ref()
                .map_or(cursor.main, |(_, r)| r.create_revision),
            version: prev.as_ref().map_or(1, |(_, r)| r.version + 1),
            lease: put.lease,
        };
        let rev = cursor.next();
        let old_lease = prev.as_ref().map_or(0, |(_, r)| r.lease);
        self.leases.attach(&put.key, old_lease, put.lease);
        out.push(Mutation::Put {
            rev,
            key: put.key.clone(),
            record: Some(record.clone()),
        });
        self.index
            .entry(put.key.clone())
            .or_default()
            .push(Version {
                rev,
                record: Some(record),
            });
        PutResponse {
            header: ResponseHeader {
                range_id: self.range_id,
                revision: cursor.main,
            },
            prev_kv: if put.prev_kv {
                prev.map(|(rev, r)| kv(&put.key, rev, &r, false))
            } else {
                None
            },
        }
    }

    fn delete_at(
        &mut self,
        cursor: &mut WriteCursor,
        del: &DeleteRequest,
        out: &mut Vec<Mutation>,
    ) -> DeleteResponse {
        let live: Vec<(Vec<u8>, KeyValue)> = self
            .index
            .range(span_bounds(&del.span))
            .filter_map(|(k, _)| {
                self.live_at(k, u64::MAX)
                    .map(|(rev, rec)| (k.clone(), kv(k, rev, rec, false)))
            })
            .collect();
        for (key, kv) in &live {
            self.leases.attach(key, kv.lease, 0);
            self.tombstone(cursor, key, out);
        }
        DeleteResponse {
            header: ResponseHeader {
                range_id: self.range_id,
                revision: cursor.main,
            },
            deleted: live.len() as u64,
            prev_kvs: if del.prev_kv {
                live.into_iter().map(|(_, kv)| kv).collect()
            } else {
                Vec::new()
            },
        }
    }

    fn compare_holds(&self, c: &Compare) -> bool {
        let live = self.live_at(&c.key, u64::MAX);
        let ord = match &c.target {
            // An absent key has no value: every value compare fails, as in etcd.
            CompareTarget::Value(v) => match live {
                Some((_, r)) => r.value.as_slice().cmp(v.as_slice()),
                None => return false,
            },
            CompareTarget::Version(n) => live.map_or(0, |(_, r)| r.version).cmp(n),
            CompareTarget::CreateRevision(n) => live.map_or(0, |(_, r)| r.create_revision).cmp(n),
            CompareTarget::ModRevision(n) => live.map_or(0, |(rev, _)| rev.main).cmp(n),
        };
        match c.op {
            CompareOp::Equal => ord.is_eq(),
            CompareOp::NotEqual => ord.is_ne(),
            CompareOp::Less => ord.is_lt(),
            CompareOp::Greater => ord.is_gt(),
        }
    }

    /// Applies a replicated command. Deterministic: every replica computes the same response
    /// and mutations. A refused command (e.g. compaction of the future) changes nothing.
    pub fn apply(
        &mut self,
        cmd: &Command,
        out: &mut Vec<Mutation>,
    ) -> Result<KvResponse, ApiError> {
        let before = self.revision;
        let refreeze = matches!(cmd, Command::Freeze { .. });
        if !refreeze {
            self.check_not_frozen()?;
        }
        if !self.names_keys_inside(cmd) {
            return Err(self.bounds.stale(self.range_id));
        }
        let mut cursor = WriteCursor {
            main: self.revision + 1,
            sub: 0,
        };
        let response = match cmd {
            Command::Put(put) => {
                self.check_lease(put.lease)?;
                KvResponse::Put(self.put_at(&mut cursor, put, out))
            }
            Command::Delete(del) => KvResponse::Delete(self.delete_at(&mut cursor, del, out)),
            Command::Txn(txn) => KvResponse::Txn(self.txn(&mut cursor, txn, out)?),
            Command::FencedTxn { txn, holder_here } => {
                let fence = txn.fence.as_ref().expect("a fenced txn has a fence");
                let lease_live = !self.leases.is_revoked(fence.lease);
                let holds = !*holder_here || self.fence_holds(fence);
                if !(lease_live && holds) {
                    return Err(ApiError::Fenced { token: fence.token });
                }
                KvResponse::Txn(self.txn(&mut cursor, txn, out)?)
            }
            Command::Compact { revision } => {
                return self.compact(*revision, out).map(KvResponse::Compact)
            }
            Command::LeaseGrant { id, ttl_ms } => {
                self.grant_lease(*id, *ttl_ms, out)?;
                KvResponse::Lease(LeaseResponse::Granted {
                    header: self.header(),
                    id: *id,
                    ttl_ms: *ttl_ms,
                })
            }
            Command::LeaseGrantPut { id, ttl_ms, put } => {
                debug_assert_eq!(put.lease, *id, "checked with the request's limits");
                self.grant_lease(*id, *ttl_ms, out)?;
                KvResponse::Put(self.put_at(&mut cursor, put, out))
            }
            Command::LeaseRevoke { id } => {
                if !self.leases.owns(*id) {
                    return Err(ApiError::LeaseNotFound { id: *id });
                }
                self.lease_change(&mut cursor, out, |t, c| {
                    t.revoke(&[*id], c);
                    Vec::new()
                });
                KvResponse::Lease(LeaseResponse::Revoked {
                    header: self.header(),
                })
            }
            Command::LeaseTick {
                advance_ms,
                renewals,
            } => {
                let mut expired = 0;
                self.lease_change(&mut cursor, out, |t, c| {
                    expired = t.tick(*advance_ms, renewals, c).len() as u64;
                    Vec::new()
                });
                KvResponse::Lease(LeaseResponse::Maintained {
                    header: self.header(),
                    revoked: expired,
                })
            }
            Command::LeaseFence { ids, .. } => {
                self.lease_change(&mut cursor, out, |t, c| {
                    t.fence(ids, c);
                    Vec::new()
                });
                KvResponse::Lease(LeaseResponse::Maintained {
                    header: self.header(),
                    revoked: ids.len() as u64,
                })
            }
            Command::LeaseDetach { ids, .. } => {
                self.lease_change(&mut cursor, out, |t, c| t.detach(ids, c));
                KvResponse::Lease(LeaseResponse::Maintained {
                    header: self.header(),
                    revoked: ids.len() as u64,
                })
            }
            Command::LeaseDetached { ids, .. } => {
                self.lease_change(&mut cursor, out, |t, c| t.detached(ids, c));
                KvResponse::Lease(LeaseResponse::Maintained {
                    header: self.header(),
                    revoked: 0,
                })
            }
            Command::Split { at, new_range } => {
                if !self.bounds.splits_at(at) {
                    return Err(ApiError::InvalidRequest(format!(
                        "range {} cannot split at its first key",
                        self.range_id
                    )));
                }
                let right = self.split_off(at, *new_range);
                out.push(Mutation::Split(Box::new(right)));
                KvResponse::Split(SplitResponse {
                    header: self.header(),
                    new_range_id: *new_range,
                    at: at.clone(),
                    epoch: self.bounds.epoch,
                })
            }
            Command::Freeze { into } => {
                if self.bounds.start.is_empty() {
                    return Err(ApiError::InvalidRequest(format!(
                        "range {} is the first range: nothing to merge it into",
                        self.range_id
                    )));
                }
                if self.lineage.frozen_into != Some(*into) {
                    self.lineage.frozen_into = Some(*into);
                    self.bounds.epoch += 1;
                    out.push(Mutation::Frozen);
                }
                KvResponse::Merge(MergeResponse {
                    header: self.header(),
                    merged_range_id: self.range_id,
                    epoch: self.bounds.epoch,
                })
            }
            Command::Merge { right } => {
                let right_id = right.range_id;
                if !self.lineage.merged_from.contains(&right_id) {
                    let adjacent =
                        !self.bounds.end.is_empty() && self.bounds.end == right.bounds.start;
                    if !adjacent || right.lineage.frozen_into != Some(self.range_id) {
                        return Err(ApiError::InvalidRequest(format!(
                            "range {right_id} is not the frozen right neighbour of range {}",
                            self.range_id
                        )));
                    }
                    out.push(Mutation::Merge(right.bounds.clone()));
                    self.absorb((**right).clone());
                }
                KvResponse::Merge(MergeResponse {
                    header: self.header(),
                    merged_range_id: right_id,
                    epoch: self.bounds.epoch,
                })
            }
        };
        if cursor.sub > 0 {
            self.revision = cursor.main;
        }
        assert!(self.revision >= before, "revision went backwards");
        self.check_invariants();
        Ok(with_revision(response, self.revision))
    }

    /// A put with a lease revoked here is refused (the lease is gone everywhere, or about to
    /// be); whether the lease exists at all was checked with its owner before proposing.
    fn check_lease(&self, lease: LeaseId) -> Result<(), ApiError> {
        if lease != 0 && self.leases.is_revoked(lease) {
            return Err(ApiError::LeaseNotFound { id: lease });
        }
        Ok(())
    }

    /// Grants lease `id` (owned here) with `ttl_ms`; `LeaseExists`, changing nothing, if the id
    /// was ever used.
    fn grant_lease(
        &mut self,
        id: LeaseId,
        ttl_ms: u64,
        out: &mut Vec<Mutation>,
    ) -> Result<(), ApiError> {
        let mut changes = Vec::new();
        self.leases.grant(id, ttl_ms, &mut changes)?;
        out.extend(changes.into_iter().map(Mutation::Lease));
        Ok(())
    }

    /// Runs a lease-table change and deletes, at the write's revision, the keys it returns.
    fn lease_change(
        &mut self,
        cursor: &mut WriteCursor,
        out: &mut Vec<Mutation>,
        change: impl FnOnce(&mut LeaseTable, &mut Vec<LeaseMutation>) -> Vec<Vec<u8>>,
    ) {
        let mut changes = Vec::new();
        let keys = change(&mut self.leases, &mut changes);
        out.extend(changes.into_iter().map(Mutation::Lease));
        for key in keys {
            self.tombstone(cursor, &key, out);
        }
    }

    /// Deletes live `key` at the write's next position.
    fn tombstone(&mut self, cursor: &mut WriteCursor, key: &[u8], out: &mut Vec<Mutation>) {
        let rev = cursor.next();
        out.push(Mutation::Put {
            rev,
            key: key.to_vec(),
            record: None,
        });
        self.index
            .get_mut(key)
            .expect("a live key is indexed")
            .push(Version { rev, record: None });
    }

    /// Whether the txn's compares hold, and the branch that runs.
    fn branch<'t>(&self, txn: &'t TxnRequest) -> (bool, &'t [TxnOp]) {
        let succeeded = txn.compares.iter().all(|c| self.compare_holds(c));
        if succeeded {
            (true, &txn.success)
        } else {
            (false, &txn.failure)
        }
    }

    /// Runs a txn; refused (nothing applied) if a put of the branch that runs names a lease
    /// revoked here.
    fn txn(
        &mut self,
        cursor: &mut WriteCursor,
        txn: &TxnRequest,
        out: &mut Vec<Mutation>,
    ) -> Result<TxnResponse, ApiError> {
        let (succeeded, ops) = self.branch(txn);
        for op in ops {
            if let TxnOp::Put(p) = op {
                self.check_lease(p.lease)?;
            }
        }
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            responses.push(match op {
                TxnOp::Put(p) => TxnOpResponse::Put(self.put_at(cursor, p, out)),
                TxnOp::Delete(d) => TxnOpResponse::Delete(self.delete_at(cursor, d, out)),
                // Reads see the txn's own earlier writes, as in etcd.
                TxnOp::Range(r) => TxnOpResponse::Range(self.range_at(r, u64::MAX)),
            });
        }
        Ok(TxnResponse {
            header: self.header(),
            succeeded,
            responses,
        })
    }

    /// The holder of the lock whose contenders' keys live under `prefix`: the live key with
    /// the lowest create revision (contenders queue in creation order).
    pub fn lock_holder(&self, prefix: &[u8]) -> Option<KeyValue> {
        self.index
            .range(span_bounds(&KeySpan::prefix(prefix.to_vec())))
            .filter_map(|(key, history)| {
                let newest = history.last()?;
                Some((key, newest.rev, newest.record.as_ref()?))
            })
            .min_by_key(|(_, _, record)| record.create_revision)
            .map(|(key, rev, record)| kv(key, rev, record, true))
    }

    /// Whether `fence`'s token and lease are those of its lock's holder (the lock's keys are
    /// in this range).
    pub fn fence_holds(&self, fence: &Fence) -> bool {
        self.lock_holder(&fence.prefix)
            .is_some_and(|h| h.create_revision == fence.token && h.lease == fence.lease)
    }

    fn compact(
        &mut self,
        revision: u64,
        out: &mut Vec<Mutation>,
    ) -> Result<CompactResponse, ApiError> {
        let revision = revision.min(self.revision);
        if revision <= self.compact_revision {
            return Err(ApiError::Compacted {
                compact_revision: self.compact_revision,
            });
        }
        self.index.retain(|key, history| {
            // Keep the newest version at or below the compaction point (unless it is a
            // tombstone) and everything after it.
            if let Some(keep_from) = history.iter().rposition(|v| v.rev.main <= revision) {
                let drop_to = if history[keep_from].record.is_none() {
                    keep_from + 1
                } else {
                    keep_from
                };
                for v in history.drain(..drop_to) {
                    out.push(Mutation::Remove {
                        rev: v.rev,
                        key: key.clone(),
                    });
                }
            }
            !history.is_empty()
        });
        self.compact_revision = revision;
        self.check_invariants();
        Ok(CompactResponse {
            header: self.header(),
            compact_revision: revision,
        })
    }
}

/// Sets the header revision of a write's response (and of its txn sub-responses that are
/// reads) to the range revision after the write.
fn with_revision(mut response: KvResponse, revision: u64) -> KvResponse {
    match &mut response {
        KvResponse::Put(r) => r.header.revision = revision,
        KvResponse::Delete(r) => r.header.revision = revision,
        KvResponse::Txn(r) => {
            r.header.revision = revision;
            for sub in &mut r.responses {
                match sub {
                    TxnOpResponse::Put(p) => p.header.revision = revision,
                    TxnOpResponse::Delete(d) => d.header.revision = revision,
                    TxnOpResponse::Range(g) => g.header.revision = revision,
                }
            }
        }
        KvResponse::Range(r) => r.header.revision = revision,
        KvResponse::Compact(r) => r.header.revision = revision,
        KvResponse::Lease(r) => r.set_revision(revision),
        KvResponse::Split(r) => r.header.revision = revision,
        KvResponse::Moved(r) => r.header.revision = revision,
        KvResponse::Merge(r) => r.header.revision = revision,
        KvResponse::Frozen(r) => r.header.revision = revision,
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leases::LeaseTable;

    fn put(key: &str, value: &str) -> Command {
        Command::Put(PutRequest {
            key: key.into(),
            value: value.into(),
            lease: 0,
            prev_kv: true,
        })
    }
    fn del(span: KeySpan) -> Command {
        Command::Delete(DeleteRequest {
            span,
            prev_kv: true,
        })
    }
    fn apply(m: &mut Mvcc, cmd: Command) -> KvResponse {
        m.apply(&cmd, &mut Vec::new()).unwrap()
    }
    fn get(m: &Mvcc, key: &str, rev: u64) -> Option<KeyValue> {
        let mut req = RangeRequest::new(KeySpan::key(key));
        req.revision = rev;
        m.range(&req).unwrap().kvs.pop()
    }
    fn keys(r: &RangeResponse) -> Vec<String> {
        r.kvs
            .iter()
            .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
            .collect()
    }

    #[test]
    fn a_split_hands_keys_history_and_leases_over_and_refuses_what_left() {
        let mut m = Mvcc::new(2);
        // Leases anchored on each side of "m" (anchors are base-62 digits of the id).
        let above: Vec<LeaseId> = (1..1_000)
            .filter(|id| lease_anchor(*id).as_slice() >= &b"m"[..])
            .take(2)
            .collect();
        let low = (1..1_000)
            .find(|id| lease_anchor(*id).as_slice() < &b"m"[..])
            .unwrap();
        let (high, high_ungranted) = (above[0], above[1]);
        for id in [low, high] {
            m.apply(&Command::LeaseGrant { id, ttl_ms: 5_000 }, &mut Vec::new())
                .unwrap();
        }
        apply(&mut m, put("a", "1"));
        apply(&mut m, put("x", "1"));
        let mut leased = PutRequest {
            key: b"y".to_vec(),
            value: b"1".to_vec(),
            lease: low,
            prev_kv: false,
        };
        m.apply(&Command::Put(leased.clone()), &mut Vec::new())
            .unwrap();
        apply(&mut m, put("x", "2"));
        let revision = m.revision();
        let mut out = Vec::new();
        let split = Command::Split {
            at: b"m".to_vec(),
            new_range: 70,
        };
        let KvResponse::Split(r) = m.apply(&split, &mut out).unwrap() else {
            panic!("a split answers with a split response")
        };
        assert_eq!(
            (r.new_range_id, r.epoch, r.header.revision),
            (70, 2, revision)
        );
        let [Mutation::Split(right)] = out.as_slice() else {
            panic!("one split mutation: {out:?}")
        };
        let mut right = (**right).clone();
        // Bounds, epochs, revisions.
        assert_eq!(
            (m.bounds().end.as_slice(), m.bounds().epoch),
            (&b"m"[..], 2)
        );
        assert_eq!(
            (
                right.bounds().start.as_slice(),
                right.bounds().end.as_slice()
            ),
            (&b"m"[..], &b""[..])
        );
        assert_eq!(
            (right.range_id(), right.revision(), right.bounds().epoch),
            (70, revision, 2)
        );
        assert_eq!(m.split_into(), &[70]);
        // Keys and their history moved; the left keeps its own.
        assert_eq!(get(&right, "x", 0).unwrap().value, b"2");
        assert_eq!(get(&right, "x", revision - 2).unwrap().value, b"1");
        assert_eq!(get(&m, "x", 0), None);
        assert_eq!(get(&m, "a", 0).unwrap().value, b"1");
        // Leases go with their anchors; keys stay attached to their lease in their new range.
        assert!(m.leases().owns(low) && !m.leases().owns(high));
        assert!(right.leases().owns(high) && !right.leases().owns(low));
        assert_eq!(right.leases().attached_keys(low), vec![b"y".to_vec()]);
        // A command naming keys that left is refused with the new epoch, and changes nothing.
        let stale = m.apply(&put("z", "1"), &mut Vec::new());
        assert_eq!(
            stale,
            Err(ApiError::StaleEpoch {
                range_id: 2,
                current_epoch: 2
            })
        );
        assert_eq!(m.revision(), revision);
        let stale_grant = Command::LeaseGrant {
            id: high_ungranted,
            ttl_ms: 5_000,
        };
        assert!(matches!(
            m.apply(&stale_grant, &mut Vec::new()),
            Err(ApiError::StaleEpoch { .. })
        ));
        // Writes go on in both halves from the split revision.
        leased.key = b"z".to_vec();
        let KvResponse::Put(p) = right.apply(&Command::Put(leased), &mut Vec::new()).unwrap()
        else {
            panic!()
        };
        assert_eq!(p.header.revision, revision + 1);
        // A split at the first key, or outside, is refused.
        let at_start = Command::Split {
            at: b"m".to_vec(),
            new_range: 71,
        };
        assert!(matches!(
            right.apply(&at_start, &mut Vec::new()),
            Err(ApiError::InvalidRequest(_))
        ));
        assert!(matches!(
            m.apply(&at_start, &mut Vec::new()),
            Err(ApiError::StaleEpoch { .. })
        ));
    }

    #[test]
    fn a_merge_takes_the_frozen_neighbour_in_and_revisions_never_go_back() {
        let mut left = Mvcc::new(2);
        apply(&mut left, put("a", "1"));
        apply(&mut left, put("x", "1"));
        let mut out = Vec::new();
        let split = Command::Split {
            at: b"m".to_vec(),
            new_range: 70,
        };
        left.apply(&split, &mut out).unwrap();
        let Some(Mutation::Split(right)) = out.pop() else {
            panic!("a split mutation")
        };
        let mut right = *right;
        // A lease owned by the right half, granted and ticked there (its clock runs ahead).
        let high = (1..1_000)
            .find(|id| lease_anchor(*id).as_slice() >= &b"m"[..])
            .unwrap();
        right
            .apply(
                &Command::LeaseGrant {
                    id: high,
                    ttl_ms: 5_000,
                },
                &mut Vec::new(),
            )
            .unwrap();
        let tick = |advance_ms| Command::LeaseTick {
            advance_ms,
            renewals: Vec::new(),
        };
        right.apply(&tick(1_000), &mut Vec::new()).unwrap();
        right.apply(&tick(2_000), &mut Vec::new()).unwrap();
        let remaining = right.leases().time_to_live(high).unwrap();
        // The right half runs ahead in revisions; the left one writes a little.
        for i in 0..5 {
            apply(&mut right, put("x", &i.to_string()));
        }
        apply(&mut left, put("b", "1"));
        let (left_rev, right_rev) = (left.revision(), right.revision());
        assert!(right_rev > left_rev);

        // Not frozen yet: the merge is refused.
        let merge = |r: &Mvcc| Command::Merge {
            right: Box::new(r.clone()),
        };
        assert!(matches!(
            left.apply(&merge(&right), &mut Vec::new()),
            Err(ApiError::InvalidRequest(_))
        ));
        // Frozen: every command but a freeze is refused; the same freeze again changes nothing.
        let mut out = Vec::new();
        let KvResponse::Merge(f) = right.apply(&Command::Freeze { into: 2 }, &mut out).unwrap()
        else {
            panic!("a freeze answers with a merge response")
        };
        assert_eq!((f.merged_range_id, f.epoch), (70, 3));
        assert_eq!(out, vec![Mutation::Frozen]);
        assert!(matches!(
            right.apply(&put("y", "1"), &mut Vec::new()),
            Err(ApiError::Merging {
                range_id: 70,
                into: 2
            })
        ));
        assert!(matches!(
            right.check_epoch(3),
            Err(ApiError::Merging {
                range_id: 70,
                into: 2
            })
        ));
        let mut again = Vec::new();
        right
            .apply(&Command::Freeze { into: 2 }, &mut again)
            .unwrap();
        assert!(again.is_empty());
        // Frozen into another range: this one refuses it.
        let mut elsewhere = right.clone();
        elsewhere
            .apply(&Command::Freeze { into: 9 }, &mut Vec::new())
            .unwrap();
        assert!(left.apply(&merge(&elsewhere), &mut Vec::new()).is_err());

        let mut out = Vec::new();
        let KvResponse::Merge(m) = left.apply(&merge(&right), &mut out).unwrap() else {
            panic!("a merge answers with a merge response")
        };
        assert!(matches!(out.as_slice(), [Mutation::Merge(_)]));
        assert_eq!(m.merged_range_id, 70);
        assert_eq!(left.bounds().end, b"");
        assert!(left.bounds().epoch > 3, "above both parts' epochs");
        assert_eq!(left.revision(), right_rev);
        assert_eq!(get(&left, "x", 0).unwrap().value, b"4");
        assert_eq!(get(&left, "a", 0).unwrap().value, b"1");
        assert!(left.leases().owns(high));
        assert_eq!(left.leases().time_to_live(high), Some(remaining));
        assert!(
            left.split_into().is_empty(),
            "a range merged back is not hosted again"
        );
        // Applied twice (a retried proposal): nothing changes.
        let mut twice = Vec::new();
        left.apply(&merge(&right), &mut twice).unwrap();
        assert!(twice.is_empty());
        // The next write is above every version of either side.
        let KvResponse::Put(p) = apply(&mut left, put("a", "2")) else {
            panic!()
        };
        assert_eq!(p.header.revision, right_rev + 1);
        // The first range cannot be frozen (nothing on its left).
        assert!(left
            .apply(&Command::Freeze { into: 1 }, &mut Vec::new())
            .is_err());
    }

    #[test]
    fn the_split_point_halves_the_keys_and_needs_two_of_them() {
        use crate::{split_point, SplitSettings};
        let mut m = Mvcc::new(1);
        let by_keys = |keys_max| SplitSettings {
            keys_max,
            bytes_max: 0,
            check_interval_ms: 1,
            ..SplitSettings::default()
        };
        assert_eq!(m.middle_key(), None);
        apply(&mut m, put("a", "1"));
        assert_eq!(split_point(&m, &by_keys(0)), None, "0 is off");
        assert_eq!(m.middle_key(), None, "one key cannot split");
        for k in ["b", "c", "d"] {
            apply(&mut m, put(k, "1"));
        }
        apply(&mut m, put("d", "22"));
        assert_eq!(m.middle_key(), Some(b"c".to_vec()));
        assert_eq!(m.stored_bytes(), 4 * 2 + 1 + 2);
        assert_eq!(split_point(&m, &by_keys(3)), Some(b"c".to_vec()));
        assert_eq!(split_point(&m, &by_keys(4)), None);
        let by_bytes = SplitSettings {
            keys_max: 0,
            bytes_max: 10,
            check_interval_ms: 1,
            ..SplitSettings::default()
        };
        assert_eq!(split_point(&m, &by_bytes), Some(b"c".to_vec()));
    }

    #[test]
    fn revisions_versions_and_history() {
        let mut m = Mvcc::new(7);
        let KvResponse::Put(r1) = apply(&mut m, put("a", "1")) else {
            panic!()
        };
        assert_eq!(
            r1.header,
            ResponseHeader {
                range_id: 7,
                revision: 1
            }
        );
        assert_eq!(r1.prev_kv, None);
        let KvResponse::Put(r2) = apply(&mut m, put("a", "2")) else {
            panic!()
        };
        assert_eq!(r2.header.revision, 2);
        assert_eq!(r2.prev_kv.unwrap().value, b"1");
        let a = get(&m, "a", 0).unwrap();
        assert_eq!(
            (
                a.create_revision,
                a.mod_revision,
                a.version,
                a.value.as_slice()
            ),
            (1, 2, 2, &b"2"[..])
        );
        assert_eq!(
            get(&m, "a", 1).unwrap().value,
            b"1",
            "reads at a past revision see the past"
        );
        apply(&mut m, del(KeySpan::key("a")));
        assert_eq!(m.revision(), 3);
        assert_eq!(get(&m, "a", 0), None);
        assert_eq!(get(&m, "a", 2).unwrap().value, b"2");
        apply(&mut m, put("a", "3"));
        let a = get(&m, "a", 0).unwrap();
        assert_eq!(
            (a.create_revision, a.version),
            (4, 1),
            "a re-created key starts a new incarnation"
        );
    }

    #[test]
    fn deleting_nothing_does_not_bump_the_revision() {
        let mut m = Mvcc::new(1);
        let KvResponse::Delete(d) = apply(&mut m, del(KeySpan::key("x"))) else {
            panic!()
        };
        assert_eq!((d.deleted, d.header.revision, m.revision()), (0, 0, 0));
    }

    #[test]
    fn scans_skip_deleted_keys_and_honour_limit_order_and_count() {
        let mut m = Mvcc::new(1);
        for k in ["a", "b", "c", "d", "e"] {
            apply(&mut m, put(k, k));
        }
        apply(&mut m, del(KeySpan::key("c")));
        let mut req = RangeRequest::new(KeySpan::interval("a", "e"));
        let r = m.range(&req).unwrap();
        assert_eq!(keys(&r), ["a", "b", "d"]);
        assert_eq!((r.count, r.more), (3, false));
        req.limit = 2;
        req.descending = true;
        let r = m.range(&req).unwrap();
        assert_eq!(keys(&r), ["d", "b"]);
        assert_eq!((r.count, r.more), (3, true));
        req.count_only = true;
        let r = m.range(&req).unwrap();
        assert!(r.kvs.is_empty());
        assert_eq!(r.count, 3);
        let mut req = RangeRequest::new(KeySpan::prefix(""));
        req.keys_only = true;
        let r = m.range(&req).unwrap();
        assert_eq!(keys(&r), ["a", "b", "d", "e"]);
        assert!(r.kvs.iter().all(|kv| kv.value.is_empty()));
        req.revision = 3; // before "d", "e" and the delete of "c"
        assert_eq!(keys(&m.range(&req).unwrap()), ["a", "b", "c"]);
    }

    #[test]
    fn delete_prefix_and_interval_share_one_revision() {
        let mut m = Mvcc::new(1);
        for k in ["p/1", "p/2", "q"] {
            apply(&mut m, put(k, "v"));
        }
        let KvResponse::Delete(d) = apply(&mut m, del(KeySpan::prefix("p/"))) else {
            panic!()
        };
        assert_eq!(d.deleted, 2);
        assert_eq!(d.prev_kvs.len(), 2);
        assert_eq!(m.revision(), 4);
        assert!(get(&m, "q", 0).is_some());
    }

    fn cmp(key: &str, op: CompareOp, target: CompareTarget) -> Compare {
        Compare {
            key: key.into(),
            op,
            target,
        }
    }

    fn txn_succeeds(m: &mut Mvcc, c: Compare) -> bool {
        let txn = TxnRequest {
            fence: None,
            compares: vec![c],
            success: vec![],
            failure: vec![],
        };
        let KvResponse::Txn(t) = apply(m, Command::Txn(txn)) else {
            panic!()
        };
        t.succeeded
    }

    #[test]
    fn every_txn_compare() {
        use CompareOp::*;
        use CompareTarget::*;
        let mut m = Mvcc::new(1);
        apply(&mut m, put("k", "m")); // rev 1
        apply(&mut m, put("other", "x")); // rev 2
        apply(&mut m, put("k", "m")); // rev 3: version 2, create 1, mod 3
        let cases = [
            (Value(b"m".to_vec()), [true, false, false, false]),
            (Value(b"a".to_vec()), [false, true, false, true]),
            (Value(b"z".to_vec()), [false, true, true, false]),
            (Version(2), [true, false, false, false]),
            (Version(3), [false, true, true, false]),
            (CreateRevision(1), [true, false, false, false]),
            (CreateRevision(0), [false, true, false, true]),
            (ModRevision(3), [true, false, false, false]),
            (ModRevision(4), [false, true, true, false]),
        ];
        for (target, expected) in cases {
            for (op, want) in [Equal, NotEqual, Less, Greater].into_iter().zip(expected) {
                assert_eq!(
                    txn_succeeds(&mut m, cmp("k", op, target.clone())),
                    want,
                    "{op:?} {target:?}"
                );
            }
        }
        // An absent key: version/revisions are 0, value compares never hold.
        assert!(txn_succeeds(&mut m, cmp("absent", Equal, Version(0))));
        assert!(txn_succeeds(
            &mut m,
            cmp("absent", Equal, CreateRevision(0))
        ));
        assert!(!txn_succeeds(&mut m, cmp("absent", Equal, Value(vec![]))));
        assert!(!txn_succeeds(
            &mut m,
            cmp("absent", NotEqual, Value(vec![]))
        ));
        assert_eq!(
            m.revision(),
            3,
            "txns without writes do not bump the revision"
        );
    }

    #[test]
    fn txn_branches_are_atomic_at_one_revision_and_reads_see_own_writes() {
        let mut m = Mvcc::new(1);
        apply(&mut m, put("a", "1"));
        let txn = TxnRequest {
            fence: None,
            compares: vec![cmp(
                "a",
                CompareOp::Equal,
                CompareTarget::Value(b"1".to_vec()),
            )],
            success: vec![
                TxnOp::Put(PutRequest {
                    key: "a".into(),
                    value: "2".into(),
                    lease: 0,
                    prev_kv: false,
                }),
                TxnOp::Put(PutRequest {
                    key: "b".into(),
                    value: "2".into(),
                    lease: 0,
                    prev_kv: false,
                }),
                TxnOp::Range(RangeRequest::new(KeySpan::prefix(""))),
            ],
            failure: vec![TxnOp::Delete(DeleteRequest {
                span: KeySpan::key("a"),
                prev_kv: false,
            })],
        };
        let KvResponse::Txn(t) = apply(&mut m, Command::Txn(txn.clone())) else {
            panic!()
        };
        assert!(t.succeeded);
        assert_eq!(t.header.revision, 2);
        let TxnOpResponse::Range(r) = &t.responses[2] else {
            panic!()
        };
        assert_eq!(keys(r), ["a", "b"]);
        assert!(r
            .kvs
            .iter()
            .all(|kv| kv.mod_revision == 2 && kv.value == b"2"));
        // Same txn again: the compare fails, the failure branch runs.
        let KvResponse::Txn(t) = apply(&mut m, Command::Txn(txn)) else {
            panic!()
        };
        assert!(!t.succeeded);
        assert_eq!(m.revision(), 3);
        assert_eq!(get(&m, "a", 0), None);
    }

    #[test]
    fn compaction_drops_old_revisions_only() {
        let mut m = Mvcc::new(1);
        apply(&mut m, put("a", "1")); // 1
        apply(&mut m, put("a", "2")); // 2
        apply(&mut m, put("b", "1")); // 3
        apply(&mut m, del(KeySpan::key("b"))); // 4
        apply(&mut m, put("a", "3")); // 5
        let mut out = Vec::new();
        let r = m
            .apply(&Command::Compact { revision: 4 }, &mut out)
            .unwrap();
        assert!(matches!(
            r,
            KvResponse::Compact(CompactResponse {
                compact_revision: 4,
                ..
            })
        ));
        // a@1 dropped (a@2 is the newest at 4), b@3 and its tombstone dropped.
        let removed: Vec<_> = out
            .iter()
            .map(|m| match m {
                Mutation::Remove { rev, .. } => rev.main,
                _ => 0,
            })
            .collect();
        assert_eq!(removed, [1, 3, 4]);
        assert_eq!(get(&m, "a", 4).unwrap().value, b"2");
        assert_eq!(get(&m, "a", 0).unwrap().value, b"3");
        let mut req = RangeRequest::new(KeySpan::key("a"));
        req.revision = 3;
        assert_eq!(
            m.range(&req).unwrap_err(),
            ApiError::Compacted {
                compact_revision: 4
            }
        );
        req.revision = 9;
        assert_eq!(
            m.range(&req).unwrap_err(),
            ApiError::FutureRevision {
                revision: 9,
                current: 5
            }
        );
        assert_eq!(
            m.apply(&Command::Compact { revision: 3 }, &mut Vec::new())
                .unwrap_err(),
            ApiError::Compacted {
                compact_revision: 4
            }
        );
        assert_eq!(m.key_count(), 1);
    }

    #[test]
    fn restore_rebuilds_the_same_state() {
        let mut m = Mvcc::new(3);
        let mut out = Vec::new();
        for c in [
            put("a", "1"),
            put("b", "2"),
            del(KeySpan::key("a")),
            put("a", "4"),
            Command::LeaseGrant {
                id: 5,
                ttl_ms: 1_000,
            },
            Command::LeaseGrant {
                id: 6,
                ttl_ms: 1_000,
            },
            leased("c", 5),
            Command::LeaseRevoke { id: 6 },
            Command::LeaseTick {
                advance_ms: 10,
                renewals: vec![(5, 0)],
            },
        ] {
            m.apply(&c, &mut out).unwrap();
        }
        let (mut clock, mut owned, mut revoked) = (0, BTreeMap::new(), BTreeMap::new());
        let mut versions = Vec::new();
        for mu in out {
            match mu {
                Mutation::Put { rev, key, record } => versions.push((key, Version { rev, record })),
                Mutation::Remove { .. }
                | Mutation::Split(_)
                | Mutation::Frozen
                | Mutation::Merge(_) => unreachable!(),
                Mutation::Lease(LeaseMutation::Clock(c)) => clock = c,
                Mutation::Lease(LeaseMutation::Owned(id, Some(l))) => {
                    owned.insert(id, l);
                }
                Mutation::Lease(LeaseMutation::Owned(id, None)) => {
                    owned.remove(&id);
                }
                Mutation::Lease(LeaseMutation::Revoked(id, pending)) => {
                    revoked.insert(id, pending);
                }
            }
        }
        versions.reverse();
        let leases = LeaseTable::restore(clock, owned, revoked);
        let restored = Mvcc::restore(
            3,
            Default::default(),
            m.revision(),
            m.compact_revision(),
            versions,
            leases,
        );
        assert_eq!(restored, m);
        assert_eq!(restored.leases().attached_keys(5), vec![b"c".to_vec()]);
    }

    fn leased(key: &str, lease: LeaseId) -> Command {
        Command::Put(PutRequest {
            key: key.into(),
            value: "v".into(),
            lease,
            prev_kv: false,
        })
    }

    #[test]
    fn revoking_a_lease_refuses_it_then_deleting_its_keys_takes_one_revision() {
        let mut m = Mvcc::new(1);
        apply(
            &mut m,
            Command::LeaseGrant {
                id: 9,
                ttl_ms: 1_000,
            },
        );
        apply(&mut m, leased("a", 9));
        apply(&mut m, leased("b", 9));
        apply(&mut m, put("c", "no lease"));
        // Moved to no lease: survives the revoke.
        apply(&mut m, put("b", "kept"));
        let before = m.revision();
        // Phase 1: refused from now on; its keys stay while other ranges are fenced.
        let response = apply(&mut m, Command::LeaseRevoke { id: 9 });
        assert_eq!(response.header().revision, before);
        assert!(get(&m, "a", 0).is_some());
        assert_eq!(m.leases().pending_detach(), vec![9]);
        let refused = m.apply(&leased("d", 9), &mut Vec::new());
        assert_eq!(refused.unwrap_err(), ApiError::LeaseNotFound { id: 9 });
        // Phase 2: every range refuses it; its keys go at one revision.
        let response = apply(
            &mut m,
            Command::LeaseDetached {
                ids: vec![9],
                epoch: 1,
            },
        );
        assert_eq!(response.header().revision, before + 1);
        assert_eq!(get(&m, "a", 0), None);
        assert_eq!(get(&m, "b", 0).unwrap().value, b"kept");
        assert!(get(&m, "c", 0).is_some());
        assert!(m.leases().pending_detach().is_empty());
        // A revoke of a lease nobody has changes nothing.
        let err = m.apply(&Command::LeaseRevoke { id: 9 }, &mut Vec::new());
        assert_eq!(err.unwrap_err(), ApiError::LeaseNotFound { id: 9 });
        assert_eq!(m.revision(), before + 1);
    }

    #[test]
    fn a_tick_without_expiry_keeps_the_revision() {
        let mut m = Mvcc::new(1);
        apply(
            &mut m,
            Command::LeaseGrant {
                id: 2,
                ttl_ms: 1_000,
            },
        );
        apply(&mut m, leased("k", 2));
        let rev = m.revision();
        let tick = |advance_ms| Command::LeaseTick {
            advance_ms,
            renewals: vec![],
        };
        apply(&mut m, tick(500));
        assert_eq!(m.revision(), rev);
        // The expiry itself writes no key (the deletion follows the detach).
        apply(&mut m, tick(5_000));
        assert_eq!(m.revision(), rev);
        apply(
            &mut m,
            Command::LeaseDetached {
                ids: vec![2],
                epoch: 1,
            },
        );
        assert_eq!(m.revision(), rev + 1);
        assert_eq!(get(&m, "k", 0), None);
    }

    #[test]
    fn a_grant_with_a_put_takes_one_revision_and_a_used_id_applies_nothing() {
        let mut m = Mvcc::new(1);
        let grant_put = |id, value: &str| Command::LeaseGrantPut {
            id,
            ttl_ms: 1_000,
            put: PutRequest {
                key: "e".into(),
                value: value.into(),
                lease: id,
                prev_kv: false,
            },
        };
        let before = m.revision();
        let mut out = Vec::new();
        let KvResponse::Put(put) = m.apply(&grant_put(3, "v"), &mut out).unwrap() else {
            panic!("answered like a put")
        };
        assert_eq!(put.header.revision, before + 1);
        assert!(m.leases().owns(3));
        assert_eq!(m.leases().attached_keys(3), vec![b"e".to_vec()]);
        assert_eq!(get(&m, "e", 0).unwrap().lease, 3);
        assert!(out.iter().any(|c| matches!(c, Mutation::Lease(_))));
        assert!(out.iter().any(|c| matches!(c, Mutation::Put { .. })));
        // The id again: refused whole, the key keeps its value.
        let mut out = Vec::new();
        let err = m.apply(&grant_put(3, "w"), &mut out).unwrap_err();
        assert_eq!(err, ApiError::LeaseExists { id: 3 });
        assert!(out.is_empty());
        assert_eq!(get(&m, "e", 0).unwrap().value, b"v");
        assert_eq!(m.revision(), before + 1);
        // Expired (its TTL runs from the first tick after the grant): the key goes with it.
        let tick = |advance_ms| Command::LeaseTick {
            advance_ms,
            renewals: vec![],
        };
        apply(&mut m, tick(100));
        apply(&mut m, tick(5_000));
        apply(
            &mut m,
            Command::LeaseDetached {
                ids: vec![3],
                epoch: 1,
            },
        );
        assert_eq!(get(&m, "e", 0), None);
    }

    #[test]
    fn writes_with_a_detached_lease_are_refused_whole() {
        let mut m = Mvcc::new(1);
        apply(
            &mut m,
            Command::LeaseFence {
                ids: vec![4],
                epoch: 1,
            },
        );
        let err = m.apply(&leased("a", 4), &mut Vec::new()).unwrap_err();
        assert_eq!(err, ApiError::LeaseNotFound { id: 4 });
        let txn = Command::Txn(TxnRequest {
            fence: None,
            compares: vec![],
            success: vec![
                TxnOp::Put(PutRequest {
                    key: "x".into(),
                    value: "1".into(),
                    lease: 0,
                    prev_kv: false,
                }),
                TxnOp::Put(PutRequest {
                    key: "y".into(),
                    value: "1".into(),
                    lease: 4,
                    prev_kv: false,
                }),
            ],
            failure: vec![],
        });
        let mut out = Vec::new();
        assert!(m.apply(&txn, &mut out).is_err());
        assert!(out.is_empty() && get(&m, "x", 0).is_none());
    }

    fn fenced(key: &str, token: u64, lease: LeaseId, holder_here: bool) -> Command {
        Command::FencedTxn {
            txn: TxnRequest {
                compares: vec![],
                success: vec![TxnOp::Put(PutRequest {
                    key: key.into(),
                    value: token.to_string().into(),
                    lease: 0,
                    prev_kv: false,
                })],
                failure: vec![],
                fence: Some(Fence {
                    prefix: b"lock/".to_vec(),
                    token,
                    lease,
                }),
            },
            holder_here,
        }
    }

    #[test]
    fn a_lease_fence_or_detach_made_for_an_extent_the_range_left_is_refused() {
        // A lease owned elsewhere has keys on both sides of "m".
        let mut m = Mvcc::new(2);
        apply(&mut m, leased("a", 7));
        apply(&mut m, leased("x", 7));
        let made_for = m.bounds().epoch;
        let mut out = Vec::new();
        let split = Command::Split {
            at: b"m".to_vec(),
            new_range: 70,
        };
        m.apply(&split, &mut out).unwrap();
        let [Mutation::Split(right)] = out.as_slice() else {
            panic!("one split mutation: {out:?}")
        };
        let mut right = (**right).clone();
        // The owner's table still shows the range before the split: what it sends for that
        // extent would reach only "a". Refused, so the owner asks again with the new table.
        let revision = m.revision();
        for stale in [
            Command::LeaseFence {
                ids: vec![7],
                epoch: made_for,
            },
            Command::LeaseDetach {
                ids: vec![7],
                epoch: made_for,
            },
        ] {
            let mut out = Vec::new();
            assert!(matches!(
                m.apply(&stale, &mut out),
                Err(ApiError::StaleEpoch { .. })
            ));
            assert!(out.is_empty() && !m.leases().is_revoked(7));
        }
        assert_eq!(m.revision(), revision);
        // Sent to both halves at their epochs, it deletes the keys on both sides.
        for half in [&mut m, &mut right] {
            let epoch = half.bounds().epoch;
            apply(
                half,
                Command::LeaseDetach {
                    ids: vec![7],
                    epoch,
                },
            );
            assert!(half.leases().is_revoked(7));
        }
        assert_eq!(get(&m, "a", 0), None);
        assert_eq!(get(&right, "x", 0), None);
    }

    #[test]
    fn only_the_lowest_live_contender_passes_a_fence() {
        let mut m = Mvcc::new(1);
        apply(&mut m, leased("lock/a", 5));
        let a = get(&m, "lock/a", 0).unwrap().create_revision;
        apply(&mut m, leased("lock/b", 6));
        let b = get(&m, "lock/b", 0).unwrap().create_revision;
        assert_eq!(m.lock_holder(b"lock/").unwrap().key, b"lock/a");
        apply(&mut m, fenced("data", a, 5, true));
        // A waiter, a wrong lease and a made-up token are all refused, and change nothing.
        for (token, lease) in [(b, 6), (a, 6), (a + 100, 5)] {
            let mut out = Vec::new();
            let refused = m.apply(&fenced("data", token, lease, true), &mut out);
            assert_eq!(refused, Err(ApiError::Fenced { token }));
            assert!(out.is_empty());
        }
        // The holder's lease is fenced: its writes are refused before its key goes.
        apply(
            &mut m,
            Command::LeaseFence {
                ids: vec![5],
                epoch: 1,
            },
        );
        assert_eq!(
            m.apply(&fenced("data", a, 5, true), &mut Vec::new()),
            Err(ApiError::Fenced { token: a })
        );
        // Then detached: its key is deleted and the next contender holds the lock.
        apply(
            &mut m,
            Command::LeaseDetach {
                ids: vec![5],
                epoch: 1,
            },
        );
        assert_eq!(
            m.apply(&fenced("data", a, 5, true), &mut Vec::new()),
            Err(ApiError::Fenced { token: a })
        );
        apply(&mut m, fenced("data", b, 6, true));
        assert_eq!(get(&m, "data", 0).unwrap().value, b.to_string().as_bytes());
        // Where the lock lives elsewhere, a range still refuses a lease it has detached.
        assert_eq!(
            m.apply(&fenced("data", a, 5, false), &mut Vec::new()),
            Err(ApiError::Fenced { token: a })
        );
        apply(&mut m, fenced("data", b, 6, false));
    }
}
