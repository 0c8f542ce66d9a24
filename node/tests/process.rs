//! Multi-process cluster of spawned `concord node` binaries on loopback: `concordctl`
//! put/get, `kill -9` of one node (still available), restart (rejoins), and durability of
//! acknowledged writes across `kill -9` of every node.

mod common;

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::eventually;
use concord_client::api::{Consistency, KeySpan, RangeRequest};
use concord_client::{Client, ClientConfig};
use tempfile::TempDir;

fn concord_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_concord"))
}

fn concordctl_bin() -> PathBuf {
    let path = concord_bin().with_file_name("concordctl");
    assert!(
        path.exists(),
        "{} missing: build it first (`cargo build --workspace --bins`, as scripts/test.sh does)",
        path.display()
    );
    path
}

/// A `concord node` child process; killed (by its own pid) when dropped.
struct NodeProc {
    child: Child,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct ProcCluster {
    dir: TempDir,
    addrs: BTreeMap<u64, String>,
    procs: BTreeMap<u64, NodeProc>,
}

impl ProcCluster {
    fn new(n: u64) -> Self {
        // Ports chosen by the OS; the sockets are closed just before the nodes bind them.
        let addrs = (1..=n)
            .map(|id| {
                let s = UdpSocket::bind("127.0.0.1:0").expect("bind probe socket");
                (id, s.local_addr().unwrap().to_string())
            })
            .collect();
        let mut c = Self {
            dir: TempDir::new().unwrap(),
            addrs,
            procs: BTreeMap::new(),
        };
        for id in 1..=n {
            c.spawn(id);
        }
        c
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("concordctl.toml")
    }

    fn spawn(&mut self, id: u64) {
        let peers: Vec<String> = self.addrs.iter().map(|(i, a)| format!("{i}={a}")).collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node-{id}.log")))
            .unwrap();
        let child = Command::new(concord_bin())
            .args([
                "node",
                "--id",
                &id.to_string(),
                "--listen",
                &self.addrs[&id],
                "--peers",
                &peers.join(","),
            ])
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("node-{id}")))
            .arg("--cert-dir")
            .arg(self.dir.path().join("certs"))
            .arg("--client-config")
            .arg(self.config_path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn concord node");
        self.procs.insert(id, NodeProc { child });
    }

    /// `kill -9` the node.
    fn kill(&mut self, id: u64) {
        drop(self.procs.remove(&id).expect("node running"));
    }

    fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(concordctl_bin())
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .output()
            .expect("run concordctl");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Every range has a leader known to every node in `nodes`.
    async fn wait_ready(&self, nodes: usize) {
        eventually("cluster ready", || async {
            if !self.config_path().exists() {
                return Err("no client config yet".into());
            }
            let out = self.ctl(&["status", "-o", "json"])?;
            let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
            let ready = v["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| {
                    n["ranges"]
                        .as_array()
                        .is_some_and(|r| r.iter().all(|r| !r["leader"].is_null()))
                })
                .count();
            if ready >= nodes {
                Ok(())
            } else {
                Err(format!("{ready} of {nodes} nodes see leaders: {out}"))
            }
        })
        .await;
    }

    async fn client(&self) -> Client {
        let mut config = ClientConfig::from_file(&self.config_path()).unwrap();
        config.attempts_max = 30;
        Client::connect(config).await.expect("connect")
    }
}

fn logs(dir: &Path) -> String {
    let mut s = String::new();
    for id in 1..=3 {
        s += &std::fs::read_to_string(dir.join(format!("node-{id}.log"))).unwrap_or_default();
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concordctl_against_processes_survives_kill_and_rejoin() {
    let mut cluster = ProcCluster::new(3);
    cluster.wait_ready(3).await;
    assert_eq!(
        cluster.ctl(&["put", "greeting", "hello"]).unwrap().trim(),
        "OK"
    );
    assert_eq!(
        cluster.ctl(&["get", "greeting"]).unwrap(),
        "greeting\nhello\n"
    );
    let json: serde_json::Value =
        serde_json::from_str(&cluster.ctl(&["get", "greeting", "-o", "json"]).unwrap()).unwrap();
    assert_eq!(json["kvs"][0]["value"], "hello");
    assert_eq!(json["kvs"][0]["version"], 1);

    cluster.kill(1);
    eventually("available after kill -9 of node 1", || async {
        cluster.ctl(&["put", "greeting", "again"])?;
        let out = cluster.ctl(&["get", "greeting"])?;
        if out == "greeting\nagain\n" {
            Ok(())
        } else {
            Err(out)
        }
    })
    .await;
    let err = cluster
        .ctl(&["get", "greeting", "--consistency", "bogus"])
        .unwrap_err();
    assert!(err.contains("unknown consistency"), "{err}");

    cluster.spawn(1);
    cluster.wait_ready(3).await;
    eventually("node 1 rejoined and caught up", || async {
        let v: serde_json::Value = serde_json::from_str(&cluster.ctl(&["status", "-o", "json"])?)
            .map_err(|e| e.to_string())?;
        let revisions: Vec<Vec<u64>> = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                n["ranges"]
                    .as_array()
                    .map(|r| r.iter().map(|r| r["revision"].as_u64().unwrap()).collect())
                    .unwrap_or_default()
            })
            .collect();
        if revisions.len() == 3 && revisions.iter().all(|r| r == &revisions[0]) {
            Ok(())
        } else {
            Err(format!("{revisions:?}"))
        }
    })
    .await;
}

