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
    membership::{
        Change, Membership, MembershipConfig, Probe, REPORT_SLACK, Receipt, Refusal, Verdict,
    },
    node_id::NodeId,
    policy::{PolicyContent, PolicyDoc, PolicyState, TrustError},
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
    /// A liveness probe, not a sync: answer with [`Protocol::answer_probe`].
    #[serde(default, skip_serializing_if = "is_false")]
    pub probe: bool,
    /// The prober does not hold this node `ok`: the answer must carry a signed heartbeat, which
    /// the node also sends to everyone.
    #[serde(default, skip_serializing_if = "is_false")]
    pub proof: bool,
    /// Nodes the asker holds `suspect`, `down` or `stale`: those the answerer holds `ok` are
    /// asked for proof of life (see [`Protocol::vouch`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost: Vec<String>,
}

fn is_false(b: &bool) -> bool {
    !b
}

/// Anti-entropy response: signed envelopes the asker lacks (adverts newer than it listed, and
/// the policy document when it holds an older one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncResponse {
    /// Envelopes exactly as their authors signed them (`adverts` in earlier releases).
    #[serde(alias = "adverts")]
    pub envelopes: Vec<String>,
    /// The policy epoch the answering node holds (probe answers): more than the asker holds
    /// is worth a sync.
    #[serde(default, skip_serializing_if = "wire::is_zero")]
    pub policy_epoch: u64,
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
    /// The highest `seq` handed out for an advert (signed once it is on disk).
    reserved: u64,
    /// Heartbeats (and leaves) since that advert.
    beat: u64,
    /// The latest advert as sent, for sync answers and re-sends.
    own_advert: Option<Vec<u8>>,
    /// Envelopes this node must send to everyone (suspicion reports, refutations), in order.
    outbox: Vec<Vec<u8>>,
    /// The last refutation sent: its position (reports based on older news need no other),
    /// when, and the envelope (a proof asked for soon after is answered with the same one).
    refuted: Option<Refutation>,
    /// Suspicion reports signed so far.
    reports: u64,
    /// Reports sent in the current window: no more than receivers act on.
    reporting: crate::limit::Window,
    /// Refutations and proofs of life signed so far.
    refutations: u64,
}

#[derive(Debug, Clone)]
struct Refutation {
    pos: (u64, u64),
    at_ms: u64,
    envelope: Vec<u8>,
}

