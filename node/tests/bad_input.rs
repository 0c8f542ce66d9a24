//! Bad input: oversize keys, values and requests, too many txn ops, malformed frames and
//! unknown wire versions get their documented errors, a watch channel refuses watches past its
//! limit, and the node keeps serving.

mod common;

use common::Cluster;
use concord_client::api::{
    ApiError, ClientRequest, DeleteRequest, KeySpan, PutRequest, TxnOp, TxnRequest,
};
use concord_client::watch_api::WatchRequest;
use concord_client::Error;
use concord_transport::wire::{encode_frame, WIRE_VERSION};

fn code(r: Result<impl std::fmt::Debug, Error>) -> &'static str {
    match r {
        Err(e) => e.code(),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_clear_errors_and_the_node_keeps_serving() {
    let cluster = Cluster::start(3, 2).await;
    let client = cluster.client().await;
    let addr = cluster.members[&1].to_string();

    assert_eq!(
        code(client.put(vec![b'k'; 4097], "v").await),
        "KEY_TOO_LARGE"
    );
    assert_eq!(
        code(client.put("k", vec![0u8; (1 << 20) + 1]).await),
        "VALUE_TOO_LARGE"
    );
    let txn = TxnRequest {
        fence: None,
        compares: vec![],
        success: (0..129)
            .map(|_| {
                TxnOp::Delete(DeleteRequest {
                    span: KeySpan::key("k"),
                    prev_kv: false,
                })
            })
            .collect(),
        failure: vec![],
    };
    assert_eq!(code(client.txn(txn).await), "TOO_MANY_TXN_OPS");
    assert_eq!(
        code(
            client
                .put_with(PutRequest {
                    key: b"k".to_vec(),
                    value: b"v".to_vec(),
                    lease: 7,
                    prev_kv: false
                })
                .await
        ),
        "LEASE_NOT_FOUND"
    );
    let short = client
        .lease_grant(std::time::Duration::from_millis(10))
        .await;
    assert_eq!(code(short), "INVALID_REQUEST");

    // A frame announcing more than the request limit: refused before its payload is read.
    let mut header = ((3u32 << 20).to_be_bytes()).to_vec();
    header.push(WIRE_VERSION);
    let r = client
        .send_raw(&addr, &header)
        .await
        .expect("a response frame");
    assert!(
        matches!(r, Err(ApiError::RequestTooLarge { size, .. }) if size == 3 << 20),
        "{r:?}"
    );

    // Garbage payload.
    let r = client
        .send_raw(&addr, &[0, 0, 0, 4, WIRE_VERSION, 0xff, 0xfe, 0xfd, 0xfc])
        .await
        .unwrap();
    assert!(matches!(r, Err(ApiError::Malformed(_))), "{r:?}");

    // A version this node does not speak.
    let mut frame = encode_frame(&ClientRequest::Status);
    frame[4] = WIRE_VERSION + 1;
    let r = client.send_raw(&addr, &frame).await.unwrap();
    assert!(
        matches!(r, Err(ApiError::UnsupportedVersion { got, .. }) if got == WIRE_VERSION + 1),
        "{r:?}"
    );

    // Truncated frame (stream finished early).
    let r = client
        .send_raw(&addr, &[0, 0, 0, 9, WIRE_VERSION, 1])
        .await
        .unwrap();
    assert!(matches!(r, Err(ApiError::Malformed(_))), "{r:?}");

    // Nothing of the refused requests was applied, and the node still serves everyone.
    assert!(client.get("k").await.unwrap().kvs.is_empty());
    client.put("k", "fine").await.unwrap();
    assert_eq!(client.get("k").await.unwrap().kvs[0].value, b"fine");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_channel_refuses_watches_beyond_its_limit() {
    let cluster = Cluster::start_tuned(3, 2, |c| c.limits.watches_per_channel_max = 3).await;
    let client = cluster.client().await;
    let mut watchers = Vec::new();
    for i in 0..3 {
        let key = format!("a/{i}");
        watchers.push(
            client
                .watch(WatchRequest::new(KeySpan::key(key)))
                .await
                .expect("within the limit"),
        );
    }
    match client.watch(WatchRequest::new(KeySpan::key("a/x"))).await {
        Err(Error::Api(ApiError::TooManyWatches { max: 3 })) => {}
        other => panic!("expected TOO_MANY_WATCHES, got {:?}", other.map(|_| ())),
    }
    // Another range's channel has room of its own; a freed slot can be used again.
    client
        .watch(WatchRequest::new(KeySpan::key("0/1")))
        .await
        .expect("another range");
    watchers.pop();
    common::eventually("a freed slot is reused", || async {
        client
            .watch(WatchRequest::new(KeySpan::key("a/y")))
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await;
    cluster.shutdown().await;
}
