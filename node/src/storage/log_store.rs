//! openraft log storage of one group, in the node's shared RocksDB.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::OptionalSend;
use rocksdb::{Direction, IteratorMode, WriteBatch};

use super::{decode, encode, group_key, to_io, Engine, CF_LOG, CF_META};
use crate::raft_types::{Entry, LogId, TypeConfig, Vote};

const TAG_VOTE: u8 = 1;
const TAG_LAST_PURGED: u8 = 2;
const TAG_COMMITTED: u8 = 3;

/// The Raft log and vote of group `gid`.
#[derive(Clone)]
pub struct LogStore {
    gid: u64,
    engine: Arc<Engine>,
}

impl LogStore {
    /// The log store of group `gid` in `engine`.
    pub fn new(engine: Arc<Engine>, gid: u64) -> Self {
        Self { gid, engine }
    }

    fn log_key(&self, index: u64) -> Vec<u8> {
        group_key(self.gid, &index.to_be_bytes())
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, tag: u8) -> io::Result<Option<T>> {
        let db = self.engine.db();
        let bytes = db
            .get_cf(self.engine.cf(CF_META), group_key(self.gid, &[tag]))
            .map_err(to_io)?;
        bytes.map(|b| decode(&b)).transpose()
    }

    fn put_meta<T: serde::Serialize>(&self, tag: u8, value: &T) {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.engine.cf(CF_META),
            group_key(self.gid, &[tag]),
            encode(value),
        );
        self.engine.write(batch);
    }

    /// Deletes log entries with index in `[from, to)`.
    fn delete_indexes(&self, from: u64, to: u64) {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.engine.cf(CF_LOG), self.log_key(from), self.log_key(to));
        self.engine.write(batch);
    }
}

/// Seeds the log of group `gid`, made by a split, as purged up to `start` (see
/// [`super::state_machine::split_start_log_id`]): the log is empty and starts after it.
pub(crate) fn seed_split_log(batch: &mut WriteBatch, engine: &Engine, gid: u64, start: LogId) {
    batch.put_cf(
        engine.cf(CF_META),
        group_key(gid, &[TAG_LAST_PURGED]),
        encode(&start),
    );
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => *x + 1,
            Bound::Unbounded => 0,
        };
        // An upper bound keeps the iterator from stepping past the range into deleted
        // entries (purged ones of this group or of the next group still in the memtable):
        // that walk showed up as a third of the nodes' CPU under many small writes.
        let end = match range.end_bound() {
            Bound::Included(x) => x.checked_add(1).map(|e| self.log_key(e)),
            Bound::Excluded(x) => Some(self.log_key(*x)),
            Bound::Unbounded => None,
        }
        .unwrap_or_else(|| match self.gid.checked_add(1) {
            Some(next_group) => next_group.to_be_bytes().to_vec(),
            None => vec![0xff; 17],
        });
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_upper_bound(end);
        let db = self.engine.db();
        let from = self.log_key(start);
        let mut entries = Vec::new();
        for item in db.iterator_cf_opt(
            self.engine.cf(CF_LOG),
            options,
            IteratorMode::From(&from, Direction::Forward),
        ) {
            let (key, value) = item.map_err(to_io)?;
            let index = u64::from_be_bytes(key[8..16].try_into().expect("16-byte log key"));
            debug_assert!(
                key[..8] == self.gid.to_be_bytes() && range.contains(&index),
                "the upper bound keeps the read inside the group's requested range"
            );
            let entry: Entry = decode(&value)?;
            assert_eq!(entry.index(), index, "log entry stored under another index");
            entries.push(entry);
        }
        Ok(entries)
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        self.get_meta(TAG_VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let db = self.engine.db();
        let end = self.log_key(u64::MAX);
        let last = db
            .iterator_cf(
                self.engine.cf(CF_LOG),
                IteratorMode::From(&end, Direction::Reverse),
            )
            .next()
            .transpose()
            .map_err(to_io)?
            .filter(|(key, _)| key[..8] == self.gid.to_be_bytes())
            .map(|(_, value)| decode::<Entry>(&value).map(|e| e.log_id()))
            .transpose()?;
        let last_purged_log_id: Option<LogId> = self.get_meta(TAG_LAST_PURGED)?;
        // A purge writes its marker and deletes in one batch, but be robust anyway: entries at or
        // below the purge point do not count.
        let last_log_id = match (last, last_purged_log_id) {
            (Some(l), Some(p)) if l.index() <= p.index() => Some(p),
            (l, p) => l.or(p),
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        self.put_meta(TAG_VOTE, vote);
        // openraft requires the vote to be durable before this returns.
        self.engine.commit().sync().await
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = self.engine.cf(CF_LOG);
        let mut batch = WriteBatch::default();
        for entry in entries {
            batch.put_cf(cf, self.log_key(entry.index()), encode(&entry));
        }
        // Unsynced: readable as soon as this returns; durable once the group-commit writer
        // has synced the WAL, which then completes the callback.
        self.engine.write(batch);
        self.engine.commit().after_sync(callback);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        // Not synced: after a crash openraft re-applies up to whatever committed id survived,
        // so that a restarted node does not serve older state than it applied before.
        self.put_meta(TAG_COMMITTED, &committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        Ok(self.get_meta::<Option<LogId>>(TAG_COMMITTED)?.flatten())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        let from = last_log_id.map_or(0, |id| id.index() + 1);
        self.delete_indexes(from, u64::MAX);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        // The purge point and the deletion in one write: a crash never leaves the marker
        // above entries that still exist, or entries below it without the marker.
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.engine.cf(CF_META),
            group_key(self.gid, &[TAG_LAST_PURGED]),
            encode(&log_id),
        );
        batch.delete_range_cf(
            self.engine.cf(CF_LOG),
            self.log_key(0),
            self.log_key(log_id.index() + 1),
        );
        self.engine.write(batch);
        Ok(())
    }
}
