//! Events as clients see them: kinds, the journal interface the server implements, and the
//! `GET /events` SSE stream, `GET /admin/events/journal` and `POST /admin/events/test` handlers.

use std::{collections::VecDeque, convert::Infallible, sync::Arc, time::Duration};

use axum::{
    body::Bytes,
    extract::{Query, State, rejection::BytesRejection},
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{
        IntoResponse, Response,
        sse::{Event as SseEvent, KeepAlive, Sse},
    },
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::broadcast::{self, error::RecvError};

use crate::{
    AppState,
    dto::Envelope,
    problem::{Json, Problem},
};

/// Rows read from the journal per query when replaying.
pub const REPLAY_PAGE: usize = 1000;

/// A journaled event: its row id (the SSE id) and envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StoredEvent {
    /// Journal row id; unique and increasing across restarts.
    pub id: i64,
    /// The envelope.
    #[serde(flatten)]
    pub envelope: Envelope,
}

/// `GET /admin/events/journal` and `GET /admin/policy/capsules/audit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JournalPage {
    /// Rows asked for (after clamping).
    pub limit: usize,
    /// Rows matching the prefixes in the whole journal.
    pub total_matched: u64,
    /// More rows match than are returned.
    pub truncated: bool,
    /// Always 0 (kept for compatibility).
    pub skipped_lines: u64,
    /// Always `["sqlite:events"]`.
    pub source_files: Vec<String>,
    /// The rows, oldest first.
    pub entries: Vec<StoredEvent>,
    /// The kind prefixes applied, when any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefixes: Option<Vec<String>>,
}

/// A journaled event on its way to live subscribers, its SSE `data` serialised once for all.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveEvent {
    /// The stored event.
    pub event: StoredEvent,
    /// `serde_json` of its envelope.
    pub data: String,
}

impl LiveEvent {
    /// Serialises the envelope once.
    pub fn new(event: StoredEvent) -> Self {
        let data = serde_json::to_string(&event.envelope).unwrap_or_default();
        Self { event, data }
    }
}

/// The durable event journal, as the HTTP layer needs it. Reads block (SQLite) and are called
/// from `spawn_blocking`.
pub trait EventLog: Send + Sync + std::fmt::Debug + 'static {
    /// Live events, each delivered only after it is journaled.
    fn subscribe(&self) -> broadcast::Receiver<Arc<LiveEvent>>;
    /// Up to `limit` rows with `id > after` whose kind starts with one of `prefixes` (all when
    /// empty), oldest first.
    fn read_after(
        &self,
        after: i64,
        limit: usize,
        prefixes: &[String],
    ) -> Result<Vec<StoredEvent>, String>;
    /// The last `limit` matching rows, oldest first, and how many rows match in all.
    fn read_last(
        &self,
        limit: usize,
        prefixes: &[String],
    ) -> Result<(Vec<StoredEvent>, u64), String>;
    /// Oldest retained and newest row ids (0 when empty).
    fn bounds(&self) -> (i64, i64);
}

/// Normalises an event kind: each dot segment is split at CamelCase and acronym boundaries and
/// lower-cased; empty segments are dropped (`Service.Start` → `service.start`, `WorldDiff` →
/// `world.diff`, `HTTPServer` → `http.server`).
pub fn normalize_kind(kind: &str) -> String {
    let mut words: Vec<String> = Vec::new();
    for segment in kind.split('.') {
        let chars: Vec<char> = segment.chars().collect();
        let mut word = String::new();
        for (i, &c) in chars.iter().enumerate() {
            let prev = i.checked_sub(1).map(|j| chars[j]);
            let next = chars.get(i + 1).copied();
            let boundary = c.is_uppercase()
                && prev.is_some_and(|p| {
                    p.is_lowercase()
                        || p.is_ascii_digit()
                        || (p.is_uppercase() && next.is_some_and(char::is_lowercase))
                });
            if boundary && !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
            word.extend(c.to_lowercase());
        }
        if !word.is_empty() {
            words.push(word);
        }
    }
    words.join(".")
}

