//! The virtual tier: the daemon's own node core ([`NodeCore`]) on a simulated network,
//! single-threaded, in virtual time, driven by a seeded RNG. Same scenario and seed → the same
//! report. This file only carries out the core's effects; every decision (when to sync, probe,
//! suspect, reset, redial, re-advertise) is the core's, exactly as in `arw-server`.
//!
//! Network model:
//! - Mesh (`observers > 0`): each node starts connected to a random overlay of about
//!   `link.degree` neighbours (plus a ring, so the graph is connected). A node forwards a gossip
//!   message over its connections only when its core accepted it, and drops copies it has seen
//!   before without looking at them, as gossipsub's duplicate cache does. Requests (syncs,
//!   probes) reach any live node they are not cut off from, as libp2p dials on demand. A reset
//!   closes a connection (the other end sees it close, if it can); a redial opens it again if
//!   the node is reachable.
//! - Broker (`observers = 0`, the NATS bus): every message reaches every other node once.
//! - Links: one-way latency fixed or uniform; messages ride TCP, so a lost transmission attempt
//!   (probability `link.loss`) costs a retransmission timeout (200 ms, doubling up to 3.2 s)
//!   instead of the message.
//! - Faults: a crash closes its connections (their other ends see it after one latency);
//!   isolation and partitions drop traffic silently; a restart boots a new core from what the
//!   old one wrote to its (simulated) disk; an advert fault changes the node's role through the
//!   same command an operator would send.
//! - Writes complete at once. Envelopes are opened once per unique message (opening is a pure
//!   function of the bytes) and handed to every core already opened.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque},
    rc::Rc,
    time::Duration,
};

use arw_p2p::{
    PeerId,
    admission::Roster,
    capsule::CapsuleSet,
    cluster::Health,
    core::{
        BusConfig, Command, CommandId, Counters, Effect, FederationConfig, Input, NodeConfig,
        NodeCore, ReplyTo, Restored, Write,
    },
    events::Event,
    governor::Governor,
    hierarchy::Hierarchy,
    identity::NodeKey,
    membership::StoredMember,
    nats::NatsConfig,
    net::NetConfig,
    node_id::{IdSource, NodeId},
    policy::StoredPolicy,
    protocol::{SyncRequest, SyncResponse},
    transport::Inbound,
    wire::{self, Opened, Reason},
};
use libp2p::gossipsub::MessageId;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::{
    report::{Measures, Report},
    scenario::{Fault, FaultKind, Latency, Scenario, Tier},
};

/// Virtual wall clock at time zero (ms since the epoch), so expiry checks see realistic dates.
const EPOCH_MS: u64 = 1_800_000_000_000;
const SEEN_FOR_US: u64 = 120_000_000;
const WORKSPACE: &str = "sim";

type MsgId = [u8; 32];

#[derive(Debug)]
enum Step {
    Deliver {
        to: usize,
        from: usize,
        id: MsgId,
        bytes: Rc<[u8]>,
    },
    Request {
        to: usize,
        from: usize,
        request: Rc<SyncRequest>,
    },
    Answer {
        to: usize,
        from: usize,
        response: Rc<SyncResponse>,
    },
    Transport {
        to: usize,
        about: usize,
        up: bool,
    },
    Wake {
        node: usize,
        life: u32,
        at: u64,
    },
    Unreachable {
        node: usize,
        about: usize,
    },
    Boot(usize),
    Mark,
    Fault(usize),
    /// A dispatch envelope (jobs) arrives.
    JobDeliver {
        to: usize,
        from: usize,
        bytes: Rc<[u8]>,
    },
    /// A run ends on `node` (if it is still in progress there).
    JobDone {
        node: usize,
        life: u32,
        job: String,
        fence: u64,
        /// When it started (ms).
        started_ms: u64,
    },
    /// A dispatch envelope to `about` could not be delivered (nobody listens there).
    JobUndelivered {
        node: usize,
        about: usize,
    },
    /// The Home admits its workers, then is handed the next job.
    JobsTick,
}

#[derive(Debug)]
struct Queued {
    at: u64,
    order: u64,
    event: Step,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(other.at, other.order))
    }
}

/// What a node's core wrote, as a disk would keep it (the registry's rows only when the
/// scenario restarts nodes: a thousand nodes' registries would not fit in memory twice).
#[derive(Debug, Default)]
struct Disk {
    keep_members: bool,
    hierarchy: Hierarchy,
    self_seq: u64,
    members: BTreeMap<NodeId, StoredMember>,
    roster: Roster,
    policy: StoredPolicy,
    governor: Governor,
    capsules: serde_json::Value,
    jobs: BTreeMap<String, arw_p2p::jobs::JobRecord>,
}

impl Disk {
    fn write(&mut self, write: Write) {
        match write {
            Write::Hierarchy(h) => self.hierarchy = h,
            Write::Registry { self_seq, upsert, remove } => {
                self.self_seq = self.self_seq.max(self_seq);
                if !self.keep_members {
                    return;
                }
                for member in upsert {
                    self.members.insert(member.record.advert.id.clone(), member);
                }
                for id in remove {
                    self.members.remove(&id);
                }
            }
            Write::Roster(r) => self.roster = r,
            Write::Policy(p) => self.policy = p,
            Write::Capsules(c) => self.capsules = c,
            Write::Governor(g) => self.governor = g,
            Write::Job(record) => {
                self.jobs.insert(record.id.clone(), *record);
            }
        }
    }

