//! Wiring for `arw-server`: state dir, identity, node actor, event publisher, HTTP listener,
//! ready file and graceful shutdown.

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use arw_api::{
    AdminAuth, AppState, AuthConfig, Metrics,
    egress::{EgressLog, EgressSettings},
    events::SseConfig,
};
use arw_p2p::{
    Multiaddr,
    events::EventTx,
    identity::NodeKey,
    membership::MembershipConfig,
    net::NetConfig,
    node::{self, BusConfig, FederationConfig, NodeConfig, NodeHandle},
};

use crate::{
    config::{EXIT_CONFIG, EgressSection, Loaded, Transport},
    egress, executor,
    journal::{self, Journal, JournalConfig},
    probe,
    state_dir::{self, Endpoints},
};

/// Events queued between producers and the publisher.
const EVENT_QUEUE: usize = 1024;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration cannot be used (exit 64).
    #[error("{0}")]
    Config(String),
    /// Anything else (exit 1).
    #[error("{0}")]
    Other(String),
}

impl StartError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Config(_) => EXIT_CONFIG,
            StartError::Other(_) => 1,
        }
    }
}

fn other(context: &str) -> impl FnOnce(std::io::Error) -> StartError + '_ {
    move |e| StartError::Other(format!("{context}: {e}"))
}

/// A started node.
#[derive(Debug)]
pub struct Running {
    /// What was written to endpoints.json.
    pub endpoints: Endpoints,
    /// The node actor.
    pub node: NodeHandle,
    /// The state directory.
    pub state_dir: PathBuf,
    cancel: CancellationToken,
    grace: Duration,
    http: JoinHandle<()>,
    node_task: JoinHandle<()>,
    journal_thread: std::thread::JoinHandle<()>,
    /// The event relay and the queue worker, when NATS is in use; the egress proxy.
    background: Vec<JoinHandle<()>>,
    /// The egress ledger's writer: it ends once the node and the proxy are gone.
    egress_writer: Option<JoinHandle<()>>,
}

