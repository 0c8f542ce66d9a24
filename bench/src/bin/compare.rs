//! concord-compare: the side-by-side benchmark of concord, etcd and ZooKeeper on this machine.
//!
//! Starts a 3-member etcd cluster, a 3-server ZooKeeper ensemble and a 3-process concord
//! cluster (separate `concord node` processes) on loopback, all with fsync on and 3 replicas;
//! runs each workload on each system in turn through `concord-loadgen` (A/B/C, then C/B/A in
//! full mode, so linear machine drift cancels);
//! and writes a report: the machine (cores, memory, fsync latency measured on the spot), the
//! exact commands, a table with the figures, concord's ratios and the bars, and the loadgen's
//! charts. A run that lost events, broke a check or failed more than 1 % of its
//! operations makes its case invalid rather than a figure.
//!
//! Run through `scripts/bench-compare.sh quick|full`, which installs etcd and ZooKeeper and
//! builds the binaries. Every process it starts is killed (by pid) when it ends, error or not.

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Seek, Write as _};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use serde_json::Value;

/// How long the comparison runs.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Mode {
    /// Seconds per run, one round: a smoke test (CI).
    Quick,
    /// The published figures: longer runs, two rounds (A/B then B/A).
    Full,
}

/// The command line.
#[derive(Parser)]
#[command(
    name = "concord-compare",
    about = "concord, etcd and ZooKeeper side by side"
)]
struct Args {
    /// quick (smoke test) or full (published figures).
    #[arg(long, value_enum)]
    mode: Mode,
    /// Where concord, concordctl and concord-loadgen are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// The etcd server binary.
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,
    /// ZooKeeper's server jar (Debian's `zookeeper` package; its manifest names the rest of
    /// the classpath).
    #[arg(long, default_value = "/usr/share/java/zookeeper.jar")]
    zookeeper_jar: PathBuf,
    /// The Java runtime that runs ZooKeeper.
    #[arg(long, default_value = "java")]
    java: PathBuf,
    /// Where the report (README.md), its raw data and its charts go.
    #[arg(long)]
    out: PathBuf,
    /// The clusters' data go in a fresh directory under this one, on the disk being
    /// measured (not a tmpfs).
    #[arg(long, default_value = "target")]
    work_dir: PathBuf,
    /// Only the workloads whose name contains one of these (comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// One row of the comparison: a loadgen workload and what decides it.
struct Case {
    /// Row name, also the chart file stem.
    name: &'static str,
    /// loadgen arguments after `--target ...` (full mode).
    args: &'static str,
    /// loadgen arguments in quick mode.
    quick_args: &'static str,
    /// The figure compared, a field of loadgen's JSON.
    figure: &'static str,
    /// True if more is better (throughput), false if less is (latency).
    higher_is_better: bool,
    /// The bar against etcd, if the issue sets one.
    bar: Option<Bar>,
    /// Whether ZooKeeper runs this workload too.
    zookeeper: bool,
    /// The bar against ZooKeeper, if the issue sets one.
    zk_bar: Option<Bar>,
}

impl Case {
    /// The loadgen arguments of this case in `mode`.
    fn args_for(&self, mode: Mode) -> &'static str {
        match mode {
            Mode::Full => self.args,
            Mode::Quick => self.quick_args,
        }
    }
}

/// What concord must show against another system in one case.
struct Bar {
    /// The bar in words, for the report.
    text: &'static str,
    /// The least ratio (how many times better concord is) that meets it.
    ratio: f64,
    /// Whether concord's operation p99 must also be no worse than the other system's.
    p99_no_worse: bool,
}

/// Both put cases' bar.
const PUT_BAR: Bar = Bar {
    text: "≥ 1.5× etcd, p99 ≤ etcd's",
    ratio: 1.5,
    p99_no_worse: true,
};

/// Reads and puts against ZooKeeper: at least equal.
const ZK_BAR: Bar = Bar {
    text: "≥ ZooKeeper",
    ratio: 1.0,
    p99_no_worse: false,
};

