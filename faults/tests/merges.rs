//! Merges that take long, on namespaced test hosts: the `merge-after-freeze` fail point holds
//! a merge between the right range's freeze and the merge entry, as shipping a large range's
//! state does. Root is required (network namespaces), as in CI.

use std::time::{Duration, Instant};

use concord_client::api::{ApiError, Consistency, KeySpan, RangeRequest};
use concord_client::{Client, Error};

mod common;

/// How long the merge holds the right range frozen: longer than a request's attempts last
/// (12 attempts, about 5 s of backoff and route refreshes).
const FROZEN_MS: u64 = 8_000;

/// Longest the test waits to see the right range frozen once the merge was asked for.
const FREEZE_SEEN_MAX: Duration = Duration::from_secs(20);

/// Requests sent to the frozen range.
const WRITES: usize = 8;

/// Keys `k/0..`, in bootstrap range 2 of a 2-range layout (which starts at `U`).
fn key(i: usize) -> Vec<u8> {
    format!("k/{i}").into_bytes()
}

/// Whether `e` is a frozen range's answer, as a client with one attempt returns it.
fn is_merging(e: &Error) -> bool {
    match e {
        Error::Api(ApiError::Merging { .. }) => true,
        Error::Exhausted { last, .. } => is_merging(last),
        _ => false,
    }
}

/// Regression (docs/benchmarks/placement.md, merges under traffic): while a merge shipped a
/// large range's state, the frozen range answered `STALE_EPOCH`, the client retried it as a
/// stale route, and requests ran out of attempts (`EXHAUSTED`, 17 of them in one run). A
/// frozen range now answers `MERGING`, and the client waits for the merge (at most
/// `merge_wait`) before it sends the request to the merged range.
#[test]
fn requests_to_a_range_frozen_for_seconds_by_a_merge_wait_for_it_instead_of_failing() {
    let (mut cluster, dir, runtime) = common::namespaced_cluster("merges-frozen", 3, 2);
    runtime.block_on(async {
        let client = Client::connect(cluster.client_config(Duration::from_secs(2)))
            .await
            .expect("client");
        // A probe that gives up at once: it tells when the right range is frozen.
        let mut probe_config = cluster.client_config(Duration::from_secs(2));
        probe_config.attempts_max = 1;
        probe_config.merge_wait = Duration::ZERO;
        let probe = Client::connect(probe_config).await.expect("probe client");
        let before = client
            .put(key(0), b"before".to_vec())
            .await
            .expect("put before");
        let right = before.header.range_id;
        assert_eq!(right, 2, "k/ lies in bootstrap range 2");

        // Whichever node leads range 1 runs the merge: arm the pause on every node.
        for host in 0..cluster.nodes() {
            cluster
                .arm_live_with(
                    &client,
                    host,
                    "merge-after-freeze",
                    &format!("return({FROZEN_MS})"),
                )
                .await
                .expect("arming merge-after-freeze (a concord built with failpoints)");
        }
        // The merge's own request lasts as long as its pause: give it time.
        let operator = Client::connect(cluster.client_config(Duration::from_secs(30)))
            .await
            .expect("operator client");
        let merge = tokio::spawn(async move {
            let merged = operator.merge(1).await;
            (merged, Instant::now())
        });
        let asked = Instant::now();
        loop {
            let request = RangeRequest::new(KeySpan::key(key(0)));
            match probe.range(request, Consistency::Serializable).await {
                Err(e) if is_merging(&e) => break,
                _ if asked.elapsed() > FREEZE_SEEN_MAX => panic!(
                    "range {right} not seen frozen within {FREEZE_SEEN_MAX:?} of the merge; \
                     node logs in {}",
                    dir.display()
                ),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }

        // Range 1 does not split while it merges: a split would move its end away from the
        // range it froze, and the merge would be refused (seen in bench-placement, a load
        // split racing an operator's merge).
        let split = client.split("A/split").await;
        // Refused by the leader as UNAVAILABLE (a merge under way), retried, given up: the
        // last answer may be a follower's NOT_LEADER. Had it split, the merge below would be
        // refused ("range 2 is not the frozen right neighbour of range 1").
        assert!(split.is_err(), "range 1 split during its merge: {split:?}");

        // Writes and a read to the frozen range: each waits for the merge, none fails.
        let frozen_at = Instant::now();
        let writes: Vec<_> = (1..=WRITES)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move { client.put(key(i), b"during".to_vec()).await })
            })
            .collect();
        let read = read_first_key(&client).await;
        for (i, write) in writes.into_iter().enumerate() {
            let put = write
                .await
                .expect("write task")
                .unwrap_or_else(|e| panic!("write {} to the frozen range failed: {e}", i + 1));
            assert_eq!(
                put.header.range_id, 1,
                "a write that waited for the merge lands in the merged range"
            );
        }
        let waited = frozen_at.elapsed();
        assert_eq!(read.as_deref(), Some(&b"before"[..]), "the read waited too");
        let (merged, merged_at) = merge.await.expect("merge task");
        let merged = merged.expect("the merge goes through after its pause");
        assert_eq!((merged.header.range_id, merged.merged_range_id), (1, 2));
        assert!(
            merged_at.duration_since(frozen_at) < Duration::from_millis(2 * FROZEN_MS),
            "the merge ran once: no leader hand-over restarted it"
        );
        for i in 1..=WRITES {
            let got = client.get(key(i)).await.expect("read back");
            assert_eq!(
                got.kvs.first().map(|kv| kv.value.as_slice()),
                Some(&b"during"[..]),
                "k/{i} after the merge"
            );
        }
        eprintln!(
            "the requests waited {waited:?}; the merge answered {:?} after the freeze was seen",
            merged_at.duration_since(frozen_at)
        );
        cluster.disarm_live().await;
    });
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A linearizable read of `k/0` through `client` (which waits for a merge), as bytes.
async fn read_first_key(client: &Client) -> Option<Vec<u8>> {
    let got = client
        .get(key(0))
        .await
        .expect("a read of the frozen range waits for the merge");
    got.kvs.into_iter().next().map(|kv| kv.value)
}