/// Runs a node until `shutdown` completes, then stops it gracefully.
pub async fn run(loaded: Loaded, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let running = start(loaded).await?;
    shutdown.await;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

/// Starts a node: everything is listening and endpoints.json is written when this returns.
pub async fn start(loaded: Loaded) -> Result<Running, StartError> {
    let federation = federation(&loaded)?;
    let nats_plan = NatsPlan::from(&loaded);
    let capsule_trust = loaded.resolve(&loaded.config.policy.trust_capsules);
    let capsule_presets = loaded.resolve(&loaded.config.policy.capsule_presets);
    let Loaded { config, state_dir, bind_ip, explicit_node_id, new_identity, .. } = loaded;
    state_dir::prepare(&state_dir).map_err(other("cannot prepare the state directory"))?;

    let auth = admin_auth(&config.server, bind_ip, &state_dir)?;
    let (key, created) = state_dir::node_key(&state_dir, new_identity).map_err(|e| match e {
        state_dir::KeyError::Lost { .. } => StartError::Config(e.to_string()),
        state_dir::KeyError::Io(_) => StartError::Other(e.to_string()),
    })?;
    tracing::info!(
        peer_id = %key.peer_id(),
        public_key = %key.public_b64(),
        "node key {}", if created { "created" } else { "loaded" }
    );
    let capabilities = tokio::task::spawn_blocking(probe::capabilities)
        .await
        .map_err(|e| StartError::Other(format!("capability probe failed: {e}")))?;

    let cancel = CancellationToken::new();
    let (events, events_rx) = EventTx::channel(EVENT_QUEUE);
    let cluster = &config.cluster;
    let (runs, runs_rx) = tokio::sync::mpsc::unbounded_channel();
    let egress = Egress::open(&config.egress, &state_dir).await?;
    let node_config = NodeConfig {
        key: key.clone(),
        explicit_id: explicit_node_id,
        hostname: sysinfo::System::host_name().ok(),
        workspace: cluster.workspace.clone(),
        state_dir: state_dir.clone(),
        advertise_interval: Duration::from_secs(cluster.advertise_interval_secs),
        ttl: Duration::from_secs(cluster.ttl_seconds),
        capabilities,
        bus: cluster.bus.as_str().to_owned(),
        queue: cluster.queue.as_str().to_owned(),
        federation,
        capsule_trust: Some(capsule_trust),
        trace: None,
        jobs: config.jobs.node_config(),
        executor: Some(runs),
        contributions: egress.ledger.as_ref().map(|l| l.offloads.clone()),
    };
    // libp2p's own metrics (arw_libp2p_*) join the registry while the swarm is built.
    let mut metrics = Metrics::new();
    let counters =
        egress.ledger.is_some().then(|| egress::Counters::register(metrics.registry_mut()));
    let (node, node_task) = node::spawn_with_metrics(
        node_config,
        events.clone(),
        cancel.child_token(),
        Some(metrics.registry_mut()),
    )
    .await
    .map_err(other("cannot load node state"))?;
    let mut programs =
        executor::Programs::new(config.jobs.exec.clone(), state_dir.join("jobs-tmp"));
    if let Some((_, addr)) = &egress.proxy {
        programs = programs.with_proxy(*addr);
    }
    let executors = tokio::spawn(executor::serve(node.clone(), runs_rx, programs));
    let ev = &config.events;
    let journal_config = JournalConfig {
        retention_rows: ev.retention_rows,
        retention_bytes: ev.retention_bytes,
        retention_age: Duration::from_secs(ev.retention_days.saturating_mul(86_400)),
        fsync: ev.fsync,
        live_capacity: ev.sse_buffer,
        source: "arw-server".to_owned(),
    };
    let (log, conn) = Journal::open(&state_dir.join(journal::FILE), &journal_config)
        .map_err(|e| StartError::Other(format!("cannot open the event journal: {e}")))?;
    metrics.watch_node(node.clone());
    let metrics = Arc::new(metrics);
    let journal_thread = journal::spawn_writer(
        log.clone(),
        conn,
        journal_config,
        events_rx,
        node.watch(),
        metrics.clone(),
    )
    .map_err(other("cannot start the journal writer"))?;

    let mut background =
        start_nats_services(&nats_plan, &key, &log, &events, &node, &cancel).await?;
    background.push(executors);
    let started =
        egress.start(&node, &events, counters.unwrap_or_default(), &cancel, &mut background);

    let state = AppState {
        node: node.clone(),
        events,
        auth: Arc::new(auth),
        metrics,
        log,
        sse: SseConfig { keepalive: Duration::from_secs(ev.sse_keepalive_secs) },
        capsule_presets: Some(capsule_presets),
        capsule_failures: Arc::default(),
        capsule_presenters: Arc::default(),
        shutdown: cancel.clone(),
        egress: started.log,
    };
    let listener =
        TcpListener::bind(SocketAddr::new(bind_ip, config.server.port)).await.map_err(|e| {
            StartError::Other(format!("cannot listen on {bind_ip}:{}: {e}", config.server.port))
        })?;
    let bound = listener.local_addr().map_err(other("listener has no address"))?;
    tracing::info!(address = %bound, "HTTP API listening");

    let limits = crate::http::Limits {
        max_connections: config.server.max_connections,
        header_timeout: Duration::from_secs(config.server.header_timeout_secs),
        send_timeout: Duration::from_secs(config.server.send_timeout_secs),
    };
    // One limit for the whole router (a per-route layer would give each route its own).
    let router = arw_api::router(state).layer(tower::limit::GlobalConcurrencyLimitLayer::new(
        config.server.max_concurrent_requests,
    ));
    let http = tokio::spawn(crate::http::serve(listener, router, limits, cancel.clone()));

    let snapshot = node.snapshot();
    let endpoints = Endpoints {
        node_id: snapshot.id.to_string(),
        pid: std::process::id(),
        http: state_dir::local_http_addr(bound).to_string(),
        peer_id: snapshot.peer_id.clone(),
        p2p: snapshot.network.listen.clone(),
        egress_proxy: started.proxy.map(|a| a.to_string()),
    };
    state_dir::write_endpoints(&state_dir, &endpoints)
        .map_err(other("cannot write endpoints.json"))?;
    tracing::info!(path = %state_dir.join(state_dir::ENDPOINTS_FILE).display(), "ready");

    Ok(Running {
        endpoints,
        node,
        state_dir,
        cancel,
        grace: Duration::from_secs(config.server.shutdown_grace_secs),
        http,
        node_task,
        journal_thread,
        background,
        egress_writer: started.writer,
    })
}

impl Running {
    /// Stops accepting requests, lets open ones finish within the grace period, stops the node
    /// and removes endpoints.json.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        match tokio::time::timeout(self.grace, self.http).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "HTTP server task failed"),
            Err(_) => {
                tracing::warn!(grace = ?self.grace, "open requests cut off after the grace period")
            }
        }
        for task in self.background {
            let _ = task.await;
        }
        if let Err(e) = self.node_task.await {
            tracing::warn!(error = %e, "node actor failed");
        }
        if let Some(writer) = self.egress_writer
            && tokio::time::timeout(Duration::from_secs(5), writer).await.is_err()
        {
            tracing::warn!("egress ledger writer did not stop in time");
        }
        // The journal writer ends once the last event sender (held by the node actor and the
        // router, both gone now) is dropped, after writing what was queued.
        drop(self.node);
        let journal = tokio::task::spawn_blocking(move || self.journal_thread.join());
        if tokio::time::timeout(Duration::from_secs(5), journal).await.is_err() {
            tracing::warn!("event journal writer did not stop in time");
        }
        state_dir::remove_endpoints(&self.state_dir);
        tracing::info!("stopped");
    }
}

