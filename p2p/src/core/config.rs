//! What a node is started with: its key, workspace, timings, federation settings, and the state
//! it restored from disk.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{
    admission::Roster,
    capsule::{CapsuleSet, TrustStore},
    governor::Governor,
    hierarchy::Hierarchy,
    identity::NodeKey,
    membership::{MembershipConfig, StoredMember},
    node_id::{IdSource, NodeId},
    policy::StoredPolicy,
    transport::{nats::NatsConfig, net::NetConfig},
};

/// Everything a node needs to start.
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
    /// Directory for the node's state files.
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
    /// Federation; `None` is the single-node fast path.
    pub federation: Option<FederationConfig>,
    /// The capsule trust store file (`ARW_TRUST_CAPSULES`); `None`: every capsule is refused.
    pub capsule_trust: Option<PathBuf>,
    /// Where to send a record of every input the core handles and what it answered (tests,
    /// and replaying a real node's life in virtual time).
    pub trace: Option<tokio::sync::mpsc::UnboundedSender<super::Traced>>,
    /// `[jobs]`: slots, the kinds this node executes, what it runs for the Home.
    pub jobs: crate::jobs::JobsConfig,
    /// Where [`super::Effect::Execute`] and [`super::Effect::Abort`] go (the daemon's
    /// executors); without one, nothing runs and every job this node would run fails.
    pub executor: Option<tokio::sync::mpsc::UnboundedSender<crate::jobs::Exec>>,
    /// Where [`super::Effect::Contribution`] goes (the daemon's egress ledger); none: dropped.
    pub contributions: Option<tokio::sync::mpsc::UnboundedSender<crate::jobs::Contribution>>,
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
            trace: None,
            jobs: crate::jobs::JobsConfig::default(),
            executor: None,
            contributions: None,
        }
    }
}

/// Settings for federating with other nodes.
#[derive(Debug, Clone)]
pub struct FederationConfig {
    /// The bus.
    pub bus: BusConfig,
    /// How often to probe the watched nodes (mesh) or send a heartbeat (broker).
    pub heartbeat_interval: Duration,
    /// Trust and liveness rules.
    pub membership: MembershipConfig,
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

    /// The NATS bus through `nats`, with the default membership rules for `workspace`.
    pub fn broker(
        workspace: &str,
        nats: crate::nats::NatsConfig,
        heartbeat_interval: Duration,
    ) -> Self {
        Self {
            bus: BusConfig::Nats(nats),
            heartbeat_interval,
            membership: MembershipConfig::new(workspace),
        }
    }
}

/// Which bus carries the federation.
#[derive(Debug, Clone)]
pub enum BusConfig {
    /// The broker-less libp2p mesh (`bus = "local"`).
    Libp2p(NetConfig),
    /// A NATS broker (`bus = "nats"`).
    Nats(NatsConfig),
}

/// Persisted registry state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterStore {
    /// Highest advert `seq` this node has signed.
    pub self_seq: u64,
    /// Remote nodes as last known.
    pub nodes: Vec<StoredMember>,
}

/// The state a node restored from disk (all empty for a new node).
#[derive(Debug, Default)]
pub struct Restored {
    /// `hierarchy.json`.
    pub hierarchy: Hierarchy,
    /// The registry and the advert sequence.
    pub registry: ClusterStore,
    /// At the Home: who is admitted.
    pub roster: Roster,
    /// The Home's policy as this node holds it.
    pub policy: StoredPolicy,
    /// This node's governor settings.
    pub governor: Governor,
    /// Capsules held.
    pub capsules: CapsuleSet,
    /// Issuers whose capsules are accepted.
    pub trust: TrustStore,
    /// Stored jobs (those not ended, and recent ones for their idempotency keys).
    pub jobs: crate::jobs::StoredJobs,
}
