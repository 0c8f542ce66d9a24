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
    new.get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    // What its leader sends a replica: the state encoded when asked.
    let snapshot = new.get_current_snapshot().await.unwrap().unwrap();
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

/// Building a snapshot writes no copy of the state (its bytes are encoded only when a
/// follower is sent one), and the snapshot read afterwards is of the current state, applied
/// entries since the build included; installed on another replica, it gives that state. While
/// the node holds snapshots (openraft starting the group), a read is metadata only.
#[tokio::test]
async fn a_snapshot_is_encoded_when_read_and_carries_the_current_state() {
    use concord_client::api::{KeySpan, PutRequest};
    use concord_node::mvcc::Command;
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};

    const GID: u64 = 3;
    let log_id = |index| openraft::testing::log_id::<TypeConfig>(1, 1, index);
    let put = |index: u64, key: &str, value: Vec<u8>| {
        let cmd = Command::Put(PutRequest {
            key: key.into(),
            value,
            lease: 0,
            prev_kv: false,
        });
        futures::stream::iter([Ok((Entry::new_normal(log_id(index), cmd), None))])
    };
    let dir = TempDir::new().unwrap();
    let engine = Engine::open(&dir.path().join("db")).unwrap();
    let mut sm = StateMachine::open(engine.clone(), GID, Default::default()).unwrap();
    assert!(
        sm.get_current_snapshot().await.unwrap().is_none(),
        "no snapshot before the first build"
    );
    // A state of a quarter of a MiB: a build that stored it would show.
    sm.apply(put(1, "a", vec![b'a'; 256 << 10])).await.unwrap();
    sm.apply(put(2, "b", b"2".to_vec())).await.unwrap();
    let sm_bytes_before = sm_column_bytes(&engine, GID);
    let built = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert_eq!(built.meta.last_log_id, Some(log_id(2)));
    assert!(
        built.snapshot.get_ref().is_empty(),
        "a build encodes nothing"
    );
    assert!(
        sm_column_bytes(&engine, GID) < sm_bytes_before + 1024,
        "a build stores the snapshot's metadata only"
    );

    sm.apply(put(3, "c", b"3".to_vec())).await.unwrap();
    {
        let _hold = sm.hold_snapshots();
        let held = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(held.meta.last_log_id, Some(log_id(3)));
        assert!(
            held.snapshot.get_ref().is_empty(),
            "metadata only while held"
        );
    }
    let snapshot = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(
        snapshot.meta.last_log_id,
        Some(log_id(3)),
        "the current state"
    );

    let other = TempDir::new().unwrap();
    let other_engine = Engine::open(&other.path().join("db")).unwrap();
    let mut replica = StateMachine::open(other_engine, GID, Default::default()).unwrap();
    replica
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    let (applied, _) = replica.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(3)));
    let all = scan(&replica, KeySpan::prefix(""));
    let keys: Vec<_> = all.kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(keys, [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
}

/// The bytes of group `gid`'s rows in the `sm` column family.
fn sm_column_bytes(engine: &Engine, gid: u64) -> usize {
    let cf = engine.db().cf_handle("sm").expect("the sm column family");
    let from = gid.to_be_bytes();
    engine
        .db()
        .iterator_cf(
            cf,
            rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward),
        )
        .map(|row| row.expect("read the sm column family"))
        .take_while(|(key, _)| key.starts_with(&from))
        .map(|(key, value)| key.len() + value.len())
        .sum()
}

/// Regression (the split/merge/move/kill campaign, a node that panicked at every restart with
/// a key "outside the range"): a replica of a bootstrap range created empty by a move and
/// filled by replaying the range's log from index 0 must start from the same extent as the
/// replicas initialised at the first start. It started from the whole keyspace: the merge in
/// the log was refused there (the left range must end where the right one starts), its state
/// diverged from the other replicas', and at the next start, opened with the layout's extent,
/// the keys merged in were outside it. Every replica now opens with `initial_bounds`
/// (`GroupOpener::open` takes no extent from its callers). This test checks that extent
/// gives a replayed replica the voters' state; with the whole keyspace in its place (what
/// `host_replica` passed) it fails as node 4 did. It does not drive `host_replica` itself.
#[tokio::test]
async fn a_bootstrap_range_replayed_from_index_0_matches_its_voters_and_reopens() {
    use concord_client::api::{KeySpan, PutRequest};
    use concord_node::mvcc::Command;
    use concord_node::node::initial_bounds;
    use openraft::storage::RaftStateMachine;

    let layout = concord_placement::bootstrap_layout(4, &[1, 2, 3]);
    let (left, right) = (initial_bounds(&layout, 1), initial_bounds(&layout, 2));
    assert_eq!(left.end, right.start, "ranges 1 and 2 are neighbours");
    let in_right = |i: u32| {
        let mut key = right.start.clone();
        key.extend_from_slice(format!("/{i}").as_bytes());
        key
    };
    let put = |key: Vec<u8>, value: &str| {
        Command::Put(PutRequest {
            key,
            value: value.into(),
            lease: 0,
            prev_kv: false,
        })
    };
    let apply = |entries: Vec<(u64, Command)>| {
        futures::stream::iter(entries.into_iter().map(|(index, cmd)| {
            let id = openraft::testing::log_id::<TypeConfig>(1, 1, index);
            Ok((Entry::new_normal(id, cmd), None))
        }))
    };

    // Range 2 takes two writes and is frozen for a merge into range 1.
    let scratch = TempDir::new().unwrap();
    let engine = Engine::open(&scratch.path().join("db")).unwrap();
    let mut range2 = StateMachine::open(engine.clone(), 2, right.clone()).unwrap();
    range2
        .apply(apply(vec![
            (1, put(in_right(1), "1")),
            (2, put(in_right(1), "2")),
            (3, Command::Freeze { into: 1 }),
        ]))
        .await
        .unwrap();
    let frozen = Box::new(range2.state().read().unwrap().mvcc.clone());
    // Range 1's log: a write, the merge, a write to a key merged in.
    let log = || {
        vec![
            (1, put(vec![1], "a")),
            (
                2,
                Command::Merge {
                    right: frozen.clone(),
                },
            ),
            (3, put(in_right(1), "3")),
        ]
    };
    let mut voter = StateMachine::open(engine.clone(), 1, initial_bounds(&layout, 1)).unwrap();
    voter.apply(apply(log())).await.unwrap();

    // A replica moved here: empty, opened as the node opens every group, filled by replaying
    // the log from index 0 (the leader had purged nothing).
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("db");
    {
        let engine = Engine::open(&path).unwrap();
        let mut replica =
            StateMachine::open(engine.clone(), 1, initial_bounds(&layout, 1)).unwrap();
        replica.apply(apply(log())).await.unwrap();
        engine.commit().sync().await.unwrap();
    }
    // Restarted: it opens (from the whole keyspace: "outside the range"), as the voter is.
    let engine = Engine::open(&path).unwrap();
    let replica = StateMachine::open(engine, 1, initial_bounds(&layout, 1)).unwrap();
    let (ours, theirs) = (
        scan(&replica, KeySpan::prefix("")),
        scan(&voter, KeySpan::prefix("")),
    );
    assert_eq!(ours.kvs, theirs.kvs, "the replayed replica diverged");
    let merged = ours
        .kvs
        .iter()
        .find(|kv| kv.key == in_right(1))
        .expect("the merged key");
    assert_eq!((merged.version, merged.value.as_slice()), (3, &b"3"[..]));
    assert_eq!(
        replica.state().read().unwrap().mvcc.bounds().end,
        right.end,
        "range 1 took range 2's extent"
    );
}
