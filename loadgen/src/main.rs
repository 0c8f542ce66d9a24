//! concord-loadgen: drives a workload against a cluster and reports throughput and latency.
//!
//! `concord-loadgen run --target concord --config FILE --workload put --clients 64
//! --duration 10s -o json`. Closed loop: each client issues its next request when the previous
//! one is answered. Every run is bounded by `--duration` and optionally `--ops`; the
//! coordination workloads (`coordination.rs`) add a bounded drain for expiries and
//! deliveries.

mod coordination;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use concord_client::api::{Consistency, KeySpan, RangeRequest};
use concord_client::{Client, ClientConfig};
use hdrhistogram::Histogram;
use serde_json::json;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "concord-loadgen",
    version,
    about = "Load generator for concord"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one workload.
    Run(RunArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Target {
    Concord,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Workload {
    /// Puts of `--value-size` bytes to random keys.
    Put,
    /// Reads of random keys (pre-loaded) at `--consistency`.
    Get,
    /// `--leases` leases with one key each, renewed in batches; `--churn` per second let go
    /// and replaced; reports expiry lateness.
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

#[derive(clap::Args)]
struct RunArgs {
    /// The system under test.
    #[arg(long, value_enum, default_value_t = Target::Concord)]
    target: Target,
    /// Client config of the concord cluster.
    #[arg(long, env = "CONCORD_CONFIG")]
    config: PathBuf,
    /// The workload.
    #[arg(long, value_enum)]
    workload: Workload,
    /// Concurrent clients (closed loop).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// QUIC connections the clients share (round robin).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// How long to run (e.g. 10s, 500ms, 1m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Stop after this many operations in total (0 = only the duration bounds the run).
    #[arg(long, default_value_t = 0)]
    ops: u64,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 10_000)]
    key_space: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Read consistency for `get`.
    #[arg(long, default_value = "linearizable")]
    consistency: Consistency,
    /// lease-churn: active leases to hold.
    #[arg(long, default_value_t = 10_000)]
    leases: u64,
    /// Lease / session TTL in seconds (lease-churn, lock-contention, membership).
    #[arg(long, default_value_t = 10)]
    ttl: u64,
    /// lease-churn, membership: leases (members) let go and replaced per second.
    #[arg(long, default_value_t = 10)]
    churn: u64,
    /// watch-fanout, membership: watchers.
    #[arg(long, default_value_t = 100)]
    watchers: usize,
    /// watch-fanout: writes per second.
    #[arg(long, default_value_t = 100)]
    rate: u64,
    /// lock-contention: locks contended for.
    #[arg(long, default_value_t = 4)]
    locks: usize,
    /// membership: registered members.
    #[arg(long, default_value_t = 1_000)]
    members: usize,
    /// Output format.
    #[arg(short, long, default_value = "text")]
    output: String,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration unit in {s:?} (ms, s, m)")),
    }
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
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `put` and `get`: closed-loop clients on random keys.
async fn run_kv(clients: &[Client], args: &RunArgs) -> anyhow::Result<coordination::Outcome> {
    let value = vec![b'v'; args.value_size];
    if args.workload == Workload::Get {
        // Pre-load the keys that will be read (bounded by the key space).
        let preload = args.key_space.min(10_000);
        let c = clients[0].clone();
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..32u64 {
            let c = c.clone();
            let value = value.clone();
            tasks.spawn(async move {
                let mut i = w;
                while i < preload {
                    c.put(key_of(i), value.clone()).await?;
                    i += 32;
                }
                Ok::<_, concord_client::Error>(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r?.context("pre-loading keys")?;
        }
    }
    let key_space = if args.workload == Workload::Get {
        args.key_space.min(10_000)
    } else {
        args.key_space
    };
    let stop = Arc::new(AtomicBool::new(false));
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..args.clients {
        let client = clients[id % clients.len()].clone();
        let (stop, issued, value) = (stop.clone(), issued.clone(), value.clone());
        let (workload, consistency, ops_max, deadline) = (
            args.workload,
            args.consistency,
            args.ops,
            start + args.duration,
        );
        tasks.spawn(async move {
            let mut hist =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (id as u64 + 1));
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if ops_max != 0 && issued.fetch_add(1, Ordering::Relaxed) >= ops_max {
                    break;
                }
                let key = key_of(rng.next() % key_space);
                let t = Instant::now();
                let result = if workload == Workload::Put {
                    client.put(key, value.clone()).await.map(|_| ())
                } else {
                    client
                        .range(RangeRequest::new(KeySpan::key(key)), consistency)
                        .await
                        .map(|_| ())
                };
                match result {
                    Ok(()) => hist
                        .record(t.elapsed().as_micros().max(1) as u64)
                        .expect("within bounds"),
                    Err(e) => *errors.entry(e.code().to_string()).or_default() += 1,
                }
            }
            (hist, errors)
        });
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        let (h, e) = r?;
        hist.add(h).expect("same bounds");
        for (k, v) in e {
            *errors.entry(k).or_default() += v;
        }
    }
    stop.store(true, Ordering::Relaxed);
    Ok(coordination::Outcome {
        hist,
        errors,
        extra: serde_json::Map::new(),
    })
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let Target::Concord = args.target;
    if args.clients == 0 || args.connections == 0 {
        bail!("--clients and --connections must be at least 1");
    }
    let config = ClientConfig::from_file(&args.config).context("reading the client config")?;
    let mut clients = Vec::new();
    for _ in 0..args.connections {
        clients.push(
            Client::connect(config.clone())
                .await
                .context("connecting")?,
        );
    }
    let started = Instant::now();
    let outcome = match args.workload {
        Workload::Put | Workload::Get => run_kv(&clients, &args).await?,
        Workload::LeaseChurn => coordination::lease_churn(&clients, &args).await?,
        Workload::WatchFanout => coordination::watch_fanout(&clients, &args).await?,
        Workload::LockContention => coordination::lock_contention(&clients, &args).await?,
        Workload::Membership => coordination::membership(&clients, &args).await?,
    };
    let coordination::Outcome {
        hist,
        errors,
        extra,
    } = outcome;
    let elapsed = started.elapsed().as_secs_f64();
    let ops = hist.len();
    let ops_per_sec = ops as f64 / elapsed;
    let workload = args
        .workload
        .to_possible_value()
        .expect("a named workload")
        .get_name()
        .to_string();
    let mut report = json!({
        "workload": workload,
        "target": "concord",
        "clients": args.clients,
        "connections": args.connections,
        "value_size": args.value_size,
        "consistency": format!("{:?}", args.consistency).to_lowercase(),
        "duration_s": elapsed,
        "ops": ops,
        "ops_per_sec": ops_per_sec,
        "p50_us": hist.value_at_quantile(0.50),
        "p90_us": hist.value_at_quantile(0.90),
        "p99_us": hist.value_at_quantile(0.99),
        "p999_us": hist.value_at_quantile(0.999),
        "max_us": hist.max(),
        "errors": errors,
    });
    report
        .as_object_mut()
        .expect("an object")
        .extend(extra.clone());
    if args.output == "json" {
        println!("{report}");
    } else {
        println!(
            "workload {workload} on concord: {} clients, {:.1} s",
            args.clients, elapsed
        );
        println!("  ops        {ops}");
        println!("  ops/s      {ops_per_sec:.0}");
        println!(
            "  p50/p90/p99/p999/max (us)  {} / {} / {} / {} / {}",
            hist.value_at_quantile(0.5),
            hist.value_at_quantile(0.9),
            hist.value_at_quantile(0.99),
            hist.value_at_quantile(0.999),
            hist.max()
        );
        println!("  errors     {errors:?}");
        for (name, value) in &extra {
            println!("  {name:<28} {value}");
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Run(args) => run(args).await,
    }
}
