//! Watches on an in-process 3-node cluster: a watch over every range sees each write exactly
//! once, in per-key order, a txn's events in one response; history from a past revision;
//! `Compacted` for a compacted start; progress bookmarks; transparent resumption after a
//! node stops and after the node cancels a channel that fell behind; and 2,000 watchers of
//! one client sharing one channel per range, a slow one catching up alone.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{eventually, key_in, Cluster, WAIT};
use concord_client::api::{ApiError, KeySpan, PutRequest, RangeId, TxnOp, TxnRequest};
use concord_client::{Client, Error, WatchResponse, Watcher};
use concord_node::CompactionSettings;
use concord_transport::watch::{EventKind, WatchRequest};

const RANGES: usize = 4;

fn everything() -> KeySpan {
    KeySpan::interval(Vec::new(), Vec::new())
}

/// Collects responses until `done` says so, failing after [`WAIT`].
async fn collect_until(
    watcher: &mut Watcher,
    what: &str,
    mut done: impl FnMut(&[WatchResponse]) -> bool,
) -> Vec<WatchResponse> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done(&got) {
        match tokio::time::timeout_at(deadline, watcher.next()).await {
            Err(_) => panic!(
                "{what}: not complete within {WAIT:?} ({} responses)",
                got.len()
            ),
            Ok(None) => panic!("{what}: the watch ended"),
            Ok(Some(Err(e))) => panic!("{what}: watch error {e}"),
            Ok(Some(Ok(r))) => got.push(r),
        }
    }
    got
}

fn event_count(responses: &[WatchResponse]) -> usize {
    responses.iter().map(|r| r.events.len()).sum()
}

/// Per key, the values seen (None for a delete), checking that every (range, revision) came
/// once and revisions rise per range.
fn per_key(responses: &[WatchResponse]) -> BTreeMap<Vec<u8>, Vec<Option<Vec<u8>>>> {
    let mut last: BTreeMap<RangeId, u64> = BTreeMap::new();
    let mut keys: BTreeMap<Vec<u8>, Vec<Option<Vec<u8>>>> = BTreeMap::new();
    for r in responses.iter().filter(|r| !r.progress) {
        let prev = last.insert(r.range_id, r.revision).unwrap_or(0);
        assert!(
            r.revision > prev,
            "range {} revision {} after {prev}: repeated or out of order",
            r.range_id,
            r.revision
        );
        for e in &r.events {
            assert_eq!(e.kv.mod_revision, r.revision, "event revision");
            let value = (e.kind == EventKind::Put).then(|| e.kv.value.clone());
            keys.entry(e.kv.key.clone()).or_default().push(value);
        }
    }
    keys
}

