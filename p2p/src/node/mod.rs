//! The node actor: one task owns the hierarchy, the membership registry and the transport.
//! Handlers talk to it through a [`NodeHandle`]; readers get an `Arc<Snapshot>` from a watch
//! channel, never a lock.

mod actor;

pub use crate::transport::{Mismatch, NetworkStatus};

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use crate::{
    admission::Admission,
    capsule::{Adoption, Capsule, CapsuleError, CapsuleSet, IssuerInfo, Teardown, TrustStore},
    cluster::{ClusterView, NodeRecord},
    events::EventTx,
    governor::{Governor, Hints},
    hierarchy::{
        CoreAccept, CoreHello, CoreOffer, HelloOutcome, Hierarchy, HierarchyError, RoleChange,
    },
    identity::NodeKey,
    membership::MembershipConfig,
    nats::NatsConfig,
    net::NetConfig,
    node_id::{IdSource, NodeId},
    policy::PinSource,
    time::rfc3339_ms,
};

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
    /// Federation over libp2p; `None` is the single-node fast path.
    pub federation: Option<FederationConfig>,
    /// The capsule trust store file (`ARW_TRUST_CAPSULES`); `None`: every capsule is refused.
    pub capsule_trust: Option<PathBuf>,
}

impl NodeConfig {
    /// A node of `workspace` keeping its state in `state_dir`, with the daemon's defaults: no
    /// explicit id or host name, adverts every 300 s, a 360 s TTL, no probed capabilities,
    /// `local` bus and queue, no federation. Set the fields that differ.
    pub fn new(key: NodeKey, workspace: &str, state_dir: PathBuf) -> Self {
        Self {
            key,
            explicit_id: None,
            hostname: None,
            workspace: workspace.to_owned(),
            state_dir,
            advertise_interval: Duration::from_secs(300),
            ttl: Duration::from_secs(360),
            capabilities: Map::new(),
            bus: "local".into(),
            queue: "local".into(),
            federation: None,
            capsule_trust: None,
        }
    }
}

impl FederationConfig {
    /// The libp2p mesh on a free loopback port, without mDNS, dialling `bootstrap`, with the
    /// default membership rules for `workspace`.
    pub fn loopback(
        workspace: &str,
        bootstrap: Vec<crate::Multiaddr>,
        heartbeat_interval: Duration,
    ) -> Self {
        let listen = crate::Multiaddr::empty()
            .with(libp2p::multiaddr::Protocol::Ip4(std::net::Ipv4Addr::LOCALHOST))
            .with(libp2p::multiaddr::Protocol::Tcp(0));
        Self {
            bus: BusConfig::Libp2p(NetConfig {
                workspace: workspace.to_owned(),
                listen: vec![listen],
                bootstrap,
                mdns: false,
            }),
            heartbeat_interval,
            membership: MembershipConfig::new(workspace),
        }
    }
}

/// Settings for federating with other nodes.
#[derive(Debug, Clone)]
pub struct FederationConfig {
    /// The bus.
    pub bus: BusConfig,
    /// How often to send a heartbeat.
    pub heartbeat_interval: Duration,
    /// Trust and liveness rules.
    pub membership: MembershipConfig,
}

/// Which bus carries the federation.
#[derive(Debug, Clone)]
pub enum BusConfig {
    /// The broker-less libp2p mesh (`bus = "local"`).
    Libp2p(NetConfig),
    /// A NATS broker (`bus = "nats"`).
    Nats(NatsConfig),
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
    /// Only the Home (role `root`) admits and revokes.
    #[error("this node is not the Home (role root); admission is decided there")]
    NotHome,
    /// No such node is known (or, for a revoke, admitted).
    #[error("{0}")]
    UnknownNode(String),
    /// A key that is not 32 bytes of base64.
    #[error("key must be a base64 ed25519 public key (32 bytes)")]
    InvalidKey,
    /// A capsule that is not one, or does not verify.
    #[error(transparent)]
    Capsule(#[from] CapsuleError),
    /// The capsule trust store could not be read; the previous one stays in force.
    #[error("capsule trust store: {0}")]
    Trust(String),
    /// The node holds as many capsules as it may.
    #[error("this node already holds {0} capsules; tear some down first")]
    CapsuleLimit(usize),
    /// Handing this capsule out would make the Home's policy document too large for nodes to
    /// accept.
    #[error(
        "the Home's policy document would exceed the size nodes accept; hand out fewer or smaller capsules"
    )]
    PolicyTooLarge,
}

