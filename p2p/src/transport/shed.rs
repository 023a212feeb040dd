//! What a node checks at all. A flood's cost is the signature check of each message, so load is
//! shed before it: over NATS on the transport's check task, on the libp2p mesh by the node core
//! (a peer whose messages keep being shed is then cut off; docs/protocol.md).
//!
//! Over NATS, first by the subject a message came on ([`Senders`]): each node publishes on a
//! subject of its own, named by its peer id, and an envelope claiming another node's key there
//! is dropped unchecked; where the broker lets each node's credentials publish only on its own
//! subject, that is a forgery, and the broker has told who sent it.
//!
//! On both buses, by the key the envelope claims ([`Shedder`]): a key that proved itself (a
//! valid signature) and then sends more than [`PER_KEY_BURST`] messages at once or [`PER_KEY`]
//! a second is not checked again for [`BOX_MS`]; keys never seen valid share
//! [`UNKNOWN_PER_SECOND`] checks a second per sender (a Sybil flood of fresh keys; a sender is
//! the gossip peer that forwarded the message, or the broker). Over NATS, of invalid envelopes
//! only [`INVALID_PER_SECOND`] a second go on to be reported (on the mesh each is rejected and
//! counts towards its sender's cut-off). Each budget is a token bucket ([`Pace`]), so a flood is
//! checked at an even pace, not in a burst at each second. A forger cannot get an honest key
//! shed: only valid messages count against a key.

use std::collections::{HashMap, HashSet, VecDeque};

use libp2p::PeerId;

use crate::limit::Pace;

/// Valid messages one key may send per second before it is shed (an honest node sends one
/// or two: a heartbeat, now and then an advert)...
pub const PER_KEY: u32 = 100;
/// ...and at once (a node's start, or a Home's new policy with its advert, is a handful).
pub const PER_KEY_BURST: u32 = 20;
/// How long an over-eager key is shed.
pub const BOX_MS: u64 = 10_000;
/// Checks per second for envelopes under keys never seen valid, paced (at most
/// [`UNKNOWN_BURST`] at once), so that a flood's checks do not come in one burst a second.
pub const UNKNOWN_PER_SECOND: u32 = 200;
/// See [`UNKNOWN_PER_SECOND`].
pub const UNKNOWN_BURST: u32 = 20;
/// Invalid envelopes passed on per second (the node reports those; the rest are counted here),
/// at most [`INVALID_BURST`] at once.
pub const INVALID_PER_SECOND: u32 = 20;
/// See [`INVALID_PER_SECOND`].
pub const INVALID_BURST: u32 = 5;
/// Keys remembered as seen valid.
const KNOWN: usize = 8_192;
/// Senders whose budget for unknown keys is remembered (beyond, it starts again full).
const SENDERS: usize = 1_024;

/// Why an envelope was dropped unchecked, or after its check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shed {
    /// Its key sent too much lately.
    Boxed,
    /// Too many envelopes under unknown keys this second.
    Unknown,
    /// Invalid, beyond what is reported.
    Invalid,
    /// Claims a key other than the one its subject names.
    Subject,
}

impl Shed {
    /// As logged.
    pub fn as_str(self) -> &'static str {
        match self {
            Shed::Boxed => "flooding_key",
            Shed::Unknown => "unknown_keys",
            Shed::Invalid => "invalid",
            Shed::Subject => "wrong_subject",
        }
    }
}

/// The shedding state of one node's message subject.
#[derive(Debug, Default)]
pub struct Shedder {
    /// Valid messages a key may send per second and at once ([`PER_KEY`], [`PER_KEY_BURST`]
    /// when 0).
    per_key_limit: (u32, u32),
    known: HashSet<String>,
    order: VecDeque<String>,
    boxed: HashMap<String, u64>,
    /// Each key's budget of valid messages.
    per_key: HashMap<String, Pace>,
    /// Each sender's budget of checks for unknown keys (`None`: the broker).
    unknown: HashMap<Option<PeerId>, Pace>,
    invalid: Pace,
}

impl Shedder {
    /// A shedder that lets each proven key send `per_second` valid messages a second and
    /// `burst` at once (a node's own dispatch subject carries as many as the jobs it runs or
    /// hands out).
    pub fn with_per_key(per_second: u32, burst: u32) -> Self {
        Self { per_key_limit: (per_second, burst), ..Self::default() }
    }

