//! Trust stores: `{"issuers":[{"id":"...","alg":"ed25519","key_b64":"..."}]}`, the format shared
//! by `ARW_TRUST_NODES` (which key may speak for which node id) and the capsule trust store.

use std::{collections::BTreeMap, path::Path};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use serde::Deserialize;

use arw_p2p::node_id::NodeId;

#[derive(Debug, Deserialize)]
struct Store {
    #[serde(default)]
    issuers: Vec<Issuer>,
}

#[derive(Debug, Deserialize)]
struct Issuer {
    id: String,
    alg: String,
    key_b64: String,
}

/// Reads a node trust store: node id → ed25519 public key. Any invalid entry is an error naming it.
pub fn node_keys(path: &Path) -> Result<BTreeMap<NodeId, [u8; 32]>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let store: Store =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut keys = BTreeMap::new();
    for issuer in store.issuers {
        let where_ = format!("{}: issuer {:?}", path.display(), issuer.id);
        let id = NodeId::parse(&issuer.id).map_err(|e| format!("{where_}: {e}"))?;
        if issuer.alg != "ed25519" {
            return Err(format!("{where_}: node keys must be ed25519, not {:?}", issuer.alg));
        }
        let key = B64
            .decode(issuer.key_b64.trim())
            .ok()
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .ok_or_else(|| format!("{where_}: key_b64 must be 32 bytes of base64"))?;
        keys.insert(id, key);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_valid_stores_and_names_bad_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("trust.json");
        let key = B64.encode([7u8; 32]);
        std::fs::write(
            &path,
            format!(r#"{{"issuers":[{{"id":"n1","alg":"ed25519","key_b64":"{key}"}}]}}"#),
        )
        .expect("write");
        let keys = node_keys(&path).expect("valid");
        assert_eq!(keys.get("n1"), Some(&[7u8; 32]));
        std::fs::write(&path, r#"{"issuers":[{"id":"n1","alg":"ed25519","key_b64":"c2hvcnQ="}]}"#)
            .expect("write");
        let err = node_keys(&path).expect_err("short key");
        assert!(err.contains("n1") && err.contains("32 bytes"), "{err}");
    }
}
