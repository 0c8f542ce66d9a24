//! `concord-faults run`: a fault campaign against a cluster of `concord node` processes on
//! test hosts (network namespaces this process creates; run as root), with the register
//! workload and the linearizability checker. Prints the seed first; on a violation exits
//! with 1 and leaves the history, the faults, the seed and the node logs in `--out`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use concord_client::api::Consistency;
use concord_client::parse_duration;
use concord_faults::campaign::{self, Config};
use concord_faults::nemesis::Kind;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "concord-faults", about = "concord under faults")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a campaign.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Seeds the faults and the clients (default: from the clock; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// How long faults are injected (`90s`, `30m`).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Kinds of fault, comma-separated, or `all`: kill, kill-all, pause, partition,
    /// isolate-leader, bridge, lossy, reorder, crash-point and disk-full (both need a concord built
    /// with the failpoints feature), clock (needs libfaketime), split, merge and move (a
    /// range split, merged or a replica moved under traffic, half the time with a node
    /// crashing at the operation's fail points; `move` needs more than 3 nodes), down (a node
    /// killed past `--down-after`: its replicas are re-created elsewhere).
    #[arg(long, default_value = "all")]
    nemesis: String,
    /// Nodes.
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Ranges.
    #[arg(long, default_value_t = 8)]
    ranges: u32,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: u32,
    /// Lock clients (fenced increments of a counter under one lock).
    #[arg(long, default_value_t = 3)]
    lock_clients: u32,
    /// Lease clients (leases with a key each, renewed, let go or revoked).
    #[arg(long, default_value_t = 2)]
    lease_clients: u32,
    /// Registers (keys) the clients share.
    #[arg(long, default_value_t = 32)]
    keys: u64,
    /// The consistency of the clients' reads: linearizable, or serializable / follower to
    /// see what the checker reports when reads may be stale (serializable should fail under
    /// partitions).
    #[arg(long, default_value = "linearizable", value_parser = parse_consistency)]
    reads: Consistency,
    /// The clients' request timeout; an operation without an answer by then is unknown.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// The nodes' `--down-after`: how long a silent node waits before the placement service
    /// re-creates its replicas elsewhere (the `down` nemesis holds a node killed for longer).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    down_after: Duration,
    /// One more argument for every `concord node` (repeat it: `--node-arg=--split-writes=40
    /// --node-arg=--merge-after=5` has ranges split by load and merge under the faults, where
    /// a node leads more than its share of the writes: from `--ranges 1`, or where the faults
    /// leave leaderships uneven; even ranges led evenly do not split).
    #[arg(long = "node-arg", allow_hyphen_values = true)]
    node_args: Vec<String>,
    /// Where the run's files go (default: target/faults/SEED).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The `concord` binary (default: next to this one).
    #[arg(long)]
    concord: Option<PathBuf>,
}

fn parse_consistency(s: &str) -> Result<Consistency, String> {
    match s {
        "linearizable" => Ok(Consistency::Linearizable),
        "serializable" => Ok(Consistency::Serializable),
        "follower" => Ok(Consistency::Follower),
        _ => Err(format!("{s:?}: linearizable, serializable or follower")),
    }
}

fn nemeses(list: &str) -> anyhow::Result<Vec<Kind>> {
    if list == "all" {
        return Ok(Kind::ALL.to_vec());
    }
    list.split(',')
        .map(|k| k.trim().parse::<Kind>().map_err(anyhow::Error::msg))
        .collect()
}

fn main() -> anyhow::Result<()> {
    let Command::Run(args) = Cli::parse().command;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    println!("seed {seed}");
    if !concord_faults::netns::available() {
        bail!("cannot create network namespaces: run as root, with iproute2 installed");
    }
    let concord = match args.concord {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("concord"),
    };
    let config = Config {
        seed,
        duration: args.duration,
        nemeses: nemeses(&args.nemesis)?,
        nodes: args.nodes,
        ranges: args.ranges,
        clients: args.clients,
        lock_clients: args.lock_clients,
        lease_clients: args.lease_clients,
        keys: args.keys,
        reads: args.reads,
        request_timeout: args.request_timeout,
        down_after: args.down_after,
        node_args: args.node_args,
        concord,
        out: args
            .out
            .unwrap_or_else(|| PathBuf::from(format!("target/faults/{seed}"))),
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let outcome = runtime
        .block_on(campaign::run(&config))
        .context("campaign")?;
    let report = &outcome.linearizability;
    println!(
        "{} ops ({} of unknown outcome) on {} keys, {} faults: {} not linearizable, {} inconclusive",
        outcome.ops,
        outcome.unknown,
        report.keys,
        outcome.faults,
        report.violations.len(),
        report.inconclusive.len()
    );
    println!(
        "watch: {} responses, resumed from revision {}, {} violations; locks: {} fenced \
         writes, {} violations; leases: {} granted, {} violations; expiry lateness p50 {} ms, \
         p99 {} ms, max {} ms",
        outcome.watch_responses,
        outcome.watch_resumed_from,
        outcome.watch.len(),
        outcome.lock_attempts,
        outcome.locks.len(),
        outcome.leases_granted,
        outcome.leases.len(),
        outcome.lease_lateness.p50_ms,
        outcome.lease_lateness.p99_ms,
        outcome.lease_lateness.max_ms
    );
    println!("files: {}", config.out.display());
    if !outcome.passed() {
        eprintln!(
            "VIOLATION (seed {seed}): keys {:?} not linearizable, {:?} inconclusive; watch {:?}; \
             locks {:?}; leases {:?}; replay with --seed {seed}",
            report.violations, report.inconclusive, outcome.watch, outcome.locks, outcome.leases
        );
        std::process::exit(1);
    }
    Ok(())
}
