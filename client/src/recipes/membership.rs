//! Membership and service discovery: members register under a group with metadata, attached
//! to their session; anyone lists the group or watches members join, change and leave. A
//! member whose session ends (process died, network cut) leaves by itself when its lease
//! expires.
//!
//! A group `g` keeps member `m` at key `g/m`. Members of one group may spread over several
//! ranges (no ordering is needed), so a group scales with the cluster.

use concord_transport::api::KeySpan;
use concord_transport::watch::{EventKind, WatchRequest};

use super::{prefix_of, read_prefix};
use crate::{Client, Error, Session, Watcher};

/// The members of group `name`.
#[derive(Clone)]
pub struct Membership {
    client: Client,
    prefix: Vec<u8>,
}

/// A registered member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its id within the group.
    pub id: String,
    /// What it registered (address, labels, …).
    pub metadata: Vec<u8>,
    /// The revision of its registration or last update.
    pub revision: u64,
}

/// A change in a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    /// A member registered.
    Joined(Member),
    /// A registered member changed its metadata.
    Updated(Member),
    /// A member deregistered or its session ended.
    Left {
        /// Its id.
        id: String,
        /// The revision of its departure.
        revision: u64,
    },
}

impl Membership {
    /// The group `name` (its members live under `name/`).
    pub fn new(client: Client, name: &str) -> Self {
        Self {
            client,
            prefix: prefix_of(name),
        }
    }

    fn key(&self, id: &str) -> Vec<u8> {
        let mut key = self.prefix.clone();
        key.extend(id.as_bytes());
        key
    }

    fn id_of(&self, key: &[u8]) -> String {
        String::from_utf8_lossy(&key[self.prefix.len()..]).into_owned()
    }

    /// Registers (or updates) member `id` with `metadata`, for as long as `session` lives.
    pub async fn register(
        &self,
        session: &Session,
        id: &str,
        metadata: &[u8],
    ) -> Result<(), Error> {
        if id.is_empty() {
            return Err(Error::Config("a member id is not empty".into()));
        }
        self.client
            .put_leased(self.key(id), metadata.to_vec(), session.lease())
            .await
            .map(|_| ())
    }

    /// Removes member `id` now.
    pub async fn deregister(&self, id: &str) -> Result<(), Error> {
        self.client
            .delete(KeySpan::key(self.key(id)), false)
            .await
            .map(|_| ())
    }

    /// The current members, by id, and the revision of the read (per range, the highest).
    pub async fn list(&self) -> Result<(Vec<Member>, u64), Error> {
        let (kvs, revision) = read_prefix(&self.client, &self.prefix).await?;
        let members = kvs
            .into_iter()
            .map(|kv| Member {
                id: self.id_of(&kv.key),
                metadata: kv.value,
                revision: kv.mod_revision,
            })
            .collect();
        Ok((members, revision))
    }

    /// Watches the group from now: every join, update and departure after the call returns.
    /// To follow the group from a known state, watch first and list after: nothing is missed
    /// (a member that joins in between may be reported by both).
    pub async fn watch(&self) -> Result<MemberWatcher, Error> {
        let watcher = self
            .client
            .watch(WatchRequest::new(KeySpan::prefix(self.prefix.clone())))
            .await?;
        Ok(MemberWatcher {
            watcher,
            prefix_len: self.prefix.len(),
        })
    }
}

/// A stream of [`MemberEvent`]s of one group.
pub struct MemberWatcher {
    watcher: Watcher,
    prefix_len: usize,
}

impl MemberWatcher {
    /// The changes of the next revision of one range (in order per range); `None` when the
    /// watch has ended.
    pub async fn next(&mut self) -> Option<Result<Vec<MemberEvent>, Error>> {
        loop {
            let response = match self.watcher.next().await? {
                Ok(r) => r,
                Err(e) => return Some(Err(e)),
            };
            let events: Vec<MemberEvent> = response
                .events
                .iter()
                .map(|event| {
                    let id = String::from_utf8_lossy(&event.kv.key[self.prefix_len..]).into();
                    let revision = event.kv.mod_revision;
                    match event.kind {
                        EventKind::Delete => MemberEvent::Left { id, revision },
                        EventKind::Put => {
                            let member = Member {
                                id,
                                metadata: event.kv.value.clone(),
                                revision,
                            };
                            if event.kv.version == 1 {
                                MemberEvent::Joined(member)
                            } else {
                                MemberEvent::Updated(member)
                            }
                        }
                    }
                })
                .collect();
            if !events.is_empty() {
                return Some(Ok(events));
            }
        }
    }
}
