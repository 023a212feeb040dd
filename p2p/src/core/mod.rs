//! The node core: every decision a node makes, with no IO and no clock.
//!
//! [`NodeCore::handle`] takes one [`Input`] (a message or connection signal from the bus, an
//! operator's command, a write that finished, a timer) and the time, and returns the
//! [`Effect`]s to carry out, in order: messages to publish or send, verdicts for the gossip
//! layer, connections to reset or dial, state to persist, typed events, replies, and when to
//! wake it next. It composes the protocol ([`Protocol`]: membership and the Home's policy),
//! the hierarchy, admission, capsules and the governor, and owns every rule around them: rate
//! limits on syncs and reports, when to probe, whom to redial, when the Home signs policy,
//! which events to emit.
//!
//! Two executors run it: the node actor (`crate::node`), over a real bus and disk, and the
//! simulator (`arw-simnet`), over a simulated network in virtual time. Neither decides
//! anything itself, so a simulated figure is a figure of the daemon.
//!
//! A change that must be on disk before it takes effect is two-phase: the core emits
//! [`Effect::Persist`] with a [`Ticket`] and goes on only when [`Input::Persisted`] comes back
//! with that ticket; a failed write leaves the change undone.

mod authority;
mod commands;
mod config;
mod jobs;
mod liveness;
mod newcomers;
#[cfg(test)]
mod tests;
mod types;

use std::{collections::BTreeMap, sync::Arc};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use libp2p::PeerId;
use serde_json::{Map, Value, json};

pub use crate::cluster::{HomeClaim, PendingHome};
pub use config::{BusConfig, ClusterStore, FederationConfig, NodeConfig, Restored};
pub use types::{
    AdmissionChange, CapsuleRequest, Command, Counters, JobsStatus, NodeError, PolicyView, Reply,
    Snapshot, TeardownRequest,
};

use crate::{
    admission::Roster,
    capsule::{CapsuleSet, TrustStore},
    cluster::{Advert, Health, NodeRecord},
    events::Event,
    governor::Governor,
    hierarchy::Hierarchy,
    identity::NodeKey,
    membership::{self, MembershipConfig, StoredMember, Verdict},
    node_id::{self, IdSource, NodeId},
    policy::StoredPolicy,
    protocol::{Protocol, SyncRequest, SyncResponse},
    role::Role,
    transport::{Inbound, Mismatch, NetworkStatus},
    wire,
};

/// Timers are checked at least this often (registry flushes, capsule leases, policy cadence).
pub const TICK_MS: u64 = 250;
/// The registry is written at most this often.
const FLUSH_EVERY_MS: u64 = 1_000;
/// At most this many `cluster.event.rejected` events per window; the rest are counted.
const REJECTIONS_PER_WINDOW: u32 = 20;
const REJECTION_WINDOW_MS: u64 = 10_000;
/// Ask one peer for a sync, or report one node's reset connection, at most this often.
const SYNC_RETRY_MS: u64 = 5_000;
/// Local health (after memberlist's Lifeguard): a timer that fires this late marks this node
/// slow; each one stretches its silence thresholds by one more multiple, up to
/// [`MAX_SLOWDOWN`], and [`RECOVER_AFTER`] timers on time in a row take one off.
const LATE_MS: u64 = 200;
const MAX_SLOWDOWN: u64 = 8;
const RECOVER_AFTER: u32 = 8;
/// A timer this late means the node itself was stalled: the silence it would now see is its own.
const STALL_MS: u64 = 1_000;
/// Anti-entropy: sync with one connected peer (in turn) this often...
const SYNC_EVERY_MS: u64 = 30_000;
/// ...the first time this soon after start: an advert flooded while the gossip mesh was still
/// forming may have missed some nodes, and the first sync (with the first peer, when this node
/// joined) could not bring what others said after it.
const SYNC_FIRST_MS: u64 = 2_000;
/// A node judged down over the mesh is redialled this often...
const REDIAL_EVERY_MS: u64 = 1_000;
/// ...for this long (it is back by then, or gone).
const REDIAL_FOR_MS: u64 = 120_000;

/// Identifies a command, so its reply finds the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommandId(pub u64);

/// Identifies a write the core waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(pub u64);

/// Identifies where a sync answer goes (the executor keeps the reply channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplyTo(pub u64);

