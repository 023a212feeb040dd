//! The Home's policy document as it travels: plain data, signed in the ordinary envelope.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{governor::Governor, node_id::NodeId};

/// The Home's signed policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyDoc {
    /// The Home's node id.
    pub id: NodeId,
    /// Its workspace.
    pub workspace: String,
    /// Rises strictly with every document the Home signs, across restarts.
    pub policy_epoch: u64,
    /// The Home's clock when signed.
    pub issued_ms: u64,
    /// Admitted node id → base64 ed25519 key.
    #[serde(default)]
    pub roster: BTreeMap<NodeId, String>,
    /// Capsules the Home hands to every node.
    #[serde(default)]
    pub capsules: Vec<PolicyCapsule>,
    /// Routing hints: the Home's governor profile and hints, under each node's own.
    #[serde(default, skip_serializing_if = "Governor::is_empty")]
    pub routing: Governor,
}

/// What the Home decides, as a document carries it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyContent {
    /// Admitted node id → base64 key.
    pub roster: BTreeMap<NodeId, String>,
    /// Capsules handed out.
    pub capsules: Vec<PolicyCapsule>,
    /// Routing hints.
    pub routing: Governor,
}

impl PolicyContent {
    /// Whether `doc` already says exactly this.
    pub fn matches(&self, doc: &PolicyDoc) -> bool {
        doc.roster == self.roster && doc.capsules == self.capsules && doc.routing == self.routing
    }
}

/// A capsule inside a policy document, with the lease the Home gave it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyCapsule {
    /// The capsule JSON as the Home verified it (signature included).
    pub capsule: Value,
    /// When its lease ends (the Home's clock); `None`: no lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_until_ms: Option<u64>,
}
