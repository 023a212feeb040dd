//! One node's side of the federation protocol, with no IO and no clock: what it says (signed
//! adverts, heartbeats, leaves, policy documents, sync requests and answers) and how it treats
//! what it hears (the [`Membership`] core for nodes, the [`PolicyState`] core for the Home's
//! policy). The node actor drives it over a real bus; `arw-simnet` drives the very
//! same code over a simulated network in virtual time.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    cluster::Advert,
    identity::NodeKey,
    membership::{Change, Membership, MembershipConfig, Receipt, Refusal, Verdict},
    node_id::NodeId,
    policy::{PolicyContent, PolicyDoc, PolicyState},
    wire::{self, Beat, Message, Reason},
};

/// Anti-entropy request: what the asker already has (`id → advert seq`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    /// Known advert sequence numbers.
    pub have: BTreeMap<String, u64>,
    /// The policy epoch the asker holds.
    #[serde(default)]
    pub policy_epoch: u64,
}

/// Anti-entropy response: signed envelopes the asker lacks (adverts newer than it listed, and
/// the policy document when it holds an older one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncResponse {
    /// Envelopes exactly as their authors signed them (`adverts` in earlier releases).
    #[serde(alias = "adverts")]
    pub envelopes: Vec<String>,
}

/// A node's protocol state.
#[derive(Debug, Clone)]
pub struct Protocol {
    key: NodeKey,
    workspace: String,
    id: NodeId,
    membership: Membership,
    policy: PolicyState,
    /// `seq` of the latest advert this node signed.
    seq: u64,
    /// Heartbeats (and leaves) since that advert.
    beat: u64,
    /// The latest advert as sent, for sync answers and re-sends.
    own_advert: Option<Vec<u8>>,
}

impl Protocol {
    /// A node `id` holding `key`, in the workspace named by `config`; `last_seq` is the highest
    /// advert seq it signed before (persisted). It obeys no Home until one is pinned (see
    /// [`Protocol::policy_mut`]).
    pub fn new(key: NodeKey, id: NodeId, config: MembershipConfig, last_seq: u64) -> Self {
        let workspace = config.workspace.clone();
        let public = key.verifying_key().to_bytes();
        let policy = PolicyState::new(&workspace, id.clone(), public, config.home_key);
        let membership = Membership::new(config, id.clone(), public);
        Self { key, workspace, id, membership, policy, seq: last_seq, beat: 0, own_advert: None }
    }

    /// This node's id.
    pub fn id(&self) -> &NodeId {
        &self.id
    }

    /// A hello gave this node a new id.
    pub fn set_id(&mut self, id: NodeId) {
        self.membership.set_self_id(id.clone());
        self.policy.set_self_id(id.clone());
        self.id = id;
    }

    /// The registry of other nodes.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// Mutable access, for restoring and transport signals.
    pub fn membership_mut(&mut self) -> &mut Membership {
        &mut self.membership
    }

    /// The Home's authority as this node holds it.
    pub fn policy(&self) -> &PolicyState {
        &self.policy
    }

    /// Mutable access, for restoring.
    pub fn policy_mut(&mut self) -> &mut PolicyState {
        &mut self.policy
    }

    /// As the Home: signs the next policy document with `roster` and `capsules` (see
    /// [`PolicyState::next_epoch`]), changing nothing yet. The caller persists
    /// [`PolicyState::stored_if_issued`], then puts it in force with [`Protocol::issued`], then
    /// sends it.
    pub fn sign_policy(&self, content: PolicyContent, now_ms: u64) -> (PolicyDoc, Vec<u8>) {
        let PolicyContent { roster, capsules, routing } = content;
        let doc = PolicyDoc {
            id: self.id.clone(),
            workspace: self.workspace.clone(),
            policy_epoch: self.policy.next_epoch(now_ms),
            issued_ms: now_ms,
            roster,
            capsules,
            routing,
        };
        let envelope = wire::seal(&self.key, &self.workspace, &Message::Policy(doc.clone()));
        (doc, envelope)
    }

    /// Puts a document this node signed (and persisted) in force; returns what its roster
    /// changed in the registry.
    pub fn issued(&mut self, doc: PolicyDoc, envelope: Vec<u8>) -> Vec<Change> {
        self.policy.issued(self.key.verifying_key().to_bytes(), doc, envelope);
        self.apply_roster()
    }

