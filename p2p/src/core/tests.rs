//! The core on its own: inputs in, effects out, with a clock the test sets.

use std::time::Duration;

use super::*;
use crate::{
    cluster::Advert,
    events::NodeChanged,
    identity::NodeKey,
    wire::{Message, seal},
};

const T0: u64 = 1_800_000_000_000;

fn config(id: &str, secret: u8) -> NodeConfig {
    let mut config =
        NodeConfig::new(NodeKey::from_secret([secret; 32]), "lab", std::path::PathBuf::new());
    config.explicit_id = Some((NodeId::parse(id).expect("id"), IdSource::Config));
    config.federation =
        Some(FederationConfig::loopback("lab", Vec::new(), Duration::from_millis(1_000)));
    config
}

/// Runs `input` and whatever its writes lead to (every write succeeds at once).
fn drive(core: &mut NodeCore, input: Input, now: u64) -> Vec<Effect> {
    let mut all = Vec::new();
    let mut queue: std::collections::VecDeque<Effect> = core.handle(input, now).into();
    while let Some(effect) = queue.pop_front() {
        if let Effect::Persist { ticket, .. } = &effect {
            for follow in core.handle(Input::Persisted(*ticket, Ok(())), now).into_iter().rev() {
                queue.push_front(follow);
            }
        }
        all.push(effect);
    }
    all
}

/// The health changes among `effects`, as `(node, health)`.
fn health_changes(effects: &[Effect]) -> Vec<(String, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Emit(Event::NodeChanged(NodeChanged {
                node,
                previous_health: Some(_),
                ..
            })) => Some((node.id.clone(), node.health.clone().unwrap_or_default())),
            _ => None,
        })
        .collect()
}

/// Node `a`, started at [`T0`], that knows node `b` (advertised at [`T0`]) and watches it.
fn a_knowing_b() -> (NodeCore, NodeKey) {
    let mut a = NodeCore::new(&config("a", 1), Restored::default());
    drive(&mut a, Input::Start { addresses: Vec::new() }, T0);
    let b = NodeKey::from_secret([2; 32]);
    let advert = Advert::basic(NodeId::parse("b").expect("id"), "lab", T0, T0);
    let bytes = seal(&b, "lab", &Message::Advert(advert));
    drive(&mut a, Input::Message { bytes, via: Inbound::Broker, opened: None }, T0);
    (a, b)
}

/// Feeds timers from `from` to `to`, each `late` ms after the time the core asked for, with
/// `b` answering every probe at once when `answers`; returns every effect.
fn tick(
    core: &mut NodeCore,
    b: &NodeKey,
    from: u64,
    to: u64,
    late: u64,
    answers: bool,
) -> Vec<Effect> {
    let mut all = Vec::new();
    let mut now = from;
    while now <= to {
        let effects = drive(core, Input::Timer, now);
        let probed =
            effects.iter().any(|e| matches!(e, Effect::Request { request, .. } if request.probe));
        all.extend(effects);
        if probed && answers {
            let response = SyncResponse::default();
            let from = Some(b.peer_id());
            all.extend(drive(core, Input::SyncResponse { from, response }, now));
        }
        now = core.wake.map_or(now + TICK_MS, |(_, asked)| asked).max(now + 1) + late;
    }
    all
}

#[test]
fn a_stalled_node_does_not_judge_its_peers_down_when_it_resumes() {
    let (mut a, b) = a_knowing_b();
    let before = tick(&mut a, &b, T0 + 250, T0 + 2_000, 0, true);
    assert!(health_changes(&before).is_empty(), "{:?}", health_changes(&before));
    // Ten seconds without running at all (SIGSTOP, a swapping machine), then on again.
    let resumed = drive(&mut a, Input::Timer, T0 + 12_000);
    assert!(health_changes(&resumed).is_empty(), "{:?}", health_changes(&resumed));
    assert!(a.snapshot(NetworkStatus::default()).slowdown > 1, "it knows it was slow");
    let after = tick(&mut a, &b, T0 + 12_250, T0 + 14_000, 0, true);
    assert!(health_changes(&after).is_empty(), "{:?}", health_changes(&after));
}

#[test]
fn a_late_node_waits_longer_before_it_suspects_and_still_does() {
    let (mut late, b) = a_knowing_b();
    // Every timer 300 ms late, and b silent: on time, b would be suspect after 3 s.
    let changes = health_changes(&tick(&mut late, &b, T0 + 250, T0 + 4_000, 300, false));
    assert!(changes.is_empty(), "{changes:?}");
    let (mut on_time, b) = a_knowing_b();
    let changes = health_changes(&tick(&mut on_time, &b, T0 + 250, T0 + 4_000, 0, false));
    assert_eq!(changes, vec![("b".to_owned(), "suspect".to_owned())]);
    // Once on time again, the slowdown wears off and the silence is judged.
    let changes = health_changes(&tick(&mut late, &b, T0 + 4_250, T0 + 60_000, 0, false));
    assert!(changes.contains(&("b".to_owned(), "down".to_owned())), "{changes:?}");
}

