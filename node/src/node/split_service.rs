//! Automatic splits by size: every [`SplitSettings::check_interval_ms`] each node looks at
//! the ranges it leads and splits one that holds more keys, or more bytes, than its threshold,
//! at the key that halves its key count.
//!
//! The decision ([`split_point`]) is a pure function of the range's state and the thresholds;
//! the loop only carries it out, one split per range per round, through the same path as an
//! operator's `concordctl range split`. A split point is always strictly inside the range (the
//! middle of at least two keys), so a split never makes an empty half that would split again.
//! Load-based splits and merges back are the placement service's, which does not exist yet.

use std::sync::Weak;
use std::time::Duration;

use super::{NodeInner, PLACEMENT_GROUP};
use crate::mvcc::Mvcc;

/// When a range splits by size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitSettings {
    /// Split a range holding more keys than this (live or with history); 0 = never.
    pub keys_max: u64,
    /// Split a range whose keys and stored values take more bytes than this; 0 = never.
    pub bytes_max: u64,
    /// How often a node looks at the ranges it leads, in milliseconds; 0 turns it off.
    pub check_interval_ms: u64,
}

impl Default for SplitSettings {
    /// 200,000 keys or 64 MiB, looked at every 5 s (sizes for a coordination store, where a
    /// range's whole state is in memory and travels as one snapshot).
    fn default() -> Self {
        Self {
            keys_max: 200_000,
            bytes_max: 64 << 20,
            check_interval_ms: 5_000,
        }
    }
}

/// The key to split `mvcc` at, if it is past a threshold of `settings`: its middle key.
pub fn split_point(mvcc: &Mvcc, settings: &SplitSettings) -> Option<Vec<u8>> {
    let keys = mvcc.key_count() as u64;
    let too_many = settings.keys_max != 0 && keys > settings.keys_max;
    let too_big = settings.bytes_max != 0 && mvcc.stored_bytes() > settings.bytes_max;
    if !(too_many || too_big) {
        return None;
    }
    mvcc.middle_key()
}

/// Splits the ranges this node leads that `split_point` picks, until the node goes.
pub(super) async fn split_loop(inner: Weak<NodeInner>, settings: SplitSettings) {
    if settings.check_interval_ms == 0 {
        return;
    }
    let mut ticker = super::ticker(Duration::from_millis(settings.check_interval_ms));
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        for group in inner.groups() {
            if group.id == PLACEMENT_GROUP || !group.raft.is_leader() {
                continue;
            }
            let at = {
                let state = group.state.read().expect("range state lock");
                split_point(&state.mvcc, &settings)
            };
            let Some(at) = at else { continue };
            match inner.split_range(&group, at.clone()).await {
                Ok(_) => {
                    tracing::info!(range = group.id, at = ?String::from_utf8_lossy(&at), "split by size")
                }
                Err(e) => tracing::warn!(range = group.id, "split by size: {e}"),
            }
        }
    }
}
