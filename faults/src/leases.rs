//! Leases under faults: lease clients grant short leases, attach a key to each, renew some a
//! few times, then let them go or revoke them; the watch of every key records when each
//! lease key is deleted, and the client that let a lease go reads its key (linearizable)
//! until it is gone, which brackets the deletion: after the last read that saw the key was
//! invoked, before the first that did not returned.
//!
//! **Properties:**
//! 1. *no live lease's key disappears*: a lease key's deletion is seen (by the watch or a
//!    read) no sooner than the send time of its lease's last acknowledged grant or renewal
//!    plus the TTL, unless the lease was revoked before (a renewal acknowledged means the
//!    lease lives at least a TTL from when it was sent; a leader change in between must not
//!    shorten that);
//! 2. *no dead lease's key stays*: the key of every lease let go or revoked whose put was
//!    acknowledged is deleted by the end of the run (after the faults are healed, within a
//!    TTL and a drain);
//! 3. *expiries are not late*: no read sees a let-go lease's key later than [`LATE_BOUND`]
//!    after the answer to its last grant or renewal plus the TTL, not counting the time
//!    faults were in force in between, each with [`FAULT_RECOVERY`] after it (a range
//!    without a quorum expires nothing, and a new leader's first tick counts no time).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use concord_client::{Client, Error};
use serde::{Deserialize, Serialize};

use crate::nemesis::Rng;
use crate::workload::History;

/// The TTL of every lease.
pub const LEASE_TTL: Duration = Duration::from_secs(3);

/// Most renewals of one lease before it is let go or revoked.
const RENEWALS_MAX: u64 = 4;

/// One in this many leases is revoked rather than let go.
const REVOKE_ONE_IN: u64 = 3;

/// How late an expiry may be seen, beyond the TTL from the last answer about the lease, when
/// no fault is in the way: the grant's one tick of margin, the tick that expires it, the
/// revocation in every range, and the watch that sees it.
pub const LATE_BOUND: Duration = Duration::from_secs(2);

/// How long after a fault is healed an expiry may still be held up by it (an election, a
/// restarted node catching up, the watch reconnecting).
pub const FAULT_RECOVERY: Duration = Duration::from_secs(5);

/// How often a let-go lease's key is read until it is gone.
const POLL_EVERY: Duration = Duration::from_millis(200);

/// Longest a let-go lease's key is read for, past its TTL.
const POLL_MAX: Duration = Duration::from_secs(60);

/// Pause after an error, so that errors do not spin.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// The key of lease client `client`'s `n`-th lease.
pub fn key_of(client: u32, n: u64) -> Vec<u8> {
    format!("l/faults/lease/{client:02}/{n:06}").into_bytes()
}

/// Whether `key` is a lease key of this workload.
pub fn is_lease_key(key: &[u8]) -> bool {
    key.starts_with(b"l/faults/lease/")
}

/// One lease of a lease client, as it saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The key attached to it.
    pub key: String,
    /// Its TTL, in milliseconds.
    pub ttl_ms: u64,
    /// When its last acknowledged grant or renewal was sent (history clock, ns).
    pub renewed_sent_ns: u64,
    /// When the answer to its last grant or renewal attempt (acknowledged or not) came back:
    /// no later keepalive was sent.
    pub released_ns: u64,
    /// Whether the put of its key was acknowledged.
    pub attached: bool,
    /// When its revoke was sent, if it was revoked.
    pub revoked_sent_ns: Option<u64>,
    /// Let go: when the last read that still saw its key was invoked.
    pub last_seen_ns: Option<u64>,
    /// Let go: when the first read that no longer saw its key returned.
    pub gone_ns: Option<u64>,
}

