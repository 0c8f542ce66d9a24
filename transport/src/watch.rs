//! The watch part of the client protocol.
//!
//! A client watches one range over one **watch channel**, a bi-stream that carries any number
//! of watches: the client opens it with `ClientRequest::Watch`, then sends [`WatchControl`]
//! frames (create or cancel a watch, each with the client's id for it); the node answers
//! with [`WatchMessage`] frames until the stream ends.
//!
//! **Groups.** Watches of one channel that select the same events (same span, filters and
//! `prev_kv`) form a *group*: the node filters and sends each revision's events once per
//! group (`Events { group, .. }`), and the client hands them to every watch of the group that
//! is established below that revision. The node keeps, per watch, only its id and its group
//! (a few dozen bytes), so idle watchers cost almost nothing and a fan-out to many identical
//! watchers costs one frame per channel.
//!
//! **Order.** On a channel, revisions are sent in ascending order, each at most once per
//! group. A watch created with a past start revision first gets `History` frames for the
//! revisions up to the one in its `Created`; from there its group's `Events` carry on.
//! `Progress` bookmarks cover every watch of the channel. A watch over several ranges is one
//! watch per range, on each range's channel, merged by the client library.
//!
//! **Liveness.** While any watch of a channel asked for progress notifications, the node
//! sends a frame at least every [`PROGRESS_INTERVAL_MS`]; a client that hears nothing for
//! several intervals takes the node for dead and resumes elsewhere, without waiting for the
//! connection's idle timeout.

use serde::{Deserialize, Serialize};

use crate::api::{ApiError, KeySpan, KeyValue, ResponseHeader};

/// How often a node sends a `Progress` bookmark on a channel where a watch asked for them.
pub const PROGRESS_INTERVAL_MS: u64 = 1_000;

/// What to watch, in one range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchRequest {
    /// A key, prefix or interval (clipped to the range by the client).
    pub span: KeySpan,
    /// First revision to report; 0 = changes after now.
    pub start_revision: u64,
    /// Attach the previous key-value to each event.
    pub prev_kv: bool,
    /// Leave out put events.
    pub no_put: bool,
    /// Leave out delete events.
    pub no_delete: bool,
    /// Send a `Progress` bookmark when the range has been quiet for a while.
    pub progress_notify: bool,
}

impl WatchRequest {
    /// Watch `span` from now, with no options.
    pub fn new(span: KeySpan) -> Self {
        Self {
            span,
            start_revision: 0,
            prev_kv: false,
            no_put: false,
            no_delete: false,
            progress_notify: false,
        }
    }

    /// Whether `event` passes the request's key span and filters.
    pub fn selects(&self, event: &Event) -> bool {
        let kind_ok = match event.kind {
            EventKind::Put => !self.no_put,
            EventKind::Delete => !self.no_delete,
        };
        kind_ok && self.span.contains(&event.kv.key)
    }

    /// The events of one revision this request selects, `prev_kv` kept only if asked for
    /// (what a node sends a watch group).
    pub fn select(&self, events: &[Event]) -> Vec<Event> {
        events
            .iter()
            .filter(|e| self.selects(e))
            .map(|e| Event {
                kind: e.kind,
                kv: e.kv.clone(),
                prev_kv: if self.prev_kv {
                    e.prev_kv.clone()
                } else {
                    None
                },
            })
            .collect()
    }
}

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// Created or updated.
    Put,
    /// Deleted (also by a lease's expiry or revocation).
    Delete,
}

/// One change of one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key-value after the change; for a delete, the key and the deletion's revision
    /// (`mod_revision`), with an empty value.
    pub kv: KeyValue,
    /// The key-value before the change, when asked for and known.
    pub prev_kv: Option<KeyValue>,
}

/// The client's id of a watch on one channel.
pub type WatchId = u64;

/// A group of identical watches on one channel (the node's id for it).
pub type GroupId = u32;

/// One frame the client sends on a watch channel after opening it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchControl {
    /// Start watch `id`.
    Create {
        /// The client's id for it (unique on the channel).
        id: WatchId,
        /// What to watch (its span inside the channel's range).
        request: WatchRequest,
    },
    /// Stop watch `id`.
    Cancel {
        /// The watch.
        id: WatchId,
    },
}

/// One frame a node sends on a watch channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchMessage {
    /// The channel is open at the range's revision `header.revision`.
    Opened {
        /// Range and revision.
        header: ResponseHeader,
    },
    /// Watch `id` is established in group `group`: it gets that group's events of revisions
    /// above `header.revision` (and, before this, `History` up to it if it started in the
    /// past).
    Created {
        /// The watch.
        id: WatchId,
        /// Its group.
        group: GroupId,
        /// Range and the revision it is established at.
        header: ResponseHeader,
    },
    /// Past events of one revision, for watch `id` alone (replay of its start).
    History {
        /// The watch.
        id: WatchId,
        /// Range and revision.
        header: ResponseHeader,
        /// The selected events of that revision.
        events: Vec<Event>,
    },
    /// The selected events of one revision, for every watch of `group`.
    Events {
        /// The group.
        group: GroupId,
        /// Range and the revision of these events.
        header: ResponseHeader,
        /// The events, in the order the revision wrote them.
        events: Vec<Event>,
    },
    /// Bookmark for every watch of the channel: every event of the range up to
    /// `header.revision` has been sent.
    Progress {
        /// Range and revision.
        header: ResponseHeader,
    },
    /// Watch `id` could not be created (e.g. `COMPACTED`, `KEY_OUTSIDE_RANGE`).
    Refused {
        /// The watch.
        id: WatchId,
        /// Why.
        error: ApiError,
    },
    /// The node ended the channel and all its watches (`WATCH_OVERFLOW` and `UNAVAILABLE`
    /// are resumable: reopen and recreate each watch from the revision after the last one it
    /// received).
    Cancelled(ApiError),
}
