//! Real node actors over loopback TCP in one process: convergence through a bootstrap peer, and
//! a rogue node that signs adverts under another node's id.

use std::{sync::Arc, time::Duration};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use arw_p2p::{
    cluster::Health,
    events::{Emit, EventTx},
    identity::NodeKey,
    node::{self, FederationConfig, NodeConfig, NodeHandle, Snapshot},
    node_id::{IdSource, NodeId},
};

const WAIT: Duration = Duration::from_secs(30);

struct TestNode {
    handle: NodeHandle,
    events: mpsc::Receiver<Emit>,
    _dir: tempfile::TempDir,
}

async fn start(id: &str, seed: u8, bootstrap: Vec<String>, cancel: &CancellationToken) -> TestNode {
    let dir = tempfile::tempdir().expect("tempdir");
    let (events, rx) = EventTx::channel(4096);
    let mut config =
        NodeConfig::new(NodeKey::from_secret([seed; 32]), "lab", dir.path().to_path_buf());
    config.explicit_id = Some((NodeId::parse(id).expect("id"), IdSource::Config));
    let bootstrap = bootstrap.iter().map(|a| a.parse().expect("addr")).collect();
    config.federation =
        Some(FederationConfig::loopback("lab", bootstrap, Duration::from_millis(500)));
    let (handle, _task) = node::spawn(config, events, cancel.child_token()).await.expect("node");
    TestNode { handle, events: rx, _dir: dir }
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
