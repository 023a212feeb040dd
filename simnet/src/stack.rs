//! The stack tier: real node actors (libp2p swarm, gossipsub, sync, membership, timers) in this
//! process over loopback TCP. Node 0 starts first; the others bootstrap to it. Measures come from
//! the events each node emits, timestamped on arrival. Crashes abort a node's task (its sockets
//! close, as when a process dies); silent faults (isolate, partition) need the virtual or lan tier.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use arw_p2p::{
    core::Counters,
    events::{Event, EventTx},
    identity::NodeKey,
    node::{self, FederationConfig, NodeConfig, NodeHandle},
    node_id::{IdSource, NodeId},
};

use crate::{
    report::{Measures, Report, rss_bytes},
    scenario::{FaultKind, Scenario, Tier},
};

/// How long the nodes may take to find each other before a trial's faults start.
const FORMATION_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug)]
enum Seen {
    Advert { at: Instant, observer: usize, id: String, seq: u64 },
    Health { at: Instant, observer: usize, id: String, health: String },
}

struct Node {
    handle: NodeHandle,
    task: JoinHandle<()>,
    alive: bool,
    dir: tempfile::TempDir,
}

struct Cluster<'a> {
    s: &'a Scenario,
    seed: u64,
    nodes: Vec<Option<Node>>,
    seen_tx: mpsc::UnboundedSender<Seen>,
    seen: mpsc::UnboundedReceiver<Seen>,
    bootstrap: Vec<String>,
    cancel: CancellationToken,
}

