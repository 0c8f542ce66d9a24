//! The coordination workloads: `lease-churn`, `watch-fanout`, `lock-contention` and
//! `membership`. Each runs for `--duration` (plus a bounded drain), records its operations'
//! latency in the main histogram and reports its own figures in `extra`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concord_client::api::{KeySpan, LeaseId};
use concord_client::watch_api::{EventKind, WatchRequest};
use concord_client::{Client, Error, MemberEvent, Membership, Session};
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use tokio::task::JoinSet;

use crate::{Rng, RunArgs};

/// What a workload measured.
pub struct Outcome {
    /// Latency of the workload's operations, in microseconds.
    pub hist: Histogram<u64>,
    /// Failed operations by error code.
    pub errors: BTreeMap<String, u64>,
    /// The workload's own figures.
    pub extra: Map<String, Value>,
}

/// Longest a run waits after its duration for outstanding effects (expiries, deliveries).
const DRAIN_MAX: Duration = Duration::from_secs(15);

/// Longest lease-churn spends granting its leases before the measured part.
const GRANT_PHASE_MAX: Duration = Duration::from_secs(600);

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

/// Shared recorders of a workload's operations: latency histogram and errors by code.
type Recorders = (
    Arc<Mutex<Histogram<u64>>>,
    Arc<Mutex<BTreeMap<String, u64>>>,
);

fn recorders() -> Recorders {
    (
        Arc::new(Mutex::new(histogram())),
        Arc::new(Mutex::new(BTreeMap::new())),
    )
}

fn count_error(errors: &Mutex<BTreeMap<String, u64>>, e: &Error) {
    *errors
        .lock()
        .expect("errors lock")
        .entry(e.code().to_string())
        .or_default() += 1;
}

fn record(hist: &Mutex<Histogram<u64>>, since: Instant) {
    let us = since.elapsed().as_micros().max(1) as u64;
    hist.lock().expect("hist lock").saturating_record(us);
}

fn percentiles_ms(hist: &Histogram<u64>, name: &str, extra: &mut Map<String, Value>) {
    for (q, label) in [(0.5, "p50"), (0.99, "p99")] {
        let ms = hist.value_at_quantile(q) as f64 / 1000.0;
        extra.insert(format!("{name}_{label}_ms"), json!(ms));
    }
    extra.insert(format!("{name}_max_ms"), json!(hist.max() as f64 / 1000.0));
    extra.insert(format!("{name}_count"), json!(hist.len()));
}

/// The fields of a JSON object literal, for a report's `extra`.
fn figures(object: Value) -> Map<String, Value> {
    match object {
        Value::Object(map) => map,
        other => unreachable!("figures are an object, not {other}"),
    }
}

/// Reports events expected, delivered and missing, and the delivery latency.
fn deliveries(
    extra: &mut Map<String, Value>,
    expected: u64,
    delivered: u64,
    latency: &Mutex<Histogram<u64>>,
) {
    extra.extend(figures(json!({
        "events_expected": expected,
        "events_delivered": delivered,
        "events_missing": expected.saturating_sub(delivered),
    })));
    percentiles_ms(&latency.lock().expect("latency lock"), "delivery", extra);
}

/// A tag that keeps this run's keys apart from earlier runs'.
fn run_tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("lg{:x}", (nanos as u64) ^ u64::from(std::process::id()))
}

/// A key of this run spread over the ranges by its first byte.
fn spread_key(tag: &str, kind: &str, i: u64) -> Vec<u8> {
    let mut key = crate::key_of(i)[..1].to_vec();
    key.extend(format!("/{tag}/{kind}/{i:012}").into_bytes());
    key
}

fn into_outcome(
    hist: Arc<Mutex<Histogram<u64>>>,
    errors: Arc<Mutex<BTreeMap<String, u64>>>,
    extra: Map<String, Value>,
) -> Outcome {
    Outcome {
        hist: std::mem::replace(&mut *hist.lock().expect("hist lock"), histogram()),
        errors: std::mem::take(&mut *errors.lock().expect("errors lock")),
        extra,
    }
}

