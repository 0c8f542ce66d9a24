//! The register workload: clients read, write and compare-and-swap a few keys (spread over
//! the ranges) and record every operation, with its outcome or the fact that it is unknown,
//! in a [`History`]. Written values are unique, so a read names the write it saw.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use concord_client::api::{Compare, CompareOp, CompareTarget, Consistency, KeySpan, PutRequest};
use concord_client::api::{RangeRequest, TxnOp, TxnRequest};
use concord_client::Client;

use crate::history::{Call, Op, Outcome, Value};
use crate::nemesis::Rng;

/// The operations recorded so far, timed from one epoch.
pub struct History {
    epoch: Instant,
    ops: Mutex<Vec<Op>>,
}

impl History {
    /// An empty history whose clock starts now.
    pub fn new() -> History {
        History {
            epoch: Instant::now(),
            ops: Mutex::new(Vec::new()),
        }
    }

    /// Nanoseconds since the epoch.
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn record(&self, op: Op) {
        self.ops.lock().expect("history lock").push(op);
    }

    /// The operations recorded, in the order they returned.
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().expect("history lock").clone()
    }
}

impl Default for History {
    fn default() -> Self {
        History::new()
    }
}

/// The key of register `k`: its first byte spreads the registers over the ranges.
pub fn key_of(k: u64) -> Vec<u8> {
    const FIRST: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut key = vec![FIRST[(k.wrapping_mul(17) % FIRST.len() as u64) as usize]];
    key.extend(format!("/faults/register/{k:04}").into_bytes());
    key
}

/// The register whose key is `key` (the inverse of [`key_of`]); none for another key.
pub fn register_of(key: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(key.get(1..)?).ok()?;
    text.strip_prefix("/faults/register/")?.parse().ok()
}

/// The number a value holds (the workload writes decimal numbers).
pub fn value_of(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// One read of register `k` at `consistency`, recorded; the value read, if it answered.
pub async fn read(
    client: &Client,
    id: u32,
    k: u64,
    consistency: Consistency,
    history: &History,
) -> Option<Value> {
    let invoked_ns = history.now_ns();
    let request = RangeRequest::new(KeySpan::key(key_of(k)));
    let value = match client.range(request, consistency).await {
        Ok(r) => r
            .kvs
            .first()
            .map(|kv| value_of(&kv.value).unwrap_or(u64::MAX)),
        // A read without an answer saw nothing and changed nothing: not recorded.
        Err(_) => return None,
    };
    history.record(Op {
        client: id,
        key: k,
        call: Call::Read,
        outcome: Outcome::Read(value),
        invoked_ns,
        returned_ns: history.now_ns(),
    });
    Some(value)
}

/// What the clients do.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    /// Registers.
    pub keys: u64,
    /// Seeds the clients' choices.
    pub seed: u64,
    /// The consistency of their reads (anything but linearizable should fail the check
    /// under faults: a way to see that the checker catches stale reads).
    pub reads: Consistency,
}

/// Runs client `id` until `stop`: each operation on a register picked at random among
/// `mix.keys`; 40 % reads, 40 % writes, 20 % compare-and-swaps from the value it last read.
pub async fn client_loop(
    client: Client,
    id: u32,
    mix: Mix,
    stop: Arc<AtomicBool>,
    history: Arc<History>,
) {
    let Mix { keys, seed, reads } = mix;
    let mut rng = Rng::new(seed ^ (u64::from(id) << 40));
    let mut last_read: Vec<Option<u64>> = vec![None; keys as usize];
    let mut written = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let k = rng.between(0, keys);
        let dice = rng.between(0, 10);
        if dice < 4 {
            if let Some(value) = read(&client, id, k, reads, &history).await {
                last_read[k as usize] = value;
            }
            continue;
        }
        written += 1;
        // Unique across clients and runs of this history.
        let new = (u64::from(id) << 32) | written;
        let invoked_ns = history.now_ns();
        let (call, outcome) = match last_read[k as usize] {
            Some(expected) if dice >= 8 => {
                let txn = TxnRequest {
                    compares: vec![Compare {
                        key: key_of(k),
                        op: CompareOp::Equal,
                        target: CompareTarget::Value(expected.to_string().into_bytes()),
                    }],
                    success: vec![TxnOp::Put(put(k, new))],
                    failure: vec![],
                    fence: None,
                };
                let outcome = match client.txn(txn).await {
                    Ok(r) => Outcome::Cas(r.succeeded),
                    Err(e) if refused(&e) => continue,
                    Err(_) => Outcome::Unknown,
                };
                (Call::Cas { expected, new }, outcome)
            }
            _ => {
                let outcome = match client.put_with(put(k, new)).await {
                    Ok(_) => Outcome::Written,
                    Err(e) if refused(&e) => continue,
                    Err(_) => Outcome::Unknown,
                };
                (Call::Write(new), outcome)
            }
        };
        history.record(Op {
            client: id,
            key: k,
            call,
            outcome,
            invoked_ns,
            returned_ns: history.now_ns(),
        });
    }
}

/// Whether a write certainly did not take effect. The client retries a write only after a
/// refusal made before the write was appended (`NOT_LEADER`, `UNAVAILABLE`, a stale route) or
/// when it could not reach the node at all, and gives up with `Exhausted` when every attempt
/// ended so: such a write is left out of the history as never having happened. If it did
/// happen after all, its unique value shows up in a later read and the checker reports it.
/// Any other error (a timeout, `INDETERMINATE`, a lost connection) leaves it unknown.
fn refused(e: &concord_client::Error) -> bool {
    matches!(e, concord_client::Error::Exhausted { .. })
}

fn put(k: u64, value: u64) -> PutRequest {
    PutRequest {
        key: key_of(k),
        value: value.to_string().into_bytes(),
        lease: 0,
        prev_kv: false,
    }
}
