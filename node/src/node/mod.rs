//! A storage node: its QUIC endpoint, its RocksDB, and its replica of every range group.
//!
//! Lifecycle: [`BoundNode::bind`] creates certificates and binds the endpoint (so a test or
//! `concord dev` can learn every port first), [`BoundNode::start`] opens storage, starts one
//! openraft instance per range and serves the client and peer protocols;
//! [`Node::shutdown`] stops it all and releases the database.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use concord_placement::{bootstrap_layout, RangeDescriptor, RangeTable};
use concord_transport::api::{
    ApiError, ClientReply, ClientRequest, ClientResponse, Consistency, KeySpan, KvRequest,
    KvResponse, LeaseRequest, NodeAddr, NodeCapacity, NodeId, ProcessStats, PutRequest, RangeId,
    RangeStatus, RequestLimits, RouteTable, StatusResponse, StorageCounters,
};
use concord_transport::endpoint::{self, ConnectionLimits};
use concord_transport::lease::lease_anchor;
use concord_transport::wire::{self, WireError, WIRE_VERSION};
use concord_transport::{tls, ALPN_CLIENT, ALPN_PEER};
use futures::stream::{FuturesUnordered, StreamExt};
use openraft::async_runtime::watch::WatchReceiver;
use openraft::error::{ClientWriteError, RaftError};
use openraft::raft::linearizable_read::{Linearizer, LinearizerOption, ReadLogId};
use openraft::{BasicNode, Config, SnapshotPolicy};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::mvcc::{Bounds, Command};
use crate::network::{
    read_peer_batch, NetworkFactory, PeerError, PeerFrame, PeerItemReply, PeerReply, PeerRequest,
    Peers, ANONYMOUS_PEER,
};
use crate::raft_types::Raft;
use crate::storage::{Engine, LogStore, RangeState, StateMachine, WATCH_BUFFER_DEFAULT};
use balance_service::leader_balance_loop;
use lease_service::{lease_loop, LeaseKeeper};

mod balance_service;
mod compaction_service;
mod lease_service;
mod merge_service;
pub(crate) mod placement_service;
mod replica_service;
mod split_service;
mod watch_service;

pub use compaction_service::CompactionSettings;
pub use placement_service::PlacementSettings;
pub use split_service::{split_point, SplitSettings};

/// Raft timing and log-retention settings.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    /// Leader heartbeat period.
    pub heartbeat_interval_ms: u64,
    /// Election timeout lower bound; the leader lease derives from the upper bound.
    pub election_timeout_min_ms: u64,
    /// Election timeout upper bound.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many applied entries.
    pub snapshot_logs_since_last: u64,
    /// Entries kept in the log below the last snapshot (for slow followers).
    pub logs_kept_after_snapshot: u64,
    /// How long a follower read waits to apply the leader's read index.
    pub follower_read_timeout_ms: u64,
    /// How often the node looks for leaders to hand over so that every node leads about as
    /// many ranges as the others; 0 turns leader balancing off.
    pub leader_balance_interval_ms: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 1_000,
            election_timeout_max_ms: 2_000,
            snapshot_logs_since_last: 100_000,
            logs_kept_after_snapshot: 1_000,
            follower_read_timeout_ms: 2_000,
            leader_balance_interval_ms: 1_000,
        }
    }
}

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id (≥ 1).
    pub id: NodeId,
    /// Address to bind (`127.0.0.1:0` picks a port).
    pub listen: SocketAddr,
    /// Data directory (RocksDB lives in `DIR/db`).
    pub data_dir: PathBuf,
    /// Certificate directory (the cluster CA and node certificates; created if empty).
    pub cert_dir: PathBuf,
    /// Number of bootstrap ranges ([`RANGES_DEFAULT`] unless set).
    pub ranges: usize,
    /// Request limits.
    pub limits: RequestLimits,
    /// Connection limits.
    pub connection: ConnectionLimits,
    /// Raft settings.
    pub raft: RaftSettings,
    /// Revisions of events a watcher may fall behind before it is cancelled (resumable).
    pub watch_buffer: usize,
    /// When a range splits by size or load.
    pub split: SplitSettings,
    /// How much MVCC history a range keeps.
    pub compaction: CompactionSettings,
    /// The placement service: failure detection, zone, joining a cluster.
    pub placement: PlacementSettings,
}

