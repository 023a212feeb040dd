//! Handlers. Each one is a thin translation between HTTP and the node actor.

use std::{any::Any, collections::BTreeMap};

use axum::{
    extract::State,
    http::{StatusCode, Uri},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use arw_p2p::{governor::Hints, hierarchy::Hierarchy, node::Snapshot, time::now_ms};

use crate::{
    AppState,
    capsules::gate,
    dto::{
        self, ClusterView, CoreAccept, CoreHello, CoreOffer, HierarchyNode, HierarchyState,
        RoleRequest,
    },
    problem::{Json, Problem},
};

/// `GET /healthz`: never gated.
#[utoipa::path(get, path = "/healthz", tag = "node", responses((status = 200, body = dto::Ok)))]
pub async fn healthz() -> Json<dto::Ok> {
    Json(dto::Ok::YES)
}

/// `GET /state/cluster`.
#[utoipa::path(get, path = "/state/cluster", tag = "cluster", responses((status = 200, body = ClusterView)))]
pub async fn state_cluster(State(state): State<AppState>) -> Json<ClusterView> {
    Json(state.node.snapshot().cluster_view(now_ms()))
}

/// `GET /state/runtime_matrix` query.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MatrixQuery {
    /// Only this node.
    node_id: Option<String>,
}

/// `GET /state/runtime_matrix`: every node's runtimes (this node's live, the others' as last
/// advertised), by node id.
#[utoipa::path(get, path = "/state/runtime_matrix", tag = "jobs", params(MatrixQuery), responses((status = 200, body = arw_p2p::runtimes::RuntimeMatrix)))]
pub async fn runtime_matrix(
    State(state): State<AppState>,
    axum::extract::Query(query): axum::extract::Query<MatrixQuery>,
) -> Json<arw_p2p::runtimes::RuntimeMatrix> {
    Json(state.node.snapshot().runtime_matrix(now_ms(), query.node_id.as_deref()))
}

/// `GET /admin/hierarchy/state`: read-only, emits nothing.
#[utoipa::path(get, path = "/admin/hierarchy/state", tag = "hierarchy", responses((status = 200, body = HierarchyState)))]
pub async fn hierarchy_state(
    State(state): State<AppState>,
) -> Result<Json<HierarchyState>, Problem> {
    let snapshot = state.node.snapshot();
    gate(&snapshot, "hierarchy:state:get")?;
    Ok(Json(hierarchy_view(&snapshot)))
}

/// `POST /admin/hierarchy/role`.
#[utoipa::path(post, path = "/admin/hierarchy/role", tag = "hierarchy", request_body = RoleRequest, responses((status = 200, body = dto::Ok)))]
pub async fn hierarchy_role(
    State(state): State<AppState>,
    Json(body): Json<RoleRequest>,
) -> Result<Json<dto::Ok>, Problem> {
    gate(&state.node.snapshot(), "hierarchy:role:set")?;
    state.node.set_role(&body.role).await?;
    Ok(Json(dto::Ok::YES))
}

/// `POST /admin/hierarchy/hello`.
#[utoipa::path(post, path = "/admin/hierarchy/hello", tag = "hierarchy", request_body = CoreHello, responses((status = 200, body = dto::Ok)))]
pub async fn hierarchy_hello(
    State(state): State<AppState>,
    Json(body): Json<CoreHello>,
) -> Result<Json<dto::Ok>, Problem> {
    gate(&state.node.snapshot(), "hierarchy:hello")?;
    state.node.hello(body).await?;
    Ok(Json(dto::Ok::YES))
}

/// `POST /admin/hierarchy/offer`.
#[utoipa::path(post, path = "/admin/hierarchy/offer", tag = "hierarchy", request_body = CoreOffer, responses((status = 200, body = dto::Ok)))]
pub async fn hierarchy_offer(
    State(state): State<AppState>,
    Json(body): Json<CoreOffer>,
) -> Result<Json<dto::Ok>, Problem> {
    gate(&state.node.snapshot(), "hierarchy:offer")?;
    state.node.offer(body).await?;
    Ok(Json(dto::Ok::YES))
}

/// `POST /admin/hierarchy/accept`.
#[utoipa::path(post, path = "/admin/hierarchy/accept", tag = "hierarchy", request_body = CoreAccept, responses((status = 200, body = dto::Ok)))]
pub async fn hierarchy_accept(
    State(state): State<AppState>,
    Json(body): Json<CoreAccept>,
) -> Result<Json<dto::Ok>, Problem> {
    gate(&state.node.snapshot(), "hierarchy:accept")?;
    state.node.accept(body).await?;
    Ok(Json(dto::Ok::YES))
}

