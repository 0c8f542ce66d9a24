//! A request stream read to its end closes quietly: no STOP_SENDING frame per request.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use concord_transport::endpoint::{client_endpoint, node_endpoint, ConnectionLimits};
use concord_transport::tls::ensure_node_cert;
use concord_transport::{wire, SERVER_NAME};

/// Requests exchanged before the frame counts are read.
const REQUESTS: u32 = 20;
/// The longest a frame may take to show in the sender's counters.
const WAIT: Duration = Duration::from_secs(10);

/// One request and its reply on a fresh bi-stream, both sides taking the stream's end (or,
/// with `take_end` false, dropping it unread as before).
async fn exchange(client: &quinn::Connection, server: &quinn::Connection, n: u32, take_end: bool) {
    let (mut send, mut recv) = client.open_bi().await.expect("open a stream");
    send.write_all(&wire::encode_frame(&n))
        .await
        .expect("write the request");
    send.finish().expect("finish the request");
    let (mut reply, mut request) = server.accept_bi().await.expect("accept the stream");
    let got: u32 = wire::read_frame(&mut request, 64)
        .await
        .expect("read the request");
    reply
        .write_all(&wire::encode_frame(&(got + 1)))
        .await
        .expect("write the reply");
    reply.finish().expect("finish the reply");
    let answer: u32 = wire::read_frame(&mut recv, 64)
        .await
        .expect("read the reply");
    assert_eq!(answer, n + 1);
    if take_end {
        assert!(
            wire::take_end(&mut request),
            "request {n}: its FIN had arrived"
        );
        assert!(wire::take_end(&mut recv), "reply {n}: its FIN had arrived");
    }
}

/// Waits until `count` (a frame counter of one side) reaches `at_least`.
async fn wait_for(what: &str, at_least: u64, count: impl Fn() -> u64) {
    let start = Instant::now();
    while count() < at_least {
        assert!(
            start.elapsed() < WAIT,
            "{what}: {} after {WAIT:?}, expected at least {at_least}",
            count()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// One thread: a connection's driver cannot send a request's data before its FIN is set, so
// each end arrives with its frame (as it does under load on the nodes, mostly).
#[tokio::test]
async fn streams_read_to_their_end_send_no_stop_sending() {
    let dir = std::env::temp_dir().join(format!("concord-stream-ends-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let certs = ensure_node_cert(&dir, 1, &[]).expect("node certificate");
    let limits = ConnectionLimits::default();
    let bind: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    let node = node_endpoint(bind, &certs, &limits).expect("node endpoint");
    let addr = node.local_addr().expect("node address");
    let client_ep = client_endpoint(&certs.ca_cert, &limits).expect("client endpoint");
    let connecting = client_ep
        .connect(addr, SERVER_NAME)
        .expect("start connecting");
    let incoming = node.accept().await.expect("an incoming connection");
    let (client, server) = tokio::join!(connecting, incoming);
    let (client, server) = (client.expect("client side"), server.expect("server side"));

    for n in 0..REQUESTS {
        exchange(&client, &server, n, true).await;
    }
    // One more round trip lets anything the exchanges queued go out first.
    exchange(&client, &server, REQUESTS, true).await;
    let sent = |c: &quinn::Connection| c.stats().frame_tx.stop_sending;
    assert_eq!(sent(&client), 0, "the client stopped streams it had read");
    assert_eq!(sent(&server), 0, "the server stopped streams it had read");

    // The control: a stream dropped before its end was taken is stopped, which is what
    // `take_end` saves.
    exchange(&client, &server, REQUESTS + 1, false).await;
    wait_for("client STOP_SENDING frames", 1, || sent(&client)).await;
    wait_for("server STOP_SENDING frames", 1, || sent(&server)).await;

    client.close(0u32.into(), b"done");
    let _ = std::fs::remove_dir_all(&dir);
}
