//! In-process 3-node cluster: writes to every range survive a leader stop, a restarted node
//! catches up (also through a snapshot after log purge), and every acknowledged write reads
//! back at every consistency level; leaders spread over the nodes, and writes in flight
//! survive leader transfers.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{eventually, key_in, revisions_per_range, Cluster};
use concord_client::api::{ApiError, Consistency, KeySpan, RangeRequest, TxnOp, TxnRequest};
use concord_client::{Client, Error};

const RANGES: usize = 8;

async fn write_round(client: &Client, round: usize, acked: &mut BTreeMap<Vec<u8>, Vec<u8>>) {
    for range in 1..=RANGES as u64 {
        for i in 0..5 {
            let key = key_in(client, range, round * 100 + i);
            let value = format!("v{round}-{i}").into_bytes();
            client
                .put(key.clone(), value.clone())
                .await
                .unwrap_or_else(|e| panic!("put to range {range}: {e}"));
            acked.insert(key, value);
        }
    }
}

async fn check_all_readable(client: &Client, acked: &BTreeMap<Vec<u8>, Vec<u8>>) {
    for consistency in [
        Consistency::Linearizable,
        Consistency::Follower,
        Consistency::Serializable,
    ] {
        for (key, value) in acked {
            let r = client
                .range(RangeRequest::new(KeySpan::key(key.clone())), consistency)
                .await
                .unwrap_or_else(|e| panic!("{consistency:?} read of {key:?}: {e}"));
            assert_eq!(
                r.kvs.len(),
                1,
                "{consistency:?} read of {key:?} found nothing"
            );
            assert_eq!(&r.kvs[0].value, value, "{consistency:?} read of {key:?}");
        }
    }
}