/// Splits a `prefix=` CSV: entries trimmed, empty ones dropped.
pub fn parse_prefixes(csv: Option<&str>) -> Vec<String> {
    csv.map(|s| s.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Most kind prefixes one request may filter on.
pub const MAX_PREFIXES: usize = 64;
/// Longest kind prefix.
const MAX_PREFIX_LEN: usize = 128;

/// A request's `prefix` parameter: [`parse_prefixes`], refused (400) beyond [`MAX_PREFIXES`]
/// entries or [`MAX_PREFIX_LEN`] bytes each.
pub fn query_prefixes(csv: Option<&str>) -> Result<Vec<String>, Problem> {
    let prefixes = parse_prefixes(csv);
    if prefixes.len() > MAX_PREFIXES {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "too_many_prefixes",
            format!("at most {MAX_PREFIXES} prefixes, got {}", prefixes.len()),
        ));
    }
    if let Some(long) = prefixes.iter().find(|p| p.len() > MAX_PREFIX_LEN) {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_prefix",
            format!("a prefix is at most {MAX_PREFIX_LEN} bytes, got {}", long.len()),
        ));
    }
    Ok(prefixes)
}

/// Whether `kind` starts with one of `prefixes` (all kinds match an empty list).
pub fn kind_matches(kind: &str, prefixes: &[String]) -> bool {
    prefixes.is_empty() || prefixes.iter().any(|p| kind.starts_with(p.as_str()))
}

/// `GET /events` query.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Kind prefixes, comma-separated (at most 64).
    prefix: Option<String>,
    /// Replay the last N journaled events before live ones.
    replay: Option<String>,
    /// Replay the events after this id (as `Last-Event-ID` does).
    after: Option<String>,
}

enum Replay {
    After(i64),
    Recent(usize),
    Live,
}

fn cursor(value: &str, source: &str) -> Result<i64, Problem> {
    value.trim().parse::<i64>().map_err(|_| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_cursor",
            format!("{source} must be an event id (an integer), got {value:?}"),
        )
    })
}

/// `GET /events`: the SSE stream (reference §2.3).
#[utoipa::path(get, path = "/events", tag = "events", params(EventsQuery), responses((status = 200, content_type = "text/event-stream", description = "Server-sent events; the first is `service.connected` (a `Handshake`), each `data` an `Envelope`; resume with `Last-Event-ID`")))]
pub async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<EventsQuery>,
) -> Result<Response, Problem> {
    let prefixes = query_prefixes(query.prefix.as_deref())?;
    let last_event_id = headers.get("last-event-id").map(|v| v.to_str().unwrap_or("\u{fffd}"));
    let replay = match (&query.after, last_event_id) {
        (Some(after), _) => Replay::After(cursor(after, "after")?),
        (None, Some(id)) => Replay::After(cursor(id, "Last-Event-ID")?),
        (None, None) => match &query.replay {
            Some(n) => Replay::Recent(n.trim().parse::<usize>().map_err(|_| {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_replay",
                    format!("replay must be a count, got {n:?}"),
                )
            })?),
            None => Replay::Live,
        },
    };

    // Subscribe before reading the journal: every event is then either in the replay or in the
    // live queue (or both, and the id check drops the copy).
    let live = state.log.subscribe();
    let log = state.log.clone();
    let read_prefixes = prefixes.clone();
    let (mode, resume_from, first_page) = match replay {
        Replay::After(after) => {
            let page = blocking(move || log.read_after(after, REPLAY_PAGE, &read_prefixes)).await?;
            ("after", Some(after), page)
        }
        Replay::Recent(n) => {
            let n = n.min(REPLAY_PAGE);
            let (page, _) = blocking(move || log.read_last(n, &read_prefixes)).await?;
            ("recent", None, page)
        }
        Replay::Live => ("live", None, Vec::new()),
    };
    let (oldest, newest) = state.log.bounds();
    let request_id = uuid::Uuid::now_v7().to_string();
    let handshake = crate::dto::Handshake {
        request_id: request_id.clone(),
        resume_from: resume_from.map(|c| c.to_string()),
        replay: crate::dto::Replay { mode: mode.to_owned(), count: first_page.len() },
        prefixes: (!prefixes.is_empty()).then(|| prefixes.clone()),
        kernel_replay: true,
        oldest_id: oldest,
        last_id: newest,
        // Rows between the cursor and the oldest retained row were pruned.
        truncated: resume_from.is_some_and(|c| oldest > 0 && c + 1 < oldest),
    };
    let handshake = serde_json::to_value(handshake).unwrap_or_default();
    let origin = state.node.snapshot().id.to_string();
    let handshake = SseEvent::default().event("service.connected").id("0").data(envelope_json(
        "service.connected",
        handshake,
        &origin,
    ));

    state.metrics.sse_connection(mode);
    let paging = matches!(mode, "after") && first_page.len() == REPLAY_PAGE;
    let cursor = replay_cursor(resume_from, &first_page).unwrap_or(0);
    let conn = Connection {
        state: state.clone(),
        live,
        prefixes,
        queue: first_page.into(),
        cursor,
        paging,
        handshake: Some(handshake),
        done: false,
        _client: ClientGuard::new(&state),
    };
    let stream = futures::stream::unfold(conn, |mut conn| async move {
        conn.next().await.map(|event| (Ok::<_, Infallible>(event), conn))
    });
    let keep_alive = KeepAlive::new().interval(state.sse.keepalive).text("keep-alive");
    let mut response = Sse::new(stream).keep_alive(keep_alive).into_response();
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    Ok(response)
}

