//! The hierarchy: this node's role, parent and children, the operator's hello identity and the
//! peers learned from negotiation. Plain data and pure transitions; the node actor persists it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::{
    node_id::{InvalidNodeId, NodeId},
    role::{Role, UnknownRole},
};

/// How many hello nonces are remembered for replay detection.
pub const NONCE_MEMORY: usize = 1024;

/// `POST /admin/hierarchy/hello`: the operator configures this node's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CoreHello {
    /// The node id to use (must match an explicitly configured id).
    pub id: String,
    /// Role name or alias.
    pub role: String,
    /// Declared capabilities, advertised as `capabilities.declared`.
    pub capabilities: Vec<String>,
    /// Scope tags, advertised as `tags`.
    pub scope_tags: Vec<String>,
    /// Operator's monotonic counter; lower than the stored one is refused.
    pub epoch: u64,
    /// Fresh per hello; a repeat at the same epoch is refused.
    pub nonce: String,
}

/// `POST /admin/hierarchy/offer`: a node offers to join under a parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CoreOffer {
    /// The offering node.
    pub from_id: String,
    /// Role it proposes to take.
    pub proposed_role: String,
    /// The parent it asks for; when it is this node, the offerer becomes a child.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_hint: Option<String>,
    /// Opaque shard ranges.
    pub shard_ranges: Vec<serde_json::Value>,
    /// Capacity the offerer claims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_hint: Option<u32>,
}

/// `POST /admin/hierarchy/accept`: a parent accepts a child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CoreAccept {
    /// The accepted child.
    pub child_id: String,
    /// The accepting parent.
    pub parent_id: String,
    /// The child's role.
    pub role: String,
    /// The parent's epoch when it accepted.
    pub epoch: u64,
}

/// A refused hierarchy request. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HierarchyError {
    /// The role is neither canonical nor an alias.
    #[error(transparent)]
    UnknownRole(#[from] UnknownRole),
    /// An id does not match the node-id alphabet.
    #[error(transparent)]
    InvalidNodeId(#[from] InvalidNodeId),
    /// The hello nonce is blank.
    #[error("nonce must not be blank")]
    BlankNonce,
    /// The hello names another id than the one configured explicitly.
    #[error("hello id {got:?} does not match this node's configured id {expected:?}")]
    NodeIdMismatch {
        /// This node's configured id.
        expected: String,
        /// The id the hello carried.
        got: String,
    },
    /// The hello epoch is below the stored one.
    #[error("hello epoch {got} is older than the stored epoch {stored}")]
    StaleEpoch {
        /// The stored hello epoch.
        stored: u64,
        /// The epoch the hello carried.
        got: u64,
    },
    /// The nonce was already used at this epoch.
    #[error("nonce already used at epoch {epoch}")]
    NonceReplay {
        /// The epoch of the replayed hello.
        epoch: u64,
    },
}

/// A peer learned from an offer, an accept or a remote advert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNode {
    /// The peer's node id.
    pub id: String,
    /// Its role as last seen.
    pub role: Role,
    /// Its scope tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Its parent, when known.
    #[serde(default)]
    pub parent: Option<String>,
    /// Its children, when known.
    #[serde(default)]
    pub children: Vec<String>,
}

/// Persisted hierarchy state (`hierarchy.json`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Hierarchy {
    /// Local change counter: role change, hello, child added, parent link.
    pub epoch: u64,
    /// This node's role.
    pub role: Role,
    /// This node's parent.
    pub parent: Option<String>,
    /// This node's children.
    pub children: BTreeSet<String>,
    /// Scope tags from the last hello.
    pub tags: Vec<String>,
    /// Declared capabilities from the last hello.
    pub capabilities: Vec<String>,
    /// Epoch of the last accepted hello.
    pub hello_epoch: Option<u64>,
    /// Node id assigned by a hello when none is configured.
    pub assigned_id: Option<NodeId>,
    /// Recent `(epoch, nonce)` pairs, oldest first.
    pub nonces: VecDeque<(u64, String)>,
    /// Peers learned from negotiation.
    pub peers: BTreeMap<String, PeerNode>,
}

/// What a role change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleChange {
    /// The role before.
    pub previous: Role,
    /// The role now.
    pub role: Role,
}

