//! The key-value workloads: `put`, `get`, `mixed`, `txn-cas` and `verify`, on any [`Store`].
//!
//! Closed loop by default (each client issues its next operation when the previous one is
//! answered). With `--rate` the loop is open: each client is due to issue its share of the
//! rate at fixed times, and latency is measured from when the operation was due, not when it
//! went out, so a stalled server shows up in the latency instead of silently lowering the
//! offered load (no coordinated omission).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use concord_client::api::Consistency;
use serde_json::{json, Map, Value};
use tokio::task::JoinSet;

use crate::report::Recorder;
use crate::store::{OpError, Store};
use crate::{figures, Distribution, Rng, RunArgs, Workload};

/// A key and the value written to it.
type KeyValue = (Vec<u8>, Vec<u8>);

/// Keys pre-loaded before a `get` or `mixed` run, at most.
const PRELOAD_MAX: u64 = 100_000;
/// Concurrent writers of the pre-load and of `verify`'s read-back.
const FILL_CONCURRENCY: u64 = 64;

/// Picks key numbers in `0..n` uniformly or by a Zipfian law.
pub enum KeyPicker {
    /// Every key equally likely.
    Uniform { n: u64 },
    /// Key i (after scrambling) with probability ∝ 1/(i+1)^theta: a few hot keys.
    Zipfian(Zipf),
}

/// Gray et al.'s Zipfian generator ("Quickly generating billion-record synthetic databases",
/// as in YCSB), with the rank scrambled by a hash so the hot keys are spread over the
/// keyspace (and so over the ranges) instead of being neighbours.
pub struct Zipf {
    n: u64,
    theta: f64,
    alpha: f64,
    zeta_n: f64,
    eta: f64,
}

impl Zipf {
    /// A generator over `0..n` with skew `theta` in (0, 1).
    pub fn new(n: u64, theta: f64) -> Self {
        let zeta = |count: u64| {
            (1..=count)
                .map(|i| 1.0 / (i as f64).powf(theta))
                .sum::<f64>()
        };
        let (zeta_2, zeta_n) = (zeta(2.min(n)), zeta(n));
        Zipf {
            n,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zeta_n,
            eta: (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta_2 / zeta_n),
        }
    }

    /// The rank (0 = hottest) for a uniform `u` in [0, 1).
    fn rank(&self, u: f64) -> u64 {
        let uz = u * self.zeta_n;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1.min(self.n - 1);
        }
        ((self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64).min(self.n - 1)
    }
}

impl KeyPicker {
    /// The picker `args` ask for over `n` keys.
    pub fn new(args: &RunArgs, n: u64) -> anyhow::Result<Self> {
        let n = n.max(1);
        Ok(match args.distribution {
            Distribution::Uniform => KeyPicker::Uniform { n },
            Distribution::Zipfian => {
                if !(args.zipf_theta > 0.0 && args.zipf_theta < 1.0) {
                    bail!("--zipf-theta must be in (0, 1), got {}", args.zipf_theta);
                }
                KeyPicker::Zipfian(Zipf::new(n, args.zipf_theta))
            }
        })
    }

    /// The next key number.
    pub fn pick(&self, rng: &mut Rng) -> u64 {
        match self {
            KeyPicker::Uniform { n } => rng.next() % n,
            KeyPicker::Zipfian(z) => {
                let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
                // FNV-1a of the rank: the hot keys land anywhere in the keyspace.
                let mut h: u64 = 0xcbf2_9ce4_8422_2325;
                for b in z.rank(u).to_le_bytes() {
                    h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
                }
                h % z.n
            }
        }
    }
}

/// The key of number `i`, padded to `--key-size` bytes if that is longer.
fn key(args: &RunArgs, i: u64) -> Vec<u8> {
    let mut k = crate::key_of(i);
    if k.len() < args.key_size {
        k.resize(args.key_size, b'k');
    }
    k
}

