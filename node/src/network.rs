//! Peer networking: Raft messages of every group between two nodes over one QUIC connection.
//!
//! Each node keeps one connection per peer ([`Peers`]), dialled on first use or adopted when
//! the peer dialled us first. Raft RPCs of all groups bound for one peer are batched: a
//! per-peer batcher takes everything queued (heartbeats and appends of many groups) and sends
//! it as one [`PeerBatch`] frame on one bi-stream, tagged per item with the group id (STYLE.md
//! 5: route by (node, group)); the peer answers each item with its own frame as soon as it is
//! done, so a slow item does not hold up the others. At most [`BATCHES_IN_FLIGHT_MAX`] batches
//! are in flight per peer: while they are, new RPCs queue and form the next, larger batch.
//! openraft sees one [`GroupNetwork`] per (target, group), all sharing the pool.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use concord_transport::api::{
    ApiError, Fence, KvRequest, KvResponse, LeaseId, NodeId, PlacementReport, RangeId,
};
use concord_transport::{wire, SERVER_NAME};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::{Deserialize, Serialize};

use crate::mvcc::Command;
use crate::node::placement_service::{Heartbeat, HeartbeatReply};
use crate::raft_types::{LogId, SnapshotData, SnapshotMeta, TypeConfig, Vote};

/// The `from` of a batch sent by [`Peers::call_addr`]: no node id is 0, and the receiver does
/// not adopt the one-off connection it came on.
pub const ANONYMOUS_PEER: NodeId = 0;

/// Largest peer frame: bounds a snapshot sent in one piece (a limit on everything).
pub const PEER_FRAME_BYTES_MAX: usize = 512 << 20;
/// How long dialling a peer may take.
pub const CONNECT_TIMEOUT_MS: u64 = 2_000;
/// Most RPCs in one batch.
pub const BATCH_ITEMS_MAX: usize = 512;
/// Batches in flight per peer.
pub const BATCHES_IN_FLIGHT_MAX: usize = 4;
/// RPCs queued per peer before callers are told the peer is unreachable.
pub const QUEUE_ITEMS_MAX: usize = 8192;

/// A connection that has brought no reply for this long while a batch on it timed out is
/// closed, and the next call dials afresh. QUIC backs its retransmissions off exponentially
/// while a path is down: after a partition of a few seconds, an old connection may stay
/// silent for as long again once the path is back (seen: 14 s), where a fresh one answers
/// at once.
pub const SILENT_CONNECTION_MAX: Duration = Duration::from_secs(2);

/// A Raft RPC (or a read-index query) for one group.
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    /// AppendEntries (also heartbeats).
    Append(AppendEntriesRequest<TypeConfig>),
    /// RequestVote.
    Vote(VoteRequest<TypeConfig>),
    /// Pre-vote: would you vote for me? (no term change).
    PreVote(VoteRequest<TypeConfig>),
    /// A whole snapshot.
    Snapshot {
        /// The leader's vote.
        vote: Vote,
        /// The snapshot's metadata.
        meta: SnapshotMeta,
        /// The snapshot's bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The leader hands its leadership to `to_node_id` (sent to every member: the others
    /// drop their leader lease so that they vote for the new leader at once).
    TransferLeader(TransferLeaderRequest<TypeConfig>),
    /// A follower asks the leader for a read index (follower reads).
    ReadIndex,
    /// Propose an internal command (a lease detach) at the group's leader.
    Propose(Command),
    /// Does the lease exist? Asked of the leader of the lease's owner range before a put
    /// attaches a key to it.
    LeaseAlive {
        /// The lease.
        id: LeaseId,
    },
    /// Is the fence's token its lock's holder? Asked of the leader of the range holding the
    /// lock before a fenced txn is proposed in another range.
    FenceHolds(Fence),
    /// A range operation asked of the group's leader by another node: a replica move or a
    /// merge (by the placement scheduler), a freeze (by the leader of the range merging this
    /// one). Only `KvRequest::MoveReplica`, `Merge` and `Freeze` are served this way.
    Operate(KvRequest),
    /// Is `node` still a replica of the group? Asked of the group's leader by a replica that
    /// suspects it was removed (see `replica_service`).
    IsReplica {
        /// The asking node.
        node: NodeId,
        /// The log id of the newest membership the asker holds that names it, if any: a
        /// leader whose committed membership is not newer cannot have removed it (a deposed
        /// leader that does not know it is deposed may be asked).
        named_at: Option<LogId>,
    },
    /// A node's heartbeat, for the placement group's leader.
    Heartbeat(Heartbeat),
    /// The placement service's view, from the placement group's leader.
    PlacementReport,
}

