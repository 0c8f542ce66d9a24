//! Automatic splits by size and by load: every [`SplitSettings::check_interval_ms`] each node
//! looks at the ranges it leads and splits one that holds more keys, or more bytes, than its
//! threshold, at the key that halves its key count; or one that has taken more writes per
//! second than its threshold for [`SplitSettings::hot_checks`] checks in a row, at the key
//! that halves its sampled writes, if its leader (this node) carries more than a quarter over
//! a node's fair share of the cluster's writes (from the placement service's last report) and
//! the range more than half a share: a split that cannot spread load only adds a Raft group
//! ([`load_split_spreads`]).
//!
//! The decisions ([`split_point`], [`load_split_point`], [`load_split_spreads`]) are pure functions of the range's
//! state, its write sample and the thresholds; the loop only carries them out, one split per
//! range per round, through the same path as an operator's `concordctl range split`. A split
//! point is always strictly inside the range, so a split never makes an empty half that would
//! split again; a load split needs a quarter of the sampled writes on each side, so one hot
//! key (which no split can spread) never splits a range over and over. Merges back are the
//! placement service's (`placement_service`), with thresholds a quarter of these so that a
//! merged range is far from splitting again.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use concord_transport::api::RangeId;

use super::NodeInner;
use crate::mvcc::{Bounds, Mvcc};

/// When a range splits by size or load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitSettings {
    /// Split a range holding more keys than this (live or with history); 0 = never.
    pub keys_max: u64,
    /// Split a range whose keys and stored values take more bytes than this; 0 = never.
    pub bytes_max: u64,
    /// Split a range whose leader took more writes per second than this, over each of
    /// `hot_checks` checks in a row; 0 = never.
    pub writes_per_sec_max: u64,
    /// How many checks in a row a range must be past `writes_per_sec_max` (sustained load,
    /// not a burst).
    pub hot_checks: u32,
    /// How often a node looks at the ranges it leads, in milliseconds; 0 turns it off.
    pub check_interval_ms: u64,
}

impl SplitSettings {
    /// Whether ranges split by load, so that their leaders sample the keys written.
    pub fn by_load(&self) -> bool {
        self.check_interval_ms != 0 && self.writes_per_sec_max != 0
    }
}

impl Default for SplitSettings {
    /// 200,000 keys, 64 MiB, or 2,000 writes/s sustained over three checks (15 s), looked at
    /// every 5 s: sizes for a coordination store, where a range's whole state is in memory
    /// and travels as one snapshot, and one Raft group's log takes a few thousand writes/s.
    fn default() -> Self {
        Self {
            keys_max: 200_000,
            bytes_max: 64 << 20,
            writes_per_sec_max: 2_000,
            hot_checks: 3,
            check_interval_ms: 5_000,
        }
    }
}

/// The key to split `mvcc` at, if it is past a size threshold of `settings`: its middle key.
pub fn split_point(mvcc: &Mvcc, settings: &SplitSettings) -> Option<Vec<u8>> {
    let keys = mvcc.key_count() as u64;
    let too_many = settings.keys_max != 0 && keys > settings.keys_max;
    let too_big = settings.bytes_max != 0 && mvcc.stored_bytes() > settings.bytes_max;
    if !(too_many || too_big) {
        return None;
    }
    mvcc.middle_key()
}

/// Fewest sampled writes a load split is decided on.
pub const LOAD_SAMPLES_MIN: usize = 16;