impl NodeConfig {
    /// A configuration with defaults for node `id` storing under `data_dir`, certificates in
    /// `cert_dir`, listening on `listen`.
    pub fn new(id: NodeId, listen: SocketAddr, data_dir: PathBuf, cert_dir: PathBuf) -> Self {
        Self {
            id,
            listen,
            data_dir,
            cert_dir,
            ranges: RANGES_DEFAULT,
            limits: RequestLimits::default(),
            connection: ConnectionLimits::default(),
            raft: RaftSettings::default(),
            watch_buffer: WATCH_BUFFER_DEFAULT,
            split: SplitSettings::default(),
            compaction: CompactionSettings::default(),
            placement: PlacementSettings::default(),
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Certificates or the endpoint failed.
    #[error("transport: {0}")]
    Transport(#[from] tls::TlsError),
    /// Storage failed to open.
    #[error("storage: {0}")]
    Storage(#[from] std::io::Error),
    /// Raft failed to start.
    #[error("raft: {0}")]
    Raft(String),
    /// The configuration contradicts itself or the data directory.
    #[error("config: {0}")]
    Config(String),
}

/// How long [`Node::shutdown`] waits for closed connections to drain.
pub const SHUTDOWN_DRAIN_WAIT_MS: u64 = 3_000;

/// How long [`BoundNode::bind`] waits for an explicit port to be released.
pub const REBIND_WAIT_MS: u64 = 5_000;

/// A node with its endpoint bound, not yet serving.
pub struct BoundNode {
    config: NodeConfig,
    endpoint: quinn::Endpoint,
}

impl BoundNode {
    /// Creates certificates if needed and binds the endpoint.
    ///
    /// An explicit port that is still held (a node of this process that just shut down
    /// releases its UDP socket when its endpoint driver finishes) is retried for up to
    /// [`REBIND_WAIT_MS`].
    pub fn bind(config: NodeConfig) -> Result<Self, StartError> {
        let certs = tls::ensure_node_cert(&config.cert_dir, config.id, &[config.listen.ip()])?;
        let mut waited_ms = 0;
        let endpoint = loop {
            match endpoint::node_endpoint(config.listen, &certs, &config.connection) {
                Err(tls::TlsError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::AddrInUse
                        && config.listen.port() != 0
                        && waited_ms < REBIND_WAIT_MS =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                    waited_ms += 20;
                }
                other => break other?,
            }
        };
        Ok(Self { config, endpoint })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("bound endpoint has an address")
    }

    /// Starts the node as a member of the cluster `members` (node id → address, this node
    /// included). On a fresh data directory each bootstrap range is initialised on the members
    /// [`bootstrap_layout`] gives it, and the placement group on the first three; a node with
    /// `placement.join` set bootstraps nothing and receives replicas from the placement
    /// service.
    pub async fn start(self, members: BTreeMap<NodeId, SocketAddr>) -> Result<Node, StartError> {
        let BoundNode { config, endpoint } = self;
        if !members.contains_key(&config.id) {
            return Err(StartError::Config(format!(
                "node {} is not among the members {members:?}",
                config.id
            )));
        }
        std::fs::create_dir_all(&config.data_dir)?;
        let fresh = check_layout(&config, &members)?;
        let engine = Engine::open(&config.data_dir.join("db"))?;
        let node_ids: Vec<NodeId> = members.keys().copied().collect();
        let table = bootstrap_layout(config.ranges, &node_ids);
        let peers = Arc::new(Peers::new(config.id, endpoint.clone(), members.clone()));
        // Connections this node dials carry the peer's requests too (one connection per pair):
        // serve them, once the node is assembled. A weak handle: `Peers` lives in the node.
        let (ready_tx, ready_rx) = tokio::sync::watch::channel::<Option<Weak<NodeInner>>>(None);
        peers.set_serve_hook(Arc::new(move |conn| {
            let mut ready = ready_rx.clone();
            tokio::spawn(async move {
                let inner = match ready.wait_for(Option::is_some).await {
                    Ok(r) => r.as_ref().and_then(Weak::upgrade),
                    Err(_) => None,
                };
                if let Some(inner) = inner {
                    serve_connection(inner, conn, true).await;
                }
            });
        }));
        let raft_config = Arc::new(
            Config {
                cluster_name: "concord".into(),
                heartbeat_interval: config.raft.heartbeat_interval_ms,
                election_timeout_min: config.raft.election_timeout_min_ms,
                election_timeout_max: config.raft.election_timeout_max_ms,
                snapshot_policy: SnapshotPolicy::LogsSinceLast(
                    config.raft.snapshot_logs_since_last,
                ),
                max_in_snapshot_log_to_keep: config.raft.logs_kept_after_snapshot,
                enable_pre_vote: Some(true),
                ..Default::default()
            }
            .validate()
            .map_err(|e| StartError::Raft(e.to_string()))?,
        );
        let membership = |voters: &[NodeId]| -> BTreeMap<NodeId, BasicNode> {
            voters
                .iter()
                .map(|id| (*id, BasicNode::new(members[id].to_string())))
                .collect()
        };
        let (hosts_tx, hosts_rx) = mpsc::unbounded_channel();
        let opener = GroupOpener {
            engine: engine.clone(),
            peers: peers.clone(),
            raft_config,
            node_id: config.id,
            watch_buffer: config.watch_buffer,
            hosts: hosts_tx.clone(),
            layout: table.clone(),
        };
        let mut groups = BTreeMap::new();
        // On a fresh data directory (not when joining) the bootstrap groups this node is a
        // voter of (the placement group on the first three nodes, each bootstrap range on
        // the nodes the layout gives it) are created and initialised; later starts find
        // every group this node hosts in storage (bootstrap groups moved away since are gone).
        if fresh && config.placement.join.is_none() {
            let mut bootstrap = vec![(
                PLACEMENT_GROUP,
                concord_placement::replicas::bootstrap_voters(0, &node_ids),
            )];
            bootstrap.extend(table.ranges().iter().map(|d| (d.id, d.replicas.clone())));
            for (id, voters) in bootstrap {
                if !voters.contains(&config.id) {
                    continue;
                }
                let group = opener.open(id).await?;
                // Every voter initialises with the same membership: safe in openraft, and no
                // node has to be special at first start.
                if let Err(e) = group.raft.initialize(membership(&voters)).await {
                    tracing::debug!(range = id, "initialize: {e}");
                }
                groups.insert(id, Arc::new(group));
            }
        }
        for id in engine.group_ids()? {
            if let std::collections::btree_map::Entry::Vacant(slot) = groups.entry(id) {
                slot.insert(Arc::new(opener.open(id).await?));
            }
        }
        // Ranges split off while this replica was behind (named by a snapshot it installed).
        for group in groups.values() {
            let _ = hosts_tx.send(group.split_into());
        }
        let advertised_addr = members[&config.id];
        let inner = Arc::new(NodeInner {
            config,
            engine,
            peers,
            table: RwLock::new(table),
            groups: RwLock::new(groups),
            opener,
            opening: tokio::sync::Mutex::new(()),
            placement: RwLock::new(None),
            placement_memory: Mutex::new(Default::default()),
            retired: Mutex::new(Default::default()),
            advertised_addr,
            watch_overflows: AtomicU64::new(0),
            watchers: AtomicU64::new(0),
        });
        inner.complete_table();
        ready_tx.send_replace(Some(Arc::downgrade(&inner)));
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(inner.clone(), endpoint.clone()));
        tasks.spawn(host_loop(Arc::downgrade(&inner), hosts_rx));
        tasks.spawn(lease_loop(Arc::downgrade(&inner)));
        let balance_every = Duration::from_millis(inner.config.raft.leader_balance_interval_ms);
        tasks.spawn(leader_balance_loop(Arc::downgrade(&inner), balance_every));
        tasks.spawn(split_service::split_loop(
            Arc::downgrade(&inner),
            inner.config.split,
        ));
        tasks.spawn(compaction_service::compaction_loop(
            Arc::downgrade(&inner),
            inner.config.compaction,
        ));
        tasks.spawn(placement_service::heartbeat_loop(Arc::downgrade(&inner)));
        tasks.spawn(placement_service::schedule_loop(Arc::downgrade(&inner)));
        tasks.spawn(replica_service::replica_gc_loop(Arc::downgrade(&inner)));
        Ok(Node {
            inner: Some(inner),
            endpoint,
            tasks,
        })
    }
}

/// Bootstrap ranges of a new cluster unless told otherwise: one per node of a 3-node
/// cluster, so that each node leads one. Splits (by size, key count and load) make more where
/// the data and the writes are. Pre-splitting further adds Raft groups whose per-group costs
/// (a storage write, an apply and a replication message per group per batch) grow with their
/// number while their batches shrink: 8 bootstrap ranges made puts with 64 clients about a
/// quarter dearer in CPU than 3 (docs/benchmarks/analysis.md).
pub const RANGES_DEFAULT: usize = 3;

/// The bootstrap range count a node's data directory was created with, if it was: what a
/// restart uses when not told.
pub fn stored_ranges(data_dir: &Path) -> Option<usize> {
    let layout = std::fs::read_to_string(data_dir.join(LAYOUT_FILE)).ok()?;
    layout
        .lines()
        .find_map(|line| line.strip_prefix("ranges="))
        .and_then(|n| n.parse().ok())
}

/// The file in a node's data directory that records the layout it was created with.
const LAYOUT_FILE: &str = "layout";

/// The range count and members are fixed at first start; a restart must agree. True on the
/// first start (the data directory had no layout yet).
fn check_layout(
    config: &NodeConfig,
    members: &BTreeMap<NodeId, SocketAddr>,
) -> Result<bool, StartError> {
    let path = config.data_dir.join(LAYOUT_FILE);
    let ids: Vec<String> = members.keys().map(|id| id.to_string()).collect();
    let layout = format!("ranges={}\nmembers={}\n", config.ranges, ids.join(","));
    match std::fs::read_to_string(&path) {
        Ok(existing) if existing == layout => Ok(false),
        Ok(existing) => Err(StartError::Config(format!(
            "{} was created with {:?}, but this start asks for {:?}",
            path.display(),
            existing.trim(),
            layout.trim()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&path, layout)?;
            Ok(true)
        }
        Err(e) => Err(e.into()),
    }
}

/// A ticker for a node's periodic loops: every `period`, a late tick delays the next ones
/// (never a burst of catch-up ticks).
fn ticker(period: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker
}

/// The placement group: started on the first three nodes, outside the range table; its leader
/// moves its replicas like a range's (`placement_service::plan_moves`). It holds
/// the placement service's registry, stored range table and decisions (`placement_service`)
/// and allocates the ids of ranges made by splits (see [`NodeInner::allocate_range_id`]).
pub const PLACEMENT_GROUP: RangeId = 0;

/// Ids of ranges made by splits start above every bootstrap range id.
pub(super) const SPLIT_RANGE_ID_BASE: RangeId = 64;

/// What opening a group on this node takes.
struct GroupOpener {
    engine: Arc<Engine>,
    peers: Arc<Peers>,
    raft_config: Arc<Config>,
    node_id: NodeId,
    watch_buffer: usize,
    hosts: mpsc::UnboundedSender<Vec<RangeId>>,
    /// The cluster's first cut of the keyspace ([`bootstrap_layout`]).
    layout: RangeTable,
}

/// The extent a replica of range `id` has before its log or a snapshot says otherwise: a
/// bootstrap range's from `layout`, the whole keyspace for others (the placement group; a
/// range made by a split always starts from its parent's split or a snapshot). A bootstrap
/// range's extent is in no log entry, so every replica, whether initialised at the first
/// start, reopened later, or created empty by a move and filled by replaying the log from
/// index 0, must start from this same extent: a replica that started from another replayed
/// a merge into the range as refused, and its state diverged from the other replicas'.
pub fn initial_bounds(layout: &RangeTable, id: RangeId) -> Bounds {
    layout.get(id).map_or_else(Bounds::default, |d| Bounds {
        start: d.start.clone(),
        end: d.end.clone(),
        epoch: d.epoch,
    })
}

impl GroupOpener {
    /// Opens group `id` from storage (from [`initial_bounds`] if it holds nothing of it yet)
    /// and starts its openraft instance; it is not initialised here.
    async fn open(&self, id: RangeId) -> Result<Group, StartError> {
        let bootstrap = initial_bounds(&self.layout, id);
        let log = LogStore::new(self.engine.clone(), id);
        // Reading the range's versions from RocksDB blocks for as long as the range is large
        // (a range made by a split under load): not on an async worker, where it would hold
        // up every other group's replication and heartbeats.
        let engine = self.engine.clone();
        let mut sm = tokio::task::spawn_blocking(move || StateMachine::open(engine, id, bootstrap))
            .await
            .map_err(|e| StartError::Storage(std::io::Error::other(e)))??;
        sm.set_watch_buffer(self.watch_buffer);
        sm.set_hosts(self.hosts.clone());
        let state = sm.state();
        let network = NetworkFactory {
            peers: self.peers.clone(),
            group: id,
        };
        // `build` reads the initial state (the snapshot's metadata among it) and starts
        // nothing; `run` starts the group, whose leader may send a snapshot at once, so the
        // hold ends in between.
        let hold = sm.hold_snapshots();
        let raft = Raft::build(self.node_id, self.raft_config.clone(), network, log, sm)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        drop(hold);
        raft.run();
        Ok(Group {
            id,
            raft,
            state,
            keeper: LeaseKeeper::default(),
            counters: RangeCounters::default(),
            merges_under_way: AtomicU32::new(0),
            moves_under_way: AtomicU32::new(0),
        })
    }
}

/// Starts the groups this node must host from now on (see `StateMachine::set_hosts`): made by
/// a split it applied, or skipped by a snapshot it installed (those start empty and are
/// caught up by a snapshot from their leader).
async fn host_loop(inner: Weak<NodeInner>, mut hosts: mpsc::UnboundedReceiver<Vec<RangeId>>) {
    while let Some(ids) = hosts.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        for id in ids {
            if inner.group(id).is_ok() {
                continue;
            }
            match inner.host_replica(id).await {
                // Its own splits that this replica skipped, if it came from a snapshot.
                Ok(group) => {
                    let _ = inner.opener.hosts.send(group.split_into());
                    if inner.leads_parent_of(id) {
                        tokio::spawn(stand_for_new_range(group));
                    }
                }
                Err(e) => tracing::warn!(range = id, "not starting a range a split named: {e}"),
            }
        }
        // A split or a snapshot changed some range's bounds.
        inner.complete_table();
    }
}

/// How long the parent's leader waits for a range made by a split to elect a leader before
/// it stands again, and how many times it stands (see [`stand_for_new_range`]).
const NEW_RANGE_ELECT_WAIT: Duration = Duration::from_millis(100);
const NEW_RANGE_ELECT_TRIES: u32 = 10;

/// A range made by a split starts without a leader, and requests for its keys wait until one
/// is elected: an election timeout (1–2 s) when every replica waits for it. The parent's
/// leader, which applied the split first, stands at once instead, with a pre-vote (a leader
/// elected meanwhile is left alone). The other replicas may not have opened the range yet and
/// then refuse, so it stands again after [`NEW_RANGE_ELECT_WAIT`] while no leader is known,
/// at most [`NEW_RANGE_ELECT_TRIES`] times; the election timeout remains the fallback.
async fn stand_for_new_range(group: Arc<Group>) {
    for _ in 0..NEW_RANGE_ELECT_TRIES {
        if group.raft.trigger().elect(true).await.is_err() {
            return;
        }
        let elected = group
            .raft
            .wait(Some(NEW_RANGE_ELECT_WAIT))
            .metrics(|m| m.current_leader.is_some(), "new range's leader")
            .await;
        if elected.is_ok() {
            return;
        }
    }
}

struct Group {
    id: RangeId,
    raft: Raft,
    state: Arc<RwLock<RangeState>>,
    keeper: LeaseKeeper,
    counters: RangeCounters,
    /// Merges of the right neighbour this node is running as the range's leader. A split
    /// meanwhile would move the range's end away from the neighbour it froze, and the merge
    /// would be refused (the neighbour left frozen until the scheduler finishes it): splits
    /// wait until no merge is under way.
    merges_under_way: AtomicU32,
    /// Replica moves this node is running as the range's leader. The leader does not hand
    /// its leadership over meanwhile, and a learner seen while none is under way is one a
    /// failed move left behind (see `NodeInner::drop_stray_learners`).
    moves_under_way: AtomicU32,
}

/// Counts an operation as under way in a counter for as long as it lives (a merge, a
/// move: see `Group::merges_under_way` and `Group::moves_under_way`).
struct UnderWay<'a>(&'a AtomicU32);

impl<'a> UnderWay<'a> {
    fn new(counter: &'a AtomicU32) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Self(counter)
    }
}

impl Drop for UnderWay<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Requests a range served here since start (the placement heartbeat and the split loop turn
/// them into rates), and a sample of the keys written.
#[derive(Default)]
struct RangeCounters {
    reads: AtomicU64,
    writes: AtomicU64,
    sample: split_service::WriteSample,
}

/// Turns ranges' request counters into rates between two looks at them (the heartbeat's and
/// the split loop's, each its own meter).
#[derive(Default)]
struct RateMeter {
    last: BTreeMap<RangeId, ((u64, u64), std::time::Instant)>,
}

impl RateMeter {
    /// Reads and writes per second `group` served since the previous look at it (0 at the
    /// first).
    fn rates(&mut self, group: &Group, now: std::time::Instant) -> (f64, f64) {
        let counts = group.counters.get();
        let ((r0, w0), t0) = self
            .last
            .insert(group.id, (counts, now))
            .unwrap_or((counts, now));
        let secs = now.duration_since(t0).as_secs_f64().max(1e-3);
        let per_sec = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs;
        (per_sec(counts.0, r0), per_sec(counts.1, w0))
    }

    /// Forgets the ranges not looked at since `now`.
    fn forget_older_than(&mut self, now: std::time::Instant) {
        self.last.retain(|_, (_, at)| *at >= now);
    }

    /// Whether range `id` was looked at (and not forgotten since).
    fn knows(&self, id: RangeId) -> bool {
        self.last.contains_key(&id)
    }
}

impl RangeCounters {
    /// (reads, writes).
    fn get(&self) -> (u64, u64) {
        (
            self.reads.load(Ordering::Relaxed),
            self.writes.load(Ordering::Relaxed),
        )
    }
}

impl Group {
    /// Whether this node's leader is running a merge into the range (see `merges_under_way`).
    fn merging(&self) -> bool {
        self.merges_under_way.load(Ordering::Acquire) > 0
    }

    /// Whether this node's leader is moving one of the range's replicas (see
    /// `moves_under_way`).
    fn moving(&self) -> bool {
        self.moves_under_way.load(Ordering::Acquire) > 0
    }

    /// The learners (replicas being added, not voting) in the membership this replica holds.
    fn learners(&self) -> Vec<NodeId> {
        let metrics = self.raft.metrics().borrow_watched().clone();
        let learners = metrics.membership_config.membership().learner_ids();
        learners.collect()
    }

    /// The range's extent and epoch, as applied here.
    fn bounds(&self) -> Bounds {
        self.state
            .read()
            .expect("range state lock")
            .mvcc
            .bounds()
            .clone()
    }

    /// `StaleEpoch` unless the client's `epoch` is the range's applied one.
    fn check_epoch(&self, epoch: u64) -> Result<(), ApiError> {
        let state = self.state.read().expect("range state lock");
        state.mvcc.check_epoch(epoch)
    }

    /// Ends every watch channel of this replica (each sees its event channel closed).
    fn close_watches(&self) {
        self.state
            .write()
            .expect("range state lock")
            .close_watches();
    }

    /// Whether this replica holds the range's state (a range started empty, to be caught up
    /// by a snapshot, does not yet).
    fn has_state(&self) -> bool {
        self.state
            .read()
            .expect("range state lock")
            .last_applied
            .is_some()
    }

    /// Whether the range froze for a merge, as applied here.
    fn frozen(&self) -> bool {
        self.state.read().expect("range state lock").mvcc.frozen()
    }

    /// The ranges split off this one, as applied here.
    fn split_into(&self) -> Vec<RangeId> {
        let state = self.state.read().expect("range state lock");
        state.mvcc.split_into()
    }

    /// The range's descriptor, as applied here.
    fn descriptor(&self) -> RangeDescriptor {
        let state = self.state.read().expect("range state lock");
        let bounds = state.mvcc.bounds();
        RangeDescriptor {
            id: self.id,
            start: bounds.start.clone(),
            end: bounds.end.clone(),
            epoch: bounds.epoch,
            replicas: state.membership.membership().voter_ids().collect(),
        }
    }
}

struct NodeInner {
    config: NodeConfig,
    engine: Arc<Engine>,
    peers: Arc<Peers>,
    /// The last complete range table built from the groups (see [`NodeInner::table`]).
    table: RwLock<RangeTable>,
    groups: RwLock<BTreeMap<RangeId, Arc<Group>>>,
    opener: GroupOpener,
    /// Held while a group is opened or removed, so that no group is opened twice.
    opening: tokio::sync::Mutex<()>,
    /// The placement leader's last view (node addresses, the whole range table, leaders).
    placement: RwLock<Option<placement_service::PlacementView>>,
    /// What this node remembers as placement leader (heartbeats, reports, moves).
    placement_memory: Mutex<placement_service::LeaderMemory>,
    /// Ranges merged away whose replica here was removed: never hosted again (a leader of one
    /// that has not seen the merge yet may still replicate to this node). The placement view's
    /// `merged` is the durable record (see [`NodeInner::retired`]).
    retired: Mutex<std::collections::BTreeSet<RangeId>>,
    /// The address other nodes reach this one at.
    advertised_addr: SocketAddr,
    /// Watchers cancelled for falling behind, since start.
    watch_overflows: AtomicU64,
    /// Watches being served now.
    watchers: AtomicU64,
}

/// The value of field `name` (in kiB) of a `/proc` file such as `/proc/self/status`, in
/// bytes (0 where there is none).
fn proc_kib_field(path: &str, name: &str) -> u64 {
    kib_field(&std::fs::read_to_string(path).unwrap_or_default(), name)
}

/// The value of field `name` (in kiB) of the text of a `/proc` file, in bytes (0 where there
/// is none).
fn kib_field(text: &str, name: &str) -> u64 {
    let line = text.lines().find(|l| l.starts_with(name));
    line.and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// The process's resident memory, from `/proc/self/status` (0 where there is none).
fn resident_bytes() -> u64 {
    proc_kib_field("/proc/self/status", "VmRSS:")
}

/// This node's capacity (see [`NodeCapacity`]), from `/proc` (`/proc/meminfo` read once).
fn node_capacity() -> NodeCapacity {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    NodeCapacity {
        memory_total_bytes: kib_field(&meminfo, "MemTotal:"),
        memory_available_bytes: kib_field(&meminfo, "MemAvailable:"),
        resident_bytes: resident_bytes(),
    }
}

/// A running node.
pub struct Node {
    inner: Option<Arc<NodeInner>>,
    endpoint: quinn::Endpoint,
    tasks: JoinSet<()>,
}

impl Node {
    fn inner(&self) -> &Arc<NodeInner> {
        self.inner.as_ref().expect("node is running")
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner().config.id
    }

    /// The address the node serves on.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("bound endpoint has an address")
    }

    /// The group-commit counters of this node's storage.
    pub fn storage_counters(&self) -> StorageCounters {
        storage_counters(&self.inner().engine)
    }

    /// Watchers this node cancelled for falling behind (they resume), since start.
    pub fn watch_overflows(&self) -> u64 {
        self.inner().watch_overflows.load(Ordering::Relaxed)
    }

    /// The ids of the ranges this node leads now (the placement group is no range).
    pub fn led_ranges(&self) -> Vec<RangeId> {
        self.inner()
            .groups()
            .iter()
            .filter(|g| g.id != PLACEMENT_GROUP && g.raft.is_leader())
            .map(|g| g.id)
            .collect()
    }

    /// The ranges this node holds a replica of (with state: a replica awaiting its first
    /// snapshot is not counted); the placement group is no range.
    pub fn hosted_ranges(&self) -> Vec<RangeId> {
        self.inner()
            .groups()
            .iter()
            .filter(|g| g.id != PLACEMENT_GROUP && g.has_state())
            .map(|g| g.id)
            .collect()
    }

    /// The learners (replicas being added, not voting) of range `range` in the membership
    /// this node's replica holds; `None` where it holds no replica.
    pub fn learners(&self, range: RangeId) -> Option<Vec<NodeId>> {
        self.inner().group(range).ok().map(|g| g.learners())
    }

    /// Whether this node holds a replica of the placement group (with state), a voter or
    /// one being added.
    pub fn hosts_placement(&self) -> bool {
        self.inner()
            .group(PLACEMENT_GROUP)
            .is_ok_and(|g| g.has_state())
    }

    /// The placement service's view (asked of the placement leader).
    pub async fn placement_report(
        &self,
    ) -> Result<concord_transport::api::PlacementReport, ApiError> {
        self.inner().placement_report().await
    }

    /// The range table as this node knows it.
    pub fn range_table(&self) -> RangeTable {
        self.inner().table()
    }

    /// Asks this node, if it leads `range`, to hand the leadership to node `to` (openraft's
    /// leader transfer: `to` is elected once its log holds everything this node appended).
    /// Returns at once; watch [`Node::led_ranges`] to see the move happen. A node that does not
    /// lead `range` ignores the request.
    pub async fn transfer_leader(&self, range: RangeId, to: NodeId) -> Result<(), String> {
        let group = self.inner().group(range).map_err(|e| e.to_string())?;
        group
            .raft
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(|e| e.to_string())
    }

    /// Waits until every group has a leader known to this node, at most `timeout`.
    pub async fn wait_for_leaders(&self, timeout: Duration) -> Result<(), String> {
        for g in self.inner().groups() {
            let id = g.id;
            g.raft
                .wait(Some(timeout))
                .metrics(|m| m.current_leader.is_some(), "leader known")
                .await
                .map_err(|e| {
                    format!(
                        "node {} range {id}: no leader within {timeout:?}: {e}",
                        self.id()
                    )
                })?;
        }
        Ok(())
    }

    /// Stops serving, shuts every group down and releases the database.
    pub async fn shutdown(mut self) {
        self.endpoint.close(0u32.into(), b"shutdown");
        self.tasks.shutdown().await;
        let inner = self.inner.take().expect("node is running");
        for g in inner.groups() {
            if let Err(e) = g.raft.shutdown().await {
                tracing::warn!("shutting down range {}: {e}", g.id);
            }
        }
        inner.groups.write().expect("groups lock").clear();
        let engine = inner.engine.clone();
        let peers = Arc::downgrade(&inner.peers);
        drop(inner);
        // openraft's tasks drop their storage and network handles as they finish; wait
        // (bounded) until ours are the last, so that the database is closed and the socket
        // released when shutdown returns.
        for _ in 0..500 {
            if Arc::strong_count(&engine) == 1 && peers.strong_count() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if Arc::strong_count(&engine) != 1 || peers.strong_count() != 0 {
            tracing::warn!("storage or peer pool still referenced after shutdown");
        }
        drop(engine);
        // Closed connections drain for three probe timeouts before the socket is released;
        // to a peer that is already gone the probe timeout has backed off to many seconds, so
        // the wait is bounded (the socket is released in the background afterwards).
        let drain = Duration::from_millis(SHUTDOWN_DRAIN_WAIT_MS);
        if tokio::time::timeout(drain, self.endpoint.wait_idle())
            .await
            .is_err()
        {
            tracing::debug!("connections still draining after {drain:?}; not waiting longer");
        }
    }
}

fn storage_counters(engine: &Engine) -> StorageCounters {
    let c = engine.commit().counters();
    StorageCounters {
        fsyncs: c.fsyncs.load(Ordering::Relaxed),
        appends: c.appends.load(Ordering::Relaxed),
    }
}

async fn accept_loop(inner: Arc<NodeInner>, endpoint: quinn::Endpoint) {
    let mut conns = JoinSet::new();
    while let Some(incoming) = endpoint.accept().await {
        let inner = inner.clone();
        conns.spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => return tracing::debug!("handshake failed: {e}"),
            };
            let alpn = conn
                .handshake_data()
                .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|d| d.protocol);
            match alpn.as_deref() {
                Some(ALPN_CLIENT) => serve_connection(inner, conn, false).await,
                Some(ALPN_PEER) => serve_connection(inner, conn, true).await,
                _ => conn.close(1u32.into(), b"unknown protocol"),
            }
        });
        // Reap finished connection tasks so the set does not grow without bound.
        while conns.try_join_next().is_some() {}
    }
}

