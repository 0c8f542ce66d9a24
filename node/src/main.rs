//! The `concord` server binary: `concord dev` (a local cluster) and `concord node` (one node).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use concord_node::dev::{self, DevOptions};
use concord_node::{
    stored_ranges, BoundNode, CompactionSettings, NodeConfig, SplitSettings, RANGES_DEFAULT,
};
use concord_transport::api::RequestLimits;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "concord",
    version,
    about = "concord: a strongly consistent, sharded coordination store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct LimitArgs {
    /// Largest key, in bytes.
    #[arg(long, default_value_t = 4096)]
    key_bytes_max: usize,
    /// Largest value, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    value_bytes_max: usize,
    /// Largest request frame, in bytes.
    #[arg(long, default_value_t = 2 << 20)]
    request_bytes_max: usize,
    /// Most operations in one txn.
    #[arg(long, default_value_t = 128)]
    txn_ops_max: usize,
    /// Most watches on one watch channel (one client's watches of one range).
    #[arg(long, default_value_t = 100_000)]
    watches_per_channel_max: usize,
}

impl LimitArgs {
    fn to_limits(&self) -> RequestLimits {
        RequestLimits {
            key_bytes_max: self.key_bytes_max,
            value_bytes_max: self.value_bytes_max,
            request_bytes_max: self.request_bytes_max,
            txn_ops_max: self.txn_ops_max,
            watches_per_channel_max: self.watches_per_channel_max,
        }
    }
}

// Parsed once at start: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run a local cluster in this process (all nodes on 127.0.0.1) until Ctrl-C.
    Dev {
        /// Number of nodes (first start only).
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Number of ranges, each its own Raft group (first start only); splits make more.
        #[arg(long, default_value_t = RANGES_DEFAULT)]
        ranges: usize,
        /// Cluster directory; a second run on it resumes with all data.
        #[arg(long, default_value = "concord-dev")]
        data_dir: PathBuf,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Run one node of a multi-process cluster.
    Node {
        /// This node's id (one of --peers).
        #[arg(long)]
        id: u64,
        /// Address to listen on (UDP).
        #[arg(long)]
        listen: SocketAddr,
        /// Every member of a new cluster, this node included:
        /// `1=127.0.0.1:7001,2=127.0.0.1:7002,...` (not with --join).
        #[arg(long, value_delimiter = ',', required_unless_present = "join")]
        peers: Vec<String>,
        /// Join a running cluster through the node at this address instead of bootstrapping
        /// one: this node registers with the placement service and receives replicas (its id
        /// must be new, its --cert-dir the cluster's).
        #[arg(long, conflicts_with = "peers")]
        join: Option<SocketAddr>,
        /// A node silent for this many seconds is down: the placement service re-creates its
        /// replicas on other nodes.
        #[arg(long, default_value_t = 30)]
        down_after: u64,
        /// Neighbouring ranges made by splits merge once both have been small and cold (under
        /// a quarter of every split threshold together) for this many seconds; 0: never.
        #[arg(long, default_value_t = 300)]
        merge_after: u64,
        /// This node's zone label: the replicas of a range spread across zones.
        #[arg(long)]
        zone: Option<String>,
        /// The memory this node offers the cluster, in GiB (default: the machine's total):
        /// the placement service gives nodes replicas in proportion to it.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        memory_gib: Option<u64>,
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Certificate directory shared by the cluster (the CA is created there if missing).
        #[arg(long)]
        cert_dir: PathBuf,
        /// Number of bootstrap ranges, the same on every node of the cluster (a node joining with
        /// --join included); splits make more [default: 3 on a new data directory, the
        /// directory's own count on a restart].
        #[arg(long)]
        ranges: Option<usize>,
        /// Also write a concordctl.toml for this cluster to this path.
        #[arg(long)]
        client_config: Option<PathBuf>,
        /// How often to look for range leaders to hand over so that every node leads about as
        /// many ranges as the others, in milliseconds; 0 turns leader balancing off.
        #[arg(long, default_value_t = 1_000)]
        leader_balance_ms: u64,
        /// Split a range holding more keys than this (0: never by key count).
        #[arg(long, default_value_t = SplitSettings::default().keys_max)]
        split_keys: u64,
        /// Split a range whose keys and values take more bytes than this (0: never by size).
        #[arg(long, default_value_t = SplitSettings::default().bytes_max)]
        split_bytes: u64,
        /// Split a range taking more writes per second than this, sustained (0: never by load).
        #[arg(long, default_value_t = SplitSettings::default().writes_per_sec_max)]
        split_writes: u64,
        /// Revisions of history each range keeps: its leader compacts older ones away once
        /// the history is a tenth longer (0: compact only when asked, `concordctl compact`).
        #[arg(long, default_value_t = CompactionSettings::default().history_revisions)]
        history_revisions: u64,
        #[command(flatten)]
        limits: LimitArgs,
    },
}

