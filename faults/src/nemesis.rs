//! The faults a campaign injects, and its schedule: a pure function of a seed, the kinds of
//! fault asked for and the cluster's size, so that a failing seed replays the same faults in
//! the same order with the same timings.

use std::fmt;
use std::str::FromStr;

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `kill -9` of a minority of the nodes, restarted when healed.
    Kill,
    /// `kill -9` of every node, restarted when healed.
    KillAll,
    /// `SIGSTOP` of one node for longer than an election timeout and a lease TTL.
    Pause,
    /// A minority of the nodes cut off from the majority.
    Partition,
    /// The leader of one range cut off from every other node.
    IsolateLeader,
    /// A non-transitive partition: two groups that cannot talk, and one node that talks to
    /// both.
    Bridge,
    /// One node's packets dropped at random, the rest sent through a slow link.
    Lossy,
    /// A share of one node's packets, picked at random, sent through a slow queue and the
    /// rest straight on: they arrive out of order.
    Reorder,
    /// One node restarted with a fail point that crashes it at a dangerous place of its
    /// storage (before or after the group-commit fsync, a failing fsync, before apply,
    /// during snapshot install).
    CrashPoint,
    /// One node's disk full: every write of its store fails with `ENOSPC` (a fail point), so
    /// it stops, and stops again at every start, until healed.
    DiskFull,
    /// One node restarted with its wall clock skewed (hours to days off, running slow or
    /// fast) by `libfaketime`.
    Clock,
    /// A range split at a register's key under traffic; half the time one of its replicas
    /// crashes as it applies the split (before or after writing it).
    Split,
    /// A range merged with its right neighbour under traffic; half the time a replica crashes
    /// as it applies the freeze or the merge.
    Merge,
    /// A replica of a range moved to a node without one under traffic; half the time the
    /// leader crashes between adding the learner and promoting it, or the new replica as it
    /// installs its snapshot. (A no-op on a cluster of 3: every node holds every range.)
    Move,
    /// `kill -9` of one node for longer than the placement service's `--down-after`: its
    /// replicas are re-created on the other nodes, and when it comes back its stale replicas
    /// are removed. (A long kill on a cluster of 3: no node can take its replicas.)
    Down,
}

/// Where a structural fault ([`Kind::Split`], [`Kind::Merge`], [`Kind::Move`]) crashes a node:
/// a fail point armed on a running node just before the operation (no restart), disarmed
/// when healed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Crash {
    /// The fail point.
    pub point: String,
    /// Which of the voters it is armed on (modulo their number) for a split or merge point;
    /// a move's points name their node (the leader, the new replica).
    pub voter: usize,
}

/// The fail points of a split (`node/src/storage/state_machine.rs`).
pub const SPLIT_POINTS: [&str; 2] = ["split-apply", "split-or-merge-applied"];

/// The fail points of a merge: the right range's freeze, then the left range's merge.
pub const MERGE_POINTS: [&str; 3] = ["freeze-apply", "merge-apply", "split-or-merge-applied"];

/// The fail points of a replica move: on the leader between learner and voter
/// (`node/src/node/replica_service.rs`), on the new replica as it installs its snapshot.
pub const MOVE_POINTS: [&str; 2] = ["move-learner-added", "snapshot-install"];

/// The fail point [`Kind::DiskFull`] arms (see `node/src/storage/mod.rs`).
pub const DISK_FULL_POINT: &str = "storage-write-error";

/// The fail points of a `concord node` that [`Kind::CrashPoint`] arms (see
/// `node/src/storage/group_commit.rs` and `state_machine.rs`).
pub const CRASH_POINTS: [&str; 5] = [
    "group-commit-before-sync",
    "group-commit-after-sync",
    "group-commit-sync-error",
    "apply-before",
    "snapshot-install",
];

