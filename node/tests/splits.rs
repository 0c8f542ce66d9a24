//! Range splits on an in-process 3-node cluster: a split range keeps every key and its
//! history, revisions go on from where they were, leases and watches follow their keys into
//! the new range, writes in flight are retried at the right range, and a replica that was
//! down during the split (and can only catch up by snapshots) ends up hosting the new range;
//! ranges past the key threshold, or past the write-rate threshold for long enough, split by
//! themselves, unless the load is spread over more ranges than a split would help.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, key_in, revisions_per_range, Cluster, WAIT};
use concord_client::api::{ApiError, Consistency, KeySpan, RangeRequest};
use concord_client::Error;
use concord_node::SplitSettings;
use concord_transport::watch::WatchRequest;

/// Keys `k/000..k/059`, all in bootstrap range 2 of a 2-range layout (which starts at `U`).
fn key(i: usize) -> Vec<u8> {
    format!("k/{i:03}").into_bytes()
}

const KEYS: usize = 60;

use common::read_at as read;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_split_keeps_keys_revisions_leases_and_watches_and_a_lagging_replica_catches_up() {
    let mut cluster = Cluster::start(3, 2).await;
    let client = cluster.client().await;
    assert_eq!(client.routes().ranges.len(), 2);

    // Keys on both sides of the split point; every third one under a lease.
    let lease = client
        .lease_grant(Duration::from_secs(60))
        .await
        .expect("lease");
    let acked = common::put_keys(&client, (0..KEYS).map(key), lease).await;
    let before_split = acked.values().map(|(_, rev)| *rev).max().unwrap();
    let mut watcher = client
        .watch(WatchRequest::new(KeySpan::prefix(b"k/".to_vec())))
        .await
        .expect("watch");

    // Node 3 misses the split and what follows.
    cluster.stop(3).await;

    // A writer keeps writing across the split point while the range splits.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = common::spawn_writer(client.clone(), stop.clone(), "the split");
    let split = client.split(key(30)).await.expect("split");
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.expect("writer");
    assert!(split.new_range_id > 64, "split ranges get fresh ids");
    assert_eq!(split.header.range_id, 2);
    assert_eq!(split.epoch, 2);
    assert_eq!(split.at, key(30));
    assert!(split.header.revision >= before_split);

    // Routes: range 2 keeps the keys below the split point, the new range the rest.
    let routes = client.routes();
    assert_eq!(routes.ranges.len(), 3, "routes after the split: {routes:?}");
    let new = split.new_range_id;
    let right = routes
        .ranges
        .iter()
        .find(|r| r.id == new)
        .expect("new range");
    assert_eq!(right.start, key(30));
    assert_eq!(right.epoch, 2);
    let left = routes.ranges.iter().find(|r| r.id == 2).expect("range 2");
    assert_eq!(left.end, key(30));

    // Every key reads back with its value and its original revision, at every consistency.
    for consistency in [
        Consistency::Linearizable,
        Consistency::Follower,
        Consistency::Serializable,
    ] {
        for (k, (value, rev)) in &acked {
            if let Some((v, r)) = read(&client, k, consistency).await {
                assert_eq!((&v, r), (value, *rev), "{consistency:?} read of {k:?}");
            } else {
                panic!("{consistency:?} read of {k:?} found nothing after the split");
            }
        }
    }
    for (k, (v, _)) in &written {
        let (got, _) = read(&client, k, Consistency::Linearizable)
            .await
            .unwrap_or_else(|| panic!("acknowledged write of {k:?} lost in the split"));
        assert_eq!(&got, v, "last acknowledged value of {k:?}");
    }
    // A scan over the split point sees both halves, in order.
    let all = client
        .range(
            RangeRequest::new(KeySpan::prefix(b"k/0".to_vec())),
            Consistency::Linearizable,
        )
        .await
        .expect("scan");
    assert_eq!(all.kvs.len(), KEYS);
    assert_eq!(all.headers.len(), 2, "the scan visits both halves");

    // Revisions go on from where they were, in both halves.
    let after_left = client.put(key(1), b"after".to_vec()).await.expect("put");
    let after_right = client.put(key(31), b"after".to_vec()).await.expect("put");
    assert_eq!(after_left.header.range_id, 2);
    assert_eq!(after_right.header.range_id, new);
    assert!(after_left.header.revision > split.header.revision);
    assert!(after_right.header.revision > split.header.revision);

    // The watch goes on across the split: both post-split writes arrive, each from its range,
    // after everything written before, with no revision twice per range.
    let mut seen: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut got_left = false;
    let mut got_right = false;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(got_left && got_right) {
        let response = tokio::time::timeout_at(deadline, watcher.next())
            .await
            .expect("watch events after the split within the wait")
            .expect("watch still open")
            .expect("watch event");
        let revs = seen.entry(response.range_id).or_default();
        assert!(
            revs.last().is_none_or(|last| *last < response.revision),
            "range {} revisions in order without repeats: {revs:?} then {}",
            response.range_id,
            response.revision
        );
        revs.push(response.revision);
        for e in &response.events {
            got_left |= e.kv.key == key(1) && e.kv.mod_revision == after_left.header.revision;
            got_right |= e.kv.key == key(31) && e.kv.mod_revision == after_right.header.revision;
        }
    }

    // Splitting at a range's first key, or at the split point again, is refused.
    match client.split(key(30)).await {
        Err(Error::Api(ApiError::InvalidRequest(_))) => {}
        other => panic!("a second split at the same key: {other:?}"),
    }

    // The lease's keys vanish from both halves when it is revoked.
    client.lease_revoke(lease).await.expect("revoke");
    eventually("the lease's keys are gone from both halves", || async {
        for i in (0..KEYS).step_by(3) {
            if read(&client, &key(i), Consistency::Linearizable)
                .await
                .is_some()
            {
                return Err(format!("{:?} is still there", key(i)));
            }
        }
        Ok(())
    })
    .await;

    // Enough writes to both halves that their other replicas snapshot and purge their logs:
    // node 3 can catch up only through snapshots, and learns of the new range from range 2's.
    for i in 0..250 {
        client
            .put(key(i % 30), b"bulk".to_vec())
            .await
            .expect("bulk");
        client
            .put(key(30 + i % 30), b"bulk".to_vec())
            .await
            .expect("bulk");
    }
    cluster.restart(3).await;
    eventually("node 3 hosts the new range, caught up", || async {
        let revisions = revisions_per_range(&client).await?;
        let right = revisions.get(&new).cloned().unwrap_or_default();
        let left = revisions.get(&2).cloned().unwrap_or_default();
        let same = |revs: &Vec<u64>| revs.len() == 3 && revs.iter().all(|r| *r == revs[0]);
        if same(&right) && same(&left) {
            Ok(())
        } else {
            Err(format!("range 2 at {left:?}, range {new} at {right:?}"))
        }
    })
    .await;
    // Node 3 routes by the new range too.
    let node3 = cluster.node(3);
    assert!(
        node3.range_table().ranges().iter().any(|r| r.id == new),
        "node 3's own table has the new range"
    );

    // A restart keeps the split: every node comes back hosting the new range.
    cluster.stop(1).await;
    cluster.restart(1).await;
    assert!(cluster
        .node(1)
        .range_table()
        .ranges()
        .iter()
        .any(|r| r.id == new && r.start == key(30)));
    assert_eq!(
        read(&client, &key(31), Consistency::Linearizable)
            .await
            .map(|(v, _)| v),
        Some(b"bulk".to_vec())
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ranges_past_the_key_threshold_split_by_themselves_while_writes_go_on() {
    let cluster = Cluster::start_tuned(3, 1, common::split_past_40_keys).await;
    let client = cluster.client().await;
    let mut acked: BTreeMap<Vec<u8>, (Vec<u8>, u64)> = BTreeMap::new();
    for i in 0..150 {
        let k = format!("auto/{i:03}").into_bytes();
        let v = format!("v{i}").into_bytes();
        let r = client.put(k.clone(), v.clone()).await.expect("put");
        acked.insert(k, (v, r.header.revision));
    }
    // 150 keys, at most 40 per range: at least four ranges once the splits settle.
    eventually(
        "the range split until no range holds more than 40 keys",
        || async {
            client.refresh_routes().await.map_err(|e| e.to_string())?;
            let ranges = client.routes().ranges;
            let mut counts = Vec::new();
            for d in &ranges {
                let r = client
                    .range(
                        RangeRequest::new(KeySpan::interval(d.start.clone(), d.end.clone())),
                        Consistency::Linearizable,
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                counts.push(r.kvs.len());
            }
            if ranges.len() >= 4 && counts.iter().all(|c| *c <= 40) {
                Ok(())
            } else {
                Err(format!("keys per range: {counts:?}"))
            }
        },
    )
    .await;
    for (k, (value, rev)) in &acked {
        let got = read(&client, k, Consistency::Linearizable).await;
        assert_eq!(got, Some((value.clone(), *rev)), "{k:?} after the splits");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_range_under_sustained_write_load_splits_where_the_writes_halve() {
    // A threshold this in-process cluster passes with four writers; sizes never split.
    let cluster = Cluster::start_tuned(3, 1, |c| {
        c.split = SplitSettings {
            keys_max: 0,
            bytes_max: 0,
            writes_per_sec_max: 20,
            hot_checks: 2,
            check_interval_ms: 300,
        };
    })
    .await;
    let client = cluster.client().await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4usize {
        let (client, stop) = (client.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut acked = BTreeMap::new();
            // Bounded: stops when told, or after 5,000 writes.
            for i in 0..5_000usize {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let k = format!("load/{:03}", (i * 7 + w * 13) % 100).into_bytes();
                let v = format!("w{w}-{i}").into_bytes();
                let r = client
                    .put(k.clone(), v.clone())
                    .await
                    .unwrap_or_else(|e| panic!("put {k:?} while the range splits: {e}"));
                acked.insert(k, (v, r.header.revision));
            }
            acked
        }));
    }
    eventually("the loaded range split", || async {
        client.refresh_routes().await.map_err(|e| e.to_string())?;
        let ranges = client.routes().ranges;
        if ranges.len() >= 2 {
            Ok(())
        } else {
            Err(format!("{} range(s)", ranges.len()))
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    // The split point lies among the written keys, each side with a share of them.
    let ranges = client.routes().ranges;
    let cut = &ranges[1].start;
    assert!(
        cut.as_slice() > b"load/000".as_slice() && cut.as_slice() <= b"load/099".as_slice(),
        "split at {:?}, outside the written keys",
        String::from_utf8_lossy(cut)
    );
    // Every acknowledged write is readable with its revision (the last writer of a key wins:
    // writers share keys, so take the highest revision per key).
    let mut latest: BTreeMap<Vec<u8>, (Vec<u8>, u64)> = BTreeMap::new();
    for w in writers {
        for (k, (v, rev)) in w.await.expect("writer") {
            let e = latest.entry(k).or_insert((v.clone(), rev));
            if rev > e.1 {
                *e = (v, rev);
            }
        }
    }
    for (k, (value, rev)) in &latest {
        let got = read(&client, k, Consistency::Linearizable).await;
        assert_eq!(
            got,
            Some((value.clone(), *rev)),
            "{k:?} after the load split"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ranges_evenly_loaded_past_the_write_threshold_do_not_split() {
    // 3 ranges on 3 nodes (a new cluster's), each past the write threshold: each node leads
    // one, its fair share of the writes, so no split spreads anything. (Each range takes a
    // whole share, more than the half the rule before this one split at.) Checks of 1 s, so
    // that every range samples enough writes (16) to pick a split key.
    const RANGES: usize = 3;
    const THRESHOLD: u64 = 10;
    const CHECK_MS: u64 = 1_000;
    let cluster = Cluster::start_tuned(3, RANGES, |c| {
        c.split = SplitSettings {
            keys_max: 0,
            bytes_max: 0,
            writes_per_sec_max: THRESHOLD,
            hot_checks: 3,
            check_interval_ms: CHECK_MS,
        };
    })
    .await;
    let client = cluster.client().await;
    // The load starts on a settled cluster: every node leads one range (while leaderships
    // move, the ranges' rates and the reports they are summed from swing).
    eventually("leaders balanced", || async {
        let report = client.placement().await.map_err(|e| e.to_string())?;
        let leaders: Vec<u64> = report.nodes.iter().map(|n| n.leaders).collect();
        if leaders.iter().sum::<u64>() == RANGES as u64 && leaders.iter().all(|l| *l == 1) {
            Ok(())
        } else {
            Err(format!("ranges led per node: {leaders:?}"))
        }
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    // 50 keys in each range, taken in turn by every writer.
    let keys: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..50)
            .flat_map(|i| (1..=RANGES as u64).map(move |range| (range, i)))
            .map(|(range, i)| key_in(&client, range, i))
            .collect(),
    );
    let mut writers = Vec::new();
    for w in 0..16usize {
        let (client, stop, keys) = (client.clone(), stop.clone(), keys.clone());
        writers.push(tokio::spawn(async move {
            // Bounded: stops when told, or after 20,000 writes.
            for i in 0..20_000usize {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let k = keys[(i + w * 7) % keys.len()].clone();
                client
                    .put(k.clone(), b"v".to_vec())
                    .await
                    .unwrap_or_else(|e| panic!("put {k:?}: {e}"));
            }
        }));
    }
    let hot = || async {
        let report = client.placement().await.map_err(|e| e.to_string())?;
        let rates: Vec<u64> = report.ranges.iter().map(|r| r.writes_per_sec).collect();
        if rates.len() == RANGES && rates.iter().all(|r| *r > THRESHOLD) {
            Ok(())
        } else {
            Err(format!("writes per second per range: {rates:?}"))
        }
    };
    eventually("placement sees every range past the write threshold", hot).await;
    // The load's length, not a synchronisation: eight checks, more than twice the hot streak
    // a split needs, with every range's leader knowing the cluster's writes.
    tokio::time::sleep(Duration::from_millis(8 * CHECK_MS)).await;
    client.refresh_routes().await.expect("routes");
    let ranges = client.routes().ranges;
    assert_eq!(
        ranges.len(),
        RANGES,
        "evenly loaded ranges split: {:?}",
        ranges
            .iter()
            .map(|r| String::from_utf8_lossy(&r.start).into_owned())
            .collect::<Vec<_>>()
    );
    if let Err(e) = hot().await {
        panic!("the load fell under the threshold, so this tested nothing: {e}");
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    cluster.shutdown().await;
}
