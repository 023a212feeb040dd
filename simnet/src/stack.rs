//! The stack tier: real node actors (libp2p swarm, gossipsub, sync, membership, timers) in this
//! process over loopback TCP. Node 0 starts first; the others bootstrap to it. Measures come from
//! the events each node emits, timestamped on arrival. Crashes abort a node's task (its sockets
//! close, as when a process dies); silent faults (isolate, partition) need the virtual or lan tier.
//! With `[jobs]`, node 0 becomes the Home and each node's executor is a timer that finishes a
//! run after its `run_ms`, through the node's own handle, as the daemon's executor does.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::{Duration, Instant},
};

use tokio::{sync::mpsc, task::JoinHandle, time::Instant as TokioInstant};
use tokio_util::sync::CancellationToken;

use arw_p2p::{
    core::Counters,
    events::{Event, EventTx},
    identity::NodeKey,
    jobs::{Exec, Finished, Run},
    node::{self, FederationConfig, NodeConfig, NodeHandle},
    node_id::{IdSource, NodeId},
};

use crate::{
    jobs::JobBook,
    report::{Measures, Report, rss_bytes},
    scenario::{FaultKind, Scenario, Tier},
};

/// How long the nodes may take to find each other before a trial's faults start.
const FORMATION_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug)]
enum Seen {
    Advert {
        at: Instant,
        observer: usize,
        id: String,
        seq: u64,
    },
    Health {
        at: Instant,
        observer: usize,
        id: String,
        health: String,
    },
    /// One of the Home's job events.
    Job {
        at: Instant,
        event: Box<Event>,
    },
    /// A node's executor started a run.
    RunStarted {
        node: usize,
        run: Box<Run>,
    },
    /// A node's executor finished or stopped a run.
    RunEnded {
        node: usize,
        job: String,
        fence: u64,
    },
}

struct Node {
    handle: NodeHandle,
    task: JoinHandle<()>,
    /// Stops the node's runs when it crashes.
    runs: CancellationToken,
    alive: bool,
    dir: tempfile::TempDir,
}

/// The jobs of a trial with `[jobs]`.
struct Jobs {
    book: JobBook,
    /// Distinct jobs handed to the Home so far.
    sent: usize,
    rng: ChaCha8Rng,
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

