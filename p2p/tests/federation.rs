//! Real node actors over loopback TCP in one process: convergence through a bootstrap peer, and
//! a rogue node that signs adverts under another node's id.

use std::{sync::Arc, time::Duration};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use arw_p2p::{
    cluster::Health,
    core::{NodeCore, Restored, Traced},
    events::{Emit, EventTx},
    identity::NodeKey,
    node::{self, FederationConfig, NodeConfig, NodeHandle, Snapshot},
    node_id::{IdSource, NodeId},
};

const WAIT: Duration = Duration::from_secs(30);

struct TestNode {
    handle: NodeHandle,
    task: tokio::task::JoinHandle<()>,
    events: mpsc::Receiver<Emit>,
    config: NodeConfig,
    _dir: tempfile::TempDir,
}

async fn start(id: &str, seed: u8, bootstrap: Vec<String>, cancel: &CancellationToken) -> TestNode {
    start_with(id, seed, bootstrap, cancel, None).await
}

async fn start_with(
    id: &str,
    seed: u8,
    bootstrap: Vec<String>,
    cancel: &CancellationToken,
    trace: Option<mpsc::UnboundedSender<Traced>>,
) -> TestNode {
    let dir = tempfile::tempdir().expect("tempdir");
    let (events, rx) = EventTx::channel(4096);
    let mut config =
        NodeConfig::new(NodeKey::from_secret([seed; 32]), "lab", dir.path().to_path_buf());
    config.explicit_id = Some((NodeId::parse(id).expect("id"), IdSource::Config));
    let bootstrap = bootstrap.iter().map(|a| a.parse().expect("addr")).collect();
    config.federation =
        Some(FederationConfig::loopback("lab", bootstrap, Duration::from_millis(500)));
    config.trace = trace;
    let (handle, task) =
        node::spawn(config.clone(), events, cancel.child_token()).await.expect("node");
    TestNode { handle, task, events: rx, config, _dir: dir }
}

/// Waits (bounded) until `check` holds for the node's snapshot.
async fn until(node: &NodeHandle, what: &str, check: impl Fn(&Snapshot) -> bool) {
    let mut rx: watch::Receiver<Arc<Snapshot>> = node.watch();
    let waited = tokio::time::timeout(WAIT, rx.wait_for(|s| check(s))).await;
    assert!(
        waited.is_ok_and(|r| r.is_ok()),
        "timed out waiting for {what}: {:?}",
        node.snapshot().nodes.keys()
    );
}