/// Something that happened to the node.
#[derive(Debug, Clone)]
pub enum Input {
    /// The node starts, listening at `addresses` (libp2p multiaddrs; none on a broker).
    Start {
        /// Where others can reach it.
        addresses: Vec<String>,
    },
    /// A signed envelope arrived.
    Message {
        /// The envelope as received.
        bytes: Vec<u8>,
        /// How it came.
        via: Inbound,
        /// The envelope already opened by the executor ([`wire::open`]), when it did so. On
        /// NATS the transport sheds floods before it checks; gossip the core sheds itself,
        /// opened or not (see [`crate::transport::shed`]).
        opened: Option<Box<Result<wire::Opened, wire::Reason>>>,
    },
    /// A peer of this workspace is connected (libp2p).
    Connected(PeerId),
    /// The last connection to a peer ended (libp2p).
    Disconnected {
        /// The peer.
        peer: PeerId,
        /// This node closed it (on purpose, or as idle).
        ours: bool,
    },
    /// A request to a peer failed because it could not be reached at all: a refused dial
    /// (libp2p).
    Unreachable(PeerId),
    /// The broker link came up (`true`) or went away (NATS).
    Link(bool),
    /// Someone asks for what it lacks, or probes this node.
    SyncRequest {
        /// The asking peer (libp2p).
        from: Option<PeerId>,
        /// What it has.
        request: SyncRequest,
        /// Where the answer goes.
        reply: ReplyTo,
    },
    /// An answer to a sync or a probe.
    SyncResponse {
        /// The answering peer (libp2p).
        from: Option<PeerId>,
        /// The answer.
        response: SyncResponse,
    },
    /// The listen addresses changed.
    Addresses(Vec<String>),
    /// A dispatch envelope (jobs) arrived.
    JobMessage {
        /// The envelope as received.
        bytes: Vec<u8>,
        /// The sending peer (libp2p; the transport authenticated it).
        from: Option<PeerId>,
        /// The envelope already opened by the executor, when it did so.
        opened: Option<Box<crate::jobs::message::Opened>>,
    },
    /// A dispatch envelope to this peer could not be delivered (no route, no answer).
    JobUndelivered(PeerId),
    /// An operator's command.
    Command(CommandId, Command),
    /// A write asked for by [`Effect::Persist`] finished.
    Persisted(Ticket, Result<(), String>),
    /// The time asked for by [`Effect::WakeAt`] has come (or any time: nothing due is done).
    Timer,
    /// A graceful stop.
    Stop,
}

/// One call of [`NodeCore::handle`] as an executor made it: the same inputs, fed to a core
/// made from the same configuration and state, give the same effects.
#[derive(Debug, Clone)]
pub struct Traced {
    /// The time passed in.
    pub now_ms: u64,
    /// The input.
    pub input: Input,
    /// The effects returned, as `Debug` text.
    pub effects: Vec<String>,
}

/// Something the executor must do.
#[derive(Debug)]
pub enum Effect {
    /// Send a signed envelope to every node (gossip or the broker).
    Publish(Vec<u8>),
    /// Tell the gossip layer whether to forward a received message.
    Validate {
        /// The message.
        via: Inbound,
        /// The verdict.
        verdict: Verdict,
    },
    /// Send a sync request or probe to one peer (libp2p) or to everyone (`None`, NATS).
    Request {
        /// The peer.
        peer: Option<PeerId>,
        /// The request.
        request: SyncRequest,
    },
    /// Answer a sync request or probe.
    Respond {
        /// Where to.
        to: ReplyTo,
        /// The answer.
        response: SyncResponse,
    },
    /// Dial a node at the addresses it advertised, unless connected.
    Dial(Vec<String>),
    /// Close a stalled connection to a node judged down (quietly: it is already judged).
    Reset(PeerId),
    /// Dial a node judged down again, beyond the discovery budget: after a partition the
    /// first dial that gets through ends it.
    Redial {
        /// The node's libp2p identity.
        peer: PeerId,
        /// The addresses it advertised.
        addrs: Vec<String>,
    },
    /// Write state; answer with [`Input::Persisted`] and this ticket.
    Persist {
        /// What to write.
        write: Write,
        /// Which answer the core waits for.
        ticket: Ticket,
    },
    /// Send a dispatch envelope (jobs) to one node.
    SendJob {
        /// The node's libp2p identity (its NATS subject too).
        peer: PeerId,
        /// The envelope.
        bytes: Vec<u8>,
    },
    /// Start running a job's attempt here; report with [`Command::JobFinished`].
    Execute(crate::jobs::Run),
    /// Stop a run started by [`Effect::Execute`] (its result, if any, is ignored).
    Abort {
        /// Job id.
        job_id: String,
        /// The run's fence.
        fence: u64,
    },
    /// Record what an attempt on a worker cost (the egress ledger, where one is kept).
    Contribution(Box<crate::jobs::Contribution>),
    /// Publish an event.
    Emit(Event),
    /// Answer a command.
    Reply(CommandId, Result<Reply, NodeError>),
    /// Readers should see the state as it is now ([`NodeCore::snapshot`]).
    Snapshot,
    /// Feed [`Input::Timer`] at this time (ms), replacing any earlier request.
    WakeAt(u64),
}

