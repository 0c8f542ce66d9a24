//! Range merges on an in-process 3-node cluster: a merged range keeps every key with its
//! history and revision, the next write is above every revision of both parts, leases owned
//! by the range merged away live on (and their keys still go with them), a watch goes on
//! across the merge, writes in flight are retried, the merged-away range's replicas are
//! removed, and a restart keeps the merge; ranges that split under load and were emptied
//! merge back by themselves.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, Cluster, WAIT};
use concord_client::api::{Consistency, KeySpan};
use concord_client::Client;
use concord_transport::lease::lease_anchor;
use concord_transport::watch::WatchRequest;

/// Keys `k/000..k/059`, all in bootstrap range 2 of a 2-range layout (which starts at `U`).
fn key(i: usize) -> Vec<u8> {
    format!("k/{i:03}").into_bytes()
}

const KEYS: usize = 60;

async fn read(client: &Client, key: &[u8]) -> Option<(Vec<u8>, u64)> {
    common::read_at(client, key, Consistency::Linearizable).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_merge_keeps_keys_revisions_leases_and_watches() {
    let mut cluster = Cluster::start(3, 2).await;
    let client = cluster.client().await;
    let split = client.split(key(30)).await.expect("split");
    let right = split.new_range_id;
    // A lease owned by the right half (its anchor sorts above the split key).
    let lease_id = (1..1_000_000)
        .find(|id| lease_anchor(*id).as_slice() > key(30).as_slice())
        .expect("an id anchored in the right half");
    let lease = client
        .lease_grant_id(lease_id, Duration::from_secs(60))
        .await
        .expect("lease");
    let acked = common::put_keys(&client, (0..KEYS).map(key), lease).await;
    // The right half runs ahead in revisions (on keys of its own).
    let mut highest = acked.values().map(|(_, rev)| *rev).max().unwrap();
    for i in 0..40 {
        let k = format!("k/r{:02}", i % 10).into_bytes();
        let r = client.put(k, b"ahead".to_vec()).await.expect("put right");
        highest = highest.max(r.header.revision);
    }
    let mut watcher = client
        .watch(WatchRequest::new(KeySpan::prefix(b"k/".to_vec())))
        .await
        .expect("watch");

    // A writer keeps writing on both sides while the ranges merge.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = common::spawn_writer(client.clone(), stop.clone(), "the merge");
    let merged = client.merge(2).await.expect("merge");
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.expect("writer");
    assert_eq!(merged.header.range_id, 2);
    assert_eq!(merged.merged_range_id, right);
    assert!(
        merged.epoch > split.epoch,
        "a merged range's epoch is above both parts'"
    );
    assert!(merged.header.revision >= highest);

    // Routes: range 2 holds everything again.
    client.refresh_routes().await.expect("routes");
    let routes = client.routes();
    assert_eq!(routes.ranges.len(), 2, "routes after the merge: {routes:?}");
    assert!(routes.ranges.iter().all(|d| d.id != right));

    // Every acknowledged write is there, at its revision.
    for (k, (value, rev)) in acked.iter().filter(|(k, _)| !written.contains_key(*k)) {
        assert_eq!(read(&client, k).await, Some((value.clone(), *rev)), "{k:?}");
    }
    for (k, (value, rev)) in &written {
        assert_eq!(read(&client, k).await, Some((value.clone(), *rev)), "{k:?}");
    }
    // The next write is above every revision either part had.
    let after = client.put(key(46), b"after".to_vec()).await.expect("put");
    assert_eq!(after.header.range_id, 2);
    let before_merge = written
        .values()
        .map(|(_, r)| *r)
        .max()
        .unwrap_or(0)
        .max(highest);
    assert!(after.header.revision > before_merge);

    // The watch goes on: the post-merge write arrives, after everything before it.
    let arrived = tokio::time::timeout(WAIT, async {
        let mut last_seen = BTreeMap::new();
        loop {
            let r = watcher.next().await.expect("watch open").expect("watch");
            for e in &r.events {
                let previous = last_seen.insert(e.kv.key.clone(), e.kv.mod_revision);
                assert!(
                    previous.is_none_or(|p| p < e.kv.mod_revision),
                    "{:?} went back from {previous:?} to {}",
                    e.kv.key,
                    e.kv.mod_revision
                );
                if e.kv.value == b"after" {
                    return;
                }
            }
        }
    })
    .await;
    assert!(arrived.is_ok(), "the post-merge write reached the watch");

    // The lease the merged-away range owned lives on, with its keys, in range 2.
    let ttl = client
        .lease_time_to_live(lease, true)
        .await
        .expect("lease after the merge");
    assert!(
        ttl.remaining_ms > 30_000,
        "the lease kept its time: {ttl:?}"
    );
    assert_eq!(ttl.keys.len(), KEYS / 3, "{ttl:?}");
    client.lease_revoke(lease).await.expect("revoke");
    eventually("the lease's keys are gone", || async {
        for i in (0..KEYS).step_by(3) {
            if read(&client, &key(i)).await.is_some() {
                return Err(format!("{:?} is still there", key(i)));
            }
        }
        Ok(())
    })
    .await;

    // Every replica of the merged-away range is removed.
    eventually("the merged-away range's replicas are removed", || async {
        let hosted = cluster.hosted();
        match hosted.iter().find(|(_, ranges)| ranges.contains(&right)) {
            Some((node, _)) => Err(format!("node {node} still hosts range {right}")),
            None => Ok(()),
        }
    })
    .await;

    // A restart keeps the merge.
    cluster.stop(1).await;
    cluster.restart(1).await;
    let table = cluster.node(1).range_table();
    assert!(table.ranges().iter().all(|d| d.id != right));
    assert_eq!(
        read(&client, &key(46)).await.map(|(v, _)| v),
        Some(b"after".to_vec())
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ranges_that_split_merge_back_once_small_and_cold() {
    let cluster = Cluster::start_tuned(3, 1, |c| {
        common::split_past_40_keys(c);
        c.placement.merge_after_ms = 1_000;
    })
    .await;
    let client = cluster.client().await;
    for i in 0..150 {
        client
            .put(format!("auto/{i:03}").into_bytes(), b"v".to_vec())
            .await
            .expect("put");
    }
    eventually("the range split", || async {
        client.refresh_routes().await.map_err(|e| e.to_string())?;
        let n = client.routes().ranges.len();
        (n >= 4).then_some(()).ok_or(format!("{n} ranges"))
    })
    .await;
    // Emptied and compacted (a key's history counts until compacted away): small again.
    let deleted = client
        .delete(KeySpan::prefix(b"auto/".to_vec()), false)
        .await
        .expect("delete");
    assert_eq!(deleted.deleted, 150);
    let point = deleted
        .headers
        .iter()
        .map(|h| h.revision)
        .max()
        .expect("a header");
    // A key kept outside the prefix: still there after the merges.
    let kept = client
        .put(b"zz".to_vec(), b"kept".to_vec())
        .await
        .expect("put");
    eventually("the ranges merged back into one", || async {
        // Compacted as an operator's periodic compaction would: every range of the current
        // table (one may have split after the delete's routes were taken). A range already
        // compacted there answers `Compacted`, which is fine.
        client.refresh_routes().await.map_err(|e| e.to_string())?;
        client.compact(point).await.map_err(|e| e.to_string())?;
        let n = client.routes().ranges.len();
        (n == 1).then_some(()).ok_or(format!("{n} ranges"))
    })
    .await;
    assert_eq!(
        read(&client, b"zz").await,
        Some((b"kept".to_vec(), kept.header.revision))
    );
    cluster.shutdown().await;
}

/// Regression (campaign seeds 6 and 86 of `split,merge,move,kill`): after a merge, the piece
/// of a watch that came from the range merged away joined the merging range's channel late,
/// as a second watch: the range's responses went back in revision, one txn's revision came
/// in two responses, and a bookmark of the range came before events at or below it. The
/// pieces are now one watch. Also: a txn over both former halves, from a client whose routes
/// predate the merge, is not refused as `CrossRange`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_across_a_merge_keeps_each_range_in_order_atomic_and_bookmarked() {
    use concord_client::api::{PutRequest, TxnOp, TxnRequest};

    let cluster = Cluster::start(3, 2).await;
    let client = cluster.client().await;
    client.split(key(30)).await.expect("split");
    let mut request = WatchRequest::new(KeySpan::prefix(b"k/".to_vec()));
    request.progress_notify = true;
    let mut watcher = client.watch(request).await.expect("watch");
    // A client whose cached routes still show the two halves when the merge is done.
    let stale = cluster.client().await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = common::spawn_writer(client.clone(), stop.clone(), "the merge");
    client.merge(2).await.expect("merge");
    // Then txns that write a key of each former half at once, sent by the stale client: it
    // fetches the routes again instead of refusing them as `CrossRange` (CI saw that).
    let put = |k: Vec<u8>| {
        TxnOp::Put(PutRequest {
            key: k,
            value: b"txn".to_vec(),
            lease: 0,
            prev_kv: false,
        })
    };
    let mut last = 0;
    for i in 0..20 {
        let txn = TxnRequest {
            fence: None,
            compares: vec![],
            success: vec![put(key(i)), put(key(30 + i))],
            failure: vec![],
        };
        last = stale.txn(txn).await.expect("txn").header.revision;
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");

    let checked = tokio::time::timeout(WAIT, async {
        let (mut latest, mut bookmarks) = (BTreeMap::new(), BTreeMap::new());
        loop {
            let r = watcher.next().await.expect("watch open").expect("watch");
            if r.progress {
                let b = bookmarks.entry(r.range_id).or_insert(0);
                *b = r.revision.max(*b);
                continue;
            }
            let bookmark = bookmarks.get(&r.range_id).copied().unwrap_or(0);
            assert!(
                r.revision > bookmark,
                "range {} revision {} after a bookmark at {bookmark}",
                r.range_id,
                r.revision
            );
            let previous = latest.insert(r.range_id, r.revision).unwrap_or(0);
            assert!(
                r.revision > previous,
                "range {} went from revision {previous} to {} (or repeated it)",
                r.range_id,
                r.revision
            );
            if r.revision == last {
                assert_eq!(r.events.len(), 2, "the last txn in one response: {r:?}");
                return;
            }
        }
    })
    .await;
    assert!(checked.is_ok(), "the last txn reached the watch");
    cluster.shutdown().await;
}
