//! Leases in the client: grant, revoke, keepalive, time-to-live, list, and [`Session`], a
//! lease kept alive in the background.

use std::collections::hash_map::RandomState;
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use concord_transport::api::{
    ApiError, KvRequest, KvResponse, LeaseId, LeaseRequest, LeaseResponse, LeaseStatus, PutRequest,
    PutResponse, RangeId, KEEPALIVE_BATCH_MAX,
};
use concord_transport::lease::lease_anchor;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{Client, Error};

/// A lease's TTLs, as its owner answers them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseTtl {
    /// The lease.
    pub id: LeaseId,
    /// The TTL it was granted with, in milliseconds.
    pub granted_ttl_ms: u64,
    /// Time left, in milliseconds.
    pub remaining_ms: u64,
    /// Keys attached to it in every range (when asked for).
    pub keys: Vec<Vec<u8>>,
}

/// Random lease ids [`Client::put_ephemeral`] tries for one anchored in the key's range
/// (with R ranges of the printable keyspace about one in R is; a hash per try).
const EPHEMERAL_ID_TRIES: usize = 1024;

/// A fresh random lease id (never 0, never negative).
fn random_lease_id() -> LeaseId {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(d) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    ((h.finish() >> 1) as LeaseId).max(1)
}

fn unexpected(other: impl std::fmt::Debug) -> Error {
    Error::Protocol(format!("unexpected response {other:?}"))
}