/// The key that splits the writes `sample` (keys written, one per sampled write) most evenly
/// in `bounds`: the sampled key `k` (strictly after the range's first key) with the fewest
/// samples' difference between `< k` and `>= k`. `None` when the sample is too small, or
/// when no key leaves a quarter of the writes on each side (one hot key).
pub fn load_split_point(sample: &[Vec<u8>], bounds: &Bounds) -> Option<Vec<u8>> {
    let mut keys: Vec<&[u8]> = sample
        .iter()
        .map(Vec::as_slice)
        .filter(|k| bounds.contains(k))
        .collect();
    if keys.len() < LOAD_SAMPLES_MIN {
        return None;
    }
    keys.sort_unstable();
    let n = keys.len();
    // Candidates: each distinct key, with the number of samples before it.
    let mut best: Option<(usize, &[u8])> = None;
    for (below, key) in keys.iter().enumerate() {
        if below > 0 && keys[below - 1] == *key {
            continue;
        }
        if !bounds.splits_at(key) {
            continue;
        }
        let imbalance = below.abs_diff(n - below);
        if best.is_none_or(|(b, _)| imbalance < b) {
            best = Some((imbalance, key));
        }
    }
    let (imbalance, key) = best?;
    // `imbalance = |below - above|`; each side holds at least a quarter of `n` when it is at
    // most half of `n`.
    (imbalance * 2 <= n).then(|| key.to_vec())
}

/// Sampled keys a range keeps of its recent writes.
const WRITE_SAMPLE_KEYS: usize = 256;

/// One write in this many is sampled.
const WRITE_SAMPLE_EVERY: u64 = 4;

/// How far past a fair share the writes a node leads must be before one of its ranges splits
/// by load: a quarter. Even ranges on three nodes land within it (three ranges lead 1/1/1,
/// eight 3/3/2, an eighth over), while the node leading two of four (half again its share) or
/// one hot range among cold ones is past it.
pub const LEADER_OVERLOAD: f64 = 1.25;

/// The writes per second a load split is weighed on: the hot range's (measured by its leader
/// over the last check), and from the placement service's last report, the sum of every
/// range its leader leads (this node's) and a node's fair share of the cluster's (the ranges'
/// writes over the nodes not drained; 0 when unknown). The last two come from one report, so
/// that one window measures both.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WriteLoad {
    /// The hot range's writes per second.
    pub range: f64,
    /// Writes per second of every range its leader leads, the hot one included.
    pub leader: f64,
    /// A node's fair share of the cluster's writes per second.
    pub node_share: f64,
}

/// Whether splitting a hot range can spread its load: only if its leader carries more than
/// [`LEADER_OVERLOAD`] times a fair share of the writes, and the range itself more than half
/// a share. Leader balancing moves whole ranges by count; a split helps only where that
/// leaves one node with too much, and the range is a large piece of it. Otherwise it adds a
/// Raft group (its heartbeats, a smaller batch per append, a second or two of new leaders)
/// for nothing: three even ranges on three nodes are already spread (splitting each cost a
/// quarter of put throughput at 64 clients), as are eight (measured: 12 %;
/// docs/benchmarks/analysis.md). A single hot range, a node leading two of four even ranges,
/// or hot ranges on a large cluster still split. A share of 0 (no placement report yet, or
/// one from before the writes) splits nothing: the placement service sees a hot range's
/// writes within a heartbeat or two, long before the range has been hot for
/// [`SplitSettings::hot_checks`] checks. The split loop asks this at every check of a hot
/// streak, so that one noisy window splits nothing.
pub fn load_split_spreads(load: WriteLoad) -> bool {
    load.node_share > 0.0
        && load.range * 2.0 > load.node_share
        && load.leader > load.node_share * LEADER_OVERLOAD
}

/// Keys of a range's recent writes, sampled on its leader for load splits.
#[derive(Default)]
pub(super) struct WriteSample {
    seen: AtomicU64,
    keys: Mutex<VecDeque<Vec<u8>>>,
}

impl WriteSample {
    /// Counts a write of `key`, keeping one in [`WRITE_SAMPLE_EVERY`] (the latest
    /// [`WRITE_SAMPLE_KEYS`] of those).
    pub(super) fn record(&self, key: &[u8]) {
        if !self
            .seen
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(WRITE_SAMPLE_EVERY)
        {
            return;
        }
        let mut keys = self.keys.lock().expect("write sample lock");
        if keys.len() == WRITE_SAMPLE_KEYS {
            keys.pop_front();
        }
        keys.push_back(key.to_vec());
    }

    /// The sampled keys, emptying the sample.
    fn take(&self) -> Vec<Vec<u8>> {
        let mut keys = self.keys.lock().expect("write sample lock");
        std::mem::take(&mut *keys).into()
    }
}

