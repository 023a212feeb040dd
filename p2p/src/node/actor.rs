//! The actor behind [`super::NodeHandle`]: one task that owns a [`NodeCore`], the transport and
//! the state files, and carries out the core's effects. It decides nothing itself: it turns
//! what happens (commands, bus events, the time the core asked to be woken) into inputs, and
//! the effects into sends, writes, events, replies and snapshots.

use std::{
    collections::{BTreeMap, VecDeque},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::{BusConfig, Call, FederationConfig, NodeConfig, NodeError, Request, Snapshot};
use super::{
    jobs_store::{JobReader, JobStore},
    registry::{RegistryStore, RegistryWrite, Written},
};
use crate::{
    capsule::{CapsuleSet, TrustStore},
    core::{
        ClusterStore, Command, CommandId, Effect, Input, NodeCore, Reply, ReplyTo, Restored,
        Ticket, Traced, Write,
    },
    events::EventTx,
    persist,
    time::now_ms,
    transport::{
        NetworkStatus, SyncReply, Transport, TransportEvent,
        nats::{self, NatsBus},
        net::Net,
    },
};

pub(super) const COMMAND_QUEUE: usize = 64;
/// How long a graceful stop keeps the transport running so the leave goes out.
const LEAVE_FLUSH: Duration = Duration::from_millis(300);
/// How long a graceful stop waits for the registry writes in flight.
const WRITES_FLUSH: Duration = Duration::from_secs(5);

const HIERARCHY_FILE: &str = "hierarchy.json";
const ROSTER_FILE: &str = "roster.json";
const POLICY_FILE: &str = "policy.json";
const CAPSULES_FILE: &str = "capsules.json";
const GOVERNOR_FILE: &str = "governor.json";

pub(super) struct Actor {
    core: NodeCore,
    transport: Option<Transport>,
    events: EventTx,
    state_dir: PathBuf,
    /// The registry's writer, and the outcomes of its writes.
    registry: (mpsc::UnboundedSender<RegistryWrite>, mpsc::UnboundedReceiver<Written>),
    /// Registry writes in flight.
    writing: usize,
    jobs: JobStore,
    /// Where runs go.
    executor: Option<mpsc::UnboundedSender<crate::jobs::Exec>>,
    /// Where contributions go (the daemon's egress ledger).
    contributions: Option<mpsc::UnboundedSender<crate::jobs::Contribution>>,
    /// Runs that could not be handed to an executor, to report as failed.
    unrun: Vec<crate::jobs::Finished>,
    capsule_trust: Option<PathBuf>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    /// Where the core asked to be woken.
    wake: Option<Instant>,
    /// Commands waiting for their reply.
    calls: BTreeMap<CommandId, oneshot::Sender<Result<Reply, NodeError>>>,
    next_call: u64,
    /// Sync requests waiting for their answer.
    replies: BTreeMap<ReplyTo, SyncReply>,
    next_reply: u64,
    trace: Option<mpsc::UnboundedSender<Traced>>,
}

impl Actor {
    /// Loads state, starts the transport, runs the core's start (the first advert is out and
    /// the first snapshot published when this returns).
    pub(super) async fn start(
        config: NodeConfig,
        events: EventTx,
        metrics: Option<&mut prometheus_client::registry::Registry>,
    ) -> std::io::Result<(Self, watch::Receiver<Arc<Snapshot>>, JobReader)> {
        let (registry, stored) = RegistryStore::open(&config.state_dir)?;
        let (jobs, reader, stored_jobs) = JobStore::open(&config.state_dir, now_ms())?;
        let mut restored = restore(&config, stored)?;
        restored.jobs = stored_jobs;
        let core = NodeCore::new(&config, restored);
        let transport = match &config.federation {
            Some(federation) => Some(start_transport(&config, federation, metrics).await?),
            None => None,
        };
        let status = network_status(transport.as_ref());
        let (snapshot, rx) = watch::channel(Arc::new(core.snapshot(status)));
        let mut actor = Self {
            core,
            transport,
            events,
            state_dir: config.state_dir,
            registry: registry.writer(),
            writing: 0,
            jobs,
            executor: config.executor,
            contributions: config.contributions,
            unrun: Vec::new(),
            capsule_trust: config.capsule_trust,
            snapshot,
            wake: None,
            calls: BTreeMap::new(),
            next_call: 0,
            replies: BTreeMap::new(),
            next_reply: 0,
            trace: config.trace,
        };
        let addresses = actor.transport.as_ref().map(Transport::addresses).unwrap_or_default();
        actor.input(Input::Start { addresses }).await;
        actor.settle().await;
        actor.publish_snapshot();
        Ok((actor, rx, reader))
    }

    pub(super) async fn run(
        mut self,
        mut commands: mpsc::Receiver<Call>,
        cancel: CancellationToken,
    ) {
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Some((request, reply)) = commands.recv() => self.request(request, reply).await,
                Some((ticket, result)) = self.registry.1.recv() => self.written(ticket, result).await,
                event = next_event(&mut self.transport) => self.on_transport(event).await,
                () = sleep_until_some(self.wake) => {
                    self.wake = None;
                    if let Some(transport) = &mut self.transport {
                        transport.maintain();
                    }
                    self.input(Input::Timer).await;
                }
            }
        }
        self.stop().await;
    }

    async fn stop(&mut self) {
        self.input(Input::Stop).await;
        if tokio::time::timeout(WRITES_FLUSH, self.settle()).await.is_err() {
            tracing::warn!(
                writes = self.writing,
                "stopped before the registry's last writes finished"
            );
        }
        if self.transport.is_some() {
            let deadline = Instant::now() + LEAVE_FLUSH;
            while tokio::time::timeout_at(deadline, next_event(&mut self.transport)).await.is_ok() {
            }
        }
        tracing::debug!("node actor stopped");
    }

    async fn request(
        &mut self,
        request: Request,
        reply: oneshot::Sender<Result<Reply, NodeError>>,
    ) {
        let command = match request {
            Request::Core(command) => command,
            Request::ReloadTrust => Command::SetTrust(read_trust(self.capsule_trust.clone()).await),
        };
        let id = CommandId(self.next_call);
        self.next_call += 1;
        self.calls.insert(id, reply);
        self.input(Input::Command(id, command)).await;
        self.answer_stragglers();
    }

    /// A registry write finished: the core learns its outcome.
    async fn written(&mut self, ticket: Ticket, result: Result<(), String>) {
        self.writing = self.writing.saturating_sub(1);
        self.input(Input::Persisted(ticket, result)).await;
        self.answer_stragglers();
    }

    /// Waits for the registry writes in flight (and those their outcomes lead to).
    async fn settle(&mut self) {
        while self.writing > 0 {
            let Some((ticket, result)) = self.registry.1.recv().await else { return };
            self.written(ticket, result).await;
        }
    }

    /// The core answers every command once the writes it waits for are done; a command still
    /// unanswered when none is in flight (a bug in the core) must not wait forever.
    fn answer_stragglers(&mut self) {
        if self.writing > 0 {
            return;
        }
        for (_, reply) in std::mem::take(&mut self.calls) {
            tracing::error!("the node core left a command unanswered");
            let _ = reply.send(Err(NodeError::Stopped));
        }
    }

    async fn on_transport(&mut self, event: TransportEvent) {
        let input = match event {
            TransportEvent::Message { bytes, via, opened } => Input::Message { bytes, via, opened },
            TransportEvent::Connected(peer) => Input::Connected(peer),
            TransportEvent::Disconnected { peer, ours } => Input::Disconnected { peer, ours },
            TransportEvent::Unreachable(peer) => Input::Unreachable(peer),
            TransportEvent::Link(up) => Input::Link(up),
            TransportEvent::SyncRequest { from, request, reply } => {
                let to = ReplyTo(self.next_reply);
                self.next_reply += 1;
                self.replies.insert(to, reply);
                self.input(Input::SyncRequest { from, request, reply: to }).await;
                // Unanswered (nothing to say): drop the channel.
                self.replies.remove(&to);
                return;
            }
            TransportEvent::SyncResponse { from, response } => {
                Input::SyncResponse { from, response }
            }
            TransportEvent::JobMessage { bytes, from, opened } => {
                Input::JobMessage { bytes, from, opened }
            }
            TransportEvent::JobUndelivered(peer) => Input::JobUndelivered(peer),
            TransportEvent::Listening => {
                let addresses =
                    self.transport.as_ref().map(Transport::addresses).unwrap_or_default();
                Input::Addresses(addresses)
            }
            TransportEvent::Internal => return,
        };
        self.input(input).await;
    }

    /// Hands `input` to the core and carries out the effects, in order. A registry write goes
    /// to the registry's writer and its outcome comes back later (see [`Actor::written`]);
    /// another write's outcome goes back to the core at once, and what that brings is carried
    /// out before the rest.
    async fn input(&mut self, input: Input) {
        let mut next = Some(input);
        while let Some(input) = next.take() {
            let mut queue: VecDeque<Effect> = self.handle(input).into();
            while let Some(effect) = queue.pop_front() {
                if let Some((ticket, result)) = self.execute(effect).await {
                    let follow = self.handle(Input::Persisted(ticket, result));
                    for effect in follow.into_iter().rev() {
                        queue.push_front(effect);
                    }
                }
            }
            // A run no executor took fails at once (its reply goes nowhere).
            if let Some(done) = self.unrun.pop() {
                let id = CommandId(u64::MAX);
                next = Some(Input::Command(id, Command::JobFinished(Box::new(done))));
            }
        }
    }

    /// One call of the core, recorded when tracing.
    fn handle(&mut self, input: Input) -> Vec<Effect> {
        let now = now_ms();
        let Some(trace) = &self.trace else { return self.core.handle(input, now) };
        let recorded = input.clone();
        let effects = self.core.handle(input, now);
        let text = effects.iter().map(|e| format!("{e:?}")).collect();
        let _ = trace.send(Traced { now_ms: now, input: recorded, effects: text });
        effects
    }

    /// Carries out one effect; a write returns its ticket and outcome.
    async fn execute(
        &mut self,
        effect: Effect,
    ) -> Option<(crate::core::Ticket, Result<(), String>)> {
        match effect {
            Effect::Publish(bytes) => {
                if let Some(transport) = &mut self.transport {
                    transport.publish(bytes).await;
                }
            }
            Effect::Validate { via, verdict } => {
                if let Some(transport) = &mut self.transport {
                    transport.report(&via, verdict);
                }
            }
            Effect::Request { peer, request } => {
                if let Some(transport) = &mut self.transport {
                    transport.request_sync(peer, request).await;
                }
            }
            Effect::Respond { to, response } => {
                if let (Some(transport), Some(reply)) =
                    (&mut self.transport, self.replies.remove(&to))
                {
                    transport.respond(reply, response).await;
                }
            }
            Effect::Dial(addrs) => {
                if let Some(transport) = &mut self.transport {
                    transport.dial_advertised(&addrs);
                }
            }
            Effect::Reset(peer) => {
                if let Some(transport) = &mut self.transport {
                    transport.reset(peer);
                }
            }
            Effect::Redial { peer, addrs } => {
                if let Some(transport) = &mut self.transport {
                    transport.redial(peer, &addrs);
                }
            }
            Effect::Persist { write, ticket } => {
                let result = match write {
                    Write::Registry { self_seq, upsert, remove } => {
                        let write = RegistryWrite { ticket, self_seq, upsert, remove };
                        if self.registry.0.send(write).is_ok() {
                            self.writing += 1;
                            return None;
                        }
                        Err(std::io::Error::other("the registry's writer has stopped"))
                    }
                    Write::Job(record) => self.jobs.write(&record),
                    other => write_state(self.state_dir.clone(), other).await,
                };
                return Some((ticket, result.map_err(|e| e.to_string())));
            }
            Effect::SendJob { peer, bytes } => {
                if let Some(transport) = &mut self.transport {
                    transport.send_job(peer, bytes).await;
                }
            }
            Effect::Execute(run) => {
                let now = now_ms();
                let failed = crate::jobs::Finished {
                    job_id: run.job_id.clone(),
                    fence: run.fence,
                    ok: false,
                    output: serde_json::json!({"error": "this node has no executor"}),
                    started_ms: now,
                    finished_ms: now,
                    fault: Some("no executor".into()),
                    cpu_ms: None,
                };
                let sent = self
                    .executor
                    .as_ref()
                    .is_some_and(|e| e.send(crate::jobs::Exec::Run(run)).is_ok());
                if !sent {
                    self.unrun.push(failed);
                }
            }
            Effect::Abort { job_id, fence } => {
                if let Some(executor) = &self.executor {
                    let _ = executor.send(crate::jobs::Exec::Abort { job_id, fence });
                }
            }
            Effect::Contribution(c) => {
                if let Some(ledger) = &self.contributions {
                    let _ = ledger.send(*c);
                }
            }
            Effect::Emit(event) => self.events.emit(event).await,
            Effect::Reply(id, result) => {
                if let Some(reply) = self.calls.remove(&id) {
                    let _ = reply.send(result);
                }
            }
            Effect::Snapshot => self.publish_snapshot(),
            Effect::WakeAt(at_ms) => {
                let wait = Duration::from_millis(at_ms.saturating_sub(now_ms()));
                self.wake = Some(Instant::now() + wait);
            }
        }
        None
    }

    fn publish_snapshot(&mut self) {
        let status = network_status(self.transport.as_ref());
        self.snapshot.send_replace(Arc::new(self.core.snapshot(status)));
    }
}

