//! Merges: the leader of a range takes in its right neighbour (see `mvcc`, "Merges").
//!
//! 1. It asks the neighbour's leader to **freeze** the neighbour ([`Command::Freeze`]). From
//!    that entry on the neighbour serves nothing (`Merging`: clients wait for the merge, then
//!    send their requests to this range; its watchers move on), so its applied state is
//!    final; the leader answers with that state, encoded.
//! 2. It proposes [`Command::Merge`] with that state to its own group. Once applied, the range
//!    holds the neighbour's keys, histories and leases, at a higher epoch.
//! 3. The neighbour's replicas are destroyed by the replica GC loop (`replica_service`) once
//!    the placement view shows another range covering its keys.
//!
//! Every step can be repeated: a freeze into the same range and a merge already applied are
//! answered again without a change. A merge interrupted between the two steps leaves the
//! neighbour frozen; the placement scheduler sees it and asks the range ending where it starts
//! to merge it (the only range that can: a merge checks adjacency when it applies).

use concord_transport::api::{ApiError, FrozenResponse, KvRequest, KvResponse, RangeId};

use super::{not_leader, Group, NodeInner, UnderWay};

/// The largest range a freeze accepts, in bytes of keys and values: its whole state travels in
/// one peer message and one Raft entry of the merging range (well under the peer frame limit,
/// so a freeze never leaves a range frozen that no merge can take in).
pub const MERGE_BYTES_MAX: u64 = 256 << 20;
use crate::mvcc::{Command, Mvcc};
use crate::network::{PeerReply, PeerRequest};
use crate::storage::{decode, encode};

impl NodeInner {
    /// Serves a range operation at the range's leader: a replica move, a merge or a freeze.
    pub(super) async fn operate(
        &self,
        group: &Group,
        request: KvRequest,
    ) -> Result<KvResponse, ApiError> {
        match request {
            KvRequest::MoveReplica { from, to } => self.move_replica(group, from, to).await,
            KvRequest::Merge => self.merge_right_neighbour(group).await,
            KvRequest::Freeze { into } => self.freeze(group, into).await,
            other => Err(ApiError::InvalidRequest(format!(
                "{other:?} is not a range operation"
            ))),
        }
    }

    /// Freezes `group` for a merge into `into` and answers with its final state.
    async fn freeze(&self, group: &Group, into: RangeId) -> Result<KvResponse, ApiError> {
        let (frozen_here, bytes) = {
            let state = group.state.read().expect("range state lock");
            let mvcc = &state.mvcc;
            (
                mvcc.lineage().frozen_into == Some(into),
                mvcc.stored_bytes(),
            )
        };
        if !frozen_here && bytes > MERGE_BYTES_MAX {
            return Err(ApiError::InvalidRequest(format!(
                "range {} holds {bytes} bytes: a merge takes in at most {MERGE_BYTES_MAX}",
                group.id
            )));
        }
        let header = self
            .propose(group, Command::Freeze { into })
            .await?
            .header();
        // Applied here (the proposal's answer comes from this leader's apply): the state no
        // longer changes, unless another freeze retargeted it meanwhile.
        let state: Mvcc = {
            let state = group.state.read().expect("range state lock");
            if state.mvcc.lineage().frozen_into != Some(into) {
                return Err(ApiError::Unavailable {
                    range_id: group.id,
                    reason: "frozen for another merge meanwhile".into(),
                });
            }
            state.mvcc.clone()
        };
        let state = tokio::task::spawn_blocking(move || encode(&state))
            .await
            .map_err(|e| ApiError::Internal(format!("encoding a frozen range: {e}")))?;
        Ok(KvResponse::Frozen(FrozenResponse { header, state }))
    }

    /// Merges the right neighbour of `group` (led here) into it.
    async fn merge_right_neighbour(&self, group: &Group) -> Result<KvResponse, ApiError> {
        let range_id = group.id;
        if let Err(f) = group.raft.as_leader() {
            return Err(not_leader(range_id, f.leader_id));
        }
        let _under_way = UnderWay::new(&group.merges_under_way);
        let end = {
            let state = group.state.read().expect("range state lock");
            // A range frozen into its own left neighbour merges nothing.
            if state.mvcc.frozen() {
                return Err(state.mvcc.bounds().stale(range_id));
            }
            state.mvcc.bounds().end.clone()
        };
        if end.is_empty() {
            return Err(ApiError::InvalidRequest(format!(
                "range {range_id} is the last range: it has no right neighbour"
            )));
        }
        let right = self.table().locate(&end).clone();
        if right.start != end || right.id == range_id {
            return Err(ApiError::Unavailable {
                range_id,
                reason: "this node's range table does not show the right neighbour yet".into(),
            });
        }
        let into = range_id;
        let frozen = self
            .at_leader(
                right.id,
                |neighbour| async move { self.freeze(&neighbour, into).await },
                PeerRequest::Operate(KvRequest::Freeze { into }),
                |reply| match reply {
                    PeerReply::Operated(result) => Ok(result),
                    other => Err(other),
                },
            )
            .await?;
        let KvResponse::Frozen(frozen) = frozen else {
            return Err(ApiError::Internal(format!(
                "unexpected answer to a freeze: {frozen:?}"
            )));
        };
        // The fault tests hold the neighbour frozen here for a while, as the transfer of a
        // large range does (`merge-after-freeze`, `return(MS)`: MS milliseconds).
        if let Some(pause) = merge_pause() {
            tokio::time::sleep(pause).await;
        }
        let right_state: Mvcc = tokio::task::spawn_blocking(move || decode(&frozen.state))
            .await
            .map_err(|e| ApiError::Internal(format!("decoding a frozen range: {e}")))?
            .map_err(|e| ApiError::Internal(format!("decoding a frozen range: {e}")))?;
        let merged = self
            .propose(
                group,
                Command::Merge {
                    right: Box::new(right_state),
                },
            )
            .await?;
        tracing::info!(range = range_id, merged = right.id, "merged");
        self.complete_table();
        Ok(merged)
    }
}

/// How long the `merge-after-freeze` fail point holds a merge between the freeze and the
/// merge entry; `None` unless armed (always, without the `failpoints` feature).
fn merge_pause() -> Option<std::time::Duration> {
    fail::fail_point!("merge-after-freeze", |ms: Option<String>| ms
        .and_then(|ms| ms.parse().ok())
        .map(std::time::Duration::from_millis));
    None
}
