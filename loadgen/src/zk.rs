//! ZooKeeper as a target, through the `zookeeper-client` crate.
//!
//! The mapping (docs/benchmarks/mapping.md):
//! - **Keys.** A key is a znode under [`ROOT`]: each `/`-separated segment of the key is one
//!   level of the path, with every byte outside `[A-Za-z0-9._-]` written `%XX` (an empty
//!   segment is `%`, and `.`/`..` are escaped whole), so keys under a prefix ending in `/`
//!   are the znodes under one parent, which a ZooKeeper user would watch.
//! - **Key-value.** `put` is `set_data` (the znode and its parents are created on first use:
//!   the `put` workload pre-creates them, unmeasured); `get` is `get_data`, after `sync` for a
//!   linearizable read (ZooKeeper serves reads from the server a session is connected to,
//!   which is comparable with concord's `serializable`); the compare-and-swap of `txn-cas` is
//!   `set_data` with the expected version. A znode's version counts from 0 at creation, so
//!   the "modification revision" reported is version + 1 and 0 still means "absent".
//! - **Leases** are sessions: a lease is a session of its own with the lease's TTL as session
//!   timeout, its keys ephemeral znodes. The client pings by itself, so a keep-alive is a look
//!   at the session's state; a lease let go is a session whose connection is dropped without
//!   closing it (so it expires, as an unrenewed lease does); a revoke closes the session.
//! - **Sessions, locks, membership.** A session is a ZooKeeper session. A lock is the
//!   sequential-ephemeral recipe (a `lock-` child per contender, each waiting on the deletion
//!   of the one before it); a fenced write is a multi of "my lock znode still exists" and the
//!   write. A member is an ephemeral znode under its group.
//! - **Watches** are persistent recursive watches (`addWatch`, ZooKeeper 3.6+), one session
//!   per watcher because ZooKeeper keeps one watch per session and path (as each machine of a
//!   fleet has its own session). ZooKeeper events carry no data and have no server-side
//!   filters: a watcher that needs a value reads it, and a deletes-only watch drops the other
//!   events itself.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt};
use futures::stream::{FuturesOrdered, StreamExt};
use tokio::sync::mpsc;
use zookeeper_client as zk;

use crate::store::{Change, OpError, Versioned};

/// Parent of every znode the load generator writes.
pub const ROOT: &str = "/concord-loadgen";

const PERSISTENT: zk::CreateOptions<'static> =
    zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
const EPHEMERAL: zk::CreateOptions<'static> =
    zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
const EPHEMERAL_SEQUENTIAL: zk::CreateOptions<'static> =
    zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all());

/// Name of a contender's znode under a lock (ZooKeeper appends a 10-digit sequence).
const LOCK_CHILD: &str = "lock-";

/// One ZooKeeper session (its clones share it, and pipeline their requests on its
/// connection), and what opens the sessions of leases, locks, members and watchers.
#[derive(Clone)]
pub struct ZkStore {
    client: zk::Client,
    /// The ensemble, `HOST:PORT,...`.
    cluster: Arc<str>,
    /// Session timeout of this session and of the watchers' sessions.
    session_timeout: Duration,
    /// Longest wait for one request's answer (the crate has no per-request timeout).
    timeout: Duration,
    /// Leases (sessions, detached so that one let go expires) by id; shared by every store
    /// of a run, as concord's leases are reachable from any connection.
    leases: Arc<Mutex<HashMap<i64, zk::Client>>>,
}

/// A session of a lock holder or a member: its ephemeral znodes live as long as it does.
pub struct ZkSession {
    client: zk::Client,
}

/// A lock held: the holder's session and its contender znode.
pub struct ZkHeld {
    client: zk::Client,
    path: String,
}

/// A persistent recursive watch, on a session of its own.
pub struct ZkWatch {
    client: zk::Client,
    watcher: zk::PersistentWatcher,
    deletes_only: bool,
    /// Set once the session ended (the watcher must not be polled again).
    ended: bool,
}

