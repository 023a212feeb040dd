//! Correlation headers (as the reference server): a request's `X-Request-Id` and `X-ARW-Corr`
//! are echoed on its response; a request without them gets new ones. `x-arw-corr-source` says
//! where the correlation id came from: `x-arw-corr`, `x-request-id` or `generated`.

use axum::{
    extract::Request,
    http::{HeaderMap, HeaderValue},
    middleware::Next,
    response::Response,
};

/// The longest id echoed; a longer (or non-printable) one is replaced.
const MAX_ID: usize = 128;

/// Sets `x-request-id`, `x-arw-corr` and `x-arw-corr-source` on every response.
pub async fn correlate(request: Request, next: Next) -> Response {
    let request_id = usable(request.headers(), "x-request-id");
    let (corr, source) = match (usable(request.headers(), "x-arw-corr"), &request_id) {
        (Some(corr), _) => (corr, "x-arw-corr"),
        (None, Some(id)) => (id.clone(), "x-request-id"),
        (None, None) => (new_id(), "generated"),
    };
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    match request_id {
        Some(id) => {
            headers.insert("x-request-id", id);
        }
        // A handler's own id (an SSE stream's) stands when the client sent none; otherwise
        // the new correlation id is the request's id too.
        None if !headers.contains_key("x-request-id") => {
            headers.insert("x-request-id", corr.clone());
        }
        None => {}
    }
    headers.insert("x-arw-corr", corr);
    headers.insert("x-arw-corr-source", HeaderValue::from_static(source));
    response
}

fn usable(headers: &HeaderMap, name: &str) -> Option<HeaderValue> {
    let value = headers.get(name)?;
    let ok = !value.is_empty()
        && value.len() <= MAX_ID
        && value.as_bytes().iter().all(|b| b.is_ascii_graphic());
    ok.then(|| value.clone())
}

fn new_id() -> HeaderValue {
    // A UUID is ASCII: it is always a valid header value.
    HeaderValue::from_str(&uuid::Uuid::now_v7().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}