impl Kind {
    /// Every kind, in a fixed order.
    pub const ALL: [Kind; 15] = [
        Kind::Kill,
        Kind::KillAll,
        Kind::Pause,
        Kind::Partition,
        Kind::IsolateLeader,
        Kind::Bridge,
        Kind::Lossy,
        Kind::CrashPoint,
        Kind::DiskFull,
        Kind::Clock,
        Kind::Split,
        Kind::Merge,
        Kind::Move,
        Kind::Reorder,
        Kind::Down,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Kill => "kill",
            Kind::KillAll => "kill-all",
            Kind::Pause => "pause",
            Kind::Partition => "partition",
            Kind::IsolateLeader => "isolate-leader",
            Kind::Bridge => "bridge",
            Kind::Lossy => "lossy",
            Kind::Reorder => "reorder",
            Kind::CrashPoint => "crash-point",
            Kind::DiskFull => "disk-full",
            Kind::Clock => "clock",
            Kind::Split => "split",
            Kind::Merge => "merge",
            Kind::Move => "move",
            Kind::Down => "down",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Kind, String> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
                format!("unknown nemesis {s:?}; one of {}", names.join(", "))
            })
    }
}

/// One fault, with its targets chosen.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Fault {
    /// `kill -9` of these hosts.
    Kill(Vec<usize>),
    /// `kill -9` of this host, held past the placement service's `--down-after`.
    Down(usize),
    /// `SIGSTOP` of this host.
    Pause(usize),
    /// These hosts (a minority) cut off from the others.
    Partition(Vec<usize>),
    /// The leader of the `n`-th range (in the order a node lists them) cut off from the others.
    IsolateLeader(usize),
    /// Every link between the two groups cut; the bridge host keeps both.
    Bridge {
        /// One side.
        left: Vec<usize>,
        /// The other side.
        right: Vec<usize>,
    },
    /// A fail point armed on one host: it crashes there with this chance per pass.
    CrashPoint {
        /// The host.
        host: usize,
        /// The fail point.
        point: String,
        /// The chance per pass, in percent.
        percent: u32,
    },
    /// One host's disk full.
    DiskFull(usize),
    /// One host's wall clock skewed.
    Clock {
        /// The host.
        host: usize,
        /// How far off its wall clock starts, in seconds (negative: behind).
        offset_s: i64,
        /// How fast it runs, in percent of real time.
        rate_pct: u32,
    },
    /// Random loss and a slow link on one host's outgoing packets.
    Lossy {
        /// The host.
        host: usize,
        /// Loss, in percent.
        loss_pct: u32,
        /// Most bits per second it sends, in kbit/s.
        rate_kbit: u32,
    },
    /// A share of one host's outgoing packets sent through a slow queue, the rest straight on.
    Reorder {
        /// The host.
        host: usize,
        /// The share sent through the slow queue, in percent.
        share_pct: u32,
        /// The slow queue's rate, in kbit/s.
        slow_kbit: u32,
    },
    /// Split the range holding register `register`'s key (modulo the registers) at that key.
    Split {
        /// The register.
        register: u64,
        /// A replica's crash, if any.
        crash: Option<Crash>,
    },
    /// Merge the `range`-th range (in key order, modulo their number) with its right
    /// neighbour.
    Merge {
        /// Which range.
        range: usize,
        /// A replica's crash, if any.
        crash: Option<Crash>,
    },
    /// Move a replica of the `range`-th range (in key order, modulo their number): the
    /// `pick`-th of its voters other than the leader to the `pick`-th node without a replica.
    Move {
        /// Which range.
        range: usize,
        /// Which voter leaves and which node receives (modulo their numbers).
        pick: usize,
        /// A crash, if any.
        crash: Option<Crash>,
    },
}

/// One step of a schedule: a healthy gap, then the fault held for a while, then healed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Step {
    /// How long the cluster runs without a fault before this one, in milliseconds.
    pub gap_ms: u64,
    /// The fault.
    pub fault: Fault,
    /// How long it is held, in milliseconds.
    pub hold_ms: u64,
}

