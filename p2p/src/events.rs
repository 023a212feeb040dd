//! Events: what a node tells its operators, typed. Producers build an [`Event`]; the daemon's
//! publisher receives every [`Emit`] (the event as kind and JSON payload), stamps the envelope,
//! journals it and fans it out. A renamed field or kind is a compile error here, not a silent
//! `null` in a stream.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use crate::{
    capsule::CapsuleItem,
    cluster::{Advert, ClusterNode, Health, HomeClaim},
    hierarchy::{CoreAccept, CoreHello, CoreOffer},
};

/// Every event kind this software produces, with its payload. The serde form is
/// `{"kind": "...", "payload": {...}}`, the same pair the journal stores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "payload")]
pub enum Event {
    /// A node's advert was accepted (or this node advertised).
    #[serde(rename = "cluster.node.advertise")]
    NodeAdvertise(AdvertEvent),
    /// A node's record says something new: content, health, or it was evicted.
    #[serde(rename = "cluster.node.changed")]
    NodeChanged(NodeChanged),
    /// A message claimed an id bound to another key.
    #[serde(rename = "cluster.node.conflict")]
    NodeConflict(KeyConflict),
    /// The Home admitted a node.
    #[serde(rename = "cluster.node.admitted")]
    NodeAdmitted(NodeKeyed),
    /// The Home revoked a node.
    #[serde(rename = "cluster.node.revoked")]
    NodeRevoked(NodeKeyed),
    /// A federation message was refused (rate-limited: see `suppressed`).
    #[serde(rename = "cluster.event.rejected")]
    MessageRejected(Rejected),
    /// The broker link came up.
    #[serde(rename = "cluster.bus.connected")]
    BusConnected(Broker),
    /// The broker link went away.
    #[serde(rename = "cluster.bus.disconnected")]
    BusDisconnected(Broker),
    /// A node advertises another bus or queue than this one.
    #[serde(rename = "cluster.bus.mismatch")]
    BusMismatch(BusMismatch),
    /// More than one node claims to be the Home.
    #[serde(rename = "cluster.home.conflict")]
    HomeConflict(HomeConflict),
    /// A node advertising role `root` admitted this unpinned node: a claim that waits for the
    /// operator (`POST /admin/cluster/trust-home`).
    #[serde(rename = "cluster.home.pending")]
    HomePending(HomeTrust),
    /// The operator trusted a Home (`trusted: true`) or took the trust back.
    #[serde(rename = "cluster.home.trusted")]
    HomeTrusted(HomeTrust),
    /// A policy document from the pinned Home is in force here.
    #[serde(rename = "cluster.policy.applied")]
    PolicyApplied(PolicyApplied),
    /// This node, the Home, signed a policy document.
    #[serde(rename = "cluster.policy.issued")]
    PolicyIssued(PolicyIssued),
    /// The hierarchy role changed.
    #[serde(rename = "hierarchy.role.changed")]
    RoleChanged(RoleChanged),
    /// An operator hello was applied.
    #[serde(rename = "hierarchy.hello")]
    Hello(CoreHello),
    /// An offer was recorded.
    #[serde(rename = "hierarchy.offer")]
    Offer(CoreOffer),
    /// An accept was recorded.
    #[serde(rename = "hierarchy.accepted")]
    Accepted(CoreAccept),
    /// The hierarchy epoch moved.
    #[serde(rename = "hierarchy.state")]
    HierarchyState(HierarchyState),
    /// A capsule was adopted (or renewed).
    #[serde(rename = "policy.capsule.applied")]
    CapsuleApplied(CapsuleApplied),
    /// A capsule was removed.
    #[serde(rename = "policy.capsule.teardown")]
    CapsuleTeardown(CapsuleRemoved),
    /// A capsule's lease ended.
    #[serde(rename = "policy.capsule.expired")]
    CapsuleExpired(CapsuleExpired),
    /// A presented capsule was refused.
    #[serde(rename = "policy.capsule.failed")]
    CapsuleFailed(CapsuleFailed),
    /// A policy decision (a refused capsule).
    #[serde(rename = "policy.decision")]
    PolicyDecision(PolicyDecision),
    /// The governor profile or hints changed.
    #[serde(rename = "governor.changed")]
    GovernorChanged(Map<String, Value>),
    /// A task from the queue, or a job's attempt, ran here.
    #[serde(rename = "task.completed")]
    TaskCompleted(TaskCompleted),
    /// A job was admitted (`POST /actions`).
    #[serde(rename = "actions.submitted")]
    ActionSubmitted(JobEvent),
    /// A job's attempt started on its owner (`node_id`).
    #[serde(rename = "actions.running")]
    ActionRunning(JobEvent),
    /// A job ended with a result.
    #[serde(rename = "actions.completed")]
    ActionCompleted(JobEvent),
    /// A job ended without one.
    #[serde(rename = "actions.failed")]
    ActionFailed(JobEvent),
    /// The Home chose a worker for a job's attempt.
    #[serde(rename = "job.assigned")]
    JobAssigned(JobEvent),
    /// An attempt was lost or refused; the job goes elsewhere (or fails).
    #[serde(rename = "job.reassigned")]
    JobReassigned(JobEvent),
    /// Something went wrong with an attempt (refused, stale result, lease lost).
    #[serde(rename = "job.error")]
    JobError(JobEvent),
    /// A runtime of this node changed health (quarantined, on probation, ready again).
    #[serde(rename = "runtime.health")]
    RuntimeHealth(Box<crate::runtimes::RuntimeMatrixEntry>),
    /// The Home is about to send a job's input to a worker.
    #[serde(rename = "egress.preview")]
    EgressPreview(EgressPreview),
    /// A row was added to the egress ledger (its stored form, with its `id`).
    #[serde(rename = "egress.ledger.appended")]
    EgressAppended(Map<String, Value>),
    /// `POST /admin/events/test`.
    #[serde(rename = "service.test")]
    ServiceTest(Map<String, Value>),
}

