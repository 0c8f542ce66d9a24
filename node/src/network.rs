//! Peer networking: Raft messages of every group between two nodes over one QUIC connection.
//!
//! Each node keeps one connection per peer ([`Peers`]), dialled on first use or adopted when
//! the peer dialled us first; every Raft RPC of any group is one bi-stream on it, tagged with
//! the group id (STYLE.md 5: route by (node, group)). openraft sees one [`GroupNetwork`] per
//! (target, group), all sharing the pool.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use concord_transport::api::{NodeId, RangeId};
use concord_transport::{wire, SERVER_NAME};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::{Deserialize, Serialize};

use crate::raft_types::{LogId, SnapshotData, SnapshotMeta, TypeConfig, Vote};

/// Largest peer frame: bounds a snapshot sent in one piece (a limit on everything).
pub const PEER_FRAME_BYTES_MAX: usize = 512 << 20;
/// How long dialling a peer may take.
pub const CONNECT_TIMEOUT_MS: u64 = 2_000;

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
        data: Vec<u8>,
    },
    /// A follower asks the leader for a read index (follower reads).
    ReadIndex,
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

/// The answer to a [`PeerFrame`].
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerReply {
    /// To `Append`.
    Append(AppendEntriesResponse<TypeConfig>),
    /// To `Vote` and `PreVote`.
    Vote(VoteResponse<TypeConfig>),
    /// To `Snapshot`.
    Snapshot(SnapshotResponse<TypeConfig>),
    /// To `ReadIndex`: apply up to this log id, then read locally.
    ReadIndex {
        /// The leader's read log id.
        read_log_id: LogId,
    },
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
#[derive(Debug, thiserror::Error)]
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

    fn slot(&self, peer: NodeId) -> Arc<tokio::sync::Mutex<Option<quinn::Connection>>> {
        self.conns
            .lock()
            .expect("conns lock")
            .entry(peer)
            .or_default()
            .clone()
    }

    /// Adopts a connection `peer` dialled to us, unless we already have a live one.
    pub fn adopt(&self, peer: NodeId, conn: &quinn::Connection) {
        let slot = self.slot(peer);
        let adopted = match slot.try_lock() {
            Ok(mut guard) if guard.as_ref().is_none_or(|c| c.close_reason().is_some()) => {
                *guard = Some(conn.clone());
                true
            }
            _ => false,
        };
        if adopted {
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
        Ok(conn)
    }

    /// Sends `request` for `group` to `peer` and waits for the reply, at most `timeout`.
    pub async fn call(
        &self,
        peer: NodeId,
        group: RangeId,
        request: PeerRequest,
        timeout: Duration,
    ) -> Result<PeerReply, CallError> {
        let unreachable = |reason: String| CallError::Unreachable { peer, reason };
        let frame = wire::encode_frame(&PeerFrame {
            from: self.me,
            group,
            request,
        });
        let exchange = async {
            let conn = self.connection(peer).await?;
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            send.write_all(&frame)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let _ = send.finish();
            wire::read_frame::<_, PeerReply>(&mut recv, PEER_FRAME_BYTES_MAX)
                .await
                .map_err(|e| unreachable(e.to_string()))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Err(_) => Err(unreachable(format!("no reply within {timeout:?}"))),
            Ok(Err(e)) => Err(e),
            Ok(Ok(PeerReply::Error(error))) => Err(CallError::Remote { peer, error }),
            Ok(Ok(reply)) => Ok(reply),
        }
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

impl RaftNetworkV2<TypeConfig> for GroupNetwork {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self
            .peers
            .call(
                self.target,
                self.group,
                PeerRequest::Append(rpc),
                option.hard_ttl(),
            )
            .await
            .map_err(rpc_error)?
        {
            PeerReply::Append(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self
            .peers
            .call(
                self.target,
                self.group,
                PeerRequest::Vote(rpc),
                option.hard_ttl(),
            )
            .await
            .map_err(rpc_error)?
        {
            PeerReply::Vote(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self
            .peers
            .call(
                self.target,
                self.group,
                PeerRequest::PreVote(rpc),
                option.hard_ttl(),
            )
            .await
            .map_err(rpc_error)?
        {
            PeerReply::Vote(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: openraft::alias::SnapshotOf<TypeConfig, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let request = PeerRequest::Snapshot {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot.into_inner(),
        };
        let call = self.peers.call(
            self.target,
            self.group,
            request,
            option.hard_ttl().max(Duration::from_secs(30)),
        );
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

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> GroupNetwork {
        GroupNetwork {
            peers: self.peers.clone(),
            target,
            group: self.group,
        }
    }
}

/// Reads one peer frame from a stream, for the serving side.
pub async fn read_peer_frame(recv: &mut quinn::RecvStream) -> Result<PeerFrame, io::Error> {
    wire::read_frame(recv, PEER_FRAME_BYTES_MAX)
        .await
        .map_err(io::Error::other)
}
