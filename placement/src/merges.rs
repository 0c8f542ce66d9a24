//! Which ranges to merge: a pure function of the range table and each range's size and load
//! (STYLE.md 1 and 11).
//!
//! **Rules.**
//! 1. A *frozen* range (a merge interrupted between its two steps) is finished first: its left
//!    neighbour is asked to merge it, whatever the sizes. (The placement service counts a range
//!    as frozen once it has been reported frozen for 10 s, so a merge under way is not raced.)
//! 2. Otherwise two neighbours merge when the right one was made by a split (the bootstrap
//!    layout an operator chose is never merged away), neither is busy (a replica move under
//!    way), both have been *small* (at or below every limit) for [`MergeLimits::after_ms`],
//!    and together they are still within every limit. Of the pairs that qualify, the one with
//!    the fewest bytes together merges; one merge at a time.
//!
//! **Why split and merge never oscillate (hysteresis).** The limits are a quarter of the split
//! thresholds ([`MergeLimits::from_split`]), so a merged range holds at most a quarter of what
//! would split it and takes at most a quarter of the writes that would; and a range must stay
//! small for `after_ms` (minutes by default) before it merges, so a load that comes and goes
//! does not merge what it split.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::RangeId;

/// What the merge planner knows of one range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeSize {
    /// The range.
    pub id: RangeId,
    /// Keys with stored history.
    pub keys: u64,
    /// Bytes of keys and values.
    pub bytes: u64,
    /// Writes per second at its leader.
    pub writes_per_sec: u64,
    /// How long it has been small (see [`is_small`]), in milliseconds; 0 if it is not.
    pub small_for_ms: u64,
    /// Whether it is frozen for a merge.
    pub frozen: bool,
    /// Whether it was made by a split (not a bootstrap range).
    pub made_by_split: bool,
}

/// Sizes and loads under which neighbours merge; 0 is no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeLimits {
    /// Keys of both together.
    pub keys_max: u64,
    /// Bytes of both together.
    pub bytes_max: u64,
    /// Writes per second of both together.
    pub writes_per_sec_max: u64,
    /// How long each must have been small; 0 turns automatic merges off.
    pub after_ms: u64,
}

impl MergeLimits {
    /// A quarter of the split thresholds (a threshold of 0, never split, stays no limit).
    pub fn from_split(
        keys_max: u64,
        bytes_max: u64,
        writes_per_sec_max: u64,
        after_ms: u64,
    ) -> Self {
        Self {
            keys_max: keys_max / 4,
            bytes_max: bytes_max / 4,
            writes_per_sec_max: writes_per_sec_max / 4,
            after_ms,
        }
    }

    fn within(&self, keys: u64, bytes: u64, writes_per_sec: u64) -> bool {
        let under = |value: u64, max: u64| max == 0 || value <= max;
        under(keys, self.keys_max)
            && under(bytes, self.bytes_max)
            && under(writes_per_sec, self.writes_per_sec_max)
    }
}

/// Whether one range is small: at or below every limit on its own.
pub fn is_small(keys: u64, bytes: u64, writes_per_sec: u64, limits: &MergeLimits) -> bool {
    limits.within(keys, bytes, writes_per_sec)
}

/// Whether the neighbours `left` and `right` may merge under rule 2.
fn mergeable(
    left: &RangeSize,
    right: &RangeSize,
    busy: &BTreeSet<RangeId>,
    limits: &MergeLimits,
) -> bool {
    limits.after_ms != 0
        && right.made_by_split
        && !left.frozen
        && !busy.contains(&left.id)
        && !busy.contains(&right.id)
        && left.small_for_ms >= limits.after_ms
        && right.small_for_ms >= limits.after_ms
        && limits.within(
            left.keys + right.keys,
            left.bytes + right.bytes,
            left.writes_per_sec + right.writes_per_sec,
        )
}