/// What an admission did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmissionChange {
    /// The node.
    pub id: String,
    /// The key now admitted (or revoked).
    pub key: String,
    /// Its standing now.
    pub admission: Admission,
}

/// Another node claiming to be the Home.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HomeClaim {
    /// Node id.
    pub id: String,
    /// Its key.
    pub key: String,
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
    pub hierarchy: Arc<Hierarchy>,
    /// Registry (local and remote nodes), keyed and so sorted by id.
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// Staleness threshold.
    pub ttl_ms: u64,
    /// Transport state.
    pub network: NetworkStatus,
    /// At the Home: every remote node's standing.
    pub admission: BTreeMap<NodeId, Admission>,
    /// Nodes advertising role `root`, when more than one does (this one included).
    pub home_claims: Vec<HomeClaim>,
    /// The Home this node obeys and the policy in force.
    pub policy: PolicyView,
    /// Capsules held, with their leases.
    pub capsules: Arc<CapsuleSet>,
    /// Issuers whose capsules are accepted.
    pub trust: Arc<TrustStore>,
    /// This node's own governor settings.
    pub governor: Arc<Governor>,
}

impl Snapshot {
    /// The governor settings in effect: the Home's routing hints with this node's own on top.
    pub fn effective_governor(&self) -> Governor {
        self.governor.effective(self.policy.routing.as_ref())
    }
}

/// The Home's authority as this node holds it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyView {
    /// The pinned Home key (base64).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub home_key: Option<String>,
    /// How it was pinned: `config`, `first_admission` or `own` (this node is the Home).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned_by: Option<PinSource>,
    /// The Home's node id, from the document in force.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub home_id: Option<String>,
    /// The epoch in force (0: none).
    pub policy_epoch: u64,
    /// When the Home signed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issued_ms: Option<u64>,
    /// Nodes admitted by it.
    pub admitted: Vec<String>,
    /// Capsules it carries.
    pub capsules: usize,
    /// The Home's routing hints (its governor profile and hints), when it sets any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routing: Option<Governor>,
    /// Whether this node takes work (tasks from the queue): it is the Home, the policy in force
    /// admits its key, or no Home is known at all. A node the Home has not admitted is
    /// `pending` and takes none.
    #[serde(default)]
    pub takes_work: bool,
}

/// A capsule to adopt, with what the events about it should carry.
#[derive(Debug, Clone)]
pub struct CapsuleRequest {
    /// The capsule, not yet verified.
    pub capsule: Capsule,
    /// Merged into the `policy.capsule.*` events (`corr_id`, `request_id`, `reason`, `preset_id`).
    pub context: Map<String, Value>,
    /// Adopted by an administrator (the adopt route), not only presented in a header: at the
    /// Home, only such capsules go out to the other nodes.
    pub shared: bool,
}

/// Capsules to remove.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TeardownRequest {
    /// Capsule ids.
    #[serde(default)]
    pub ids: Vec<String>,
    /// Remove every capsule.
    #[serde(default)]
    pub all: bool,
    /// Why (recorded in the events).
    #[serde(default)]
    pub reason: Option<String>,
    /// Only say what would be removed.
    #[serde(default)]
    pub dry_run: bool,
}

