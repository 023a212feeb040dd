//! A signed advert fanned out through NATS to N node actors, against raw NATS fan-out of the
//! same bytes to N plain subscribers, in one run.
//!
//! ```sh
//! cargo run --release -p arw-p2p --example nats_fanout -- 10 100
//! ```
//!
//! Starts its own `nats-server` on a free port. Node path: publish → broker → each node's bus
//! connection → signature check and membership → the `cluster.node.advertise` event it emits.
//! Raw path: publish → broker → a subscriber on its own connection. Each of N receivers has its
//! own connection in both paths; messages go out 20 ms apart; latency is send → receipt.

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use arw_p2p::{
    cluster::Advert,
    events::EventTx,
    identity::NodeKey,
    nats::NatsConfig,
    node::{self, FederationConfig, NodeConfig},
    node_id::{IdSource, NodeId},
    wire::{Message, seal},
};

const MESSAGES: usize = 50;

fn summary(mut v: Vec<f64>) -> (f64, f64, f64, usize) {
    v.sort_by(f64::total_cmp);
    (support::pct(&v, 0.5), support::pct(&v, 0.99), v.last().copied().unwrap_or(f64::NAN), v.len())
}

fn advert(seq: u64) -> Message {
    let mut advert = Advert::basic(
        NodeId::parse("bench-src").expect("id"),
        "default",
        seq,
        arw_p2p::time::now_ms(),
    );
    advert.tags = vec!["bench".into()];
    advert.bus = "nats".into();
    Message::Advert(advert)
}

async fn raw(url: &str, n: usize, bytes: &[u8]) -> Vec<f64> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Instant)>();
    let mut subs = Vec::new();
    for _ in 0..n {
        let client = async_nats::connect(url).await.expect("connect");
        let mut sub = client.subscribe("bench.raw").await.expect("subscribe");
        client.flush().await.expect("flush");
        let tx = tx.clone();
        subs.push(tokio::spawn(async move {
            let _keep = client;
            while let Some(m) = sub.next().await {
                let i = u32::from_be_bytes(m.payload[..4].try_into().expect("4 bytes")) as usize;
                let _ = tx.send((i, Instant::now()));
            }
        }));
    }
    let publisher = async_nats::connect(url).await.expect("connect");
    let mut sent = Vec::new();
    for i in 0..MESSAGES {
        let mut body = (i as u32).to_be_bytes().to_vec();
        body.extend_from_slice(bytes);
        sent.push(Instant::now());
        publisher.publish("bench.raw", body.into()).await.expect("publish");
        publisher.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut out = Vec::new();
    while let Ok(Some((i, at))) = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
        out.push(at.duration_since(sent[i]).as_secs_f64() * 1000.0);
    }
    for s in subs {
        s.abort();
    }
    out
}

async fn nodes(url: &str, n: usize) -> Vec<f64> {
    let cancel = CancellationToken::new();
    let dirs: Vec<tempfile::TempDir> =
        (0..n).map(|_| tempfile::tempdir().expect("tempdir")).collect();
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, Instant)>();
    for (i, dir) in dirs.iter().enumerate() {
        let (events, mut events_rx) = EventTx::channel(4096);
        let mut config =
            NodeConfig::new(NodeKey::generate().expect("key"), "default", dir.path().to_path_buf());
        config.explicit_id = Some((NodeId::parse(&format!("n{i}")).expect("id"), IdSource::Config));
        config.bus = "nats".into();
        let nats = NatsConfig::plain(url, &format!("bench-{i}"));
        config.federation =
            Some(FederationConfig::broker("default", nats, Duration::from_secs(60)));
        node::spawn(config, events, cancel.child_token()).await.expect("node");
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(emit) = events_rx.recv().await {
                if emit.kind == "cluster.node.advertise" && emit.payload["id"] == "bench-src" {
                    let _ = tx.send((emit.payload["seq"].as_u64().unwrap_or(0), Instant::now()));
                }
            }
        });
    }
    // Let every node's boot traffic (adverts, sync answers) settle before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let key = NodeKey::generate().expect("key");
    let publisher = async_nats::connect(url).await.expect("connect");
    let subject = arw_p2p::nats::msg_subject("default", &key.peer_id());
    let mut sent = Vec::new();
    for i in 0..MESSAGES {
        let bytes = seal(&key, "default", &advert(i as u64 + 1));
        sent.push(Instant::now());
        publisher.publish(subject.clone(), bytes.into()).await.expect("publish");
        publisher.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut out = Vec::new();
    while let Ok(Some((seq, at))) = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
        if let Some(t) = sent.get(seq as usize - 1) {
            out.push(at.duration_since(*t).as_secs_f64() * 1000.0);
        }
    }
    cancel.cancel();
    out
}

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let broker = support::Broker::start().await;
    let url = broker.url.clone();
    let sample = seal(&NodeKey::generate().expect("key"), "default", &advert(1));
    println!("advert envelope: {} bytes; {MESSAGES} messages 20 ms apart per run", sample.len());
    for n in if sizes.is_empty() { vec![10, 100] } else { sizes } {
        let raw = summary(raw(&url, n, &sample).await);
        let node = summary(nodes(&url, n).await);
        println!(
            "N={n:<4} raw NATS p50 {:.3} ms p99 {:.3} ms max {:.3} ms ({} deliveries) | signed advert to node actors p50 {:.3} ms p99 {:.3} ms max {:.3} ms ({} deliveries) | p99 ratio {:.2}",
            raw.0,
            raw.1,
            raw.2,
            raw.3,
            node.0,
            node.1,
            node.2,
            node.3,
            node.1 / raw.1
        );
    }
    drop(broker);
}