/// The range to ask for a merge of its right neighbour, if any (see the module docs).
/// `ranges` is the table in key order.
pub fn plan_merge(
    ranges: &[RangeSize],
    busy: &BTreeSet<RangeId>,
    limits: &MergeLimits,
) -> Option<RangeId> {
    if let Some(pair) = ranges.windows(2).find(|pair| pair[1].frozen) {
        return Some(pair[0].id);
    }
    ranges
        .windows(2)
        .filter(|pair| mergeable(&pair[0], &pair[1], busy, limits))
        .min_by_key(|pair| pair[0].bytes + pair[1].bytes)
        .map(|pair| pair[0].id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn range(id: RangeId, keys: u64, small_for_ms: u64) -> RangeSize {
        RangeSize {
            id,
            keys,
            bytes: keys * 100,
            writes_per_sec: 0,
            small_for_ms,
            frozen: false,
            made_by_split: id > 64,
        }
    }

    const LIMITS: MergeLimits = MergeLimits {
        keys_max: 100,
        bytes_max: 0,
        writes_per_sec_max: 50,
        after_ms: 60_000,
    };

    #[test]
    fn small_cold_neighbours_made_by_a_split_merge_smallest_first() {
        let ranges = [
            range(1, 10, 60_000),
            range(70, 10, 60_000),
            range(71, 5, 60_000),
            range(72, 1, 60_000),
        ];
        // (70, 71) has 15 keys, (71, 72) 6: the smaller pair goes first.
        assert_eq!(plan_merge(&ranges, &BTreeSet::new(), &LIMITS), Some(71));
        // Busy ranges wait: of (1, 70) and (70, 71), the second has fewer bytes.
        assert_eq!(
            plan_merge(&ranges, &BTreeSet::from([72]), &LIMITS),
            Some(70)
        );
        assert_eq!(plan_merge(&ranges, &BTreeSet::from([71]), &LIMITS), Some(1));
    }

    #[test]
    fn bootstrap_ranges_large_pairs_hot_or_young_ranges_do_not_merge() {
        let bootstrap = [range(1, 1, 60_000), range(2, 1, 60_000)];
        assert_eq!(plan_merge(&bootstrap, &BTreeSet::new(), &LIMITS), None);
        let large = [range(1, 60, 60_000), range(70, 60, 60_000)];
        assert_eq!(plan_merge(&large, &BTreeSet::new(), &LIMITS), None);
        let young = [range(1, 1, 60_000), range(70, 1, 59_999)];
        assert_eq!(plan_merge(&young, &BTreeSet::new(), &LIMITS), None);
        let mut hot = [range(1, 1, 60_000), range(70, 1, 60_000)];
        hot[0].writes_per_sec = 30;
        hot[1].writes_per_sec = 30;
        assert_eq!(plan_merge(&hot, &BTreeSet::new(), &LIMITS), None);
        let off = MergeLimits {
            after_ms: 0,
            ..LIMITS
        };
        assert_eq!(
            plan_merge(&[range(1, 1, 1), range(70, 1, 1)], &BTreeSet::new(), &off),
            None
        );
    }

    #[test]
    fn a_frozen_range_is_merged_by_its_left_neighbour_first() {
        let mut ranges = [
            range(1, 1, 60_000),
            range(70, 1, 60_000),
            range(2, 1_000, 0),
        ];
        ranges[2].frozen = true;
        let off = MergeLimits {
            after_ms: 0,
            ..LIMITS
        };
        assert_eq!(plan_merge(&ranges, &BTreeSet::from([70]), &off), Some(70));
    }

    proptest! {
        /// Against a naive reference: a merge is planned exactly when some frozen range has a
        /// left neighbour or some pair qualifies; a planned pair qualifies (or finishes a
        /// freeze) and has the fewest bytes of the qualifying pairs; and a merged range is
        /// never past a split threshold (four times the limits), so it never splits back.
        #[test]
        fn plan_merge_agrees_with_naive(
            sizes in proptest::collection::vec((0u64..60, 0u64..40, 0u64..120_000, any::<bool>()), 1..8),
        ) {
            let ranges: Vec<RangeSize> = sizes
                .iter()
                .enumerate()
                .map(|(i, (keys, writes, small_for_ms, split))| RangeSize {
                    id: if *split { 100 + i as u64 } else { 1 + i as u64 },
                    keys: *keys,
                    bytes: keys * 10,
                    writes_per_sec: *writes,
                    small_for_ms: *small_for_ms,
                    frozen: false,
                    made_by_split: *split,
                })
                .collect();
            let busy = BTreeSet::new();
            let qualifying: Vec<usize> = (1..ranges.len())
                .filter(|i| {
                    let (l, r) = (&ranges[i - 1], &ranges[*i]);
                    r.made_by_split
                        && l.small_for_ms >= LIMITS.after_ms
                        && r.small_for_ms >= LIMITS.after_ms
                        && l.keys + r.keys <= LIMITS.keys_max
                        && l.writes_per_sec + r.writes_per_sec <= LIMITS.writes_per_sec_max
                })
                .collect();
            match plan_merge(&ranges, &busy, &LIMITS) {
                None => prop_assert!(qualifying.is_empty()),
                Some(left) => {
                    let i = ranges.iter().position(|r| r.id == left).unwrap() + 1;
                    prop_assert!(qualifying.contains(&i));
                    let bytes = |i: usize| ranges[i - 1].bytes + ranges[i].bytes;
                    prop_assert!(qualifying.iter().all(|j| bytes(*j) >= bytes(i)));
                    let keys = ranges[i - 1].keys + ranges[i].keys;
                    let writes = ranges[i - 1].writes_per_sec + ranges[i].writes_per_sec;
                    prop_assert!(keys <= 4 * LIMITS.keys_max && writes <= 4 * LIMITS.writes_per_sec_max);
                }
            }
        }
    }
}