impl std::fmt::Debug for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Actor").field("core", &self.core).finish_non_exhaustive()
    }
}

/// Reads the trust store file off the actor's thread; no file configured is an empty store.
async fn read_trust(path: Option<PathBuf>) -> Result<TrustStore, String> {
    let Some(path) = path else { return Ok(TrustStore::default()) };
    tokio::task::spawn_blocking(move || TrustStore::load(&path)).await.map_err(|e| e.to_string())?
}

/// Writes one state file atomically, off the async worker threads.
async fn write_state(dir: PathBuf, write: Write) -> std::io::Result<()> {
    match write {
        Write::Hierarchy(h) => persist::save_json_off_thread(dir.join(HIERARCHY_FILE), h).await,
        // Written by the registry and jobs stores.
        Write::Registry { .. } | Write::Job(_) => Ok(()),
        Write::Roster(r) => persist::save_json_off_thread(dir.join(ROSTER_FILE), r).await,
        Write::Policy(p) => persist::save_json_off_thread(dir.join(POLICY_FILE), p).await,
        Write::Capsules(c) => persist::save_json_off_thread(dir.join(CAPSULES_FILE), c).await,
        Write::Governor(g) => persist::save_json_off_thread(dir.join(GOVERNOR_FILE), g).await,
    }
}