/// Leases of the lease-churn workload.
#[derive(Default)]
struct LeaseBook {
    /// Renewed leases → the key attached to each.
    live: HashMap<LeaseId, Vec<u8>>,
    /// When the last keepalive batch that renewed each live lease was sent.
    renewed_at: HashMap<LeaseId, Instant>,
    /// The ids of `live`, in no order (to pick one at random in O(1)).
    ids: Vec<LeaseId>,
    /// Keys of leases let go → the latest their lease may expire without being late.
    dying: HashMap<Vec<u8>, Instant>,
    /// Leases let go → their keys (a renewal already in flight when a lease was let go
    /// moves its deadline).
    dying_keys: HashMap<LeaseId, Vec<u8>>,
}

/// Grants one lease with one attached key for lease-churn and books it as live.
#[derive(Clone)]
struct Granter {
    book: Arc<Mutex<LeaseBook>>,
    hist: Arc<Mutex<Histogram<u64>>>,
    errors: Arc<Mutex<BTreeMap<String, u64>>>,
    next_index: Arc<AtomicU64>,
    tag: String,
    ttl: Duration,
}

impl Granter {
    async fn grant(&self, client: &Client) {
        let i = self.next_index.fetch_add(1, Ordering::Relaxed);
        let key = spread_key(&self.tag, "lease", i);
        let started = Instant::now();
        let granted = async {
            let id = client.lease_grant(self.ttl).await?;
            client.put_leased(key.clone(), "", id).await?;
            Ok::<_, Error>(id)
        }
        .await;
        match granted {
            Ok(id) => {
                record(&self.hist, started);
                let mut book = self.book.lock().expect("book lock");
                book.live.insert(id, key);
                book.ids.push(id);
                book.renewed_at.insert(id, started);
            }
            Err(e) => count_error(&self.errors, &e),
        }
    }
}

