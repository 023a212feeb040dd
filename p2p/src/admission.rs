//! The Home's roster: which key may work for which node id. Nodes that advertise but are not on
//! it are `pending`; a revoked id stays refused until admitted again.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::node_id::NodeId;

/// A node's standing at the Home.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Admission {
    /// Admitted with the key it advertises.
    Admitted,
    /// Advertising, not admitted.
    Pending,
    /// Revoked.
    Revoked,
    /// Admitted with another key than the one it advertises now.
    KeyMismatch,
}

impl Admission {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Admission::Admitted => "admitted",
            Admission::Pending => "pending",
            Admission::Revoked => "revoked",
            Admission::KeyMismatch => "key_mismatch",
        }
    }
}

/// Persisted roster (`roster.json`). Keys are base64 ed25519 public keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Roster {
    /// Admitted id → key.
    pub admitted: BTreeMap<NodeId, String>,
    /// Revoked id → the key it had.
    pub revoked: BTreeMap<NodeId, String>,
}

impl Roster {
    /// Admits `key` for `id` (lifting a revocation). Returns whether anything changed.
    pub fn admit(&mut self, id: &NodeId, key: &str) -> bool {
        let lifted = self.revoked.remove(id).is_some();
        let changed = self.admitted.insert(id.clone(), key.to_owned()).as_deref() != Some(key);
        lifted || changed
    }

    /// Revokes `id`; returns the key it was admitted with, if it was.
    pub fn revoke(&mut self, id: &NodeId) -> Option<String> {
        let key = self.admitted.remove(id)?;
        self.revoked.insert(id.clone(), key.clone());
        Some(key)
    }

    /// The standing of `id` advertising `key`.
    pub fn status(&self, id: &NodeId, key: &str) -> Admission {
        match (self.admitted.get(id), self.revoked.contains_key(id)) {
            (Some(k), _) if k == key => Admission::Admitted,
            (Some(_), _) => Admission::KeyMismatch,
            (None, true) => Admission::Revoked,
            (None, false) => Admission::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admit_revoke_and_key_changes() {
        let id = NodeId::parse("w1").expect("id");
        let mut r = Roster::default();
        assert_eq!(r.status(&id, "k1"), Admission::Pending);
        assert!(r.admit(&id, "k1"));
        assert!(!r.admit(&id, "k1"), "admitting again changes nothing");
        assert_eq!(r.status(&id, "k1"), Admission::Admitted);
        assert_eq!(r.status(&id, "k2"), Admission::KeyMismatch);
        assert_eq!(r.revoke(&id).as_deref(), Some("k1"));
        assert_eq!(r.status(&id, "k1"), Admission::Revoked);
        assert_eq!(r.revoke(&id), None);
        assert!(r.admit(&id, "k2"));
        assert_eq!(r.status(&id, "k2"), Admission::Admitted);
    }
}
