//! Leases under faults: lease clients grant short leases, attach a key to each, renew some a
//! few times, then let them go or revoke them; the watch of every key records when each
//! lease key is deleted.
//!
//! **Properties:**
//! 1. *no live lease's key disappears*: a lease key's deletion is seen no sooner than the
//!    send time of its lease's last acknowledged grant or renewal plus the TTL, unless the
//!    lease was revoked before (a renewal acknowledged means the lease lives at least a TTL
//!    from when it was sent; a leader change in between must not shorten that);
//! 2. *no dead lease's key stays*: the key of every lease let go or revoked whose put was
//!    acknowledged is deleted by the end of the run (after the faults are healed, within a
//!    TTL and a drain).

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
    /// Whether the put of its key was acknowledged.
    pub attached: bool,
    /// When its revoke was sent, if it was revoked.
    pub revoked_sent_ns: Option<u64>,
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
}

/// Checks the leases against the deletions seen (key → when first seen deleted).
pub fn check(leases: &[LeaseRecord], deletions: &HashMap<String, u64>) -> Vec<Violation> {
    let mut violations = Vec::new();
    for lease in leases {
        match deletions.get(&lease.key) {
            Some(&deleted_ns) => {
                let revoked_before = lease.revoked_sent_ns.is_some_and(|r| r <= deleted_ns);
                let deadline_ns = lease.renewed_sent_ns + lease.ttl_ms * 1_000_000;
                if !revoked_before && deleted_ns < deadline_ns {
                    violations.push(Violation::EarlyExpiry {
                        key: lease.key.clone(),
                        deleted_ns,
                        deadline_ns,
                    });
                }
            }
            None if lease.attached => violations.push(Violation::NotExpired {
                key: lease.key.clone(),
            }),
            None => {}
        }
    }
    violations
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
        let key = key_of(id, n);
        let attached = client
            .put_leased(key.clone(), "leased", lease)
            .await
            .is_ok();
        let mut record = LeaseRecord {
            key: String::from_utf8_lossy(&key).into_owned(),
            ttl_ms: LEASE_TTL.as_millis() as u64,
            renewed_sent_ns: granted_sent_ns,
            attached,
            revoked_sent_ns: None,
        };
        for _ in 0..rng.between(0, RENEWALS_MAX + 1) {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            tokio::time::sleep(LEASE_TTL / 3).await;
            let sent_ns = history.now_ns();
            match client.lease_keep_alive_once(lease).await {
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
        }
        leases.lock().expect("leases lock").push(record);
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
            attached,
            revoked_sent_ns: revoked_ms.map(|r| r * MS),
        }
    }

    fn deleted(at: &[(&str, u64)]) -> HashMap<String, u64> {
        at.iter().map(|(k, ms)| (k.to_string(), ms * MS)).collect()
    }

    #[test]
    fn expiries_after_the_ttl_and_revokes_pass() {
        let leases = [
            lease("a", 1000, None, true),
            lease("b", 1000, Some(1500), true),
            lease("c", 1000, None, false),
        ];
        assert_eq!(
            check(&leases, &deleted(&[("a", 4200), ("b", 1600)])),
            vec![]
        );
    }

    #[test]
    fn a_key_gone_before_its_lease_could_expire_is_caught() {
        let leases = [
            lease("a", 1000, None, true),
            lease("b", 1000, Some(2000), true),
        ];
        let found = check(&leases, &deleted(&[("a", 3900), ("b", 1900)]));
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
                }
            ]
        );
    }

    #[test]
    fn a_dead_lease_key_that_stays_is_caught() {
        let leases = [lease("a", 1000, None, true)];
        assert_eq!(
            check(&leases, &HashMap::new()),
            vec![Violation::NotExpired { key: "a".into() }]
        );
    }
}