/// One request frame of the peer protocol.
#[derive(Debug, Serialize, Deserialize)]
pub struct PeerFrame {
    /// The sending node.
    pub from: NodeId,
    /// The group addressed.
    pub group: RangeId,
    /// The request.
    pub request: PeerRequest,
}

/// One item of a [`PeerBatch`].
#[derive(Debug, Serialize, Deserialize)]
pub struct PeerItem {
    /// Matches the item to its [`PeerItemReply`].
    pub id: u32,
    /// The group addressed.
    pub group: RangeId,
    /// The request.
    pub request: PeerRequest,
}

/// The request frame of a peer stream: RPCs of any groups for one peer.
#[derive(Debug, Serialize, Deserialize)]
pub struct PeerBatch {
    /// The sending node.
    pub from: NodeId,
    /// The RPCs.
    pub items: Vec<PeerItem>,
}

/// One reply frame of a peer stream (there is one per item, in completion order).
#[derive(Debug, Serialize, Deserialize)]
pub struct PeerItemReply {
    /// The item answered; `u32::MAX` when the whole batch was unreadable.
    pub id: u32,
    /// The reply.
    pub reply: PeerReply,
}

/// The answer to a [`PeerFrame`].
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerReply {
    /// To `Append`.
    Append(AppendEntriesResponse<TypeConfig>),
    /// To `Vote` and `PreVote`.
    Vote(VoteResponse<TypeConfig>),
    /// To `Snapshot`.
    Snapshot(SnapshotResponse<TypeConfig>),
    /// To `TransferLeader`.
    TransferLeader(TransferLeaderResponse<TypeConfig>),
    /// To `ReadIndex`: apply up to this log id, then read locally.
    ReadIndex {
        /// The leader's read log id.
        read_log_id: LogId,
    },
    /// To `Propose`: the command's result.
    Proposed(Result<KvResponse, ApiError>),
    /// To `LeaseAlive`.
    LeaseAlive(bool),
    /// To `FenceHolds`.
    FenceHolds(bool),
    /// To `Operate`: the operation's result.
    Operated(Result<KvResponse, ApiError>),
    /// To `IsReplica`, from the group's leader.
    IsReplica(bool),
    /// To `Heartbeat`.
    Heartbeat(HeartbeatReply),
    /// To `PlacementReport`.
    Placement(PlacementReport),
    /// The request failed on the receiving node.
    Error(PeerError),
}

/// Why a peer request failed on the receiving node.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
pub enum PeerError {
    /// The receiving node holds no replica of the group.
    #[error("no such group {0}")]
    NoSuchGroup(RangeId),
    /// The receiver is not the leader (for `ReadIndex`).
    #[error("not leader (leader hint {0:?})")]
    NotLeader(Option<NodeId>),
    /// Raft refused or failed.
    #[error("raft: {0}")]
    Raft(String),
    /// The frame could not be read or decoded.
    #[error("bad frame: {0}")]
    BadFrame(String),
}

/// Failure of a peer call as seen by the caller.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The peer could not be reached (dial failed, connection lost, timeout).
    #[error("peer {peer} unreachable: {reason}")]
    Unreachable {
        /// The peer.
        peer: NodeId,
        /// Why.
        reason: String,
    },
    /// The peer answered with an error.
    #[error("peer {peer}: {error}")]
    Remote {
        /// The peer.
        peer: NodeId,
        /// Its error.
        error: PeerError,
    },
}

