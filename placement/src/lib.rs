//! Range-table types, the static bootstrap layout, and leader balancing.
//!
//! A *range* is a half-open key interval `[start, end)`; an empty `end` means "to the end of
//! the keyspace". Each range is replicated by its own Raft group. This crate holds the table
//! that maps keys to ranges, and the pure decisions of the placement service (DESIGN.md,
//! "Placement"): which leaders to move ([`balance`]), which replicas to move ([`replicas`]) and
//! which ranges to merge ([`merges`]).
//! The service itself (heartbeats, the replicated registry, carrying moves out) runs in the
//! node.
//!
//! **Invariant:** the ranges of a table are sorted, contiguous and non-overlapping, and cover
//! the whole keyspace: the first starts at `""`, each starts where the previous ends, the last
//! ends at `""` (unbounded). [`RangeTable::new`] checks it.

#![warn(missing_docs)]

use serde::{Deserialize, Serialize};

pub mod balance;
pub mod merges;
pub mod replicas;

/// Identifies a range (and the Raft group that replicates it) within a cluster.
pub type RangeId = u64;

/// Identifies a node (one `concord` process, or one node of `concord dev`).
pub type NodeId = u64;

/// One key interval and what replicates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeDescriptor {
    /// The range's id, also the id of its Raft group.
    pub id: RangeId,
    /// First key of the range, inclusive.
    #[serde(with = "serde_bytes")]
    pub start: Vec<u8>,
    /// First key after the range, exclusive; empty means unbounded.
    #[serde(with = "serde_bytes")]
    pub end: Vec<u8>,
    /// Bumped by every split, merge or replica change, so that a client holding an old
    /// descriptor is told `StaleEpoch` instead of being served by the wrong range.
    pub epoch: u64,
    /// The nodes holding a replica of this range.
    pub replicas: Vec<NodeId>,
}

/// Whether `key` lies in `[start, end)` (`end` empty = unbounded).
pub fn key_within(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    key >= start && (end.is_empty() || key < end)
}

/// Whether the interval `[from, to)` lies in `[start, end)` (either end empty = unbounded).
pub fn interval_within(from: &[u8], to: &[u8], start: &[u8], end: &[u8]) -> bool {
    key_within(from, start, end) && (end.is_empty() || (!to.is_empty() && to <= end))
}

impl RangeDescriptor {
    /// Whether `key` falls inside this range.
    pub fn contains(&self, key: &[u8]) -> bool {
        key_within(key, &self.start, &self.end)
    }

    /// Whether every key of the interval `[from, to)` (`to` empty = unbounded) is inside.
    pub fn covers(&self, from: &[u8], to: &[u8]) -> bool {
        interval_within(from, to, &self.start, &self.end)
    }

    /// Whether this range intersects the interval `[start, end)` (`end` empty = unbounded).
    pub fn overlaps(&self, start: &[u8], end: &[u8]) -> bool {
        let starts_before_end = end.is_empty() || self.start.as_slice() < end;
        let ends_after_start = self.end.is_empty() || self.end.as_slice() > start;
        starts_before_end && ends_after_start
    }

    /// The part of `[start, end)` inside this range, as a `[start, end)` pair.
    pub fn clip(&self, start: &[u8], end: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let lo = if start < self.start.as_slice() {
            self.start.clone()
        } else {
            start.to_vec()
        };
        let hi = match (end.is_empty(), self.end.is_empty()) {
            (true, _) => self.end.clone(),
            (false, true) => end.to_vec(),
            (false, false) => end.min(self.end.as_slice()).to_vec(),
        };
        (lo, hi)
    }
}

/// A table violated the invariant in the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The table has no ranges.
    #[error("a range table needs at least one range")]
    Empty,
    /// The first range does not start at the empty key.
    #[error("the first range must start at the empty key")]
    FirstNotAtStart,
    /// Range `id` does not start where its predecessor ends.
    #[error("range {id} does not start where the previous range ends")]
    Gap {
        /// The range at fault.
        id: RangeId,
    },
    /// The last range is bounded.
    #[error("the last range must be unbounded")]
    LastBounded,
    /// A range has `start >= end`.
    #[error("range {id} is empty or inverted")]
    Inverted {
        /// The range at fault.
        id: RangeId,
    },
}

/// The ranges of a cluster, in key order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeTable {
    ranges: Vec<RangeDescriptor>,
}

