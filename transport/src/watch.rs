//! The watch part of the client protocol.
//!
//! A watch of one range is one bi-stream: the client sends a [`WatchRequest`] (inside
//! `ClientRequest::Watch`), the node answers with [`WatchMessage`] frames until the stream
//! ends: `Created`, then `Events` (all events of one revision in one message, revisions
//! ascending, each revision at most once), `Progress` bookmarks, and a final `Cancelled` when
//! the node ends the watch. A watch over several ranges is one stream per range, merged by the
//! client library.

use serde::{Deserialize, Serialize};

use crate::api::{ApiError, KeySpan, KeyValue, ResponseHeader};

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

/// One frame a node sends on a watch stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchMessage {
    /// The watch is established; events after `header.revision` will follow (and history
    /// from the start revision, if one was given).
    Created {
        /// Range and its revision at creation.
        header: ResponseHeader,
    },
    /// The selected events of one revision.
    Events {
        /// Range and the revision of these events.
        header: ResponseHeader,
        /// The events, in the order the revision wrote them.
        events: Vec<Event>,
    },
    /// Bookmark: every event of this range up to `header.revision` has been sent.
    Progress {
        /// Range and revision.
        header: ResponseHeader,
    },
    /// The node ended the watch (see the error; `WATCH_OVERFLOW` and `UNAVAILABLE` are
    /// resumable from the revision after the last one received).
    Cancelled(ApiError),
}
