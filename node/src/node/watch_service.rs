//! Serving a watch of one range on one client stream (any replica may serve it).
//!
//! **Why nothing is lost or repeated:** the watcher subscribes to the range's event channel
//! and reads the range's revision under one read lock, while the state machine publishes
//! under the write lock; so every revision above the one read arrives on the channel, and
//! history up to it comes from the MVCC index. Revisions are sent in ascending order, each
//! at most once (`last` only grows). A watcher that falls more than the channel's capacity
//! behind (a slow reader stalls its QUIC stream, which stalls this task) is cancelled with
//! `WatchOverflow { resume_revision }` instead of holding anything up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use concord_transport::api::{ApiError, RangeId, ResponseHeader};
use concord_transport::watch::{WatchMessage, WatchRequest};
use concord_transport::wire;
use futures::FutureExt;
use tokio::sync::broadcast::error::RecvError;

use super::{span_inside, NodeInner};
use crate::storage::RevisionEvents;

/// How often an idle watch sends a progress bookmark (when asked) and checks its client.
pub const WATCH_PROGRESS_MS: u64 = 1_000;

/// Why a watch stream ended on this side.
enum End {
    /// The client went away (a frame could not be written).
    Gone,
    /// The watch ended with this message to the client.
    Cancel(ApiError),
}

/// Counts one in a gauge for as long as it lives (also when its future is dropped).
struct Counted<'a>(&'a AtomicU64);

impl<'a> Counted<'a> {
    fn new(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl NodeInner {
    /// Serves `request` on `send` until the client goes or the watch is cancelled.
    pub(super) async fn serve_watch(
        &self,
        send: &mut quinn::SendStream,
        range_id: RangeId,
        epoch: u64,
        request: WatchRequest,
    ) {
        let _counted = Counted::new(&self.watchers);
        if let End::Cancel(e) = self.watch(send, range_id, epoch, &request).await {
            let _ = wire::write_frame(send, &WatchMessage::Cancelled(e)).await;
        }
    }

    async fn watch(
        &self,
        send: &mut quinn::SendStream,
        range_id: RangeId,
        epoch: u64,
        request: &WatchRequest,
    ) -> End {
        let group = match self.group_at(range_id, epoch) {
            Ok(group) => group,
            Err(e) => return End::Cancel(e),
        };
        if !span_inside(&group.descriptor, &request.span) {
            return End::Cancel(ApiError::KeyOutsideRange { range_id });
        }
        let header = |revision| ResponseHeader { range_id, revision };
        let (mut events, now, history) = {
            let state = group.state.read().expect("range state lock");
            let now = state.mvcc.revision();
            let compacted = state.mvcc.compact_revision();
            let start = request.start_revision;
            if start != 0 && start <= compacted {
                return End::Cancel(ApiError::Compacted {
                    compact_revision: compacted,
                });
            }
            let history = if start != 0 && start <= now {
                state.mvcc.history(&request.span, start)
            } else {
                Vec::new()
            };
            (state.events.subscribe(), now, history)
        };
        let created = WatchMessage::Created {
            header: header(now),
        };
        if wire::write_frame(send, &created).await.is_err() {
            return End::Gone;
        }
        for (revision, batch) in history {
            let batch = RevisionEvents {
                revision,
                events: batch,
            };
            if let Err(end) = send_selected(send, request, range_id, &batch).await {
                return end;
            }
        }
        // Every revision up to `last` has been sent (or had nothing selected).
        let mut last = now.max(request.start_revision.saturating_sub(1));
        let mut tick = tokio::time::interval(Duration::from_millis(WATCH_PROGRESS_MS));
        tick.tick().await;
        loop {
            tokio::select! {
                received = events.recv() => match received {
                    Ok(batch) if batch.revision <= last => {}
                    Ok(batch) => {
                        last = batch.revision;
                        if let Err(end) = send_selected(send, request, range_id, &batch).await {
                            return end;
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        self.watch_overflows.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return End::Cancel(ApiError::WatchOverflow {
                            range_id,
                            resume_revision: last + 1,
                        })
                    }
                    Err(RecvError::Closed) => {
                        return End::Cancel(ApiError::Unavailable {
                            range_id,
                            reason: "the replica's state was replaced (snapshot) or is shutting down".into(),
                        })
                    }
                },
                _ = tick.tick() => {
                    if request.progress_notify {
                        let progress = WatchMessage::Progress { header: header(last) };
                        if wire::write_frame(send, &progress).await.is_err() {
                            return End::Gone;
                        }
                    } else if send.stopped().now_or_never().is_some() {
                        // The client stopped reading, or the connection is gone.
                        return End::Gone;
                    }
                }
            }
        }
    }
}

/// Sends the events of `batch` that `request` selects, if any.
async fn send_selected(
    send: &mut quinn::SendStream,
    request: &WatchRequest,
    range_id: RangeId,
    batch: &RevisionEvents,
) -> Result<(), End> {
    let events: Vec<_> = batch
        .events
        .iter()
        .filter(|e| request.selects(e))
        .map(|e| {
            let mut e = e.clone();
            if !request.prev_kv {
                e.prev_kv = None;
            }
            e
        })
        .collect();
    if events.is_empty() {
        return Ok(());
    }
    let message = WatchMessage::Events {
        header: ResponseHeader {
            range_id,
            revision: batch.revision,
        },
        events,
    };
    wire::write_frame(send, &message)
        .await
        .map_err(|_| End::Gone)
}
