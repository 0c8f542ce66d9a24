//! A campaign: a cluster on test hosts, the register workload, the faults of a seeded
//! schedule one after the other (each held, then healed), then every fault healed, a final
//! read of every register, and the checkers. Everything needed to replay or study a run goes
//! to its folder: the seed and settings, the schedule, the faults as applied (with their
//! times on the history's clock), the history, the verdict and the node logs.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use concord_client::api::{Consistency, KeySpan};
use concord_client::watch_api::{EventKind, WatchRequest};
use concord_client::Client;
use serde_json::json;
use tokio::task::JoinSet;

use crate::cluster::Cluster;
use crate::linearizability::{self, Report};
use crate::nemesis::{schedule, Fault, Kind, Rng, Step, DISK_FULL_POINT};
use crate::watches::{self, Seen, SeenEvent};
use crate::workload::{self, History, Mix};
use crate::{leases, locks, reshape};

/// Longest a cluster may take to be ready (at start and after the faults are healed).
const READY_MAX: Duration = Duration::from_secs(60);

/// Steps of a linearizability search per key before it is called inconclusive.
const SEARCH_STEPS_MAX: u64 = 50_000_000;

/// The most steps a schedule may have (the duration ends a campaign first).
const STEPS_MAX: usize = 10_000;

/// Longest the watcher may take to catch up with the final reads.
const WATCH_CATCH_UP_MAX: Duration = Duration::from_secs(30);

/// Longest the lease keys of dead leases may take to go, past a TTL, once all is healed.
const LEASE_DRAIN_MAX: Duration = Duration::from_secs(20);

/// Longest a final read may keep failing once the faults are healed.
const FINAL_READ_MAX: Duration = Duration::from_secs(30);

/// The id the final reads are recorded under.
const FINAL_READER: u32 = u32::MAX;

/// What a campaign does.
#[derive(Debug, Clone)]
pub struct Config {
    /// Seeds the schedule and the clients.
    pub seed: u64,
    /// How long faults are injected.
    pub duration: Duration,
    /// The kinds of fault.
    pub nemeses: Vec<Kind>,
    /// Nodes (3 or 5).
    pub nodes: usize,
    /// Ranges of the cluster.
    pub ranges: u32,
    /// Concurrent clients of the register workload.
    pub clients: u32,
    /// Lock clients incrementing a counter under one lock with fenced writes.
    pub lock_clients: u32,
    /// Lease clients granting, renewing, letting go of and revoking leases with a key each.
    pub lease_clients: u32,
    /// Registers.
    pub keys: u64,
    /// The consistency of the clients' reads (the final reads are linearizable).
    pub reads: Consistency,
    /// The client's request timeout (an operation without an answer by then is unknown).
    pub request_timeout: Duration,
    /// How long the nodes' placement service waits before it calls a silent node down and
    /// re-creates its replicas elsewhere (`concord node --down-after`; the `down` nemesis
    /// holds a node killed for longer).
    pub down_after: Duration,
    /// More arguments for every `concord node` (split and merge settings, say).
    pub node_args: Vec<String>,
    /// The `concord` binary.
    pub concord: PathBuf,
    /// Where the run's files go.
    pub out: PathBuf,
}

/// What a campaign found.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Operations recorded.
    pub ops: usize,
    /// Operations with an unknown outcome.
    pub unknown: usize,
    /// Faults applied.
    pub faults: usize,
    /// The linearizability check (it covers lost acknowledged writes: the final reads must
    /// see them).
    pub linearizability: Report,
    /// Watch responses received.
    pub watch_responses: usize,
    /// The revision the second watch was resumed from.
    pub watch_resumed_from: u64,
    /// The watch guarantees broken (by either watch).
    pub watch: Vec<watches::Violation>,
    /// Fenced writes attempted by the lock clients (each after acquiring the lock).
    pub lock_attempts: usize,
    /// The mutual-exclusion properties broken.
    pub locks: Vec<locks::Violation>,
    /// Leases granted by the lease clients.
    pub leases_granted: usize,
    /// The lease properties broken.
    pub leases: Vec<leases::Violation>,
    /// How late the let-go leases' keys were seen deleted.
    pub lease_lateness: leases::Lateness,
    /// The ranges of the placement table at the end (ids above the bootstrap ranges' were
    /// made by splits; empty if the table could not be read).
    pub final_ranges: Vec<u64>,
}

