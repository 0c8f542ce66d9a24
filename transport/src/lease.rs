//! The lease part of the client protocol.
//!
//! A lease is owned by one range: the range holding the lease's *anchor key*
//! ([`lease_anchor`]), a routing key derived from the lease id (it is never stored). Grant,
//! revoke, keepalive and time-to-live go to the owner's leader; keys attached to the lease may
//! live in any range, and every range answers `List` and `AttachedKeys` for itself.

use serde::{Deserialize, Serialize};

use crate::api::ResponseHeader;

/// A lease id; never 0 (0 means "no lease" on a key).
pub type LeaseId = i64;

/// Shortest TTL a lease may be granted with, in milliseconds.
pub const LEASE_TTL_MIN_MS: u64 = 1_000;
/// Longest TTL a lease may be granted with, in milliseconds (30 days).
pub const LEASE_TTL_MAX_MS: u64 = 30 * 24 * 3_600 * 1_000;

/// Digits of [`lease_anchor`], in ascending byte order.
const ANCHOR_DIGITS: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The routing key of lease `id`: its owner range is the range containing this key.
///
/// The id in base 62, least significant digit first, so that random ids spread evenly over
/// the printable keyspace the bootstrap layout cuts into ranges.
pub fn lease_anchor(id: LeaseId) -> Vec<u8> {
    let mut n = id as u64;
    let mut out = Vec::with_capacity(11);
    for _ in 0..11 {
        out.push(ANCHOR_DIGITS[(n % 62) as usize]);
        n /= 62;
    }
    out
}

/// A lease operation, sent to one range (see the module docs for which one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseRequest {
    /// Create lease `id` with a TTL (refused if the id was ever used).
    Grant {
        /// The new lease's id (the client library picks a random one).
        id: LeaseId,
        /// Time to live, in milliseconds.
        ttl_ms: u64,
    },
    /// Revoke lease `id` now: its keys are deleted in every range.
    Revoke {
        /// The lease.
        id: LeaseId,
    },
    /// Renew lease `id` for its full TTL. Served by the owner's leader in memory.
    KeepAlive {
        /// The lease.
        id: LeaseId,
    },
    /// Renew many leases, all owned by the range the request is sent to (a client holding
    /// many leases sends one of these per owner range instead of one request per lease).
    KeepAliveMany {
        /// The leases.
        ids: Vec<LeaseId>,
    },
    /// The granted and the remaining TTL of lease `id`.
    TimeToLive {
        /// The lease.
        id: LeaseId,
    },
    /// Whether lease `id` is alive, revoked but not yet detached from every range, or gone.
    Status {
        /// The lease.
        id: LeaseId,
    },
    /// The leases this range owns.
    List,
    /// The keys of this range attached to lease `id`.
    AttachedKeys {
        /// The lease.
        id: LeaseId,
    },
    /// Create lease `id` with a TTL and put `put.key` attached to it, in one Raft entry: an
    /// ephemeral key in one round trip. Both the lease's anchor ([`lease_anchor`]) and the
    /// key must lie in the range the request is sent to (the client library picks such an
    /// id); `put.lease` must be `id`. Answered like a put.
    GrantWithPut {
        /// The new lease's id (refused if the id was ever used).
        id: LeaseId,
        /// Time to live, in milliseconds.
        ttl_ms: u64,
        /// The key to put, attached to the lease.
        put: crate::api::PutRequest,
    },
}

impl LeaseRequest {
    /// The lease whose owner range must serve this request; `None` for requests any range
    /// answers for itself. (`KeepAliveMany`: the first; every id must have the same owner.)
    pub fn owner(&self) -> Option<LeaseId> {
        match self {
            Self::Grant { id, .. }
            | Self::GrantWithPut { id, .. }
            | Self::Revoke { id }
            | Self::KeepAlive { id }
            | Self::TimeToLive { id }
            | Self::Status { id } => Some(*id),
            Self::KeepAliveMany { ids } => ids.first().copied(),
            Self::List | Self::AttachedKeys { .. } => None,
        }
    }
}

