//! Leader election: campaign, proclaim, resign, leader, observe.
//!
//! Candidates queue under `name/` like mutex contenders; the oldest live candidate is the
//! leader and its key's value is the leader's proclamation. A leader's session ending (or
//! [`Leadership::resign`]) elects the next candidate. Observers watch the prefix and are told
//! every change of leader or of its value.

use std::collections::BTreeMap;

use concord_transport::api::{
    ApiError, Compare, CompareOp, CompareTarget, Fence, KeySpan, KeyValue, PutRequest, TxnOp,
    TxnRequest,
};
use concord_transport::watch::{EventKind, WatchRequest};

use super::{check_one_range, contenders, enter, lost, prefix_of, text, wait_turn};
use crate::{Client, Error, Session, Watcher};

/// An election named `name` (its keys live under `name/`).
#[derive(Clone)]
pub struct Election {
    client: Client,
    prefix: Vec<u8>,
}

impl Election {
    /// The election `name`.
    pub fn new(client: Client, name: &str) -> Self {
        Self {
            client,
            prefix: prefix_of(name),
        }
    }

    /// Stands for election with `value` and waits until elected. Fails with [`Error::Lost`]
    /// if the session ends first.
    pub async fn campaign(&self, session: &Session, value: &[u8]) -> Result<Leadership, Error> {
        let mine = enter(&self.client, &self.prefix, session.lease(), value.to_vec()).await?;
        let leadership = Leadership {
            client: self.client.clone(),
            key: mine.key.clone(),
            fence: Fence {
                prefix: self.prefix.clone(),
                token: mine.create_revision,
                lease: session.lease(),
            },
        };
        if mine.value != value {
            // The session was already a candidate (with another value): update it.
            leadership.proclaim(value).await?;
        }
        tokio::select! {
            waited = wait_turn(&self.client, &self.prefix, &mine) => waited?,
            reason = session.expired() => return Err(Error::Lost { key: text(&mine.key), reason }),
        }
        Ok(leadership)
    }

    /// The current leader's key (value = its proclamation), if there is one.
    pub async fn leader(&self) -> Result<Option<KeyValue>, Error> {
        let (kvs, _) = contenders(&self.client, &self.prefix).await?;
        Ok(kvs.into_iter().next())
    }

    /// Follows the election: the first [`Observer::next`] reports the current leader (or
    /// none), each later one a change of leader or of its value.
    pub async fn observe(&self) -> Result<Observer, Error> {
        check_one_range(&self.client, &self.prefix).await?;
        let (kvs, revision) = contenders(&self.client, &self.prefix).await?;
        let mut request = WatchRequest::new(KeySpan::prefix(self.prefix.clone()));
        request.start_revision = revision + 1;
        let watcher = self.client.watch(request).await?;
        Ok(Observer {
            candidates: kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect(),
            watcher,
            reported: None,
            revision,
        })
    }
}

/// What an [`Observer`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderChange {
    /// The leader's key (its value is the proclamation); `None` when nobody leads.
    pub leader: Option<KeyValue>,
    /// The revision at which this became the leader.
    pub revision: u64,
}

/// A leader as last reported: key, value, create revision.
type Reported = (Vec<u8>, Vec<u8>, u64);

/// A stream of leader changes of one election.
pub struct Observer {
    candidates: BTreeMap<Vec<u8>, KeyValue>,
    watcher: Watcher,
    /// The last leader reported; `Some(None)` for "no leader".
    reported: Option<Option<Reported>>,
    revision: u64,
}

impl Observer {
    /// The next change of leader; `None` when the watch has ended.
    pub async fn next(&mut self) -> Option<Result<LeaderChange, Error>> {
        loop {
            let leader = self
                .candidates
                .values()
                .min_by_key(|kv| kv.create_revision)
                .cloned();
            let now = leader
                .as_ref()
                .map(|kv| (kv.key.clone(), kv.value.clone(), kv.create_revision));
            if self.reported.as_ref() != Some(&now) {
                self.reported = Some(now);
                return Some(Ok(LeaderChange {
                    leader,
                    revision: self.revision,
                }));
            }
            let response = match self.watcher.next().await? {
                Ok(r) => r,
                Err(e) => return Some(Err(e)),
            };
            self.revision = response.revision;
            for event in &response.events {
                match event.kind {
                    EventKind::Put => self
                        .candidates
                        .insert(event.kv.key.clone(), event.kv.clone()),
                    EventKind::Delete => self.candidates.remove(&event.kv.key),
                };
            }
        }
    }
}

/// Leadership won by [`Election::campaign`].
pub struct Leadership {
    client: Client,
    key: Vec<u8>,
    fence: Fence,
}

impl Leadership {
    /// The leader's key.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The leadership's fencing token (the create revision of its key), for fenced writes
    /// (`TxnRequest::fence` = [`Leadership::fence`]) and for external systems.
    pub fn token(&self) -> u64 {
        self.fence.token
    }

    /// The fence of this leadership.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Announces a new value, only while still leader (else [`Error::Lost`]).
    pub async fn proclaim(&self, value: &[u8]) -> Result<(), Error> {
        let txn = TxnRequest {
            compares: vec![Compare {
                key: self.key.clone(),
                op: CompareOp::Equal,
                target: CompareTarget::CreateRevision(self.fence.token),
            }],
            success: vec![TxnOp::Put(PutRequest {
                key: self.key.clone(),
                value: value.to_vec(),
                lease: self.fence.lease,
                prev_kv: false,
            })],
            failure: vec![],
            fence: None,
        };
        match self.client.txn(txn).await {
            Ok(r) if r.succeeded => Ok(()),
            Ok(_) => Err(lost(&self.key, "no longer a candidate (key deleted)")),
            Err(Error::Api(ApiError::LeaseNotFound { .. })) => {
                Err(lost(&self.key, "no longer a candidate (session expired)"))
            }
            Err(e) => Err(e),
        }
    }

    /// Steps down: deletes the leader's key, electing the next candidate.
    pub async fn resign(self) -> Result<(), Error> {
        self.client
            .delete(KeySpan::key(self.key.clone()), false)
            .await
            .map(|_| ())
    }
}
