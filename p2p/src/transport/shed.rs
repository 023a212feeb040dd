//! What a broker-fed node checks at all. Over NATS every message reaches every node, and the
//! broker hides who sent it, so load is shed by the key an envelope claims, before its signature
//! is checked (the check is the cost): a key that proved itself (a valid signature) and then
//! sends more than [`PER_KEY`] messages a second is not checked again for [`BOX_MS`]; keys never
//! seen valid share [`UNKNOWN_PER_SECOND`] checks a second (a Sybil flood of fresh keys); and
//! of invalid envelopes only [`INVALID_PER_SECOND`] a second go on to be reported. A forger
//! cannot get an honest key shed: only valid messages count against a key.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::limit::Window;

/// Valid messages one key may send per second before it is shed (an honest node sends one
/// or two: a heartbeat, now and then an advert).
pub const PER_KEY: u32 = 100;
/// How long an over-eager key is shed.
pub const BOX_MS: u64 = 10_000;
/// Checks per second for envelopes under keys never seen valid.
pub const UNKNOWN_PER_SECOND: u32 = 200;
/// Invalid envelopes passed on per second (the node reports those; the rest are counted here).
pub const INVALID_PER_SECOND: u32 = 20;
/// Keys remembered as seen valid.
const KNOWN: usize = 8_192;

/// Why an envelope was dropped unchecked, or after its check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shed {
    /// Its key sent too much lately.
    Boxed,
    /// Too many envelopes under unknown keys this second.
    Unknown,
    /// Invalid, beyond what is reported.
    Invalid,
}

impl Shed {
    /// As logged.
    pub fn as_str(self) -> &'static str {
        match self {
            Shed::Boxed => "flooding_key",
            Shed::Unknown => "unknown_keys",
            Shed::Invalid => "invalid",
        }
    }
}

/// The shedding state of one node's message subject.
#[derive(Debug, Default)]
pub struct Shedder {
    /// Valid messages a key may send per second ([`PER_KEY`] when 0).
    per_key_limit: u32,
    known: HashSet<String>,
    order: VecDeque<String>,
    boxed: HashMap<String, u64>,
    /// Valid messages per key this second.
    per_key: HashMap<String, Window>,
    unknown: Window,
    invalid: Window,
}

/// The windows above.
const SECOND: u64 = 1_000;

impl Shedder {
    /// A shedder that lets each proven key send `per_key` valid messages a second (a node's own
    /// dispatch subject carries as many as the jobs it runs or hands out).
    pub fn with_per_key(per_key: u32) -> Self {
        Self { per_key_limit: per_key, ..Self::default() }
    }

    /// Whether an envelope claiming `key` is worth checking at `now_ms`.
    pub fn before(&mut self, key: Option<&str>, now_ms: u64) -> Result<(), Shed> {
        let Some(key) = key else { return Ok(()) };
        if let Some(until) = self.boxed.get(key) {
            if *until > now_ms {
                return Err(Shed::Boxed);
            }
            self.boxed.remove(key);
        }
        if !self.known.contains(key) && !self.unknown.spend(now_ms, SECOND, UNKNOWN_PER_SECOND) {
            return Err(Shed::Unknown);
        }
        Ok(())
    }

    /// The check of an envelope claiming `key` said `valid`: whether to pass it on.
    pub fn after(&mut self, key: Option<&str>, valid: bool, now_ms: u64) -> Result<(), Shed> {
        let Some(key) = key.filter(|_| valid) else {
            return if self.invalid.spend(now_ms, SECOND, INVALID_PER_SECOND) {
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
        let limit = if self.per_key_limit == 0 { PER_KEY } else { self.per_key_limit };
        if !self.per_key.entry(key.to_owned()).or_default().spend(now_ms, SECOND, limit) {
            self.boxed.insert(key.to_owned(), now_ms.saturating_add(BOX_MS));
            self.boxed.retain(|_, until| *until > now_ms);
            return Err(Shed::Boxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_that_floods_valid_messages_is_shed_then_heard_again() {
        let mut s = Shedder::default();
        let passed = (0..PER_KEY + 50)
            .filter(|_| s.before(Some("liar"), 0).is_ok() && s.after(Some("liar"), true, 0).is_ok())
            .count();
        assert_eq!(passed, PER_KEY as usize);
        assert_eq!(s.before(Some("liar"), 5_000), Err(Shed::Boxed), "unchecked while boxed");
        assert_eq!(s.before(Some("honest"), 5_000), Ok(()), "others are not charged");
        assert_eq!(s.before(Some("liar"), BOX_MS), Ok(()));
    }

    #[test]
    fn forgeries_under_an_honest_key_do_not_shed_it() {
        let mut s = Shedder::default();
        s.after(Some("honest"), true, 0).expect("valid");
        for _ in 0..1_000 {
            if s.before(Some("honest"), 10).is_ok() {
                let _ = s.after(Some("honest"), false, 10);
            }
        }
        assert_eq!(s.before(Some("honest"), 20), Ok(()));
        assert_eq!(s.after(Some("honest"), true, 20), Ok(()));
    }

    #[test]
    fn fresh_keys_share_a_budget_of_checks() {
        let mut s = Shedder::default();
        let checked =
            (0..1_000).filter(|i| s.before(Some(&format!("sybil-{i}")), 100).is_ok()).count();
        assert_eq!(checked, UNKNOWN_PER_SECOND as usize);
        s.after(Some("old-friend"), true, 0).expect("valid");
        assert_eq!(s.before(Some("old-friend"), 200), Ok(()), "known keys are always checked");
        assert_eq!(s.before(Some("sybil-x"), 1_000), Ok(()), "next second");
    }
}
