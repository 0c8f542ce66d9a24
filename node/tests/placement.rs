//! The placement service on in-process clusters: a replica moved by hand (the removed
//! replica is deleted), nodes joining and receiving replicas and leaders, a dead node's
//! replicas re-created elsewhere after `down_after`, and a decommissioned node drained (the
//! placement group's replicas included), and replicas spread in proportion to the memory each
//! node offers; in every case each acknowledged write is still readable.

mod common;

use std::collections::BTreeMap;

use common::{check_keys, eventually, join_registered, write_keys, Cluster, WAIT};
use concord_client::api::{KeySpan, NodeId};
use concord_client::Client;
use concord_node::node::PLACEMENT_GROUP;
use concord_placement::replicas::NodeState;
use concord_transport::watch::WatchRequest;

/// Waits until every range has three voters, all among `allowed`, and each node in `allowed`
/// holds between `min` and `max` of them (as node `via` sees the table, and as the nodes
/// themselves host them).
async fn wait_spread(
    cluster: &Cluster,
    client: &Client,
    via: NodeId,
    allowed: &[NodeId],
    min: usize,
    max: usize,
) {
    eventually("replicas spread", || async {
        let placement = match client.placement().await {
            Ok(r) => format!(
                "nodes {:?}, moving {:?}",
                r.nodes
                    .iter()
                    .map(|n| (n.id, n.state, n.replicas))
                    .collect::<Vec<_>>(),
                r.moves
            ),
            Err(e) => e.to_string(),
        };
        let voters = cluster.voters(via);
        let mut counts: BTreeMap<NodeId, usize> = allowed.iter().map(|n| (*n, 0)).collect();
        for (range, v) in &voters {
            if v.len() != 3 || v.iter().any(|n| !allowed.contains(n)) {
                return Err(format!("range {range} has voters {v:?}; {placement}"));
            }
            for n in v {
                *counts.entry(*n).or_default() += 1;
            }
        }
        if counts.values().any(|c| *c < min || *c > max) {
            return Err(format!("replicas per node {counts:?}"));
        }
        let hosted = cluster.hosted();
        for (range, v) in &voters {
            for n in v {
                if !hosted.get(n).is_some_and(|h| h.contains(range)) {
                    return Err(format!("node {n} does not host range {range} yet"));
                }
            }
        }
        for (n, ranges) in &hosted {
            if let Some(extra) = ranges.iter().find(|r| !voters[r].contains(n)) {
                return Err(format!("node {n} still hosts range {extra}"));
            }
        }
        Ok(())
    })
    .await;
}