/// The error's kind, `ZK_` and the variant (`ZK_CONNECTIONLOSS`, `ZK_BADVERSION`, ...).
fn zk_error(e: zk::Error) -> OpError {
    let text = format!("{e:?}");
    let variant = text.split(['(', ' ', '{']).next().unwrap_or("ERROR");
    format!("ZK_{}", variant.to_uppercase())
}

/// Appends `/` and the escaped `segment` to `path`.
fn push_segment(path: &mut String, segment: &[u8]) {
    path.push('/');
    if segment.is_empty() {
        path.push('%');
        return;
    }
    // `.` and `..` are not valid znode names.
    let dots = segment == b"." || segment == b"..";
    for &b in segment {
        if !dots && (b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
            path.push(b as char);
        } else {
            let _ = write!(path, "%{b:02X}");
        }
    }
}

/// The znode of `key`.
pub fn path_of(key: &[u8]) -> String {
    let mut path = String::with_capacity(ROOT.len() + 1 + key.len() * 2);
    path.push_str(ROOT);
    for segment in key.split(|b| *b == b'/') {
        push_segment(&mut path, segment);
    }
    path
}

/// The key whose znode is `path` (the inverse of [`path_of`]); none for a path outside
/// [`ROOT`] or not written by [`path_of`].
pub fn key_of_path(path: &str) -> Option<Vec<u8>> {
    let rest = path.strip_prefix(ROOT)?.strip_prefix('/')?;
    let mut key = Vec::with_capacity(rest.len());
    for (i, segment) in rest.split('/').enumerate() {
        if i > 0 {
            key.push(b'/');
        }
        if segment == "%" {
            continue;
        }
        let mut bytes = segment.bytes();
        while let Some(b) = bytes.next() {
            if b == b'%' {
                let hex = [bytes.next()?, bytes.next()?];
                key.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            } else {
                key.push(b);
            }
        }
    }
    Some(key)
}

/// The znode holding the keys that start with `prefix`, which must be empty (every key:
/// [`ROOT`]) or end with `/`.
pub fn dir_of_prefix(prefix: &[u8]) -> Result<String, OpError> {
    if prefix.is_empty() {
        return Ok(ROOT.to_string());
    }
    match prefix.strip_suffix(b"/") {
        Some(dir) => Ok(path_of(dir)),
        None => Err("ZK_PREFIX_NOT_ENDING_IN_SLASH".into()),
    }
}

fn parent(path: &str) -> &str {
    &path[..path.rfind('/').unwrap_or(0)]
}

/// Creates `path`, and its missing parents (persistent) if it has any.
async fn create_in(
    client: &zk::Client,
    path: &str,
    data: &[u8],
    options: &zk::CreateOptions<'_>,
) -> Result<zk::CreateSequence, zk::Error> {
    match client.create(path, data, options).await {
        Err(zk::Error::NoNode) => {
            client.mkdir(parent(path), &PERSISTENT).await?;
            client.create(path, data, options).await.map(|(_, s)| s)
        }
        created => created.map(|(_, s)| s),
    }
}

/// Waits (at most `limit`) until the session of the dropped clients that `state` watched
/// has ended: its close request answered, its ephemeral znodes deleted.
async fn session_ended(mut state: zk::StateWatcher, limit: Duration) -> Result<(), OpError> {
    if state.peek_state().is_terminated() {
        return Ok(());
    }
    tokio::time::timeout(limit, async {
        while !state.changed().await.is_terminated() {}
    })
    .await
    .map_err(|_| "ZK_CLOSE_TIMEOUT".into())
}

/// Bounds `op` by `timeout`: `ZK_REQUEST_TIMEOUT` after it.
async fn bounded<T>(
    timeout: Duration,
    op: impl Future<Output = Result<T, OpError>>,
) -> Result<T, OpError> {
    tokio::time::timeout(timeout, op)
        .await
        .unwrap_or_else(|_| Err("ZK_REQUEST_TIMEOUT".into()))
}

