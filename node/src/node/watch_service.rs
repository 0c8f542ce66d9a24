//! Serving a watch channel of one range on one client stream (any replica may serve it): any
//! number of watches, grouped by what they select (see `concord_transport::watch`).
//!
//! **Why nothing is lost or repeated:** the channel subscribes to the range's event channel
//! and reads the range's revision under one read lock, while the state machine publishes
//! under the write lock; so every revision above the one read arrives on the channel, in
//! order, and is sent at most once per group (`last` only grows). A watch created later reads
//! the revision again under the read lock, gets its history up to there from the MVCC index
//! (`History`), and from there its group's `Events` — the revisions at or below its `Created`
//! revision are still queued on the channel, and the client drops them for that watch.
//!
//! **Memory:** per watch, the node keeps its id, its group and whether it wants bookmarks;
//! per group, its request and member count; per channel, one event subscription and one
//! task. A channel that falls more than the event buffer behind (a slow reader stalls its
//! QUIC stream, which stalls this task) is cancelled with `WatchOverflow { resume_revision }`
//! instead of holding anything up; the client recreates its watches from where each stopped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use concord_transport::api::{ApiError, KeySpan, RangeId, ResponseHeader};
use concord_transport::watch::{
    GroupId, WatchControl, WatchId, WatchMessage, WatchRequest, PROGRESS_INTERVAL_MS,
};
use concord_transport::wire;
use futures::FutureExt;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use super::{Group, NodeInner};

/// How often a channel sends a progress bookmark (when a watch asked for them) or else checks
/// that its client is still there.
pub const WATCH_PROGRESS_MS: u64 = PROGRESS_INTERVAL_MS;

/// Control frames read ahead of the channel task.
const CONTROL_BUFFER: usize = 1_024;

/// Why a watch channel ended on this side.
enum End {
    /// The client went away (a frame could not be written or read).
    Gone,
    /// The channel ended with this message to the client.
    Cancel(ApiError),
}

/// Counts one in a gauge for as long as it lives (also when its future is dropped).
struct Counted<'a>(&'a AtomicU64, u64);

impl<'a> Counted<'a> {
    fn new(gauge: &'a AtomicU64) -> Self {
        Self(gauge, 0)
    }

