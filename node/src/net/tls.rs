//! The cluster's TLS material: a cluster CA, one certificate per node signed
//! by it, and the QUIC configurations that make every peer link mutually
//! authenticated.
//!
//! The CA's directory (`quiver certs init-ca --dir CA`) holds:
//! - `ca.pem`, `ca.key`: the cluster CA;
//! - `cluster.secret`: 32 random bytes in hex that every node of the
//!   cluster shares, which seal the context tokens clients are given
//!   (made with the CA, or by `quiver certs secret --dir CA` for a CA made
//!   before there was one).
//!
//! Each node's own directory (`quiver certs node --name NAME --ip IP
//! --ca-dir CA --dir D`) holds `NAME.pem` and `NAME.key` (its certificate,
//! for its name, a DNS name, and its IP addresses, signed by the CA), and
//! copies of `ca.pem` and `cluster.secret`: everything the node needs, and
//! never the CA's key. A node refuses to start from a directory that holds
//! `ca.key`: one that could sign certificates could take any other node's
//! name, and a peer is trusted only for the name its certificate gives.
//!
//! Keys are written readable by their owner only. Both sides of a peer link
//! present their certificate and check the other's against the CA alone: a
//! peer whose certificate another CA signed, or that presents none, is
//! refused during the handshake. TLS 1.3 only (QUIC), with the ring crypto
//! provider, chosen explicitly so a second provider in the tree cannot
//! change it.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The CA's certificate and key files.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";

/// The cluster's shared secret (see `service::token`).
pub const CLUSTER_SECRET: &str = "cluster.secret";

/// The ALPN protocol of peer links.
pub const ALPN: &[u8] = b"quiver-peer/4";

/// The CA's subject: the same every time, so a node certificate made later
/// names the issuer its CA certificate has.
const CA_NAME: &str = "Quiver cluster CA";

/// Why TLS material could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io { path: path.display().to_string(), source }
}

fn invalid(what: impl std::fmt::Display) -> TlsError {
    TlsError::Invalid(what.to_string())
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = name;
    params
}

/// Writes `bytes` to a new file `dir/name`, readable by its owner only
/// when `secret`; refuses to replace an existing file.
fn write_new(dir: &Path, name: &str, bytes: &[u8], secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let mode = if secret { 0o600 } else { 0o644 };
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&path).map_err(io(&path))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io(&path))
}

/// Makes a new cluster CA in `dir` (created if needed). Refuses to replace
/// one that exists.
pub fn init_ca(dir: &Path) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    if dir.join(CA_CERT).exists() || dir.join(CA_KEY).exists() {
        return Err(invalid(format!("{} already holds a cluster CA; it is not replaced", dir.display())));
    }
    let key = KeyPair::generate().map_err(invalid)?;
    let cert = ca_params().self_signed(&key).map_err(invalid)?;
    write_new(dir, CA_KEY, key.serialize_pem().as_bytes(), true)?;
    write_new(dir, CA_CERT, cert.pem().as_bytes(), false)?;
    init_cluster_secret(dir)
}

/// Makes the cluster's shared secret in `dir` unless it holds one already
/// (which is kept: tokens sealed with it stay valid).
pub fn init_cluster_secret(dir: &Path) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    crate::service::token::load_or_create_secret(dir, CLUSTER_SECRET).map(|_| ()).map_err(io(&dir.join(CLUSTER_SECRET)))
}

/// Reads the cluster's shared secret from a node's certificate directory.
pub fn read_cluster_secret(dir: &Path) -> Result<[u8; crate::service::token::SECRET_BYTES], TlsError> {
    let path = dir.join(CLUSTER_SECRET);
    crate::service::token::read_secret(&path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => invalid(format!(
            "{} is missing: every node of a cluster needs the same {CLUSTER_SECRET}, made beside the cluster CA \
             (`quiver certs init-ca`, or `quiver certs secret --dir DIR` for a CA made before); copy it to each \
             node's certificate directory",
            path.display()
        )),
        _ => TlsError::Io { path: path.display().to_string(), source },
    })
}

/// A node name is a DNS label or name: letters, digits, `-` and `.`.
fn check_name(name: &str) -> Result<(), TlsError> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.']);
    if valid {
        Ok(())
    } else {
        Err(invalid(format!("node name {name:?}: use letters, digits, '-' and '.' (at most 63)")))
    }
}

