//! A concord cluster of `concord node` processes, each on a test host of its own
//! ([`Net`]): started, killed (`kill -9`), restarted, paused (`SIGSTOP`) and resumed
//! (`SIGCONT`), always by the pid of a process this cluster started.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use concord_client::{Client, ClientConfig};

use crate::netns::Net;

/// The port every node listens on (each on its own address).
const PORT: u16 = 7000;

/// How often readiness is polled.
const POLL: Duration = Duration::from_millis(100);

/// A cluster of node processes on test hosts.
pub struct Cluster {
    net: Net,
    dir: PathBuf,
    concord: PathBuf,
    ranges: u32,
    /// More arguments for every `concord node`.
    node_args: Vec<String>,
    /// Per host: the running process, if any.
    procs: Vec<Option<Child>>,
    /// Per host: stopped with `SIGSTOP`.
    paused: Vec<bool>,
    /// Per host: running with fail points or a skewed clock (restarted without when healed).
    altered: Vec<bool>,
    /// Fail points armed on running nodes (by request, no restart), to disarm when healed.
    armed_live: Vec<(usize, String)>,
}

/// Where Debian's `libfaketime` package puts its multi-threaded library.
const LIBFAKETIME_GLOB: &str = "/usr/lib/*/faketime/libfaketimeMT.so.1";

/// The `libfaketime` library, if installed.
fn libfaketime() -> anyhow::Result<PathBuf> {
    let lib = std::fs::read_dir("/usr/lib")?
        .filter_map(Result::ok)
        .map(|arch| arch.path().join("faketime/libfaketimeMT.so.1"))
        .find(|lib| lib.exists());
    lib.with_context(|| {
        format!("{LIBFAKETIME_GLOB} missing: run scripts/install-deps.sh (package libfaketime)")
    })
}

/// The environment that runs a process with its wall clock skewed as `faketime` says (the
/// `FAKETIME` syntax of libfaketime) and its monotonic clock untouched.
pub fn skewed_clock_env(faketime: &str) -> anyhow::Result<Vec<(&'static str, String)>> {
    Ok(vec![
        ("LD_PRELOAD", libfaketime()?.display().to_string()),
        ("FAKETIME", faketime.to_string()),
        // The variable's name before libfaketime 0.9.9, and since.
        ("DONT_FAKE_MONOTONIC", "1".to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
    ])
}

/// Sends `signal` (`STOP`, `CONT`) to `pid`.
fn signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed");
    }
    Ok(())
}

impl Cluster {
    /// Starts `nodes` nodes with `ranges` ranges, on hosts of a new [`Net`], with their data,
    /// certificates and logs under `dir`.
    pub fn start(
        concord: &Path,
        dir: &Path,
        nodes: usize,
        ranges: u32,
        node_args: Vec<String>,
    ) -> anyhow::Result<Cluster> {
        if !concord.exists() {
            bail!(
                "{} missing: build it first (cargo build --bins)",
                concord.display()
            );
        }
        std::fs::create_dir_all(dir)?;
        let mut cluster = Cluster {
            net: Net::create(nodes)?,
            dir: dir.to_path_buf(),
            concord: concord.to_path_buf(),
            ranges,
            node_args,
            procs: (0..nodes).map(|_| None).collect(),
            paused: vec![false; nodes],
            altered: vec![false; nodes],
            armed_live: Vec::new(),
        };
        for host in 0..nodes {
            cluster.spawn(host, &[])?;
        }
        Ok(cluster)
    }

    /// The test hosts.
    pub fn net(&self) -> &Net {
        &self.net
    }

    /// How many nodes the cluster has (running or not).
    pub fn nodes(&self) -> usize {
        self.procs.len()
    }

    /// The node id of `host` (ids count from 1).
    pub fn id(host: usize) -> u64 {
        host as u64 + 1
    }

    fn endpoint(&self, host: usize) -> String {
        format!("{}:{PORT}", self.net.addr(host))
    }

    /// Where the node logs of `host` go (appended across restarts).
    pub fn log_path(&self, host: usize) -> PathBuf {
        self.dir.join(format!("node-{}.log", Cluster::id(host)))
    }

