//! The Home's policy authority, with no IO and no clock: signed policy documents with a strictly
//! increasing `policy_epoch`, and the pinned Home key a node obeys.
//!
//! The Home signs a [`PolicyDoc`] (roster of admitted keys, the capsules it hands out) in the
//! ordinary envelope. A node applies a document only if it is signed by the key it pinned and
//! carries a higher epoch than the one it holds. The pin comes from `[cluster] home_key`, or is
//! taken on first admission: an unpinned node pins the first Home whose document admits this
//! node's own key. Any node re-serves the latest document it applied, so late joiners and
//! nodes back from a partition catch up from whoever they reach.

use std::collections::BTreeMap;

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    node_id::NodeId,
    wire::{self, Message, Reason},
};

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

/// How the Home key came to be pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PinSource {
    /// `[cluster] home_key`.
    Config,
    /// Trust on first admission: the first Home whose document admitted this node.
    FirstAdmission,
    /// This node is the Home.
    Own,
}

/// The pinned Home key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin {
    /// The key.
    pub key: [u8; 32],
    /// Where it came from.
    pub source: PinSource,
}

/// The document in force, with the envelope it came in (re-served to others as is).
#[derive(Debug, Clone, PartialEq)]
pub struct Current {
    /// The document.
    pub doc: PolicyDoc,
    /// Its envelope, exactly as signed.
    pub envelope: Vec<u8>,
}

/// Persisted form (`policy.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StoredPolicy {
    /// Base64 pinned key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home_key: Option<String>,
    /// Where the pin came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_by: Option<PinSource>,
    /// The envelope of the document in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envelope: Option<String>,
}

/// What applying a document did.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// The epoch now in force.
    pub epoch: u64,
    /// The Home's id.
    pub home: NodeId,
    /// The Home key was pinned by this document (trust on first admission).
    pub pinned: bool,
}

/// A node's view of the Home's authority.
#[derive(Debug, Clone)]
pub struct PolicyState {
    workspace: String,
    self_id: NodeId,
    self_key: String,
    pin: Option<Pin>,
    current: Option<Current>,
    /// Highest epoch seen in a document this node could judge (applied or not): a heartbeat
    /// announcing more is worth a sync.
    heard: u64,
}

impl PolicyState {
    /// A node `self_id` with key `self_key`; `configured` is `[cluster] home_key`, which wins
    /// over any pin taken on first admission.
    pub fn new(
        workspace: &str,
        self_id: NodeId,
        self_key: [u8; 32],
        configured: Option<[u8; 32]>,
    ) -> Self {
        Self {
            workspace: workspace.to_owned(),
            self_id,
            self_key: B64.encode(self_key),
            pin: configured.map(|key| Pin { key, source: PinSource::Config }),
            current: None,
            heard: 0,
        }
    }

    /// Restores `policy.json`. The stored envelope is verified again; a stored pin yields to a
    /// configured one, and a document not signed by the pinned key is dropped. Returns a
    /// warning when something stored was not restored.
    pub fn restore(&mut self, stored: StoredPolicy) -> Option<String> {
        let stored_pin = stored
            .home_key
            .as_deref()
            .and_then(|k| B64.decode(k).ok())
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .zip(stored.pinned_by)
            .map(|(key, source)| Pin { key, source });
        let mut warning = None;
        match (self.pin, stored_pin) {
            (None, pin) => self.pin = pin.filter(|p| p.source != PinSource::Config),
            (Some(configured), Some(stored)) if configured.key != stored.key => {
                warning = Some(
                    "the configured home_key differs from the pinned one; the configured key wins"
                        .to_owned(),
                );
            }
            _ => {}
        }
        let Some(envelope) = stored.envelope else { return warning };
        match wire::open(envelope.as_bytes(), &self.workspace) {
            Ok(wire::Opened { key, message: Message::Policy(doc) })
                if self.pin.is_some_and(|p| p.key == key.to_bytes()) =>
            {
                self.heard = doc.policy_epoch;
                self.current = Some(Current { doc, envelope: envelope.into_bytes() });
            }
            _ => {
                warning = Some(
                    "the stored policy document is not signed by the pinned Home; dropped"
                        .to_owned(),
                )
            }
        }
        warning
    }

    /// The persisted form.
    pub fn stored(&self) -> StoredPolicy {
        StoredPolicy {
            home_key: self.pin.map(|p| B64.encode(p.key)),
            pinned_by: self.pin.map(|p| p.source),
            envelope: self
                .current
                .as_ref()
                .map(|c| String::from_utf8_lossy(&c.envelope).into_owned()),
        }
    }

    /// A hello gave this node a new id.
    pub fn set_self_id(&mut self, id: NodeId) {
        self.self_id = id;
    }

    /// The pinned Home key.
    pub fn pin(&self) -> Option<Pin> {
        self.pin
    }

    /// The document in force.
    pub fn current(&self) -> Option<&Current> {
        self.current.as_ref()
    }

    /// The epoch in force (0: none).
    pub fn epoch(&self) -> u64 {
        self.current.as_ref().map_or(0, |c| c.doc.policy_epoch)
    }

