//! What a node says about itself (the advert payload), the registry record kept for each node,
//! and the `/state/cluster` view built from it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{node_id::NodeId, role::Role, time::rfc3339_ms};

/// A node's liveness as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Recently heard from.
    Ok,
    /// Missed heartbeats; not yet declared down.
    Suspect,
    /// Declared down on evidence that survives packet loss.
    Down,
    /// Announced a graceful departure.
    Left,
    /// No advert within `ttl_seconds` (computed when read).
    Stale,
}

impl Health {
    /// The wire and JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Suspect => "suspect",
            Health::Down => "down",
            Health::Left => "left",
            Health::Stale => "stale",
        }
    }
}

/// The advert payload (reference §3.1): everything a node claims about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Advert {
    /// The advertising node.
    pub id: NodeId,
    /// Its role.
    pub role: Role,
    /// The workspace it belongs to.
    pub workspace: String,
    /// The operator's hello epoch.
    pub epoch: u64,
    /// Strictly increasing per node, across restarts.
    pub seq: u64,
    /// When the node signed it (its own clock).
    pub advertised_ms: u64,
    /// How long the advert stays valid after `advertised_ms`.
    pub ttl_ms: u64,
    /// Probe results (`os, arch, arw_version, cpu, memory, gpus`) and `declared`.
    pub capabilities: Map<String, Value>,
    /// Scope tags from the hello.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Model summary `{count, preview}`, when the node hosts models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Value>,
    /// The node's own view of its health.
    pub health: Health,
    /// Where the node can be reached (libp2p multiaddrs).
    #[serde(default)]
    pub addrs: Vec<String>,
    /// Its `[cluster] bus` setting.
    pub bus: String,
    /// Its `[cluster] queue` setting.
    pub queue: String,
    /// The jobs it takes from the Home (none: it takes none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<JobsAdvert>,
    /// Its runtimes and their health (at most 6, see [`crate::runtimes`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runtimes: Vec<crate::runtimes::RuntimeStatus>,
}

impl Advert {
    /// An advert with only the required facts: role `edge`, a 360 s validity, no capabilities,
    /// tags or addresses, `local` bus and queue. Callers fill in the rest.
    pub fn basic(id: NodeId, workspace: &str, seq: u64, advertised_ms: u64) -> Self {
        Self {
            id,
            role: Role::Edge,
            workspace: workspace.to_owned(),
            epoch: 0,
            seq,
            advertised_ms,
            ttl_ms: 360_000,
            capabilities: Map::new(),
            tags: Vec::new(),
            models: None,
            health: Health::Ok,
            addrs: Vec::new(),
            bus: "local".into(),
            queue: "local".into(),
            jobs: None,
            runtimes: Vec::new(),
        }
    }
}

/// What a node advertises about the jobs it takes from the Home.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobsAdvert {
    /// Jobs it runs at once.
    pub slots: u32,
    /// Kinds it runs for the Home.
    pub accepts: Vec<String>,
    /// It takes no new work.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
    /// When it started (its clock, ms): a new value says it restarted, and every attempt it held
    /// is gone.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub boot: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A node claiming to be the Home (advertising role `root`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HomeClaim {
    /// Node id.
    pub id: String,
    /// Its key.
    pub key: String,
}

/// The registry's record of one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The latest accepted advert (shared: snapshots copy records, never adverts).
    pub advert: Arc<Advert>,
    /// Receive time of the latest advert or heartbeat (this node's clock).
    pub last_seen_ms: u64,
    /// Liveness as seen here.
    pub health: Health,
    /// Whether this is the local node.
    #[serde(default)]
    pub local: bool,
}

/// One entry of `/state/cluster` (reference §1.3). Only `id` and `role` are always present, so
/// the CLI can read any compatible server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClusterNode {
    /// Node id.
    pub id: String,
    /// Role, lower-case.
    pub role: String,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `ok`, `suspect`, `down`, `left` or `stale`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    /// Free-form capabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Value>,
    /// Free-form model summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Value>,
    /// RFC 3339 receive time of the latest advert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// Same, in Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_ms: Option<u64>,
    /// Scope tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    /// Hello epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Advert sequence number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// True for the node answering the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<bool>,
    /// The sender's `advertised_ms`, as signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertised_ms: Option<u64>,
    /// The node's libp2p addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addrs: Option<Vec<String>>,
    /// The node's bus and queue settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<String>,
    /// See `bus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// At the Home: `admitted`, `pending`, `revoked` or `key_mismatch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission: Option<String>,
    /// The jobs the node takes from the Home: `{slots, accepts, draining}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<JobsAdvert>,
}

