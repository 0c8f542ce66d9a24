//! Micro-benchmarks: MVCC apply and read, and the wire codec.

use concord_node::mvcc::{Command, Mvcc};
use concord_transport::api::{ClientRequest, KeySpan, KvRequest, PutRequest, RangeRequest};
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

criterion_group!(benches, mvcc, codec);
criterion_main!(benches);
