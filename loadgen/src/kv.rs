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

use crate::coordination::spread_key;
use crate::report::Recorder;
use crate::store::{OpError, Store};
use crate::{figures, Distribution, Rng, RunArgs, Workload};

/// Keys pre-loaded before a `get` or `mixed` run, at most.
const PRELOAD_MAX: u64 = 100_000;
/// txn-cas counters, at most (each is read back to check the total).
const CHECKED_KEYS_MAX: u64 = 100_000;
/// Attempts of one txn-cas increment before it counts as failed.
const CAS_ATTEMPTS_MAX: usize = 100;
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
/// or open loop, with a progress bar; the recorder's measured window is the time this
/// takes. `op` gets its store and a fresh random seed.
async fn drive<F, Fut>(stores: &[Store], args: &RunArgs, recorder: &Recorder, op: F)
where
    F: Fn(Store, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), OpError>> + Send,
{
    let issued = Arc::new(AtomicU64::new(0));
    recorder.start_now();
    let progress = crate::report::Progress::start(&args.label(), recorder, args.duration);
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
            let mut rng = Rng::seeded(id as u64);
            // Spread the clients' first due times over one interval.
            let mut next_due =
                start + interval.map_or(Duration::ZERO, |i| i.mul_f64(id as f64 / clients as f64));
            loop {
                // Open loop: the operation was due at `next_due`, whether or not the client
                // is behind; every operation due before the deadline is issued.
                let due = match interval {
                    Some(interval) => {
                        tokio::time::sleep_until(next_due.into()).await;
                        let due = next_due;
                        next_due += interval;
                        due
                    }
                    None => Instant::now(),
                };
                if due >= deadline
                    || (ops_max != 0 && issued.fetch_add(1, Ordering::Relaxed) >= ops_max)
                {
                    break;
                }
                match op(store.clone(), rng.next()).await {
                    Ok(()) => recorder.record(due),
                    Err(kind) => recorder.error(&kind),
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    recorder.stop_now();
    drop(progress);
}

/// Writes `keys` (not measured), so reads find them.
async fn preload(stores: &[Store], keys: &Arc<Vec<Vec<u8>>>, value: &[u8]) -> anyhow::Result<()> {
    let mut tasks = JoinSet::new();
    for w in 0..FILL_CONCURRENCY as usize {
        let (store, keys, value) = (
            stores[w % stores.len()].clone(),
            keys.clone(),
            value.to_vec(),
        );
        tasks.spawn(async move {
            for k in keys.iter().skip(w).step_by(FILL_CONCURRENCY as usize) {
                store.put(k.clone(), value.clone(), 0).await?;
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
    // Reads pick among the pre-loaded keys only, so every read finds its key.
    let key_space = if read_ratio > 0.0 {
        args.key_space.min(PRELOAD_MAX)
    } else {
        args.key_space
    };
    let keys: Arc<Vec<Vec<u8>>> = Arc::new((0..key_space).map(|i| key(args, i)).collect());
    let value = Arc::new(vec![b'v'; args.value_size]);
    if read_ratio > 0.0 {
        preload(stores, &keys, &value).await?;
    } else if stores.iter().any(Store::puts_need_existing_keys) {
        // ZooKeeper's put is set_data on an existing znode: create them first (not measured;
        // keys past PRELOAD_MAX are created by their first put).
        let first: Arc<Vec<Vec<u8>>> =
            Arc::new(keys.iter().take(PRELOAD_MAX as usize).cloned().collect());
        preload(stores, &first, &value).await?;
    }
    let picker = Arc::new(KeyPicker::new(args, key_space)?);
    let consistency = args.consistency;
    let threshold = (read_ratio * u64::MAX as f64) as u64;
    drive(stores, args, recorder, move |store, seed| {
        let mut rng = Rng::seeded(seed);
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
    Ok(figures(json!({ "keys_used": key_space })))
}

/// `txn-cas`: read-modify-write of a counter by mod revision: read the key linearizably,
/// then put its value + 1 if its mod revision has not moved. An operation is one successful
/// increment (the read and the txn); a lost race is retried (at most `CAS_ATTEMPTS_MAX`
/// times) and counted in `cas_conflicts`. At the end the counters must add up to the
/// increments acknowledged, give or take those whose txn failed (`counters_consistent`).
pub async fn run_txn_cas(
    stores: &[Store],
    args: &RunArgs,
    recorder: &Recorder,
) -> anyhow::Result<Map<String, Value>> {
    let tag = crate::coordination::run_tag();
    let counters = args.key_space.min(CHECKED_KEYS_MAX);
    let picker = Arc::new(KeyPicker::new(args, counters)?);
    let conflicts = Arc::new(AtomicU64::new(0));
    let unknown = Arc::new(AtomicU64::new(0));
    {
        let (conflicts, unknown, tag) = (conflicts.clone(), unknown.clone(), tag.clone());
        drive(stores, args, recorder, move |store, seed| {
            let k = spread_key(&tag, "cas", picker.pick(&mut Rng::seeded(seed)));
            let (conflicts, unknown) = (conflicts.clone(), unknown.clone());
            async move {
                for _ in 0..CAS_ATTEMPTS_MAX {
                    let current = store.get(k.clone(), Consistency::Linearizable).await?;
                    let (n, rev) =
                        current.map_or((0, 0), |v| (parse_u64(&v.value), v.mod_revision));
                    let next = (n + 1).to_string().into_bytes();
                    match store.cas(k.clone(), rev, next).await {
                        Ok(true) => return Ok(()),
                        Ok(false) => conflicts.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            unknown.fetch_add(1, Ordering::Relaxed);
                            return Err(e);
                        }
                    };
                }
                Err("CAS_ATTEMPTS_EXHAUSTED".into())
            }
        })
        .await;
    }
    // Every acknowledged increment is in a counter; an increment whose txn failed may or may
    // not be.
    let acked = recorder.ops();
    let keys = (0..counters).map(|i| spread_key(&tag, "cas", i)).collect();
    let total: u64 = read_back(stores, keys)
        .await?
        .iter()
        .map(|v| v.as_deref().map_or(0, parse_u64))
        .sum();
    let unknown = unknown.load(Ordering::Relaxed);
    Ok(figures(json!({
        "counters": counters,
        "cas_conflicts": conflicts.load(Ordering::Relaxed),
        "counter_total": total,
        "increments_unknown": unknown,
        "counters_consistent": (acked..=acked + unknown).contains(&total),
    })))
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
    let value_of = {
        let (tag, size) = (tag.clone(), args.value_size);
        move |n: u64| {
            let mut v = format!("{tag}:{n}:").into_bytes();
            v.resize(size.max(v.len()), b'v');
            v
        }
    };
    // The sequence numbers of the acknowledged writes (key and value derive from them).
    let acked: Arc<Mutex<Vec<u64>>> = Arc::default();
    let sequence = Arc::new(AtomicU64::new(0));
    {
        let (acked, tag, value_of) = (acked.clone(), tag.clone(), value_of.clone());
        drive(stores, args, recorder, move |store, _| {
            let n = sequence.fetch_add(1, Ordering::Relaxed);
            let (k, v) = (spread_key(&tag, "verify", n), value_of(n));
            let acked = acked.clone();
            async move {
                store.put(k, v, 0).await?;
                acked.lock().expect("acked lock").push(n);
                Ok(())
            }
        })
        .await;
    }
    let acked = std::mem::take(&mut *acked.lock().expect("acked lock"));
    let keys = acked
        .iter()
        .map(|n| spread_key(&tag, "verify", *n))
        .collect();
    let read = read_back(stores, keys).await?;
    let lost = acked
        .iter()
        .zip(&read)
        .filter(|(n, got)| got.as_deref() != Some(&value_of(**n)[..]))
        .count() as u64;
    Ok(figures(json!({
        "acknowledged": acked.len(),
        "verified": acked.len() as u64 - lost,
        "lost": lost,
    })))
}

/// Reads `keys` linearizably, `FILL_CONCURRENCY` at a time (not measured); their values in
/// order, `None` for an absent key.
async fn read_back(stores: &[Store], keys: Vec<Vec<u8>>) -> anyhow::Result<Vec<Option<Vec<u8>>>> {
    let keys = Arc::new(keys);
    let mut readers = JoinSet::new();
    for r in 0..FILL_CONCURRENCY as usize {
        let (store, keys) = (stores[r % stores.len()].clone(), keys.clone());
        readers.spawn(async move {
            let mut values = Vec::new();
            for i in (r..keys.len()).step_by(FILL_CONCURRENCY as usize) {
                let read = store
                    .get(keys[i].clone(), Consistency::Linearizable)
                    .await?;
                values.push((i, read.map(|v| v.value)));
            }
            Ok::<_, OpError>(values)
        });
    }
    let mut values = vec![None; keys.len()];
    while let Some(r) = readers.join_next().await {
        for (i, value) in r?
            .map_err(anyhow::Error::msg)
            .context("reading keys back")?
        {
            values[i] = value;
        }
    }
    Ok(values)
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
