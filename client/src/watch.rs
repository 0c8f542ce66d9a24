//! Watches in the client: one stream per range the span covers, merged into one [`Watcher`].
//!
//! Each range's stream remembers the next revision it owes; when the stream breaks (the node
//! stopped, the watcher fell behind and was cancelled with `WATCH_OVERFLOW`, a snapshot reset
//! the replica) it is reopened — on another replica if need be — from that revision, so the
//! caller sees every revision once, in order per range, without doing anything. Only a
//! compacted start revision, or `attempts_max` reconnections in a row that all fail, end the
//! watch with an error.

use concord_placement::RangeDescriptor;
use concord_transport::api::{ApiError, ClientRequest, RangeId};
use concord_transport::watch::{Event, WatchMessage, WatchRequest};
use concord_transport::wire;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::client::{backoff, clip, RESPONSE_BYTES_MAX};
use crate::{Client, Error};

/// Responses buffered in the client before a range's stream stops reading (and the node,
/// after its own buffer, cancels it; it is then resumed).
const WATCH_CLIENT_BUFFER: usize = 256;

/// What a [`Watcher`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchResponse {
    /// The range the events come from.
    pub range_id: RangeId,
    /// The range's revision of these events (or of the bookmark).
    pub revision: u64,
    /// The events of that revision (empty for a progress bookmark).
    pub events: Vec<Event>,
    /// A progress bookmark: every event of the range up to `revision` has been delivered.
    pub progress: bool,
}

/// A live watch. Dropping it stops every stream.
pub struct Watcher {
    rx: mpsc::Receiver<Result<WatchResponse, Error>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Watcher {
    /// The next response, in order per range; `None` once the watch has ended.
    pub async fn next(&mut self) -> Option<Result<WatchResponse, Error>> {
        self.rx.recv().await
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Client {
    /// Watches `request.span` (a key, prefix or interval over any number of ranges). Returns
    /// once every range's stream is established: a write acknowledged after that is seen.
    pub async fn watch(&self, request: WatchRequest) -> Result<Watcher, Error> {
        let (tx, rx) = mpsc::channel(WATCH_CLIENT_BUFFER);
        let mut tasks = Vec::new();
        let mut created = Vec::new();
        for desc in self.overlapping(&request.span) {
            let mut req = request.clone();
            req.span = clip(&desc, &request.span);
            let (ready_tx, ready_rx) = oneshot::channel();
            let stream = RangeWatch {
                client: self.clone(),
                desc,
                request: req,
                tx: tx.clone(),
                established: false,
            };
            tasks.push(tokio::spawn(stream.run(ready_tx)));
            created.push(ready_rx);
        }
        let watcher = Watcher { rx, tasks };
        for ready in created {
            match ready.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(Error::Protocol("watch task ended early".into())),
            }
        }
        Ok(watcher)
    }
}

/// The watch of one range.
struct RangeWatch {
    client: Client,
    desc: RangeDescriptor,
    request: WatchRequest,
    tx: mpsc::Sender<Result<WatchResponse, Error>>,
    /// The current stream reached `Created`.
    established: bool,
}

/// How a stream of one range ended.
enum StreamEnd {
    /// The caller dropped the watcher.
    CallerGone,
    /// Reopen from the next revision owed.
    Resume(Error),
    /// The watch cannot go on.
    Fatal(Error),
}

impl RangeWatch {
    async fn run(mut self, ready: oneshot::Sender<Result<(), Error>>) {
        let mut ready = Some(ready);
        let attempts_max = self.client.config().attempts_max.max(1);
        // Failed attempts in a row (an established stream resets it); `tries` rotates the
        // replicas.
        let (mut failures, mut tries) = (0, 0u32);
        loop {
            let end = self.stream(tries, &mut ready).await;
            tries = tries.wrapping_add(1);
            let e = match end {
                StreamEnd::CallerGone => return,
                StreamEnd::Fatal(e) => return self.fail(&mut ready, e).await,
                StreamEnd::Resume(e) => e,
            };
            tracing::debug!(range = self.desc.id, "watch resumes: {e}");
            failures = if self.established { 0 } else { failures + 1 };
            if failures >= attempts_max {
                let e = Error::Exhausted {
                    attempts: attempts_max,
                    last: Box::new(e),
                };
                return self.fail(&mut ready, e).await;
            }
            backoff(failures).await;
        }
    }

    async fn fail(&self, ready: &mut Option<oneshot::Sender<Result<(), Error>>>, e: Error) {
        match ready.take() {
            Some(ready) => {
                let _ = ready.send(Err(e));
            }
            None => {
                let _ = self.tx.send(Err(e)).await;
            }
        }
    }

    /// One stream to one replica, until it ends.
    async fn stream(
        &mut self,
        attempt: u32,
        ready: &mut Option<oneshot::Sender<Result<(), Error>>>,
    ) -> StreamEnd {
        self.established = false;
        let replicas = &self.desc.replicas;
        let node = replicas[attempt as usize % replicas.len().max(1)];
        let Some(addr) = self.client.node_addr(node) else {
            return StreamEnd::Resume(Error::Config(format!("no address for node {node}")));
        };
        let frame = ClientRequest::Watch {
            range_id: self.desc.id,
            epoch: self.desc.epoch,
            request: self.request.clone(),
        };
        let mut recv = match self.client.open_request(&addr, &frame).await {
            Ok(recv) => recv,
            Err(e) => return StreamEnd::Resume(e),
        };
        loop {
            let message =
                match wire::read_frame::<_, WatchMessage>(&mut recv, RESPONSE_BYTES_MAX).await {
                    Ok(m) => m,
                    Err(e) => return StreamEnd::Resume(Error::Protocol(format!("{addr}: {e}"))),
                };
            let response = match message {
                WatchMessage::Created { header } => {
                    self.established = true;
                    if self.request.start_revision == 0 {
                        self.request.start_revision = header.revision + 1;
                    }
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(Ok(()));
                    }
                    continue;
                }
                WatchMessage::Events { header, events } => WatchResponse {
                    range_id: header.range_id,
                    revision: header.revision,
                    events,
                    progress: false,
                },
                WatchMessage::Progress { header } => WatchResponse {
                    range_id: header.range_id,
                    revision: header.revision,
                    events: Vec::new(),
                    progress: true,
                },
                WatchMessage::Cancelled(e) => {
                    return match e {
                        ApiError::WatchOverflow { .. }
                        | ApiError::Unavailable { .. }
                        | ApiError::NotLeader { .. } => StreamEnd::Resume(Error::Api(e)),
                        e => StreamEnd::Fatal(Error::Api(e)),
                    }
                }
            };
            self.request.start_revision = self.request.start_revision.max(response.revision + 1);
            if self.tx.send(Ok(response)).await.is_err() {
                return StreamEnd::CallerGone;
            }
        }
    }
}