impl ZkStore {
    /// Opens `connections` sessions on the ensemble `endpoints` (HOST:PORT, loopback) with
    /// `session_timeout`, each request bounded by `timeout`, and makes sure [`ROOT`] exists.
    pub async fn connect(
        endpoints: &[String],
        connections: usize,
        session_timeout: Duration,
        timeout: Duration,
    ) -> anyhow::Result<Vec<ZkStore>> {
        let cluster: Arc<str> = endpoints.join(",").into();
        let leases = Arc::default();
        let mut stores = Vec::with_capacity(connections);
        for _ in 0..connections {
            let client = zk::Client::connector()
                .with_session_timeout(session_timeout)
                .connect(&cluster)
                .await?;
            stores.push(ZkStore {
                client,
                cluster: cluster.clone(),
                session_timeout,
                timeout,
                leases: Arc::clone(&leases),
            });
        }
        if let Some(first) = stores.first() {
            match first.client.create(ROOT, b"", &PERSISTENT).await {
                Ok(_) | Err(zk::Error::NodeExists) => {}
                Err(e) => anyhow::bail!("creating {ROOT}: {e}"),
            }
        }
        Ok(stores)
    }

    async fn bounded<T>(&self, op: impl Future<Output = Result<T, OpError>>) -> Result<T, OpError> {
        bounded(self.timeout, op).await
    }

    /// Opens a new session of `ttl`; `detached`: dropping it does not close it.
    async fn open_session(&self, ttl: Duration, detached: bool) -> Result<zk::Client, OpError> {
        let mut connector = zk::Client::connector().with_session_timeout(ttl);
        if detached {
            connector = connector.with_detached();
        }
        let client = self
            .bounded(async { connector.connect(&self.cluster).await.map_err(zk_error) })
            .await?;
        // The servers clamp the timeout to [minSessionTimeout, maxSessionTimeout]: a session
        // living longer than asked would not be the lease asked for.
        if client.session_timeout() != ttl {
            return Err(format!(
                "ZK_SESSION_TIMEOUT_{}MS_NOT_{}MS",
                client.session_timeout().as_millis(),
                ttl.as_millis()
            ));
        }
        Ok(client)
    }

