//! Coordination recipes on keys, leases and watches, as etcd's `concurrency` package and the
//! ZooKeeper recipes build them: [`Mutex`](mutex) with fencing tokens, [`Election`],
//! [`Membership`], [`Barrier`] / [`DoubleBarrier`] and [`Queue`].
//!
//! **Contenders.** A mutex or an election named `N` keeps one key per contender under the
//! prefix `N/`: `N/<lease id in hex>`, attached to the contender's [`Session`](crate::Session).
//! Contenders are served in the order their keys were created (create revision), so the
//! recipes are fair (FIFO). Create revisions are comparable only within one range, so the
//! whole prefix must lie in one range: a prefix that spans ranges is refused with
//! `CROSS_RANGE`.
//!
//! **Taking over from an expired holder.** The servers delete an expired (or revoked)
//! lease's keys only after every range refuses writes under it (two-phase revocation, see
//! `node/src/leases.rs`). So when a contender sees the lock free, no range accepts the old
//! holder's fenced writes any more: a paused ex-holder cannot write after its successor took
//! over, in any range, however the successor learned that the lock was free.

mod barrier;
mod election;
mod membership;
pub(crate) mod mutex;
mod queue;

use concord_transport::api::{
    Compare, CompareOp, CompareTarget, Consistency, KeySpan, KeyValue, LeaseId, PutRequest,
    RangeRequest, TxnOp, TxnOpResponse, TxnRequest,
};
use concord_transport::watch::{EventKind, WatchRequest};

pub use barrier::{Barrier, DoubleBarrier};
pub use election::{Election, LeaderChange, Leadership, Observer};
pub use membership::{Member, MemberEvent, MemberWatcher, Membership};
pub use mutex::LockGuard;
pub use queue::Queue;

use crate::{Client, Error};

/// The key prefix of the recipe instance `name`: `name/`.
fn prefix_of(name: &str) -> Vec<u8> {
    format!("{name}/").into_bytes()
}

fn text(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// Refuses a prefix whose keys would spread over several ranges (their create revisions
/// would not be comparable).
async fn check_one_range(client: &Client, prefix: &[u8]) -> Result<(), Error> {
    client
        .one_range_of(&[KeySpan::prefix(prefix.to_vec())])
        .await
        .map(drop)
}

/// Creates the contender key `prefix/<lease hex>` with `value` under `lease`, unless it
/// exists already (then it is kept as it is: the same session contends once). Returns it.
async fn enter(
    client: &Client,
    prefix: &[u8],
    lease: LeaseId,
    value: Vec<u8>,
) -> Result<KeyValue, Error> {
    check_one_range(client, prefix).await?;
    let mut key = prefix.to_vec();
    key.extend(format!("{lease:016x}").into_bytes());
    let txn = TxnRequest {
        compares: vec![Compare {
            key: key.clone(),
            op: CompareOp::Equal,
            target: CompareTarget::CreateRevision(0),
        }],
        success: vec![TxnOp::Put(PutRequest {
            key: key.clone(),
            value: value.clone(),
            lease,
            prev_kv: false,
        })],
        failure: vec![TxnOp::Range(RangeRequest::new(KeySpan::key(key.clone())))],
        fence: None,
    };
    let response = client.txn(txn).await?;
    if response.succeeded {
        let revision = response.header.revision;
        return Ok(KeyValue {
            key,
            value,
            create_revision: revision,
            mod_revision: revision,
            version: 1,
            lease,
        });
    }
    match response.responses.into_iter().next() {
        Some(TxnOpResponse::Range(mut r)) if !r.kvs.is_empty() => Ok(r.kvs.remove(0)),
        _ => Err(lost(&key, "deleted as it was entered")),
    }
}

fn lost(key: &[u8], reason: &str) -> Error {
    Error::Lost {
        key: text(key),
        reason: reason.into(),
    }
}

/// The live keys under `prefix` (linearizable), and the revision they were read at (the
/// highest, if the prefix spans ranges).
async fn read_prefix(client: &Client, prefix: &[u8]) -> Result<(Vec<KeyValue>, u64), Error> {
    let read = client
        .range(
            RangeRequest::new(KeySpan::prefix(prefix.to_vec())),
            Consistency::Linearizable,
        )
        .await?;
    let revision = read.headers.iter().map(|h| h.revision).max().unwrap_or(0);
    Ok((read.kvs, revision))
}

/// The live keys under `prefix`, in creation order, and the revision they were read at.
async fn contenders(client: &Client, prefix: &[u8]) -> Result<(Vec<KeyValue>, u64), Error> {
    let (mut kvs, revision) = read_prefix(client, prefix).await?;
    kvs.sort_by_key(|kv| kv.create_revision);
    Ok((kvs, revision))
}

/// Waits until `mine` is the oldest live key under `prefix` (for each older key, until it
/// is deleted). Fails with [`Error::Lost`] if `mine` disappears.
async fn wait_turn(client: &Client, prefix: &[u8], mine: &KeyValue) -> Result<(), Error> {
    loop {
        let (kvs, revision) = contenders(client, prefix).await?;
        if !kvs
            .iter()
            .any(|kv| kv.key == mine.key && kv.create_revision == mine.create_revision)
        {
            return Err(lost(&mine.key, "deleted while waiting (session expired?)"));
        }
        let Some(before) = kvs
            .iter()
            .rfind(|kv| kv.create_revision < mine.create_revision)
        else {
            return Ok(());
        };
        wait_deleted(client, &before.key, revision).await?;
    }
}

/// Waits until `key` (live at `revision`) is deleted.
async fn wait_deleted(client: &Client, key: &[u8], revision: u64) -> Result<(), Error> {
    let mut request = WatchRequest::new(KeySpan::key(key.to_vec()));
    request.start_revision = revision + 1;
    request.no_put = true;
    let mut watcher = client.watch(request).await?;
    while let Some(response) = watcher.next().await {
        if response?.events.iter().any(|e| e.kind == EventKind::Delete) {
            return Ok(());
        }
    }
    Err(Error::Protocol("watch ended".into()))
}