/// Serves the peer protocol on a connection (both directions use one connection, so a
/// connection this node dials must be served too).
pub type ServeHook = Arc<dyn Fn(quinn::Connection) + Send + Sync>;

/// The node's connections to its peers, one per peer.
pub struct Peers {
    me: NodeId,
    endpoint: quinn::Endpoint,
    /// Set once by the node at start; serves the requests a peer sends on a dialled connection.
    serve: std::sync::OnceLock<ServeHook>,
    addrs: RwLock<BTreeMap<NodeId, SocketAddr>>,
    /// Per peer, the live connection; the async mutex keeps concurrent callers from dialling twice.
    conns: Mutex<HashMap<NodeId, Arc<tokio::sync::Mutex<Option<quinn::Connection>>>>>,
    /// Per peer, the queue of its batcher task.
    batchers: Mutex<HashMap<NodeId, tokio::sync::mpsc::Sender<Pending>>>,
    /// Per peer, when its connection last brought a reply (or was set up).
    heard: Mutex<HashMap<NodeId, Instant>>,
}

/// An RPC waiting in a peer's queue.
struct Pending {
    group: RangeId,
    request: PeerRequest,
    deadline: Instant,
    reply: tokio::sync::oneshot::Sender<Result<PeerReply, CallError>>,
}

impl Peers {
    /// A pool for node `me` dialling from `endpoint` to `addrs`.
    pub fn new(me: NodeId, endpoint: quinn::Endpoint, addrs: BTreeMap<NodeId, SocketAddr>) -> Self {
        Self {
            me,
            endpoint,
            serve: std::sync::OnceLock::new(),
            addrs: RwLock::new(addrs),
            conns: Mutex::new(HashMap::new()),
            batchers: Mutex::new(HashMap::new()),
            heard: Mutex::new(HashMap::new()),
        }
    }

    /// Notes that `peer`'s connection just answered (or was set up).
    fn heard_from(&self, peer: NodeId) {
        self.heard
            .lock()
            .expect("heard lock")
            .insert(peer, Instant::now());
    }

