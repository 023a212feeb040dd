//! Prometheus metrics: one registry per process, rendered by `GET /metrics` in the text format.

use std::{fmt, sync::Arc};

use arw_p2p::{cluster::Health, jobs::RuntimeHealth, node::NodeHandle};
use axum::{
    extract::{MatchedPath, Request, State},
    http::{HeaderValue, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{AppState, problem::Problem};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

/// The process's metrics. Other components register theirs through [`Metrics::registry_mut`]
/// before the registry is shared.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    sse_connections: Family<ModeLabels, Counter>,
    /// Open SSE streams.
    pub sse_clients: Gauge,
    /// Events written to SSE streams.
    pub sse_sent: Counter,
    /// Streams closed because the client fell behind.
    pub sse_lagged: Counter,
    /// Events journaled and fanned out.
    pub events_published: Counter,
    /// Requests refused for the legacy `X-ARW-Gate` header.
    pub capsule_legacy_headers: Counter,
    /// Time to commit one batch of events to the journal, seconds.
    pub journal_commit_seconds: Histogram,
    /// Rows in the journal.
    pub journal_rows: Gauge,
    /// Payload bytes in the journal.
    pub journal_bytes: Gauge,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with the HTTP request counter and build info.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("arw");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by matched route, method and status",
            requests.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION").into() }).set(1);
        registry.register("build_info", "Build information (always 1)", build);
        let sse_connections = Family::<ModeLabels, Counter>::default();
        registry.register(
            "events_sse_connections",
            "SSE connections by replay mode (after, recent, live)",
            sse_connections.clone(),
        );
        let sse_clients = Gauge::default();
        registry.register("events_sse_clients", "Open SSE streams", sse_clients.clone());
        let sse_sent = Counter::default();
        registry.register("events_sse_sent", "Events written to SSE streams", sse_sent.clone());
        let sse_lagged = Counter::default();
        registry.register(
            "events_sse_lagged",
            "SSE streams closed with service.lagged because the client fell behind",
            sse_lagged.clone(),
        );
        let events_published = Counter::default();
        registry.register(
            "events_published",
            "Events journaled and fanned out",
            events_published.clone(),
        );
        let capsule_legacy_headers = Counter::default();
        registry.register(
            "capsule_legacy_header",
            "Requests refused with 410 for the legacy X-ARW-Gate header",
            capsule_legacy_headers.clone(),
        );
        let journal_commit_seconds = Histogram::new(exponential_buckets(0.000_1, 2.0, 16));
        registry.register(
            "journal_commit_seconds",
            "Time to commit one batch of events to the journal (fsync included when on)",
            journal_commit_seconds.clone(),
        );
        let journal_rows = Gauge::default();
        registry.register("journal_rows", "Events held in the journal", journal_rows.clone());
        let journal_bytes = Gauge::default();
        registry.register(
            "journal_bytes",
            "Payload bytes held in the journal (bounded by events.retention_bytes)",
            journal_bytes.clone(),
        );
        Self {
            capsule_legacy_headers,
            journal_commit_seconds,
            journal_rows,
            journal_bytes,
            registry,
            requests,
            sse_connections,
            sse_clients,
            sse_sent,
            sse_lagged,
            events_published,
        }
    }

    /// Counts a new SSE connection in `mode`.
    pub fn sse_connection(&self, mode: &str) {
        self.sse_connections.get_or_create(&ModeLabels { mode: mode.to_owned() }).inc();
    }

    /// Registers further metrics.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Adds the node's own state, read from its latest snapshot at each scrape.
    pub fn watch_node(&mut self, node: NodeHandle) {
        self.registry.register_collector(Box::new(NodeCollector(node)));
    }

    /// The text exposition.
    pub fn render(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Middleware counting every response by route template (never the raw path, which would let
/// clients grow the label set without bound).
pub async fn count_requests(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    let labels = RequestLabels { route, method, status: response.status().as_u16() };
    state.metrics.requests.get_or_create(&labels).inc();
    response
}

/// `GET /metrics`.
#[utoipa::path(get, path = "/metrics", tag = "node", responses((status = 200, content_type = "text/plain; version=0.0.4", description = "Prometheus text exposition")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    match state.metrics.render() {
        Ok(text) => {
            let mut response = text.into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        Err(_) => Problem::internal("metrics could not be encoded").into_response(),
    }
}

/// Shared handle.
pub type SharedMetrics = Arc<Metrics>;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HealthLabels {
    health: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuntimeLabels {
    runtime: String,
    health: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuntimeName {
    runtime: String,
}

/// The node's registry, membership decisions, connections, policy and jobs, as its latest
/// snapshot has them (no lock, no call into the node).
#[derive(Debug)]
struct NodeCollector(NodeHandle);

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let snap = self.0.snapshot();
        let now = arw_p2p::time::now_ms();
        let nodes = Family::<HealthLabels, Gauge>::default();
        for health in [Health::Ok, Health::Suspect, Health::Down, Health::Left, Health::Stale] {
            nodes.get_or_create(&HealthLabels { health: health.as_str() }).set(0);
        }
        for record in snap.nodes.values() {
            let health = record.health_at(now, snap.ttl_ms).as_str();
            nodes.get_or_create(&HealthLabels { health }).inc();
        }
        let help = "Nodes in this node's registry by health (itself included)";
        nodes.encode(encoder.encode_descriptor(
            "cluster_nodes",
            help,
            None,
            nodes.metric_type(),
        )?)?;

        let c = snap.counters;
        let counter = |encoder: &mut DescriptorEncoder, name, help, value: u64| {
            let metric = ConstCounter::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
        };
        counter(
            &mut encoder,
            "cluster_messages_received",
            "Federation messages received (gossip, broker, sync and probe answers, dispatch)",
            c.received,
        )?;
        counter(
            &mut encoder,
            "cluster_messages_shed",
            "Gossip messages dropped unchecked as a flood (a key sending too much, too many unknown keys from one peer)",
            c.shed,
        )?;
        let refused = Family::<ReasonLabels, Counter>::default();
        for (reason, n) in c.refused_by_reason() {
            refused.get_or_create(&ReasonLabels { reason: reason.as_str() }).inc_by(n);
        }
        let help = "Federation messages refused, by reason (as in cluster.event.rejected)";
        refused.encode(encoder.encode_descriptor(
            "cluster_messages_refused",
            help,
            None,
            refused.metric_type(),
        )?)?;
        let decisions = Family::<DecisionLabels, Counter>::default();
        for (decision, n) in [
            ("sync_requested", c.syncs),
            ("probe_sent", c.probes),
            ("suspicion_raised", c.reports),
            ("suspicion_refuted", c.refutations),
            ("connection_reset", c.resets),
            ("redial", c.redials),
            ("advert_signed", c.adverts),
        ] {
            decisions.get_or_create(&DecisionLabels { decision }).inc_by(n);
        }
        let help = "Membership decisions this node made: syncs asked, probes, suspicions it raised and refuted, resets, redials, adverts signed";
        decisions.encode(encoder.encode_descriptor(
            "cluster_decisions",
            help,
            None,
            decisions.metric_type(),
        )?)?;

        let gauge = |encoder: &mut DescriptorEncoder, name, help, value: i64| {
            let metric = ConstGauge::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
        };
        let peers = i64::try_from(snap.network.connected_peers).unwrap_or(i64::MAX);
        gauge(
            &mut encoder,
            "cluster_connections",
            "Open connections to peers (libp2p) or 1 with a broker connection (NATS)",
            peers,
        )?;
        let epoch = i64::try_from(snap.policy.policy_epoch).unwrap_or(i64::MAX);
        gauge(
            &mut encoder,
            "policy_epoch",
            "Epoch of the policy this node obeys or, at a Home, signs",
            epoch,
        )?;
        gauge(
            &mut encoder,
            "liveness_slowdown",
            "How much more lenient this node judges silence because its own timers run late (1 = not at all)",
            i64::try_from(snap.slowdown).unwrap_or(i64::MAX),
        )?;
        let jobs = Family::<JobLabels, Gauge>::default();
        let j = &snap.jobs;
        for (state, n) in [
            ("queued", j.queued as i64),
            ("running_here", i64::from(j.running)),
            ("hosted_for_home", i64::from(j.hosted)),
        ] {
            jobs.get_or_create(&JobLabels { state }).set(n);
        }
        let help = "Jobs on this node: its own queued and running here, and attempts run here for the Home";
        jobs.encode(encoder.encode_descriptor("jobs", help, None, jobs.metric_type())?)?;
        let health = Family::<RuntimeLabels, Gauge>::default();
        let quarantines = Family::<RuntimeName, Counter>::default();
        for r in &snap.runtimes {
            for h in [RuntimeHealth::Ready, RuntimeHealth::Degraded, RuntimeHealth::Down] {
                let labels = RuntimeLabels { runtime: r.id.clone(), health: h.as_str() };
                health.get_or_create(&labels).set(i64::from(r.health == h));
            }
            let labels = RuntimeName { runtime: r.id.clone() };
            quarantines.get_or_create(&labels).inc_by(u64::from(r.quarantines));
        }
        let help = "1 for the health each runtime of this node is in (down: quarantined)";
        health.encode(encoder.encode_descriptor(
            "runtime_health",
            help,
            None,
            health.metric_type(),
        )?)?;
        let help = "Quarantines of each runtime of this node since it started";
        let name = "runtime_quarantines";
        quarantines.encode(encoder.encode_descriptor(
            name,
            help,
            None,
            quarantines.metric_type(),
        )?)?;
        Ok(())
    }
}