impl Outcome {
    /// True when no checker found a violation.
    pub fn passed(&self) -> bool {
        self.linearizability.passed()
            && self.watch.is_empty()
            && self.locks.is_empty()
            && self.leases.is_empty()
    }
}

/// What the watcher of every key received, and how it ended.
#[derive(Default)]
struct WatchLog {
    seen: Vec<Seen>,
    ended: Option<String>,
    /// Lease keys → when their deletion was first seen (history clock).
    lease_deletions: HashMap<String, u64>,
    /// Registers → the revision and value of their latest event so far.
    latest: HashMap<u64, (u64, Option<u64>)>,
}

impl WatchLog {
    /// Records a response (and each register's latest event).
    fn push(&mut self, seen: Seen) {
        for e in &seen.events {
            let latest = self
                .latest
                .entry(e.key)
                .or_insert((e.mod_revision, e.value));
            if e.mod_revision >= latest.0 {
                *latest = (e.mod_revision, e.value);
            }
        }
        self.seen.push(seen);
    }

    /// The value of the latest event of register `k`.
    fn last_value(&self, k: u64) -> Option<Option<u64>> {
        self.latest.get(&k).map(|&(_, value)| value)
    }
}

/// Opens a watch of every key from revision `from` (0: now), with progress notifications,
/// and records what it receives.
async fn watch_everything(
    client: &Client,
    from: u64,
    log: Arc<Mutex<WatchLog>>,
    history: Arc<History>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut request = WatchRequest::new(KeySpan::prefix(Vec::new()));
    request.start_revision = from;
    request.progress_notify = true;
    let mut watcher = client.watch(request).await.context("opening the watch")?;
    Ok(tokio::spawn(async move {
        while let Some(response) = watcher.next().await {
            let mut log = log.lock().expect("watch log lock");
            match response {
                Ok(r) => {
                    let now_ns = history.now_ns();
                    for e in &r.events {
                        if e.kind == EventKind::Delete && leases::is_lease_key(&e.kv.key) {
                            let key = String::from_utf8_lossy(&e.kv.key).into_owned();
                            log.lease_deletions.entry(key).or_insert(now_ns);
                        }
                    }
                    let events = r
                        .events
                        .iter()
                        .filter_map(|e| {
                            Some(SeenEvent {
                                key: workload::register_of(&e.kv.key)?,
                                mod_revision: e.kv.mod_revision,
                                value: workload::value_of(&e.kv.value),
                            })
                        })
                        .collect();
                    log.push(Seen {
                        range: r.range_id,
                        revision: r.revision,
                        progress: r.progress,
                        events,
                    });
                }
                Err(e) => {
                    log.ended = Some(e.to_string());
                    return;
                }
            }
        }
        log.lock().expect("watch log lock").ended = Some("the watch ended".into());
    }))
}

/// Mixed into the seed for [`resume_revision`]'s pick.
const RESUME_STREAM: u64 = 0x5EED_7E5E;

/// The revision a second watch resumes from: one of the revisions of the registers' events
/// the first watch saw, picked by `seed` (0 if it saw none: then it starts now).
fn resume_revision(first: &WatchLog, seed: u64) -> u64 {
    let revisions: BTreeSet<u64> = first
        .seen
        .iter()
        .flat_map(|s| s.events.iter().map(|e| e.mod_revision))
        .collect();
    // Its own stream of the seed's numbers (the schedule draws from the seed itself).
    let pick = Rng::new(seed ^ RESUME_STREAM).between(0, revisions.len() as u64);
    revisions.into_iter().nth(pick as usize).unwrap_or(0)
}

