//! The actor behind [`super::NodeHandle`]: hierarchy commands, local adverts and heartbeats,
//! and the glue between the membership core and the transport. The Home's authority (policy
//! documents, capsules) is in [`authority`].

mod authority;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant as StdInstant},
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::{
    sync::{mpsc, watch},
    time::{Instant, MissedTickBehavior},
};
use tokio_util::sync::CancellationToken;

use base64::{Engine, engine::general_purpose::STANDARD as B64};

use super::{
    AdmissionChange, BusConfig, Command, FederationConfig, HomeClaim, Mismatch, NetworkStatus,
    NodeConfig, NodeError, Snapshot,
};
use crate::{
    admission::{Admission, Roster},
    capsule::{CapsuleSet, TrustStore},
    cluster::{Advert, Health, NodeRecord},
    events::EventTx,
    hierarchy::{CoreHello, HelloOutcome, Hierarchy, HierarchyError, RoleChange},
    membership::{Change, MembershipConfig, Receipt, StoredMember},
    nats::{self, NatsBus},
    net::{self, Net},
    node_id::{self, IdSource, NodeId},
    persist,
    policy::StoredPolicy,
    protocol::{Protocol, SyncRequest, SyncResponse},
    role::Role,
    time::{now_ms, rfc3339_ms},
    transport::{Inbound, SyncReply, Transport, TransportEvent},
    wire::{self, Reason},
};

const HIERARCHY_FILE: &str = "hierarchy.json";
const CLUSTER_FILE: &str = "cluster_nodes.json";
const ROSTER_FILE: &str = "roster.json";
pub(super) const COMMAND_QUEUE: usize = 64;
/// Membership timers, snapshot refresh and registry flushes run this often.
const TICK: Duration = Duration::from_millis(250);
/// The registry file is rewritten at most this often.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// How long a graceful stop keeps the transport running so the leave goes out.
const LEAVE_FLUSH: Duration = Duration::from_millis(300);
/// At most this many `cluster.event.rejected` events per window; the rest are counted.
const REJECTIONS_PER_WINDOW: u32 = 20;
const REJECTION_WINDOW: Duration = Duration::from_secs(10);
/// Ask one peer for a sync at most this often when its heartbeats name unknown nodes.
const SYNC_RETRY: Duration = Duration::from_secs(5);

/// Persisted registry state (`cluster_nodes.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct ClusterStore {
    /// Highest advert `seq` this node has signed.
    self_seq: u64,
    /// Remote nodes as last known.
    nodes: Vec<StoredMember>,
}

pub(super) struct Actor {
    config: NodeConfig,
    events: EventTx,
    id: NodeId,
    id_source: IdSource,
    hierarchy: Arc<Hierarchy>,
    local: Option<NodeRecord>,
    /// Adverts, heartbeats, sync and the membership core.
    protocol: Protocol,
    transport: Option<Transport>,
    /// Remote nodes whose advertised bus or queue differs from ours, as last reported.
    mismatched: BTreeMap<NodeId, (String, String)>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    snapshot_dirty: bool,
    store_dirty: bool,
    last_flush: StdInstant,
    rejections: RejectionLimit,
    /// At the Home: who is admitted.
    roster: Arc<Roster>,
    /// The Home claims last reported (ids), so a conflict is reported once.
    reported_homes: Vec<String>,
    /// When this node last reported a reset connection to each node.
    reported: BTreeMap<NodeId, StdInstant>,
    /// When a sync was last asked of each peer (`None`: of everyone, on NATS).
    sync_asked: BTreeMap<Option<libp2p::PeerId>, StdInstant>,
    /// Capsules held, with their leases.
    capsules: Arc<CapsuleSet>,
    /// Issuers whose capsules are accepted.
    trust: Arc<TrustStore>,
    /// Capsule changes kept in memory, not yet written (quiet renewals, a failed write).
    capsules_dirty: bool,
    /// At the Home: why a new policy document is wanted (signed by the next tick it may).
    policy_pending: Option<String>,
    /// When the Home last signed one.
    last_policy: Option<StdInstant>,
    /// This node's governor profile and hints.
    governor: Arc<crate::governor::Governor>,
}