impl Event {
    /// The kind and JSON payload, as journaled.
    pub fn into_parts(self) -> (String, Value) {
        match serde_json::to_value(self) {
            Ok(Value::Object(mut map)) => {
                let kind = match map.remove("kind") {
                    Some(Value::String(kind)) => kind,
                    _ => String::new(),
                };
                (kind, map.remove("payload").unwrap_or(Value::Null))
            }
            // Every variant serialises to an object with a kind: unreachable in practice.
            _ => (String::new(), Value::Null),
        }
    }

    /// Reads a journaled event back; `None` for a kind this software does not produce or a
    /// payload of another shape.
    pub fn parse(kind: &str, payload: &Value) -> Option<Event> {
        let tagged = serde_json::json!({ "kind": kind, "payload": payload });
        serde_json::from_value(tagged).ok()
    }

    /// The kind, as journaled.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::NodeAdvertise(_) => "cluster.node.advertise",
            Event::NodeChanged(_) => "cluster.node.changed",
            Event::NodeConflict(_) => "cluster.node.conflict",
            Event::NodeAdmitted(_) => "cluster.node.admitted",
            Event::NodeRevoked(_) => "cluster.node.revoked",
            Event::MessageRejected(_) => "cluster.event.rejected",
            Event::BusConnected(_) => "cluster.bus.connected",
            Event::BusDisconnected(_) => "cluster.bus.disconnected",
            Event::BusMismatch(_) => "cluster.bus.mismatch",
            Event::HomeConflict(_) => "cluster.home.conflict",
            Event::HomePending(_) => "cluster.home.pending",
            Event::HomeTrusted(_) => "cluster.home.trusted",
            Event::PolicyApplied(_) => "cluster.policy.applied",
            Event::PolicyIssued(_) => "cluster.policy.issued",
            Event::RoleChanged(_) => "hierarchy.role.changed",
            Event::Hello(_) => "hierarchy.hello",
            Event::Offer(_) => "hierarchy.offer",
            Event::Accepted(_) => "hierarchy.accepted",
            Event::HierarchyState(_) => "hierarchy.state",
            Event::CapsuleApplied(_) => "policy.capsule.applied",
            Event::CapsuleTeardown(_) => "policy.capsule.teardown",
            Event::CapsuleExpired(_) => "policy.capsule.expired",
            Event::CapsuleFailed(_) => "policy.capsule.failed",
            Event::PolicyDecision(_) => "policy.decision",
            Event::GovernorChanged(_) => "governor.changed",
            Event::TaskCompleted(_) => "task.completed",
            Event::ActionSubmitted(_) => "actions.submitted",
            Event::ActionRunning(_) => "actions.running",
            Event::ActionCompleted(_) => "actions.completed",
            Event::ActionFailed(_) => "actions.failed",
            Event::JobAssigned(_) => "job.assigned",
            Event::JobReassigned(_) => "job.reassigned",
            Event::JobError(_) => "job.error",
            Event::RuntimeHealth(_) => "runtime.health",
            Event::EgressPreview(_) => "egress.preview",
            Event::EgressAppended(_) => "egress.ledger.appended",
            Event::ServiceTest(_) => "service.test",
        }
    }
}

