//! arw-api: the HTTP admin API. Paths and shapes follow the runbook and the compatibility
//! reference; every error is `application/problem+json` with a stable `code`.

use std::sync::Arc;

use axum::{
    Router,
    extract::DefaultBodyLimit,
    middleware,
    routing::{get, post},
};
use tower_http::catch_panic::CatchPanicLayer;

use tokio_util::sync::CancellationToken;

use arw_p2p::{events::EventTx, node::NodeHandle};

pub mod auth;
pub mod capsules;
pub mod correlate;
pub mod dto;
pub mod events;
pub mod jobs;
pub mod metrics;
pub mod problem;
mod routes;
pub mod ui;

pub use auth::{AdminAuth, AuthConfig};
pub use metrics::Metrics;
pub use problem::Problem;

/// Largest accepted request body, in bytes.
pub const BODY_LIMIT: usize = 64 * 1024;

/// What every handler can reach. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The node actor.
    pub node: NodeHandle,
    /// The event pipeline.
    pub events: EventTx,
    /// The admin gate.
    pub auth: Arc<AdminAuth>,
    /// Process metrics.
    pub metrics: Arc<Metrics>,
    /// The durable event journal.
    pub log: Arc<dyn events::EventLog>,
    /// SSE settings.
    pub sse: events::SseConfig,
    /// Cancelled when the server shuts down; open streams end.
    pub shutdown: CancellationToken,
    /// Directory of capsule presets (`*.json`).
    pub capsule_presets: Option<std::path::PathBuf>,
    /// Caps the events refused capsules write.
    pub capsule_failures: Arc<capsules::FailureBudget>,
    /// New capsules each client address may have adopted from headers.
    pub capsule_presenters: Arc<capsules::PresenterLimit>,
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(routes::healthz))
        .route("/metrics", get(metrics::metrics))
        .route("/state/cluster", get(routes::state_cluster))
        .route("/admin/hierarchy/state", get(routes::hierarchy_state))
        .route("/admin/hierarchy/role", post(routes::hierarchy_role))
        .route("/admin/hierarchy/hello", post(routes::hierarchy_hello))
        .route("/admin/hierarchy/offer", post(routes::hierarchy_offer))
        .route("/admin/hierarchy/accept", post(routes::hierarchy_accept))
        .route("/admin/cluster/admit", post(routes::cluster_admit))
        .route("/admin/cluster/revoke", post(routes::cluster_revoke))
        .route("/admin/cluster/trust-home", post(routes::cluster_trust_home))
        .route("/admin/cluster/untrust-home", post(routes::cluster_untrust_home))
        .route("/admin/governor", get(routes::governor).post(routes::set_governor))
        .route(
            "/admin/governor/profile",
            get(routes::governor_profile).post(routes::set_governor_profile),
        )
        .route(
            "/admin/governor/hints",
            get(routes::governor_hints).post(routes::set_governor_hints),
        )
        .route("/state/policy/capsules", get(capsules::state_capsules))
        .route("/admin/policy/capsules/presets", get(capsules::presets))
        .route("/admin/policy/capsules/adopt", post(capsules::adopt))
        .route("/admin/policy/capsules/teardown", post(capsules::teardown))
        .route("/admin/policy/capsules/audit", get(capsules::audit))
        .route("/admin/rpu/trust", get(capsules::trust))
        .route("/admin/rpu/reload", post(capsules::reload))
        .route("/actions", post(jobs::submit).layer(DefaultBodyLimit::max(jobs::BODY_LIMIT)))
        .route("/actions/{id}", get(jobs::show))
        .route("/actions/{id}/cancel", post(jobs::cancel))
        .route("/state/actions", get(jobs::list))
        .route("/admin/jobs/drain", post(jobs::drain))
        .route("/events", get(events::stream))
        .route("/", get(ui::root))
        .route("/ui", get(ui::page))
        .route("/ui/app.js", get(ui::script))
        .route("/admin/events/journal", get(events::journal))
        .route("/admin/events/test", post(events::test_event))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), auth::require_admin))
        // Outside auth: a capsule is adopted (or refused) before the token is looked at.
        .layer(middleware::from_fn_with_state(state.clone(), capsules::guard))
        .layer(middleware::from_fn_with_state(state.clone(), metrics::count_requests))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(CatchPanicLayer::custom(routes::panic_response))
        .layer(middleware::from_fn(correlate::correlate))
        .with_state(state)
}
