//! The systems under test behind one interface: concord (the client library over QUIC), etcd
//! (the `etcd-client` crate over gRPC) and ZooKeeper (the `zookeeper-client` crate, see
//! [`crate::zk`]). A workload is written once against [`Store`];
//! each operation is the one a user of that system would issue for the same job, and the
//! mapping is documented in `docs/benchmarks/mapping.md`.
//!
//! Errors are reduced to a kind (concord's error code, or etcd's gRPC status code) so a
//! report can count them by kind.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use concord_client::api::{
    Compare, CompareOp, CompareTarget, Consistency, KeySpan, PutRequest, RangeRequest, TxnOp,
    TxnRequest,
};
use concord_client::watch_api::{EventKind, WatchRequest};
use concord_client::{Client, ClientConfig, LockGuard, MemberEvent, Membership, Session};
use etcd_client as etcd;
use futures::stream::{self, StreamExt};
use tokio::sync::Mutex;

use crate::zk::{ZkHeld, ZkMember, ZkSession, ZkStore, ZkWatch};

/// An operation's failure, by kind (`NOT_LEADER`, `GRPC_UNAVAILABLE`, ...).
pub type OpError = String;

/// One connection to the system under test; cheap to clone (clones share the connection).
#[derive(Clone)]
pub enum Store {
    /// A concord client (one QUIC connection per node it talks to).
    Concord(Client),
    /// An etcd client (one gRPC channel balanced over the endpoints).
    Etcd(Arc<EtcdStore>),
    /// A ZooKeeper session (connected to one server of the ensemble, picked at random).
    Zookeeper(ZkStore),
}

/// What a ZooKeeper store answers to an operation ZooKeeper has no equivalent of.
pub const UNSUPPORTED_ON_ZOOKEEPER: &str = "UNSUPPORTED_ON_ZOOKEEPER";

/// An etcd client and the keep-alive streams of the leases it renews.
pub struct EtcdStore {
    /// The gRPC client (its per-service clients are cheap clones).
    client: etcd::Client,
    /// Longest wait for a message on a stream (tonic's timeout covers only a call's start).
    timeout: Duration,
    /// etcd-client opens one keep-alive stream per lease; they are kept and reused.
    keepers: Mutex<HashMap<i64, Keeper>>,
}

type Keeper = (etcd::LeaseKeeper, etcd::LeaseKeepAliveStream);

/// A key's current value and modification revision.
pub struct Versioned {
    /// The value.
    pub value: Vec<u8>,
    /// The revision of the key's last modification.
    pub mod_revision: i64,
}

/// A change seen by a watch.
pub struct Change {
    /// True for a deletion, false for a put.
    pub deleted: bool,
    /// The key.
    pub key: Vec<u8>,
    /// The value put (empty for a deletion).
    pub value: Vec<u8>,
}

/// A change seen by a watch, read in place.
pub struct ChangeRef<'a> {
    /// True for a deletion, false for a put.
    pub deleted: bool,
    /// The key.
    pub key: &'a [u8],
    /// The value put (empty for a deletion).
    pub value: &'a [u8],
}

/// The changes of one watch response. concord's are the client library's shared events, read
/// in place: with 100,000 watchers of one prefix, copying every key and value once per
/// watcher would cost the load generator more than the watches cost the cluster.
pub enum Changes {
    /// concord's events, shared with every other watcher of the same span.
    Shared(concord_client::Events),
    /// etcd's and ZooKeeper's, copied out of their messages.
    Owned(Vec<Change>),
}

impl Changes {
    /// How many changes.
    pub fn len(&self) -> usize {
        match self {
            Changes::Shared(events) => events.len(),
            Changes::Owned(changes) => changes.len(),
        }
    }

    /// The changes, in order.
    pub fn iter(&self) -> impl Iterator<Item = ChangeRef<'_>> {
        let (shared, owned): (&[_], &[_]) = match self {
            Changes::Shared(events) => (events, &[]),
            Changes::Owned(changes) => (&[], changes),
        };
        let shared = shared.iter().map(|e| ChangeRef {
            deleted: e.kind == EventKind::Delete,
            key: &e.kv.key,
            value: &e.kv.value,
        });
        let owned = owned.iter().map(|c| ChangeRef {
            deleted: c.deleted,
            key: &c.key,
            value: &c.value,
        });
        shared.chain(owned)
    }
}

