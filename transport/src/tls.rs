//! The cluster's certificates: a CA created on first start, node certificates issued by it.
//!
//! Files in a certificate directory: `ca.pem` (the cluster CA, which clients trust),
//! `ca.key`, and per node `node-<id>.pem` / `node-<id>.key`. A node certificate names
//! [`crate::SERVER_NAME`], `localhost`, `127.0.0.1`, `::1` and the node's listen address.
//!
//! Creation is race-free across processes: files are written to a temporary name and
//! hard-linked into place, so concurrent first starts agree on one CA.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why certificates could not be created or loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading or writing a certificate file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A certificate or key could not be generated or parsed.
    #[error("certificate: {0}")]
    Cert(String),
    /// rustls refused the configuration.
    #[error("tls config: {0}")]
    Config(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Paths of one node's TLS material.
#[derive(Debug, Clone)]
pub struct NodeCertPaths {
    /// The CA certificate peers and clients trust.
    pub ca_cert: PathBuf,
    /// This node's certificate.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

/// The path of the CA certificate in a certificate directory.
pub fn ca_cert_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("no SANs to parse");
    params
        .distinguished_name
        .push(DnType::CommonName, "concord cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// Writes `contents` to `path` unless it exists; never overwrites (atomic via hard link).
fn write_new(path: &Path, contents: &str) -> Result<bool, TlsError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    fs::write(&tmp, contents).map_err(io_err(&tmp))?;
    let linked = match fs::hard_link(&tmp, path) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(io_err(path)(e)),
    };
    fs::remove_file(&tmp).map_err(io_err(&tmp))?;
    Ok(linked)
}

/// Creates the cluster CA in `dir` unless one exists there.
pub fn ensure_ca(dir: &Path) -> Result<(), TlsError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let key_path = dir.join("ca.key");
    if !key_path.exists() {
        let key = KeyPair::generate().map_err(|e| TlsError::Cert(e.to_string()))?;
        let cert = ca_params()
            .self_signed(&key)
            .map_err(|e| TlsError::Cert(e.to_string()))?;
        // The key goes first: whoever links the key also links the certificate that matches it.
        if write_new(&key_path, &key.serialize_pem())? {
            // Whole or not at all: a concurrent starter reads it as soon as it exists, and a
            // half-written file would give it an empty trust store (every peer then fails
            // with `UnknownIssuer`).
            let path = ca_cert_path(dir);
            let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
            fs::write(&tmp, cert.pem()).map_err(io_err(&tmp))?;
            fs::rename(&tmp, &path).map_err(io_err(&path))?;
        }
    }
    // A concurrent creator linked the key but may not have written the certificate yet.
    for _ in 0..200 {
        if ca_cert_path(dir).exists() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(TlsError::Cert(format!(
        "{} has a CA key but no certificate",
        dir.display()
    )))
}

/// Issues (once) the certificate of node `node_id`, creating the CA first if needed.
pub fn ensure_node_cert(
    dir: &Path,
    node_id: u64,
    extra_ips: &[IpAddr],
) -> Result<NodeCertPaths, TlsError> {
    ensure_ca(dir)?;
    let paths = NodeCertPaths {
        ca_cert: ca_cert_path(dir),
        cert: dir.join(format!("node-{node_id}.pem")),
        key: dir.join(format!("node-{node_id}.key")),
    };
    if paths.cert.exists() && paths.key.exists() {
        return Ok(paths);
    }
    let ca_key_pem = fs::read_to_string(dir.join("ca.key")).map_err(io_err(&dir.join("ca.key")))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| TlsError::Cert(e.to_string()))?;
    let issuer = Issuer::new(ca_params(), ca_key);

    let mut names = vec![crate::SERVER_NAME.to_string(), "localhost".to_string()];
    names.extend(["127.0.0.1".to_string(), "::1".to_string()]);
    names.extend(extra_ips.iter().map(|ip| ip.to_string()));
    names.sort();
    names.dedup();
    let mut params = CertificateParams::new(names).map_err(|e| TlsError::Cert(e.to_string()))?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("concord node {node_id}"));
    let key = KeyPair::generate().map_err(|e| TlsError::Cert(e.to_string()))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| TlsError::Cert(e.to_string()))?;
    fs::write(&paths.key, key.serialize_pem()).map_err(io_err(&paths.key))?;
    fs::write(&paths.cert, cert.pem()).map_err(io_err(&paths.cert))?;
    Ok(paths)
}

/// Loads the certificates of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Cert(format!("{}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Cert(format!("{}: {e}", path.display())))
}

/// Loads the private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| TlsError::Cert(format!("{}: {e}", path.display())))
}

/// A root store trusting exactly the cluster CA at `ca_cert`.
pub fn root_store(ca_cert: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca_cert)? {
        roots.add(cert).map_err(|e| TlsError::Cert(e.to_string()))?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_and_node_certs_are_created_once_and_chain() {
        use rustls::client::danger::ServerCertVerifier;
        let dir = std::env::temp_dir().join(format!("concord-tls-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let a = ensure_node_cert(&dir, 1, &[]).unwrap();
        let ca_before = fs::read(&a.ca_cert).unwrap();
        let b = ensure_node_cert(&dir, 2, &[]).unwrap();
        assert_eq!(
            ca_before,
            fs::read(&b.ca_cert).unwrap(),
            "the CA is created once"
        );
        let roots = root_store(&a.ca_cert).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.into(),
            rustls::crypto::ring::default_provider().into(),
        )
        .build()
        .unwrap();
        let cert = load_certs(&b.cert).unwrap().remove(0);
        let name = rustls_pki_types::ServerName::try_from(crate::SERVER_NAME).unwrap();
        verifier
            .verify_server_cert(&cert, &[], &name, &[], rustls_pki_types::UnixTime::now())
            .expect("node certificate chains to the cluster CA");
        fs::remove_dir_all(&dir).unwrap();
    }
}
