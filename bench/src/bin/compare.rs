//! concord-compare: the side-by-side benchmark of concord and etcd on this machine.
//!
//! Starts a 3-member etcd cluster and a 3-process concord cluster (separate `concord node`
//! processes) on loopback, both with fsync on and 3 replicas; runs each workload on both in
//! turn (A/B/A/B in full mode, to cancel machine drift) through `concord-loadgen`; and writes
//! a report: the machine (cores, memory, fsync latency measured on the spot), the exact
//! commands, a table with both figures, their ratio and the bar, and the loadgen's charts.
//!
//! Run through `scripts/bench-compare.sh [quick|full]`, which installs etcd and builds the
//! binaries. Every process it starts is killed (by pid) when it ends, even on error.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use serde_json::Value;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Mode {
    /// Seconds per run, one round: a smoke test (CI).
    Quick,
    /// The published figures: longer runs, two rounds (A/B/A/B).
    Full,
}

#[derive(Parser)]
#[command(name = "concord-compare", about = "concord and etcd side by side")]
struct Args {
    /// quick (smoke test) or full (published figures).
    #[arg(long, value_enum, default_value_t = Mode::Quick)]
    mode: Mode,
    /// Where concord, concordctl and concord-loadgen are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// The etcd server binary.
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,
    /// Where the report (README.md) and its charts go.
    #[arg(long)]
    out: PathBuf,
    /// Scratch directory for the clusters' data (on the disk being measured); a temporary
    /// directory under /tmp if absent.
    #[arg(long)]
    work_dir: Option<PathBuf>,
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
    /// The bar, as text, and the concord/etcd ratio that meets it.
    bar: Option<(&'static str, f64)>,
}

const CASES: &[Case] = &[
    Case {
        name: "put-64",
        args: "--workload put --clients 64 --connections 8 --value-size 256 --duration 20s",
        quick_args: "--workload put --clients 16 --connections 2 --value-size 256 --duration 2s",
        figure: "ops_per_sec",
        higher_is_better: true,
        bar: Some(("≥ 1.5× etcd, p99 ≤ etcd's", 1.5)),
    },
    Case {
        name: "put-256",
        args: "--workload put --clients 256 --connections 8 --value-size 256 --duration 20s",
        quick_args: "--workload put --clients 32 --connections 2 --value-size 256 --duration 2s",
        figure: "ops_per_sec",
        higher_is_better: true,
        bar: Some(("≥ 1.5× etcd, p99 ≤ etcd's", 1.5)),
    },
    Case {
        name: "get-linearizable-256",
        args: "--workload get --consistency linearizable --clients 256 --connections 8 --duration 20s",
        quick_args: "--workload get --consistency linearizable --clients 32 --connections 2 --key-space 1000 --duration 2s",
        figure: "ops_per_sec",
        higher_is_better: true,
        bar: Some(("≥ 1.5× etcd", 1.5)),
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
        bar: Some(("p99 delivery ≤ etcd's", 1.0)),
    },
    Case {
        name: "lease-churn-10k",
        args: "--workload lease-churn --leases 10000 --ttl 60 --churn 0 --clients 64 --connections 8 --duration 1s",
        quick_args: "--workload lease-churn --leases 500 --ttl 30 --churn 0 --clients 16 --connections 2 --duration 1s",
        figure: "grants_per_sec",
        higher_is_better: true,
        bar: Some(("≥ 2× etcd's grants/s", 2.0)),
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

/// A free loopback port, from the OS.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
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

/// Starts the 3-member etcd cluster; returns its client endpoints.
fn start_etcd(args: &Args, dir: &Path, procs: &mut Processes) -> anyhow::Result<Vec<String>> {
    let mut members = Vec::new();
    for i in 1..=3 {
        members.push((format!("e{i}"), free_port()?, free_port()?));
    }
    let cluster: Vec<String> = members
        .iter()
        .map(|(name, _, peer)| format!("{name}=http://127.0.0.1:{peer}"))
        .collect();
    for (name, client, peer) in &members {
        let log = fs::File::create(dir.join(format!("{name}.log")))?;
        let child = Command::new(&args.etcd)
            .args(["--name", name])
            .arg("--data-dir")
            .arg(dir.join(name))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "concord-bench"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (scripts/install-deps.sh bench)",
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

/// Starts the 3-process concord cluster; returns its client config file.
fn start_concord(args: &Args, dir: &Path, procs: &mut Processes) -> anyhow::Result<PathBuf> {
    let ports = [free_port()?, free_port()?, free_port()?];
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
    Ok(config)
}

/// Runs concord-loadgen with `target_args` and `workload_args`; returns its JSON report.
fn loadgen(
    args: &Args,
    target_args: &[String],
    workload_args: &str,
    plot: Option<&Path>,
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
    let output = command
        .stderr(Stdio::inherit())
        .output()
        .context("running concord-loadgen")?;
    if !output.status.success() {
        bail!(
            "concord-loadgen {} {workload_args} failed ({})",
            target_args.join(" "),
            output.status
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .last()
        .context("concord-loadgen printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("parsing loadgen output {line:?}"))
}

/// Retries a one-operation put until the system answers (bounded).
fn wait_ready(args: &Args, target_args: &[String], what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = loadgen(
            args,
            target_args,
            "--workload put --clients 1 --ops 1 --duration 5s",
            None,
        );
        match attempt {
            Ok(report) if report["ops"].as_u64() == Some(1) => return Ok(()),
            _ if Instant::now() > deadline => bail!("{what} did not come up within 60 s"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scratch;
    let work = match &args.work_dir {
        Some(dir) => dir.clone(),
        None => {
            scratch = tempfile::Builder::new()
                .prefix("concord-compare.")
                .tempdir()?;
            scratch.path().to_path_buf()
        }
    };
    fs::create_dir_all(&work)?;
    fs::create_dir_all(args.out.join("charts"))?;
    let (fsync_p50, fsync_p99) = fsync_latency(&work, 200)?;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    eprintln!(
        "machine: {cores} cores, {:.1} GiB, fsync p50 {fsync_p50:?} p99 {fsync_p99:?}",
        mem_total_gib()
    );

    let mut procs = Processes(Vec::new());
    let etcd_endpoints = start_etcd(&args, &work, &mut procs)?;
    let concord_config = start_concord(&args, &work, &mut procs)?;
    let etcd_args = vec![
        "--target".to_string(),
        "etcd".into(),
        "--endpoints".into(),
        etcd_endpoints.join(","),
    ];
    let concord_args = vec![
        "--target".to_string(),
        "concord".into(),
        "--config".into(),
        concord_config.display().to_string(),
    ];
    // The config file appears once the nodes have made their certificates.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !concord_config.exists() {
        if Instant::now() > deadline {
            bail!(
                "concord wrote no client config within 60 s; see {}",
                work.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_ready(&args, &etcd_args, "etcd")?;
    wait_ready(&args, &concord_args, "concord")?;

    let rounds = if args.mode == Mode::Full { 2 } else { 1 };
    let targets = [("concord", &concord_args), ("etcd", &etcd_args)];
    let mut rows = String::new();
    let mut commands = String::new();
    let mut charts = String::new();
    let mut raw = String::new();
    let mut failed_bars = Vec::new();
    for case in CASES {
        if args
            .only
            .as_ref()
            .is_some_and(|o| !case.name.contains(o.as_str()))
        {
            continue;
        }
        let workload_args = if args.mode == Mode::Full {
            case.args
        } else {
            case.quick_args
        };
        writeln!(
            commands,
            "concord-loadgen run --target concord|etcd ... {workload_args}"
        )?;
        // Per target: the figure and the p99 of every round.
        let mut figures: [(Vec<f64>, Vec<f64>); 2] = Default::default();
        for round in 0..rounds {
            for (t, (target, target_args)) in targets.iter().enumerate() {
                let plot = args
                    .out
                    .join("charts")
                    .join(format!("{}-{target}.png", case.name));
                eprintln!("{} on {target}, round {}", case.name, round + 1);
                let report = loadgen(&args, target_args, workload_args, Some(&plot))?;
                writeln!(raw, "{report}")?;
                let figure = report[case.figure].as_f64().with_context(|| {
                    format!("{} on {target}: no {} in {report}", case.name, case.figure)
                })?;
                figures[t].0.push(figure);
                figures[t]
                    .1
                    .push(report["p99_us"].as_f64().unwrap_or(f64::NAN) / 1000.0);
            }
        }
        let (c, e) = (median(figures[0].0.clone()), median(figures[1].0.clone()));
        let (c99, e99) = (median(figures[0].1.clone()), median(figures[1].1.clone()));
        // The ratio is always "how many times better concord is".
        let ratio = if case.higher_is_better { c / e } else { e / c };
        let verdict = match case.bar {
            None => "—".to_string(),
            Some((text, needed)) => {
                let p99_ok = !text.contains("p99 ≤") || c99 <= e99;
                if ratio >= needed && p99_ok {
                    format!("{text}: **met**")
                } else {
                    failed_bars.push(case.name);
                    format!("{text}: **not met**")
                }
            }
        };
        writeln!(
            rows,
            "| {} | {} | {c:.1} | {e:.1} | {ratio:.2}× | {c99:.2} | {e99:.2} | {verdict} |",
            case.name, case.figure
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
         processes on loopback on this machine, 3 replicas, fsync on (etcd {}; concord `concord \
         node` processes, one RocksDB each, group commit). Each workload runs on concord, then \
         etcd{}; a figure is the median of its rounds. The ratio says how many times better \
         concord is (higher throughput, or lower latency for watch-fanout). Latency columns are \
         the operation's p99 in ms.\n",
        etcd_version(&args.etcd),
        if rounds > 1 { ", twice (A/B/A/B)" } else { "" }
    )?;
    writeln!(
        report,
        "Machine: {cores} cores, {:.1} GiB memory; disk fsync (4 KiB write + fdatasync) p50 {:.2} ms, \
         p99 {:.2} ms, measured on the spot.\n",
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
        "What each workload is on each system: `docs/benchmarks/mapping.md`.\n"
    )?;
    writeln!(report, "## Charts (last round)\n\n{charts}")?;
    fs::write(args.out.join("README.md"), report)?;
    fs::write(args.out.join("raw.jsonl"), raw)?;
    eprintln!("wrote {}", args.out.join("README.md").display());
    if !failed_bars.is_empty() {
        eprintln!("bars not met: {}", failed_bars.join(", "));
    }
    Ok(())
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
