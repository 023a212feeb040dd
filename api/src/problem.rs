//! `application/problem+json` errors with a stable `code`, and the JSON body extractor that turns
//! every axum rejection into one.

use axum::{
    extract::{
        FromRequest, Request,
        rejection::{BytesRejection, JsonRejection},
    },
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::{Serialize, de::DeserializeOwned};

use arw_p2p::{hierarchy::HierarchyError, jobs::SubmitError, node::NodeError, policy::TrustError};

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An RFC 9457 problem. Absent members are omitted, never `null`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// Always `about:blank`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Short human summary (the status's reason phrase unless stated).
    pub title: &'static str,
    /// HTTP status.
    pub status: u16,
    /// What went wrong, for a human.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Stable machine-readable code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Extra members (e.g. `valid_roles`).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub extra: Option<Box<serde_json::Map<String, serde_json::Value>>>,
    /// Seconds to wait before retrying (sent as `Retry-After`, not in the body).
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

impl Problem {
    /// A problem with the status's reason phrase as title.
    pub fn new(status: StatusCode, code: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: "about:blank",
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail: Some(detail.into()),
            code: Some(code.into()),
            extra: None,
            retry_after: None,
        }
    }

    /// Replaces the title.
    pub fn with_title(mut self, title: &'static str) -> Self {
        self.title = title;
        self
    }

    /// Adds an extra member.
    pub fn with(mut self, key: &str, value: serde_json::Value) -> Self {
        self.extra.get_or_insert_default().insert(key.into(), value);
        self
    }

    /// The 401 every protected route answers.
    pub fn unauthorized() -> Self {
        Self {
            kind: "about:blank",
            title: "Unauthorized",
            status: 401,
            detail: None,
            code: Some("unauthorized".into()),
            extra: None,
            retry_after: None,
        }
    }

    /// 404 for paths that do not exist.
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
    }

    /// 500 without leaking internals.
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", detail)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<JsonRejection> for Problem {
    fn from(rejection: JsonRejection) -> Self {
        let detail = rejection.body_text();
        match rejection {
            JsonRejection::JsonDataError(_) => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", detail)
            }
            JsonRejection::JsonSyntaxError(_) => {
                Problem::new(StatusCode::BAD_REQUEST, "invalid_json", detail)
            }
            JsonRejection::MissingJsonContentType(_) => Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected Content-Type: application/json",
            ),
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => too_large(),
            other => Problem::new(other.status(), "invalid_body", detail),
        }
    }
}

impl From<BytesRejection> for Problem {
    fn from(rejection: BytesRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return too_large();
        }
        Problem::new(rejection.status(), "invalid_body", rejection.body_text())
    }
}

fn too_large() -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("request body exceeds the {} byte limit", crate::BODY_LIMIT),
    )
}

impl From<HierarchyError> for Problem {
    fn from(e: HierarchyError) -> Self {
        let detail = e.to_string();
        match e {
            HierarchyError::UnknownRole(_) => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "unknown_role", detail)
                    .with("valid_roles", serde_json::json!(arw_p2p::role::CANONICAL))
                    .with("aliases", serde_json::json!({"home": "root", "worker": "edge"}))
            }
            HierarchyError::InvalidNodeId(_) => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_node_id", detail)
            }
            HierarchyError::BlankNonce => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_nonce", detail)
            }
            HierarchyError::NodeIdMismatch { .. } => {
                Problem::new(StatusCode::CONFLICT, "node_id_mismatch", detail)
            }
            HierarchyError::StaleEpoch { .. } => {
                Problem::new(StatusCode::CONFLICT, "stale_epoch", detail)
            }
            HierarchyError::NonceReplay { .. } => {
                Problem::new(StatusCode::CONFLICT, "nonce_replay", detail)
            }
        }
    }
}

impl From<SubmitError> for Problem {
    fn from(e: SubmitError) -> Self {
        let detail = e.to_string();
        match e {
            SubmitError::Invalid(_) => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_job", detail)
            }
            SubmitError::QueueFull { limit, queued } => {
                Problem::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", detail)
                    .with("limit", serde_json::json!(limit))
                    .with("queued", serde_json::json!(queued))
            }
            SubmitError::IdempotencyConflict(key) => {
                Problem::new(StatusCode::CONFLICT, "idempotency_conflict", detail)
                    .with("idem_key", serde_json::json!(key))
            }
            SubmitError::NotFound(_) => Problem::new(StatusCode::NOT_FOUND, "not_found", detail),
            SubmitError::Ended(_) => Problem::new(StatusCode::CONFLICT, "job_ended", detail),
        }
    }
}

impl From<NodeError> for Problem {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::Rejected(h) => h.into(),
            NodeError::Persist(detail) => {
                tracing::error!(%detail, "state could not be persisted");
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "persist_failed", detail)
            }
            NodeError::Stopped => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the node is shutting down",
            ),
            NodeError::NotHome => Problem::new(StatusCode::CONFLICT, "not_home", e.to_string()),
            NodeError::UnknownNode(detail) => {
                Problem::new(StatusCode::NOT_FOUND, "unknown_node", detail)
            }
            NodeError::InvalidKey => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_key", e.to_string())
            }
            NodeError::Capsule(arw_p2p::capsule::CapsuleError::Invalid(detail)) => {
                Problem::new(StatusCode::BAD_REQUEST, "invalid_capsule", detail)
            }
            NodeError::Capsule(arw_p2p::capsule::CapsuleError::Verification(detail)) => {
                Problem::new(StatusCode::FORBIDDEN, "capsule_verification_failed", detail)
            }
            NodeError::CapsuleLimit(_) => {
                Problem::new(StatusCode::CONFLICT, "capsule_limit", e.to_string())
            }
            NodeError::CapsuleTornDown => {
                Problem::new(StatusCode::FORBIDDEN, "capsule_torn_down", e.to_string())
            }
            NodeError::HomeTrust(TrustError::NoSuchClaim(_)) => {
                Problem::new(StatusCode::NOT_FOUND, "no_such_claim", e.to_string())
            }
            NodeError::HomeTrust(TrustError::Configured) => {
                Problem::new(StatusCode::CONFLICT, "home_key_configured", e.to_string())
            }
            NodeError::HomeTrust(TrustError::OwnHome) => {
                Problem::new(StatusCode::CONFLICT, "own_home", e.to_string())
            }
            NodeError::AdvertTooLarge { .. } => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "advert_too_large", e.to_string())
            }
            NodeError::PolicyTooLarge => {
                Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "policy_too_large", e.to_string())
            }
            NodeError::Trust(detail) => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_trust_store", detail)
            }
            NodeError::Job(job) => job.into(),
        }
    }
}

/// `Json<T>` whose rejections are problem+json.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let axum::Json(value) = axum::Json::<T>::from_request(req, state).await?;
        Ok(Json(value))
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}
