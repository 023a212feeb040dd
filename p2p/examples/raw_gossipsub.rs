//! The baseline for the stack tier: raw rust-libp2p gossipsub swarms in one process, with none
//! of arw's protocol on top, on the same machine. Each swarm listens on loopback; swarm i > 0
//! dials swarm 0 and `degree` random earlier swarms. Once every swarm has gossip mesh peers,
//! swarm 0 publishes `messages` 600-byte messages, 50 ms apart; reported: time to connect,
//! publish → arrival at every other swarm (p50 / p99 / max), connections per swarm and RSS
//! growth per swarm.
//!
//! ```sh
//! cargo run --release -p arw-p2p --example raw_gossipsub -- 100 6 20
//! ```

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use futures::StreamExt;
use libp2p::{Multiaddr, Swarm, SwarmBuilder, gossipsub, noise, swarm::SwarmEvent, tcp, yamux};
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

type Arrival = (usize, u64, Instant);

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:").map(str::to_owned)))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn swarm() -> Result<Swarm<gossipsub::Behaviour>, Box<dyn std::error::Error>> {
    Ok(SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)?
        .with_behaviour(|_| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            let config = gossipsub::ConfigBuilder::default()
                .validation_mode(gossipsub::ValidationMode::Anonymous)
                .message_id_fn(|m: &gossipsub::Message| {
                    gossipsub::MessageId::from(Sha256::digest(&m.data).to_vec())
                })
                .build()?;
            Ok(gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, config)?)
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (n, degree, messages) = (
        args.first().copied().unwrap_or(100),
        args.get(1).copied().unwrap_or(6),
        args.get(2).copied().unwrap_or(20),
    );
    let topic = gossipsub::IdentTopic::new("raw/bench");
    let before = rss_kib();
    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut addrs: Vec<Multiaddr> = Vec::new();
    let (arrivals, mut arrived) = mpsc::unbounded_channel::<Arrival>();
    let (status_tx, mut status_rx) = mpsc::unbounded_channel::<(usize, usize, usize)>();
    let mut publishers = Vec::new();
    for i in 0..n {
        let mut swarm = swarm()?;
        swarm.behaviour_mut().subscribe(&topic)?;
        swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
        let addr = loop {
            if let Some(SwarmEvent::NewListenAddr { address, .. }) = swarm.next().await {
                break address;
            }
        };
        if i > 0 {
            swarm.dial(addrs[0].clone())?;
            for _ in 0..degree.min(i - 1) {
                swarm.dial(addrs[rng.random_range(1..i)].clone())?;
            }
        }
        addrs.push(addr);
        let (publish, mut to_publish) = mpsc::unbounded_channel::<Vec<u8>>();
        publishers.push(publish);
        let (arrivals, status_tx, topic) = (arrivals.clone(), status_tx.clone(), topic.clone());
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    Some(data) = to_publish.recv() => {
                        let _ = swarm.behaviour_mut().publish(topic.clone(), data);
                    }
                    _ = ticker.tick() => {
                        let mesh = swarm.behaviour().mesh_peers(&topic.hash()).count();
                        let _ = status_tx.send((i, mesh, swarm.connected_peers().count()));
                    }
                    Some(event) = swarm.next() => {
                        if let SwarmEvent::Behaviour(gossipsub::Event::Message { message, .. }) = event
                            && message.data.len() >= 8
                        {
                            let seq = u64::from_be_bytes(message.data[..8].try_into().unwrap_or_default());
                            let _ = arrivals.send((i, seq, Instant::now()));
                        }
                    }
                }
            }
        });
    }
    // Every swarm with a gossip mesh.
    let mut status: HashMap<usize, (usize, usize)> = HashMap::new();
    while status.len() < n || status.values().any(|(mesh, _)| *mesh == 0) {
        let Some((i, mesh, peers)) = status_rx.recv().await else { break };
        status.insert(i, (mesh, peers));
    }
    let connected = started.elapsed();
    let after = rss_kib();
    let peers: Vec<usize> = status.values().map(|(_, p)| *p).collect();
    let mut latencies = Vec::new();
    let mut sent: HashMap<u64, Instant> = HashMap::new();
    for seq in 0..messages as u64 {
        let mut data = seq.to_be_bytes().to_vec();
        data.resize(600, 0x61);
        sent.insert(seq, Instant::now());
        publishers[0].send(data)?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let want = messages * (n - 1);
    while latencies.len() < want {
        match tokio::time::timeout_at(deadline, arrived.recv()).await {
            Ok(Some((_, seq, at))) => {
                if let Some(t) = sent.get(&seq) {
                    latencies.push(at.duration_since(*t).as_secs_f64() * 1000.0);
                }
            }
            _ => break,
        }
    }
    latencies.sort_by(f64::total_cmp);
    let at = |p: f64| {
        latencies
            .get(((latencies.len().saturating_sub(1)) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!("{n} raw gossipsub swarms, each dialling swarm 0 and {degree} others");
    println!("  every swarm with mesh peers after {:.0} ms", connected.as_secs_f64() * 1000.0);
    println!(
        "  connections per swarm: mean {:.1}, max {}",
        peers.iter().sum::<usize>() as f64 / n as f64,
        peers.iter().max().unwrap_or(&0)
    );
    println!(
        "  RSS growth per swarm: {:.2} MiB",
        (after.saturating_sub(before)) as f64 / 1024.0 / n as f64
    );
    println!(
        "  publish -> every other swarm: {} of {want} delivered, p50 {:.1} / p99 {:.1} / max {:.1} ms",
        latencies.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
    Ok(())
}