    /// Starts `host`'s node, with `env` added to its environment (none: a plain node).
    fn spawn(&mut self, host: usize, env: &[(&str, String)]) -> anyhow::Result<()> {
        let peers: Vec<String> = (0..self.nodes())
            .map(|h| format!("{}={}", Cluster::id(h), self.endpoint(h)))
            .collect();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(host))?;
        let mut command = self.net.command(host, &self.concord);
        command.envs(env.iter().map(|(k, v)| (k, v)));
        let child = command
            .args(["node", "--id", &Cluster::id(host).to_string()])
            .args([
                "--listen",
                &self.endpoint(host),
                "--peers",
                &peers.join(","),
            ])
            .args(["--ranges", &self.ranges.to_string()])
            .arg("--data-dir")
            .arg(self.dir.join(format!("node-{}", Cluster::id(host))))
            .arg("--cert-dir")
            .arg(self.dir.join("certs"))
            .args(&self.node_args)
            .args(keep_history(&self.node_args))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning concord node")?;
        self.procs[host] = Some(child);
        self.paused[host] = false;
        self.altered[host] = !env.is_empty();
        Ok(())
    }

    /// Restarts `host`'s node with fail points configured (`name=actions;...`, the `fail`
    /// crate's syntax): it crashes where they say. The `concord` binary must be built with
    /// the `failpoints` feature (test builds are); one without refuses to start.
    pub fn arm(&mut self, host: usize, failpoints: &str) -> anyhow::Result<()> {
        self.kill(host)?;
        self.spawn(host, &[("FAILPOINTS", failpoints.to_string())])
    }

    /// Arms fail point `point` (`return`: crash there) on `host`'s running node, by request
    /// through `client`, without a restart; [`Cluster::disarm_live`] takes it back.
    pub async fn arm_live(
        &mut self,
        client: &Client,
        host: usize,
        point: &str,
    ) -> anyhow::Result<()> {
        self.arm_live_with(client, host, point, "return").await
    }

    /// Arms fail point `point` on `host`'s running node with `actions` (the `fail` crate's
    /// syntax, e.g. `return(8000)`); [`Cluster::disarm_live`] takes it back.
    pub async fn arm_live_with(
        &mut self,
        client: &Client,
        host: usize,
        point: &str,
        actions: &str,
    ) -> anyhow::Result<()> {
        client
            .configure_fail_point(&self.endpoint(host), point, actions)
            .await
            .with_context(|| format!("arming {point} on host {host}"))?;
        self.armed_live.push((host, point.to_string()));
        Ok(())
    }

    /// Disarms the fail points [`Cluster::arm_live`] armed on nodes still running; a node that
    /// does not answer is marked for a restart by [`Cluster::heal_all`] (which starts every
    /// node without fail points).
    pub async fn disarm_live(&mut self) {
        let armed = std::mem::take(&mut self.armed_live);
        if armed.is_empty() {
            return;
        }
        let client = Client::connect(self.client_config(Duration::from_secs(2)))
            .await
            .ok();
        for (host, point) in armed {
            if !self.running(host) || self.exited(host) {
                continue;
            }
            let off = match &client {
                Some(c) => c
                    .configure_fail_point(&self.endpoint(host), &point, "off")
                    .await
                    .is_ok(),
                None => false,
            };
            if !off {
                self.altered[host] = true;
            }
        }
    }

    /// Restarts `host`'s node with its wall clock skewed by `libfaketime` (`faketime` in its
    /// `FAKETIME` syntax, e.g. `-2d x3`: two days behind, running three times as fast). Its
    /// monotonic clock, the only one concord times anything with, is left alone.
    pub fn skew_clock(&mut self, host: usize, faketime: &str) -> anyhow::Result<()> {
        let env = skewed_clock_env(faketime)?;
        self.kill(host)?;
        self.spawn(host, &env)
    }

    /// Whether `host`'s node process has exited by itself (a fail point crashed it).
    fn exited(&mut self, host: usize) -> bool {
        match &mut self.procs[host] {
            Some(child) => matches!(child.try_wait(), Ok(Some(_))),
            None => false,
        }
    }

    /// A client configuration for every node, with `request_timeout`.
    pub fn client_config(&self, request_timeout: Duration) -> ClientConfig {
        let endpoints = (0..self.nodes()).map(|h| self.endpoint(h)).collect();
        let mut config = ClientConfig::new(endpoints, self.dir.join("certs").join("ca.pem"));
        config.request_timeout = request_timeout;
        config
    }

    /// Whether `host`'s node process is running (paused counts as running).
    pub fn running(&self, host: usize) -> bool {
        self.procs[host].is_some()
    }

    /// `kill -9` of `host`'s node (resumed first if paused, so that it dies at once).
    pub fn kill(&mut self, host: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.procs[host].take() {
            child.kill().context("kill -9")?;
            child.wait()?;
        }
        self.paused[host] = false;
        Ok(())
    }

    /// Starts `host`'s node again on its data, without fail points or a skewed clock (no-op
    /// if it runs plain).
    pub fn restart(&mut self, host: usize) -> anyhow::Result<()> {
        if self.altered[host] || self.exited(host) {
            self.kill(host)?;
        }
        if self.procs[host].is_none() {
            self.spawn(host, &[])?;
        }
        Ok(())
    }

    /// `SIGSTOP` to `host`'s node.
    pub fn pause(&mut self, host: usize) -> anyhow::Result<()> {
        if let Some(child) = &self.procs[host] {
            signal(child.id(), "STOP")?;
            self.paused[host] = true;
        }
        Ok(())
    }

    /// `SIGCONT` to `host`'s node.
    pub fn resume(&mut self, host: usize) -> anyhow::Result<()> {
        if let (Some(child), true) = (&self.procs[host], self.paused[host]) {
            signal(child.id(), "CONT")?;
        }
        self.paused[host] = false;
        Ok(())
    }

    /// Resumes every paused node, restarts every killed one and heals the network.
    pub fn heal_all(&mut self) -> anyhow::Result<()> {
        self.net.heal()?;
        for host in 0..self.nodes() {
            self.resume(host)?;
            self.restart(host)?;
        }
        Ok(())
    }

    /// Waits (at most `limit`) until every node answers and knows a leader for every range.
    pub async fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + limit;
        let mut last = String::from("no answer yet");
        while Instant::now() < until {
            match self.readiness().await {
                Ok(()) => return Ok(()),
                Err(why) => last = why,
            }
            tokio::time::sleep(POLL).await;
        }
        bail!("cluster not ready after {limit:?}: {last}")
    }

    /// The host leading the `n`-th range (modulo their number) as the first node to answer
    /// knows it; none if no node answers or none knows a leader.
    pub async fn leader_of_nth_range(&self, n: usize) -> Option<usize> {
        let client = Client::connect(self.client_config(Duration::from_secs(1)))
            .await
            .ok()?;
        for (_, status) in client.status().await {
            let Ok(status) = status else { continue };
            if status.ranges.is_empty() {
                continue;
            }
            let range = &status.ranges[n % status.ranges.len()];
            return range.leader.map(|id| id as usize - 1);
        }
        None
    }

    async fn readiness(&self) -> Result<(), String> {
        let config = self.client_config(Duration::from_secs(1));
        if !config.ca.exists() {
            return Err("no CA yet".into());
        }
        let client = Client::connect(config).await.map_err(|e| e.to_string())?;
        let statuses = client.status().await;
        if statuses.len() < self.nodes() {
            return Err(format!(
                "{} of {} nodes known",
                statuses.len(),
                self.nodes()
            ));
        }
        for (addr, status) in statuses {
            let status = status.map_err(|e| format!("{addr}: {e}"))?;
            if let Some(r) = status.ranges.iter().find(|r| r.leader.is_none()) {
                return Err(format!("{addr}: range {} has no leader", r.id));
            }
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for host in 0..self.nodes() {
            let _ = self.resume(host);
            let _ = self.kill(host);
        }
    }
}

/// `--history-revisions=0` unless `node_args` set it: a campaign's watcher resumes from a
/// revision anywhere in the run (to check that no event is lost or repeated), which needs
/// the whole history, so nodes do not compact it on their own.
fn keep_history(node_args: &[String]) -> Option<&'static str> {
    let set = node_args
        .iter()
        .any(|a| a.starts_with("--history-revisions"));
    (!set).then_some("--history-revisions=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seconds since the epoch by the wall clock of a shell run with `env`.
    fn wall_clock(env: &[(&str, String)]) -> i64 {
        let out = Command::new("date")
            .arg("+%s")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("running date");
        let text = String::from_utf8(out.stdout).expect("utf-8");
        text.trim().parse().expect("seconds")
    }

    /// The clock nemesis skews what it says. (That it leaves monotonic time alone the
    /// campaigns show: a lease clock running at its `x` rate would expire leases early.)
    #[test]
    fn a_skewed_clock_env_moves_the_wall_clock() {
        let env = skewed_clock_env("-7200 x2").expect("libfaketime: run scripts/install-deps.sh");
        let off = wall_clock(&[]) - wall_clock(&env);
        assert!(
            (7_190..=7_210).contains(&off),
            "wall clock off by {off} s, not 7200"
        );
    }
}
