//! Watches in the client: every watch of a [`Client`] on one range shares that range's
//! **watch channel** (one QUIC stream to one replica, run by one task), and a watch over
//! several ranges is one watch per range, merged into one [`Watcher`].
//!
//! Each watch remembers the next revision it owes its caller. When the channel breaks (the
//! node stopped, the channel fell behind and was cancelled with `WATCH_OVERFLOW`, a snapshot
//! reset the replica) it is reopened — on another replica if need be — and every watch is
//! recreated from its own next revision, so the caller sees every revision once, in order
//! per range, without doing anything. The channel appends a group's revisions once to the
//! group's log, which every watch of the group reads at its own pace ([`fanout`]). A caller
//! that does not keep up with its watch does not hold up the channel: once it is more than
//! the log's length behind, its watch is recreated from where it stopped (and once its own
//! buffer of history is full, its watch is dropped on the node until it has read half of it).
//! Only a compacted start revision, or `attempts_max` reopenings in a row that all fail, end
//! a watch with an error.

use std::collections::{HashMap, HashSet};
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use concord_placement::RangeDescriptor;
use concord_transport::api::{ApiError, ClientRequest, KeySpan, RangeId};
use concord_transport::watch::{
    Event, GroupId, WatchControl, WatchId, WatchMessage, WatchRequest, PROGRESS_INTERVAL_MS,
};
use concord_transport::wire;
use tokio::sync::{mpsc, oneshot};

use crate::client::{backoff, clip, RESPONSE_BYTES_MAX};
use crate::{Client, Error};

mod fanout;

use fanout::{Follow, GroupLog, ItemKind, Position, Receiver, Refused, Sink};

/// Responses buffered per watcher before its watch is dropped on the node (and later
/// recreated from where the caller stopped reading).
const WATCH_CLIENT_BUFFER: usize = 256;

/// How often a channel recreates the watches whose callers fell behind and caught up.
const CATCH_UP_CHECK: Duration = Duration::from_millis(100);

/// Progress intervals a channel may stay silent, while one of its watches asked for progress
/// notifications, before its node is taken for dead (the connection's idle timeout would
/// take 30 s to say so).
const SILENT_INTERVALS_MAX: u32 = 3;

/// Ids of the client's watches (one per range a watch covers).
static NEXT_WATCH_ID: AtomicU64 = AtomicU64::new(1);

/// The watch channels of a client, by range (`pub(crate)` for the client's state).
pub(crate) type Channels = std::sync::Mutex<HashMap<RangeId, mpsc::UnboundedSender<Command>>>;

/// The events of one revision of a range, shared by every watcher of the client they are
/// handed to: a fan-out to many watchers of the same span copies a pointer per watcher, not
/// the keys and values. Reads as a slice of [`Event`]s.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Events(Arc<[Event]>);

impl Deref for Events {
    type Target = [Event];

    fn deref(&self) -> &[Event] {
        &self.0
    }
}

impl From<Vec<Event>> for Events {
    fn from(events: Vec<Event>) -> Self {
        Self(events.into())
    }
}

impl<'a> IntoIterator for &'a Events {
    type Item = &'a Event;
    type IntoIter = std::slice::Iter<'a, Event>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// What a [`Watcher`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchResponse {
    /// The range the events come from.
    pub range_id: RangeId,
    /// The range's revision of these events (or of the bookmark).
    pub revision: u64,
    /// The events of that revision (empty for a progress bookmark).
    pub events: Events,
    /// A progress bookmark: every event of the range up to `revision` has been delivered.
    pub progress: bool,
}

/// A live watch. Dropping it stops it on every range.
pub struct Watcher {
    rx: Receiver,
    parts: Vec<(mpsc::UnboundedSender<Command>, u64)>,
}

impl Watcher {
    /// The next response, in order per range; `None` once the watch has ended. Cancel-safe:
    /// a response is taken only when it is returned.
    pub async fn next(&mut self) -> Option<Result<WatchResponse, Error>> {
        std::future::poll_fn(|cx| self.rx.poll_next(cx)).await
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // Pieces moved to other ranges' channels since are removed by those channels.
        self.rx.close();
        for (channel, id) in &self.parts {
            let _ = channel.send(Command::Remove { id: *id });
        }
    }
}

/// A request to a range's channel task.
pub(crate) enum Command {
    Add {
        id: u64,
        /// The caller's [`Watcher`]: every piece of one watch, in any range, names it.
        caller: u64,
        request: WatchRequest,
        /// The span of the caller's whole watch (`request` has its part in this range).
        whole: KeySpan,
        sink: Sink,
        ready: oneshot::Sender<Result<(), Error>>,
    },
    Remove {
        id: u64,
    },
    /// The caller of watch `id` fell behind its group's log while following it at
    /// `position`: recreate the watch from the first revision it has not taken.
    Lagged {
        id: u64,
        position: Arc<Position>,
    },
}

