//! concord-loadgen: drives a workload against concord, etcd or ZooKeeper and reports
//! throughput and latency.
//!
//! `concord-loadgen run --target concord --config FILE --workload put --clients 64
//! --duration 10s -o json`, or `--target etcd|zookeeper --endpoints 127.0.0.1:2379,...`.
//! Every run is bounded by `--duration` and optionally `--ops`; the coordination workloads
//! (`coordination.rs`) add a bounded drain for expiries and deliveries. Only loopback and
//! test-host addresses (10.0.0.0/8, inside network namespaces a test created) are targets.

mod coordination;
mod kv;
mod report;
mod store;
mod zk;

use std::net::{IpAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use concord_client::api::Consistency;
use concord_client::{parse_duration, ClientConfig};
use serde_json::{json, Map, Value};

use report::Recorder;
use store::Store;

/// How long a connection attempt may take, on both targets (concord's client default).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// ZooKeeper session timeout asked for (the servers clamp it to 2–20 ticks).
const ZK_SESSION_TIMEOUT: Duration = Duration::from_secs(10);

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The command line.
#[derive(Parser)]
#[command(
    name = "concord-loadgen",
    version,
    about = "Load generator for concord and etcd"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one workload.
    Run(Box<RunArgs>),
}

/// The system under test.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Target {
    /// concord, through the client library over QUIC (`--config`).
    Concord,
    /// etcd v3, through the etcd-client crate over gRPC (`--endpoints`).
    Etcd,
    /// ZooKeeper 3.6+ (persistent watches), through the zookeeper-client crate
    /// (`--endpoints`); the mapping is in `zk.rs`.
    Zookeeper,
}

/// The workloads.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Workload {
    /// Puts of `--value-size` bytes to keys picked from `--key-space`.
    Put,
    /// Reads of pre-loaded keys at `--consistency`.
    Get,
    /// Gets (`--read-ratio` of the operations) and puts.
    Mixed,
    /// Read-modify-write of `--key-space` counters by mod revision (compare-and-swap).
    TxnCas,
    /// Writes distinct keys, then reads every acknowledged one back; fails on any loss.
    Verify,
    /// `--leases` leases with one key each, renewed in batches; `--churn` per second let go
    /// and replaced; reports grants per second and expiry lateness.
    LeaseChurn,
    /// `--watchers` watchers of one prefix, one writer at `--rate`; reports delivery latency
    /// and server memory per watcher.
    WatchFanout,
    /// `--clients` contend for `--locks` locks and increment fenced counters; reports
    /// acquisitions per second and fencing violations.
    LockContention,
    /// `--members` members with sessions, `--churn` leave+rejoin per second, `--watchers`
    /// observers; reports delivery latency and missed events.
    Membership,
}

/// How keys are picked from the key space.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Distribution {
    /// Every key equally likely.
    Uniform,
    /// A few hot keys (`--zipf-theta`), scattered over the keyspace.
    Zipfian,
}