fn parse_peers(peers: &[String]) -> anyhow::Result<BTreeMap<u64, SocketAddr>> {
    peers
        .iter()
        .map(|p| {
            let (id, addr) = p
                .split_once('=')
                .with_context(|| format!("peer {p:?} is not ID=ADDR"))?;
            Ok((
                id.parse().with_context(|| format!("peer id {id:?}"))?,
                addr.parse()
                    .with_context(|| format!("peer address {addr:?}"))?,
            ))
        })
        .collect()
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CONCORD_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colours for a terminal only: logs sent to a file stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // FAILPOINTS configures the fail points of a build with them (the fault tests'); a build
    // without them refuses it rather than silently injecting nothing.
    if std::env::var_os("FAILPOINTS").is_some() && !cfg!(feature = "failpoints") {
        anyhow::bail!(
            "FAILPOINTS is set but this concord was built without the failpoints feature"
        );
    }
    let _fail_points = fail::FailScenario::setup();
    match Cli::parse().command {
        Command::Dev {
            nodes,
            ranges,
            data_dir,
            limits,
        } => {
            dev::run(
                DevOptions {
                    nodes,
                    ranges,
                    data_dir,
                    limits: limits.to_limits(),
                },
                shutdown_signal(),
            )
            .await?;
        }
        Command::Node {
            id,
            listen,
            peers,
            join,
            down_after,
            merge_after,
            zone,
            memory_gib,
            data_dir,
            cert_dir,
            ranges,
            client_config,
            leader_balance_ms,
            split_keys,
            split_bytes,
            split_writes,
            history_revisions,
            limits,
        } => {
            let members = match join {
                Some(_) => BTreeMap::from([(id, listen)]),
                None => parse_peers(&peers)?,
            };
            let mut config = NodeConfig::new(id, listen, data_dir, cert_dir.clone());
            config.ranges = ranges
                .or_else(|| stored_ranges(&config.data_dir))
                .unwrap_or(RANGES_DEFAULT);
            config.limits = limits.to_limits();
            config.raft.leader_balance_interval_ms = leader_balance_ms;
            config.split.keys_max = split_keys;
            config.split.bytes_max = split_bytes;
            config.split.writes_per_sec_max = split_writes;
            config.compaction.history_revisions = history_revisions;
            config.placement.join = join;
            config.placement.zone = zone;
            config.placement.memory_bytes = memory_gib.map(|g| g.saturating_mul(1 << 30));
            config.placement.down_after_ms = down_after.saturating_mul(1000);
            config.placement.merge_after_ms = merge_after.saturating_mul(1000);
            let node = BoundNode::bind(config)?.start(members.clone()).await?;
            if let Some(path) = client_config {
                dev::write_client_config(
                    &path,
                    &members.values().copied().collect::<Vec<_>>(),
                    &cert_dir,
                )?;
            }
            eprintln!("concord node {id} serving on {}", node.local_addr());
            shutdown_signal().await;
            node.shutdown().await;
        }
    }
    Ok(())
}