impl Client {
    /// Watches `request.span` (a key, prefix or interval over any number of ranges). Returns
    /// once every range's watch is established: a write acknowledged after that is seen.
    pub async fn watch(&self, request: WatchRequest) -> Result<Watcher, Error> {
        let (sink, rx) = fanout::inbox();
        let caller = NEXT_WATCH_ID.fetch_add(1, Ordering::Relaxed);
        let mut watcher = Watcher {
            rx,
            parts: Vec::new(),
        };
        for desc in self.overlapping(&request.span) {
            let mut part = request.clone();
            part.span = clip(&desc, &request.span);
            // A channel task that just ended (it had no watches left) drops the command: try
            // again with a fresh one.
            let mut tries = 0;
            loop {
                let id = NEXT_WATCH_ID.fetch_add(1, Ordering::Relaxed);
                let (ready_tx, ready) = oneshot::channel();
                let channel = self.watch_channel(&desc);
                let add = Command::Add {
                    id,
                    caller,
                    request: part.clone(),
                    whole: request.span.clone(),
                    sink: sink.clone(),
                    ready: ready_tx,
                };
                if channel.send(add).is_ok() {
                    watcher.parts.push((channel, id));
                    match ready.await {
                        Ok(Ok(())) => break,
                        Ok(Err(e)) => return Err(e),
                        Err(_) => {}
                    }
                }
                tries += 1;
                if tries >= 3 {
                    return Err(Error::Protocol("watch channel ended early".into()));
                }
            }
        }
        Ok(watcher)
    }

    /// The channel task of `desc`'s range, started if there is none.
    fn watch_channel(&self, desc: &RangeDescriptor) -> mpsc::UnboundedSender<Command> {
        let mut channels = self.watch_channels().lock().expect("watch channels lock");
        if let Some(channel) = channels.get(&desc.id).filter(|c| !c.is_closed()) {
            return channel.clone();
        }
        let (tx, commands) = mpsc::unbounded_channel();
        let task = Channel {
            client: self.clone(),
            desc: desc.clone(),
            commands,
            watches: Watches::default(),
            by_server_id: HashMap::new(),
            groups: HashMap::new(),
            next_server_id: 0,
            seq: 0,
            me: tx.downgrade(),
        };
        tokio::spawn(task.run());
        channels.insert(desc.id, tx.clone());
        tx
    }
}

/// One watch of a channel, as the client keeps it.
struct Local {
    /// The caller's [`Watcher`] (shared by the pieces of one watch).
    caller: u64,
    request: WatchRequest,
    /// The span of the caller's whole watch, of which `request` is the part in this range.
    whole: KeySpan,
    sink: Sink,
    /// First revision still owed to the caller (its start revision at first); 0 for a watch
    /// "from now" until it is first established.
    next: u64,
    /// The id this channel gave the watch on the node (fresh at each creation).
    server_id: WatchId,
    /// Its group and the revision it was established at, once `Created`.
    joined: Option<(GroupId, u64)>,
    /// The caller's buffer was full: the watch is dropped on the node until it catches up.
    behind: bool,
    /// The position of the watch in its group's log, while its caller reads it from there.
    follow: Option<Arc<Position>>,
    /// Waiting for the other pieces of its caller's watch in this range (after a merge):
    /// not created on the node until they are here and it is one watch with them.
    pending: bool,
    /// Pieces of the span owed revisions from a later one than `next` (pieces put together
    /// after a merge): their events below it were delivered under their former range.
    floors: Vec<(KeySpan, u64)>,
    ready: Option<oneshot::Sender<Result<(), Error>>>,
}

impl Local {
    /// Whether the caller is still owed `revision` (a bookmark at `revision` when
    /// `progress`), and can take it now.
    fn owes(&self, revision: u64, progress: bool) -> bool {
        let owed = if progress {
            revision + 1 >= self.next
        } else {
            revision >= self.next
        };
        owed && !self.behind
    }

    /// Records that `revision` was handed over (or had nothing for the caller).
    fn advance(&mut self, revision: u64) {
        self.next = self.next.max(revision + 1);
        let next = self.next;
        self.floors.retain(|(_, floor)| *floor > next);
    }

    /// The first revision owed for `key`.
    fn floor(&self, key: &[u8]) -> u64 {
        self.floors
            .iter()
            .find(|(span, _)| span.contains(key))
            .map_or(self.next, |(_, floor)| (*floor).max(self.next))
    }

    /// Stops the caller reading the group's log: what it has not taken from there is owed
    /// again, from the next creation of the watch.
    fn unfollow(&mut self) {
        if let Some(position) = self.follow.take() {
            self.next = self.next.max(position.stop().0);
        }
    }

