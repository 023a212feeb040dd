//! Prometheus metrics: one registry per process, rendered by `GET /metrics` in the text format.

use std::{fmt, sync::Arc};

use axum::{
    extract::{MatchedPath, Request, State},
    http::{HeaderValue, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
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
        Self {
            capsule_legacy_headers,
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
