//! Leases on an in-process 3-node cluster: expiry and revoke delete attached keys in every
//! range, keepalives keep them, a key moved off a lease survives it, and a leader change of the
//! owner range neither expires a live lease nor gives a dead one a fresh TTL.

mod common;

use std::time::{Duration, Instant};

use common::{eventually, key_in, Cluster};
use concord_client::api::{ApiError, KeySpan, LeaseId, RangeId, RangeRequest};
use concord_client::{Client, Error, Session};
use concord_transport::lease::lease_anchor;

const RANGES: usize = 4;

async fn present(client: &Client, key: &[u8]) -> bool {
    let r = client
        .range(
            RangeRequest::new(KeySpan::key(key.to_vec())),
            Default::default(),
        )
        .await
        .expect("read");
    !r.kvs.is_empty()
}

/// One key per range attached to `lease`, tagged `tag`.
async fn attach_everywhere(client: &Client, lease: LeaseId, tag: usize) -> Vec<Vec<u8>> {
    let mut keys = Vec::new();
    for range in 1..=RANGES as u64 {
        let key = key_in(client, range, tag);
        client
            .put_leased(key.clone(), "v", lease)
            .await
            .unwrap_or_else(|e| panic!("leased put in range {range}: {e}"));
        keys.push(key);
    }
    keys
}

async fn wait_all_gone(client: &Client, what: &str, keys: &[Vec<u8>]) {
    eventually(what, || async {
        for key in keys {
            if present(client, key).await {
                return Err(format!("{:?} still present", String::from_utf8_lossy(key)));
            }
        }
        Ok(())
    })
    .await;
}

