//! Who else is in the workspace, as this node has verified it: the IO-less core of federation.
//!
//! [`Membership::receive`] takes an envelope's bytes exactly as they arrived (from gossip or a
//! sync response) and either accepts it or says why not; [`Membership::tick`] moves silent nodes
//! `ok → suspect → down` and evicts long-silent ones; [`Membership::transport`] takes the
//! transport's word that a direct connection came up or went away. Time is always passed in.

use std::collections::BTreeMap;

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::{
    cluster::{Health, NodeRecord},
    node_id::NodeId,
    wire::{self, Message, Reason},
};

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
        }
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
    /// What the transport last said about a direct connection.
    link: Link,
    /// When a reported reset made this node `suspect` (receiver's clock).
    suspected_ms: Option<u64>,
}

/// The transport's view of a direct connection to a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Never connected directly (messages may still arrive through other nodes).
    Unknown,
    /// Connected.
    Up,
    /// Was connected; the connection is gone.
    Dropped,
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
    /// Removed after `evict_after_ms` of silence.
    Evicted {
        /// The removed record.
        record: Box<NodeRecord>,
    },
    /// A newer policy document from the pinned Home is in force (see `Protocol`).
    Policy(crate::policy::Applied),
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
        }
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
                link: Link::Unknown,
                suspected_ms: None,
            };
            self.members.insert(id, member);
        }
    }

    /// What to persist.
    pub fn stored(&self) -> Vec<StoredMember> {
        self.members
            .values()
            .map(|m| StoredMember {
                record: m.record.clone(),
                key: B64.encode(m.key),
                envelope: String::from_utf8_lossy(&m.envelope).into_owned(),
            })
            .collect()
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
        self.members.iter().find(|(_, m)| m.peer_id.as_ref() == Some(peer)).map(|(id, _)| id)
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
            Message::Advert(advert) => self.advert(advert, key, bytes, now_ms),
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
    ) -> Result<Vec<Change>, Reason> {
        if advert.advertised_ms > now.saturating_add(self.config.max_skew_ms) {
            return Err(Reason::Future);
        }
        if advert.advertised_ms.saturating_add(advert.ttl_ms) < now {
            return Err(Reason::Expired);
        }
        let id = advert.id.clone();
        let record = NodeRecord { advert, last_seen_ms: now, health: Health::Ok, local: false };
        let mut changes = Vec::new();
        match self.members.get_mut(&id) {
            Some(member) => {
                let known = member.record.advert.seq;
                if record.advert.seq < known {
                    return Err(Reason::Replayed);
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
                member.beat_pos = member.beat_pos.max((record.advert.seq, 0));
                member.record = record;
                member.envelope = bytes.to_vec();
                changes.push(Change::Advert { id: id.clone(), first: false, changed });
                if from != Health::Ok {
                    changes.push(Change::Health { id, from, to: Health::Ok });
                }
            }
            None => {
                let beat_pos = (record.advert.seq, 0);
                self.members.insert(
                    id.clone(),
                    Member {
                        record,
                        key,
                        peer_id: peer_id_of(&key),
                        envelope: bytes.to_vec(),
                        beat_pos,
                        link: Link::Unknown,
                        suspected_ms: None,
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
        if pos <= member.beat_pos {
            return Err(Reason::Replayed);
        }
        member.beat_pos = pos;
        member.record.last_seen_ms = now;
        let from = member.record.health;
        // Heartbeats still in flight when a reset was reported do not clear the suspicion; only
        // one that arrives half an interval later does.
        let window = self.config.heartbeat_interval_ms / 2;
        let held = member.suspected_ms.is_some_and(|t| now.saturating_sub(t) < window);
        if from == Health::Suspect && held && !leave {
            return Ok(Vec::new());
        }
        // Heard again after a suspicion: a reported (or seen) reset is over, so the short
        // thresholds of a dropped connection no longer apply (a direct connection coming back
        // says `Up` on its own). A false report thus costs one suspicion, not a lasting penalty.
        if member.suspected_ms.take().is_some() || from != Health::Ok {
            member.link = match member.link {
                Link::Dropped => Link::Unknown,
                other => other,
            };
        }
        let to = if leave { Health::Left } else { Health::Ok };
        member.record.health = to;
        Ok(if from == to {
            Vec::new()
        } else {
            vec![Change::Health { id: beat.id.clone(), from, to }]
        })
    }

    /// A reporter says its connection to `target` was reset. The report is a sign of life of
    /// the reporter (ordered with its heartbeats); the target becomes `suspect` at once and from
    /// then on is judged by the short thresholds of a dropped connection. A live target clears
    /// itself with a heartbeat arriving more than half an interval after the report.
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
        changes.extend(self.suspect(&report.target, now));
        Ok(changes)
    }

    /// Marks `target` `suspect` after a reset of its connection (reported by another node, or
    /// seen here), and judges it from now on by the short thresholds of a dropped connection.
    pub fn suspect(&mut self, target: &NodeId, now: u64) -> Option<Change> {
        let member = self.members.get_mut(target)?;
        member.link = Link::Dropped;
        if member.record.health != Health::Ok {
            return None;
        }
        member.suspected_ms = Some(now);
        member.record.health = Health::Suspect;
        Some(Change::Health { id: target.clone(), from: Health::Ok, to: Health::Suspect })
    }

    /// The pinned Home's roster (id → admitted key) is now `roster`. An admitted key wins over a
    /// binding made on first use (a key pinned by `trust_nodes` still wins over both): a member
    /// bound to another key is dropped, so the admitted node's next advert or sync brings it
    /// back under the right key, and the other key is refused from then on.
    pub fn set_roster(&mut self, roster: BTreeMap<NodeId, [u8; 32]>) -> Vec<Change> {
        let mut changes = Vec::new();
        for (id, key) in &roster {
            let unpinned = !self.config.pinned.contains_key(id);
            if unpinned && self.members.get(id).is_some_and(|m| m.key != *key) {
                if let Some(member) = self.members.remove(id) {
                    changes.push(Change::Conflict {
                        id: id.clone(),
                        known_key: B64.encode(key),
                        claimed_key: B64.encode(member.key),
                    });
                    changes.push(Change::Evicted { record: Box::new(member.record) });
                }
            }
        }
        self.roster = roster;
        changes
    }

    /// This node could not hear anyone until `now_ms` (its own link to the bus was down): silence
    /// before that is not held against the others.
    pub fn resume(&mut self, now_ms: u64) {
        self.resumed_ms = now_ms;
    }

    /// The transport says a direct connection to `peer` came up or went away. A node whose
    /// connection is gone is judged on a shorter silence (see [`Membership::tick`]).
    pub fn transport(&mut self, peer: &PeerId, connected: bool) {
        if let Some(member) = self.members.values_mut().find(|m| m.peer_id.as_ref() == Some(peer)) {
            member.link = if connected { Link::Up } else { Link::Dropped };
        }
    }

    /// The earliest moment a health transition can fall due (a silence reaching its threshold),
    /// for a caller that judges then rather than at its next periodic tick. Messages only move
    /// deadlines later, so checking this after each [`Membership::tick`] is enough.
    pub fn next_deadline(&self) -> Option<u64> {
        self.members
            .values()
            .filter_map(|m| {
                let (suspect_after, down_after) = thresholds(&self.config, m.link);
                let heard = m.record.last_seen_ms.max(self.resumed_ms);
                match m.record.health {
                    Health::Ok => Some(heard.saturating_add(suspect_after)),
                    Health::Suspect => Some(heard.saturating_add(down_after)),
                    _ => None,
                }
            })
            .min()
    }

    /// Health transitions due at `now_ms`: silence beyond `suspect_after_ms` → `suspect`, beyond
    /// `down_after_ms` → `down`; for a node whose direct connection dropped, 1.5 and 2.5
    /// heartbeat intervals. Silence beyond `evict_after_ms` removes the node. Only messages move
    /// a node back up.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Change> {
        let c = &self.config;
        let mut changes = Vec::new();
        let mut evict = Vec::new();
        for (id, member) in &mut self.members {
            let heard = member.record.last_seen_ms;
            if now_ms.saturating_sub(heard) >= c.evict_after_ms {
                evict.push(id.clone());
                continue;
            }
            let health = member.record.health;
            if matches!(health, Health::Left | Health::Stale | Health::Down) {
                continue;
            }
            let silence = now_ms.saturating_sub(heard.max(self.resumed_ms));
            let (suspect_after, down_after) = thresholds(c, member.link);
            let to = if silence >= down_after {
                Health::Down
            } else if silence >= suspect_after {
                Health::Suspect
            } else {
                continue;
            };
            if to != health {
                member.record.health = to;
                changes.push(Change::Health { id: id.clone(), from: health, to });
            }
        }
        for id in evict {
            if let Some(member) = self.members.remove(&id) {
                changes.push(Change::Evicted { record: Box::new(member.record) });
            }
        }
        changes
    }
}

/// Silence before `suspect` and before `down` for a member whose direct connection is `link`.
fn thresholds(c: &MembershipConfig, link: Link) -> (u64, u64) {
    match link {
        Link::Dropped => (c.heartbeat_interval_ms * 3 / 2, c.heartbeat_interval_ms * 5 / 2),
        Link::Up | Link::Unknown => (c.suspect_after_ms, c.down_after_ms),
    }
}

fn refuse(
    reason: Reason,
    kind: &'static str,
    claimed_id: Option<String>,
    changes: Vec<Change>,
) -> Receipt {
    let verdict = if reason.is_invalid() { Verdict::Reject } else { Verdict::Ignore };
    let refusal = (reason != Reason::Duplicate).then_some(Refusal { reason, kind, claimed_id });
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
    fn a_dropped_connection_shortens_the_wait() {
        let mut m = membership();
        let k = NodeKey::from_secret([1; 32]);
        m.receive(&seal(&k, "lab", &advert("n1", 10, NOW)), NOW);
        m.transport(&k.peer_id(), true);
        m.transport(&k.peer_id(), false);
        assert!(matches!(m.tick(NOW + 2_500)[..], [Change::Health { to: Health::Down, .. }]));
    }

    #[test]
    fn a_reported_reset_makes_a_silent_node_suspect_until_it_speaks() {
        let mut m = membership();
        let (target, reporter) = (NodeKey::from_secret([1; 32]), NodeKey::from_secret([2; 32]));
        m.receive(&seal(&target, "lab", &advert("n1", 10, NOW)), NOW);
        m.receive(&seal(&reporter, "lab", &advert("n2", 10, NOW)), NOW);
        let report = |beat: u64, at: u64| {
            Message::Suspect(wire::Suspicion {
                id: NodeId::parse("n2").expect("id"),
                workspace: "lab".into(),
                seq: 10,
                beat,
                sent_ms: at,
                target: NodeId::parse("n1").expect("id"),
            })
        };
        let r = m.receive(&seal(&reporter, "lab", &report(1, NOW + 100)), NOW + 100);
        assert!(matches!(r.changes[..], [Change::Health { to: Health::Suspect, .. }]));
        // A heartbeat that was already on its way does not clear it...
        let r = m.receive(&seal(&target, "lab", &beat("n1", 10, 1, NOW + 50)), NOW + 200);
        assert!(r.changes.is_empty(), "{:?}", r.changes);
        let r = m.receive(&seal(&reporter, "lab", &report(2, NOW + 600)), NOW + 600);
        assert!(r.changes.is_empty(), "already suspect");
        // The short thresholds of a dropped connection now apply.
        assert!(matches!(m.tick(NOW + 2_700)[..], [Change::Health { to: Health::Down, .. }]));
        // A forged report from an unknown node, or a replayed one, does nothing.
        let stranger = NodeKey::from_secret([3; 32]);
        assert_eq!(
            m.receive(&seal(&stranger, "lab", &report(3, NOW)), NOW).verdict,
            Verdict::Ignore
        );
        assert_eq!(
            m.receive(&seal(&reporter, "lab", &report(2, NOW + 600)), NOW + 700).verdict,
            Verdict::Ignore
        );
        // ...one sent later does.
        let r = m.receive(&seal(&target, "lab", &beat("n1", 10, 2, NOW + 2_800)), NOW + 2_800);
        assert!(matches!(r.changes[..], [Change::Health { to: Health::Ok, .. }]));
        // And the node is judged by the ordinary thresholds again: 2.5 s of silence is not down.
        let n1_down = |changes: &[Change]| {
            changes.iter().any(
                |c| matches!(c, Change::Health { id, to: Health::Down, .. } if id.as_str() == "n1"),
            )
        };
        assert!(!n1_down(&m.tick(NOW + 2_800 + 2_600)));
        assert!(n1_down(&m.tick(NOW + 2_800 + 5_000)));
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
        assert_eq!(
            m.receive(&seal(&k, "lab", &beat("n1", 20, 1, NOW)), NOW).verdict,
            Verdict::Ignore
        );
        assert_eq!(
            m.receive(&seal(&k, "lab", &beat("n1", 10, 7, NOW)), NOW).verdict,
            Verdict::Ignore
        );
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
        // Replays of what was already accepted stay refused after a restart.
        let k = NodeKey::from_secret([1; 32]);
        assert_eq!(
            restored.receive(&seal(&k, "lab", &advert("a", 5, NOW)), NOW).verdict,
            Verdict::Ignore
        );
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
