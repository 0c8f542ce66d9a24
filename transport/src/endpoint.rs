//! QUIC endpoints: a node's endpoint (serves both protocols, dials peers) and a client's.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, IdleTimeout, TransportConfig, VarInt};

use crate::tls::{self, NodeCertPaths, TlsError};
use crate::{ALPN_CLIENT, ALPN_PEER};

/// Limits of one QUIC connection (STYLE.md 7: a limit on everything).
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Concurrent bi-streams a peer may open (one per in-flight request).
    pub streams_per_connection_max: u32,
    /// A connection silent for this long is closed.
    pub idle_timeout_ms: u64,
    /// Keep-alive period; below `idle_timeout_ms` so idle peer links stay up.
    pub keep_alive_ms: u64,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            streams_per_connection_max: 4096,
            idle_timeout_ms: 30_000,
            keep_alive_ms: 5_000,
        }
    }
}

fn transport_config(limits: &ConnectionLimits) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(limits.streams_per_connection_max));
    t.max_concurrent_uni_streams(VarInt::from_u32(16));
    t.keep_alive_interval(Some(Duration::from_millis(limits.keep_alive_ms)));
    t.max_idle_timeout(Some(
        IdleTimeout::try_from(Duration::from_millis(limits.idle_timeout_ms))
            .expect("idle timeout fits a VarInt"),
    ));
    // Many small independent streams: round-robin fairness between them costs more than it buys.
    t.send_fairness(false);
    Arc::new(t)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A QUIC client configuration trusting the cluster CA at `ca_cert` and speaking `alpn`.
pub fn client_config(
    ca_cert: &Path,
    alpn: &[u8],
    limits: &ConnectionLimits,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(tls::root_store(ca_cert)?)
        .with_no_client_auth();
    crypto.alpn_protocols = vec![alpn.to_vec()];
    let quic = QuicClientConfig::try_from(crypto).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport_config(limits));
    Ok(config)
}

/// A node's endpoint bound to `bind`: serves [`ALPN_CLIENT`] and [`ALPN_PEER`] with the node
/// certificate, and dials peers with [`ALPN_PEER`].
pub fn node_endpoint(
    bind: SocketAddr,
    certs: &NodeCertPaths,
    limits: &ConnectionLimits,
) -> Result<Endpoint, TlsError> {
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(tls::load_certs(&certs.cert)?, tls::load_key(&certs.key)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    crypto.alpn_protocols = vec![ALPN_CLIENT.to_vec(), ALPN_PEER.to_vec()];
    let quic = QuicServerConfig::try_from(crypto).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(transport_config(limits));
    let mut endpoint = Endpoint::server(server, bind).map_err(|source| TlsError::Io {
        path: format!("udp socket {bind}").into(),
        source,
    })?;
    endpoint.set_default_client_config(client_config(&certs.ca_cert, ALPN_PEER, limits)?);
    Ok(endpoint)
}

/// A client endpoint on an OS-chosen port, trusting the cluster CA at `ca_cert`.
pub fn client_endpoint(ca_cert: &Path, limits: &ConnectionLimits) -> Result<Endpoint, TlsError> {
    let bind: SocketAddr = "0.0.0.0:0".parse().expect("literal address");
    let mut endpoint = Endpoint::client(bind).map_err(|source| TlsError::Io {
        path: "udp socket".into(),
        source,
    })?;
    endpoint.set_default_client_config(client_config(ca_cert, ALPN_CLIENT, limits)?);
    Ok(endpoint)
}
