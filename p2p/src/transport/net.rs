//! The libp2p transport: TCP + noise + yamux, gossipsub on one topic per workspace, mDNS and
//! Kademlia for discovery, identify, ping, and a request-response protocol for anti-entropy.
//!
//! [`Net`] is owned by the node actor and polled from its loop; it handles discovery itself and
//! surfaces only what the federation core needs as [`TransportEvent`]s.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, allow_block_list, connection_limits,
    gossipsub, identify, kad, mdns,
    multiaddr::Protocol,
    noise, ping,
    request_response::{self, ProtocolSupport},
    swarm::{NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle, dial_opts::DialOpts},
    tcp, yamux,
};
use sha2::{Digest, Sha256};

use crate::{
    identity::NodeKey,
    membership::Verdict,
    transport::types::{Inbound, SyncReply, SyncRequest, SyncResponse, TransportEvent},
    wire,
};

/// Transport settings.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Workspace (names the gossip topic).
    pub workspace: String,
    /// Listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start and whenever no peer is connected.
    pub bootstrap: Vec<Multiaddr>,
    /// Multicast DNS discovery.
    pub mdns: bool,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    banned: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    gossipsub: gossipsub::Behaviour,
    sync: request_response::json::Behaviour<SyncRequest, SyncResponse>,
    jobs: request_response::json::Behaviour<String, ()>,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

/// The transport.
pub struct Net {
    swarm: Swarm<Behaviour>,
    topic: gossipsub::IdentTopic,
    bootstrap: Vec<Multiaddr>,
    listen: BTreeSet<Multiaddr>,
    connected: BTreeSet<PeerId>,
    last_bootstrap_dial: Option<Instant>,
    /// Peers subscribed to this workspace's topic: reported to the core as connected.
    members: BTreeSet<PeerId>,
    /// Outbound discovery dials in flight (they count against [`TARGET_PEERS`]).
    dialling: BTreeSet<PeerId>,
    /// Peers this node is disconnecting on purpose.
    closing: BTreeSet<PeerId>,
    /// Peers being redialled (see [`Net::redial`]): dials in flight to each.
    redialling: BTreeMap<PeerId, u8>,
    /// Peers cut off for sending what this node rejects, until when (see [`BAN`]).
    banned: BTreeMap<PeerId, Instant>,
    /// Invalid gossip messages each peer sent in its current window, and those shed as a
    /// flood, and when that window began.
    rejected: BTreeMap<PeerId, ([u32; 2], Instant)>,
    /// libp2p's own metrics (connections, bandwidth, identify, Kademlia, ping), when asked for.
    metrics: Option<libp2p::metrics::Metrics>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("topic", &self.topic.to_string())
            .field("listen", &self.listen)
            .field("connected", &self.connected.len())
            .finish()
    }
}

/// Discovery dials stop once this many peers are connected (inbound connections are still
/// accepted); about twice gossipsub's mesh degree of 6.
pub const TARGET_PEERS: usize = 6;
/// Hard cap on established connections (inbound and outbound, including Kademlia's), so a
/// bootstrap node that everyone dials first stays bounded too.
pub const MAX_CONNECTIONS: u32 = 128;
/// Entries per Kademlia bucket (see `Net::start`).
const KAD_BUCKET: std::num::NonZeroUsize = std::num::NonZeroUsize::new(2).expect("2 > 0");
/// A connection no protocol needs (not a gossip mesh link, no request in flight, no Kademlia
/// query) is closed after this long: discovery leaves no full mesh behind.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A dispatch message not acknowledged within this long counts as undelivered.
const JOB_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Retry bootstrap dials at most this often while no peer is connected.
const REDIAL_EVERY: Duration = Duration::from_secs(2);
/// Invalid gossip messages a peer may send within [`REJECT_WINDOW`] before it is cut off.
const MAX_REJECTED: u32 = 3;
/// See [`MAX_REJECTED`].
const REJECT_WINDOW: Duration = Duration::from_secs(10);
/// Gossip messages a peer may send within [`REJECT_WINDOW`] that the node sheds as a flood
/// before it is cut off. An honest peer forwards only what it accepted, within the same
/// budgets: what of it this node sheds is a few a second at most (docs/protocol.md).
const MAX_SHED: u32 = 2_000;
/// How long a peer cut off for invalid messages stays disconnected and refused.
const BAN: Duration = Duration::from_secs(60);
/// Peers banned at once at most (a Sybil makes new ones; each is cut off all the same).
const MAX_BANNED: usize = 4_096;
/// At most this many dials in flight to one peer being redialled. A connect to an unreachable
/// host retries its SYN with backoff (1 s, 2 s, 4 s...); a few staggered dials keep a fresh
/// SYN going out about every time the node core asks for one.
const REDIAL_PENDING: u8 = 3;