/// Where a lease is in its life, as its owner range knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseStatus {
    /// Granted and not expired.
    Alive,
    /// Expired or revoked; some range has not yet fenced or detached it (its keys may still
    /// be there; no range that has fenced it accepts writes under it).
    Detaching,
    /// Revoked and detached from every range, or never granted.
    Gone,
}

/// The answer to a [`LeaseRequest`] (and of the internal lease commands).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseResponse {
    /// The lease exists now.
    Granted {
        /// Range and revision.
        header: ResponseHeader,
        /// The lease.
        id: LeaseId,
        /// Its TTL, in milliseconds.
        ttl_ms: u64,
    },
    /// The lease is revoked; its keys are deleted in every range once every range refuses it
    /// (normally before this answer; see `node/src/leases.rs`).
    Revoked {
        /// The owner range and its revision.
        header: ResponseHeader,
    },
    /// The lease was renewed.
    KeptAlive {
        /// The lease.
        id: LeaseId,
        /// Its TTL from now, in milliseconds.
        ttl_ms: u64,
    },
    /// Leases renewed by `KeepAliveMany`, and those not found.
    KeptAliveMany {
        /// Renewed leases and their TTLs from now, in milliseconds.
        renewed: Vec<(LeaseId, u64)>,
        /// Leases that do not exist (expired, revoked, never granted).
        missing: Vec<LeaseId>,
    },
    /// The lease's TTLs.
    TimeToLive {
        /// Range and revision.
        header: ResponseHeader,
        /// The lease.
        id: LeaseId,
        /// The TTL it was granted with, in milliseconds.
        granted_ttl_ms: u64,
        /// Time left, in milliseconds.
        remaining_ms: u64,
    },
    /// Where a lease is in its life.
    Status {
        /// Range and revision.
        header: ResponseHeader,
        /// The lease.
        id: LeaseId,
        /// Its state.
        status: LeaseStatus,
    },
    /// The leases a range owns.
    List {
        /// Range and revision.
        header: ResponseHeader,
        /// Lease ids, ascending.
        ids: Vec<LeaseId>,
    },
    /// The keys of a range attached to a lease.
    AttachedKeys {
        /// Range and revision.
        header: ResponseHeader,
        /// The keys, ascending.
        keys: Vec<Vec<u8>>,
    },
    /// An internal lease command (tick, detach) was applied.
    Maintained {
        /// Range and revision.
        header: ResponseHeader,
        /// Leases revoked or detached by it.
        revoked: u64,
    },
}

impl LeaseResponse {
    /// The response's header, if it has one.
    pub fn header(&self) -> ResponseHeader {
        match self {
            Self::Granted { header, .. }
            | Self::Revoked { header }
            | Self::TimeToLive { header, .. }
            | Self::Status { header, .. }
            | Self::List { header, .. }
            | Self::AttachedKeys { header, .. }
            | Self::Maintained { header, .. } => *header,
            Self::KeptAlive { .. } | Self::KeptAliveMany { .. } => ResponseHeader::default(),
        }
    }

    /// Sets the header's revision (writes report the revision after them).
    pub fn set_revision(&mut self, revision: u64) {
        match self {
            Self::Granted { header, .. }
            | Self::Revoked { header }
            | Self::TimeToLive { header, .. }
            | Self::Status { header, .. }
            | Self::List { header, .. }
            | Self::AttachedKeys { header, .. }
            | Self::Maintained { header, .. } => header.revision = revision,
            Self::KeptAlive { .. } | Self::KeptAliveMany { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_are_distinct_and_spread_over_the_digits() {
        let mut firsts = std::collections::BTreeSet::new();
        let mut anchors = std::collections::BTreeSet::new();
        for id in 1..=620i64 {
            let a = lease_anchor(id);
            assert_eq!(a.len(), 11);
            firsts.insert(a[0]);
            assert!(anchors.insert(a), "anchor of {id} repeats");
        }
        assert_eq!(firsts.len(), 62);
        assert_ne!(lease_anchor(i64::MAX), lease_anchor(i64::MIN));
    }
}