/// `/state/cluster`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClusterView {
    /// Nodes sorted by id.
    pub nodes: Vec<ClusterNode>,
    /// Homes that admitted this node and wait for the operator's trust (none once a Home is
    /// pinned).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_homes: Vec<PendingHome>,
    /// RFC 3339 time of this view.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated: Option<String>,
    /// Same, in Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated_ms: Option<u64>,
    /// Staleness threshold in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// A Home claim awaiting the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PendingHome {
    /// The Home's id, as its document says.
    pub home_id: String,
    /// Its key (base64).
    pub home_key: String,
    /// The key's fingerprint, as `trust-home` takes it.
    pub fingerprint: String,
    /// The epoch of its newest document.
    pub policy_epoch: u64,
}

impl NodeRecord {
    /// Health as shown at `now_ms`: an `ok` node not heard from for `ttl_ms` is `stale`.
    pub fn health_at(&self, now_ms: u64, ttl_ms: u64) -> Health {
        let silent = self.last_seen_ms > 0 && now_ms.saturating_sub(self.last_seen_ms) > ttl_ms;
        if self.health == Health::Ok && silent { Health::Stale } else { self.health }
    }

    /// The `/state/cluster` entry for this record at `now_ms`.
    pub fn view(&self, now_ms: u64, ttl_ms: u64) -> ClusterNode {
        let a = &self.advert;
        ClusterNode {
            id: a.id.to_string(),
            role: a.role.as_str().to_owned(),
            name: None,
            health: Some(self.health_at(now_ms, ttl_ms).as_str().to_owned()),
            capabilities: Some(Value::Object(a.capabilities.clone())),
            models: a.models.clone(),
            last_seen: Some(rfc3339_ms(self.last_seen_ms)),
            last_seen_ms: Some(self.last_seen_ms),
            tags: Some(a.tags.clone()),
            epoch: Some(a.epoch),
            seq: Some(a.seq),
            local: Some(self.local),
            advertised_ms: Some(a.advertised_ms),
            addrs: Some(a.addrs.clone()),
            bus: Some(a.bus.clone()),
            queue: Some(a.queue.clone()),
            admission: None,
            jobs: a.jobs.clone(),
        }
    }

    /// Whether `other` says something different, ignoring what changes with every advert
    /// (`seq`, `advertised_ms`, `last_seen_ms`).
    pub fn differs_from(&self, other: &NodeRecord) -> bool {
        // Every field named, so a new one is compared too (or deliberately not).
        let Advert {
            id,
            role,
            workspace,
            epoch,
            seq: _,
            advertised_ms: _,
            ttl_ms,
            capabilities,
            tags,
            models,
            health,
            addrs,
            bus,
            queue,
            jobs,
            runtimes,
        } = &*self.advert;
        let o = &*other.advert;
        let same = *id == o.id
            && *role == o.role
            && *workspace == o.workspace
            && *epoch == o.epoch
            && *ttl_ms == o.ttl_ms
            && *capabilities == o.capabilities
            && *tags == o.tags
            && *models == o.models
            && *health == o.health
            && *addrs == o.addrs
            && *bus == o.bus
            && *queue == o.queue
            && *jobs == o.jobs
            && *runtimes == o.runtimes;
        !same || self.health != other.health || self.local != other.local
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(last_seen_ms: u64) -> NodeRecord {
        NodeRecord {
            advert: Arc::new(Advert {
                id: NodeId::parse("n1").expect("id"),
                role: Role::Edge,
                workspace: "default".into(),
                epoch: 0,
                seq: 1,
                advertised_ms: last_seen_ms,
                ttl_ms: 360_000,
                capabilities: Map::new(),
                tags: vec![],
                models: None,
                health: Health::Ok,
                addrs: vec![],
                bus: "local".into(),
                queue: "local".into(),
                jobs: None,
                runtimes: vec![],
            }),
            last_seen_ms,
            health: Health::Ok,
            local: false,
        }
    }

    #[test]
    fn stale_after_ttl_and_only_when_ok() {
        let r = record(1_000);
        assert_eq!(r.health_at(1_000 + 360_000, 360_000), Health::Ok);
        assert_eq!(r.health_at(1_001 + 360_000, 360_000), Health::Stale);
        let mut left = r.clone();
        left.health = Health::Left;
        assert_eq!(left.health_at(10_000_000, 360_000), Health::Left);
    }

    #[test]
    fn re_advertising_the_same_facts_is_not_a_change() {
        let a = record(1_000);
        let mut b = record(2_000);
        Arc::make_mut(&mut b.advert).seq = 2;
        assert!(!a.differs_from(&b));
        Arc::make_mut(&mut b.advert).role = Role::Root;
        assert!(a.differs_from(&b));
    }
}