/// Splits the ranges this node leads that `split_point` or `load_split_point` picks, until the
/// node goes.
pub(super) async fn split_loop(inner: Weak<NodeInner>, settings: SplitSettings) {
    if settings.check_interval_ms == 0 {
        return;
    }
    let mut ticker = super::ticker(Duration::from_millis(settings.check_interval_ms));
    let mut meter = super::RateMeter::default();
    // Checks in a row each range has been past the write threshold.
    let mut hot: BTreeMap<RangeId, u32> = BTreeMap::new();
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        // A node's fair share of the cluster's writes and what this node leads of them, both
        // from the last placement report (one window for both).
        let (node_share, leader) = inner.write_shares();
        // The ranges this node leads, with their writes per second since the last check,
        // hottest first: at most one load split per round, the hottest range's (the leader's
        // load is weighed again, after the split, at the next check).
        let mut led: Vec<_> = inner
            .led_ranges()
            .into_iter()
            .map(|g| {
                let (_, rate) = meter.rates(&g, now);
                (g, rate)
            })
            .collect();
        led.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut split_by_load = false;
        for (group, rate) in led {
            let streak = hot.entry(group.id).or_default();
            // Hot: past the threshold, and a split would spread it, at every check of the
            // streak (one noisy window splits nothing).
            let over = settings.writes_per_sec_max != 0
                && rate > settings.writes_per_sec_max as f64
                && load_split_spreads(WriteLoad {
                    range: rate,
                    leader,
                    node_share,
                });
            *streak = if over { *streak + 1 } else { 0 };
            let (by_size, bounds) = {
                let state = group.state.read().expect("range state lock");
                (
                    split_point(&state.mvcc, &settings),
                    state.mvcc.bounds().clone(),
                )
            };
            let sample = group.counters.sample.take();
            let (at, why) = match by_size {
                Some(at) => (at, "size"),
                None if *streak >= settings.hot_checks.max(1) && !split_by_load => {
                    match load_split_point(&sample, &bounds) {
                        Some(at) => (at, "load"),
                        None => {
                            tracing::debug!(
                                range = group.id,
                                rate,
                                "hot, but no key halves its writes"
                            );
                            continue;
                        }
                    }
                }
                None => continue,
            };
            match inner.split_range(&group, at.clone()).await {
                Ok(_) => {
                    *streak = 0;
                    split_by_load |= why == "load";
                    tracing::info!(range = group.id, at = ?String::from_utf8_lossy(&at), rate, "split by {why}")
                }
                Err(e) => tracing::warn!(range = group.id, "split by {why}: {e}"),
            }
        }
        meter.forget_older_than(now);
        hot.retain(|id, _| meter.knows(*id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bounds(start: &str, end: &str) -> Bounds {
        Bounds {
            start: start.as_bytes().to_vec(),
            end: end.as_bytes().to_vec(),
            epoch: 1,
        }
    }

    fn keys(spec: &[(&str, usize)]) -> Vec<Vec<u8>> {
        spec.iter()
            .flat_map(|(k, n)| std::iter::repeat_n(k.as_bytes().to_vec(), *n))
            .collect()
    }

    /// The load of `ranges` even ranges at `rate` on `nodes` nodes, at a node leading `led`.
    fn even(ranges: usize, nodes: usize, led: usize, rate: f64) -> WriteLoad {
        WriteLoad {
            range: rate,
            leader: led as f64 * rate,
            node_share: ranges as f64 * rate / nodes as f64,
        }
    }

    #[test]
    fn a_load_split_needs_an_overloaded_leader_and_half_a_nodes_share() {
        // Even ranges that leader balancing spreads by count: 3 on 3 nodes (1/1/1), 6 (2/2/2),
        // 8 (3/3/2, the node with 3 an eighth over its share).
        assert!(!load_split_spreads(even(3, 3, 1, 2_000.0)));
        assert!(!load_split_spreads(even(6, 3, 2, 2_000.0)));
        assert!(!load_split_spreads(even(8, 3, 3, 2_000.0)));
        // 4 on 3 (2/1/1): the node leading two is half again over its share and splits; the
        // others do not. The 5 ranges after (2/2/1, one of them half a range) are spread.
        assert!(load_split_spreads(even(4, 3, 2, 2_000.0)));
        assert!(!load_split_spreads(even(4, 3, 1, 2_000.0)));
        let five = WriteLoad {
            range: 2_000.0,
            leader: 3_000.0,
            node_share: 8_000.0 / 3.0,
        };
        assert!(!load_split_spreads(five));
        // One hot range among cold ones (6,000 of the 7,400 writes/s), its leader leading two
        // cold ones as well.
        let hot = WriteLoad {
            range: 6_000.0,
            leader: 6_400.0,
            node_share: 7_400.0 / 3.0,
        };
        assert!(load_split_spreads(hot));
        // ... but not a lukewarm one beside it: a small piece of its leader's load.
        assert!(!load_split_spreads(WriteLoad {
            range: 200.0,
            ..hot
        }));
        // 10 nodes, 5 hot ranges at 3,000 writes/s, one per leader.
        assert!(load_split_spreads(even(5, 10, 1, 3_000.0)));
        // Before placement has seen any writes, nothing splits by load.
        assert!(!load_split_spreads(WriteLoad {
            node_share: 0.0,
            ..hot
        }));
    }

    #[test]
    fn load_split_halves_the_sampled_writes() {
        let sample = keys(&[("a", 10), ("b", 10), ("c", 10), ("d", 10)]);
        assert_eq!(
            load_split_point(&sample, &bounds("", "")),
            Some(b"c".to_vec())
        );
        // Samples outside the range (written before an earlier split) do not count.
        let mut sample = keys(&[("m", 8), ("n", 8), ("o", 8), ("p", 8)]);
        sample.extend(keys(&[("z", 100)]));
        assert_eq!(
            load_split_point(&sample, &bounds("m", "q")),
            Some(b"o".to_vec())
        );
    }

    #[test]
    fn one_hot_key_or_too_few_samples_do_not_split() {
        assert_eq!(
            load_split_point(&keys(&[("k", 100)]), &bounds("", "")),
            None
        );
        // Nine tenths on one key: no split leaves a quarter on each side.
        let sample = keys(&[("a", 5), ("k", 90), ("z", 5)]);
        assert_eq!(load_split_point(&sample, &bounds("", "")), None);
        let few = keys(&[("a", 5), ("b", 5)]);
        assert_eq!(load_split_point(&few, &bounds("", "")), None);
        // The range's first key is never a split point.
        let at_start = keys(&[("m", 20), ("n", 20)]);
        assert_eq!(
            load_split_point(&at_start, &bounds("m", "")),
            Some(b"n".to_vec())
        );
        assert_eq!(
            load_split_point(&keys(&[("m", 40)]), &bounds("m", "")),
            None
        );
    }

    proptest! {
        /// The naive reference: a load split point leaves at least a quarter of the in-range
        /// samples on each side, is strictly inside the range, and none exists exactly when no
        /// sampled key does that.
        #[test]
        fn load_split_point_agrees_with_naive(
            picks in proptest::collection::vec(0u8..12, 0..80),
        ) {
            let sample: Vec<Vec<u8>> = picks.iter().map(|p| vec![b'a' + p]).collect();
            let b = bounds("c", "k");
            let inside: Vec<&Vec<u8>> = sample.iter().filter(|k| b.contains(k)).collect();
            let n = inside.len();
            let fair = |k: &[u8]| {
                let below = inside.iter().filter(|s| s.as_slice() < k).count();
                b.splits_at(k) && below * 4 >= n && (n - below) * 4 >= n
            };
            let exists = n >= LOAD_SAMPLES_MIN && inside.iter().any(|k| fair(k));
            match load_split_point(&sample, &b) {
                Some(at) => prop_assert!(exists && fair(&at), "{at:?} is not a fair split"),
                None => prop_assert!(!exists, "a fair split exists"),
            }
        }
    }
}