/// Reads the state files of `config.state_dir` beside the registry (missing files are empty state).
fn restore(config: &NodeConfig, registry: ClusterStore) -> std::io::Result<Restored> {
    let dir = &config.state_dir;
    let load = |file: &str| -> std::io::Result<Option<serde_json::Value>> {
        persist::load_json(&dir.join(file))
    };
    let stored_capsules = load(CAPSULES_FILE)?.unwrap_or_default();
    let (capsules, dropped) =
        CapsuleSet::restore(stored_capsules, now_ms()).map_err(std::io::Error::other)?;
    for reason in dropped {
        tracing::warn!(%reason, "a stored capsule no longer parses; dropped");
    }
    let trust = match &config.capsule_trust {
        Some(path) => TrustStore::load(path).map_err(std::io::Error::other)?,
        None => TrustStore::default(),
    };
    if let Some(path) = config.capsule_trust.as_ref().filter(|_| trust.is_empty()) {
        // No file is the usual state of a node that uses no capsules; an empty one is a
        // mistake worth a warning.
        if path.exists() {
            tracing::warn!(path = %path.display(), "the capsule trust store lists no issuer: every capsule will be refused");
        } else {
            tracing::info!(path = %path.display(), "no capsule trust store: capsules will be refused");
        }
    }
    Ok(Restored {
        hierarchy: load_file(dir, HIERARCHY_FILE)?,
        registry,
        roster: load_file(dir, ROSTER_FILE)?,
        policy: load_file(dir, POLICY_FILE)?,
        governor: load_file(dir, GOVERNOR_FILE)?,
        capsules,
        trust,
        jobs: Default::default(),
    })
}

