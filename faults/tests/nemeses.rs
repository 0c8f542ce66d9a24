//! The fixed-seed selection of fault campaigns that `cargo test` runs (the `concord` binary of
//! a test build has its fail points, see `concord-node`'s `failpoints` feature): a 3-node cluster on
//! test hosts in network namespaces (root required, as in CI), each campaign short, each
//! checked for linearizability per key, which includes that no acknowledged write is lost
//! (the final reads after healing must see it), for the watch guarantees and for mutual
//! exclusion under fenced writes and for lease expiry (never early, never late beyond the
//! bound). A failing campaign leaves its history, faults and node logs under `target/tmp/`
//! and names its seed; `concord-faults run --seed` replays it. The long randomized campaign is
//! `concord-faults run` (docs/reliability.md).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use concord_client::api::Consistency;
use concord_faults::campaign::{self, Config};
use concord_faults::nemesis::{Kind, MERGE_POINTS, MOVE_POINTS, SPLIT_POINTS};

mod common;
use common::concord_bin;

/// One campaign at a time: each is a cluster of processes on a 2-core machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// What a campaign that passed leaves to look at.
struct Passed {
    /// The node logs, concatenated.
    logs: String,
    /// The faults as applied (`faults.jsonl`).
    faults: String,
    /// What the checkers found (all passed).
    outcome: campaign::Outcome,
}

/// Runs a campaign on 3 nodes; on success returns what it left.
fn campaign(name: &str, seed: u64, nemeses: &[Kind], duration: Duration) -> Passed {
    campaign_on(3, name, seed, nemeses, duration)
}

/// Runs a campaign on `nodes` nodes.
fn campaign_on(
    nodes: usize,
    name: &str,
    seed: u64,
    nemeses: &[Kind],
    duration: Duration,
) -> Passed {
    let settings = NodeSettings {
        down_after: Duration::from_secs(30),
        ranges: 4,
        args: &[],
    };
    campaign_with(nodes, name, seed, nemeses, duration, settings)
}

/// How a campaign's nodes are started.
struct NodeSettings<'a> {
    /// `concord node --down-after`.
    down_after: Duration,
    /// `concord node --ranges`: the ranges a new cluster starts with.
    ranges: u32,
    /// More `concord node` arguments.
    args: &'a [&'a str],
}

