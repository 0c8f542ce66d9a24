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
