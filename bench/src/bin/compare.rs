//! concord-compare: the side-by-side benchmark of concord and etcd on this machine.
//!
//! Starts a 3-member etcd cluster and a 3-process concord cluster (separate `concord node`
//! processes) on loopback, both with fsync on and 3 replicas; runs each workload on both in
//! turn through `concord-loadgen` (A/B, then B/A in full mode, so linear machine drift
//! cancels); and writes a report: the machine (cores, memory, fsync latency measured on the
//! spot), the exact commands, a table with both figures, their ratio and the bar, and the
//! loadgen's charts. A run that lost events, broke a check or failed more than 1 % of its
//! operations makes its case invalid rather than a figure.
//!
//! Run through `scripts/bench-compare.sh quick|full`, which installs etcd and builds the
//! binaries. Every process it starts is killed (by pid) when it ends, error or not.

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
#[command(name = "concord-compare", about = "concord and etcd side by side")]
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
    /// Where the report (README.md), its raw data and its charts go.
    #[arg(long)]
    out: PathBuf,
    /// The clusters' data go in a fresh directory under this one, on the disk being
    /// measured (not a tmpfs).
    #[arg(long, default_value = "target")]
    work_dir: PathBuf,
    /// Only the workloads whose name contains this.
    #[arg(long)]
    only: Option<String>,
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
    /// The bar, if the issue sets one.
    bar: Option<Bar>,
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

/// What concord must show against etcd in one case.
struct Bar {
    /// The bar in words, for the report.
    text: &'static str,
    /// The least ratio (how many times better concord is) that meets it.
    ratio: f64,
    /// Whether concord's operation p99 must also be no worse than etcd's.
    p99_no_worse: bool,
}