    fn restored(&self, now_ms: u64) -> Restored {
        let (capsules, _) = CapsuleSet::restore(self.capsules.clone(), now_ms).unwrap_or_default();
        Restored {
            hierarchy: self.hierarchy.clone(),
            registry: arw_p2p::core::ClusterStore {
                self_seq: self.self_seq,
                nodes: self.members.values().cloned().collect(),
            },
            roster: self.roster.clone(),
            policy: self.policy.clone(),
            governor: self.governor.clone(),
            capsules,
            trust: Default::default(),
            jobs: arw_p2p::jobs::StoredJobs {
                fence: self.jobs.values().map(|j| j.fence).max().unwrap_or(0),
                rev: self.jobs.values().map(|j| j.rev).max().unwrap_or(0),
                records: self.jobs.values().cloned().collect(),
            },
        }
    }
}

struct Node {
    core: NodeCore,
    config: NodeConfig,
    peer: PeerId,
    disk: Disk,
    id: NodeId,
    alive: bool,
    /// Bumped on crash and restart, so timers of a past life are ignored.
    life: u32,
    /// Open connections (gossip travels over them).
    links: BTreeSet<usize>,
    /// The overlay this node connects to when it boots.
    neighbours: Vec<usize>,
    seen: HashSet<MsgId>,
    seen_order: VecDeque<(u64, MsgId)>,
    /// The wake time the core asked for (virtual µs).
    wake: Option<u64>,
    /// Counters when traffic counting began.
    counted_from: Counters,
}

/// An advert being watched: who signed it, from which seq, since when, who has it.
struct Watch {
    origin: usize,
    seq: u64,
    since: u64,
    have: Vec<bool>,
}

/// The message being handled, so an accept verdict can forward it.
struct Gossip {
    from: usize,
    id: MsgId,
    bytes: Rc<[u8]>,
}

struct Trial<'a> {
    s: &'a Scenario,
    rng: ChaCha8Rng,
    now: u64,
    order: u64,
    queue: BinaryHeap<Reverse<Queued>>,
    nodes: Vec<Node>,
    by_peer: HashMap<PeerId, usize>,
    broker: bool,
    side: Option<Vec<bool>>,
    isolated: Vec<bool>,
    opened: HashMap<MsgId, Result<Opened, Reason>>,
    faults: Vec<Fault>,
    watches: Vec<Watch>,
    /// Target → since when it is gone (crash or isolation).
    gone: BTreeMap<usize, u64>,
    detected: HashSet<(usize, usize)>,
    downed: HashSet<(usize, usize)>,
    heal_since: Option<u64>,
    healed: Vec<bool>,
    /// The partition and isolations just before the last heal.
    cut_before_heal: (Option<Vec<bool>>, Vec<bool>),
    commands: u64,
    /// Decisions of node lives that ended (restarts), while traffic was counted.
    decided: Counters,
    /// Jobs (scenarios with `[jobs]`).
    jobs: Option<crate::jobs::JobBook>,
    /// Jobs handed to the Home so far.
    jobs_sent: usize,
    /// Every worker is admitted.
    admitted: bool,
    m: Measures,
}

/// Runs every trial of a virtual-tier scenario with base seed `seed`; `progress` is told each
/// finished trial.
pub fn run(s: &Scenario, seed: u64, progress: &mut dyn FnMut(usize)) -> Report {
    let mut all = Measures { traffic: Some((0, 0)), ..Measures::default() };
    for trial in 0..s.trials {
        all.merge(Trial::new(s, seed.wrapping_add(trial as u64)).run());
        progress(trial + 1);
    }
    Report::build(s, seed, Tier::Virtual, describe_link(s), all)
}

/// The link model in words, for reports.
pub fn describe_link(s: &Scenario) -> String {
    let latency = match s.link.latency_ms {
        Latency::Fixed(ms) => format!("{ms} ms"),
        Latency::Range([a, b]) => format!("{a}–{b} ms"),
    };
    let p = &s.protocol;
    let bus = if p.observers == 0 {
        "broker (broadcast heartbeats)".to_owned()
    } else {
        format!("mesh of degree {} ({} watchers per node)", s.link.degree, p.observers)
    };
    format!(
        "latency {latency}, loss {:.0} %, {bus}, heartbeat {} ms, suspect {} ms, down {} ms",
        s.link.loss * 100.0,
        p.heartbeat_interval_ms,
        p.suspect_after_ms,
        p.down_after_ms
    )
}