/// Makes node `name`'s certificate and key in `node_dir` (created if
/// need be), signed by the CA in `ca_dir`, valid for `name` and `ips`, and
/// copies the CA's certificate and the cluster's secret there: all the
/// node needs, and never the CA's key. `node_dir` must not be `ca_dir`.
pub fn issue_node(ca_dir: &Path, node_dir: &Path, name: &str, ips: &[IpAddr]) -> Result<(), TlsError> {
    check_name(name)?;
    std::fs::create_dir_all(node_dir).map_err(io(node_dir))?;
    if std::fs::canonicalize(node_dir).ok() == std::fs::canonicalize(ca_dir).ok() || node_dir.join(CA_KEY).exists() {
        return Err(invalid(format!(
            "{} holds (or is) the cluster CA: give the node a directory of its own, without the CA's key",
            node_dir.display()
        )));
    }
    let ca_key_path = ca_dir.join(CA_KEY);
    let ca_key_pem = std::fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(invalid)?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(invalid)?;
    params.subject_alt_names.extend(ips.iter().map(|&ip| rcgen::SanType::IpAddress(ip)));
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, name);
    params.distinguished_name = subject;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().map_err(invalid)?;
    let cert = params.signed_by(&key, &issuer).map_err(invalid)?;
    copy_once(ca_dir, node_dir, CA_CERT, false)?;
    copy_once(ca_dir, node_dir, CLUSTER_SECRET, true)?;
    write_new(node_dir, &format!("{name}.key"), key.serialize_pem().as_bytes(), true)?;
    write_new(node_dir, &format!("{name}.pem"), cert.pem().as_bytes(), false)
}

/// Copies `from/name` to `to/name` unless the same bytes are there;
/// refuses to replace different ones (another cluster's).
fn copy_once(from: &Path, to: &Path, name: &str, secret: bool) -> Result<(), TlsError> {
    let source = from.join(name);
    let bytes = std::fs::read(&source).map_err(io(&source))?;
    match std::fs::read(to.join(name)) {
        Ok(there) if there == bytes => Ok(()),
        Ok(_) => Err(invalid(format!("{} holds another cluster's {name}", to.display()))),
        Err(_) => write_new(to, name, &bytes, secret),
    }
}

/// The first of `names` that `cert`, a peer's certificate (already
/// checked against the cluster CA by the handshake), is valid for: which
/// member the peer is.
pub fn certified_name<'n>(cert: &CertificateDer<'_>, names: &'n [String]) -> Option<&'n str> {
    let parsed = rustls::server::ParsedCertificate::try_from(cert).ok()?;
    names.iter().map(String::as_str).find(|name| {
        rustls::pki_types::ServerName::try_from(*name)
            .is_ok_and(|server| rustls::client::verify_server_name(&parsed, &server).is_ok())
    })
}