/// Runs a campaign on `nodes` nodes started with `settings`.
fn campaign_with(
    nodes: usize,
    name: &str,
    seed: u64,
    nemeses: &[Kind],
    duration: Duration,
    settings: NodeSettings,
) -> Passed {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        concord_faults::netns::available(),
        "these tests create network namespaces: run them as root with iproute2 installed"
    );
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{seed}"));
    let _ = std::fs::remove_dir_all(&out);
    let config = Config {
        seed,
        duration,
        nemeses: nemeses.to_vec(),
        nodes,
        ranges: settings.ranges,
        clients: 6,
        lock_clients: 3,
        lease_clients: 2,
        keys: 12,
        reads: Consistency::Linearizable,
        request_timeout: Duration::from_secs(2),
        down_after: settings.down_after,
        node_args: settings.args.iter().map(|a| a.to_string()).collect(),
        concord: concord_bin(),
        out: out.clone(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let outcome = runtime
        .block_on(campaign::run(&config))
        .unwrap_or_else(|e| {
            panic!(
                "campaign {name} (seed {seed}) failed to run: {e:#}; files in {}",
                out.display()
            )
        });
    assert!(
        outcome.passed(),
        "seed {seed}: {outcome:?}; history, faults and node logs in {}",
        out.display()
    );
    // A campaign whose clients or faults did nothing would pass without testing anything.
    assert!(
        outcome.ops >= 100,
        "only {} operations: {outcome:?}",
        outcome.ops
    );
    assert!(
        outcome.faults >= 2,
        "only {} faults: {outcome:?}",
        outcome.faults
    );
    assert!(
        outcome.watch_responses > 0,
        "the watch saw nothing: {outcome:?}"
    );
    assert!(
        outcome.lock_attempts > 0,
        "no lock was acquired: {outcome:?}"
    );
    assert!(
        outcome.lease_lateness.count > 0,
        "no lease expired: {outcome:?}"
    );
    let mut logs = String::new();
    for entry in std::fs::read_dir(out.join("cluster")).expect("cluster dir") {
        let path = entry.expect("cluster dir entry").path();
        if path.extension().is_some_and(|e| e == "log") {
            logs.push_str(&std::fs::read_to_string(&path).expect("node log"));
        }
    }
    let faults = std::fs::read_to_string(out.join("faults.jsonl")).expect("faults.jsonl");
    let _ = std::fs::remove_dir_all(&out);
    Passed {
        logs,
        faults,
        outcome,
    }
}

#[test]
fn kills_and_pauses_keep_every_key_linearizable() {
    campaign(
        "kills-and-pauses",
        1,
        &[Kind::Kill, Kind::KillAll, Kind::Pause],
        Duration::from_secs(25),
    );
}

#[test]
fn partitions_keep_every_key_linearizable() {
    campaign(
        "partitions",
        2,
        &[Kind::Partition, Kind::IsolateLeader, Kind::Bridge],
        Duration::from_secs(25),
    );
}

#[test]
fn a_slow_lossy_reordering_network_keeps_every_key_linearizable() {
    let Passed { faults, .. } = campaign(
        "lossy-reorder",
        3,
        &[Kind::Lossy, Kind::Reorder],
        Duration::from_secs(20),
    );
    assert!(faults.contains("Reorder"), "no link reordered:\n{faults}");
}

#[test]
fn crashes_at_storage_fail_points_keep_every_key_linearizable() {
    campaign(
        "crash-points",
        4,
        &[Kind::CrashPoint],
        Duration::from_secs(20),
    );
}

#[test]
fn a_full_disk_and_skewed_wall_clocks_keep_every_key_linearizable() {
    let Passed { logs, .. } = campaign(
        "disk-and-clock",
        5,
        &[Kind::DiskFull, Kind::Clock],
        Duration::from_secs(25),
    );
    // The full disk was felt: a node stopped on a failed write rather than carrying on.
    assert!(
        logs.contains("write of the node's store failed"),
        "no node saw its disk full"
    );
}

#[test]
fn splits_merges_and_moves_with_crashes_keep_every_key_linearizable() {
    // Four nodes, so that a range (three replicas) has somewhere to move.
    let Passed { faults, logs, .. } = campaign_on(
        4,
        "reshape",
        86,
        &[Kind::Split, Kind::Merge, Kind::Move, Kind::Kill],
        Duration::from_secs(45),
    );
    // Each kind was asked for; an operation whose node crashed right after applying it goes
    // through unanswered (the client times out), so not every one can say "done".
    for operation in ["split range", "merge range", "move range"] {
        assert!(
            faults.contains(operation),
            "no {operation} was asked for:\n{faults}"
        );
    }
    assert!(
        faults.lines().any(|f| f.contains(": done")),
        "no split, merge or move went through:\n{faults}"
    );
    let structural = SPLIT_POINTS.iter().chain(&MERGE_POINTS).chain(&MOVE_POINTS);
    let crashed = structural
        .filter(|p| **p != "snapshot-install")
        .any(|p| logs.contains(&format!("fail point {p}: crashing")));
    assert!(
        crashed,
        "no node crashed at a split, merge or move fail point:\n{faults}"
    );
}

#[test]
fn a_node_down_past_down_after_and_splits_by_load_keep_every_key_linearizable() {
    // Four nodes, so that a down node's replicas have somewhere to go; nodes call a node down
    // after 3 s and split a range past 5 writes a second (sustained over three 5 s checks).
    // Two ranges to start with: each leader carries every write of its range, twice a node's
    // share, so a split spreads load (even ranges, one led per node, would not split); their
    // 6 replicas put one on every node.
    let settings = NodeSettings {
        down_after: Duration::from_secs(3),
        ranges: 2,
        args: &["--split-writes=5"],
    };
    let Passed {
        faults, outcome, ..
    } = campaign_with(
        4,
        "down",
        7,
        &[Kind::Down, Kind::Kill],
        Duration::from_secs(50),
        settings,
    );
    // At least one down node had replicas re-created elsewhere while it was away.
    let replicas = |line: &str, part: &str| -> Option<u64> {
        let rest = &line[line.find(part)? + part.len()..];
        let rest = &rest[rest.find(" with ")? + 6..];
        rest.split(' ').next()?.parse().ok()
    };
    let recreated = faults.lines().any(|line| {
        match (
            replicas(line, "before "),
            replicas(line, "when it returns "),
        ) {
            (Some(before), Some(after)) => after < before,
            _ => false,
        }
    });
    assert!(
        recreated,
        "no down node lost replicas to the others:\n{faults}"
    );
    // The clients' load split a range on its own: the final table holds a range besides the
    // bootstrap ones (ids 1 and 2).
    assert!(
        outcome.final_ranges.iter().any(|id| *id > 2),
        "no range split by load: ranges {:?}",
        outcome.final_ranges
    );
}