/// A small xorshift generator: a schedule depends on nothing but its seed.
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (0 is remapped: xorshift would stay at 0).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `[low, high)`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low).max(1)
    }

    /// Half the time, a crash at one of `points` on a voter.
    fn crash(&mut self, points: &[&str]) -> Option<Crash> {
        let point = points[self.between(0, points.len() as u64) as usize];
        let voter = self.between(0, 64) as usize;
        (self.between(0, 2) == 0).then(|| Crash {
            point: point.to_string(),
            voter,
        })
    }

    /// `count` distinct hosts out of `hosts`.
    fn hosts(&mut self, hosts: usize, count: usize) -> Vec<usize> {
        let mut all: Vec<usize> = (0..hosts).collect();
        for i in 0..count.min(hosts) {
            let j = i + self.between(0, (hosts - i) as u64) as usize;
            all.swap(i, j);
        }
        all.truncate(count);
        all.sort_unstable();
        all
    }
}

/// The largest minority of `hosts`.
fn minority(hosts: usize) -> usize {
    (hosts - 1) / 2
}

/// The first `count` steps of the schedule of `seed` over `kinds` on `hosts` hosts whose
/// placement service calls a node down after `down_after_ms`.
pub fn schedule(
    seed: u64,
    kinds: &[Kind],
    hosts: usize,
    down_after_ms: u64,
    count: usize,
) -> Vec<Step> {
    let mut rng = Rng::new(seed);
    if kinds.is_empty() || hosts == 0 {
        return Vec::new();
    }
    (0..count)
        .map(|_| {
            let kind = kinds[rng.between(0, kinds.len() as u64) as usize];
            let (fault, hold_ms) = match kind {
                Kind::Kill => {
                    let n = rng.between(1, minority(hosts) as u64 + 1) as usize;
                    (Fault::Kill(rng.hosts(hosts, n)), rng.between(1_000, 6_000))
                }
                Kind::KillAll => (Fault::Kill((0..hosts).collect()), rng.between(500, 3_000)),
                // Down, then long enough for a move or two to finish before it returns.
                Kind::Down => (
                    Fault::Down(rng.between(0, hosts as u64) as usize),
                    down_after_ms + rng.between(3_000, 10_000),
                ),
                // Longer than an election timeout and a lease TTL's worth of renewals.
                Kind::Pause => (
                    Fault::Pause(rng.between(0, hosts as u64) as usize),
                    rng.between(3_000, 9_000),
                ),
                Kind::Partition => {
                    let n = rng.between(1, minority(hosts) as u64 + 1) as usize;
                    (
                        Fault::Partition(rng.hosts(hosts, n)),
                        rng.between(2_000, 8_000),
                    )
                }
                Kind::IsolateLeader => (
                    Fault::IsolateLeader(rng.between(0, 64) as usize),
                    rng.between(2_000, 8_000),
                ),
                Kind::Bridge => {
                    let mut shuffled: Vec<usize> = (0..hosts).collect();
                    for i in (1..shuffled.len()).rev() {
                        shuffled.swap(i, rng.between(0, i as u64 + 1) as usize);
                    }
                    // The first host is the bridge; the others split in two halves.
                    let rest = &shuffled[1..];
                    let (left, right) = rest.split_at(rest.len() / 2);
                    let fault = Fault::Bridge {
                        left: sorted(left),
                        right: sorted(right),
                    };
                    (fault, rng.between(2_000, 8_000))
                }
                Kind::CrashPoint => (
                    Fault::CrashPoint {
                        host: rng.between(0, hosts as u64) as usize,
                        point: CRASH_POINTS[rng.between(0, CRASH_POINTS.len() as u64) as usize]
                            .to_string(),
                        percent: rng.between(1, 10) as u32,
                    },
                    rng.between(2_000, 8_000),
                ),
                Kind::DiskFull => (
                    Fault::DiskFull(rng.between(0, hosts as u64) as usize),
                    rng.between(2_000, 8_000),
                ),
                Kind::Clock => {
                    let host = rng.between(0, hosts as u64) as usize;
                    let offset_s = rng.between(60, 3 * 86_400) as i64;
                    let behind = rng.between(0, 2) == 0;
                    let fault = Fault::Clock {
                        host,
                        offset_s: if behind { -offset_s } else { offset_s },
                        rate_pct: rng.between(25, 400) as u32,
                    };
                    (fault, rng.between(3_000, 10_000))
                }
                Kind::Lossy => (
                    Fault::Lossy {
                        host: rng.between(0, hosts as u64) as usize,
                        loss_pct: rng.between(1, 30) as u32,
                        rate_kbit: rng.between(500, 20_000) as u32,
                    },
                    rng.between(2_000, 8_000),
                ),
                Kind::Reorder => (
                    Fault::Reorder {
                        host: rng.between(0, hosts as u64) as usize,
                        share_pct: rng.between(5, 40) as u32,
                        slow_kbit: rng.between(300, 3_000) as u32,
                    },
                    rng.between(2_000, 8_000),
                ),
                Kind::Split => {
                    let register = rng.between(0, 1_000);
                    let crash = rng.crash(&SPLIT_POINTS);
                    (Fault::Split { register, crash }, rng.between(1_000, 6_000))
                }
                Kind::Merge => {
                    let range = rng.between(0, 64) as usize;
                    let crash = rng.crash(&MERGE_POINTS);
                    (Fault::Merge { range, crash }, rng.between(1_000, 6_000))
                }
                Kind::Move => {
                    let range = rng.between(0, 64) as usize;
                    let pick = rng.between(0, 64) as usize;
                    let crash = rng.crash(&MOVE_POINTS);
                    let fault = Fault::Move { range, pick, crash };
                    (fault, rng.between(1_000, 6_000))
                }
            };
            Step {
                gap_ms: rng.between(500, 3_000),
                fault,
                hold_ms,
            }
        })
        .collect()
}