fn is_false(b: &bool) -> bool {
    !b
}

/// `cluster.node.advertise`: the advert as signed, plus its time in RFC 3339.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdvertEvent {
    /// The advert.
    #[serde(flatten)]
    pub advert: Advert,
    /// `advertised_ms` in RFC 3339.
    pub advertised: String,
}

/// `cluster.node.changed`: the node as `/state/cluster` shows it now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeChanged {
    /// The node's view.
    #[serde(flatten)]
    pub node: ClusterNode,
    /// Its health before, when the health moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_health: Option<Health>,
    /// It was removed from the registry.
    #[serde(default, skip_serializing_if = "is_false")]
    pub evicted: bool,
}

/// `cluster.node.conflict`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyConflict {
    /// The id.
    pub id: String,
    /// The key the id is bound to.
    pub known_key: String,
    /// The key that signed the refused message.
    pub claimed_key: String,
}

/// A node and a key (`cluster.node.admitted`, `cluster.node.revoked`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeKeyed {
    /// The node.
    pub id: String,
    /// Its key.
    pub key: String,
}

/// `cluster.event.rejected`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// The topic or subject it came on.
    pub subject: String,
    /// The message type (`advert`, `heartbeat`, ...).
    pub kind: String,
    /// Why (see docs/protocol.md).
    pub reason: String,
    /// The id the message claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_id: Option<String>,
    /// Refusals not reported since the last reported one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<u64>,
}

/// `cluster.bus.connected`, `cluster.bus.disconnected`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Broker {
    /// The broker URL.
    pub broker: Option<String>,
}

/// `cluster.bus.mismatch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusMismatch {
    /// The node.
    pub id: String,
    /// Its bus.
    pub bus: String,
    /// Its queue.
    pub queue: String,
    /// This node's bus.
    pub local_bus: String,
    /// This node's queue.
    pub local_queue: String,
}

/// `cluster.home.conflict`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HomeConflict {
    /// Every node claiming the role, this one included.
    pub homes: Vec<HomeClaim>,
}

/// `cluster.home.pending`, `cluster.home.trusted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HomeTrust {
    /// The Home's node id, as its document says (none when trust was taken back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<String>,
    /// Its key's fingerprint (first 8 bytes of SHA-256, hex), as `trust-home` takes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The policy epoch of its document.
    pub policy_epoch: u64,
    /// Trusted now (`cluster.home.trusted`); false: trust taken back.
    #[serde(default)]
    pub trusted: bool,
}

/// `cluster.policy.applied`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyApplied {
    /// The epoch now in force.
    pub policy_epoch: u64,
    /// The Home's id.
    pub home: String,
    /// This document pinned the Home (first admission).
    pub pinned: bool,
    /// It admits this node.
    pub admitted: bool,
    /// Capsules it carries.
    pub capsules: usize,
}

