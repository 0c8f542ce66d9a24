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

/// The receive and send buffer a QUIC endpoint asks its UDP socket for. The kernel's default
/// (208 KiB on Linux, about 150 small datagrams of accounted memory) overflowed under 256
/// clients on a busy node: the datagrams it dropped were lost to QUIC, whose recovery then
/// held replication and client replies for one or more round trips. Capped by the kernel at
/// `net.core.rmem_max` / `wmem_max` (see [`size_socket_buffers`]).
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// What the kernel reports for a buffer it granted in full, per byte asked: Linux doubles the
/// request (its bookkeeping overhead) and reports that.
#[cfg(target_os = "linux")]
const GRANTED_FACTOR: usize = 2;
#[cfg(not(target_os = "linux"))]
const GRANTED_FACTOR: usize = 1;

/// Asks for [`SOCKET_BUFFER_BYTES`] of receive and send buffer on `socket`, and warns when
/// the kernel grants less (its `net.core.rmem_max` / `wmem_max` is lower): the endpoint works
/// either way, it only drops more datagrams under bursts.
pub fn size_socket_buffers(socket: &std::net::UdpSocket) {
    let sock = socket2::SockRef::from(socket);
    // Asking and reading back tells whether the kernel's cap was hit (`GRANTED_FACTOR`).
    let recv = sock
        .set_recv_buffer_size(SOCKET_BUFFER_BYTES)
        .and_then(|()| sock.recv_buffer_size())
        .ok();
    let send = sock
        .set_send_buffer_size(SOCKET_BUFFER_BYTES)
        .and_then(|()| sock.send_buffer_size())
        .ok();
    for (what, sysctl, size) in [("receive", "rmem_max", recv), ("send", "wmem_max", send)] {
        if size.is_none_or(|size| size < GRANTED_FACTOR * SOCKET_BUFFER_BYTES) {
            tracing::warn!(
                wanted = SOCKET_BUFFER_BYTES,
                granted = ?size,
                "the UDP socket's {what} buffer is smaller than wanted; raise \
                 net.core.{sysctl} to at least {SOCKET_BUFFER_BYTES} to drop fewer datagrams"
            );
        }
    }
}

/// Ack-eliciting packets a peer may receive before it must acknowledge at once (QUIC's
/// ACK-frequency extension; the default, 1, acknowledges every other packet). Requests and
/// replies flow both ways on every connection, so most acknowledgements ride on them; an
/// ACK-only datagram costs a send, a receive and a wake-up on each side.
const ACK_ELICITING_THRESHOLD: u32 = 16;
/// The longest a peer holds back an acknowledgement (clamped by quinn to at least the path's
/// RTT or 25 ms).
const ACK_DELAY_MAX_MS: u64 = 5;

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
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(VarInt::from_u32(ACK_ELICITING_THRESHOLD))
        .max_ack_delay(Some(Duration::from_millis(ACK_DELAY_MAX_MS)));
    t.ack_frequency_config(Some(acks));
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
    let (reset_key, cid_key) = restart_keys(&certs.key)?;
    let mut config = EndpointConfig::new(Arc::new(reset_key));
    config.cid_generator(move || Box::new(HashedConnectionIdGenerator::from_key(cid_key)));
    let mut endpoint = endpoint_on(bind, config, Some(server))?;
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
    let mut endpoint = endpoint_on(bind, EndpointConfig::default(), None)?;
    endpoint.set_default_client_config(client_config(ca_cert, ALPN_CLIENT, limits)?);
    Ok(endpoint)
}

/// A quinn endpoint on a UDP socket bound to `bind`, its buffers sized
/// ([`size_socket_buffers`]), on the current tokio runtime.
fn endpoint_on(
    bind: SocketAddr,
    config: EndpointConfig,
    server: Option<quinn::ServerConfig>,
) -> Result<Endpoint, TlsError> {
    let io_error = |source| TlsError::Io {
        path: format!("udp socket {bind}").into(),
        source,
    };
    let runtime = quinn::default_runtime()
        .ok_or_else(|| io_error(std::io::Error::other("no async runtime")))?;
    let socket = std::net::UdpSocket::bind(bind).map_err(io_error)?;
    size_socket_buffers(&socket);
    Endpoint::new(config, server, socket, runtime).map_err(io_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's cap on what a process may ask for (`net.core.rmem_max` or `wmem_max`).
    fn sysctl_bytes(name: &str) -> usize {
        let path = format!("/proc/sys/net/core/{name}");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        text.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn an_endpoints_socket_gets_the_buffers_it_asks_for_up_to_the_kernels_cap() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a loopback socket");
        let before = socket2::SockRef::from(&socket)
            .recv_buffer_size()
            .expect("read the receive buffer");
        size_socket_buffers(&socket);
        let sock = socket2::SockRef::from(&socket);
        let recv = sock.recv_buffer_size().expect("read the receive buffer");
        let send = sock.send_buffer_size().expect("read the send buffer");
        // Linux reports twice what it granted: what was asked, up to the cap. (An untouched
        // socket reports `rmem_default` itself, not doubled, so this tells the two apart even
        // where the cap is the default.)
        let recv_want = 2 * SOCKET_BUFFER_BYTES.min(sysctl_bytes("rmem_max"));
        let send_want = 2 * SOCKET_BUFFER_BYTES.min(sysctl_bytes("wmem_max"));
        assert!(
            recv >= recv_want,
            "receive buffer {recv} < {recv_want} (before: {before})"
        );
        assert!(send >= send_want, "send buffer {send} < {send_want}");
    }
}