/// The configuration of simulated node `i`: the daemon's, with the scenario's timings.
fn node_config(s: &Scenario, key: NodeKey, id: NodeId) -> NodeConfig {
    let p = &s.protocol;
    let mut config = NodeConfig::new(key, WORKSPACE, std::path::PathBuf::new());
    config.explicit_id = Some((id, IdSource::Config));
    config.advertise_interval = Duration::from_secs(p.advertise_interval_secs.max(1));
    let bus = if p.observers == 0 {
        BusConfig::Nats(NatsConfig {
            url: "nats://simulated".into(),
            tls: false,
            user: None,
            pass: None,
            connect_retries: 0,
            connect_backoff: Duration::ZERO,
            name: "sim".into(),
        })
    } else {
        BusConfig::Libp2p(NetConfig {
            workspace: WORKSPACE.into(),
            listen: Vec::new(),
            bootstrap: Vec::new(),
            mdns: false,
        })
    };
    let mut federation = FederationConfig {
        bus,
        heartbeat_interval: Duration::from_millis(p.heartbeat_interval_ms),
        membership: arw_p2p::membership::MembershipConfig::new(WORKSPACE),
    };
    let m = &mut federation.membership;
    m.heartbeat_interval_ms = p.heartbeat_interval_ms;
    m.suspect_after_ms = p.suspect_after_ms;
    m.down_after_ms = p.down_after_ms;
    m.beat_max_age_ms = m.beat_max_age_ms.max(2 * p.down_after_ms);
    m.observers = (p.observers > 0).then_some(p.observers);
    config.federation = Some(federation);
    config
}

impl<'a> Trial<'a> {
    fn new(s: &'a Scenario, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = s.nodes;
        let mut neighbours: Vec<Vec<usize>> = vec![Vec::new(); n];
        let link = |a: usize, b: usize, nb: &mut Vec<Vec<usize>>| {
            if a != b && !nb[a].contains(&b) {
                nb[a].push(b);
                nb[b].push(a);
            }
        };
        for i in 0..n {
            link(i, (i + 1) % n, &mut neighbours);
        }
        for i in 0..n {
            let mut tries = 0;
            while neighbours[i].len() < s.link.degree.min(n - 1) && tries < 100 {
                let j = rng.random_range(0..n);
                link(i, j, &mut neighbours);
                tries += 1;
            }
        }
        let mut by_peer = HashMap::new();
        let secret =
            |i: usize| -> [u8; 32] { Sha256::digest(format!("{seed}/{i}").as_bytes()).into() };
        let home_key = NodeKey::from_secret(secret(0)).verifying_key().to_bytes();
        let with_jobs = s.jobs.count > 0;
        let nodes = neighbours
            .into_iter()
            .enumerate()
            .map(|(i, neighbours)| {
                let key = NodeKey::from_secret(secret(i));
                by_peer.insert(key.peer_id(), i);
                let id = NodeId::parse(&format!("n{i}"))
                    .unwrap_or_else(|_| unreachable!("n<digits> is a valid id"));
                let mut config = node_config(s, key, id.clone());
                if with_jobs {
                    crate::jobs::configure(&mut config, i, &s.jobs, home_key);
                }
                let keep_members = s.faults.iter().any(|f| f.kind == FaultKind::Restart);
                Node {
                    peer: config.key.peer_id(),
                    core: NodeCore::new(&config, Restored::default()),
                    config,
                    disk: Disk { keep_members, ..Disk::default() },
                    id,
                    alive: true,
                    life: 0,
                    links: BTreeSet::new(),
                    neighbours,
                    seen: HashSet::new(),
                    seen_order: VecDeque::new(),
                    wake: None,
                    counted_from: Counters::default(),
                }
            })
            .collect();
        let mut trial = Self {
            s,
            rng,
            now: 0,
            order: 0,
            queue: BinaryHeap::new(),
            nodes,
            by_peer,
            broker: s.protocol.observers == 0,
            side: None,
            isolated: vec![false; n],
            opened: HashMap::new(),
            faults: s.schedule(),
            watches: Vec::new(),
            gone: BTreeMap::new(),
            detected: HashSet::new(),
            downed: HashSet::new(),
            heal_since: None,
            healed: vec![false; n],
            cut_before_heal: (None, vec![false; n]),
            commands: 0,
            decided: Counters::default(),
            jobs: with_jobs.then(|| crate::jobs::JobBook::new(1..=s.jobs.gpu_workers)),
            jobs_sent: 0,
            admitted: false,
            m: Measures::default(),
        };
        if with_jobs {
            // The Home admits once everyone has advertised; jobs start at start_secs.
            trial.schedule(1_000_000, Step::JobsTick);
        }
        for i in 0..trial.faults.len() {
            let at = (trial.faults[i].at_secs * 1e6) as u64;
            trial.schedule(at, Step::Fault(i));
        }
        trial.schedule((s.traffic_after_secs * 1e6) as u64, Step::Mark);
        for i in 0..n {
            let start = trial.rng.random_range(0..100_000);
            trial.schedule(start, Step::Boot(i));
        }
        trial
    }

    fn schedule(&mut self, at: u64, event: Step) {
        self.order += 1;
        self.queue.push(Reverse(Queued { at, order: self.order, event }));
    }

    fn now_ms(&self) -> u64 {
        EPOCH_MS + self.now / 1000
    }

    fn cut(&self, a: usize, b: usize) -> bool {
        self.isolated[a]
            || self.isolated[b]
            || self.side.as_ref().is_some_and(|side| side[a] != side[b])
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.nodes[b].alive && !self.cut(a, b)
    }