impl Snapshot {
    /// The `/state/cluster` view at `now_ms`.
    pub fn cluster_view(&self, now_ms: u64) -> ClusterView {
        ClusterView {
            nodes: self
                .nodes
                .values()
                .map(|r| {
                    let mut node = r.view(now_ms, self.ttl_ms);
                    node.admission =
                        self.admission.get(&r.advert.id).map(|a| a.as_str().to_owned());
                    node
                })
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
    Admit(String, Option<String>, oneshot::Sender<Result<AdmissionChange, NodeError>>),
    Revoke(String, oneshot::Sender<Result<AdmissionChange, NodeError>>),
    AdoptCapsule(Box<CapsuleRequest>, oneshot::Sender<Result<Adoption, NodeError>>),
    Teardown(TeardownRequest, oneshot::Sender<Result<Teardown, NodeError>>),
    ReloadTrust(oneshot::Sender<Result<Vec<IssuerInfo>, NodeError>>),
    SetProfile(String, oneshot::Sender<Result<(), NodeError>>),
    SetHints(Box<Hints>, oneshot::Sender<Result<(), NodeError>>),
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::SetRole(..) => "SetRole",
            Command::Hello(..) => "Hello",
            Command::Offer(..) => "Offer",
            Command::Accept(..) => "Accept",
            Command::Admit(..) => "Admit",
            Command::Revoke(..) => "Revoke",
            Command::AdoptCapsule(..) => "AdoptCapsule",
            Command::Teardown(..) => "Teardown",
            Command::ReloadTrust(..) => "ReloadTrust",
            Command::SetProfile(..) => "SetProfile",
            Command::SetHints(..) => "SetHints",
        })
    }
}

/// Cheap-clone handle to the node actor.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    commands: mpsc::Sender<Command>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
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

    /// At the Home: admits `id` with `key`, or with the key it advertises now.
    pub async fn admit(&self, id: &str, key: Option<String>) -> Result<AdmissionChange, NodeError> {
        self.call(|tx| Command::Admit(id.to_owned(), key, tx)).await
    }

    /// At the Home: revokes `id`.
    pub async fn revoke(&self, id: &str) -> Result<AdmissionChange, NodeError> {
        self.call(|tx| Command::Revoke(id.to_owned(), tx)).await
    }

    /// Verifies a capsule against the trust store and adopts it (a renewal when its id is held).
    pub async fn adopt_capsule(&self, request: CapsuleRequest) -> Result<Adoption, NodeError> {
        self.call(|tx| Command::AdoptCapsule(Box::new(request), tx)).await
    }

    /// Removes capsules.
    pub async fn teardown_capsules(&self, request: TeardownRequest) -> Result<Teardown, NodeError> {
        self.call(|tx| Command::Teardown(request, tx)).await
    }

    /// Reads the capsule trust store again.
    pub async fn reload_trust(&self) -> Result<Vec<IssuerInfo>, NodeError> {
        self.call(Command::ReloadTrust).await
    }

    /// Sets the governor profile; re-advertises (and at the Home, sends it as a routing hint).
    pub async fn set_profile(&self, name: &str) -> Result<(), NodeError> {
        self.call(|tx| Command::SetProfile(name.to_owned(), tx)).await
    }

    /// Merges governor hints; re-advertises (and at the Home, sends them as routing hints).
    pub async fn set_hints(&self, hints: Hints) -> Result<(), NodeError> {
        self.call(|tx| Command::SetHints(Box::new(hints), tx)).await
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, NodeError>>) -> Command,
    ) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }
}

/// Loads persisted state, resolves the node id, starts the transport and the actor. The first
/// advert goes out before this returns, so the local node is in the first snapshot, and the
/// listen addresses are known.
pub async fn spawn(
    config: NodeConfig,
    events: EventTx,
    cancel: CancellationToken,
) -> std::io::Result<(NodeHandle, JoinHandle<()>)> {
    let (commands, rx) = mpsc::channel(actor::COMMAND_QUEUE);
    let (actor, snapshot) = actor::Actor::start(config, events).await?;
    let task = tokio::spawn(actor.run(rx, cancel));
    Ok((NodeHandle { commands, snapshot }, task))
}
