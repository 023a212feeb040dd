//! The HTTP client behind every `arw-cli` command: base URL, admin token (sent both as
//! `Authorization: Bearer` and `X-ARW-Admin`), timeout, and the reference's error messages.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// Three missed keep-alives (sent every 10 s by default).
pub const STREAM_READ_TIMEOUT: Duration = Duration::from_secs(35);

/// A failed command; the message is what the user sees.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CliError(pub String);

/// Talks to one server.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// A client for `base` (e.g. `http://127.0.0.1:8091`).
    pub fn new(base: &str, token: Option<String>, timeout: Duration) -> Result<Self, CliError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| CliError(format!("cannot create HTTP client: {e}")))?;
        Ok(Self { base: base.trim_end_matches('/').to_owned(), token, http })
    }

    /// A client for long-lived streams: `timeout` bounds connecting; a read that waits longer
    /// than [`STREAM_READ_TIMEOUT`] means the connection is dead.
    pub fn streaming(
        base: &str,
        token: Option<String>,
        timeout: Duration,
    ) -> Result<Self, CliError> {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .read_timeout(STREAM_READ_TIMEOUT)
            .build()
            .map_err(|e| CliError(format!("cannot create HTTP client: {e}")))?;
        Ok(Self { base: base.trim_end_matches('/').to_owned(), token, http })
    }

    /// The URL for `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET `path`, decoding the body as `T` (the API's own view types).
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        self.send::<(), T>(Method::GET, path, None).await
    }

    /// POST `body` to `path`, decoding the answer as `T`.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, CliError> {
        self.send(Method::POST, path, Some(body)).await
    }

    /// A request builder with the auth headers set (for streaming commands).
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut request = self.http.request(method, self.url(path));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token).header("X-ARW-Admin", token);
        }
        request
    }

    async fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, CliError> {
        let url = self.url(path);
        let mut request = self.request(method, path);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| unreachable(&url, &e))?;
        let status = response.status();
        let text =
            response.text().await.map_err(|e| CliError(format!("request to {url} failed: {e}")))?;
        check_status(&url, status, &text)?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| CliError(format!("request to {url} returned invalid JSON: {e}")))?;
        serde_json::from_value(json).map_err(|e| {
            CliError(format!(
                "request to {url} returned a body this arw-cli does not understand: {e}"
            ))
        })
    }
}

/// Maps a non-2xx status to the reference's messages.
pub fn check_status(url: &str, status: StatusCode, body: &str) -> Result<(), CliError> {
    if status == StatusCode::UNAUTHORIZED {
        return Err(CliError(format!(
            "request to {url} returned 401 Unauthorized; supply an admin token via --admin-token or ARW_ADMIN_TOKEN"
        )));
    }
    if !status.is_success() {
        return Err(CliError(format!("request to {url} failed ({status}): {}", body.trim())));
    }
    Ok(())
}

/// A request that never got an answer, with what to check. reqwest's own message ("error
/// sending request for url") hides the cause in its source chain.
pub fn unreachable(url: &str, e: &reqwest::Error) -> CliError {
    let mut cause = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        cause = inner.to_string();
        source = inner.source();
    }
    let hint = if e.is_connect() {
        "is arw-server running there? Its address is in endpoints.json in its state directory \
         (a crashed node leaves a stale one); --base or ARW_BASE selects the node"
    } else if e.is_timeout() {
        "the node did not answer in time; is it overloaded or stopped (SIGSTOP)?"
    } else {
        "check --base or ARW_BASE"
    };
    CliError(format!("cannot reach {url}: {cause}; {hint}"))
}
