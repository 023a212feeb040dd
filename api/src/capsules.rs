//! Capsules over HTTP: the `X-ARW-Capsule` guard that runs on every route before auth, the
//! `/state/policy/capsules` view, `/admin/policy/capsules/*`, the `/admin/rpu/*` trust store, and
//! the gate that lets held capsules deny the hierarchy routes.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

use axum::{
    extract::{ConnectInfo, Query, Request, State},
    http::{HeaderMap, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use arw_p2p::{
    capsule::{Capsule, CapsuleError, Subject, pattern_matches},
    events::{CapsuleFailed, Event, PolicyDecision},
    node::{CapsuleRequest, NodeError, Snapshot, TeardownRequest},
    time::{now_ms, rfc3339_ms},
};

use crate::{
    AppState,
    dto::{Adopted, CapsulesView, TornDown, TrustView},
    events::{JournalPage, JournalQuery, journal_page, parse_limit, query_prefixes},
    problem::{Json, Problem},
};

const LEGACY_DETAIL: &str =
    "Legacy X-ARW-Gate header is no longer supported; send X-ARW-Capsule instead";
const UNDECODABLE_DETAIL: &str = "Capsule header could not be decoded";
const VERIFICATION_DETAIL: &str = "Capsule verification failed";

/// Runs before auth on every route: adopts a valid `X-ARW-Capsule` (renewing its lease) and lets
/// the request through; answers 400/403 for a capsule that is not one or does not verify, and
/// 410 for the legacy `X-ARW-Gate` header. Every refusal emits `policy.capsule.failed` and
/// `policy.decision`.
pub async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let client = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let headers = request.headers();
    let context = correlation(headers);
    let header = headers
        .get("x-arw-capsule")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_owned());
    match header {
        Some(text) if !text.is_empty() => {
            let capsule = match Capsule::from_header(&text) {
                Ok(capsule) => capsule,
                Err(e) => {
                    refused(&state, None, &e.to_string(), &context).await;
                    return rejection(
                        StatusCode::BAD_REQUEST,
                        "invalid_capsule",
                        UNDECODABLE_DETAIL,
                    );
                }
            };
            let id = capsule.fields.id.clone();
            let held = state.node.snapshot().capsules.held().any(|a| a.capsule.fields.id == id);
            if !held
                && let Some(retry) = client.and_then(|ip| state.capsule_presenters.0.blocked(ip))
            {
                let mut problem = Problem::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "capsule_rate_limited",
                    "too many new capsules presented from this address",
                );
                problem.retry_after = Some(retry);
                return problem.into_response();
            }
            match state
                .node
                .adopt_capsule(CapsuleRequest { capsule, context: context.clone(), shared: false })
                .await
            {
                Ok(adoption) => {
                    if !adoption.renewal
                        && let Some(ip) = client
                    {
                        state.capsule_presenters.0.fail(ip);
                    }
                }
                Err(NodeError::Capsule(e)) => {
                    refused(&state, Some(&id), &e.to_string(), &context).await;
                    return match e {
                        CapsuleError::Invalid(_) => rejection(
                            StatusCode::BAD_REQUEST,
                            "invalid_capsule",
                            UNDECODABLE_DETAIL,
                        ),
                        CapsuleError::Verification(_) => rejection(
                            StatusCode::FORBIDDEN,
                            "capsule_verification_failed",
                            VERIFICATION_DETAIL,
                        ),
                    };
                }
                Err(e) => return Problem::from(e).into_response(),
            }
        }
        Some(_) => {}
        None if headers.contains_key("x-arw-gate") => {
            state.metrics.capsule_legacy_headers.inc();
            refused(&state, None, LEGACY_DETAIL, &context).await;
            return rejection(StatusCode::GONE, "capsule_header_legacy", LEGACY_DETAIL);
        }
        None => {}
    }
    next.run(request).await
}

/// New capsule ids one client address may have adopted from request headers per window.
const NEW_PER_CLIENT: u32 = 16;
/// That window.
const NEW_PER_CLIENT_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// How many new capsules each client address has had adopted from headers lately.
pub struct PresenterLimit(crate::auth::FailureLimiter);