    /// One-way delay for a transmission: latency plus TCP retransmissions.
    fn delay(&mut self) -> u64 {
        let latency_ms = match self.s.link.latency_ms {
            Latency::Fixed(ms) => ms,
            Latency::Range([lo, hi]) if hi > lo => self.rng.random_range(lo..hi),
            Latency::Range([lo, _]) => lo,
        };
        let mut delay = (latency_ms * 1000.0) as u64;
        let mut rto = 200_000;
        while self.s.link.loss > 0.0 && self.rng.random_bool(self.s.link.loss) {
            delay += rto;
            rto = (rto * 2).min(3_200_000);
        }
        delay
    }

    fn send(&mut self, from: usize, to: usize, event: Step) {
        if self.cut(from, to) {
            return;
        }
        let at = self.now + self.delay();
        self.schedule(at, event);
    }

    /// Sends `bytes` from `from`: its own message to every connection (gossipsub publishes to
    /// every connected peer of the topic), a forwarded one only along the mesh (the overlay
    /// links still connected); over the broker, to everyone.
    fn gossip(&mut self, from: usize, id: MsgId, bytes: Rc<[u8]>, except: Option<usize>) {
        let n = &self.nodes[from];
        let targets: Vec<usize> = if self.broker {
            (0..self.nodes.len()).filter(|&j| j != from).collect()
        } else if except.is_none() {
            n.links.iter().copied().collect()
        } else {
            n.neighbours.iter().copied().filter(|j| n.links.contains(j)).collect()
        };
        for to in targets {
            if Some(to) != except {
                self.send(from, to, Step::Deliver { to, from, id, bytes: bytes.clone() });
            }
        }
    }

    fn remember(&mut self, node: usize, id: MsgId) -> bool {
        let now = self.now;
        let n = &mut self.nodes[node];
        while n.seen_order.front().is_some_and(|(t, _)| now.saturating_sub(*t) > SEEN_FOR_US) {
            if let Some((_, old)) = n.seen_order.pop_front() {
                n.seen.remove(&old);
            }
        }
        if n.seen.insert(id) {
            n.seen_order.push_back((now, id));
            true
        } else {
            false
        }
    }

    /// Hands `input` to node `i`'s core and carries out the effects. `gossip` is the message
    /// being validated, if any.
    fn input(&mut self, i: usize, input: Input, gossip: Option<&Gossip>) {
        let now_ms = self.now_ms();
        let effects = self.nodes[i].core.handle(input, now_ms);
        let mut queue: VecDeque<Effect> = effects.into();
        while let Some(effect) = queue.pop_front() {
            match effect {
                Effect::Publish(bytes) => {
                    let id: MsgId = Sha256::digest(&bytes).into();
                    self.remember(i, id);
                    self.gossip(i, id, bytes.into(), None);
                }
                Effect::Validate { verdict, .. } => {
                    if let (arw_p2p::membership::Verdict::Accept, Some(g)) = (verdict, gossip)
                        && !self.broker
                    {
                        self.gossip(i, g.id, g.bytes.clone(), Some(g.from));
                    }
                }
                Effect::Request { peer, request } => {
                    let request = Rc::new(request);
                    let targets: Vec<usize> = match peer {
                        Some(peer) => self.by_peer.get(&peer).copied().into_iter().collect(),
                        None => (0..self.nodes.len()).filter(|&j| j != i).collect(),
                    };
                    for to in targets {
                        if !self.nodes[to].alive && !self.cut(i, to) && !self.broker {
                            // Nobody listens there any more: the dial is refused.
                            let at = self.now + 2 * self.delay();
                            self.schedule(at, Step::Unreachable { node: i, about: to });
                            continue;
                        }
                        if !self.broker
                            && !self.nodes[i].links.contains(&to)
                            && self.reachable(i, to)
                        {
                            // libp2p dials a peer it has no connection to.
                            self.connect(i, to);
                        }
                        let event = Step::Request { to, from: i, request: request.clone() };
                        self.send(i, to, event);
                    }
                }
                Effect::Respond { to: ReplyTo(to), response } => {
                    let to = to as usize;
                    self.send(i, to, Step::Answer { to, from: i, response: Rc::new(response) });
                }
                Effect::Reset(peer) => {
                    if let Some(&j) = self.by_peer.get(&peer)
                        && self.nodes[i].links.remove(&j)
                    {
                        self.nodes[j].links.remove(&i);
                        self.send(i, j, Step::Transport { to: j, about: i, up: false });
                    }
                }
                Effect::Redial { peer, .. } => {
                    if let Some(&j) = self.by_peer.get(&peer)
                        && !self.nodes[i].links.contains(&j)
                        && self.reachable(i, j)
                    {
                        self.connect(i, j);
                    }
                }
                Effect::Persist { write, ticket } => {
                    self.nodes[i].disk.write(write);
                    let follow =
                        self.nodes[i].core.handle(Input::Persisted(ticket, Ok(())), now_ms);
                    for effect in follow.into_iter().rev() {
                        queue.push_front(effect);
                    }
                }
                Effect::Emit(event) => self.observe(i, event),
                Effect::WakeAt(at_ms) => {
                    let at = at_ms.saturating_sub(EPOCH_MS).saturating_mul(1000).max(self.now);
                    self.nodes[i].wake = Some(at);
                    let life = self.nodes[i].life;
                    self.schedule(at, Step::Wake { node: i, life, at });
                }
                Effect::SendJob { peer, bytes } => {
                    let Some(&to) = self.by_peer.get(&peer) else { continue };
                    if !self.nodes[to].alive && !self.cut(i, to) {
                        // Nobody listens there any more: the dial is refused.
                        let at = self.now + 2 * self.delay();
                        self.schedule(at, Step::JobUndelivered { node: i, about: to });
                        continue;
                    }
                    self.send(i, to, Step::JobDeliver { to, from: i, bytes: bytes.into() });
                }
                Effect::Execute(run) => {
                    let [lo, hi] = self.s.jobs.run_ms;
                    let took = if hi > lo { self.rng.random_range(lo..=hi) } else { lo };
                    if let Some(book) = &mut self.jobs {
                        book.start(i, &run);
                    }
                    let life = self.nodes[i].life;
                    let started_ms = self.now_ms();
                    let (job, fence) = (run.job_id, run.fence);
                    let done = Step::JobDone { node: i, life, job, fence, started_ms };
                    self.schedule(self.now + took * 1000, done);
                }
                Effect::Abort { job_id, fence } => {
                    if let Some(book) = &mut self.jobs {
                        book.ended(i, &job_id, fence);
                    }
                }
                // Discovery is the fixed overlay here; nobody reads snapshots or replies, and
                // no ledger is kept.
                Effect::Dial(_)
                | Effect::Snapshot
                | Effect::Reply(..)
                | Effect::Contribution(_) => {}
            }
        }
    }

