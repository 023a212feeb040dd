//! Invalid and hostile message floods on the NATS bus against N node actors, each phase beside
//! a baseline taken in the same run: what honest nodes see (advert delivery, false suspicions)
//! and what it costs.
//!
//! ```sh
//! cargo run --release -p arw-p2p --example nats_flood -- 5 10000 15
//! ```
//!
//! Arguments: nodes (5), flood messages per second (10,000), seconds per phase (15). Starts its
//! own `nats-server` on a free port. The N node actors run with the default liveness settings
//! (heartbeat 1 s, suspect 3 s, down 5 s). In every phase a source outside the nodes publishes a
//! valid advert every 200 ms; delivery is publish → each node's `cluster.node.advertise` event.
//! Phases: baseline (no flood); `garbage` (3.3 KB of noise); `bad_signature` (a 3.3 KB envelope
//! whose signature does not match); `forged_suspicion` (a member that advertised once, then
//! signs reports naming the honest nodes at any position); `sybil` (adverts of fresh keys and
//! ids). Reported per phase: advert delivery p50 / p99 / max and misses, honest nodes judged
//! `suspect` / `down` by another (events), flood messages sent, and the CPU the process used
//! (node actors and flooder together; the broker is a separate process).

#[path = "support/mod.rs"]
mod support;

#[path = "support/hostile.rs"]
mod hostile;

use std::time::{Duration, Instant};

use hostile::{cpu_secs, id};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use arw_p2p::{
    cluster::Advert,
    events::EventTx,
    identity::NodeKey,
    membership::MembershipConfig,
    nats::NatsConfig,
    node::{self, BusConfig, FederationConfig, NodeConfig},
    node_id::IdSource,
    time::now_ms,
    wire::{Message, Suspicion, seal},
};

const SUBJECT: &str = "arw.cluster.default.msg";

fn advert(name: &str, seq: u64, tags: usize) -> Message {
    let mut advert = Advert::basic(id(name), "default", seq, now_ms());
    advert.tags = (0..tags).map(|i| format!("{i:02}{}", "x".repeat(70))).collect();
    advert.bus = "nats".into();
    Message::Advert(advert)
}

/// The flood of one phase, made before it starts so that sending costs little.
fn flood(kind: &str, count: usize, honest: usize) -> Vec<Vec<u8>> {
    let rogue = NodeKey::from_secret([77; 32]);
    match kind {
        "garbage" => vec![vec![b'#'; 3_300]; 1],
        "bad_signature" => vec![hostile::bad_signature(&advert("w0", u64::MAX / 2, 40))],
        "forged_suspicion" => {
            let mut out = vec![seal(&rogue, "default", &advert("liar", 1, 0))];
            out.extend((0..count as u64).map(|i| {
                let report = Suspicion {
                    id: id("liar"),
                    workspace: "default".into(),
                    seq: 1,
                    beat: i + 1,
                    sent_ms: now_ms(),
                    target: id(&format!("w{}", i as usize % honest)),
                    target_seq: u64::MAX,
                    target_beat: u64::MAX,
                };
                seal(&rogue, "default", &Message::Suspect(report))
            }));
            out
        }
        "sybil" => (0..count as u32)
            .map(|i| {
                let mut secret = [9u8; 32];
                secret[..4].copy_from_slice(&i.to_be_bytes());
                seal(&NodeKey::from_secret(secret), "default", &advert(&format!("s{i}"), 1, 0))
            })
            .collect(),
        _ => Vec::new(),
    }
}

struct Phase {
    delivery: Vec<f64>,
    missed: usize,
    false_suspect: u64,
    false_down: u64,
    sent: usize,
    cpu: f64,
    secs: f64,
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (n, rate, secs) = (
        args.first().copied().unwrap_or(5),
        args.get(1).copied().unwrap_or(10_000),
        args.get(2).copied().unwrap_or(15),
    );
    let broker = support::Broker::start().await;
    let url = broker.url.clone();