    /// Ends watch `id` with `e`: its creation fails, or its caller gets the error (after
    /// everything queued before).
    fn fail(mut self, id: u64, e: Error) {
        self.unfollow();
        match self.ready {
            Some(ready) => {
                let _ = ready.send(Err(e));
            }
            None => self.sink.push(id, u64::MAX, ItemKind::Failed(e)),
        }
    }
}

/// How a channel ended.
enum ChannelEnd {
    /// No watches left (or the client is gone): the task ends.
    Idle,
    /// Reopen and recreate every watch.
    Resume(Error),
    /// The range split (or the route was out of date): plan the watches again over the
    /// refreshed routes, then reopen.
    Moved(Error),
    /// The watches cannot go on.
    Fatal(Error),
}

/// The watches of a channel by id, and how many pieces of each caller's watch they hold: a
/// channel of 100,000 watches asks "is this its caller's only piece here" at every creation,
/// which must not walk them all.
#[derive(Default)]
struct Watches {
    by_id: HashMap<u64, Local>,
    pieces: HashMap<u64, usize>,
}

impl Watches {
    fn insert(&mut self, id: u64, local: Local) {
        *self.pieces.entry(local.caller).or_default() += 1;
        if let Some(old) = self.by_id.insert(id, local) {
            self.forget(old.caller);
        }
    }

    fn remove(&mut self, id: &u64) -> Option<Local> {
        let local = self.by_id.remove(id)?;
        self.forget(local.caller);
        Some(local)
    }

    /// Removes every watch.
    fn take(&mut self) -> HashMap<u64, Local> {
        self.pieces.clear();
        std::mem::take(&mut self.by_id)
    }

    fn get_mut(&mut self, id: &u64) -> Option<&mut Local> {
        self.by_id.get_mut(id)
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut Local> {
        self.by_id.values_mut()
    }

    /// How many pieces of `caller`'s watch the channel holds.
    fn pieces_of(&self, caller: u64) -> usize {
        self.pieces.get(&caller).copied().unwrap_or(0)
    }

    /// The ids of the watches `keep` selects, by caller. The pieces of one caller share its
    /// request's options, so a selection by option keeps all of a caller's pieces or none.
    fn by_caller(&self, keep: impl Fn(&Local) -> bool) -> HashMap<u64, Vec<u64>> {
        let mut callers: HashMap<u64, Vec<u64>> = HashMap::new();
        for (id, local) in self.by_id.iter().filter(|(_, l)| keep(l)) {
            callers.entry(local.caller).or_default().push(*id);
        }
        callers
    }

    fn forget(&mut self, caller: u64) {
        if let Some(n) = self.pieces.get_mut(&caller) {
            *n -= 1;
            if *n == 0 {
                self.pieces.remove(&caller);
            }
        }
    }
}

impl Deref for Watches {
    type Target = HashMap<u64, Local>;

    fn deref(&self) -> &Self::Target {
        &self.by_id
    }
}

/// A group of the node's, as the channel hands out its revisions.
#[derive(Default)]
struct Group {
    /// Read by the watches that follow it (one append per revision, whatever their number).
    log: Option<Arc<GroupLog>>,
    /// Watches handed each revision one by one: pieces put together after a merge, whose
    /// events are owed from a revision per key span (`Local::floors`).
    private: HashSet<u64>,
    /// Its watches established here, followers and private ones: the group (and its log)
    /// is forgotten with its last one, as the node forgets it.
    members: usize,
}

/// The task running the watch channel of one range.
struct Channel {
    client: Client,
    desc: RangeDescriptor,
    commands: mpsc::UnboundedReceiver<Command>,
    watches: Watches,
    by_server_id: HashMap<WatchId, u64>,
    groups: HashMap<GroupId, Group>,
    next_server_id: WatchId,
    /// Counts the frames from the node (across streams): what a watcher gets from its inbox
    /// and from a log is put back in this order.
    seq: u64,
    /// Handed to followers, to say they lagged.
    me: mpsc::WeakUnboundedSender<Command>,
}

impl Channel {
    async fn run(mut self) {
        let attempts_max = self.client.config().attempts_max.max(1);
        let (mut failures, mut tries) = (0, 0u32);
        // The task is started for a watch whose `Add` is on its way.
        match self.commands.recv().await {
            Some(command) => self.command_offline(command),
            None => return,
        }
        loop {
            if self.watches.is_empty() {
                // The last watch went: end (a later watch starts a new task).
                return;
            }
            let mut opened = false;
            let end = self.channel(tries, &mut opened).await;
            self.disconnected();
            tries = tries.wrapping_add(1);
            let e = match end {
                ChannelEnd::Idle => return,
                ChannelEnd::Fatal(e) => {
                    self.fail_all(e);
                    continue;
                }
                ChannelEnd::Moved(e) => {
                    self.replan().await;
                    e
                }
                ChannelEnd::Resume(e) => e,
            };
            tracing::debug!(range = self.desc.id, "watch channel resumes: {e}");
            failures = if opened { 0 } else { failures + 1 };
            if failures >= attempts_max {
                self.fail_all(Error::Exhausted {
                    attempts: attempts_max,
                    last: Box::new(e),
                });
                failures = 0;
                continue;
            }
            backoff(failures).await;
        }
    }

