//! Storage of every range group of a node in one RocksDB.
//!
//! Column families (every key starts with the 8-byte big-endian group id, so groups never mix):
//! - `log`:  `gid | index` → a Raft log entry.
//! - `meta`: `gid | tag` → the vote, the last purged log id.
//! - `sm`:   `gid | tag` → last applied log id, membership, MVCC counters, the last snapshot's
//!   metadata (its bytes are encoded when one is sent).
//! - `kv`:   `gid | main revision | sub revision` → one MVCC version `(key, record | tombstone)`.
//!
//! A split writes the new group's rows (its versions moved from the parent's, its counters,
//! bounds, leases, applied and purged log id) in the same write as the parent's apply, so a
//! crash leaves either both halves or the unsplit range.
//!
//! All writes share RocksDB's one WAL, so their order survives a crash: a durable write implies
//! every earlier write is durable too. Writes are issued unsynced and made durable by the
//! node's single [`group_commit`] writer, which syncs the WAL once for everything pending.
//!
//! **Invariant:** openraft's IO callback for an append fires only after a WAL sync that began
//! after the append was written; a vote is synced before `save_vote` returns.
//!
//! **A failed write or sync stops the node** ([`Engine::write`], [`group_commit`]): after one,
//! what reached the disk is unknown (a full disk, a failing device), and a Raft group that
//! carried on, or stopped alone while its node kept serving the others, could acknowledge
//! what it has not stored. The process aborts, as etcd does; a restart recovers from what is
//! on disk, and fails again while the disk is still full.

pub mod group_commit;
mod log_store;
mod state_machine;

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, WriteBatch, DB};

pub use group_commit::GroupCommit;
pub use log_store::LogStore;
pub use state_machine::{
    split_start_log_id, RangeState, RevisionEvents, SnapshotHold, StateMachine,
    WATCH_BUFFER_DEFAULT,
};

pub(crate) const CF_LOG: &str = "log";
pub(crate) const CF_META: &str = "meta";
pub(crate) const CF_SM: &str = "sm";
pub(crate) const CF_KV: &str = "kv";

/// One node's RocksDB and its group-commit writer, shared by every group.
pub struct Engine {
    db: Arc<DB>,
    commit: GroupCommit,
    /// Held by a split from its check that the new range has no rows here to the write of
    /// its first rows, and by a snapshot's install around its write (see
    /// [`Engine::lock_new_rows`]).
    new_rows: Mutex<()>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("path", &self.db.path())
            .finish()
    }
}

pub(crate) fn to_io(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl Engine {
    /// Opens (or creates) the node's database at `path` and starts its group-commit writer.
    pub fn open(path: &Path) -> io::Result<Arc<Self>> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        opts.set_bytes_per_sync(1 << 20);
        let cfs = [CF_LOG, CF_META, CF_SM, CF_KV]
            .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
        let db = Arc::new(DB::open_cf_descriptors(&opts, path, cfs).map_err(to_io)?);
        let commit = GroupCommit::start(db.clone());
        Ok(Arc::new(Self {
            db,
            commit,
            new_rows: Mutex::new(()),
        }))
    }

    /// The database.
    pub fn db(&self) -> &DB {
        &self.db
    }

    /// Writes `batch` (unsynced: the group-commit writer makes it durable). A failed write
    /// stops the process (see the module's doc); the `storage-write-error` fail point makes
    /// every write fail as a full disk does.
    pub(crate) fn write(&self, batch: WriteBatch) {
        fail::fail_point!("storage-write-error", |_| storage_failed(
            "write",
            io::Error::new(
                io::ErrorKind::StorageFull,
                "no space left on device (the storage-write-error fail point)"
            )
        ));
        if let Err(e) = self.db.write(batch) {
            storage_failed("write", e);
        }
    }

    /// The ids of every group with a vote or a log state in this database: the groups this
    /// node hosts (a group made by a split has its log's start from the split's write on).
    pub fn group_ids(&self) -> io::Result<Vec<u64>> {
        let mut ids = Vec::new();
        let mut from = Vec::new();
        loop {
            let mut rows = self.db.iterator_cf(
                self.cf(CF_META),
                rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward),
            );
            let Some(row) = rows.next() else { break };
            let (key, _) = row.map_err(to_io)?;
            let id = u64::from_be_bytes(key[..8].try_into().expect("8-byte group prefix"));
            ids.push(id);
            match id.checked_add(1) {
                Some(next) => from = next.to_be_bytes().to_vec(),
                None => break,
            }
        }
        Ok(ids)
    }

    /// Deletes every row of group `gid` (its log, vote, state and versions), in one write,
    /// made durable before returning: a replica moved away leaves nothing behind, and a
    /// restart does not find it in [`Engine::group_ids`]. The group's openraft instance must be
    /// shut down first.
    pub async fn destroy_group(&self, gid: u64) -> io::Result<()> {
        let mut batch = WriteBatch::default();
        let (from, to) = group_span(gid);
        for name in [CF_LOG, CF_META, CF_SM, CF_KV] {
            batch.delete_range_cf(self.cf(name), &from, &to);
        }
        self.write(batch);
        self.commit.sync().await
    }

    /// Whether group `gid` has a row of its own here (a vote, a log state, an applied
    /// state): a replica of it was started on this node, by a split or by its leader. A
    /// failed read stops the process, as a failed write does.
    pub(crate) fn has_rows(&self, gid: u64) -> bool {
        let (from, to) = group_span(gid);
        [CF_META, CF_SM].into_iter().any(|name| {
            let mut options = rocksdb::ReadOptions::default();
            options.set_iterate_upper_bound(to.clone());
            let mode = rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward);
            match self.db.iterator_cf_opt(self.cf(name), options, mode).next() {
                None => false,
                Some(Ok(_)) => true,
                Some(Err(e)) => storage_failed("read", e),
            }
        })
    }

    /// Orders the first rows a split writes for a new range with the rows a snapshot of it
    /// writes. A replica that applies a split late may already host the new range, filled
    /// by its leader's snapshot: the split must then leave that replica's rows alone (its
    /// own would take the range back to the split, and its log below what it acknowledged).
    /// The split checks [`Engine::has_rows`] and writes under this lock, a snapshot writes
    /// under it, so one never overwrites the other after the check.
    pub(crate) fn lock_new_rows(&self) -> MutexGuard<'_, ()> {
        self.new_rows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The group-commit writer.
    pub fn commit(&self) -> &GroupCommit {
        &self.commit
    }

    pub(crate) fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }
}

/// Stops the process after a failed storage operation `what` (see the module's doc).
pub(crate) fn storage_failed(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("fatal: {what} of the node's store failed ({e}); stopping");
    std::process::abort()
}

/// A fail point that, when configured with `return`, crashes the process right there (as
/// `kill -9` would, but at a chosen instruction). Nothing without the `failpoints` feature.
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
pub(crate) fn crash_point(name: &str) {
    fail::fail_point!(name, |_| {
        eprintln!("fail point {name}: crashing");
        std::process::abort()
    });
}

/// `gid | suffix` keys.
/// Every key of group `gid` in a column family: from its id, up to the next id.
pub(crate) fn group_span(gid: u64) -> (Vec<u8>, Vec<u8>) {
    (group_key(gid, &[]), group_key(gid + 1, &[]))
}

pub(crate) fn group_key(gid: u64, suffix: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + suffix.len());
    k.extend_from_slice(&gid.to_be_bytes());
    k.extend_from_slice(suffix);
    k
}

pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("serializing to a Vec cannot fail")
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    postcard::from_bytes(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
