//! The node's ed25519 key. The same key signs adverts and is the libp2p identity, so the PeerId
//! and the advert key always belong together.

use std::{fmt, fs, io, path::Path};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use crate::persist;

/// The node's signing key. `Debug` never prints the secret.
#[derive(Clone)]
pub struct NodeKey {
    signing: SigningKey,
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKey").field("public", &self.public_b64()).finish()
    }
}

impl NodeKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> io::Result<Self> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(io::Error::other)?;
        Ok(Self::from_secret(secret))
    }

    /// A key from its 32 secret bytes.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self { signing: SigningKey::from_bytes(&secret) }
    }

    /// Loads the key stored at `path` (base64 of the 32 secret bytes), or creates one there with
    /// mode 0600. Returns the key and whether it was created.
    pub fn load_or_create(path: &Path) -> io::Result<(Self, bool)> {
        match fs::read_to_string(path) {
            Ok(text) => {
                let bytes = B64.decode(text.trim()).map_err(|e| invalid(path, &e.to_string()))?;
                let secret: [u8; 32] =
                    bytes.try_into().map_err(|_| invalid(path, "expected 32 key bytes"))?;
                Ok((Self::from_secret(secret), false))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let key = Self::generate()?;
                let text = format!("{}\n", B64.encode(key.signing.to_bytes()));
                persist::write_atomic(path, text.as_bytes(), 0o600)?;
                Ok((key, true))
            }
            Err(e) => Err(e),
        }
    }

    /// The public half.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// Standard base64 of the 32-byte public key, as carried in envelopes.
    pub fn public_b64(&self) -> String {
        B64.encode(self.verifying_key().to_bytes())
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> ed25519_dalek::Signature {
        self.signing.sign(message)
    }

    /// The libp2p keypair for the same key.
    pub fn libp2p_keypair(&self) -> libp2p::identity::Keypair {
        let mut secret = self.signing.to_bytes();
        // `ed25519_from_bytes` only fails on a wrong length; ours is always 32 bytes.
        #[allow(clippy::expect_used)]
        libp2p::identity::Keypair::ed25519_from_bytes(&mut secret)
            .expect("32-byte ed25519 secret is always valid")
    }

    /// The libp2p PeerId derived from this key (from the public half: no scalar multiplication).
    pub fn peer_id(&self) -> libp2p::PeerId {
        let public = self.verifying_key().to_bytes();
        match libp2p::identity::ed25519::PublicKey::try_from_bytes(&public) {
            Ok(public) => libp2p::identity::PublicKey::from(public).to_peer_id(),
            // A verifying key of ed25519-dalek is always a valid libp2p one.
            Err(_) => self.libp2p_keypair().public().to_peer_id(),
        }
    }
}

fn invalid(path: &Path, why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{}: {why}", path.display()))
}

/// The 32 bytes of a base64 ed25519 public key, without checking that they are a point of the
/// curve (cheap: for comparing a claimed key with a known one).
pub fn public_key_bytes_from_b64(text: &str) -> Option<[u8; 32]> {
    use base64::{Engine, engine::general_purpose::STANDARD as B64};
    <[u8; 32]>::try_from(B64.decode(text.trim()).ok()?).ok()
}

/// A base64 ed25519 public key (32 bytes), as adverts, rosters and `home_key` carry it.
pub fn public_key_from_b64(text: &str) -> Option<[u8; 32]> {
    use base64::{Engine, engine::general_purpose::STANDARD as B64};
    let bytes = B64.decode(text.trim()).ok()?;
    let key = <[u8; 32]>::try_from(bytes).ok()?;
    VerifyingKey::from_bytes(&key).ok().map(|_| key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_with_0600_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.key");
        let (first, created) = NodeKey::load_or_create(&path).expect("create");
        assert!(created);
        let (second, created) = NodeKey::load_or_create(&path).expect("load");
        assert!(!created);
        assert_eq!(first.public_b64(), second.public_b64());
        assert_eq!(first.peer_id(), second.peer_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[test]
    fn damaged_key_file_is_refused_not_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.key");
        fs::write(&path, "c2hvcnQ=\n").expect("write");
        assert!(NodeKey::load_or_create(&path).is_err());
        assert_eq!(fs::read_to_string(&path).expect("read"), "c2hvcnQ=\n");
    }

    #[test]
    fn debug_hides_the_secret() {
        let key = NodeKey::from_secret([7; 32]);
        let shown = format!("{key:?}");
        assert!(shown.contains(&key.public_b64()));
        assert!(!shown.contains(&B64.encode([7u8; 32])));
    }
}
