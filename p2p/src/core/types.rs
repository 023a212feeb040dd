//! What goes into the node core and what comes out: commands and their replies, the errors a
//! command can meet, the snapshot readers get, and the views inside it.

use std::{collections::BTreeMap, sync::Arc};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{
    admission::Admission,
    capsule::{Adoption, Capsule, CapsuleError, CapsuleSet, IssuerInfo, Teardown, TrustStore},
    cluster::{ClusterView, HomeClaim, NodeRecord, PendingHome},
    governor::{Governor, Hints},
    hierarchy::{
        CoreAccept, CoreHello, CoreOffer, HelloOutcome, Hierarchy, HierarchyError, RoleChange,
    },
    node_id::{IdSource, NodeId},
    policy::PinSource,
    runtimes::{RuntimeMatrix, RuntimeMatrixEntry},
    time::rfc3339_ms,
    transport::NetworkStatus,
    wire::Reason,
};

/// An operator's request to the node. Each is answered by one [`super::Effect::Reply`].
#[derive(Debug, Clone)]
pub enum Command {
    /// Sets the hierarchy role (aliases accepted).
    SetRole(String),
    /// Applies an operator hello.
    Hello(CoreHello),
    /// Records an offer.
    Offer(CoreOffer),
    /// Records an accept.
    Accept(CoreAccept),
    /// At the Home: admits a node with a key, or with the key it advertises now.
    Admit {
        /// Node id.
        id: String,
        /// The key to pin instead of the advertised one.
        key: Option<String>,
    },
    /// At the Home: revokes a node.
    Revoke(String),
    /// Verifies a capsule against the trust store and adopts it.
    AdoptCapsule(Box<CapsuleRequest>),
    /// Removes capsules.
    Teardown(TeardownRequest),
    /// Puts a capsule trust store in force (the executor read the file; `Err` keeps the old one).
    SetTrust(Result<TrustStore, String>),
    /// Sets the governor profile.
    SetProfile(String),
    /// Merges governor hints.
    SetHints(Box<Hints>),
    /// Trust the pending Home claim whose key has this fingerprint (or is this base64 key).
    TrustHome(String),
    /// Take back the trust in the pinned Home (not a configured `home_key`).
    UntrustHome,
    /// Admits a job (`POST /actions`).
    SubmitJob(Box<crate::jobs::JobSpec>),
    /// Cancels a job this node owns.
    CancelJob(String),
    /// Stops (`true`) or resumes taking jobs from the Home.
    DrainJobs(bool),
    /// An executor finished a run.
    JobFinished(Box<crate::jobs::Finished>),
}

/// What a command did, when it succeeded.
#[derive(Debug, Clone)]
pub enum Reply {
    /// [`Command::SetRole`].
    Role(RoleChange),
    /// [`Command::Hello`].
    Hello(HelloOutcome),
    /// [`Command::Offer`], [`Command::Accept`]: whether the hierarchy epoch moved.
    Changed(bool),
    /// [`Command::Admit`], [`Command::Revoke`].
    Admission(AdmissionChange),
    /// [`Command::AdoptCapsule`].
    Adoption(Box<Adoption>),
    /// [`Command::Teardown`].
    Teardown(Teardown),
    /// [`Command::SetTrust`]: the issuers now trusted.
    Issuers(Vec<IssuerInfo>),
    /// [`Command::SubmitJob`].
    Submitted(crate::jobs::Submitted),
    /// [`Command::SetProfile`], [`Command::SetHints`] and the job commands.
    Done,
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
    /// The administrator tore this capsule down; presented in a header it stays refused until
    /// it is too old to be presented at all (the admin may adopt it again).
    #[error(
        "this capsule was torn down by the administrator; only the admin token can adopt it again"
    )]
    CapsuleTornDown,
    /// Trust in a Home could not be given or taken back.
    #[error(transparent)]
    HomeTrust(#[from] crate::policy::TrustError),
    /// The node's advert would exceed the size peers accept (they would drop it, and this node
    /// would fall out of federation).
    #[error(
        "this node's advert would be {bytes} bytes, over the {limit} peers accept; declare fewer or shorter capabilities and tags"
    )]
    AdvertTooLarge {
        /// The advert's payload size.
        bytes: usize,
        /// What peers accept.
        limit: usize,
    },
    /// A job submission or cancel was refused.
    #[error(transparent)]
    Job(#[from] crate::jobs::SubmitError),
}

/// What an admission did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AdmissionChange {
    /// The node.
    pub id: String,
    /// The key now admitted (or revoked).
    pub key: String,
    /// Its standing now.
    pub admission: Admission,
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
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// The key each remote node's id is bound to (what its relayed events must be signed with).
    pub keys: Arc<BTreeMap<NodeId, [u8; 32]>>,
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
    /// What this node has decided so far.
    pub counters: Counters,
    /// How many times longer than configured this node now waits before it judges a silence:
    /// 1 while its own timers fire on time, more while it is slow (see docs/protocol.md).
    pub slowdown: u64,
    /// Jobs here.
    pub jobs: JobsStatus,
    /// This node's runtimes.
    pub runtimes: Vec<crate::jobs::RuntimeStatus>,
}

/// The jobs of a node, as readers see them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobsStatus {
    /// Change counter of this node's jobs (the `/state/actions` ETag).
    pub rev: u64,
    /// Jobs it owns that have not ended.
    pub live: usize,
    /// Of those, queued.
    pub queued: usize,
    /// Attempts running here for itself.
    pub running: u32,
    /// Attempts running here for the Home.
    pub hosted: u32,
    /// It takes no new attempts from the Home.
    pub draining: bool,
}