async fn serve_connection(inner: Arc<NodeInner>, conn: quinn::Connection, peer: bool) {
    let mut streams = JoinSet::new();
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => break,
        };
        let inner = inner.clone();
        let conn = conn.clone();
        // Boxed: a stream's future holds every request's handling state and is large; the
        // task then stores a pointer, and neither spawning nor reaping a task (one per
        // request) copies the whole future (`memmove` was the top symbol of a put profile).
        if peer {
            streams.spawn(Box::pin(serve_peer_stream(inner, conn, send, recv)));
        } else {
            streams.spawn(Box::pin(serve_client_stream(inner, send, recv)));
        }
        while streams.try_join_next().is_some() {}
    }
}

async fn serve_client_stream(
    inner: Arc<NodeInner>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let limits = inner.config.limits;
    let response: ClientResponse =
        match wire::read_frame_bytes(&mut recv, limits.request_bytes_max).await {
            Err(WireError::TooLarge { len, max_bytes }) => Err(ApiError::RequestTooLarge {
                size: len,
                max: max_bytes,
            }),
            Err(WireError::UnsupportedVersion { got }) => Err(ApiError::UnsupportedVersion {
                got,
                supported: WIRE_VERSION,
            }),
            Err(e) => Err(ApiError::Malformed(e.to_string())),
            Ok(bytes) => match wire::decode::<ClientRequest>(&bytes) {
                Err(e) => Err(ApiError::Malformed(e.to_string())),
                Ok(ClientRequest::Watch { range_id, epoch }) => {
                    inner.serve_watch(&mut send, recv, range_id, epoch).await;
                    let _ = send.finish();
                    return;
                }
                Ok(request) => handle_client(&inner, request).await,
            },
        };
    // The client may have gone; nothing to do then.
    let _ = wire::write_frame(&mut send, &response).await;
    let _ = send.finish();
    wire::take_end(&mut recv);
}