fn load_file<T: serde::de::DeserializeOwned + Default>(
    dir: &Path,
    file: &str,
) -> std::io::Result<T> {
    Ok(persist::load_json(&dir.join(file))?.unwrap_or_default())
}

fn network_status(transport: Option<&Transport>) -> NetworkStatus {
    transport.map(Transport::status).unwrap_or_default()
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn next_event(transport: &mut Option<Transport>) -> TransportEvent {
    match transport {
        Some(transport) => transport.next().await,
        None => std::future::pending().await,
    }
}

/// Connects the bus the configuration names.
async fn start_transport(
    config: &NodeConfig,
    federation: &FederationConfig,
    metrics: Option<&mut prometheus_client::registry::Registry>,
) -> std::io::Result<Transport> {
    Ok(match &federation.bus {
        BusConfig::Libp2p(net) => {
            let mut transport =
                Net::start(&config.key, net, metrics).map_err(std::io::Error::other)?;
            transport.wait_listening(net.listen.len(), Duration::from_secs(5)).await;
            Transport::Libp2p(Box::new(transport))
        }
        BusConfig::Nats(nats_config) => {
            let (client, links) =
                nats::connect(nats_config).await.map_err(std::io::Error::other)?;
            let url = nats_config.effective_url();
            let bus = NatsBus::start(client, links, &url, &config.workspace, config.key.peer_id())
                .await
                .map_err(std::io::Error::other)?;
            Transport::Nats(Box::new(bus))
        }
    })
}