/// A run's parameters (scripts depend on the names).
#[derive(clap::Args)]
struct RunArgs {
    /// The system under test.
    #[arg(long, value_enum, default_value_t = Target::Concord)]
    target: Target,
    /// concord: the client config of the cluster.
    #[arg(long, env = "CONCORD_CONFIG", required_if_eq("target", "concord"))]
    config: Option<PathBuf>,
    /// etcd or ZooKeeper: its client endpoints, HOST:PORT,...
    #[arg(
        long,
        value_delimiter = ',',
        required_if_eq_any([("target", "etcd"), ("target", "zookeeper")])
    )]
    endpoints: Vec<String>,
    /// The workload.
    #[arg(long, value_enum)]
    workload: Workload,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Connections the clients share (round robin).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// How long to run (e.g. 10s, 500ms, 1m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Stop after this many operations in total (0 = only the duration bounds the run).
    #[arg(long, default_value_t = 0)]
    ops: u64,
    /// Number of distinct keys (put, get, mixed; counters for txn-cas).
    #[arg(long, default_value_t = 10_000)]
    key_space: u64,
    /// How keys are picked from the key space.
    #[arg(long, value_enum, default_value_t = Distribution::Uniform)]
    distribution: Distribution,
    /// Skew of the zipfian distribution, in (0, 1).
    #[arg(long, default_value_t = 0.99)]
    zipf_theta: f64,
    /// Key size in bytes (keys are padded to it; 0 = their natural length, about 22).
    #[arg(long, default_value_t = 0)]
    key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// mixed: the share of operations that are reads, in [0, 1].
    #[arg(long, default_value_t = 0.9)]
    read_ratio: f64,
    /// Read consistency for get and mixed (etcd: linearizable or serializable).
    #[arg(long, default_value = "linearizable")]
    consistency: Consistency,
    /// Operations per second in all (open loop; absent = closed loop). watch-fanout: writes
    /// per second (default 100).
    #[arg(long)]
    rate: Option<u64>,
    /// lease-churn: active leases to hold.
    #[arg(long, default_value_t = 10_000)]
    leases: u64,
    /// Lease / session TTL in seconds (lease-churn, lock-contention, membership).
    #[arg(long, default_value_t = 10)]
    ttl: u64,
    /// lease-churn, membership: leases (members) let go and replaced per second.
    #[arg(long, default_value_t = 10)]
    churn: u64,
    /// lease-churn: grant each lease, then put its key, in two requests, even on concord
    /// (which otherwise puts an ephemeral key in one: `Client::put_ephemeral`).
    #[arg(long)]
    grant_then_put: bool,
    /// watch-fanout, membership: watchers.
    #[arg(long, default_value_t = 100)]
    watchers: usize,
    /// lock-contention: locks contended for.
    #[arg(long, default_value_t = 4)]
    locks: usize,
    /// membership: registered members.
    #[arg(long, default_value_t = 1_000)]
    members: usize,
    /// Per-request timeout, the same on both targets (concord's client default).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// Output format: text (a table) or json (one object).
    #[arg(short, long, default_value = "text")]
    output: String,
    /// Draw latency percentiles and throughput over time into this PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
}

impl RunArgs {
    /// "workload@target", for the progress bar and the chart.
    fn label(&self) -> String {
        format!("{}@{}", name(self.workload), name(self.target))
    }
}

/// A value's command-line name.
fn name(value: impl ValueEnum) -> String {
    value
        .to_possible_value()
        .expect("a named value")
        .get_name()
        .to_string()
}

/// Keys spread over every range: a fixed alphabet of first bytes, then the key number.
fn key_of(i: u64) -> Vec<u8> {
    const FIRST: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut k = vec![FIRST[(i % FIRST.len() as u64) as usize]];
    k.extend_from_slice(format!("/loadgen/{i:012}").as_bytes());
    k
}