/// State to persist, each a file of its own (written whole, atomically).
#[derive(Debug, Clone)]
pub enum Write {
    /// `hierarchy.json`.
    Hierarchy(Hierarchy),
    /// The registry: this node's advert sequence (never lower than before), the members whose
    /// advert changed, the ones removed.
    Registry {
        /// The highest advert `seq` signed (or about to be).
        self_seq: u64,
        /// Members to write.
        upsert: Vec<StoredMember>,
        /// Members to delete.
        remove: Vec<NodeId>,
    },
    /// `roster.json`.
    Roster(Roster),
    /// `policy.json`.
    Policy(StoredPolicy),
    /// `capsules.json`.
    Capsules(Value),
    /// `governor.json`.
    Governor(Governor),
    /// One job, in the jobs store.
    Job(Box<crate::jobs::JobRecord>),
}

/// What to do once a write finished.
type Then = Box<dyn FnOnce(&mut NodeCore, Result<(), String>, u64) + Send>;

/// The liveness mode, from the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bus {
    /// The libp2p mesh: sync with one peer, probe the watched nodes.
    Mesh,
    /// A broker: sync with everyone, broadcast heartbeats.
    Broker,
}

/// When the periodic duties are next due (ms).
#[derive(Debug, Clone, Copy, Default)]
struct Timers {
    tick: u64,
    beat: u64,
    advert: u64,
    sync: u64,
}

/// One node's decisions. See the module docs.
pub struct NodeCore {
    key: NodeKey,
    public_b64: String,
    workspace: String,
    ttl_ms: u64,
    advertise_every_ms: u64,
    beat_every_ms: u64,
    capabilities: Map<String, Value>,
    bus_name: String,
    queue: String,
    bus: Option<Bus>,
    /// The broker URL (NATS), for events.
    broker: Option<String>,
    id: NodeId,
    id_source: IdSource,
    hierarchy: Arc<Hierarchy>,
    addresses: Vec<String>,
    local: Option<NodeRecord>,
    protocol: Protocol,
    roster: Arc<Roster>,
    capsules: Arc<CapsuleSet>,
    trust: Arc<TrustStore>,
    governor: Arc<Governor>,
    /// Capsule changes kept in memory, not yet written (quiet renewals, a failed write).
    capsules_dirty: bool,
    /// At the Home: why a new policy document is wanted (signed by the next tick it may).
    policy_pending: Option<String>,
    /// When the Home last signed one.
    last_policy_ms: Option<u64>,
    /// Remote nodes whose advertised bus or queue differs from ours, as last reported.
    mismatched: BTreeMap<NodeId, (String, String)>,
    /// The Home claims last reported (ids), so a conflict is reported once.
    reported_homes: Vec<String>,
    /// When this node last reported a reset connection to each node.
    reported: BTreeMap<NodeId, u64>,
    /// When a sync was last asked of each peer (`None`: of everyone, on NATS).
    sync_asked: BTreeMap<Option<PeerId>, u64>,
    /// Nodes this node asked for proof of life on another's behalf, and when.
    vouched: BTreeMap<NodeId, u64>,
    /// Peers of this workspace connected now (libp2p).
    connected: std::collections::BTreeSet<PeerId>,
    /// The peer the last periodic sync went to.
    sync_turn: Option<PeerId>,
    /// Nodes judged down over the mesh, being redialled: since when, last dial.
    redialling: BTreeMap<NodeId, (u64, u64)>,
    counters: Counters,
    rejections: RejectionLimit,
    /// How many new nodes each sender may still bring.
    newcomers: newcomers::Newcomers,
    /// What gossip is worth checking (on NATS the transport sheds before the node).
    shedder: crate::transport::shed::Shedder,
    /// Each remote node's key as of a membership generation (rebuilt only when members came or
    /// went), for readers that check relayed events.
    keys: (u64, Arc<BTreeMap<NodeId, [u8; 32]>>),
    /// Whether the bus can reach anyone (false while the broker is away).
    linked: bool,
    last_flush_ms: u64,
    snapshot_dirty: bool,
    timers: Timers,
    /// The earliest deadline when the wake was last asked for, and the wake asked for: the
    /// same, or the time of asking when that deadline had already passed (a timer is late
    /// only from when it was asked for).
    wake: Option<(u64, u64)>,
    /// How late this node's own timers have been firing.
    lateness: Lateness,
    /// The jobs this node owns.
    ledger: crate::jobs::Ledger,
    /// The attempts it runs for its Home.
    worker: crate::jobs::Worker,
    jobs_config: crate::jobs::JobsConfig,
    /// The executors here and their health.
    runtimes: crate::jobs::Runtimes,
    /// A job changed since the last snapshot.
    jobs_dirty: bool,
    pending: BTreeMap<Ticket, Then>,
    next_ticket: u64,
    /// Effects of the input being handled.
    out: Vec<Effect>,
}

