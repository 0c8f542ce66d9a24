//! Links between test hosts: the faults on the wire do what the nemeses say they do, seen
//! from a receiver (a healthy link delivers a host's datagrams in the order it sent them, a
//! reordering one ([`Net::reordering`]) delivers some after datagrams sent later, until it is
//! healed), and a concord node cut off for long hears its ranges again within seconds of the
//! heal. Root is required (network namespaces), as in CI.

use std::net::UdpSocket;
use std::process::Command;
use std::time::{Duration, Instant};

use common::READY_MAX;
use concord_client::Client;
use concord_faults::cluster::Cluster;
use concord_faults::netns::{self, Net};

mod common;

/// Datagrams per probe: few enough that the receiver's socket buffer holds them all.
const DATAGRAMS: u32 = 100;

/// Longest a probe waits for its stragglers once they were sent (the slow queue at its
/// slowest below drains 20 tiny packets in well under a second).
const STRAGGLERS_MAX: Duration = Duration::from_secs(3);

/// Sends [`DATAGRAMS`] numbered datagrams from `host` to the test process (bash's
/// `/dev/udp`, one datagram per write) and returns the numbers in the order they arrived.
fn arrivals(net: &Net, host: usize) -> Vec<u32> {
    let socket = UdpSocket::bind((net.test_process_addr(), 0)).expect("bind on the bridge");
    let port = socket.local_addr().expect("local addr").port();
    let script = format!(
        "exec 3>/dev/udp/{}/{port}; for ((i = 1; i <= {DATAGRAMS}; i++)); do printf '%d' $i >&3; done",
        net.test_process_addr()
    );
    let status = Command::new("ip")
        .args(["netns", "exec", &net.ns(host), "bash", "-c", &script])
        .status()
        .expect("running bash in the host's namespace");
    assert!(status.success(), "the sender failed: {status}");
    let deadline = Instant::now() + STRAGGLERS_MAX;
    let mut seen = Vec::new();
    let mut buf = [0u8; 64];
    while seen.len() < DATAGRAMS as usize {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        socket.set_read_timeout(Some(left)).expect("read timeout");
        match socket.recv(&mut buf) {
            Ok(n) => seen.push(
                std::str::from_utf8(&buf[..n])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .expect("a numbered datagram"),
            ),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(e) => panic!("receiving: {e}"),
        }
    }
    seen
}

/// How many datagrams arrived after one with a higher number.
fn late(seen: &[u32]) -> usize {
    let mut highest = 0;
    seen.iter()
        .filter(|&&n| {
            let late = n < highest;
            highest = highest.max(n);
            late
        })
        .count()
}

#[test]
fn a_reordering_link_delivers_some_datagrams_after_later_ones_until_healed() {
    assert!(
        netns::available(),
        "this test creates network namespaces: run it as root with iproute2 installed"
    );
    let net = Net::create(1).expect("test host");
    let healthy = arrivals(&net, 0);
    assert_eq!(
        healthy,
        (1..=DATAGRAMS).collect::<Vec<_>>(),
        "a healthy link delivers everything in order"
    );

    // Half the datagrams through a 100 kbit/s queue: each waits ~4 ms there, while the
    // others, sent microseconds apart, go straight on.
    net.reordering(0, 50, 100).expect("reordering link");
    let shaken = arrivals(&net, 0);
    assert!(
        late(&shaken) > 0,
        "no datagram arrived after a later one: {shaken:?}"
    );

    net.heal().expect("heal");
    assert_eq!(
        arrivals(&net, 0),
        (1..=DATAGRAMS).collect::<Vec<_>>(),
        "a healed link delivers everything in order again"
    );
}

/// Longer than QUIC's retransmission backoff needs to leave more than [`CAUGHT_UP_MAX`]
/// between two probes of an unanswered connection (the probe timer doubles from tens of
/// milliseconds: 15 s apart after about 15 s, and the idle timeout is 30 s).
const LONG_CUT: Duration = Duration::from_secs(16);

/// Most a node may take, once its cut is healed, to apply a write made after the heal.
const CAUGHT_UP_MAX: Duration = Duration::from_secs(5);

/// Regression (seed 2 of the `partitions` campaign, docs/reliability.md bug 7): after a
/// partition healed, the connection between two nodes stayed silent for up to 14 s, because
/// QUIC had backed its retransmissions off while the path was down; a lease expired 9 s late.
/// A connection that brings no reply for `SILENT_CONNECTION_MAX` is now closed when a batch on
/// it times out, and the next call dials afresh.
#[test]
fn a_node_cut_off_for_long_hears_its_range_again_within_seconds_of_the_heal() {
    let (cluster, dir, runtime) = common::namespaced_cluster("links-long-cut", 3, 1);
    runtime.block_on(async {
        let client = Client::connect(cluster.client_config(Duration::from_secs(2)))
            .await
            .expect("client");
        // A put, retried while it times out (a leader may be changing), within READY_MAX.
        let put = |value: String| {
            let client = client.clone();
            async move {
                let deadline = Instant::now() + READY_MAX;
                loop {
                    match client.put(b"k".to_vec(), value.clone().into_bytes()).await {
                        Ok(put) => return put,
                        Err(e) if Instant::now() < deadline => {
                            eprintln!("put {value:?}: {e}; retrying");
                        }
                        Err(e) => panic!("put {value:?} failing for {READY_MAX:?}: {e}"),
                    }
                }
            }
        };
        put("before".into()).await;

        // Node 3 cut off while the others go on writing (it may have led the range: the
        // others elect a new leader, and the client retries there).
        let cut = 2;
        cluster.net().partition(&[cut]).expect("cut");
        let cut_until = Instant::now() + LONG_CUT;
        let mut n = 0;
        while Instant::now() < cut_until {
            put(format!("cut {n}")).await;
            n += 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        cluster.net().heal().expect("heal");
        let healed = Instant::now();
        let after = put("after".into()).await.header;

        // Node 3 applies the write made after the heal.
        let node = Cluster::id(cut);
        let mut seen = None;
        while healed.elapsed() < CAUGHT_UP_MAX {
            seen = client
                .status()
                .await
                .into_iter()
                .filter_map(|(_, status)| status.ok())
                .find(|s| s.node_id == node)
                .and_then(|s| s.ranges.into_iter().find(|r| r.id == after.range_id))
                .map(|r| r.revision);
            if seen.is_some_and(|revision| revision >= after.revision) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "node {node} still at revision {seen:?} of range {} {CAUGHT_UP_MAX:?} after the heal \
             (the write after it is at {}); node logs in {}",
            after.range_id,
            after.revision,
            dir.display()
        );
    });
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}
