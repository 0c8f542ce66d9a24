//! What the fault test binaries share.

use std::path::PathBuf;
use std::time::Duration;

use concord_faults::cluster::Cluster;
use concord_faults::netns;

/// Longest a test cluster may take to elect every range's leader (and a write to be
/// acknowledged).
#[allow(dead_code)] // not every test binary uses it
pub const READY_MAX: Duration = Duration::from_secs(60);

/// The `concord` binary built beside this test binary (a test build has its fail points, see
/// `concord-node`'s `failpoints` feature).
pub fn concord_bin() -> PathBuf {
    // target/<profile>/deps/<test>-<hash> → target/<profile>/concord
    let exe = std::env::current_exe().expect("test executable");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>")
        .join("concord");
    assert!(
        bin.exists(),
        "{} missing: build it first (`cargo build --workspace --bins`, as scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// Starts `nodes` nodes with `ranges` ranges on namespaced test hosts (root, as in CI), with
/// their files in a fresh `CARGO_TARGET_TMPDIR/NAME`, and a 2-worker runtime to drive them;
/// returns once every range has a leader (at most [`READY_MAX`]).
#[allow(dead_code)] // not every test binary starts its cluster this way
pub fn namespaced_cluster(
    name: &str,
    nodes: usize,
    ranges: u32,
) -> (Cluster, PathBuf, tokio::runtime::Runtime) {
    assert!(
        netns::available(),
        "this test creates network namespaces: run it as root with iproute2 installed"
    );
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let cluster = Cluster::start(&concord_bin(), &dir, nodes, ranges, Vec::new()).expect("cluster");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime
        .block_on(cluster.wait_ready(READY_MAX))
        .expect("cluster ready");
    (cluster, dir, runtime)
}
