//! The coordination workloads: `lease-churn`, `watch-fanout`, `lock-contention` and
//! `membership`. Each runs for `--duration` (plus a bounded drain), records its operations'
//! latency in the main histogram and reports its own figures in `extra`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concord_client::api::Consistency;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use tokio::task::JoinSet;

use crate::kv::parse_u64;
use crate::report::{histogram, Recorder};
use crate::store::{ChangeRef, OpError, Store, StoreSession};
use crate::{figures, Rng, RunArgs};

/// Longest a run waits after its duration for outstanding effects (expiries, deliveries).
const DRAIN_MAX: Duration = Duration::from_secs(15);

/// Pause before a worker retries after an error (so errors do not spin).
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Longest lease-churn spends granting its leases before the measured part.
const GRANT_PHASE_MAX: Duration = Duration::from_secs(600);

/// Ticks `per_sec` times a second (at least once).
fn pace(per_sec: u64) -> tokio::time::Interval {
    tokio::time::interval(Duration::from_secs(1).div_f64(per_sec.max(1) as f64))
}

/// Waits until `done()` holds, or for `limit` at most, checking every `POLL`.
async fn drain(limit: Duration, done: impl Fn() -> bool) {
    const POLL: Duration = Duration::from_millis(50);
    let until = Instant::now() + limit;
    while !done() && Instant::now() < until {
        tokio::time::sleep(POLL).await;
    }
}

fn percentiles_ms(hist: &Histogram<u64>, name: &str, extra: &mut Map<String, Value>) {
    for (q, label) in [(0.5, "p50"), (0.99, "p99")] {
        let ms = hist.value_at_quantile(q) as f64 / 1000.0;
        extra.insert(format!("{name}_{label}_ms"), json!(ms));
    }
    extra.insert(format!("{name}_max_ms"), json!(hist.max() as f64 / 1000.0));
    extra.insert(format!("{name}_count"), json!(hist.len()));
}

/// Reports events expected, delivered and missing, and the delivery latency.
fn deliveries(
    extra: &mut Map<String, Value>,
    expected: u64,
    delivered: u64,
    latency: &Histogram<u64>,
) {
    extra.extend(figures(json!({
        "events_expected": expected,
        "events_delivered": delivered,
        "events_missing": expected.saturating_sub(delivered),
    })));
    percentiles_ms(latency, "delivery", extra);
}

/// A tag that keeps this run's keys apart from earlier runs'.
pub fn run_tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("lg{:x}", (nanos as u64) ^ u64::from(std::process::id()))
}

/// A key of this run spread over the ranges by its first byte.
pub fn spread_key(tag: &str, kind: &str, i: u64) -> Vec<u8> {
    let mut key = crate::key_of(i)[..1].to_vec();
    key.extend(format!("/{tag}/{kind}/{i:012}").into_bytes());
    key
}

/// Leases of the lease-churn workload.
#[derive(Default)]
struct LeaseBook {
    /// Renewed leases → the key attached to each.
    live: HashMap<i64, Vec<u8>>,
    /// When the last keepalive batch that renewed each live lease was sent.
    renewed_at: HashMap<i64, Instant>,
    /// The ids of `live`, in no order (to pick one at random in O(1)).
    ids: Vec<i64>,
    /// Keys of leases let go → the latest their lease may expire without being late.
    dying: HashMap<Vec<u8>, Instant>,
    /// Leases let go → their keys (a renewal already in flight when a lease was let go
    /// moves its deadline).
    dying_keys: HashMap<i64, Vec<u8>>,
}

/// Grants one lease with one attached key for lease-churn and books it as live.
#[derive(Clone)]
struct Granter {
    book: Arc<Mutex<LeaseBook>>,
    recorder: Recorder,
    next_index: Arc<AtomicU64>,
    tag: String,
    ttl: Duration,
    /// Grant, then put, in two requests (`--grant-then-put`).
    two_steps: bool,
}