impl Default for PresenterLimit {
    fn default() -> Self {
        // The limiter blocks once its count exceeds its limit: the last adoption allowed is
        // the one that brings the count to NEW_PER_CLIENT.
        Self(crate::auth::FailureLimiter::new(NEW_PER_CLIENT - 1, NEW_PER_CLIENT_WINDOW))
    }
}

impl std::fmt::Debug for PresenterLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PresenterLimit")
    }
}

fn rejection(status: StatusCode, code: &str, detail: &str) -> Response {
    Problem::new(status, code, detail).with_title("Capsule rejected").into_response()
}

/// `corr_id` (from `X-ARW-Corr`, else new) and `request_id` (from `X-Request-Id`, else new).
fn correlation(headers: &HeaderMap) -> Map<String, Value> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map(str::to_owned)
    };
    let corr = header("x-arw-corr").unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let request = header("x-request-id").unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    Map::from_iter([("corr_id".to_owned(), json!(corr)), ("request_id".to_owned(), json!(request))])
}

/// The guard runs before auth, so a flood of bad capsules must not flood the journal: at most
/// [`FAILURES_PER_WINDOW`] refusals per 10 s are journaled; the next one counts the rest in
/// `suppressed`.
#[derive(Debug, Default)]
pub struct FailureBudget {
    window: AtomicU64,
    used: AtomicU32,
    suppressed: AtomicU64,
}

const FAILURES_PER_WINDOW: u32 = 20;

impl FailureBudget {
    /// `Some(suppressed so far)` when a refusal at `now_ms` may be journaled.
    fn admit(&self, now_ms: u64) -> Option<u64> {
        let window = now_ms / 10_000;
        if self.window.swap(window, Ordering::Relaxed) != window {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) >= FAILURES_PER_WINDOW {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

async fn refused(state: &AppState, id: Option<&str>, detail: &str, context: &Map<String, Value>) {
    let Some(suppressed) = state.capsule_failures.admit(now_ms()) else { return };
    let mut explain = Map::from_iter([("detail".to_owned(), json!(detail))]);
    if let Some(id) = id {
        explain.insert("capsule_id".to_owned(), json!(id));
    }
    let failed = CapsuleFailed {
        id: id.map(str::to_owned),
        detail: detail.to_owned(),
        suppressed: (suppressed > 0).then_some(suppressed),
        context: context.clone(),
    };
    let decision = PolicyDecision {
        action: "policy.capsule".to_owned(),
        allow: false,
        explain,
        context: context.clone(),
    };
    state.events.emit(Event::CapsuleFailed(failed)).await;
    state.events.emit(Event::PolicyDecision(decision)).await;
}

/// `GET /state/policy/capsules`: held capsules, newest first.
#[utoipa::path(get, path = "/state/policy/capsules", tag = "policy", responses((status = 200, body = CapsulesView)))]
pub async fn state_capsules(State(state): State<AppState>) -> Json<CapsulesView> {
    let now = now_ms();
    let items = state.node.snapshot().capsules.items(now);
    Json(CapsulesView { count: items.len(), items, generated_ms: now, generated: rfc3339_ms(now) })
}

/// A preset as `/admin/policy/capsules/presets` lists it.
#[derive(Debug, Clone, Serialize)]
struct PresetItem {
    id: String,
    file_name: String,
    path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    issuer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hop_ttl: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    renew_within_ms: Option<u64>,
    denies: usize,
    contracts: usize,
    signature_present: bool,
}

/// `GET /admin/policy/capsules/presets`: the `*.json` capsules in the presets directory.
#[utoipa::path(get, path = "/admin/policy/capsules/presets", tag = "policy", responses((status = 200, body = Object, description = "The capsule presets: `{count, items}`")))]
pub async fn presets(State(state): State<AppState>) -> Result<Json<Value>, Problem> {
    let dir = state.capsule_presets.clone();
    let presets =
        tokio::task::spawn_blocking(move || dir.map(|d| read_presets(&d)).unwrap_or_default())
            .await
            .map_err(|_| Problem::internal("could not read the presets"))?;
    Ok(Json(json!({ "count": presets.len(), "presets": presets })))
}

fn read_presets(dir: &Path) -> Vec<PresetItem> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut presets: Vec<PresetItem> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|path| {
            let id = path.file_stem()?.to_str()?.to_owned();
            let capsule = match load_preset_file(&path) {
                Ok(capsule) => capsule,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "capsule preset skipped");
                    return None;
                }
            };
            let c = capsule.fields;
            Some(PresetItem {
                id,
                file_name: path.file_name()?.to_str()?.to_owned(),
                path: path.display().to_string(),
                version: Some(c.version),
                issuer: c.issuer,
                hop_ttl: c.hop_ttl,
                lease_duration_ms: c.lease_duration_ms,
                renew_within_ms: c.renew_within_ms,
                denies: c.denies.len(),
                contracts: c.contracts.len(),
                signature_present: c.signature.is_some(),
            })
        })
        .collect();
    presets.sort_by(|a, b| a.id.cmp(&b.id));
    presets
}

