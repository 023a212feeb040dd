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

/// A mesh member that sends messages this node rejects (a valid-looking envelope whose signature
/// matches nothing) is graylisted by gossipsub's scoring after a few, then disconnected and
/// refused: the flood stops costing the node anything, and honest nodes are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_sends_invalid_messages_is_disconnected_and_refused() {
    use futures::StreamExt;
    use libp2p::swarm::SwarmEvent;

    let cancel = CancellationToken::new();
    let node = start("target", 1, vec![], &cancel).await;
    let boot = node.handle.snapshot().network.listen.clone();
    let honest = start("honest", 2, boot.clone(), &cancel).await;
    until(&node.handle, "the honest peer", |s| ok_ids(s).contains(&"honest".to_owned())).await;
    let target = node.handle.snapshot().peer_id.parse::<libp2p::PeerId>().expect("peer id");
    let addrs: Vec<arw_p2p::Multiaddr> =
        boot.iter().map(|a| format!("{a}/p2p/{target}").parse().expect("addr")).collect();
    let (mut attacker, topic) = mesh::attacker(&addrs, "lab", None);
    let rogue = NodeKey::from_secret([77; 32]);
    let mut sent = 0u64;
    let mut cut_at = None;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut flood = tokio::time::interval(Duration::from_millis(5));
    // Flood until the node closes the connection, then try to come back.
    while cut_at.is_none() {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => panic!("not cut off after {sent} messages"),
            _ = flood.tick() => {
                let advert = arw_p2p::cluster::Advert::basic(
                    NodeId::parse("rogue").expect("id"), "lab", sent + 1, arw_p2p::time::now_ms());
                let sealed = arw_p2p::wire::seal(&rogue, "lab", &arw_p2p::wire::Message::Advert(advert));
                // 64 zero bytes in place of the signature (the envelope's last 88 bytes before
                // `"}`): a signature that matches nothing.
                let mut envelope = sealed;
                let end = envelope.len() - 2;
                envelope[end - 88..end].copy_from_slice(("A".repeat(86) + "==").as_bytes());
                if attacker.behaviour_mut().publish(topic.clone(), envelope).is_ok() {
                    sent += 1;
                }
            }
            event = attacker.select_next_some() => {
                if let SwarmEvent::ConnectionClosed { peer_id, .. } = event
                    && peer_id == target
                    && sent > 0
                {
                    cut_at = Some(sent);
                }
            }
        }
    }
    let refused = node.handle.snapshot().counters.refused;
    assert!(refused <= 20, "{refused} rejected before the cut, of {sent} sent");
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
                SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == target => {}
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(refused_again, Ok(true), "the node took the peer back");
    // The honest peer is still there.
    let s = node.handle.snapshot();
    assert!(ok_ids(&s).contains(&"honest".to_owned()));
    assert!(s.network.connected_peers >= 1);
    drop(honest);
    cancel.cancel();
}
