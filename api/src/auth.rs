//! Admin authentication (reference §1.1), checked by a middleware before any body is read.
//!
//! Tokens are compared as SHA-256 digests with a constant-time equality, so neither the token's
//! content nor its length leaks through timing. Failed attempts are counted per client address;
//! once a client exceeds the limit it gets 429 with `Retry-After` for the rest of the window,
//! whatever token it sends, so guessing cannot continue at full speed.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::{
    extract::{ConnectInfo, Request, State},
    http::{HeaderMap, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{AppState, problem::Problem};

/// How the admin token is configured. `Debug` never shows secrets.
#[derive(Clone, Default)]
pub struct AuthConfig {
    /// `ARW_ADMIN_TOKEN`.
    pub token: Option<String>,
    /// `ARW_ADMIN_TOKEN_SHA256`: lower-case hex SHA-256 of the token.
    pub token_sha256: Option<String>,
    /// `ARW_DEBUG`: admin without a token, for loopback peers only.
    pub debug_loopback: bool,
    /// Failed attempts allowed per client and window (`ARW_ADMIN_RATE_LIMIT`, 0 = off).
    pub rate_limit: u32,
    /// `ARW_ADMIN_RATE_WINDOW_SECS`.
    pub rate_window: Duration,
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_sha256", &self.token_sha256.as_ref().map(|_| "<redacted>"))
            .field("debug_loopback", &self.debug_loopback)
            .field("rate_limit", &self.rate_limit)
            .field("rate_window", &self.rate_window)
            .finish()
    }
}

/// The admin gate: configured digests plus the failure limiter.
pub struct AdminAuth {
    digests: Vec<[u8; 32]>,
    debug_loopback: bool,
    limiter: FailureLimiter,
}

impl fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminAuth")
            .field("configured", &!self.digests.is_empty())
            .field("debug_loopback", &self.debug_loopback)
            .finish()
    }
}

/// Why an admin request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No or wrong token.
    Unauthorized,
    /// Too many failures from this client; retry after the given seconds.
    RateLimited(u64),
}

impl AdminAuth {
    /// Builds the gate. An `ARW_ADMIN_TOKEN_SHA256` that is not 64 hex digits is an error.
    pub fn new(config: &AuthConfig) -> Result<Self, String> {
        let mut digests = Vec::new();
        if let Some(token) = config.token.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
            digests.push(sha256(token));
        }
        if let Some(hex_digest) = config.token_sha256.as_deref().map(str::trim) {
            let bytes = hex::decode(hex_digest.to_ascii_lowercase())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or("ARW_ADMIN_TOKEN_SHA256 must be 64 hexadecimal digits")?;
            digests.push(bytes);
        }
        Ok(Self {
            digests,
            debug_loopback: config.debug_loopback,
            limiter: FailureLimiter::new(config.rate_limit, config.rate_window),
        })
    }

    /// Whether any token is configured.
    pub fn has_token(&self) -> bool {
        !self.digests.is_empty()
    }

    /// Decides a request from its headers and peer address.
    pub fn check(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> Result<(), Denied> {
        let ip = peer.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.ip());
        if let Some(retry) = self.limiter.blocked(ip) {
            return Err(Denied::RateLimited(retry));
        }
        if self.debug_loopback && peer.is_some_and(|p| p.ip().is_loopback()) {
            return Ok(());
        }
        if let Some(token) = presented_token(headers) {
            let given = sha256(token);
            let mut ok = subtle::Choice::from(0);
            for digest in &self.digests {
                ok |= given.ct_eq(digest);
            }
            if bool::from(ok) {
                return Ok(());
            }
        }
        match self.limiter.fail(ip) {
            Some(retry) => Err(Denied::RateLimited(retry)),
            None => Err(Denied::Unauthorized),
        }
    }
}

/// `Authorization: Bearer <t>` (trimmed, non-empty), else `X-ARW-Admin: <t>`.
fn presented_token(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    bearer.or_else(|| {
        headers
            .get("x-arw-admin")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|t| !t.is_empty())
    })
}

fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Whether a path needs the admin token: `/admin/**`, `/state/**` and the event stream.
pub fn is_protected(path: &str) -> bool {
    let under = |prefix: &str| {
        path == prefix || path.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'))
    };
    // `POST /actions` is gated by policy, as in the reference; a job's details are not public.
    under("/admin") || under("/state") || under("/events") || path.starts_with("/actions/")
}

/// Middleware: protected paths pass only with a valid token. Runs before routing and body
/// extraction, so an unauthenticated request is 401 whatever its body or path.
pub async fn require_admin(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if !is_protected(request.uri().path()) {
        return next.run(request).await;
    }
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    match state.auth.check(request.headers(), peer) {
        Ok(()) => next.run(request).await,
        Err(Denied::Unauthorized) => Problem::unauthorized().into_response(),
        Err(Denied::RateLimited(retry)) => {
            let mut problem = Problem::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many failed admin authentications from this address",
            );
            problem.retry_after = Some(retry);
            problem.into_response()
        }
    }
}

