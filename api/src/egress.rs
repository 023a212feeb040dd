//! `GET /state/egress`: the contribution and egress ledger. What left this node, for which
//! node: each offload (a job's input sent to a worker, its output returned) and each request a
//! job made through the node's egress proxy (allowed or denied by policy). The daemon keeps the
//! rows ([`EgressLog`]); this reads them.

use axum::{
    extract::{Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};

use crate::{
    AppState,
    problem::{Json, Problem},
};

/// The ledger as the API reads it.
pub trait EgressLog: Send + Sync + std::fmt::Debug {
    /// Rows and per-node totals matching `filter`.
    fn page(&self, filter: &EgressFilter) -> Result<EgressPage, String>;
    /// How the ledger and the proxy are set up.
    fn settings(&self) -> EgressSettings;
}

/// What to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressFilter {
    /// Rows about this node only.
    pub node_id: Option<String>,
    /// Rows at or after this time (Unix ms).
    pub since_ms: Option<u64>,
    /// Rows at most (newest first).
    pub limit: usize,
}

/// One row of the ledger (the reference's EgressItem, with `node_id` and the job's fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EgressItem {
    /// Row id, increasing.
    pub id: i64,
    /// RFC 3339.
    pub time: String,
    /// Same, Unix ms.
    pub time_ms: u64,
    /// `offload` (a job sent to a worker), `allow` or `deny` (a request through the proxy).
    pub decision: String,
    /// Why: for a denial the policy that denied it; for an offload that did not complete, why
    /// it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For an offload, the worker; for a proxied request, the node whose job made it.
    pub node_id: String,
    /// Destination host (proxied requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest_host: Option<String>,
    /// Destination port (proxied requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest_port: Option<u16>,
    /// `connect` or `http` (proxied requests), `arw-job` (offloads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Bytes that came back: the job's output, or what the destination sent.
    pub bytes_in: u64,
    /// Bytes that left: the job's input, or what the job sent to the destination.
    pub bytes_out: u64,
    /// Offloads: the worker's run time (ms); proxied requests: how long the connection lasted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Offloads: the CPU time the worker measured for the run (ms; a program's, not a
    /// built-in kind's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_ms: Option<u64>,
    /// The job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Its kind (offloads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The attempt (offloads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// How the offloaded attempt ended: `completed`, `failed`, `lost`, `rejected`, `cancelled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

/// Per node, over the rows matched (not only those returned): who contributed what.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EgressTotals {
    /// The node.
    pub node_id: String,
    /// Attempts offloaded to it.
    pub offloads: u64,
    /// Of those, completed.
    pub completed: u64,
    /// Its run time for them (ms).
    pub run_ms: u64,
    /// The CPU time it measured for them (ms).
    pub cpu_ms: u64,
    /// Input bytes sent to it.
    pub job_bytes_out: u64,
    /// Output bytes it returned.
    pub job_bytes_in: u64,
    /// Requests its jobs made through the proxy and were allowed.
    pub requests: u64,
    /// And denied.
    pub denied: u64,
    /// Bytes its jobs sent through the proxy.
    pub net_bytes_out: u64,
    /// Bytes they received through it.
    pub net_bytes_in: u64,
}

/// What the ledger read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressPage {
    /// Newest row id in the ledger (the ETag's version).
    pub version: i64,
    /// Rows matching, newest first, at most `limit`.
    pub items: Vec<EgressItem>,
    /// Per node, over every row matching.
    pub totals: Vec<EgressTotals>,
    /// Rows in the ledger.
    pub rows: u64,
}

/// `settings` of `GET /state/egress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EgressSettings {
    /// The ledger records (`[egress] ledger`).
    pub ledger: bool,
    /// The proxy runs (`[egress] proxy`).
    pub proxy: bool,
    /// Where it listens, when it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_addr: Option<String>,
    /// Rows kept at most; the oldest go first.
    pub max_rows: u64,
}

/// `metrics` of `GET /state/egress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EgressMetrics {
    /// Rows in the ledger.
    pub rows: u64,
}

/// `GET /state/egress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EgressView {
    /// Newest row id (the ETag is `"state-egress-v<version>"`).
    pub version: i64,
    /// Items returned.
    pub count: usize,
    /// Newest first.
    pub items: Vec<EgressItem>,
    /// Per node, over every row the query matched.
    pub totals: Vec<EgressTotals>,
    /// How the ledger and proxy are set up.
    pub settings: EgressSettings,
    /// The ledger's size.
    pub metrics: EgressMetrics,
}

/// `GET /state/egress` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EgressQuery {
    /// Rows about this node only (an offload's worker, a proxied request's node).
    node_id: Option<String>,
    /// Rows at or after this RFC 3339 time; the totals cover the same window.
    since: Option<String>,
    /// Rows returned, 1–2000 (200).
    limit: Option<usize>,
}

/// Rows returned at most.
pub const MAX_LIMIT: usize = 2_000;

/// `GET /state/egress`: the newest rows and per-node totals; 501 when the ledger is off.
#[utoipa::path(get, path = "/state/egress", tag = "jobs", params(EgressQuery), responses(
    (status = 200, body = EgressView),
    (status = 304, description = "Unchanged since the `If-None-Match` ETag"),
    (status = 501, description = "The ledger is off (`[egress] ledger`, `ARW_EGRESS_LEDGER_ENABLE`)")
))]
pub async fn state_egress(
    State(state): State<AppState>,
    Query(query): Query<EgressQuery>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let Some(log) = state.egress.clone() else {
        return Err(Problem::new(
            StatusCode::NOT_IMPLEMENTED,
            "egress_ledger_disabled",
            "the egress ledger is off: set [egress] ledger = true or ARW_EGRESS_LEDGER_ENABLE=1",
        ));
    };
    let invalid = |detail: String| Problem::new(StatusCode::BAD_REQUEST, "invalid_query", detail);
    let limit = query.limit.unwrap_or(200);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(invalid(format!("limit must be between 1 and {MAX_LIMIT}")));
    }
    let since_ms = match &query.since {
        None => None,
        Some(text) => match chrono::DateTime::parse_from_rfc3339(text) {
            Ok(t) => Some(u64::try_from(t.timestamp_millis()).unwrap_or(0)),
            Err(_) => {
                return Err(invalid(
                    "since must be an RFC 3339 time, e.g. 2026-12-01T10:00:00Z".into(),
                ));
            }
        },
    };
    let filter = EgressFilter { node_id: query.node_id, since_ms, limit };
    let settings = log.settings();
    let page = tokio::task::spawn_blocking(move || log.page(&filter))
        .await
        .map_err(|e| Problem::internal(format!("egress ledger: {e}")))?
        .map_err(|e| Problem::internal(format!("egress ledger: {e}")))?;
    let etag = format!("\"state-egress-v{}\"", page.version);
    let cached =
        headers.get(header::IF_NONE_MATCH).is_some_and(|v| v.as_bytes() == etag.as_bytes());
    let mut response = if cached {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        Json(EgressView {
            version: page.version,
            count: page.items.len(),
            items: page.items,
            totals: page.totals,
            settings,
            metrics: EgressMetrics { rows: page.rows },
        })
        .into_response()
    };
    if let Ok(value) = HeaderValue::from_str(&etag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    Ok(response)
}