/// A small xorshift generator: reproducible keys without a dependency.
struct Rng(u64);
impl Rng {
    /// A generator whose sequence is unrelated to those of nearby seeds (the seed goes
    /// through splitmix64 first).
    fn seeded(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Refuses any target that is not loopback or a test host (10.0.0.0/8).
fn check_endpoint(endpoint: &str) -> anyhow::Result<()> {
    let host_port = endpoint
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    let addrs: Vec<_> = host_port
        .to_socket_addrs()
        .with_context(|| format!("resolving endpoint {endpoint:?}"))?
        .collect();
    let allowed = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.octets()[0] == 10,
        IpAddr::V6(v6) => v6.is_loopback(),
    };
    if addrs.is_empty() || !addrs.iter().all(|a| allowed(a.ip())) {
        bail!("endpoint {endpoint} is neither loopback nor a test host (10.0.0.0/8); refused");
    }
    Ok(())
}

async fn connect(args: &RunArgs) -> anyhow::Result<Vec<Store>> {
    match args.target {
        Target::Concord => {
            let path = args
                .config
                .as_ref()
                .context("--config is required for concord")?;
            let mut config = ClientConfig::from_file(path).context("reading the client config")?;
            config.request_timeout = args.request_timeout;
            config.connect_timeout = CONNECT_TIMEOUT;
            for e in &config.endpoints {
                check_endpoint(e)?;
            }
            Store::concord(&config, args.connections)
                .await
                .context("connecting to concord")
        }
        Target::Etcd => {
            for e in &args.endpoints {
                check_endpoint(e)?;
            }
            Store::etcd(
                &args.endpoints,
                args.connections,
                args.request_timeout,
                CONNECT_TIMEOUT,
            )
            .await
            .context("connecting to etcd")
        }
        Target::Zookeeper => {
            for e in &args.endpoints {
                check_endpoint(e)?;
            }
            let sessions = zk::ZkStore::connect(
                &args.endpoints,
                args.connections,
                ZK_SESSION_TIMEOUT,
                args.request_timeout,
            )
            .await
            .context("connecting to ZooKeeper")?;
            Ok(sessions.into_iter().map(Store::Zookeeper).collect())
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.clients == 0 || args.connections == 0 || args.key_space == 0 {
        bail!("--clients, --connections and --key-space must be at least 1");
    }
    let reads = matches!(args.workload, Workload::Get | Workload::Mixed);
    if reads && args.target != Target::Concord && args.consistency == Consistency::Follower {
        bail!(
            "{} has no follower reads: use --consistency linearizable or serializable",
            name(args.target)
        );
    }
    let stores = connect(&args).await?;
    let recorder = Recorder::new();
    let extra = match args.workload {
        Workload::Put | Workload::Get | Workload::Mixed => {
            kv::run_kv(&stores, &args, &recorder).await?
        }
        Workload::TxnCas => kv::run_txn_cas(&stores, &args, &recorder).await?,
        Workload::Verify => kv::run_verify(&stores, &args, &recorder).await?,
        Workload::LeaseChurn => coordination::lease_churn(&stores, &args, &recorder).await?,
        Workload::WatchFanout => coordination::watch_fanout(&stores, &args, &recorder).await?,
        Workload::LockContention => {
            coordination::lock_contention(&stores, &args, &recorder).await?
        }
        Workload::Membership => coordination::membership(&stores, &args, &recorder).await?,
    };
    let elapsed = recorder.elapsed();
    let recorded = recorder.take();
    let mut report = Map::new();
    report.extend(figures(json!({
        "workload": name(args.workload),
        "target": name(args.target),
        "clients": args.clients,
        "connections": args.connections,
        "value_size": args.value_size,
        "key_space": args.key_space,
        "distribution": name(args.distribution),
        "consistency": format!("{:?}", args.consistency).to_lowercase(),
        "rate": args.rate,
    })));
    report.extend(report::summary(&recorded, elapsed));
    report.extend(extra);
    if let Some(path) = &args.plot {
        report::plot(path, &args.label(), &recorded.timeline)?;
    }
    if args.output == "json" {
        println!("{}", Value::Object(report.clone()));
    } else {
        report::print_table(&report);
    }
    let violations = violations(&report);
    if !violations.is_empty() {
        bail!("{}: {}", args.label(), violations.join("; "));
    }
    Ok(())
}

/// What a report shows was broken (the run then fails): acknowledged writes lost, counters
/// that do not add up, fenced writes that got through, live leases whose keys vanished.
fn violations(report: &Map<String, Value>) -> Vec<String> {
    let count = |field: &str| report.get(field).and_then(Value::as_u64).unwrap_or(0);
    let mut found = Vec::new();
    for (field, what) in [
        ("lost", "acknowledged writes lost"),
        (
            "fencing_violations",
            "locks whose counter shows a fencing violation",
        ),
        ("lost_live", "live leases whose key vanished"),
    ] {
        if count(field) > 0 {
            found.push(format!("{} {what}", count(field)));
        }
    }
    if report.get("counters_consistent") == Some(&Value::Bool(false)) {
        found.push(format!(
            "counters add up to {}, not to the {} increments acknowledged (+ {} unknown)",
            count("counter_total"),
            count("ops"),
            count("increments_unknown")
        ));
    }
    found
}

/// The fields of a JSON object literal, for a report.
fn figures(object: Value) -> Map<String, Value> {
    match object {
        Value::Object(map) => map,
        other => unreachable!("figures are an object, not {other}"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Run(args) => run(*args).await,
    }
}