    /// `set_data`, creating the znode (and its parents) if it does not exist yet.
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), OpError> {
        self.bounded(self.put_unbounded(key, value)).await
    }

    /// `get_data`; after `sync` of the znode when `linearizable`.
    pub async fn get(&self, key: &[u8], linearizable: bool) -> Result<Option<Versioned>, OpError> {
        self.bounded(self.get_unbounded(key, linearizable)).await
    }

    /// Sets `value` if the znode's version is still `expected` - 1 (`expected` 0: creates it
    /// if absent). Returns whether it did.
    pub async fn cas(&self, key: &[u8], expected: i64, value: &[u8]) -> Result<bool, OpError> {
        self.bounded(self.cas_unbounded(key, expected, value)).await
    }

    async fn put_unbounded(&self, key: &[u8], value: &[u8]) -> Result<(), OpError> {
        let path = path_of(key);
        match self.client.set_data(&path, value, None).await {
            Ok(_) => Ok(()),
            Err(zk::Error::NoNode) => {
                match create_in(&self.client, &path, value, &PERSISTENT).await {
                    Ok(_) => Ok(()),
                    // Created meanwhile by another client: set it.
                    Err(zk::Error::NodeExists) => self
                        .client
                        .set_data(&path, value, None)
                        .await
                        .map(drop)
                        .map_err(zk_error),
                    Err(e) => Err(zk_error(e)),
                }
            }
            Err(e) => Err(zk_error(e)),
        }
    }

    async fn get_unbounded(
        &self,
        key: &[u8],
        linearizable: bool,
    ) -> Result<Option<Versioned>, OpError> {
        let path = path_of(key);
        if linearizable {
            self.client.sync(&path).await.map_err(zk_error)?;
        }
        match self.client.get_data(&path).await {
            Ok((value, stat)) => Ok(Some(Versioned {
                value,
                mod_revision: i64::from(stat.version) + 1,
            })),
            Err(zk::Error::NoNode) => Ok(None),
            Err(e) => Err(zk_error(e)),
        }
    }

    async fn cas_unbounded(
        &self,
        key: &[u8],
        expected: i64,
        value: &[u8],
    ) -> Result<bool, OpError> {
        let path = path_of(key);
        if expected == 0 {
            return match create_in(&self.client, &path, value, &PERSISTENT).await {
                Ok(_) => Ok(true),
                Err(zk::Error::NodeExists) => Ok(false),
                Err(e) => Err(zk_error(e)),
            };
        }
        let version = i32::try_from(expected - 1).map_err(|_| "ZK_VERSION_OUT_OF_RANGE")?;
        match self.client.set_data(&path, value, Some(version)).await {
            Ok(_) => Ok(true),
            Err(zk::Error::BadVersion | zk::Error::NoNode) => Ok(false),
            Err(e) => Err(zk_error(e)),
        }
    }

    /// A lease of `ttl`: a detached session of that timeout; its id is the session id.
    pub async fn lease_grant(&self, ttl: Duration) -> Result<i64, OpError> {
        let client = self.open_session(ttl, true).await?;
        let id = client.session_id().0;
        self.leases.lock().expect("leases lock").insert(id, client);
        Ok(id)
    }

    fn lease(&self, id: i64) -> Result<zk::Client, OpError> {
        let leases = self.leases.lock().expect("leases lock");
        leases
            .get(&id)
            .cloned()
            .ok_or_else(|| "ZK_LEASE_NOT_FOUND".into())
    }

    /// Creates `key` as an ephemeral znode of lease `id`'s session.
    pub async fn put_ephemeral(&self, id: i64, key: &[u8], value: &[u8]) -> Result<(), OpError> {
        let client = self.lease(id)?;
        self.bounded(async {
            create_in(&client, &path_of(key), value, &EPHEMERAL)
                .await
                .map(drop)
                .map_err(zk_error)
        })
        .await
    }

    /// Which of `ids` are alive (the client pings them) and which ended.
    pub fn lease_states(&self, ids: &[i64]) -> (Vec<i64>, Vec<i64>) {
        let leases = self.leases.lock().expect("leases lock");
        ids.iter()
            .partition(|id| leases.get(id).is_some_and(|c| !c.state().is_terminated()))
    }

    /// Stops keeping lease `id` alive: one last request tells the server the session is
    /// alive now, then the connection is dropped without closing the session, which
    /// therefore expires one session timeout after the instant returned.
    pub async fn lease_abandon(&self, id: i64) -> Result<Instant, OpError> {
        let client = self.leases.lock().expect("leases lock").remove(&id);
        let client = client.ok_or("ZK_LEASE_NOT_FOUND")?;
        let sent = Instant::now();
        self.bounded(async { client.check_stat(ROOT).await.map(drop).map_err(zk_error) })
            .await?;
        Ok(sent)
    }

    /// Closes lease `id`'s session (its ephemeral znodes are deleted). The session was
    /// opened detached, so it is resumed on a new connection that closes it when dropped.
    pub async fn lease_revoke(&self, id: i64) -> Result<(), OpError> {
        let client = self.leases.lock().expect("leases lock").remove(&id);
        let client = client.ok_or("ZK_LEASE_NOT_FOUND")?;
        let ttl = client.session_timeout();
        let resumed = self
            .bounded(async {
                zk::Client::connector()
                    .with_session_timeout(ttl)
                    .with_session(client.into_session())
                    .connect(&self.cluster)
                    .await
                    .map_err(zk_error)
            })
            .await?;
        let state = resumed.state_watcher();
        drop(resumed);
        session_ended(state, self.timeout).await
    }

    /// Opens a session of `ttl` (closed when [`ZkStore::close_session`] is called or
    /// dropped).
    pub async fn session(&self, ttl: Duration) -> Result<ZkSession, OpError> {
        Ok(ZkSession {
            client: self.open_session(ttl, false).await?,
        })
    }

    /// Closes `session` and waits until its ephemeral znodes are gone.
    pub async fn close_session(&self, session: ZkSession) -> Result<(), OpError> {
        let state = session.client.state_watcher();
        drop(session);
        session_ended(state, self.timeout).await
    }

    /// Waits for the lock `name` under `session`: the sequential-ephemeral recipe. Not
    /// bounded here: a contender waits as long as the holders before it hold (callers
    /// bound it).
    pub async fn lock(&self, name: &str, session: &ZkSession) -> Result<ZkHeld, OpError> {
        let client = &session.client;
        let dir = path_of(name.as_bytes());
        let contender = format!("{dir}/{LOCK_CHILD}");
        let sequence = self
            .bounded(async {
                create_in(client, &contender, b"", &EPHEMERAL_SEQUENTIAL)
                    .await
                    .map_err(zk_error)
            })
            .await?;
        let mine = format!("{LOCK_CHILD}{sequence}");
        loop {
            let mut children = self
                .bounded(async { client.list_children(&dir).await.map_err(zk_error) })
                .await?;
            children.retain(|c| c.starts_with(LOCK_CHILD));
            children.sort_unstable();
            let at = children
                .iter()
                .position(|c| *c == mine)
                .ok_or("ZK_LOCK_CONTENDER_LOST")?;
            if at == 0 {
                return Ok(ZkHeld {
                    client: client.clone(),
                    path: format!("{dir}/{mine}"),
                });
            }
            // Wait for the contender just before this one to go.
            let before = format!("{dir}/{}", children[at - 1]);
            let (stat, watcher) = self
                .bounded(async { client.check_and_watch_stat(&before).await.map_err(zk_error) })
                .await?;
            if stat.is_some() {
                watcher.changed().await;
            }
        }
    }

    /// Puts `value` at `key` in one multi with "`held`'s contender znode still exists"
    /// (`FENCED` if it does not: the lock was lost with its session).
    pub async fn fenced_put(&self, held: &ZkHeld, key: &[u8], value: &[u8]) -> Result<(), OpError> {
        let path = path_of(key);
        let attempt = |create: bool| {
            let path = path.as_str();
            async move {
                let mut writer = held
                    .client
                    .new_check_writer(&held.path, Some(0))
                    .map_err(|e| zk::CheckWriteError::RequestFailed { source: e })?;
                let added = if create {
                    writer.add_create(path, value, &PERSISTENT)
                } else {
                    writer.add_set_data(path, value, None)
                };
                added.map_err(|e| zk::CheckWriteError::RequestFailed { source: e })?;
                writer.commit().await.map(drop)
            }
        };
        let outcome = |r: Result<(), zk::CheckWriteError>| match r {
            Ok(()) => Ok(None),
            Err(zk::CheckWriteError::CheckFailed { .. }) => Err("FENCED".to_string()),
            Err(zk::CheckWriteError::OperationFailed { source, .. }) => Ok(Some(source)),
            Err(zk::CheckWriteError::RequestFailed { source }) => Err(zk_error(source)),
        };
        self.bounded(async {
            match outcome(attempt(false).await)? {
                None => Ok(()),
                Some(zk::Error::NoNode) => {
                    // First write of this key: create it (and its parents).
                    self.client
                        .mkdir(parent(&path), &PERSISTENT)
                        .await
                        .map_err(zk_error)?;
                    match outcome(attempt(true).await)? {
                        None => Ok(()),
                        Some(e) => Err(zk_error(e)),
                    }
                }
                Some(e) => Err(zk_error(e)),
            }
        })
        .await
    }

    /// Releases a lock: deletes its contender znode.
    pub async fn unlock(&self, held: ZkHeld) -> Result<(), OpError> {
        self.bounded(async { held.client.delete(&held.path, None).await.map_err(zk_error) })
            .await
    }

    /// Registers `key` as an ephemeral znode of `session` holding `value`.
    pub async fn register(
        &self,
        key: &[u8],
        value: &[u8],
        session: &ZkSession,
    ) -> Result<(), OpError> {
        self.bounded(async {
            create_in(&session.client, &path_of(key), value, &EPHEMERAL)
                .await
                .map(drop)
                .map_err(zk_error)
        })
        .await
    }

    /// Opens `count` watchers of the keys under `prefix`, each a persistent recursive watch
    /// on a session of its own; `deletes_only` drops the other events.
    pub async fn watch_prefix_many(
        &self,
        prefix: &[u8],
        count: usize,
        deletes_only: bool,
    ) -> Result<Vec<ZkWatch>, OpError> {
        /// How many watchers connect at once.
        const OPENING_CONCURRENCY: usize = 64;
        let dir = dir_of_prefix(prefix)?;
        self.bounded(async { self.client.mkdir(&dir, &PERSISTENT).await.map_err(zk_error) })
            .await?;
        let open = |_| {
            let dir = dir.clone();
            async move {
                let client = self.open_session(self.session_timeout, false).await?;
                let watcher = self
                    .bounded(async {
                        client
                            .watch(&dir, zk::AddWatchMode::PersistentRecursive)
                            .await
                            .map_err(zk_error)
                    })
                    .await?;
                Ok::<_, OpError>(ZkWatch {
                    client,
                    watcher,
                    deletes_only,
                    ended: false,
                })
            }
        };
        use futures::stream::{self, TryStreamExt};
        stream::iter(0..count)
            .map(open)
            .buffer_unordered(OPENING_CONCURRENCY)
            .try_collect()
            .await
    }
}