/// Runs every trial of a stack-tier scenario.
pub fn run(s: &Scenario, seed: u64, progress: &mut dyn FnMut(usize)) -> Result<Report, String> {
    for f in &s.faults {
        if matches!(f.kind, FaultKind::Isolate | FaultKind::Partition | FaultKind::Heal) {
            return Err(format!("{}: silent faults need the virtual or lan tier", f.describe()));
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut all = Measures::default();
    for trial in 0..s.trials {
        all.merge(runtime.block_on(run_trial(s, seed.wrapping_add(trial as u64)))?);
        progress(trial + 1);
    }
    let link = format!(
        "loopback TCP (libp2p), heartbeat {} ms, suspect {} ms, down {} ms",
        s.protocol.heartbeat_interval_ms, s.protocol.suspect_after_ms, s.protocol.down_after_ms
    );
    Ok(Report::build(s, seed, Tier::Stack, link, all))
}

async fn run_trial(s: &Scenario, seed: u64) -> Result<Measures, String> {
    let rss_before = rss_bytes(None);
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let mut cluster = Cluster {
        s,
        seed,
        nodes: Vec::new(),
        seen_tx,
        seen,
        bootstrap: Vec::new(),
        cancel: CancellationToken::new(),
    };
    let started = Instant::now();
    for i in 0..s.nodes {
        let node = cluster.start(i, None).await?;
        if i == 0 {
            cluster.bootstrap = node.handle.snapshot().network.listen.clone();
        }
        cluster.nodes.push(Some(node));
    }
    let all_started = started.elapsed();
    cluster.formed().await?;
    let formation = started.elapsed().as_secs_f64() * 1000.0;
    tracing::info!(started_ms = all_started.as_secs_f64() * 1000.0, "all nodes started");
    let peers: Vec<usize> = cluster
        .nodes
        .iter()
        .flatten()
        .map(|n| n.handle.snapshot().network.connected_peers)
        .collect();
    tracing::info!(?peers, formation_ms = formation, "formed; connections per node");
    let rss_after = rss_bytes(None);
    let mut m = Measures {
        rss: vec![rss_after.saturating_sub(rss_before) / s.nodes as u64],
        formation: vec![formation],
        ..Measures::default()
    };
    while cluster.seen.try_recv().is_ok() {}
    // Decisions while measuring: of the nodes' lives that ended (crashes), and of the ones
    // running at the end since measuring began (or since they restarted).
    let mut decisions = Counters::default();
    let mut counted_from: Vec<Counters> =
        cluster.nodes.iter().flatten().map(|n| n.handle.snapshot().counters).collect();

    let start = Instant::now();
    let end = start + Duration::from_secs_f64(s.duration_secs);
    let mut faults = s.schedule().into_iter().peekable();
    // (origin, seq, since, who has it)
    let mut watches: Vec<(usize, u64, Instant, BTreeSet<usize>)> = Vec::new();
    let mut gone: BTreeMap<usize, Instant> = BTreeMap::new();
    let mut detected = BTreeSet::new();
    let mut downed = BTreeSet::new();
    loop {
        let next_fault = faults.peek().map(|f| start + Duration::from_secs_f64(f.at_secs));
        let wake = next_fault.unwrap_or(end).min(end);
        tokio::select! {
            () = tokio::time::sleep_until(wake.into()) => {
                if Instant::now() >= end {
                    break;
                }
                if let Some(fault) = faults.next() {
                    let node = fault.node.unwrap_or(0);
                    match fault.kind {
                        FaultKind::Advert => {
                            if let Some(n) = &cluster.nodes[node] {
                                let role = if n.handle.snapshot().hierarchy.role.as_str() == "edge" { "regional" } else { "edge" };
                                n.handle.set_role(role).await.map_err(|e| e.to_string())?;
                                let seq = n.handle.snapshot().nodes.get(format!("n{node}").as_str()).map_or(0, |r| r.advert.seq);
                                watches.push((node, seq, Instant::now(), BTreeSet::from([node])));
                            }
                        }
                        FaultKind::Crash => {
                            if let Some(n) = cluster.nodes[node].as_mut().filter(|n| n.alive) {
                                // Dropping the actor drops its swarm: its sockets close, as
                                // when a process dies. No leave is sent.
                                n.task.abort();
                                n.alive = false;
                                decisions = decisions + n.handle.snapshot().counters.since(counted_from[node]);
                                gone.insert(node, Instant::now());
                            }
                        }
                        FaultKind::Restart => {
                            let dir = cluster.nodes[node].take().map(|n| n.dir);
                            let restarted = cluster.start(node, dir).await?;
                            counted_from[node] = Counters::default();
                            let seq = restarted.handle.snapshot().nodes.get(format!("n{node}").as_str()).map_or(0, |r| r.advert.seq);
                            cluster.nodes[node] = Some(restarted);
                            gone.remove(&node);
                            watches.push((node, seq, Instant::now(), BTreeSet::from([node])));
                        }
                        FaultKind::Isolate | FaultKind::Partition | FaultKind::Heal => {}
                    }
                }
            }
            Some(seen) = cluster.seen.recv() => match seen {
                Seen::Advert { at, observer, id, seq } => {
                    for (origin, want, since, have) in &mut watches {
                        if id == format!("n{origin}") && seq >= *want && have.insert(observer) {
                            m.convergence.push(at.duration_since(*since).as_secs_f64() * 1000.0);
                        }
                    }
                }
                Seen::Health { at, observer, id, health } => {
                    let Some(target) = id.strip_prefix('n').and_then(|x| x.parse::<usize>().ok()) else { continue };
                    if health == "ok" {
                        continue;
                    }
                    if let Some(since) = gone.get(&target) {
                        let ms = at.duration_since(*since).as_secs_f64() * 1000.0;
                        if detected.insert((observer, target)) {
                            m.detection.push(ms);
                        }
                        if health == "down" && downed.insert((observer, target)) {
                            m.down.push(ms);
                        }
                    } else if cluster.is_alive(target) && cluster.is_alive(observer) {
                        match health.as_str() {
                            "down" => m.false_positives += 1,
                            "suspect" => m.false_suspects += 1,
                            _ => {}
                        }
                    }
                }
            },
        }
    }
    for (origin, _, _, have) in &watches {
        m.missed += (0..s.nodes)
            .filter(|j| j != origin && cluster.is_alive(*j) && !have.contains(j))
            .count();
    }
    for (node, from) in cluster.nodes.iter().zip(&counted_from) {
        if let Some(node) = node.as_ref().filter(|n| n.alive) {
            decisions = decisions + node.handle.snapshot().counters.since(*from);
        }
    }
    m.decisions = Some(decisions);
    cluster.cancel.cancel();
    for node in cluster.nodes.iter_mut().flatten() {
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut node.task).await;
    }
    Ok(m)
}

impl Cluster<'_> {
    async fn start(&self, i: usize, dir: Option<tempfile::TempDir>) -> Result<Node, String> {
        let dir = match dir {
            Some(dir) => dir,
            None => tempfile::tempdir().map_err(|e| e.to_string())?,
        };
        let secret: [u8; 32] = sha2::Digest::finalize(sha2::Digest::chain_update(
            <sha2::Sha256 as sha2::Digest>::new(),
            format!("{}/{i}", self.seed),
        ))
        .into();
        let key = NodeKey::from_secret(secret);
        tracing::debug!(node = i, peer = %key.peer_id(), "starting");
        let p = &self.s.protocol;
        let mut config = NodeConfig::new(key.clone(), "stack", dir.path().to_path_buf());
        let id = NodeId::parse(&format!("n{i}")).map_err(|e| e.to_string())?;
        config.explicit_id = Some((id, IdSource::Config));
        let bootstrap = self.bootstrap.iter().filter_map(|a| a.parse().ok()).collect();
        let mut federation = FederationConfig::loopback(
            "stack",
            bootstrap,
            Duration::from_millis(p.heartbeat_interval_ms),
        );
        federation.membership.heartbeat_interval_ms = p.heartbeat_interval_ms;
        federation.membership.suspect_after_ms = p.suspect_after_ms;
        federation.membership.down_after_ms = p.down_after_ms;
        config.federation = Some(federation);
        let (events, mut rx) = EventTx::channel(4096);
        let (handle, task) = node::spawn(config, events, self.cancel.child_token())
            .await
            .map_err(|e| e.to_string())?;
        let tx = self.seen_tx.clone();
        tokio::spawn(async move {
            while let Some(emit) = rx.recv().await {
                let at = Instant::now();
                let seen = match emit.event() {
                    Some(Event::NodeAdvertise(a)) => Seen::Advert {
                        at,
                        observer: i,
                        id: a.advert.id.to_string(),
                        seq: a.advert.seq,
                    },
                    Some(Event::NodeChanged(c)) if c.previous_health.is_some() => Seen::Health {
                        at,
                        observer: i,
                        id: c.node.id,
                        health: c.node.health.unwrap_or_default(),
                    },
                    _ => continue,
                };
                if tx.send(seen).is_err() {
                    break;
                }
            }
        });
        Ok(Node { handle, task, alive: true, dir })
    }

    /// Waits until every node sees every node `ok`; says how far formation got when it does
    /// not within [`FORMATION_LIMIT`].
    async fn formed(&self) -> Result<(), String> {
        let n = self.s.nodes;
        let deadline = tokio::time::Instant::now() + FORMATION_LIMIT;
        let ok_count = |snap: &arw_p2p::node::Snapshot| {
            snap.nodes.values().filter(|r| r.health == arw_p2p::cluster::Health::Ok).count()
        };
        for node in self.nodes.iter().flatten() {
            let mut rx = node.handle.watch();
            let waited = tokio::time::timeout_at(deadline, rx.wait_for(|s| ok_count(s) == n)).await;
            if waited.is_err() {
                let seen: Vec<usize> =
                    self.nodes.iter().flatten().map(|n| ok_count(&n.handle.snapshot())).collect();
                let peers: Vec<usize> = self
                    .nodes
                    .iter()
                    .flatten()
                    .map(|n| n.handle.snapshot().network.connected_peers)
                    .collect();
                return Err(format!(
                    "the {n} nodes did not find each other within {FORMATION_LIMIT:?} (nodes each sees ok: min {}, max {}; connections: min {}, max {})",
                    seen.iter().min().unwrap_or(&0),
                    seen.iter().max().unwrap_or(&0),
                    peers.iter().min().unwrap_or(&0),
                    peers.iter().max().unwrap_or(&0),
                ));
            }
        }
        Ok(())
    }

    fn is_alive(&self, i: usize) -> bool {
        self.nodes[i].as_ref().is_some_and(|n| n.alive)
    }
}