/// `lease-churn`: `--leases` leases of `--ttl`, each with one attached key, renewed in
/// batches every TTL/3; `--churn` leases per second are let go and replaced. A watch on
/// every range sees the let-go keys deleted: lateness = deletion seen − (last renewal sent +
/// TTL). A renewed lease whose key disappears is `lost_live`.
pub async fn lease_churn(clients: &[Client], args: &RunArgs) -> anyhow::Result<Outcome> {
    let ttl = Duration::from_secs(args.ttl);
    let tag = run_tag();
    let marker = format!("/{tag}/lease/").into_bytes();
    let book = Arc::new(Mutex::new(LeaseBook::default()));
    let (hist, errors) = recorders();
    let lateness = Arc::new(Mutex::new(histogram()));
    let (early, lost_live, renewals) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut background = JoinSet::new();

    // Deletions of this run's keys, anywhere in the keyspace.
    let mut request = WatchRequest::new(KeySpan::prefix(""));
    request.no_put = true;
    let mut watcher = clients[0].watch(request).await?;
    {
        let (book, lateness, early, lost_live) = (
            book.clone(),
            lateness.clone(),
            early.clone(),
            lost_live.clone(),
        );
        let marker = marker.clone();
        background.spawn(async move {
            while let Some(Ok(response)) = watcher.next().await {
                let seen = Instant::now();
                let mut book = book.lock().expect("book lock");
                for event in response.events {
                    let key = event.kv.key;
                    if event.kind != EventKind::Delete || !contains(&key, &marker) {
                        continue;
                    }
                    if let Some(deadline) = book.dying.remove(&key) {
                        match seen.checked_duration_since(deadline) {
                            Some(late) => lateness
                                .lock()
                                .expect("lateness lock")
                                .saturating_record(late.as_micros().max(1) as u64),
                            None => {
                                early.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    } else if book.live.values().any(|k| *k == key) {
                        lost_live.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }

    // Renew every live lease each TTL/3, in batches.
    {
        let (client, book, errors, stop, renewals, lost_live) = (
            clients[0].clone(),
            book.clone(),
            errors.clone(),
            stop.clone(),
            renewals.clone(),
            lost_live.clone(),
        );
        background.spawn(async move {
            let mut tick = tokio::time::interval(ttl / 3);
            loop {
                tick.tick().await;
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let ids: Vec<LeaseId> = book
                    .lock()
                    .expect("book lock")
                    .live
                    .keys()
                    .copied()
                    .collect();
                if ids.is_empty() {
                    continue;
                }
                let sent = Instant::now();
                match client.lease_keep_alive_many(&ids).await {
                    Ok((renewed, missing)) => {
                        renewals.fetch_add(renewed.len() as u64, Ordering::Relaxed);
                        let mut book = book.lock().expect("book lock");
                        let book = &mut *book;
                        for (id, _) in renewed {
                            if book.live.contains_key(&id) {
                                book.renewed_at.insert(id, sent);
                            } else if let Some(key) = book.dying_keys.get(&id) {
                                if let Some(deadline) = book.dying.get_mut(key) {
                                    *deadline = (*deadline).max(sent + ttl);
                                }
                            }
                        }
                        for id in missing {
                            if book.live.remove(&id).is_some() {
                                book.ids.retain(|i| *i != id);
                                lost_live.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Err(e) => count_error(&errors, &e),
                }
            }
        });
    }

    // Grant and attach `--leases` leases with `--clients` workers.
    let granter = Granter {
        book: book.clone(),
        hist: hist.clone(),
        errors: errors.clone(),
        next_index: Arc::new(AtomicU64::new(0)),
        tag: tag.clone(),
        ttl,
    };
    let started = Instant::now();
    // Granting is bounded by the count, and by time in case the cluster is stuck.
    let hard_stop = started + GRANT_PHASE_MAX;
    let mut workers = JoinSet::new();
    let per_worker = args.leases.div_ceil(args.clients as u64);
    for w in 0..args.clients {
        let (client, granter) = (clients[w % clients.len()].clone(), granter.clone());
        workers.spawn(async move {
            for _ in 0..per_worker {
                if Instant::now() > hard_stop {
                    return;
                }
                granter.grant(&client).await;
            }
        });
    }
    while workers.join_next().await.is_some() {}
    let granted_in = started.elapsed();
    let active_at_start = book.lock().expect("book lock").live.len();

    // Churn for the duration: let go of leases and replace them.
    let churn_started = Instant::now();
    let deadline = churn_started + args.duration;
    let mut rng = Rng(0x5EED_1EA5 ^ args.leases);
    let mut churned = 0u64;
    if args.churn > 0 {
        let mut pace = tokio::time::interval(Duration::from_secs(1) / args.churn as u32);
        while Instant::now() < deadline {
            pace.tick().await;
            {
                let mut book = book.lock().expect("book lock");
                if book.ids.is_empty() {
                    break;
                }
                let at = (rng.next() % book.ids.len() as u64) as usize;
                let id = book.ids.swap_remove(at);
                let key = book.live.remove(&id).expect("live");
                let sent = book.renewed_at.remove(&id).expect("renewed");
                book.dying.insert(key.clone(), sent + ttl);
                book.dying_keys.insert(id, key);
            }
            churned += 1;
            granter
                .grant(&clients[churned as usize % clients.len()])
                .await;
        }
    } else {
        tokio::time::sleep_until(deadline.into()).await;
    }
    let active_leases = book.lock().expect("book lock").live.len();
    let churn_secs = churn_started.elapsed().as_secs_f64();
    let renewals_per_sec =
        renewals.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();

    // Wait (bounded) for the let-go leases to expire.
    let drain_until = Instant::now() + ttl + DRAIN_MAX;
    while Instant::now() < drain_until && !book.lock().expect("book lock").dying.is_empty() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    background.abort_all();
    let not_expired = book.lock().expect("book lock").dying.len();

    let mut extra = figures(json!({
        "leases": args.leases,
        "ttl_s": args.ttl,
        "granted_in_s": granted_in.as_secs_f64(),
        "active_leases_at_start": active_at_start,
        "active_leases": active_leases,
        "renewals_per_sec": renewals_per_sec,
        "churned": churned,
        "churn_per_sec": churned as f64 / churn_secs,
        "not_expired": not_expired,
        "early_expiries": early.load(Ordering::Relaxed),
        "lost_live": lost_live.load(Ordering::Relaxed),
    }));
    percentiles_ms(
        &lateness.lock().expect("lateness lock"),
        "expiry_lateness",
        &mut extra,
    );
    Ok(into_outcome(hist, errors, extra))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Microseconds since `epoch`, as text (carried in values to time deliveries).
fn stamp(epoch: Instant) -> String {
    epoch.elapsed().as_micros().to_string()
}

fn age_us(epoch: Instant, stamp: &[u8]) -> Option<u64> {
    let sent: u64 = std::str::from_utf8(stamp).ok()?.parse().ok()?;
    Some(
        (epoch.elapsed().as_micros() as u64)
            .saturating_sub(sent)
            .max(1),
    )
}

/// The summed process gauges of every node: (resident bytes, open watch streams).
async fn server_gauges(client: &Client) -> (u64, u64) {
    let mut rss = 0;
    let mut watchers = 0;
    for (_, status) in client.status().await {
        if let Ok(s) = status {
            rss += s.process.rss_bytes;
            watchers += s.process.watchers;
        }
    }
    (rss, watchers)
}

/// `watch-fanout`: `--watchers` watchers of one prefix (spread over the connections), one
/// writer at `--rate` puts per second. Delivery latency = event received − put sent; every
/// event must reach every watcher. Server memory per watcher = growth of the nodes' summed
/// resident memory while the watchers were opened, divided by their number (meaningful when
/// each node is its own process).
pub async fn watch_fanout(clients: &[Client], args: &RunArgs) -> anyhow::Result<Outcome> {
    let tag = run_tag();
    let prefix = format!("{tag}/fanout/").into_bytes();
    let epoch = Instant::now();
    let (hist, errors) = recorders();
    let delivery = Arc::new(Mutex::new(histogram()));
    let delivered = Arc::new(AtomicU64::new(0));

    let (rss_before, _) = server_gauges(&clients[0]).await;
    let opened_at = Instant::now();
    let mut watchers = Vec::with_capacity(args.watchers);
    for w in 0..args.watchers {
        let client = &clients[w % clients.len()];
        watchers.push(
            client
                .watch(WatchRequest::new(KeySpan::prefix(prefix.clone())))
                .await?,
        );
    }
    let opened_in = opened_at.elapsed();
    let (rss_after, open_streams) = server_gauges(&clients[0]).await;
    // Delivery latencies go to a few shared histograms (one per listener would be far too
    // much memory with 100,000 watchers).
    const SHARDS: usize = 64;
    let shards: Arc<Vec<Mutex<Histogram<u64>>>> =
        Arc::new((0..SHARDS).map(|_| Mutex::new(histogram())).collect());
    let mut listeners = JoinSet::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    for (w, mut watcher) in watchers.into_iter().enumerate() {
        let (shards, delivered, mut stop) = (shards.clone(), delivered.clone(), stop_rx.clone());
        listeners.spawn(async move {
            loop {
                let response = tokio::select! {
                    r = watcher.next() => r,
                    _ = stop.changed() => break,
                };
                let Some(Ok(response)) = response else { break };
                let mut shard = shards[w % SHARDS].lock().expect("shard lock");
                for event in &response.events {
                    if let Some(us) = age_us(epoch, &event.kv.value) {
                        shard.saturating_record(us);
                    }
                }
                drop(shard);
                delivered.fetch_add(response.events.len() as u64, Ordering::Relaxed);
            }
        });
    }

    // The writer.
    let deadline = Instant::now() + args.duration;
    let mut pace = tokio::time::interval(Duration::from_secs(1) / args.rate.max(1) as u32);
    let mut acked = 0u64;
    let mut i = 0u64;
    while Instant::now() < deadline {
        pace.tick().await;
        let mut key = prefix.clone();
        key.extend(format!("{:06}", i % 1000).into_bytes());
        i += 1;
        let started = Instant::now();
        match clients[0].put(key, stamp(epoch)).await {
            Ok(_) => {
                record(&hist, started);
                acked += 1;
            }
            Err(e) => count_error(&errors, &e),
        }
    }
    let expected = acked * args.watchers as u64;
    let drain_until = Instant::now() + DRAIN_MAX;
    while delivered.load(Ordering::Relaxed) < expected && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_tx.send_replace(true);
    while listeners.join_next().await.is_some() {}
    let delivered = delivered.load(Ordering::Relaxed);
    for shard in shards.iter() {
        delivery
            .lock()
            .expect("delivery lock")
            .add(&*shard.lock().expect("shard lock"))
            .ok();
    }

    let mut extra = figures(json!({
        "watchers": args.watchers,
        "rate": args.rate,
        "opened_in_s": opened_in.as_secs_f64(),
        "server_watches": open_streams,
        "server_rss_before": rss_before,
        "server_rss_after": rss_after,
        "server_bytes_per_watcher": rss_after.saturating_sub(rss_before) as f64 / args.watchers.max(1) as f64,
        "writes_acked": acked,
    }));
    deliveries(&mut extra, expected, delivered, &delivery);
    Ok(into_outcome(hist, errors, extra))
}

/// `lock-contention`: `--clients` clients, each with its own session, acquire one of
/// `--locks` locks at random, increment the lock's counter (a key in another range) with a
/// fenced read-modify-write, and release. Latency = acquire + increment + release. At the end
/// each counter must equal the increments acknowledged under its lock (give or take those
/// whose outcome is unknown): anything else is a fencing violation.
pub async fn lock_contention(clients: &[Client], args: &RunArgs) -> anyhow::Result<Outcome> {
    let tag = run_tag();
    let (hist, errors) = recorders();
    let locks = args.locks.max(1);
    // Per lock: (acknowledged increments, increments of unknown outcome).
    let counts = Arc::new(Mutex::new(vec![(0u64, 0u64); locks]));
    let deadline = Instant::now() + args.duration;
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for w in 0..args.clients {
        let client = clients[w % clients.len()].clone();
        let (hist, errors, counts, tag) =
            (hist.clone(), errors.clone(), counts.clone(), tag.clone());
        let ttl = Duration::from_secs(args.ttl);
        workers.spawn(async move {
            let session = match client.session(ttl).await {
                Ok(s) => s,
                Err(e) => return count_error(&errors, &e),
            };
            let mut rng = Rng(0xC0FF_EE00 ^ (w as u64 + 1));
            while Instant::now() < deadline {
                let l = (rng.next() % locks as u64) as usize;
                let op_started = Instant::now();
                let left = deadline.saturating_duration_since(Instant::now());
                let guard = match tokio::time::timeout(
                    left,
                    client.lock(&format!("{tag}/lock/{l}"), &session),
                )
                .await
                {
                    Err(_) => break,
                    Ok(Err(e)) => {
                        count_error(&errors, &e);
                        continue;
                    }
                    Ok(Ok(g)) => g,
                };
                let counter = spread_key(&tag, "counter", l as u64);
                let increment = async {
                    let read = client.get(counter.clone()).await?;
                    let value: u64 = read
                        .kvs
                        .first()
                        .and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse().ok())
                        .unwrap_or(0);
                    guard.put(counter.clone(), (value + 1).to_string()).await
                }
                .await;
                match increment {
                    Ok(_) => counts.lock().expect("counts lock")[l].0 += 1,
                    Err(e) => {
                        if e.outcome_unknown() {
                            counts.lock().expect("counts lock")[l].1 += 1;
                        }
                        count_error(&errors, &e);
                    }
                }
                match guard.unlock().await {
                    Ok(()) => record(&hist, op_started),
                    Err(e) => count_error(&errors, &e),
                }
            }
            let _ = session.close().await;
        });
    }
    while workers.join_next().await.is_some() {}
    let elapsed = started.elapsed().as_secs_f64();

    let counts = counts.lock().expect("counts lock").clone();
    let mut violations = 0u64;
    let mut acquisitions = 0u64;
    for (l, (acked, unknown)) in counts.iter().enumerate() {
        acquisitions += acked + unknown;
        let read = clients[0]
            .get(spread_key(&tag, "counter", l as u64))
            .await?;
        let value: u64 = read
            .kvs
            .first()
            .and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse().ok())
            .unwrap_or(0);
        if value < *acked || value > acked + unknown {
            violations += 1;
        }
    }
    let extra = figures(json!({
        "locks": locks,
        "acquisitions": acquisitions,
        "acquisitions_per_sec": acquisitions as f64 / elapsed,
        "fencing_violations": violations,
    }));
    Ok(into_outcome(hist, errors, extra))
}

/// `membership`: `--members` members register in one group, each under its own session of
/// `--ttl` (kept alive), while `--watchers` watchers follow the group; `--churn` members per
/// second leave (their session closed) and rejoin with a new one. Latency = leave + rejoin.
/// Delivery latency = event seen − change sent; every join and leave must reach every
/// watcher.
pub async fn membership(clients: &[Client], args: &RunArgs) -> anyhow::Result<Outcome> {
    let tag = run_tag();
    let group_name = format!("{tag}/members");
    let epoch = Instant::now();
    let (hist, errors) = recorders();
    let delivery = Arc::new(Mutex::new(histogram()));
    let seen = Arc::new(AtomicU64::new(0));
    // Member id → when its departure was sent.
    let leaving: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();

    let mut listeners = JoinSet::new();
    for w in 0..args.watchers {
        let group = Membership::new(clients[w % clients.len()].clone(), &group_name);
        let mut watcher = group.watch().await?;
        let (delivery, seen, leaving) = (delivery.clone(), seen.clone(), leaving.clone());
        listeners.spawn(async move {
            while let Some(Ok(events)) = watcher.next().await {
                let mut delivery = delivery.lock().expect("delivery lock");
                for event in events {
                    let us = match &event {
                        MemberEvent::Joined(m) | MemberEvent::Updated(m) => {
                            age_us(epoch, &m.metadata)
                        }
                        MemberEvent::Left { id, .. } => leaving
                            .lock()
                            .expect("leaving lock")
                            .get(id)
                            .map(|t| t.elapsed().as_micros().max(1) as u64),
                    };
                    if let Some(us) = us {
                        delivery.saturating_record(us);
                    }
                    seen.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }

    let ttl = Duration::from_secs(args.ttl);
    let register = |client: Client, id: String| {
        let group = Membership::new(client.clone(), &group_name);
        async move {
            let session = client.session(ttl).await?;
            group
                .register(&session, &id, stamp(epoch).as_bytes())
                .await?;
            Ok::<Session, Error>(session)
        }
    };
    let mut sessions: Vec<Option<Session>> = Vec::with_capacity(args.members);
    let mut changes = 0u64;
    for chunk in (0..args.members)
        .collect::<Vec<_>>()
        .chunks(args.clients.max(1))
    {
        let joined = futures_join(
            chunk
                .iter()
                .map(|i| register(clients[i % clients.len()].clone(), format!("m{i:06}"))),
        )
        .await;
        for session in joined {
            match session {
                Ok(s) => {
                    sessions.push(Some(s));
                    changes += 1;
                }
                Err(e) => {
                    count_error(&errors, &e);
                    sessions.push(None);
                }
            }
        }
    }

    let deadline = Instant::now() + args.duration;
    let mut rng = Rng(0xFEED ^ args.members as u64);
    if args.churn > 0 && !sessions.is_empty() {
        let mut pace = tokio::time::interval(Duration::from_secs(1) / args.churn as u32);
        while Instant::now() < deadline {
            pace.tick().await;
            let i = (rng.next() % sessions.len() as u64) as usize;
            let id = format!("m{i:06}");
            let client = clients[i % clients.len()].clone();
            let started = Instant::now();
            if let Some(old) = sessions[i].take() {
                leaving
                    .lock()
                    .expect("leaving lock")
                    .insert(id.clone(), Instant::now());
                match old.close().await {
                    Ok(()) => changes += 1,
                    Err(e) => count_error(&errors, &e),
                }
            }
            match register(client, id).await {
                Ok(s) => {
                    sessions[i] = Some(s);
                    changes += 1;
                    record(&hist, started);
                }
                Err(e) => count_error(&errors, &e),
            }
        }
    } else {
        tokio::time::sleep_until(deadline.into()).await;
    }
    let expected = changes * args.watchers as u64;
    let drain_until = Instant::now() + DRAIN_MAX;
    while seen.load(Ordering::Relaxed) < expected && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    listeners.abort_all();
    let seen = seen.load(Ordering::Relaxed);
    // Revoke the members' leases, `--clients` at a time (not measured).
    let sessions: Vec<Session> = sessions.into_iter().flatten().collect();
    let mut sessions = sessions.into_iter().peekable();
    while sessions.peek().is_some() {
        let batch: Vec<Session> = sessions.by_ref().take(args.clients.max(1)).collect();
        futures_join(batch.into_iter().map(Session::close)).await;
    }

    let mut extra = figures(json!({
        "members": args.members,
        "watchers": args.watchers,
        "changes": changes,
    }));
    deliveries(&mut extra, expected, seen, &delivery);
    Ok(into_outcome(hist, errors, extra))
}

/// Runs the futures concurrently and returns their outputs in order.
async fn futures_join<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}