/// Fixed-window counter of failed authentications per client address.
///
/// governor's GCRA limiter cannot tell whether a key is exhausted without spending a cell, and a
/// blocked client must be refused before its token is checked; this is the small piece it lacks.
pub(crate) struct FailureLimiter {
    limit: u32,
    window: Duration,
    windows: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// Addresses tracked before expired windows are swept.
const MAX_TRACKED: usize = 10_000;

impl FailureLimiter {
    pub(crate) fn new(limit: u32, window: Duration) -> Self {
        Self { limit, window: window.max(Duration::from_secs(1)), windows: Mutex::default() }
    }

    /// Seconds until `ip` may try again, if it is blocked now.
    pub(crate) fn blocked(&self, ip: IpAddr) -> Option<u64> {
        if self.limit == 0 {
            return None;
        }
        let windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let (start, count) = *windows.get(&ip)?;
        self.retry_after(start, count)
    }

    /// Counts a failure; returns the wait if `ip` is now over the limit.
    pub(crate) fn fail(&self, ip: IpAddr) -> Option<u64> {
        if self.limit == 0 {
            return None;
        }
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() >= MAX_TRACKED {
            windows.retain(|_, (start, _)| now.duration_since(*start) < self.window);
        }
        let entry = windows.entry(ip).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 += 1;
        let (start, count) = *entry;
        self.retry_after(start, count)
    }

    fn retry_after(&self, start: Instant, count: u32) -> Option<u64> {
        let left = self.window.checked_sub(start.elapsed())?;
        (count > self.limit).then(|| left.as_secs() + u64::from(left.subsec_nanos() > 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(token: &str, limit: u32) -> AdminAuth {
        AdminAuth::new(&AuthConfig {
            token: Some(token.into()),
            rate_limit: limit,
            rate_window: Duration::from_secs(60),
            ..AuthConfig::default()
        })
        .expect("auth")
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        h
    }

    #[test]
    fn bearer_or_legacy_header() {
        let a = auth("s3cret", 0);
        assert_eq!(a.check(&headers(&[("authorization", "Bearer s3cret")]), None), Ok(()));
        assert_eq!(a.check(&headers(&[("x-arw-admin", " s3cret ")]), None), Ok(()));
        assert_eq!(
            a.check(&headers(&[("authorization", "Bearer nope")]), None),
            Err(Denied::Unauthorized)
        );
        assert_eq!(a.check(&HeaderMap::new(), None), Err(Denied::Unauthorized));
    }

    #[test]
    fn sha256_variant() {
        let digest = hex::encode(sha256("tok"));
        let a = AdminAuth::new(&AuthConfig {
            token_sha256: Some(digest.to_uppercase()),
            ..AuthConfig::default()
        })
        .expect("auth");
        assert_eq!(a.check(&headers(&[("authorization", "Bearer tok")]), None), Ok(()));
        assert!(
            AdminAuth::new(&AuthConfig { token_sha256: Some("zz".into()), ..Default::default() })
                .is_err()
        );
    }

    #[test]
    fn failures_block_the_client_even_with_the_right_token() {
        let a = auth("s3cret", 2);
        let peer: SocketAddr = "192.0.2.1:5000".parse().expect("addr");
        let other: SocketAddr = "192.0.2.2:5000".parse().expect("addr");
        let bad = headers(&[("authorization", "Bearer nope")]);
        let good = headers(&[("authorization", "Bearer s3cret")]);
        assert_eq!(a.check(&bad, Some(peer)), Err(Denied::Unauthorized));
        assert_eq!(a.check(&bad, Some(peer)), Err(Denied::Unauthorized));
        assert!(
            matches!(a.check(&bad, Some(peer)), Err(Denied::RateLimited(s)) if (1..=60).contains(&s))
        );
        assert!(matches!(a.check(&good, Some(peer)), Err(Denied::RateLimited(_))));
        assert_eq!(a.check(&good, Some(other)), Ok(()));
    }

    #[test]
    fn debug_bypass_needs_a_known_loopback_peer() {
        let a = AdminAuth::new(&AuthConfig { debug_loopback: true, ..Default::default() })
            .expect("auth");
        let lo: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let remote: SocketAddr = "192.0.2.1:1".parse().expect("addr");
        assert_eq!(a.check(&HeaderMap::new(), Some(lo)), Ok(()));
        assert_eq!(a.check(&HeaderMap::new(), Some(remote)), Err(Denied::Unauthorized));
        assert_eq!(a.check(&HeaderMap::new(), None), Err(Denied::Unauthorized));
    }

    #[test]
    fn protected_paths() {
        for p in ["/admin", "/admin/hierarchy/role", "/state/cluster", "/events", "/admin/nope"] {
            assert!(is_protected(p), "{p}");
        }
        for p in ["/healthz", "/metrics", "/administrator", "/eventsx"] {
            assert!(!is_protected(p), "{p}");
        }
    }
}
