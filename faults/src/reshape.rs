//! The structural faults: a split, a merge or a replica move asked of the cluster under
//! traffic, as an operator (or the placement service) would, sometimes with a node crashing at
//! the operation's most dangerous step ([`Crash`]). The operation may be refused or fail (a
//! leader just changed, the range is the last one, every node already holds it): the campaign
//! records what the cluster answered and goes on. What must hold is checked afterwards, as for
//! every fault: every register's history linearizable, no acknowledged write lost, the watch
//! guarantees, fencing and leases.

use std::time::Duration;

use concord_client::api::RangeLoad;
use concord_client::Client;

use crate::cluster::Cluster;
use crate::nemesis::{Crash, Fault};
use crate::workload;

/// The reshaping client's request timeout: a split, merge or move under a loaded machine
/// (CI's, with the clients and faults running) can take longer than the 5 s a client waits
/// by default, and one that timed out counts as not gone through (seed 86 once saw all five
/// of its operations time out or be refused in a full test run, and failed its check that
/// one went through).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Longest an operation may take before the campaign moves on (a merge waits for the frozen
/// range's leader, a move for its learner to catch up).
const OPERATION_MAX: Duration = Duration::from_secs(30);

/// The host of node `id` (ids count from 1).
fn host(id: u64) -> usize {
    id as usize - 1
}

/// The `voter`-th (modulo their number) replica of `range`.
fn voter_host(range: &RangeLoad, voter: usize) -> usize {
    let replicas = &range.descriptor.replicas;
    host(replicas[voter % replicas.len()])
}

/// What an operation's answer was, in a line.
fn describe<T: std::fmt::Debug, E: std::fmt::Display>(
    what: String,
    result: Result<Result<T, E>, tokio::time::error::Elapsed>,
) -> String {
    match result {
        Ok(Ok(answer)) => format!("{what}: done ({answer:?})"),
        Ok(Err(e)) => format!("{what}: refused or failed ({e})"),
        Err(_) => format!("{what}: no answer within {OPERATION_MAX:?}"),
    }
}

/// Applies a [`Fault::Split`], [`Fault::Merge`] or [`Fault::Move`] over `registers`
/// registers. Returns the hosts it crashed (or tried to) and what the cluster answered.
pub async fn apply(
    cluster: &mut Cluster,
    fault: &Fault,
    registers: u64,
) -> anyhow::Result<(Vec<usize>, String)> {
    let client = Client::connect(cluster.client_config(REQUEST_TIMEOUT)).await?;
    let report = match client.placement().await {
        Ok(report) => report,
        Err(e) => return Ok((Vec::new(), format!("no placement view: {e}"))),
    };
    let ranges = &report.ranges;
    if ranges.is_empty() {
        return Ok((Vec::new(), "no ranges in the placement view".into()));
    }
    // The node to crash and where.
    let arm = |host: usize, crash: &Crash| (host, crash.point.clone());
    let (armed, what, run) = match fault {
        Fault::Split { register, crash } => {
            let key = workload::key_of(register % registers.max(1));
            let range = ranges
                .iter()
                .find(|r| r.descriptor.contains(&key))
                .unwrap_or(&ranges[0]);
            let armed = crash.as_ref().map(|c| arm(voter_host(range, c.voter), c));
            let what = format!(
                "split range {} at {}",
                range.descriptor.id,
                String::from_utf8_lossy(&key)
            );
            (armed, what, Operation::Split(key))
        }
        Fault::Merge { range, crash } => {
            if ranges.len() < 2 {
                return Ok((Vec::new(), "one range: nothing to merge".into()));
            }
            let i = range % (ranges.len() - 1);
            let (left, right) = (&ranges[i], &ranges[i + 1]);
            // The freeze applies on the right range's replicas, the merge on the left's.
            let armed = crash.as_ref().map(|c| {
                let side = if c.point == "freeze-apply" {
                    right
                } else {
                    left
                };
                arm(voter_host(side, c.voter), c)
            });
            let what = format!(
                "merge range {} into range {}",
                right.descriptor.id, left.descriptor.id
            );
            (armed, what, Operation::Merge(left.descriptor.id))
        }
        Fault::Move { range, pick, crash } => {
            let range = &ranges[range % ranges.len()];
            let voters = &range.descriptor.replicas;
            let leaving: Vec<u64> = voters
                .iter()
                .copied()
                .filter(|v| Some(*v) != range.leader)
                .collect();
            let receiving: Vec<u64> = report
                .nodes
                .iter()
                .map(|n| n.id)
                .filter(|id| !voters.contains(id))
                .collect();
            let id = range.descriptor.id;
            if leaving.is_empty() || receiving.is_empty() {
                return Ok((
                    Vec::new(),
                    format!("range {id} on {voters:?}: no replica to move"),
                ));
            }
            let (from, to) = (
                leaving[pick % leaving.len()],
                receiving[pick % receiving.len()],
            );
            // The leader crashes between learner and voter, the new replica as it installs.
            let armed = crash.as_ref().and_then(|c| match c.point.as_str() {
                "move-learner-added" => range.leader.map(|l| arm(host(l), c)),
                _ => Some(arm(host(to), c)),
            });
            let what = format!("move range {id} from node {from} to node {to}");
            (armed, what, Operation::Move { id, from, to })
        }
        other => anyhow::bail!("{other:?} is not a split, merge or move"),
    };
    let mut outcome = String::new();
    if let Some((host, point)) = &armed {
        // A node that cannot be armed (it is catching up) just does not crash this time.
        if let Err(e) = cluster.arm_live(&client, *host, point).await {
            outcome = format!("{e:#}; ");
        } else {
            outcome = format!("{point} armed on host {host}; ");
        }
    }
    let answer = match run {
        Operation::Split(key) => describe(
            what,
            tokio::time::timeout(OPERATION_MAX, client.split(key)).await,
        ),
        Operation::Merge(id) => describe(
            what,
            tokio::time::timeout(OPERATION_MAX, client.merge(id)).await,
        ),
        Operation::Move { id, from, to } => describe(
            what,
            tokio::time::timeout(OPERATION_MAX, client.move_replica(id, from, to)).await,
        ),
    };
    outcome.push_str(&answer);
    Ok((armed.map(|(host, _)| host).into_iter().collect(), outcome))
}

/// The request a structural fault makes.
enum Operation {
    /// Split at this key.
    Split(Vec<u8>),
    /// Merge this range's right neighbour into it.
    Merge(u64),
    /// Move range `id`'s replica on `from` to `to`.
    Move { id: u64, from: u64, to: u64 },
}
