//! Test harness: an in-process cluster driven like a script (STYLE.md 10).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use concord_client::api::{Consistency, KeySpan, NodeId, RangeId, RangeRequest};
use concord_client::{Client, ClientConfig};
use concord_node::{BoundNode, Node, NodeConfig, RaftSettings, SplitSettings};
use concord_placement::replicas::NodeState;
use tempfile::TempDir;

/// Upper bound of every wait in these tests.
pub const WAIT: Duration = Duration::from_secs(30);

/// Raft settings for tests: quicker elections, frequent snapshots.
/// The value and mod revision of `key`, read at `consistency` (panics on an error).
pub async fn read_at(
    client: &Client,
    key: &[u8],
    consistency: concord_client::api::Consistency,
) -> Option<(Vec<u8>, u64)> {
    let span = concord_client::api::KeySpan::key(key.to_vec());
    let r = client
        .range(concord_client::api::RangeRequest::new(span), consistency)
        .await
        .unwrap_or_else(|e| panic!("{consistency:?} read of {key:?}: {e}"));
    r.kvs.first().map(|kv| (kv.value.clone(), kv.mod_revision))
}

/// Each written key's last acknowledged value and revision.
pub type Acked = BTreeMap<Vec<u8>, (Vec<u8>, u64)>;

/// A writer putting `k/w00`..`k/w39` in turn (at most 2,000 puts) until `stop` is set;
/// panics on a failed put (`during` names what is under way). Returns each key's last
/// acknowledged value and revision.
pub fn spawn_writer(
    client: Client,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    during: &'static str,
) -> tokio::task::JoinHandle<Acked> {
    tokio::spawn(async move {
        let mut acked = BTreeMap::new();
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 2_000 {
            let k = format!("k/w{:02}", n % 40).into_bytes();
            let v = format!("w{n}").into_bytes();
            let r = client
                .put(k.clone(), v.clone())
                .await
                .unwrap_or_else(|e| panic!("put {k:?} during {during}: {e}"));
            acked.insert(k, (v, r.header.revision));
            n += 1;
        }
        acked
    })
}

/// Puts `keys` in order, the i-th with value `v{i}` and every third (from the first) under
/// `lease`; returns each key's value and revision as acknowledged.
pub async fn put_keys(client: &Client, keys: impl Iterator<Item = Vec<u8>>, lease: i64) -> Acked {
    let mut acked = BTreeMap::new();
    for (i, key) in keys.enumerate() {
        let value = format!("v{i}").into_bytes();
        let put = concord_client::api::PutRequest {
            key: key.clone(),
            value: value.clone(),
            lease: if i % 3 == 0 { lease } else { 0 },
            prev_kv: false,
        };
        let r = client.put_with(put).await.expect("put");
        acked.insert(key, (value, r.header.revision));
    }
    acked
}

/// Splits past 40 keys, looked at every 200 ms; never by bytes or load.
pub fn split_past_40_keys(config: &mut NodeConfig) {
    config.split = SplitSettings {
        keys_max: 40,
        bytes_max: 0,
        writes_per_sec_max: 0,
        check_interval_ms: 200,
        ..SplitSettings::default()
    };
}

pub fn test_raft() -> RaftSettings {
    RaftSettings {
        heartbeat_interval_ms: 100,
        election_timeout_min_ms: 600,
        election_timeout_max_ms: 1_200,
        snapshot_logs_since_last: 200,
        logs_kept_after_snapshot: 0,
        follower_read_timeout_ms: 3_000,
        leader_balance_interval_ms: 200,
    }
}

/// A cluster of in-process nodes on 127.0.0.1 with OS-chosen ports.
pub struct Cluster {
    pub dir: TempDir,
    pub members: BTreeMap<NodeId, SocketAddr>,
    pub ranges: usize,
    /// Applied to every node's config (also at restart).
    tune: fn(&mut NodeConfig),
    nodes: BTreeMap<NodeId, Option<Node>>,
    /// Nodes that joined the running cluster (`--join`) rather than bootstrapping it.
    joined: std::collections::BTreeSet<NodeId>,
}

impl Cluster {
    fn config(
        dir: &TempDir,
        id: NodeId,
        listen: SocketAddr,
        ranges: usize,
        tune: fn(&mut NodeConfig),
    ) -> NodeConfig {
        let mut c = NodeConfig::new(
            id,
            listen,
            dir.path().join(format!("node-{id}")),
            dir.path().join("certs"),
        );
        c.ranges = ranges;
        c.raft = test_raft();
        tune(&mut c);
        c
    }