    /// Plans every watch of the channel again over the refreshed routes: the part of its
    /// span still in this range stays, each part now in another range (split off this one)
    /// moves to that range's channel, from the revision the watch owes. A watch's events
    /// keep their revisions across a split, so the caller sees no gap and no repeat.
    async fn replan(&mut self) {
        if self.client.refresh_routes().await.is_err() {
            return;
        }
        if let Some(desc) = self
            .client
            .routes()
            .ranges
            .iter()
            .find(|d| d.id == self.desc.id)
        {
            self.desc = desc.clone();
        }
        for (id, mut local) in self.watches.take() {
            let mut ready = local.ready.take();
            let mut start = local.request.clone();
            if local.next != 0 {
                start.start_revision = local.next;
            }
            let mut stays = false;
            for desc in self.client.overlapping(&local.request.span) {
                let span = clip(&desc, &local.request.span);
                if desc.id == self.desc.id {
                    stays = true;
                    continue;
                }
                let (ready_tx, _) = oneshot::channel();
                let add = Command::Add {
                    id: NEXT_WATCH_ID.fetch_add(1, Ordering::Relaxed),
                    caller: local.caller,
                    request: WatchRequest {
                        span,
                        ..start.clone()
                    },
                    whole: local.whole.clone(),
                    sink: local.sink.clone(),
                    ready: ready.take().unwrap_or(ready_tx),
                };
                // A channel that just ended drops it: the caller sees the watch end then.
                let _ = self.client.watch_channel(&desc).send(add);
            }
            if stays {
                local.request.span = clip(&self.desc, &local.request.span);
                local.ready = ready;
                self.watches.insert(id, local);
            }
        }
        self.by_server_id.clear();
        self.groups.clear();
        self.coalesce();
    }

    /// Makes one watch of the pieces of each caller's watch in this range, once they cover
    /// all it selects here; until then they wait (`pending`). Called with no channel open.
    ///
    /// After a merge the range holds pieces that were watched in two ranges, each up to its
    /// own revision. One watch from the lower of the two, with each piece's events owed only
    /// from its own revision on (`floors`), keeps every guarantee: no event twice, none lost,
    /// the revisions of the range in order, one response per revision, and no bookmark
    /// before every piece is in.
    fn coalesce(&mut self) {
        for ids in self.watches.by_caller(|_| true).into_values() {
            let share = clip(&self.desc, &self.watches[&ids[0]].whole);
            let complete = covers(&share, ids.iter().map(|id| &self.watches[id].request.span));
            for id in &ids {
                self.watches.get_mut(id).expect("watch exists").pending = !complete;
            }
            if !complete || ids.len() == 1 {
                continue;
            }
            let pieces: Vec<Local> = ids
                .iter()
                .map(|id| self.watches.remove(id).expect("watch exists"))
                .collect();
            let owed = |l: &Local| if l.next == 0 { u64::MAX } else { l.next };
            let next = pieces.iter().map(owed).min().unwrap_or(u64::MAX);
            let mut floors = Vec::new();
            for piece in &pieces {
                floors.extend(piece.floors.iter().cloned());
                if owed(piece) > next {
                    floors.push((piece.request.span.clone(), piece.next));
                }
            }
            let mut pieces = pieces.into_iter();
            let mut whole = pieces.next().expect("two pieces or more");
            for ready in pieces.filter_map(|piece| piece.ready) {
                match whole.ready {
                    None => whole.ready = Some(ready),
                    // Two creations awaited on one watch: the later is told now.
                    Some(_) => {
                        let _ = ready.send(Ok(()));
                    }
                }
            }
            whole.request.span = share;
            whole.next = if next == u64::MAX { 0 } else { next };
            whole.floors = floors;
            whole.pending = false;
            self.watches.insert(ids[0], whole);
        }
    }

    /// Ends every watch with `e`.
    fn fail_all(&mut self, e: Error) {
        self.by_server_id.clear();
        self.groups.clear();
        for (id, local) in self.watches.take() {
            local.fail(id, e.clone());
        }
    }

    /// The stream ended: no watch is established, and no caller reads a log any more.
    fn disconnected(&mut self) {
        self.by_server_id.clear();
        self.groups.clear();
        for local in self.watches.values_mut() {
            local.unfollow();
            local.joined = None;
        }
    }