    /// [`Protocol::sign_policy`] and [`Protocol::issued`] at once, for callers with nothing to
    /// persist in between (tests, simulations).
    pub fn issue_policy(&mut self, content: PolicyContent, now_ms: u64) -> (Vec<u8>, Vec<Change>) {
        let (doc, envelope) = self.sign_policy(content, now_ms);
        let changes = self.issued(doc, envelope.clone());
        (envelope, changes)
    }

    /// Makes the roster of the policy in force the membership's key authority (see
    /// [`Membership::set_roster`]); returns what that changed.
    pub fn apply_roster(&mut self) -> Vec<Change> {
        let roster = self
            .policy
            .current()
            .map(|c| {
                c.doc
                    .roster
                    .iter()
                    .filter_map(|(id, key)| {
                        Some((id.clone(), crate::identity::public_key_from_b64(key)?))
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.membership.set_roster(roster)
    }

    /// The highest advert seq signed so far.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The seq the next advert must carry at `now_ms`: wall-clock derived, never below the last.
    pub fn next_seq(&self, now_ms: u64) -> u64 {
        now_ms.max(self.seq + 1)
    }

    /// The latest advert envelope, as sent.
    pub fn own_advert(&self) -> Option<&[u8]> {
        self.own_advert.as_deref()
    }

    /// Signs `advert` (whose `seq` came from [`Protocol::next_seq`] and is already persisted).
    pub fn seal_advert(&mut self, advert: &Advert) -> Vec<u8> {
        self.seq = self.seq.max(advert.seq);
        self.beat = 0;
        let sealed = wire::seal(&self.key, &self.workspace, &Message::Advert(advert.clone()));
        self.own_advert = Some(sealed.clone());
        sealed
    }

    /// The next heartbeat.
    pub fn heartbeat(&mut self, now_ms: u64) -> Vec<u8> {
        let beat = self.next_beat(now_ms);
        wire::seal(&self.key, &self.workspace, &Message::Heartbeat(beat))
    }

    /// A graceful goodbye for the current id.
    pub fn leave(&mut self, now_ms: u64) -> Vec<u8> {
        let beat = self.next_beat(now_ms);
        wire::seal(&self.key, &self.workspace, &Message::Leave(beat))
    }

    /// This node's direct connection to `target` was reset: suspects it here and returns the
    /// report for everyone else, with what changed here.
    pub fn suspect(&mut self, target: &NodeId, now_ms: u64) -> (Vec<u8>, Option<Change>) {
        let change = self.membership.suspect(target, now_ms);
        let beat = self.next_beat(now_ms);
        let report = wire::Suspicion {
            id: beat.id,
            workspace: beat.workspace,
            seq: beat.seq,
            beat: beat.beat,
            sent_ms: now_ms,
            target: target.clone(),
        };
        (wire::seal(&self.key, &self.workspace, &Message::Suspect(report)), change)
    }

    fn next_beat(&mut self, now_ms: u64) -> Beat {
        self.beat += 1;
        Beat {
            id: self.id.clone(),
            workspace: self.workspace.clone(),
            seq: self.seq,
            beat: self.beat,
            sent_ms: now_ms,
            policy: self.policy.epoch(),
        }
    }

    /// Verifies and applies a received envelope.
    pub fn receive(&mut self, bytes: &[u8], now_ms: u64) -> Receipt {
        let opened = wire::open(bytes, &self.workspace);
        self.receive_opened(opened, bytes, now_ms)
    }

    /// [`Protocol::receive`] for an envelope already opened (see [`Membership::receive_opened`]).
    pub fn receive_opened(
        &mut self,
        opened: Result<wire::Opened, wire::Reason>,
        bytes: &[u8],
        now_ms: u64,
    ) -> Receipt {
        if let Ok(wire::Opened { key, message: Message::Policy(doc) }) = &opened {
            return self.receive_policy(key.to_bytes(), doc.clone(), bytes);
        }
        // The policy epoch a heartbeat announces: more than this node holds is worth a sync.
        let announced = match &opened {
            Ok(wire::Opened { message: Message::Heartbeat(beat), .. }) => beat.policy,
            _ => 0,
        };
        let mut receipt = self.membership.receive_opened(opened, bytes, now_ms);
        if receipt.verdict == Verdict::Accept && self.policy.behind(announced) {
            receipt.changes.push(Change::PolicyBehind { epoch: announced });
        }
        receipt
    }

    fn receive_policy(&mut self, key: [u8; 32], doc: PolicyDoc, bytes: &[u8]) -> Receipt {
        let claimed_id = Some(doc.id.to_string());
        // Unpinned, only a node advertising role `root` under this key may be pinned.
        let advertised_home = self
            .membership
            .members()
            .get(&doc.id)
            .is_some_and(|m| m.key == key && m.record.advert.role == crate::role::Role::Root);
        let judged = if self.policy.pin().is_none() && !advertised_home {
            Err(Reason::UnknownHome)
        } else {
            self.policy.receive(key, doc, bytes)
        };
        match judged {
            Ok(applied) => {
                let mut changes = vec![Change::Policy(applied)];
                changes.extend(self.apply_roster());
                Receipt { verdict: Verdict::Accept, changes, refusal: None }
            }
            Err(reason) => {
                // Benign refusals are not reported; a Home this node does not obey is.
                let refusal = matches!(reason, Reason::UntrustedHome).then_some(Refusal {
                    reason,
                    kind: "policy",
                    claimed_id,
                });
                Receipt { verdict: Verdict::Ignore, changes: Vec::new(), refusal }
            }
        }
    }

    /// Health transitions due at `now_ms`.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Change> {
        self.membership.tick(now_ms)
    }

    /// When the next health transition can fall due (see [`Membership::next_deadline`]).
    pub fn next_deadline(&self) -> Option<u64> {
        self.membership.next_deadline()
    }

    /// What to ask a peer for.
    pub fn sync_request(&self) -> SyncRequest {
        let mut have = self.membership.digest();
        have.insert(self.id.to_string(), self.seq);
        SyncRequest { have, policy_epoch: self.policy.epoch() }
    }

    /// The envelopes `request` lacks: every advert this node knows and the policy document it
    /// holds when `everything` (the asker talks to this node alone), else only this node's own
    /// advert and, from the Home, the policy (every node answers). `None` when there is nothing
    /// to say and silence is as good as an answer.
    pub fn sync_answer(&self, request: &SyncRequest, everything: bool) -> Option<SyncResponse> {
        let mut envelopes =
            if everything { self.membership.newer_than(&request.have) } else { Vec::new() };
        if let Some(own) = &self.own_advert
            && request.have.get(self.id.as_str()).is_none_or(|seq| *seq < self.seq)
        {
            envelopes.push(own.clone());
        }
        let authored = self.policy.pin().is_some_and(|p| p.source == crate::policy::PinSource::Own);
        if let Some(current) = self.policy.current()
            && request.policy_epoch < current.doc.policy_epoch
            && (everything || authored)
        {
            envelopes.push(current.envelope.clone());
        }
        if envelopes.is_empty() && !everything {
            return None;
        }
        let envelopes =
            envelopes.into_iter().map(|a| String::from_utf8_lossy(&a).into_owned()).collect();
        Some(SyncResponse { envelopes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advert(id: &str, seq: u64, now: u64) -> Advert {
        Advert::basic(NodeId::parse(id).expect("id"), "lab", seq, now)
    }

    fn roster_only(roster: BTreeMap<NodeId, String>) -> PolicyContent {
        PolicyContent { roster, ..PolicyContent::default() }
    }

    fn home_advert(seq: u64, now: u64) -> Advert {
        let mut advert = advert("home", seq, now);
        advert.role = crate::role::Role::Root;
        advert
    }

    fn protocol(id: &str, seed: u8) -> Protocol {
        Protocol::new(
            NodeKey::from_secret([seed; 32]),
            NodeId::parse(id).expect("id"),
            MembershipConfig::new("lab"),
            0,
        )
    }

    #[test]
    fn two_nodes_learn_each_other_by_sync_and_heartbeats() {
        let now = 1_800_000_000_000;
        let (mut a, mut b) = (protocol("a", 1), protocol("b", 2));
        let seq = a.next_seq(now);
        a.seal_advert(&advert("a", seq, now));
        let seq = b.next_seq(now);
        b.seal_advert(&advert("b", seq, now));
        let answer = a.sync_answer(&b.sync_request(), true).expect("a has news for b");
        for envelope in answer.envelopes {
            assert_eq!(b.receive(envelope.as_bytes(), now).verdict, Verdict::Accept);
        }
        assert!(b.membership().members().contains_key("a"));
        assert!(a.sync_answer(&b.sync_request(), false).is_none(), "nothing new: silence");
        let beat = a.heartbeat(now + 1000);
        assert_eq!(b.receive(&beat, now + 1000).verdict, Verdict::Accept);
        assert_eq!(a.next_seq(now), seq.max(now) + 1, "seq never goes back");
    }

    #[test]
    fn a_heartbeat_announcing_a_newer_policy_leads_to_it() {
        let now = 1_800_000_000_000;
        let (mut home, mut worker) = (protocol("home", 1), protocol("w1", 2));
        let seq = home.next_seq(now);
        let advert = home.seal_advert(&home_advert(seq, now));
        assert_eq!(worker.receive(&advert, now).verdict, Verdict::Accept);
        let roster = BTreeMap::from([(
            NodeId::parse("w1").expect("id"),
            NodeKey::from_secret([2; 32]).public_b64(),
        )]);
        home.issue_policy(roster_only(roster), now);
        let receipt = worker.receive(&home.heartbeat(now + 1), now + 1);
        assert_eq!(receipt.changes, vec![Change::PolicyBehind { epoch: now }]);
        let answer = home.sync_answer(&worker.sync_request(), false).expect("the Home answers");
        let applied: Vec<Change> = answer
            .envelopes
            .iter()
            .flat_map(|e| worker.receive(e.as_bytes(), now + 2).changes)
            .collect();
        assert!(
            matches!(&applied[..], [Change::Policy(a)] if a.epoch == now && a.pinned),
            "{applied:?}"
        );
        let receipt = worker.receive(&home.heartbeat(now + 3), now + 3);
        assert!(receipt.changes.is_empty(), "up to date: nothing to ask");
    }

    #[test]
    fn the_policy_s_roster_replaces_a_first_use_binding() {
        let now = 1_800_000_000_000;
        let (mut home, mut worker) = (protocol("home", 1), protocol("w1", 2));
        let home_advert = home.seal_advert(&home_advert(home.next_seq(now), now));
        assert_eq!(worker.receive(&home_advert, now).verdict, Verdict::Accept);
        let (owner, squatter) = (NodeKey::from_secret([3; 32]), NodeKey::from_secret([4; 32]));
        let claim =
            |key: &NodeKey, seq| wire::seal(key, "lab", &Message::Advert(advert("w2", seq, now)));
        assert_eq!(worker.receive(&claim(&squatter, 5), now).verdict, Verdict::Accept);
        let id = |s: &str| NodeId::parse(s).expect("id");
        let roster = BTreeMap::from([
            (id("w1"), NodeKey::from_secret([2; 32]).public_b64()),
            (id("w2"), owner.public_b64()),
        ]);
        let (doc, _) = home.issue_policy(roster_only(roster), now);
        let changes = worker.receive(&doc, now).changes;
        assert!(
            matches!(
                &changes[..],
                [Change::Policy(_), Change::Conflict { .. }, Change::Evicted { .. }]
            ),
            "{changes:?}"
        );
        assert_eq!(worker.receive(&claim(&owner, 1), now).verdict, Verdict::Accept);
        assert_eq!(worker.receive(&claim(&squatter, 9), now).verdict, Verdict::Ignore);
    }

    #[test]
    fn an_unpinned_node_pins_only_a_node_advertising_as_home() {
        let now = 1_800_000_000_000;
        let (mut pretender, mut worker) = (protocol("home", 1), protocol("w1", 2));
        let roster = BTreeMap::from([(
            NodeId::parse("w1").expect("id"),
            NodeKey::from_secret([2; 32]).public_b64(),
        )]);
        // Signed and admitting w1, but nobody advertised role root under this key.
        let (doc, _) = pretender.issue_policy(roster_only(roster.clone()), now);
        let receipt = worker.receive(&doc, now);
        assert!(receipt.changes.is_empty() && receipt.refusal.is_none(), "{receipt:?}");
        assert!(worker.policy().pin().is_none());
        assert!(worker.policy().behind(now), "a refused document raises nothing");
        // Once its advert says root, the same key's next document pins it.
        let advert = pretender.seal_advert(&home_advert(pretender.next_seq(now), now));
        worker.receive(&advert, now);
        let (doc, _) = pretender.issue_policy(roster_only(roster), now);
        assert!(matches!(&worker.receive(&doc, now).changes[..], [Change::Policy(a)] if a.pinned));
    }
}
