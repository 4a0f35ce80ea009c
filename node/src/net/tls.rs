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

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub use quiver_certs::{
    init_ca, init_cluster_secret, issue_node, read_cluster_secret, TlsError, CA_CERT, CA_KEY, CLUSTER_SECRET,
};

/// The ALPN protocol of peer links.
pub const ALPN: &[u8] = b"quiver-peer/4";

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
            return Err(TlsError::invalid(format!(
                "{} holds the cluster CA's private key ({CA_KEY}); a node's certificate directory must not (a node \
                 that could sign certificates could take any other node's name): keep the CA apart and give each \
                 node its own directory (`quiver certs node --ca-dir CA --dir NODE_DIR`)",
                dir.display()
            )));
        }
        let read = |file: String| {
            let path = dir.join(file);
            std::fs::read(&path).map_err(TlsError::at(&path)).map(|bytes| (path, bytes))
        };
        let pem = |path: &Path, e: rustls::pki_types::pem::Error| TlsError::invalid(format!("{}: {e}", path.display()));
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
        roots.add(self.ca.clone()).map_err(TlsError::invalid)?;
        Ok(Arc::new(roots))
    }

    /// The QUIC server side of peer links: requires a client certificate
    /// signed by the cluster CA.
    pub fn quic_server(&self) -> Result<quinn::ServerConfig, TlsError> {
        let provider = provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone())
            .build()
            .map_err(TlsError::invalid)?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::invalid)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.cert.clone()], self.key.clone_key())
            .map_err(TlsError::invalid)?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(config).map_err(TlsError::invalid)?;
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
            .map_err(TlsError::invalid)?
            .with_root_certificates(self.roots()?);
        let mut config = if present_certificate {
            builder.with_client_auth_cert(vec![self.cert.clone()], self.key.clone_key()).map_err(TlsError::invalid)?
        } else {
            builder.with_no_client_auth()
        };
        config.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config).map_err(TlsError::invalid)?;
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