    /// A command while no channel is open.
    fn command_offline(&mut self, command: Command) {
        match command {
            Command::Add {
                id,
                caller,
                request,
                whole,
                sink,
                ready,
            } => {
                let next = request.start_revision;
                self.watches.insert(
                    id,
                    Local {
                        caller,
                        request,
                        whole,
                        sink,
                        next,
                        server_id: 0,
                        joined: None,
                        behind: false,
                        follow: None,
                        pending: false,
                        floors: Vec::new(),
                        ready: Some(ready),
                    },
                );
            }
            Command::Remove { id } => {
                self.watches.remove(&id);
            }
            // With no stream, no watch follows a log.
            Command::Lagged { .. } => {}
        }
    }

    /// Sends `Create` for watch `id` from the revision it owes, under a fresh node id.
    async fn create(&mut self, send: &mut quinn::SendStream, id: u64) -> Result<(), Error> {
        self.next_server_id += 1;
        let server_id = self.next_server_id;
        self.leave_group(id);
        let local = self.watches.get_mut(&id).expect("watch exists");
        local.server_id = server_id;
        local.behind = false;
        let mut request = local.request.clone();
        if local.next != 0 {
            request.start_revision = local.next;
        }
        self.by_server_id.insert(server_id, id);
        let control = WatchControl::Create {
            id: server_id,
            request,
        };
        wire::write_frame(send, &control)
            .await
            .map_err(|e| Error::Protocol(e.to_string()))
    }

    /// Takes watch `id` out of the group it joined (its caller stops reading the group's
    /// log), and forgets the group with its last watch.
    fn leave_group(&mut self, id: u64) {
        let Some(local) = self.watches.get_mut(&id) else {
            return;
        };
        local.unfollow();
        let Some((group_id, _)) = local.joined.take() else {
            return;
        };
        if let Some(group) = self.groups.get_mut(&group_id) {
            group.private.remove(&id);
            group.members -= 1;
            if group.members == 0 {
                self.groups.remove(&group_id);
            }
        }
    }

    /// Stops watch `id` on the node (it stays known here unless the caller removed it).
    async fn cancel(&mut self, send: &mut quinn::SendStream, id: u64) -> Result<(), Error> {
        let Some(local) = self.watches.get(&id) else {
            return Ok(());
        };
        let server_id = local.server_id;
        self.by_server_id.remove(&server_id);
        self.leave_group(id);
        let control = WatchControl::Cancel { id: server_id };
        wire::write_frame(send, &control)
            .await
            .map_err(|e| Error::Protocol(e.to_string()))
    }

    /// One channel to one replica, until it ends.
    async fn channel(&mut self, attempt: u32, opened: &mut bool) -> ChannelEnd {
        let replicas = &self.desc.replicas;
        let node = replicas[attempt as usize % replicas.len().max(1)];
        let Some(addr) = self.client.node_addr(node) else {
            return ChannelEnd::Resume(Error::Config(format!("no address for node {node}")));
        };
        let open = ClientRequest::Watch {
            range_id: self.desc.id,
            epoch: self.desc.epoch,
        };
        let (mut send, mut recv) = match self.client.open_channel(&addr, &open).await {
            Ok(streams) => streams,
            Err(e) => return ChannelEnd::Resume(e),
        };
        // Frames are read by their own task: a frame read is not cancel-safe.
        let (frames_tx, mut frames) = mpsc::channel(WATCH_CLIENT_BUFFER);
        // Aborted when dropped with the channel.
        let mut reader = tokio::task::JoinSet::new();
        reader.spawn(async move {
            loop {
                let frame =
                    wire::read_frame::<_, WatchMessage>(&mut recv, RESPONSE_BYTES_MAX).await;
                let failed = frame.is_err();
                if frames_tx.send(frame).await.is_err() || failed {
                    return;
                }
            }
        });
        match frames.recv().await {
            Some(Ok(WatchMessage::Opened { .. })) => *opened = true,
            Some(Ok(WatchMessage::Cancelled(e))) => return cancelled(e),
            Some(Ok(other)) => {
                return ChannelEnd::Resume(Error::Protocol(format!("unexpected {other:?}")))
            }
            Some(Err(e)) => return ChannelEnd::Resume(Error::Protocol(format!("{addr}: {e}"))),
            None => return ChannelEnd::Resume(Error::Protocol("watch channel closed".into())),
        }
        self.by_server_id.clear();
        self.groups.clear();
        // Watches whose callers are still behind wait for `catch_up`.
        let ids: Vec<u64> = self
            .watches
            .iter()
            .filter(|(_, l)| !l.behind && !l.pending)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Err(e) = self.create(&mut send, id).await {
                return ChannelEnd::Resume(e);
            }
        }
        let mut catch_up = tokio::time::interval(CATCH_UP_CHECK);
        let silence_max = Duration::from_millis(PROGRESS_INTERVAL_MS) * SILENT_INTERVALS_MAX;
        let mut heard = Instant::now();
        loop {
            let step = tokio::select! {
                command = self.commands.recv() => match command {
                    None => return ChannelEnd::Idle,
                    Some(command) => self.command(&mut send, command).await,
                },
                frame = frames.recv() => match frame {
                    Some(Ok(message)) => {
                        heard = Instant::now();
                        self.message(&mut send, message).await
                    }
                    Some(Err(e)) => Err(ChannelEnd::Resume(Error::Protocol(format!("{addr}: {e}")))),
                    None => Err(ChannelEnd::Resume(Error::Protocol("watch channel closed".into()))),
                },
                _ = catch_up.tick() => {
                    let wants_progress = self
                        .watches
                        .values()
                        .any(|l| l.request.progress_notify && l.joined.is_some());
                    if wants_progress && heard.elapsed() > silence_max {
                        Err(ChannelEnd::Resume(Error::Protocol(format!(
                            "{addr}: no progress notification for {silence_max:?}"
                        ))))
                    } else {
                        self.catch_up(&mut send).await
                    }
                }
            };
            if let Err(end) = step {
                return end;
            }
            if self.watches.is_empty() {
                let _ = send.finish();
                return ChannelEnd::Idle;
            }
        }
    }

