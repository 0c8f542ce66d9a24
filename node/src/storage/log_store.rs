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

    fn put_meta<T: serde::Serialize>(&self, tag: u8, value: &T) -> io::Result<()> {
        let db = self.engine.db();
        db.put_cf(
            self.engine.cf(CF_META),
            group_key(self.gid, &[tag]),
            encode(value),
        )
        .map_err(to_io)
    }

    /// Deletes log entries with index in `[from, to)`.
    fn delete_indexes(&self, from: u64, to: u64) -> io::Result<()> {
        let db = self.engine.db();
        db.delete_range_cf(self.engine.cf(CF_LOG), self.log_key(from), self.log_key(to))
            .map_err(to_io)
    }
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
        let db = self.engine.db();
        let from = self.log_key(start);
        let mut entries = Vec::new();
        for item in db.iterator_cf(
            self.engine.cf(CF_LOG),
            IteratorMode::From(&from, Direction::Forward),
        ) {
            let (key, value) = item.map_err(to_io)?;
            if key[..8] != self.gid.to_be_bytes() {
                break;
            }
            let index = u64::from_be_bytes(key[8..16].try_into().expect("16-byte log key"));
            if !range.contains(&index) {
                break;
            }
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
        let last_log_id = last.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        self.put_meta(TAG_VOTE, vote)?;
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
        self.engine.db().write(batch).map_err(to_io)?;
        self.engine.commit().after_sync(callback);
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        let from = last_log_id.map_or(0, |id| id.index() + 1);
        self.delete_indexes(from, u64::MAX)
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        // Record the purge point first: entries at or below it are ignored from then on.
        self.put_meta(TAG_LAST_PURGED, &log_id)?;
        self.delete_indexes(0, log_id.index() + 1)
    }
}
