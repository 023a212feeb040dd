//! The virtual tier: the real protocol core ([`Protocol`], hence the same [`Membership`] and
//! message handling as the daemon) on a simulated network, single-threaded, in virtual time,
//! driven by a seeded RNG. Same scenario and seed → the same report.
//!
//! Network model:
//! - Gossip: each node has a random overlay of about `link.degree` neighbours (plus a ring, so
//!   the graph is connected). A node forwards a message to its neighbours only when its core
//!   accepted it, and drops copies it has seen before without looking at them, as gossipsub's
//!   duplicate cache does. Envelopes are opened once per unique message (opening is a pure
//!   function of the bytes); every node still applies every message to its own membership.
//! - Links: one-way latency fixed or uniform; messages ride TCP, so a lost transmission attempt
//!   (probability `link.loss`) costs a retransmission timeout (200 ms, doubling up to 3.2 s)
//!   instead of the message.
//! - Faults: a crash resets its connections (neighbours get the transport signal after one
//!   latency); isolation and partitions drop traffic silently; a heal, a restart and every
//!   connection at start run the same anti-entropy sync as the daemon does on a new connection.
//! - Each node ticks every 250 ms and, every `protocol.heartbeat_interval_ms`, probes the nodes
//!   it watches (probe mode: a small request, a bare acknowledgement or a signed heartbeat when
//!   asked for proof) or floods a heartbeat (broadcast mode, `observers = 0`); it re-advertises
//!   every `protocol.advertise_interval_secs`. Phases are random, like the node actor's.
//! - What the core puts in its outbox (suspicion reports, refutations) is flooded, and a probe
//!   answer that brings a node back to `ok` is passed on to everyone, as the node actor does.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque},
    rc::Rc,
};