/// How many protocol decisions a node has made since it started: the same counts whichever
/// executor runs the core, so a simulation and a real stack can be compared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Counters {
    /// Messages received (gossip, broker, sync and probe answers).
    pub received: u64,
    /// Of those, refused.
    pub refused: u64,
    /// Sync requests sent.
    pub syncs: u64,
    /// Probes sent.
    pub probes: u64,
    /// Suspicion reports signed.
    pub reports: u64,
    /// Refutations and proofs of life signed.
    pub refutations: u64,
    /// Connections reset to nodes judged down.
    pub resets: u64,
    /// Redials of nodes judged down.
    pub redials: u64,
    /// Adverts signed.
    pub adverts: u64,
    /// Gossip messages dropped as a flood before or after their check (a key sending too much,
    /// too many unknown keys from one peer); not counted as received.
    #[serde(default)]
    pub shed: u64,
    /// Refused messages by reason, indexed as [`Reason::ALL`] (for `/metrics`; not part of the
    /// JSON views, where an array of bare numbers would mean nothing).
    #[serde(skip)]
    pub refused_by: [u64; Reason::ALL.len()],
}

impl std::ops::Add for Counters {
    type Output = Counters;

    fn add(self, o: Counters) -> Counters {
        Counters {
            received: self.received + o.received,
            refused: self.refused + o.refused,
            syncs: self.syncs + o.syncs,
            probes: self.probes + o.probes,
            reports: self.reports + o.reports,
            refutations: self.refutations + o.refutations,
            resets: self.resets + o.resets,
            redials: self.redials + o.redials,
            adverts: self.adverts + o.adverts,
            shed: self.shed + o.shed,
            refused_by: std::array::from_fn(|i| self.refused_by[i] + o.refused_by[i]),
        }
    }
}

impl Counters {
    /// What was decided since `earlier` was read.
    pub fn since(self, earlier: Counters) -> Counters {
        Counters {
            received: self.received.saturating_sub(earlier.received),
            refused: self.refused.saturating_sub(earlier.refused),
            syncs: self.syncs.saturating_sub(earlier.syncs),
            probes: self.probes.saturating_sub(earlier.probes),
            reports: self.reports.saturating_sub(earlier.reports),
            refutations: self.refutations.saturating_sub(earlier.refutations),
            resets: self.resets.saturating_sub(earlier.resets),
            redials: self.redials.saturating_sub(earlier.redials),
            adverts: self.adverts.saturating_sub(earlier.adverts),
            shed: self.shed.saturating_sub(earlier.shed),
            refused_by: std::array::from_fn(|i| {
                self.refused_by[i].saturating_sub(earlier.refused_by[i])
            }),
        }
    }

    /// One message refused, for `reason`.
    pub fn refuse(&mut self, reason: Reason) {
        self.refused += 1;
        self.refused_by[reason as usize] += 1;
    }

    /// Refused messages by reason, those with any.
    pub fn refused_by_reason(&self) -> impl Iterator<Item = (Reason, u64)> + '_ {
        Reason::ALL.iter().zip(self.refused_by).filter(|(_, n)| *n > 0).map(|(r, n)| (*r, n))
    }
}

impl Snapshot {
    /// The governor settings in effect: the Home's routing hints with this node's own on top.
    pub fn effective_governor(&self) -> Governor {
        self.governor.effective(self.policy.routing.as_ref())
    }

    /// The `/state/runtime_matrix` view at `now_ms`: this node, and every node whose advert
    /// lists runtimes and is not past its TTL; only `node_id` when given.
    pub fn runtime_matrix(&self, now_ms: u64, node_id: Option<&str>) -> RuntimeMatrix {
        let wanted = |id: &str| node_id.is_none_or(|n| n == id);
        let mut items = std::collections::BTreeMap::new();
        for record in self.nodes.values() {
            let a = &record.advert;
            let fresh = record.health_at(now_ms, self.ttl_ms) == crate::cluster::Health::Ok;
            if record.local || !wanted(a.id.as_str()) || a.runtimes.is_empty() || !fresh {
                continue;
            }
            let entry = RuntimeMatrixEntry::of(a.id.as_str(), &a.runtimes, a.advertised_ms, now_ms);
            items.insert(a.id.to_string(), entry);
        }
        if wanted(self.id.as_str()) {
            let entry = RuntimeMatrixEntry::of(self.id.as_str(), &self.runtimes, now_ms, now_ms);
            items.insert(self.id.to_string(), entry);
        }
        RuntimeMatrix { items, ttl_seconds: self.ttl_ms / 1000 }
    }

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
            pending_homes: self.policy.pending_homes.clone(),
            generated: Some(rfc3339_ms(now_ms)),
            generated_ms: Some(now_ms),
            ttl_seconds: Some(self.ttl_ms / 1000),
        }
    }
}

/// The Home's authority as this node holds it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// Homes that admitted this node and wait for the operator's trust
    /// (`POST /admin/cluster/trust-home {"fingerprint"}`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_homes: Vec<PendingHome>,
    /// Whether this node takes work (tasks from the queue): it is the Home, the policy in force
    /// admits its key, or no Home is known at all. A node the Home has not admitted is
    /// `pending` and takes none.
    #[serde(default)]
    pub takes_work: bool,
}