fn load_preset_file(path: &Path) -> Result<Capsule, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let json: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    Capsule::from_json(json).map_err(|e| e.to_string())
}

/// `POST /admin/policy/capsules/adopt` body: exactly one of `preset_id` and `capsule`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct AdoptRequest {
    /// A preset's id (`GET /admin/policy/capsules/presets`).
    #[serde(default)]
    preset_id: Option<String>,
    /// A signed capsule document.
    #[serde(default)]
    capsule: Option<Value>,
    /// Why (recorded in the events).
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /admin/policy/capsules/adopt`: exactly one of `preset_id` and `capsule`.
#[utoipa::path(post, path = "/admin/policy/capsules/adopt", tag = "policy", request_body = AdoptRequest, responses((status = 200, body = Adopted)))]
pub async fn adopt(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(body): Json<AdoptRequest>,
) -> Result<Json<Adopted>, Problem> {
    let bad = |detail: &str| Problem::new(StatusCode::BAD_REQUEST, "invalid_capsule", detail);
    let capsule = match (&body.preset_id, body.capsule) {
        (Some(id), None) => {
            let path = preset_path(state.capsule_presets.as_deref(), id).ok_or_else(|| {
                Problem::new(StatusCode::NOT_FOUND, "unknown_preset", format!("no preset {id:?}"))
            })?;
            let preset = tokio::task::spawn_blocking(move || load_preset_file(&path))
                .await
                .map_err(|_| Problem::internal("could not read the preset"))?;
            preset.map_err(|e| bad(&format!("preset {id:?}: {e}")))?
        }
        (None, Some(json)) => Capsule::from_json(json).map_err(|e| bad(&e.to_string()))?,
        _ => return Err(bad("send exactly one of preset_id and capsule")),
    };
    let mut context = correlation(&headers);
    if let Some(reason) = &body.reason {
        context.insert("reason".into(), json!(reason));
    }
    if let Some(id) = &body.preset_id {
        context.insert("preset_id".into(), json!(id));
    }
    let capsule_id = capsule.fields.id.clone();
    let adoption = match state
        .node
        .adopt_capsule(CapsuleRequest { capsule, context: context.clone(), shared: true })
        .await
    {
        Ok(adoption) => adoption,
        Err(NodeError::Capsule(e)) => {
            refused(&state, Some(&capsule_id), &e.to_string(), &context).await;
            return Err(match e {
                CapsuleError::Invalid(detail) => bad(&detail),
                CapsuleError::Verification(detail) => {
                    Problem::new(StatusCode::FORBIDDEN, "capsule_verification_failed", detail)
                }
            });
        }
        Err(e) => return Err(e.into()),
    };
    Ok(Json(Adopted {
        ok: true,
        notify: adoption.notify,
        capsule_id,
        snapshot: adoption.item,
        preset_id: body.preset_id,
    }))
}

/// `<dir>/<id>.json` when `id` is a plain file stem that exists.
fn preset_path(dir: Option<&Path>, id: &str) -> Option<PathBuf> {
    let plain = !id.is_empty()
        && !id.starts_with('.')
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let path = dir?.join(format!("{id}.json"));
    (plain && path.is_file()).then_some(path)
}

/// `POST /admin/policy/capsules/teardown`.
#[utoipa::path(post, path = "/admin/policy/capsules/teardown", tag = "policy", request_body = TeardownRequest, responses((status = 200, body = TornDown)))]
pub async fn teardown(
    State(state): State<AppState>,
    Json(mut body): Json<TeardownRequest>,
) -> Result<Json<TornDown>, Problem> {
    body.ids.retain(|id| !id.trim().is_empty());
    if !body.all && body.ids.is_empty() {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "send all:true or at least one non-blank id",
        ));
    }
    let (dry_run, reason) = (body.dry_run, body.reason.clone());
    let out = state.node.teardown_capsules(body).await?;
    let remaining = state.node.snapshot().capsules.len();
    Ok(Json(TornDown {
        ok: true,
        removed: out.removed,
        not_found: out.not_found,
        remaining,
        dry_run,
        reason,
    }))
}

/// `GET /admin/policy/capsules/audit`: the journal's `policy.capsule.*` events, newest last.
#[utoipa::path(get, path = "/admin/policy/capsules/audit", tag = "policy", params(JournalQuery), responses((status = 200, body = JournalPage)))]
pub async fn audit(
    State(state): State<AppState>,
    Query(query): Query<JournalQuery>,
) -> Result<Json<JournalPage>, Problem> {
    let limit = parse_limit(query.limit.as_deref(), 50, 500)?;
    let mut prefixes: Vec<String> = query_prefixes(query.prefix.as_deref())?
        .into_iter()
        .map(|p| p.to_lowercase())
        .filter(|p| p.starts_with("policy.capsule."))
        .collect();
    if prefixes.is_empty() {
        prefixes.push("policy.capsule.".to_owned());
    }
    journal_page(&state, limit, prefixes).await
}

/// `GET /admin/rpu/trust`: issuer ids and algorithms (never the keys).
#[utoipa::path(get, path = "/admin/rpu/trust", tag = "policy", responses((status = 200, body = TrustView)))]
pub async fn trust(State(state): State<AppState>) -> Json<TrustView> {
    let issuers = state.node.snapshot().trust.issuers();
    Json(TrustView { ok: None, count: issuers.len(), issuers })
}

/// `POST /admin/rpu/reload`: reads the trust store file again.
#[utoipa::path(post, path = "/admin/rpu/reload", tag = "policy", responses((status = 200, body = TrustView)))]
pub async fn reload(State(state): State<AppState>) -> Result<Json<TrustView>, Problem> {
    let issuers = state.node.reload_trust().await?;
    Ok(Json(TrustView { ok: Some(true), count: issuers.len(), issuers }))
}

/// What a capsule may never deny: the admin must always be able to see the node's state (and
/// from there tear capsules down and take back the trust in a Home, routes no capsule gates).
const RECOVERY: [&str; 1] = ["hierarchy:state:get"];

/// Refuses `key` (e.g. `hierarchy:role:set`) when the node's role or a held capsule denies it.
pub fn gate(snapshot: &Snapshot, key: &str) -> Result<(), Problem> {
    let denied = |detail: String, extra: Value| {
        Err(Problem::new(StatusCode::FORBIDDEN, "denied", detail).with("explain", extra))
    };
    let role = snapshot.hierarchy.role;
    if let Some(pattern) = role.denies().iter().find(|p| pattern_matches(p, key)) {
        return denied(
            format!("Denied: role {} may not {key}", role.as_str()),
            json!({ "layer": "hierarchy", "pattern": pattern }),
        );
    }
    if RECOVERY.contains(&key) {
        return Ok(());
    }
    let h = &snapshot.hierarchy;
    let subject = Subject { role, node: snapshot.id.as_str(), tags: &h.tags };
    if let Some((capsule, pattern)) = snapshot.capsules.denying(key, &subject, now_ms()) {
        return denied(
            format!("Denied by capsule {capsule}: {key}"),
            json!({ "layer": "capsule", "capsule_id": capsule, "pattern": pattern }),
        );
    }
    Ok(())
}