impl Actor {
    /// Loads state, starts the transport, publishes the first snapshot and advert.
    pub(super) async fn start(
        config: NodeConfig,
        events: EventTx,
    ) -> std::io::Result<(Self, watch::Receiver<Arc<Snapshot>>)> {
        let hierarchy: Hierarchy =
            persist::load_json(&config.state_dir.join(HIERARCHY_FILE))?.unwrap_or_default();
        let store: ClusterStore =
            persist::load_json(&config.state_dir.join(CLUSTER_FILE))?.unwrap_or_default();
        let roster: Roster =
            persist::load_json(&config.state_dir.join(ROSTER_FILE))?.unwrap_or_default();
        let stored_policy: StoredPolicy =
            persist::load_json(&config.state_dir.join(authority::POLICY_FILE))?.unwrap_or_default();
        let governor: crate::governor::Governor =
            persist::load_json(&config.state_dir.join(authority::GOVERNOR_FILE))?
                .unwrap_or_default();
        let stored_capsules: serde_json::Value =
            persist::load_json(&config.state_dir.join(authority::CAPSULES_FILE))?
                .unwrap_or_default();
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
            tracing::warn!(path = %path.display(), "the capsule trust store is missing or lists no issuer: every capsule will be refused");
        }
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

        let mut membership_config = config
            .federation
            .as_ref()
            .map_or_else(|| MembershipConfig::new(&config.workspace), |f| f.membership.clone());
        // The mesh reaches single nodes, so liveness is probed; a broker hears everything, so
        // heartbeats are broadcast (docs/protocol.md, "Liveness").
        membership_config.observers = match config.federation.as_ref().map(|f| &f.bus) {
            Some(super::BusConfig::Libp2p(_)) => {
                Some(membership_config.observers.unwrap_or(crate::membership::DEFAULT_OBSERVERS))
            }
            _ => None,
        };
        let mut protocol =
            Protocol::new(config.key.clone(), id.clone(), membership_config, store.self_seq);
        protocol.membership_mut().restore(store.nodes);
        if let Some(warning) = protocol.policy_mut().restore(stored_policy) {
            tracing::warn!("{warning}");
        }
        // The restored registry already follows the roster it was built under.
        let _ = protocol.apply_roster();

        let transport = match &config.federation {
            Some(federation) => Some(start_transport(&config, federation).await?),
            None => None,
        };

