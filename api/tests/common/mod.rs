//! The test harness shared by the router tests: the real router over a real node actor, with
//! an in-memory journal, a capsule trust store and a presets directory in a temp dir.
#![allow(dead_code)]

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    http::{Request, StatusCode, header},
};
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use arw_api::{
    AdminAuth, AppState, AuthConfig, Metrics,
    dto::Envelope,
    events::{EventLog, LiveEvent, SseConfig, StoredEvent, kind_matches},
};
use arw_p2p::{
    events::EventTx,
    identity::NodeKey,
    node::{self, NodeConfig},
    node_id::{IdSource, NodeId},
};

pub const TOKEN: &str = "test-token";
/// The issuer the harness's trust store lists, and its ed25519 secret.
pub const ISSUER: &str = "local-admin";
pub const ISSUER_SECRET: [u8; 32] = [42; 32];

/// `capsule` signed by [`ISSUER`] in the canonical form.
pub fn signed(mut capsule: Value) -> Value {
    let key = ed25519_dalek::SigningKey::from_bytes(&ISSUER_SECRET);
    arw_p2p::capsule::sign_ed25519(&mut capsule, ISSUER, &key).expect("sign");
    capsule
}

/// An in-memory stand-in for the SQLite journal (which daemon tests exercise for real).
#[derive(Debug)]
pub struct MemoryLog {
    rows: Mutex<Vec<StoredEvent>>,
    live: broadcast::Sender<Arc<LiveEvent>>,
}

impl MemoryLog {
    pub fn kinds(&self) -> Vec<String> {
        self.rows.lock().expect("lock").iter().map(|e| e.envelope.kind.clone()).collect()
    }

    /// Payloads of the journaled events of `kind`, oldest first.
    pub fn rows_of(&self, kind: &str) -> Vec<Value> {
        let rows = self.rows.lock().expect("lock");
        rows.iter()
            .filter(|e| e.envelope.kind == kind)
            .map(|e| e.envelope.payload.clone())
            .collect()
    }

    pub fn take(&self) -> Vec<StoredEvent> {
        std::mem::take(&mut *self.rows.lock().expect("lock"))
    }
}

impl EventLog for MemoryLog {
    fn subscribe(&self) -> broadcast::Receiver<Arc<LiveEvent>> {
        self.live.subscribe()
    }
    fn read_after(
        &self,
        after: i64,
        limit: usize,
        prefixes: &[String],
    ) -> Result<Vec<StoredEvent>, String> {
        let rows = self.rows.lock().expect("lock");
        Ok(rows
            .iter()
            .filter(|e| e.id > after && kind_matches(&e.envelope.kind, prefixes))
            .take(limit)
            .cloned()
            .collect())
    }
    fn read_last(
        &self,
        limit: usize,
        prefixes: &[String],
    ) -> Result<(Vec<StoredEvent>, u64), String> {
        let rows = self.rows.lock().expect("lock");
        let all: Vec<StoredEvent> =
            rows.iter().filter(|e| kind_matches(&e.envelope.kind, prefixes)).cloned().collect();
        let total = all.len() as u64;
        Ok((all[all.len().saturating_sub(limit)..].to_vec(), total))
    }
    fn bounds(&self) -> (i64, i64) {
        let rows = self.rows.lock().expect("lock");
        (rows.first().map_or(0, |e| e.id), rows.last().map_or(0, |e| e.id))
    }
}

pub struct Harness {
    pub app: Router,
    pub log: Arc<MemoryLog>,
    dir: tempfile::TempDir,
    _cancel: tokio_util::sync::DropGuard,
}