#[test]
fn a_command_takes_effect_only_once_written_and_not_at_all_when_the_write_fails() {
    let mut a = NodeCore::new(&config("a", 1), Restored::default());
    drive(&mut a, Input::Start { addresses: Vec::new() }, T0);
    let effects = a.handle(Input::Command(CommandId(1), Command::SetRole("home".into())), T0);
    let Some(Effect::Persist { ticket, write: Write::Hierarchy(_) }) = effects.first() else {
        panic!("the hierarchy is written first: {effects:?}");
    };
    assert_eq!(a.role(), Role::Edge, "not in force before it is on disk");
    let failed = a.handle(Input::Persisted(*ticket, Err("disk full".into())), T0);
    assert!(
        failed.iter().any(|e| matches!(e, Effect::Reply(CommandId(1), Err(NodeError::Persist(_))))),
        "{failed:?}"
    );
    assert_eq!(a.role(), Role::Edge, "a failed write changes nothing");

    let done = drive(&mut a, Input::Command(CommandId(2), Command::SetRole("home".into())), T0);
    assert_eq!(a.role(), Role::Root);
    let published = done.iter().position(|e| matches!(e, Effect::Publish(_)));
    let replied = done.iter().position(|e| matches!(e, Effect::Reply(CommandId(2), Ok(_))));
    assert!(
        published.is_some() && published < replied,
        "the new advert is out before the reply: {done:?}"
    );
}

#[test]
fn the_same_inputs_give_the_same_effects() {
    let run = || {
        let (mut a, b) = a_knowing_b();
        let effects = tick(&mut a, &b, T0 + 250, T0 + 8_000, 0, false);
        effects.iter().map(|e| format!("{e:?}")).collect::<Vec<_>>()
    };
    let first = run();
    assert!(first.iter().any(|e| e.contains("Publish")), "it reported b");
    assert_eq!(first, run());
}

#[test]
fn a_hello_that_renames_or_demotes_the_home_carries_its_authority_along() {
    let mut config = config("unused", 1);
    config.explicit_id = None;
    let mut core = NodeCore::new(&config, Restored::default());
    drive(&mut core, Input::Start { addresses: Vec::new() }, T0);
    let command = |command| Input::Command(CommandId(1), command);
    let hello = |id: &str, role: &str, epoch| {
        command(Command::Hello(crate::hierarchy::CoreHello {
            id: id.into(),
            role: role.into(),
            capabilities: Vec::new(),
            scope_tags: Vec::new(),
            epoch,
            nonce: format!("n{epoch}"),
        }))
    };
    let policy = |core: &NodeCore| core.snapshot(NetworkStatus::default()).policy;
    drive(&mut core, command(Command::SetRole("home".into())), T0 + 10);
    let home = policy(&core);
    assert_eq!((home.pinned_by, home.takes_work), (Some(crate::policy::PinSource::Own), true));

    drive(&mut core, hello("home-2", "home", 1), T0 + 20);
    drive(&mut core, Input::Timer, T0 + 10_000);
    assert_eq!(policy(&core).home_id.as_deref(), Some("home-2"), "signed under the new id");

    drive(&mut core, hello("home-2", "edge", 2), T0 + 10_100);
    let edge = policy(&core);
    assert_eq!((edge.pinned_by, edge.takes_work), (None, true), "no longer the Home: {edge:?}");
}

/// A dispatch envelope from `key` claiming to be `node`.
fn job_envelope(key: &NodeKey, node: &str, body: crate::jobs::message::JobMessage) -> Vec<u8> {
    let signed =
        crate::jobs::message::Signed { node: NodeId::parse(node).expect("id"), sent_ms: T0, body };
    crate::jobs::message::seal(key, "lab", &signed)
}

/// Node `id`, started, running kind `work` for any Home that may assign it.
fn started_worker(id: &str) -> NodeCore {
    let mut config = config(id, 1);
    config.jobs = crate::jobs::JobsConfig {
        kinds: vec!["work".into()],
        allow: vec!["*".into()],
        ..Default::default()
    };
    let mut core = NodeCore::new(&config, Restored::default());
    drive(&mut core, Input::Start { addresses: Vec::new() }, T0);
    core
}