/// Waits until `done` holds of the watch log, or the watch ended, or `limit` passed.
async fn watch_log_until(log: &Mutex<WatchLog>, limit: Duration, done: impl Fn(&WatchLog) -> bool) {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        {
            let log = log.lock().expect("watch log lock");
            if log.ended.is_some() || done(&log) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs a campaign.
pub async fn run(config: &Config) -> anyhow::Result<Outcome> {
    fs::create_dir_all(&config.out)?;
    // A cluster left by an earlier run (of the same seed, say) would hold values this run's
    // clients write again: every run starts from empty nodes.
    let cluster_dir = config.out.join("cluster");
    if cluster_dir.exists() {
        fs::remove_dir_all(&cluster_dir)
            .with_context(|| format!("removing {}", cluster_dir.display()))?;
    }
    let down_after_ms = config.down_after.as_millis() as u64;
    let steps = schedule(
        config.seed,
        &config.nemeses,
        config.nodes,
        down_after_ms,
        STEPS_MAX,
    );
    let nemeses: Vec<String> = config.nemeses.iter().map(|k| k.to_string()).collect();
    fs::write(
        config.out.join("config.json"),
        serde_json::to_string_pretty(&json!({
            "seed": config.seed,
            "duration_s": config.duration.as_secs_f64(),
            "nemeses": nemeses,
            "nodes": config.nodes,
            "ranges": config.ranges,
            "clients": config.clients,
            "lock_clients": config.lock_clients,
            "lease_clients": config.lease_clients,
            "keys": config.keys,
            "reads": format!("{:?}", config.reads).to_lowercase(),
            "request_timeout_ms": config.request_timeout.as_millis() as u64,
            "down_after_ms": down_after_ms,
            "node_args": config.node_args,
        }))?,
    )?;
    let started = Instant::now();
    // What the run is doing, on stderr: a long run that seems stuck says where.
    let phase = |what: &str| eprintln!("[{:7.1} s] {what}", started.elapsed().as_secs_f64());
    let mut node_args = vec![
        "--down-after".to_string(),
        config.down_after.as_secs().max(1).to_string(),
    ];
    node_args.extend(config.node_args.iter().cloned());
    let mut cluster = Cluster::start(
        &config.concord,
        &cluster_dir,
        config.nodes,
        config.ranges,
        node_args,
    )?;
    cluster
        .wait_ready(READY_MAX)
        .await
        .context("starting the cluster")?;
    phase("cluster ready; clients and faults start");

    let history = Arc::new(History::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = JoinSet::new();
    let client_config = cluster.client_config(config.request_timeout);
    let watch_log = Arc::new(Mutex::new(WatchLog::default()));
    let watch_client = Client::connect(client_config.clone()).await?;
    let watching = watch_everything(&watch_client, 0, watch_log.clone(), history.clone()).await?;
    for id in 0..config.clients {
        let client = Client::connect(client_config.clone()).await?;
        let (stop, history) = (stop.clone(), history.clone());
        let mix = Mix {
            keys: config.keys,
            seed: config.seed,
            reads: config.reads,
        };
        clients.spawn(workload::client_loop(client, id, mix, stop, history));
    }
    let lock_attempts = Arc::new(Mutex::new(Vec::new()));
    for id in 0..config.lock_clients {
        let client = Client::connect(client_config.clone()).await?;
        let (stop, attempts) = (stop.clone(), lock_attempts.clone());
        clients.spawn(locks::client_loop(client, id, config.seed, stop, attempts));
    }
    let lease_records = Arc::new(Mutex::new(Vec::new()));
    for id in 0..config.lease_clients {
        let client = Client::connect(client_config.clone()).await?;
        let (stop, history, records) = (stop.clone(), history.clone(), lease_records.clone());
        clients.spawn(leases::client_loop(
            client,
            id,
            config.seed,
            stop,
            history,
            records,
        ));
    }

    let applied = inject(&mut cluster, &steps, config.duration, config.keys, &history).await;
    let healed = async {
        cluster.heal_all()?;
        cluster.wait_ready(READY_MAX).await
    }
    .await;
    phase("faults over and healed; stopping the clients");
    stop.store(true, Ordering::Relaxed);
    while clients.join_next().await.is_some() {}
    let applied = applied?;
    healed.context("healing the cluster after the faults")?;
    phase("clients stopped; final reads");

    // The final reads: every acknowledged write must show in them (or be overwritten).
    let reader = Client::connect(client_config).await?;
    let mut final_reads = Vec::new();
    for k in 0..config.keys {
        // A read may fail while the last restarted nodes catch up: retried, within a bound.
        let until = Instant::now() + FINAL_READ_MAX;
        loop {
            let linearizable = Consistency::Linearizable;
            let read = workload::read(&reader, FINAL_READER, k, linearizable, &history).await;
            if let Some(value) = read {
                final_reads.push((k, value));
                break;
            }
            if Instant::now() > until {
                anyhow::bail!(
                    "final read of register {k} still failing {FINAL_READ_MAX:?} after healing"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    phase("final reads done; waiting for the watch to catch up");
    // The watcher has caught up once its last event of each key is the final read's value
    // (bounded: if it never does, the checker says where it stopped).
    watch_log_until(&watch_log, WATCH_CATCH_UP_MAX, |log| {
        final_reads
            .iter()
            .all(|&(k, value)| log.last_value(k).unwrap_or(None) == value)
    })
    .await;
    phase("waiting for the keys of dead leases to go");
    // Every dead lease's key must go: wait (bounded) until the watch saw them deleted.
    let records = std::mem::take(&mut *lease_records.lock().expect("leases lock"));
    watch_log_until(&watch_log, leases::LEASE_TTL + LEASE_DRAIN_MAX, |log| {
        records
            .iter()
            .filter(|r| r.attached)
            .all(|r| log.lease_deletions.contains_key(&r.key))
    })
    .await;
    watching.abort();
    // A second watch resumed from a revision the first one saw (chosen by the seed) must
    // replay what followed it (bounded: if it never does, the checker says what differs).
    let first = std::mem::take(&mut *watch_log.lock().expect("watch log lock"));
    let resumed_from = resume_revision(&first, config.seed);
    phase(&format!(
        "a second watch resumes from revision {resumed_from}"
    ));
    let resumed_log = Arc::new(Mutex::new(WatchLog::default()));
    let opened = tokio::time::timeout(
        WATCH_CATCH_UP_MAX,
        watch_everything(
            &watch_client,
            resumed_from,
            resumed_log.clone(),
            history.clone(),
        ),
    )
    .await;
    // A watch that fails to open, or does not within the bound, ended: the checker says so.
    let not_opened = match opened {
        Ok(Ok(resuming)) => {
            watch_log_until(&resumed_log, WATCH_CATCH_UP_MAX, |log| {
                first
                    .latest
                    .iter()
                    .filter(|(_, (revision, _))| *revision >= resumed_from)
                    .all(|(k, latest)| log.latest.get(k) == Some(latest))
            })
            .await;
            resuming.abort();
            None
        }
        Ok(Err(e)) => Some(format!("{e:#}")),
        Err(_) => Some(format!("not open after {WATCH_CATCH_UP_MAX:?}")),
    };
    if let Some(why) = not_opened {
        resumed_log.lock().expect("watch log lock").ended = Some(why);
    }
    drop(watch_client);
    phase("checking");
    let final_counter = locks::read_counter(&reader)
        .await
        .context("final read of the lock clients' counter")?;
    let final_ranges = match reader.placement().await {
        Ok(report) => report.ranges.iter().map(|r| r.descriptor.id).collect(),
        Err(e) => {
            phase(&format!("no final placement table: {e}"));
            Vec::new()
        }
    };
    let ops = history.ops();
    write_lines(&config.out.join("history.jsonl"), &ops)?;
    write_lines(&config.out.join("faults.jsonl"), &applied)?;
    let log = first;
    write_lines(&config.out.join("watch.jsonl"), &log.seen)?;
    let resumed = std::mem::take(&mut *resumed_log.lock().expect("watch log lock"));
    write_lines(&config.out.join("watch-resumed.jsonl"), &resumed.seen)?;
    let report = linearizability::check(&ops, SEARCH_STEPS_MAX);
    let mut watch = watches::check(&log.seen, log.ended.as_deref(), &ops, FINAL_READER);
    watch.extend(watches::check_resumed(
        &log.seen,
        resumed_from,
        &resumed.seen,
        resumed.ended.as_deref(),
    ));
    let attempts = std::mem::take(&mut *lock_attempts.lock().expect("attempts lock"));
    write_lines(&config.out.join("locks.jsonl"), &attempts)?;
    let lock_violations = locks::check(&attempts, final_counter);
    write_lines(&config.out.join("leases.jsonl"), &records)?;
    let fault_spans: Vec<(u64, u64)> = applied
        .iter()
        .map(|a| (a.started_ns, a.healed_ns))
        .collect();
    let (lease_violations, lease_lateness) =
        leases::check(&records, &log.lease_deletions, &fault_spans);
    let outcome = Outcome {
        ops: ops.len(),
        unknown: ops.iter().filter(|o| o.is_unknown()).count(),
        faults: applied.len(),
        linearizability: report,
        watch_responses: log.seen.len(),
        watch_resumed_from: resumed_from,
        watch,
        lock_attempts: attempts.len(),
        locks: lock_violations,
        leases_granted: records.len(),
        leases: lease_violations,
        lease_lateness,
        final_ranges,
    };
    fs::write(
        config.out.join("verdict.json"),
        serde_json::to_string_pretty(&json!({
            "passed": outcome.passed(),
            "ops": outcome.ops,
            "unknown": outcome.unknown,
            "faults": outcome.faults,
            "keys": outcome.linearizability.keys,
            "not_linearizable_keys": outcome.linearizability.violations,
            "inconclusive_keys": outcome.linearizability.inconclusive,
            "watch_responses": outcome.watch_responses,
            "watch_resumed_from": outcome.watch_resumed_from,
            "watch_violations": outcome.watch,
            "lock_attempts": outcome.lock_attempts,
            "final_counter": final_counter,
            "lock_violations": outcome.locks,
            "leases_granted": outcome.leases_granted,
            "lease_violations": outcome.leases,
            "lease_lateness": outcome.lease_lateness,
            "final_ranges": outcome.final_ranges,
        }))?,
    )?;
    Ok(outcome)
}

/// A fault as applied, on the history's clock.
#[derive(Debug, Clone, serde::Serialize)]
struct Applied {
    step: Step,
    /// The hosts it was applied to, once resolved (the leader for `IsolateLeader`, the node
    /// armed to crash for a split, merge or move).
    hosts: Vec<usize>,
    /// For a split, merge or move: what the cluster answered.
    #[serde(skip_serializing_if = "String::is_empty")]
    outcome: String,
    started_ns: u64,
    healed_ns: u64,
}

/// Applies the steps in turn until `duration` has passed; each fault is healed before the
/// next gap.
async fn inject(
    cluster: &mut Cluster,
    steps: &[Step],
    duration: Duration,
    registers: u64,
    history: &History,
) -> anyhow::Result<Vec<Applied>> {
    let until = Instant::now() + duration;
    let mut applied = Vec::new();
    for step in steps {
        let gap = Duration::from_millis(step.gap_ms);
        if Instant::now() + gap >= until {
            break;
        }
        tokio::time::sleep(gap).await;
        let started_ns = history.now_ns();
        let down_held = match step.fault {
            Fault::Down(h) => Some(replicas_of(cluster, h).await),
            _ => None,
        };
        let (hosts, mut outcome) = apply(cluster, &step.fault, registers).await?;
        let hold = Duration::from_millis(step.hold_ms)
            .min(until.saturating_duration_since(Instant::now()));
        tokio::time::sleep(hold).await;
        if let (Some(before), Fault::Down(h)) = (down_held, &step.fault) {
            // What the placement service made of it: the replicas it re-created elsewhere.
            let after = replicas_of(cluster, *h).await;
            outcome = format!("down: before {before}; when it returns {after}");
        }
        cluster.disarm_live().await;
        cluster.heal_all()?;
        applied.push(Applied {
            step: step.clone(),
            hosts,
            outcome,
            started_ns,
            healed_ns: history.now_ns(),
        });
    }
    Ok(applied)
}

/// Node `host`'s state and replica count as the placement service reports them, in words.
async fn replicas_of(cluster: &Cluster, host: usize) -> String {
    let id = Cluster::id(host);
    let report = async {
        let client = Client::connect(cluster.client_config(Duration::from_secs(5))).await?;
        client.placement().await
    };
    match report.await {
        Ok(report) => match report.nodes.iter().find(|n| n.id == id) {
            Some(n) => format!("{} with {} replicas", n.state.name(), n.replicas),
            None => "not registered".into(),
        },
        Err(e) => format!("no placement view ({e})"),
    }
}

/// Applies one fault over `registers` registers; returns the hosts it hit and, for a split,
/// merge or move, what the cluster answered.
async fn apply(
    cluster: &mut Cluster,
    fault: &Fault,
    registers: u64,
) -> anyhow::Result<(Vec<usize>, String)> {
    let hosts = match fault {
        Fault::Kill(hosts) => {
            for &h in hosts {
                cluster.kill(h)?;
            }
            hosts.clone()
        }
        Fault::Down(h) => {
            cluster.kill(*h)?;
            vec![*h]
        }
        Fault::Pause(h) => {
            cluster.pause(*h)?;
            vec![*h]
        }
        Fault::Partition(side) => {
            cluster.net().partition(side)?;
            side.clone()
        }
        Fault::IsolateLeader(n) => match cluster.leader_of_nth_range(*n).await {
            Some(h) => {
                cluster.net().partition(&[h])?;
                vec![h]
            }
            // No leader known right now: nothing to isolate this time.
            None => Vec::new(),
        },
        Fault::Bridge { left, right } => {
            for &a in left {
                for &b in right {
                    cluster.net().cut(a, b)?;
                }
            }
            left.iter().chain(right).copied().collect()
        }
        Fault::CrashPoint {
            host,
            point,
            percent,
        } => {
            cluster.arm(*host, &format!("{point}={percent}%return"))?;
            vec![*host]
        }
        Fault::DiskFull(host) => {
            cluster.arm(*host, &format!("{DISK_FULL_POINT}=return"))?;
            vec![*host]
        }
        Fault::Clock {
            host,
            offset_s,
            rate_pct,
        } => {
            let rate = f64::from(*rate_pct) / 100.0;
            cluster.skew_clock(*host, &format!("{offset_s:+} x{rate}"))?;
            vec![*host]
        }
        Fault::Lossy {
            host,
            loss_pct,
            rate_kbit,
        } => {
            cluster.net().lossy(*host, *loss_pct, *rate_kbit)?;
            vec![*host]
        }
        Fault::Reorder {
            host,
            share_pct,
            slow_kbit,
        } => {
            cluster.net().reordering(*host, *share_pct, *slow_kbit)?;
            vec![*host]
        }
        Fault::Split { .. } | Fault::Merge { .. } | Fault::Move { .. } => {
            return reshape::apply(cluster, fault, registers).await;
        }
    };
    Ok((hosts, String::new()))
}

fn write_lines<T: serde::Serialize>(path: &std::path::Path, items: &[T]) -> anyhow::Result<()> {
    let mut text = String::new();
    for item in items {
        text.push_str(&serde_json::to_string(item)?);
        text.push('\n');
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