    fn set(&mut self, n: u64) {
        if n > self.1 {
            self.0.fetch_add(n - self.1, Ordering::Relaxed);
        } else {
            self.0.fetch_sub(self.1 - n, Ordering::Relaxed);
        }
        self.1 = n;
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// The watches of one channel.
#[derive(Default)]
struct Watches {
    /// Watch → (its group, wants progress bookmarks).
    members: HashMap<WatchId, (GroupId, bool)>,
    /// Group → (what it selects, how many watches it has).
    groups: HashMap<GroupId, (WatchRequest, usize)>,
    /// What a group selects → the group.
    by_selection: HashMap<Selection, GroupId>,
    next_group: GroupId,
    /// Watches that want progress bookmarks.
    progress_wanted: usize,
}

impl Watches {
    /// Adds watch `id`, to the group of an identical request or a new one.
    fn add(&mut self, id: WatchId, request: &WatchRequest) -> GroupId {
        self.remove(id);
        let selection = selection_of(request);
        let group = match self.by_selection.get(&selection) {
            Some(group) => *group,
            None => {
                self.next_group += 1;
                let mut shared = request.clone();
                shared.start_revision = 0;
                shared.progress_notify = false;
                self.groups.insert(self.next_group, (shared, 0));
                self.by_selection.insert(selection, self.next_group);
                self.next_group
            }
        };
        self.groups.get_mut(&group).expect("group exists").1 += 1;
        self.members.insert(id, (group, request.progress_notify));
        self.progress_wanted += usize::from(request.progress_notify);
        group
    }

    fn remove(&mut self, id: WatchId) {
        let Some((group, progress)) = self.members.remove(&id) else {
            return;
        };
        self.progress_wanted -= usize::from(progress);
        let members = &mut self.groups.get_mut(&group).expect("group exists").1;
        *members -= 1;
        if *members == 0 {
            let (request, _) = self.groups.remove(&group).expect("group exists");
            self.by_selection.remove(&selection_of(&request));
        }
    }
}

/// What a watch selects: span, `prev_kv`, `no_put`, `no_delete` (watches alike share a group).
type Selection = (KeySpan, bool, bool, bool);

fn selection_of(request: &WatchRequest) -> Selection {
    (
        request.span.clone(),
        request.prev_kv,
        request.no_put,
        request.no_delete,
    )
}

impl NodeInner {
    /// Serves a watch channel of `range_id` until the client goes or the channel is
    /// cancelled.
    pub(super) async fn serve_watch(
        &self,
        send: &mut quinn::SendStream,
        recv: quinn::RecvStream,
        range_id: RangeId,
        epoch: u64,
    ) {
        if let End::Cancel(e) = self.watch_channel(send, recv, range_id, epoch).await {
            let _ = wire::write_frame(send, &WatchMessage::Cancelled(e)).await;
        }
    }

    async fn watch_channel(
        &self,
        send: &mut quinn::SendStream,
        mut recv: quinn::RecvStream,
        range_id: RangeId,
        epoch: u64,
    ) -> End {
        let group = match self.group_at(range_id, epoch) {
            Ok(group) => group,
            Err(e) => return End::Cancel(e),
        };
        let group = &*group;
        let header = |revision| ResponseHeader { range_id, revision };
        let (mut events, now) = {
            let state = group.state.read().expect("range state lock");
            (state.events.subscribe(), state.mvcc.revision())
        };
        if wire::write_frame(
            send,
            &WatchMessage::Opened {
                header: header(now),
            },
        )
        .await
        .is_err()
        {
            return End::Gone;
        }
        // Control frames are read by their own task: a frame read is not cancel-safe.
        let (control_tx, mut controls) = mpsc::channel(CONTROL_BUFFER);
        let max_bytes = self.config.limits.request_bytes_max;
        // Aborted when dropped with the channel.
        let mut reader = tokio::task::JoinSet::new();
        reader.spawn(async move {
            while let Ok(control) = wire::read_frame::<_, WatchControl>(&mut recv, max_bytes).await
            {
                if control_tx.send(control).await.is_err() {
                    return;
                }
            }
        });
        let mut counted = Counted::new(&self.watchers);
        let mut watches = Watches::default();
        // Every revision up to `last` has been sent to every group (or had nothing for it).
        let mut last = now;
        let mut tick = tokio::time::interval(Duration::from_millis(WATCH_PROGRESS_MS));
        tick.tick().await;
        loop {
            tokio::select! {
                control = controls.recv() => {
                    let Some(control) = control else { return End::Gone };
                    if let Err(end) = self.control(send, group, &mut watches, control).await {
                        return end;
                    }
                    counted.set(watches.members.len() as u64);
                }
                received = events.recv() => match received {
                    Ok(batch) if batch.revision <= last => {}
                    Ok(batch) => {
                        last = batch.revision;
                        for (id, (request, _)) in &watches.groups {
                            let selected = request.select(&batch.events);
                            if selected.is_empty() {
                                continue;
                            }
                            let message = WatchMessage::Events {
                                group: *id,
                                header: header(batch.revision),
                                events: selected,
                            };
                            if wire::write_frame(send, &message).await.is_err() {
                                return End::Gone;
                            }
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        self.watch_overflows.fetch_add(1, Ordering::Relaxed);
                        return End::Cancel(ApiError::WatchOverflow {
                            range_id,
                            resume_revision: last + 1,
                        });
                    }
                    Err(RecvError::Closed) => {
                        // A split, a freeze or a merge: the client re-plans its watches over
                        // the new ranges. A replica removed from the range (moved away) no
                        // longer hosts it: the client asks the routes for its replicas.
                        if let Err(e) = self.group_at(range_id, epoch) {
                            return End::Cancel(e);
                        }
                        return End::Cancel(ApiError::Unavailable {
                            range_id,
                            reason: "the replica's state was replaced (snapshot) or is shutting down".into(),
                        });
                    }
                },
                _ = tick.tick() => {
                    if watches.progress_wanted > 0 {
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

    /// Creates or cancels a watch of the channel.
    async fn control(
        &self,
        send: &mut quinn::SendStream,
        group: &Group,
        watches: &mut Watches,
        control: WatchControl,
    ) -> Result<(), End> {
        let range_id = group.id;
        let (id, request) = match control {
            WatchControl::Cancel { id } => {
                watches.remove(id);
                return Ok(());
            }
            WatchControl::Create { id, request } => (id, request),
        };
        let refuse = |error| WatchMessage::Refused { id, error };
        let max = self.config.limits.watches_per_channel_max;
        if watches.members.len() >= max && !watches.members.contains_key(&id) {
            let message = refuse(ApiError::TooManyWatches { max });
            return wire::write_frame(send, &message)
                .await
                .map_err(|_| End::Gone);
        }
        let read = {
            let state = group.state.read().expect("range state lock");
            // Under the same lock as the history: a split between the two would leave the
            // moved keys' events out of a history that still looks complete.
            let now = state.mvcc.revision();
            let compacted = state.mvcc.compact_revision();
            let start = request.start_revision;
            if !state.mvcc.bounds().contains_span(&request.span) {
                Err(ApiError::KeyOutsideRange { range_id })
            } else if start != 0 && start <= compacted {
                Err(ApiError::Compacted {
                    compact_revision: compacted,
                })
            } else if start != 0 && start <= now {
                Ok((now, state.mvcc.history(&request.span, start)))
            } else {
                Ok((now, Vec::new()))
            }
        };
        let (now, history) = match read {
            Ok(read) => read,
            Err(error) => {
                return wire::write_frame(send, &refuse(error))
                    .await
                    .map_err(|_| End::Gone);
            }
        };
        let header = |revision| ResponseHeader { range_id, revision };
        for (revision, batch) in history {
            let events = request.select(&batch);
            if events.is_empty() {
                continue;
            }
            let message = WatchMessage::History {
                id,
                header: header(revision),
                events,
            };
            wire::write_frame(send, &message)
                .await
                .map_err(|_| End::Gone)?;
        }
        let group_id = watches.add(id, &request);
        let created = WatchMessage::Created {
            id,
            group: group_id,
            header: header(now),
        };
        wire::write_frame(send, &created)
            .await
            .map_err(|_| End::Gone)
    }
}
