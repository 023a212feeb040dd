//! The Home's policy authority, with no IO and no clock: signed policy documents with a strictly
//! increasing `policy_epoch`, and the pinned Home key a node obeys.
//!
//! The Home signs a [`PolicyDoc`] (roster of admitted keys, the capsules it hands out) in the
//! ordinary envelope. A node applies a document only if it is signed by the key it pinned and
//! carries a higher epoch than the one it holds. The pin comes from `[cluster] home_key`, or
//! from the operator trusting a pending claim (`POST /admin/cluster/trust-home`): a document
//! from a node advertising role `root` that admits this node's own key is held as a claim until
//! then. Only with `[cluster] trust_first_home` does an unpinned node pin the first such Home
//! by itself (trust on first admission). Over libp2p any
//! node re-serves the latest document it applied (over NATS the Home answers), so late joiners
//! and nodes back from a partition catch up from whoever they reach.

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use serde::{Deserialize, Serialize};

use crate::{
    node_id::NodeId,
    wire::{self, Message, Reason},
};

pub mod doc;

pub use doc::{PolicyCapsule, PolicyContent, PolicyDoc};

/// How the Home key came to be pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PinSource {
    /// `[cluster] home_key`.
    Config,
    /// Trust on first admission: the first Home whose document admitted this node
    /// (`[cluster] trust_first_home`).
    FirstAdmission,
    /// The operator trusted a pending claim (`POST /admin/cluster/trust-home`).
    Operator,
    /// This node is the Home.
    Own,
}

/// Pending claims held at most (the newest document of each claiming key).
const MAX_CLAIMS: usize = 8;

/// A Home that admitted this node and waits for the operator's trust.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    /// Its key.
    pub key: [u8; 32],
    /// Its newest document, and the envelope it came in.
    pub current: Current,
}

/// The short form of a key operators compare and type: the first 8 bytes of its SHA-256, hex.
pub fn fingerprint(key: &[u8; 32]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(key)[..8])
}

