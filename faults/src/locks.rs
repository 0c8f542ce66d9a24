//! Mutual exclusion under faults: lock clients increment a shared counter under one lock
//! with fenced writes, some of them stalling past their session's TTL before writing (as a
//! paused process would), and the fenced writes that were acknowledged are checked.
//!
//! **Property** (fenced writes from concurrent holders never interleave; no write is
//! accepted with a stale token): each holder reads the counter, then writes the value read
//! + 1 through its guard. So
//! 1. no two acknowledged fenced writes wrote the same value (two holders at once both
//!    incremented the same read);
//! 2. ordered by the value written, the acknowledged writes' fencing tokens never go down (an
//!    older holder's write landing after a newer holder's);
//! 3. the counter read after the faults are healed is at least the largest value an
//!    acknowledged write wrote, and is a value some write (acknowledged or of unknown
//!    outcome) wrote, or absent if none did.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use concord_client::api::{Consistency, KeySpan, RangeRequest};
use concord_client::Client;
use serde::{Deserialize, Serialize};

use crate::nemesis::Rng;
use crate::workload::value_of;

/// The lock's name.
pub const LOCK: &str = "faults/lock";

/// The counter's key (first byte chosen to land in another range than the lock's keys).
pub const COUNTER: &[u8] = b"t/faults/counter";

/// The TTL of a lock client's session.
pub const SESSION_TTL: Duration = Duration::from_secs(2);

/// One in this many holders stalls past its session's TTL before its fenced write.
const STALL_ONE_IN: u64 = 6;

/// Longest a lock client waits for the lock before starting over.
const LOCK_WAIT_MAX: Duration = Duration::from_secs(10);

/// Pause after an error, so that errors do not spin.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// How a fenced write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fenced {
    /// Acknowledged.
    Acked,
    /// Refused: the guard no longer held the lock.
    Refused,
    /// No answer that says.
    Unknown,
}

/// A fenced write of the counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// The lock client.
    pub client: u32,
    /// The holder's fencing token.
    pub token: u64,
    /// The value written (the value read + 1).
    pub value: u64,
    /// Whether the holder stalled past its TTL before writing.
    pub stalled: bool,
    /// How it ended.
    pub outcome: Fenced,
}

/// A broken property.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Violation {
    /// Two acknowledged writes of the same value.
    Interleaved {
        /// The value.
        value: u64,
        /// The two tokens.
        tokens: (u64, u64),
    },
    /// A write acknowledged with a token older than that of a write of a lower value.
    StaleToken {
        /// The value written with the older token.
        value: u64,
        /// Its token.
        token: u64,
        /// The newer token of a write of a lower value.
        newer_before: u64,
    },
    /// The final counter contradicts the writes.
    FinalCounter {
        /// What was read.
        read: Option<u64>,
        /// The largest acknowledged value.
        largest_acked: Option<u64>,
    },
}

/// Checks the attempts against the counter read after healing.
pub fn check(attempts: &[Attempt], final_counter: Option<u64>) -> Vec<Violation> {
    let mut violations = Vec::new();
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    for a in attempts.iter().filter(|a| a.outcome == Fenced::Acked) {
        if let Some(&other) = acked.get(&a.value) {
            violations.push(Violation::Interleaved {
                value: a.value,
                tokens: (other, a.token),
            });
        } else {
            acked.insert(a.value, a.token);
        }
    }
    let mut newest = 0;
    for (&value, &token) in &acked {
        if token < newest {
            violations.push(Violation::StaleToken {
                value,
                token,
                newer_before: newest,
            });
        }
        newest = newest.max(token);
    }
    let largest_acked = acked.keys().next_back().copied();
    let written: HashSet<u64> = attempts
        .iter()
        .filter(|a| a.outcome != Fenced::Refused)
        .map(|a| a.value)
        .collect();
    let explained = match final_counter {
        // Absent with only writes of unknown outcome: none of them happened.
        None => largest_acked.is_none(),
        Some(v) => written.contains(&v) && largest_acked.is_none_or(|l| v >= l),
    };
    if !explained {
        violations.push(Violation::FinalCounter {
            read: final_counter,
            largest_acked,
        });
    }
    violations
}