#[test]
fn only_the_pinned_home_may_assign_and_no_key_may_speak_for_another() {
    use crate::jobs::message::{Assign, JobMessage, Signed};
    let mut a = started_worker("a");
    let b = NodeKey::from_secret([2; 32]);
    let advert = Advert::basic(NodeId::parse("b").expect("id"), "lab", T0, T0);
    let bytes = seal(&b, "lab", &Message::Advert(advert));
    drive(&mut a, Input::Message { bytes, via: Inbound::Broker, opened: None }, T0);
    let assign = JobMessage::Assign(Assign {
        job_id: "j1".into(),
        attempt: 1,
        fence: 7,
        kind: "work".into(),
        input: serde_json::Value::Null,
        idem_key: None,
        policy_epoch: 1,
        timeout_ms: 1_000,
        lease_ms: 5_000,
    });
    // b is a member with a valid signature, but not the Home a pinned: refused, never run.
    let bytes = job_envelope(&b, "b", assign.clone());
    let effects = drive(&mut a, Input::JobMessage { bytes, from: None, opened: None }, T0 + 1);
    assert!(!effects.iter().any(|e| matches!(e, Effect::Execute(_))), "{effects:?}");
    let answer = effects.iter().find_map(|e| match e {
        Effect::SendJob { bytes, .. } => crate::jobs::message::open(bytes, "lab").ok(),
        _ => None,
    });
    let Some((_, Signed { body: JobMessage::Rejected(r), .. })) = answer else {
        panic!("no rejection: {effects:?}")
    };
    assert_eq!((r.job_id.as_str(), r.fence, r.code.as_str()), ("j1", 7, "not_home"));
    // A key speaking for b (bound to another key): dropped without an answer.
    let c = NodeKey::from_secret([3; 32]);
    let refused = a.counters().refused;
    let bytes = job_envelope(&c, "b", assign);
    let effects = drive(&mut a, Input::JobMessage { bytes, from: None, opened: None }, T0 + 2);
    assert!(!effects.iter().any(|e| matches!(e, Effect::SendJob { .. } | Effect::Execute(_))));
    assert_eq!(a.counters().refused, refused + 1);
}

#[test]
fn an_observer_offers_and_runs_no_jobs() {
    let mut a = started_worker("a");
    assert!(a.jobs_advert().is_some(), "an edge node that allows kinds offers them");
    assert_eq!(a.denied_here("work", T0), None);
    let set = Input::Command(CommandId(1), Command::SetRole("observer".into()));
    drive(&mut a, set, T0 + 1);
    assert_eq!(a.jobs_advert(), None, "an observer advertises no jobs");
    assert_eq!(a.denied_here("work", T0 + 1), Some("role_denied"));
}

/// Runs `input` as the node actor does: every write but the registry's succeeds at once; the
/// registry's wait in `held` until [`finish_held`].
fn drive_holding_registry(
    core: &mut NodeCore,
    input: Input,
    now: u64,
    held: &mut Vec<Ticket>,
) -> Vec<Effect> {
    let mut all = Vec::new();
    let mut queue: std::collections::VecDeque<Effect> = core.handle(input, now).into();
    while let Some(effect) = queue.pop_front() {
        match &effect {
            Effect::Persist { ticket, write: Write::Registry { .. } } => held.push(*ticket),
            Effect::Persist { ticket, .. } => {
                for follow in core.handle(Input::Persisted(*ticket, Ok(())), now).into_iter().rev()
                {
                    queue.push_front(follow);
                }
            }
            _ => {}
        }
        all.push(effect);
    }
    all
}

/// The adverts among `effects`, as their seq.
fn adverts_published(effects: &[Effect]) -> Vec<u64> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Publish(bytes) => match crate::wire::open(bytes, "lab") {
                Ok(opened) => match opened.message {
                    Message::Advert(advert) => Some(advert.seq),
                    _ => None,
                },
                Err(_) => None,
            },
            _ => None,
        })
        .collect()
}

