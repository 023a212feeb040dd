//! Message floods on the libp2p mesh against N node actors, each between baselines taken in the
//! same run: what honest nodes see (advert delivery, false suspicions), how many flood messages
//! still reach their cores second by second (a node should cut the sender off), and what it
//! costs.
//!
//! ```sh
//! cargo run --release -p arw-p2p --example mesh_flood -- 5 10000 15
//! ```
//!
//! Arguments: nodes (5), flood messages per second (10,000), seconds per phase (15), and
//! optionally the phases (comma-separated; by default each flood between baselines). The N node
//! actors run on loopback with the default liveness settings (heartbeat 1 s, suspect 3 s, down
//! 5 s), node w0 the others' bootstrap. For each phase a fresh attacker (a bare libp2p swarm
//! with gossipsub, under a new identity) dials every node and subscribes to the workspace
//! topic, then publishes, each message unique: `garbage` (3.3 KB of noise), `bad_signature` (a
//! 3.3 KB envelope whose signature does not match), `forged_suspicion` (a member that
//! advertised once, then signs reports naming the honest nodes at any position: valid
//! signatures) or `sybil` (adverts of fresh keys and ids, validly signed). Signed floods are
//! made before the phase starts, so that signing does not take the nodes' CPU. In every phase
//! node w1 changes its role every 200 ms; delivery is that call → each other node's
//! `cluster.node.advertise` event. Reported per phase: delivery p50 / p99 / max and misses,
//! honest nodes judged `suspect` / `down` by another, messages the node cores refused in each
//! second of the phase (all nodes together, any reason), and the CPU of the process (nodes and
//! attacker). For the flood phases, per 100 ms: the messages the attacker's gossipsub handed to
//! its connections, those the nodes' gossipsub took in, and those the cores refused; and from
//! when the attacker is cut off (fewer than 10 % of its messages taken in, or none sent).

#[path = "support/mod.rs"]
#[allow(dead_code, reason = "the broker is the NATS examples' part of the support module")]
mod support;

#[path = "support/hostile.rs"]
mod hostile;

#[path = "support/mesh.rs"]
mod mesh;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use hostile::{cpu_secs, id};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use arw_p2p::{
    cluster::Advert,
    events::EventTx,
    identity::NodeKey,
    node::{self, FederationConfig, NodeConfig, NodeHandle},
    node_id::IdSource,
    time::now_ms,
    wire::{Message, seal},
};

/// Phases by default: each flood between baselines.
const PHASES: [&str; 9] = [
    "baseline",
    "garbage",
    "baseline",
    "bad_signature",
    "baseline",
    "forged_suspicion",
    "baseline",
    "sybil",
    "baseline",
];

/// The `n`th message of an unsigned flood: unique, so gossip does not drop it as a repeat.
/// A bad-signature envelope is one sealed once with `n` written over part of its payload (the
/// signature matches nothing either way).
fn flood(kind: &str, n: u64, template: &[u8]) -> Vec<u8> {
    let mut message = template.to_vec();
    let stamp = format!("{n:020}");
    let at = match kind {
        "garbage" => 0,
        _ => message.windows(20).position(|w| w == [b'x'; 20]).unwrap_or(0),
    };
    message[at..at + stamp.len()].copy_from_slice(stamp.as_bytes());
    message
}

/// The template of `kind`'s unsigned flood messages (see [`flood`]).
fn template(kind: &str) -> Vec<u8> {
    if kind == "garbage" {
        return vec![b'#'; 3_300];
    }
    let mut advert = Advert::basic(id("w0"), "default", u64::MAX / 2, now_ms());
    advert.tags = (0..40).map(|i| format!("{i:02}{}", "x".repeat(70))).collect();
    hostile::bad_signature(&NodeKey::from_secret([77; 32]), &Message::Advert(advert))
}