impl std::fmt::Debug for NodeCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCore")
            .field("id", &self.id)
            .field("members", &self.protocol.membership().members().len())
            .field("pending_writes", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl NodeCore {
    /// A node configured by `config` with the state it restored. Nothing happens until
    /// [`Input::Start`].
    pub fn new(config: &NodeConfig, restored: Restored) -> Self {
        let Restored { hierarchy, registry, roster, policy, governor, capsules, trust, jobs } =
            restored;
        let (env_id, config_id) = match &config.explicit_id {
            Some((id, IdSource::Env)) => (Some(id.clone()), None),
            Some((id, _)) => (None, Some(id.clone())),
            None => (None, None),
        };
        let (id, id_source) = node_id::resolve(
            env_id,
            config_id,
            hierarchy.assigned_id.clone(),
            config.hostname.as_deref(),
        );
        let federation = config.federation.as_ref();
        let bus = federation.map(|f| match f.bus {
            BusConfig::Libp2p(_) => Bus::Mesh,
            BusConfig::Nats(_) => Bus::Broker,
        });
        let mut membership_config = federation
            .map_or_else(|| MembershipConfig::new(&config.workspace), |f| f.membership.clone());
        // The mesh reaches single nodes, so liveness is probed; a broker hears everything, so
        // heartbeats are broadcast (docs/protocol.md, "Liveness").
        membership_config.observers = match bus {
            Some(Bus::Mesh) => {
                Some(membership_config.observers.unwrap_or(membership::DEFAULT_OBSERVERS))
            }
            _ => None,
        };
        let mut protocol =
            Protocol::new(config.key.clone(), id.clone(), membership_config, registry.self_seq);
        protocol.membership_mut().restore(registry.nodes);
        if let Some(warning) = protocol.policy_mut().restore(policy) {
            tracing::warn!("{warning}");
        }
        // The restored registry already follows the roster it was built under.
        let _ = protocol.apply_roster();
        Self {
            public_b64: config.key.public_b64(),
            key: config.key.clone(),
            workspace: config.workspace.clone(),
            ttl_ms: duration_ms(config.ttl),
            advertise_every_ms: duration_ms(config.advertise_interval).max(1_000),
            beat_every_ms: federation.map_or(3_600_000, |f| duration_ms(f.heartbeat_interval)),
            capabilities: config.capabilities.clone(),
            bus_name: config.bus.clone(),
            queue: config.queue.clone(),
            bus,
            broker: federation.and_then(|f| match &f.bus {
                BusConfig::Nats(nats) => Some(nats.effective_url()),
                BusConfig::Libp2p(_) => None,
            }),
            id,
            id_source,
            hierarchy: Arc::new(hierarchy),
            addresses: Vec::new(),
            local: None,
            protocol,
            roster: Arc::new(roster),
            capsules: Arc::new(capsules),
            trust: Arc::new(trust),
            governor: Arc::new(governor),
            capsules_dirty: false,
            policy_pending: None,
            last_policy_ms: None,
            mismatched: BTreeMap::new(),
            reported_homes: Vec::new(),
            reported: BTreeMap::new(),
            sync_asked: BTreeMap::new(),
            vouched: BTreeMap::new(),
            connected: Default::default(),
            sync_turn: None,
            redialling: BTreeMap::new(),
            counters: Counters::default(),
            rejections: RejectionLimit::default(),
            newcomers: newcomers::Newcomers::default(),
            shedder: Default::default(),
            keys: (u64::MAX, Arc::default()),
            linked: bus != Some(Bus::Broker),
            last_flush_ms: 0,
            snapshot_dirty: true,
            timers: Timers::default(),
            wake: None,
            lateness: Lateness::default(),
            ledger: crate::jobs::Ledger::new(config.jobs.clone(), jobs),
            worker: crate::jobs::Worker::new(config.jobs.clone()),
            jobs_config: config.jobs.clone(),
            runtimes: crate::jobs::Runtimes::new(
                config.jobs.runtimes.clone(),
                config.jobs.runtime_budget,
            ),
            jobs_dirty: false,
            pending: BTreeMap::new(),
            next_ticket: 0,
            out: Vec::new(),
        }
    }

    /// Handles one input at `now_ms` (wall clock); returns what to do, in order.
    pub fn handle(&mut self, input: Input, now_ms: u64) -> Vec<Effect> {
        match input {
            Input::Start { addresses } => self.start(addresses, now_ms),
            Input::Message { bytes, via, opened } => self.on_message(bytes, via, opened, now_ms),
            Input::Connected(peer) => self.on_connected(peer, now_ms),
            Input::Disconnected { peer, ours } => self.on_disconnected(peer, ours, now_ms),
            Input::Unreachable(peer) => self.on_unreachable(peer, now_ms),
            Input::Link(up) => self.on_link(up, now_ms),
            Input::SyncRequest { from, request, reply } => {
                self.on_sync_request(from, request, reply, now_ms)
            }
            Input::SyncResponse { from, response } => self.on_answer(from, response, now_ms),
            Input::Addresses(addresses) => self.on_addresses(addresses, now_ms),
            Input::JobMessage { bytes, from, opened } => {
                self.on_job_message(&bytes, from, opened, now_ms)
            }
            Input::JobUndelivered(peer) => self.on_job_undelivered(peer, now_ms),
            Input::Command(id, command) => self.command(id, command, now_ms),
            Input::Persisted(ticket, result) => {
                if let Some(then) = self.pending.remove(&ticket) {
                    then(self, result, now_ms);
                }
            }
            Input::Timer => {
                // The executor's wake is spent: ask again even for the same time (a deadline
                // the timer fired a millisecond short of is still due).
                let asked = self.wake.take().map(|(_, asked)| asked);
                self.on_timer(asked, now_ms);
            }
            Input::Stop => self.stop(now_ms),
        }
        let generation = self.protocol.membership().generation();
        if generation != self.keys.0 {
            let members = self.protocol.membership().members();
            let keys = members.iter().map(|(id, m)| (id.clone(), m.key)).collect();
            self.keys = (generation, Arc::new(keys));
        }
        // What the protocol has for everyone (suspicion reports, refutations, proofs).
        for envelope in self.protocol.take_outbox() {
            self.out.push(Effect::Publish(envelope));
        }
        // An unchanged deadline is not asked for again: a timer's lateness is measured from
        // when it was first asked for, so a stall shows even when a message is handled first.
        // A deadline that had already passed when it first came up (a renewal due since a
        // worker last held nothing) is asked for now, not taken for a stall.
        let due = self.next_wake();
        if due != self.wake.map(|(due, _)| due) {
            self.wake = due.map(|due| (due, due.max(now_ms)));
            if let Some((_, at)) = self.wake {
                self.out.push(Effect::WakeAt(at));
            }
        }
        std::mem::take(&mut self.out)
    }

    /// This node's id.
    pub fn id(&self) -> &NodeId {
        &self.id
    }

    /// This node's hierarchy role.
    pub fn role(&self) -> Role {
        self.hierarchy.role
    }

    /// The protocol state (membership and policy), for inspection.
    pub fn protocol(&self) -> &Protocol {
        &self.protocol
    }

    /// What this node has decided so far.
    pub fn counters(&self) -> Counters {
        let (reports, refutations) = self.protocol.signed_reports();
        Counters { reports, refutations, ..self.counters }
    }

    /// The node as readers see it, with the transport's own state in `network`.
    pub fn snapshot(&self, mut network: NetworkStatus) -> Snapshot {
        let mut nodes: BTreeMap<NodeId, NodeRecord> = self
            .protocol
            .membership()
            .members()
            .iter()
            .map(|(id, m)| (id.clone(), m.record.clone()))
            .collect();
        let keys = self.keys.1.clone();
        if let Some(local) = &self.local {
            nodes.insert(local.advert.id.clone(), local.clone());
        }
        if self.bus.is_none() {
            network.state = "disabled".to_owned();
        }
        network.bus = self.bus_name.clone();
        network.queue = self.queue.clone();
        network.mismatched = self
            .mismatched
            .iter()
            .map(|(id, (bus, queue))| Mismatch {
                id: id.to_string(),
                bus: bus.clone(),
                queue: queue.clone(),
            })
            .collect();
        let admission = if self.is_home() {
            self.protocol
                .membership()
                .members()
                .iter()
                .map(|(id, m)| (id.clone(), self.roster.status(id, &B64.encode(m.key))))
                .collect()
        } else {
            BTreeMap::new()
        };
        let home_claims = Some(self.home_claims()).filter(|c| c.len() > 1).unwrap_or_default();
        Snapshot {
            id: self.id.clone(),
            id_source: self.id_source,
            peer_id: self.key.peer_id().to_string(),
            public_key: self.public_b64.clone(),
            workspace: self.workspace.clone(),
            hierarchy: self.hierarchy.clone(),
            nodes,
            keys,
            ttl_ms: self.ttl_ms,
            network,
            admission,
            home_claims,
            policy: self.policy_view(),
            capsules: self.capsules.clone(),
            trust: self.trust.clone(),
            governor: self.governor.clone(),
            counters: self.counters(),
            slowdown: 1 + self.lateness.score,
            jobs: JobsStatus {
                rev: self.ledger.rev(),
                live: self.ledger.live(),
                queued: self.ledger.counts().0,
                running: self.ledger.counts().1,
                hosted: self.worker.hosted(),
                draining: self.worker.advert().is_some_and(|a| a.draining),
            },
            runtimes: self.runtimes.statuses(),
        }
    }

    /// Boot: the first advert, the Home's first document, dials to nodes remembered from
    /// before a restart (stale until they speak again, even when nobody lists this node as a
    /// bootstrap peer), and the timers.
    fn start(&mut self, addresses: Vec<String>, now: u64) {
        self.addresses = addresses;
        // Periodic duties start at a phase of their own per node, so nodes started together
        // do not probe or re-advertise in step.
        self.timers = Timers {
            tick: now + TICK_MS,
            beat: now + self.phase(b"beat", now, self.beat_every_ms),
            advert: now + self.phase(b"advert", now, self.advertise_every_ms),
            sync: now + SYNC_FIRST_MS,
        };
        self.reapply_home_capsules(now);
        self.worker.start(now);
        self.resume_jobs(now);
        self.advertise("boot", now, |_, _| {});
        self.want_policy("boot", now);
        if self.bus.is_some() {
            let dials: Vec<Effect> = self
                .protocol
                .membership()
                .members()
                .values()
                .map(|m| Effect::Dial(m.record.advert.addrs.clone()))
                .collect();
            self.out.extend(dials);
        }
    }

    /// A delay in `[1, period]` drawn from this node's key, `salt` and `now`: different per
    /// node and per start, yet the same for the same inputs (simulations replay exactly).
    fn phase(&self, salt: &[u8], now: u64, period: u64) -> u64 {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new()
            .chain_update(self.key.verifying_key().as_bytes())
            .chain_update(salt)
            .chain_update(now.to_be_bytes())
            .finalize();
        let mut first = [0; 8];
        first.copy_from_slice(&digest[..8]);
        1 + u64::from_be_bytes(first) % period.max(1)
    }

    /// A graceful stop: a signed goodbye, and whatever is not yet on disk.
    fn stop(&mut self, now: u64) {
        if self.bus.is_some() {
            let leave = self.protocol.leave(now);
            self.out.push(Effect::Publish(leave));
        }
        if self.protocol.membership().has_changes() {
            self.write_registry(self.protocol.seq(), now, |_, _| {});
        }
        if self.capsules_dirty {
            self.write_capsules(now);
        }
    }

    /// The periodic duties that are due. First, how late this timer is: a node that is itself
    /// slow (a busy machine, a stalled process) must not take its own slowness for the others'
    /// silence.
    fn on_timer(&mut self, asked: Option<u64>, now: u64) {
        if let Some(asked) = asked {
            let late = now.saturating_sub(asked);
            if late >= STALL_MS {
                tracing::warn!(
                    late_ms = late,
                    "this node was stalled; the silence it saw meanwhile is its own"
                );
                self.protocol.membership_mut().resume(now);
            }
            let slowdown = self.lateness.observe(late);
            self.protocol.membership_mut().set_slowdown(slowdown);
        }
        self.judge(now);
        // Leases and offers run out on time, not at the next tick.
        self.jobs_tick(now);
        if std::mem::take(&mut self.jobs_dirty) {
            self.snapshot_dirty = true;
        }
        if now >= self.timers.tick {
            self.timers.tick = now + TICK_MS;
            self.newcomers.expire(now);
            self.redial(now);
            self.authority_tick(now);
            if self.protocol.membership().has_changes()
                && now.saturating_sub(self.last_flush_ms) >= FLUSH_EVERY_MS
            {
                self.write_registry(self.protocol.seq(), now, |_, _| {});
            }
            if self.snapshot_dirty {
                self.publish_snapshot();
            }
        }
        if now >= self.timers.beat {
            self.timers.beat = next_period(self.timers.beat, self.beat_every_ms, now);
            if self.bus.is_some() {
                self.on_beat(now);
            }
        }
        if now >= self.timers.advert {
            self.timers.advert = now + self.advertise_every_ms;
            self.advertise("interval", now, |_, _| {});
        }
        if now >= self.timers.sync {
            self.timers.sync = now + SYNC_EVERY_MS;
            self.anti_entropy(now);
        }
    }

    /// The earliest of the periodic duties and the next health transition.
    fn next_wake(&self) -> Option<u64> {
        if self.timers.tick == 0 {
            return None;
        }
        let t = &self.timers;
        let mut wake = t.tick.min(t.advert);
        if self.bus.is_some() {
            wake = wake.min(t.beat);
        }
        for due in [
            self.protocol.next_deadline(),
            self.ledger.next_deadline(),
            self.worker.next_deadline(),
            self.runtimes.next_deadline(),
        ]
        .into_iter()
        .flatten()
        {
            wake = wake.min(due);
        }
        Some(wake)
    }

    /// Readers see the state now (before the events that describe it).
    fn publish_snapshot(&mut self) {
        self.snapshot_dirty = false;
        self.out.push(Effect::Snapshot);
    }

    fn emit(&mut self, event: Event) {
        self.out.push(Effect::Emit(event));
    }

    /// Writes `write`, then runs `then` with the outcome (at the time it is known).
    fn persist(
        &mut self,
        write: Write,
        then: impl FnOnce(&mut NodeCore, Result<(), String>, u64) + Send + 'static,
    ) {
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        self.pending.insert(ticket, Box::new(then));
        self.out.push(Effect::Persist { write, ticket });
    }

    /// Writes the registry with `self_seq` as the advert sequence; `then` learns whether it is
    /// on disk.
    fn write_registry(
        &mut self,
        self_seq: u64,
        now: u64,
        then: impl FnOnce(&mut NodeCore, bool) + Send + 'static,
    ) {
        let (upsert, remove) = self.protocol.membership_mut().take_changes();
        self.last_flush_ms = now;
        let retry = remove.clone();
        self.persist(Write::Registry { self_seq, upsert, remove }, move |core, result, _| {
            if let Err(e) = &result {
                tracing::warn!(error = %e, "could not persist the node registry");
                core.protocol.membership_mut().changes_lost(retry);
            }
            then(core, result.is_ok());
        });
    }

    /// Signs the next advert and sends it once its sequence number is on disk; records it
    /// locally; then runs `then`.
    fn advertise(
        &mut self,
        reason: &'static str,
        now: u64,
        then: impl FnOnce(&mut NodeCore, u64) + Send + 'static,
    ) {
        let seq = self.protocol.next_seq(now);
        // The sequence number must be on disk before anyone sees it.
        self.write_registry(seq, now, move |core, written| {
            if written {
                core.send_advert(seq, reason, now);
            } else {
                tracing::warn!("could not persist advert sequence; advert skipped");
            }
            then(core, now);
        });
    }

    fn send_advert(&mut self, seq: u64, reason: &str, now: u64) {
        let advert = self.local_advert(seq, now);
        let sealed = self.protocol.seal_advert(&advert);
        if sealed.len() > wire::MAX_ENVELOPE {
            tracing::warn!(
                bytes = sealed.len(),
                "advert exceeds the envelope limit; peers will refuse it"
            );
        }
        if self.bus.is_some() {
            self.out.push(Effect::Publish(sealed));
        }
        self.counters.adverts += 1;
        let record = NodeRecord {
            advert: Arc::new(advert),
            last_seen_ms: now,
            health: Health::Ok,
            local: true,
        };
        let changed = self.local.as_ref().is_none_or(|old| old.differs_from(&record));
        self.local = Some(record.clone());
        self.publish_snapshot();
        tracing::debug!(reason, seq, "advertised");
        self.emit(advert_event(&record.advert));
        if changed {
            self.emit(node_changed(&record, now, self.ttl_ms, None));
        }
    }

    fn local_advert(&self, seq: u64, now: u64) -> Advert {
        self.advert_as(&self.id, &self.hierarchy, seq, now)
    }

    /// This node's advert were it `id` with hierarchy `h`.
    fn advert_as(&self, id: &NodeId, h: &Hierarchy, seq: u64, now: u64) -> Advert {
        let mut capabilities = self.capabilities.clone();
        capabilities.insert("declared".into(), json!(h.capabilities));
        Advert {
            id: id.clone(),
            role: h.role,
            workspace: self.workspace.clone(),
            epoch: h.hello_epoch.unwrap_or(0),
            seq,
            advertised_ms: now,
            ttl_ms: self.ttl_ms,
            capabilities,
            tags: h.tags.clone(),
            models: None,
            health: Health::Ok,
            addrs: self.addresses.clone(),
            bus: self.bus_name.clone(),
            queue: self.queue.clone(),
            jobs: self.jobs_advert(),
            runtimes: self.runtimes.digests(),
        }
    }

    fn is_home(&self) -> bool {
        self.hierarchy.role == Role::Root
    }

    /// Every node advertising role `root`, this one included.
    fn home_claims(&self) -> Vec<HomeClaim> {
        let mut claims: Vec<HomeClaim> = self
            .protocol
            .membership()
            .members()
            .iter()
            .filter(|(_, m)| m.record.advert.role == Role::Root && m.record.health != Health::Left)
            .map(|(id, m)| HomeClaim { id: id.to_string(), key: B64.encode(m.key) })
            .collect();
        if self.is_home() {
            claims.push(HomeClaim { id: self.id.to_string(), key: self.public_b64.clone() });
        }
        claims.sort_by(|a, b| a.id.cmp(&b.id));
        claims
    }

    /// Reports (once per change) when more than one node advertises role `root`.
    fn check_home_claims(&mut self) {
        let claims = self.home_claims();
        let ids: Vec<String> = claims.iter().map(|c| c.id.clone()).collect();
        if ids == self.reported_homes {
            return;
        }
        self.reported_homes = ids;
        if claims.len() > 1 {
            tracing::warn!(homes = ?self.reported_homes, "more than one node claims to be the Home");
            self.emit(Event::HomeConflict(crate::events::HomeConflict { homes: claims }));
        }
    }
}

/// The `cluster.node.advertise` event for `advert`.
fn advert_event(advert: &Advert) -> Event {
    Event::NodeAdvertise(crate::events::AdvertEvent {
        advert: advert.clone(),
        advertised: crate::time::rfc3339_ms(advert.advertised_ms),
    })
}

/// The `cluster.node.changed` event for `record` at `now`.
fn node_changed(record: &NodeRecord, now: u64, ttl_ms: u64, previous: Option<Health>) -> Event {
    Event::NodeChanged(crate::events::NodeChanged {
        node: record.view(now, ttl_ms),
        previous_health: previous,
        evicted: false,
    })
}

/// The next due time of a period that was due at `due`: one period on, or a period from `now`
/// when the executor fell behind by more than that.
fn next_period(due: u64, period: u64, now: u64) -> u64 {
    let next = due + period;
    if next <= now { now + period } else { next }
}

fn duration_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// How late this node's timers fire (see [`LATE_MS`]).
#[derive(Debug, Default)]
struct Lateness {
    /// 0: on time.
    score: u64,
    /// Timers on time in a row.
    on_time: u32,
}

impl Lateness {
    /// Records a timer `late_ms` late; returns the factor to stretch silence thresholds by.
    fn observe(&mut self, late_ms: u64) -> u64 {
        let before = self.score;
        if late_ms >= LATE_MS {
            // A second late counts one more: a long stall is a long way from healthy.
            self.score = (self.score + 1 + late_ms / 1_000).min(MAX_SLOWDOWN);
            self.on_time = 0;
        } else {
            self.on_time += 1;
            if self.on_time >= RECOVER_AFTER && self.score > 0 {
                self.score -= 1;
                self.on_time = 0;
            }
        }
        match (before, self.score) {
            (0, s) if s > 0 => tracing::warn!(
                late_ms,
                "this node is slow: it judges others' silence more leniently"
            ),
            (b, 0) if b > 0 => tracing::info!("this node is on time again"),
            _ => {}
        }
        1 + self.score
    }
}

/// Caps `cluster.event.rejected` so a flood of bad messages cannot flood the journal.
#[derive(Debug, Default)]
struct RejectionLimit {
    window_start: Option<u64>,
    admitted: u32,
    suppressed: u64,
}

impl RejectionLimit {
    /// `Some(suppressed since the last admitted event)` when this one may be emitted.
    fn admit(&mut self, now: u64) -> Option<u64> {
        if self.window_start.is_none_or(|s| now.saturating_sub(s) >= REJECTION_WINDOW_MS) {
            self.window_start = Some(now);
            self.admitted = 0;
        }
        if self.admitted >= REJECTIONS_PER_WINDOW {
            self.suppressed += 1;
            return None;
        }
        self.admitted += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}