impl RoleChange {
    /// Whether the role actually changed.
    pub fn changed(&self) -> bool {
        self.previous != self.role
    }
}

/// What an accepted hello did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloOutcome {
    /// The role transition (may be unchanged).
    pub role: RoleChange,
    /// The newly assigned node id, when the hello changed it.
    pub new_id: Option<NodeId>,
}

impl Hierarchy {
    /// Sets the role. Bumps the epoch only when it changes.
    pub fn set_role(&mut self, requested: &str) -> Result<RoleChange, HierarchyError> {
        let role: Role = requested.parse()?;
        let change = RoleChange { previous: self.role, role };
        if change.changed() {
            self.role = role;
            self.epoch += 1;
        }
        Ok(change)
    }

    /// Applies an operator hello for the node currently known as `self_id`.
    ///
    /// `id_explicit` is true when the id came from the environment or the config file; then the
    /// hello must name it. Otherwise the hello assigns the id.
    pub fn hello(
        &mut self,
        hello: &CoreHello,
        self_id: &NodeId,
        id_explicit: bool,
    ) -> Result<HelloOutcome, HierarchyError> {
        let id = NodeId::parse(&hello.id)?;
        let role: Role = hello.role.parse()?;
        if hello.nonce.trim().is_empty() {
            return Err(HierarchyError::BlankNonce);
        }
        if id_explicit && &id != self_id {
            return Err(HierarchyError::NodeIdMismatch {
                expected: self_id.to_string(),
                got: id.to_string(),
            });
        }
        if let Some(stored) = self.hello_epoch
            && hello.epoch < stored
        {
            return Err(HierarchyError::StaleEpoch { stored, got: hello.epoch });
        }
        if self.nonces.iter().any(|(e, n)| *e == hello.epoch && *n == hello.nonce) {
            return Err(HierarchyError::NonceReplay { epoch: hello.epoch });
        }

        self.nonces.push_back((hello.epoch, hello.nonce.clone()));
        while self.nonces.len() > NONCE_MEMORY {
            self.nonces.pop_front();
        }
        let new_id = (!id_explicit && &id != self_id).then(|| id.clone());
        if !id_explicit {
            self.assigned_id = Some(id);
        }
        self.hello_epoch = Some(hello.epoch);
        self.capabilities = hello.capabilities.clone();
        self.tags = hello.scope_tags.clone();
        let change = RoleChange { previous: self.role, role };
        self.role = role;
        self.epoch += 1;
        Ok(HelloOutcome { role: change, new_id })
    }

    /// Records an offer. When it names this node as parent, the offerer becomes a child.
    /// Returns whether the epoch changed.
    pub fn offer(&mut self, offer: &CoreOffer, self_id: &NodeId) -> Result<bool, HierarchyError> {
        let from = NodeId::parse(&offer.from_id)?;
        let role: Role = offer.proposed_role.parse()?;
        if let Some(hint) = &offer.parent_hint {
            NodeId::parse(hint)?;
        }
        let peer = self.peer_mut(&from, role);
        peer.parent = offer.parent_hint.clone();
        let added = offer.parent_hint.as_deref() == Some(self_id.as_str())
            && self.children.insert(from.to_string());
        if added {
            self.epoch += 1;
        }
        Ok(added)
    }

    /// Records an accept. `parent_id` = self adds a child; `child_id` = self links the parent.
    /// Returns whether the epoch changed.
    pub fn accept(
        &mut self,
        accept: &CoreAccept,
        self_id: &NodeId,
    ) -> Result<bool, HierarchyError> {
        let child = NodeId::parse(&accept.child_id)?;
        let parent = NodeId::parse(&accept.parent_id)?;
        let role: Role = accept.role.parse()?;
        let mut changed = false;
        if &parent == self_id {
            self.peer_mut(&child, role).parent = Some(parent.to_string());
            changed |= self.children.insert(child.to_string());
        }
        if &child == self_id && self.parent.as_deref() != Some(parent.as_str()) {
            self.parent = Some(parent.to_string());
            changed = true;
        }
        if changed {
            self.epoch += 1;
        }
        Ok(changed)
    }