/// Every running node has applied as far as the range's leader.
async fn wait_caught_up(cluster: &Cluster, client: &Client) {
    eventually("replicas caught up", || async {
        let revisions = revisions_per_range(client).await?;
        let lagging: Vec<_> = revisions
            .iter()
            .filter(|(_, revs)| revs.iter().min() != revs.iter().max())
            .collect();
        if lagging.is_empty() && revisions.values().all(|r| r.len() == cluster.members.len()) {
            Ok(())
        } else {
            Err(format!("revisions per range differ: {lagging:?}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_failover_restart_and_catch_up() {
    let mut cluster = Cluster::start(3, RANGES).await;
    let client = cluster.client().await;
    let mut acked = BTreeMap::new();
    write_round(&client, 0, &mut acked).await;

    // Stop the leader of range 1: another is elected and writes to every range continue.
    let leader = cluster.leader_of(1).expect("range 1 has a leader");
    cluster.stop(leader).await;
    for round in 1..=2 {
        write_round(&client, round, &mut acked).await;
    }
    let new_leader = cluster.leader_of(1).expect("range 1 elected a new leader");
    assert_ne!(new_leader, leader);

    // Enough writes to one range while the node is down that the others snapshot and purge
    // their logs (test settings: a snapshot every 200 entries, none kept): the restarted node
    // can only catch up through a snapshot.
    for i in 0..300 {
        let key = key_in(&client, 2, 10_000 + i);
        client
            .put(key.clone(), b"bulk".to_vec())
            .await
            .expect("bulk put");
        acked.insert(key, b"bulk".to_vec());
    }

    let statuses = client.status().await;
    let purged = statuses
        .iter()
        .filter_map(|(_, s)| s.as_ref().ok())
        .flat_map(|s| {
            s.ranges
                .iter()
                .filter(|r| r.id == 2)
                .map(|r| r.purged_index)
        })
        .min()
        .expect("running nodes report range 2");
    assert!(
        purged > 100,
        "the running replicas purged range 2's log (purged up to {purged})"
    );

    cluster.restart(leader).await;
    wait_caught_up(&cluster, &client).await;
    check_all_readable(&client, &acked).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scans_and_deletes_span_ranges_and_txns_may_not() {
    let cluster = Cluster::start(3, RANGES).await;
    let client = cluster.client().await;
    let mut keys = Vec::new();
    for range in 1..=RANGES as u64 {
        for i in 0..3 {
            let k = key_in(&client, range, i);
            client.put(k.clone(), b"x".to_vec()).await.unwrap();
            keys.push(k);
        }
    }
    keys.sort();
    let all = client
        .range(
            RangeRequest::new(KeySpan::prefix("")),
            Consistency::Linearizable,
        )
        .await
        .unwrap();
    let got: Vec<_> = all.kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(got, keys, "a full scan visits every range in key order");
    assert_eq!(all.headers.len(), RANGES);

    let mut limited = RangeRequest::new(KeySpan::prefix(""));
    limited.limit = 5;
    limited.descending = true;
    let r = client
        .range(limited, Consistency::Serializable)
        .await
        .unwrap();
    let want: Vec<_> = keys.iter().rev().take(5).cloned().collect();
    assert_eq!(
        r.kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(),
        want
    );
    assert!(r.more);
    assert_eq!(r.count, keys.len() as u64);

    // A txn touching two ranges is refused, with nothing applied.
    let (a, b) = (key_in(&client, 1, 900), key_in(&client, 5, 900));
    let txn = TxnRequest {
        fence: None,
        compares: vec![],
        success: vec![
            TxnOp::Put(concord_client::api::PutRequest {
                key: a.clone(),
                value: b"1".to_vec(),
                lease: 0,
                prev_kv: false,
            }),
            TxnOp::Put(concord_client::api::PutRequest {
                key: b.clone(),
                value: b"1".to_vec(),
                lease: 0,
                prev_kv: false,
            }),
        ],
        failure: vec![],
    };
    match client.txn(txn).await {
        Err(Error::Api(ApiError::CrossRange { ranges })) => assert_eq!(ranges, vec![1, 5]),
        other => panic!("expected CrossRange, got {other:?}"),
    }
    assert!(
        client.get(a).await.unwrap().kvs.is_empty(),
        "nothing of a refused txn is applied"
    );

    let deleted = client.delete(KeySpan::prefix(""), true).await.unwrap();
    assert_eq!(deleted.deleted, keys.len() as u64);
    assert_eq!(deleted.prev_kvs.len(), keys.len());
    let after = client
        .range(
            RangeRequest::new(KeySpan::prefix("")),
            Consistency::Linearizable,
        )
        .await
        .unwrap();
    assert!(after.kvs.is_empty());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leaders_spread_over_the_nodes_and_follow_a_node_that_stops_and_returns() {
    // `start` waits until the balancer settled: 8 ranges on 3 nodes are led 3/3/2.
    let mut cluster = Cluster::start(3, RANGES).await;
    let counts = cluster.leader_counts();
    assert!(
        counts.values().all(|c| (2..=3).contains(c)),
        "ranges led per node: {counts:?}"
    );
    let client = cluster.client().await;
    let mut acked = BTreeMap::new();
    write_round(&client, 0, &mut acked).await;

    // Stop the node leading the most: its ranges fail over, then the two others settle 4/4.
    let busiest = *counts.iter().max_by_key(|(_, c)| **c).unwrap().0;
    cluster.stop(busiest).await;
    cluster.wait_balanced().await;
    let counts = cluster.leader_counts();
    assert!(
        counts.values().all(|c| *c == RANGES / 2),
        "ranges led per node after stopping {busiest}: {counts:?}"
    );
    write_round(&client, 1, &mut acked).await;

    // Back again: it gets its share of leaders (3/3/2) and has every write.
    cluster.restart(busiest).await;
    cluster.wait_ready().await;
    assert!(
        cluster.leader_counts()[&busiest] >= 2,
        "ranges led per node after restarting {busiest}: {:?}",
        cluster.leader_counts()
    );
    wait_caught_up(&cluster, &client).await;
    check_all_readable(&client, &acked).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_in_flight_survive_leader_transfers() {
    // One range: the balancer leaves it alone (1 vs 0 is balanced), the test moves it.
    let cluster = Cluster::start(3, 1).await;
    let client = cluster.client().await;
    const WRITERS: usize = 16;
    const PUTS_PER_WRITER_MAX: usize = 5_000;
    const TRANSFERS: usize = 6;
    let stop = Arc::new(AtomicBool::new(false));
    // Writers put until the transfers are over: every put must succeed (a write refused during
    // the hand-over is retried by the client; one appended before it commits under the new
    // leader).
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..PUTS_PER_WRITER_MAX {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("transfer/{w:02}/{i:04}").into_bytes();
                    let value = format!("{w}-{i}").into_bytes();
                    client
                        .put(key.clone(), value.clone())
                        .await
                        .unwrap_or_else(|e| panic!("put {w}/{i} during leader transfers: {e}"));
                    acked.push((key, value));
                }
                acked
            })
        })
        .collect();

    // Hand the range round the nodes while the writers run.
    for _ in 0..TRANSFERS {
        let from = cluster.leader_of(1).expect("range 1 has a leader");
        let to = from % 3 + 1;
        cluster
            .node(from)
            .transfer_leader(1, to)
            .await
            .expect("transfer requested");
        eventually(&format!("range 1 led by {to}"), || async {
            match cluster.leader_of(1) {
                Some(l) if l == to => Ok(()),
                other => Err(format!("leader now {other:?}")),
            }
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);

    let mut acked = BTreeMap::new();
    for w in writers {
        acked.extend(w.await.expect("writer task"));
    }
    assert!(acked.len() >= WRITERS, "writers wrote {} keys", acked.len());
    check_all_readable(&client, &acked).await;
    cluster.shutdown().await;
}