    /// Whether an envelope claiming `key`, from `sender` (`None`: the broker), is worth
    /// checking at `now_ms`.
    pub fn before(
        &mut self,
        key: Option<&str>,
        sender: Option<PeerId>,
        now_ms: u64,
    ) -> Result<(), Shed> {
        let Some(key) = key else { return Ok(()) };
        if let Some(until) = self.boxed.get(key) {
            if *until > now_ms {
                return Err(Shed::Boxed);
            }
            self.boxed.remove(key);
        }
        if self.known.contains(key) {
            return Ok(());
        }
        if self.unknown.len() >= SENDERS && !self.unknown.contains_key(&sender) {
            self.unknown.clear();
        }
        let budget = self.unknown.entry(sender).or_default();
        if !budget.spend(now_ms, UNKNOWN_PER_SECOND, UNKNOWN_BURST) {
            return Err(Shed::Unknown);
        }
        Ok(())
    }

    /// The check of an envelope claiming `key` said `valid`: whether to pass it on.
    pub fn after(&mut self, key: Option<&str>, valid: bool, now_ms: u64) -> Result<(), Shed> {
        let Some(key) = key.filter(|_| valid) else {
            return if self.invalid.spend(now_ms, INVALID_PER_SECOND, INVALID_BURST) {
                Ok(())
            } else {
                Err(Shed::Invalid)
            };
        };
        if self.known.insert(key.to_owned()) {
            self.order.push_back(key.to_owned());
            if self.order.len() > KNOWN
                && let Some(old) = self.order.pop_front()
            {
                self.known.remove(&old);
                self.per_key.remove(&old);
            }
        }
        let (rate, burst) = match self.per_key_limit {
            (0, _) => (PER_KEY, PER_KEY_BURST),
            limit => limit,
        };
        if !self.per_key.entry(key.to_owned()).or_default().spend(now_ms, rate, burst) {
            self.boxed.insert(key.to_owned(), now_ms.saturating_add(BOX_MS));
            self.boxed.retain(|_, until| *until > now_ms);
            return Err(Shed::Boxed);
        }
        Ok(())
    }
}

/// Peer ids of subjects remembered with their key (beyond, the memory starts again).
const SUBJECTS: usize = 8_192;

/// The binding of a sender's subject to its key: the last token of the subject a message came on
/// is the peer id of the key it must claim (an ed25519 key is inside its peer id).
#[derive(Debug, Default)]
pub struct Senders {
    keys: HashMap<String, Option<[u8; 32]>>,
}

impl Senders {
    /// Whether an envelope claiming `key` (base64) may have come from the node whose peer id is
    /// `peer`.
    pub fn check(&mut self, peer: &str, key: Option<&str>) -> Result<(), Shed> {
        let Some(claimed) = key.and_then(crate::identity::public_key_bytes_from_b64) else {
            // Unreadable: left to the check, which refuses it within the invalid budget.
            return Ok(());
        };
        if !self.keys.contains_key(peer) {
            if self.keys.len() >= SUBJECTS {
                self.keys.clear();
            }
            self.keys.insert(peer.to_owned(), key_in_peer_id(peer));
        }
        match self.keys.get(peer) {
            Some(Some(bound)) if *bound == claimed => Ok(()),
            _ => Err(Shed::Subject),
        }
    }
}

