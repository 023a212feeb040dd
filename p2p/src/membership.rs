//! Who else is in the workspace, as this node has verified it: the IO-less core of federation.
//!
//! [`Membership::receive`] takes an envelope's bytes exactly as they arrived (from gossip or a
//! sync response) and either accepts it or says why not; [`Membership::tick`] moves nodes
//! `ok → suspect → down` and evicts long-silent ones. Time is always passed in.
//!
//! Liveness comes in two modes (see docs/protocol.md, "Liveness"):
//! - **broadcast** (`observers = None`, the NATS bus): every node hears every heartbeat and
//!   judges every silence itself;
//! - **probe** (`observers = Some(k)`, the libp2p mesh): each node watches only the `k` nodes
//!   before it on a ring ordered by a hash of their ids ([`Membership::probes`]), and turns a
//!   silence into a signed suspicion report for everyone. Anyone else learns of a failure from
//!   such reports, and a suspected node that is alive refutes them with a newer heartbeat.
//!
//! Either way a suspicion becomes `down` once it has stood for `down_after − suspect_after`
//! without a heartbeat newer than the one the suspicion was based on.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::{
    cluster::{Health, NodeRecord},
    node_id::NodeId,
    wire::{self, Message, Reason},
};

/// Probe mode: how many nodes each node watches, unless configured otherwise.
pub const DEFAULT_OBSERVERS: usize = 3;
/// Remote nodes held, unless configured otherwise (`[cluster] max_nodes`).
pub const DEFAULT_MAX_NODES: usize = 2_048;

/// Timing and trust settings.
#[derive(Debug, Clone, PartialEq)]
pub struct MembershipConfig {
    /// The workspace messages must be signed for.
    pub workspace: String,
    /// A node silent this long is removed.
    pub evict_after_ms: u64,
    /// Messages dated further ahead than this are refused.
    pub max_skew_ms: u64,
    /// Heartbeats older than this are refused.
    pub beat_max_age_ms: u64,
    /// Heartbeat period of the senders (for the disconnected fast path).
    pub heartbeat_interval_ms: u64,
    /// Silence after which a node is `suspect`.
    pub suspect_after_ms: u64,
    /// Silence after which a node is `down`.
    pub down_after_ms: u64,
    /// Ids pinned to keys (`ARW_TRUST_NODES`); others are trusted on first use.
    pub pinned: BTreeMap<NodeId, [u8; 32]>,
    /// The Home key to obey (`[cluster] home_key`); `None`: pinned on first admission.
    pub home_key: Option<[u8; 32]>,
    /// Probe mode: how many nodes each node watches (and so how many watch each node);
    /// `None`: broadcast mode, every heartbeat reaches every node.
    pub observers: Option<usize>,
    /// The most remote nodes held: a new one beyond takes the place of the one gone longest,
    /// or is refused.
    pub max_nodes: usize,
    /// Pin the first Home that admits this node without the operator (`[cluster]
    /// trust_first_home`); otherwise its document waits as a claim.
    pub trust_first_home: bool,
}

impl MembershipConfig {
    /// Defaults for `workspace`: 1 s heartbeats, suspect after 3 s, down after 5 s, evict after
    /// 24 × 360 s, 5 min clock skew.
    pub fn new(workspace: &str) -> Self {
        Self {
            workspace: workspace.to_owned(),
            evict_after_ms: 24 * 360_000,
            max_skew_ms: 300_000,
            beat_max_age_ms: 30_000,
            heartbeat_interval_ms: 1_000,
            suspect_after_ms: 3_000,
            down_after_ms: 5_000,
            pinned: BTreeMap::new(),
            home_key: None,
            observers: None,
            max_nodes: DEFAULT_MAX_NODES,
            trust_first_home: false,
        }
    }

    /// How long a suspicion stands before the node is `down`.
    pub fn confirm_ms(&self) -> u64 {
        self.down_after_ms.saturating_sub(self.suspect_after_ms)
    }
}

/// A remote node as this node knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// The registry record (latest advert, last heard, health).
    pub record: NodeRecord,
    /// The key bound to this id.
    pub key: [u8; 32],
    /// Its libp2p identity (same key).
    pub peer_id: Option<PeerId>,
    /// The latest accepted advert exactly as received, for anti-entropy sync.
    pub envelope: Vec<u8>,
    /// Highest `(advert seq, beat)` accepted.
    beat_pos: (u64, u64),
    /// Why and since when this node is `suspect`.
    suspected: Option<Suspected>,
    /// Probe mode: since when this node watches the member (its silence counts from then).
    watched_since: Option<u64>,
    /// How far this node still acts on the member's suspicion reports.
    credit: Credit,
}

/// A standing suspicion.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Suspected {
    /// When this node began to suspect (its own clock).
    at_ms: u64,
    /// The newest `(seq, beat)` of the suspect the suspicion is based on: only a heartbeat
    /// newer than this clears it.
    pos: (u64, u64),
    /// The member whose report raised it (`None`: this node's own judgement).
    by: Option<NodeId>,
}

/// How many heartbeats beyond the latest this node holds a suspicion report may claim the
/// suspect had sent (some may still be on their way here). A refutation skips as many, so it
/// clears whatever a report claimed.
pub const REPORT_SLACK: u64 = 2;

/// Reports acted on per accuser and window (a crash costs an honest accuser one report per
/// connection it loses; a lying one is muted after its first refuted report anyway).
pub(crate) const REPORTS_PER_WINDOW: u32 = 16;
/// That window.
pub(crate) const REPORT_WINDOW_MS: u64 = 10_000;
/// An accuser whose report the suspect refuted is not listened to for this long.
const MUTED_FOR_MS: u64 = 60_000;

/// What a member's suspicion reports are still worth here: a few per window, and nothing for a
/// while after one of them was refuted. Reports only speed detection up (every node is also
/// watched by others), so an honest accuser muted by a false alarm costs little, and a lying
/// one costs each node it names one refutation per [`MUTED_FOR_MS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Credit {
    window: crate::limit::Window,
    muted_until_ms: u64,
}

impl Credit {
    /// Spends one report at `now_ms`, if the accuser has any left.
    fn spend(&mut self, now_ms: u64) -> bool {
        now_ms >= self.muted_until_ms
            && self.window.spend(now_ms, REPORT_WINDOW_MS, REPORTS_PER_WINDOW)
    }
}

/// A node to probe this period (see [`Membership::probes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The node.
    pub id: NodeId,
    /// Its libp2p identity.
    pub peer: Option<PeerId>,
    /// This node does not hold it `ok`: the answer must carry a signed heartbeat (which the
    /// probed node also sends to everyone).
    pub proof: bool,
}