fn replay_cursor(resume_from: Option<i64>, page: &[StoredEvent]) -> Option<i64> {
    page.last().map(|e| e.id).or(resume_from)
}

/// SSE settings.
#[derive(Debug, Clone, Copy)]
pub struct SseConfig {
    /// Comment sent after this long without an event.
    pub keepalive: Duration,
}

impl Default for SseConfig {
    fn default() -> Self {
        Self { keepalive: Duration::from_secs(10) }
    }
}

/// One client's stream: handshake, then replay (paged from the journal), then live events.
struct Connection {
    state: AppState,
    live: broadcast::Receiver<Arc<LiveEvent>>,
    prefixes: Vec<String>,
    queue: VecDeque<StoredEvent>,
    /// Highest id sent; live events at or below it were already replayed.
    cursor: i64,
    /// The last replay page was full: read more before going live.
    paging: bool,
    handshake: Option<SseEvent>,
    done: bool,
    _client: ClientGuard,
}

impl Connection {
    async fn next(&mut self) -> Option<SseEvent> {
        if self.done {
            return None;
        }
        if let Some(handshake) = self.handshake.take() {
            return Some(handshake);
        }
        loop {
            if let Some(event) = self.queue.pop_front() {
                self.cursor = event.id;
                let data = serde_json::to_string(&event.envelope).unwrap_or_default();
                return Some(self.frame(event.id, &event.envelope.kind, &data));
            }
            if self.paging {
                let (log, after, prefixes) =
                    (self.state.log.clone(), self.cursor, self.prefixes.clone());
                match blocking(move || log.read_after(after, REPLAY_PAGE, &prefixes)).await {
                    Ok(page) => {
                        self.paging = page.len() == REPLAY_PAGE;
                        self.queue.extend(page);
                        continue;
                    }
                    Err(_) => {
                        return self
                            .close_with("service.error", json!({"reason": "journal read failed"}));
                    }
                }
            }
            tokio::select! {
                biased;
                () = self.state.shutdown.cancelled() => {
                    self.done = true;
                    return None;
                }
                received = self.live.recv() => match received {
                    Ok(live) if live.event.id <= self.cursor => {}
                    Ok(live) if !kind_matches(&live.event.envelope.kind, &self.prefixes) => {}
                    Ok(live) => {
                        self.cursor = live.event.id;
                        return Some(self.frame(live.event.id, &live.event.envelope.kind, &live.data));
                    }
                    Err(RecvError::Lagged(skipped)) => {
                        self.state.metrics.sse_lagged.inc();
                        let payload = json!({"skipped": skipped, "last_id": self.cursor});
                        return self.close_with("service.lagged", payload);
                    }
                    Err(RecvError::Closed) => {
                        self.done = true;
                        return None;
                    }
                },
            }
        }
    }

    fn frame(&self, id: i64, kind: &str, data: &str) -> SseEvent {
        self.state.metrics.sse_sent.inc();
        SseEvent::default().event(kind).id(id.to_string()).data(data)
    }

    /// A final frame, after which the stream ends.
    fn close_with(&mut self, kind: &str, payload: Value) -> Option<SseEvent> {
        self.done = true;
        let origin = self.state.node.snapshot().id.to_string();
        Some(SseEvent::default().event(kind).data(envelope_json(kind, payload, &origin)))
    }
}

/// Counts open SSE clients.
struct ClientGuard(Arc<crate::Metrics>);

impl ClientGuard {
    fn new(state: &AppState) -> Self {
        state.metrics.sse_clients.inc();
        Self(state.metrics.clone())
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.sse_clients.dec();
    }
}

/// A stream-only envelope (never journaled: the handshake, lag and error notices).
fn envelope_json(kind: &str, payload: Value, origin: &str) -> String {
    let now = arw_p2p::time::rfc3339_ms(arw_p2p::time::now_ms());
    let envelope = Envelope {
        time: now,
        kind: kind.to_owned(),
        payload,
        origin: Some(origin.to_owned()),
        policy: None,
        ce: None,
    };
    serde_json::to_string(&envelope).unwrap_or_default()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, Problem> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "journal read failed");
            Err(Problem::internal("journal read failed"))
        }
        Err(_) => Err(Problem::internal("journal read failed")),
    }
}