/// The comparison, in the order it runs.
const CASES: &[Case] = &[
    Case {
        name: "put-64",
        args: "--workload put --clients 64 --connections 8 --value-size 256 --duration 20s",
        quick_args: "--workload put --clients 16 --connections 2 --value-size 256 --duration 2s",
        figure: "ops_per_sec",
        higher_is_better: true,
        bar: Some(PUT_BAR),
        zookeeper: true,
        zk_bar: None,
    },
    Case {
        name: "put-256",
        args: "--workload put --clients 256 --connections 8 --value-size 256 --duration 20s",
        quick_args: "--workload put --clients 32 --connections 2 --value-size 256 --duration 2s",
        figure: "ops_per_sec",
        higher_is_better: true,
        bar: Some(PUT_BAR),
        zookeeper: true,
        zk_bar: Some(ZK_BAR),
    },
    Case {
        name: "get-linearizable-256",
        args: "--workload get --consistency linearizable --clients 256 --connections 8 --duration 20s",
        quick_args: "--workload get --consistency linearizable --clients 32 --connections 2 --key-space 1000 --duration 2s",
        figure: "ops_per_sec",
        higher_is_better: true,
        bar: Some(Bar {
            text: "≥ 1.5× etcd",
            ratio: 1.5,
            p99_no_worse: false,
        }),
        zookeeper: true,
        zk_bar: Some(ZK_BAR),
    },
    Case {
        name: "get-serializable-256",
        args: "--workload get --consistency serializable --clients 256 --connections 8 --duration 20s",
        quick_args: "--workload get --consistency serializable --clients 32 --connections 2 --key-space 1000 --duration 2s",
        figure: "ops_per_sec",
        higher_is_better: true,
        bar: None,
        zookeeper: true,
        zk_bar: Some(ZK_BAR),
    },
    Case {
        name: "mixed-90-10-zipfian",
        args: "--workload mixed --read-ratio 0.9 --distribution zipfian --clients 128 --connections 8 --duration 20s",
        quick_args: "--workload mixed --read-ratio 0.9 --distribution zipfian --clients 16 --connections 2 --key-space 1000 --duration 2s",
        figure: "ops_per_sec",
        higher_is_better: true,
        bar: None,
        zookeeper: true,
        zk_bar: None,
    },
    Case {
        name: "txn-cas-64",
        args: "--workload txn-cas --clients 64 --connections 8 --key-space 1000 --duration 20s",
        quick_args: "--workload txn-cas --clients 8 --connections 2 --key-space 100 --duration 2s",
        figure: "ops_per_sec",
        higher_is_better: true,
        bar: None,
        zookeeper: true,
        zk_bar: None,
    },
    Case {
        name: "watch-fanout-10k",
        args: "--workload watch-fanout --watchers 10000 --rate 100 --connections 8 --duration 15s",
        quick_args: "--workload watch-fanout --watchers 100 --rate 50 --connections 2 --duration 2s",
        figure: "delivery_p99_ms",
        higher_is_better: false,
        bar: Some(Bar {
            text: "p99 delivery ≤ etcd's",
            ratio: 1.0,
            p99_no_worse: false,
        }),
        zookeeper: true,
        zk_bar: None,
    },
    Case {
        name: "lease-churn-10k",
        args: "--workload lease-churn --leases 10000 --ttl 60 --churn 0 --clients 64 --connections 8 --duration 1s",
        quick_args: "--workload lease-churn --leases 500 --ttl 30 --churn 0 --clients 16 --connections 2 --duration 1s",
        figure: "grants_per_sec",
        higher_is_better: true,
        bar: Some(Bar {
            text: "≥ 2× etcd's grants/s",
            ratio: 2.0,
            p99_no_worse: false,
        }),
        zookeeper: true,
        zk_bar: None,
    },
    Case {
        name: "lock-contention-32x8",
        args: "--workload lock-contention --clients 32 --locks 8 --connections 8 --duration 15s",
        quick_args: "--workload lock-contention --clients 8 --locks 2 --connections 2 --duration 2s",
        figure: "acquisitions_per_sec",
        higher_is_better: true,
        bar: None,
        zookeeper: true,
        zk_bar: None,
    },
    Case {
        name: "membership-2k",
        args: "--workload membership --members 2000 --watchers 16 --churn 20 --ttl 30 --clients 64 --connections 8 --duration 15s",
        quick_args: "--workload membership --members 100 --watchers 4 --churn 10 --ttl 10 --clients 16 --connections 2 --duration 2s",
        figure: "delivery_p99_ms",
        higher_is_better: false,
        bar: None,
        zookeeper: true,
        zk_bar: None,
    },
];

