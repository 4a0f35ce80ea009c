//! The files that make a Quiver cluster's trust: the cluster CA, each
//! node's certificate and key signed by it, and the cluster's shared
//! secret; and the secret files a node keeps. Made by `quiver certs` and
//! `quiver local-cluster`, read by `quiverd`: a crate of its own so that
//! the command-line tool does not build the node to make them.
//!
//! Every file is written whole or not at all and synced; private keys and
//! secrets are readable by their owner only; nothing existing is replaced.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// The CA's certificate and key files.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";

/// The cluster's shared secret: it seals context tokens, so every node
/// of a cluster opens those any other made.
pub const CLUSTER_SECRET: &str = "cluster.secret";

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

impl TlsError {
    /// An I/O error on `path`, for `map_err`.
    pub fn at(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
        move |source| TlsError::Io { path: path.display().to_string(), source }
    }

    pub fn invalid(what: impl std::fmt::Display) -> TlsError {
        TlsError::Invalid(what.to_string())
    }
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
        std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&path).map_err(TlsError::at(&path))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(TlsError::at(&path))
}

/// Makes a new cluster CA in `dir` (created if needed). Refuses to replace
/// one that exists.
pub fn init_ca(dir: &Path) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(TlsError::at(dir))?;
    if dir.join(CA_CERT).exists() || dir.join(CA_KEY).exists() {
        return Err(TlsError::invalid(format!("{} already holds a cluster CA; it is not replaced", dir.display())));
    }
    let key = KeyPair::generate().map_err(TlsError::invalid)?;
    let cert = ca_params().self_signed(&key).map_err(TlsError::invalid)?;
    write_new(dir, CA_KEY, key.serialize_pem().as_bytes(), true)?;
    write_new(dir, CA_CERT, cert.pem().as_bytes(), false)?;
    init_cluster_secret(dir)
}

/// Makes the cluster's shared secret in `dir` unless it holds one already
/// (which is kept: tokens sealed with it stay valid).
pub fn init_cluster_secret(dir: &Path) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(TlsError::at(dir))?;
    load_or_create_secret(dir, CLUSTER_SECRET).map(|_| ()).map_err(TlsError::at(&dir.join(CLUSTER_SECRET)))
}

/// Reads the cluster's shared secret from a node's certificate directory.
pub fn read_cluster_secret(dir: &Path) -> Result<[u8; SECRET_BYTES], TlsError> {
    let path = dir.join(CLUSTER_SECRET);
    read_secret(&path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => TlsError::invalid(format!(
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
        Err(TlsError::invalid(format!("node name {name:?}: use letters, digits, '-' and '.' (at most 63)")))
    }
}

/// Makes node `name`'s certificate and key in `node_dir` (created if
/// need be), signed by the CA in `ca_dir`, valid for `name` and `ips`, and
/// copies the CA's certificate and the cluster's secret there: all the
/// node needs, and never the CA's key. `node_dir` must not be `ca_dir`.
pub fn issue_node(ca_dir: &Path, node_dir: &Path, name: &str, ips: &[IpAddr]) -> Result<(), TlsError> {
    check_name(name)?;
    std::fs::create_dir_all(node_dir).map_err(TlsError::at(node_dir))?;
    if std::fs::canonicalize(node_dir).ok() == std::fs::canonicalize(ca_dir).ok() || node_dir.join(CA_KEY).exists() {
        return Err(TlsError::invalid(format!(
            "{} holds (or is) the cluster CA: give the node a directory of its own, without the CA's key",
            node_dir.display()
        )));
    }
    let ca_key_path = ca_dir.join(CA_KEY);
    let ca_key_pem = std::fs::read_to_string(&ca_key_path).map_err(TlsError::at(&ca_key_path))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(TlsError::invalid)?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(TlsError::invalid)?;
    params.subject_alt_names.extend(ips.iter().map(|&ip| rcgen::SanType::IpAddress(ip)));
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, name);
    params.distinguished_name = subject;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().map_err(TlsError::invalid)?;
    let cert = params.signed_by(&key, &issuer).map_err(TlsError::invalid)?;
    copy_once(ca_dir, node_dir, CA_CERT, false)?;
    copy_once(ca_dir, node_dir, CLUSTER_SECRET, true)?;
    write_new(node_dir, &format!("{name}.key"), key.serialize_pem().as_bytes(), true)?;
    write_new(node_dir, &format!("{name}.pem"), cert.pem().as_bytes(), false)
}

/// Copies `from/name` to `to/name` unless the same bytes are there;
/// refuses to replace different ones (another cluster's).
fn copy_once(from: &Path, to: &Path, name: &str, secret: bool) -> Result<(), TlsError> {
    let source = from.join(name);
    let bytes = std::fs::read(&source).map_err(TlsError::at(&source))?;
    match std::fs::read(to.join(name)) {
        Ok(there) if there == bytes => Ok(()),
        Ok(_) => Err(TlsError::invalid(format!("{} holds another cluster's {name}", to.display()))),
        Err(_) => write_new(to, name, &bytes, secret),
    }
}

/// Bytes of a secret (context tokens', the cluster's).
pub const SECRET_BYTES: usize = 32;

/// A secret for context tokens from the system's random source, kept
/// nowhere (see [`load_or_create_secret`] for one that is).
pub fn random_secret() -> std::io::Result<[u8; SECRET_BYTES]> {
    random_array()
}

/// Reads the secret in the file `path` (hex), or says why it cannot.
pub fn read_secret(path: &Path) -> std::io::Result<[u8; SECRET_BYTES]> {
    let text = std::fs::read_to_string(path)?;
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not {} hex digits", path.display(), SECRET_BYTES * 2),
        )
    };
    let text = text.trim().as_bytes();
    if text.len() != SECRET_BYTES * 2 {
        return Err(bad());
    }
    let mut secret = [0u8; SECRET_BYTES];
    for (byte, pair) in secret.iter_mut().zip(text.chunks_exact(2)) {
        let digits = std::str::from_utf8(pair).map_err(|_| bad())?;
        *byte = u8::from_str_radix(digits, 16).map_err(|_| bad())?;
    }
    Ok(secret)
}

/// Reads the secret `name` in `dir`, or makes one (from the system's
/// random source, owner-only, synced) when there is none.
pub fn load_or_create_secret(dir: &Path, name: &str) -> std::io::Result<[u8; SECRET_BYTES]> {
    match read_secret(&dir.join(name)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = random_array::<SECRET_BYTES>()?;
            let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
            write_new_file(dir, name, format!("{hex}\n").as_bytes())?;
            Ok(secret)
        }
        other => other,
    }
}

/// `N` bytes from the system's random source.
pub fn random_array<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// Writes `name` in `dir` whole or not at all: a temporary file of a fresh
/// random name, created exclusively (`O_EXCL`: never a file or link someone
/// put there first) and owner-only, synced, renamed over `name`, and the
/// directory synced.
pub fn write_new_file(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let suffix: String = random_array::<8>()?.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = dir.join(format!("{name}.{suffix}.tmp"));
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    let written =
        file.write_all(bytes).and_then(|()| file.sync_all()).and_then(|()| std::fs::rename(&tmp, dir.join(name)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_made_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let secret = load_or_create_secret(dir.path(), "S").unwrap();
        assert_eq!(load_or_create_secret(dir.path(), "S").unwrap(), secret);
        assert_eq!(read_secret(&dir.path().join("S")).unwrap(), secret);
        std::fs::write(dir.path().join("bad"), "xyz").unwrap();
        assert!(read_secret(&dir.path().join("bad")).is_err());
    }
}