/// `POST /admin/cluster/admit` (at the Home).
#[utoipa::path(post, path = "/admin/cluster/admit", tag = "cluster", request_body = dto::AdmissionRequest, responses((status = 200, body = dto::AdmissionChange)))]
pub async fn cluster_admit(
    State(state): State<AppState>,
    Json(body): Json<dto::AdmissionRequest>,
) -> Result<Json<dto::AdmissionChange>, Problem> {
    Ok(Json(state.node.admit(&body.id, body.key).await?))
}

/// `POST /admin/cluster/revoke` (at the Home).
#[utoipa::path(post, path = "/admin/cluster/revoke", tag = "cluster", request_body = dto::AdmissionRequest, responses((status = 200, body = dto::AdmissionChange)))]
pub async fn cluster_revoke(
    State(state): State<AppState>,
    Json(body): Json<dto::AdmissionRequest>,
) -> Result<Json<dto::AdmissionChange>, Problem> {
    Ok(Json(state.node.revoke(&body.id).await?))
}

/// `POST /admin/cluster/trust-home`: obey the Home of a pending claim. Never denied by a
/// capsule: the admin token alone decides whom this node obeys.
#[utoipa::path(post, path = "/admin/cluster/trust-home", tag = "cluster", request_body = dto::TrustHomeRequest, responses((status = 200, body = dto::Ok)))]
pub async fn cluster_trust_home(
    State(state): State<AppState>,
    Json(body): Json<dto::TrustHomeRequest>,
) -> Result<Json<dto::Ok>, Problem> {
    state.node.trust_home(&body.fingerprint).await?;
    Ok(Json(dto::Ok::YES))
}

/// `POST /admin/cluster/untrust-home`: obey no Home (and drop what it handed out). Never denied
/// by a capsule.
#[utoipa::path(post, path = "/admin/cluster/untrust-home", tag = "cluster", responses((status = 200, body = dto::Ok)))]
pub async fn cluster_untrust_home(State(state): State<AppState>) -> Result<Json<dto::Ok>, Problem> {
    state.node.untrust_home().await?;
    Ok(Json(dto::Ok::YES))
}

/// `POST /admin/governor/profile` body.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
pub struct ProfileRequest {
    /// The profile name (1 to 1024 bytes).
    name: String,
}

/// `GET /admin/governor/profile`: the profile in effect (this node's, else the Home's).
#[utoipa::path(get, path = "/admin/governor/profile", tag = "governor", responses((status = 200, body = dto::ProfileView)))]
pub async fn governor_profile(State(state): State<AppState>) -> Json<dto::ProfileView> {
    Json(dto::ProfileView { profile: state.node.snapshot().effective_governor().profile })
}

