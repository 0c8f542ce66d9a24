//! How a watch channel hands what it receives to its watchers without a step per watcher.
//!
//! The node sends each revision of a range once per *group* (its watches of one span and
//! options), and one client may hold 100,000 watches of a group. Copying every revision into
//! 100,000 queues cost the channel task a step per watcher and revision, and made it the
//! bottleneck of a large fan-out. Instead:
//!
//! - each group has a [`GroupLog`]: the channel appends each revision (and each progress
//!   bookmark) once, every watcher of the group reads it from its own position, and the log
//!   keeps the last [`LOG_ENTRIES_MAX`] entries;
//! - what only one watcher gets (its history, a bookmark for a watch in several pieces, an
//!   error, the news that it now follows a log) goes through that watcher's [`Inbox`], of
//!   which the responses are bounded: when it is full the channel drops the watch on the node
//!   until its caller catches up;
//! - each item and entry carries the channel's sequence number of the frame it came from, and
//!   a watcher hands out an entry of a log only after the items its inbox holds from before
//!   that entry: what the node sent in order reaches the caller in order;
//! - a watcher that falls more than [`LOG_ENTRIES_MAX`] entries behind finds its position
//!   dropped; it asks the channel ([`super::Command::Lagged`]) to recreate its watch from the
//!   first revision it has not taken, and the node replays the history from there;
//! - how far a follower has read is shared with the channel ([`Position`]): when the channel
//!   stops a follow (its stream ended, the watch is recreated) it learns exactly which
//!   revision comes next (a watcher hands out every entry it took), and the watcher takes
//!   nothing more from that log.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::task::{Context, Poll, Waker};

use concord_transport::api::RangeId;
use smallvec::SmallVec;
use tokio::sync::mpsc::WeakUnboundedSender;

use super::{Command, Events, WatchResponse};
use crate::Error;

/// Entries a group's log keeps: a watcher further behind than this recreates its watch.
pub(crate) const LOG_ENTRIES_MAX: usize = 256;

/// The stop flag of a [`Position`], above any revision.
const STOPPED: u64 = 1 << 63;

/// A follower's position in its log: the first revision its watcher has not taken (every
/// entry taken is handed out), and whether the follow was stopped. One word, so that the
/// channel's stop and the watcher's taking of a batch are each one atomic step and never
/// overlap.
#[derive(Debug)]
pub(crate) struct Position(AtomicU64);

impl Position {
    pub(crate) fn new(next: u64) -> Self {
        assert!(next < STOPPED, "a revision below the stop flag");
        Self(AtomicU64::new(next))
    }

    /// The first revision not taken, or `None` once stopped.
    fn next(&self) -> Option<u64> {
        let word = self.0.load(Ordering::Acquire);
        (word & STOPPED == 0).then_some(word)
    }

    /// Moves the position from `from` to `to` (a batch was taken); false if the follow was
    /// stopped meanwhile (the channel is the only other writer).
    fn advance(&self, from: u64, to: u64) -> bool {
        debug_assert!(to >= from, "a position only grows");
        self.0
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Stops the follow; returns the first revision not taken, and whether it was already
    /// stopped.
    pub(crate) fn stop(&self) -> (u64, bool) {
        let before = self.0.fetch_or(STOPPED, Ordering::AcqRel);
        (before & !STOPPED, before & STOPPED != 0)
    }
}

/// One revision of a group (or a bookmark), as the channel appended it.
#[derive(Clone)]
struct Entry {
    /// The channel's sequence number of the frame it came from.
    seq: u64,
    revision: u64,
    /// `None`: a progress bookmark at `revision`.
    events: Option<Events>,
}

/// The revisions of one group, read by every watcher of the group that follows it.
///
/// Up to 100,000 watchers on the threads of two cores read one log. Anything they all write
/// (a lock's state, a reference count) moves its cache line from core to core at nearly
/// every read, and that measured as the largest cost of such a fan-out. So the log is kept
/// in [`LOG_SHARDS`] identical copies, its events included, and a reader reads and waits in
/// the copy of the thread it runs on ([`thread_shard`]): the channel writes each copy once
/// per revision, the readers of one thread share only their own.
pub(crate) struct GroupLog {
    range_id: RangeId,
    shards: [LogShard; LOG_SHARDS],
}

/// Copies of a group's log (more than the threads of a two-core machine's runtime).
const LOG_SHARDS: usize = 4;

/// Entries a reader takes from the log in one visit.
const READ_BATCH_MAX: usize = 64;

/// One copy of a log, on cache lines of its own.
#[repr(align(128))]
struct LogShard {
    entries: RwLock<Entries>,
    /// `Entries::end`, read without the lock: a reader with nothing new takes no lock.
    end: AtomicU64,
    waiters: Mutex<Waiters>,
}

struct Entries {
    list: VecDeque<Entry>,
    /// The log index of `list[0]` (entries are numbered from 0 as they are appended).
    first: u64,
}

impl Entries {
    fn end(&self) -> u64 {
        self.first + self.list.len() as u64
    }
}

#[derive(Default)]
struct Waiters {
    wakers: Vec<Waker>,
    /// Counts appends, each of which wakes (and forgets) the waiters.
    round: u64,
}

/// The copy of a log this thread reads and waits in.
fn thread_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % LOG_SHARDS;
    }
    SHARD.with(|shard| *shard)
}