/// Calls `op` from `--clients` tasks until the duration or the op budget runs out, closed
/// or open loop. `op` gets its store, the task's random generator and the client's number.
async fn drive<F, Fut>(stores: &[Store], args: &RunArgs, recorder: &Recorder, op: F)
where
    F: Fn(Store, u64, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), OpError>> + Send,
{
    let issued = Arc::new(AtomicU64::new(0));
    recorder.start_now();
    let start = Instant::now();
    let deadline = start + args.duration;
    // Open loop: each client's share of the rate, at fixed intervals.
    let interval = args
        .rate
        .filter(|r| *r > 0)
        .map(|r| Duration::from_secs_f64(args.clients as f64 / r as f64));
    let mut tasks = JoinSet::new();
    for id in 0..args.clients {
        let store = stores[id % stores.len()].clone();
        let (issued, recorder, op) = (issued.clone(), recorder.clone(), op.clone());
        let (ops_max, clients) = (args.ops, args.clients);
        tasks.spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (id as u64 + 1));
            // Spread the clients' first due times over one interval.
            let mut due =
                start + interval.map_or(Duration::ZERO, |i| i.mul_f64(id as f64 / clients as f64));
            loop {
                if let Some(interval) = interval {
                    tokio::time::sleep_until(due.into()).await;
                    due += interval;
                } else {
                    due = Instant::now();
                }
                if Instant::now() >= deadline
                    || (ops_max != 0 && issued.fetch_add(1, Ordering::Relaxed) >= ops_max)
                {
                    break;
                }
                match op(store.clone(), rng.next(), id).await {
                    Ok(()) => recorder.record(due),
                    Err(kind) => recorder.error(&kind),
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Writes keys `0..n` (not measured), so reads find them.
async fn preload(stores: &[Store], args: &RunArgs, n: u64) -> anyhow::Result<()> {
    let value = vec![b'v'; args.value_size];
    let mut tasks = JoinSet::new();
    for w in 0..FILL_CONCURRENCY {
        let (store, value) = (stores[w as usize % stores.len()].clone(), value.clone());
        let keys: Vec<Vec<u8>> = (w..n)
            .step_by(FILL_CONCURRENCY as usize)
            .map(|i| key(args, i))
            .collect();
        tasks.spawn(async move {
            for k in keys {
                store.put(k, value.clone(), 0).await?;
            }
            Ok::<_, OpError>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r?.map_err(anyhow::Error::msg).context("pre-loading keys")?;
    }
    Ok(())
}

/// `put`, `get` and `mixed` (`--read-ratio` of the operations are gets).
pub async fn run_kv(
    stores: &[Store],
    args: &RunArgs,
    recorder: &Recorder,
) -> anyhow::Result<Map<String, Value>> {
    let read_ratio = match args.workload {
        Workload::Put => 0.0,
        Workload::Get => 1.0,
        _ => args.read_ratio,
    };
    if !(0.0..=1.0).contains(&read_ratio) {
        bail!("--read-ratio must be in [0, 1], got {read_ratio}");
    }
    if read_ratio > 0.0 {
        preload(stores, args, args.key_space.min(PRELOAD_MAX)).await?;
    }
    let picker = Arc::new(KeyPicker::new(args, args.key_space)?);
    let keys: Arc<Vec<Vec<u8>>> = Arc::new((0..args.key_space).map(|i| key(args, i)).collect());
    let value = Arc::new(vec![b'v'; args.value_size]);
    let consistency = args.consistency;
    let threshold = (read_ratio * u64::MAX as f64) as u64;
    let progress = crate::report::Progress::start(&args.label(), recorder, args.duration);
    drive(stores, args, recorder, move |store, random, _| {
        let mut rng = Rng(random | 1);
        let k = keys[picker.pick(&mut rng) as usize].clone();
        let read = read_ratio >= 1.0 || (read_ratio > 0.0 && rng.next() < threshold);
        let value = value.clone();
        async move {
            if read {
                store.get(k, consistency).await.map(drop)
            } else {
                store.put(k, value.to_vec(), 0).await
            }
        }
    })
    .await;
    drop(progress);
    Ok(Map::new())
}

/// `txn-cas`: read-modify-write of a counter by mod revision: read the key linearizably,
/// then put its value + 1 if its mod revision has not moved. An operation is one successful
/// increment (the read and the txn); a lost race is retried and counted in `cas_conflicts`.
/// At the end the counters must add up to the increments acknowledged.
pub async fn run_txn_cas(
    stores: &[Store],
    args: &RunArgs,
    recorder: &Recorder,
) -> anyhow::Result<Map<String, Value>> {
    let tag = crate::coordination::run_tag();
    let counters = args.key_space;
    let picker = Arc::new(KeyPicker::new(args, counters)?);
    let conflicts = Arc::new(AtomicU64::new(0));
    let unknown = Arc::new(AtomicU64::new(0));
    let key_of = {
        let tag = tag.clone();
        move |i: u64| {
            let mut k = crate::key_of(i)[..1].to_vec();
            k.extend(format!("/{tag}/cas/{i:012}").into_bytes());
            k
        }
    };
    let progress = crate::report::Progress::start(&args.label(), recorder, args.duration);
    {
        let (conflicts, unknown, key_of) = (conflicts.clone(), unknown.clone(), key_of.clone());
        drive(stores, args, recorder, move |store, random, _| {
            let k = key_of(picker.pick(&mut Rng(random | 1)));
            let (conflicts, unknown) = (conflicts.clone(), unknown.clone());
            async move {
                loop {
                    let current = store.get(k.clone(), Consistency::Linearizable).await?;
                    let (n, rev) =
                        current.map_or((0, 0), |v| (parse_u64(&v.value), v.mod_revision));
                    match store
                        .cas(k.clone(), rev, (n + 1).to_string().into_bytes())
                        .await
                    {
                        Ok(true) => return Ok(()),
                        Ok(false) => conflicts.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            unknown.fetch_add(1, Ordering::Relaxed);
                            return Err(e);
                        }
                    };
                }
            }
        })
        .await;
    }
    drop(progress);
    // Every acknowledged increment is in a counter; an increment whose txn failed may or may
    // not be.
    let acked = recorder.ops();
    let mut total = 0;
    for i in 0..counters.min(PRELOAD_MAX) {
        if let Some(v) = stores[0]
            .get(key_of(i), Consistency::Linearizable)
            .await
            .map_err(anyhow::Error::msg)?
        {
            total += parse_u64(&v.value);
        }
    }
    let unknown = unknown.load(Ordering::Relaxed);
    let consistent = counters > PRELOAD_MAX || (acked..=acked + unknown).contains(&total);
    let report = json!({
        "cas_conflicts": conflicts.load(Ordering::Relaxed),
        "counter_total": total,
        "counters_consistent": consistent,
    });
    if !consistent {
        bail!("txn-cas: counters add up to {total}, but {acked} increments were acknowledged ({unknown} unknown)");
    }
    Ok(figures(report))
}

/// `verify`: every client writes distinct keys with distinct values for the duration; then
/// every acknowledged write is read back linearizably. A missing or different value is a
/// lost write, and the run fails. Writes whose outcome is unknown are not counted either way.
pub async fn run_verify(
    stores: &[Store],
    args: &RunArgs,
    recorder: &Recorder,
) -> anyhow::Result<Map<String, Value>> {
    let tag = crate::coordination::run_tag();
    let acked: Arc<Mutex<Vec<KeyValue>>> = Arc::default();
    let sequence = Arc::new(AtomicU64::new(0));
    let progress = crate::report::Progress::start(&args.label(), recorder, args.duration);
    {
        let (acked, tag, value_size) = (acked.clone(), tag.clone(), args.value_size);
        drive(stores, args, recorder, move |store, _, _| {
            let n = sequence.fetch_add(1, Ordering::Relaxed);
            let mut k = crate::key_of(n)[..1].to_vec();
            k.extend(format!("/{tag}/verify/{n:012}").into_bytes());
            let mut v = format!("{tag}:{n}:").into_bytes();
            v.resize(value_size.max(v.len()), b'v');
            let acked = acked.clone();
            async move {
                store.put(k.clone(), v.clone(), 0).await?;
                acked.lock().expect("acked lock").push((k, v));
                Ok(())
            }
        })
        .await;
    }
    drop(progress);
    let acked = Arc::new(std::mem::take(&mut *acked.lock().expect("acked lock")));
    let lost = Arc::new(AtomicU64::new(0));
    let mut readers = JoinSet::new();
    for r in 0..FILL_CONCURRENCY as usize {
        let (store, acked, lost) = (
            stores[r % stores.len()].clone(),
            acked.clone(),
            lost.clone(),
        );
        readers.spawn(async move {
            for (k, v) in acked.iter().skip(r).step_by(FILL_CONCURRENCY as usize) {
                let read = store.get(k.clone(), Consistency::Linearizable).await?;
                if read.is_none_or(|got| got.value != *v) {
                    lost.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok::<_, OpError>(())
        });
    }
    while let Some(r) = readers.join_next().await {
        r?.map_err(anyhow::Error::msg)
            .context("reading back acknowledged writes")?;
    }
    let lost = lost.load(Ordering::Relaxed);
    Ok(figures(json!({
        "acknowledged": acked.len(),
        "verified": acked.len() as u64 - lost,
        "lost": lost,
    })))
}

/// A decimal counter value; 0 if absent or not a number.
pub fn parse_u64(bytes: &[u8]) -> u64 {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_is_skewed_and_in_range() {
        let z = Zipf::new(1000, 0.99);
        let mut counts = vec![0u32; 1000];
        for i in 0..100_000u64 {
            let u = (i as f64 + 0.5) / 100_000.0;
            counts[z.rank(u) as usize] += 1;
        }
        // Rank 0 is the most frequent, and far above the uniform share (100).
        assert!(counts[0] > 10 * 100, "rank 0 drawn {} times", counts[0]);
        assert!(counts[0] >= counts[1] && counts[1] >= counts[10]);
        assert_eq!(counts.iter().map(|c| *c as u64).sum::<u64>(), 100_000);
    }

    #[test]
    fn uniform_covers_the_key_space() {
        let picker = KeyPicker::Uniform { n: 10 };
        let mut rng = Rng(7);
        let mut seen = [false; 10];
        for _ in 0..1000 {
            seen[picker.pick(&mut rng) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }
}
