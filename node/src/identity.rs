//! The files that name a node and guard its admin requests, both made at
//! first start in its data directory:
//! - `NODE_ID`: the node's id in decimal. A new data directory gets a new
//!   id.
//! - `ADMIN_TOKEN`: 32 hex digits from the system's random source, readable
//!   by its owner only. Admin requests (`shutdown`) must carry it; `quiver
//!   shutdown --data-dir DIR` reads it from there.
//! - `CONTEXT_SECRET`: 64 hex digits from the same source, owner-only: the
//!   secret that seals a single node's context tokens (`service::token`).
//!
//! And `LOCK`, empty, which the process using the directory holds an
//! exclusive `flock` on: a second `quiverd` (or `quiverd --check-index`) on
//! the same directory is refused instead of writing beside the first. The
//! kernel releases it when the process dies, however it dies.

use std::path::Path;

use quiver_ring::NodeId;

const NODE_ID_FILE: &str = "NODE_ID";

/// The secret that seals a single node's context tokens (a node of a
/// cluster uses the cluster's, beside its certificate).
pub const CONTEXT_SECRET_FILE: &str = "CONTEXT_SECRET";
pub use quiver_ring::wire::ADMIN_TOKEN_FILE;

/// Locks the data directory `dir` for this process, or says that another
/// holds it. The lock lasts as long as the returned file is open.
pub fn lock_data_dir(dir: &Path) -> std::io::Result<std::fs::File> {
    let path = dir.join("LOCK");
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&path)?
    };
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            format!("{} is in use by another quiverd process", dir.display()),
        )),
        Err(error) => Err(error.into()),
    }
}

/// Makes the data directory `dir` (and its parents) if need be, and
/// makes it owner-only (`0700`), whoever made it: the node's files in it
/// are its users' data and its secrets.
pub fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Reads the node's id from `DIR/NODE_ID`, or makes one and stores it
/// (synced) on first start.
pub fn load_or_create_node_id(dir: &Path) -> std::io::Result<NodeId> {
    let path = dir.join(NODE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse()
            .map(NodeId)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let [a, b, c, d, e, f, g, h, ..] = random_bytes()?;
            let id = u64::from_le_bytes([a, b, c, d, e, f, g, h]).max(1);
            write_new_file(dir, NODE_ID_FILE, format!("{id}\n").as_bytes())?;
            Ok(NodeId(id))
        }
        Err(e) => Err(e),
    }
}

/// Reads the admin token from `DIR/ADMIN_TOKEN`, or makes one (owner-only,
/// synced) on first start.
pub fn load_or_create_admin_token(dir: &Path) -> std::io::Result<String> {
    match read_admin_token(dir) {
        Ok(token) => Ok(token),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token: String = random_bytes()?.iter().map(|b| format!("{b:02x}")).collect();
            write_new_file(dir, ADMIN_TOKEN_FILE, format!("{token}\n").as_bytes())?;
            Ok(token)
        }
        Err(e) => Err(e),
    }
}

/// Reads the admin token of the node whose data directory is `dir`.
pub fn read_admin_token(dir: &Path) -> std::io::Result<String> {
    let path = dir.join(ADMIN_TOKEN_FILE);
    let token = std::fs::read_to_string(&path)?.trim().to_owned();
    if token.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{} is empty", path.display())));
    }
    Ok(token)
}

/// Compares tokens in time that does not depend on where they differ.
pub fn same_token(given: &str, expected: &str) -> bool {
    let (given, expected) = (given.as_bytes(), expected.as_bytes());
    given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |diff, (a, b)| diff | (a ^ b)) == 0
}

/// 16 bytes from the system's random source.
fn random_bytes() -> std::io::Result<[u8; 16]> {
    random_array()
}

pub use quiver_certs::{load_or_create_secret, random_secret, read_secret, SECRET_BYTES};
use quiver_certs::{random_array, write_new_file};

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_admin_token_is_made_once_and_readable_by_its_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let token = load_or_create_admin_token(dir.path()).unwrap();
        assert_eq!(token.len(), 32);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(load_or_create_admin_token(dir.path()).unwrap(), token);
        assert_eq!(read_admin_token(dir.path()).unwrap(), token);
        let mode = std::fs::metadata(dir.path().join(ADMIN_TOKEN_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(load_or_create_admin_token(other.path()).unwrap(), token);
    }

    #[test]
    fn the_node_id_is_made_once_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let id = load_or_create_node_id(dir.path()).unwrap();
        assert_eq!(load_or_create_node_id(dir.path()).unwrap(), id);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(load_or_create_node_id(other.path()).unwrap(), id);
    }

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abd", "abc"));
        assert!(!same_token("ab", "abc"));
        assert!(!same_token("", "abc"));
    }
}