    async fn command(
        &mut self,
        send: &mut quinn::SendStream,
        command: Command,
    ) -> Result<(), ChannelEnd> {
        match command {
            Command::Add { id, .. } => {
                self.command_offline(command);
                let local = &self.watches[&id];
                let alone = self.watches.pieces_of(local.caller) == 1;
                let share = clip(&self.desc, &local.whole);
                if !alone || !covers(&share, std::iter::once(&local.request.span)) {
                    // A piece of a watch whose range took in its neighbour's keys (or that
                    // this channel's descriptor is too old for): plan the channel again over
                    // fresh routes, which makes one watch of the pieces.
                    return Err(ChannelEnd::Moved(Error::Protocol(format!(
                        "range {} holds more of a watch than this channel planned for",
                        self.desc.id
                    ))));
                }
                self.create(send, id).await.map_err(ChannelEnd::Resume)
            }
            Command::Remove { id } => {
                let result = self.cancel(send, id).await;
                self.watches.remove(&id);
                result.map_err(ChannelEnd::Resume)
            }
            Command::Lagged { id, position } => {
                let current = self
                    .watches
                    .get(&id)
                    .and_then(|l| l.follow.as_ref())
                    .is_some_and(|p| Arc::ptr_eq(p, &position));
                if !current {
                    // Recreated or removed since: the channel stopped that follow itself.
                    return Ok(());
                }
                self.cancel(send, id).await.map_err(ChannelEnd::Resume)?;
                self.create(send, id).await.map_err(ChannelEnd::Resume)
            }
        }
    }