/// What a peer is cut off for.
#[derive(Debug, Clone, Copy)]
enum Misbehaviour {
    /// Invalid messages (more than [`MAX_REJECTED`]).
    Invalid,
    /// Messages shed as a flood (more than [`MAX_SHED`]).
    Flood,
}

/// The gossip topic of a workspace.
pub fn topic_name(workspace: &str) -> String {
    format!("arw/{workspace}/v1")
}

impl Net {
    /// Builds the swarm, starts listening and dials the bootstrap peers. With a `registry`,
    /// libp2p's metrics (gossipsub's among them) are registered in it.
    pub fn start(
        key: &NodeKey,
        config: &NetConfig,
        mut registry: Option<&mut prometheus_client::registry::Registry>,
    ) -> Result<Self, String> {
        let topic = gossipsub::IdentTopic::new(topic_name(&config.workspace));
        let gossip_topic = topic.clone();
        let mdns_enabled = config.mdns;
        let gossip_registry =
            registry.as_mut().map(|r| r.sub_registry_with_prefix("libp2p_gossipsub"));
        let mut swarm = SwarmBuilder::with_existing_identity(key.libp2p_keypair())
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| format!("tcp transport: {e}"))?
            .with_behaviour(move |keypair| {
                let peer_id = keypair.public().to_peer_id();
                let gossipsub = gossip(&gossip_topic, gossip_registry)?;
                let sync = request_response::json::Behaviour::new(
                    [(StreamProtocol::new("/arw/sync/1.0.0"), ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(10)),
                );
                // Dispatch messages (jobs): one signed envelope each way, acknowledged empty;
                // the answer is a message of its own, so no stream lasts as long as a job.
                let jobs = request_response::json::Behaviour::new(
                    [(StreamProtocol::new("/arw/job/1"), ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(JOB_REQUEST_TIMEOUT)
                        .with_max_concurrent_streams(256),
                );
                // Kademlia keeps the addresses this node was given (bootstrap peers, mDNS) and
                // answers lookups; it does not enter every connected peer in its table, which
                // would have each node look up its neighbourhood (dialling peers of its own) as
                // long as its table is short of 20. Adverts carry every node's addresses, and
                // are dialled within the discovery budget (docs/protocol.md, "Discovery"). A
                // table that small needs small buckets: each of the 256 is allocated up front,
                // and at the default size of 20 they were half of a node's memory.
                let mut kad_config = kad::Config::new(StreamProtocol::new("/arw/kad/1.0.0"));
                kad_config
                    .set_kbucket_inserts(kad::BucketInserts::Manual)
                    .set_kbucket_size(KAD_BUCKET)
                    .set_periodic_bootstrap_interval(None);
                let mut kad = kad::Behaviour::with_config(
                    peer_id,
                    kad::store::MemoryStore::new(peer_id),
                    kad_config,
                );
                kad.set_mode(Some(kad::Mode::Server));
                let identify = identify::Behaviour::new(
                    identify::Config::new("/arw/id/1.0.0".into(), keypair.public())
                        .with_agent_version(format!("arw-server/{}", env!("CARGO_PKG_VERSION"))),
                );
                let mdns = if mdns_enabled {
                    let config = mdns::Config {
                        query_interval: Duration::from_secs(5),
                        ..Default::default()
                    };
                    Some(mdns::tokio::Behaviour::new(config, peer_id)?)
                } else {
                    None
                };
                let limits = connection_limits::ConnectionLimits::default()
                    .with_max_established(Some(MAX_CONNECTIONS))
                    .with_max_established_per_peer(Some(2));
                Ok(Behaviour {
                    limits: connection_limits::Behaviour::new(limits),
                    banned: allow_block_list::Behaviour::default(),
                    gossipsub,
                    sync,
                    jobs,
                    kad,
                    identify,
                    ping: ping::Behaviour::new(ping::Config::new()),
                    mdns: Toggle::from(mdns),
                })
            })
            .map_err(|e| format!("behaviour: {e}"))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_TIMEOUT))
            .build();
        swarm.behaviour_mut().gossipsub.subscribe(&topic).map_err(|e| format!("subscribe: {e}"))?;
        for addr in &config.listen {
            swarm.listen_on(addr.clone()).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        }
        let mut net = Self {
            swarm,
            topic,
            bootstrap: config.bootstrap.clone(),
            listen: BTreeSet::new(),
            connected: BTreeSet::new(),
            last_bootstrap_dial: None,
            members: BTreeSet::new(),
            dialling: BTreeSet::new(),
            closing: BTreeSet::new(),
            redialling: BTreeMap::new(),
            banned: BTreeMap::new(),
            rejected: BTreeMap::new(),
            metrics: registry.map(libp2p::metrics::Metrics::new),
        };
        net.dial_bootstrap();
        Ok(net)
    }

