//! The live cluster page (`/ui`): one HTML page and its script, embedded in the binary (no
//! build step, nothing fetched from elsewhere). The page holds no data of its own: it asks the
//! admin API with the token the operator types in, so it is served without one.

use axum::{
    http::header,
    response::{Html, IntoResponse, Redirect, Response},
};

const PAGE: &str = include_str!("../ui/index.html");
const SCRIPT: &str = include_str!("../ui/app.js");

/// Only this origin's own files; no inline script, no framing.
const CSP: &str = "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'";

/// `GET /ui`.
#[utoipa::path(get, path = "/ui", tag = "ui", responses((status = 200, content_type = "text/html", description = "The live cluster page")))]
pub async fn page() -> Response {
    ([(header::CONTENT_SECURITY_POLICY, CSP), (header::CACHE_CONTROL, "no-cache")], Html(PAGE))
        .into_response()
}

/// `GET /ui/app.js`.
#[utoipa::path(get, path = "/ui/app.js", tag = "ui", responses((status = 200, content_type = "text/javascript", description = "The page's script")))]
pub async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        SCRIPT,
    )
        .into_response()
}

/// `GET /`: the page.
#[utoipa::path(get, path = "/", tag = "ui", responses((status = 303, description = "To `/ui`")))]
pub async fn root() -> Redirect {
    Redirect::to("/ui")
}
