//! Test hosts: each node of a cluster in a Linux network namespace of its own, with its own
//! address, joined by a veth pair to a bridge that lives in one more namespace; the test
//! process reaches the hosts through a last veth pair into that bridge. The test creates all
//! of it and tears it down when the [`Net`] is dropped. Nothing outside these namespaces and
//! loopback is ever addressed.
//!
//! Faults on the wire: a cut between two hosts is a blackhole route on each side (packets to
//! the other are dropped, so the cut is symmetric while the test process still reaches both).
//! A lossy host drops a share of what it sends at random (iptables' `statistic` match) and
//! sends the rest through a slow link (a `tbf` queue: packets wait, and drop past its
//! latency). A reordering host sends a share of its packets, picked at random, through a slow
//! queue and the rest straight on (an `htb` with two classes, packets sorted into the slow one
//! by iptables' `statistic` match and `CLASSIFY` target): a slow packet arrives after faster
//! ones sent later. `tc netem` would delay and reorder by itself, but this machine's kernel
//! has no `sch_netem`.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context};

/// The first two octets of every test host's address.
const PREFIX: [u8; 2] = [10, 77];

/// Host part of the test process's own address on the bridge.
const TEST_PROCESS_HOST: u8 = 254;

/// Most hosts on one net (the host part of an address is 1 + the host's index).
pub const HOSTS_MAX: usize = 200;

/// Most packets waiting in a reordering host's slow queue ([`Net::reordering`]).
pub const SLOW_QUEUE_PACKETS: u32 = 20;

/// Nets created by this process so far (with the pid, it picks names and a subnet).
static CREATED: AtomicU32 = AtomicU32::new(0);

/// The namespaces, links and addresses of one set of test hosts.
pub struct Net {
    /// Short unique name part (interface names are at most 15 bytes).
    tag: String,
    /// Third octet of the hosts' addresses.
    subnet: u8,
    hosts: usize,
    /// Per host: made lossy or reordering (its iptables rules and queues go when healed).
    shaped: Mutex<Vec<bool>>,
}

/// Runs `ip ARGS`, failing with its error output.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Whether this process may create network namespaces (root, and `ip` installed).
pub fn available() -> bool {
    let probe = format!("cfprobe{}", std::process::id());
    ip(&["netns", "add", &probe]).is_ok() && ip(&["netns", "del", &probe]).is_ok()
}

impl Net {
    /// Creates `hosts` test hosts on a bridge, and the test process's way to them.
    pub fn create(hosts: usize) -> anyhow::Result<Net> {
        if hosts == 0 || hosts > HOSTS_MAX {
            bail!("between 1 and {HOSTS_MAX} hosts, not {hosts}");
        }
        let n = CREATED.fetch_add(1, Ordering::Relaxed);
        let unique = std::process::id().wrapping_mul(31).wrapping_add(n);
        let net = Net {
            tag: format!("cf{:04x}", unique & 0xffff),
            subnet: (unique % 250) as u8 + 1,
            hosts: 0,
            shaped: Mutex::new(vec![false; hosts]),
        };
        net.build(hosts)
    }

