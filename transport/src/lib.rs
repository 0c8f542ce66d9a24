//! concord's transport: QUIC endpoints (quinn + rustls), the cluster's certificates (rcgen),
//! the framed and versioned wire format, and the client-facing protocol types.
//!
//! Peer (Raft) message *contents* belong to `concord-node`; this crate moves frames of bytes
//! and knows the two protocols apart by ALPN: [`ALPN_CLIENT`] and [`ALPN_PEER`].

#![warn(missing_docs)]

pub mod api;
pub mod endpoint;
pub mod lease;
pub mod tls;
pub mod watch;
pub mod wire;

/// ALPN of the client protocol (client library, `concordctl`, loadgen → node).
pub const ALPN_CLIENT: &[u8] = b"concord-client/1";
/// ALPN of the peer protocol (node → node Raft traffic).
pub const ALPN_PEER: &[u8] = b"concord-peer/1";
/// The server name every node certificate carries and every client verifies.
pub const SERVER_NAME: &str = "concord";