    /// Handles one frame from the node.
    async fn message(
        &mut self,
        send: &mut quinn::SendStream,
        message: WatchMessage,
    ) -> Result<(), ChannelEnd> {
        let range_id = self.desc.id;
        let response = |revision, events, progress| WatchResponse {
            range_id,
            revision,
            events,
            progress,
        };
        self.seq += 1;
        let seq = self.seq;
        let mut deliveries: Vec<(u64, WatchResponse)> = Vec::new();
        match message {
            WatchMessage::Opened { .. } => {}
            WatchMessage::Created { id, group, header } => {
                if let Some(local_id) = self.by_server_id.get(&id).copied() {
                    let local = self.watches.get_mut(&local_id).expect("watch exists");
                    local.joined = Some((group, header.revision));
                    if local.next == 0 {
                        local.next = header.revision + 1;
                    }
                    if let Some(ready) = local.ready.take() {
                        let _ = ready.send(Ok(()));
                    }
                    let group = self.groups.entry(group).or_default();
                    group.members += 1;
                    if local.floors.is_empty() {
                        // From now on its caller reads the group's revisions from the log.
                        let log = group.log.get_or_insert_with(|| GroupLog::new(range_id));
                        let position = Arc::new(Position::new(local.next.max(header.revision + 1)));
                        let follow = Follow {
                            from: log.end(),
                            log: log.clone(),
                            position: position.clone(),
                            progress: local.request.progress_notify,
                            channel: self.me.clone(),
                        };
                        local.follow = Some(position);
                        local.sink.push(local_id, seq, ItemKind::Follow(follow));
                    } else {
                        group.private.insert(local_id);
                    }
                }
            }
            WatchMessage::History { id, header, events } => {
                if let Some(local_id) = self.by_server_id.get(&id) {
                    deliveries.push((*local_id, response(header.revision, events.into(), false)));
                }
            }
            WatchMessage::Events {
                group,
                header,
                events,
            } => {
                let events = Events::from(events);
                let Some(group) = self.groups.get(&group) else {
                    return Ok(());
                };
                if let Some(log) = &group.log {
                    log.append(seq, header.revision, Some(events.clone()));
                }
                for local_id in &group.private {
                    let local = &self.watches[local_id];
                    let joined = local.joined.is_some_and(|(_, at)| at < header.revision);
                    // Only watches that still owe this revision get the (shared) events.
                    if joined && local.owes(header.revision, false) {
                        deliveries
                            .push((*local_id, response(header.revision, events.clone(), false)));
                    }
                }
            }
            WatchMessage::Progress { header } => {
                // One bookmark per caller, and only once its watches established here cover
                // all it selects in the range: a part moving in from a range merged into this
                // one may still bring events at or below the bookmark's revision.
                // Followers find theirs in their group's log; of the others, only the callers
                // that asked for bookmarks are looked at (a channel may hold 100,000 watches,
                // few of which ask).
                for log in self.groups.values().filter_map(|g| g.log.as_ref()) {
                    log.append(seq, header.revision, None);
                }
                let asked = self
                    .watches
                    .by_caller(|l| l.request.progress_notify && l.follow.is_none());
                for ids in asked.into_values() {
                    let pieces = || ids.iter().map(|id| (*id, &self.watches[id]));
                    let Some((local_id, local)) =
                        pieces().find(|(_, l)| l.joined.is_some() && l.owes(header.revision, true))
                    else {
                        continue;
                    };
                    let established = pieces()
                        .map(|(_, l)| l)
                        .filter(|l| l.joined.is_some() && !l.behind)
                        .map(|l| &l.request.span);
                    if covers(&clip(&self.desc, &local.whole), established) {
                        deliveries
                            .push((local_id, response(header.revision, Events::default(), true)));
                    }
                }
            }
            WatchMessage::Refused { error, .. } if error.is_stale_route() => {
                // The range split after the channel opened: plan every watch again.
                return Err(ChannelEnd::Moved(Error::Api(error)));
            }
            WatchMessage::Refused { id, error } => {
                if let Some(local_id) = self.by_server_id.remove(&id) {
                    if let Some(local) = self.watches.remove(&local_id) {
                        local.fail(local_id, Error::Api(error));
                    }
                }
            }
            WatchMessage::Cancelled(e) => return Err(cancelled(e)),
        }
        for (local_id, response) in deliveries {
            self.deliver(send, seq, local_id, response)
                .await
                .map_err(ChannelEnd::Resume)?;
        }
        Ok(())
    }

    /// Hands `response` to watch `id`'s caller if it is owed; a full buffer drops the watch
    /// on the node until the caller catches up, a gone caller removes it.
    async fn deliver(
        &mut self,
        send: &mut quinn::SendStream,
        seq: u64,
        id: u64,
        response: WatchResponse,
    ) -> Result<(), Error> {
        let Some(local) = self.watches.get_mut(&id) else {
            return Ok(());
        };
        if !local.owes(response.revision, response.progress) {
            return Ok(());
        }
        let revision = response.revision;
        let mut response = response;
        if !local.floors.is_empty() && !response.progress {
            let owed: Vec<Event> = response
                .events
                .iter()
                .filter(|e| local.floor(&e.kv.key) <= revision)
                .cloned()
                .collect();
            response.events = owed.into();
            if response.events.is_empty() {
                local.advance(revision);
                return Ok(());
            }
        }
        match local.sink.offer(id, seq, response, WATCH_CLIENT_BUFFER) {
            Ok(()) => {
                local.advance(revision);
                Ok(())
            }
            Err(Refused::Full) => {
                local.behind = true;
                // A watch whose history fills its caller's buffer before the node confirmed
                // it is open all the same, and its caller must start reading for it to go on
                // (`Client::watch` waited for this signal, the channel for the caller).
                if let Some(ready) = local.ready.take() {
                    let _ = ready.send(Ok(()));
                }
                self.cancel(send, id).await
            }
            Err(Refused::Closed) => {
                let result = self.cancel(send, id).await;
                self.watches.remove(&id);
                result
            }
        }
    }