/// The ed25519 key a peer id carries (`None` for a peer id that is not one of an ed25519 key),
/// read without checking that it is a point of the curve: it is only compared.
fn key_in_peer_id(peer: &str) -> Option<[u8; 32]> {
    /// The protobuf of an ed25519 public key: type 1 (ed25519), then 32 bytes of data.
    const ED25519: [u8; 4] = [0x08, 0x01, 0x12, 0x20];
    let peer: libp2p::PeerId = peer.parse().ok()?;
    let multihash = peer.as_ref();
    // 0x00: the identity multihash, in which libp2p inlines keys as short as ed25519's.
    let inlined = multihash.digest().strip_prefix(&ED25519).filter(|_| multihash.code() == 0)?;
    inlined.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_that_floods_valid_messages_is_shed_then_heard_again() {
        let mut s = Shedder::default();
        let passed = (0..PER_KEY + 50)
            .filter(|_| {
                s.before(Some("liar"), None, 0).is_ok() && s.after(Some("liar"), true, 0).is_ok()
            })
            .count();
        assert_eq!(passed, PER_KEY_BURST as usize);
        assert_eq!(s.before(Some("liar"), None, 5_000), Err(Shed::Boxed), "unchecked while boxed");
        assert_eq!(s.before(Some("honest"), None, 5_000), Ok(()), "others are not charged");
        assert_eq!(s.before(Some("liar"), None, BOX_MS), Ok(()));
        // An honest node: a handful at start, then a heartbeat a second and an advert now and
        // then, for an hour.
        let mut s = Shedder::default();
        let ok = |s: &mut Shedder, t| {
            s.before(Some("w1"), None, t).and_then(|()| s.after(Some("w1"), true, t))
        };
        assert!((0..5).all(|_| ok(&mut s, 0).is_ok()));
        assert!(
            (1..3_600u64)
                .all(|t| ok(&mut s, t * 1_000).is_ok() && ok(&mut s, t * 1_000 + 1).is_ok())
        );
    }

    #[test]
    fn forgeries_under_an_honest_key_do_not_shed_it() {
        let mut s = Shedder::default();
        s.after(Some("honest"), true, 0).expect("valid");
        for _ in 0..1_000 {
            if s.before(Some("honest"), None, 10).is_ok() {
                let _ = s.after(Some("honest"), false, 10);
            }
        }
        assert_eq!(s.before(Some("honest"), None, 20), Ok(()));
        assert_eq!(s.after(Some("honest"), true, 20), Ok(()));
    }

    #[test]
    fn a_subject_admits_only_the_key_its_peer_id_names() {
        use base64::{Engine, engine::general_purpose::STANDARD as B64};
        let (honest, forger) = (
            crate::identity::NodeKey::from_secret([1; 32]),
            crate::identity::NodeKey::from_secret([2; 32]),
        );
        let key = |k: &crate::identity::NodeKey| B64.encode(k.verifying_key().to_bytes());
        let mut senders = Senders::default();
        let subject = honest.peer_id().to_string();
        assert_eq!(senders.check(&subject, Some(&key(&honest))), Ok(()));
        assert_eq!(senders.check(&subject, Some(&key(&forger))), Err(Shed::Subject));
        let own = forger.peer_id().to_string();
        assert_eq!(
            senders.check(&own, Some(&key(&honest))),
            Err(Shed::Subject),
            "not on its own subject either"
        );
        assert_eq!(senders.check("not-a-peer-id", Some(&key(&honest))), Err(Shed::Subject));
        assert_eq!(
            senders.check(&subject, Some("%%%")),
            Ok(()),
            "unreadable: the check refuses it"
        );
        for i in 0..2 * SUBJECTS {
            let _ = senders.check(&format!("fake-{i}"), Some(&key(&forger)));
        }
        assert!(senders.keys.len() <= SUBJECTS, "bounded");
        assert_eq!(senders.check(&subject, Some(&key(&honest))), Ok(()));
    }

    #[test]
    fn fresh_keys_share_a_paced_budget_of_checks() {
        let mut s = Shedder::default();
        let fresh =
            |s: &mut Shedder, i: u32, t: u64| s.before(Some(&format!("sybil-{i}")), None, t);
        let at_once = (0..1_000).filter(|&i| fresh(&mut s, i, 100).is_ok()).count();
        assert_eq!(at_once, UNKNOWN_BURST as usize, "a burst, not the second's budget at once");
        // A flood spread over the next second: its budget, one check per 5 ms.
        let spread = (0..10_000u32).filter(|&i| fresh(&mut s, i, 101 + u64::from(i) / 10).is_ok());
        assert_eq!(spread.count(), UNKNOWN_PER_SECOND as usize);
        s.after(Some("old-friend"), true, 0).expect("valid");
        assert_eq!(
            s.before(Some("old-friend"), None, 1_100),
            Ok(()),
            "known keys are always checked"
        );
        let peer = Some(PeerId::random());
        assert_eq!(
            s.before(Some("newcomer"), peer, 1_100),
            Ok(()),
            "another sender's newcomers have a budget of their own"
        );
    }
}