impl RangeTable {
    /// Builds a table, checking the invariant of the module documentation.
    pub fn new(ranges: Vec<RangeDescriptor>) -> Result<Self, LayoutError> {
        let first = ranges.first().ok_or(LayoutError::Empty)?;
        if !first.start.is_empty() {
            return Err(LayoutError::FirstNotAtStart);
        }
        for pair in ranges.windows(2) {
            if pair[0].end.is_empty() || pair[0].end != pair[1].start {
                return Err(LayoutError::Gap { id: pair[1].id });
            }
        }
        for r in &ranges {
            if !r.end.is_empty() && r.start >= r.end {
                return Err(LayoutError::Inverted { id: r.id });
            }
        }
        if !ranges.last().expect("non-empty").end.is_empty() {
            return Err(LayoutError::LastBounded);
        }
        Ok(Self { ranges })
    }

    /// All ranges, in key order.
    pub fn ranges(&self) -> &[RangeDescriptor] {
        &self.ranges
    }

    /// The range with this id.
    pub fn get(&self, id: RangeId) -> Option<&RangeDescriptor> {
        self.ranges.iter().find(|r| r.id == id)
    }

    /// The range holding `key` (binary search; see [`locate_naive`] for the reference).
    pub fn locate(&self, key: &[u8]) -> &RangeDescriptor {
        // The first range whose start is > key; the one before it holds the key.
        let after = self.ranges.partition_point(|r| r.start.as_slice() <= key);
        &self.ranges[after
            .checked_sub(1)
            .expect("the first range starts at the empty key")]
    }

    /// The ranges intersecting `[start, end)` (`end` empty = unbounded), in key order.
    pub fn overlapping<'a>(
        &'a self,
        start: &'a [u8],
        end: &'a [u8],
    ) -> impl Iterator<Item = &'a RangeDescriptor> + 'a {
        let first = self
            .ranges
            .partition_point(|r| r.start.as_slice() <= start)
            .saturating_sub(1);
        self.ranges[first..]
            .iter()
            .take_while(move |r| end.is_empty() || r.start.as_slice() < end)
            .filter(move |r| r.overlaps(start, end))
    }

    /// Whether this table is a newer view than `other`, judged key by key. A split or merge
    /// gives its outcome an epoch above its inputs' (the epoch of the range holding a key
    /// only grows), so over every pair of overlapping ranges a newer view of the
    /// same history is ahead somewhere and behind nowhere. Two views that each saw a change the
    /// other missed are judged by which is ahead on more pairs. (The sum of epochs is no
    /// measure: a merge lowers it.)
    pub fn is_newer_than(&self, other: &RangeTable) -> bool {
        let (mut ahead, mut behind) = (0usize, 0usize);
        for mine in &self.ranges {
            for theirs in other.overlapping(&mine.start, &mine.end) {
                match mine.epoch.cmp(&theirs.epoch) {
                    std::cmp::Ordering::Greater => ahead += 1,
                    std::cmp::Ordering::Less => behind += 1,
                    std::cmp::Ordering::Equal => {}
                }
            }
        }
        ahead > behind
    }
}

/// The naive reference for [`RangeTable::locate`]: a linear scan.
pub fn locate_naive<'a>(table: &'a RangeTable, key: &[u8]) -> &'a RangeDescriptor {
    table
        .ranges()
        .iter()
        .find(|r| r.contains(key))
        .expect("a table covers the whole keyspace")
}

/// The smallest key greater than every key that starts with `prefix`: the `end` of a prefix
/// scan. An empty result means "unbounded" (the prefix is empty or all `0xff`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
}

