//! A recorded history of operations on registers (one register per key), as the clients saw
//! them: when each operation was invoked and when it returned (nanoseconds since the run's
//! start), what it asked and what came back, or that its outcome is unknown.

use serde::{Deserialize, Serialize};

/// A register's value: the workload writes unique numbers; `None` is an absent key.
pub type Value = Option<u64>;

/// What an operation asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Call {
    /// Read the register.
    Read,
    /// Write `value`.
    Write(u64),
    /// Write `new` if the register holds `expected`.
    Cas {
        /// The value the register must hold.
        expected: u64,
        /// The value written if it does.
        new: u64,
    },
}

/// What came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// A read returned this value.
    Read(Value),
    /// A write was acknowledged.
    Written,
    /// A compare-and-swap answered: swapped or not.
    Cas(bool),
    /// No answer, or one that does not say (a timeout, a lost connection, `INDETERMINATE`):
    /// the operation may or may not have taken effect, at any time after its invocation.
    Unknown,
}

/// One operation of one client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// The client that issued it (a client has one operation in flight at a time).
    pub client: u32,
    /// The register.
    pub key: u64,
    /// What it asked.
    pub call: Call,
    /// What came back.
    pub outcome: Outcome,
    /// When it was invoked.
    pub invoked_ns: u64,
    /// When it returned (for an unknown outcome: when the client gave up on it).
    pub returned_ns: u64,
}

impl Op {
    /// Whether the operation may have changed the register without anyone knowing.
    pub fn is_unknown(&self) -> bool {
        self.outcome == Outcome::Unknown
    }
}