/// Waits until the placement group's voters are three of `allowed`, as its leader reports
/// them, and exactly those nodes host it.
async fn wait_placement_on(cluster: &Cluster, client: &Client, allowed: &[NodeId]) {
    eventually("the placement group moved", || async {
        let report = client.placement().await.map_err(|e| e.to_string())?;
        let voters: Vec<NodeId> = report
            .nodes
            .iter()
            .filter(|n| n.placement)
            .map(|n| n.id)
            .collect();
        if voters.len() != 3 || voters.iter().any(|v| !allowed.contains(v)) {
            return Err(format!(
                "placement voters {voters:?}, moving {:?}",
                report.moves
            ));
        }
        let hosting: Vec<NodeId> = cluster
            .running()
            .filter(|n| n.hosts_placement())
            .map(|n| n.id())
            .collect();
        if hosting != voters {
            return Err(format!("voters {voters:?}, hosted by {hosting:?}"));
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_moved_by_hand_serves_and_the_old_one_is_deleted() {
    let mut cluster = Cluster::start_tuned(3, 2, |c| c.placement.schedule = false).await;
    let client = cluster.client().await;
    let acked = write_keys(&client, 60).await;
    join_registered(&mut cluster, &client, 4).await;
    let moved = client.move_replica(1, 3, 4).await.expect("move range 1");
    assert_eq!(moved.voters, vec![1, 2, 4]);
    eventually("old replica deleted", || async {
        let hosted = cluster.hosted();
        if hosted[&4].contains(&1) && !hosted[&3].contains(&1) {
            Ok(())
        } else {
            Err(format!("hosted: {hosted:?}"))
        }
    })
    .await;
    // Writes and reads go on; the moved range is readable from its new replica.
    let more = write_keys(&client, 80).await;
    check_keys(&client, &acked).await;
    check_keys(&client, &more).await;
    // The leaving voter may be the leader: the move hands leadership over first.
    let leader = cluster.leader_of(2).expect("range 2 has a leader");
    let to = if leader == 4 { 3 } else { 4 };
    let moved = client
        .move_replica(2, leader, to)
        .await
        .expect("move range 2 off its leader");
    assert!(moved.voters.contains(&to) && !moved.voters.contains(&leader));
    check_keys(&client, &more).await;
    cluster.shutdown().await;
}

/// Regression (seed 86 of `split,merge,move,kill` on 4 nodes): a range led by a node without a
/// replica of the placement group could not split: the new range's id is allocated by the
/// placement group, whose leader that node did not know ("not leader" until the client gave
/// up). It now takes the placement leader from its placement view.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_range_led_by_a_node_without_a_placement_replica_splits() {
    let mut cluster = Cluster::start(3, 4).await;
    let client = cluster.client().await;
    join_registered(&mut cluster, &client, 4).await;
    // Node 4 receives replicas and leaderships (leader balancing).
    let mut led = None;
    eventually("node 4 leads a range", || {
        led = (1..=4).find(|r| cluster.leader_of(*r) == Some(4));
        let found = led.is_some();
        async move {
            if found {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        }
    })
    .await;
    let range = led.expect("a range led by node 4");
    client.refresh_routes().await.expect("routes");
    let at = common::key_in(&client, range, 1);
    let split = client.split(at).await.expect("split a range node 4 leads");
    assert_eq!(split.header.range_id, range);
    cluster.shutdown().await;
}

/// Regression (campaign seed 6 of `split,merge,move,kill`): a watch channel on a replica that
/// was moved away held the removed group and served its last revision for ever — progress
/// bookmarks, never another event. Removing a replica now ends its channels, and the client
/// resumes at a replica the routes name.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_served_by_a_replica_moved_away_resumes_elsewhere() {
    let mut cluster = Cluster::start_tuned(3, 2, |c| c.placement.schedule = false).await;
    let client = cluster.client().await;
    join_registered(&mut cluster, &client, 4).await;
    // Range 1 ([.., "U")) on nodes 1, 2, 3: a watch channel goes to the first, node 1.
    let mut watcher = client
        .watch(WatchRequest::new(KeySpan::prefix(b"A/".to_vec())))
        .await
        .expect("watch");
    // Node 1 may lead range 1: the move hands leadership over first, and may have to be
    // asked again (a move already done answers with the voters it left).
    eventually("range 1 moved from node 1 to node 4", || async {
        match client.move_replica(1, 1, 4).await {
            Ok(moved) if moved.voters == [2, 3, 4] => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eventually("node 1's replica deleted", || async {
        let hosted = cluster.hosted();
        if hosted[&1].contains(&1) {
            Err(format!("hosted: {hosted:?}"))
        } else {
            Ok(())
        }
    })
    .await;
    let put = client
        .put(b"A/after-the-move".to_vec(), b"v".to_vec())
        .await
        .expect("put");
    let seen = tokio::time::timeout(WAIT, async {
        loop {
            let r = watcher.next().await.expect("watch open").expect("watch");
            if r.events.iter().any(|e| e.kv.key == b"A/after-the-move") {
                return r.revision;
            }
        }
    })
    .await;
    assert_eq!(
        seen.ok(),
        Some(put.header.revision),
        "the write after the move reached the watch"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joining_nodes_receive_replicas_and_leaders() {
    let mut cluster = Cluster::start(3, 8).await;
    let client = cluster.client().await;
    let acked = write_keys(&client, 100).await;
    cluster.join(4).await;
    cluster.join(5).await;
    // 8 ranges × 3 replicas over 5 nodes: 4 or 5 each (4.8 on average, at most one apart
    // plus one for the moves' granularity).
    wait_spread(&cluster, &client, 1, &[1, 2, 3, 4, 5], 4, 6).await;
    cluster.wait_balanced().await;
    check_keys(&client, &acked).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_node_is_replaced_and_a_decommissioned_node_drained() {
    // openraft warns at every heartbeat a stopped node misses: those would bury a failure's
    // message in the output CI shows.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CONCORD_LOG")
                .unwrap_or_else(|_| "warn,openraft=error".into()),
        )
        .with_test_writer()
        .try_init();
    let mut cluster = Cluster::start_tuned(5, 8, |c| c.placement.down_after_ms = 3_000).await;
    let client = cluster.client().await;
    let acked = write_keys(&client, 100).await;
    // Node 5 dies for good: after down_after its replicas live on 1..4.
    cluster.stop(5).await;
    wait_spread(&cluster, &client, 1, &[1, 2, 3, 4], 5, 7).await;
    check_keys(&client, &acked).await;
    // Node 4 is drained: every range ends on 1..3, and node 4 holds nothing.
    let report = client.decommission(4).await.expect("decommission");
    assert!(report.nodes.iter().any(|n| n.id == 4));
    wait_spread(&cluster, &client, 1, &[1, 2, 3], 8, 8).await;
    eventually("node 4 shown drained", || async {
        let report = client.placement().await.map_err(|e| e.to_string())?;
        let n4 = report.nodes.iter().find(|n| n.id == 4).cloned();
        match n4 {
            Some(n) if n.state == NodeState::Decommissioning && n.replicas == 0 => Ok(()),
            other => Err(format!("node 4: {other:?}")),
        }
    })
    .await;
    // Stopping it costs nothing.
    cluster.stop(4).await;
    let more = write_keys(&client, 40).await;
    check_keys(&client, &acked).await;
    check_keys(&client, &more).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_placement_group_leaves_a_dead_node_and_a_decommissioned_one() {
    let mut cluster = Cluster::start_tuned(5, 4, |c| c.placement.down_after_ms = 3_000).await;
    let client = cluster.client().await;
    let acked = write_keys(&client, 60).await;
    // Node 3 holds a placement replica and dies for good: the replica is re-created on node
    // 4 or 5. 4 ranges × 3 + the placement group's 3 = 15 replicas over 4 nodes.
    cluster.stop(3).await;
    wait_placement_on(&cluster, &client, &[1, 2, 4, 5]).await;
    wait_spread(&cluster, &client, 1, &[1, 2, 4, 5], 2, 4).await;
    // Node 1, bootstrap member of the placement group, is drained: it ends with nothing.
    client.decommission(1).await.expect("decommission");
    wait_placement_on(&cluster, &client, &[2, 4, 5]).await;
    wait_spread(&cluster, &client, 2, &[2, 4, 5], 4, 4).await;
    eventually("node 1 shown drained", || async {
        let report = client.placement().await.map_err(|e| e.to_string())?;
        match report.nodes.iter().find(|n| n.id == 1) {
            Some(n) if n.replicas == 0 && !n.placement => Ok(()),
            other => Err(format!("node 1: {other:?}")),
        }
    })
    .await;
    // Without either first node the placement service still answers and schedules: a
    // sixth node joins and receives replicas.
    cluster.stop(1).await;
    join_registered(&mut cluster, &client, 6).await;
    wait_spread(&cluster, &client, 2, &[2, 4, 5, 6], 2, 4).await;
    let more = write_keys(&client, 30).await;
    check_keys(&client, &acked).await;
    check_keys(&client, &more).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_without_a_placement_replica_find_its_new_leader_when_the_old_one_dies() {
    let mut cluster = Cluster::start_tuned(5, 4, |c| c.placement.down_after_ms = 3_000).await;
    // One voter of the placement group leads it, and the nodes without a replica (which know
    // its leader only from the reports their heartbeats bring back) name it.
    let placement_hosts = || -> Vec<NodeId> {
        cluster
            .running()
            .filter(|n| n.hosts_placement())
            .map(|n| n.id())
            .collect()
    };
    eventually("three placement replicas", || async {
        let hosts = placement_hosts();
        if hosts.len() == 3 {
            Ok(())
        } else {
            Err(format!("placement replicas on {hosts:?}"))
        }
    })
    .await;
    let voters = placement_hosts();
    let others: Vec<NodeId> = cluster
        .running()
        .map(|n| n.id())
        .filter(|id| !voters.contains(id))
        .collect();
    let doomed = voters[2];
    eventually(
        "the doomed voter leads placement, and every node knows",
        || async {
            for v in &voters {
                cluster
                    .node(*v)
                    .transfer_leader(PLACEMENT_GROUP, doomed)
                    .await?;
            }
            for n in cluster.running() {
                let report = n.placement_report().await.map_err(|e| e.to_string())?;
                if report.leader != doomed {
                    return Err(format!("node {} names leader {}", n.id(), report.leader));
                }
            }
            Ok(())
        },
    )
    .await;
    cluster.stop(doomed).await;
    // The others find the new leader: their reports name it, and their heartbeats keep them
    // up (a node heartbeating the dead leader for ever would be called down).
    eventually("every node heartbeats the new placement leader", || async {
        for id in &others {
            let report = cluster
                .node(*id)
                .placement_report()
                .await
                .map_err(|e| format!("node {id}: {e}"))?;
            let stale: Vec<_> = report
                .nodes
                .iter()
                .filter(|n| n.id != doomed && n.state != NodeState::Up)
                .map(|n| (n.id, n.state))
                .collect();
            if report.leader == doomed || !stale.is_empty() {
                return Err(format!(
                    "node {id}: leader {}, nodes not up {stale:?}",
                    report.leader
                ));
            }
        }
        Ok(())
    })
    .await;
    let mut left = voters.clone();
    left.retain(|v| *v != doomed);
    left.extend(&others);
    wait_placement_on(&cluster, &cluster.client().await, &left).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_offering_twice_the_memory_receives_replicas_in_proportion() {
    // Node 4 offers 8 GiB, the others 4: its share of the 27 replicas (8 ranges × 3 and the
    // placement group's 3) would be 10.8, and it can hold one of each group: 9. The others
    // keep 6 each (with equal memory each would hold 6 or 7).
    let cluster = Cluster::start_tuned(4, 8, |c| {
        c.placement.memory_bytes = Some(if c.id == 4 { 8 << 30 } else { 4 << 30 });
    })
    .await;
    let client = cluster.client().await;
    let acked = write_keys(&client, 40).await;
    eventually("replicas in proportion to memory", || async {
        let report = client.placement().await.map_err(|e| e.to_string())?;
        let counts: BTreeMap<NodeId, (u64, bool)> = report
            .nodes
            .iter()
            .map(|n| (n.id, (n.replicas, n.placement)))
            .collect();
        let want = BTreeMap::from([(1, 6), (2, 6), (3, 6), (4, 9)]);
        let hosted = cluster.hosted();
        let node4 = hosted.get(&4).map_or(0, Vec::len);
        // A report from a placement leader that has not yet heard from every node may lack
        // one: that is a state to wait out, not a failure.
        let replicas: BTreeMap<NodeId, u64> = counts.iter().map(|(id, (c, _))| (*id, *c)).collect();
        let node4_votes = counts.get(&4).is_some_and(|(_, placement)| *placement);
        if replicas != want || !node4_votes || node4 != 8 {
            return Err(format!(
                "replicas and placement voters {counts:?}, node 4 hosts {node4} ranges, moving {:?}",
                report.moves
            ));
        }
        Ok(())
    })
    .await;
    check_keys(&client, &acked).await;
    cluster.shutdown().await;
}