fn is_lease_not_found(r: Result<impl std::fmt::Debug, Error>) -> bool {
    matches!(r, Err(Error::Api(ApiError::LeaseNotFound { .. })))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expiry_and_revoke_delete_keys_in_every_range() {
    let cluster = Cluster::start(3, RANGES).await;
    let client = cluster.client().await;
    let ttl = Duration::from_secs(2);

    let kept = client.session(ttl).await.expect("session");
    let dying = client.lease_grant(ttl).await.expect("grant");
    let revoked = client
        .lease_grant(Duration::from_secs(60))
        .await
        .expect("grant");
    let kept_keys = attach_everywhere(&client, kept.lease(), 1).await;
    let dying_keys = attach_everywhere(&client, dying, 2).await;
    let revoked_keys = attach_everywhere(&client, revoked, 3).await;

    let listed = client.lease_list().await.expect("list");
    for id in [kept.lease(), dying, revoked] {
        assert!(listed.contains(&id), "lease {id} missing from {listed:?}");
    }
    let ttl_info = client.lease_time_to_live(revoked, true).await.expect("ttl");
    assert_eq!(ttl_info.granted_ttl_ms, 60_000);
    assert_eq!(
        ttl_info.keys.len(),
        RANGES,
        "keys of {revoked}: {ttl_info:?}"
    );

    client.lease_revoke(revoked).await.expect("revoke");
    // A revoke answers once the keys are gone in every range.
    for key in &revoked_keys {
        assert!(!present(&client, key).await, "{key:?} outlived the revoke");
    }
    wait_all_gone(&client, "expired lease's keys deleted", &dying_keys).await;

    // Dead leases refuse new keys, in the owner range and elsewhere.
    for (id, tag) in [(dying, 4), (revoked, 5)] {
        for range in 1..=RANGES as u64 {
            let r = client
                .put_leased(key_in(&client, range, tag), "v", id)
                .await;
            assert!(
                is_lease_not_found(r),
                "put with dead lease {id} in range {range}"
            );
        }
        assert!(is_lease_not_found(client.lease_keep_alive_once(id).await));
    }

    // Kept alive well past its TTL: every key is still there.
    // The passing of lease time is the scenario here, not a synchronisation.
    tokio::time::sleep(2 * ttl).await;
    assert!(kept.is_alive());
    for key in &kept_keys {
        assert!(present(&client, key).await, "kept key {key:?} vanished");
    }

    // A key moved off the lease outlives it; closing the session deletes the rest.
    client
        .put(kept_keys[0].clone(), "mine now")
        .await
        .expect("re-put");
    kept.close().await.expect("close session");
    wait_all_gone(&client, "closed session's keys deleted", &kept_keys[1..]).await;
    assert!(
        present(&client, &kept_keys[0]).await,
        "re-put key was deleted"
    );
    cluster.shutdown().await;
}

/// Lease ids whose owner is `range`.
fn ids_owned_by(client: &Client, range: RangeId, n: usize) -> Vec<LeaseId> {
    let ranges = client.routes().ranges;
    (1..)
        .filter(|id| {
            let anchor = lease_anchor(*id);
            ranges.iter().any(|d| d.id == range && d.contains(&anchor))
        })
        .take(n)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn owner_leader_change_keeps_live_leases_and_dead_ones_dead() {
    let mut cluster = Cluster::start(3, RANGES).await;
    let client = cluster.client().await;
    let owner: RangeId = 1;
    let ids = ids_owned_by(&client, owner, 2);
    let ttl = Duration::from_secs(8);

    let live = client.lease_grant_id(ids[0], ttl).await.expect("grant");
    let live = Session::keep(client.clone(), live, ttl);
    let dead = client.lease_grant_id(ids[1], ttl).await.expect("grant");
    let granted = Instant::now();
    let live_key = key_in(&client, 2, 1);
    let dead_key = key_in(&client, 3, 2);
    client
        .put_leased(live_key.clone(), "v", live.lease())
        .await
        .unwrap();
    client
        .put_leased(dead_key.clone(), "v", dead)
        .await
        .unwrap();

    // Most of the dead lease's TTL passes, then the owner range loses its leader.
    tokio::time::sleep_until((granted + Duration::from_secs(6)).into()).await;
    let leader = cluster.leader_of(owner).expect("owner range has a leader");
    cluster.stop(leader).await;

    // A fresh TTL would keep the dead lease until 14 s after the grant; the replicated lease
    // clock expires it at 8 s plus the failover.
    wait_all_gone(&client, "dead lease's key deleted", &[dead_key]).await;
    let lived = granted.elapsed();
    assert!(
        lived < Duration::from_secs(13),
        "the dead lease lived {lived:?}: the leader change reset its TTL"
    );
    assert!(
        lived >= ttl,
        "the dead lease expired early, after {lived:?}"
    );

    // The live lease survived the failover and still survives a full TTL later.
    tokio::time::sleep(ttl).await;
    assert!(live.is_alive(), "live lease lost in the failover");
    assert!(
        present(&client, &live_key).await,
        "live lease's key vanished"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keepalive_batches_renew_many_leases_per_owner_range() {
    let cluster = Cluster::start(3, RANGES).await;
    let client = cluster.client().await;
    let ttl = Duration::from_secs(1);
    let mut live = Vec::new();
    for _ in 0..20 {
        live.push(client.lease_grant(ttl).await.expect("grant"));
    }
    let owners: std::collections::BTreeSet<_> = live
        .iter()
        .map(|id| {
            let anchor = lease_anchor(*id);
            let routes = client.routes();
            routes
                .ranges
                .iter()
                .find(|d| d.contains(&anchor))
                .expect("owner")
                .id
        })
        .collect();
    assert!(owners.len() > 1, "the leases spread over owner ranges");
    let revoked = live.pop().expect("one");
    client.lease_revoke(revoked).await.expect("revoke");
    let mut ids = live.clone();
    ids.extend([revoked, 4242]);

    // Renew in batches for three TTLs: every live lease survives, the others are reported.
    let until = Instant::now() + 3 * ttl;
    while Instant::now() < until {
        let (renewed, missing) = client.lease_keep_alive_many(&ids).await.expect("batch");
        let mut renewed: Vec<LeaseId> = renewed.into_iter().map(|(id, _)| id).collect();
        renewed.sort_unstable();
        let mut expected = live.clone();
        expected.sort_unstable();
        assert_eq!(renewed, expected);
        let mut missing = missing;
        missing.sort_unstable();
        assert_eq!(missing, [4242, revoked]);
        tokio::time::sleep(ttl / 4).await;
    }
    let listed = client.lease_list().await.expect("list");
    assert!(live.iter().all(|id| listed.contains(id)));
    cluster.shutdown().await;
}

/// A renewal acknowledged just before the owner range's leader goes holds a full TTL from
/// when it was sent. The fault campaign (`concord-faults`, seed 20261123) found leases expiring
/// early after acknowledged keepalives under pauses and partitions: the renewal lived only in
/// the old leader's memory until its next tick, and a tick already in flight could expire a
/// lease just renewed. Keepalives are now acknowledged only once a tick carrying them has been
/// applied. This test checks that contract across a graceful leader stop; it did not fail
/// before the fix (the stopping node still ticked), the campaign is what reproduces the bug.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renewal_acknowledged_before_a_failover_holds_a_full_ttl() {
    let mut cluster = Cluster::start(3, RANGES).await;
    let client = cluster.client().await;
    let owner: RangeId = 1;
    let id = ids_owned_by(&client, owner, 1)[0];
    let ttl = Duration::from_secs(4);
    let lease = client.lease_grant_id(id, ttl).await.expect("grant");
    let key = key_in(&client, 2, 7);
    client.put_leased(key.clone(), "v", lease).await.unwrap();

    // Late in the lease's life, a renewal; the owner's leader goes right after its answer.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let renewed = Instant::now();
    client
        .lease_keep_alive_once(lease)
        .await
        .expect("keepalive");
    let leader = cluster.leader_of(owner).expect("owner range has a leader");
    cluster.stop(leader).await;

    // The renewal must hold a full TTL from when it was sent, whoever leads now.
    let until = renewed + ttl - Duration::from_millis(300);
    while Instant::now() < until {
        assert!(
            present(&client, &key).await,
            "the renewed lease's key vanished {:?} after an acknowledged keepalive",
            renewed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ephemeral_key_is_granted_and_put_in_one_entry_and_goes_with_its_lease() {
    let cluster = Cluster::start(3, RANGES).await;
    let client = cluster.client().await;
    let ttl = Duration::from_secs(2);

    // One ephemeral key per range; each lease is owned by its key's range, and the grant and
    // the put took one revision of it (a grant alone takes none, a put one).
    let mut ephemeral = Vec::new();
    for range in 1..=RANGES as u64 {
        let key = key_in(&client, range, 7);
        let before = client.get(key.clone()).await.expect("read").headers[0].revision;
        let (lease, put) = client
            .put_ephemeral(key.clone(), "here", ttl)
            .await
            .unwrap_or_else(|e| panic!("ephemeral put in range {range}: {e}"));
        assert_eq!(put.header.range_id, range, "the key's own range answers");
        assert!(
            client
                .routes()
                .ranges
                .iter()
                .any(|d| d.id == range && d.contains(&lease_anchor(lease))),
            "lease {lease} is owned by the key's range {range}"
        );
        assert_eq!(
            put.header.revision,
            before + 1,
            "one revision for grant and put"
        );
        let info = client.lease_time_to_live(lease, true).await.expect("ttl");
        assert_eq!(info.granted_ttl_ms, 2_000);
        assert_eq!(info.keys, vec![key.clone()]);
        ephemeral.push((lease, key));
    }

    // A used id is refused with nothing applied: the key keeps its value.
    let (used, key) = ephemeral[0].clone();
    let again = client
        .put_ephemeral_id(used, key.clone(), b"again".to_vec(), ttl)
        .await;
    assert!(
        matches!(again, Err(Error::Api(ApiError::LeaseExists { .. }))),
        "a reused lease id: {again:?}"
    );
    let got = client.get(key.clone()).await.expect("read");
    assert_eq!(
        got.kvs[0].value,
        b"here".to_vec(),
        "nothing of the refused entry applied"
    );

    // Revoked: its key goes at once. Left to expire: the others go within the TTL.
    client.lease_revoke(used).await.expect("revoke");
    assert!(!present(&client, &key).await, "revoked lease's key deleted");
    let rest: Vec<_> = ephemeral[1..].iter().map(|(_, k)| k.clone()).collect();
    wait_all_gone(&client, "expired ephemeral keys deleted", &rest).await;
    cluster.shutdown().await;
}