async fn handle_client(inner: &NodeInner, request: ClientRequest) -> ClientResponse {
    match request {
        ClientRequest::Routes => Ok(ClientReply::Routes(inner.routes())),
        ClientRequest::Status => Ok(ClientReply::Status(inner.status())),
        ClientRequest::Placement => inner.placement_report().await.map(ClientReply::Placement),
        ClientRequest::Decommission { node } => {
            inner.decommission(node).await?;
            inner.placement_report().await.map(ClientReply::Placement)
        }
        ClientRequest::Kv {
            range_id,
            epoch,
            request,
        } => inner
            .handle_kv(range_id, epoch, request)
            .await
            .map(ClientReply::Kv),
        ClientRequest::Watch { .. } => Err(ApiError::InvalidRequest(
            "a watch is served on its own stream".into(),
        )),
        ClientRequest::FailPoint { name, actions } => {
            configure_fail_point(&name, &actions).map(|()| ClientReply::FailPointSet)
        }
    }
}

/// Configures fail point `name` with `actions`, in a build with fail points only.
fn configure_fail_point(name: &str, actions: &str) -> Result<(), ApiError> {
    if !cfg!(feature = "failpoints") {
        return Err(ApiError::InvalidRequest(
            "this node is built without fail points (cargo feature `failpoints`)".into(),
        ));
    }
    tracing::warn!(name, actions, "fail point configured");
    fail::cfg(name, actions).map_err(ApiError::InvalidRequest)
}