/// Longest one loadgen run may take (the longest case, set-up and drains included); past it
/// the run is killed and the comparison fails.
const RUN_TIME_MAX: Duration = Duration::from_secs(600);
/// Longest a cluster may take to come up.
const READY_MAX: Duration = Duration::from_secs(60);
/// How often a wait checks again.
const POLL: Duration = Duration::from_millis(100);
/// Share of failed operations above which a run is invalid.
const ERRORS_MAX_SHARE: f64 = 0.01;
/// fsync probes of the disk.
const FSYNC_PROBES: usize = 200;

/// Processes this harness started; killed by pid when dropped.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
        }
        for child in &mut self.0 {
            let _ = child.wait();
        }
    }
}

/// A free loopback TCP port (etcd), from the OS.
fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A free loopback UDP port (concord's QUIC), from the OS.
fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Median and p99 of `count` 4 KiB writes each followed by fdatasync, in `dir`.
fn fsync_latency(dir: &Path, count: usize) -> anyhow::Result<(Duration, Duration)> {
    let path = dir.join("fsync-probe");
    let mut file = fs::File::create(&path)?;
    let block = vec![0u8; 4096];
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        samples.push(t.elapsed());
    }
    fs::remove_file(&path)?;
    samples.sort();
    Ok((samples[count / 2], samples[count * 99 / 100]))
}

fn mem_total_gib() -> f64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0)
}

fn etcd_version(etcd: &Path) -> String {
    Command::new(etcd)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            text.lines().next().map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "etcd".into())
}

/// Starts the 3-member etcd cluster; returns its client endpoints.
fn start_etcd(args: &Args, dir: &Path, procs: &mut Processes) -> anyhow::Result<Vec<String>> {
    let mut members = Vec::new();
    for i in 1..=3 {
        members.push((format!("e{i}"), free_tcp_port()?, free_tcp_port()?));
    }
    let cluster: Vec<String> = members
        .iter()
        .map(|(name, _, peer)| format!("{name}=http://127.0.0.1:{peer}"))
        .collect();
    for (name, client, peer) in &members {
        let log = fs::File::create(dir.join(format!("{name}.log")))?;
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new(&args.etcd)
            .args(["--name", name])
            .arg("--data-dir")
            .arg(dir.join(name))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "concord-bench"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (scripts/install-deps.sh bench installs it)",
                    args.etcd.display()
                )
            })?;
        procs.0.push(child);
    }
    Ok(members
        .iter()
        .map(|(_, client, _)| format!("127.0.0.1:{client}"))
        .collect())
}

/// ZooKeeper's version, from the name of the jar its path links to (Debian:
/// `zookeeper-3.8.0.jar`).
fn zookeeper_version(jar: &Path) -> String {
    fs::canonicalize(jar)
        .ok()
        .and_then(|p| Some(p.file_stem()?.to_string_lossy().replace('-', " ")))
        .unwrap_or_else(|| "zookeeper".into())
}