    /// `start N nodes with R ranges`, and wait until every range has a leader.
    pub async fn start(n: u64, ranges: usize) -> Self {
        Self::start_tuned(n, ranges, |_| {}).await
    }

    /// `start N nodes with R ranges`, each node's config changed by `tune`.
    pub async fn start_tuned(n: u64, ranges: usize, tune: fn(&mut NodeConfig)) -> Self {
        let dir = TempDir::new().expect("tempdir");
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let bound: Vec<BoundNode> = (1..=n)
            .map(|id| BoundNode::bind(Self::config(&dir, id, any, ranges, tune)).expect("bind"))
            .collect();
        let members: BTreeMap<NodeId, SocketAddr> = bound
            .iter()
            .zip(1..)
            .map(|(b, id)| (id, b.local_addr()))
            .collect();
        let mut nodes = BTreeMap::new();
        for (b, id) in bound.into_iter().zip(1..) {
            nodes.insert(
                id,
                Some(b.start(members.clone()).await.expect("start node")),
            );
        }
        let cluster = Self {
            dir,
            members,
            ranges,
            tune,
            nodes,
            joined: Default::default(),
        };
        cluster.wait_ready().await;
        cluster
    }

    pub fn node(&self, id: NodeId) -> &Node {
        self.nodes[&id].as_ref().expect("node is running")
    }

    pub fn running(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values().flatten()
    }

    /// Every running node knows a leader of every range, and leader balancing has settled:
    /// no running node leads two more ranges than another (so tests start from a steady state).
    pub async fn wait_ready(&self) {
        for n in self.running() {
            n.wait_for_leaders(WAIT).await.expect("leaders elected");
        }
        self.wait_balanced().await;
    }

    /// How many ranges each running node leads now.
    pub fn leader_counts(&self) -> BTreeMap<NodeId, usize> {
        self.running()
            .map(|n| (n.id(), n.led_ranges().len()))
            .collect()
    }

    /// Waits until every range has a leader among the running nodes and their leader counts
    /// are at most one apart.
    pub async fn wait_balanced(&self) {
        eventually("leaders balanced", || async {
            let counts = self.leader_counts();
            let led: usize = counts.values().sum();
            let ranges = self
                .running()
                .next()
                .map_or(self.ranges, |n| n.range_table().ranges().len());
            let max = counts.values().max().copied().unwrap_or(0);
            let min = counts.values().min().copied().unwrap_or(0);
            if led == ranges && max - min <= 1 {
                Ok(())
            } else {
                Err(format!("ranges led per node: {counts:?}"))
            }
        })
        .await;
    }

    /// The address a joining node is given: a running node's.
    fn join_addr(&self) -> SocketAddr {
        let any = self.running().next().expect("a node is running");
        self.members[&any.id()]
    }

    /// `stop node ID` (graceful: its connections close).
    pub async fn stop(&mut self, id: NodeId) {
        let node = self
            .nodes
            .get_mut(&id)
            .and_then(Option::take)
            .expect("node is running");
        node.shutdown().await;
    }

    /// `restart node ID` on its old address and data.
    pub async fn restart(&mut self, id: NodeId) {
        let mut config = Self::config(&self.dir, id, self.members[&id], self.ranges, self.tune);
        let members = if self.joined.contains(&id) {
            config.placement.join = Some(self.join_addr());
            BTreeMap::from([(id, self.members[&id])])
        } else {
            self.members.clone()
        };
        let node = BoundNode::bind(config)
            .expect("rebind")
            .start(members)
            .await
            .expect("restart");
        self.nodes.insert(id, Some(node));
    }

    /// `node ID joins the cluster` through node 1 (as `concord node --join`).
    pub async fn join(&mut self, id: NodeId) {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut config = Self::config(&self.dir, id, any, self.ranges, self.tune);
        config.placement.join = Some(self.join_addr());
        let bound = BoundNode::bind(config).expect("bind");
        let addr = bound.local_addr();
        let node = bound
            .start(BTreeMap::from([(id, addr)]))
            .await
            .expect("join");
        self.members.insert(id, addr);
        self.joined.insert(id);
        self.nodes.insert(id, Some(node));
    }

    /// The voters of every range, as node `via` (running) knows the table.
    pub fn voters(&self, via: NodeId) -> BTreeMap<RangeId, Vec<NodeId>> {
        self.node(via)
            .range_table()
            .ranges()
            .iter()
            .map(|d| (d.id, d.replicas.clone()))
            .collect()
    }

    /// The ranges each running node holds a replica of.
    pub fn hosted(&self) -> BTreeMap<NodeId, Vec<RangeId>> {
        self.running()
            .map(|n| (n.id(), n.hosted_ranges()))
            .collect()
    }

