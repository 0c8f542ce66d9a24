//! Barriers, as in the ZooKeeper recipes.
//!
//! - [`Barrier`]: one process holds the barrier up, others [`Barrier::wait`] until it is
//!   released.
//! - [`DoubleBarrier`]: `count` processes [`DoubleBarrier::enter`] and all proceed once the
//!   last one has arrived; they [`DoubleBarrier::leave`] and all proceed once the last one has
//!   left. Arrivals are attached to their sessions, so a process that dies leaves.

use concord_transport::api::{Consistency, KeySpan, RangeRequest};
use concord_transport::watch::{EventKind, WatchRequest};

use super::{check_one_range, prefix_of, read_prefix, wait_deleted};
use crate::{Client, Error, Session};

/// A barrier: the key `name` while it is up.
#[derive(Clone)]
pub struct Barrier {
    client: Client,
    key: Vec<u8>,
}

impl Barrier {
    /// The barrier `name`.
    pub fn new(client: Client, name: &str) -> Self {
        Self {
            client,
            key: name.as_bytes().to_vec(),
        }
    }

    /// Puts the barrier up (idempotent).
    pub async fn hold(&self) -> Result<(), Error> {
        self.client.put(self.key.clone(), "").await.map(|_| ())
    }

    /// Takes the barrier down; waiters proceed.
    pub async fn release(&self) -> Result<(), Error> {
        self.client
            .delete(KeySpan::key(self.key.clone()), false)
            .await
            .map(|_| ())
    }

    /// Returns once the barrier is down (at once if it is not up).
    pub async fn wait(&self) -> Result<(), Error> {
        let read = self.client.get(self.key.clone()).await?;
        if read.kvs.is_empty() {
            return Ok(());
        }
        let revision = read.headers.first().map_or(0, |h| h.revision);
        wait_deleted(&self.client, &self.key, revision).await
    }
}

/// A double barrier for `count` processes: `name/ready` once all have entered, one key per
/// process under `name/waiters/`.
#[derive(Clone)]
pub struct DoubleBarrier {
    client: Client,
    prefix: Vec<u8>,
    count: usize,
}

impl DoubleBarrier {
    /// The double barrier `name` for `count` processes.
    pub fn new(client: Client, name: &str, count: usize) -> Self {
        Self {
            client,
            prefix: prefix_of(name),
            count,
        }
    }

    fn ready_key(&self) -> Vec<u8> {
        [&self.prefix[..], b"ready"].concat()
    }

    fn waiters(&self) -> Vec<u8> {
        [&self.prefix[..], b"waiters/"].concat()
    }

    /// Arrives (attached to `session`) and waits until `count` processes have arrived.
    pub async fn enter(&self, session: &Session) -> Result<(), Error> {
        check_one_range(&self.client, &self.prefix).await?;
        let mut mine = self.waiters();
        mine.extend(format!("{:016x}", session.lease()).into_bytes());
        self.client.put_leased(mine, "", session.lease()).await?;
        let (kvs, revision) = read_prefix(&self.client, &self.prefix).await?;
        let ready = self.ready_key();
        if kvs.iter().any(|kv| kv.key == ready) {
            return Ok(());
        }
        let waiters = self.waiters();
        let arrived = kvs.iter().filter(|kv| kv.key.starts_with(&waiters)).count();
        if arrived >= self.count {
            return self.client.put(ready, "").await.map(|_| ());
        }
        let mut request = WatchRequest::new(KeySpan::key(ready));
        request.start_revision = revision + 1;
        request.no_delete = true;
        let mut watcher = self.client.watch(request).await?;
        match watcher.next().await {
            Some(response) => response.map(|_| ()),
            None => Err(Error::Protocol("watch ended".into())),
        }
    }

    /// Departs and waits until every process has departed; the last one takes the barrier
    /// down so it can be used again.
    pub async fn leave(&self, session: &Session) -> Result<(), Error> {
        let mut mine = self.waiters();
        mine.extend(format!("{:016x}", session.lease()).into_bytes());
        self.client.delete(KeySpan::key(mine), false).await?;
        let waiters = KeySpan::prefix(self.waiters());
        loop {
            let read = self
                .client
                .range(
                    RangeRequest::new(waiters.clone()),
                    Consistency::Linearizable,
                )
                .await?;
            if read.kvs.is_empty() {
                self.client
                    .delete(KeySpan::key(self.ready_key()), false)
                    .await?;
                return Ok(());
            }
            let mut request = WatchRequest::new(waiters.clone());
            request.start_revision = read.headers.first().map_or(0, |h| h.revision) + 1;
            request.no_put = true;
            let mut watcher = self.client.watch(request).await?;
            match watcher.next().await {
                Some(Ok(r)) if r.events.iter().any(|e| e.kind == EventKind::Delete) => {}
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Err(Error::Protocol("watch ended".into())),
            }
        }
    }
}