/// Something that changed in the membership.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// An advert was accepted; `changed` when it says something new (always on first sight).
    Advert {
        /// The node.
        id: NodeId,
        /// First advert from this node.
        first: bool,
        /// Content differs from the previous advert.
        changed: bool,
    },
    /// Health moved.
    Health {
        /// The node.
        id: NodeId,
        /// Before.
        from: Health,
        /// After.
        to: Health,
    },
    /// A suspicion report names this node: it should refute it with a fresh heartbeat.
    SelfSuspected {
        /// The position the report was based on.
        pos: (u64, u64),
    },
    /// Removed after `evict_after_ms` of silence.
    Evicted {
        /// The removed record.
        record: Box<NodeRecord>,
    },
    /// A newer policy document from the pinned Home is in force (see `Protocol`).
    Policy(crate::policy::Applied),
    /// A Home this node has not pinned admitted it: a claim for the operator (see `policy`).
    HomeClaim {
        /// The Home's id, as its document says.
        home: NodeId,
        /// Its key's fingerprint.
        fingerprint: String,
        /// The document's epoch.
        epoch: u64,
    },
    /// A peer holds a newer policy document than this node: worth a sync.
    PolicyBehind {
        /// The epoch it announced.
        epoch: u64,
    },
    /// A message claimed an id bound to another key.
    Conflict {
        /// The id.
        id: NodeId,
        /// The key the id is bound to.
        known_key: String,
        /// The key that signed the refused message.
        claimed_key: String,
    },
}

/// What to tell the transport about a received message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Valid and new: forward it.
    Accept,
    /// Not forwarded, sender not penalised (late, early, already known).
    Ignore,
    /// Invalid: not forwarded, and the sender's score drops.
    Reject,
    /// Beyond a flood limit (a key sending too much, too many unknown keys from one peer): not
    /// checked, not forwarded, and counted against the peer that sent it (see
    /// [`crate::transport::shed`]).
    Shed,
}

/// A refused message, for `cluster.event.rejected`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Why.
    pub reason: Reason,
    /// `advert`, `heartbeat`, `leave` or `unknown`.
    pub kind: &'static str,
    /// The id the message claimed, if any could be read.
    pub claimed_id: Option<String>,
}

/// The outcome of [`Membership::receive`].
#[derive(Debug, Clone, PartialEq)]
pub struct Receipt {
    /// For the transport.
    pub verdict: Verdict,
    /// What changed.
    pub changes: Vec<Change>,
    /// Why it was refused, when it was.
    pub refusal: Option<Refusal>,
}

/// Persisted form of a member (`cluster_nodes.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredMember {
    /// The record.
    pub record: NodeRecord,
    /// Base64 key.
    pub key: String,
    /// The advert envelope as received.
    pub envelope: String,
}

/// The registry of remote nodes.
#[derive(Debug, Clone)]
pub struct Membership {
    config: MembershipConfig,
    /// Silence before this instant does not count (this node could not hear anyone).
    resumed_ms: u64,
    self_id: NodeId,
    self_key: [u8; 32],
    members: BTreeMap<NodeId, Member>,
    /// Keys the pinned Home's roster admits: they win over a binding made on first use.
    roster: BTreeMap<NodeId, [u8; 32]>,
    /// Every member and this node, by ring position (probe mode).
    ring: BTreeSet<(u64, NodeId)>,
    /// Members whose stored form changed since [`Membership::take_changes`].
    changed: BTreeSet<NodeId>,
    /// Members removed since then.
    removed: BTreeSet<NodeId>,
    /// This node's own lateness stretches every threshold by this factor (1: on time).
    slowdown: u64,
    /// Member ids by libp2p identity.
    by_peer: HashMap<PeerId, NodeId>,
    /// No health transition falls due before this (it may fall due later: messages only push
    /// deadlines later, and [`Membership::tick`] computes it afresh).
    deadline: Option<u64>,
    /// Moves whenever a member is added or removed (so whenever an id's key can change).
    generation: u64,
}

