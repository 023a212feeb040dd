//! Request and response bodies shared by the server and `arw-cli`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use arw_p2p::{
    capsule::CapsuleItem,
    cluster::{ClusterNode, ClusterView},
    hierarchy::{CoreAccept, CoreHello, CoreOffer},
    node::{AdmissionChange, HomeClaim, NetworkStatus},
};

/// `{"ok":true}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Ok {
    /// Always true.
    pub ok: bool,
}

impl Ok {
    /// The success body.
    pub const YES: Ok = Ok { ok: true };
}

/// `POST /admin/hierarchy/role`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RoleRequest {
    /// Role name or alias, case-insensitive.
    pub role: String,
}

/// `POST /admin/cluster/admit` and `/admin/cluster/revoke`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AdmissionRequest {
    /// Node id.
    pub id: String,
    /// Admit: pin this base64 key instead of the one the node advertises.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// `POST /admin/cluster/trust-home`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TrustHomeRequest {
    /// The pending claim's key fingerprint (`pending_homes` in `/state/cluster`), or the key.
    pub fingerprint: String,
}

/// A node in the hierarchy view (`self_node` and each of `peers`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HierarchyNode {
    /// Node id.
    pub id: String,
    /// Canonical role.
    pub role: String,
    /// Scope tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Parent id.
    #[serde(default)]
    pub parent: Option<String>,
    /// Child ids.
    #[serde(default)]
    pub children: Vec<String>,
    /// Declared capabilities (self only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<String>>,
    /// Last accepted hello epoch (self only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hello_epoch: Option<u64>,
    /// Liveness as this node sees it (remote nodes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
}

/// `GET /admin/hierarchy/state`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HierarchyState {
    /// Local change counter.
    pub epoch: u64,
    /// This node.
    pub self_node: HierarchyNode,
    /// Known peers by id: from offers and accepts, and every node heard on the bus.
    pub peers: BTreeMap<String, HierarchyNode>,
    /// The transport: `disabled`, `no_peers` (listening, nobody yet) or `connected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkStatus>,
    /// Every node advertising role `root`, when more than one does: a conflict to resolve.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub home_conflict: Vec<HomeClaim>,
    /// The Home this node obeys: pinned key, how it was pinned, the policy epoch in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<arw_p2p::node::PolicyView>,
    /// How on time this node is, and what it has decided since it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<Liveness>,
}

/// `liveness` in `/admin/hierarchy/state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Liveness {
    /// How many times longer than configured this node waits before it judges a silence: 1
    /// while its own timers fire on time, more while it is slow or was stalled.
    pub slowdown: u64,
    /// Protocol decisions since start (messages received and refused, syncs, probes,
    /// suspicion reports, refutations, resets, redials, adverts).
    pub counters: arw_p2p::core::Counters,
}

/// CloudEvents attributes of a live event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CloudEvent {
    /// Always `1.0`.
    pub specversion: String,
    /// The event kind.
    #[serde(rename = "type")]
    pub kind: String,
    /// `ARW_EVENT_SOURCE`, default `arw-server`.
    pub source: String,
    /// Unique per event (UUIDv7).
    pub id: String,
    /// Same as the envelope's `time`.
    pub time: String,
    /// Always `application/json`.
    pub datacontenttype: String,
}

/// The event envelope (reference §1.3): on the bus, in the journal and in SSE `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Envelope {
    /// RFC 3339 UTC with milliseconds.
    pub time: String,
    /// Normalised dot.case kind.
    pub kind: String,
    /// Event payload.
    pub payload: serde_json::Value,
    /// The node that created the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// Capsule in force, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<serde_json::Value>,
    /// CloudEvents attributes (live events only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ce: Option<CloudEvent>,
}

/// `GET /state/policy/capsules`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CapsulesView {
    /// How many are held.
    pub count: usize,
    /// Held capsules, newest first.
    pub items: Vec<CapsuleItem>,
    /// When this view was made, Unix ms.
    pub generated_ms: u64,
    /// Same, RFC 3339.
    pub generated: String,
}

/// `POST /admin/policy/capsules/adopt`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Adopted {
    /// Always true.
    pub ok: bool,
    /// Whether `policy.capsule.applied` was emitted (not for a quick re-presentation).
    pub notify: bool,
    /// The capsule's id.
    pub capsule_id: String,
    /// The capsule as held now.
    pub snapshot: CapsuleItem,
    /// The preset it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset_id: Option<String>,
}

/// `POST /admin/policy/capsules/teardown`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TornDown {
    /// Always true.
    pub ok: bool,
    /// Removed (or, on a dry run, would be).
    pub removed: Vec<CapsuleItem>,
    /// Requested ids not held.
    pub not_found: Vec<String>,
    /// Capsules held now.
    pub remaining: usize,
    /// Only said what would go.
    pub dry_run: bool,
    /// Why, as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The payload of `service.connected`, the first frame of every `/events` stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Handshake {
    /// This stream's id (also `X-Request-Id`).
    pub request_id: String,
    /// The id it resumes after, if any.
    pub resume_from: Option<String>,
    /// What is replayed before live events.
    pub replay: Replay,
    /// The kind prefixes applied.
    pub prefixes: Option<Vec<String>>,
    /// Replay comes from the journal.
    pub kernel_replay: bool,
    /// The oldest id the journal still holds.
    pub oldest_id: i64,
    /// The newest id.
    pub last_id: i64,
    /// Events between the resume point and `oldest_id` were pruned.
    pub truncated: bool,
}

/// `replay` in [`Handshake`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Replay {
    /// `live`, `after` or `last`.
    pub mode: String,
    /// Events in the first replay page.
    pub count: usize,
}

/// `GET /admin/governor`: the profile and hints in effect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GovernorView {
    /// The profile (this node's, else the Home's); `null` when none is set.
    pub profile: Option<String>,
    /// The hints (the Home's, with this node's on top).
    pub hints: arw_p2p::governor::Hints,
}

/// `GET /admin/governor/profile`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProfileView {
    /// The profile in effect; `null` when none is set.
    pub profile: Option<String>,
}

/// `POST /actions`: 202.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobAccepted {
    /// The job id (the existing job's when `reused`).
    pub id: String,
    /// Always true.
    pub ok: bool,
    /// Always false (kept for compatibility).
    pub staged: bool,
    /// The `idem_key` named a job already admitted; no new job was made.
    pub reused: bool,
}

/// `GET /state/actions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobsPage {
    /// Change counter across all jobs (the ETag is made from it).
    pub version: u64,
    /// Jobs, newest change first.
    pub items: Vec<arw_p2p::jobs::JobSummary>,
}

/// `GET /admin/rpu/trust` and `POST /admin/rpu/reload`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TrustView {
    /// Present (true) on reload only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<bool>,
    /// How many issuers.
    pub count: usize,
    /// Issuer ids and algorithms (never the keys).
    pub issuers: Vec<arw_p2p::capsule::IssuerInfo>,
}

/// `POST /admin/governor`: either or both; both are checked before either is applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GovernorRequest {
    /// This node's profile name (1 to 1024 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Any subset of the hint fields, merged into this node's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hints: Option<arw_p2p::governor::Hints>,
}