use arw_p2p::{
    cluster::{Advert, Health},
    identity::NodeKey,
    membership::{Change, MembershipConfig, Verdict},
    node_id::NodeId,
    protocol::{Protocol, SyncRequest},
    wire::{self, Opened, Reason},
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::{
    report::{Measures, Report},
    scenario::{Fault, FaultKind, Latency, Scenario, Tier},
};

/// Virtual wall clock at time zero (ms since the epoch), so expiry checks see realistic dates.
const EPOCH_MS: u64 = 1_800_000_000_000;
const TICK_US: u64 = 250_000;
const SYNC_RETRY_US: u64 = 5_000_000;
const SEEN_FOR_US: u64 = 120_000_000;
/// Bytes of a probe request and of a bare acknowledgement, as JSON on the wire.
const PROBE_BYTES: u64 = r#"{"have":{},"policy_epoch":0,"probe":true}"#.len() as u64;
const ACK_BYTES: u64 = r#"{"envelopes":[]}"#.len() as u64;
const WORKSPACE: &str = "sim";

type MsgId = [u8; 32];

#[derive(Debug)]
enum Event {
    Deliver { to: usize, from: usize, id: MsgId, bytes: Rc<[u8]> },
    SyncRequest { to: usize, from: usize, request: Rc<SyncRequest> },
    SyncAnswer { to: usize, adverts: Rc<Vec<String>> },
    Probe { to: usize, from: usize, proof: bool },
    ProbeAnswer { to: usize, from: usize, beat: Option<Rc<[u8]>>, policy_epoch: u64 },
    Transport { to: usize, about: usize, up: bool },
    Beat { node: usize, life: u32 },
    Readvertise { node: usize, life: u32 },
    Tick { node: usize, life: u32 },
    Fault(usize),
}

#[derive(Debug)]
struct Queued {
    at: u64,
    order: u64,
    event: Event,
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

struct Node {
    proto: Protocol,
    key: NodeKey,
    id: NodeId,
    alive: bool,
    /// Bumped on crash and restart, so timers of a past life are ignored.
    life: u32,
    neighbours: Vec<usize>,
    seen: HashSet<MsgId>,
    seen_order: VecDeque<(u64, MsgId)>,
    sync_asked: BTreeMap<usize, u64>,
}

/// An advert being watched: who signed it, from which seq, since when, who has it.
struct Watch {
    origin: usize,
    seq: u64,
    since: u64,
    have: Vec<bool>,
}

struct Trial<'a> {
    s: &'a Scenario,
    rng: ChaCha8Rng,
    now: u64,
    order: u64,
    queue: BinaryHeap<Reverse<Queued>>,
    nodes: Vec<Node>,
    side: Option<Vec<bool>>,
    isolated: Vec<bool>,
    opened: HashMap<MsgId, Result<Opened, Reason>>,
    faults: Vec<Fault>,
    watches: Vec<Watch>,
    /// (observer, target) → since when the target is gone (crash or isolation).
    gone: BTreeMap<usize, u64>,
    detected: HashSet<(usize, usize)>,
    downed: HashSet<(usize, usize)>,
    heal_since: Option<u64>,
    healed: Vec<bool>,
    /// The partition and isolations just before the last heal.
    cut_before_heal: (Option<Vec<bool>>, Vec<bool>),
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
    format!(
        "latency {latency}, loss {:.0} %, degree {}, heartbeat {} ms, suspect {} ms, down {} ms",
        s.link.loss * 100.0,
        s.link.degree,
        p.heartbeat_interval_ms,
        p.suspect_after_ms,
        p.down_after_ms
    )
}

fn advert_for(id: &NodeId, seq: u64, now_ms: u64, tag: &str) -> Advert {
    let mut advert = Advert::basic(id.clone(), WORKSPACE, seq, now_ms);
    advert.tags = vec![tag.to_owned()];
    advert
}

impl<'a> Trial<'a> {
    fn new(s: &'a Scenario, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = s.nodes;
        let config = {
            let mut c = MembershipConfig::new(WORKSPACE);
            c.heartbeat_interval_ms = s.protocol.heartbeat_interval_ms;
            c.suspect_after_ms = s.protocol.suspect_after_ms;
            c.down_after_ms = s.protocol.down_after_ms;
            c.beat_max_age_ms = c.beat_max_age_ms.max(2 * s.protocol.down_after_ms);
            c.observers = (s.protocol.observers > 0).then_some(s.protocol.observers);
            c
        };
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
        let nodes = neighbours
            .into_iter()
            .enumerate()
            .map(|(i, neighbours)| {
                let secret: [u8; 32] = Sha256::digest(format!("{seed}/{i}").as_bytes()).into();
                let key = NodeKey::from_secret(secret);
                let id = NodeId::parse(&format!("n{i}"))
                    .unwrap_or_else(|_| unreachable!("n<digits> is a valid id"));
                Node {
                    proto: Protocol::new(key.clone(), id.clone(), config.clone(), 0),
                    key,
                    id,
                    alive: true,
                    life: 0,
                    neighbours,
                    seen: HashSet::new(),
                    seen_order: VecDeque::new(),
                    sync_asked: BTreeMap::new(),
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
            m: Measures::default(),
        };
        for i in 0..trial.faults.len() {
            let at = (trial.faults[i].at_secs * 1e6) as u64;
            trial.schedule(at, Event::Fault(i));
        }
        for i in 0..n {
            let start = trial.rng.random_range(0..100_000);
            trial.boot(i, start);
        }
        trial
    }

    fn schedule(&mut self, at: u64, event: Event) {
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

    fn send(&mut self, from: usize, to: usize, event: Event) {
        if self.cut(from, to) {
            return;
        }
        let at = self.now + self.delay();
        self.schedule(at, event);
    }

    fn broadcast(&mut self, from: usize, bytes: Vec<u8>, except: Option<usize>) {
        let id: MsgId = Sha256::digest(&bytes).into();
        self.remember(from, id);
        let bytes: Rc<[u8]> = bytes.into();
        for to in self.nodes[from].neighbours.clone() {
            if Some(to) != except {
                self.send(from, to, Event::Deliver { to, from, id, bytes: bytes.clone() });
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

    /// Starts (or restarts) node `i` at `at`: boot advert, connections, timers.
    fn boot(&mut self, i: usize, at: u64) {
        let saved = self.now;
        self.now = self.now.max(at);
        self.advertise(i, "boot");
        let life = self.nodes[i].life;
        let beat = self.rng.random_range(0..self.s.protocol.heartbeat_interval_ms * 1000);
        let tick = self.rng.random_range(0..TICK_US);
        let readvert = self.rng.random_range(0..self.readvert_us());
        self.schedule(self.now + beat, Event::Beat { node: i, life });
        self.schedule(self.now + tick, Event::Tick { node: i, life });
        self.schedule(self.now + readvert, Event::Readvertise { node: i, life });
        for j in self.nodes[i].neighbours.clone() {
            if self.nodes[j].alive {
                self.connect(i, j);
            }
        }
        self.now = saved;
    }

    /// A (re)established connection: both ends learn it and ask each other for adverts.
    fn connect(&mut self, a: usize, b: usize) {
        for (x, y) in [(a, b), (b, a)] {
            self.send(x, y, Event::Transport { to: y, about: x, up: true });
            let request = Rc::new(self.nodes[x].proto.sync_request());
            self.nodes[x].sync_asked.insert(y, self.now);
            self.send(x, y, Event::SyncRequest { to: y, from: x, request });
        }
    }

    fn readvert_us(&self) -> u64 {
        self.s.protocol.advertise_interval_secs.max(1) * 1_000_000
    }

    /// Opens message `id` once for all nodes (opening is a pure function of the bytes).
    fn open(&mut self, id: MsgId, bytes: &[u8]) -> Result<Opened, Reason> {
        self.opened.entry(id).or_insert_with(|| wire::open(bytes, WORKSPACE)).clone()
    }

    /// Floods whatever node `i`'s core has for everyone.
    fn flush(&mut self, i: usize) {
        for envelope in self.nodes[i].proto.take_outbox() {
            self.broadcast(i, envelope, None);
        }
    }

    /// Applies an envelope node `to` got by request (sync or probe answer), not by gossip.
    fn receive_direct(&mut self, to: usize, bytes: &[u8]) -> Vec<Change> {
        let opened = self.open(Sha256::digest(bytes).into(), bytes);
        let now_ms = self.now_ms();
        let receipt = self.nodes[to].proto.receive_opened(opened, bytes, now_ms);
        self.flush(to);
        receipt.changes
    }

    fn advertise(&mut self, i: usize, tag: &str) -> u64 {
        let now_ms = self.now_ms();
        let seq = self.nodes[i].proto.next_seq(now_ms);
        let advert = advert_for(&self.nodes[i].id, seq, now_ms, tag);
        let bytes = self.nodes[i].proto.seal_advert(&advert);
        self.broadcast(i, bytes, None);
        seq
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
        self.m
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Deliver { to, from, id, bytes } => {
                if !self.nodes[to].alive {
                    return;
                }
                self.count_received(bytes.len() as u64);
                if !self.remember(to, id) {
                    return;
                }
                let opened = self.open(id, &bytes);
                let now_ms = self.now_ms();
                let receipt = self.nodes[to].proto.receive_opened(opened, &bytes, now_ms);
                if receipt.verdict == Verdict::Accept {
                    self.broadcast(to, bytes.to_vec(), Some(from));
                }
                self.flush(to);
                if receipt.refusal.as_ref().is_some_and(|r| r.reason == Reason::UnknownNode) {
                    self.ask_sync(to, from);
                }
                self.observe(to, receipt.changes);
            }
            Event::SyncRequest { to, from, request } => {
                if !self.nodes[to].alive {
                    return;
                }
                self.count(&request);
                if let Some(answer) = self.nodes[to].proto.sync_answer(&request, true) {
                    self.send(
                        to,
                        from,
                        Event::SyncAnswer { to: from, adverts: Rc::new(answer.envelopes) },
                    );
                }
                let now_ms = self.now_ms();
                let vouch = self.nodes[to].proto.vouch(&request, now_ms);
                self.flush(to);
                self.send_probes(to, vouch);
            }
            Event::SyncAnswer { to, adverts, .. } => {
                if !self.nodes[to].alive {
                    return;
                }
                self.count_received(adverts.iter().map(|a| a.len() as u64).sum());
                for advert in adverts.iter() {
                    let changes = self.receive_direct(to, advert.as_bytes());
                    self.observe(to, changes);
                }
            }
            Event::Probe { to, from, proof } => {
                if !self.nodes[to].alive {
                    return;
                }
                self.count_received(PROBE_BYTES);
                if !self.nodes[to]
                    .proto
                    .membership()
                    .members()
                    .contains_key(self.nodes[from].id.as_str())
                {
                    // Probed by a node we never heard of, as the node actor does: ask it.
                    self.ask_sync(to, from);
                }
                let now_ms = self.now_ms();
                let answer = self.nodes[to].proto.answer_probe(proof, now_ms);
                self.flush(to);
                let beat = answer.envelopes.first().map(|b| Rc::from(b.as_bytes()));
                let policy_epoch = answer.policy_epoch;
                self.send(to, from, Event::ProbeAnswer { to: from, from: to, beat, policy_epoch });
            }
            Event::ProbeAnswer { to, from, beat, policy_epoch } => {
                if !self.nodes[to].alive {
                    return;
                }
                let now_ms = self.now_ms();
                let id = self.nodes[from].id.clone();
                // No policy is issued in the simulation: an epoch behind is never asked for.
                let _behind = self.nodes[to].proto.probe_answered(&id, policy_epoch, now_ms);
                let Some(beat) = beat else { return self.count_received(ACK_BYTES) };
                self.count_received(ACK_BYTES + beat.len() as u64);
                let changes = self.receive_direct(to, &beat);
                self.observe(to, changes);
            }
            Event::Transport { to, about, up } => {
                if self.nodes[to].alive && !up {
                    // As the node actor does: report the reset so every node suspects now.
                    let now_ms = self.now_ms();
                    let target = self.nodes[about].id.clone();
                    let change = self.nodes[to].proto.suspect(&target, now_ms);
                    self.flush(to);
                    self.observe(to, change.into_iter().collect());
                }
            }
            Event::Beat { node, life } => {
                if self.nodes[node].life != life || !self.nodes[node].alive {
                    return;
                }
                if self.s.protocol.observers == 0 {
                    let now_ms = self.now_ms();
                    let beat = self.nodes[node].proto.heartbeat(now_ms);
                    self.broadcast(node, beat, None);
                } else {
                    let probes = self.nodes[node].proto.probes();
                    self.send_probes(node, probes);
                }
                let next = self.now + self.s.protocol.heartbeat_interval_ms * 1000;
                self.schedule(next, Event::Beat { node, life });
            }
            Event::Readvertise { node, life } => {
                if self.nodes[node].life != life || !self.nodes[node].alive {
                    return;
                }
                self.advertise(node, "boot");
                let next = self.now + self.readvert_us();
                self.schedule(next, Event::Readvertise { node, life });
            }
            Event::Tick { node, life } => {
                if self.nodes[node].life != life || !self.nodes[node].alive {
                    return;
                }
                let now_ms = self.now_ms();
                let changes = self.nodes[node].proto.tick(now_ms);
                self.flush(node);
                self.observe(node, changes);
                // As the node actor does: the next tick, or sooner when a silence reaches its
                // threshold before then.
                let mut next = self.now + TICK_US;
                if let Some(due_ms) = self.nodes[node].proto.next_deadline() {
                    let due = due_ms.saturating_sub(EPOCH_MS).saturating_mul(1000);
                    next = next.min(due.max(self.now + 1));
                }
                self.schedule(next, Event::Tick { node, life });
            }
            Event::Fault(i) => self.fault(i),
        }
    }

    fn send_probes(&mut self, from: usize, probes: Vec<arw_p2p::membership::Probe>) {
        for probe in probes {
            let Some(to) = self.index_of(&probe.id) else { continue };
            self.send(from, to, Event::Probe { to, from, proof: probe.proof });
        }
    }

    /// Counts one message received, once the steady state being measured has begun.
    fn count_received(&mut self, bytes: u64) {
        if self.now as f64 >= self.s.traffic_after_secs * 1e6 {
            self.m.received(bytes);
        }
    }

    fn count(&mut self, request: &SyncRequest) {
        let have: u64 = request.have.keys().map(|k| k.len() as u64 + 8).sum();
        let lost: u64 = request.lost.iter().map(|k| k.len() as u64 + 3).sum();
        self.count_received(have + lost);
    }

    fn ask_sync(&mut self, from: usize, to: usize) {
        if self.nodes[from]
            .sync_asked
            .get(&to)
            .is_some_and(|t| self.now.saturating_sub(*t) < SYNC_RETRY_US)
        {
            return;
        }
        self.nodes[from].sync_asked.insert(to, self.now);
        let request = Rc::new(self.nodes[from].proto.sync_request());
        self.send(from, to, Event::SyncRequest { to, from, request });
    }

    fn fault(&mut self, i: usize) {
        let fault = self.faults[i].clone();
        let node = fault.node.unwrap_or(0);
        match fault.kind {
            FaultKind::Advert => {
                if self.nodes[node].alive {
                    let seq = self.advertise(node, "changed");
                    self.watch(node, seq);
                }
            }
            FaultKind::Crash => {
                self.nodes[node].alive = false;
                self.nodes[node].life += 1;
                self.gone.insert(node, self.now);
                for j in self.nodes[node].neighbours.clone() {
                    // The dead process's kernel resets its connections.
                    self.send(node, j, Event::Transport { to: j, about: node, up: false });
                }
            }
            FaultKind::Restart => {
                if self.nodes[node].alive {
                    return;
                }
                let n = &mut self.nodes[node];
                let stored = n.proto.membership().stored();
                let config = n.proto.membership().config().clone();
                let mut proto = Protocol::new(n.key.clone(), n.id.clone(), config, n.proto.seq());
                proto.membership_mut().restore(stored);
                n.proto = proto;
                n.alive = true;
                n.life += 1;
                n.seen.clear();
                n.seen_order.clear();
                n.sync_asked.clear();
                self.gone.remove(&node);
                let seq = self.nodes[node].proto.next_seq(self.now_ms());
                self.boot(node, self.now);
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
                let was_cut: Vec<(usize, usize)> = (0..self.nodes.len())
                    .flat_map(|a| self.nodes[a].neighbours.iter().map(move |&b| (a, b)))
                    .filter(|&(a, b)| a < b && self.cut(a, b))
                    .collect();
                self.cut_before_heal = (self.side.take(), self.isolated.clone());
                for (j, isolated) in self.isolated.iter_mut().enumerate() {
                    if *isolated {
                        *isolated = false;
                        self.gone.remove(&j);
                    }
                }
                self.heal_since = Some(self.now);
                self.healed = vec![false; self.nodes.len()];
                for (a, b) in was_cut {
                    if self.nodes[a].alive && self.nodes[b].alive {
                        self.connect(a, b);
                    }
                }
            }
        }
    }

    fn watch(&mut self, origin: usize, seq: u64) {
        let mut have = vec![false; self.nodes.len()];
        have[origin] = true;
        self.watches.push(Watch { origin, seq, since: self.now, have });
    }

    /// Records what `observer`'s membership changes mean for the measures.
    fn observe(&mut self, observer: usize, changes: Vec<Change>) {
        for change in changes {
            match change {
                Change::Advert { id, .. } => {
                    let Some(origin) = self.index_of(&id) else { continue };
                    let seq = self.nodes[observer]
                        .proto
                        .membership()
                        .members()
                        .get(&id)
                        .map_or(0, |m| m.record.advert.seq);
                    for w in &mut self.watches {
                        if w.origin == origin && seq >= w.seq && !w.have[observer] {
                            w.have[observer] = true;
                            self.m.convergence.push((self.now - w.since) as f64 / 1000.0);
                        }
                    }
                }
                Change::Health { id, to, .. } => {
                    let Some(target) = self.index_of(&id) else { continue };
                    if to == Health::Ok {
                        self.check_healed(observer);
                        continue;
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
                Change::Evicted { .. }
                | Change::SelfSuspected { .. }
                | Change::Conflict { .. }
                | Change::Policy(_)
                | Change::PolicyBehind { .. } => {}
            }
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
        let members = self.nodes[observer].proto.membership().members();
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
}
