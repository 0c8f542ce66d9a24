//! A distributed mutex with fencing tokens.
//!
//! [`Client::lock`] enters the lock's queue with the session's key and waits for its turn
//! (FIFO by creation). The [`LockGuard`] it returns carries the **fencing token**, the create
//! revision of the holder's key: tokens of one lock only grow. Writes made through the guard
//! ([`LockGuard::put`], [`LockGuard::txn`]) carry a [`Fence`] and are refused with `FENCED`
//! once the guard no longer holds the lock (its session expired, the key was deleted), in
//! whatever range they land — so a holder paused past its lease cannot overwrite its
//! successor's work.

use std::sync::atomic::{AtomicBool, Ordering};

use concord_transport::api::{
    Fence, KeySpan, LeaseId, PutRequest, PutResponse, TxnOp, TxnOpResponse, TxnRequest, TxnResponse,
};

use super::{enter, prefix_of, wait_turn};
use crate::{Client, Error, Session};

impl Client {
    /// Acquires the lock `name` for `session`, waiting behind earlier contenders. Fails with
    /// [`Error::Lost`] if the session's lease ends while waiting (its key is then gone).
    /// Cancel-safe: dropping the future leaves the session's key queued until the session
    /// ends or [`Client::delete`] removes it; call it again with the same session to resume.
    pub async fn lock(&self, name: &str, session: &Session) -> Result<LockGuard, Error> {
        let prefix = prefix_of(name);
        let mine = enter(self, &prefix, session.lease(), Vec::new()).await?;
        let wait = wait_turn(self, &prefix, &mine);
        tokio::select! {
            waited = wait => waited?,
            reason = session.expired() => {
                return Err(Error::Lost { key: super::text(&mine.key), reason });
            }
        }
        Ok(LockGuard {
            client: self.clone(),
            key: mine.key,
            fence: Fence {
                prefix,
                token: mine.create_revision,
                lease: session.lease(),
            },
            unsure: AtomicBool::new(false),
        })
    }
}

/// A held lock. Release it with [`LockGuard::unlock`]; dropping it releases nothing (the
/// session's end does).
pub struct LockGuard {
    client: Client,
    key: Vec<u8>,
    fence: Fence,
    /// A fenced write's outcome is unknown (an error said so, or its future was dropped before
    /// the answer): it may still be applied later, so unlocking must revoke the lease (which
    /// fences it out everywhere) rather than just delete the key.
    unsure: AtomicBool,
}

impl LockGuard {
    /// The fencing token: the create revision of the holder's key. Tokens of one lock grow
    /// with every new holder; hand it to external systems that fence on it.
    pub fn token(&self) -> u64 {
        self.fence.token
    }

    /// The holder's key.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The lease the lock is held under.
    pub fn lease(&self) -> LeaseId {
        self.fence.lease
    }

    /// The fence that the guard's writes carry.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Runs `txn` only while this guard still holds the lock; else `FENCED`.
    pub async fn txn(&self, mut txn: TxnRequest) -> Result<TxnResponse, Error> {
        txn.fence = Some(self.fence.clone());
        // Marks the guard unsure unless a definite answer arrives (also if this future is
        // dropped mid-way); the flag only ever goes from false to true.
        let mut in_flight = InFlight {
            unsure: &self.unsure,
            settled: false,
        };
        let result = self.client.txn(txn).await;
        in_flight.settled = !result.as_ref().is_err_and(Error::outcome_unknown);
        result
    }

    /// Puts `value` under `key` only while this guard still holds the lock; else `FENCED`.
    pub async fn put(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Result<PutResponse, Error> {
        let put = PutRequest {
            key: key.into(),
            value: value.into(),
            lease: 0,
            prev_kv: false,
        };
        let txn = TxnRequest {
            compares: vec![],
            success: vec![TxnOp::Put(put)],
            failure: vec![],
            fence: None,
        };
        let response = self.txn(txn).await?;
        match response.responses.into_iter().next() {
            Some(TxnOpResponse::Put(p)) => Ok(p),
            other => Err(Error::Protocol(format!("unexpected response {other:?}"))),
        }
    }

    /// Releases the lock: deletes the holder's key. If a fenced write's outcome was unknown
    /// (it might still be applied), the session's lease is revoked instead, so that no range
    /// accepts that write once the next holder has the lock; the session then ends.
    pub async fn unlock(self) -> Result<(), Error> {
        if self.unsure.load(Ordering::Acquire) {
            return self.client.lease_revoke(self.fence.lease).await;
        }
        self.client
            .delete(KeySpan::key(self.key.clone()), false)
            .await
            .map(|_| ())
    }
}

/// A fenced write in flight: unless `settled`, dropping it marks its guard unsure.
struct InFlight<'a> {
    unsure: &'a AtomicBool,
    settled: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.unsure.store(true, Ordering::Release);
        }
    }
}