/// The egress ledger and proxy as configured, opened (and bound) before the node starts so that
/// a port in use or an unreadable ledger stops the start.
struct Egress {
    ledger: Option<EgressLedger>,
    proxy: Option<(TcpListener, SocketAddr)>,
}

struct EgressLedger {
    log: Arc<egress::Ledger>,
    conn: rusqlite::Connection,
    offloads: tokio::sync::mpsc::UnboundedSender<arw_p2p::jobs::Contribution>,
    offloads_rx: tokio::sync::mpsc::UnboundedReceiver<arw_p2p::jobs::Contribution>,
}

impl Egress {
    async fn open(config: &EgressSection, state_dir: &std::path::Path) -> Result<Self, StartError> {
        let proxy = if config.proxy {
            let bind = SocketAddr::from(([127, 0, 0, 1], config.proxy_port));
            let listener = TcpListener::bind(bind).await.map_err(|e| {
                StartError::Config(format!(
                    "cannot listen on {bind} for the egress proxy: {e} (set [egress] proxy_port or ARW_EGRESS_PROXY_PORT; 0 picks a free port)"
                ))
            })?;
            let addr = listener.local_addr().map_err(other("proxy listener has no address"))?;
            tracing::info!(address = %addr, "egress proxy listening");
            Some((listener, addr))
        } else {
            None
        };
        let ledger = if config.ledger {
            let settings = EgressSettings {
                ledger: true,
                proxy: config.proxy,
                proxy_addr: proxy.as_ref().map(|(_, a)| a.to_string()),
                max_rows: config.max_rows,
            };
            let (log, conn) = egress::Ledger::open(&state_dir.join(egress::FILE), settings)
                .map_err(|e| StartError::Other(format!("cannot open the egress ledger: {e}")))?;
            let (offloads, offloads_rx) = tokio::sync::mpsc::unbounded_channel();
            Some(EgressLedger { log, conn, offloads, offloads_rx })
        } else {
            None
        };
        Ok(Self { ledger, proxy })
    }