    /// After a batch on `conn` timed out: closes it if it has brought nothing for
    /// [`SILENT_CONNECTION_MAX`] and is still the one held for `peer`, so that the next call
    /// dials afresh (see [`SILENT_CONNECTION_MAX`]).
    async fn drop_if_silent(&self, peer: NodeId, conn: &quinn::Connection) {
        let silent = self
            .heard
            .lock()
            .expect("heard lock")
            .get(&peer)
            .is_none_or(|at| at.elapsed() >= SILENT_CONNECTION_MAX);
        if !silent {
            return;
        }
        let slot = self.slot(peer);
        let mut guard = slot.lock().await;
        if guard
            .as_ref()
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            tracing::warn!(
                peer,
                "closing a connection silent for {SILENT_CONNECTION_MAX:?}"
            );
            conn.close(0u32.into(), b"silent");
            *guard = None;
        }
    }

    /// Installs the hook that serves peer requests arriving on connections this node dials.
    pub fn set_serve_hook(&self, hook: ServeHook) {
        assert!(self.serve.set(hook).is_ok(), "serve hook set twice");
    }

    /// Every known node address (including this node's).
    pub fn addrs(&self) -> BTreeMap<NodeId, SocketAddr> {
        self.addrs.read().expect("addrs lock").clone()
    }

    /// The address of `node`, if known.
    pub fn addr(&self, node: NodeId) -> Option<SocketAddr> {
        self.addrs.read().expect("addrs lock").get(&node).copied()
    }

    /// Records where `node` listens (from the placement registry or a group's membership). A
    /// changed address drops the connection held, so the next call dials the new one.
    pub fn learn(&self, node: NodeId, addr: SocketAddr) {
        let old = self.addrs.write().expect("addrs lock").insert(node, addr);
        if old.is_some_and(|old| old != addr) {
            self.conns.lock().expect("conns lock").remove(&node);
        }
    }

    /// Sends one request for `group` to whatever node listens on `addr` (its id unknown: a
    /// node joining a cluster knows only an address), on a connection of its own, and waits
    /// for the reply, at most `timeout`.
    pub async fn call_addr(
        &self,
        addr: SocketAddr,
        group: RangeId,
        request: PeerRequest,
        timeout: Duration,
    ) -> Result<PeerReply, String> {
        let frame = wire::encode_frame(&PeerBatch {
            from: ANONYMOUS_PEER,
            items: vec![PeerItem {
                id: 0,
                group,
                request,
            }],
        });
        let exchange = async {
            let conn = self
                .endpoint
                .connect(addr, SERVER_NAME)
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            send.write_all(&frame).await.map_err(|e| e.to_string())?;
            let _ = send.finish();
            let reply: PeerItemReply = wire::read_frame(&mut recv, PEER_FRAME_BYTES_MAX)
                .await
                .map_err(|e| e.to_string())?;
            conn.close(0u32.into(), b"done");
            Ok(reply.reply)
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("no answer from {addr} within {timeout:?}"))?
    }

    fn slot(&self, peer: NodeId) -> Arc<tokio::sync::Mutex<Option<quinn::Connection>>> {
        self.conns
            .lock()
            .expect("conns lock")
            .entry(peer)
            .or_default()
            .clone()
    }

    /// Adopts the connection a batch from `peer` came on, in place of the one held. A peer dials only
    /// when it holds no live connection to us, so the one held here is the past of a peer
    /// that restarted (dead, though it looks open until its idle timeout) or one this node
    /// dialled at the same moment (still served, so either serves both directions).
    pub fn adopt(&self, peer: NodeId, conn: &quinn::Connection) {
        let slot = self.slot(peer);
        // A dial in progress fills the slot itself.
        let adopted = match slot.try_lock() {
            Ok(mut guard)
                if guard
                    .as_ref()
                    .is_none_or(|c| c.stable_id() != conn.stable_id()) =>
            {
                *guard = Some(conn.clone());
                true
            }
            _ => false,
        };
        if adopted {
            self.heard_from(peer);
            tracing::debug!(peer, "adopted the connection the peer dialled");
        }
    }

    async fn connection(&self, peer: NodeId) -> Result<quinn::Connection, CallError> {
        let unreachable = |reason: String| CallError::Unreachable { peer, reason };
        let slot = self.slot(peer);
        let mut guard = slot.lock().await;
        if let Some(conn) = guard.as_ref() {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
        }
        let addr = *self
            .addrs
            .read()
            .expect("addrs lock")
            .get(&peer)
            .ok_or_else(|| unreachable("unknown node".into()))?;
        let connecting = self
            .endpoint
            .connect(addr, SERVER_NAME)
            .map_err(|e| unreachable(e.to_string()))?;
        let conn = tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), connecting)
            .await
            .map_err(|_| unreachable(format!("dialling {addr} timed out")))?
            .map_err(|e| unreachable(e.to_string()))?;
        // The peer may adopt this connection for its own requests to us: serve them.
        if let Some(serve) = self.serve.get() {
            serve(conn.clone());
        }
        *guard = Some(conn.clone());
        self.heard_from(peer);
        Ok(conn)
    }

    /// Sends `request` for `group` to `peer` (batched with other RPCs for that peer) and
    /// waits for the reply, at most `timeout`.
    pub async fn call(
        self: &Arc<Self>,
        peer: NodeId,
        group: RangeId,
        request: PeerRequest,
        timeout: Duration,
    ) -> Result<PeerReply, CallError> {
        let unreachable = |reason: String| CallError::Unreachable { peer, reason };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let pending = Pending {
            group,
            request,
            deadline: Instant::now() + timeout,
            reply: tx,
        };
        self.batcher(peer)
            .try_send(pending)
            .map_err(|_| unreachable(format!("more than {QUEUE_ITEMS_MAX} requests queued")))?;
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(unreachable(format!("no reply within {timeout:?}"))),
            Ok(Err(_)) => Err(unreachable("batch abandoned".into())),
            Ok(Ok(Ok(PeerReply::Error(error)))) => Err(CallError::Remote { peer, error }),
            Ok(Ok(result)) => result,
        }
    }

    /// The queue of `peer`'s batcher, starting the batcher on first use.
    fn batcher(self: &Arc<Self>, peer: NodeId) -> tokio::sync::mpsc::Sender<Pending> {
        let mut batchers = self.batchers.lock().expect("batchers lock");
        if let Some(tx) = batchers.get(&peer) {
            if !tx.is_closed() {
                return tx.clone();
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE_ITEMS_MAX);
        // A weak handle: the queue's sender lives in `self`, so a strong one would keep the
        // pool (and its UDP socket) alive forever.
        tokio::spawn(run_batcher(Arc::downgrade(self), peer, rx));
        batchers.insert(peer, tx.clone());
        tx
    }

    /// Sends one batch on its own stream and routes each reply to its caller.
    async fn send_batch(&self, peer: NodeId, batch: Vec<Pending>) {
        let unreachable = |reason: String| CallError::Unreachable { peer, reason };
        let deadline = batch
            .iter()
            .map(|p| p.deadline)
            .max()
            .expect("non-empty batch");
        let mut waiting = HashMap::with_capacity(batch.len());
        let mut items = Vec::with_capacity(batch.len());
        for (id, p) in (0u32..).zip(batch) {
            items.push(PeerItem {
                id,
                group: p.group,
                request: p.request,
            });
            waiting.insert(id, p.reply);
        }
        let frame = wire::encode_frame(&PeerBatch {
            from: self.me,
            items,
        });
        // The connection the batch went on, for `drop_if_silent`.
        let used = std::sync::OnceLock::new();
        let exchange = async {
            let conn = self.connection(peer).await?;
            let _ = used.set(conn.clone());
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            send.write_all(&frame)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let _ = send.finish();
            while !waiting.is_empty() {
                let r: PeerItemReply = wire::read_frame(&mut recv, PEER_FRAME_BYTES_MAX)
                    .await
                    .map_err(|e| unreachable(e.to_string()))?;
                if let PeerReply::Error(e) = &r.reply {
                    if r.id == u32::MAX {
                        return Err(CallError::Remote {
                            peer,
                            error: e.clone(),
                        });
                    }
                }
                if let Some(tx) = waiting.remove(&r.id) {
                    let _ = tx.send(Ok(r.reply));
                }
            }
            wire::take_end(&mut recv);
            self.heard_from(peer);
            Ok(())
        };
        let result = match tokio::time::timeout_at(deadline.into(), exchange).await {
            Err(_) => {
                if let Some(conn) = used.get() {
                    self.drop_if_silent(peer, conn).await;
                }
                Err(unreachable("batch timed out".into()))
            }
            Ok(r) => r,
        };
        if let Err(e) = result {
            for (_, tx) in waiting {
                let _ = tx.send(Err(e.clone()));
            }
        }
    }
}

