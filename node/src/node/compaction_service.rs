//! Automatic compaction of MVCC history: every [`CompactionSettings::check_interval_ms`] each
//! node looks at the ranges it leads and compacts one whose history spans more than
//! [`CompactionSettings::history_revisions`] revisions (and a tenth) down to that many, through
//! the same `Command::Compact` an operator's `concordctl compact` proposes.
//!
//! A range's whole state, history included, lives in memory and travels as one snapshot, and
//! its size (history included) decides when it splits: without compaction, a range written
//! without end grows without end, in memory, and splits by size though its live keys do not
//! grow (etcd bounds its history the same way, with `--auto-compaction-mode=revision`). The
//! bound is in versions (at most `history_revisions` and a tenth, plus a check's writes), so in
//! bytes it scales with the values' size.
//! Watches and reads at a revision below the compaction point answer `COMPACTED`, as after an
//! operator's compaction. The placement group's history is left alone: it takes a few writes
//! per range change.
//!
//! The decision ([`compaction_point`]) is a pure function of the range's revision, its
//! compaction point and the setting.

use std::sync::Weak;
use std::time::Duration;

use super::NodeInner;
use crate::mvcc::Command;

/// Most revisions one compaction drops: one Raft entry, one RocksDB batch and one pass over
/// the range's index under its state lock stay bounded (the first compaction of a long
/// history, or after `--history-revisions` was lowered, goes in steps, one per check). At one
/// step per 5 s check, 20,000 writes a second on one range, past what one Raft group takes.
pub const COMPACT_STEP_REVISIONS_MAX: u64 = 100_000;

/// Longest a compaction's proposal is waited for.
const COMPACT_TIMEOUT_MS: u64 = 3_000;

/// When a range's history is compacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactionSettings {
    /// Revisions of history a range keeps; 0 = compact only when asked.
    pub history_revisions: u64,
    /// How often a node looks at the ranges it leads, in milliseconds; 0 turns it off.
    pub check_interval_ms: u64,
}

impl Default for CompactionSettings {
    /// 100,000 revisions, looked at every 5 s: with 256-byte values, about 28 MB of history
    /// at most per range, under half the 64 MiB a range splits at; on a range taking 1,000
    /// writes a second, a watcher may resume from a revision 100 s old.
    fn default() -> Self {
        Self {
            history_revisions: 100_000,
            check_interval_ms: 5_000,
        }
    }
}

/// The revision to compact a range at `revision`, compacted at `compacted`, to keep `keep`
/// revisions of history: `revision - keep` once that is more than a tenth of `keep` (and at
/// least 1) past `compacted`, so that a busy range compacts in steps, not at every check; no
/// further than [`COMPACT_STEP_REVISIONS_MAX`] past `compacted`. `None` when `keep` is 0.
pub fn compaction_point(revision: u64, compacted: u64, keep: u64) -> Option<u64> {
    if keep == 0 {
        return None;
    }
    let target = revision.checked_sub(keep)?;
    (target > compacted.saturating_add((keep / 10).max(1)))
        .then(|| target.min(compacted.saturating_add(COMPACT_STEP_REVISIONS_MAX)))
}

/// Compacts the history of the ranges this node leads that [`compaction_point`] picks, until
/// the node goes.
pub(super) async fn compaction_loop(inner: Weak<NodeInner>, settings: CompactionSettings) {
    if settings.check_interval_ms == 0 || settings.history_revisions == 0 {
        return;
    }
    let mut ticker = super::ticker(Duration::from_millis(settings.check_interval_ms));
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        for group in inner.led_ranges() {
            let (revision, compacted) = {
                let state = group.state.read().expect("range state lock");
                (state.mvcc.revision(), state.mvcc.compact_revision())
            };
            let Some(at) = compaction_point(revision, compacted, settings.history_revisions) else {
                continue;
            };
            let compact = inner.propose(&group, Command::Compact { revision: at });
            match tokio::time::timeout(Duration::from_millis(COMPACT_TIMEOUT_MS), compact).await {
                Ok(Ok(_)) => tracing::debug!(range = group.id, at, "history compacted"),
                // Another compaction got there first, or leadership moved: the next check
                // looks again.
                failed => tracing::debug!(range = group.id, at, "compaction: {failed:?}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn compacts_past_a_tenth_over_what_it_keeps() {
        assert_eq!(compaction_point(1_000, 0, 1_000), None, "nothing to drop");
        assert_eq!(
            compaction_point(1_100, 0, 1_000),
            None,
            "a tenth over: wait"
        );
        assert_eq!(compaction_point(1_101, 0, 1_000), Some(101));
        assert_eq!(compaction_point(1_200, 101, 1_000), None);
        assert_eq!(compaction_point(1_300, 101, 1_000), Some(300));
        assert_eq!(compaction_point(u64::MAX, 0, 0), None, "0 keeps everything");
        // A small setting compacts once the history is 2 past it (a tenth, at least 1).
        assert_eq!(compaction_point(10, 0, 5), Some(5));
        assert_eq!(compaction_point(10, 4, 5), None);
        // A long history goes in steps.
        let step = COMPACT_STEP_REVISIONS_MAX;
        assert_eq!(compaction_point(10 * step, 0, 1_000), Some(step));
        assert_eq!(compaction_point(10 * step, step, 1_000), Some(2 * step));
    }

    proptest! {
        /// A compaction point keeps at least `keep` revisions (exactly, unless the step is
        /// capped), moves the compaction point forward by at most the cap, and is missing
        /// only while the history spans at most `keep` and a tenth.
        #[test]
        fn keeps_what_it_is_asked_to(
            revision in 0u64..1_000_000,
            compacted in 0u64..1_000_000,
            keep in 1u64..100_000,
        ) {
            let compacted = compacted.min(revision);
            match compaction_point(revision, compacted, keep) {
                Some(at) => {
                    prop_assert!(at > compacted && at - compacted <= COMPACT_STEP_REVISIONS_MAX);
                    prop_assert!(
                        revision - at == keep || at - compacted == COMPACT_STEP_REVISIONS_MAX
                    );
                    prop_assert!(revision - at >= keep);
                }
                None => prop_assert!(revision - compacted <= keep + (keep / 10).max(1)),
            }
        }
    }
}