    /// The node leading `range` now, as the running nodes see it.
    pub fn leader_of(&self, range: RangeId) -> Option<NodeId> {
        self.running()
            .find(|n| n.led_ranges().contains(&range))
            .map(|n| n.id())
    }

    pub fn client_config(&self) -> ClientConfig {
        ClientConfig::new(
            self.members.values().map(|a| a.to_string()).collect(),
            self.dir.path().join("certs").join("ca.pem"),
        )
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.client_config())
            .await
            .expect("client connects")
    }

    pub async fn shutdown(mut self) {
        let ids: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.stop(id).await;
        }
    }
}

/// Polls `check` until it returns `Ok`, failing the test with its last message after `WAIT`.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(()) => {
                // Shown with a failing test's output: how close each wait came to `WAIT`.
                eprintln!("{what}: reached after {:?}", start.elapsed());
                return;
            }
            Err(e) if start.elapsed() > WAIT => {
                // Printed, then unwound without the panic hook: a backtrace of the poller
                // says nothing, and CI shows a failure's last lines, where this stays.
                let failure = format!("{what}: not reached within {WAIT:?}: {e}");
                eprintln!("{failure}");
                std::panic::resume_unwind(Box::new(failure));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Each range's revision on every node that answers `status` (an unreachable node is an
/// error, for `eventually` to retry).
pub async fn revisions_per_range(client: &Client) -> Result<BTreeMap<RangeId, Vec<u64>>, String> {
    let mut revisions: BTreeMap<RangeId, Vec<u64>> = BTreeMap::new();
    for (addr, s) in client.status().await {
        let s = s.map_err(|e| format!("{addr}: {e}"))?;
        for r in s.ranges {
            revisions.entry(r.id).or_default().push(r.revision);
        }
    }
    Ok(revisions)
}

/// A key inside `range` of the bootstrap layout, unique per `i`.
pub fn key_in(client: &Client, range: RangeId, i: usize) -> Vec<u8> {
    let desc = client
        .routes()
        .ranges
        .into_iter()
        .find(|r| r.id == range)
        .expect("range exists");
    let mut key = if desc.start.is_empty() {
        b"!".to_vec()
    } else {
        desc.start.clone()
    };
    key.extend_from_slice(format!("/key-{i:05}").as_bytes());
    assert!(desc.contains(&key));
    key
}

/// Starts node `id`, joining the cluster, and waits until it is registered (its heartbeat
/// reached the placement leader).
pub async fn join_registered(cluster: &mut Cluster, client: &Client, id: NodeId) {
    cluster.join(id).await;
    eventually(&format!("node {id} registered"), || async {
        let report = client.placement().await.map_err(|e| e.to_string())?;
        match report.nodes.iter().find(|n| n.id == id) {
            Some(n) if n.state == NodeState::Up => Ok(()),
            other => Err(format!("node {id}: {other:?}")),
        }
    })
    .await;
}

/// Writes `count` keys spread over the keyspace; returns them with their values.
pub async fn write_keys(client: &Client, count: usize) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut acked = BTreeMap::new();
    for i in 0..count {
        // First bytes from '0' to 'z' reach every bootstrap range.
        let key = format!("{}/key-{i:04}", (b'0' + (i % 75) as u8) as char).into_bytes();
        let value = format!("v{i}").into_bytes();
        client
            .put(key.clone(), value.clone())
            .await
            .unwrap_or_else(|e| panic!("put {key:?}: {e}"));
        acked.insert(key, value);
    }
    acked
}

/// Every acknowledged write reads back, linearizably.
pub async fn check_keys(client: &Client, acked: &BTreeMap<Vec<u8>, Vec<u8>>) {
    for (key, value) in acked {
        let r = client
            .range(
                RangeRequest::new(KeySpan::key(key.clone())),
                Consistency::Linearizable,
            )
            .await
            .unwrap_or_else(|e| panic!("read {key:?}: {e}"));
        assert_eq!(
            r.kvs.first().map(|kv| &kv.value),
            Some(value),
            "acknowledged write of {key:?} lost"
        );
    }
}

/// Waits until range `range`'s leader names no learner.
pub async fn wait_no_learners(cluster: &Cluster, range: RangeId, what: &str) {
    eventually(what, || async {
        let leader = cluster.leader_of(range).ok_or("no leader")?;
        match cluster.node(leader).learners(range) {
            Some(learners) if learners.is_empty() => Ok(()),
            other => Err(format!("leader {leader}: learners {other:?}")),
        }
    })
    .await;
}