    /// Starts the ledger's writer and the proxy: the reader side for the API, the writer to
    /// wait for at shutdown, and where the proxy listens.
    fn start(
        self,
        node: &NodeHandle,
        events: &EventTx,
        counters: egress::Counters,
        cancel: &CancellationToken,
        background: &mut Vec<JoinHandle<()>>,
    ) -> Started {
        let (requests, requests_rx) = tokio::sync::mpsc::unbounded_channel();
        let (log, writer, requests) = match self.ledger {
            Some(EgressLedger { log, conn, offloads, offloads_rx }) => {
                // The node holds its own sender; this one would keep the writer alive.
                drop(offloads);
                let writer = egress::spawn_writer(
                    log.clone(),
                    conn,
                    offloads_rx,
                    requests_rx,
                    events.clone(),
                    counters,
                );
                (Some(log as Arc<dyn EgressLog>), Some(writer), Some(requests))
            }
            None => (None, None, None),
        };
        let addr = self.proxy.map(|(listener, addr)| {
            let serve = crate::proxy::serve(listener, node.clone(), requests, cancel.child_token());
            background.push(tokio::spawn(serve));
            addr
        });
        Started { log, writer, proxy: addr }
    }
}

/// What [`Egress::start`] started.
struct Started {
    /// The ledger, for the API.
    log: Option<Arc<dyn EgressLog>>,
    /// Its writer, to wait for at shutdown.
    writer: Option<JoinHandle<()>>,
    /// Where the proxy listens.
    proxy: Option<SocketAddr>,
}

/// Which NATS services this node runs besides the bus: the event relay and the queue worker.
#[derive(Debug)]
struct NatsPlan {
    nats: Option<arw_p2p::nats::NatsConfig>,
    relay_out: bool,
    filter: Vec<String>,
    queue_group: Option<String>,
}

impl NatsPlan {
    fn from(loaded: &Loaded) -> Self {
        let c = &loaded.config.cluster;
        let n = &loaded.config.nats;
        let uses_nats = c.bus == Transport::Nats || c.queue == Transport::Nats;
        let relay_out = n.relay_out.unwrap_or(uses_nats);
        let wanted = c.enabled && (uses_nats || relay_out);
        Self {
            nats: wanted.then(|| loaded.nats("arw-server-relay")),
            relay_out,
            filter: arw_api::events::parse_prefixes(Some(&n.relay_out_filter)),
            queue_group: (c.enabled && c.queue == Transport::Nats).then(|| n.group.clone()),
        }
    }
}

async fn start_nats_services(
    plan: &NatsPlan,
    key: &NodeKey,
    journal: &Arc<Journal>,
    events: &EventTx,
    node: &NodeHandle,
    cancel: &CancellationToken,
) -> Result<Vec<JoinHandle<()>>, StartError> {
    let Some(nats) = &plan.nats else { return Ok(Vec::new()) };
    let (client, _links) = arw_p2p::nats::connect(nats).await.map_err(StartError::Config)?;
    let mut tasks = Vec::new();
    let relay = crate::relay::RelayConfig { out: plan.relay_out, filter: plan.filter.clone() };
    tasks.push(tokio::spawn(crate::relay::run(
        client.clone(),
        key.clone(),
        journal.clone(),
        events.clone(),
        node.watch(),
        relay,
        cancel.child_token(),
    )));
    if let Some(group) = &plan.queue_group {
        tasks.push(tokio::spawn(crate::tasks::serve(
            client,
            group.clone(),
            node.watch(),
            events.clone(),
            cancel.child_token(),
        )));
    }
    Ok(tasks)
}

