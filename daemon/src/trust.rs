//! Trust stores: `{"issuers":[{"id":"...","alg":"ed25519","key_b64":"..."}]}`, the format shared
//! by `ARW_TRUST_NODES` (which key may speak for which node id) and the capsule trust store.

use std::{collections::BTreeMap, path::Path};

use arw_p2p::{
    capsule::{IssuerKey, TrustStore},
    node_id::NodeId,
};

/// Reads a node trust store: node id → ed25519 public key. Any invalid entry is an error naming it.
pub fn node_keys(path: &Path) -> Result<BTreeMap<NodeId, [u8; 32]>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let store = TrustStore::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut keys = BTreeMap::new();
    for issuer in store.issuers() {
        let where_ = format!("{}: issuer {:?}", path.display(), issuer.id);
        let id = NodeId::parse(&issuer.id).map_err(|e| format!("{where_}: {e}"))?;
        match store.key(&issuer.id) {
            Some(IssuerKey::Ed25519(key)) => keys.insert(id, key.to_bytes()),
            _ => return Err(format!("{where_}: node keys must be ed25519, not {:?}", issuer.alg)),
        };
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::{Engine, engine::general_purpose::STANDARD as B64};

    #[test]
    fn reads_valid_stores_and_names_bad_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("trust.json");
        let public = arw_p2p::identity::NodeKey::from_secret([7; 32]).verifying_key().to_bytes();
        let key = B64.encode(public);
        std::fs::write(
            &path,
            format!(r#"{{"issuers":[{{"id":"n1","alg":"ed25519","key_b64":"{key}"}}]}}"#),
        )
        .expect("write");
        let keys = node_keys(&path).expect("valid");
        assert_eq!(keys.get("n1"), Some(&public));
        std::fs::write(&path, r#"{"issuers":[{"id":"n1","alg":"ed25519","key_b64":"c2hvcnQ="}]}"#)
            .expect("write");
        let err = node_keys(&path).expect_err("short key");
        assert!(err.contains("n1") && err.contains("not a valid ed25519 key"), "{err}");
    }
}