/// A node's place on the probe ring: the first 8 bytes of SHA-256 of its id, so neighbours on
/// the ring are unrelated in naming, address or start order.
fn place(id: &NodeId) -> u64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(id.as_str().as_bytes());
    let mut first = [0; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

fn peer_id_of(key: &[u8; 32]) -> Option<PeerId> {
    let public = libp2p::identity::ed25519::PublicKey::try_from_bytes(key).ok()?;
    Some(libp2p::identity::PublicKey::from(public).to_peer_id())
}

impl Membership {
    /// An empty registry for the node `self_id` holding `self_key`.
    pub fn new(config: MembershipConfig, self_id: NodeId, self_key: [u8; 32]) -> Self {
        Self {
            config,
            self_id,
            self_key,
            resumed_ms: 0,
            members: BTreeMap::new(),
            roster: BTreeMap::new(),
            ring: BTreeSet::new(),
            changed: BTreeSet::new(),
            removed: BTreeSet::new(),
            slowdown: 1,
            by_peer: HashMap::new(),
            deadline: None,
            generation: 0,
        }
    }

    fn insert(&mut self, id: NodeId, member: Member) {
        self.generation += 1;
        self.ring.insert((place(&id), id.clone()));
        self.removed.remove(&id);
        self.changed.insert(id.clone());
        if let Some(peer) = member.peer_id {
            self.by_peer.insert(peer, id.clone());
        }
        self.members.insert(id.clone(), member);
        self.noted(&id);
    }

    fn remove(&mut self, id: &NodeId) -> Option<Member> {
        self.generation += 1;
        self.ring.remove(&(place(id), id.clone()));
        self.changed.remove(id);
        self.removed.insert(id.clone());
        let member = self.members.remove(id)?;
        if let Some(peer) = member.peer_id {
            self.by_peer.remove(&peer);
        }
        Some(member)
    }

    /// `id`'s health or silence changed: its next transition may fall due before the one
    /// [`Membership::next_deadline`] holds.
    fn noted(&mut self, id: &NodeId) {
        if let Some(due) = self.members.get(id).and_then(|m| self.due(m)) {
            self.deadline = Some(self.deadline.map_or(due, |d| d.min(due)));
        }
    }

    /// When `member`'s next health transition can fall due, if any.
    fn due(&self, member: &Member) -> Option<u64> {
        let threshold = match member.record.health {
            Health::Ok => self.suspect_after(),
            Health::Suspect => self.down_after(),
            _ => return None,
        };
        let confirmed = member
            .suspected
            .as_ref()
            .map(|s| self.counted_from(s.at_ms).saturating_add(self.confirm()));
        let silent = self.watched(member).then(|| self.heard(member).saturating_add(threshold));
        confirmed.into_iter().chain(silent).min()
    }

    /// Computes [`Membership::next_deadline`] afresh (every member: once per tick).
    fn recompute_deadline(&mut self) {
        self.deadline = self.members.values().filter_map(|m| self.due(m)).min();
    }

    /// What changed in the stored registry since the last call: members to write (a new or
    /// newer advert) and ids to delete. Heartbeats change nothing stored.
    pub fn take_changes(&mut self) -> (Vec<StoredMember>, Vec<NodeId>) {
        let changed = std::mem::take(&mut self.changed);
        let upsert = changed.iter().filter_map(|id| self.members.get(id)).map(stored).collect();
        (upsert, std::mem::take(&mut self.removed).into_iter().collect())
    }

    /// A write of the changes failed: the next [`Membership::take_changes`] returns every
    /// member (removals are retried too).
    pub fn changes_lost(&mut self, removed: Vec<NodeId>) {
        self.changed = self.members.keys().cloned().collect();
        self.removed.extend(removed.into_iter().filter(|id| !self.members.contains_key(id)));
    }

    /// Whether [`Membership::take_changes`] has anything.
    pub fn has_changes(&self) -> bool {
        !self.changed.is_empty() || !self.removed.is_empty()
    }

    /// Restores persisted members. They show as `stale` until heard from again.
    pub fn restore(&mut self, stored: Vec<StoredMember>) {
        for s in stored {
            let Some(key) = B64.decode(&s.key).ok().and_then(|k| <[u8; 32]>::try_from(k).ok())
            else {
                continue;
            };
            let mut record = s.record;
            record.health = Health::Stale;
            record.local = false;
            let id = record.advert.id.clone();
            let beat_pos = (record.advert.seq, 0);
            let member = Member {
                peer_id: peer_id_of(&key),
                record,
                key,
                envelope: s.envelope.into_bytes(),
                beat_pos,
                suspected: None,
                watched_since: None,
                credit: Credit::default(),
            };
            self.insert(id, member);
        }
        // As on disk already.
        self.changed.clear();
        self.recompute_deadline();
    }

    /// Every member as persisted.
    pub fn stored(&self) -> Vec<StoredMember> {
        self.members.values().map(stored).collect()
    }

    /// This node's id changed (a hello assigned a new one).
    pub fn set_self_id(&mut self, id: NodeId) {
        self.self_id = id;
    }

    /// The settings.
    pub fn config(&self) -> &MembershipConfig {
        &self.config
    }

    /// Known remote nodes, by id.
    pub fn members(&self) -> &BTreeMap<NodeId, Member> {
        &self.members
    }

    /// `id → advert seq` of every known node, for a sync request.
    pub fn digest(&self) -> BTreeMap<String, u64> {
        self.members.iter().map(|(id, m)| (id.to_string(), m.record.advert.seq)).collect()
    }

    /// Advert envelopes newer than what `digest` lists, for a sync response.
    pub fn newer_than(&self, digest: &BTreeMap<String, u64>) -> Vec<Vec<u8>> {
        self.members
            .iter()
            .filter(|(id, m)| digest.get(id.as_str()).is_none_or(|seq| *seq < m.record.advert.seq))
            .map(|(_, m)| m.envelope.clone())
            .collect()
    }

    /// The node id whose key is this libp2p peer, if known.
    pub fn id_of_peer(&self, peer: &PeerId) -> Option<&NodeId> {
        self.by_peer.get(peer)
    }

    /// Verifies and applies one envelope received at `now_ms`.
    pub fn receive(&mut self, bytes: &[u8], now_ms: u64) -> Receipt {
        let opened = wire::open(bytes, &self.config.workspace);
        self.receive_opened(opened, bytes, now_ms)
    }

    /// [`Membership::receive`] for an envelope already passed through [`wire::open`] (a pure
    /// function of the bytes and the workspace, so a simulator may compute it once per message).
    pub fn receive_opened(
        &mut self,
        opened: Result<wire::Opened, Reason>,
        bytes: &[u8],
        now_ms: u64,
    ) -> Receipt {
        self.receive_from(opened, bytes, now_ms, true)
    }

    /// [`Membership::receive_opened`], where `may_add` says whether the message may bring a
    /// node this registry does not hold yet (its sender has not spent its share of newcomers).
    pub fn receive_from(
        &mut self,
        opened: Result<wire::Opened, Reason>,
        bytes: &[u8],
        now_ms: u64,
        may_add: bool,
    ) -> Receipt {
        let opened = match opened {
            Ok(opened) => opened,
            Err(reason) => {
                return refuse(reason, "unknown", wire::claimed_id(bytes), Vec::new());
            }
        };
        if matches!(opened.message, Message::Policy(_)) {
            // Judged by the policy core (see `Protocol`), not here.
            return Receipt { verdict: Verdict::Ignore, changes: Vec::new(), refusal: None };
        }
        let key = opened.key.to_bytes();
        let kind = opened.message.kind();
        let id = opened.message.id().clone();
        if let Some(conflict) = self.key_conflict(&id, &key) {
            let reason = if self.config.pinned.contains_key(&id) || self.roster.contains_key(&id) {
                Reason::UntrustedKey
            } else {
                Reason::KeyConflict
            };
            return refuse(reason, kind, Some(id.to_string()), vec![conflict]);
        }
        if id == self.self_id {
            // Our own message coming back (e.g. through a sync response): nothing to learn.
            return refuse(Reason::Duplicate, kind, Some(id.to_string()), Vec::new());
        }
        let result = match opened.message {
            Message::Advert(advert) => self.advert(advert, key, bytes, now_ms, may_add),
            Message::Heartbeat(beat) => self.beat(&beat, now_ms, false),
            Message::Leave(beat) => self.beat(&beat, now_ms, true),
            Message::Suspect(report) => self.suspicion(&report, now_ms),
            // Returned above: the policy core judges these.
            Message::Policy(_) => Ok(Vec::new()),
        };
        match result {
            Ok(changes) => Receipt { verdict: Verdict::Accept, changes, refusal: None },
            Err(reason) => refuse(reason, kind, Some(id.to_string()), Vec::new()),
        }
    }

    fn key_conflict(&self, id: &NodeId, key: &[u8; 32]) -> Option<Change> {
        let bound = if *id == self.self_id {
            Some(&self.self_key)
        } else {
            self.config
                .pinned
                .get(id)
                .or_else(|| self.roster.get(id))
                .or_else(|| self.members.get(id).map(|m| &m.key))
        };
        let known = bound.filter(|known| *known != key)?;
        Some(Change::Conflict {
            id: id.clone(),
            known_key: B64.encode(known),
            claimed_key: B64.encode(key),
        })
    }

    fn advert(
        &mut self,
        advert: crate::cluster::Advert,
        key: [u8; 32],
        bytes: &[u8],
        now: u64,
        may_add: bool,
    ) -> Result<Vec<Change>, Reason> {
        if advert.advertised_ms > now.saturating_add(self.config.max_skew_ms) {
            return Err(Reason::Future);
        }
        if advert.advertised_ms.saturating_add(advert.ttl_ms) < now {
            return Err(Reason::Expired);
        }
        let id = advert.id.clone();
        let record = NodeRecord {
            advert: Arc::new(advert),
            last_seen_ms: now,
            health: Health::Ok,
            local: false,
        };
        let mut changes = Vec::new();
        match self.members.get_mut(&id) {
            Some(member) => {
                let known = member.record.advert.seq;
                if record.advert.seq < known {
                    // Overtaken: a newer advert came first (gossip reorders).
                    return Err(Reason::Stale);
                }
                if record.advert.seq == known {
                    return Err(if member.envelope == bytes {
                        Reason::Duplicate
                    } else {
                        Reason::Replayed
                    });
                }
                let changed = member.record.differs_from(&record);
                let from = member.record.health;
                member.suspected = None;
                member.beat_pos = member.beat_pos.max((record.advert.seq, 0));
                member.record = record;
                member.envelope = bytes.to_vec();
                self.changed.insert(id.clone());
                self.noted(&id);
                changes.push(Change::Advert { id: id.clone(), first: false, changed });
                if from != Health::Ok {
                    changes.push(Change::Health { id, from, to: Health::Ok });
                }
            }
            None => {
                if !may_add {
                    return Err(Reason::NewcomerLimit);
                }
                if self.members.len() >= self.config.max_nodes {
                    let gone = self.gone_longest().ok_or(Reason::RegistryFull)?;
                    if let Some(member) = self.remove(&gone) {
                        changes.push(Change::Evicted { record: Box::new(member.record) });
                    }
                }
                let beat_pos = (record.advert.seq, 0);
                self.insert(
                    id.clone(),
                    Member {
                        record,
                        key,
                        peer_id: peer_id_of(&key),
                        envelope: bytes.to_vec(),
                        beat_pos,
                        suspected: None,
                        watched_since: None,
                        credit: Credit::default(),
                    },
                );
                changes.push(Change::Advert { id, first: true, changed: true });
            }
        }
        Ok(changes)
    }

    fn beat(&mut self, beat: &wire::Beat, now: u64, leave: bool) -> Result<Vec<Change>, Reason> {
        if beat.sent_ms > now.saturating_add(self.config.max_skew_ms) {
            return Err(Reason::Future);
        }
        if beat.sent_ms.saturating_add(self.config.beat_max_age_ms) < now {
            return Err(Reason::Expired);
        }
        let member = self.members.get_mut(&beat.id).ok_or(Reason::UnknownNode)?;
        let pos = (beat.seq, beat.beat);
        if pos == member.beat_pos {
            return Err(Reason::Duplicate);
        }
        if pos < member.beat_pos {
            return Err(Reason::Stale);
        }
        member.beat_pos = pos;
        member.record.last_seen_ms = now;
        let from = member.record.health;
        // Only a heartbeat newer than what a suspicion was based on clears it: one already on
        // its way when the reporter lost the node proves nothing.
        if member.suspected.as_ref().is_some_and(|s| pos <= s.pos) && !leave {
            return Ok(Vec::new());
        }
        let refuted = member.suspected.take().filter(|_| from == Health::Suspect);
        let to = if leave { Health::Left } else { Health::Ok };
        member.record.health = to;
        if let Some(accuser) = refuted.and_then(|s| s.by) {
            // Alive while the report stood: the report was wrong (a lie, or a false alarm).
            if let Some(accuser) = self.members.get_mut(&accuser) {
                accuser.credit.muted_until_ms = now.saturating_add(MUTED_FOR_MS);
            }
        }
        if from == to {
            return Ok(Vec::new());
        }
        self.noted(&beat.id);
        Ok(vec![Change::Health { id: beat.id.clone(), from, to }])
    }

    /// A reporter lost `target` (a reset connection, or a silence it watched). The report is a
    /// sign of life of the reporter (ordered with its heartbeats); the target becomes `suspect`
    /// until a heartbeat newer than the report's position of it arrives (a position no further
    /// than [`REPORT_SLACK`] beyond what this node has heard of it). Reports of a muted or spent
    /// accuser (see [`Credit`]) about others are signs of life and nothing more; a report about
    /// this node is always answered (others may still listen to that accuser).
    fn suspicion(&mut self, report: &wire::Suspicion, now: u64) -> Result<Vec<Change>, Reason> {
        let beat = wire::Beat {
            id: report.id.clone(),
            workspace: report.workspace.clone(),
            seq: report.seq,
            beat: report.beat,
            sent_ms: report.sent_ms,
            policy: 0,
        };
        let mut changes = self.beat(&beat, now, false)?;
        let pos = (report.target_seq, report.target_beat);
        if report.target == self.self_id {
            // Always answered, whoever said it: others may still listen to this accuser.
            changes.push(Change::SelfSuspected { pos });
            return Ok(changes);
        }
        let credited = self.members.get_mut(&report.id).is_some_and(|m| m.credit.spend(now));
        if !credited {
            tracing::debug!(accuser = %report.id, "suspicion report not acted on: accuser muted or spent");
            return Ok(changes);
        }
        changes.extend(self.suspect_by(&report.target, now, pos, Some(&report.id)));
        Ok(changes)
    }

    /// Marks `target` `suspect` (a reset of its connection seen here), based on what was heard
    /// of it up to `pos`; returns the change, if any.
    pub fn suspect(&mut self, target: &NodeId, now: u64, pos: (u64, u64)) -> Option<Change> {
        self.suspect_by(target, now, pos, None)
    }

    fn suspect_by(
        &mut self,
        target: &NodeId,
        now: u64,
        pos: (u64, u64),
        by: Option<&NodeId>,
    ) -> Option<Change> {
        let member = self.members.get_mut(target)?;
        if member.beat_pos > pos && member.record.health == Health::Ok {
            // Heard from it since the reporter last did: the report is older than our news.
            return None;
        }
        // A report may not claim more than the suspect can have sent as far as this node can
        // tell, so the suspect's refutation always clears it.
        let (seq, beat) = member.beat_pos;
        let pos = pos.min((seq, beat.saturating_add(REPORT_SLACK)));
        match (member.record.health, &mut member.suspected) {
            (Health::Suspect, Some(s)) => {
                s.pos = s.pos.max(pos);
                None
            }
            (Health::Ok, _) => {
                member.suspected = Some(Suspected { at_ms: now, pos, by: by.cloned() });
                member.record.health = Health::Suspect;
                self.noted(target);
                Some(Change::Health { id: target.clone(), from: Health::Ok, to: Health::Suspect })
            }
            _ => None,
        }
    }

    /// The member gone (`down`, `stale` or `left`) and silent the longest, to make room for a
    /// new one in a full registry. A scan of every member, done only when the registry is full.
    fn gone_longest(&self) -> Option<NodeId> {
        self.members
            .iter()
            .filter(|(_, m)| matches!(m.record.health, Health::Down | Health::Stale | Health::Left))
            .min_by_key(|(_, m)| m.record.last_seen_ms)
            .map(|(id, _)| id.clone())
    }

    /// Members this node holds `suspect`, `down` or `stale`: a peer that holds one of them `ok`
    /// asks it for proof of life (see `Protocol::vouch`).
    pub fn lost(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|(_, m)| {
                matches!(m.record.health, Health::Suspect | Health::Down | Health::Stale)
            })
            .map(|(id, _)| id.to_string())
            .collect()
    }

    /// Moves whenever a member is added or removed: the set of `(id, key)` bindings can only have
    /// changed when it did.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The newest `(seq, beat)` accepted from `id`, for a suspicion report about it.
    pub fn position(&self, id: &NodeId) -> (u64, u64) {
        self.members.get(id).map_or((0, 0), |m| m.beat_pos)
    }

    /// The transport vouches (an authenticated connection) that `id` answered a probe at
    /// `now_ms`: its silence ends, though only a signed heartbeat can clear a suspicion.
    pub fn answered(&mut self, id: &NodeId, now_ms: u64) {
        if let Some(member) = self.members.get_mut(id) {
            member.record.last_seen_ms = member.record.last_seen_ms.max(now_ms);
        }
    }

    /// Probe mode: the nodes to probe this period. Walking the ring backwards from this node:
    /// the first `observers` nodes believed alive (watched: their silence is judged here), and
    /// the `down` or `stale` ones passed on the way (probed so that a recovery is seen).
    /// Broadcast mode: none.
    pub fn probes(&self) -> Vec<Probe> {
        let Some(k) = self.config.observers else { return Vec::new() };
        let me = (place(&self.self_id), self.self_id.clone());
        let before = self.ring.range(..&me).rev();
        let wrapped = self.ring.range(&me..).rev();
        let mut probes = Vec::new();
        let mut alive = 0;
        for (_, id) in before.chain(wrapped) {
            if alive == k {
                break;
            }
            let Some(member) = self.members.get(id) else { continue };
            let health = member.record.health;
            match health {
                Health::Left => continue,
                Health::Ok | Health::Suspect => alive += 1,
                Health::Down | Health::Stale => {}
            }
            let proof = health != Health::Ok;
            probes.push(Probe { id: id.clone(), peer: member.peer_id, proof });
        }
        probes
    }

    /// The pinned Home's roster (id → admitted key) is now `roster`. An admitted key wins over a
    /// binding made on first use (a key pinned by `trust_nodes` still wins over both): a member
    /// bound to another key is dropped, so the admitted node's next advert or sync brings it
    /// back under the right key, and the other key is refused from then on.
    pub fn set_roster(&mut self, roster: BTreeMap<NodeId, [u8; 32]>) -> Vec<Change> {
        let mut changes = Vec::new();
        for (id, key) in &roster {
            let unpinned = !self.config.pinned.contains_key(id);
            if unpinned
                && self.members.get(id).is_some_and(|m| m.key != *key)
                && let Some(member) = self.remove(id)
            {
                changes.push(Change::Conflict {
                    id: id.clone(),
                    known_key: B64.encode(key),
                    claimed_key: B64.encode(member.key),
                });
                changes.push(Change::Evicted { record: Box::new(member.record) });
            }
        }
        self.roster = roster;
        changes
    }

    /// This node could not hear anyone until `now_ms` (its own link to the bus was down, or it
    /// was stalled): silence before that is not held against the others, and a suspicion
    /// raised before then gets its full time to be refuted from now.
    pub fn resume(&mut self, now_ms: u64) {
        self.resumed_ms = now_ms;
        self.recompute_deadline();
    }

    /// This node is slow (its own timers fire late): its judgements of silence are worth less,
    /// so every threshold (suspect, down, confirmation) is `factor` times as long; 1 is normal.
    pub fn set_slowdown(&mut self, factor: u64) {
        if self.slowdown != factor.max(1) {
            self.slowdown = factor.max(1);
            self.recompute_deadline();
        }
    }

    fn suspect_after(&self) -> u64 {
        self.config.suspect_after_ms.saturating_mul(self.slowdown)
    }

    fn down_after(&self) -> u64 {
        self.config.down_after_ms.saturating_mul(self.slowdown)
    }

    fn confirm(&self) -> u64 {
        self.config.confirm_ms().saturating_mul(self.slowdown)
    }

    /// When a suspicion raised at `at_ms` started to count (not before this node resumed).
    fn counted_from(&self, at_ms: u64) -> u64 {
        at_ms.max(self.resumed_ms)
    }

    /// Probe mode: whether this node watches `id` (judges its silence itself).
    pub fn is_watched(&self, id: &NodeId) -> bool {
        self.members.get(id).is_some_and(|m| m.watched_since.is_some())
    }

    fn watched(&self, member: &Member) -> bool {
        self.config.observers.is_none() || member.watched_since.is_some()
    }

    /// The earliest moment a health transition can fall due (a silence reaching its threshold,
    /// a suspicion standing long enough), for a caller that judges then rather than at its next
    /// periodic tick. Messages only move deadlines later, so checking this after each
    /// [`Membership::tick`] is enough.
    pub fn next_deadline(&self) -> Option<u64> {
        self.deadline
    }

    /// The health `member` is due to move to at `now_ms`, if any (see [`Membership::tick`]).
    fn judge(&self, member: &Member, now_ms: u64) -> Option<Health> {
        let health = member.record.health;
        if !matches!(health, Health::Ok | Health::Suspect) {
            return None;
        }
        let silence = now_ms.saturating_sub(self.heard(member));
        let watched = self.watched(member);
        let confirmed = member
            .suspected
            .as_ref()
            .is_some_and(|s| now_ms.saturating_sub(self.counted_from(s.at_ms)) >= self.confirm());
        let to = if confirmed || (watched && silence >= self.down_after()) {
            Health::Down
        } else if watched && silence >= self.suspect_after() {
            Health::Suspect
        } else {
            return None;
        };
        (to != health).then_some(to)
    }

    /// When the silence of `member` began, as far as this node can judge it.
    fn heard(&self, member: &Member) -> u64 {
        let heard = member.record.last_seen_ms.max(self.resumed_ms);
        heard.max(member.watched_since.unwrap_or(0))
    }

    /// Health transitions due at `now_ms`: a watched node silent beyond `suspect_after_ms` →
    /// `suspect`, beyond `down_after_ms` → `down`; any suspicion standing for
    /// [`MembershipConfig::confirm_ms`] → `down`. Silence beyond `evict_after_ms` removes the
    /// node. Only messages move a node back up. In probe mode the watched set is refreshed
    /// first (a node newly watched is given a full silence from now).
    pub fn tick(&mut self, now_ms: u64) -> Vec<Change> {
        if self.config.observers.is_some() {
            let watch: BTreeSet<NodeId> = self.probes().into_iter().map(|p| p.id).collect();
            for (id, member) in &mut self.members {
                let alive = matches!(member.record.health, Health::Ok | Health::Suspect);
                if watch.contains(id) && alive {
                    member.watched_since.get_or_insert(now_ms);
                } else {
                    member.watched_since = None;
                }
            }
        }
        let mut evict = Vec::new();
        let mut due = Vec::new();
        for (id, member) in &self.members {
            if now_ms.saturating_sub(member.record.last_seen_ms) >= self.config.evict_after_ms {
                evict.push(id.clone());
            } else if let Some(to) = self.judge(member, now_ms) {
                due.push((id.clone(), to));
            }
        }
        let mut changes = Vec::new();
        for (id, to) in due {
            let Some(member) = self.members.get_mut(&id) else { continue };
            let from = member.record.health;
            member.record.health = to;
            member.suspected = (to == Health::Suspect).then_some(Suspected {
                at_ms: now_ms,
                pos: member.beat_pos,
                by: None,
            });
            changes.push(Change::Health { id, from, to });
        }
        for id in evict {
            if let Some(member) = self.remove(&id) {
                changes.push(Change::Evicted { record: Box::new(member.record) });
            }
        }
        self.recompute_deadline();
        changes
    }
}

