//! Storage: openraft's conformance suite against the RocksDB log and state machine, group
//! commit batching, and recovery of the state machine after reopen.

use std::sync::atomic::Ordering;

use concord_node::raft_types::{Entry, TypeConfig};
use concord_node::storage::{Engine, LogStore, StateMachine};
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use openraft::StorageError;
use tempfile::TempDir;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = TempDir::new().expect("tempdir");
        let engine = Engine::open(&dir.path().join("db")).expect("open engine");
        let log = LogStore::new(engine.clone(), 1);
        let sm = StateMachine::open(engine, 1, Default::default()).expect("open state machine");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_conformance_suite() {
    Suite::test_all(Builder).await.expect("conformance suite");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_syncs_many_groups_appends_at_once() {
    // On the target directory's disk, not /tmp: on a tmpfs an fsync costs nothing and there
    // would be no queue to batch.
    let dir = TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let engine = Engine::open(&dir.path().join("db")).unwrap();
    const GROUPS: u64 = 8;
    const APPENDS_PER_GROUP: u64 = 200;
    let mut tasks = tokio::task::JoinSet::new();
    for gid in 1..=GROUPS {
        let engine = engine.clone();
        tasks.spawn(async move {
            let mut log = LogStore::new(engine, gid);
            // Each group keeps several appends in flight, as openraft does under load.
            let mut pending = Vec::new();
            for index in 1..=APPENDS_PER_GROUP {
                let entry = Entry::new_blank(openraft::testing::log_id::<TypeConfig>(1, 1, index));
                let (tx, rx) = TypeConfig::oneshot();
                log.append([entry], IOFlushed::signal(tx)).await.unwrap();
                pending.push(rx);
            }
            for rx in pending {
                rx.await
                    .expect("callback completed")
                    .expect("append durable");
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let counters = engine.commit().counters();
    let fsyncs = counters.fsyncs.load(Ordering::Relaxed);
    let appends = counters.appends.load(Ordering::Relaxed);
    assert_eq!(appends, GROUPS * APPENDS_PER_GROUP);
    assert!(
        fsyncs * 10 <= appends,
        "group commit should batch: {fsyncs} fsyncs for {appends} appends"
    );
}

#[tokio::test]
async fn state_machine_recovers_after_reopen() {
    use concord_client::api::{KeySpan, PutRequest, RangeRequest};
    use concord_node::mvcc::Command;
    use openraft::storage::RaftStateMachine;

    let dir = TempDir::new().unwrap();
    let path = dir.path().join("db");
    {
        let engine = Engine::open(&path).unwrap();
        let mut sm = StateMachine::open(engine.clone(), 3, Default::default()).unwrap();
        let entries: Vec<_> = (1..=5u64)
            .map(|i| {
                let cmd = Command::Put(PutRequest {
                    key: format!("k{i}").into_bytes(),
                    value: b"v".to_vec(),
                    lease: 0,
                    prev_kv: false,
                });
                Ok((
                    Entry::new_normal(openraft::testing::log_id::<TypeConfig>(1, 1, i), cmd),
                    None,
                ))
            })
            .collect();
        sm.apply(futures::stream::iter(entries)).await.unwrap();
        engine.commit().sync().await.unwrap();
    }
    let engine = Engine::open(&path).unwrap();
    let mut sm = StateMachine::open(engine, 3, Default::default()).unwrap();
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index()), Some(5));
    let state = sm.state();
    let state = state.read().unwrap();
    assert_eq!(state.mvcc.revision(), 5);
    assert_eq!(
        state
            .mvcc
            .range(&RangeRequest::new(KeySpan::prefix("k")))
            .unwrap()
            .count,
        5
    );
}

/// A replica that applies a split late, after the new range's leader has already filled a
/// replica of the new range on the same node with a snapshot, keeps that replica as the
/// snapshot left it: before the fix, the split's first rows took it back to the split (its
/// applied state, its log's start), and after a restart its log ended below what it had
/// acknowledged (openraft: "follower log reversion").
#[tokio::test]
async fn a_split_applied_late_leaves_the_new_ranges_replica_alone() {
    use concord_client::api::{KeySpan, PutRequest};
    use concord_node::mvcc::Command;
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};

    const PARENT: u64 = 3;
    const NEW: u64 = 70;
    let log_id = |index| openraft::testing::log_id::<TypeConfig>(1, 1, index);
    let put = |key: &str, value: &str| {
        Command::Put(PutRequest {
            key: key.into(),
            value: value.into(),
            lease: 0,
            prev_kv: false,
        })
    };
    // The parent's log: two writes, then the split at "m".
    let parent_log = || {
        vec![
            Entry::new_normal(log_id(1), put("a", "1")),
            Entry::new_normal(log_id(2), put("x", "1")),
            Entry::new_normal(
                log_id(3),
                Command::Split {
                    at: b"m".to_vec(),
                    new_range: NEW,
                },
            ),
        ]
    };
    let apply =
        |entries: Vec<Entry>| futures::stream::iter(entries.into_iter().map(|e| Ok((e, None))));

    // Another node applied the split in time; the new range then took a write and its leader
    // built a snapshot.
    let other = TempDir::new().unwrap();
    let engine = Engine::open(&other.path().join("db")).unwrap();
    let mut parent = StateMachine::open(engine.clone(), PARENT, Default::default()).unwrap();
    parent.apply(apply(parent_log())).await.unwrap();
    let mut new = StateMachine::open(engine.clone(), NEW, Default::default()).unwrap();
    let after_split = openraft::testing::log_id::<TypeConfig>(2, 2, 9);
    new.apply(apply(vec![Entry::new_normal(after_split, put("x", "2"))]))
        .await
        .unwrap();
    let snapshot = new
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert_eq!(snapshot.meta.last_log_id, Some(after_split));

    // This node hosts a replica of the new range, filled by that snapshot, and only then
    // applies the parent's split.
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("db");
    {
        let engine = Engine::open(&path).unwrap();
        let mut replica = StateMachine::open(engine.clone(), NEW, Default::default()).unwrap();
        replica
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .unwrap();
        let mut log = LogStore::new(engine.clone(), NEW);
        log.purge(after_split).await.unwrap();
        let mut late = StateMachine::open(engine.clone(), PARENT, Default::default()).unwrap();
        late.apply(apply(parent_log())).await.unwrap();
        engine.commit().sync().await.unwrap();
    }

    // After a restart the new range's replica is where the snapshot put it.
    let engine = Engine::open(&path).unwrap();
    let mut replica = StateMachine::open(engine.clone(), NEW, Default::default()).unwrap();
    let (applied, _) = replica.applied_state().await.unwrap();
    assert_eq!(
        applied,
        Some(after_split),
        "the split took the new range back"
    );
    let state = LogStore::new(engine.clone(), NEW)
        .get_log_state()
        .await
        .unwrap();
    assert_eq!(
        (state.last_purged_log_id, state.last_log_id),
        (Some(after_split), Some(after_split)),
        "the new range's log starts where its snapshot ends"
    );
    let x = scan(&replica, KeySpan::key("x"));
    assert_eq!(x.kvs[0].value, b"2");
    // The parent gave up its keys from "m" on all the same.
    let parent = StateMachine::open(engine, PARENT, Default::default()).unwrap();
    let all = scan(&parent, KeySpan::prefix(""));
    assert_eq!(
        all.kvs.len(),
        1,
        "only \"a\" stays with the parent: {:?}",
        all.kvs
    );
}

/// The keys of `span` in `sm`'s applied state.
fn scan(
    sm: &StateMachine,
    span: concord_client::api::KeySpan,
) -> concord_client::api::RangeResponse {
    use concord_client::api::RangeRequest;
    sm.state()
        .read()
        .unwrap()
        .mvcc
        .range(&RangeRequest::new(span))
        .unwrap()
}