#[test]
fn the_node_goes_on_while_the_registry_is_written_and_adverts_keep_their_order() {
    let mut a = NodeCore::new(&config("a", 1), Restored::default());
    drive(&mut a, Input::Start { addresses: Vec::new() }, T0);
    let mut held = Vec::new();
    let mut effects = Vec::new();
    for (n, profile) in [(1, "performance"), (2, "balanced")] {
        let command = Command::SetProfile(profile.into());
        effects.extend(drive_holding_registry(
            &mut a,
            Input::Command(CommandId(n), command),
            T0,
            &mut held,
        ));
    }
    assert_eq!(held.len(), 2, "each change waits for its advert's seq to be written");
    assert!(adverts_published(&effects).is_empty(), "no advert before its seq is on disk");
    assert!(!effects.iter().any(|e| matches!(e, Effect::Reply(..))), "{effects:?}");

    // Meanwhile, a message is handled as usual.
    let b = NodeKey::from_secret([2; 32]);
    let advert = Advert::basic(NodeId::parse("b").expect("id"), "lab", T0, T0);
    let bytes = seal(&b, "lab", &Message::Advert(advert));
    let input = Input::Message { bytes, via: Inbound::Broker, opened: None };
    drive_holding_registry(&mut a, input, T0, &mut held);
    assert!(a.protocol.membership().members().contains_key("b"));

    // The writes finish in order: each advert goes out, then the command is answered.
    let mut done = Vec::new();
    for ticket in std::mem::take(&mut held).into_iter().take(2) {
        done.extend(drive_holding_registry(
            &mut a,
            Input::Persisted(ticket, Ok(())),
            T0,
            &mut held,
        ));
    }
    let seqs = adverts_published(&done);
    assert_eq!(seqs.len(), 2, "{done:?}");
    assert!(seqs[0] < seqs[1], "the same millisecond, still two seqs: {seqs:?}");
    let replies: Vec<_> = done
        .iter()
        .filter_map(|e| match e {
            Effect::Reply(id, Ok(_)) => Some(id.0),
            _ => None,
        })
        .collect();
    assert_eq!(replies, [1, 2]);
}

/// The verdict `core` gives a gossip message `bytes` forwarded by `source` at `now`.
fn gossip_verdict(core: &mut NodeCore, bytes: Vec<u8>, source: PeerId, now: u64) -> Verdict {
    let id = libp2p::gossipsub::MessageId::from(bytes.clone());
    let via = Inbound::Gossip { id, source };
    let effects = drive(core, Input::Message { bytes, via, opened: None }, now);
    let verdict = effects.iter().find_map(|e| match e {
        Effect::Validate { verdict, .. } => Some(*verdict),
        _ => None,
    });
    verdict.expect("a verdict")
}

#[test]
fn a_gossip_flood_of_valid_messages_is_shed_unchecked_and_others_still_heard() {
    let (mut a, b) = a_knowing_b();
    let (flooder, honest) = (PeerId::random(), PeerId::random());
    let beat = |key: &NodeKey, id: &str, beat: u64| {
        let id = NodeId::parse(id).expect("id");
        let beat = crate::wire::Beat {
            id,
            workspace: "lab".into(),
            seq: T0,
            beat,
            sent_ms: T0,
            policy: 0,
        };
        seal(key, "lab", &Message::Heartbeat(beat))
    };
    // Its own key, many times: a burst is checked, the rest shed; b is still heard.
    let verdicts: Vec<Verdict> =
        (1..=100).map(|i| gossip_verdict(&mut a, beat(&b, "b", i), flooder, T0 + 1)).collect();
    let checked = verdicts.iter().filter(|v| **v != Verdict::Shed).count();
    assert_eq!(checked, crate::transport::shed::PER_KEY_BURST as usize, "{verdicts:?}");
    let c = NodeKey::from_secret([3; 32]);
    let advert = |key: &NodeKey, id: &str| {
        let advert = Advert::basic(NodeId::parse(id).expect("id"), "lab", 1, T0);
        seal(key, "lab", &Message::Advert(advert))
    };
    assert_eq!(gossip_verdict(&mut a, advert(&c, "c"), honest, T0 + 2), Verdict::Accept);
    // Fresh keys from one peer: a burst is checked, the rest shed; another peer's newcomer is
    // checked and taken in.
    let sybils: Vec<Verdict> = (0..100u32)
        .map(|i| {
            let mut secret = [9u8; 32];
            secret[..4].copy_from_slice(&i.to_be_bytes());
            let sybil = NodeKey::from_secret(secret);
            gossip_verdict(&mut a, advert(&sybil, &format!("s{i}")), flooder, T0 + 3)
        })
        .collect();
    let checked = sybils.iter().filter(|v| **v != Verdict::Shed).count();
    // (b's first heartbeat, its key new to the gossip budget then, took one.)
    assert_eq!(checked, crate::transport::shed::UNKNOWN_BURST as usize - 1, "{sybils:?}");
    let d = NodeKey::from_secret([4; 32]);
    assert_eq!(gossip_verdict(&mut a, advert(&d, "d"), honest, T0 + 3), Verdict::Accept);
    assert_eq!(a.counters.shed, 80 + 81);
}