    /// Removes the watches whose callers are gone (a follower is not handed anything to
    /// find out), and recreates those whose callers were behind and have read half their
    /// buffer.
    async fn catch_up(&mut self, send: &mut quinn::SendStream) -> Result<(), ChannelEnd> {
        let (mut gone, mut ready) = (Vec::new(), Vec::new());
        for (id, local) in self.watches.iter() {
            if local.sink.is_closed() {
                gone.push(*id);
            } else if local.behind && local.sink.queued() <= WATCH_CLIENT_BUFFER / 2 {
                ready.push(*id);
            }
        }
        for id in gone {
            let result = self.cancel(send, id).await;
            self.watches.remove(&id);
            result.map_err(ChannelEnd::Resume)?;
        }
        for id in ready {
            self.create(send, id).await.map_err(ChannelEnd::Resume)?;
        }
        Ok(())
    }
}

/// Whether `parts` (disjoint pieces of one watch) cover all of `span`.
fn covers<'a>(span: &KeySpan, parts: impl Iterator<Item = &'a KeySpan>) -> bool {
    let Some(end) = &span.end else {
        // A single key: a part is the key itself.
        return parts.into_iter().any(|p| p == span);
    };
    let mut parts: Vec<&KeySpan> = parts.filter(|p| p.end.is_some()).collect();
    parts.sort_by(|a, b| a.key.cmp(&b.key));
    // Everything below `reached` is covered; `None`: everything is.
    let mut reached: Option<&[u8]> = Some(&span.key);
    for p in parts {
        let Some(at) = reached else { break };
        if p.key.as_slice() > at {
            break;
        }
        reached = match p.end.as_deref() {
            Some([]) => None,
            Some(e) if e > at => Some(e),
            _ => Some(at),
        };
    }
    match reached {
        None => true,
        Some(at) => !end.is_empty() && at >= end.as_slice(),
    }
}

/// How a `Cancelled` from the node ends the channel.
fn cancelled(e: ApiError) -> ChannelEnd {
    if e.is_stale_route() {
        return ChannelEnd::Moved(Error::Api(e));
    }
    match e {
        ApiError::WatchOverflow { .. }
        | ApiError::Unavailable { .. }
        | ApiError::NotLeader { .. } => ChannelEnd::Resume(Error::Api(e)),
        e => ChannelEnd::Fatal(Error::Api(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interval(from: &str, to: &str) -> KeySpan {
        KeySpan {
            key: from.as_bytes().to_vec(),
            end: Some(to.as_bytes().to_vec()),
        }
    }

    fn local(caller: u64) -> Local {
        let (sink, _) = fanout::inbox();
        Local {
            caller,
            request: WatchRequest::new(KeySpan::prefix("a")),
            whole: KeySpan::prefix("a"),
            sink,
            next: 0,
            server_id: 0,
            joined: None,
            behind: false,
            follow: None,
            pending: false,
            floors: Vec::new(),
            ready: None,
        }
    }

    #[test]
    fn watches_count_the_pieces_of_each_caller() {
        let mut watches = Watches::default();
        watches.insert(1, local(7));
        watches.insert(2, local(7));
        watches.insert(3, local(8));
        assert_eq!((watches.pieces_of(7), watches.pieces_of(8)), (2, 1));
        // Replacing a watch under its id counts it once, under its new caller.
        watches.insert(2, local(8));
        assert_eq!((watches.pieces_of(7), watches.pieces_of(8)), (1, 2));
        let mut by_caller: Vec<(u64, Vec<u64>)> = watches
            .by_caller(|_| true)
            .into_iter()
            .map(|(caller, mut ids)| {
                ids.sort();
                (caller, ids)
            })
            .collect();
        by_caller.sort();
        assert_eq!(by_caller, vec![(7, vec![1]), (8, vec![2, 3])]);
        assert!(watches.remove(&1).is_some());
        assert!(watches.remove(&1).is_none());
        assert_eq!(watches.pieces_of(7), 0);
        assert_eq!(watches.take().len(), 2);
        assert_eq!((watches.pieces_of(8), watches.len()), (0, 0));
    }

    #[test]
    fn a_bookmark_waits_for_parts_covering_the_whole_range() {
        let whole = interval("b", "m");
        assert!(covers(&whole, [&interval("b", "m")].into_iter()));
        assert!(covers(
            &whole,
            [&interval("f", "m"), &interval("b", "f")].into_iter()
        ));
        // A part merged in from the right neighbour has not joined yet.
        assert!(!covers(&whole, [&interval("b", "f")].into_iter()));
        assert!(!covers(
            &whole,
            [&interval("b", "d"), &interval("e", "m")].into_iter()
        ));
        assert!(!covers(&whole, std::iter::empty()));
        // Unbounded on the right.
        let tail = interval("b", "");
        assert!(covers(
            &tail,
            [&interval("b", "x"), &interval("x", "")].into_iter()
        ));
        assert!(!covers(&tail, [&interval("b", "x")].into_iter()));
        // A single key.
        let key = KeySpan::key(b"k".to_vec());
        assert!(covers(&key, [&key].into_iter()));
        assert!(!covers(&key, std::iter::empty()));
    }
}
