//! Micro-benchmarks of the hot paths: MVCC apply and read, the wire codec, the group-commit
//! writer, and watch dispatch (selecting a revision's events for a watch group and encoding
//! the frame every watch of the group shares).

use std::time::{Duration, Instant};

use concord_node::mvcc::{Command, Mvcc};
use concord_node::storage::Engine;
use concord_transport::api::{
    ClientRequest, KeySpan, KeyValue, KvRequest, PutRequest, RangeRequest, ResponseHeader,
};
use concord_transport::watch::{Event, EventKind, WatchMessage, WatchRequest};
use concord_transport::wire;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

fn put(i: u64) -> Command {
    Command::Put(PutRequest {
        key: format!("key/{:08}", i % 10_000).into_bytes(),
        value: vec![b'v'; 256],
        lease: 0,
        prev_kv: false,
    })
}

fn mvcc(c: &mut Criterion) {
    c.bench_function("mvcc_apply_put_256b", |b| {
        let mut m = Mvcc::new(1);
        let mut out = Vec::new();
        let mut i = 0;
        b.iter(|| {
            i += 1;
            out.clear();
            m.apply(&put(i), &mut out).unwrap();
        })
    });
    let mut m = Mvcc::new(1);
    for i in 0..10_000 {
        m.apply(&put(i), &mut Vec::new()).unwrap();
    }
    c.bench_function("mvcc_get_latest_of_10k", |b| {
        let req = RangeRequest::new(KeySpan::key("key/00005000"));
        b.iter(|| m.range(&req).unwrap())
    });
    c.bench_function("mvcc_scan_100_of_10k", |b| {
        let mut req = RangeRequest::new(KeySpan::prefix("key/0000"));
        req.limit = 100;
        b.iter(|| m.range(&req).unwrap())
    });
}

fn codec(c: &mut Criterion) {
    let request = ClientRequest::Kv {
        range_id: 3,
        epoch: 1,
        request: KvRequest::Put(PutRequest {
            key: b"key/00000001".to_vec(),
            value: vec![b'v'; 256],
            lease: 0,
            prev_kv: false,
        }),
    };
    c.bench_function("wire_encode_put_256b", |b| {
        b.iter(|| wire::encode_frame(&request))
    });
    let frame = wire::encode_frame(&request);
    c.bench_function("wire_decode_put_256b", |b| {
        b.iter_batched(
            || frame[wire::FRAME_HEADER_LEN..].to_vec(),
            |p| wire::decode::<ClientRequest>(&p).unwrap(),
            BatchSize::SmallInput,
        )
    });
}

/// `writers` concurrent writers each put 256 bytes (unsynced) and wait for the group-commit
/// writer to make it durable: the time of one such round, on the disk of the temp dir.
fn group_commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let engine = Engine::open(dir.path()).expect("opening RocksDB");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let mut group = c.benchmark_group("group_commit");
    group.sample_size(20);
    for writers in [1usize, 64] {
        group.bench_function(format!("put_256b_then_sync_{writers}_writers"), |b| {
            b.iter_custom(|rounds| {
                let mut total = Duration::ZERO;
                for round in 0..rounds {
                    let started = Instant::now();
                    runtime.block_on(async {
                        let mut tasks = tokio::task::JoinSet::new();
                        for w in 0..writers {
                            let engine = engine.clone();
                            tasks.spawn(async move {
                                let key = format!("bench/{round}/{w}");
                                engine.db().put(key, [b'v'; 256]).expect("put");
                                engine.commit().sync().await.expect("sync");
                            });
                        }
                        while tasks.join_next().await.is_some() {}
                    });
                    total += started.elapsed();
                }
                total
            })
        });
    }
    group.finish();
}

fn event(i: usize) -> Event {
    Event {
        kind: EventKind::Put,
        kv: KeyValue {
            key: format!(
                "{}/service/{i:06}",
                if i.is_multiple_of(2) { "app" } else { "other" }
            )
            .into_bytes(),
            value: vec![b'v'; 128],
            create_revision: 10,
            mod_revision: 20,
            version: 2,
            lease: 0,
        },
        prev_kv: None,
    }
}

/// A 16-event revision, half under the watched prefix: select the group's events, then
/// encode the one frame all the group's watches share.
fn watch_dispatch(c: &mut Criterion) {
    let events: Vec<Event> = (0..16).map(event).collect();
    let request = WatchRequest::new(KeySpan::prefix("app/"));
    c.bench_function("watch_select_and_encode_16_events", |b| {
        b.iter(|| {
            let selected = request.select(&events);
            wire::encode_frame(&WatchMessage::Events {
                group: 1,
                header: ResponseHeader {
                    range_id: 1,
                    revision: 20,
                },
                events: selected,
            })
        })
    });
}

criterion_group!(benches, mvcc, codec, group_commit, watch_dispatch);
criterion_main!(benches);
