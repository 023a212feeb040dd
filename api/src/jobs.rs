//! `/actions`: jobs. A submission is admitted by the node core (queue cap, idempotency) and
//! placed there; these handlers translate HTTP, check policy, and read the jobs store.

use axum::{
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use arw_p2p::{
    events::{Event, PolicyDecision},
    jobs::{JobSpec, SubmitError},
    node::{JobFilter, MAX_LIST, NodeError},
};

use crate::{
    AppState,
    capsules::gate,
    dto,
    problem::{Json, Problem},
};

/// Largest `POST /actions` body: an input of the largest size jobs carry, and the rest.
pub const BODY_LIMIT: usize = arw_p2p::jobs::MAX_INPUT + 16 * 1024;

/// `POST /actions`: 202 `{id, ok, staged: false, reused}`. Gated by policy (`task:<kind>`), not
/// by the admin token, as in the reference.
#[utoipa::path(post, path = "/actions", tag = "jobs", request_body = JobSpec, responses((status = 202, body = dto::JobAccepted, description = "Admitted (or, for a known `idem_key`, the existing job)")))]
pub async fn submit(
    State(state): State<AppState>,
    Json(spec): Json<JobSpec>,
) -> Result<Response, Problem> {
    let action = format!("task:{}", spec.kind);
    if let Err(problem) = gate(&state.node.snapshot(), &action) {
        let mut explain = Map::new();
        explain.insert("detail".into(), json!(problem.detail));
        let decision = PolicyDecision {
            action: "actions.submit".to_owned(),
            allow: false,
            explain,
            context: Map::from_iter([("kind".to_owned(), json!(spec.kind))]),
        };
        state.events.emit(Event::PolicyDecision(decision)).await;
        return Err(problem);
    }
    let submitted = state.node.submit_job(spec).await?;
    let body =
        dto::JobAccepted { id: submitted.id, ok: true, staged: false, reused: submitted.reused };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// `GET /state/actions` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// `queued`, `running`, `completed` or `failed`.
    state: Option<String>,
    /// Jobs running (or last run) on this node.
    node_id: Option<String>,
    /// Jobs whose kind starts with this.
    kind_prefix: Option<String>,
    /// Jobs changed at or after this RFC 3339 time.
    updated_since: Option<String>,
    /// At most this many (default 200).
    limit: Option<usize>,
}

/// `GET /state/actions`: `{version, items}`, newest change first, with an ETag that changes
/// whenever a job does (its state or its owner).
#[utoipa::path(get, path = "/state/actions", tag = "jobs", params(ListQuery), responses((status = 200, body = dto::JobsPage), (status = 304, description = "Unchanged since the `If-None-Match` ETag")))]
pub async fn list(
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    if let Some(s) = &query.state
        && !["queued", "running", "completed", "failed"].contains(&s.as_str())
    {
        let detail = "state must be queued, running, completed or failed";
        return Err(Problem::new(StatusCode::BAD_REQUEST, "invalid_query", detail));
    }
    let limit = query.limit.unwrap_or(200);
    if limit == 0 || limit > MAX_LIST {
        let detail = format!("limit must be between 1 and {MAX_LIST}");
        return Err(Problem::new(StatusCode::BAD_REQUEST, "invalid_query", detail));
    }
    let updated_since = match &query.updated_since {
        None => None,
        Some(text) => match chrono::DateTime::parse_from_rfc3339(text) {
            Ok(t) => Some(u64::try_from(t.timestamp_millis()).unwrap_or(0)),
            Err(_) => {
                let detail = "updated_since must be an RFC 3339 time, e.g. 2026-12-01T10:00:00Z";
                return Err(Problem::new(StatusCode::BAD_REQUEST, "invalid_query", detail));
            }
        },
    };
    let filter = JobFilter {
        state: query.state,
        node_id: query.node_id,
        kind_prefix: query.kind_prefix,
        updated_since,
        limit,
    };
    let page = state
        .node
        .jobs()
        .list(filter)
        .await
        .map_err(|e| Problem::internal(format!("jobs store: {e}")))?;
    let etag = format!("\"state-actions-v{}\"", page.rev);
    let cached =
        headers.get(header::IF_NONE_MATCH).is_some_and(|v| v.as_bytes() == etag.as_bytes());
    let mut response = if cached {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let items = page.jobs.iter().map(|j| j.summary()).collect();
        Json(dto::JobsPage { version: page.rev, items }).into_response()
    };
    let h = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, value);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=2"));
    Ok(response)
}

/// `GET /actions/{id}`: the job with its attempts (admin).
#[utoipa::path(get, path = "/actions/{id}", tag = "jobs", params(("id" = String, Path, description = "Job id")), responses((status = 200, body = arw_p2p::jobs::JobRecord)))]
pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    let job = state
        .node
        .jobs()
        .get(id.clone())
        .await
        .map_err(|e| Problem::internal(format!("jobs store: {e}")))?;
    match job {
        Some(job) => Ok(Json(json!(job))),
        None => Err(Problem::new(StatusCode::NOT_FOUND, "not_found", format!("no job {id}"))),
    }
}

/// `POST /actions/{id}/cancel` (admin).
#[utoipa::path(post, path = "/actions/{id}/cancel", tag = "jobs", params(("id" = String, Path, description = "Job id")), responses((status = 200, body = dto::Ok)))]
pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<dto::Ok>, Problem> {
    match state.node.cancel_job(&id).await {
        Ok(()) => Ok(Json(dto::Ok::YES)),
        // Not live: ended already, or never existed.
        Err(NodeError::Job(SubmitError::NotFound(_))) => {
            let stored = state.node.jobs().get(id.clone()).await.ok().flatten();
            Err(match stored {
                Some(_) => SubmitError::Ended(id).into(),
                None => SubmitError::NotFound(id).into(),
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// `POST /admin/jobs/drain` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct DrainRequest {
    /// `true`: take no new jobs from the Home; `false`: take them again.
    #[serde(default = "yes")]
    on: bool,
}

fn yes() -> bool {
    true
}

/// `POST /admin/jobs/drain`: running jobs finish, no new ones are taken (advertised at once).
#[utoipa::path(post, path = "/admin/jobs/drain", tag = "jobs", request_body = DrainRequest, responses((status = 200, body = dto::Ok)))]
pub async fn drain(
    State(state): State<AppState>,
    Json(body): Json<DrainRequest>,
) -> Result<Json<dto::Ok>, Problem> {
    state.node.drain_jobs(body.on).await?;
    Ok(Json(dto::Ok::YES))
}