    let mut jobs = if s.jobs.count > 0 {
        cluster.make_home().await?;
        Some(Jobs {
            book: JobBook::new(1..=s.jobs.gpu_workers),
            sent: 0,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    } else {
        None
    };
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(s.duration_secs);
    let us = |at: Instant| at.saturating_duration_since(start).as_micros() as u64;
    let mut submit_at = jobs.as_ref().map(|_| start + Duration::from_secs_f64(s.jobs.start_secs));
    let mut faults = s.schedule().into_iter().peekable();
    // (origin, seq, since, who has it)
    let mut watches: Vec<(usize, u64, Instant, BTreeSet<usize>)> = Vec::new();
    let mut gone: BTreeMap<usize, Instant> = BTreeMap::new();
    let mut detected = BTreeSet::new();
    let mut downed = BTreeSet::new();
    loop {
        let next_fault = faults.peek().map(|f| start + Duration::from_secs_f64(f.at_secs));
        let wake = [next_fault, submit_at].into_iter().flatten().fold(end, Instant::min);
        tokio::select! {
            () = tokio::time::sleep_until(TokioInstant::from_std(wake)) => {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                if let (Some(at), Some(jobs)) = (submit_at, jobs.as_mut())
                    && at <= now
                {
                    submit_at = cluster.submit(jobs, at).await;
                    continue;
                }
                if let Some(fault) = faults.next_if(|_| next_fault.is_some_and(|at| at <= now)) {
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
                                n.runs.cancel();
                                n.alive = false;
                                if let Some(jobs) = jobs.as_mut() {
                                    jobs.book.crash(node, us(Instant::now()));
                                }
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
                Seen::Job { at, event } => {
                    if let Some(jobs) = jobs.as_mut() {
                        jobs.book.event(&event, us(at));
                    }
                }
                Seen::RunStarted { node, run } => {
                    if let Some(jobs) = jobs.as_mut().filter(|_| cluster.is_alive(node)) {
                        jobs.book.start(node, &run);
                    }
                }
                Seen::RunEnded { node, job, fence } => {
                    if let Some(jobs) = jobs.as_mut() {
                        jobs.book.ended(node, &job, fence);
                    }
                }
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
    m.jobs = jobs.map(|j| j.book.finish());
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
        let key = node_key(self.seed, i);
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
        let jobs = &self.s.jobs;
        let (exec_tx, exec_rx) = mpsc::unbounded_channel();
        if jobs.count > 0 {
            let home_key = node_key(self.seed, 0).verifying_key().to_bytes();
            crate::jobs::configure(&mut config, i, jobs, home_key);
            config.executor = Some(exec_tx);
        }
        let (events, mut rx) = EventTx::channel(4096);
        let (handle, task) = node::spawn(config, events, self.cancel.child_token())
            .await
            .map_err(|e| e.to_string())?;
        let runs = self.cancel.child_token();
        if jobs.count > 0 {
            let executor = Executor {
                node: i,
                handle: handle.clone(),
                stop: runs.clone(),
                seen: self.seen_tx.clone(),
                run_ms: jobs.run_ms,
            };
            tokio::spawn(executor.run(exec_rx, self.seed));
        }
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
                    Some(
                        event @ (Event::ActionSubmitted(_)
                        | Event::ActionRunning(_)
                        | Event::ActionCompleted(_)
                        | Event::ActionFailed(_)
                        | Event::JobReassigned(_)),
                    ) if i == 0 => Seen::Job { at, event: Box::new(event) },
                    _ => continue,
                };
                if tx.send(seen).is_err() {
                    break;
                }
            }
        });
        Ok(Node { handle, task, runs, alive: true, dir })
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

    /// Makes node 0 the Home and has it admit every other node, as an operator would.
    async fn make_home(&self) -> Result<(), String> {
        let home = &self.nodes[0].as_ref().ok_or("node 0 is not running")?.handle;
        home.set_role("home").await.map_err(|e| e.to_string())?;
        for i in 1..self.s.nodes {
            home.admit(&format!("n{i}"), None).await.map_err(|e| format!("admit n{i}: {e}"))?;
        }
        Ok(())
    }

    /// Hands the Home the next job (and any resubmissions) if it is up; says when the next is
    /// due, if any.
    async fn submit(&self, jobs: &mut Jobs, at: Instant) -> Option<Instant> {
        let j = &self.s.jobs;
        let Some(home) = self.nodes[0].as_ref().filter(|n| n.alive) else {
            // The operator waits for the Home to come back.
            return Some(at + Duration::from_millis(500));
        };
        let mut sends = vec![(jobs.sent, false)];
        for _ in 0..j.resubmit.min(jobs.sent) {
            sends.push((jobs.rng.random_range(0..jobs.sent), true));
        }
        jobs.sent += 1;
        for (n, repeat) in sends {
            match home.handle.submit_job(crate::jobs::spec(j, n)).await {
                Ok(_) => jobs.book.sent(repeat),
                Err(e) => tracing::warn!(job = n, error = %e, "submission refused"),
            }
        }
        (jobs.sent < j.count).then(|| at + Duration::from_millis(j.every_ms))
    }

    fn is_alive(&self, i: usize) -> bool {
        self.nodes[i].as_ref().is_some_and(|n| n.alive)
    }
}

/// Node `i`'s key in a trial with `seed` (the same on every restart).
fn node_key(seed: u64, i: usize) -> NodeKey {
    let secret: [u8; 32] = sha2::Digest::finalize(sha2::Digest::chain_update(
        <sha2::Sha256 as sha2::Digest>::new(),
        format!("{seed}/{i}"),
    ))
    .into();
    NodeKey::from_secret(secret)
}

/// A node's executor: each run takes `run_ms` (uniform), then is reported to the node as the
/// daemon's executor reports it. A crash (`stop`) ends every run unreported.
struct Executor {
    node: usize,
    handle: NodeHandle,
    stop: CancellationToken,
    seen: mpsc::UnboundedSender<Seen>,
    run_ms: [u64; 2],
}

impl Executor {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Exec>, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (self.node as u64) << 32);
        let mut running: HashMap<(String, u64), CancellationToken> = HashMap::new();
        loop {
            let exec = tokio::select! {
                () = self.stop.cancelled() => break,
                exec = rx.recv() => match exec {
                    Some(exec) => exec,
                    None => break,
                },
            };
            running.retain(|_, run| !run.is_cancelled());
            match exec {
                Exec::Run(run) => {
                    let [lo, hi] = self.run_ms;
                    let took = Duration::from_millis(rng.random_range(lo..=hi));
                    let token = self.stop.child_token();
                    running.insert((run.job_id.clone(), run.fence), token.clone());
                    let (job_id, fence) = (run.job_id.clone(), run.fence);
                    let _ =
                        self.seen.send(Seen::RunStarted { node: self.node, run: Box::new(run) });
                    let (node, handle, seen) = (self.node, self.handle.clone(), self.seen.clone());
                    tokio::spawn(async move {
                        let started_ms = arw_p2p::time::now_ms();
                        tokio::select! {
                            () = token.cancelled() => return,
                            () = tokio::time::sleep(took) => {}
                        }
                        token.cancel();
                        let _ = seen.send(Seen::RunEnded { node, job: job_id.clone(), fence });
                        let done = Finished {
                            job_id,
                            fence,
                            ok: true,
                            output: serde_json::Value::Null,
                            started_ms,
                            finished_ms: arw_p2p::time::now_ms(),
                            fault: None,
                            cpu_ms: None,
                        };
                        let _ = handle.job_finished(done).await;
                    });
                }
                Exec::Abort { job_id, fence } => {
                    if let Some(run) = running.remove(&(job_id.clone(), fence)) {
                        run.cancel();
                    }
                    let _ = self.seen.send(Seen::RunEnded { node: self.node, job: job_id, fence });
                }
            }
        }
    }
}
