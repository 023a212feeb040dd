//! The node actor: owns the hierarchy, the registry and (later) the transport. Handlers talk to
//! it through a [`NodeHandle`]; readers get an `Arc<Snapshot>` from a watch channel, never a lock.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
    time::{Instant, MissedTickBehavior},
};
use tokio_util::sync::CancellationToken;

use crate::{
    cluster::{Advert, ClusterView, Health, NodeRecord},
    events::EventTx,
    hierarchy::{
        CoreAccept, CoreHello, CoreOffer, HelloOutcome, Hierarchy, HierarchyError, RoleChange,
    },
    identity::NodeKey,
    node_id::{self, IdSource, NodeId},
    persist,
    time::{now_ms, rfc3339_ms},
};

const HIERARCHY_FILE: &str = "hierarchy.json";
const CLUSTER_FILE: &str = "cluster_nodes.json";
const COMMAND_QUEUE: usize = 64;

/// Everything the actor needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The node key (signs adverts; the libp2p identity).
    pub key: NodeKey,
    /// An explicitly configured id and where it came from (`Env` or `Config`).
    pub explicit_id: Option<(NodeId, IdSource)>,
    /// The host name, the fallback id source.
    pub hostname: Option<String>,
    /// Workspace this node belongs to.
    pub workspace: String,
    /// Directory for `hierarchy.json` and `cluster_nodes.json`.
    pub state_dir: PathBuf,
    /// Re-advertise at least this often.
    pub advertise_interval: Duration,
    /// A node silent for longer is shown `stale`.
    pub ttl: Duration,
    /// Probe results advertised under `capabilities`.
    pub capabilities: Map<String, Value>,
    /// `[cluster] bus`.
    pub bus: String,
    /// `[cluster] queue`.
    pub queue: String,
}

/// A refused or failed node command.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The request was invalid; nothing changed.
    #[error(transparent)]
    Rejected(#[from] HierarchyError),
    /// The change could not be persisted; nothing changed.
    #[error("could not persist node state: {0}")]
    Persist(String),
    /// The actor has stopped (shutdown in progress).
    #[error("node is shutting down")]
    Stopped,
}

/// Persisted registry state (`cluster_nodes.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct ClusterStore {
    /// Highest `seq` this node has signed.
    self_seq: u64,
}

/// The node as readers see it.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The effective node id.
    pub id: NodeId,
    /// Where it came from.
    pub id_source: IdSource,
    /// libp2p PeerId of the node key.
    pub peer_id: String,
    /// Base64 public key.
    pub public_key: String,
    /// Workspace.
    pub workspace: String,
    /// Hierarchy state.
    pub hierarchy: Hierarchy,
    /// Registry, keyed (and so sorted) by id.
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// Staleness threshold.
    pub ttl_ms: u64,
}

impl Snapshot {
    /// The `/state/cluster` view at `now_ms`.
    pub fn cluster_view(&self, now_ms: u64) -> ClusterView {
        ClusterView {
            nodes: self
                .nodes
                .values()
                .map(|r| r.view(now_ms, self.ttl_ms))
                .collect(),
            generated: Some(rfc3339_ms(now_ms)),
            generated_ms: Some(now_ms),
            ttl_seconds: Some(self.ttl_ms / 1000),
        }
    }
}

enum Command {
    SetRole(String, oneshot::Sender<Result<RoleChange, NodeError>>),
    Hello(CoreHello, oneshot::Sender<Result<HelloOutcome, NodeError>>),
    Offer(CoreOffer, oneshot::Sender<Result<bool, NodeError>>),
    Accept(CoreAccept, oneshot::Sender<Result<bool, NodeError>>),
}

/// Cheap-clone handle to the node actor.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    commands: mpsc::Sender<Command>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::SetRole(..) => "SetRole",
            Command::Hello(..) => "Hello",
            Command::Offer(..) => "Offer",
            Command::Accept(..) => "Accept",
        })
    }
}

impl NodeHandle {
    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// A receiver that wakes on every snapshot change.
    pub fn watch(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.clone()
    }

    /// Sets the hierarchy role (aliases accepted).
    pub async fn set_role(&self, role: &str) -> Result<RoleChange, NodeError> {
        self.call(|tx| Command::SetRole(role.to_owned(), tx)).await
    }