    /// Starts (or restarts) node `i` now: its core's start, then its connections.
    fn boot(&mut self, i: usize) {
        self.input(i, Input::Start { addresses: Vec::new() }, None);
        if self.broker {
            self.input(i, Input::Link(true), None);
            return;
        }
        for j in self.nodes[i].neighbours.clone() {
            if self.reachable(i, j) {
                self.connect(i, j);
            }
        }
    }

    /// A connection opens: both ends learn it after one latency.
    fn connect(&mut self, a: usize, b: usize) {
        self.nodes[a].links.insert(b);
        self.nodes[b].links.insert(a);
        self.send(a, b, Step::Transport { to: b, about: a, up: true });
        self.send(b, a, Step::Transport { to: a, about: b, up: true });
    }

    /// Opens message `id` once for all nodes (opening is a pure function of the bytes).
    fn open(&mut self, id: MsgId, bytes: &[u8]) -> Result<Opened, Reason> {
        self.opened.entry(id).or_insert_with(|| wire::open(bytes, WORKSPACE)).clone()
    }

    fn peer(&self, i: usize) -> PeerId {
        self.nodes[i].peer
    }

    fn run(mut self) -> Measures {
        let end = (self.s.duration_secs * 1e6) as u64;
        while let Some(Reverse(q)) = self.queue.pop() {
            if q.at > end {
                break;
            }
            self.now = q.at;
            self.handle(q.event);
        }
        for w in &self.watches {
            self.m.missed += (0..self.nodes.len())
                .filter(|&j| j != w.origin && self.nodes[j].alive && !w.have[j])
                .count();
        }
        let mut decisions = self.decided;
        for node in &self.nodes {
            decisions = decisions + node.core.counters().since(node.counted_from);
        }
        self.m.decisions = Some(decisions);
        self.m.jobs = self.jobs.take().map(crate::jobs::JobBook::finish);
        self.m
    }