        let (snapshot, rx) = watch::channel(Arc::new(Snapshot {
            id: id.clone(),
            id_source,
            peer_id: config.key.peer_id().to_string(),
            public_key: config.key.public_b64(),
            workspace: config.workspace.clone(),
            hierarchy: Arc::new(hierarchy.clone()),
            nodes: BTreeMap::new(),
            ttl_ms: duration_ms(config.ttl),
            network: NetworkStatus::default(),
            admission: BTreeMap::new(),
            home_claims: Vec::new(),
            policy: super::PolicyView::default(),
            capsules: Arc::new(capsules.clone()),
            trust: Arc::new(trust.clone()),
            governor: Arc::new(governor.clone()),
        }));
        let mut actor = Self {
            config,
            events,
            id,
            id_source,
            hierarchy: Arc::new(hierarchy),
            local: None,
            protocol,
            transport,
            mismatched: BTreeMap::new(),
            snapshot,
            snapshot_dirty: true,
            store_dirty: false,
            last_flush: StdInstant::now(),
            rejections: RejectionLimit::default(),
            sync_asked: BTreeMap::new(),
            reported: BTreeMap::new(),
            roster: Arc::new(roster),
            reported_homes: Vec::new(),
            capsules: Arc::new(capsules),
            trust: Arc::new(trust),
            capsules_dirty: false,
            policy_pending: None,
            last_policy: None,
            governor: Arc::new(governor),
        };
        actor.reapply_home_capsules();
        actor.advertise("boot").await;
        actor.want_policy("boot").await;
        // Nodes remembered from before a restart are stale until they speak again: dial them so
        // they can, even when nobody lists this node as a bootstrap peer.
        if let Some(transport) = &mut actor.transport {
            for member in actor.protocol.membership().members().values() {
                transport.dial_advertised(&member.record.advert.addrs);
            }
        }
        Ok((actor, rx))
    }

    pub(super) async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        cancel: CancellationToken,
    ) {
        let period = self.config.advertise_interval.max(Duration::from_secs(1));
        let mut readvertise = tokio::time::interval_at(Instant::now() + period, period);
        readvertise.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let beat_period = self
            .config
            .federation
            .as_ref()
            .map_or(Duration::from_secs(3600), |f| f.heartbeat_interval);
        let mut heartbeat = tokio::time::interval_at(Instant::now() + beat_period, beat_period);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // A silence reaching its threshold between two ticks is judged at that moment.
        let mut judge_at: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Some(cmd) = commands.recv() => self.handle(cmd).await,
                event = next_event(&mut self.transport) => self.on_transport(event).await,
                () = sleep_until_some(judge_at) => {
                    judge_at = None;
                    self.judge().await;
                }
                _ = tick.tick() => {
                    self.on_tick().await;
                    judge_at = self.next_judgment();
                }
                _ = heartbeat.tick(), if self.transport.is_some() => self.on_beat().await,
                _ = readvertise.tick() => self.advertise("interval").await,
            }
        }
        self.stop().await;
    }

    async fn stop(&mut self) {
        if self.transport.is_some() {
            self.send_beat(true).await;
            let deadline = Instant::now() + LEAVE_FLUSH;
            while tokio::time::timeout_at(deadline, next_event(&mut self.transport)).await.is_ok() {
            }
        }
        self.flush_store(true).await;
        if self.capsules_dirty
            && let Err(e) = persist::save_json_off_thread(
                self.path(authority::CAPSULES_FILE),
                self.capsules.stored(),
            )
            .await
        {
            tracing::warn!(error = %e, "could not persist capsules at shutdown");
        }
        tracing::debug!("node actor stopped");
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::SetRole(role, reply) => {
                let result = self.set_role(&role).await;
                self.reply(reply, result);
            }
            Command::Hello(hello, reply) => {
                let result = self.hello(hello).await;
                self.reply(reply, result);
            }
            Command::Offer(offer, reply) => {
                let result = self.change_hierarchy(|h, me| h.offer(&offer, me)).await;
                if result.is_ok() {
                    self.emit("hierarchy.offer", json_of(&offer)).await;
                }
                self.reply(reply, result);
            }
            Command::Accept(accept, reply) => {
                let result = self.change_hierarchy(|h, me| h.accept(&accept, me)).await;
                if result.is_ok() {
                    self.emit("hierarchy.accepted", json_of(&accept)).await;
                }
                self.reply(reply, result);
            }
            Command::Admit(id, key, reply) => {
                let result = self.admit(&id, key).await;
                self.reply(reply, result);
            }
            Command::Revoke(id, reply) => {
                let result = self.revoke(&id).await;
                self.reply(reply, result);
            }
            Command::AdoptCapsule(request, reply) => {
                let result = self.adopt_capsule(*request).await;
                self.reply(reply, result);
            }
            Command::Teardown(request, reply) => {
                let result = self.teardown_capsules(request).await;
                self.reply(reply, result);
            }
            Command::ReloadTrust(reply) => {
                let result = self.reload_trust().await;
                self.reply(reply, result);
            }
            Command::SetProfile(name, reply) => {
                let result = self.set_profile(name).await;
                self.reply(reply, result);
            }
            Command::SetHints(hints, reply) => {
                let result = self.set_hints(*hints).await;
                self.reply(reply, result);
            }
        }
    }

    /// Answers a command once readers can see what it did.
    fn reply<T>(&mut self, reply: tokio::sync::oneshot::Sender<T>, result: T) {
        self.publish_snapshot();
        let _ = reply.send(result);
    }

    /// At the Home: admits `id` with `key`, or the key it advertises now.
    async fn admit(&mut self, id: &str, key: Option<String>) -> Result<AdmissionChange, NodeError> {
        if self.hierarchy.role != Role::Root {
            return Err(NodeError::NotHome);
        }
        let id = NodeId::parse(id).map_err(HierarchyError::from)?;
        let key = match key {
            Some(key) => {
                let bytes = B64.decode(key.trim()).map_err(|_| NodeError::InvalidKey)?;
                <[u8; 32]>::try_from(bytes).map_err(|_| NodeError::InvalidKey)?;
                key.trim().to_owned()
            }
            None => match self.protocol.membership().members().get(&id) {
                Some(member) => B64.encode(member.key),
                None => {
                    return Err(NodeError::UnknownNode(format!(
                        "no node {id} has advertised; pass its key"
                    )));
                }
            },
        };
        let mut next = (*self.roster).clone();
        if next.admit(&id, &key) {
            self.commit_roster(next).await?;
            self.emit("cluster.node.admitted", json!({ "id": id, "key": key })).await;
            self.want_policy("node admitted").await;
        }
        Ok(AdmissionChange { id: id.to_string(), admission: self.roster.status(&id, &key), key })
    }

    /// At the Home: revokes `id`.
    async fn revoke(&mut self, id: &str) -> Result<AdmissionChange, NodeError> {
        if self.hierarchy.role != Role::Root {
            return Err(NodeError::NotHome);
        }
        let id = NodeId::parse(id).map_err(HierarchyError::from)?;
        let mut next = (*self.roster).clone();
        let Some(key) = next.revoke(&id) else {
            return Err(NodeError::UnknownNode(format!("{id} is not admitted")));
        };
        self.commit_roster(next).await?;
        self.emit("cluster.node.revoked", json!({ "id": id, "key": key })).await;
        self.want_policy("node revoked").await;
        Ok(AdmissionChange { id: id.to_string(), key, admission: Admission::Revoked })
    }

    /// Persists a new roster, then makes it current.
    async fn commit_roster(&mut self, next: Roster) -> Result<(), NodeError> {
        persist::save_json_off_thread(self.path(ROSTER_FILE), next.clone())
            .await
            .map_err(|e| NodeError::Persist(e.to_string()))?;
        self.roster = Arc::new(next);
        Ok(())
    }

    /// Reports (once per change) when more than one node advertises role `root`.
    async fn check_home_claims(&mut self) {
        let claims = self.home_claims();
        let ids: Vec<String> = claims.iter().map(|c| c.id.clone()).collect();
        if ids == self.reported_homes {
            return;
        }
        self.reported_homes = ids;
        if claims.len() > 1 {
            tracing::warn!(homes = ?self.reported_homes, "more than one node claims to be the Home");
            self.emit("cluster.home.conflict", json!({ "homes": claims })).await;
        }
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
        if self.hierarchy.role == Role::Root {
            claims.push(HomeClaim { id: self.id.to_string(), key: self.config.key.public_b64() });
        }
        claims.sort_by(|a, b| a.id.cmp(&b.id));
        claims
    }

    async fn set_role(&mut self, requested: &str) -> Result<RoleChange, NodeError> {
        let change = self.change_hierarchy(|h, _| h.set_role(requested)).await?;
        if change.changed() {
            let payload = json!({
                "role": change.role.as_str(),
                "requested": requested,
                "previous": change.previous.as_str(),
            });
            self.emit("hierarchy.role.changed", payload).await;
            self.advertise("role").await;
            self.check_home_claims().await;
            self.on_role_change().await;
        }
        Ok(change)
    }

    async fn hello(&mut self, hello: CoreHello) -> Result<HelloOutcome, NodeError> {
        let explicit = self.id_source.is_explicit();
        let outcome = self.change_hierarchy(|h, me| h.hello(&hello, me, explicit)).await?;
        if let Some(new_id) = &outcome.new_id {
            tracing::info!(from = %self.id, to = %new_id, "node id assigned by hello");
            // Tell the others the old id is gone before speaking under the new one.
            self.send_beat(true).await;
            self.local = None;
            self.id = new_id.clone();
            self.id_source = IdSource::Hello;
            self.protocol.set_id(new_id.clone());
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
    /// unpersistable change leaves the state untouched. Emits `hierarchy.state` when the epoch
    /// moved.
    async fn change_hierarchy<T>(
        &mut self,
        f: impl FnOnce(&mut Hierarchy, &NodeId) -> Result<T, HierarchyError>,
    ) -> Result<T, NodeError> {
        let mut next = (*self.hierarchy).clone();
        let out = f(&mut next, &self.id)?;
        if next == *self.hierarchy {
            return Ok(out);
        }
        persist::save_json_off_thread(self.path(HIERARCHY_FILE), next.clone())
            .await
            .map_err(|e| NodeError::Persist(e.to_string()))?;
        let epoch_moved = next.epoch != self.hierarchy.epoch;
        self.hierarchy = Arc::new(next);
        self.snapshot_dirty = true;
        if epoch_moved {
            self.emit("hierarchy.state", json!({ "epoch": self.hierarchy.epoch })).await;
        }
        Ok(out)
    }

    /// Signs the next advert, records it locally and sends it.
    async fn advertise(&mut self, reason: &str) {
        let now = now_ms();
        let advert = self.local_advert(self.protocol.next_seq(now), now);
        // The sequence number must be on disk before anyone sees it.
        if let Err(e) = self.write_store(advert.seq).await {
            tracing::warn!(error = %e, "could not persist advert sequence; advert skipped");
            return;
        }
        let sealed = self.protocol.seal_advert(&advert);
        if sealed.len() > wire::MAX_ENVELOPE {
            tracing::warn!(
                bytes = sealed.len(),
                "advert exceeds the envelope limit; peers will refuse it"
            );
        }
        if let Some(transport) = &mut self.transport {
            transport.publish(sealed).await;
        }
        let record = NodeRecord {
            advert: advert.clone(),
            last_seen_ms: now,
            health: Health::Ok,
            local: true,
        };
        let changed = self.local.as_ref().is_none_or(|old| old.differs_from(&record));
        self.local = Some(record.clone());
        self.publish_snapshot();
        tracing::debug!(reason, seq = advert.seq, "advertised");
        self.emit("cluster.node.advertise", advert_payload(&advert)).await;
        if changed {
            let view = record.view(now, duration_ms(self.config.ttl));
            self.emit("cluster.node.changed", json_of(&view)).await;
        }
    }

    fn local_advert(&self, seq: u64, now: u64) -> Advert {
        let h = &self.hierarchy;
        let mut capabilities = self.config.capabilities.clone();
        capabilities.insert("declared".into(), json!(h.capabilities));
        Advert {
            id: self.id.clone(),
            role: h.role,
            workspace: self.config.workspace.clone(),
            epoch: h.hello_epoch.unwrap_or(0),
            seq,
            advertised_ms: now,
            ttl_ms: duration_ms(self.config.ttl),
            capabilities,
            tags: h.tags.clone(),
            models: None,
            health: Health::Ok,
            addrs: self.transport.as_ref().map(Transport::addresses).unwrap_or_default(),
            bus: self.config.bus.clone(),
            queue: self.config.queue.clone(),
        }
    }

    /// A heartbeat, or with `leave` a graceful departure, for the current id.
    async fn send_beat(&mut self, leave: bool) {
        let Some(transport) = &mut self.transport else { return };
        let now = now_ms();
        let message = if leave { self.protocol.leave(now) } else { self.protocol.heartbeat(now) };
        transport.publish(message).await;
    }

    /// Once per heartbeat period: probe the watched nodes (probe mode), or tell everyone this
    /// node is alive (broadcast mode).
    async fn on_beat(&mut self) {
        if self.protocol.membership().config().observers.is_none() {
            return self.send_beat(false).await;
        }
        let probes = self.protocol.probes();
        self.send_probes(probes).await;
    }

    /// Sends what the protocol core has for everyone (suspicion reports, refutations).
    async fn send_outbox(&mut self) {
        let outbox = self.protocol.take_outbox();
        if let Some(transport) = &mut self.transport {
            for envelope in outbox {
                transport.publish(envelope).await;
            }
        }
    }

    async fn on_tick(&mut self) {
        self.judge().await;
        if let Some(transport) = &mut self.transport {
            transport.maintain();
        }
        self.authority_tick().await;
        self.flush_store(false).await;
        if self.snapshot_dirty {
            self.publish_snapshot();
        }
    }

    async fn on_transport(&mut self, event: TransportEvent) {
        match event {
            TransportEvent::Message { bytes, via } => {
                let receipt = self.protocol.receive(&bytes, now_ms());
                if let Some(transport) = &mut self.transport {
                    transport.report(&via, receipt.verdict);
                }
                let source = match via {
                    Inbound::Gossip { source, .. } => Some(source),
                    Inbound::Broker => None,
                };
                self.on_receipt(receipt, source).await;
            }
            TransportEvent::PeerUp(peer) => {
                self.ask_sync(Some(peer), true).await;
                self.snapshot_dirty = true;
            }
            TransportEvent::PeerDown(peer) => {
                self.snapshot_dirty = true;
                self.report_reset(peer).await;
            }
            TransportEvent::Link(up) => self.on_link(up).await,
            TransportEvent::SyncRequest { from, request, reply } => {
                self.answer_sync(&request, reply).await;
                // Probed by a node we never heard of: its advert missed us; ask it.
                if request.probe
                    && let Some(peer) = from
                    && self.protocol.membership().id_of_peer(&peer).is_none()
                {
                    self.ask_sync(Some(peer), false).await;
                }
            }
            TransportEvent::SyncResponse { from, response } => self.on_answer(from, response).await,
            TransportEvent::Listening => {
                let listen = self.transport.as_ref().map(Transport::addresses).unwrap_or_default();
                if self.local.as_ref().is_some_and(|l| l.advert.addrs != listen) {
                    self.advertise("addresses").await;
                }
            }
            TransportEvent::Internal => {}
        }
    }

    /// Moves silent nodes along `ok → suspect → down`. While the broker is unreachable this
    /// node cannot hear anyone: the silence is ours, not theirs, so nobody is judged until the
    /// link is back.
    async fn judge(&mut self) {
        if self.transport.as_ref().is_none_or(Transport::is_linked) {
            let changes = self.protocol.tick(now_ms());
            self.send_outbox().await;
            self.apply_changes(changes).await;
        }
    }

    /// When to judge before the next tick, if a silence reaches its threshold before then
    /// (messages only push deadlines later, so this is computed after each tick).
    fn next_judgment(&self) -> Option<Instant> {
        let due = self.protocol.next_deadline()?;
        let wait = Duration::from_millis(due.saturating_sub(now_ms()));
        (wait < TICK).then(|| Instant::now() + wait)
    }

    /// A direct connection was reset (not closed by us): tell everyone, so they suspect the node
    /// now rather than after seconds of silence. At most once per node per [`SYNC_RETRY`].
    async fn report_reset(&mut self, peer: libp2p::PeerId) {
        let Some(target) = self.protocol.membership().id_of_peer(&peer).cloned() else { return };
        let now = StdInstant::now();
        if self.reported.get(&target).is_some_and(|t| now.duration_since(*t) < SYNC_RETRY) {
            return;
        }
        self.reported.insert(target.clone(), now);
        let change = self.protocol.suspect(&target, now_ms());
        self.send_outbox().await;
        self.apply_changes(change.into_iter().collect()).await;
    }

    /// A peer answered a sync request or a probe. Any answer is a sign of life of the peer (the
    /// connection authenticates it).
    async fn on_answer(&mut self, from: Option<libp2p::PeerId>, response: SyncResponse) {
        let now = now_ms();
        if let Some(id) = from.and_then(|p| self.protocol.membership().id_of_peer(&p).cloned()) {
            self.snapshot_dirty = true;
            if self.protocol.probe_answered(&id, response.policy_epoch, now) {
                self.ask_sync(from, false).await;
            }
        }
        for envelope in response.envelopes {
            let receipt = self.protocol.receive(envelope.as_bytes(), now);
            self.on_receipt(receipt, from).await;
        }
    }

    /// Probes `probes` now (each answer comes back as a sync response).
    async fn send_probes(&mut self, probes: Vec<crate::membership::Probe>) {
        let Some(transport) = &mut self.transport else { return };
        let policy_epoch = self.protocol.policy().epoch();
        for probe in probes {
            let Some(peer) = probe.peer else { continue };
            let request =
                SyncRequest { probe: true, proof: probe.proof, policy_epoch, ..Default::default() };
            transport.request_sync(Some(peer), request).await;
        }
    }

    /// The broker link came up or went away.
    async fn on_link(&mut self, up: bool) {
        self.snapshot_dirty = true;
        let broker = self.transport.as_ref().and_then(|t| t.status(&self.config.bus).broker);
        if !up {
            tracing::warn!(?broker, "bus disconnected; reconnecting");
            self.emit("cluster.bus.disconnected", json!({ "broker": broker })).await;
            return;
        }
        tracing::info!(?broker, "bus connected");
        self.protocol.membership_mut().resume(now_ms());
        self.emit("cluster.bus.connected", json!({ "broker": broker })).await;
        // Whatever was missed while away: the others' adverts, and ours to them.
        self.ask_sync(None, true).await;
        if let (Some(transport), Some(own)) = (&mut self.transport, self.protocol.own_advert()) {
            transport.publish(own.to_vec()).await;
        }
    }

    /// Sends the asker the adverts it lacks: everything known over libp2p (it asked one peer),
    /// only this node's own over NATS (every node answers).
    /// A probe is answered at once (with proof when asked, which also goes to everyone). Nodes
    /// the asker has lost but this node holds `ok` are asked for proof of life.
    async fn answer_sync(&mut self, request: &SyncRequest, reply: SyncReply) {
        let Some(transport) = &mut self.transport else { return };
        if request.probe {
            let answer = self.protocol.answer_probe(request.proof, now_ms());
            transport.respond(reply, answer).await;
            return self.send_outbox().await;
        }
        if let Some(answer) = self.protocol.sync_answer(request, transport.answers_for_everyone()) {
            transport.respond(reply, answer).await;
        }
        let vouch = self.protocol.vouch(request, now_ms());
        self.send_outbox().await;
        self.send_probes(vouch).await;
    }

    /// Asks for the adverts this node lacks: from `peer` (libp2p), or from everyone (NATS).
    async fn ask_sync(&mut self, peer: Option<libp2p::PeerId>, force: bool) {
        let now = StdInstant::now();
        let last = self.sync_asked.get(&peer);
        if !force && last.is_some_and(|t| now.duration_since(*t) < SYNC_RETRY) {
            return;
        }
        self.sync_asked.insert(peer, now);
        let request = self.protocol.sync_request();
        if let Some(transport) = &mut self.transport {
            transport.request_sync(peer, request).await;
        }
    }

    async fn on_receipt(&mut self, mut receipt: Receipt, source: Option<libp2p::PeerId>) {
        self.send_outbox().await;
        // Even a heartbeat that changes no health moves `last_seen`.
        self.snapshot_dirty |= receipt.verdict == crate::membership::Verdict::Accept;
        let behind = receipt.changes.iter().any(|c| matches!(c, Change::PolicyBehind { .. }));
        receipt.changes.retain(|c| !matches!(c, Change::PolicyBehind { .. }));
        if behind {
            // A peer holds a newer policy: ask whoever forwarded it (libp2p) or everyone (NATS).
            self.ask_sync(source, false).await;
        }
        self.apply_changes(receipt.changes).await;

        let Some(refusal) = receipt.refusal else {
            return;
        };
        if refusal.reason == Reason::UnknownNode {
            // A heartbeat from a node whose advert never reached us: ask the forwarder (libp2p)
            // or everyone (NATS).
            self.ask_sync(source, false).await;
            return;
        }
        tracing::debug!(reason = refusal.reason.as_str(), kind = refusal.kind, claimed = ?refusal.claimed_id, "message refused");
        if let Some(suppressed) = self.rejections.admit() {
            let topic = self
                .transport
                .as_ref()
                .and_then(|t| t.status(&self.config.bus).topic)
                .unwrap_or_else(|| net::topic_name(&self.config.workspace));
            let mut payload = json!({ "subject": topic, "kind": refusal.kind, "reason": refusal.reason.as_str() });
            if let Some(id) = refusal.claimed_id {
                payload["claimed_id"] = json!(id);
            }
            if suppressed > 0 {
                payload["suppressed"] = json!(suppressed);
            }
            self.emit("cluster.event.rejected", payload).await;
        }
    }

    /// Reports (once per change) a node whose bus or queue setting differs from ours: such nodes
    /// do not hear each other's broadcasts or share a task queue.
    async fn check_transport_match(&mut self, advert: &Advert) {
        let theirs = (advert.bus.clone(), advert.queue.clone());
        let same = theirs.0 == self.config.bus && theirs.1 == self.config.queue;
        if same {
            if self.mismatched.remove(&advert.id).is_some() {
                self.snapshot_dirty = true;
            }
            return;
        }
        if self.mismatched.get(&advert.id) == Some(&theirs) {
            return;
        }
        tracing::warn!(node = %advert.id, bus = %theirs.0, queue = %theirs.1, "node uses another bus or queue");
        let payload = json!({
            "id": advert.id, "bus": theirs.0, "queue": theirs.1,
            "local_bus": self.config.bus, "local_queue": self.config.queue,
        });
        self.mismatched.insert(advert.id.clone(), theirs);
        self.snapshot_dirty = true;
        self.emit("cluster.bus.mismatch", payload).await;
    }

    /// Turns membership changes into events, and publishes the snapshot at once: readers see a
    /// change in health or content as soon as the events do (plain heartbeats wait for the tick).
    async fn apply_changes(&mut self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        self.publish_snapshot();
        let now = now_ms();
        let ttl = duration_ms(self.config.ttl);
        for change in changes {
            match change {
                Change::Advert { id, changed, .. } => {
                    self.store_dirty = true;
                    let Some(member) = self.protocol.membership().members().get(&id) else {
                        continue;
                    };
                    let record = member.record.clone();
                    if let Some(transport) = &mut self.transport {
                        transport.dial_advertised(&record.advert.addrs);
                    }
                    self.check_transport_match(&record.advert).await;
                    self.check_home_claims().await;
                    self.emit("cluster.node.advertise", advert_payload(&record.advert)).await;
                    if changed {
                        self.emit("cluster.node.changed", json_of(&record.view(now, ttl))).await;
                    }
                }
                Change::Health { id, from, to } => {
                    tracing::info!(node = %id, from = from.as_str(), to = to.as_str(), "node health changed");
                    let Some(member) = self.protocol.membership().members().get(&id) else {
                        continue;
                    };
                    if to == Health::Down
                        && let (Some(peer), Some(transport)) = (member.peer_id, &mut self.transport)
                    {
                        transport.reset(peer);
                    }
                    let mut view = json_of(&member.record.view(now, ttl));
                    view["previous_health"] = json!(from.as_str());
                    self.emit("cluster.node.changed", view).await;
                }
                Change::Evicted { record } => {
                    self.store_dirty = true;
                    let mut view = json_of(&record.view(now, ttl));
                    view["evicted"] = json!(true);
                    self.emit("cluster.node.changed", view).await;
                }
                Change::Policy(applied) => self.on_policy(applied).await,
                Change::PolicyBehind { .. } => {}
                Change::SelfSuspected { .. } => {
                    tracing::debug!("a report said this node was lost; refuted");
                }
                Change::Conflict { id, known_key, claimed_key } => {
                    tracing::warn!(node = %id, "a message claimed this id with another key");
                    let payload =
                        json!({ "id": id, "known_key": known_key, "claimed_key": claimed_key });
                    self.emit("cluster.node.conflict", payload).await;
                }
            }
        }
    }

    fn publish_snapshot(&mut self) {
        self.snapshot_dirty = false;
        let mut nodes: BTreeMap<NodeId, NodeRecord> = self
            .protocol
            .membership()
            .members()
            .iter()
            .map(|(id, m)| (id.clone(), m.record.clone()))
            .collect();
        if let Some(local) = &self.local {
            nodes.insert(local.advert.id.clone(), local.clone());
        }
        let mut network = match &self.transport {
            Some(transport) => transport.status(&self.config.bus),
            None => NetworkStatus {
                state: "disabled".to_owned(),
                bus: self.config.bus.clone(),
                ..NetworkStatus::default()
            },
        };
        network.queue = self.config.queue.clone();
        network.mismatched = self
            .mismatched
            .iter()
            .map(|(id, (bus, queue))| Mismatch {
                id: id.to_string(),
                bus: bus.clone(),
                queue: queue.clone(),
            })
            .collect();
        let admission = if self.hierarchy.role == Role::Root {
            let members = self.protocol.membership().members();
            members
                .iter()
                .map(|(id, m)| (id.clone(), self.roster.status(id, &B64.encode(m.key))))
                .collect()
        } else {
            BTreeMap::new()
        };
        let home_claims = Some(self.home_claims()).filter(|c| c.len() > 1).unwrap_or_default();
        self.snapshot.send_replace(Arc::new(Snapshot {
            id: self.id.clone(),
            id_source: self.id_source,
            peer_id: self.config.key.peer_id().to_string(),
            public_key: self.config.key.public_b64(),
            workspace: self.config.workspace.clone(),
            hierarchy: self.hierarchy.clone(),
            nodes,
            ttl_ms: duration_ms(self.config.ttl),
            network,
            admission,
            home_claims,
            policy: self.policy_view(),
            capsules: self.capsules.clone(),
            trust: self.trust.clone(),
            governor: self.governor.clone(),
        }));
    }

    /// Writes `cluster_nodes.json` (advert seq and registry). The actor waits; the runtime's
    /// worker threads do not.
    async fn write_store(&mut self, self_seq: u64) -> std::io::Result<()> {
        let nodes = self.protocol.membership().stored();
        let store = ClusterStore { self_seq, nodes };
        persist::save_json_off_thread(self.path(CLUSTER_FILE), store).await?;
        self.store_dirty = false;
        self.last_flush = StdInstant::now();
        Ok(())
    }

    async fn flush_store(&mut self, force: bool) {
        if self.store_dirty
            && (force || self.last_flush.elapsed() >= FLUSH_EVERY)
            && let Err(e) = self.write_store(self.protocol.seq()).await
        {
            tracing::warn!(error = %e, "could not persist the node registry");
        }
    }

    /// Publishes an event. The future owns what it needs: the actor holds the swarm, which is
    /// not `Sync`, so no borrow of the actor may live across the await.
    fn emit(&self, kind: &str, payload: Value) -> impl Future<Output = ()> + Send + 'static {
        let (events, kind) = (self.events.clone(), kind.to_owned());
        async move { events.emit(&kind, payload).await }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.config.state_dir.join(file)
    }
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
) -> std::io::Result<Transport> {
    Ok(match &federation.bus {
        BusConfig::Libp2p(net) => {
            let mut transport = Net::start(&config.key, net).map_err(std::io::Error::other)?;
            transport.wait_listening(net.listen.len(), Duration::from_secs(5)).await;
            Transport::Libp2p(Box::new(transport))
        }
        BusConfig::Nats(nats_config) => {
            let (client, links) =
                nats::connect(nats_config).await.map_err(std::io::Error::other)?;
            let url = nats_config.effective_url();
            let bus = NatsBus::start(client, links, &url, &config.workspace)
                .await
                .map_err(std::io::Error::other)?;
            Transport::Nats(Box::new(bus))
        }
    })
}

fn advert_payload(advert: &Advert) -> Value {
    let mut payload = json_of(advert);
    payload["advertised"] = json!(rfc3339_ms(advert.advertised_ms));
    payload
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn json_of<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// Caps `cluster.event.rejected` so a flood of bad messages cannot flood the journal.
#[derive(Debug, Default)]
struct RejectionLimit {
    window_start: Option<StdInstant>,
    admitted: u32,
    suppressed: u64,
}

impl RejectionLimit {
    /// `Some(suppressed since the last admitted event)` when this one may be emitted.
    fn admit(&mut self) -> Option<u64> {
        let now = StdInstant::now();
        if self.window_start.is_none_or(|s| now.duration_since(s) >= REJECTION_WINDOW) {
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

impl std::fmt::Debug for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Actor").field("id", &self.id).finish_non_exhaustive()
    }
}