impl Granter {
    async fn grant(&self, store: &Store) {
        let i = self.next_index.fetch_add(1, Ordering::Relaxed);
        let key = spread_key(&self.tag, "lease", i);
        let started = Instant::now();
        let granted = if self.two_steps {
            store
                .grant_then_put(key.clone(), Vec::new(), self.ttl)
                .await
        } else {
            store.put_ephemeral(key.clone(), Vec::new(), self.ttl).await
        };
        match granted {
            Ok(id) => {
                self.recorder.record(started);
                let mut book = self.book.lock().expect("book lock");
                book.live.insert(id, key);
                book.ids.push(id);
                book.renewed_at.insert(id, started);
            }
            Err(kind) => self.recorder.error(&kind),
        }
    }
}

/// `lease-churn`: `--leases` leases of `--ttl`, each with one attached key, renewed in
/// batches every TTL/3; `--churn` leases per second are let go and replaced. A watch on
/// every range sees the let-go keys deleted: lateness = deletion seen − (last renewal sent +
/// TTL). A renewed lease whose key disappears is `lost_live`. The operation measured is a
/// grant with its key attached ([`Store::put_ephemeral`]: one request on concord, a grant
/// and a put on etcd and ZooKeeper; `--grant-then-put`: two on every target);
/// `grants_per_sec` is their rate while the leases are granted.
pub async fn lease_churn(
    stores: &[Store],
    args: &RunArgs,
    recorder: &Recorder,
) -> anyhow::Result<Map<String, Value>> {
    let ttl = Duration::from_secs(args.ttl);
    let tag = run_tag();
    let marker = format!("/{tag}/lease/").into_bytes();
    let book = Arc::new(Mutex::new(LeaseBook::default()));
    let lateness = Arc::new(Mutex::new(histogram()));
    let (early, lost_live, renewals) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut background = JoinSet::new();

    // Deletions of this run's keys, anywhere in the keyspace.
    let mut watcher = stores[0]
        .watch_prefix(Vec::new(), true)
        .await
        .map_err(anyhow::Error::msg)?;
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
                for ChangeRef { deleted, key, .. } in response.iter() {
                    if !deleted || !contains(key, &marker) {
                        continue;
                    }
                    if let Some(deadline) = book.dying.remove(key) {
                        match seen.checked_duration_since(deadline) {
                            Some(late) => lateness
                                .lock()
                                .expect("lateness lock")
                                .saturating_record(late.as_micros().max(1) as u64),
                            None => {
                                early.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    } else if book.live.values().any(|k| k.as_slice() == key) {
                        lost_live.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }

    // Renew every live lease each TTL/3, in batches.
    {
        let (store, book, recorder, stop, renewals, lost_live) = (
            stores[0].clone(),
            book.clone(),
            recorder.clone(),
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
                let ids: Vec<i64> = book
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
                match store.keep_alive_many(&ids).await {
                    Ok((renewed, missing)) => {
                        renewals.fetch_add(renewed.len() as u64, Ordering::Relaxed);
                        let mut book = book.lock().expect("book lock");
                        let book = &mut *book;
                        for id in renewed {
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
                    Err(kind) => recorder.error(&kind),
                }
            }
        });
    }

    // Grant and attach `--leases` leases with `--clients` workers.
    let granter = Granter {
        book: book.clone(),
        recorder: recorder.clone(),
        next_index: Arc::new(AtomicU64::new(0)),
        tag: tag.clone(),
        ttl,
        two_steps: args.grant_then_put,
    };
    recorder.start_now();
    let started = Instant::now();
    // Granting is bounded by the count, and by time in case the cluster is stuck.
    let hard_stop = started + GRANT_PHASE_MAX;
    let mut workers = JoinSet::new();
    let per_worker = args.leases.div_ceil(args.clients as u64);
    for w in 0..args.clients {
        let (store, granter) = (stores[w % stores.len()].clone(), granter.clone());
        workers.spawn(async move {
            for _ in 0..per_worker {
                if Instant::now() > hard_stop {
                    return;
                }
                granter.grant(&store).await;
            }
        });
    }
    while workers.join_next().await.is_some() {}
    let granted_in = started.elapsed();
    let granted = recorder.ops();
    let active_at_start = book.lock().expect("book lock").live.len();

    // Churn for the duration: let go of leases and replace them.
    let churn_started = Instant::now();
    let deadline = churn_started + args.duration;
    let mut rng = Rng::seeded(0x5EED_1EA5 ^ args.leases);
    let mut churned = 0u64;
    if args.churn > 0 {
        let mut pace = pace(args.churn);
        while Instant::now() < deadline {
            pace.tick().await;
            let (id, key) = {
                let mut book = book.lock().expect("book lock");
                if book.ids.is_empty() {
                    break;
                }
                let at = (rng.next() % book.ids.len() as u64) as usize;
                let id = book.ids.swap_remove(at);
                let key = book.live.remove(&id).expect("live");
                let renewed = book.renewed_at.remove(&id).expect("renewed");
                book.dying.insert(key.clone(), renewed + ttl);
                book.dying_keys.insert(id, key.clone());
                (id, key)
            };
            let store = &stores[churned as usize % stores.len()];
            match store.lease_abandon(id).await {
                // The TTL runs from the last contact the store knows of.
                Ok(Some(at)) => {
                    if let Some(deadline) = book.lock().expect("book lock").dying.get_mut(&key) {
                        *deadline = at + ttl;
                    }
                }
                Ok(None) => {}
                Err(kind) => recorder.error(&kind),
            }
            churned += 1;
            granter.grant(store).await;
        }
    } else {
        tokio::time::sleep_until(deadline.into()).await;
    }
    recorder.stop_now();
    let active_leases = book.lock().expect("book lock").live.len();
    let churn_secs = churn_started.elapsed().as_secs_f64();
    let renewals_per_sec =
        renewals.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();

    // Wait (bounded) for the let-go leases to expire.
    drain(ttl + DRAIN_MAX, || {
        book.lock().expect("book lock").dying.is_empty()
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    background.abort_all();
    let not_expired = book.lock().expect("book lock").dying.len();
    // Revoke the live leases (not measured), so their expiry cannot disturb what runs next.
    let live: Vec<i64> = book.lock().expect("book lock").ids.clone();
    let revoking = live.chunks(live.len().div_ceil(args.clients.max(1)).max(1));
    futures_join(revoking.enumerate().map(|(w, ids)| {
        let (store, ids) = (stores[w % stores.len()].clone(), ids.to_vec());
        async move {
            for id in ids {
                let _ = store.lease_revoke(id).await;
            }
        }
    }))
    .await;

    let mut extra = figures(json!({
        "leases": args.leases,
        "grant_then_put": args.grant_then_put,
        "ttl_s": args.ttl,
        "granted_in_s": granted_in.as_secs_f64(),
        "grants_per_sec": granted as f64 / granted_in.as_secs_f64(),
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
    Ok(extra)
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

/// The summed process gauges of every concord node: (resident bytes, open watch streams);
/// none for etcd.
async fn server_gauges(store: &Store) -> Option<(u64, u64)> {
    let client = store.as_concord()?;
    let mut rss = 0;
    let mut watchers = 0;
    for (_, status) in client.status().await {
        if let Ok(s) = status {
            rss += s.process.rss_bytes;
            watchers += s.process.watchers;
        }
    }
    Some((rss, watchers))
}

/// A number of this thread's own (0, 1, 2, ... in the order threads first ask).
fn thread_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    INDEX.with(|index| *index)
}

/// How many keys watch-fanout's writer cycles through.
const FANOUT_KEYS: u64 = 1000;

/// Puts of watch-fanout's writer outstanding at once (far fewer than `FANOUT_KEYS`, so that
/// two puts in flight never share a key's send time).
const WRITES_IN_FLIGHT_MAX: usize = 64;

/// `watch-fanout`: `--watchers` watchers of one prefix (spread over the connections), a
/// writer issuing `--rate` puts per second over [`FANOUT_KEYS`] keys (open loop: a slow put
/// does not hold back the next). Delivery latency = event
/// received − put of its key sent (ZooKeeper's events carry no value, so the send times are
/// kept by key, for every target); every event must reach every watcher. Server memory per
/// watcher = growth of the nodes' summed resident memory while the second half of the
/// watchers was opened, divided by their number: the first half absorbs the nodes' start-up
/// churn, which moves resident memory by tens of megabytes either way (meaningful when each
/// node is its own process; concord only).
pub async fn watch_fanout(
    stores: &[Store],
    args: &RunArgs,
    recorder: &Recorder,
) -> anyhow::Result<Map<String, Value>> {
    let tag = run_tag();
    let prefix = format!("{tag}/fanout/").into_bytes();
    let epoch = Instant::now();
    let rate = args.rate.unwrap_or(100).max(1);
    let key_at = |i: u64| {
        let mut key = prefix.clone();
        key.extend(format!("{i:06}").into_bytes());
        key
    };
    // When the put of each key was last sent, in microseconds since `epoch`.
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..FANOUT_KEYS).map(|_| AtomicU64::new(0)).collect());
    if stores[0].puts_need_existing_keys() {
        // ZooKeeper's put is set_data on an existing znode: create them first (not measured).
        for i in 0..FANOUT_KEYS {
            stores[0]
                .put(key_at(i), Vec::new(), 0)
                .await
                .map_err(anyhow::Error::msg)?;
        }
    }

    let gauges_before = server_gauges(&stores[0]).await;
    let opened_at = Instant::now();
    // `total` watchers, spread evenly over the connections, which open theirs at the same
    // time.
    let open = |total: usize| {
        let prefix = &prefix;
        futures::future::try_join_all(stores.iter().enumerate().map(move |(c, store)| {
            let count = total / stores.len() + usize::from(c < total % stores.len());
            store.watch_prefix_many(prefix.clone(), count, false)
        }))
    };
    // In two halves, with the nodes' memory measured between them.
    let first_half = args.watchers / 2;
    let mut watchers: Vec<_> = open(first_half)
        .await
        .map_err(anyhow::Error::msg)?
        .into_iter()
        .flatten()
        .collect();
    let gauges_half = server_gauges(&stores[0]).await;
    watchers.extend(
        open(args.watchers - first_half)
            .await
            .map_err(anyhow::Error::msg)?
            .into_iter()
            .flatten(),
    );
    let opened_in = opened_at.elapsed();
    let gauges_after = server_gauges(&stores[0]).await;
    // One listener task per watcher, as an application with that many watchers would have;
    // latencies and counts go to a histogram per worker thread (one per listener would be far
    // too much memory with 100,000 watchers, and one shared by the threads of both cores
    // moves its cache lines between them at every event).
    const SHARDS: usize = 64;
    /// Delivery latencies and the count of events delivered, of the listeners that ran on
    /// one thread; a cache line of its own, apart from its neighbours'.
    #[repr(align(128))]
    struct Shard(Mutex<(Histogram<u64>, u64)>);
    let shards: Arc<Vec<Shard>> = Arc::new(
        (0..SHARDS)
            .map(|_| Shard(Mutex::new((histogram(), 0))))
            .collect(),
    );
    // The listeners run on a runtime of their own. On the main one, the writer's puts and the
    // client's connection and watch-channel tasks queued behind up to 100,000 listener tasks
    // at every revision, which measured the load generator's run queue, not the cluster: the
    // puts' median latency was 63 ms with 100,000 listeners and a few without. Two runtimes'
    // threads share the cores under the kernel's scheduler instead. The listeners still do
    // all their work (every event is handed out by the client to every watcher and read), and
    // the latency still counts the time until the listener reads it.
    let listener_runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("listener")
        .enable_all()
        .build()?;
    let mut listeners = JoinSet::new();
    let index_at = prefix.len();
    for mut watcher in watchers {
        let (shards, sent) = (shards.clone(), sent.clone());
        let listener = async move {
            while let Some(Ok(first)) = watcher.next().await {
                // The responses already waiting behind this one were received by now too:
                // one clock read serves them all.
                let now = epoch.elapsed().as_micros() as u64;
                let mut shard = shards[thread_index() % SHARDS]
                    .0
                    .lock()
                    .expect("shard lock");
                let mut next = Some(first);
                while let Some(changes) = next.take() {
                    for change in changes.iter() {
                        let i = std::str::from_utf8(&change.key[index_at.min(change.key.len())..])
                            .ok()
                            .and_then(|i| i.parse::<usize>().ok());
                        if let Some(at) = i.and_then(|i| sent.get(i)) {
                            shard.0.saturating_record(
                                now.saturating_sub(at.load(Ordering::Relaxed)).max(1),
                            );
                        }
                    }
                    shard.1 += changes.len() as u64;
                    match watcher.next().now_or_never() {
                        Some(Some(Ok(changes))) => next = Some(changes),
                        Some(_) => return,
                        None => {}
                    }
                }
            }
        };
        listeners.spawn_on(listener, listener_runtime.handle());
    }
    let delivered = || -> u64 {
        shards
            .iter()
            .map(|shard| shard.0.lock().expect("shard lock").1)
            .sum()
    };

    // The writer: a put every 1/rate s whether or not the earlier ones are done (a steady
    // rate, as from many writers), at most WRITES_IN_FLIGHT_MAX outstanding.
    recorder.start_now();
    let deadline = Instant::now() + args.duration;
    let mut pace = pace(rate);
    let mut acked = 0u64;
    let mut i = 0u64;
    let mut in_flight = FuturesUnordered::new();
    let mut settle = |(started, result): (Instant, Result<(), OpError>)| match result {
        Ok(()) => {
            recorder.record(started);
            acked += 1;
        }
        Err(kind) => recorder.error(&kind),
    };
    while Instant::now() < deadline {
        tokio::select! {
            _ = pace.tick(), if in_flight.len() < WRITES_IN_FLIGHT_MAX => {
                let k = i % FANOUT_KEYS;
                i += 1;
                let started = Instant::now();
                sent[k as usize].store(epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
                let put = stores[0].put(key_at(k), stamp(epoch).into_bytes(), 0);
                in_flight.push(async move { (started, put.await) });
            }
            Some(done) = in_flight.next(), if !in_flight.is_empty() => settle(done),
        }
    }
    while let Some(done) = in_flight.next().await {
        settle(done);
    }
    recorder.stop_now();
    let expected = acked * args.watchers as u64;
    drain(DRAIN_MAX, || delivered() >= expected).await;
    listeners.abort_all();
    while listeners.join_next().await.is_some() {}
    listener_runtime.shutdown_background();
    let delivered = delivered();
    let mut delivery = histogram();
    for shard in shards.iter() {
        delivery.add(&shard.0.lock().expect("shard lock").0).ok();
    }

    let mut extra = figures(json!({
        "watchers": args.watchers,
        "rate": rate,
        "opened_in_s": opened_in.as_secs_f64(),
        "writes_acked": acked,
    }));
    if let (Some((rss_before, _)), Some((rss_half, _)), Some((rss_after, open_streams))) =
        (gauges_before, gauges_half, gauges_after)
    {
        let second_half = (args.watchers - first_half).max(1) as f64;
        extra.extend(figures(json!({
            "server_watches": open_streams,
            "server_rss_before": rss_before,
            "server_rss_half": rss_half,
            "server_rss_after": rss_after,
            "server_bytes_per_watcher": rss_after.saturating_sub(rss_half) as f64 / second_half,
        })));
    }
    deliveries(&mut extra, expected, delivered, &delivery);
    Ok(extra)
}

/// `lock-contention`: `--clients` clients, each with its own session, acquire one of
/// `--locks` locks at random, increment the lock's counter (a key in another range) with a
/// fenced read-modify-write, and release. Latency = acquire + increment + release. At the end
/// each counter must equal the increments acknowledged under its lock, give or take those
/// that failed other than by being fenced (their outcome may be unknown): anything else is a
/// fencing violation.
pub async fn lock_contention(
    stores: &[Store],
    args: &RunArgs,
    recorder: &Recorder,
) -> anyhow::Result<Map<String, Value>> {
    let tag = run_tag();
    let locks = args.locks.max(1);
    // Per lock: (acknowledged increments, increments that may or may not have happened).
    let counts = Arc::new(Mutex::new(vec![(0u64, 0u64); locks]));
    let acquisitions = Arc::new(AtomicU64::new(0));
    recorder.start_now();
    let deadline = Instant::now() + args.duration;
    let mut workers = JoinSet::new();
    for w in 0..args.clients {
        let store = stores[w % stores.len()].clone();
        let (recorder, counts, tag) = (recorder.clone(), counts.clone(), tag.clone());
        let acquisitions = acquisitions.clone();
        let ttl = Duration::from_secs(args.ttl);
        workers.spawn(async move {
            let mut rng = Rng::seeded(0xC0FF_EE00 ^ w as u64);
            let mut session = None;
            while Instant::now() < deadline {
                // A session lost (expired, or revoked by an unlock after a fenced write of
                // unknown outcome) is replaced, after a pause so errors do not spin.
                let current = match session.take() {
                    Some(s) => s,
                    None => match store.session(ttl).await {
                        Ok(s) => s,
                        Err(kind) => {
                            recorder.error(&kind);
                            tokio::time::sleep(RETRY_PAUSE).await;
                            continue;
                        }
                    },
                };
                let l = (rng.next() % locks as u64) as usize;
                let op_started = Instant::now();
                let left = deadline.saturating_duration_since(Instant::now());
                let name = format!("{tag}/lock/{l}");
                let held = match tokio::time::timeout(left, store.lock(&name, &current)).await {
                    Err(_) => {
                        session = Some(current);
                        break;
                    }
                    Ok(Err(kind)) => {
                        recorder.error(&kind);
                        let _ = store.close_session(current).await;
                        tokio::time::sleep(RETRY_PAUSE).await;
                        continue;
                    }
                    Ok(Ok(held)) => held,
                };
                acquisitions.fetch_add(1, Ordering::Relaxed);
                let counter = spread_key(&tag, "counter", l as u64);
                let increment = async {
                    let read = store
                        .get(counter.clone(), Consistency::Linearizable)
                        .await?;
                    let value = read.map_or(0, |v| parse_u64(&v.value));
                    let next = (value + 1).to_string().into_bytes();
                    store.fenced_put(&held, counter.clone(), next).await
                }
                .await;
                let incremented = match increment {
                    Ok(()) => {
                        counts.lock().expect("counts lock")[l].0 += 1;
                        true
                    }
                    Err(kind) => {
                        if kind != "FENCED" {
                            counts.lock().expect("counts lock")[l].1 += 1;
                        }
                        recorder.error(&kind);
                        false
                    }
                };
                match store.unlock(held).await {
                    Ok(()) if incremented => recorder.record(op_started),
                    Ok(()) => {}
                    Err(kind) => recorder.error(&kind),
                }
                session = Some(current);
            }
            if let Some(s) = session {
                let _ = store.close_session(s).await;
            }
        });
    }
    while workers.join_next().await.is_some() {}
    recorder.stop_now();
    let elapsed = recorder.elapsed().as_secs_f64();

    let counts = counts.lock().expect("counts lock").clone();
    let mut violations = 0u64;
    let acquisitions = acquisitions.load(Ordering::Relaxed);
    for (l, (acked, unknown)) in counts.iter().enumerate() {
        let read = stores[0]
            .get(
                spread_key(&tag, "counter", l as u64),
                Consistency::Linearizable,
            )
            .await
            .map_err(anyhow::Error::msg)?;
        let value = read.map_or(0, |v| parse_u64(&v.value));
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
    Ok(extra)
}

/// `membership`: `--members` members register in one group, each under its own session of
/// `--ttl` (kept alive), while `--watchers` watchers follow the group; `--churn` members per
/// second leave (their session closed) and rejoin with a new one. Latency = leave + rejoin.
/// Delivery latency = event seen − change sent; every join and leave must reach every
/// watcher.
pub async fn membership(
    stores: &[Store],
    args: &RunArgs,
    recorder: &Recorder,
) -> anyhow::Result<Map<String, Value>> {
    let tag = run_tag();
    let group_name = format!("{tag}/members");
    let epoch = Instant::now();
    let delivery = Arc::new(Mutex::new(histogram()));
    let seen = Arc::new(AtomicU64::new(0));
    // Member id → when its departure was sent.
    let leaving: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();

    let mut listeners = JoinSet::new();
    for w in 0..args.watchers {
        let mut watcher = stores[w % stores.len()]
            .watch_members(&group_name)
            .await
            .map_err(anyhow::Error::msg)?;
        let (delivery, seen, leaving) = (delivery.clone(), seen.clone(), leaving.clone());
        listeners.spawn(async move {
            while let Some(Ok(changes)) = watcher.next().await {
                let mut delivery = delivery.lock().expect("delivery lock");
                for change in changes {
                    let us = if change.left {
                        leaving
                            .lock()
                            .expect("leaving lock")
                            .get(&change.id)
                            .map(|t| t.elapsed().as_micros().max(1) as u64)
                    } else {
                        age_us(epoch, &change.metadata)
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
    let register = |store: Store, id: String| {
        let group_name = group_name.clone();
        async move {
            let session = store.session(ttl).await?;
            let metadata = stamp(epoch).into_bytes();
            store.register(&group_name, &id, metadata, &session).await?;
            Ok::<StoreSession, OpError>(session)
        }
    };
    let mut sessions: Vec<Option<StoreSession>> = Vec::with_capacity(args.members);
    let mut changes = 0u64;
    for chunk in (0..args.members)
        .collect::<Vec<_>>()
        .chunks(args.clients.max(1))
    {
        let joined = futures_join(
            chunk
                .iter()
                .map(|i| register(stores[i % stores.len()].clone(), format!("m{i:06}"))),
        )
        .await;
        for session in joined {
            match session {
                Ok(s) => {
                    sessions.push(Some(s));
                    changes += 1;
                }
                Err(kind) => {
                    recorder.error(&kind);
                    sessions.push(None);
                }
            }
        }
    }

    recorder.start_now();
    let deadline = Instant::now() + args.duration;
    let mut rng = Rng::seeded(0xFEED ^ args.members as u64);
    if args.churn > 0 && !sessions.is_empty() {
        let mut pace = pace(args.churn);
        while Instant::now() < deadline {
            pace.tick().await;
            let i = (rng.next() % sessions.len() as u64) as usize;
            let id = format!("m{i:06}");
            let store = stores[i % stores.len()].clone();
            let started = Instant::now();
            if let Some(old) = sessions[i].take() {
                leaving
                    .lock()
                    .expect("leaving lock")
                    .insert(id.clone(), Instant::now());
                match store.close_session(old).await {
                    Ok(()) => changes += 1,
                    Err(kind) => recorder.error(&kind),
                }
            }
            match register(store, id).await {
                Ok(s) => {
                    sessions[i] = Some(s);
                    changes += 1;
                    recorder.record(started);
                }
                Err(kind) => recorder.error(&kind),
            }
        }
    } else {
        tokio::time::sleep_until(deadline.into()).await;
    }
    recorder.stop_now();
    let expected = changes * args.watchers as u64;
    drain(DRAIN_MAX, || seen.load(Ordering::Relaxed) >= expected).await;
    listeners.abort_all();
    let seen = seen.load(Ordering::Relaxed);
    // Revoke the members' leases, `--clients` at a time (not measured).
    let sessions: Vec<StoreSession> = sessions.into_iter().flatten().collect();
    let mut sessions = sessions.into_iter().enumerate().peekable();
    while sessions.peek().is_some() {
        let batch: Vec<_> = sessions.by_ref().take(args.clients.max(1)).collect();
        futures_join(batch.into_iter().map(|(i, session)| {
            let store = stores[i % stores.len()].clone();
            async move { store.close_session(session).await }
        }))
        .await;
    }

    let mut extra = figures(json!({
        "members": args.members,
        "watchers": args.watchers,
        "changes": changes,
    }));
    deliveries(
        &mut extra,
        expected,
        seen,
        &delivery.lock().expect("delivery lock"),
    );
    Ok(extra)
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
