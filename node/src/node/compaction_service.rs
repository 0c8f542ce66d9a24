//! Automatic compaction of MVCC history: every [`CompactionSettings::check_interval_ms`] each
//! node looks at the ranges it leads and compacts one whose history spans more than
//! [`CompactionSettings::keep_revisions`] revisions (and a tenth) down to that many, through
//! the same `Command::Compact` an operator's `concordctl compact` proposes.
//!
//! A range's whole state, history included, lives in memory and travels as one snapshot, and
//! its size (history included) decides when it splits: without compaction, a range written
//! without end grows without end, in memory, and splits by size though its live keys do not
//! grow (etcd bounds its history the same way, with `--auto-compaction-mode=revision`).
//! Watches and reads at a revision below the compaction point answer `COMPACTED`, as after an
//! operator's compaction. The placement group's history is left alone: it takes a few writes
//! per range change.
//!
//! The decision ([`compaction_point`]) is a pure function of the range's revision, its
//! compaction point and the setting.

use std::sync::Weak;
use std::time::Duration;

use super::{NodeInner, PLACEMENT_GROUP};
use crate::mvcc::Command;

/// Longest a compaction's proposal is waited for.
const COMPACT_TIMEOUT_MS: u64 = 3_000;

/// When a range's history is compacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactionSettings {
    /// Revisions of history a range keeps; 0 = compact only when asked.
    pub keep_revisions: u64,
    /// How often a node looks at the ranges it leads, in milliseconds; 0 turns it off.
    pub check_interval_ms: u64,
}

impl Default for CompactionSettings {
    /// 100,000 revisions, looked at every 5 s: with 256-byte values, about 28 MB of history
    /// at most per range, under half the 64 MiB a range splits at; on a range taking 1,000
    /// writes a second, a watcher may resume from a revision 100 s old.
    fn default() -> Self {
        Self {
            keep_revisions: 100_000,
            check_interval_ms: 5_000,
        }
    }
}

/// The revision to compact a range at `revision`, compacted at `compacted`, to keep `keep`
/// revisions of history: `revision - keep`, once that is more than a tenth of `keep` past
/// `compacted` (a busy range compacts in steps, not at every check); `None` when `keep` is 0.
pub fn compaction_point(revision: u64, compacted: u64, keep: u64) -> Option<u64> {
    if keep == 0 {
        return None;
    }
    let at = revision.checked_sub(keep)?;
    (at > compacted.saturating_add((keep / 10).max(1))).then_some(at)
}

/// Compacts the history of the ranges this node leads that [`compaction_point`] picks, until
/// the node goes.
pub(super) async fn compaction_loop(inner: Weak<NodeInner>, settings: CompactionSettings) {
    if settings.check_interval_ms == 0 || settings.keep_revisions == 0 {
        return;
    }
    let mut ticker = super::ticker(Duration::from_millis(settings.check_interval_ms));
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        for group in inner.groups() {
            if group.id == PLACEMENT_GROUP
                || !group.raft.is_leader()
                || !group.has_state()
                || group.frozen()
            {
                continue;
            }
            let (revision, compacted) = {
                let state = group.state.read().expect("range state lock");
                (state.mvcc.revision(), state.mvcc.compact_revision())
            };
            let Some(at) = compaction_point(revision, compacted, settings.keep_revisions) else {
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
        // A small setting still compacts in steps of at least one revision.
        assert_eq!(compaction_point(10, 0, 5), Some(5));
        assert_eq!(compaction_point(10, 4, 5), None);
    }

    proptest! {
        /// A compaction point keeps exactly `keep` revisions, moves the compaction point
        /// forward, and is missing only while the history spans at most `keep` and a tenth.
        #[test]
        fn keeps_what_it_is_asked_to(
            revision in 0u64..1_000_000,
            compacted in 0u64..1_000_000,
            keep in 1u64..100_000,
        ) {
            let compacted = compacted.min(revision);
            match compaction_point(revision, compacted, keep) {
                Some(at) => {
                    prop_assert_eq!(revision - at, keep);
                    prop_assert!(at > compacted);
                }
                None => prop_assert!(revision - compacted <= keep + (keep / 10).max(1)),
            }
        }
    }
}