fn stored(m: &Member) -> StoredMember {
    StoredMember {
        record: m.record.clone(),
        key: B64.encode(m.key),
        envelope: String::from_utf8_lossy(&m.envelope).into_owned(),
    }
}

fn refuse(
    reason: Reason,
    kind: &'static str,
    claimed_id: Option<String>,
    changes: Vec<Change>,
) -> Receipt {
    // A duplicate first heard by gossip after a sync brought it is still passed on once (the
    // gossip layer's own cache stops repeats): a flood must not stop at every node that synced.
    let verdict = match reason {
        Reason::Duplicate => Verdict::Accept,
        r if r.is_invalid() => Verdict::Reject,
        _ => Verdict::Ignore,
    };
    let quiet = matches!(reason, Reason::Duplicate | Reason::Stale);
    let refusal = (!quiet).then_some(Refusal { reason, kind, claimed_id });
    Receipt { verdict, changes, refusal }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cluster::Advert,
        identity::NodeKey,
        wire::{Beat, seal},
    };

    const NOW: u64 = 1_800_000_000_000;

    fn advert(id: &str, seq: u64, at: u64) -> Message {
        Message::Advert(Advert::basic(NodeId::parse(id).expect("id"), "lab", seq, at))
    }

    fn beat(id: &str, seq: u64, n: u64, at: u64) -> Message {
        Message::Heartbeat(Beat {
            id: NodeId::parse(id).expect("id"),
            workspace: "lab".into(),
            seq,
            beat: n,
            sent_ms: at,
            policy: 0,
        })
    }

    fn membership() -> Membership {
        let me = NodeKey::from_secret([9; 32]);
        Membership::new(
            MembershipConfig::new("lab"),
            NodeId::parse("me").expect("id"),
            me.verifying_key().to_bytes(),
        )
    }

    #[test]
    fn trust_on_first_use_then_conflicts_are_reported() {
        let mut m = membership();
        let honest = NodeKey::from_secret([1; 32]);
        let rogue = NodeKey::from_secret([2; 32]);
        let r = m.receive(&seal(&honest, "lab", &advert("n1", 1, NOW)), NOW);
        assert_eq!(r.verdict, Verdict::Accept);
        let r = m.receive(&seal(&rogue, "lab", &advert("n1", 2, NOW)), NOW);
        assert_eq!(r.verdict, Verdict::Ignore, "not forwarded; the forwarder may be honest");
        assert_eq!(r.refusal.map(|x| x.reason), Some(Reason::KeyConflict));
        assert!(matches!(r.changes[..], [Change::Conflict { .. }]));
        assert_eq!(m.members()["n1"].record.advert.seq, 1);
        // Claiming this node's own id is a conflict too.
        let r = m.receive(&seal(&rogue, "lab", &advert("me", 5, NOW)), NOW);
        assert_eq!(r.refusal.map(|x| x.reason), Some(Reason::KeyConflict));
    }

    #[test]
    fn the_home_s_roster_wins_over_first_use() {
        let mut m = membership();
        let (owner, squatter) = (NodeKey::from_secret([1; 32]), NodeKey::from_secret([2; 32]));
        m.receive(&seal(&squatter, "lab", &advert("n1", 5, NOW)), NOW);
        let r = m.receive(&seal(&owner, "lab", &advert("n1", 1, NOW)), NOW);
        assert_eq!(r.refusal.map(|x| x.reason), Some(Reason::KeyConflict), "first use wins");
        let id = NodeId::parse("n1").expect("id");
        let changes = m.set_roster(BTreeMap::from([(id, owner.verifying_key().to_bytes())]));
        assert!(matches!(&changes[..], [Change::Conflict { .. }, Change::Evicted { .. }]));
        let r = m.receive(&seal(&owner, "lab", &advert("n1", 1, NOW)), NOW);
        assert_eq!(r.verdict, Verdict::Accept, "the admitted key takes over, from any seq");
        let r = m.receive(&seal(&squatter, "lab", &advert("n1", 9, NOW)), NOW);
        assert_eq!(r.refusal.map(|x| x.reason), Some(Reason::UntrustedKey));
    }

    #[test]
    fn pinned_keys_win_over_first_use() {
        let mut config = MembershipConfig::new("lab");
        let owner = NodeKey::from_secret([1; 32]);
        config.pinned.insert(NodeId::parse("n1").expect("id"), owner.verifying_key().to_bytes());
        let mut m = Membership::new(config, NodeId::parse("me").expect("id"), [0; 32]);
        let r = m.receive(&seal(&NodeKey::from_secret([2; 32]), "lab", &advert("n1", 1, NOW)), NOW);
        assert_eq!(r.refusal.map(|x| x.reason), Some(Reason::UntrustedKey));
        assert!(m.members().is_empty());
        assert_eq!(
            m.receive(&seal(&owner, "lab", &advert("n1", 1, NOW)), NOW).verdict,
            Verdict::Accept
        );
    }

    #[test]
    fn silence_moves_ok_to_suspect_to_down_and_messages_bring_it_back() {
        let mut m = membership();
        let k = NodeKey::from_secret([1; 32]);
        m.receive(&seal(&k, "lab", &advert("n1", 10, NOW)), NOW);
        assert!(m.tick(NOW + 2_999).is_empty());
        assert!(matches!(m.tick(NOW + 3_000)[..], [Change::Health { to: Health::Suspect, .. }]));
        assert!(matches!(m.tick(NOW + 5_000)[..], [Change::Health { to: Health::Down, .. }]));
        assert!(m.tick(NOW + 9_000).is_empty());
        let r = m.receive(&seal(&k, "lab", &beat("n1", 10, 1, NOW + 9_000)), NOW + 9_000);
        assert!(matches!(
            r.changes[..],
            [Change::Health { from: Health::Down, to: Health::Ok, .. }]
        ));
    }

    #[test]
    fn a_suspicion_stands_for_the_confirm_window_then_the_node_is_down() {
        let mut m = membership();
        let k = NodeKey::from_secret([1; 32]);
        m.receive(&seal(&k, "lab", &advert("n1", 10, NOW)), NOW);
        let n1 = NodeId::parse("n1").expect("id");
        let pos = m.position(&n1);
        assert!(m.suspect(&n1, NOW + 100, pos).is_some());
        assert!(m.tick(NOW + 2_099).is_empty(), "confirm window: down_after − suspect_after");
        assert!(matches!(m.tick(NOW + 2_100)[..], [Change::Health { to: Health::Down, .. }]));
    }

    fn report(target_beat: u64, beat: u64, at: u64) -> Message {
        report_by("n2", target_beat, beat, at)
    }

    fn report_by(reporter: &str, target_beat: u64, beat: u64, at: u64) -> Message {
        Message::Suspect(wire::Suspicion {
            id: NodeId::parse(reporter).expect("id"),
            workspace: "lab".into(),
            seq: 10,
            beat,
            sent_ms: at,
            target: NodeId::parse("n1").expect("id"),
            target_seq: 10,
            target_beat,
        })
    }

    #[test]
    fn a_report_holds_until_a_newer_heartbeat_than_it_was_based_on() {
        let mut m = membership();
        let (target, reporter) = (NodeKey::from_secret([1; 32]), NodeKey::from_secret([2; 32]));
        m.receive(&seal(&target, "lab", &advert("n1", 10, NOW)), NOW);
        m.receive(&seal(&reporter, "lab", &advert("n2", 10, NOW)), NOW);
        // The reporter last heard n1's beat 2.
        let r = m.receive(&seal(&reporter, "lab", &report(2, 1, NOW + 100)), NOW + 100);
        assert!(matches!(r.changes[..], [Change::Health { to: Health::Suspect, .. }]));
        // Beat 2, still on its way, does not clear it...
        let r = m.receive(&seal(&target, "lab", &beat("n1", 10, 2, NOW + 50)), NOW + 200);
        assert!(r.changes.is_empty(), "{:?}", r.changes);
        let r = m.receive(&seal(&reporter, "lab", &report(2, 2, NOW + 600)), NOW + 600);
        assert!(r.changes.is_empty(), "already suspect");
        // A forged report from an unknown node, or a replayed one, does nothing.
        let stranger = NodeKey::from_secret([3; 32]);
        assert_eq!(
            m.receive(&seal(&stranger, "lab", &report(2, 3, NOW)), NOW).verdict,
            Verdict::Ignore
        );
        assert_eq!(
            m.receive(&seal(&reporter, "lab", &report(2, 1, NOW + 100)), NOW + 700).verdict,
            Verdict::Ignore
        );
        // ...beat 3 does.
        let r = m.receive(&seal(&target, "lab", &beat("n1", 10, 3, NOW + 800)), NOW + 800);
        assert!(matches!(r.changes[..], [Change::Health { to: Health::Ok, .. }]));
        assert!(m.tick(NOW + 2_500).is_empty(), "the suspicion is gone with its window");
        // The reporter was wrong: its reports count for nothing for a while.
        let r = m.receive(&seal(&reporter, "lab", &report(3, 3, NOW + 900)), NOW + 900);
        assert_eq!((r.verdict, &r.changes[..]), (Verdict::Accept, &[][..]), "muted");
        // Unrefuted, another's report becomes `down` once the confirm window has passed.
        let other = NodeKey::from_secret([4; 32]);
        m.receive(&seal(&other, "lab", &advert("n3", 10, NOW)), NOW);
        m.receive(&seal(&other, "lab", &report_by("n3", 3, 1, NOW + 3_000)), NOW + 3_000);
        let n1_down = |changes: &[Change]| {
            changes.iter().any(
                |c| matches!(c, Change::Health { id, to: Health::Down, .. } if id.as_str() == "n1"),
            )
        };
        assert!(!n1_down(&m.tick(NOW + 4_999)));
        assert!(n1_down(&m.tick(NOW + 5_000)));
    }

    #[test]
    fn a_report_claiming_more_than_was_sent_costs_one_refutation_and_no_down() {
        let mut m = membership();
        let (target, liar) = (NodeKey::from_secret([1; 32]), NodeKey::from_secret([2; 32]));
        m.receive(&seal(&target, "lab", &advert("n1", 10, NOW)), NOW);
        m.receive(&seal(&liar, "lab", &advert("n2", 10, NOW)), NOW);
        let mut lie = report(u64::MAX, 1, NOW + 100);
        if let Message::Suspect(s) = &mut lie {
            s.target_seq = u64::MAX;
        }
        let r = m.receive(&seal(&liar, "lab", &lie), NOW + 100);
        assert!(matches!(r.changes[..], [Change::Health { to: Health::Suspect, .. }]));
        // The target's refutation skips REPORT_SLACK beats past its last.
        let refutation = beat("n1", 10, REPORT_SLACK + 1, NOW + 150);
        let r = m.receive(&seal(&target, "lab", &refutation), NOW + 150);
        assert!(matches!(r.changes[..], [Change::Health { to: Health::Ok, .. }]), "{r:?}");
        // Past the 2 s confirm window from the report.
        assert!(m.tick(NOW + 2_500).is_empty(), "never down");
        // The liar is muted: its next lies are signs of its life, nothing more.
        let mut again = lie.clone();
        if let Message::Suspect(s) = &mut again {
            s.beat = 2;
            s.sent_ms = NOW + 2_600;
        }
        let r = m.receive(&seal(&liar, "lab", &again), NOW + 2_600);
        assert_eq!((r.verdict, &r.changes[..]), (Verdict::Accept, &[][..]));
        assert_eq!(m.members()["n1"].record.health, Health::Ok);
    }

    #[test]
    fn an_accuser_is_heard_a_limited_number_of_times_per_window() {
        let mut m = membership();
        let accuser = NodeKey::from_secret([2; 32]);
        m.receive(&seal(&accuser, "lab", &advert("n2", 10, NOW)), NOW);
        let targets = REPORTS_PER_WINDOW as u64 + 4;
        for t in 0..targets {
            let key = NodeKey::from_secret([100 + t as u8; 32]);
            m.receive(&seal(&key, "lab", &advert(&format!("t{t}"), 10, NOW)), NOW);
        }
        let mut suspected = 0;
        for t in 0..targets {
            let mut r = report(0, t + 1, NOW + 100);
            if let Message::Suspect(s) = &mut r {
                s.target = NodeId::parse(&format!("t{t}")).expect("id");
            }
            suspected += m.receive(&seal(&accuser, "lab", &r), NOW + 100).changes.len();
        }
        assert_eq!(suspected, REPORTS_PER_WINDOW as usize);
    }

    #[test]
    fn a_full_registry_makes_room_only_by_dropping_a_gone_node() {
        let mut config = MembershipConfig::new("lab");
        config.max_nodes = 3;
        let mut m = Membership::new(config, NodeId::parse("me").expect("id"), [0; 32]);
        let join = |m: &mut Membership, i: u8, at: u64| {
            let key = NodeKey::from_secret([i; 32]);
            m.receive(&seal(&key, "lab", &advert(&format!("n{i}"), 1, at)), at)
        };
        for i in 1..=3 {
            assert_eq!(join(&mut m, i, NOW).verdict, Verdict::Accept);
        }
        let r = join(&mut m, 4, NOW);
        assert_eq!(r.refusal.map(|x| x.reason), Some(Reason::RegistryFull));
        assert_eq!(r.verdict, Verdict::Ignore, "not forwarded, forwarder not blamed");
        // n2 falls silent and goes down; the next newcomer takes its place.
        let key = NodeKey::from_secret([1; 32]);
        m.receive(&seal(&key, "lab", &beat("n1", 1, 1, NOW + 4_000)), NOW + 4_000);
        let key = NodeKey::from_secret([3; 32]);
        m.receive(&seal(&key, "lab", &beat("n3", 1, 1, NOW + 4_000)), NOW + 4_000);
        m.tick(NOW + 5_000);
        assert_eq!(m.members()["n2"].record.health, Health::Down);
        let r = join(&mut m, 5, NOW + 5_000);
        assert_eq!(r.verdict, Verdict::Accept);
        assert!(
            r.changes.iter().any(
                |c| matches!(c, Change::Evicted { record } if record.advert.id.as_str() == "n2")
            )
        );
        assert_eq!(m.members().len(), 3);
        // A sender out of its share of newcomers is refused for new ids only.
        let opened =
            wire::open(&seal(&NodeKey::from_secret([6; 32]), "lab", &advert("n6", 1, NOW)), "lab");
        let bytes = seal(&NodeKey::from_secret([6; 32]), "lab", &advert("n6", 1, NOW));
        let r = m.receive_from(opened, &bytes, NOW + 5_000, false);
        assert_eq!(r.refusal.map(|x| x.reason), Some(Reason::NewcomerLimit));
    }

    #[test]
    fn a_report_naming_this_node_asks_it_to_refute() {
        let mut m = membership();
        let reporter = NodeKey::from_secret([2; 32]);
        m.receive(&seal(&reporter, "lab", &advert("n2", 10, NOW)), NOW);
        let mut about_me = report(4, 1, NOW);
        if let Message::Suspect(s) = &mut about_me {
            s.target = NodeId::parse("me").expect("id");
        }
        let r = m.receive(&seal(&reporter, "lab", &about_me), NOW);
        assert_eq!(r.changes, vec![Change::SelfSuspected { pos: (10, 4) }]);
    }

    fn probe_mode(nodes: usize) -> (Membership, Vec<NodeKey>) {
        let mut config = MembershipConfig::new("lab");
        config.observers = Some(2);
        let mut m = Membership::new(config, NodeId::parse("me").expect("id"), [9; 32]);
        let keys: Vec<NodeKey> =
            (0..nodes).map(|i| NodeKey::from_secret([i as u8 + 1; 32])).collect();
        for (i, k) in keys.iter().enumerate() {
            m.receive(&seal(k, "lab", &advert(&format!("n{i}"), 10, NOW)), NOW);
        }
        (m, keys)
    }

    #[test]
    fn probe_mode_watches_the_ring_predecessors_and_probes_the_down_ones_between() {
        let (mut m, _) = probe_mode(8);
        let probes = m.probes();
        assert_eq!(probes.len(), 2, "{probes:?}");
        assert!(probes.iter().all(|p| !p.proof && p.peer.is_some()));
        // Only watched nodes are judged on silence; the others wait for reports.
        m.tick(NOW);
        let changes = m.tick(NOW + 3_000);
        let suspected: BTreeSet<&NodeId> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Health { id, to: Health::Suspect, .. } => Some(id),
                _ => None,
            })
            .collect();
        let watched: BTreeSet<&NodeId> = probes.iter().map(|p| &p.id).collect();
        assert_eq!(suspected, watched);
        // Once down, they are still probed (for proof of life), and the next ones are watched.
        m.tick(NOW + 5_000);
        let probes = m.probes();
        assert_eq!(probes.len(), 4, "{probes:?}");
        assert_eq!(probes.iter().filter(|p| p.proof).count(), 2);
        assert!(probes.iter().filter(|p| p.proof).all(|p| watched.contains(&p.id)));
        // A newly watched node's silence counts from when it was first watched.
        assert!(m.tick(NOW + 5_001).is_empty());
        assert_eq!(m.tick(NOW + 8_001).len(), 2);
    }

    #[test]
    fn an_answered_probe_ends_a_silence_but_not_a_suspicion() {
        let (mut m, _) = probe_mode(3);
        m.tick(NOW);
        let watched: Vec<NodeId> = m.probes().into_iter().map(|p| p.id).collect();
        m.answered(&watched[0], NOW + 2_500);
        let changes = m.tick(NOW + 3_000);
        assert_eq!(changes.len(), 1, "only the silent one: {changes:?}");
        m.answered(&watched[1], NOW + 3_100);
        assert!(m.probes().iter().any(|p| p.id == watched[1] && p.proof), "still asks for proof");
    }

    #[test]
    fn leave_is_seen_at_once_and_eviction_removes() {
        let mut m = membership();
        let k = NodeKey::from_secret([1; 32]);
        m.receive(&seal(&k, "lab", &advert("n1", 10, NOW)), NOW);
        let leave = Message::Leave(Beat {
            id: NodeId::parse("n1").expect("id"),
            workspace: "lab".into(),
            seq: 10,
            beat: 1,
            sent_ms: NOW,
            policy: 0,
        });
        let r = m.receive(&seal(&k, "lab", &leave), NOW);
        assert!(matches!(r.changes[..], [Change::Health { to: Health::Left, .. }]));
        assert!(m.tick(NOW + 60_000).is_empty(), "a node that left is not marked down");
        let evict_at = NOW + m.config().evict_after_ms;
        assert!(matches!(m.tick(evict_at)[..], [Change::Evicted { .. }]));
        assert!(m.members().is_empty());
    }

    #[test]
    fn heartbeats_and_adverts_are_ordered_independently() {
        // An advert overtaken by a heartbeat sent after it is still accepted.
        let mut m = membership();
        let k = NodeKey::from_secret([1; 32]);
        m.receive(&seal(&k, "lab", &advert("n1", 10, NOW)), NOW);
        assert_eq!(
            m.receive(&seal(&k, "lab", &beat("n1", 20, 1, NOW)), NOW).verdict,
            Verdict::Accept
        );
        assert_eq!(
            m.receive(&seal(&k, "lab", &advert("n1", 20, NOW)), NOW).verdict,
            Verdict::Accept
        );
        // The same heartbeat again (it came by request first) is passed on once, quietly; an
        // older one is dropped, quietly: both happen to honest nodes.
        let again = m.receive(&seal(&k, "lab", &beat("n1", 20, 1, NOW)), NOW);
        assert_eq!((again.verdict, again.refusal), (Verdict::Accept, None));
        let older = m.receive(&seal(&k, "lab", &beat("n1", 10, 7, NOW)), NOW);
        assert_eq!((older.verdict, older.refusal), (Verdict::Ignore, None));
    }

    #[test]
    fn sync_digest_selects_newer_adverts_and_restore_marks_stale() {
        let mut m = membership();
        for (i, id) in ["a", "b"].iter().enumerate() {
            let k = NodeKey::from_secret([i as u8 + 1; 32]);
            m.receive(&seal(&k, "lab", &advert(id, 5, NOW)), NOW);
        }
        let digest = BTreeMap::from([("a".to_owned(), 5), ("b".to_owned(), 4)]);
        assert_eq!(m.newer_than(&digest).len(), 1);
        assert_eq!(m.newer_than(&BTreeMap::new()).len(), 2);

        let mut restored = membership();
        restored.restore(m.stored());
        assert!(restored.members().values().all(|x| x.record.health == Health::Stale));
        // Replays of what was already accepted change nothing after a restart (a byte-identical
        // copy is passed on once by gossip, as any duplicate first heard that way).
        let k = NodeKey::from_secret([1; 32]);
        let r = restored.receive(&seal(&k, "lab", &advert("a", 5, NOW)), NOW);
        assert!(r.changes.is_empty() && r.refusal.is_none(), "{r:?}");
        assert_eq!(restored.members()["a"].record.health, Health::Stale);
        assert_eq!(
            restored.receive(&seal(&k, "lab", &beat("a", 4, 9, NOW)), NOW).verdict,
            Verdict::Ignore
        );
        let r = restored.receive(&seal(&k, "lab", &beat("a", 5, 1, NOW)), NOW);
        assert!(matches!(
            r.changes[..],
            [Change::Health { from: Health::Stale, to: Health::Ok, .. }]
        ));
    }
}