fn not_leader(range_id: RangeId, leader_hint: Option<NodeId>) -> ApiError {
    ApiError::NotLeader {
        range_id,
        leader_hint,
    }
}

impl NodeInner {
    /// Whether this node leads the range that split `id` off, as applied here.
    fn leads_parent_of(&self, id: RangeId) -> bool {
        self.groups()
            .iter()
            .any(|g| g.raft.as_leader().is_ok() && g.split_into().contains(&id))
    }

    /// The ranges this node leads that hold their state and are not frozen for a merge (the
    /// placement group left out): what the split and compaction loops look at.
    fn led_ranges(&self) -> Vec<Arc<Group>> {
        self.groups()
            .into_iter()
            .filter(|g| {
                g.id != PLACEMENT_GROUP && g.raft.is_leader() && g.has_state() && !g.frozen()
            })
            .collect()
    }

    /// Every group this node hosts, the placement group included.
    fn groups(&self) -> Vec<Arc<Group>> {
        self.groups
            .read()
            .expect("groups lock")
            .values()
            .cloned()
            .collect()
    }

    /// The last complete range table built from the groups' applied bounds. It is built
    /// again only when they change: at start, and by `host_loop` after every split applied
    /// or snapshot installed here. Between a split's apply and the start of the range it made
    /// (or while a range started empty awaits its snapshot) the groups do not cover the
    /// keyspace: the previous table stands in, and requests routed by it meet the applied
    /// epochs (`StaleEpoch`, retried by the client).
    fn table(&self) -> RangeTable {
        self.table.read().expect("table lock").clone()
    }