    /// Whether a peer announcing `epoch` has a document worth asking for.
    pub fn behind(&self, epoch: u64) -> bool {
        epoch > self.epoch().max(self.heard)
    }

    /// Judges a document signed by `key` (already verified as its envelope's signer).
    pub fn receive(
        &mut self,
        key: [u8; 32],
        doc: PolicyDoc,
        envelope: &[u8],
    ) -> Result<Applied, Reason> {
        let pinned = match self.pin {
            Some(pin) if pin.key != key => return Err(Reason::UntrustedHome),
            Some(_) => false,
            None => {
                self.heard = self.heard.max(doc.policy_epoch);
                if doc.roster.get(&self.self_id) != Some(&self.self_key) {
                    return Err(Reason::NotAdmitted);
                }
                true
            }
        };
        self.heard = self.heard.max(doc.policy_epoch);
        if let Some(current) = &self.current
            && doc.policy_epoch <= current.doc.policy_epoch
        {
            return Err(if current.envelope == envelope {
                Reason::Duplicate
            } else {
                Reason::Replayed
            });
        }
        if pinned {
            self.pin = Some(Pin { key, source: PinSource::FirstAdmission });
        }
        let applied = Applied { epoch: doc.policy_epoch, home: doc.id.clone(), pinned };
        self.current = Some(Current { doc, envelope: envelope.to_vec() });
        Ok(applied)
    }

    /// This node is the Home and signed `doc` into `envelope`: it is in force here at once.
    pub fn issued(&mut self, key: [u8; 32], doc: PolicyDoc, envelope: Vec<u8>) {
        self.pin = Some(Pin { key, source: PinSource::Own });
        self.heard = self.heard.max(doc.policy_epoch);
        self.current = Some(Current { doc, envelope });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::NodeKey;

    fn id(s: &str) -> NodeId {
        NodeId::parse(s).expect("id")
    }

    fn doc(epoch: u64, roster: &[(&str, &NodeKey)]) -> PolicyDoc {
        PolicyDoc {
            id: id("home"),
            workspace: "lab".into(),
            policy_epoch: epoch,
            issued_ms: 0,
            roster: roster.iter().map(|(i, k)| (id(i), k.public_b64())).collect(),
            capsules: Vec::new(),
        }
    }

    fn offer(state: &mut PolicyState, home: &NodeKey, d: PolicyDoc) -> Result<Applied, Reason> {
        let envelope = wire::seal(home, "lab", &Message::Policy(d.clone()));
        state.receive(home.verifying_key().to_bytes(), d, &envelope)
    }

    #[test]
    fn pins_the_first_home_that_admits_it_then_obeys_only_newer_epochs() {
        let (home, rogue, me) = (
            NodeKey::from_secret([1; 32]),
            NodeKey::from_secret([2; 32]),
            NodeKey::from_secret([3; 32]),
        );
        let mut state = PolicyState::new("lab", id("w1"), me.verifying_key().to_bytes(), None);
        assert_eq!(offer(&mut state, &home, doc(1, &[])), Err(Reason::NotAdmitted));
        assert!(!state.behind(1) && state.behind(2));
        let applied = offer(&mut state, &home, doc(2, &[("w1", &me)])).expect("admitted");
        assert!(applied.pinned);
        assert_eq!(offer(&mut state, &rogue, doc(9, &[("w1", &me)])), Err(Reason::UntrustedHome));
        assert_eq!(offer(&mut state, &home, doc(2, &[])), Err(Reason::Replayed));
        assert_eq!(offer(&mut state, &home, doc(1, &[("w1", &me)])), Err(Reason::Replayed));
        assert!(offer(&mut state, &home, doc(3, &[])).is_ok(), "revoked nodes still follow it");
        assert_eq!(state.epoch(), 3);

        let mut restarted = PolicyState::new("lab", id("w1"), me.verifying_key().to_bytes(), None);
        assert_eq!(restarted.restore(state.stored()), None);
        assert_eq!(restarted.epoch(), 3);
        assert_eq!(offer(&mut restarted, &rogue, doc(4, &[])), Err(Reason::UntrustedHome));
    }

    #[test]
    fn a_configured_home_key_wins_over_a_stored_pin() {
        let (home, other, me) = (
            NodeKey::from_secret([1; 32]),
            NodeKey::from_secret([2; 32]),
            NodeKey::from_secret([3; 32]),
        );
        let mut state = PolicyState::new("lab", id("w1"), me.verifying_key().to_bytes(), None);
        offer(&mut state, &home, doc(5, &[("w1", &me)])).expect("admitted");
        let configured = Some(other.verifying_key().to_bytes());
        let mut restarted =
            PolicyState::new("lab", id("w1"), me.verifying_key().to_bytes(), configured);
        assert!(restarted.restore(state.stored()).is_some(), "the override is reported");
        assert_eq!(restarted.epoch(), 0, "the old Home's document is dropped");
        assert!(
            offer(&mut restarted, &other, doc(1, &[])).is_ok(),
            "no admission needed when configured"
        );
    }
}