/// Takes what is queued for `peer` and sends it in batches, at most
/// [`BATCHES_IN_FLIGHT_MAX`] at a time. Ends when the pool is gone.
async fn run_batcher(
    peers: std::sync::Weak<Peers>,
    peer: NodeId,
    mut rx: tokio::sync::mpsc::Receiver<Pending>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT_MAX));
    loop {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let Some(first) = rx.recv().await else { return };
        let mut batch = vec![first];
        while batch.len() < BATCH_ITEMS_MAX {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let Some(peers) = peers.upgrade() else { return };
        tokio::spawn(async move {
            peers.send_batch(peer, batch).await;
            drop(permit);
        });
    }
}

fn rpc_error(e: CallError) -> RPCError<TypeConfig> {
    match e {
        CallError::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&e)),
        CallError::Remote { .. } => RPCError::Network(NetworkError::new(&e)),
    }
}

fn unexpected(reply: PeerReply) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::from_string(format!(
        "unexpected peer reply {reply:?}"
    )))
}

/// openraft's view of one (target node, group) pair.
pub struct GroupNetwork {
    peers: Arc<Peers>,
    target: NodeId,
    group: RangeId,
}

impl GroupNetwork {
    /// One RPC of this (target, group) pair.
    async fn rpc(
        &self,
        request: PeerRequest,
        option: &RPCOption,
    ) -> Result<PeerReply, RPCError<TypeConfig>> {
        self.peers
            .call(self.target, self.group, request, option.hard_ttl())
            .await
            .map_err(rpc_error)
    }