/// A node's TLS material, loaded.
#[derive(Debug)]
pub struct NodeTls {
    pub name: String,
    ca: CertificateDer<'static>,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

impl Clone for NodeTls {
    fn clone(&self) -> NodeTls {
        NodeTls { name: self.name.clone(), ca: self.ca.clone(), cert: self.cert.clone(), key: self.key.clone_key() }
    }
}

impl NodeTls {
    /// Loads the CA certificate and node `name`'s certificate and key from
    /// `dir`. Refuses a directory that holds the CA's private key: a node
    /// that could sign certificates could take any other node's name.
    pub fn load(dir: &Path, name: &str) -> Result<NodeTls, TlsError> {
        if dir.join(CA_KEY).exists() {
            return Err(invalid(format!(
                "{} holds the cluster CA's private key ({CA_KEY}); a node's certificate directory must not (a node \
                 that could sign certificates could take any other node's name): keep the CA apart and give each \
                 node its own directory (`quiver certs node --ca-dir CA --dir NODE_DIR`)",
                dir.display()
            )));
        }
        let read = |file: String| {
            let path = dir.join(file);
            std::fs::read(&path).map_err(io(&path)).map(|bytes| (path, bytes))
        };
        let pem = |path: &Path, e: rustls::pki_types::pem::Error| invalid(format!("{}: {e}", path.display()));
        let (path, bytes) = read(CA_CERT.to_owned())?;
        let ca = CertificateDer::from_pem_slice(&bytes).map_err(|e| pem(&path, e))?;
        let (path, bytes) = read(format!("{name}.pem"))?;
        let cert = CertificateDer::from_pem_slice(&bytes).map_err(|e| pem(&path, e))?;
        let (path, bytes) = read(format!("{name}.key"))?;
        let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| pem(&path, e))?;
        Ok(NodeTls { name: name.to_owned(), ca, cert, key })
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).map_err(invalid)?;
        Ok(Arc::new(roots))
    }

    /// The QUIC server side of peer links: requires a client certificate
    /// signed by the cluster CA.
    pub fn quic_server(&self) -> Result<quinn::ServerConfig, TlsError> {
        let provider = provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone())
            .build()
            .map_err(invalid)?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(invalid)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.cert.clone()], self.key.clone_key())
            .map_err(invalid)?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(config).map_err(invalid)?;
        Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
    }

    /// The QUIC client side of peer links: presents this node's
    /// certificate, and trusts only the cluster CA.
    pub fn quic_client(&self) -> Result<quinn::ClientConfig, TlsError> {
        self.client_config(true)
    }

    /// [`NodeTls::quic_client`] without a certificate of its own: what a
    /// stranger that knows the CA would present. For tests of refusal.
    pub fn quic_client_without_certificate(&self) -> Result<quinn::ClientConfig, TlsError> {
        self.client_config(false)
    }

    fn client_config(&self, present_certificate: bool) -> Result<quinn::ClientConfig, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(invalid)?
            .with_root_certificates(self.roots()?);
        let mut config = if present_certificate {
            builder.with_client_auth_cert(vec![self.cert.clone()], self.key.clone_key()).map_err(invalid)?
        } else {
            builder.with_no_client_auth()
        };
        config.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config).map_err(invalid)?;
        Ok(quinn::ClientConfig::new(Arc::new(crypto)))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_ca_and_node_certificates_are_made_once_with_private_keys_apart() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, n1) = (dir.path().join("ca"), dir.path().join("n1"));
        init_ca(&ca).unwrap();
        assert!(init_ca(&ca).unwrap_err().to_string().contains("already holds a cluster CA"));
        issue_node(&ca, &n1, "n1", &["127.0.0.1".parse().unwrap()]).unwrap();
        assert!(issue_node(&ca, &n1, "n1", &[]).is_err(), "an existing node certificate is not replaced");
        assert!(issue_node(&ca, &n1, "bad name", &[]).unwrap_err().to_string().contains("node name"));
        assert!(issue_node(&ca, &ca, "n2", &[]).unwrap_err().to_string().contains("holds (or is) the cluster CA"));
        for key in [ca.join(CA_KEY), n1.join("n1.key"), n1.join(CLUSTER_SECRET)] {
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", key.display());
        }
        assert!(!n1.join(CA_KEY).exists(), "the CA's key stays with the CA");
        let tls = NodeTls::load(&n1, "n1").unwrap();
        tls.quic_server().unwrap();
        tls.quic_client().unwrap();
        assert!(NodeTls::load(&n1, "n2").is_err());
        read_cluster_secret(&n1).unwrap();

        // A directory that holds the CA's key is refused.
        std::fs::copy(ca.join(CA_KEY), n1.join(CA_KEY)).unwrap();
        let error = NodeTls::load(&n1, "n1").unwrap_err().to_string();
        assert!(error.contains("holds the cluster CA's private key"), "{error}");
    }

    /// A peer's certificate names the member it was made for, and no other.
    #[test]
    fn a_certificate_is_valid_for_its_own_name_only() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca).unwrap();
        issue_node(&ca, &dir.path().join("n2"), "n2", &["127.0.0.1".parse().unwrap()]).unwrap();
        let tls = NodeTls::load(&dir.path().join("n2"), "n2").unwrap();
        let names = |list: &[&str]| list.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert_eq!(certified_name(&tls.cert, &names(&["n1", "n2", "n3"])), Some("n2"));
        assert_eq!(certified_name(&tls.cert, &names(&["n1", "n3", "n22"])), None);
        assert_eq!(certified_name(&CertificateDer::from(vec![1, 2, 3]), &names(&["n2"])), None, "garbage");
    }
}