/// Starts the 3-server ZooKeeper ensemble (fsync on, every server's data in `dir`); returns
/// its client endpoints.
fn start_zookeeper(args: &Args, dir: &Path, procs: &mut Processes) -> anyhow::Result<Vec<String>> {
    let mut servers = Vec::new();
    for _ in 1..=3 {
        servers.push((free_tcp_port()?, free_tcp_port()?, free_tcp_port()?));
    }
    let mut ensemble = String::new();
    for (i, (_, quorum, election)) in servers.iter().enumerate() {
        writeln!(ensemble, "server.{}=127.0.0.1:{quorum}:{election}", i + 1)?;
    }
    for (i, (client, _, _)) in servers.iter().enumerate() {
        let id = i + 1;
        let home = dir.join(format!("zk{id}"));
        let data = home.join("data");
        fs::create_dir_all(&data)?;
        fs::write(data.join("myid"), format!("{id}\n"))?;
        // ZooKeeper's defaults, but: fsync forced (its default too, stated), no admin HTTP
        // server (the three would share port 8080), no cap on connections per client address,
        // sessions up to 120 s (the default cap, 20 ticks = 40 s, is below lease-churn's TTL).
        let config = format!(
            "tickTime=2000\ninitLimit=10\nsyncLimit=5\ndataDir={}\nclientPort={client}\n\
             clientPortAddress=127.0.0.1\nforceSync=yes\nadmin.enableServer=false\n\
             maxClientCnxns=0\nmaxSessionTimeout=120000\nstandaloneEnabled=false\n\
             4lw.commands.whitelist=srvr\n{ensemble}",
            data.display()
        );
        let config_path = home.join("zoo.cfg");
        fs::write(&config_path, config)?;
        let log = fs::File::create(dir.join(format!("zk{id}.log")))?;
        let child = Command::new(&args.java)
            .args(["-Xms256m", "-Xmx1g", "-cp"])
            .arg(&args.zookeeper_jar)
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(&config_path)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "starting ZooKeeper with {} (scripts/install-deps.sh bench installs it)",
                    args.java.display()
                )
            })?;
        procs.0.push(child);
    }
    Ok(servers
        .iter()
        .map(|(client, _, _)| format!("127.0.0.1:{client}"))
        .collect())
}

/// Starts the 3-process concord cluster; returns its client config file once written.
fn start_concord(args: &Args, dir: &Path, procs: &mut Processes) -> anyhow::Result<PathBuf> {
    let ports = [free_udp_port()?, free_udp_port()?, free_udp_port()?];
    let peers: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
        .collect();
    let config = dir.join("concordctl.toml");
    for (i, port) in ports.iter().enumerate() {
        let id = (i + 1).to_string();
        let log = fs::File::create(dir.join(format!("node-{id}.log")))?;
        let child = Command::new(args.bin_dir.join("concord"))
            .args(["node", "--id", &id])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--peers", &peers.join(",")])
            .arg("--data-dir")
            .arg(dir.join(format!("node-{id}")))
            .arg("--cert-dir")
            .arg(dir.join("certs"))
            .arg("--client-config")
            .arg(&config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting concord")?;
        procs.0.push(child);
    }
    // The config file appears once the nodes have made their certificates.
    let deadline = Instant::now() + READY_MAX;
    while !config.exists() {
        if Instant::now() > deadline {
            bail!(
                "concord wrote no client config within {READY_MAX:?}; see {}",
                dir.display()
            );
        }
        std::thread::sleep(POLL);
    }
    Ok(config)
}

/// Runs concord-loadgen with `target_args` and `workload_args`, for `limit` at most;
/// returns its JSON report.
fn loadgen(
    args: &Args,
    target_args: &[String],
    workload_args: &str,
    plot: Option<&Path>,
    limit: Duration,
) -> anyhow::Result<Value> {
    let mut command = Command::new(args.bin_dir.join("concord-loadgen"));
    command
        .arg("run")
        .args(target_args)
        .args(workload_args.split_whitespace())
        .args(["-o", "json"]);
    if let Some(plot) = plot {
        command.arg("--plot").arg(plot);
    }
    let mut stdout = tempfile::tempfile()?;
    let mut child = command
        .stdout(stdout.try_clone()?)
        .stderr(Stdio::inherit())
        .spawn()
        .context("running concord-loadgen")?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("concord-loadgen {workload_args} took longer than {limit:?}; killed");
        }
        std::thread::sleep(POLL);
    };
    if !status.success() {
        bail!(
            "concord-loadgen {} {workload_args} failed ({status})",
            target_args.join(" ")
        );
    }
    let mut text = String::new();
    stdout.rewind()?;
    stdout.read_to_string(&mut text)?;
    let line = text
        .lines()
        .last()
        .context("concord-loadgen printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("parsing loadgen output {line:?}"))
}