/// A broken property.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Violation {
    /// A key deleted before its lease could have expired.
    EarlyExpiry {
        /// The key.
        key: String,
        /// When its deletion was seen.
        deleted_ns: u64,
        /// The earliest its lease could expire.
        deadline_ns: u64,
    },
    /// A dead lease's key never deleted.
    NotExpired {
        /// The key.
        key: String,
    },
    /// A let-go lease's key still there later than its TTL and [`LATE_BOUND`] allow, faults
    /// discounted.
    LateExpiry {
        /// The key.
        key: String,
        /// When a read that still saw it was invoked.
        seen_ns: u64,
        /// Its last answer plus the TTL.
        deadline_ns: u64,
        /// The lateness allowed: the bound plus the time faults held it up.
        allowed_ns: u64,
    },
}

/// How late the let-go leases' keys were gone (the first read that missed them), past their
/// last answer plus the TTL: an upper bound on the lateness of each expiry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Lateness {
    /// Leases measured.
    pub count: usize,
    /// Median, in milliseconds (negative: before the deadline from the last answer).
    pub p50_ms: i64,
    /// 99th percentile, in milliseconds.
    pub p99_ms: i64,
    /// The latest, in milliseconds.
    pub max_ms: i64,
}

/// How much of `[from, to]` faults held up: each fault from its start to [`FAULT_RECOVERY`]
/// after it was healed, overlaps merged.
fn fault_time_within(faults: &[(u64, u64)], from: u64, to: u64) -> u64 {
    let recovery = FAULT_RECOVERY.as_nanos() as u64;
    let mut spans: Vec<(u64, u64)> = faults
        .iter()
        .map(|&(start, healed)| (start.max(from), (healed + recovery).min(to)))
        .filter(|(a, b)| a < b)
        .collect();
    spans.sort_unstable();
    let (mut total, mut reached) = (0, from);
    for (a, b) in spans {
        let a = a.max(reached);
        if b > a {
            total += b - a;
            reached = b;
        }
    }
    total
}

/// Checks the leases against the deletions seen (key → when first seen deleted) and the
/// faults applied (start, healed), all on the history clock; measures how late expiries were.
pub fn check(
    leases: &[LeaseRecord],
    deletions: &HashMap<String, u64>,
    faults: &[(u64, u64)],
) -> (Vec<Violation>, Lateness) {
    let mut violations = Vec::new();
    let mut late_ms = Vec::new();
    for lease in leases {
        let ttl_ns = lease.ttl_ms * 1_000_000;
        // The deletion is known to have happened by then (the watch sees it after it
        // happened, a read that misses the key returns after it).
        let deleted_by = [deletions.get(&lease.key).copied(), lease.gone_ns]
            .into_iter()
            .flatten()
            .min();
        let Some(deleted_ns) = deleted_by else {
            if lease.attached {
                violations.push(Violation::NotExpired {
                    key: lease.key.clone(),
                });
            }
            continue;
        };
        let revoked_before = lease.revoked_sent_ns.is_some_and(|r| r <= deleted_ns);
        let deadline_ns = lease.renewed_sent_ns + ttl_ns;
        if !revoked_before && deleted_ns < deadline_ns {
            violations.push(Violation::EarlyExpiry {
                key: lease.key.clone(),
                deleted_ns,
                deadline_ns,
            });
        }
        if lease.revoked_sent_ns.is_some() {
            continue;
        }
        let deadline_ns = lease.released_ns + ttl_ns;
        if let Some(gone_ns) = lease.gone_ns {
            late_ms.push((gone_ns as i64 - deadline_ns as i64) / 1_000_000);
        }
        // Still there when a read was invoked: the deletion was at least that late.
        if let Some(last_seen_ns) = lease.last_seen_ns {
            let held_up = fault_time_within(faults, deadline_ns, last_seen_ns);
            let allowed_ns = LATE_BOUND.as_nanos() as u64 + held_up;
            if last_seen_ns > deadline_ns + allowed_ns {
                violations.push(Violation::LateExpiry {
                    key: lease.key.clone(),
                    seen_ns: last_seen_ns,
                    deadline_ns,
                    allowed_ns,
                });
            }
        }
    }
    late_ms.sort_unstable();
    let at = |q: f64| late_ms[((late_ms.len() - 1) as f64 * q).round() as usize];
    let lateness = if late_ms.is_empty() {
        Lateness::default()
    } else {
        Lateness {
            count: late_ms.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    };
    (violations, lateness)
}

/// Runs lease client `id` until `stop`, recording every lease it granted.
pub async fn client_loop(
    client: Client,
    id: u32,
    seed: u64,
    stop: Arc<AtomicBool>,
    history: Arc<History>,
    leases: Arc<Mutex<Vec<LeaseRecord>>>,
) {
    let mut rng = Rng::new(seed ^ 0x1EA5E ^ (u64::from(id) << 40));
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let granted_sent_ns = history.now_ns();
        let Ok(lease) = client.lease_grant(LEASE_TTL).await else {
            tokio::time::sleep(RETRY_PAUSE).await;
            continue;
        };
        let granted_ns = history.now_ns();
        let key = key_of(id, n);
        let attached = client
            .put_leased(key.clone(), "leased", lease)
            .await
            .is_ok();
        let mut record = LeaseRecord {
            key: String::from_utf8_lossy(&key).into_owned(),
            ttl_ms: LEASE_TTL.as_millis() as u64,
            renewed_sent_ns: granted_sent_ns,
            released_ns: granted_ns,
            attached,
            revoked_sent_ns: None,
            last_seen_ns: None,
            gone_ns: None,
        };
        for _ in 0..rng.between(0, RENEWALS_MAX + 1) {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            tokio::time::sleep(LEASE_TTL / 3).await;
            let sent_ns = history.now_ns();
            let renewed = client.lease_keep_alive_once(lease).await;
            record.released_ns = history.now_ns();
            match renewed {
                Ok(ttl_ms) if ttl_ms > 0 => record.renewed_sent_ns = sent_ns,
                // Gone, or no answer: the lease may be lost; let it go.
                Ok(_) | Err(_) => break,
            }
        }
        if rng.between(0, REVOKE_ONE_IN) == 0 {
            record.revoked_sent_ns = Some(history.now_ns());
            if let Err(e) = client.lease_revoke(lease).await {
                // A revoke that was never delivered leaves a lease that will expire.
                if matches!(e, Error::Exhausted { .. }) {
                    record.revoked_sent_ns = None;
                }
            }
        } else if attached {
            read_until_gone(&client, &key, &mut record, &history).await;
        }
        leases.lock().expect("leases lock").push(record);
    }
}