/// Reads the counter (linearizable); none if absent, an error if the read failed.
pub async fn read_counter(client: &Client) -> Result<Option<u64>, concord_client::Error> {
    let r = client
        .range(
            RangeRequest::new(KeySpan::key(COUNTER.to_vec())),
            Consistency::Linearizable,
        )
        .await?;
    Ok(r.kvs
        .first()
        .map(|kv| value_of(&kv.value).unwrap_or(u64::MAX)))
}

/// Runs lock client `id` until `stop`, recording its fenced writes and counting its
/// acquisitions.
pub async fn client_loop(
    client: Client,
    id: u32,
    seed: u64,
    stop: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
) {
    let mut rng = Rng::new(seed ^ 0x10C4 ^ (u64::from(id) << 40));
    while !stop.load(Ordering::Relaxed) {
        let session = match client.session(SESSION_TTL).await {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        };
        let guard = match tokio::time::timeout(LOCK_WAIT_MAX, client.lock(LOCK, &session)).await {
            Ok(Ok(guard)) => guard,
            _ => {
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        };
        let Ok(read) = read_counter(&client).await else {
            let _ = guard.unlock().await;
            continue;
        };
        let value = read.unwrap_or(0) + 1;
        let stalled = rng.between(0, STALL_ONE_IN) == 0;
        let session = if stalled {
            // As a process paused past its lease: no renewals, then the write.
            session.abandon();
            tokio::time::sleep(SESSION_TTL * 2).await;
            None
        } else {
            Some(session)
        };
        let outcome = match guard.put(COUNTER.to_vec(), value.to_string()).await {
            Ok(_) => Fenced::Acked,
            Err(e) if e.code() == "FENCED" => Fenced::Refused,
            Err(_) => Fenced::Unknown,
        };
        attempts.lock().expect("attempts lock").push(Attempt {
            client: id,
            token: guard.token(),
            value,
            stalled,
            outcome,
        });
        let _ = guard.unlock().await;
        if let Some(session) = session {
            let _ = session.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(token: u64, value: u64, outcome: Fenced) -> Attempt {
        Attempt {
            client: 0,
            token,
            value,
            stalled: false,
            outcome,
        }
    }

    #[test]
    fn holders_in_turn_pass() {
        let attempts = [
            attempt(10, 1, Fenced::Acked),
            attempt(12, 2, Fenced::Acked),
            attempt(11, 2, Fenced::Refused),
            attempt(15, 3, Fenced::Unknown),
        ];
        assert_eq!(check(&attempts, Some(3)), vec![]);
        assert_eq!(check(&attempts, Some(2)), vec![]);
        assert_eq!(check(&[], None), vec![]);
        assert_eq!(check(&[attempt(3, 1, Fenced::Unknown)], None), vec![]);
    }

    #[test]
    fn two_holders_writing_the_same_increment_are_caught() {
        let attempts = [attempt(10, 1, Fenced::Acked), attempt(12, 1, Fenced::Acked)];
        assert_eq!(
            check(&attempts, Some(1)),
            vec![Violation::Interleaved {
                value: 1,
                tokens: (10, 12)
            }]
        );
    }

    #[test]
    fn a_stale_token_landing_late_is_caught() {
        let attempts = [attempt(12, 1, Fenced::Acked), attempt(10, 2, Fenced::Acked)];
        assert_eq!(
            check(&attempts, Some(2)),
            vec![Violation::StaleToken {
                value: 2,
                token: 10,
                newer_before: 12
            }]
        );
    }

    #[test]
    fn a_lost_or_invented_counter_is_caught() {
        let attempts = [attempt(10, 1, Fenced::Acked), attempt(12, 2, Fenced::Acked)];
        let lost = Violation::FinalCounter {
            read: Some(1),
            largest_acked: Some(2),
        };
        assert_eq!(check(&attempts, Some(1)), vec![lost]);
        let invented = Violation::FinalCounter {
            read: Some(7),
            largest_acked: Some(2),
        };
        assert_eq!(check(&attempts, Some(7)), vec![invented]);
        let gone = Violation::FinalCounter {
            read: None,
            largest_acked: Some(2),
        };
        assert_eq!(check(&attempts, None), vec![gone]);
    }
}