/// Regression (fault campaign seed 5, `clock` and `crash-point` nemeses): a node that crashed
/// and came back within an election timeout kept leading its ranges, but clients and peers
/// holding a connection to its previous run went on sending into that dead connection until
/// QUIC's 30 s idle timeout: the cluster was unavailable for half a minute. Now the restarted
/// node answers with a stateless reset they can verify (its reset key is derived from its
/// node key), and a peer's new connection replaces the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_at_once_serves_clients_that_knew_it_at_once() {
    let mut cluster = ProcCluster::new(3);
    cluster.wait_ready(3).await;
    let client = cluster.client().await;
    let ranges: Vec<_> = client.routes().ranges.iter().map(|d| d.id).collect();
    // The client holds a connection to every node, node 1 among them (the leader of some).
    for (i, range) in ranges.iter().enumerate() {
        client
            .put(common::key_in(&client, *range, i), "before")
            .await
            .expect("put before the crash");
    }
    cluster.kill(1);
    cluster.spawn(1);
    // Well below the idle timeout: every range takes writes again through the same client.
    // (A put sent into the dead connection fails with an unknown outcome: the client cannot
    // know whether the node's previous run applied it. The next one must go through.)
    let until = std::time::Instant::now() + Duration::from_secs(10);
    for (i, range) in ranges.iter().enumerate() {
        let mut last = String::new();
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            let put = client.put(common::key_in(&client, *range, i), "after");
            match tokio::time::timeout(left, put).await {
                Ok(Ok(_)) => break,
                Ok(Err(e)) => {
                    last = e.to_string();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(_) => panic!(
                    "range {range}: no put within 10 s of node 1's restart (last error: {last}); \
                     logs:\n{}",
                    logs(cluster.dir.path())
                ),
            }
        }
    }
}