/// Retries a one-operation put until the system answers, for `READY_MAX` at most.
fn wait_ready(args: &Args, target_args: &[String], what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_MAX;
    let probe = "--workload put --clients 1 --ops 1 --duration 5s";
    loop {
        match loadgen(args, target_args, probe, None, READY_MAX) {
            Ok(report) if report["ops"].as_u64() == Some(1) => return Ok(()),
            _ if Instant::now() > deadline => bail!("{what} did not come up within {READY_MAX:?}"),
            _ => std::thread::sleep(POLL),
        }
    }
}

/// Waits until every concord node answers and every range it hosts has a leader (so no
/// case starts during the first elections), for `READY_MAX` at most.
fn wait_leaders(args: &Args, config: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_MAX;
    loop {
        let status = Command::new(args.bin_dir.join("concordctl"))
            .arg("--config")
            .arg(config)
            .args(["status", "-o", "json"])
            .output()?;
        let text = String::from_utf8_lossy(&status.stdout);
        if status.status.success()
            && text.contains("\"node_id\"")
            && !text.contains("\"leader\":null")
            && !text.contains("\"error\"")
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("concord ranges had no leaders within {READY_MAX:?}: {text}");
        }
        std::thread::sleep(POLL);
    }
}

/// Why a run's figure cannot stand, if it cannot: nothing measured, events not delivered,
/// a check broken, or too many failed operations.
fn invalid(report: &Value) -> Option<String> {
    let count = |field: &str| report[field].as_u64().unwrap_or(0);
    let ops = count("ops");
    if ops == 0 {
        return Some("no operation succeeded".into());
    }
    for field in ["events_missing", "fencing_violations", "lost", "lost_live"] {
        if count(field) > 0 {
            return Some(format!("{field} = {}", count(field)));
        }
    }
    let errors: u64 = report["errors"]
        .as_object()
        .map_or(0, |e| e.values().filter_map(Value::as_u64).sum());
    if errors as f64 > ERRORS_MAX_SHARE * (ops + errors) as f64 {
        return Some(format!("{errors} failed operations of {}", ops + errors));
    }
    None
}

/// The median of the figures (the mean of the middle two for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// One case's outcome: medians of the figure and of the operation p99 (ms) per system.
struct Outcome {
    concord: f64,
    etcd: f64,
    concord_p99: f64,
    etcd_p99: f64,
    /// ZooKeeper's figure and p99, for the cases it runs.
    zookeeper: Option<(f64, f64)>,
    /// The first reason a run of the case is invalid, if any.
    invalid: Option<String>,
}

impl Outcome {
    /// How many times better concord is than `other` (higher throughput, or lower latency).
    fn times_better(&self, case: &Case, other: f64) -> f64 {
        if case.higher_is_better {
            self.concord / other
        } else {
            other / self.concord
        }
    }

    /// How many times better concord is than etcd.
    fn ratio(&self, case: &Case) -> f64 {
        self.times_better(case, self.etcd)
    }

    /// How many times better concord is than ZooKeeper, for the cases it runs.
    fn zk_ratio(&self, case: &Case) -> Option<f64> {
        self.zookeeper.map(|(zk, _)| self.times_better(case, zk))
    }