/// A watch of one prefix.
#[expect(
    clippy::large_enum_variant,
    reason = "a concord watcher keeps its one-range state inline so that a wake-up reads the \
              task's own memory; boxing it adds a fetch per wake-up to 100,000 listeners"
)]
pub enum Watch {
    /// A concord watch (the client library merges the ranges' streams).
    Concord(concord_client::Watcher),
    /// An etcd watch stream.
    Etcd(Box<etcd::WatchStream>),
    /// A ZooKeeper persistent recursive watch (events carry no value).
    Zookeeper(Box<ZkWatch>),
}

/// A lease kept alive in the background until closed (concord's session recipe; on etcd a
/// lease and one keep-alive stream, as etcd's `concurrency.Session`).
pub enum StoreSession {
    /// A concord session.
    Concord(Session),
    /// An etcd lease and the task renewing it.
    Etcd {
        /// The lease.
        lease: i64,
        /// Renews the lease every TTL/3 until dropped.
        keeper: TaskGuard,
    },
    /// A ZooKeeper session of that timeout.
    Zookeeper(ZkSession),
}

/// A store's background task (the renewals of an etcd session's lease, the feed of a
/// ZooKeeper member watch); stopped when dropped (so a dropped etcd session stops being
/// renewed and expires, as a dropped concord session does).
pub struct TaskGuard(tokio::task::JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A lock held (concord's mutex recipe; on etcd the lock RPC's key).
pub enum Held {
    /// A concord lock guard (fencing token, fenced writes).
    Concord(LockGuard),
    /// The key etcd's lock RPC created for this holder.
    Etcd(Vec<u8>),
    /// The holder's contender znode (ZooKeeper's lock recipe).
    Zookeeper(ZkHeld),
}

/// A watch of a membership group: joins, updates and departures by member id.
pub enum MemberWatch {
    /// concord's membership recipe.
    Concord(concord_client::MemberWatcher),
    /// A watch of the group's prefix, whose length is kept to cut the ids out of the keys.
    Etcd(Watch, usize),
    /// The member changes of a watch of the group's znode (see [`ZkWatch::into_members`]),
    /// and the task feeding them.
    Zookeeper {
        /// The changes.
        members: tokio::sync::mpsc::Receiver<Result<ZkMember, OpError>>,
        /// The feed, stopped when the watch is dropped.
        _feed: TaskGuard,
    },
}

/// A change of a membership group.
pub struct MemberChange {
    /// The member's id.
    pub id: String,
    /// True if it left, false if it joined or changed its metadata.
    pub left: bool,
    /// Its metadata (empty when it left).
    pub metadata: Vec<u8>,
}

/// How many etcd keep-alive round trips run at once.
const ETCD_KEEPALIVE_CONCURRENCY: usize = 256;

fn etcd_error(e: etcd::Error) -> OpError {
    match e {
        etcd::Error::GRpcStatus(s) => format!("GRPC_{:?}", s.code()).to_uppercase(),
        other => format!("ETCD_{}", error_variant(&other)),
    }
}

/// The variant name of an etcd-client error (its Debug text up to the first parenthesis).
fn error_variant(e: &etcd::Error) -> String {
    let text = format!("{e:?}");
    text.split(['(', ' ', '{'])
        .next()
        .unwrap_or("ERROR")
        .to_uppercase()
}

fn concord_error(e: concord_client::Error) -> OpError {
    e.code().to_string()
}

impl Store {
    /// Connects `connections` clients to concord, from a client config file.
    pub async fn concord(config: &ClientConfig, connections: usize) -> anyhow::Result<Vec<Store>> {
        let mut stores = Vec::with_capacity(connections);
        for _ in 0..connections {
            stores.push(Store::Concord(Client::connect(config.clone()).await?));
        }
        Ok(stores)
    }

    /// Connects `connections` clients to etcd at `endpoints` (HOST:PORT, loopback), with the
    /// same timeouts as concord's client: `timeout` per request, `connect_timeout` to connect.
    pub async fn etcd(
        endpoints: &[String],
        connections: usize,
        timeout: Duration,
        connect_timeout: Duration,
    ) -> anyhow::Result<Vec<Store>> {
        let mut stores = Vec::with_capacity(connections);
        let options = etcd::ConnectOptions::new()
            .with_connect_timeout(connect_timeout)
            .with_timeout(timeout);
        for _ in 0..connections {
            let client = etcd::Client::connect(endpoints, Some(options.clone())).await?;
            stores.push(Store::Etcd(Arc::new(EtcdStore {
                client,
                timeout,
                keepers: Mutex::default(),
            })));
        }
        Ok(stores)
    }

    /// The concord client, for what only concord reports (its nodes' gauges).
    pub fn as_concord(&self) -> Option<&Client> {
        match self {
            Store::Concord(c) => Some(c),
            Store::Etcd(_) | Store::Zookeeper(_) => None,
        }
    }

    /// Whether a put expects its key to exist (ZooKeeper's set_data), so a put workload
    /// creates its keys before measuring.
    pub fn puts_need_existing_keys(&self) -> bool {
        matches!(self, Store::Zookeeper(_))
    }

    /// Puts `value` at `key`, attached to `lease` unless it is 0.
    pub async fn put(&self, key: Vec<u8>, value: Vec<u8>, lease: i64) -> Result<(), OpError> {
        match self {
            Store::Concord(c) => c
                .put_with(PutRequest {
                    key,
                    value,
                    lease,
                    prev_kv: false,
                })
                .await
                .map(drop)
                .map_err(concord_error),
            Store::Etcd(e) => {
                let options = (lease != 0).then(|| etcd::PutOptions::new().with_lease(lease));
                e.client
                    .kv_client()
                    .put(key, value, options)
                    .await
                    .map(drop)
                    .map_err(etcd_error)
            }
            Store::Zookeeper(z) if lease != 0 => z.put_ephemeral(lease, &key, &value).await,
            Store::Zookeeper(z) => z.put(&key, &value).await,
        }
    }

    /// Reads `key` at `consistency`. etcd has no follower reads: `follower` is refused.
    pub async fn get(
        &self,
        key: Vec<u8>,
        consistency: Consistency,
    ) -> Result<Option<Versioned>, OpError> {
        match self {
            Store::Concord(c) => {
                let result = c
                    .range(RangeRequest::new(KeySpan::key(key)), consistency)
                    .await
                    .map_err(concord_error)?;
                Ok(result.kvs.into_iter().next().map(|kv| Versioned {
                    value: kv.value,
                    mod_revision: kv.mod_revision as i64,
                }))
            }
            Store::Etcd(e) => {
                let options = match consistency {
                    Consistency::Linearizable => None,
                    Consistency::Serializable => Some(etcd::GetOptions::new().with_serializable()),
                    Consistency::Follower => return Err("UNSUPPORTED_ON_ETCD".into()),
                };
                let mut response = e
                    .client
                    .kv_client()
                    .get(key, options)
                    .await
                    .map_err(etcd_error)?;
                Ok(response.take_kvs().into_iter().next().map(|kv| Versioned {
                    value: kv.value().to_vec(),
                    mod_revision: kv.mod_revision(),
                }))
            }
            Store::Zookeeper(z) => match consistency {
                Consistency::Linearizable => z.get(&key, true).await,
                Consistency::Serializable => z.get(&key, false).await,
                Consistency::Follower => Err(UNSUPPORTED_ON_ZOOKEEPER.into()),
            },
        }
    }

    /// Compare-and-swap: puts `value` at `key` if its mod revision is still `expected`
    /// (0: the key is absent). Returns whether it did.
    pub async fn cas(&self, key: Vec<u8>, expected: i64, value: Vec<u8>) -> Result<bool, OpError> {
        match self {
            Store::Concord(c) => c
                .txn(TxnRequest {
                    compares: vec![Compare {
                        key: key.clone(),
                        op: CompareOp::Equal,
                        target: CompareTarget::ModRevision(expected as u64),
                    }],
                    success: vec![TxnOp::Put(PutRequest {
                        key,
                        value,
                        lease: 0,
                        prev_kv: false,
                    })],
                    failure: vec![],
                    fence: None,
                })
                .await
                .map(|r| r.succeeded)
                .map_err(concord_error),
            Store::Etcd(e) => {
                let txn = etcd::Txn::new()
                    .when([etcd::Compare::mod_revision(
                        key.clone(),
                        etcd::CompareOp::Equal,
                        expected,
                    )])
                    .and_then([etcd::TxnOp::put(key, value, None)]);
                e.client
                    .kv_client()
                    .txn(txn)
                    .await
                    .map(|r| r.succeeded())
                    .map_err(etcd_error)
            }
            Store::Zookeeper(z) => z.cas(&key, expected, &value).await,
        }
    }

    /// Puts `key` attached to a new lease of `ttl`, in as few requests as the target's API
    /// allows: one on concord (`Client::put_ephemeral`, the grant and the put in one Raft
    /// entry); etcd and ZooKeeper have no such request: a grant (a session), then the put.
    /// Returns the lease.
    pub async fn put_ephemeral(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<i64, OpError> {
        match self {
            Store::Concord(c) => c
                .put_ephemeral(key, value, ttl)
                .await
                .map(|(id, _)| id)
                .map_err(concord_error),
            Store::Etcd(_) | Store::Zookeeper(_) => self.grant_then_put(key, value, ttl).await,
        }
    }

    /// Grants a lease of `ttl`, then puts `key` attached to it: two requests on every target.
    pub async fn grant_then_put(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<i64, OpError> {
        let id = self.lease_grant(ttl).await?;
        self.put(key, value, id).await?;
        Ok(id)
    }

    /// Grants a lease of `ttl`.
    pub async fn lease_grant(&self, ttl: Duration) -> Result<i64, OpError> {
        match self {
            Store::Concord(c) => c.lease_grant(ttl).await.map_err(concord_error),
            Store::Etcd(e) => e
                .client
                .lease_client()
                .grant(ttl.as_secs() as i64, None)
                .await
                .map(|r| r.id())
                .map_err(etcd_error),
            Store::Zookeeper(z) => z.lease_grant(ttl).await,
        }
    }

    /// Revokes a lease (its keys are deleted).
    pub async fn lease_revoke(&self, id: i64) -> Result<(), OpError> {
        match self {
            Store::Concord(c) => c.lease_revoke(id).await.map_err(concord_error),
            Store::Etcd(e) => e
                .client
                .lease_client()
                .revoke(id)
                .await
                .map(drop)
                .map_err(etcd_error),
            Store::Zookeeper(z) => z.lease_revoke(id).await,
        }
    }

    /// Stops renewing lease `id`, which will expire. Returns the instant its TTL runs from
    /// when the store knows it better than its last renewal (ZooKeeper: the session's last
    /// contact, whose pings are the client's own).
    pub async fn lease_abandon(&self, id: i64) -> Result<Option<Instant>, OpError> {
        match self {
            // Not renewing it is all it takes.
            Store::Concord(_) | Store::Etcd(_) => Ok(None),
            Store::Zookeeper(z) => z.lease_abandon(id).await.map(Some),
        }
    }

    /// Renews `ids`; returns the renewed ids and the ids that no longer exist.
    pub async fn keep_alive_many(&self, ids: &[i64]) -> Result<(Vec<i64>, Vec<i64>), OpError> {
        match self {
            Store::Concord(c) => c
                .lease_keep_alive_many(ids)
                .await
                .map(|(renewed, missing)| {
                    (renewed.into_iter().map(|(id, _)| id).collect(), missing)
                })
                .map_err(concord_error),
            Store::Etcd(e) => e.keep_alive_many(ids).await,
            Store::Zookeeper(z) => Ok(z.lease_states(ids)),
        }
    }

    /// Watches the keys under `prefix` (every key if it is empty) from now on; `deletes_only`
    /// filters puts out.
    pub async fn watch_prefix(
        &self,
        prefix: Vec<u8>,
        deletes_only: bool,
    ) -> Result<Watch, OpError> {
        let mut watches = self.watch_prefix_many(prefix, 1, deletes_only).await?;
        Ok(watches.pop().expect("one watch"))
    }

    /// Opens `count` watches of the keys under `prefix` (every key if it is empty), as a
    /// client with that many watchers would. concord: `count` watches, which the client
    /// library multiplexes on each range's watch channel. etcd: one `Watch` stream carrying
    /// the `count` watches, as Go's clientv3 multiplexes the watches of one client; its
    /// responses (one per watch and revision) come out of the one [`Watch`] returned.
    pub async fn watch_prefix_many(
        &self,
        prefix: Vec<u8>,
        count: usize,
        deletes_only: bool,
    ) -> Result<Vec<Watch>, OpError> {
        match self {
            Store::Concord(c) => {
                let mut request = WatchRequest::new(KeySpan::prefix(prefix));
                request.no_put = deletes_only;
                let mut watches = Vec::with_capacity(count);
                for _ in 0..count {
                    let watcher = c.watch(request.clone()).await.map_err(concord_error)?;
                    watches.push(Watch::Concord(watcher));
                }
                Ok(watches)
            }
            Store::Etcd(_) if count == 0 => Ok(Vec::new()),
            Store::Etcd(e) => {
                let mut options = etcd::WatchOptions::new();
                options = if prefix.is_empty() {
                    options.with_all_keys()
                } else {
                    options.with_prefix()
                };
                if deletes_only {
                    options = options.with_filters([etcd::WatchFilterType::NoPut]);
                }
                let mut stream = e
                    .client
                    .watch_client()
                    .watch(prefix.clone(), Some(options.clone()))
                    .await
                    .map_err(etcd_error)?;
                for _ in 1..count {
                    stream
                        .watch(prefix.clone(), Some(options.clone()))
                        .await
                        .map_err(etcd_error)?;
                }
                // Each watch is confirmed by a message of its own.
                for _ in 0..count {
                    match within(e.timeout, stream.message()).await? {
                        Some(r) if r.created() => {}
                        _ => return Err("ETCD_WATCH_NOT_CREATED".into()),
                    }
                }
                Ok(vec![Watch::Etcd(Box::new(stream))])
            }
            Store::Zookeeper(z) => Ok(z
                .watch_prefix_many(&prefix, count, deletes_only)
                .await?
                .into_iter()
                .map(|w| Watch::Zookeeper(Box::new(w)))
                .collect()),
        }
    }

    /// Opens a session of `ttl`.
    pub async fn session(&self, ttl: Duration) -> Result<StoreSession, OpError> {
        match self {
            Store::Concord(c) => c
                .session(ttl)
                .await
                .map(StoreSession::Concord)
                .map_err(concord_error),
            Store::Etcd(e) => {
                let lease = self.lease_grant(ttl).await?;
                // As concord's session: renewed every TTL/3, the first time after TTL/3,
                // through the same keep-alive streams as `keep_alive_many`.
                let e = e.clone();
                let keeper = tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(ttl / 3).await;
                        if e.keep_alive(lease).await != Ok(true) {
                            return;
                        }
                    }
                });
                Ok(StoreSession::Etcd {
                    lease,
                    keeper: TaskGuard(keeper),
                })
            }
            Store::Zookeeper(z) => z.session(ttl).await.map(StoreSession::Zookeeper),
        }
    }

    /// Ends a session: its lease is revoked and its keys deleted.
    pub async fn close_session(&self, session: StoreSession) -> Result<(), OpError> {
        match (self, session) {
            (Store::Concord(_), StoreSession::Concord(s)) => s.close().await.map_err(concord_error),
            (Store::Etcd(e), StoreSession::Etcd { lease, keeper }) => {
                drop(keeper);
                e.keepers.lock().await.remove(&lease);
                match e
                    .client
                    .lease_client()
                    .revoke(lease)
                    .await
                    .map_err(etcd_error)
                {
                    // Already expired: ended all the same (as concord's `Session::close`).
                    Ok(_) => Ok(()),
                    Err(kind) if kind == "GRPC_NOTFOUND" => Ok(()),
                    Err(kind) => Err(kind),
                }
            }
            (Store::Zookeeper(z), StoreSession::Zookeeper(s)) => z.close_session(s).await,
            _ => Err("SESSION_OF_ANOTHER_TARGET".into()),
        }
    }

    /// Waits for the lock `name` under `session`.
    pub async fn lock(&self, name: &str, session: &StoreSession) -> Result<Held, OpError> {
        match (self, session) {
            (Store::Concord(c), StoreSession::Concord(s)) => c
                .lock(name, s)
                .await
                .map(Held::Concord)
                .map_err(concord_error),
            (Store::Etcd(e), StoreSession::Etcd { lease, .. }) => e
                .client
                .lock_client()
                .lock(name, Some(etcd::LockOptions::new().with_lease(*lease)))
                .await
                .map(|r| Held::Etcd(r.key().to_vec()))
                .map_err(etcd_error),
            (Store::Zookeeper(z), StoreSession::Zookeeper(s)) => {
                z.lock(name, s).await.map(Held::Zookeeper)
            }
            _ => Err("SESSION_OF_ANOTHER_TARGET".into()),
        }
    }

    /// Puts `value` at `key` only while `held` is still held, else `FENCED`: concord's fenced
    /// put; on etcd a txn on the holder's key still existing (the key is unique to the
    /// holder's session, so this is etcd's `Mutex.IsOwner` check).
    pub async fn fenced_put(
        &self,
        held: &Held,
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> Result<(), OpError> {
        match (self, held) {
            (Store::Concord(_), Held::Concord(guard)) => {
                guard.put(key, value).await.map(drop).map_err(concord_error)
            }
            (Store::Etcd(e), Held::Etcd(lock_key)) => {
                let txn = etcd::Txn::new()
                    .when([etcd::Compare::version(
                        lock_key.clone(),
                        etcd::CompareOp::Greater,
                        0,
                    )])
                    .and_then([etcd::TxnOp::put(key, value, None)]);
                match e
                    .client
                    .kv_client()
                    .txn(txn)
                    .await
                    .map_err(etcd_error)?
                    .succeeded()
                {
                    true => Ok(()),
                    false => Err("FENCED".into()),
                }
            }
            (Store::Zookeeper(z), Held::Zookeeper(held)) => z.fenced_put(held, &key, &value).await,
            _ => Err("LOCK_OF_ANOTHER_TARGET".into()),
        }
    }

    /// Releases a lock.
    pub async fn unlock(&self, held: Held) -> Result<(), OpError> {
        match (self, held) {
            (Store::Concord(_), Held::Concord(guard)) => {
                guard.unlock().await.map_err(concord_error)
            }
            (Store::Etcd(e), Held::Etcd(key)) => e
                .client
                .lock_client()
                .unlock(key)
                .await
                .map(drop)
                .map_err(etcd_error),
            (Store::Zookeeper(z), Held::Zookeeper(held)) => z.unlock(held).await,
            _ => Err("LOCK_OF_ANOTHER_TARGET".into()),
        }
    }

    /// Registers member `id` of `group` with `metadata` for as long as `session` lives.
    pub async fn register(
        &self,
        group: &str,
        id: &str,
        metadata: Vec<u8>,
        session: &StoreSession,
    ) -> Result<(), OpError> {
        match (self, session) {
            (Store::Concord(c), StoreSession::Concord(s)) => Membership::new(c.clone(), group)
                .register(s, id, &metadata)
                .await
                .map_err(concord_error),
            (Store::Etcd(_), StoreSession::Etcd { lease, .. }) => {
                self.put(format!("{group}/{id}").into_bytes(), metadata, *lease)
                    .await
            }
            (Store::Zookeeper(z), StoreSession::Zookeeper(s)) => {
                z.register(format!("{group}/{id}").as_bytes(), &metadata, s)
                    .await
            }
            _ => Err("SESSION_OF_ANOTHER_TARGET".into()),
        }
    }

    /// Watches the members of `group` from now on.
    pub async fn watch_members(&self, group: &str) -> Result<MemberWatch, OpError> {
        match self {
            Store::Concord(c) => Membership::new(c.clone(), group)
                .watch()
                .await
                .map(MemberWatch::Concord)
                .map_err(concord_error),
            Store::Etcd(_) => {
                let prefix = format!("{group}/").into_bytes();
                let len = prefix.len();
                let watch = self.watch_prefix(prefix, false).await?;
                Ok(MemberWatch::Etcd(watch, len))
            }
            Store::Zookeeper(z) => {
                let prefix = format!("{group}/").into_bytes();
                let len = prefix.len();
                let mut watches = z.watch_prefix_many(&prefix, 1, false).await?;
                let watch = watches.pop().expect("one watch");
                let (members, feed) = watch.into_members(len);
                Ok(MemberWatch::Zookeeper {
                    members,
                    _feed: TaskGuard(feed),
                })
            }
        }
    }
}

impl MemberWatch {
    /// The next batch of changes; `None` when the watch ended.
    pub async fn next(&mut self) -> Option<Result<Vec<MemberChange>, OpError>> {
        match self {
            MemberWatch::Concord(w) => Some(
                w.next()
                    .await?
                    .map(|events| {
                        events
                            .into_iter()
                            .map(|e| match e {
                                MemberEvent::Joined(m) | MemberEvent::Updated(m) => MemberChange {
                                    id: m.id,
                                    left: false,
                                    metadata: m.metadata,
                                },
                                MemberEvent::Left { id, .. } => MemberChange {
                                    id,
                                    left: true,
                                    metadata: Vec::new(),
                                },
                            })
                            .collect()
                    })
                    .map_err(concord_error),
            ),
            MemberWatch::Etcd(watch, prefix_len) => Some(watch.next().await?.map(|changes| {
                changes
                    .iter()
                    .map(|c| MemberChange {
                        id: String::from_utf8_lossy(&c.key[(*prefix_len).min(c.key.len())..])
                            .into_owned(),
                        left: c.deleted,
                        metadata: c.value.to_vec(),
                    })
                    .collect()
            })),
            MemberWatch::Zookeeper { members, .. } => Some(members.recv().await?.map(|m| {
                vec![MemberChange {
                    id: m.id,
                    left: m.left,
                    metadata: m.metadata,
                }]
            })),
        }
    }
}

/// Waits for an etcd stream's next message, at most `timeout`.
async fn within<T>(
    timeout: Duration,
    message: impl std::future::Future<Output = Result<T, etcd::Error>>,
) -> Result<T, OpError> {
    match tokio::time::timeout(timeout, message).await {
        Ok(result) => result.map_err(etcd_error),
        Err(_) => Err("ETCD_STREAM_TIMEOUT".into()),
    }
}

impl EtcdStore {
    async fn keep_alive_many(&self, ids: &[i64]) -> Result<(Vec<i64>, Vec<i64>), OpError> {
        let results: Vec<(i64, Result<bool, OpError>)> = stream::iter(ids.iter().copied())
            .map(|id| async move { (id, self.keep_alive(id).await) })
            .buffer_unordered(ETCD_KEEPALIVE_CONCURRENCY)
            .collect()
            .await;
        // A lease whose round trip failed is neither renewed nor missing; only if every one
        // failed is the batch an error.
        let (mut renewed, mut missing, mut failed) = (Vec::new(), Vec::new(), None);
        for (id, result) in results {
            match result {
                Ok(true) => renewed.push(id),
                Ok(false) => missing.push(id),
                Err(kind) => failed = Some(kind),
            }
        }
        match failed {
            Some(kind) if renewed.is_empty() && missing.is_empty() => Err(kind),
            _ => Ok((renewed, missing)),
        }
    }

    /// One keep-alive round trip on the lease's stream (opened on first use). False when
    /// the lease no longer exists (etcd answers TTL 0).
    async fn keep_alive(&self, id: i64) -> Result<bool, OpError> {
        let taken = self.keepers.lock().await.remove(&id);
        let (mut keeper, mut stream) = match taken {
            Some(k) => k,
            // Opening the stream renews the lease once already.
            None => {
                return match within(self.timeout, self.client.lease_client().keep_alive(id)).await {
                    Ok(opened) => {
                        self.keepers.lock().await.insert(id, opened);
                        Ok(true)
                    }
                    // etcd-client's word for a lease that no longer exists.
                    Err(kind) if kind == "ETCD_LEASEKEEPALIVEERROR" => Ok(false),
                    Err(kind) => Err(kind),
                };
            }
        };
        keeper.keep_alive().await.map_err(etcd_error)?;
        let response = within(self.timeout, stream.message()).await?;
        let alive = response.is_some_and(|r| r.ttl() > 0);
        if alive {
            self.keepers.lock().await.insert(id, (keeper, stream));
        }
        Ok(alive)
    }
}

impl Watch {
    /// The next batch of changes; `None` when the watch ended. Cancel-safe (every target's
    /// stream keeps its place when the future is dropped), so it may be polled just once.
    pub async fn next(&mut self) -> Option<Result<Changes, OpError>> {
        match self {
            Watch::Concord(w) => Some(
                w.next()
                    .await?
                    .map(|r| Changes::Shared(r.events))
                    .map_err(concord_error),
            ),
            Watch::Etcd(s) => match s.message().await {
                Err(e) => Some(Err(etcd_error(e))),
                Ok(None) => None,
                Ok(Some(r)) if r.canceled() => Some(Err("ETCD_WATCH_CANCELED".into())),
                Ok(Some(r)) => Some(Ok(Changes::Owned(
                    r.events()
                        .iter()
                        .filter_map(|e| {
                            let kv = e.kv()?;
                            Some(Change {
                                deleted: e.event_type() == etcd::EventType::Delete,
                                key: kv.key().to_vec(),
                                value: kv.value().to_vec(),
                            })
                        })
                        .collect(),
                ))),
            },
            Watch::Zookeeper(w) => Some(w.next().await?.map(Changes::Owned)),
        }
    }
}