    /// Applies an operator hello.
    pub async fn hello(&self, hello: CoreHello) -> Result<HelloOutcome, NodeError> {
        self.call(|tx| Command::Hello(hello, tx)).await
    }

    /// Records an offer; returns whether the epoch changed.
    pub async fn offer(&self, offer: CoreOffer) -> Result<bool, NodeError> {
        self.call(|tx| Command::Offer(offer, tx)).await
    }

    /// Records an accept; returns whether the epoch changed.
    pub async fn accept(&self, accept: CoreAccept) -> Result<bool, NodeError> {
        self.call(|tx| Command::Accept(accept, tx)).await
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, NodeError>>) -> Command,
    ) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }
}

/// Loads persisted state, resolves the node id and starts the actor. The first advert goes out
/// before this returns, so the local node is in the first snapshot.
pub async fn spawn(
    config: NodeConfig,
    events: EventTx,
    cancel: CancellationToken,
) -> std::io::Result<(NodeHandle, JoinHandle<()>)> {
    let hierarchy: Hierarchy =
        persist::load_json(&config.state_dir.join(HIERARCHY_FILE))?.unwrap_or_default();
    let store: ClusterStore =
        persist::load_json(&config.state_dir.join(CLUSTER_FILE))?.unwrap_or_default();
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
    let snapshot = Snapshot {
        id,
        id_source,
        peer_id: config.key.peer_id().to_string(),
        public_key: config.key.public_b64(),
        workspace: config.workspace.clone(),
        hierarchy,
        nodes: BTreeMap::new(),
        ttl_ms: duration_ms(config.ttl),
    };
    let (snap_tx, snap_rx) = watch::channel(Arc::new(snapshot.clone()));
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
    let mut actor = Actor {
        config,
        events,
        state: snapshot,
        store,
        snap_tx,
    };
    actor.advertise("boot").await;
    let task = tokio::spawn(actor.run(cmd_rx, cancel));
    Ok((
        NodeHandle {
            commands: cmd_tx,
            snapshot: snap_rx,
        },
        task,
    ))
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

struct Actor {
    config: NodeConfig,
    events: EventTx,
    state: Snapshot,
    store: ClusterStore,
    snap_tx: watch::Sender<Arc<Snapshot>>,
}

impl Actor {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>, cancel: CancellationToken) {
        let period = self.config.advertise_interval.max(Duration::from_secs(1));
        let mut readvertise = tokio::time::interval_at(Instant::now() + period, period);
        readvertise.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Some(cmd) = commands.recv() => self.handle(cmd).await,
                _ = readvertise.tick() => self.advertise("interval").await,
            }
        }
        tracing::debug!("node actor stopped");
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::SetRole(role, reply) => {
                let result = self.set_role(&role).await;
                let _ = reply.send(result);
            }
            Command::Hello(hello, reply) => {
                let result = self.hello(hello).await;
                let _ = reply.send(result);
            }
            Command::Offer(offer, reply) => {
                let result = self
                    .change_hierarchy(|h, me| h.offer(&offer, me))
                    .await
                    .map(|(changed, _)| changed);
                if result.is_ok() {
                    self.emit("hierarchy.offer", json_of(&offer)).await;
                }
                let _ = reply.send(result);
            }
            Command::Accept(accept, reply) => {
                let result = self
                    .change_hierarchy(|h, me| h.accept(&accept, me))
                    .await
                    .map(|(changed, _)| changed);
                if result.is_ok() {
                    self.emit("hierarchy.accepted", json_of(&accept)).await;
                }
                let _ = reply.send(result);
            }
        }
    }

    async fn set_role(&mut self, requested: &str) -> Result<RoleChange, NodeError> {
        let (change, _) = self.change_hierarchy(|h, _| h.set_role(requested)).await?;
        if change.changed() {
            let payload = json!({
                "role": change.role.as_str(),
                "requested": requested,
                "previous": change.previous.as_str(),
            });
            self.emit("hierarchy.role.changed", payload).await;
            self.advertise("role").await;
        }
        Ok(change)
    }

    async fn hello(&mut self, hello: CoreHello) -> Result<HelloOutcome, NodeError> {
        let explicit = self.state.id_source.is_explicit();
        let (outcome, _) = self
            .change_hierarchy(|h, me| h.hello(&hello, me, explicit))
            .await?;
        if let Some(new_id) = &outcome.new_id {
            tracing::info!(from = %self.state.id, to = %new_id, "node id assigned by hello");
            self.state.nodes.remove(&self.state.id);
            self.state.id = new_id.clone();
            self.state.id_source = IdSource::Hello;
        }
        self.emit("hierarchy.hello", json_of(&hello)).await;
        if outcome.role.changed() {
            let payload = json!({
                "role": outcome.role.role.as_str(),
                "requested": hello.role,
                "previous": outcome.role.previous.as_str(),
            });
            self.emit("hierarchy.role.changed", payload).await;
        }
        self.advertise("hello").await;
        Ok(outcome)
    }

    /// Applies `f` to a copy of the hierarchy, persists the copy, then commits it: a refused or
    /// unpersistable change leaves the state untouched. Emits `hierarchy.state` when the epoch moved.
    async fn change_hierarchy<T>(
        &mut self,
        f: impl FnOnce(&mut Hierarchy, &NodeId) -> Result<T, HierarchyError>,
    ) -> Result<(T, bool), NodeError> {
        let mut next = self.state.hierarchy.clone();
        let out = f(&mut next, &self.state.id)?;
        if next == self.state.hierarchy {
            return Ok((out, false));
        }
        persist::save_json(&self.path(HIERARCHY_FILE), &next)
            .map_err(|e| NodeError::Persist(e.to_string()))?;
        let epoch_moved = next.epoch != self.state.hierarchy.epoch;
        self.state.hierarchy = next;
        self.publish();
        if epoch_moved {
            self.emit(
                "hierarchy.state",
                json!({ "epoch": self.state.hierarchy.epoch }),
            )
            .await;
        }
        Ok((out, epoch_moved))
    }

    /// Signs the next advert for this node, records it locally and announces it.
    async fn advertise(&mut self, reason: &str) {
        let now = now_ms();
        let seq = now.max(self.store.self_seq + 1);
        let mut next = self.store.clone();
        next.self_seq = seq;
        if let Err(e) = persist::save_json(&self.path(CLUSTER_FILE), &next) {
            tracing::warn!(error = %e, "could not persist advert sequence; advert skipped");
            return;
        }
        self.store = next;
        let advert = self.local_advert(seq, now);
        let record = NodeRecord {
            advert: advert.clone(),
            last_seen_ms: now,
            health: Health::Ok,
            local: true,
        };
        let changed = self
            .state
            .nodes
            .get(&advert.id)
            .is_none_or(|old| old.differs_from(&record));
        self.state.nodes.insert(advert.id.clone(), record.clone());
        self.publish();
        tracing::debug!(reason, seq, "advertised");

        let mut payload = json_of(&advert);
        if let Value::Object(map) = &mut payload {
            map.insert("advertised".into(), Value::String(rfc3339_ms(now)));
        }
        self.emit("cluster.node.advertise", payload).await;
        if changed {
            let view = record.view(now, self.state.ttl_ms);
            self.emit("cluster.node.changed", json_of(&view)).await;
        }
    }

    fn local_advert(&self, seq: u64, now: u64) -> Advert {
        let h = &self.state.hierarchy;
        let mut capabilities = self.config.capabilities.clone();
        capabilities.insert("declared".into(), json!(h.capabilities));
        Advert {
            id: self.state.id.clone(),
            role: h.role,
            workspace: self.config.workspace.clone(),
            epoch: h.hello_epoch.unwrap_or(0),
            seq,
            advertised_ms: now,
            ttl_ms: self.state.ttl_ms,
            capabilities,
            tags: h.tags.clone(),
            models: None,
            health: Health::Ok,
            addrs: Vec::new(),
            bus: self.config.bus.clone(),
            queue: self.config.queue.clone(),
        }
    }

    fn publish(&self) {
        self.snap_tx.send_replace(Arc::new(self.state.clone()));
    }

    async fn emit(&self, kind: &str, payload: Value) {
        self.events.emit(kind, payload).await;
    }

    fn path(&self, file: &str) -> PathBuf {
        Path::new(&self.config.state_dir).join(file)
    }
}

fn json_of<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}