    fn handle(&mut self, event: Step) {
        match event {
            Step::Deliver { to, from, id, bytes } => {
                if !self.nodes[to].alive {
                    return;
                }
                // Duplicates cost bandwidth too; gossip drops them before the core sees them.
                self.count_received(bytes.len() as u64);
                if !self.remember(to, id) {
                    return;
                }
                let opened = self.open(id, &bytes);
                let via = if self.broker {
                    Inbound::Broker
                } else {
                    Inbound::Gossip { id: MessageId::from(id.to_vec()), source: self.peer(from) }
                };
                let gossip = Gossip { from, id, bytes: bytes.clone() };
                let input =
                    Input::Message { bytes: bytes.to_vec(), via, opened: Some(Box::new(opened)) };
                self.input(to, input, Some(&gossip));
            }
            Step::Request { to, from, request } => {
                if !self.nodes[to].alive {
                    return;
                }
                self.count_received(serde_json::to_vec(&*request).map_or(0, |b| b.len() as u64));
                let peer = (!self.broker).then(|| self.peer(from));
                let input = Input::SyncRequest {
                    from: peer,
                    request: (*request).clone(),
                    reply: ReplyTo(from as u64),
                };
                self.input(to, input, None);
            }
            Step::Answer { to, from, response } => {
                if !self.nodes[to].alive {
                    return;
                }
                self.count_received(serde_json::to_vec(&*response).map_or(0, |b| b.len() as u64));
                let peer = (!self.broker).then(|| self.peer(from));
                self.input(
                    to,
                    Input::SyncResponse { from: peer, response: (*response).clone() },
                    None,
                );
            }
            Step::Transport { to, about, up } => {
                if !self.nodes[to].alive {
                    return;
                }
                let peer = self.peer(about);
                let input = if up {
                    Input::Connected(peer)
                } else {
                    Input::Disconnected { peer, ours: false }
                };
                self.input(to, input, None);
            }
            Step::Wake { node, life, at } => {
                let n = &self.nodes[node];
                if n.life != life || !n.alive || n.wake != Some(at) {
                    return;
                }
                self.nodes[node].wake = None;
                self.input(node, Input::Timer, None);
            }
            Step::Unreachable { node, about } => {
                if self.nodes[node].alive {
                    let peer = self.peer(about);
                    self.input(node, Input::Unreachable(peer), None);
                }
            }
            Step::Boot(i) => self.boot(i),
            Step::Mark => {
                for node in &mut self.nodes {
                    node.counted_from = node.core.counters();
                }
            }
            Step::Fault(i) => self.fault(i),
            Step::JobDeliver { to, from, bytes } => {
                if !self.nodes[to].alive {
                    return;
                }
                let peer = (!self.broker).then(|| self.peer(from));
                let input = Input::JobMessage { bytes: bytes.to_vec(), from: peer, opened: None };
                self.input(to, input, None);
            }
            Step::JobDone { node, life, job, fence, started_ms } => {
                let n = &self.nodes[node];
                let running = self.jobs.as_ref().is_some_and(|b| b.running(node, &job, fence));
                if n.life != life || !n.alive || !running {
                    return;
                }
                if let Some(book) = &mut self.jobs {
                    book.ended(node, &job, fence);
                }
                let now_ms = self.now_ms();
                let done = arw_p2p::jobs::Finished {
                    job_id: job,
                    fence,
                    ok: true,
                    output: serde_json::Value::Null,
                    started_ms,
                    finished_ms: now_ms,
                    fault: None,
                    cpu_ms: None,
                };
                self.commands += 1;
                let command = Command::JobFinished(Box::new(done));
                self.input(node, Input::Command(CommandId(self.commands), command), None);
            }
            Step::JobUndelivered { node, about } => {
                if self.nodes[node].alive {
                    let peer = self.peer(about);
                    self.input(node, Input::JobUndelivered(peer), None);
                }
            }
            Step::JobsTick => self.jobs_tick(),
        }
    }

    /// The Home's operator: make node 0 the Home, admit every worker it has seen, then hand it
    /// a job every `every_ms` from `start_secs`.
    fn jobs_tick(&mut self) {
        let j = &self.s.jobs;
        if !self.nodes[0].alive {
            // The operator waits for the Home to come back.
            self.schedule(self.now + 500_000, Step::JobsTick);
            return;
        }
        if self.nodes[0].core.role() != arw_p2p::role::Role::Root {
            self.commands += 1;
            let command = Command::SetRole("home".into());
            self.input(0, Input::Command(CommandId(self.commands), command), None);
        }
        if !self.admitted {
            let admission = self.nodes[0].core.snapshot(Default::default()).admission;
            let waiting: Vec<NodeId> = (1..self.nodes.len())
                .map(|w| self.nodes[w].id.clone())
                .filter(|id| admission.get(id) != Some(&arw_p2p::admission::Admission::Admitted))
                .collect();
            self.admitted = waiting.is_empty();
            for id in waiting {
                self.commands += 1;
                let command = Command::Admit { id: id.to_string(), key: None };
                self.input(0, Input::Command(CommandId(self.commands), command), None);
            }
        }
        let start = (j.start_secs * 1e6) as u64;
        if self.now >= start && self.jobs_sent < j.count {
            let mut sends = vec![(self.jobs_sent, false)];
            for _ in 0..j.resubmit.min(self.jobs_sent) {
                sends.push((self.rng.random_range(0..self.jobs_sent), true));
            }
            self.jobs_sent += 1;
            for (n, repeat) in sends {
                if let Some(book) = &mut self.jobs {
                    book.sent(repeat);
                }
                self.commands += 1;
                let command = Command::SubmitJob(Box::new(crate::jobs::spec(j, n)));
                self.input(0, Input::Command(CommandId(self.commands), command), None);
            }
        }
        let next = if self.now >= start { j.every_ms * 1000 } else { 500_000 };
        if self.jobs_sent < j.count || !self.admitted {
            self.schedule(self.now + next, Step::JobsTick);
        }
    }

    /// Counts one message received, once the steady state being measured has begun.
    fn count_received(&mut self, bytes: u64) {
        if self.now as f64 >= self.s.traffic_after_secs * 1e6 {
            self.m.received(bytes);
        }
    }