impl Harness {
    /// The node's state directory (also holding `trust.json` and `capsules/`).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

pub async fn harness_with(explicit_id: Option<&str>, rate_limit: u32) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let cancel = CancellationToken::new();
    let (events, mut rx) = EventTx::channel(1024);
    let log = Arc::new(MemoryLog { rows: Mutex::default(), live: broadcast::channel(64).0 });
    let writer = log.clone();
    tokio::spawn(async move {
        let mut next_id = 0;
        while let Some(emit) = rx.recv().await {
            next_id += 1;
            let envelope = Envelope {
                time: "2025-10-16T12:00:00.000Z".into(),
                kind: emit.kind,
                payload: emit.payload,
                origin: Some("test-host".into()),
                policy: None,
                ce: None,
            };
            let stored = StoredEvent { id: next_id, envelope };
            writer.rows.lock().expect("lock").push(stored.clone());
            let _ = writer.live.send(Arc::new(LiveEvent::new(stored)));
            if let Some(ack) = emit.ack {
                let _ = ack.send(next_id);
            }
        }
    });
    let key = ed25519_dalek::SigningKey::from_bytes(&ISSUER_SECRET);
    let public = B64.encode(key.verifying_key().to_bytes());
    let trust = json!({"issuers":[{"id":ISSUER,"alg":"ed25519","key_b64":public}]});
    std::fs::write(dir.path().join("trust.json"), trust.to_string()).expect("trust store");
    let presets = dir.path().join("capsules");
    std::fs::create_dir(&presets).expect("presets dir");
    let preset = signed(json!({"id":"capsule.strict-egress","version":"1","issued_at_ms":0,
        "propagate":"children","denies":["net:*"],"lease_duration_ms":600_000}));
    std::fs::write(presets.join("strict_egress.json"), preset.to_string()).expect("preset");
    let mut config =
        NodeConfig::new(NodeKey::generate().expect("key"), "default", dir.path().to_path_buf());
    config.capsule_trust = Some(dir.path().join("trust.json"));
    config.explicit_id = explicit_id.map(|id| (NodeId::parse(id).expect("id"), IdSource::Env));
    config.hostname = Some("test-host".into());
    let (node, _task) = node::spawn(config, events.clone(), cancel.clone()).await.expect("node");
    let auth = AdminAuth::new(&AuthConfig {
        token: Some(TOKEN.into()),
        rate_limit,
        rate_window: Duration::from_secs(60),
        ..AuthConfig::default()
    })
    .expect("auth");
    let state = AppState {
        node,
        events,
        auth: Arc::new(auth),
        metrics: Arc::new(Metrics::new()),
        log: log.clone(),
        sse: SseConfig::default(),
        shutdown: cancel.clone(),
        capsule_presets: Some(presets),
        capsule_failures: Arc::default(),
        capsule_presenters: Arc::default(),
        egress: None,
    };
    Harness { app: arw_api::router(state), log, dir, _cancel: cancel.drop_guard() }
}

pub async fn harness() -> Harness {
    harness_with(None, 0).await
}

pub struct Reply {
    pub status: StatusCode,
    pub content_type: String,
    pub retry_after: Option<String>,
    pub body: Value,
    pub text: String,
}

pub async fn send(app: &Router, request: Request<Body>) -> Reply {
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let header =
        |name| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let content_type = header(header::CONTENT_TYPE).unwrap_or_default();
    let retry_after = header(header::RETRY_AFTER);
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("body");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply { status, content_type, retry_after, body, text }
}

pub fn get(path: &str, token: Option<&str>) -> Request<Body> {
    let mut builder = Request::get(path);
    if let Some(t) = token {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    builder.body(Body::empty()).expect("request")
}

pub fn post_raw(
    path: &str,
    token: Option<&str>,
    content_type: &str,
    body: impl Into<Body>,
) -> Request<Body> {
    let mut builder = Request::post(path).header(header::CONTENT_TYPE, content_type);
    if let Some(t) = token {
        builder = builder.header("X-ARW-Admin", t);
    }
    builder.body(body.into()).expect("request")
}

pub fn post(path: &str, body: Value) -> Request<Body> {
    post_raw(path, Some(TOKEN), "application/json", body.to_string())
}

pub fn assert_problem(reply: &Reply, status: StatusCode, code: &str) {
    assert_eq!(reply.status, status, "{}", reply.text);
    assert_eq!(reply.content_type, "application/problem+json", "{}", reply.text);
    assert_eq!(reply.body["status"], status.as_u16(), "{}", reply.text);
    assert_eq!(reply.body["code"], code, "{}", reply.text);
    assert!(!reply.text.contains("null"), "null member in {}", reply.text);
}