/// Reads a let-go lease's `key` until it is gone (bounded by [`POLL_MAX`] past the TTL),
/// recording the last read that saw it and the first that did not.
async fn read_until_gone(client: &Client, key: &[u8], record: &mut LeaseRecord, history: &History) {
    let until = tokio::time::Instant::now() + LEASE_TTL + POLL_MAX;
    while tokio::time::Instant::now() < until {
        let invoked_ns = history.now_ns();
        match client.get(key.to_vec()).await {
            Ok(r) if r.kvs.is_empty() => {
                record.gone_ns = Some(history.now_ns());
                return;
            }
            Ok(_) => record.last_seen_ns = Some(invoked_ns),
            // No answer says nothing.
            Err(_) => {}
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn lease(key: &str, renewed_ms: u64, revoked_ms: Option<u64>, attached: bool) -> LeaseRecord {
        LeaseRecord {
            key: key.into(),
            ttl_ms: 3000,
            renewed_sent_ns: renewed_ms * MS,
            released_ns: (renewed_ms + 10) * MS,
            attached,
            revoked_sent_ns: revoked_ms.map(|r| r * MS),
            last_seen_ns: None,
            gone_ns: None,
        }
    }

    fn deleted(at: &[(&str, u64)]) -> HashMap<String, u64> {
        at.iter().map(|(k, ms)| (k.to_string(), ms * MS)).collect()
    }

    /// `lease` let go, its key last read at `seen_ms`, first missed by a read returning at
    /// `gone_ms`.
    fn polled(mut lease: LeaseRecord, seen_ms: Option<u64>, gone_ms: Option<u64>) -> LeaseRecord {
        lease.last_seen_ns = seen_ms.map(|t| t * MS);
        lease.gone_ns = gone_ms.map(|t| t * MS);
        lease
    }

    #[test]
    fn expiries_after_the_ttl_and_revokes_pass() {
        let leases = [
            polled(lease("a", 1000, None, true), Some(4000), Some(4200)),
            lease("b", 1000, Some(1500), true),
            lease("c", 1000, None, false),
        ];
        let (found, lateness) = check(&leases, &deleted(&[("a", 4300), ("b", 1600)]), &[]);
        assert_eq!(found, vec![]);
        // Only let-go leases count towards lateness: "a", gone 190 ms past 1010 + 3000.
        assert_eq!(
            lateness,
            Lateness {
                count: 1,
                p50_ms: 190,
                p99_ms: 190,
                max_ms: 190
            }
        );
    }

    #[test]
    fn a_late_expiry_is_caught_unless_faults_held_it_up() {
        let late = |seen_ms| [polled(lease("a", 1000, None, true), Some(seen_ms), None)];
        // Deadline 4010 ms + 2 s bound: a key still read at 6100 is too late without faults.
        let (found, _) = check(&late(6100), &deleted(&[("a", 6300)]), &[]);
        assert!(
            matches!(found[..], [Violation::LateExpiry { .. }]),
            "{found:?}"
        );
        // A fault from 3 s to 3.5 s held it up until 3.5 + 5 s, 4.49 s past the deadline.
        let fault = [(3000 * MS, 3500 * MS)];
        assert_eq!(
            check(&late(6100), &deleted(&[("a", 6300)]), &fault).0,
            vec![]
        );
        assert_eq!(
            check(&late(10_400), &deleted(&[("a", 10_600)]), &fault).0,
            vec![]
        );
        let (found, _) = check(&late(10_600), &deleted(&[("a", 10_800)]), &fault);
        assert!(
            matches!(found[..], [Violation::LateExpiry { .. }]),
            "{found:?}"
        );
        // A watch that saw the deletion late says nothing of lateness.
        assert_eq!(
            check(&late(4000), &deleted(&[("a", 20_000)]), &[]).0,
            vec![]
        );
    }

    #[test]
    fn overlapping_faults_count_once() {
        let faults = [(0, 2 * MS), (MS, 3 * MS), (20 * MS, 21 * MS)];
        let recovery = FAULT_RECOVERY.as_nanos() as u64;
        assert_eq!(fault_time_within(&faults, 0, 10 * MS), 10 * MS);
        assert_eq!(
            fault_time_within(&faults, 0, 30 * MS + recovery),
            // The first two merged, then the third from where they end.
            3 * MS + recovery + 18 * MS
        );
    }

    #[test]
    fn a_key_gone_before_its_lease_could_expire_is_caught() {
        let leases = [
            lease("a", 1000, None, true),
            lease("b", 1000, Some(2000), true),
            // A read missed the key before its deadline, though the watch saw it later.
            polled(lease("c", 1000, None, true), None, Some(3950)),
        ];
        let deletions = deleted(&[("a", 3900), ("b", 1900), ("c", 4500)]);
        let (found, _) = check(&leases, &deletions, &[]);
        assert_eq!(
            found,
            vec![
                Violation::EarlyExpiry {
                    key: "a".into(),
                    deleted_ns: 3900 * MS,
                    deadline_ns: 4000 * MS
                },
                Violation::EarlyExpiry {
                    key: "b".into(),
                    deleted_ns: 1900 * MS,
                    deadline_ns: 4000 * MS
                },
                Violation::EarlyExpiry {
                    key: "c".into(),
                    deleted_ns: 3950 * MS,
                    deadline_ns: 4000 * MS
                }
            ]
        );
    }

    #[test]
    fn a_dead_lease_key_that_stays_is_caught() {
        let leases = [lease("a", 1000, None, true)];
        assert_eq!(
            check(&leases, &HashMap::new(), &[]).0,
            vec![Violation::NotExpired { key: "a".into() }]
        );
    }
}