    fn fault(&mut self, i: usize) {
        let fault = self.faults[i].clone();
        let node = fault.node.unwrap_or(0);
        match fault.kind {
            FaultKind::Advert => {
                if self.nodes[node].alive {
                    // The operator changes the node's role: a new advert, as in the stack tier.
                    let role = match self.nodes[node].core.role() {
                        arw_p2p::role::Role::Edge => "regional",
                        _ => "edge",
                    };
                    self.commands += 1;
                    let command =
                        Input::Command(CommandId(self.commands), Command::SetRole(role.into()));
                    self.input(node, command, None);
                    let seq = self.nodes[node].core.protocol().seq();
                    self.watch(node, seq);
                }
            }
            FaultKind::Crash => {
                if let Some(book) = &mut self.jobs {
                    book.crash(node, self.now);
                }
                self.nodes[node].alive = false;
                self.nodes[node].life += 1;
                self.gone.insert(node, self.now);
                for j in std::mem::take(&mut self.nodes[node].links) {
                    // The dead process's kernel closes its connections.
                    self.nodes[j].links.remove(&node);
                    self.send(node, j, Step::Transport { to: j, about: node, up: false });
                }
            }
            FaultKind::Restart => {
                if self.nodes[node].alive {
                    return;
                }
                let now_ms = self.now_ms();
                let n = &mut self.nodes[node];
                // The decisions of the life that ended still count, once counting began.
                if self.now as f64 >= self.s.traffic_after_secs * 1e6 {
                    self.decided = self.decided + n.core.counters().since(n.counted_from);
                }
                n.counted_from = Counters::default();
                n.core = NodeCore::new(&n.config, n.disk.restored(now_ms));
                n.alive = true;
                n.life += 1;
                n.wake = None;
                n.seen.clear();
                n.seen_order.clear();
                self.gone.remove(&node);
                self.boot(node);
                let seq = self.nodes[node].core.protocol().seq();
                self.watch(node, seq);
            }
            FaultKind::Isolate => {
                self.isolated[node] = true;
                self.gone.insert(node, self.now);
            }
            FaultKind::Partition => {
                let cut =
                    ((self.nodes.len() as f64) * fault.fraction.unwrap_or(0.5)).ceil() as usize;
                self.side = Some((0..self.nodes.len()).map(|j| j < cut).collect());
            }
            FaultKind::Heal => {
                self.cut_before_heal = (self.side.take(), self.isolated.clone());
                for (j, isolated) in self.isolated.iter_mut().enumerate() {
                    if *isolated {
                        *isolated = false;
                        self.gone.remove(&j);
                    }
                }
                self.heal_since = Some(self.now);
                self.healed = vec![false; self.nodes.len()];
            }
        }
    }

    fn watch(&mut self, origin: usize, seq: u64) {
        let mut have = vec![false; self.nodes.len()];
        have[origin] = true;
        self.watches.push(Watch { origin, seq, since: self.now, have });
    }

