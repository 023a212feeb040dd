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

/// What a Byzantine member sends, under its own valid key.
#[derive(Debug, Clone)]
enum Hostile {
    /// A suspicion report naming the honest node, claiming any position.
    Accuse { seq: u64, beat: u64, target_seq: u64, target_beat: u64 },
    /// A report naming the observer itself.
    AccuseObserver { seq: u64, beat: u64 },
    /// A heartbeat or leave of its own, at any position.
    Beat { seq: u64, beat: u64, leave: bool },
    /// An advert of its own with any seq, or one claiming the honest node's id.
    Advert { seq: u64, squat: bool },
}

fn hostile() -> impl Strategy<Value = (Hostile, u64)> {
    let any_pos = prop_oneof![0u64..20, Just(u64::MAX), any::<u64>()];
    let action = prop_oneof![
        (any_pos.clone(), any_pos.clone(), any_pos.clone(), any_pos.clone()).prop_map(
            |(seq, beat, target_seq, target_beat)| Hostile::Accuse {
                seq,
                beat,
                target_seq,
                target_beat
            }
        ),
        (any_pos.clone(), any_pos.clone())
            .prop_map(|(seq, beat)| Hostile::AccuseObserver { seq, beat }),
        (any_pos.clone(), any_pos.clone(), any::<bool>())
            .prop_map(|(seq, beat, leave)| Hostile::Beat { seq, beat, leave }),
        (any_pos, any::<bool>()).prop_map(|(seq, squat)| Hostile::Advert { seq, squat }),
    ];
    (action, 0u64..1_500)
}

proptest! {
    /// A member that lies with a valid signature (any mix of reports, heartbeats, leaves and
    /// adverts, at any position and pace) never makes an observer hold an honest, live node
    /// `down`, and costs it at most its refutations.
    #[test]
    fn a_byzantine_member_never_gets_an_honest_node_judged_down(actions in prop::collection::vec(hostile(), 1..40)) {
        use arw_p2p::{cluster::Health, protocol::Protocol, wire::{Beat, Suspicion}};
        let id = |s: &str| NodeId::parse(s).expect("id");
        let protocol = |name: &str, seed: u8| Protocol::new(key(seed), id(name), MembershipConfig::new("lab"), 0);
        let (mut observer, mut honest) = (protocol("obs", 1), protocol("honest", 2));
        let byz = key(3);
        let mut now = NOW;
        let seq = honest.next_seq(now);
        let honest_advert = honest.seal_advert(&Advert::basic(id("honest"), "lab", seq, now));
        let seq = observer.next_seq(now);
        let observer_advert = observer.seal_advert(&Advert::basic(id("obs"), "lab", seq, now));
        let byz_advert = seal(&byz, "lab", &advert("byz", 1, now, "b"));
        observer.receive(&honest_advert, now);
        observer.receive(&byz_advert, now);
        honest.receive(&observer_advert, now);
        honest.receive(&byz_advert, now);
        let mut last_beat = now;
        for (action, wait) in actions {
            now += wait;
            let message = match action {
                Hostile::Accuse { seq, beat, target_seq, target_beat } => Message::Suspect(Suspicion {
                    id: id("byz"), workspace: "lab".into(), seq, beat, sent_ms: now,
                    target: id("honest"), target_seq, target_beat,
                }),
                Hostile::AccuseObserver { seq, beat } => Message::Suspect(Suspicion {
                    id: id("byz"), workspace: "lab".into(), seq, beat, sent_ms: now,
                    target: id("obs"), target_seq: u64::MAX, target_beat: u64::MAX,
                }),
                Hostile::Beat { seq, beat, leave } => {
                    let beat = Beat { id: id("byz"), workspace: "lab".into(), seq, beat, sent_ms: now, policy: 0 };
                    if leave { Message::Leave(beat) } else { Message::Heartbeat(beat) }
                }
                Hostile::Advert { seq, squat } => advert(if squat { "honest" } else { "byz" }, seq, now, "x"),
            };
            let bytes = seal(&byz, "lab", &message);
            observer.receive(&bytes, now);
            honest.receive(&bytes, now);
            // The honest node answers at once (a reliable link) and beats every second.
            if now.saturating_sub(last_beat) >= 1_000 {
                let beat = honest.heartbeat(now);
                observer.receive(&beat, now);
                last_beat = now;
            }
            for envelope in honest.take_outbox() {
                observer.receive(&envelope, now);
            }
            for envelope in observer.take_outbox() {
                honest.receive(&envelope, now);
            }
            honest.tick(now);
            observer.tick(now);
            let health = observer.membership().members()["honest"].record.health;
            prop_assert_ne!(health, Health::Down, "after {:?}", message);
            prop_assert_ne!(health, Health::Left);
        }
    }
}