impl LogShard {
    fn read(&self) -> RwLockReadGuard<'_, Entries> {
        self.entries.read().expect("group log lock")
    }

    fn waiters(&self) -> MutexGuard<'_, Waiters> {
        self.waiters.lock().expect("group log waiters lock")
    }

    fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }
}

impl GroupLog {
    pub(crate) fn new(range_id: RangeId) -> Arc<Self> {
        Arc::new(Self {
            range_id,
            shards: std::array::from_fn(|_| LogShard {
                entries: RwLock::new(Entries {
                    list: VecDeque::new(),
                    first: 0,
                }),
                end: AtomicU64::new(0),
                waiters: Mutex::new(Waiters::default()),
            }),
        })
    }

    /// The index the next entry will have: a new follower reads from there.
    pub(crate) fn end(&self) -> u64 {
        self.shards[0].end()
    }

    /// Appends the events of `revision` (`None`: a bookmark) from frame `seq`, dropping the
    /// oldest entry past [`LOG_ENTRIES_MAX`], and wakes the followers waiting.
    pub(crate) fn append(&self, seq: u64, revision: u64, events: Option<Events>) {
        for (i, shard) in self.shards.iter().enumerate() {
            let mut entries = shard.entries.write().expect("group log lock");
            debug_assert!(entries.list.back().is_none_or(|e| e.seq < seq));
            // The first copy is the channel's own; the others are deep copies.
            let copy = match &events {
                Some(e) if i > 0 => Some(Events::from(e.to_vec())),
                other => other.clone(),
            };
            entries.list.push_back(Entry {
                seq,
                revision,
                events: copy,
            });
            if entries.list.len() > LOG_ENTRIES_MAX {
                entries.list.pop_front();
                entries.first += 1;
            }
            shard.end.store(entries.end(), Ordering::Release);
        }
        for shard in &self.shards {
            let wakers = {
                let mut waiters = shard.waiters();
                waiters.round += 1;
                std::mem::take(&mut waiters.wakers)
            };
            for waker in wakers {
                waker.wake();
            }
        }
    }
}

/// What a watcher's inbox holds for one of its pieces (its watch in one range).
pub(crate) struct Item {
    /// The channel's id of the piece.
    pub(crate) piece: u64,
    /// The channel's sequence number of the frame it came from.
    pub(crate) seq: u64,
    pub(crate) kind: ItemKind,
}

pub(crate) enum ItemKind {
    Response(WatchResponse),
    Failed(Error),
    /// From here on the piece's revisions are in a group's log.
    Follow(Follow),
}

/// A piece's follow of a group's log.
pub(crate) struct Follow {
    pub(crate) log: Arc<GroupLog>,
    /// The log index from which the piece's revisions are there ([`GroupLog::end`] when it
    /// joined the group).
    pub(crate) from: u64,
    pub(crate) position: Arc<Position>,
    /// Whether the piece asked for progress bookmarks.
    pub(crate) progress: bool,
    /// The channel, told when the follower lags (weak: it does not keep the channel alive).
    pub(crate) channel: WeakUnboundedSender<Command>,
}

/// A watcher's private queue, filled by the channels of its pieces.
pub(crate) struct Inbox {
    inner: Mutex<InboxInner>,
    /// `items.len()`, read without the lock.
    len: AtomicUsize,
    /// The watcher was dropped.
    closed: AtomicBool,
}