    /// The range table from the groups' applied bounds and the placement service's table
    /// (for the ranges this node does not host), if together they cover the keyspace now;
    /// then also remembered as [`NodeInner::table`]. Per range the newer epoch wins; at equal
    /// epochs a range this node leads is described by its own replica, any other by placement
    /// (a replica that was moved away keeps its old voters until it is removed).
    fn complete_table(&self) -> Option<RangeTable> {
        let mut by_id: BTreeMap<RangeId, (RangeDescriptor, bool)> = BTreeMap::new();
        if let Some(view) = self.placement.read().expect("placement lock").as_ref() {
            for d in &view.ranges {
                by_id.insert(d.id, (d.clone(), false));
            }
        }
        for g in self.groups() {
            if g.id == PLACEMENT_GROUP || !g.has_state() || g.frozen() {
                continue;
            }
            let local = g.descriptor();
            let leads = g.raft.is_leader();
            let wins = by_id.get(&g.id).is_none_or(|(placed, _)| {
                local.epoch > placed.epoch || (local.epoch == placed.epoch && leads)
            });
            if wins {
                by_id.insert(g.id, (local, true));
            }
        }
        // Where two descriptors overlap (one side has seen a split or merge the other has
        // not), the newer extent wins: epochs grow with every split and merge, and a merged
        // range's epoch is above both its parts'.
        let mut newest_first: Vec<RangeDescriptor> = by_id.into_values().map(|(d, _)| d).collect();
        newest_first.sort_by(|a, b| b.epoch.cmp(&a.epoch).then(a.id.cmp(&b.id)));
        // Kept by start; kept ranges are disjoint, so only the last one starting before a
        // candidate's end can overlap it.
        let mut kept: BTreeMap<Vec<u8>, RangeDescriptor> = BTreeMap::new();
        for d in newest_first {
            let before_end = if d.end.is_empty() {
                kept.last_key_value()
            } else {
                kept.range::<Vec<u8>, _>(..d.end.clone()).next_back()
            };
            if !before_end.is_some_and(|(_, k)| k.overlaps(&d.start, &d.end)) {
                kept.insert(d.start.clone(), d);
            }
        }
        let table = RangeTable::new(kept.into_values().collect()).ok()?;
        *self.table.write().expect("table lock") = table.clone();
        Some(table)
    }

    /// The leader of `range_id` as this node's replica knows it, or else as the placement
    /// service last reported it.
    fn leader_hint(&self, range_id: RangeId) -> Option<NodeId> {
        if let Ok(group) = self.group(range_id) {
            if let Some(leader) = group.raft.metrics().borrow_watched().current_leader {
                return Some(leader);
            }
        }
        let placement = self.placement.read().expect("placement lock");
        placement.as_ref()?.leaders.get(&range_id).copied()
    }

    fn routes(&self) -> RouteTable {
        let mut leaders: BTreeMap<RangeId, NodeId> = self
            .placement
            .read()
            .expect("placement lock")
            .as_ref()
            .map(|v| v.leaders.clone())
            .unwrap_or_default();
        leaders.remove(&PLACEMENT_GROUP);
        for g in self.groups() {
            if g.id == PLACEMENT_GROUP {
                continue;
            }
            if let Some(l) = g.raft.metrics().borrow_watched().current_leader {
                leaders.insert(g.id, l);
            }
        }
        RouteTable {
            ranges: self.table().ranges().to_vec(),
            leaders,
            nodes: self.node_addrs(),
        }
    }

    fn node_addrs(&self) -> Vec<NodeAddr> {
        self.peers
            .addrs()
            .into_iter()
            .map(|(id, addr)| NodeAddr {
                id,
                addr: addr.to_string(),
            })
            .collect()
    }

    fn status(&self) -> StatusResponse {
        let ranges = self
            .groups()
            .iter()
            .map(|g| {
                let m = g.raft.metrics().borrow_watched().clone();
                let d = &g.descriptor();
                let (revision, keys) = {
                    let state = g.state.read().expect("range state lock");
                    (state.mvcc.revision(), state.mvcc.key_count() as u64)
                };
                RangeStatus {
                    id: d.id,
                    start: d.start.clone(),
                    end: d.end.clone(),
                    epoch: d.epoch,
                    replicas: d.replicas.clone(),
                    leader: m.current_leader,
                    term: m.current_term,
                    revision,
                    keys,
                    applied_index: m.last_applied.map_or(0, |l| l.index()),
                    snapshot_index: m.snapshot.map_or(0, |l| l.index()),
                    purged_index: m.purged.map_or(0, |l| l.index()),
                }
            })
            .collect();
        StatusResponse {
            node_id: self.config.id,
            nodes: self.node_addrs(),
            ranges,
            storage: storage_counters(&self.engine),
            process: ProcessStats {
                rss_bytes: resident_bytes(),
                watchers: self.watchers.load(Ordering::Relaxed),
                watch_overflows: self.watch_overflows.load(Ordering::Relaxed),
            },
        }
    }

    /// The group of `range_id`.
    fn group(&self, range_id: RangeId) -> Result<Arc<Group>, ApiError> {
        self.groups
            .read()
            .expect("groups lock")
            .get(&range_id)
            .cloned()
            .ok_or(ApiError::RangeNotFound { range_id })
    }

    /// The group of `range_id`, if the client's descriptor of it has the current `epoch`.
    /// The placement group takes no client requests.
    fn group_at(&self, range_id: RangeId, epoch: u64) -> Result<Arc<Group>, ApiError> {
        if range_id == PLACEMENT_GROUP {
            return Err(ApiError::RangeNotFound { range_id });
        }
        let group = self.group(range_id)?;
        // A replica still waiting for its first snapshot knows nothing of the range.
        if !group.has_state() {
            return Err(ApiError::RangeNotFound { range_id });
        }
        group.check_epoch(epoch)?;
        Ok(group)
    }