    let cancel = CancellationToken::new();
    let dirs: Vec<tempfile::TempDir> =
        (0..n).map(|_| tempfile::tempdir().expect("tempdir")).collect();
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<(u64, Instant)>();
    let judged = hostile::Judged::default();
    for (i, dir) in dirs.iter().enumerate() {
        let (events, mut events_rx) = EventTx::channel(65_536);
        let mut config =
            NodeConfig::new(NodeKey::generate().expect("key"), "default", dir.path().to_path_buf());
        config.explicit_id = Some((id(&format!("w{i}")), IdSource::Config));
        config.bus = "nats".into();
        config.federation = Some(FederationConfig {
            bus: BusConfig::Nats(NatsConfig {
                url: url.clone(),
                tls: false,
                user: None,
                pass: None,
                connect_retries: 3,
                connect_backoff: Duration::from_millis(200),
                name: format!("flood-{i}"),
            }),
            heartbeat_interval: Duration::from_secs(1),
            membership: MembershipConfig::new("default"),
        });
        node::spawn(config, events, cancel.child_token()).await.expect("node");
        let (seen_tx, judged) = (seen_tx.clone(), judged.clone());
        tokio::spawn(async move {
            while let Some(emit) = events_rx.recv().await {
                let p = &emit.payload;
                if emit.kind == "cluster.node.advertise" && p["id"] == "bench-src" {
                    let _ = seen_tx.send((p["seq"].as_u64().unwrap_or(0), Instant::now()));
                }
                judged.count(&emit.kind, p);
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    let source = NodeKey::generate().expect("key");
    let publisher = async_nats::connect(&url).await.expect("connect");
    let flooder = async_nats::connect(&url).await.expect("connect");
    let mut seq = 0u64;
    println!(
        "{n} node actors on NATS, {rate} flood messages/s for {secs} s per phase, a valid advert every 200 ms"
    );
    println!(
        "{:<17} {:>9} {:>9} {:>9} {:>7} {:>8} {:>6} {:>9} {:>6}",
        "phase", "p50 ms", "p99 ms", "max ms", "missed", "suspect", "down", "sent", "cores"
    );
    for kind in ["baseline", "garbage", "bad_signature", "forged_suspicion", "sybil"] {
        let payloads = flood(kind, rate * secs, n);
        while seen.try_recv().is_ok() {}
        let (s0, d0) = judged.read();
        let (cpu0, start) = (cpu_secs(), Instant::now());
        let mut sent_at = std::collections::BTreeMap::new();
        let mut sent = 0usize;
        let per_tick = (rate / 100).max(1);
        let mut tick = 0u32;
        while start.elapsed() < Duration::from_secs(secs as u64) {
            if tick.is_multiple_of(20) {
                seq += 1;
                let bytes = seal(&source, "default", &advert("bench-src", seq, 0));
                sent_at.insert(seq, Instant::now());
                publisher.publish(SUBJECT, bytes.into()).await.expect("publish");
            }
            for _ in 0..per_tick {
                if payloads.is_empty() {
                    break;
                }
                let bytes = payloads[sent.min(payloads.len() - 1)].clone();
                flooder.publish(SUBJECT, bytes.into()).await.expect("publish");
                sent += 1;
            }
            tick += 1;
            tokio::time::sleep_until((start + Duration::from_millis(10) * tick).into()).await;
        }
        let _ = tokio::join!(publisher.flush(), flooder.flush());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let delivery = hostile::delivery(&mut seen, &sent_at);
        let phase = Phase {
            missed: (sent_at.len() * n).saturating_sub(delivery.len()),
            delivery,
            false_suspect: judged.read().0 - s0,
            false_down: judged.read().1 - d0,
            sent: if kind == "baseline" { 0 } else { sent },
            cpu: cpu_secs() - cpu0,
            secs: start.elapsed().as_secs_f64(),
        };
        println!(
            "{:<17} {:>9.2} {:>9.2} {:>9.2} {:>7} {:>8} {:>6} {:>9} {:>6.2}",
            kind,
            support::pct(&phase.delivery, 0.5),
            support::pct(&phase.delivery, 0.99),
            phase.delivery.last().copied().unwrap_or(f64::NAN),
            phase.missed,
            phase.false_suspect,
            phase.false_down,
            phase.sent,
            phase.cpu / phase.secs,
        );
    }
    cancel.cancel();
    drop(broker);
}