    fn build(mut self, hosts: usize) -> anyhow::Result<Net> {
        let bridge = self.bridge_ns();
        ip(&["netns", "add", &bridge])?;
        // From here on, dropping `self` removes what was made.
        ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &bridge, "link", "set", "br0", "up"])?;
        for host in 0..hosts {
            let ns = self.ns(host);
            ip(&["netns", "add", &ns])?;
            self.hosts = host + 1;
            let (inside, outside) = (
                format!("{}h{host}", self.tag),
                format!("{}b{host}", self.tag),
            );
            ip(&[
                "link", "add", &inside, "type", "veth", "peer", "name", &outside,
            ])?;
            ip(&["link", "set", &inside, "netns", &ns])?;
            ip(&["link", "set", &outside, "netns", &bridge])?;
            ip(&["-n", &ns, "link", "set", &inside, "name", "eth0"])?;
            let addr = format!("{}/24", self.addr(host));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", &bridge, "link", "set", &outside, "master", "br0", "up",
            ])?;
        }
        // The test process's own leg.
        let (mine, theirs) = (self.test_link(), format!("{}rb", self.tag));
        ip(&[
            "link", "add", &mine, "type", "veth", "peer", "name", &theirs,
        ])?;
        ip(&["link", "set", &theirs, "netns", &bridge])?;
        ip(&["-n", &bridge, "link", "set", &theirs, "master", "br0", "up"])?;
        let addr = format!("{}/24", self.address(TEST_PROCESS_HOST));
        ip(&["addr", "add", &addr, "dev", &mine])?;
        ip(&["link", "set", &mine, "up"])?;
        Ok(self)
    }

    fn bridge_ns(&self) -> String {
        format!("{}br", self.tag)
    }

    fn test_link(&self) -> String {
        format!("{}r", self.tag)
    }

    fn address(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(PREFIX[0], PREFIX[1], self.subnet, host)
    }

    /// The test process's own address on the bridge (the hosts reach it there).
    pub fn test_process_addr(&self) -> Ipv4Addr {
        self.address(TEST_PROCESS_HOST)
    }

    /// How many hosts there are.
    pub fn hosts(&self) -> usize {
        self.hosts
    }

    /// The namespace of `host` (0-based).
    pub fn ns(&self, host: usize) -> String {
        format!("{}n{host}", self.tag)
    }

    /// The address of `host`.
    pub fn addr(&self, host: usize) -> Ipv4Addr {
        self.address(host as u8 + 1)
    }

    /// A command that runs `program` inside `host`'s namespace (`ip netns exec`, which execs
    /// the program: the child's pid is the program's).
    pub fn command(&self, host: usize, program: &std::path::Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns(host)]).arg(program);
        command
    }

    /// Cuts the link between hosts `a` and `b`, both ways.
    pub fn cut(&self, a: usize, b: usize) -> anyhow::Result<()> {
        for (from, to) in [(a, b), (b, a)] {
            let to = format!("{}/32", self.addr(to));
            ip(&["-n", &self.ns(from), "route", "replace", "blackhole", &to])?;
        }
        Ok(())
    }

    /// Cuts every link between a host of `side` and a host not in it.
    pub fn partition(&self, side: &[usize]) -> anyhow::Result<()> {
        for &a in side {
            for b in (0..self.hosts).filter(|b| !side.contains(b)) {
                self.cut(a, b)?;
            }
        }
        Ok(())
    }

    /// Runs `program ARGS` inside `host`'s namespace.
    fn exec(&self, host: usize, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let ns = self.ns(host);
        let mut all = vec!["netns", "exec", ns.as_str(), program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Sends `share_pct` % of what `host` sends out of `eth0`, picked at random, to the
    /// iptables `target` (a rule appended to `table`'s `OUTPUT` chain).
    fn random_share(
        &self,
        host: usize,
        table: &str,
        share_pct: u32,
        target: &[&str],
    ) -> anyhow::Result<()> {
        self.shaped.lock().expect("shaped lock")[host] = true;
        let probability = format!("{:.2}", f64::from(share_pct.min(100)) / 100.0);
        let rule = [
            &["-t", table, "-A", "OUTPUT", "-o", "eth0", "-m", "statistic"][..],
            &["--mode", "random", "--probability", &probability, "-j"],
            target,
        ]
        .concat();
        self.exec(host, "iptables", &rule)
    }

    /// Makes `host` drop `loss_pct` % of what it sends, at random, and send the rest at
    /// `rate_kbit` kbit/s at most.
    pub fn lossy(&self, host: usize, loss_pct: u32, rate_kbit: u32) -> anyhow::Result<()> {
        self.random_share(host, "filter", loss_pct, &["DROP"])?;
        let rate = format!("{rate_kbit}kbit");
        self.exec(
            host,
            "tc",
            &[
                "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", &rate, "burst", "32kbit",
                "latency", "300ms",
            ],
        )
    }

    /// Makes `host` send `share_pct` % of its packets, picked at random, through a queue of
    /// `slow_kbit` kbit/s holding at most [`SLOW_QUEUE_PACKETS`] (more are dropped), and the
    /// rest straight on: a slow packet arrives after faster ones sent later.
    pub fn reordering(&self, host: usize, share_pct: u32, slow_kbit: u32) -> anyhow::Result<()> {
        let tc = |args: &[&str]| self.exec(host, "tc", args);
        let slow = format!("{slow_kbit}kbit");
        let limit = SLOW_QUEUE_PACKETS.to_string();
        tc(&[
            "qdisc", "replace", "dev", "eth0", "root", "handle", "1:", "htb", "default", "1",
        ])?;
        // A quantum of one full frame: htb's default (rate / 10) warns at these rates.
        tc(&[
            "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:1", "htb", "rate",
            "10gbit", "quantum", "1514",
        ])?;
        tc(&[
            "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:2", "htb", "rate", &slow,
            "ceil", &slow, "burst", "1514", "cburst", "1514", "quantum", "1514",
        ])?;
        tc(&[
            "qdisc", "add", "dev", "eth0", "parent", "1:2", "pfifo", "limit", &limit,
        ])?;
        self.random_share(
            host,
            "mangle",
            share_pct,
            &["CLASSIFY", "--set-class", "1:2"],
        )
    }

    /// Removes every cut, every lossy link and every reordering one.
    pub fn heal(&self) -> anyhow::Result<()> {
        let mut shaped = self.shaped.lock().expect("shaped lock");
        for host in 0..self.hosts {
            ip(&["-n", &self.ns(host), "route", "flush", "type", "blackhole"])?;
            if shaped[host] {
                for table in ["filter", "mangle"] {
                    self.exec(host, "iptables", &["-t", table, "-F", "OUTPUT"])?;
                }
                self.exec(host, "tc", &["qdisc", "del", "dev", "eth0", "root"])?;
                shaped[host] = false;
            }
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends in it, and so their peers.
        let _ = ip(&["link", "del", &self.test_link()]);
        for host in 0..self.hosts {
            let _ = ip(&["netns", "del", &self.ns(host)]);
        }
        let _ = ip(&["netns", "del", &self.bridge_ns()]);
    }
}