fn sorted(hosts: &[usize]) -> Vec<usize> {
    let mut hosts = hosts.to_vec();
    hosts.sort_unstable();
    hosts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_the_same_schedule() {
        let a = schedule(7, &Kind::ALL, 5, 30_000, 50);
        assert_eq!(a, schedule(7, &Kind::ALL, 5, 30_000, 50));
        assert_ne!(a, schedule(8, &Kind::ALL, 5, 30_000, 50));
    }

    #[test]
    fn faults_keep_a_majority_unless_asked_for_everything() {
        for seed in 0..200 {
            for step in schedule(seed, &Kind::ALL, 5, 4_000, 20) {
                match step.fault {
                    Fault::Kill(hosts) => assert!(hosts.len() <= 2 || hosts.len() == 5),
                    Fault::Partition(side) => assert!(!side.is_empty() && side.len() <= 2),
                    Fault::Bridge { left, right } => {
                        assert_eq!(left.len() + right.len(), 4);
                        assert!(left.iter().all(|h| !right.contains(h)));
                    }
                    Fault::Down(h) => {
                        assert!(h < 5);
                        assert!(step.hold_ms > 4_000, "a down node is held past down_after");
                    }
                    Fault::Pause(h)
                    | Fault::DiskFull(h)
                    | Fault::Lossy { host: h, .. }
                    | Fault::Reorder { host: h, .. }
                    | Fault::Clock { host: h, .. }
                    | Fault::CrashPoint { host: h, .. } => assert!(h < 5),
                    Fault::IsolateLeader(_)
                    | Fault::Split { .. }
                    | Fault::Merge { .. }
                    | Fault::Move { .. } => {}
                }
            }
        }
    }

    #[test]
    fn only_the_kinds_asked_for_are_scheduled() {
        for step in schedule(3, &[Kind::Pause], 3, 30_000, 30) {
            assert!(matches!(step.fault, Fault::Pause(_)));
        }
        assert!(schedule(3, &[], 3, 30_000, 30).is_empty());
        assert_eq!("kill-all".parse::<Kind>(), Ok(Kind::KillAll));
        assert!("flood".parse::<Kind>().is_err());
    }
}
