//! Properties of the membership core. The default run is quick; for the long run:
//! `PROPTEST_CASES=100000 cargo test --release -p arw-p2p --test membership_props`.

use proptest::prelude::*;

use arw_p2p::{
    cluster::Advert,
    identity::NodeKey,
    membership::{Membership, MembershipConfig, Verdict},
    node_id::NodeId,
    wire::{Message, seal},
};

const NOW: u64 = 1_800_000_000_000;
const TTL: u64 = 360_000;

fn advert(id: &str, seq: u64, at: u64, tag: &str) -> Message {
    let mut advert = Advert::basic(NodeId::parse(id).expect("id"), "lab", seq, at);
    advert.ttl_ms = TTL;
    advert.tags = vec![tag.to_owned()];
    Message::Advert(advert)
}

fn fresh() -> Membership {
    Membership::new(MembershipConfig::new("lab"), NodeId::parse("self").expect("id"), [0; 32])
}

fn key(seed: u8) -> NodeKey {
    NodeKey::from_secret([seed; 32])
}

fn state(m: &Membership) -> Vec<(String, u64, Vec<String>)> {
    m.members()
        .values()
        .map(|x| {
            (x.record.advert.id.to_string(), x.record.advert.seq, x.record.advert.tags.clone())
        })
        .collect()
}

proptest! {
    #[test]
    fn valid_adverts_with_rising_seq_are_always_applied(seqs in prop::collection::btree_set(1u64..1_000_000, 1..20), skew in 0u64..TTL) {
        let mut m = fresh();
        for (i, seq) in seqs.iter().enumerate() {
            let bytes = seal(&key(1), "lab", &advert("n1", *seq, NOW - skew, &format!("t{i}")));
            let receipt = m.receive(&bytes, NOW);
            prop_assert_eq!(receipt.verdict, Verdict::Accept, "{:?}", receipt.refusal);
            prop_assert_eq!(m.members()["n1"].record.advert.seq, *seq);
        }
    }

    #[test]
    fn any_single_byte_change_is_refused(pos in any::<prop::sample::Index>(), mask in 1u8..=255) {
        let mut m = fresh();
        let mut bytes = seal(&key(1), "lab", &advert("n1", 5, NOW, "a"));
        let i = pos.index(bytes.len());
        bytes[i] ^= mask;
        let receipt = m.receive(&bytes, NOW);
        prop_assert_ne!(receipt.verdict, Verdict::Accept);
        prop_assert!(m.members().is_empty());
    }

    #[test]
    fn truncated_envelopes_are_refused(cut in any::<prop::sample::Index>()) {
        let mut m = fresh();
        let bytes = seal(&key(1), "lab", &advert("n1", 5, NOW, "a"));
        let len = cut.index(bytes.len());
        prop_assert_ne!(m.receive(&bytes[..len], NOW).verdict, Verdict::Accept);
        prop_assert!(m.members().is_empty());
    }

    #[test]
    fn another_key_for_a_known_id_is_refused(seq in 2u64..1000, rogue in 2u8..=255) {
        let mut m = fresh();
        m.receive(&seal(&key(1), "lab", &advert("n1", 1, NOW, "a")), NOW);
        let before = state(&m);
        let receipt = m.receive(&seal(&key(rogue), "lab", &advert("n1", seq, NOW, "evil")), NOW);
        prop_assert_ne!(receipt.verdict, Verdict::Accept);
        prop_assert!(receipt.refusal.is_some(), "a conflict is reported");
        prop_assert_eq!(state(&m), before);
    }

    #[test]
    fn another_workspace_is_refused(ws in "[a-z]{1,12}") {
        prop_assume!(ws != "lab");
        let mut m = fresh();
        prop_assert_ne!(m.receive(&seal(&key(1), &ws, &advert("n1", 1, NOW, "a")), NOW).verdict, Verdict::Accept);
        prop_assert!(m.members().is_empty());
    }

    #[test]
    fn expired_and_future_adverts_are_refused(late in 1u64..10_000_000, early in 1u64..10_000_000) {
        let mut m = fresh();
        let max_skew = m.config().max_skew_ms;
        let expired = seal(&key(1), "lab", &advert("n1", 1, NOW - TTL - late, "a"));
        prop_assert_ne!(m.receive(&expired, NOW).verdict, Verdict::Accept);
        let future = seal(&key(1), "lab", &advert("n1", 2, NOW + max_skew + early, "a"));
        prop_assert_ne!(m.receive(&future, NOW).verdict, Verdict::Accept);
        prop_assert!(m.members().is_empty());
    }

    #[test]
    fn replays_are_refused_even_long_after(first in 2u64..1_000_000, back in 0u64..1_000_000, later in 0u64..(TTL - 1)) {
        let mut m = fresh();
        m.receive(&seal(&key(1), "lab", &advert("n1", first, NOW, "a")), NOW);
        let before = state(&m);
        let replay_seq = first.saturating_sub(back).max(1);
        let replay = seal(&key(1), "lab", &advert("n1", replay_seq, NOW, "b"));
        prop_assert_ne!(m.receive(&replay, NOW + later).verdict, Verdict::Accept);
        prop_assert_eq!(state(&m), before);
    }

    #[test]
    fn receiving_the_same_bytes_again_changes_nothing(seq in 1u64..1_000_000) {
        let mut m = fresh();
        let bytes = seal(&key(1), "lab", &advert("n1", seq, NOW, "a"));
        prop_assert_eq!(m.receive(&bytes, NOW).verdict, Verdict::Accept);
        let before = state(&m);
        let again = m.receive(&bytes, NOW + 1);
        // Passed on once by gossip (a flood must not stop at a node that had it by sync), but
        // it changes nothing and is not reported.
        prop_assert_eq!(again.verdict, Verdict::Accept);
        prop_assert!(again.refusal.is_none(), "an exact duplicate is not reported");
        prop_assert!(again.changes.is_empty());
        prop_assert_eq!(state(&m), before);
    }
}