/// Cuts the keyspace into `count` ranges, ids `1..=count`, each replicated on
/// [`replicas::REPLICATION_FACTOR`] of `nodes` (all of them when there are fewer), spread by
/// [`replicas::bootstrap_voters`].
///
/// The boundaries are single bytes spread evenly over `'0'..='z'`, where the keys of most
/// coordination workloads (paths, names, ids) begin; range 1 also holds every key below the
/// first boundary (such as `/...`) and the last range every key above. Until the placement
/// service splits ranges by size and load, keys sharing a first byte share a range.
pub fn bootstrap_layout(count: usize, nodes: &[NodeId]) -> RangeTable {
    assert!(
        (1..=64).contains(&count),
        "between 1 and 64 bootstrap ranges, got {count}"
    );
    const LOW: u32 = b'0' as u32;
    const HIGH: u32 = b'z' as u32 + 1;
    let boundary = |i: usize| vec![(LOW + (HIGH - LOW) * i as u32 / count as u32) as u8];
    let ranges = (0..count)
        .map(|i| RangeDescriptor {
            id: i as RangeId + 1,
            start: if i == 0 { Vec::new() } else { boundary(i) },
            end: if i + 1 == count {
                Vec::new()
            } else {
                boundary(i + 1)
            },
            epoch: 1,
            replicas: replicas::bootstrap_voters(i, nodes),
        })
        .collect();
    RangeTable::new(ranges).expect("the bootstrap layout satisfies the table invariant")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bootstrap_layout_covers_the_keyspace() {
        for count in 1..=64 {
            let table = bootstrap_layout(count, &[1, 2, 3]);
            assert_eq!(table.ranges().len(), count);
        }
        let table = bootstrap_layout(8, &[1, 2, 3]);
        assert_eq!(table.locate(b"").id, 1);
        assert_eq!(table.locate(b"/registry/x").id, 1);
        assert_eq!(table.locate(b"\xff\xff").id, 8);
        let ids: Vec<_> = (b'0'..=b'z').map(|b| table.locate(&[b]).id).collect();
        let mut distinct = ids.clone();
        distinct.dedup();
        assert_eq!(
            distinct.len(),
            8,
            "every bootstrap range holds some alphanumeric keys"
        );
    }

    #[test]
    fn a_view_after_a_split_or_a_merge_is_newer_than_before() {
        let r = |id, s: &[u8], e: &[u8], epoch| RangeDescriptor {
            id,
            start: s.to_vec(),
            end: e.to_vec(),
            epoch,
            replicas: vec![],
        };
        let t = |ranges| RangeTable::new(ranges).expect("table");
        let bootstrap = t(vec![r(1, b"", b"m", 1), r(2, b"m", b"", 1)]);
        let split = t(vec![
            r(1, b"", b"m", 1),
            r(2, b"m", b"t", 2),
            r(9, b"t", b"", 2),
        ]);
        // The merge lowers the sum of epochs (1 + 3 < 1 + 2 + 2) and is still newer.
        let merged = t(vec![r(1, b"", b"m", 1), r(2, b"m", b"", 3)]);
        assert!(split.is_newer_than(&bootstrap));
        assert!(merged.is_newer_than(&split));
        assert!(merged.is_newer_than(&bootstrap));
        for (a, b) in [(&bootstrap, &split), (&split, &merged), (&merged, &merged)] {
            assert!(!a.is_newer_than(b));
        }
    }

    #[test]
    fn table_rejects_gaps_and_overlaps() {
        let r = |id, s: &[u8], e: &[u8]| RangeDescriptor {
            id,
            start: s.to_vec(),
            end: e.to_vec(),
            epoch: 1,
            replicas: vec![],
        };
        assert_eq!(RangeTable::new(vec![]), Err(LayoutError::Empty));
        assert_eq!(
            RangeTable::new(vec![r(1, b"a", b"")]),
            Err(LayoutError::FirstNotAtStart)
        );
        assert_eq!(
            RangeTable::new(vec![r(1, b"", b"m"), r(2, b"n", b"")]),
            Err(LayoutError::Gap { id: 2 })
        );
        assert_eq!(
            RangeTable::new(vec![r(1, b"", b"m")]),
            Err(LayoutError::LastBounded)
        );
        assert_eq!(
            RangeTable::new(vec![r(1, b"", b"m"), r(2, b"m", b"c"), r(3, b"c", b"")]),
            Err(LayoutError::Inverted { id: 2 })
        );
    }

    #[test]
    fn prefix_end_examples() {
        assert_eq!(prefix_end(b"abc"), b"abd");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"");
        assert_eq!(prefix_end(b""), b"");
    }

    proptest! {
        #[test]
        fn locate_agrees_with_naive(count in 1usize..=64, key in proptest::collection::vec(any::<u8>(), 0..4)) {
            let table = bootstrap_layout(count, &[1]);
            prop_assert_eq!(table.locate(&key), locate_naive(&table, &key));
        }

        #[test]
        fn overlapping_agrees_with_naive(
            count in 1usize..=16,
            a in proptest::collection::vec(any::<u8>(), 0..3),
            b in proptest::collection::vec(any::<u8>(), 0..3),
        ) {
            let table = bootstrap_layout(count, &[1]);
            let (start, end) = if b.is_empty() || a < b { (a, b) } else { (b, a) };
            let fast: Vec<_> = table.overlapping(&start, &end).map(|r| r.id).collect();
            let naive: Vec<_> = table.ranges().iter().filter(|r| r.overlaps(&start, &end)).map(|r| r.id).collect();
            prop_assert_eq!(fast, naive);
        }
    }
}