    async fn vote_rpc(
        &self,
        request: PeerRequest,
        option: &RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.rpc(request, option).await? {
            PeerReply::Vote(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }
}

/// How long a message carrying a whole range's state (a snapshot, a merge entry) may take:
/// a snapshot's time, not a heartbeat's (it would otherwise time out, and be sent again, for
/// ever).
fn bulk_ttl(option: &RPCOption) -> Duration {
    option.hard_ttl().max(BULK_TTL_MIN)
}

/// The least time [`bulk_ttl`] gives.
const BULK_TTL_MIN: Duration = Duration::from_secs(30);

impl RaftNetworkV2<TypeConfig> for GroupNetwork {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // A merge entry carries a whole range's state (see `bulk_ttl`).
        let merges = rpc.entries.iter().any(|e| {
            matches!(
                &e.payload,
                openraft::EntryPayload::Normal(crate::mvcc::Command::Merge { .. })
            )
        });
        let option = if merges {
            RPCOption::new(bulk_ttl(&option))
        } else {
            option
        };
        match self.rpc(PeerRequest::Append(rpc), &option).await? {
            PeerReply::Append(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.vote_rpc(PeerRequest::Vote(rpc), &option).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.vote_rpc(PeerRequest::PreVote(rpc), &option).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: openraft::alias::SnapshotOf<TypeConfig, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        // A snapshot read while its group was starting is metadata only (see
        // `StateMachine::hold_snapshots`): never send one; openraft reads it again.
        if snapshot.snapshot.get_ref().is_empty() {
            return Err(StreamingError::Network(NetworkError::from_string(
                "the snapshot was read while its group started (no bytes); retrying",
            )));
        }
        let request = PeerRequest::Snapshot {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot.into_inner(),
        };
        let call = self
            .peers
            .call(self.target, self.group, request, bulk_ttl(&option));
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            reply = call => match reply {
                Ok(PeerReply::Snapshot(r)) => Ok(r),
                Ok(other) => Err(StreamingError::Network(NetworkError::from_string(format!("unexpected peer reply {other:?}")))),
                Err(e @ CallError::Unreachable { .. }) => Err(StreamingError::Unreachable(Unreachable::new(&e))),
                Err(e) => Err(StreamingError::Network(NetworkError::new(&e))),
            },
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.rpc(PeerRequest::TransferLeader(req), &option).await? {
            PeerReply::TransferLeader(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    fn backoff(&self) -> Option<Backoff> {
        // A down peer is retried every 200 ms, not in a hot loop.
        Some(Backoff::new(std::iter::repeat(Duration::from_millis(200))))
    }
}

/// Builds [`GroupNetwork`]s of one group.
pub struct NetworkFactory {
    /// The shared pool.
    pub peers: Arc<Peers>,
    /// The group.
    pub group: RangeId,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = GroupNetwork;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> GroupNetwork {
        // A replica added by a move is known by the address in the group's membership.
        if self.peers.addr(target).is_none() {
            if let Ok(addr) = node.addr.parse() {
                self.peers.learn(target, addr);
            }
        }
        GroupNetwork {
            peers: self.peers.clone(),
            target,
            group: self.group,
        }
    }
}

/// Reads one peer batch from a stream, for the serving side.
pub async fn read_peer_batch(recv: &mut quinn::RecvStream) -> Result<PeerBatch, io::Error> {
    let batch: PeerBatch = wire::read_frame(recv, PEER_FRAME_BYTES_MAX)
        .await
        .map_err(io::Error::other)?;
    if batch.items.len() > BATCH_ITEMS_MAX {
        return Err(io::Error::other(format!(
            "batch of {} items exceeds {BATCH_ITEMS_MAX}",
            batch.items.len()
        )));
    }
    Ok(batch)
}