impl ZkWatch {
    /// The next change (one per ZooKeeper event); `None` once the session ended.
    pub async fn next(&mut self) -> Option<Result<Vec<Change>, OpError>> {
        loop {
            if self.ended {
                return None;
            }
            let event = self.watcher.changed().await;
            let deleted = match event.event_type {
                zk::EventType::Session => {
                    if event.session_state.is_terminated() {
                        self.ended = true;
                        return Some(Err(
                            format!("ZK_SESSION_{:?}", event.session_state).to_uppercase()
                        ));
                    }
                    continue;
                }
                zk::EventType::NodeDeleted => true,
                zk::EventType::NodeCreated | zk::EventType::NodeDataChanged => false,
                zk::EventType::NodeChildrenChanged => continue,
            };
            if self.deletes_only && !deleted {
                continue;
            }
            let Some(key) = key_of_path(&event.path) else {
                continue;
            };
            return Some(Ok(vec![Change {
                deleted,
                key,
                value: Vec::new(),
            }]));
        }
    }

    /// Turns this watch of a group's znode (keys `GROUP/ID`, the group `prefix_len` bytes
    /// long with its `/`) into the group's member changes, in order, fed by the task
    /// returned. A join's metadata is read with `getData` (ZooKeeper's events carry no data);
    /// the reads are pipelined on the session, as Curator's caches do, so a burst of joins
    /// costs about one round trip rather than one each. A member gone before its read has
    /// empty metadata.
    pub fn into_members(
        mut self,
        prefix_len: usize,
    ) -> (
        mpsc::Receiver<Result<ZkMember, OpError>>,
        tokio::task::JoinHandle<()>,
    ) {
        let (sender, receiver) = mpsc::channel(MEMBER_CHANGES_BUFFERED);
        let feed = tokio::spawn(async move {
            let client = self.client.clone();
            let mut pending: FuturesOrdered<BoxFuture<'static, Result<ZkMember, OpError>>> =
                FuturesOrdered::new();
            let mut open = true;
            loop {
                tokio::select! {
                    changes = self.next(), if open => match changes {
                        Some(Ok(changes)) => {
                            for c in changes {
                                // Only the group's children are members.
                                let Some(id) =
                                    c.key.get(prefix_len..).filter(|id| !id.contains(&b'/'))
                                else {
                                    continue;
                                };
                                let id = String::from_utf8_lossy(id).into_owned();
                                let (client, path, left) = (client.clone(), path_of(&c.key), c.deleted);
                                pending.push_back(
                                    async move {
                                        let metadata = match left {
                                            true => Vec::new(),
                                            false => client
                                                .get_data(&path)
                                                .await
                                                .map(|(value, _)| value)
                                                .unwrap_or_default(),
                                        };
                                        Ok(ZkMember { id, left, metadata })
                                    }
                                    .boxed(),
                                );
                            }
                        }
                        Some(Err(kind)) => {
                            pending.push_back(async move { Err(kind) }.boxed());
                            open = false;
                        }
                        None => open = false,
                    },
                    Some(member) = pending.next(), if !pending.is_empty() => {
                        if sender.send(member).await.is_err() {
                            return;
                        }
                    }
                    else => return,
                }
            }
        });
        (receiver, feed)
    }
}

