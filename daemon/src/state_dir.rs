//! The state directory: created private (0700), holding the node key, the generated admin token
//! and the ready file `endpoints.json` alongside the node actor's own state files.

use std::{
    fs, io,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use arw_p2p::{identity::NodeKey, persist};

/// File holding the node's ed25519 key.
pub const KEY_FILE: &str = "node.key";
/// File holding a generated admin token.
pub const TOKEN_FILE: &str = "admin-token";
/// The ready file.
pub const ENDPOINTS_FILE: &str = "endpoints.json";

/// Creates the state directory (mode 0700 on Unix) if needed.
pub fn prepare(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mut perms = fs::metadata(dir)?.permissions();
        if perms.mode() & 0o077 != 0 {
            perms.set_mode(0o700);
            fs::set_permissions(dir, perms)?;
        }
    }
    Ok(())
}

/// Files that belong to the identity of the node key beside them: what others know of this node
/// (its journal, its registry, its place in a hierarchy) was said under that key.
const IDENTITY_STATE: [&str; 3] = [crate::journal::FILE, "cluster.sqlite", "hierarchy.json"];

/// Why the node key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key is gone but the state it signed is not (a configuration matter: exit 64).
    #[error(
        "{key} is missing, but {dir} holds this node's state ({state}): restore the key, or start with --new-identity to join as a new node (a Home must admit it again)"
    )]
    Lost {
        /// The key file.
        key: String,
        /// The state directory.
        dir: String,
        /// The state files found.
        state: String,
    },
    /// Reading or writing the key failed.
    #[error("cannot load the node key: {0}")]
    Io(#[from] io::Error),
}

/// The node's key: loaded from `node.key`, or created there (mode 0600) on first start.
/// Returns the key and whether it was created. A missing key beside another identity's state
/// is refused unless `new_identity`: silently starting as someone else would orphan the node's
/// admission and history. A key file readable by others is warned about.
pub fn node_key(dir: &Path, new_identity: bool) -> Result<(NodeKey, bool), KeyError> {
    let path = dir.join(KEY_FILE);
    let existing: Vec<&str> = IDENTITY_STATE.into_iter().filter(|f| dir.join(f).exists()).collect();
    if !new_identity && !existing.is_empty() && !path.exists() {
        return Err(KeyError::Lost {
            key: path.display().to_string(),
            dir: dir.display().to_string(),
            state: existing.join(", "),
        });
    }
    let loaded = NodeKey::load_or_create(&path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = fs::metadata(&path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "the node key is readable by other users; chmod 600 it"
            );
        }
    }
    Ok(loaded)
}

/// Reads the generated admin token, creating it (32 random bytes, hex, mode 0600) on first use.
/// Returns the token and the file's path.
pub fn generated_token(dir: &Path) -> io::Result<(String, PathBuf)> {
    let path = dir.join(TOKEN_FILE);
    match fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => return Ok((token.trim().to_owned(), path)),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(io::Error::other)?;
    let token = hex::encode(bytes);
    persist::write_atomic(&path, format!("{token}\n").as_bytes(), 0o600)?;
    Ok((token, path))
}

/// The ready file: how tools and tests find a running node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoints {
    /// The node id at start.
    pub node_id: String,
    /// Server process id.
    pub pid: u32,
    /// HTTP address reachable from this machine, e.g. `127.0.0.1:8091`.
    pub http: String,
    /// libp2p PeerId.
    pub peer_id: String,
    /// libp2p listen multiaddrs (empty when federation is off).
    pub p2p: Vec<String>,
    /// The egress proxy's address, when it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<String>,
}

/// The address local clients should use for a listener bound to `bound`: wildcard binds are
/// reached through loopback.
pub fn local_http_addr(bound: SocketAddr) -> SocketAddr {
    let ip = bound.ip();
    let ip = if ip.is_unspecified() {
        match ip {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        }
    } else {
        ip
    };
    SocketAddr::new(ip, bound.port())
}

/// Writes the ready file atomically.
pub fn write_endpoints(dir: &Path, endpoints: &Endpoints) -> io::Result<()> {
    persist::save_json(&dir.join(ENDPOINTS_FILE), endpoints)
}

/// Removes the ready file (clean shutdown).
pub fn remove_endpoints(dir: &Path) {
    if let Err(e) = fs::remove_file(dir.join(ENDPOINTS_FILE))
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(error = %e, "could not remove endpoints.json");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_generated_once_and_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (first, path) = generated_token(dir.path()).expect("generate");
        assert_eq!(first.len(), 64);
        let (second, _) = generated_token(dir.path()).expect("reuse");
        assert_eq!(first, second);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(path).expect("meta").permissions().mode() & 0o777, 0o600);
        }
    }

    #[test]
    fn a_lost_key_beside_existing_state_is_refused_unless_a_new_identity_is_asked_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (key, created) = node_key(dir.path(), false).expect("first start");
        assert!(created);
        fs::write(dir.path().join(crate::journal::FILE), b"").expect("state");
        let (again, created) = node_key(dir.path(), false).expect("restart");
        assert_eq!((again.public_b64(), created), (key.public_b64(), false));
        fs::remove_file(dir.path().join(KEY_FILE)).expect("lose the key");
        let refused = node_key(dir.path(), false).map(|_| ()).expect_err("refused");
        assert!(refused.to_string().contains("--new-identity"), "{refused}");
        assert!(!dir.path().join(KEY_FILE).exists(), "nothing written");
        let (new, created) = node_key(dir.path(), true).expect("asked for");
        assert!(created && new.public_b64() != key.public_b64());
    }

    #[test]
    fn wildcard_binds_are_reached_over_loopback() {
        let any: SocketAddr = "0.0.0.0:8091".parse().expect("addr");
        assert_eq!(local_http_addr(any).to_string(), "127.0.0.1:8091");
        let v6: SocketAddr = "[::]:1".parse().expect("addr");
        assert_eq!(local_http_addr(v6).to_string(), "[::1]:1");
    }
}