    /// Polls until every listener reports its address (or `limit` passes), so the first advert
    /// and the ready file carry real addresses. Other events that arrive meanwhile are handled.
    pub async fn wait_listening(&mut self, listeners: usize, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.listen.len() < listeners {
            match tokio::time::timeout_at(deadline, self.next()).await {
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }

    /// Listen addresses, each with this node's `/p2p/<peer id>` suffix.
    pub fn addresses(&self) -> Vec<String> {
        let me = *self.swarm.local_peer_id();
        self.listen.iter().map(|a| a.clone().with(Protocol::P2p(me)).to_string()).collect()
    }

    /// Directly connected peers.
    pub fn connected(&self) -> usize {
        self.connected.len()
    }

    /// The gossip topic.
    pub fn topic(&self) -> String {
        self.topic.to_string()
    }

    /// Publishes to the workspace topic. Returns false when no peer could take it yet.
    pub fn publish(&mut self, bytes: Vec<u8>) -> bool {
        match self.swarm.behaviour_mut().gossipsub.publish(self.topic.clone(), bytes) {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(error = %e, "gossip publish not sent");
                false
            }
        }
    }

    /// Reports the validation verdict for a received gossip message. A peer that sent more
    /// than `MAX_REJECTED` (3) invalid ones, or `MAX_SHED` (2,000) shed as a flood, within
    /// `REJECT_WINDOW` (10 s) is disconnected and refused for a while.
    pub fn report(&mut self, id: &gossipsub::MessageId, source: &PeerId, verdict: Verdict) {
        let acceptance = match verdict {
            Verdict::Accept => gossipsub::MessageAcceptance::Accept,
            Verdict::Ignore | Verdict::Shed => gossipsub::MessageAcceptance::Ignore,
            Verdict::Reject => gossipsub::MessageAcceptance::Reject,
        };
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(id, source, acceptance);
        match verdict {
            Verdict::Reject => self.misbehaved(*source, Misbehaviour::Invalid, Instant::now()),
            Verdict::Shed => self.misbehaved(*source, Misbehaviour::Flood, Instant::now()),
            Verdict::Accept | Verdict::Ignore => {}
        }
    }

    /// Counts an invalid message from `peer`, or one shed as a flood: honest nodes validate
    /// before they forward, and forward within the same budgets, so a peer that keeps sending
    /// them is the source. Gossipsub's scoring would only ignore its RPCs, each still received,
    /// decrypted and decoded; it is disconnected and refused for [`BAN`] instead, so its flood
    /// stops costing the node anything.
    fn misbehaved(&mut self, peer: PeerId, what: Misbehaviour, now: Instant) {
        if self.rejected.len() >= MAX_BANNED {
            self.rejected.retain(|_, (_, since)| now.duration_since(*since) < REJECT_WINDOW);
        }
        let (counts, since) = self.rejected.entry(peer).or_insert(([0, 0], now));
        if now.duration_since(*since) >= REJECT_WINDOW {
            (*counts, *since) = ([0, 0], now);
        }
        let (count, limit) = match what {
            Misbehaviour::Invalid => (&mut counts[0], MAX_REJECTED),
            Misbehaviour::Flood => (&mut counts[1], MAX_SHED),
        };
        *count += 1;
        if *count <= limit {
            return;
        }
        self.rejected.remove(&peer);
        tracing::warn!(%peer, ban = ?BAN, ?what, "disconnecting a peer that sent messages this node rejected or shed");
        if self.banned.len() < MAX_BANNED {
            self.banned.insert(peer, now + BAN);
            self.swarm.behaviour_mut().banned.block_peer(peer);
        } else {
            // No room to remember it: closed now, refused no longer.
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// Asks `peer` for adverts newer than `request`.
    pub fn request_sync(&mut self, peer: &PeerId, request: SyncRequest) {
        self.swarm.behaviour_mut().sync.send_request(peer, request);
    }

    /// Sends a dispatch envelope to `peer` (dialling it if need be).
    pub fn send_job(&mut self, peer: &PeerId, bytes: Vec<u8>) {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        self.swarm.behaviour_mut().jobs.send_request(peer, text);
    }

    /// Answers a sync request.
    pub fn respond_sync(
        &mut self,
        channel: request_response::ResponseChannel<SyncResponse>,
        response: SyncResponse,
    ) {
        if self.swarm.behaviour_mut().sync.send_response(channel, response).is_err() {
            tracing::debug!("sync response not sent: the peer went away");
        }
    }

    /// Periodic upkeep: re-dial the bootstrap peers while alone; take back peers whose ban ran
    /// out.
    pub fn maintain(&mut self) {
        if self.connected.is_empty() && !self.bootstrap.is_empty() {
            self.dial_bootstrap();
        }
        let now = Instant::now();
        let expired: Vec<PeerId> =
            self.banned.iter().filter(|(_, until)| **until <= now).map(|(p, _)| *p).collect();
        for peer in expired {
            self.banned.remove(&peer);
            self.swarm.behaviour_mut().banned.unblock_peer(peer);
        }
    }

    /// Dials `peer` (a node judged down, see [`Net::reset`]) at `addrs` and the addresses
    /// discovery gave for it, unless it is connected or enough dials to it are in flight.
    pub fn redial(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let pending = self.redialling.entry(peer).or_default();
        if self.connected.contains(&peer) || *pending >= REDIAL_PENDING {
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .condition(libp2p::swarm::dial_opts::PeerCondition::Disconnected)
            .addresses(addrs)
            .extend_addresses_through_behaviour()
            .build();
        match self.swarm.dial(opts) {
            Ok(()) => *pending += 1,
            Err(e) => tracing::trace!(%peer, error = %e, "redial skipped"),
        }
    }

    /// The node core judged `peer` down although a connection to it is open: that connection
    /// is stalled (after a partition, TCP retransmits with backoff and would resume seconds
    /// after the network is back). Closes it quietly (the node is already judged); the core
    /// then asks for redials until one gets through.
    pub fn reset(&mut self, peer: PeerId) {
        if !self.connected.contains(&peer) {
            return;
        }
        tracing::debug!(%peer, "closing the connection to a node judged down");
        self.closing.insert(peer);
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    fn dial_bootstrap(&mut self) {
        if self.last_bootstrap_dial.is_some_and(|t| t.elapsed() < REDIAL_EVERY) {
            return;
        }
        self.last_bootstrap_dial = Some(Instant::now());
        for addr in self.bootstrap.clone() {
            if let Some(Protocol::P2p(peer)) = addr.iter().last() {
                if self.connected.contains(&peer) {
                    continue;
                }
                self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
            }
            if let Err(e) = self.swarm.dial(addr.clone()) {
                tracing::debug!(%addr, error = %e, "bootstrap dial failed");
            }
        }
    }

    /// Dials a node at the addresses it advertised (`/ip4/.../tcp/.../p2p/<peer id>`) unless it
    /// is already connected or the discovery budget is spent, and remembers them: a verified
    /// advert is as good a discovery source as mDNS or Kademlia.
    pub fn dial_advertised(&mut self, addrs: &[String]) {
        let mut by_peer: BTreeMap<PeerId, Vec<Multiaddr>> = BTreeMap::new();
        for addr in addrs.iter().filter_map(|a| a.parse::<Multiaddr>().ok()) {
            if let Some(Protocol::P2p(peer)) = addr.iter().last() {
                // Remembered by the swarm's address books, so a probe or sync to this node
                // dials it even when discovery leaves it unconnected.
                self.swarm.add_peer_address(peer, addr.clone());
                by_peer.entry(peer).or_default().push(addr);
            }
        }
        for (peer, addrs) in by_peer {
            self.dial_peer(peer, addrs);
        }
    }

    /// Dials a discovered peer while this node has fewer than [`TARGET_PEERS`] connections,
    /// counting dials in flight. Gossip needs a connected mesh, not a full one: every
    /// connection costs a handshake and buffers on both sides, and a node that learns of a
    /// hundred others at once must not dial them all.
    fn dial_peer(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if peer == *self.swarm.local_peer_id()
            || self.connected.contains(&peer)
            || self.dialling.contains(&peer)
            || self.connected.len() + self.dialling.len() >= TARGET_PEERS
        {
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .condition(libp2p::swarm::dial_opts::PeerCondition::DisconnectedAndNotDialing)
            .addresses(addrs)
            .build();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.dialling.insert(peer);
            }
            Err(e) => tracing::trace!(%peer, error = %e, "dial skipped"),
        }
    }

    /// The next event the core cares about.
    pub async fn next(&mut self) -> TransportEvent {
        use futures::StreamExt;
        let Some(event) = self.swarm.next().await else {
            return std::future::pending().await;
        };
        self.handle(event)
    }

    fn handle(&mut self, event: SwarmEvent<BehaviourEvent>) -> TransportEvent {
        if let Some(metrics) = &self.metrics {
            use libp2p::metrics::Recorder;
            metrics.record(&event);
            if let SwarmEvent::Behaviour(event) = &event {
                match event {
                    BehaviourEvent::Gossipsub(e) => metrics.record(e),
                    BehaviourEvent::Identify(e) => metrics.record(e),
                    BehaviourEvent::Kad(e) => metrics.record(e),
                    BehaviourEvent::Ping(e) => metrics.record(e),
                    _ => {}
                }
            }
        }
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "p2p listening");
                self.listen.insert(address);
                TransportEvent::Listening
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen.remove(&address);
                TransportEvent::Listening
            }
            SwarmEvent::ConnectionEstablished { peer_id, num_established, .. }
                if num_established.get() == 1 =>
            {
                self.connected.insert(peer_id);
                self.dialling.remove(&peer_id);
                self.redialling.remove(&peer_id);
                // A connection closed on purpose is behind us once a new one is up.
                self.closing.remove(&peer_id);
                // Reported once the peer subscribes to this workspace (see `behaviour`).
                TransportEvent::Internal
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, cause, .. } => {
                self.connected.remove(&peer_id);
                // Closed by this node: on purpose, or as idle (nothing needed it).
                let ours = self.closing.remove(&peer_id)
                    || matches!(
                        cause,
                        None | Some(libp2p::swarm::ConnectionError::KeepAliveTimeout)
                    );
                if !self.members.remove(&peer_id) {
                    return TransportEvent::Internal;
                }
                TransportEvent::Disconnected { peer: peer_id, ours }
            }
            SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), .. } => {
                self.dialling.remove(&peer);
                if let Some(pending) = self.redialling.get_mut(&peer) {
                    *pending = pending.saturating_sub(1);
                }
                TransportEvent::Internal
            }
            SwarmEvent::Behaviour(event) => self.behaviour(event),
            _ => TransportEvent::Internal,
        }
    }

    fn behaviour(&mut self, event: BehaviourEvent) -> TransportEvent {
        match event {
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => TransportEvent::Message {
                bytes: message.data,
                via: Inbound::Gossip { id: message_id, source: propagation_source },
                // Checked by the core; gossipsub's peer scoring graylists a peer that keeps
                // forwarding invalid messages.
                opened: None,
            },
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, topic })
                if topic == self.topic.hash() =>
            {
                // A peer of this workspace, reachable by gossip from now on.
                if self.connected.contains(&peer_id) && self.members.insert(peer_id) {
                    return TransportEvent::Connected(peer_id);
                }
                TransportEvent::Internal
            }
            // It could not be reached at all (a refused dial: no process behind the port). A
            // timeout says nothing the silence will not say.
            BehaviourEvent::Sync(request_response::Event::OutboundFailure {
                peer,
                error: request_response::OutboundFailure::DialFailure,
                ..
            }) => TransportEvent::Unreachable(peer),
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                let mut by_peer: BTreeMap<PeerId, Vec<Multiaddr>> = BTreeMap::new();
                for (peer, addr) in found {
                    self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
                    by_peer.entry(peer).or_default().push(addr);
                }
                for (peer, addrs) in by_peer {
                    self.dial_peer(peer, addrs);
                }
                TransportEvent::Internal
            }
            BehaviourEvent::Kad(kad::Event::RoutingUpdated { peer, addresses, .. }) => {
                self.dial_peer(peer, addresses.into_vec());
                TransportEvent::Internal
            }
            BehaviourEvent::Jobs(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request { request, channel, .. } => {
                        // Acknowledged on receipt: what it means is the core's to decide.
                        let _ = self.swarm.behaviour_mut().jobs.send_response(channel, ());
                        TransportEvent::JobMessage {
                            bytes: request.into_bytes(),
                            from: Some(peer),
                            opened: None,
                        }
                    }
                    request_response::Message::Response { .. } => TransportEvent::Internal,
                }
            }
            BehaviourEvent::Jobs(request_response::Event::OutboundFailure {
                peer, error, ..
            }) => {
                tracing::debug!(%peer, %error, "dispatch message undelivered");
                TransportEvent::JobUndelivered(peer)
            }
            BehaviourEvent::Sync(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request { request, channel, .. } => {
                        TransportEvent::SyncRequest {
                            from: Some(peer),
                            request,
                            reply: SyncReply::Peer(channel),
                        }
                    }
                    request_response::Message::Response { response, .. } => {
                        TransportEvent::SyncResponse { from: Some(peer), response }
                    }
                }
            }
            _ => TransportEvent::Internal,
        }
    }
}

