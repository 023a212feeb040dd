//! arw-api: the HTTP admin API. Paths and shapes follow the runbook and the compatibility
//! reference; every error is `application/problem+json` with a stable `code`.

use std::sync::Arc;

use axum::{Extension, Router, extract::DefaultBodyLimit, middleware};
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::OpenApi;
use utoipa_axum::{
    router::{OpenApiRouter, UtoipaMethodRouterExt},
    routes,
};

use tokio_util::sync::CancellationToken;

use arw_p2p::{events::EventTx, node::NodeHandle};

pub mod auth;
pub mod capsules;
pub mod correlate;
pub mod dto;
pub mod egress;
pub mod events;
pub mod jobs;
pub mod metrics;
pub mod openapi;
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
    /// The egress ledger, when it is on.
    pub egress: Option<Arc<dyn egress::EgressLog>>,
}

/// The routes, each with its OpenAPI description.
fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(routes::healthz))
        .routes(routes!(metrics::metrics))
        .routes(routes!(openapi::document))
        .routes(routes!(routes::state_cluster))
        .routes(routes!(routes::hierarchy_state))
        .routes(routes!(routes::hierarchy_role))
        .routes(routes!(routes::hierarchy_hello))
        .routes(routes!(routes::hierarchy_offer))
        .routes(routes!(routes::hierarchy_accept))
        .routes(routes!(routes::cluster_admit))
        .routes(routes!(routes::cluster_revoke))
        .routes(routes!(routes::cluster_trust_home))
        .routes(routes!(routes::cluster_untrust_home))
        .routes(routes!(routes::governor, routes::set_governor))
        .routes(routes!(routes::governor_profile, routes::set_governor_profile))
        .routes(routes!(routes::governor_hints, routes::set_governor_hints))
        .routes(routes!(capsules::state_capsules))
        .routes(routes!(capsules::presets))
        .routes(routes!(capsules::adopt))
        .routes(routes!(capsules::teardown))
        .routes(routes!(capsules::audit))
        .routes(routes!(capsules::trust))
        .routes(routes!(capsules::reload))
        .routes(routes!(jobs::submit).layer(DefaultBodyLimit::max(jobs::BODY_LIMIT)))
        .routes(routes!(jobs::show))
        .routes(routes!(jobs::cancel))
        .routes(routes!(jobs::list))
        .routes(routes!(jobs::drain))
        .routes(routes!(routes::runtime_matrix))
        .routes(routes!(egress::state_egress))
        .routes(routes!(events::stream))
        .routes(routes!(events::journal))
        .routes(routes!(events::test_event))
        .routes(routes!(ui::root))
        .routes(routes!(ui::page))
        .routes(routes!(ui::script))
}

/// The OpenAPI document of [`router`] (also served at `/openapi.json`).
pub fn openapi_doc() -> utoipa::openapi::OpenApi {
    openapi::complete(routes().into_openapi())
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    let (routes, doc) = routes().split_for_parts();
    let doc: Arc<str> = match openapi::complete(doc).to_pretty_json() {
        Ok(json) => json.into(),
        Err(e) => format!("{{\"error\":\"{e}\"}}").into(),
    };
    routes
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), auth::require_admin))
        // Outside auth: a capsule is adopted (or refused) before the token is looked at.
        .layer(middleware::from_fn_with_state(state.clone(), capsules::guard))
        .layer(middleware::from_fn_with_state(state.clone(), metrics::count_requests))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(CatchPanicLayer::custom(routes::panic_response))
        .layer(middleware::from_fn(correlate::correlate))
        .layer(Extension(doc))
        .with_state(state)
}