/// A change of a ZooKeeper membership group.
pub struct ZkMember {
    /// The member's id (its znode's name).
    pub id: String,
    /// True if it left (its znode was deleted).
    pub left: bool,
    /// Its metadata (its znode's data; empty when it left).
    pub metadata: Vec<u8>,
}

/// Most member changes buffered between a member feed and its reader.
const MEMBER_CHANGES_BUFFERED: usize = 65_536;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn key_segments_become_path_levels() {
        assert_eq!(
            path_of(b"a/loadgen/000000000001"),
            "/concord-loadgen/a/loadgen/000000000001"
        );
        assert_eq!(path_of(b"k.v_1-2"), "/concord-loadgen/k.v_1-2");
        assert_eq!(path_of(b"%"), "/concord-loadgen/%25");
        assert_eq!(path_of(b"a//b/"), "/concord-loadgen/a/%/b/%");
        assert_eq!(path_of(b"./.."), "/concord-loadgen/%2E/%2E%2E");
        assert_ne!(path_of(b"a/b"), path_of(b"a%2Fb"));
    }

    #[test]
    fn a_prefix_ending_in_slash_is_a_parent_znode() {
        assert_eq!(dir_of_prefix(b"").unwrap(), ROOT);
        assert_eq!(
            dir_of_prefix(b"t/fanout/").unwrap(),
            "/concord-loadgen/t/fanout"
        );
        assert!(dir_of_prefix(b"t/fan").is_err());
        assert_eq!(key_of_path("/elsewhere/a"), None);
        assert_eq!(key_of_path("/concord-loadgen/a/%4"), None);
    }

    proptest! {
        #[test]
        fn path_of_round_trips(key in proptest::collection::vec(any::<u8>(), 0..40)) {
            prop_assert_eq!(key_of_path(&path_of(&key)), Some(key));
        }

        #[test]
        fn keys_under_a_prefix_are_znodes_under_its_dir(
            dir in proptest::collection::vec(any::<u8>(), 0..12),
            rest in proptest::collection::vec(any::<u8>(), 0..12),
        ) {
            let mut prefix = dir;
            prefix.push(b'/');
            let mut key = prefix.clone();
            key.extend(rest);
            let under = format!("{}/", dir_of_prefix(&prefix).unwrap());
            prop_assert!(path_of(&key).starts_with(&under));
        }
    }
}