impl Protocol {
    /// A node `id` holding `key`, in the workspace named by `config`; `last_seq` is the highest
    /// advert seq it signed before (persisted). It obeys no Home until one is pinned (see
    /// [`Protocol::policy_mut`]).
    pub fn new(key: NodeKey, id: NodeId, config: MembershipConfig, last_seq: u64) -> Self {
        let workspace = config.workspace.clone();
        let public = key.verifying_key().to_bytes();
        let mut policy = PolicyState::new(&workspace, id.clone(), public, config.home_key);
        policy.set_trust_first(config.trust_first_home);
        let membership = Membership::new(config, id.clone(), public);
        Self {
            key,
            workspace,
            id,
            membership,
            policy,
            seq: last_seq,
            reserved: last_seq,
            beat: 0,
            own_advert: None,
            outbox: Vec::new(),
            refuted: None,
            reports: 0,
            reporting: Default::default(),
            refutations: 0,
        }
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

    /// Hands out the seq the next advert must carry at `now_ms`: wall-clock derived, above
    /// every seq handed out before (an advert waiting for its seq to reach the disk included).
    pub fn next_seq(&mut self, now_ms: u64) -> u64 {
        self.reserved = now_ms.max(self.seq.max(self.reserved) + 1);
        self.reserved
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

    /// This node lost `target` (its direct connection was reset): suspects it here and puts a
    /// report for everyone in the outbox; returns what changed here.
    pub fn suspect(&mut self, target: &NodeId, now_ms: u64) -> Option<Change> {
        let pos = self.membership.position(target);
        let change = self.membership.suspect(target, now_ms, pos);
        self.report(target, pos, now_ms);
        change
    }

    /// Signs a report for everyone, unless this node sent as many as receivers act on of one
    /// accuser this window ([`crate::membership::REPORTS_PER_WINDOW`]): more would go unheeded,
    /// and a burst of them (many nodes gone at once, or a Sybil's fakes falling silent) would
    /// take this node's key over the receivers' per-key budget and get its heartbeats shed.
    fn report(&mut self, target: &NodeId, (target_seq, target_beat): (u64, u64), now_ms: u64) {
        use crate::membership::{REPORT_WINDOW_MS, REPORTS_PER_WINDOW};
        if !self.reporting.spend(now_ms, REPORT_WINDOW_MS, REPORTS_PER_WINDOW) {
            return;
        }
        let beat = self.next_beat(now_ms);
        let report = wire::Suspicion {
            id: beat.id,
            workspace: beat.workspace,
            seq: beat.seq,
            beat: beat.beat,
            sent_ms: now_ms,
            target: target.clone(),
            target_seq,
            target_beat,
        };
        self.reports += 1;
        self.outbox.push(wire::seal(&self.key, &self.workspace, &Message::Suspect(report)));
    }

    /// Envelopes to send to everyone, oldest first (suspicion reports after a silence or a reset,
    /// refutations of reports about this node, proofs of life asked for). A driver takes them
    /// after every call that can produce one: [`Protocol::receive`], [`Protocol::tick`],
    /// [`Protocol::suspect`], [`Protocol::answer_probe`], [`Protocol::vouch`].
    pub fn take_outbox(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.outbox)
    }

    /// Suspicion reports and refutations (or proofs of life) signed so far.
    pub fn signed_reports(&self) -> (u64, u64) {
        (self.reports, self.refutations)
    }

    /// Probe mode: whom to probe this period (see [`Membership::probes`]).
    pub fn probes(&self) -> Vec<Probe> {
        self.membership.probes()
    }

    /// The answer to a probe: a bare acknowledgement (the transport authenticates who
    /// answered), or when the prober asked for `proof` a signed heartbeat that also goes to
    /// everyone (the prober is not alone in doubting this node); with the policy epoch held.
    pub fn answer_probe(&mut self, proof: bool, now_ms: u64) -> SyncResponse {
        let envelopes = if proof {
            let beat = self.refute((0, 0), now_ms);
            vec![String::from_utf8_lossy(&beat).into_owned()]
        } else {
            Vec::new()
        };
        SyncResponse { envelopes, policy_epoch: self.policy.epoch() }
    }

    /// Probe mode: nodes the asker of `request` has lost that this node holds `ok`, for the
    /// driver to probe with `proof` (each answers with a heartbeat it also sends to everyone).
    /// When the asker has lost this node, it refutes that at once (either mode). After a
    /// partition heals, this is how each side learns the other is back.
    pub fn vouch(&mut self, request: &SyncRequest, now_ms: u64) -> Vec<Probe> {
        let probing = self.membership.config().observers.is_some();
        let mut probes = Vec::new();
        for id in &request.lost {
            if id == self.id.as_str() {
                self.refute((0, 0), now_ms);
            } else if let Some(member) = self.membership.members().get(id.as_str())
                && probing
                && member.record.health == crate::cluster::Health::Ok
            {
                probes.push(Probe {
                    id: member.record.advert.id.clone(),
                    peer: member.peer_id,
                    proof: true,
                });
            }
        }
        probes
    }

    /// `id` answered this node's probe at `now_ms` (the transport vouches for who answered),
    /// holding `policy_epoch`; the heartbeat it carried, if any, goes through
    /// [`Protocol::receive`] as usual. Returns whether the node holds a newer policy than this
    /// one (worth a sync).
    pub fn probe_answered(&mut self, id: &NodeId, policy_epoch: u64, now_ms: u64) -> bool {
        self.membership.answered(id, now_ms);
        self.policy.behind(policy_epoch)
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
        self.receive_from(opened, bytes, now_ms, true)
    }

    /// [`Protocol::receive_opened`], where `may_add` says whether the message may bring a node
    /// the registry does not hold yet (see [`Membership::receive_from`]).
    pub fn receive_from(
        &mut self,
        opened: Result<wire::Opened, wire::Reason>,
        bytes: &[u8],
        now_ms: u64,
        may_add: bool,
    ) -> Receipt {
        if let Ok(wire::Opened { key, message: Message::Policy(doc) }) = &opened {
            return self.receive_policy(key.to_bytes(), doc.clone(), bytes);
        }
        // The policy epoch a heartbeat announces: more than this node holds is worth a sync.
        let announced = match &opened {
            Ok(wire::Opened { message: Message::Heartbeat(beat), .. }) => beat.policy,
            _ => 0,
        };
        let mut receipt = self.membership.receive_from(opened, bytes, now_ms, may_add);
        if receipt.verdict == Verdict::Accept && self.policy.behind(announced) {
            receipt.changes.push(Change::PolicyBehind { epoch: announced });
        }
        if let Some(pos) = receipt.changes.iter().find_map(|c| match c {
            Change::SelfSuspected { pos } => Some(*pos),
            _ => None,
        }) {
            self.refute(pos, now_ms);
        }
        receipt
    }

    /// A report says this node was lost, based on what its reporter heard up to `pos`: a fresh
    /// heartbeat (newer than anything sent) tells everyone otherwise, and is returned. One
    /// refutation per heartbeat interval answers every report based on older news. It skips
    /// [`REPORT_SLACK`] beats: receivers hold a report to no more than that beyond what they
    /// heard of this node, so the refutation clears even a report that claimed more.
    fn refute(&mut self, pos: (u64, u64), now_ms: u64) -> Vec<u8> {
        let interval = self.membership.config().heartbeat_interval_ms;
        if let Some(last) = &self.refuted
            && pos < last.pos
            && now_ms.saturating_sub(last.at_ms) < interval
        {
            return last.envelope.clone();
        }
        self.beat = self.beat.saturating_add(REPORT_SLACK);
        let beat = self.next_beat(now_ms);
        let pos = (beat.seq, beat.beat);
        let envelope = wire::seal(&self.key, &self.workspace, &Message::Heartbeat(beat));
        self.refutations += 1;
        self.outbox.push(envelope.clone());
        self.refuted = Some(Refutation { pos, at_ms: now_ms, envelope: envelope.clone() });
        envelope
    }

    fn receive_policy(&mut self, key: [u8; 32], doc: PolicyDoc, bytes: &[u8]) -> Receipt {
        let claimed_id = Some(doc.id.to_string());
        // Unpinned, only a node advertising role `root` under this key may be pinned.
        let advertised_home = self
            .membership
            .members()
            .get(&doc.id)
            .is_some_and(|m| m.key == key && m.record.advert.role == crate::role::Role::Root);
        let claiming = self.policy.claims().iter().any(|c| c.key == key);
        let (home, epoch) = (doc.id.clone(), doc.policy_epoch);
        let judged = if self.policy.pin().is_none() && !advertised_home {
            Err(Reason::UnknownHome)
        } else {
            self.policy.receive(key, doc, bytes)
        };
        if judged == Err(Reason::HomeNotTrusted) && !claiming {
            let fingerprint = crate::policy::fingerprint(&key);
            let claim = Change::HomeClaim { home, fingerprint, epoch };
            return Receipt { verdict: Verdict::Ignore, changes: vec![claim], refusal: None };
        }
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

    /// The operator trusts the pending Home claim with `fingerprint`: it is pinned and its
    /// document is in force. Returns what changed (the policy, the roster's bindings).
    pub fn trust_home(&mut self, fingerprint: &str) -> Result<Vec<Change>, TrustError> {
        let applied = self.policy.trust(fingerprint)?;
        let mut changes = vec![Change::Policy(applied)];
        changes.extend(self.apply_roster());
        Ok(changes)
    }

    /// The operator takes back the trust in the pinned Home. Returns what changed, or `None`
    /// when nothing did.
    pub fn untrust_home(&mut self) -> Result<Option<Vec<Change>>, TrustError> {
        if !self.policy.untrust()? {
            return Ok(None);
        }
        Ok(Some(self.apply_roster()))
    }

    /// Health transitions due at `now_ms`. In probe mode a watched node falling silent is
    /// reported to everyone (see [`Protocol::take_outbox`]).
    pub fn tick(&mut self, now_ms: u64) -> Vec<Change> {
        let changes = self.membership.tick(now_ms);
        if self.membership.config().observers.is_some() {
            for change in &changes {
                if let Change::Health { id, to: crate::cluster::Health::Suspect, .. } = change {
                    let pos = self.membership.position(id);
                    self.report(id, pos, now_ms);
                }
            }
        }
        changes
    }

    /// When the next health transition can fall due (see [`Membership::next_deadline`]).
    pub fn next_deadline(&self) -> Option<u64> {
        self.membership.next_deadline()
    }

    /// What to ask a peer for.
    pub fn sync_request(&self) -> SyncRequest {
        let mut have = self.membership.digest();
        have.insert(self.id.to_string(), self.seq);
        let lost = self.membership.lost();
        SyncRequest { have, policy_epoch: self.policy.epoch(), lost, ..SyncRequest::default() }
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
        Some(SyncResponse { envelopes, policy_epoch: 0 })
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

    /// A node that trusts the first Home that admits it (`trust_first_home`).
    fn protocol(id: &str, seed: u8) -> Protocol {
        let mut config = MembershipConfig::new("lab");
        config.trust_first_home = true;
        Protocol::new(NodeKey::from_secret([seed; 32]), NodeId::parse(id).expect("id"), config, 0)
    }

    #[test]
    fn a_node_sends_no_more_reports_than_receivers_act_on() {
        use crate::membership::{REPORT_WINDOW_MS, REPORTS_PER_WINDOW};
        let now = 1_800_000_000_000;
        let mut a = protocol("a", 1);
        // Forty nodes fall silent at once (a rack, or a Sybil's fakes): each is suspected here,
        // but only as many reports go out as a receiver would act on.
        let gone = |i: u32| NodeId::parse(&format!("n{i}")).expect("id");
        for i in 0..40 {
            let key = NodeKey::from_secret([100 + i as u8; 32]);
            let envelope =
                wire::seal(&key, "lab", &Message::Advert(advert(&format!("n{i}"), 1, now)));
            assert_eq!(a.receive(&envelope, now).verdict, Verdict::Accept);
        }
        for i in 0..40 {
            a.suspect(&gone(i), now + 5_000);
        }
        assert_eq!(a.take_outbox().len(), REPORTS_PER_WINDOW as usize);
        let suspect = a.membership().members().values();
        let suspect = suspect.filter(|m| m.record.health == crate::cluster::Health::Suspect);
        assert_eq!(suspect.count(), 40, "each is suspected here all the same");
        a.suspect(&gone(0), now + 5_000 + REPORT_WINDOW_MS);
        assert_eq!(a.take_outbox().len(), 1, "the next window sends again");
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
    fn adverts_waiting_for_the_disk_never_share_a_seq() {
        let now = 1_800_000_000_000;
        let mut a = protocol("a", 1);
        let (first, second) = (a.next_seq(now), a.next_seq(now));
        assert!(second > first, "both handed out before either is signed");
        a.seal_advert(&advert("a", first, now));
        assert!(a.next_seq(now) > second);
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
        let seq = home.next_seq(now);
        let home_advert = home.seal_advert(&home_advert(seq, now));
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
        let seq = pretender.next_seq(now);
        let advert = pretender.seal_advert(&home_advert(seq, now));
        worker.receive(&advert, now);
        let (doc, _) = pretender.issue_policy(roster_only(roster), now);
        assert!(matches!(&worker.receive(&doc, now).changes[..], [Change::Policy(a)] if a.pinned));
    }
}
