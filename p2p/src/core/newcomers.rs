//! How many nodes new to this registry each sender may bring: a Sybil flood of fresh ids from
//! one peer is absorbed at a bounded rate, while an honest forwarder's share of a forming
//! cluster fits (see docs/protocol.md, "Limits").

use std::collections::HashMap;

use libp2p::PeerId;

use crate::limit::Window;

/// New ids taken from one sender per [`WINDOW_MS`].
pub const PER_SENDER: u32 = 256;
/// That window.
const WINDOW_MS: u64 = 10_000;

/// Per sender (a gossip peer; `None`: the NATS broker, which forwards for everyone): the new
/// ids it brought in its current window.
#[derive(Debug, Default)]
pub(super) struct Newcomers {
    by_sender: HashMap<Option<PeerId>, Window>,
}

impl Newcomers {
    /// Whether `sender` may still bring a new node at `now`.
    pub(super) fn has_room(&self, sender: Option<PeerId>, now: u64) -> bool {
        self.by_sender.get(&sender).is_none_or(|w| w.has_room(now, WINDOW_MS, PER_SENDER))
    }

    /// `sender` brought a new node at `now`.
    pub(super) fn charge(&mut self, sender: Option<PeerId>, now: u64) {
        self.by_sender.entry(sender).or_default().spend(now, WINDOW_MS, PER_SENDER);
    }

    /// Forgets windows that ended (the map holds recent senders only).
    pub(super) fn expire(&mut self, now: u64) {
        self.by_sender.retain(|_, w| !w.ended(now, WINDOW_MS));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_s_share_refills_each_window_and_others_are_not_charged() {
        let (a, b) = (Some(PeerId::random()), Some(PeerId::random()));
        let mut n = Newcomers::default();
        for _ in 0..PER_SENDER {
            assert!(n.has_room(a, 0));
            n.charge(a, 0);
        }
        assert!(!n.has_room(a, 9_999));
        assert!(n.has_room(b, 9_999) && n.has_room(None, 9_999));
        assert!(n.has_room(a, WINDOW_MS));
        n.expire(WINDOW_MS);
        assert!(n.by_sender.is_empty());
    }
}