/// `GET /admin/events/journal` (and `/admin/policy/capsules/audit`) query.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JournalQuery {
    /// Rows wanted.
    pub limit: Option<String>,
    /// Kind prefixes, comma-separated.
    pub prefix: Option<String>,
}

/// `GET /admin/events/journal`: the most recent rows, oldest first.
#[utoipa::path(get, path = "/admin/events/journal", tag = "events", params(JournalQuery), responses((status = 200, body = JournalPage)))]
pub async fn journal(
    State(state): State<AppState>,
    Query(query): Query<JournalQuery>,
) -> Result<Json<JournalPage>, Problem> {
    let limit = parse_limit(query.limit.as_deref(), 200, REPLAY_PAGE)?;
    let prefixes: Vec<String> =
        query_prefixes(query.prefix.as_deref())?.into_iter().map(|p| p.to_lowercase()).collect();
    journal_page(&state, limit, prefixes).await
}

/// A `limit` query parameter: `default` when absent, clamped to `1..=max`.
pub fn parse_limit(raw: Option<&str>, default: usize, max: usize) -> Result<usize, Problem> {
    let limit = match raw {
        Some(l) => l.trim().parse::<usize>().map_err(|_| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_limit",
                format!("limit must be a count, got {l:?}"),
            )
        })?,
        None => default,
    };
    Ok(limit.clamp(1, max))
}

/// The last `limit` journal rows matching `prefixes`, as a JournalPage.
pub async fn journal_page(
    state: &AppState,
    limit: usize,
    prefixes: Vec<String>,
) -> Result<Json<JournalPage>, Problem> {
    let log = state.log.clone();
    let read_prefixes = prefixes.clone();
    let (entries, total) = blocking(move || log.read_last(limit, &read_prefixes)).await?;
    Ok(Json(JournalPage {
        limit,
        total_matched: total,
        truncated: total > entries.len() as u64,
        skipped_lines: 0,
        source_files: vec!["sqlite:events".to_owned()],
        entries,
        prefixes: (!prefixes.is_empty()).then_some(prefixes),
    }))
}

/// `POST /admin/events/test`: publishes `service.test` and answers once it is journaled.
#[utoipa::path(post, path = "/admin/events/test", tag = "events", request_body(content = Object, description = "Optional members merged into the payload", content_type = "application/json"), responses((status = 200, body = Object, description = "The `service.test` payload as journaled, with its `id`")))]
pub async fn test_event(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, Problem> {
    let body = body.map_err(Problem::from)?;
    let mut payload = Map::from_iter([
        ("ts".to_owned(), json!(arw_p2p::time::rfc3339_ms(arw_p2p::time::now_ms()))),
        ("who".to_owned(), json!("admin")),
        ("message".to_owned(), json!("manual test event")),
    ]);
    if !body.iter().all(u8::is_ascii_whitespace) {
        let json_type = headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
            });
        if !json_type {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected Content-Type: application/json",
            ));
        }
        let extra: Value = serde_json::from_slice(&body)
            .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid_json", e.to_string()))?;
        let Value::Object(extra) = extra else {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
                "expected a JSON object",
            ));
        };
        payload.extend(extra);
    }
    let id = state
        .events
        .emit_durable(arw_p2p::events::Event::ServiceTest(payload.clone()))
        .await
        .ok_or_else(|| Problem::internal("event could not be journaled"))?;
    payload.insert("id".to_owned(), json!(id));
    Ok(Json(Value::Object(payload)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_kind_examples() {
        for (input, want) in [
            ("Service.Start", "service.start"),
            ("WorldDiff", "world.diff"),
            ("HTTPServer", "http.server"),
            ("cluster.node.advertise", "cluster.node.advertise"),
            ("a..b.", "a.b"),
            ("task.completed", "task.completed"),
        ] {
            assert_eq!(normalize_kind(input), want, "{input}");
        }
    }

    #[test]
    fn prefixes_are_trimmed_and_case_sensitive() {
        let p = parse_prefixes(Some(" cluster. , ,hierarchy."));
        assert_eq!(p, vec!["cluster.".to_owned(), "hierarchy.".to_owned()]);
        assert!(kind_matches("cluster.node.changed", &p));
        assert!(!kind_matches("Cluster.node", &p));
        assert!(kind_matches("anything", &[]));
    }
}