/// The messages of a signed flood of `count`, made before its phase: `forged_suspicion` (the
/// liar's advert, then its reports naming the `honest` nodes in turn) or `sybil`.
fn signed(kind: &str, count: usize, honest: usize) -> Vec<Vec<u8>> {
    let rogue = NodeKey::from_secret([78; 32]);
    match kind {
        "forged_suspicion" => {
            let liar = Advert::basic(id("liar"), "default", 1, now_ms());
            let mut out = vec![seal(&rogue, "default", &Message::Advert(liar))];
            out.extend(
                (0..count as u64).map(|i| seal(&rogue, "default", &hostile::lie(i, honest))),
            );
            out
        }
        "sybil" => (0..count as u32)
            .map(|i| {
                let key = hostile::sybil_key(i);
                let advert = Advert::basic(id(&format!("s{i}")), "default", 1, now_ms());
                seal(&key, "default", &Message::Advert(advert))
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The sum of every sample of the metric families whose name contains `name`.
fn metric_sum(registry: &Registry, name: &str) -> f64 {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        return 0.0;
    }
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What one attacker is: where to hand it messages to publish, how many it published, and its
/// gossipsub's metrics.
struct Attacker {
    flood: mpsc::Sender<Vec<u8>>,
    published: Arc<AtomicU64>,
    metrics: Registry,
}

/// A fresh attacker (a new identity, as a banned one would make), dialled to `addrs` and
/// subscribed to the workspace topic, publishing what it is handed.
fn attacker(addrs: &[arw_p2p::Multiaddr]) -> Attacker {
    let mut metrics = Registry::default();
    let (mut swarm, topic) = mesh::attacker(addrs, "default", Some(&mut metrics));
    let (flood, mut flood_rx) = mpsc::channel::<Vec<u8>>(1024);
    let published = Arc::new(AtomicU64::new(0));
    let counted = published.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = swarm.select_next_some() => {}
                next = flood_rx.recv() => match next {
                    Some(bytes) => {
                        if swarm.behaviour_mut().publish(topic.clone(), bytes).is_ok() {
                            counted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    None => break,
                },
            }
        }
    });
    Attacker { flood, published, metrics }
}

/// Messages the node cores refused so far, all nodes, for any reason.
fn refused(nodes: &[NodeHandle]) -> u64 {
    nodes.iter().map(|n| n.snapshot().counters.refused_by.iter().sum::<u64>()).sum()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number =
        |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (n, rate, secs) = (number(0, 5), number(1, 10_000), number(2, 15));
    let phases: Vec<String> = match args.get(3) {
        Some(list) => list.split(',').map(str::to_owned).collect(),
        None => PHASES.map(str::to_owned).to_vec(),
    };
    let cancel = CancellationToken::new();
    let dirs: Vec<tempfile::TempDir> =
        (0..n).map(|_| tempfile::tempdir().expect("tempdir")).collect();
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<(u64, Instant)>();
    let judged = hostile::Judged::default();
    let mut nodes: Vec<NodeHandle> = Vec::new();
    let mut registries: Vec<Registry> = Vec::new();
    let mut addrs = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let (events, mut events_rx) = EventTx::channel(65_536);
        let mut config =
            NodeConfig::new(NodeKey::generate().expect("key"), "default", dir.path().to_path_buf());
        config.explicit_id = Some((id(&format!("w{i}")), IdSource::Config));
        let bootstrap = addrs.first().cloned().into_iter().collect();
        config.federation =
            Some(FederationConfig::loopback("default", bootstrap, Duration::from_secs(1)));
        let mut registry = Registry::default();
        let (handle, _) =
            node::spawn_with_metrics(config, events, cancel.child_token(), Some(&mut registry))
                .await
                .expect("node");
        registries.push(registry);
        let listen = handle.snapshot().network.listen.clone();
        let peer = handle.snapshot().peer_id.clone();
        let addr: arw_p2p::Multiaddr =
            format!("{}/p2p/{peer}", listen.first().expect("listening")).parse().expect("addr");
        addrs.push(addr);
        nodes.push(handle);
        let (seen_tx, judged) = (seen_tx.clone(), judged.clone());
        tokio::spawn(async move {
            while let Some(emit) = events_rx.recv().await {
                let p = &emit.payload;
                if emit.kind == "cluster.node.advertise" && p["id"] == "w1" && i != 1 {
                    let _ = seen_tx.send((p["seq"].as_u64().unwrap_or(0), Instant::now()));
                }
                judged.count(&emit.kind, p);
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let peers = nodes.iter().map(|n| n.snapshot().network.connected_peers).min().unwrap_or(0);
    println!(
        "{n} node actors on loopback libp2p (each with {peers} connections), a fresh attacker dialled to all for each flood; {rate} flood messages/s for {secs} s per phase; w1 re-advertises every 200 ms"
    );
    println!(
        "{:<17} {:>8} {:>8} {:>8} {:>6} {:>7} {:>5} {:>9} {:>6}  messages refused by the cores, per second",
        "phase", "p50 ms", "p99 ms", "max ms", "missed", "suspect", "down", "published", "cores"
    );
    let w1 = nodes[1].clone();
    for kind in phases.iter().map(String::as_str) {
        let mut prepared = signed(kind, rate * secs, n).into_iter();
        let template = template(kind);
        let attacker = attacker(&addrs);
        // Connected and subscribed, as an attacker already in the mesh would be.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (attacker_metrics, published, flood_tx) =
            (&attacker.metrics, &attacker.published, &attacker.flood);
        while seen.try_recv().is_ok() {}
        let (s0, d0) = judged.read();
        let (cpu0, p0, start) = (cpu_secs(), published.load(Ordering::Relaxed), Instant::now());
        let mut sent_at = std::collections::BTreeMap::new();
        let mut per_second = Vec::new();
        let mut last = refused(&nodes);
        // Per 100 ms: flood messages the attacker handed to its connections, those the nodes'
        // gossipsub took in (a graylisted sender's are dropped before), those refused by the
        // cores.
        let sample = || {
            let received: f64 =
                registries.iter().map(|r| metric_sum(r, "topic_msg_recv_counts_unfiltered")).sum();
            (metric_sum(attacker_metrics, "topic_msg_sent_counts"), received, refused(&nodes))
        };
        let mut timeline = Vec::new();
        let mut previous = sample();
        let first = previous;
        let per_tick = (rate / 100).max(1) as u64;
        let mut tick = 0u64;
        let mut made = 0u64;
        while start.elapsed() < Duration::from_secs(secs as u64) {
            if tick.is_multiple_of(20) {
                let role = if tick.is_multiple_of(40) { "regional" } else { "edge" };
                let at = Instant::now();
                let before = w1.snapshot().nodes.get(&id("w1")).map_or(0, |r| r.advert.seq);
                if w1.set_role(role).await.is_ok() {
                    // The same role as before (at a phase's start) makes no new advert.
                    let seq = w1.snapshot().nodes.get(&id("w1")).map_or(0, |r| r.advert.seq);
                    if seq > before {
                        sent_at.insert(seq, at);
                    }
                }
            }
            if kind != "baseline" {
                for _ in 0..per_tick {
                    made += 1;
                    let message = prepared.next().unwrap_or_else(|| flood(kind, made, &template));
                    let _ = flood_tx.try_send(message);
                }
            }
            tick += 1;
            if tick.is_multiple_of(10) {
                let now = sample();
                timeline.push((now.0 - previous.0, now.1 - previous.1, now.2 - previous.2));
                previous = now;
            }
            if tick.is_multiple_of(100) {
                let now = refused(&nodes);
                per_second.push(now - last);
                last = now;
            }
            tokio::time::sleep_until((start + Duration::from_millis(10) * tick as u32).into())
                .await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let delivery = hostile::delivery(&mut seen, &sent_at);
        let secs_taken = start.elapsed().as_secs_f64();
        println!(
            "{:<17} {:>8.2} {:>8.2} {:>8.2} {:>6} {:>7} {:>5} {:>9} {:>6.2}  {:?}",
            kind,
            support::pct(&delivery, 0.5),
            support::pct(&delivery, 0.99),
            delivery.last().copied().unwrap_or(f64::NAN),
            (sent_at.len() * (n - 1)).saturating_sub(delivery.len()),
            judged.read().0 - s0,
            judged.read().1 - d0,
            published.load(Ordering::Relaxed) - p0,
            (cpu_secs() - cpu0) / secs_taken,
            per_second,
        );
        if kind != "baseline" {
            // Sent includes the honest adverts the attacker relays; received, the nodes' own.
            // Cut off: nothing the attacker sends is taken in, or it has no one left to send to.
            let cut = timeline.iter().position(|(s, r, _)| *s == 0.0 || *r < 0.1 * s);
            let shown: Vec<String> =
                timeline.iter().take(20).map(|(s, r, c)| format!("{s:.0}/{r:.0}/{c}")).collect();
            let last = sample();
            println!(
                "  per 100 ms, sent/received by gossipsub/refused by the cores: {}; cut off (< 10 % taken in, or nothing sent) from {} ms; whole phase: sent {:.0}, received {:.0}, refused {}",
                shown.join(" "),
                cut.map_or("never".to_owned(), |w| format!("{}", (w + 1) * 100)),
                last.0 - first.0,
                last.1 - first.1,
                last.2 - first.2,
            );
        }
    }
    cancel.cancel();
}
