//! QUIC endpoints: a node's endpoint (serves both protocols, dials peers) and a client's.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, EndpointConfig, IdleTimeout, TransportConfig, VarInt};
use quinn_proto::HashedConnectionIdGenerator;
use ring::hmac;

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
    let io_error = |source| TlsError::Io {
        path: format!("udp socket {bind}").into(),
        source,
    };
    let runtime = quinn::default_runtime()
        .ok_or_else(|| io_error(std::io::Error::other("no async runtime")))?;
    let socket = std::net::UdpSocket::bind(bind).map_err(io_error)?;
    let (reset_key, cid_key) = restart_keys(&certs.key)?;
    let mut config = EndpointConfig::new(Arc::new(reset_key));
    config.cid_generator(move || Box::new(HashedConnectionIdGenerator::from_key(cid_key)));
    let mut endpoint = Endpoint::new(config, Some(server), socket, runtime).map_err(io_error)?;
    endpoint.set_default_client_config(client_config(&certs.ca_cert, ALPN_PEER, limits)?);
    Ok(endpoint)
}

/// The keys a node's QUIC endpoint signs its stateless resets and checks its connection ids
/// with: derived from its private key, so the same across restarts. A node that restarted
/// then recognises a packet of a connection its previous run had as its own and answers it
/// with a reset its peers and clients can verify, and they drop that dead connection at once
/// instead of waiting out the idle timeout (RFC 9000, 10.3). quinn's default keys are random
/// per process: the packet is dropped as foreign and the connection lingers for 30 s.
fn restart_keys(node_key: &Path) -> Result<(hmac::Key, u64), TlsError> {
    let secret = tls::load_key(node_key)?;
    let derive = hmac::Key::new(hmac::HMAC_SHA256, secret.secret_der());
    let reset = hmac::sign(&derive, b"concord quic stateless reset key v1");
    let cid = hmac::sign(&derive, b"concord quic connection id key v1");
    let cid_key = u64::from_le_bytes(cid.as_ref()[..8].try_into().expect("32-byte tag"));
    Ok((hmac::Key::new(hmac::HMAC_SHA256, reset.as_ref()), cid_key))
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