/// Both put cases' bar.
const PUT_BAR: Bar = Bar {
    text: "≥ 1.5× etcd, p99 ≤ etcd's",
    ratio: 1.5,
    p99_no_worse: true,
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
    },
    Case {
        name: "put-256",
        args: "--workload put --clients 256 --connections 8 --value-size 256 --duration 20s",
        quick_args: "--workload put --clients 32 --connections 2 --value-size 256 --duration 2s",
        figure: "ops_per_sec",
        higher_is_better: true,
        bar: Some(PUT_BAR),
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
    },
    Case {
        name: "get-serializable-256",
        args: "--workload get --consistency serializable --clients 256 --connections 8 --duration 20s",
        quick_args: "--workload get --consistency serializable --clients 32 --connections 2 --key-space 1000 --duration 2s",
        figure: "ops_per_sec",
        higher_is_better: true,
        bar: None,
    },
    Case {
        name: "mixed-90-10-zipfian",
        args: "--workload mixed --read-ratio 0.9 --distribution zipfian --clients 128 --connections 8 --duration 20s",
        quick_args: "--workload mixed --read-ratio 0.9 --distribution zipfian --clients 16 --connections 2 --key-space 1000 --duration 2s",
        figure: "ops_per_sec",
        higher_is_better: true,
        bar: None,
    },
    Case {
        name: "txn-cas-64",
        args: "--workload txn-cas --clients 64 --connections 8 --key-space 1000 --duration 20s",
        quick_args: "--workload txn-cas --clients 8 --connections 2 --key-space 100 --duration 2s",
        figure: "ops_per_sec",
        higher_is_better: true,
        bar: None,
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
    },
    Case {
        name: "lock-contention-32x8",
        args: "--workload lock-contention --clients 32 --locks 8 --connections 8 --duration 15s",
        quick_args: "--workload lock-contention --clients 8 --locks 2 --connections 2 --duration 2s",
        figure: "acquisitions_per_sec",
        higher_is_better: true,
        bar: None,
    },
    Case {
        name: "membership-2k",
        args: "--workload membership --members 2000 --watchers 16 --churn 20 --ttl 30 --clients 64 --connections 8 --duration 15s",
        quick_args: "--workload membership --members 100 --watchers 4 --churn 10 --ttl 10 --clients 16 --connections 2 --duration 2s",
        figure: "delivery_p99_ms",
        higher_is_better: false,
        bar: None,
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

/// One case's outcome on both targets: medians of the figure and of the operation p99 (ms).
struct Outcome {
    concord: f64,
    etcd: f64,
    concord_p99: f64,
    etcd_p99: f64,
    /// The first reason a run of the case is invalid, if any.
    invalid: Option<String>,
}

impl Outcome {
    /// How many times better concord is (higher throughput, or lower latency).
    fn ratio(&self, case: &Case) -> f64 {
        if case.higher_is_better {
            self.concord / self.etcd
        } else {
            self.etcd / self.concord
        }
    }

    /// The bar's verdict, and whether it is met (true when the case has no bar).
    fn verdict(&self, case: &Case) -> (String, bool) {
        if let Some(reason) = &self.invalid {
            return (format!("**invalid**: {reason}"), case.bar.is_none());
        }
        let Some(bar) = &case.bar else {
            return ("—".into(), true);
        };
        let p99_ok = !bar.p99_no_worse || self.concord_p99 <= self.etcd_p99;
        let met = self.ratio(case) >= bar.ratio && p99_ok;
        let word = if met { "met" } else { "not met" };
        (format!("{}: **{word}**", bar.text), met)
    }
}

/// Runs one case on both targets, `rounds` times, alternating which goes first.
fn run_case(
    args: &Args,
    case: &Case,
    targets: &[(&str, Vec<String>); 2],
    rounds: usize,
    raw: &mut String,
) -> anyhow::Result<Outcome> {
    let workload_args = case.args_for(args.mode);
    let mut figures: [(Vec<f64>, Vec<f64>); 2] = Default::default();
    let mut invalid_reason = None;
    for round in 0..rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
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
    let [(c, c99), (e, e99)] = figures;
    Ok(Outcome {
        concord: median(c),
        etcd: median(e),
        concord_p99: median(c99),
        etcd_p99: median(e99),
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
    ];
    wait_ready(&args, &targets[1].1, "etcd")?;
    wait_leaders(&args, &concord_config)?;
    wait_ready(&args, &targets[0].1, "concord")?;

    let rounds = if args.mode == Mode::Full { 2 } else { 1 };
    let (mut rows, mut commands, mut charts, mut raw) =
        (String::new(), String::new(), String::new(), String::new());
    let mut not_met = Vec::new();
    for case in CASES {
        if args
            .only
            .as_ref()
            .is_some_and(|o| !case.name.contains(o.as_str()))
        {
            continue;
        }
        let workload_args = case.args_for(args.mode);
        writeln!(
            commands,
            "concord-loadgen run --target concord|etcd ... {workload_args}"
        )?;
        let outcome = run_case(&args, case, &targets, rounds, &mut raw)?;
        let (verdict, met) = outcome.verdict(case);
        if !met {
            not_met.push(case.name);
        }
        writeln!(
            rows,
            "| {} | {} | {:.1} | {:.1} | {:.2}× | {:.2} | {:.2} | {verdict} |",
            case.name,
            case.figure,
            outcome.concord,
            outcome.etcd,
            outcome.ratio(case),
            outcome.concord_p99,
            outcome.etcd_p99
        )?;
        writeln!(
            charts,
            "### {}\n\n![concord](charts/{0}-concord.png)\n![etcd](charts/{0}-etcd.png)\n",
            case.name
        )?;
    }
    drop(procs);

    let mode = format!("{:?}", args.mode).to_lowercase();
    let mut report = String::new();
    writeln!(report, "# concord and etcd, side by side\n")?;
    writeln!(
        report,
        "Generated by `scripts/bench-compare.sh {mode}` (concord-compare). Both systems run as 3 \
         processes on loopback on this machine, 3 replicas, fsync on ({}; concord: `concord \
         node` processes, one RocksDB each, group commit), with the load generator on the same \
         cores. Each workload runs on concord and on etcd{}; a figure is the median of its \
         rounds. The ratio says how many times better concord is (higher throughput, or lower \
         latency for the latency figures). The p99 columns are the operation's p99 in ms. A \
         run that lost events, broke a check or failed more than 1 % of its operations makes \
         its row invalid.\n",
        etcd_version(&args.etcd),
        if rounds > 1 {
            ", in the order A/B then B/A"
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
        "| workload | figure | concord | etcd | ratio | concord p99 ms | etcd p99 ms | bar |"
    )?;
    writeln!(report, "|---|---|---|---|---|---|---|---|")?;
    report.push_str(&rows);
    writeln!(
        report,
        "\nCommands (loadgen arguments after the target's own):\n\n```\n{commands}```\n"
    )?;
    writeln!(
        report,
        "What each workload is on each system: [mapping.md](mapping.md). Why the bars not \
         met are not, where the time goes and what would close them: [analysis.md](analysis.md).\n"
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
        }
    }

    fn outcome(concord: f64, etcd: f64, concord_p99: f64, etcd_p99: f64) -> Outcome {
        Outcome {
            concord,
            etcd,
            concord_p99,
            etcd_p99,
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