    /// Checks that every key the request touches lies in `bounds` (of range `range_id`).
    fn check_keys(
        &self,
        range_id: RangeId,
        bounds: &Bounds,
        request: &KvRequest,
    ) -> Result<(), ApiError> {
        let inside = |span: &KeySpan| bounds.contains_span(span);
        let outside = || ApiError::KeyOutsideRange { range_id };
        match request {
            KvRequest::Put(p) => bounds.contains(&p.key).then_some(()).ok_or_else(outside),
            KvRequest::Range(r, _) => inside(&r.span).then_some(()).ok_or_else(outside),
            KvRequest::Delete(d) => inside(&d.span).then_some(()).ok_or_else(outside),
            KvRequest::Compact { .. } => Ok(()),
            KvRequest::Split { at } => bounds.contains(at).then_some(()).ok_or_else(outside),
            KvRequest::MoveReplica { .. } | KvRequest::Merge | KvRequest::Freeze { .. } => Ok(()),
            KvRequest::Lease(LeaseRequest::KeepAliveMany { ids }) => ids
                .iter()
                .all(|id| bounds.contains(&lease_anchor(*id)))
                .then_some(())
                .ok_or_else(outside),
            KvRequest::Lease(LeaseRequest::GrantWithPut { id, put, .. }) => {
                (bounds.contains(&lease_anchor(*id)) && bounds.contains(&put.key))
                    .then_some(())
                    .ok_or_else(outside)
            }
            KvRequest::Lease(l) => match l.owner() {
                Some(id) => bounds
                    .contains(&lease_anchor(id))
                    .then_some(())
                    .ok_or_else(outside),
                None => Ok(()),
            },
            KvRequest::Txn(t) => {
                let spans = t.spans();
                if spans.iter().all(inside) {
                    return Ok(());
                }
                let table = self.table();
                let mut ranges: Vec<RangeId> = spans
                    .iter()
                    .flat_map(|s| {
                        let (start, end) = s.bounds();
                        table
                            .overlapping(&start, &end)
                            .map(|r| r.id)
                            .collect::<Vec<_>>()
                    })
                    .collect();
                ranges.sort_unstable();
                ranges.dedup();
                Err(ApiError::CrossRange { ranges })
            }
        }
    }

    async fn handle_kv(
        &self,
        range_id: RangeId,
        epoch: u64,
        request: KvRequest,
    ) -> Result<KvResponse, ApiError> {
        let group = self.group_at(range_id, epoch)?;
        let group = &*group;
        self.config.limits.check(&request)?;
        {
            let state = group.state.read().expect("range state lock");
            self.check_keys(range_id, state.mvcc.bounds(), &request)?;
        }
        let command = match request {
            KvRequest::Range(req, consistency) => {
                group.counters.reads.fetch_add(1, Ordering::Relaxed);
                self.read_barrier(group, consistency).await?;
                let state = group.state.read().expect("range state lock");
                // A split applied during the barrier: the keys may be elsewhere now.
                state.mvcc.check_epoch(epoch)?;
                return state.mvcc.range(&req).map(KvResponse::Range);
            }
            KvRequest::Split { at } => return self.split_range(group, at).await,
            KvRequest::MoveReplica { .. } | KvRequest::Merge | KvRequest::Freeze { .. } => {
                return self.operate(group, request).await
            }
            KvRequest::Put(p) => {
                if p.lease != 0 {
                    self.check_lease_alive(p.lease).await?;
                }
                Command::Put(p)
            }
            KvRequest::Delete(d) => Command::Delete(d),
            KvRequest::Txn(t) => {
                let mut leases: Vec<_> = t.puts().map(|p| p.lease).filter(|l| *l != 0).collect();
                leases.sort_unstable();
                leases.dedup();
                for lease in leases {
                    self.check_lease_alive(lease).await?;
                }
                match &t.fence {
                    None => Command::Txn(t),
                    Some(fence) => {
                        let lock = KeySpan::prefix(fence.prefix.clone());
                        let holder_here = group.bounds().contains_span(&lock);
                        if !holder_here {
                            self.check_fence_holder(fence).await?;
                        }
                        Command::FencedTxn {
                            txn: t,
                            holder_here,
                        }
                    }
                }
            }
            KvRequest::Compact { revision } => Command::Compact { revision },
            KvRequest::Lease(l) => {
                if let Some(result) = self.serve_lease_read(group, &l).await {
                    // Answered from a lease table a split may have changed meanwhile.
                    group.check_epoch(epoch)?;
                    return result;
                }
                match l {
                    LeaseRequest::Grant { id, ttl_ms } => Command::LeaseGrant { id, ttl_ms },
                    LeaseRequest::GrantWithPut { id, ttl_ms, put } => {
                        Command::LeaseGrantPut { id, ttl_ms, put }
                    }
                    LeaseRequest::Revoke { id } => {
                        // The keys are deleted everywhere before the answer (normally; if a
                        // range is unreachable, the lease tick finishes the job).
                        let revoked = self.propose(group, Command::LeaseRevoke { id }).await?;
                        self.finish_revocation(group, vec![id]).await;
                        return Ok(revoked);
                    }
                    other => unreachable!("{other:?} is served without Raft"),
                }
            }
        };
        group.counters.writes.fetch_add(1, Ordering::Relaxed);
        if self.config.split.by_load() {
            if let Some(key) = command.first_key() {
                group.counters.sample.record(key);
            }
        }
        self.propose(group, command).await
    }

    /// Splits `group` (this node must lead it) at `at`, with a fresh range id.
    async fn split_range(&self, group: &Group, at: Vec<u8>) -> Result<KvResponse, ApiError> {
        let range_id = group.id;
        if let Err(f) = group.raft.as_leader() {
            return Err(not_leader(range_id, f.leader_id));
        }
        if !group.bounds().splits_at(&at) {
            return Err(ApiError::InvalidRequest(format!(
                "range {range_id} cannot split at its first key"
            )));
        }
        if group.merging() {
            return Err(ApiError::Unavailable {
                range_id,
                reason: "a merge into this range is under way; split after it".into(),
            });
        }
        let new_range = self.allocate_range_id(range_id).await?;
        self.propose(group, Command::Split { at, new_range }).await
    }

    /// A fresh range id for a range split off `parent`: the revision of a write to the
    /// placement group, which never repeats. The write records which range asked.
    async fn allocate_range_id(&self, parent: RangeId) -> Result<RangeId, ApiError> {
        let record = Command::Put(PutRequest {
            key: b"/placement/allocated-range-ids".to_vec(),
            value: parent.to_string().into_bytes(),
            lease: 0,
            prev_kv: false,
        });
        match self.propose_anywhere(PLACEMENT_GROUP, record).await? {
            KvResponse::Put(put) => Ok(SPLIT_RANGE_ID_BASE + put.header.revision),
            other => Err(ApiError::Internal(format!(
                "unexpected placement reply {other:?}"
            ))),
        }
    }