/// `cluster.policy.issued`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyIssued {
    /// The epoch signed.
    pub policy_epoch: u64,
    /// What asked for it.
    pub reason: String,
    /// Admitted node ids.
    pub admitted: Vec<String>,
    /// Capsules handed out.
    pub capsules: usize,
}

/// `hierarchy.role.changed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleChanged {
    /// The role now.
    pub role: String,
    /// As requested (an alias, perhaps).
    pub requested: String,
    /// The role before.
    pub previous: String,
}

/// `hierarchy.state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HierarchyState {
    /// The hierarchy epoch.
    pub epoch: u64,
}

/// `policy.capsule.applied`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapsuleApplied {
    /// Capsule id.
    pub id: String,
    /// Its version.
    pub version: String,
    /// Its issuer.
    pub issuer: Option<String>,
    /// When adopted here.
    pub applied_ms: u64,
    /// Hops it may still travel.
    pub hop_ttl: Option<u32>,
    /// Deny rules.
    pub denies: usize,
    /// Contracts.
    pub contracts: usize,
    /// End of its lease.
    pub lease_until_ms: Option<u64>,
    /// Renewal window.
    pub renew_within_ms: Option<u64>,
    /// `local` or `home`.
    pub source: String,
    /// It replaced a held capsule with the same id.
    #[serde(default, skip_serializing_if = "is_false")]
    pub renewal: bool,
    /// What the request carried (`corr_id`, `request_id`, `reason`, `preset_id`, or the
    /// `policy_epoch` that brought it).
    #[serde(flatten)]
    pub context: Map<String, Value>,
}

impl CapsuleApplied {
    /// The event for a capsule now held as `item`, with `context`.
    pub fn new(item: &CapsuleItem, renewal: bool, context: Map<String, Value>) -> Self {
        Self {
            id: item.id.clone(),
            version: item.version.clone(),
            issuer: item.issuer.clone(),
            applied_ms: item.applied_ms,
            hop_ttl: item.hop_ttl,
            denies: item.denies,
            contracts: item.contracts,
            lease_until_ms: item.lease_until_ms,
            renew_within_ms: item.renew_within_ms,
            source: item.source.clone(),
            renewal,
            context,
        }
    }
}

/// `policy.capsule.teardown`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapsuleRemoved {
    /// The capsule as it was held.
    #[serde(flatten)]
    pub item: CapsuleItem,
    /// When removed.
    pub removed_ms: u64,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed_reason: Option<String>,
}

/// `policy.capsule.expired`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapsuleExpired {
    /// Capsule id.
    pub id: String,
    /// Its version.
    pub version: String,
    /// Its issuer.
    pub issuer: Option<String>,
    /// When its lease ended here.
    pub expired_ms: u64,
    /// When adopted.
    pub applied_ms: u64,
    /// The lease end.
    pub lease_until_ms: Option<u64>,
}

/// `policy.capsule.failed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapsuleFailed {
    /// The capsule id, when it could be read.
    pub id: Option<String>,
    /// Why it was refused.
    pub detail: String,
    /// Refusals not reported since the last reported one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<u64>,
    /// What the request carried.
    #[serde(flatten)]
    pub context: Map<String, Value>,
}

/// `policy.decision`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyDecision {
    /// What was decided on (`policy.capsule`).
    pub action: String,
    /// The outcome.
    pub allow: bool,
    /// Why.
    pub explain: Map<String, Value>,
    /// What the request carried.
    #[serde(flatten)]
    pub context: Map<String, Value>,
}

/// `task.completed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskCompleted {
    /// The task id.
    pub id: Value,
    /// Whether it succeeded.
    pub ok: bool,
    /// Its output.
    pub output: Value,
    /// The node that ran it.
    pub node_id: String,
    /// The job kind (jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The attempt (jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// How long it ran (jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// The payload of `egress.preview`: what is about to leave the Home, for which node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressPreview {
    /// The job.
    pub id: String,
    /// Its kind.
    pub kind: String,
    /// The worker it goes to.
    pub node_id: String,
    /// The attempt.
    pub attempt: u32,
    /// Its fence.
    pub fence: u64,
    /// Bytes of input sent (the job's input as JSON).
    pub bytes_out: u64,
}