    /// The bars' verdict, and whether they are met (true when the case has none).
    fn verdict(&self, case: &Case) -> (String, bool) {
        let has_bar = case.bar.is_some() || case.zk_bar.is_some();
        if let Some(reason) = &self.invalid {
            return (format!("**invalid**: {reason}"), !has_bar);
        }
        let mut parts = Vec::new();
        let mut all_met = true;
        let mut judge = |bar: &Bar, ratio: f64, other_p99: f64| {
            let p99_ok = !bar.p99_no_worse || self.concord_p99 <= other_p99;
            let met = ratio >= bar.ratio && p99_ok;
            all_met &= met;
            let word = if met { "met" } else { "not met" };
            parts.push(format!("{}: **{word}**", bar.text));
        };
        if let Some(bar) = &case.bar {
            judge(bar, self.ratio(case), self.etcd_p99);
        }
        if let (Some(bar), Some((zk, zk_p99))) = (&case.zk_bar, self.zookeeper) {
            judge(bar, self.times_better(case, zk), zk_p99);
        }
        if parts.is_empty() {
            return ("—".into(), true);
        }
        (parts.join("; "), all_met)
    }
}

/// Runs one case on each of `targets` (concord, etcd, then ZooKeeper if given), `rounds`
/// times, in reverse order every other round.
fn run_case(
    args: &Args,
    case: &Case,
    targets: &[(&str, Vec<String>)],
    rounds: usize,
    raw: &mut String,
) -> anyhow::Result<Outcome> {
    let workload_args = case.args_for(args.mode);
    let mut figures: Vec<(Vec<f64>, Vec<f64>)> = vec![Default::default(); targets.len()];
    let mut invalid_reason = None;
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..targets.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for t in order {
            let (target, target_args) = &targets[t];
            let plot = args
                .out
                .join("charts")
                .join(format!("{}-{target}.png", case.name));
            eprintln!("{} on {target}, round {}", case.name, round + 1);
            let report = loadgen(args, target_args, workload_args, Some(&plot), RUN_TIME_MAX)?;
            writeln!(raw, "{report}")?;
            if let Some(reason) = invalid(&report) {
                invalid_reason.get_or_insert(format!("{target}: {reason}"));
            }
            let figure = report[case.figure].as_f64().with_context(|| {
                format!("{} on {target}: no {} in {report}", case.name, case.figure)
            })?;
            figures[t].0.push(figure);
            figures[t]
                .1
                .push(report["p99_us"].as_f64().unwrap_or(f64::NAN) / 1000.0);
        }
    }
    let mut medians = figures.into_iter().map(|(f, p99)| (median(f), median(p99)));
    let (concord, concord_p99) = medians.next().context("concord ran")?;
    let (etcd, etcd_p99) = medians.next().context("etcd ran")?;
    Ok(Outcome {
        concord,
        etcd,
        concord_p99,
        etcd_p99,
        zookeeper: medians.next(),
        invalid: invalid_reason,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    fs::create_dir_all(&args.work_dir)?;
    // A fresh directory: stale data or a stale client config would mislead the clusters.
    let scratch = tempfile::Builder::new()
        .prefix("concord-compare.")
        .tempdir_in(&args.work_dir)?;
    let work = scratch.path();
    fs::create_dir_all(args.out.join("charts"))?;
    let (fsync_p50, fsync_p99) = fsync_latency(work, FSYNC_PROBES)?;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    eprintln!(
        "machine: {cores} cores, {:.1} GiB, fsync p50 {fsync_p50:?} p99 {fsync_p99:?}",
        mem_total_gib()
    );

    let mut procs = Processes(Vec::new());
    let etcd_endpoints = start_etcd(&args, work, &mut procs)?;
    let zookeeper_endpoints = start_zookeeper(&args, work, &mut procs)?;
    let concord_config = start_concord(&args, work, &mut procs)?;
    let targets = [
        (
            "concord",
            vec![
                "--target".to_string(),
                "concord".into(),
                "--config".into(),
                concord_config.display().to_string(),
            ],
        ),
        (
            "etcd",
            vec![
                "--target".to_string(),
                "etcd".into(),
                "--endpoints".into(),
                etcd_endpoints.join(","),
            ],
        ),
        (
            "zookeeper",
            vec![
                "--target".to_string(),
                "zookeeper".into(),
                "--endpoints".into(),
                zookeeper_endpoints.join(","),
            ],
        ),
    ];
    wait_ready(&args, &targets[1].1, "etcd")?;
    wait_ready(&args, &targets[2].1, "zookeeper")?;
    wait_leaders(&args, &concord_config)?;
    wait_ready(&args, &targets[0].1, "concord")?;

    let rounds = if args.mode == Mode::Full { 2 } else { 1 };
    let (mut rows, mut commands, mut charts, mut raw) =
        (String::new(), String::new(), String::new(), String::new());
    let mut not_met = Vec::new();
    for case in CASES {
        if !args.only.is_empty() && !args.only.iter().any(|o| case.name.contains(o.as_str())) {
            continue;
        }
        let workload_args = case.args_for(args.mode);
        let systems = if case.zookeeper {
            "concord|etcd|zookeeper"
        } else {
            "concord|etcd"
        };
        writeln!(
            commands,
            "concord-loadgen run --target {systems} ... {workload_args}"
        )?;
        let ran = if case.zookeeper { 3 } else { 2 };
        let outcome = run_case(&args, case, &targets[..ran], rounds, &mut raw)?;
        let (verdict, met) = outcome.verdict(case);
        if !met {
            not_met.push(case.name);
        }
        let (zk, zk_ratio, zk_p99) = match (outcome.zookeeper, outcome.zk_ratio(case)) {
            (Some((zk, p99)), Some(ratio)) => (
                format!("{zk:.1}"),
                format!("{ratio:.2}×"),
                format!("{p99:.2}"),
            ),
            _ => ("—".into(), "—".into(), "—".into()),
        };
        writeln!(
            rows,
            "| {} | {} | {:.1} | {:.1} | {zk} | {:.2}× | {zk_ratio} | {:.2} | {:.2} | {zk_p99} | \
             {verdict} |",
            case.name,
            case.figure,
            outcome.concord,
            outcome.etcd,
            outcome.ratio(case),
            outcome.concord_p99,
            outcome.etcd_p99,
        )?;
        let zk_chart = if case.zookeeper {
            format!("\n![zookeeper](charts/{}-zookeeper.png)", case.name)
        } else {
            String::new()
        };
        writeln!(
            charts,
            "### {}\n\n![concord](charts/{0}-concord.png)\n![etcd](charts/{0}-etcd.png){zk_chart}\n",
            case.name
        )?;
    }
    drop(procs);

    let mode = format!("{:?}", args.mode).to_lowercase();
    let mut report = String::new();
    writeln!(report, "# concord, etcd and ZooKeeper, side by side\n")?;
    writeln!(
        report,
        "Generated by `scripts/bench-compare.sh {mode}` (concord-compare). Every system runs \
         as 3 processes on loopback on this machine, 3 replicas, fsync on ({}; {} with \
         `forceSync=yes`; concord: `concord node` processes, one RocksDB each, group commit), \
         with the load generator on the same cores. Each workload runs on concord, etcd and \
         ZooKeeper{}; a figure is the median of its rounds. A \
         ratio says how many times better concord is (higher throughput, or lower latency for \
         the latency figures). The p99 columns are the operation's p99 in ms. A run that lost \
         events, broke a check or failed more than 1 % of its operations makes its row \
         invalid.\n",
        etcd_version(&args.etcd),
        zookeeper_version(&args.zookeeper_jar),
        if rounds > 1 {
            ", in the order A/B/C then C/B/A"
        } else {
            ""
        }
    )?;
    writeln!(
        report,
        "Machine: {cores} cores, {:.1} GiB memory; disk fsync (4 KiB write + fdatasync) p50 \
         {:.2} ms, p99 {:.2} ms, measured on the spot in the clusters' directory.\n",
        mem_total_gib(),
        fsync_p50.as_secs_f64() * 1000.0,
        fsync_p99.as_secs_f64() * 1000.0
    )?;
    writeln!(
        report,
        "| workload | figure | concord | etcd | ZooKeeper | vs etcd | vs ZooKeeper | concord p99 ms \
         | etcd p99 ms | ZooKeeper p99 ms | bars |"
    )?;
    writeln!(report, "|---|---|---|---|---|---|---|---|---|---|---|")?;
    report.push_str(&rows);
    writeln!(
        report,
        "\nCommands (loadgen arguments after the target's own):\n\n```\n{commands}```\n"
    )?;
    writeln!(
        report,
        "What each workload is on each system: [mapping.md](/docs/benchmarks/mapping.md). Why the bars not \
         met are not, where the time goes and what would close them: [analysis.md](/docs/benchmarks/analysis.md).\n"
    )?;
    writeln!(report, "## Charts (last round)\n\n{charts}")?;
    fs::write(args.out.join("README.md"), report)?;
    fs::write(args.out.join("raw.jsonl"), raw)?;
    eprintln!("wrote {}", args.out.join("README.md").display());
    if !not_met.is_empty() {
        eprintln!("bars not met or invalid: {}", not_met.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(higher_is_better: bool, ratio: f64, p99_no_worse: bool) -> Case {
        Case {
            name: "t",
            args: "",
            quick_args: "",
            figure: "f",
            higher_is_better,
            bar: Some(Bar {
                text: "bar",
                ratio,
                p99_no_worse,
            }),
            zookeeper: false,
            zk_bar: None,
        }
    }

    fn outcome(concord: f64, etcd: f64, concord_p99: f64, etcd_p99: f64) -> Outcome {
        Outcome {
            concord,
            etcd,
            concord_p99,
            etcd_p99,
            zookeeper: None,
            invalid: None,
        }
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn throughput_bar_needs_the_ratio_and_the_p99() {
        let c = case(true, 1.5, true);
        assert!(outcome(150.0, 100.0, 10.0, 10.0).verdict(&c).1);
        assert!(!outcome(149.0, 100.0, 10.0, 10.0).verdict(&c).1);
        assert!(
            !outcome(200.0, 100.0, 11.0, 10.0).verdict(&c).1,
            "p99 worse than etcd's"
        );
    }

    #[test]
    fn latency_ratio_is_inverted() {
        let c = case(false, 1.0, false);
        let o = outcome(10.0, 20.0, 0.0, 0.0);
        assert_eq!(o.ratio(&c), 2.0);
        assert!(o.verdict(&c).1);
        assert!(!outcome(20.0, 10.0, 0.0, 0.0).verdict(&c).1);
    }

    #[test]
    fn both_bars_must_be_met() {
        let mut c = case(true, 1.5, false);
        c.zookeeper = true;
        c.zk_bar = Some(ZK_BAR);
        let mut o = outcome(150.0, 100.0, 10.0, 10.0);
        o.zookeeper = Some((150.0, 5.0));
        assert!(o.verdict(&c).1, "{}", o.verdict(&c).0);
        o.zookeeper = Some((151.0, 5.0));
        let (text, met) = o.verdict(&c);
        assert!(!met, "behind ZooKeeper: {text}");
        assert_eq!(o.zk_ratio(&c).map(|r| r < 1.0), Some(true));
    }

    #[test]
    fn an_invalid_run_never_meets_a_bar() {
        let c = case(false, 1.0, false);
        let mut o = outcome(0.0, 20.0, 0.0, 0.0);
        o.invalid = invalid(&serde_json::json!({"ops": 0}));
        let (text, met) = o.verdict(&c);
        assert!(!met);
        assert!(text.contains("invalid"), "{text}");
    }

    #[test]
    fn runs_are_invalid_when_events_are_missing_or_errors_many() {
        let ok = serde_json::json!({"ops": 1000, "errors": {"TIMEOUT": 5}});
        assert_eq!(invalid(&ok), None);
        let missing = serde_json::json!({"ops": 1000, "events_missing": 3, "errors": {}});
        assert!(invalid(&missing).is_some());
        let failing = serde_json::json!({"ops": 1000, "errors": {"TIMEOUT": 50}});
        assert!(invalid(&failing).is_some());
    }
}