    /// Records what `observer`'s events mean for the measures.
    fn observe(&mut self, observer: usize, event: Event) {
        if observer == 0
            && let Some(book) = &mut self.jobs
        {
            book.event(&event, self.now);
        }
        match event {
            Event::NodeAdvertise(advert) => {
                let Some(origin) = self.index_of(&advert.advert.id) else { return };
                let seq = advert.advert.seq;
                for w in &mut self.watches {
                    if w.origin == origin && seq >= w.seq && !w.have[observer] {
                        w.have[observer] = true;
                        self.m.convergence.push((self.now - w.since) as f64 / 1000.0);
                    }
                }
            }
            Event::NodeChanged(changed) if changed.previous_health.is_some() => {
                let Some(target) =
                    NodeId::parse(&changed.node.id).ok().and_then(|id| self.index_of(&id))
                else {
                    return;
                };
                let to = match changed.node.health.as_deref() {
                    Some("ok") => Health::Ok,
                    Some("suspect") => Health::Suspect,
                    Some("down") => Health::Down,
                    _ => return,
                };
                if to == Health::Ok {
                    return self.check_healed(observer);
                }
                if let Some(&since) = self.gone.get(&target) {
                    let ms = (self.now - since) as f64 / 1000.0;
                    if self.detected.insert((observer, target)) {
                        self.m.detection.push(ms);
                    }
                    if to == Health::Down && self.downed.insert((observer, target)) {
                        self.m.down.push(ms);
                    }
                } else if self.reachable(observer, target) {
                    match to {
                        Health::Down if !self.cut_lately(observer, target) => {
                            self.m.false_positives += 1
                        }
                        Health::Suspect => self.m.false_suspects += 1,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }

    /// Whether `a` and `b` were cut apart within the last `down_after_ms`: a `down` judged then
    /// rests on evidence from the cut, so it is not counted as false (the heal time shows its
    /// cost).
    fn cut_lately(&self, a: usize, b: usize) -> bool {
        let window = self.s.protocol.down_after_ms * 1000;
        let recent = self.heal_since.is_some_and(|h| self.now.saturating_sub(h) < window);
        let (side, isolated) = &self.cut_before_heal;
        recent
            && (isolated[a] || isolated[b] || side.as_ref().is_some_and(|side| side[a] != side[b]))
    }

    fn check_healed(&mut self, observer: usize) {
        let Some(since) = self.heal_since else { return };
        if self.healed[observer] || !self.nodes[observer].alive {
            return;
        }
        let members = self.nodes[observer].core.protocol().membership().members();
        let whole =
            (0..self.nodes.len()).filter(|&j| j != observer && self.nodes[j].alive).all(|j| {
                members
                    .get(self.nodes[j].id.as_str())
                    .is_some_and(|m| m.record.health == Health::Ok)
            });
        if whole {
            self.healed[observer] = true;
            self.m.heal.push((self.now - since) as f64 / 1000.0);
        }
    }

    fn index_of(&self, id: &NodeId) -> Option<usize> {
        id.as_str()
            .strip_prefix('n')
            .and_then(|n| n.parse().ok())
            .filter(|&i: &usize| i < self.nodes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(extra: &str) -> Scenario {
        Scenario::parse(&format!(
            "name = \"t\"\ntier = \"virtual\"\nnodes = 12\nduration_secs = 12\ntrials = 2\n[link]\nlatency_ms = [5, 20]\n{extra}"
        ))
        .expect("scenario")
    }

    #[test]
    fn same_seed_same_report() {
        let s = scenario(
            "[[faults]]\nat_secs = 3\nkind = \"advert\"\nnode = 2\n[[faults]]\nat_secs = 5\nkind = \"crash\"\nnode = 4\n",
        );
        let a = run(&s, 7, &mut |_| {});
        let b = run(&s, 7, &mut |_| {});
        assert_eq!(a, b);
        let c = run(&s, 8, &mut |_| {});
        assert_ne!(a.convergence_ms, c.convergence_ms, "another seed, another run");
        assert_eq!(a.missed, 0);
        assert_eq!(a.false_positives, 0);
        assert_eq!(a.convergence_ms.count, 2 * 11);
        assert_eq!(a.detection_ms.count, 2 * 11, "every survivor notices the crash");
    }

    #[test]
    fn a_partition_heals() {
        let s = scenario(
            "[[faults]]\nat_secs = 2\nkind = \"partition\"\nfraction = 0.5\n[[faults]]\nat_secs = 8\nkind = \"heal\"\n",
        );
        let r = run(&s, 3, &mut |_| {});
        assert_eq!(r.false_positives, 0, "the other side going down is expected, not false");
        assert_eq!(r.heal_ms.count, 2 * 12, "every node sees everyone ok again");
    }

    #[test]
    fn jobs_end_once_and_never_run_twice_at_once_through_crashes_and_cuts() {
        let s = Scenario::parse(
            "name = \"jobs\"\ntier = \"virtual\"\nnodes = 8\nduration_secs = 60\ntrials = 2\n\
             [link]\nlatency_ms = [1, 20]\nloss = 0.05\n\
             [jobs]\ncount = 60\nstart_secs = 5\nevery_ms = 100\nrun_ms = [200, 6000]\n\
             [[faults]]\nat_secs = 8\nkind = \"crash\"\nnode = 2\n\
             [[faults]]\nat_secs = 9\nkind = \"isolate\"\nnode = 5\n\
             [[faults]]\nat_secs = 20\nkind = \"heal\"\n",
        )
        .expect("scenario");
        let r = run(&s, 5, &mut |_| {});
        let j = r.jobs.expect("jobs measured");
        assert_eq!((j.submitted, j.completed, j.failed, j.unfinished), (120, 120, 0, 0), "{j:?}");
        assert_eq!((j.duplicate_results, j.overlapping_runs), (0, 0), "{j:?}");
        assert!(j.crash_to_running_ms.count >= 1, "{j:?}");
        assert!(j.crash_to_running_ms.max.is_some_and(|ms| ms <= 6_500.0), "{j:?}");
        assert_eq!(j.fence_regressions, 0, "{j:?}");
    }

    #[test]
    fn a_restarting_home_under_resubmission_storms_keeps_one_row_per_key_and_places_by_gpu() {
        let s = Scenario::parse(
            "name = \"jobs\"\ntier = \"virtual\"\nnodes = 8\nduration_secs = 60\ntrials = 2\n\
             [link]\nlatency_ms = [1, 20]\nloss = 0.05\n\
             [jobs]\ncount = 80\nstart_secs = 5\nevery_ms = 100\nrun_ms = [200, 4000]\n\
             prefer = \"auto\"\nhome_slots = 2\ngpu_workers = 2\ngpu_every = 4\nresubmit = 3\n\
             [[faults]]\nat_secs = 9\nkind = \"crash\"\nnode = 0\n\
             [[faults]]\nat_secs = 11\nkind = \"restart\"\nnode = 0\n\
             [[faults]]\nat_secs = 12\nkind = \"crash\"\nnode = 1\n",
        )
        .expect("scenario");
        let r = run(&s, 5, &mut |_| {});
        let j = r.jobs.expect("jobs measured");
        // Every key is one row that ends once, though each was sent up to four times and the
        // Home restarted under them.
        assert_eq!((j.submitted, j.completed, j.failed, j.unfinished), (160, 160, 0, 0), "{j:?}");
        assert!(j.resubmitted > 300, "{j:?}");
        assert_eq!(j.extra_rows, 0, "{j:?}");
        assert_eq!((j.duplicate_results, j.overlapping_runs, j.fence_regressions), (0, 0, 0));
        // GPU jobs ran only where a GPU is, though one of the two GPU workers crashed.
        assert_eq!(j.misplaced, 0, "{j:?}");
        // Local first: the Home ran some itself and offloaded the rest.
        assert!(j.ran_local > 0 && j.ran_remote > j.ran_local, "{j:?}");
    }
}