/// The federation settings, or `None` for the single-node fast path.
fn federation(loaded: &Loaded) -> Result<Option<FederationConfig>, StartError> {
    let c = &loaded.config.cluster;
    if !c.enabled {
        return Ok(None);
    }
    let addrs = |key: &str, list: &[String]| -> Result<Vec<Multiaddr>, StartError> {
        list.iter()
            .map(|a| a.parse().map_err(|e| StartError::Config(format!("{key}: {a:?}: {e}"))))
            .collect()
    };
    let mut membership = MembershipConfig::new(&c.workspace);
    membership.evict_after_ms = c.evict_after_secs.saturating_mul(1000);
    membership.max_skew_ms = c.max_clock_skew_secs.saturating_mul(1000);
    membership.max_nodes = c.max_nodes;
    membership.trust_first_home = c.trust_first_home;
    if c.trust_first_home && c.home_key.is_none() {
        tracing::warn!(
            "cluster.trust_first_home is on: the first node advertising role root that admits this node becomes its Home, unasked"
        );
    }
    membership.heartbeat_interval_ms = c.heartbeat_interval_ms;
    membership.suspect_after_ms = c.suspect_after_ms;
    membership.down_after_ms = c.down_after_ms;
    membership.beat_max_age_ms = membership.beat_max_age_ms.max(c.down_after_ms * 2);
    membership.home_key = c.home_key.as_deref().and_then(arw_p2p::identity::public_key_from_b64);
    if let Some(path) = &c.trust_nodes {
        let path = loaded.resolve(path);
        membership.pinned = crate::trust::node_keys(&path)
            .map_err(|e| StartError::Config(format!("cluster.trust_nodes: {e}")))?;
        tracing::info!(path = %path.display(), pinned = membership.pinned.len(), "node keys pinned");
    }
    let bus = match c.bus {
        Transport::Local => BusConfig::Libp2p(NetConfig {
            workspace: c.workspace.clone(),
            listen: unshared(addrs("cluster.listen", &c.listen)?)?,
            bootstrap: addrs("cluster.bootstrap", &c.bootstrap)?,
            mdns: c.mdns,
        }),
        Transport::Nats => BusConfig::Nats(loaded.nats("arw-server")),
    };
    Ok(Some(FederationConfig {
        bus,
        heartbeat_interval: Duration::from_millis(c.heartbeat_interval_ms),
        membership,
    }))
}

/// The listen addresses, once none of their TCP ports is already taken. libp2p listens with
/// SO_REUSEPORT, so a second node on the host would share the first one's port (the kernel
/// splitting connections between them) without a word; a plain bind finds it first.
fn unshared(listen: Vec<Multiaddr>) -> Result<Vec<Multiaddr>, StartError> {
    use arw_p2p::multiaddr::Protocol;
    for addr in &listen {
        let mut ip = None;
        let mut port = None;
        for p in addr {
            match p {
                Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
                Protocol::Ip6(a) => ip = Some(std::net::IpAddr::V6(a)),
                Protocol::Tcp(p) => port = Some(p),
                _ => {}
            }
        }
        let (Some(ip), Some(port)) = (ip, port.filter(|p| *p != 0)) else { continue };
        if let Err(e) = std::net::TcpListener::bind((ip, port)) {
            return Err(StartError::Other(format!(
                "cannot listen for peers on {addr}: {e} (another arw-server on this host? give each node its own port: cluster.listen in its config, e.g. [\"/ip4/0.0.0.0/tcp/0\"] for any free one)"
            )));
        }
    }
    Ok(listen)
}

fn admin_auth(
    server: &crate::config::ServerConfig,
    bind_ip: std::net::IpAddr,
    state_dir: &std::path::Path,
) -> Result<AdminAuth, StartError> {
    let mut auth = AuthConfig {
        token: server.admin_token.clone(),
        token_sha256: server.admin_token_sha256.clone(),
        debug_loopback: debug_enabled(),
        rate_limit: server.admin_rate_limit,
        rate_window: Duration::from_secs(server.admin_rate_window_secs),
    };
    if auth.debug_loopback && !bind_ip.is_loopback() {
        // Behind a local proxy every remote client would arrive from loopback.
        return Err(StartError::Config(format!(
            "ARW_DEBUG lets loopback clients in without the admin token, so it is refused with a non-loopback ARW_BIND ({}); unset ARW_DEBUG or bind to 127.0.0.1",
            server.bind
        )));
    }
    if auth.token.is_none() && auth.token_sha256.is_none() {
        if !bind_ip.is_loopback() {
            return Err(StartError::Config(format!(
                "ARW_BIND={} is public and ARW_ADMIN_TOKEN/ARW_ADMIN_TOKEN_SHA256 not set; refusing to start",
                server.bind
            )));
        }
        let (token, path) = state_dir::generated_token(state_dir)
            .map_err(other("cannot create the admin token"))?;
        tracing::info!(path = %path.display(), "no admin token configured; using the generated token in this file");
        auth.token = Some(token);
    }
    AdminAuth::new(&auth).map_err(StartError::Config)
}

fn debug_enabled() -> bool {
    std::env::var("ARW_DEBUG").is_ok_and(|v| {
        matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on" | "debug")
    })
}