impl Client {
    async fn lease_call(&self, request: LeaseRequest) -> Result<LeaseResponse, Error> {
        let id = request
            .owner()
            .expect("lease_call serves requests of one lease");
        let desc = self.locate(&lease_anchor(id));
        match self.call_range(&desc, KvRequest::Lease(request)).await? {
            KvResponse::Lease(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Grants a lease with a random id and `ttl` (whole milliseconds, at least one second).
    pub async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, Error> {
        self.lease_grant_id(random_lease_id(), ttl).await
    }

    /// Grants lease `id` with `ttl`. Fails with `LEASE_EXISTS` if the id was ever used.
    pub async fn lease_grant_id(&self, id: LeaseId, ttl: Duration) -> Result<LeaseId, Error> {
        let ttl_ms = ttl.as_millis() as u64;
        match self.lease_call(LeaseRequest::Grant { id, ttl_ms }).await? {
            LeaseResponse::Granted { id, .. } => Ok(id),
            other => Err(unexpected(other)),
        }
    }

    /// Puts `key` attached to a new lease of `ttl`: an ephemeral key, as ZooKeeper's
    /// `create(EPHEMERAL)` makes one. Returns the lease (keep it alive, or let it expire to
    /// delete the key) and the put's answer.
    ///
    /// The client picks a lease id whose owner range is the key's range, so that the grant
    /// and the put are one Raft entry of that range: one round trip and one replicated write
    /// instead of two. Where it finds no such id (a range too narrow to hold a lease's
    /// anchor, see [`lease_anchor`]), see [`Client::put_ephemeral_id`].
    pub async fn put_ephemeral(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        ttl: Duration,
    ) -> Result<(LeaseId, PutResponse), Error> {
        let key = key.into();
        let desc = self.locate(&key);
        let id = (0..EPHEMERAL_ID_TRIES)
            .map(|_| random_lease_id())
            .find(|id| desc.contains(&lease_anchor(*id)))
            .unwrap_or_else(random_lease_id);
        self.put_ephemeral_id(id, key, value, ttl).await
    }

    /// Puts `key` attached to a new lease `id` of `ttl`. When the key's range owns `id` (its
    /// anchor lies there), the grant and the put are one Raft entry; otherwise, or when the
    /// range split between them meanwhile, the lease is granted, then the key put, with the
    /// same result. Fails with `LEASE_EXISTS`, applying nothing, if the id was ever used.
    pub async fn put_ephemeral_id(
        &self,
        id: LeaseId,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        ttl: Duration,
    ) -> Result<(LeaseId, PutResponse), Error> {
        let put = PutRequest {
            key: key.into(),
            value: value.into(),
            lease: id,
            prev_kv: false,
        };
        let desc = self.locate(&put.key);
        if desc.contains(&lease_anchor(id)) {
            let ttl_ms = ttl.as_millis() as u64;
            let request = KvRequest::Lease(LeaseRequest::GrantWithPut {
                id,
                ttl_ms,
                put: put.clone(),
            });
            match self.call_range(&desc, request).await {
                Ok(KvResponse::Put(r)) => return Ok((id, r)),
                Ok(other) => return Err(unexpected(other)),
                // Key and anchor are in two ranges now: nothing was applied.
                Err(e) if crate::client::is_stale(&e) => {}
                Err(e) => return Err(e),
            }
        }
        self.lease_grant_id(id, ttl).await?;
        Ok((id, self.put_with(put).await?))
    }

    /// Revokes lease `id`: its keys are deleted in every range.
    pub async fn lease_revoke(&self, id: LeaseId) -> Result<(), Error> {
        match self.lease_call(LeaseRequest::Revoke { id }).await? {
            LeaseResponse::Revoked { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Renews lease `id` once; returns its TTL in milliseconds.
    pub async fn lease_keep_alive_once(&self, id: LeaseId) -> Result<u64, Error> {
        match self.lease_call(LeaseRequest::KeepAlive { id }).await? {
            LeaseResponse::KeptAlive { ttl_ms, .. } => Ok(ttl_ms),
            other => Err(unexpected(other)),
        }
    }

    /// Renews many leases with one request per owner range, sent concurrently (for a process
    /// that holds many, e.g. a proxy for a fleet). Returns the renewed leases with their TTLs in milliseconds,
    /// and the ids that no longer exist.
    pub async fn lease_keep_alive_many(
        &self,
        ids: &[LeaseId],
    ) -> Result<(Vec<(LeaseId, u64)>, Vec<LeaseId>), Error> {
        let mut by_range: BTreeMap<RangeId, Vec<LeaseId>> = BTreeMap::new();
        for id in ids {
            by_range
                .entry(self.locate(&lease_anchor(*id)).id)
                .or_default()
                .push(*id);
        }
        // One request per owner range (and per batch of ids), all at once.
        let mut calls = tokio::task::JoinSet::new();
        for owned in by_range.into_values() {
            for chunk in owned.chunks(KEEPALIVE_BATCH_MAX) {
                let (client, ids) = (self.clone(), chunk.to_vec());
                calls.spawn(
                    async move { client.lease_call(LeaseRequest::KeepAliveMany { ids }).await },
                );
            }
        }
        let (mut renewed, mut missing) = (Vec::with_capacity(ids.len()), Vec::new());
        while let Some(answer) = calls.join_next().await {
            let answer = answer.map_err(|e| Error::Protocol(format!("keepalive task: {e}")))?;
            match answer? {
                LeaseResponse::KeptAliveMany {
                    renewed: r,
                    missing: m,
                } => {
                    renewed.extend(r);
                    missing.extend(m);
                }
                other => return Err(unexpected(other)),
            }
        }
        Ok((renewed, missing))
    }

    /// The TTLs of lease `id`, and with `keys` the keys attached to it in every range.
    pub async fn lease_time_to_live(&self, id: LeaseId, keys: bool) -> Result<LeaseTtl, Error> {
        let (granted_ttl_ms, remaining_ms) =
            match self.lease_call(LeaseRequest::TimeToLive { id }).await? {
                LeaseResponse::TimeToLive {
                    granted_ttl_ms,
                    remaining_ms,
                    ..
                } => (granted_ttl_ms, remaining_ms),
                other => return Err(unexpected(other)),
            };
        let mut ttl = LeaseTtl {
            id,
            granted_ttl_ms,
            remaining_ms,
            keys: Vec::new(),
        };
        if keys {
            for desc in self.routes().ranges {
                let request = KvRequest::Lease(LeaseRequest::AttachedKeys { id });
                match self.call_range(&desc, request).await? {
                    KvResponse::Lease(LeaseResponse::AttachedKeys { keys, .. }) => {
                        ttl.keys.extend(keys)
                    }
                    other => return Err(unexpected(other)),
                }
            }
        }
        Ok(ttl)
    }

    /// Whether lease `id` is alive, revoked but not yet detached from every range, or gone.
    pub async fn lease_status(&self, id: LeaseId) -> Result<LeaseStatus, Error> {
        match self.lease_call(LeaseRequest::Status { id }).await? {
            LeaseResponse::Status { status, .. } => Ok(status),
            other => Err(unexpected(other)),
        }
    }

    /// Every live lease, ascending.
    pub async fn lease_list(&self) -> Result<Vec<LeaseId>, Error> {
        let mut ids = Vec::new();
        for desc in self.routes().ranges {
            match self
                .call_range(&desc, KvRequest::Lease(LeaseRequest::List))
                .await?
            {
                KvResponse::Lease(LeaseResponse::List { ids: owned, .. }) => ids.extend(owned),
                other => return Err(unexpected(other)),
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// Puts `value` under `key`, attached to `lease`.
    pub async fn put_leased(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        lease: LeaseId,
    ) -> Result<PutResponse, Error> {
        self.put_with(PutRequest {
            key: key.into(),
            value: value.into(),
            lease,
            prev_kv: false,
        })
        .await
    }

    /// Grants a lease of `ttl` and keeps it alive in the background (see [`Session`]).
    pub async fn session(&self, ttl: Duration) -> Result<Session, Error> {
        let id = self.lease_grant(ttl).await?;
        Ok(Session::keep(self.clone(), id, ttl))
    }
}

/// What a [`Session`]'s keepalive knows of its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    /// Renewed within its TTL.
    Alive,
    /// The lease is gone (expired, revoked, or not renewed in time); its keys are deleted or
    /// about to be.
    Expired(String),
}

/// A lease kept alive by a background task (renewing every third of its TTL, and retrying
/// sooner after a failure). Dropping the session stops the renewals and revokes the lease, so
/// its keys vanish; [`Session::close`] does the same and waits for it.
pub struct Session {
    client: Client,
    id: LeaseId,
    state: watch::Receiver<SessionState>,
    task: Option<JoinHandle<()>>,
}

impl Session {
    /// Keeps lease `id` (granted with `ttl`) alive until dropped.
    pub fn keep(client: Client, id: LeaseId, ttl: Duration) -> Self {
        let (tx, state) = watch::channel(SessionState::Alive);
        let task = tokio::spawn(keep_alive(client.clone(), id, ttl, tx));
        Self {
            client,
            id,
            state,
            task: Some(task),
        }
    }

    /// The lease id, for [`Client::put_leased`].
    pub fn lease(&self) -> LeaseId {
        self.id
    }

    /// Whether the lease is still renewed.
    pub fn is_alive(&self) -> bool {
        *self.state.borrow() == SessionState::Alive
    }

    /// Resolves when the lease is lost, with the reason.
    pub async fn expired(&self) -> String {
        let mut state = self.state.clone();
        let reason = match state
            .wait_for(|s| matches!(s, SessionState::Expired(_)))
            .await
        {
            Ok(s) => match &*s {
                SessionState::Expired(why) => why.clone(),
                SessionState::Alive => unreachable!("waited for expiry"),
            },
            Err(_) => "keepalive task ended".into(),
        };
        reason
    }

    /// Stops renewing without revoking: the lease expires after its TTL (as if this process
    /// had paused or died).
    pub fn abandon(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Stops renewing and revokes the lease now.
    pub async fn close(mut self) -> Result<(), Error> {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        match self.client.lease_revoke(self.id).await {
            Err(Error::Api(ApiError::LeaseNotFound { .. })) => Ok(()),
            other => other,
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let (client, id) = (self.client.clone(), self.id);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { client.lease_revoke(id).await });
            }
        }
    }
}

/// Renews `id` every `ttl / 3` until it is lost.
async fn keep_alive(
    client: Client,
    id: LeaseId,
    ttl: Duration,
    state: watch::Sender<SessionState>,
) {
    let period = ttl / 3;
    let mut renewed = Instant::now();
    let mut next = period;
    loop {
        tokio::time::sleep(next).await;
        match client.lease_keep_alive_once(id).await {
            Ok(_) => {
                renewed = Instant::now();
                next = period;
            }
            Err(Error::Api(ApiError::LeaseNotFound { .. })) => {
                state.send_replace(SessionState::Expired(format!("lease {id} not found")));
                return;
            }
            Err(e) if renewed.elapsed() >= ttl => {
                state.send_replace(SessionState::Expired(format!(
                    "lease {id} not renewed within its TTL: {e}"
                )));
                return;
            }
            Err(e) => {
                tracing::debug!("keepalive of lease {id}: {e}");
                next = period / 4;
            }
        }
    }
}