#[derive(Default)]
struct InboxInner {
    items: VecDeque<Item>,
    /// Responses among `items` (the bounded part).
    responses: usize,
    waker: Option<Waker>,
    /// Live [`Sink`]s: none left and nothing queued ends the watch.
    senders: usize,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, InboxInner> {
        self.inner.lock().expect("watch inbox lock")
    }
}

/// Why [`Sink::offer`] refused a response.
pub(crate) enum Refused {
    /// The caller has [`super::WATCH_CLIENT_BUFFER`] responses unread.
    Full,
    /// The watcher was dropped.
    Closed,
}

/// A channel's handle on a watcher's inbox (one per piece).
pub(crate) struct Sink(Arc<Inbox>);

/// A new watcher's inbox: the sink for its pieces, the receiver for the watcher.
pub(crate) fn inbox() -> (Sink, Receiver) {
    let inbox = Arc::new(Inbox {
        inner: Mutex::new(InboxInner {
            senders: 1,
            ..InboxInner::default()
        }),
        len: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
    });
    let receiver = Receiver {
        inbox: inbox.clone(),
        follows: SmallVec::new(),
        turn: 0,
    };
    (Sink(inbox), receiver)
}

impl Sink {
    /// Queues a response for piece `piece`, unless the caller has `max` unread or is gone.
    pub(crate) fn offer(
        &self,
        piece: u64,
        seq: u64,
        response: WatchResponse,
        max: usize,
    ) -> Result<(), Refused> {
        if self.is_closed() {
            return Err(Refused::Closed);
        }
        let waker = {
            let mut inner = self.0.lock();
            if inner.responses >= max {
                return Err(Refused::Full);
            }
            inner.responses += 1;
            inner.items.push_back(Item {
                piece,
                seq,
                kind: ItemKind::Response(response),
            });
            self.0.len.fetch_add(1, Ordering::Release);
            inner.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Queues an error or a follow (not bounded: at most one of each per creation).
    pub(crate) fn push(&self, piece: u64, seq: u64, kind: ItemKind) {
        let waker = {
            let mut inner = self.0.lock();
            inner.items.push_back(Item { piece, seq, kind });
            self.0.len.fetch_add(1, Ordering::Release);
            inner.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Responses the caller has not read.
    pub(crate) fn queued(&self) -> usize {
        self.0.lock().responses
    }

    /// The watcher was dropped.
    pub(crate) fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::Acquire)
    }
}

impl Clone for Sink {
    fn clone(&self) -> Self {
        self.0.lock().senders += 1;
        Self(self.0.clone())
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let waker = {
            let mut inner = self.0.lock();
            inner.senders -= 1;
            if inner.senders == 0 {
                inner.waker.take()
            } else {
                None
            }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// A piece's follow, as its watcher reads it.
struct Following {
    piece: u64,
    follow: Follow,
    /// The log index of the next entry to take from the log.
    cursor: u64,
    /// Entries taken from the log (those owed) and not yet handed out.
    taken: VecDeque<Entry>,
    /// For each copy of the log: the round in which this follower's waker was put in its
    /// waiters, and the waker's index there (a task that moves between threads waits in
    /// several copies, at most once in each per round).
    registered: [Option<(u64, usize)>; LOG_SHARDS],
}

/// What taking entries from a follow's log found.
enum Take {
    /// Entries are in `taken` (or were already).
    Some,
    /// None new.
    Nothing,
    /// The follow ended (stopped by the channel, or lagged) and was removed.
    Ended,
}

/// The watcher's side: merges its inbox with the logs its pieces follow.
pub(crate) struct Receiver {
    inbox: Arc<Inbox>,
    /// Inline for a watch of one range (the common case): the watcher's task then holds
    /// what it reads at every wake-up, with no further allocation to fetch.
    follows: SmallVec<[Following; 1]>,
    /// The follow looked at first next time (the pieces of a watch take turns).
    turn: usize,
}

impl Receiver {
    /// The next response or error; `None` once every piece's watch has ended.
    ///
    /// Order: an entry is handed out only if every item its channel queued before it is
    /// out. Entries are taken from the logs before the inbox is looked at, so an item
    /// queued before a taken entry was appended is seen, and goes first.
    pub(crate) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<WatchResponse, Error>>> {
        loop {
            let mut i = 0;
            while i < self.follows.len() {
                if self.follows[i].taken.is_empty() && matches!(self.take(i), Take::Ended) {
                    continue;
                }
                i += 1;
            }
            if let Some((piece, seq)) = self.inbox_head() {
                // What a stopped follow took goes before any item: one queued after the stop
                // (seen here, after the item was) may be of another piece holding the same
                // keys' later revisions (a range split or merged, and its pieces moved to
                // other channels under new ids).
                if let Some(response) = self.hand_out_stopped() {
                    return Poll::Ready(Some(Ok(response)));
                }
                // Its piece's entries from before it go first.
                if let Some(response) = self.hand_out_piece(piece, seq) {
                    return Poll::Ready(Some(Ok(response)));
                }
                let item = {
                    let mut inner = self.inbox.lock();
                    let item = inner.items.pop_front().expect("the head is still there");
                    self.inbox.len.fetch_sub(1, Ordering::Release);
                    if matches!(item.kind, ItemKind::Response(_)) {
                        inner.responses -= 1;
                    }
                    item
                };
                match item.kind {
                    ItemKind::Response(response) => return Poll::Ready(Some(Ok(response))),
                    ItemKind::Failed(e) => {
                        self.follows.retain(|f| f.piece != item.piece);
                        return Poll::Ready(Some(Err(e)));
                    }
                    ItemKind::Follow(follow) => {
                        self.follows.retain(|f| f.piece != item.piece);
                        self.follows.push(Following {
                            piece: item.piece,
                            cursor: follow.from,
                            follow,
                            taken: VecDeque::new(),
                            registered: [None; LOG_SHARDS],
                        });
                    }
                }
                continue;
            }
            if let Some(response) = self.hand_out_any() {
                return Poll::Ready(Some(Ok(response)));
            }
            match self.park(cx) {
                Park::Again => continue,
                Park::Waiting => return Poll::Pending,
                Park::Ended => return Poll::Ready(None),
            }
        }
    }

    /// The piece and sequence number of the inbox's first item.
    fn inbox_head(&self) -> Option<(u64, u64)> {
        if self.inbox.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.inbox.lock().items.front().map(|i| (i.piece, i.seq))
    }

    /// Takes what is new in follow `i`'s log (a batch at most) into its `taken`.
    fn take(&mut self, i: usize) -> Take {
        let f = &mut self.follows[i];
        let shard = &f.follow.log.shards[thread_shard()];
        let Some(from) = f.follow.position.next() else {
            // The channel stopped it (its stream ended, the watch is recreated) and knows
            // where the caller is.
            self.follows.swap_remove(i);
            return Take::Ended;
        };
        if shard.end() <= f.cursor {
            return Take::Nothing;
        }
        let to = {
            let entries = shard.read();
            if f.cursor < entries.first {
                drop(entries);
                self.lagged(i);
                return Take::Ended;
            }
            let at = (f.cursor - entries.first) as usize;
            let mut next = from;
            for entry in entries.list.range(at..).take(READ_BATCH_MAX) {
                // Only what the caller is owed: above where the watch started, and a
                // bookmark only if asked for and not below a revision handed out.
                let owed = match entry.events {
                    Some(_) => entry.revision >= next,
                    None => f.follow.progress && entry.revision + 1 >= next,
                };
                if owed {
                    next = next.max(entry.revision + 1);
                    f.taken.push_back(entry.clone());
                }
            }
            f.cursor = entries.end().min(f.cursor + READ_BATCH_MAX as u64);
            next
        };
        if to != from && !f.follow.position.advance(from, to) {
            // Stopped while the batch was read: the channel counts none of it as taken.
            f.taken.clear();
            self.follows.swap_remove(i);
            return Take::Ended;
        }
        if f.taken.is_empty() {
            Take::Nothing
        } else {
            Take::Some
        }
    }

    /// The next response of follow `i` among the entries it has taken, up to (not
    /// including) sequence number `below`.
    fn hand_out(&mut self, i: usize, below: u64) -> Option<WatchResponse> {
        let f = &mut self.follows[i];
        if f.taken.front()?.seq >= below {
            return None;
        }
        let entry = f.taken.pop_front().expect("an entry");
        Some(WatchResponse {
            range_id: f.follow.log.range_id,
            revision: entry.revision,
            progress: entry.events.is_none(),
            events: entry.events.unwrap_or_default(),
        })
    }

    /// The next response of `piece`'s follow from before sequence number `below`.
    fn hand_out_piece(&mut self, piece: u64, below: u64) -> Option<WatchResponse> {
        let i = self.follows.iter().position(|f| f.piece == piece)?;
        if self.follows[i].taken.is_empty() && !matches!(self.take(i), Take::Some) {
            return None;
        }
        self.hand_out(i, below)
    }

    /// The next response that a stopped follow took and has not handed out.
    fn hand_out_stopped(&mut self) -> Option<WatchResponse> {
        let i = self
            .follows
            .iter()
            .position(|f| !f.taken.is_empty() && f.follow.position.next().is_none())?;
        self.hand_out(i, u64::MAX)
    }

    /// The next response of any follow among the entries taken; the follows take turns.
    fn hand_out_any(&mut self) -> Option<WatchResponse> {
        let n = self.follows.len();
        for k in 0..n {
            let i = (self.turn + k) % n;
            if i >= self.follows.len() {
                break;
            }
            if let Some(response) = self.hand_out(i, u64::MAX) {
                self.turn = (i + 1) % n;
                return Some(response);
            }
        }
        None
    }

    /// Follow `i` missed entries: it ends, and its channel recreates the piece's watch from
    /// the first revision not taken (unless the channel stopped the follow already).
    fn lagged(&mut self, i: usize) {
        let f = self.follows.swap_remove(i);
        let (_, stopped) = f.follow.position.stop();
        if stopped {
            return;
        }
        if let Some(channel) = f.follow.channel.upgrade() {
            let _ = channel.send(Command::Lagged {
                id: f.piece,
                position: f.follow.position,
            });
        }
    }

    /// Registers the watcher's waker with its inbox and every log it follows, unless
    /// something arrived meanwhile. Called with nothing taken and not handed out.
    fn park(&mut self, cx: &mut Context<'_>) -> Park {
        {
            let mut inner = self.inbox.lock();
            if !inner.items.is_empty() {
                return Park::Again;
            }
            if inner.senders == 0 {
                return Park::Ended;
            }
            match &inner.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => inner.waker = Some(cx.waker().clone()),
            }
        }
        let here = thread_shard();
        for f in &mut self.follows {
            let shard = &f.follow.log.shards[here];
            {
                let mut waiters = shard.waiters();
                let round = waiters.round;
                match f.registered[here] {
                    Some((r, at)) if r == round && at < waiters.wakers.len() => {
                        if !waiters.wakers[at].will_wake(cx.waker()) {
                            waiters.wakers[at] = cx.waker().clone();
                        }
                    }
                    _ => {
                        waiters.wakers.push(cx.waker().clone());
                        f.registered[here] = Some((round, waiters.wakers.len() - 1));
                    }
                }
            }
            // An entry appended before the registration woke no one: look again.
            if shard.end() > f.cursor {
                return Park::Again;
            }
        }
        Park::Waiting
    }

    /// The watcher was dropped: its channels remove its pieces.
    pub(crate) fn close(&self) {
        self.inbox.closed.store(true, Ordering::Release);
    }
}

/// What [`Receiver::park`] found.
enum Park {
    Again,
    Waiting,
    Ended,
}

#[cfg(test)]
mod tests {
    use super::*;
    use concord_transport::api::KeyValue;
    use concord_transport::watch::{Event, EventKind};
    use std::task::Waker;

    fn events(key: &str) -> Events {
        vec![Event {
            kind: EventKind::Put,
            kv: KeyValue {
                key: key.as_bytes().to_vec(),
                value: Vec::new(),
                create_revision: 1,
                mod_revision: 1,
                version: 1,
                lease: 0,
            },
            prev_kv: None,
        }]
        .into()
    }

    fn poll(rx: &mut Receiver) -> Poll<Option<Result<WatchResponse, Error>>> {
        rx.poll_next(&mut Context::from_waker(Waker::noop()))
    }

    fn revision(rx: &mut Receiver) -> u64 {
        match poll(rx) {
            Poll::Ready(Some(Ok(r))) => r.revision,
            other => panic!("expected a response, got {:?}", other.map(|o| o.is_some())),
        }
    }

    fn follow(log: &Arc<GroupLog>, next: u64) -> (Follow, Arc<Position>) {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let position = Arc::new(Position::new(next));
        let follow = Follow {
            log: log.clone(),
            from: log.end(),
            position: position.clone(),
            progress: true,
            channel: tx.downgrade(),
        };
        (follow, position)
    }

    fn response(revision: u64) -> WatchResponse {
        WatchResponse {
            range_id: 1,
            revision,
            events: events("h"),
            progress: false,
        }
    }

    #[test]
    fn a_follower_reads_the_log_after_its_own_earlier_items_and_from_its_position() {
        let (sink, mut rx) = inbox();
        let log = GroupLog::new(1);
        // Frame 1: the group's revision before piece 9 joins; frame 2: the history of piece
        // 9; frame 3: it joins; frames 4–7: the group's revisions, one of which (4) is older
        // than its position, and a response of its own in between.
        log.append(1, 2, Some(events("old")));
        assert!(sink.offer(9, 2, response(3), 8).is_ok());
        let (f, position) = follow(&log, 6);
        sink.push(9, 3, ItemKind::Follow(f));
        log.append(4, 4, Some(events("a")));
        log.append(5, 6, Some(events("b")));
        assert!(sink.offer(9, 6, response(7), 8).is_ok());
        log.append(7, 8, None);
        assert_eq!(revision(&mut rx), 3);
        // Revision 4 < 6 is not owed; 6 comes before the inbox's revision 7 of frame 6.
        assert_eq!(revision(&mut rx), 6);
        assert_eq!(revision(&mut rx), 7);
        assert!(matches!(poll(&mut rx), Poll::Ready(Some(Ok(r))) if r.progress && r.revision == 8));
        assert!(poll(&mut rx).is_pending());
        // The channel stops the follow: it learns the next revision owed, and nothing more
        // is handed out from the log.
        assert_eq!(position.stop(), (9, false));
        log.append(8, 9, Some(events("c")));
        assert!(poll(&mut rx).is_pending());
        drop(sink);
        assert!(matches!(poll(&mut rx), Poll::Ready(None)));
    }

    #[test]
    fn a_follower_past_the_logs_length_asks_its_channel_to_recreate_its_watch() {
        let (sink, mut rx) = inbox();
        let log = GroupLog::new(1);
        let (tx, mut commands) = tokio::sync::mpsc::unbounded_channel();
        let position = Arc::new(Position::new(1));
        let f = Follow {
            log: log.clone(),
            from: log.end(),
            position: position.clone(),
            progress: false,
            channel: tx.downgrade(),
        };
        sink.push(4, 1, ItemKind::Follow(f));
        assert!(poll(&mut rx).is_pending());
        for seq in 2..(LOG_ENTRIES_MAX as u64 + 3) {
            log.append(seq, seq, Some(events("k")));
        }
        assert!(poll(&mut rx).is_pending());
        match commands.try_recv() {
            Ok(Command::Lagged { id, position: p }) => {
                assert_eq!(id, 4);
                assert!(Arc::ptr_eq(&p, &position));
                // Nothing was taken: the watch is recreated from revision 1.
                assert_eq!(p.stop(), (1, true));
            }
            _ => panic!("the channel is told the follower lagged"),
        }
        drop(tx);
    }

    /// Regression (found in review): a range split while the caller had revisions taken and
    /// not read; the watch's piece in the new range queued its history, which came out before
    /// the older revisions already taken.
    #[test]
    fn what_a_stopped_follow_took_goes_before_later_items_of_other_pieces() {
        let (sink, mut rx) = inbox();
        let log = GroupLog::new(1);
        let (f, position) = follow(&log, 1);
        sink.push(1, 1, ItemKind::Follow(f));
        assert!(poll(&mut rx).is_pending());
        log.append(2, 5, Some(events("a")));
        log.append(3, 6, Some(events("a")));
        // Both are taken at once; one is handed out.
        assert_eq!(revision(&mut rx), 5);
        // The stream ends: the channel stops the follow (7 comes next), and the watch goes on
        // as piece 2 of another channel, whose history is queued.
        assert_eq!(position.stop(), (7, false));
        assert!(sink.offer(2, 10, response(7), 8).is_ok());
        assert_eq!(revision(&mut rx), 6);
        assert_eq!(revision(&mut rx), 7);
        assert!(poll(&mut rx).is_pending());
    }

    #[test]
    fn a_full_inbox_refuses_responses_but_not_errors() {
        let (sink, mut rx) = inbox();
        assert!(sink.offer(1, 1, response(1), 1).is_ok());
        assert!(matches!(
            sink.offer(1, 2, response(2), 1),
            Err(Refused::Full)
        ));
        sink.push(1, 3, ItemKind::Failed(Error::Protocol("gone".into())));
        assert_eq!(sink.queued(), 1);
        assert_eq!(revision(&mut rx), 1);
        assert!(matches!(poll(&mut rx), Poll::Ready(Some(Err(_)))));
        rx.close();
        assert!(matches!(
            sink.offer(1, 4, response(4), 1),
            Err(Refused::Closed)
        ));
    }
}