/// `POST /admin/governor/profile`.
#[utoipa::path(post, path = "/admin/governor/profile", tag = "governor", request_body = ProfileRequest, responses((status = 200, body = dto::Ok)))]
pub async fn set_governor_profile(
    State(state): State<AppState>,
    Json(body): Json<ProfileRequest>,
) -> Result<Json<dto::Ok>, Problem> {
    let name = body.name.trim();
    if name.is_empty() || name.len() > arw_p2p::governor::MAX_TEXT {
        let detail = format!("name must be 1 to {} bytes", arw_p2p::governor::MAX_TEXT);
        return Err(Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", detail));
    }
    state.node.set_profile(name).await?;
    Ok(Json(dto::Ok::YES))
}

/// `GET /admin/governor/hints`: the hints in effect (the Home's, with this node's on top).
#[utoipa::path(get, path = "/admin/governor/hints", tag = "governor", responses((status = 200, body = Hints)))]
pub async fn governor_hints(State(state): State<AppState>) -> Json<Hints> {
    Json(state.node.snapshot().effective_governor().hints)
}

/// `POST /admin/governor/hints`: any subset of the hint fields, merged into this node's.
#[utoipa::path(post, path = "/admin/governor/hints", tag = "governor", request_body = Hints, responses((status = 200, body = dto::Ok)))]
pub async fn set_governor_hints(
    State(state): State<AppState>,
    Json(body): Json<Value>,
) -> Result<Json<dto::Ok>, Problem> {
    let hints = Hints::from_request(body)
        .map_err(|e| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", e))?;
    state.node.set_hints(hints).await?;
    Ok(Json(dto::Ok::YES))
}

/// `GET /admin/governor`: the profile and hints in effect, together (the runbook's route; the
/// reference has only `/profile` and `/hints`).
#[utoipa::path(get, path = "/admin/governor", tag = "governor", responses((status = 200, body = dto::GovernorView)))]
pub async fn governor(State(state): State<AppState>) -> Json<dto::GovernorView> {
    let governor = state.node.snapshot().effective_governor();
    Json(dto::GovernorView { profile: governor.profile, hints: governor.hints })
}

/// `POST /admin/governor {profile?, hints?}`: both checked before either is applied.
#[utoipa::path(post, path = "/admin/governor", tag = "governor", request_body = dto::GovernorRequest, responses((status = 200, body = dto::Ok)))]
pub async fn set_governor(
    State(state): State<AppState>,
    Json(body): Json<Value>,
) -> Result<Json<dto::Ok>, Problem> {
    let invalid =
        |detail: String| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", detail);
    let Value::Object(mut body) = body else {
        return Err(invalid("a JSON object {profile?, hints?}".into()));
    };
    if let Some(key) = body.keys().find(|k| *k != "profile" && *k != "hints") {
        return Err(invalid(format!("unknown field {key:?}: expected profile, hints")));
    }
    let profile = match body.remove("profile") {
        None => None,
        Some(Value::String(name)) => {
            let name = name.trim().to_owned();
            if name.is_empty() || name.len() > arw_p2p::governor::MAX_TEXT {
                let max = arw_p2p::governor::MAX_TEXT;
                return Err(invalid(format!("profile must be 1 to {max} bytes")));
            }
            Some(name)
        }
        Some(_) => return Err(invalid("profile must be a string".into())),
    };
    let hints = body.remove("hints").map(Hints::from_request).transpose().map_err(invalid)?;
    if profile.is_none() && hints.is_none() {
        return Err(invalid("nothing to set: give profile, hints or both".into()));
    }
    if let Some(name) = profile {
        state.node.set_profile(&name).await?;
    }
    if let Some(hints) = hints {
        state.node.set_hints(hints).await?;
    }
    Ok(Json(dto::Ok::YES))
}

/// Any path that does not exist.
pub async fn not_found(uri: Uri) -> Problem {
    Problem::not_found().with("path", json!(uri.path()))
}

/// A path that exists, with the wrong method.
pub async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this path",
    )
}

/// A handler panicked: answer 500 problem+json instead of dropping the connection.
pub fn panic_response(_: Box<dyn Any + Send + 'static>) -> Response {
    tracing::error!("request handler panicked");
    Problem::internal("internal error").into_response()
}

fn hierarchy_view(snap: &Snapshot) -> HierarchyState {
    let h: &Hierarchy = &snap.hierarchy;
    let self_node = HierarchyNode {
        id: snap.id.to_string(),
        role: h.role.as_str().to_owned(),
        tags: h.tags.clone(),
        parent: h.parent.clone(),
        children: h.children.iter().cloned().collect(),
        capabilities: Some(h.capabilities.clone()),
        hello_epoch: h.hello_epoch,
        health: None,
    };
    let mut peers: BTreeMap<String, HierarchyNode> = h
        .peers
        .values()
        .map(|p| {
            let node = HierarchyNode {
                id: p.id.clone(),
                role: p.role.as_str().to_owned(),
                tags: p.tags.clone(),
                parent: p.parent.clone(),
                children: p.children.clone(),
                capabilities: None,
                hello_epoch: None,
                health: None,
            };
            (p.id.clone(), node)
        })
        .collect();
    let now = now_ms();
    for record in snap.nodes.values().filter(|r| !r.local) {
        let a = &record.advert;
        let entry = peers.entry(a.id.to_string()).or_insert_with(|| HierarchyNode {
            id: a.id.to_string(),
            role: a.role.as_str().to_owned(),
            tags: Vec::new(),
            parent: None,
            children: Vec::new(),
            capabilities: None,
            hello_epoch: None,
            health: None,
        });
        // The node's own advert is the authority on its role and tags.
        entry.role = a.role.as_str().to_owned();
        entry.tags = a.tags.clone();
        entry.health = Some(record.health_at(now, snap.ttl_ms).as_str().to_owned());
    }
    HierarchyState {
        epoch: h.epoch,
        self_node,
        peers,
        network: Some(snap.network.clone()),
        home_conflict: snap.home_claims.clone(),
        home: Some(snap.policy.clone()),
        liveness: Some(dto::Liveness { slowdown: snap.slowdown, counters: snap.counters }),
    }
}