/// Regression (fault campaign seed 5, `kill` nemesis): a watch whose node was killed heard
/// nothing until QUIC's 30 s idle timeout closed the connection. A watch with progress
/// notifications now takes three silent progress intervals for a dead node and resumes on
/// another replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_whose_node_dies_resumes_on_another_within_seconds() {
    let mut cluster = ProcCluster::new(3);
    cluster.wait_ready(3).await;
    let client = cluster.client().await;
    // Range 1's channel goes to its first replica, node 1, first.
    let range = client.routes().ranges[0].clone();
    assert_eq!(range.replicas.first(), Some(&1), "{range:?}");
    let key = common::key_in(&client, range.id, 0);
    let mut request = concord_client::watch_api::WatchRequest::new(KeySpan::key(key.clone()));
    request.progress_notify = true;
    let mut watcher = client.watch(request).await.expect("watch");
    cluster.kill(1);
    // A put sent to node 1 as it died times out with an unknown outcome: put again.
    let put = async {
        loop {
            match client.put(key.clone(), "after node 1 died").await {
                Ok(r) => return r.header.revision,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    };
    let revision = tokio::time::timeout(Duration::from_secs(20), put)
        .await
        .expect("a put within 20 s of the kill");
    // Three silent seconds, a resume, the event: well below the 30 s idle timeout.
    let bound = Duration::from_secs(10);
    let seen = tokio::time::timeout(bound, async {
        while let Some(response) = watcher.next().await {
            let response = response.expect("the watch never ends with an error");
            if response.revision >= revision && response.events.iter().any(|e| e.kv.key == key) {
                return response.revision;
            }
        }
        panic!("the watch ended");
    })
    .await
    .unwrap_or_else(|_| panic!("the put at revision {revision} not seen within {bound:?}"));
    assert_eq!(seen, revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_of_every_node() {
    let mut cluster = ProcCluster::new(3);
    cluster.wait_ready(3).await;
    let client = cluster.client().await;
    let mut acked = Vec::new();
    for i in 0..200 {
        let key = format!("{}durable/{i:04}", (b'0' + (i % 75) as u8) as char);
        client
            .put(key.clone(), format!("v{i}"))
            .await
            .expect("put acknowledged");
        acked.push((key, format!("v{i}")));
    }
    drop(client);
    for id in 1..=3 {
        cluster.kill(id);
    }
    for id in 1..=3 {
        cluster.spawn(id);
    }
    cluster.wait_ready(3).await;
    let client = cluster.client().await;
    for (key, value) in &acked {
        let r = client
            .range(
                RangeRequest::new(KeySpan::key(key.clone())),
                Consistency::Linearizable,
            )
            .await;
        let r = r.unwrap_or_else(|e| panic!("read {key}: {e}\n{}", logs(cluster.dir.path())));
        assert_eq!(
            r.kvs.first().map(|kv| kv.value.clone()),
            Some(value.clone().into_bytes()),
            "lost acknowledged write {key}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concordctl_leases_and_watch() {
    let cluster = ProcCluster::new(3);
    cluster.wait_ready(3).await;
    let granted: serde_json::Value = serde_json::from_str(
        &cluster
            .ctl(&["lease", "grant", "30", "-o", "json"])
            .unwrap(),
    )
    .unwrap();
    let id = granted["id"].as_str().expect("hex id").to_string();

    let put: serde_json::Value = serde_json::from_str(
        &cluster
            .ctl(&["put", "svc/a", "up", "--lease", &id, "-o", "json"])
            .unwrap(),
    )
    .unwrap();
    let revision = put["revision"].as_u64().expect("revision").to_string();
    let ttl = cluster.ctl(&["lease", "ttl", &id, "--keys"]).unwrap();
    assert!(
        ttl.contains("granted with TTL(30s)") && ttl.contains("svc/a"),
        "{ttl}"
    );
    assert!(cluster.ctl(&["lease", "list"]).unwrap().contains(&id));
    assert!(cluster.ctl(&["lease", "keep-alive", &id, "--once"]).is_ok());

    // A watcher from the put's revision: the put (history), then its deletion by the revoke.
    let watcher = std::process::Command::new(concordctl_bin())
        .arg("--config")
        .arg(cluster.config_path())
        .args([
            "watch", "svc/", "--prefix", "--rev", &revision, "--count", "2",
        ])
        .args(["-o", "json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn concordctl watch");
    assert_eq!(
        cluster.ctl(&["lease", "revoke", &id]).unwrap().trim(),
        format!("lease {id} revoked")
    );
    // The owner range deletes its own keys with the revoke; other ranges follow with the
    // detach, within a lease tick or so.
    eventually("svc/a deleted by the revoke", || async {
        match cluster.ctl(&["get", "svc/a"])? {
            out if out.is_empty() => Ok(()),
            out => Err(out),
        }
    })
    .await;
    let err = cluster
        .ctl(&["put", "svc/b", "x", "--lease", &id])
        .unwrap_err();
    assert!(err.contains("LEASE_NOT_FOUND"), "{err}");

    let out = tokio::task::spawn_blocking(move || watcher.wait_with_output())
        .await
        .unwrap()
        .expect("watcher exits after two events");
    assert!(out.status.success());
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0]["type"], "PUT");
    assert_eq!(events[0]["kv"]["lease"], id.as_str());
    assert_eq!(events.last().unwrap()["type"], "DELETE");

    // An ephemeral key: a new lease and the key in one request; revoking the lease deletes it.
    let ephemeral: serde_json::Value = serde_json::from_str(
        &cluster
            .ctl(&["put", "svc/e", "up", "--ttl", "30", "-o", "json"])
            .unwrap(),
    )
    .unwrap();
    let lease = ephemeral["lease"]
        .as_str()
        .expect("hex lease id")
        .to_string();
    let ttl = cluster.ctl(&["lease", "ttl", &lease, "--keys"]).unwrap();
    assert!(
        ttl.contains("granted with TTL(30s)") && ttl.contains("svc/e"),
        "{ttl}"
    );
    cluster.ctl(&["lease", "revoke", &lease]).unwrap();
    eventually("svc/e deleted with its lease", || async {
        match cluster.ctl(&["get", "svc/e"])? {
            out if out.is_empty() => Ok(()),
            out => Err(out),
        }
    })
    .await;
}

/// A `concordctl` child (killed by its own pid when dropped) whose stdout is read line by line.
struct CtlProc {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl CtlProc {
    fn spawn(cluster: &ProcCluster, args: &[&str]) -> Self {
        let mut child = Command::new(concordctl_bin())
            .arg("--config")
            .arg(cluster.config_path())
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn concordctl");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self { child, lines }
    }

    /// The next line of output, within the test's bound.
    fn line(&self, what: &str) -> String {
        self.lines
            .recv_timeout(common::WAIT)
            .unwrap_or_else(|e| panic!("{what}: no output line within {:?}: {e}", common::WAIT))
    }

    /// Exit code, waiting within the test's bound.
    fn exit_code(&mut self, what: &str) -> i32 {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code().unwrap_or(-1);
            }
            assert!(
                start.elapsed() < common::WAIT,
                "{what}: still running after {:?}",
                common::WAIT
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }
}

impl Drop for CtlProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concordctl_lock_elect_and_members() {
    let cluster = ProcCluster::new(3);
    cluster.wait_ready(3).await;
    let dir = cluster.dir.path().to_path_buf();

    // lock -- COMMAND: the command runs with the token in its environment; its exit code is
    // concordctl's.
    let token_file = dir.join("token");
    let script = format!(
        "echo $CONCORD_LOCK_TOKEN > {}; exit 3",
        token_file.display()
    );
    let mut run = CtlProc::spawn(
        &cluster,
        &[
            "lock",
            "jobs/nightly",
            "-o",
            "json",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    let locked: serde_json::Value = serde_json::from_str(&run.line("lock -- sh")).unwrap();
    assert_eq!(run.exit_code("lock -- sh"), 3);
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert_eq!(token.trim(), locked["token"].to_string());

    // A holder killed with -9 loses the lock after its TTL; the next one gets a higher token.
    let holder = CtlProc::spawn(&cluster, &["lock", "jobs/nightly", "--ttl", "1"]);
    holder.line("holder's key");
    let first: u64 = holder
        .line("holder's token")
        .trim_start_matches("token ")
        .parse()
        .unwrap();
    let mut next = CtlProc::spawn(&cluster, &["lock", "jobs/nightly", "--", "true"]);
    assert!(next.running(), "the second contender waits");
    drop(holder);
    next.line("second key");
    let second: u64 = next
        .line("second token")
        .trim_start_matches("token ")
        .parse()
        .unwrap();
    assert!(second > first, "token {second} after {first}");
    assert_eq!(next.exit_code("second lock"), 0);

    // elect: a listener sees the candidate, then nobody once it dies and its TTL passes.
    let mut listener = CtlProc::spawn(
        &cluster,
        &["elect", "elections/db", "--listen", "--count", "3"],
    );
    assert_eq!(listener.line("no leader yet"), "(no leader)");
    let candidate = CtlProc::spawn(
        &cluster,
        &["elect", "elections/db", "primary-1", "--ttl", "1"],
    );
    candidate.line("candidate's key");
    assert_eq!(candidate.line("candidate's value"), "primary-1");
    assert_eq!(listener.line("leader"), "primary-1");
    drop(candidate);
    assert_eq!(listener.line("leader gone"), "(no leader)");
    assert_eq!(listener.exit_code("listener"), 0);

    // members: register, list, and a watcher sees the member leave when its process dies.
    let member = CtlProc::spawn(
        &cluster,
        &[
            "members",
            "register",
            "svc/api",
            "m1",
            "10.0.0.1:80",
            "--ttl",
            "1",
        ],
    );
    assert_eq!(member.line("registered"), "registered m1 in svc/api");
    assert_eq!(
        cluster.ctl(&["members", "list", "svc/api"]).unwrap(),
        "m1\t10.0.0.1:80\n"
    );
    let watch = CtlProc::spawn(&cluster, &["members", "watch", "svc/api"]);
    // Put a probe member until the watch reports it: from then on the watch is established.
    let established = |watch: &CtlProc| {
        cluster.ctl(&["put", "svc/api/probe", "x"]).unwrap();
        watch
            .lines
            .recv_timeout(std::time::Duration::from_millis(200))
            .ok()
    };
    let start = std::time::Instant::now();
    let first = loop {
        if let Some(line) = established(&watch) {
            break line;
        }
        assert!(
            start.elapsed() < common::WAIT,
            "members watch never reported the probe"
        );
    };
    assert!(first.contains("probe"), "{first}");
    drop(member);
    let departure = loop {
        match watch.line("departure") {
            l if l.contains("probe") => continue,
            l => break l,
        }
    };
    assert_eq!(departure.trim(), "LEFT m1");
}