fn gossip(
    topic: &gossipsub::IdentTopic,
    registry: Option<&mut prometheus_client::registry::Registry>,
) -> Result<gossipsub::Behaviour, Box<dyn std::error::Error + Send + Sync>> {
    // Our envelope signature is the authenticity: messages travel anonymous with a
    // content-addressed id, and each unique message is verified once, before it is forwarded.
    let config = gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Anonymous)
        .validate_messages()
        .message_id_fn(|m: &gossipsub::Message| {
            gossipsub::MessageId::from(Sha256::digest(&m.data).to_vec())
        })
        .max_transmit_size(wire::MAX_ENVELOPE + 1024)
        .build()?;
    let mut behaviour =
        gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, config)?;
    if let Some(registry) = registry {
        behaviour = behaviour.with_metrics(registry, gossipsub::MetricsConfig::default());
    }
    let topic_params = gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        invalid_message_deliveries_weight: -10.0,
        invalid_message_deliveries_decay: 0.5,
        ..Default::default()
    };
    let params = gossipsub::PeerScoreParams {
        // Nodes on one host (tests, simulations) must not be penalised for sharing an address.
        ip_colocation_factor_weight: 0.0,
        topics: [(topic.hash(), topic_params)].into_iter().collect(),
        ..Default::default()
    };

    behaviour.with_peer_score(params, gossipsub::PeerScoreThresholds::default())?;
    Ok(behaviour)
}