    fn peer_mut(&mut self, id: &NodeId, role: Role) -> &mut PeerNode {
        let peer = self.peers.entry(id.to_string()).or_insert_with(|| PeerNode {
            id: id.to_string(),
            role,
            tags: Vec::new(),
            parent: None,
            children: Vec::new(),
        });
        peer.role = role;
        peer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> NodeId {
        NodeId::parse(s).expect("valid id")
    }

    fn hello(epoch: u64, nonce: &str) -> CoreHello {
        CoreHello {
            id: "worker-gpu-01".into(),
            role: "worker".into(),
            capabilities: vec!["gpu:rtx-4090".into()],
            scope_tags: vec!["gpu".into()],
            epoch,
            nonce: nonce.into(),
        }
    }

    #[test]
    fn role_change_bumps_epoch_only_when_it_changes() {
        let mut h = Hierarchy::default();
        assert!(!h.set_role("edge").expect("edge").changed());
        assert_eq!(h.epoch, 0);
        let change = h.set_role("home").expect("home");
        assert_eq!((change.previous, change.role), (Role::Edge, Role::Root));
        assert_eq!(h.epoch, 1);
    }

    #[test]
    fn unknown_role_changes_nothing() {
        let mut h = Hierarchy::default();
        let before = h.clone();
        assert!(matches!(h.set_role("admin"), Err(HierarchyError::UnknownRole(_))));
        assert_eq!(h, before);
    }

    #[test]
    fn hello_stores_identity_and_refuses_stale_and_replayed() {
        let mut h = Hierarchy::default();
        let me = id("host");
        let out = h.hello(&hello(3, "n1"), &me, false).expect("first hello");
        assert_eq!(out.new_id, Some(id("worker-gpu-01")));
        assert_eq!(h.role, Role::Edge);
        assert_eq!(h.tags, vec!["gpu".to_string()]);
        assert_eq!(h.hello_epoch, Some(3));

        let me = id("worker-gpu-01");
        assert_eq!(
            h.hello(&hello(3, "n1"), &me, false),
            Err(HierarchyError::NonceReplay { epoch: 3 })
        );
        assert_eq!(
            h.hello(&hello(2, "n2"), &me, false),
            Err(HierarchyError::StaleEpoch { stored: 3, got: 2 })
        );
        // Same nonce at a newer epoch is a different hello.
        assert!(h.hello(&hello(4, "n1"), &me, false).is_ok());
    }

    #[test]
    fn hello_must_match_an_explicit_id() {
        let mut h = Hierarchy::default();
        let err = h.hello(&hello(0, "n"), &id("home-east"), true);
        assert!(matches!(err, Err(HierarchyError::NodeIdMismatch { .. })));
        assert_eq!(h, Hierarchy::default());
    }

    #[test]
    fn nonce_memory_is_bounded() {
        let mut h = Hierarchy::default();
        let me = id("worker-gpu-01");
        for i in 0..(NONCE_MEMORY + 10) {
            h.hello(&hello(0, &format!("n{i}")), &me, false).expect("hello");
        }
        assert_eq!(h.nonces.len(), NONCE_MEMORY);
    }

    #[test]
    fn offer_and_accept_bump_epoch_only_on_new_links() {
        let mut h = Hierarchy::default();
        let me = id("root-1");
        let offer = CoreOffer {
            from_id: "edge-7".into(),
            proposed_role: "edge".into(),
            parent_hint: Some("root-1".into()),
            shard_ranges: vec![],
            capacity_hint: Some(8),
        };
        assert!(h.offer(&offer, &me).expect("offer"));
        assert!(!h.offer(&offer, &me).expect("offer again"));
        let accept = CoreAccept {
            child_id: "edge-7".into(),
            parent_id: "root-1".into(),
            role: "edge".into(),
            epoch: 4,
        };
        assert!(!h.accept(&accept, &me).expect("accept of a known child"));
        assert_eq!(h.epoch, 1);
        assert_eq!(h.peers["edge-7"].parent.as_deref(), Some("root-1"));

        let mut child = Hierarchy::default();
        assert!(child.accept(&accept, &id("edge-7")).expect("parent link"));
        assert_eq!(child.parent.as_deref(), Some("root-1"));
    }
}