fn ok_ids(s: &Snapshot) -> Vec<String> {
    s.nodes.values().filter(|r| r.health == Health::Ok).map(|r| r.advert.id.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_converge_through_one_bootstrap_peer() {
    let cancel = CancellationToken::new();
    let first = start("node-0", 1, vec![], &cancel).await;
    let boot = first.handle.snapshot().network.listen.clone();
    assert_eq!(boot.len(), 1, "listening on one address: {boot:?}");
    let mut nodes = vec![first];
    for i in 1..5u8 {
        nodes.push(start(&format!("node-{i}"), i + 1, boot.clone(), &cancel).await);
    }
    for (i, node) in nodes.iter().enumerate() {
        until(&node.handle, &format!("node-{i} to see all five"), |s| ok_ids(s).len() == 5).await;
        let snapshot = node.handle.snapshot();
        assert_eq!(snapshot.network.state, "connected");
        assert!(snapshot.nodes.values().filter(|r| !r.local).all(|r| !r.advert.addrs.is_empty()));
    }
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_key_claiming_a_known_id_is_refused_and_reported() {
    let cancel = CancellationToken::new();
    let honest = start("honest", 1, vec![], &cancel).await;
    let boot = honest.handle.snapshot().network.listen.clone();
    let mut witness = start("witness", 2, boot.clone(), &cancel).await;
    until(&witness.handle, "the witness to learn the honest node", |s| {
        ok_ids(s).contains(&"honest".to_owned())
    })
    .await;
    let honest_key = NodeKey::from_secret([1; 32]).public_b64();

    // Same id, different key.
    let rogue = start("honest", 9, boot, &cancel).await;
    let rogue_key = NodeKey::from_secret([9; 32]).public_b64();
    let deadline = tokio::time::Instant::now() + WAIT;
    let conflict = loop {
        let emit = tokio::time::timeout_at(deadline, witness.events.recv())
            .await
            .expect("a cluster.node.conflict event within the limit")
            .expect("events open");
        if emit.kind == "cluster.node.conflict" {
            break emit.payload;
        }
    };
    assert_eq!(conflict["id"], "honest");
    assert_eq!(conflict["known_key"], honest_key.as_str());
    assert_eq!(conflict["claimed_key"], rogue_key.as_str());
    // The rogue's adverts never replaced the honest record.
    let snapshot = witness.handle.snapshot();
    let record = &snapshot.nodes["honest"];
    assert_eq!(record.advert.addrs, honest.handle.snapshot().network.listen);
    drop(rogue);
    cancel.cancel();
}

/// The actor decides nothing itself: the inputs it fed its core while three real nodes
/// converged, one changed its role, a command ran and a member crashed, replayed into a fresh
/// core made from the same configuration, give exactly the effects the actor carried out
/// (`handle` is the core's only way in: nothing else can change it). The simulator feeds that
/// same core, so it makes the same decisions from the same inputs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_node_s_inputs_into_a_fresh_core_gives_the_same_effects() {
    let cancel = CancellationToken::new();
    let (trace, mut traced) = mpsc::unbounded_channel();
    let a = start_with("node-a", 1, vec![], &cancel, Some(trace)).await;
    let boot = a.handle.snapshot().network.listen.clone();
    let b = start("node-b", 2, boot.clone(), &cancel).await;
    let c = start("node-c", 3, boot, &cancel).await;
    until(&a.handle, "node-a to see all three", |s| ok_ids(s).len() == 3).await;
    b.handle.set_role("regional").await.expect("role");
    until(&a.handle, "node-b's new role", |s| {
        s.nodes.get("node-b").is_some_and(|r| r.advert.role.as_str() == "regional")
    })
    .await;
    a.handle.set_role("regional").await.expect("role");
    c.task.abort();
    until(&a.handle, "node-c lost", |s| {
        s.nodes.get("node-c").is_some_and(|r| r.health != Health::Ok)
    })
    .await;
    cancel.cancel();
    let _ = tokio::time::timeout(WAIT, a.task).await;

    let mut config = a.config.clone();
    config.trace = None;
    let mut core = NodeCore::new(&config, Restored::default());
    let mut seen = std::collections::BTreeSet::new();
    let mut count = 0;
    while let Ok(Traced { now_ms, input, effects }) = traced.try_recv() {
        let what = format!("{input:?}");
        seen.insert(what.split([' ', '(', '{']).next().unwrap_or_default().to_owned());
        let replayed: Vec<String> =
            core.handle(input, now_ms).iter().map(|e| format!("{e:?}")).collect();
        assert_eq!(replayed, effects, "input #{count}: {what}");
        count += 1;
    }
    for kind in ["Start", "Connected", "Message", "SyncRequest", "Command", "Persisted"] {
        assert!(seen.contains(kind), "no {kind} input among {count}: {seen:?}");
    }
}

#[path = "../examples/support/mesh.rs"]
mod mesh;

/// A node (`target`) with an honest peer (`honest`), both `ok` to each other.
async fn target_and_honest_peer(cancel: &CancellationToken) -> (TestNode, TestNode) {
    let node = start("target", 1, vec![], cancel).await;
    let boot = node.handle.snapshot().network.listen.clone();
    let honest = start("honest", 2, boot, cancel).await;
    until(&node.handle, "the honest peer", |s| ok_ids(s).contains(&"honest".to_owned())).await;
    (node, honest)
}

/// Floods `node` from a fresh mesh member, `per_tick` of `messages` (in turn) every 5 ms,
/// until the node closes the connection; then checks it refuses the member when it dials
/// again, and still holds its honest peer `ok`. Returns how many were sent.
async fn flood_until_cut_off(node: &TestNode, messages: &[Vec<u8>], per_tick: usize) -> usize {
    use futures::StreamExt;
    use libp2p::swarm::SwarmEvent;

    let target = node.handle.snapshot().peer_id.parse::<libp2p::PeerId>().expect("peer id");
    let addrs: Vec<arw_p2p::Multiaddr> = node
        .handle
        .snapshot()
        .network
        .listen
        .iter()
        .map(|a| format!("{a}/p2p/{target}").parse().expect("addr"))
        .collect();
    let (mut attacker, topic) = mesh::attacker(&addrs, "lab", None);
    let mut sent = 0;
    let mut cut = false;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut flood = tokio::time::interval(Duration::from_millis(5));
    while !cut {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => panic!("not cut off after {sent} messages"),
            _ = flood.tick() => {
                for message in messages.iter().cycle().skip(sent).take(per_tick) {
                    if attacker.behaviour_mut().publish(topic.clone(), message.clone()).is_ok() {
                        sent += 1;
                    }
                }
            }
            event = attacker.select_next_some() => {
                if let SwarmEvent::ConnectionClosed { peer_id, .. } = event
                    && peer_id == target
                    && sent > 0
                {
                    cut = true;
                }
            }
        }
    }
    // Refused when it dials again.
    attacker.dial(addrs[0].clone()).expect("dial");
    let refused_again = tokio::time::timeout(WAIT, async {
        loop {
            match attacker.select_next_some().await {
                SwarmEvent::ConnectionClosed { peer_id, .. }
                | SwarmEvent::OutgoingConnectionError { peer_id: Some(peer_id), .. }
                    if peer_id == target =>
                {
                    break true;
                }
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(refused_again, Ok(true), "the node took the peer back");
    let s = node.handle.snapshot();
    assert!(ok_ids(&s).contains(&"honest".to_owned()), "the honest peer is not ok");
    assert!(s.network.connected_peers >= 1, "the honest peer was cut off too");
    sent
}

/// A mesh member that sends messages this node rejects (a valid-looking envelope whose signature
/// matches nothing) is disconnected and refused after a few: the flood stops costing the node
/// anything, and honest nodes are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_sends_invalid_messages_is_disconnected_and_refused() {
    let cancel = CancellationToken::new();
    let (node, honest) = target_and_honest_peer(&cancel).await;
    let rogue = NodeKey::from_secret([77; 32]);
    let forged: Vec<Vec<u8>> = (1..=1_000)
        .map(|seq| {
            let advert = arw_p2p::cluster::Advert::basic(
                NodeId::parse("rogue").expect("id"),
                "lab",
                seq,
                arw_p2p::time::now_ms(),
            );
            let mut envelope =
                arw_p2p::wire::seal(&rogue, "lab", &arw_p2p::wire::Message::Advert(advert));
            // 64 zero bytes in place of the signature (the envelope's last 88 bytes before
            // `"}`): a signature that matches nothing.
            let end = envelope.len() - 2;
            envelope[end - 88..end].copy_from_slice(("A".repeat(86) + "==").as_bytes());
            envelope
        })
        .collect();
    let sent = flood_until_cut_off(&node, &forged, 1).await;
    let refused = node.handle.snapshot().counters.refused;
    assert!(refused <= 20, "{refused} rejected before the cut, of {sent} sent");
    drop(honest);
    cancel.cancel();
}

/// A member flooding messages with valid signatures, under its own key (a liar's reports and
/// heartbeats) or under fresh keys (Sybils), gets a handful checked; the rest is shed unchecked
/// and the member cut off like one sending invalid messages. Honest nodes are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_flooding_validly_signed_messages_is_shed_then_cut_off() {
    use arw_p2p::wire::{Beat, Message, seal};

    let cancel = CancellationToken::new();
    let (node, honest) = target_and_honest_peer(&cancel).await;
    let now = arw_p2p::time::now_ms();
    let advert = |key: &NodeKey, id: &str| {
        let advert = arw_p2p::cluster::Advert::basic(NodeId::parse(id).expect("id"), "lab", 1, now);
        seal(key, "lab", &Message::Advert(advert))
    };
    let liar = NodeKey::from_secret([78; 32]);
    let mut lies = vec![advert(&liar, "liar")];
    lies.extend((1..=4_000).map(|beat| {
        let id = NodeId::parse("liar").expect("id");
        let workspace = "lab".to_owned();
        seal(
            &liar,
            "lab",
            &Message::Heartbeat(Beat { id, workspace, seq: 1, beat, sent_ms: now, policy: 0 }),
        )
    }));
    let sybils: Vec<Vec<u8>> = (0..4_000u32)
        .map(|i| {
            let mut secret = [9u8; 32];
            secret[..4].copy_from_slice(&i.to_be_bytes());
            advert(&NodeKey::from_secret(secret), &format!("s{i}"))
        })
        .collect();
    for (what, flood) in [("liar", lies), ("sybil", sybils)] {
        let before = node.handle.snapshot().counters;
        let sent = flood_until_cut_off(&node, &flood, 20).await;
        // The cut came after 2,000 shed (the snapshot shows them soon after).
        until(&node.handle, "the shed count", |s| s.counters.since(before).shed > 2_000).await;
        let taken = node.handle.snapshot().counters.since(before);
        assert!(taken.received <= 400, "{what}: {} checked of {sent}", taken.received);
    }
    drop(honest);
    cancel.cancel();
}