/// The payload of `actions.*` and `job.*` events: the job id and whichever facts the kind
/// carries (see docs/api.md, "Jobs").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    /// Job id.
    pub id: String,
    /// Kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// `queued` (`actions.submitted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// The node that runs (ran, refused, lost) the attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Fencing token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<u64>,
    /// `local` or `remote`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<String>,
    /// Feasible candidates (`job.assigned`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidates: Option<usize>,
    /// Why (`job.reassigned`: `lease_expired`, `rejected`, `unreachable`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Error code (`job.error`, `actions.failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The result (`actions.completed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// What failed (`actions.failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
    /// Run time of the attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Why no node could take it (`actions.failed` with code `infeasible`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explain: Option<Value>,
}

/// An event as produced, before it gets its envelope.
#[derive(Debug)]
pub struct Emit {
    /// Event kind (normalised by the publisher).
    pub kind: String,
    /// Event payload.
    pub payload: Value,
    /// Told the journal id once the event is durable, when the producer waits for it.
    pub ack: Option<oneshot::Sender<i64>>,
    /// Set for an event created on another node and relayed here: its origin, `ce.id` and time
    /// are kept.
    pub relayed: Option<Relayed>,
}

impl Emit {
    /// The typed event, when it is one this software produces.
    pub fn event(&self) -> Option<Event> {
        Event::parse(&self.kind, &self.payload)
    }
}

/// Where a relayed event came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayed {
    /// The node that created it.
    pub origin: String,
    /// Its `ce.id` there.
    pub ce_id: String,
    /// Its time there.
    pub time: String,
}

/// Cheap-clone sending half of the event pipeline. Bounded: a producer waits when the publisher
/// is behind rather than dropping events.
#[derive(Debug, Clone)]
pub struct EventTx(mpsc::Sender<Emit>);

impl EventTx {
    /// A pipeline holding at most `capacity` unpublished events.
    pub fn channel(capacity: usize) -> (Self, mpsc::Receiver<Emit>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Self(tx), rx)
    }

    /// Publishes an event. After shutdown (publisher gone) the event is dropped with a debug log.
    pub async fn emit(&self, event: Event) {
        let (kind, payload) = event.into_parts();
        let emit = Emit { kind, payload, ack: None, relayed: None };
        if let Err(e) = self.0.send(emit).await {
            tracing::debug!(kind = e.0.kind, "event publisher stopped; event dropped");
        }
    }

    /// Journals an event another node created, keeping its origin, id and time.
    pub async fn emit_relayed(&self, kind: &str, payload: Value, relayed: Relayed) {
        let emit = Emit { kind: kind.to_owned(), payload, ack: None, relayed: Some(relayed) };
        if self.0.send(emit).await.is_err() {
            tracing::debug!(kind, "event publisher stopped; relayed event dropped");
        }
    }

    /// Publishes an event and waits until it is journaled; returns its journal id, or `None`
    /// when the publisher has stopped or could not store it.
    pub async fn emit_durable(&self, event: Event) -> Option<i64> {
        let (tx, rx) = oneshot::channel();
        let (kind, payload) = event.into_parts();
        let emit = Emit { kind, payload, ack: Some(tx), relayed: None };
        self.0.send(emit).await.ok()?;
        rx.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_through_their_journal_form() {
        let event = Event::RoleChanged(RoleChanged {
            role: "root".into(),
            requested: "home".into(),
            previous: "edge".into(),
        });
        let kind = event.kind();
        let (journaled, payload) = event.clone().into_parts();
        assert_eq!(journaled, kind);
        assert_eq!(payload["requested"], "home");
        assert_eq!(Event::parse(&journaled, &payload), Some(event));
        assert_eq!(Event::parse("cluster.node.nonsense", &payload), None);
        assert_eq!(Event::parse("hierarchy.role.changed", &serde_json::json!({"x": 1})), None);
    }
}