/// Why the operator's trust could not be given or taken back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    /// No pending claim matches.
    #[error("no pending Home claim matches {0}; see pending_homes in /state/cluster")]
    NoSuchClaim(String),
    /// `[cluster] home_key` decides.
    #[error("[cluster] home_key is configured; change it there")]
    Configured,
    /// This node is the Home.
    #[error("this node is the Home; set another role first")]
    OwnHome,
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
    /// `[cluster] home_key`.
    configured: Option<[u8; 32]>,
    /// `[cluster] trust_first_home`.
    trust_first: bool,
    pin: Option<Pin>,
    current: Option<Current>,
    /// Homes that admitted this node, unpinned, awaiting the operator (oldest first).
    claims: Vec<Claim>,
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
            configured,
            trust_first: false,
            pin: configured.map(|key| Pin { key, source: PinSource::Config }),
            current: None,
            claims: Vec::new(),
            heard: 0,
        }
    }

    /// `[cluster] trust_first_home`: pin the first Home that admits this node, unasked.
    pub fn set_trust_first(&mut self, on: bool) {
        self.trust_first = on;
    }

    /// Homes that admitted this node and await the operator's trust.
    pub fn claims(&self) -> &[Claim] {
        &self.claims
    }

    /// The operator trusts the pending claim whose key has `fingerprint` (or is this base64
    /// key): it is pinned, and its document put in force. Returns what was applied.
    pub fn trust(&mut self, fingerprint: &str) -> Result<Applied, TrustError> {
        match self.pin.map(|p| p.source) {
            Some(PinSource::Config) => return Err(TrustError::Configured),
            Some(PinSource::Own) => return Err(TrustError::OwnHome),
            _ => {}
        }
        let wanted = fingerprint.trim();
        let at = self
            .claims
            .iter()
            .position(|c| self::fingerprint(&c.key) == wanted || B64.encode(c.key) == wanted)
            .ok_or_else(|| TrustError::NoSuchClaim(wanted.to_owned()))?;
        let claim = self.claims.remove(at);
        self.claims.clear();
        self.pin = Some(Pin { key: claim.key, source: PinSource::Operator });
        self.heard = self.heard.max(claim.current.doc.policy_epoch);
        let applied = Applied {
            epoch: claim.current.doc.policy_epoch,
            home: claim.current.doc.id.clone(),
            pinned: true,
        };
        self.current = Some(claim.current);
        Ok(applied)
    }

    /// The operator takes back the trust in the pinned Home (given by them, or on first
    /// admission): this node obeys no Home and holds no policy until it trusts one again.
    /// Returns whether anything changed.
    pub fn untrust(&mut self) -> Result<bool, TrustError> {
        match self.pin.map(|p| p.source) {
            Some(PinSource::Config) => Err(TrustError::Configured),
            Some(PinSource::Own) => Err(TrustError::OwnHome),
            None => Ok(!std::mem::take(&mut self.claims).is_empty()),
            Some(_) => {
                self.pin = None;
                self.current = None;
                self.claims.clear();
                Ok(true)
            }
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

    /// What [`PolicyState::stored`] will be once this node, the Home with `key`, has issued
    /// `envelope`: persisted before the document is put in force or sent.
    pub fn stored_if_issued(key: [u8; 32], envelope: &[u8]) -> StoredPolicy {
        StoredPolicy {
            home_key: Some(B64.encode(key)),
            pinned_by: Some(PinSource::Own),
            envelope: Some(String::from_utf8_lossy(envelope).into_owned()),
        }
    }

    /// The epoch the next document this node signs must carry at `now_ms`: above anything it
    /// holds or heard of, and never below the wall clock, so a Home that lost its state still
    /// never signs an epoch twice.
    pub fn next_epoch(&self, now_ms: u64) -> u64 {
        self.epoch().max(self.heard).saturating_add(1).max(now_ms)
    }

    /// Whether this node, holding `key`, may sign policy: not when `[cluster] home_key` names
    /// another Home.
    pub fn may_issue(&self, key: [u8; 32]) -> bool {
        self.configured.is_none_or(|k| k == key)
    }

    /// This node stopped being the Home: it no longer obeys itself, and holds no policy until
    /// its configured Home (or, unconfigured, the first Home to admit it) sends one. Returns
    /// whether anything changed.
    pub fn step_down(&mut self) -> bool {
        if self.pin.is_none_or(|p| p.source != PinSource::Own) {
            return false;
        }
        self.pin = self.configured.map(|key| Pin { key, source: PinSource::Config });
        self.current = None;
        true
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

    /// Judges a document signed by `key` (already verified as its envelope's signer). While
    /// unpinned, the caller passes only documents whose signer advertises role `root` under
    /// the document's id (see `Protocol`), so a forged epoch from anyone else cannot raise what
    /// this node believes it has heard of.
    pub fn receive(
        &mut self,
        key: [u8; 32],
        doc: PolicyDoc,
        envelope: &[u8],
    ) -> Result<Applied, Reason> {
        // Whether this document pins its signer (trust on first admission).
        let first_admission = match self.pin {
            Some(pin) if pin.key != key => return Err(Reason::UntrustedHome),
            Some(_) => false,
            None if doc.roster.get(&self.self_id) != Some(&self.self_key) => {
                self.heard = self.heard.max(doc.policy_epoch);
                return Err(Reason::NotAdmitted);
            }
            None if !self.trust_first => {
                self.hold_claim(key, doc, envelope);
                return Err(Reason::HomeNotTrusted);
            }
            None => true,
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
        if first_admission {
            self.pin = Some(Pin { key, source: PinSource::FirstAdmission });
        }
        let applied =
            Applied { epoch: doc.policy_epoch, home: doc.id.clone(), pinned: first_admission };
        self.current = Some(Current { doc, envelope: envelope.to_vec() });
        Ok(applied)
    }

    /// Keeps `doc` as the newest claim of `key` (at most [`MAX_CLAIMS`] keys, oldest dropped).
    fn hold_claim(&mut self, key: [u8; 32], doc: PolicyDoc, envelope: &[u8]) {
        let newer = |c: &Claim| c.current.doc.policy_epoch >= doc.policy_epoch;
        if self.claims.iter().any(|c| c.key == key && newer(c)) {
            return;
        }
        self.claims.retain(|c| c.key != key);
        if self.claims.len() == MAX_CLAIMS {
            self.claims.remove(0);
        }
        let current = Current { doc, envelope: envelope.to_vec() };
        self.claims.push(Claim { key, current });
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
    use crate::governor::Governor;
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
            routing: Governor::default(),
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
        state.set_trust_first(true);
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
        state.set_trust_first(true);
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

    #[test]
    fn an_admitting_home_is_only_a_claim_until_the_operator_trusts_it() {
        let (home, rogue, me) = (
            NodeKey::from_secret([1; 32]),
            NodeKey::from_secret([2; 32]),
            NodeKey::from_secret([3; 32]),
        );
        let mut state = PolicyState::new("lab", id("w1"), me.verifying_key().to_bytes(), None);
        assert_eq!(offer(&mut state, &rogue, doc(9, &[("w1", &me)])), Err(Reason::HomeNotTrusted));
        assert_eq!(offer(&mut state, &home, doc(3, &[("w1", &me)])), Err(Reason::HomeNotTrusted));
        assert_eq!((state.pin(), state.epoch(), state.claims().len()), (None, 0, 2));
        let print = fingerprint(&home.verifying_key().to_bytes());
        assert_eq!(
            state.trust("0000000000000000"),
            Err(TrustError::NoSuchClaim("0000000000000000".into()))
        );
        let applied = state.trust(&print).expect("trusted");
        assert_eq!((applied.epoch, applied.pinned), (3, true));
        assert_eq!(state.pin().map(|p| p.source), Some(PinSource::Operator));
        assert!(state.claims().is_empty(), "the other claims are dropped");
        assert_eq!(offer(&mut state, &rogue, doc(10, &[("w1", &me)])), Err(Reason::UntrustedHome));
        assert!(offer(&mut state, &home, doc(4, &[])).is_ok());
        // Trust survives a restart, and the operator can take it back.
        let mut restarted = PolicyState::new("lab", id("w1"), me.verifying_key().to_bytes(), None);
        restarted.restore(state.stored());
        assert_eq!(restarted.pin().map(|p| p.source), Some(PinSource::Operator));
        assert_eq!(restarted.untrust(), Ok(true));
        assert_eq!((restarted.pin(), restarted.epoch()), (None, 0));
        let configured = Some(home.verifying_key().to_bytes());
        let mut fixed =
            PolicyState::new("lab", id("w1"), me.verifying_key().to_bytes(), configured);
        assert_eq!(fixed.untrust(), Err(TrustError::Configured));
    }

    #[test]
    fn epochs_never_repeat_and_a_former_home_stops_obeying_itself() {
        let (home, other) = (NodeKey::from_secret([1; 32]), NodeKey::from_secret([2; 32]));
        let public = home.verifying_key().to_bytes();
        let mut state = PolicyState::new("lab", id("home"), public, None);
        assert!(state.may_issue(public));
        let first = state.next_epoch(1_000);
        assert_eq!(first, 1_000, "at least the clock: a Home that lost its state starts above");
        state.issued(public, doc(first, &[]), b"e1".to_vec());
        assert_eq!(
            state.next_epoch(500),
            first + 1,
            "above what it holds, even if the clock is behind"
        );
        assert!(state.step_down());
        assert_eq!((state.pin(), state.epoch()), (None, 0));
        assert!(!state.step_down(), "nothing more to give up");

        let configured = Some(other.verifying_key().to_bytes());
        let mut pinned = PolicyState::new("lab", id("home"), public, configured);
        assert!(!pinned.may_issue(public), "home_key names another Home");
        pinned.issued(public, doc(7, &[]), b"e".to_vec());
        assert!(pinned.step_down());
        assert_eq!(
            pinned.pin().map(|p| p.source),
            Some(PinSource::Config),
            "back to the configured Home"
        );
    }
}