    /// Proposes `command` to `group` (this node must lead it) and waits for its result.
    async fn propose(&self, group: &Group, command: Command) -> Result<KvResponse, ApiError> {
        let range_id = group.id;
        // Refuse before proposing when not leader: then NotLeader always means "not applied",
        // and the client may retry it elsewhere without risking a second effect.
        if let Err(f) = group.raft.as_leader() {
            return Err(not_leader(range_id, f.leader_id));
        }
        match group.raft.client_write(command).await {
            Ok(resp) => resp.data.0,
            // openraft answers ForwardToLeader only for a write it refused before appending it
            // (no longer leader, a leader transfer under way, or an expired leader lease): the
            // write was not applied, so the client may retry it at the new leader. An appended
            // entry whose fate is unknown comes back as `LogEntryDiscarded` (below).
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(not_leader(range_id, f.leader_id))
            }
            Err(e) => Err(ApiError::Indeterminate {
                range_id,
                reason: e.to_string(),
            }),
        }
    }

    /// Waits until a read at `consistency` may be served from local state.
    async fn read_barrier(&self, group: &Group, consistency: Consistency) -> Result<(), ApiError> {
        let range_id = group.id;
        let lease_or_read_index = LinearizerOption::new(None, true);
        match consistency {
            Consistency::Serializable => Ok(()),
            Consistency::Linearizable => group
                .raft
                .ensure_linearizable(lease_or_read_index)
                .await
                .map(|_| ())
                .map_err(|e| match e.forward_to_leader() {
                    Some(f) => not_leader(range_id, f.leader_id),
                    None => ApiError::Unavailable {
                        range_id,
                        reason: e.to_string(),
                    },
                }),
            Consistency::Follower => {
                if group.raft.is_leader() {
                    return Box::pin(self.read_barrier(group, Consistency::Linearizable)).await;
                }
                let leader =
                    group
                        .raft
                        .current_leader()
                        .await
                        .ok_or_else(|| ApiError::Unavailable {
                            range_id,
                            reason: "no leader known".into(),
                        })?;
                let timeout = Duration::from_millis(self.config.raft.follower_read_timeout_ms);
                let read_log_id = match self
                    .peers
                    .call(leader, range_id, PeerRequest::ReadIndex, timeout)
                    .await
                {
                    Ok(PeerReply::ReadIndex { read_log_id }) => read_log_id,
                    Ok(other) => {
                        return Err(ApiError::Internal(format!("unexpected reply {other:?}")))
                    }
                    Err(e) => {
                        return Err(ApiError::Unavailable {
                            range_id,
                            reason: e.to_string(),
                        })
                    }
                };
                let linearizer = Linearizer::new(leader, ReadLogId::from_log_id(read_log_id), None);
                match linearizer.try_await_ready(&group.raft, Some(timeout)).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(_)) => Err(ApiError::Unavailable {
                        range_id,
                        reason: "follower did not catch up in time".into(),
                    }),
                    Err(e) => Err(ApiError::Unavailable {
                        range_id,
                        reason: e.to_string(),
                    }),
                }
            }
        }
    }

    async fn handle_peer(&self, frame: PeerFrame) -> PeerReply {
        // Not about one range's replica here.
        match frame.request {
            PeerRequest::Heartbeat(beat) => {
                return PeerReply::Heartbeat(self.handle_heartbeat(beat).await)
            }
            PeerRequest::PlacementReport => {
                return match self.placement_report_here() {
                    Some(report) => PeerReply::Placement(report),
                    None => {
                        PeerReply::Error(PeerError::NotLeader(self.leader_hint(PLACEMENT_GROUP)))
                    }
                }
            }
            _ => {}
        }
        let group = match self.group(frame.group) {
            Ok(group) => group,
            // A leader replicating to this node: it is being added as a replica.
            Err(_)
                if matches!(
                    frame.request,
                    PeerRequest::Append(_) | PeerRequest::Snapshot { .. }
                ) =>
            {
                match self.host_replica(frame.group).await {
                    Ok(group) => group,
                    Err(e) => return PeerReply::Error(PeerError::Raft(e)),
                }
            }
            Err(_) => return PeerReply::Error(PeerError::NoSuchGroup(frame.group)),
        };
        let group = &*group;
        let raft_err = |e: &dyn std::fmt::Display| PeerReply::Error(PeerError::Raft(e.to_string()));
        match frame.request {
            PeerRequest::Append(rpc) => group
                .raft
                .append_entries(rpc)
                .await
                .map_or_else(|e| raft_err(&e), PeerReply::Append),
            PeerRequest::Vote(rpc) => group
                .raft
                .vote(rpc)
                .await
                .map_or_else(|e| raft_err(&e), PeerReply::Vote),
            PeerRequest::PreVote(rpc) => group
                .raft
                .pre_vote(rpc)
                .await
                .map_or_else(|e| raft_err(&e), PeerReply::Vote),
            PeerRequest::Snapshot { vote, meta, data } => {
                let snapshot = openraft::alias::SnapshotOf::<crate::raft_types::TypeConfig, _> {
                    meta,
                    snapshot: crate::raft_types::SnapshotData::new(data),
                };
                group
                    .raft
                    .install_full_snapshot(vote, snapshot)
                    .await
                    .map_or_else(|e| raft_err(&e), PeerReply::Snapshot)
            }
            PeerRequest::TransferLeader(req) => group
                .raft
                .handle_transfer_leader(req)
                .await
                .map_or_else(|e| raft_err(&e), PeerReply::TransferLeader),
            PeerRequest::Propose(cmd) => PeerReply::Proposed(self.propose(group, cmd).await),
            PeerRequest::LeaseAlive { id } => match group.raft.as_leader() {
                Err(f) => PeerReply::Error(PeerError::NotLeader(f.leader_id)),
                Ok(_) => match self.lease_alive_here(group, id).await {
                    Ok(alive) => PeerReply::LeaseAlive(alive),
                    Err(e) => raft_err(&e),
                },
            },
            PeerRequest::FenceHolds(fence) => match group.raft.as_leader() {
                Err(f) => PeerReply::Error(PeerError::NotLeader(f.leader_id)),
                Ok(_) => match self.fence_holds_here(group, &fence).await {
                    Ok(holds) => PeerReply::FenceHolds(holds),
                    Err(e) => raft_err(&e),
                },
            },
            PeerRequest::Operate(request) => {
                PeerReply::Operated(self.operate(group, request).await)
            }
            PeerRequest::IsReplica { node, named_at } => {
                self.is_replica_here(group, node, named_at)
            }
            PeerRequest::Heartbeat(_) | PeerRequest::PlacementReport => {
                unreachable!("answered above")
            }
            PeerRequest::ReadIndex => {
                match group
                    .raft
                    .get_read_linearizer(LinearizerOption::new(None, true))
                    .await
                {
                    Ok(l) => PeerReply::ReadIndex {
                        read_log_id: *l.read_log_id().log_id(),
                    },
                    Err(e) => match e.forward_to_leader() {
                        Some(f) => PeerReply::Error(PeerError::NotLeader(f.leader_id)),
                        None => raft_err(&e),
                    },
                }
            }
        }
    }
}

async fn serve_peer_stream(
    inner: Arc<NodeInner>,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let batch = match read_peer_batch(&mut recv).await {
        Ok(batch) => batch,
        Err(e) => {
            let reply = PeerItemReply {
                id: u32::MAX,
                reply: PeerReply::Error(PeerError::BadFrame(e.to_string())),
            };
            let _ = wire::write_frame(&mut send, &reply).await;
            let _ = send.finish();
            return;
        }
    };
    let from = batch.from;
    // A node that does not know our id yet sends anonymously on a connection of its own
    // (`Peers::call_addr`), closed after the answer: not one to adopt.
    if from != ANONYMOUS_PEER {
        inner.peers.adopt(from, &conn);
    }
    // Items run concurrently; each reply goes out as soon as it is ready.
    let mut replies: FuturesUnordered<_> = batch
        .items
        .into_iter()
        .map(|item| {
            let inner = &inner;
            async move {
                let frame = PeerFrame {
                    from,
                    group: item.group,
                    request: item.request,
                };
                PeerItemReply {
                    id: item.id,
                    reply: inner.handle_peer(frame).await,
                }
            }
        })
        .collect();
    while let Some(reply) = replies.next().await {
        if wire::write_frame(&mut send, &reply).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
    wire::take_end(&mut recv);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_finds_the_range_count_its_data_directory_was_created_with() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let any: SocketAddr = "127.0.0.1:1".parse().expect("literal address");
        let mut config = NodeConfig::new(1, any, dir.path().to_path_buf(), dir.path().into());
        assert_eq!(stored_ranges(dir.path()), None, "nothing stored yet");
        config.ranges = 5;
        let members = BTreeMap::from([(1, any)]);
        assert!(check_layout(&config, &members).expect("first start"));
        assert_eq!(stored_ranges(dir.path()), Some(5));
        assert!(!check_layout(&config, &members).expect("a restart with the same count"));
        config.ranges = RANGES_DEFAULT;
        let refused = check_layout(&config, &members).expect_err("another count is refused");
        assert!(
            refused.to_string().contains("ranges=5"),
            "the error names the stored count: {refused}"
        );
    }
}