async fn put_round(client: &Client, round: usize, keys: usize) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut written = BTreeMap::new();
    for i in 0..keys {
        let key = key_in(client, (i % RANGES) as u64 + 1, i);
        let value = format!("r{round}-{i}").into_bytes();
        client.put(key.clone(), value.clone()).await.expect("put");
        written.insert(key, value);
    }
    written
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_over_every_range_sees_each_write_once_in_order() {
    let cluster = Cluster::start(3, RANGES).await;
    let client = cluster.client().await;
    let mut request = WatchRequest::new(everything());
    request.prev_kv = true;
    let mut watcher = client.watch(request).await.expect("watch");

    let first = put_round(&client, 1, 20).await;
    let second = put_round(&client, 2, 20).await;
    // A txn writing two keys of one range: one revision, one response.
    let (a, b) = (key_in(&client, 2, 100), key_in(&client, 2, 101));
    let put = |key: &Vec<u8>| {
        TxnOp::Put(PutRequest {
            key: key.clone(),
            value: b"txn".to_vec(),
            lease: 0,
            prev_kv: false,
        })
    };
    client
        .txn(TxnRequest {
            fence: None,
            compares: vec![],
            success: vec![put(&a), put(&b)],
            failure: vec![],
        })
        .await
        .expect("txn");
    let deleted = key_in(&client, 3, 2);
    client
        .delete(KeySpan::key(deleted.clone()), false)
        .await
        .expect("delete");

    let expected = 20 + 20 + 2 + 1;
    let got = collect_until(&mut watcher, "every write seen", |r| {
        event_count(r) >= expected
    })
    .await;
    assert_eq!(event_count(&got), expected, "extra events");
    let txn_response = got
        .iter()
        .find(|r| r.events.iter().any(|e| e.kv.key == a))
        .expect("txn seen");
    assert_eq!(
        txn_response.events.len(),
        2,
        "a txn's events arrive together"
    );

    let keys = per_key(&got);
    for (key, v1) in &first {
        let mut want = vec![Some(v1.clone()), Some(second[key].clone())];
        if *key == deleted {
            want.push(None);
        }
        assert_eq!(
            keys[key],
            want,
            "history of {:?}",
            String::from_utf8_lossy(key)
        );
    }
    // prev_kv: the second put of a key carries the first value.
    let second_put = got
        .iter()
        .flat_map(|r| &r.events)
        .find(|e| e.kv.value.starts_with(b"r2-"))
        .expect("second round seen");
    assert!(second_put
        .prev_kv
        .as_ref()
        .expect("prev_kv")
        .value
        .starts_with(b"r1-"));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_range_compacts_its_history_to_the_revisions_it_keeps() {
    const KEEP: u64 = 20;
    let cluster = Cluster::start_tuned(3, RANGES, |c| {
        c.compaction = CompactionSettings {
            history_revisions: KEEP,
            check_interval_ms: 200,
        };
    })
    .await;
    let client = cluster.client().await;
    let key = key_in(&client, 1, 1);
    let mut revisions = Vec::new();
    for i in 0..100 {
        let r = client.put(key.clone(), format!("v{i}")).await.expect("put");
        revisions.push(r.header.revision);
    }
    let last = *revisions.last().expect("a put");
    // The leader compacts on its own: a watch from early on is refused, and the compaction
    // point settles within a tenth of KEEP below the last revision, never above it.
    let from = |revision: u64| {
        let mut request = WatchRequest::new(KeySpan::key(key.clone()));
        request.start_revision = revision;
        request
    };
    eventually("the history compacted to its last revisions", || async {
        match client.watch(from(revisions[1])).await {
            Err(Error::Api(ApiError::Compacted { compact_revision }))
                if compact_revision >= last - KEEP - KEEP / 10 =>
            {
                assert!(
                    compact_revision <= last - KEEP,
                    "compacted at {compact_revision}, keeping fewer than {KEEP} of {last}"
                );
                Ok(())
            }
            Err(Error::Api(ApiError::Compacted { compact_revision })) => {
                Err(format!("compacted at {compact_revision} of {last}"))
            }
            Err(e) => Err(format!("watch: {e}")),
            Ok(_) => Err("not compacted yet".into()),
        }
    })
    .await;
    // The revisions kept are still there: a watch from the oldest of them replays them all.
    let kept_from = last - KEEP + 1;
    let mut watcher = client
        .watch(from(kept_from))
        .await
        .expect("watch kept history");
    let got = collect_until(&mut watcher, "the kept history", |r| {
        event_count(r) >= KEEP as usize
    })
    .await;
    let first = got.iter().flat_map(|r| &r.events).next().expect("an event");
    assert_eq!(first.kv.mod_revision, kept_from);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_compaction_and_progress_bookmarks() {
    let cluster = Cluster::start(3, RANGES).await;
    let client = cluster.client().await;
    let key = key_in(&client, 1, 1);
    let mut revisions = Vec::new();
    for i in 0..5 {
        let r = client.put(key.clone(), format!("v{i}")).await.expect("put");
        revisions.push(r.header.revision);
    }
    // From a past revision: the history since then, then live events.
    let mut request = WatchRequest::new(KeySpan::key(key.clone()));
    request.start_revision = revisions[2];
    let mut watcher = client
        .watch(request.clone())
        .await
        .expect("watch from the past");
    let got = collect_until(&mut watcher, "history", |r| event_count(r) >= 3).await;
    let values: Vec<_> = got
        .iter()
        .flat_map(|r| &r.events)
        .map(|e| e.kv.value.clone())
        .collect();
    assert_eq!(values, [b"v2".to_vec(), b"v3".to_vec(), b"v4".to_vec()]);

    // A start at or below the compaction point is refused with the compact revision.
    client.compact(revisions[3]).await.expect("compact");
    match client.watch(request).await {
        Err(Error::Api(ApiError::Compacted { compact_revision })) => {
            assert_eq!(compact_revision, revisions[3])
        }
        Err(e) => panic!("expected Compacted, got {e}"),
        Ok(_) => panic!("expected Compacted, the watch started"),
    }

    // Bookmarks: after a progress at R, no event at or below R of that range.
    let mut request = WatchRequest::new(KeySpan::key(key.clone()));
    request.progress_notify = true;
    let mut watcher = client.watch(request).await.expect("watch with progress");
    let got = collect_until(&mut watcher, "a bookmark", |r| r.iter().any(|r| r.progress)).await;
    let bookmark = got.iter().find(|r| r.progress).expect("bookmark").revision;
    let put = client.put(key.clone(), "after").await.expect("put");
    let got = collect_until(&mut watcher, "the put after the bookmark", |r| {
        event_count(r) >= 1
    })
    .await;
    let event = got.iter().find(|r| !r.events.is_empty()).expect("event");
    assert!(event.revision > bookmark && event.revision == put.header.revision);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watches_resume_after_a_node_stops_and_after_falling_behind() {
    // A buffer of one revision: any apply batch of two writes overflows a watcher.
    let mut cluster = Cluster::start_tuned(3, RANGES, |c| c.watch_buffer = 1).await;
    let client = cluster.client().await;
    let mut watcher = client
        .watch(WatchRequest::new(everything()))
        .await
        .expect("watch");

    // Concurrent bursts until some node has cancelled a watcher that fell behind (bounded).
    let mut written = 0usize;
    for burst in 0..20 {
        let puts = (0..32).map(|i| {
            let client = client.clone();
            let key = key_in(&client, (i % RANGES) as u64 + 1, burst * 100 + i);
            async move { client.put(key, "burst").await.expect("burst put") }
        });
        futures::future::join_all(puts).await;
        written += 32;
        if cluster.running().any(|n| n.watch_overflows() > 0) {
            break;
        }
    }
    assert!(
        cluster.running().any(|n| n.watch_overflows() > 0),
        "no watcher fell behind in 20 bursts"
    );
    let got = collect_until(&mut watcher, "every burst write", |r| {
        event_count(r) >= written
    })
    .await;
    assert_eq!(event_count(&got), written);
    let keys = per_key(&got);
    assert_eq!(keys.len(), written, "each key once");

    // A node stops: the streams it served move to other replicas, from where they stopped.
    cluster.stop(1).await;
    let after = put_round(&client, 9, 12).await;
    let got = collect_until(&mut watcher, "writes after the stop", |r| {
        event_count(r) >= after.len()
    })
    .await;
    let keys = per_key(&got);
    for (key, value) in &after {
        assert_eq!(keys[key], vec![Some(value.clone())], "key {key:?}");
    }
    // Nothing more than that arrives.
    let extra = tokio::time::timeout(Duration::from_millis(500), watcher.next()).await;
    assert!(extra.is_err(), "unexpected extra response {extra:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_watchers_share_a_channel_and_a_slow_one_catches_up_alone() {
    const WATCHERS: usize = 2_000;
    let cluster = Cluster::start(3, RANGES).await;
    let client = cluster.client().await;
    let key = key_in(&client, 2, 0);
    let mut watchers = Vec::with_capacity(WATCHERS);
    for _ in 0..WATCHERS {
        watchers.push(
            client
                .watch(WatchRequest::new(KeySpan::key(key.clone())))
                .await
                .expect("watch"),
        );
    }
    // The nodes hold every watch (each a few dozen bytes), all on one channel per range.
    let open: u64 = client
        .status()
        .await
        .into_iter()
        .map(|(_, s)| s.expect("status").process.watchers)
        .sum();
    assert_eq!(open, WATCHERS as u64);

    // One watcher does not read while the key changes more often than its buffer holds.
    let mut slow = watchers.pop().expect("one");
    let writes = 300;
    let mut revisions = Vec::new();
    for i in 0..writes {
        let put = client.put(key.clone(), format!("v{i}")).await.expect("put");
        revisions.push(put.header.revision);
    }
    // The others each saw every write, in order.
    for watcher in watchers.iter_mut().take(50) {
        let got = collect_until(watcher, "every write", |r| event_count(r) >= writes).await;
        let seen: Vec<u64> = got.iter().map(|r| r.revision).collect();
        assert_eq!(seen, revisions);
    }
    // The slow one gets them all too, once, in order: its watch was recreated from where it
    // stopped when it fell behind.
    let got = collect_until(&mut slow, "the slow watcher", |r| event_count(r) >= writes).await;
    let seen: Vec<u64> = got.iter().map(|r| r.revision).collect();
    assert_eq!(seen, revisions);
    let values = per_key(&got).remove(&key).expect("the key");
    let expected: Vec<Option<Vec<u8>>> = (0..writes)
        .map(|i| Some(format!("v{i}").into_bytes()))
        .collect();
    assert_eq!(values, expected);

    drop(watchers);
    drop(slow);
    common::eventually("watches released on the nodes", || async {
        let open: u64 = client
            .status()
            .await
            .into_iter()
            .map(|(_, s)| s.map_or(0, |s| s.process.watchers))
            .sum();
        (open == 0)
            .then_some(())
            .ok_or(format!("{open} watches open"))
    })
    .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_start_revision_in_the_future_skips_what_comes_before_it() {
    let cluster = Cluster::start(3, RANGES).await;
    let client = cluster.client().await;
    let key = key_in(&client, 3, 0);
    let first = client.put(key.clone(), "v0").await.expect("put");
    let start = first.header.revision + 3;
    let mut request = WatchRequest::new(KeySpan::key(key.clone()));
    request.start_revision = start;
    let mut watcher = client.watch(request).await.expect("watch");
    let mut revisions = Vec::new();
    for i in 1..=5 {
        let put = client.put(key.clone(), format!("v{i}")).await.expect("put");
        revisions.push(put.header.revision);
    }
    let expected: Vec<u64> = revisions.into_iter().filter(|r| *r >= start).collect();
    let got = collect_until(&mut watcher, "writes from the start revision", |r| {
        event_count(r) >= expected.len()
    })
    .await;
    let seen: Vec<u64> = got.iter().map(|r| r.revision).collect();
    assert_eq!(seen, expected);
    cluster.shutdown().await;
}

/// Regression (found by the campaigns' resumed watch): a watch from a past revision with more
/// history than the client buffers for its caller never opened. Its history filled the buffer
/// before the node confirmed the watch, so the channel paused it until the caller read, while
/// the caller, still in `Client::watch`, waited for the confirmation. Here the client's first
/// watch of every range has just been dropped, and the second one reuses its channels.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_from_a_revision_with_more_history_than_the_client_buffers_opens_and_replays_it() {
    let cluster = Cluster::start(3, RANGES).await;
    let client = cluster.client().await;
    let mut request = WatchRequest::new(everything());
    request.progress_notify = true;
    let first = client.watch(request.clone()).await.expect("first watch");
    let from = client
        .put(key_in(&client, 2, 99), "from")
        .await
        .expect("put")
        .header
        .revision;
    // 25 rounds of 12 keys: more events than the client's buffer of 256 per watch.
    let mut last = BTreeMap::new();
    for round in 0..25 {
        last = put_round(&client, round, 12).await;
    }
    drop(first);

    request.start_revision = from;
    let mut replay = tokio::time::timeout(WAIT, client.watch(request))
        .await
        .expect("the watch from a past revision opens within WAIT")
        .expect("watch");
    let got = collect_until(&mut replay, "the replay", |r| {
        let seen = per_key(r);
        last.iter()
            .all(|(k, v)| seen.get(k).and_then(|values| values.last()) == Some(&Some(v.clone())))
    })
    .await;
    assert!(
        event_count(&got) > 300,
        "every write from the start revision: {} events",
        event_count(&got)
    );
    cluster.shutdown().await;
}
