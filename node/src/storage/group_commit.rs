//! The node's single durability writer: one WAL sync for the pending appends of all groups.
//!
//! Groups write their log entries unsynced (readable at once, as openraft requires) and hand
//! the IO callback here. The writer thread takes everything queued, syncs the WAL once, then
//! completes every callback of the batch. While a sync runs, new callbacks queue up and form
//! the next batch: the batch grows with the load, so fsyncs per second stay flat as groups
//! and clients grow (the TiKV StoreWriter lesson).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use openraft::storage::IOFlushed;
use rocksdb::DB;

use super::crash_point;
use crate::raft_types::TypeConfig;

/// Most jobs completed by one sync (a limit on everything, STYLE.md 7).
pub const BATCH_JOBS_MAX: usize = 4096;
/// Jobs queued before submitters wait.
pub const QUEUE_JOBS_MAX: usize = 65_536;

enum Job {
    /// A log append to acknowledge to openraft once durable.
    Append(IOFlushed<TypeConfig>),
    /// A caller waiting for durability (votes, snapshot installs).
    Wait(tokio::sync::oneshot::Sender<io::Result<()>>),
}

/// Counters of the writer, exposed for tests and `concordctl status`.
#[derive(Debug, Default)]
pub struct Counters {
    /// WAL syncs performed.
    pub fsyncs: AtomicU64,
    /// Appends made durable.
    pub appends: AtomicU64,
}

/// Handle to the writer thread; cheap to clone through `Arc<Engine>`.
pub struct GroupCommit {
    /// `None` only while dropping.
    tx: Option<Sender<Job>>,
    counters: Arc<Counters>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for GroupCommit {
    /// Stops the writer and waits for it, so that the database is closed when the engine is.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl GroupCommit {
    /// Starts the writer thread for `db`. It ends when the last handle is dropped.
    pub fn start(db: Arc<DB>) -> Self {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_JOBS_MAX);
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let thread = thread::Builder::new()
            .name("group-commit".into())
            .spawn(move || run(db, rx, c))
            .expect("spawning the group-commit thread");
        Self {
            tx: Some(tx),
            counters,
            thread: Some(thread),
        }
    }

    /// The writer's counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    fn submit(&self, job: Job) {
        let tx = self.tx.as_ref().expect("not dropping");
        match tx.try_send(job) {
            Ok(()) => {}
            // Back-pressure: the queue is full, so wait for room (bounded by the writer's pace).
            Err(TrySendError::Full(job)) => tx.send(job).expect("group-commit writer alive"),
            Err(TrySendError::Disconnected(_)) => panic!("group-commit writer stopped"),
        }
    }

    /// Completes `callback` once everything written before this call is durable.
    pub fn after_sync(&self, callback: IOFlushed<TypeConfig>) {
        self.submit(Job::Append(callback));
    }

    /// Returns once everything written before this call is durable.
    pub async fn sync(&self) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Job::Wait(tx));
        rx.await
            .map_err(|_| io::Error::other("group-commit writer stopped"))?
    }
}

/// A failed fsync leaves what is durable unknown (the kernel may have dropped the dirty pages
/// it could not write), so no write of the batch may be acknowledged and the log may not be
/// trusted past the last good sync: the process stops at once, as etcd and PostgreSQL do, and
/// a restart recovers from what is on disk.
fn fsync_failed(e: impl std::fmt::Display) -> ! {
    super::storage_failed("fsync of the write-ahead log", e)
}

fn run(db: Arc<DB>, rx: Receiver<Job>, counters: Arc<Counters>) {
    let mut batch = Vec::with_capacity(BATCH_JOBS_MAX);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < BATCH_JOBS_MAX {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        crash_point("group-commit-before-sync");
        let result = db.flush_wal(true);
        fail::fail_point!("group-commit-sync-error", |_| {
            fsync_failed("injected by the group-commit-sync-error fail point")
        });
        if let Err(e) = result {
            fsync_failed(e);
        }
        crash_point("group-commit-after-sync");
        counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        // Past here the sync succeeded: a failed one never returns.
        let mut appends = 0;
        for job in batch.drain(..) {
            match job {
                Job::Append(cb) => {
                    appends += 1;
                    cb.io_completed(Ok(()));
                }
                Job::Wait(tx) => {
                    let _ = tx.send(Ok(()));
                }
            }
        }
        counters.appends.fetch_add(appends, Ordering::Relaxed);
    }
}
