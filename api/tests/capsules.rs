//! Capsules over HTTP: the header guard's codes and events, adoption with leases, presets,
//! teardown, the trust store, and capsule denies on the hierarchy routes.

mod common;

use std::time::Duration;

use axum::{
    body::Body,
    http::{Request, StatusCode},
};
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use serde_json::{Value, json};

use common::*;

fn capsule(id: &str) -> Value {
    let now = arw_p2p::time::now_ms();
    json!({"id": id, "version": "1", "issued_at_ms": now, "denies": ["net:*"], "hop_ttl": 2})
}

fn header(capsule: &Value) -> String {
    B64.encode(capsule.to_string())
}

fn with_capsule(path: &str, header: &str, value: &str) -> Request<Body> {
    Request::get(path).header(header, value).body(Body::empty()).expect("request")
}

/// Waits (at most 10 s) until the journal holds `n` events of `kind`; returns their payloads.
async fn events(h: &Harness, kind: &str, n: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rows = h.log.rows_of(kind);
        if rows.len() >= n {
            return rows;
        }
        assert!(tokio::time::Instant::now() < deadline, "{n} × {kind}? {:?}", h.log.kinds());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The latest event of `kind`, waiting for one.
async fn event(h: &Harness, kind: &str) -> Value {
    events(h, kind, 1).await.pop().unwrap_or_default()
}

async fn held(h: &Harness) -> Vec<Value> {
    let reply = send(&h.app, get("/state/policy/capsules", Some(TOKEN))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    reply.body["items"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn a_signed_capsule_header_is_adopted_before_auth_and_renewed_when_presented_again() {
    let h = harness().await;
    let mut c = signed(capsule("c1"));
    c["lease_duration_ms"] = json!(600_000);
    let c = signed(c);
    // Raw JSON on an open route: adopted, and the request itself goes through.
    let reply = send(&h.app, with_capsule("/healthz", "X-ARW-Capsule", &c.to_string())).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let applied = event(&h, "policy.capsule.applied").await;
    assert_eq!((applied["id"].as_str(), applied["denies"].as_u64()), (Some("c1"), Some(1)));
    assert!(applied["corr_id"].is_string() && applied["request_id"].is_string(), "{applied}");
    let items = held(&h).await;
    assert_eq!(items.len(), 1);
    assert_eq!(
        (items[0]["status"].as_str(), items[0]["source"].as_str()),
        (Some("active"), Some("local"))
    );
    // Base64 of the same capsule, presented again: a renewal (within 2 s: no second event).
    let b64 = B64.encode(c.to_string());
    let reply = send(&h.app, with_capsule("/healthz", "X-ARW-Capsule", &b64)).await;
    assert_eq!(reply.status, StatusCode::OK);
    // The test event is journaled after anything the renewal emitted.
    send(&h.app, post("/admin/events/test", json!({}))).await;
    assert_eq!(h.log.rows_of("policy.capsule.applied").len(), 1);
    assert_eq!(held(&h).await.len(), 1);
}

#[tokio::test]
async fn refused_headers_answer_400_403_410_with_events() {
    let h = harness().await;
    let mut tampered = signed(capsule("c1"));
    tampered["denies"] = json!(["net:http"]);
    let mut flipped = signed(capsule("c2"));
    let sig = flipped["signature"].as_str().expect("sig").to_owned();
    let mut bytes = B64.decode(sig).expect("b64");
    bytes[0] ^= 1;
    flipped["signature"] = json!(B64.encode(bytes));
    let cases = [
        ("X-ARW-Capsule", "not a capsule".to_owned(), StatusCode::BAD_REQUEST, "invalid_capsule"),
        ("X-ARW-Capsule", B64.encode("[1,2]"), StatusCode::BAD_REQUEST, "invalid_capsule"),
        (
            "X-ARW-Capsule",
            tampered.to_string(),
            StatusCode::FORBIDDEN,
            "capsule_verification_failed",
        ),
        (
            "X-ARW-Capsule",
            flipped.to_string(),
            StatusCode::FORBIDDEN,
            "capsule_verification_failed",
        ),
        (
            "X-ARW-Capsule",
            capsule("unsigned").to_string(),
            StatusCode::FORBIDDEN,
            "capsule_verification_failed",
        ),
        ("X-ARW-Gate", "anything".to_owned(), StatusCode::GONE, "capsule_header_legacy"),
    ];
    for (header, value, status, code) in cases {
        // Refused before auth: no token, and still the capsule answer rather than 401.
        let reply = send(&h.app, with_capsule("/state/cluster", header, &value)).await;
        assert_problem(&reply, status, code);
        assert_eq!(reply.body["title"], "Capsule rejected");
    }
    assert_eq!(events(&h, "policy.capsule.failed", 6).await.len(), 6);
    let decisions = events(&h, "policy.decision", 6).await;
    assert_eq!(decisions.len(), 6);
    assert_eq!(decisions[2]["explain"]["capsule_id"], "c1");
    assert_eq!(decisions[2]["allow"], false);
    assert!(held(&h).await.is_empty());
    let metrics = send(&h.app, get("/metrics", None)).await;
    assert!(metrics.text.contains("arw_capsule_legacy_header_total 1"), "{}", metrics.text);
}

#[tokio::test]
async fn a_lapsed_lease_removes_the_capsule_and_says_so() {
    let h = harness().await;
    let mut c = capsule("short");
    c["lease_duration_ms"] = json!(300);
    let reply =
        send(&h.app, post("/admin/policy/capsules/adopt", json!({"capsule": signed(c)}))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.body["snapshot"]["status"], "expiring");
    let expired = event(&h, "policy.capsule.expired").await;
    assert_eq!(expired["id"], "short");
    assert!(expired["expired_ms"].as_u64() >= expired["lease_until_ms"].as_u64());
    assert!(held(&h).await.is_empty());
}

#[tokio::test]
async fn presets_adopt_and_teardown() {
    let h = harness().await;
    let presets = send(&h.app, get("/admin/policy/capsules/presets", Some(TOKEN))).await;
    assert_eq!(presets.body["count"], 1, "{}", presets.text);
    let preset = &presets.body["presets"][0];
    assert_eq!(
        (preset["id"].as_str(), preset["signature_present"].as_bool()),
        (Some("strict_egress"), Some(true))
    );

    let body = json!({"preset_id": "strict_egress", "reason": "lockdown"});
    let reply = send(&h.app, post("/admin/policy/capsules/adopt", body)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(
        (reply.body["capsule_id"].as_str(), reply.body["preset_id"].as_str()),
        (Some("capsule.strict-egress"), Some("strict_egress"))
    );
    assert_eq!(event(&h, "policy.capsule.applied").await["reason"], "lockdown");

    for (body, status, code) in [
        (json!({}), StatusCode::BAD_REQUEST, "invalid_capsule"),
        (
            json!({"preset_id": "strict_egress", "capsule": capsule("x")}),
            StatusCode::BAD_REQUEST,
            "invalid_capsule",
        ),
        (json!({"preset_id": "../trust"}), StatusCode::NOT_FOUND, "unknown_preset"),
        (
            json!({"capsule": capsule("unsigned")}),
            StatusCode::FORBIDDEN,
            "capsule_verification_failed",
        ),
    ] {
        let reply = send(&h.app, post("/admin/policy/capsules/adopt", body)).await;
        assert_problem(&reply, status, code);
    }

    let reply = send(&h.app, post("/admin/policy/capsules/teardown", json!({"ids": [" "]}))).await;
    assert_problem(&reply, StatusCode::BAD_REQUEST, "invalid_request");
    let body = json!({"ids": ["capsule.strict-egress", "nope"], "dry_run": true});
    let reply = send(&h.app, post("/admin/policy/capsules/teardown", body)).await;
    assert_eq!(
        (reply.body["removed"].as_array().map(Vec::len), reply.body["remaining"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(reply.body["not_found"], json!(["nope"]));
    let body = json!({"all": true, "reason": "done"});
    let reply = send(&h.app, post("/admin/policy/capsules/teardown", body)).await;
    assert_eq!(reply.body["remaining"], 0, "{}", reply.text);
    assert_eq!(event(&h, "policy.capsule.teardown").await["removed_reason"], "done");

    let audit = send(&h.app, get("/admin/policy/capsules/audit", Some(TOKEN))).await;
    let kinds: Vec<&str> = audit.body["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    let expected = ["policy.capsule.applied", "policy.capsule.failed", "policy.capsule.teardown"];
    assert_eq!(kinds, expected, "{}", audit.text);
}

#[tokio::test]
async fn held_capsules_deny_the_hierarchy_routes_they_name() {
    let h = harness().await;
    let mut c = capsule("freeze");
    c["denies"] = json!(["hierarchy:role:*"]);
    let reply =
        send(&h.app, post("/admin/policy/capsules/adopt", json!({"capsule": signed(c)}))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let reply = send(&h.app, post("/admin/hierarchy/role", json!({"role": "home"}))).await;
    assert_problem(&reply, StatusCode::FORBIDDEN, "denied");
    assert_eq!(reply.body["explain"]["capsule_id"], "freeze");
    let reply = send(&h.app, get("/admin/hierarchy/state", Some(TOKEN))).await;
    assert_eq!(reply.body["self_node"]["role"], "edge", "nothing changed");
    send(&h.app, post("/admin/policy/capsules/teardown", json!({"ids": ["freeze"]}))).await;
    let reply = send(&h.app, post("/admin/hierarchy/role", json!({"role": "home"}))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
}

#[tokio::test]
async fn the_trust_store_lists_issuers_without_keys_and_reloads() {
    let h = harness().await;
    let reply = send(&h.app, get("/admin/rpu/trust", Some(TOKEN))).await;
    assert_eq!(reply.body["issuers"], json!([{"id": ISSUER, "alg": "ed25519"}]), "{}", reply.text);
    std::fs::write(h.dir().join("trust.json"), "{not json").expect("write");
    let reply = send(&h.app, post("/admin/rpu/reload", json!({}))).await;
    assert_problem(&reply, StatusCode::UNPROCESSABLE_ENTITY, "invalid_trust_store");
    let reply = send(&h.app, get("/admin/rpu/trust", Some(TOKEN))).await;
    assert_eq!(reply.body["count"], 1, "a bad file leaves the store in force");
    std::fs::write(h.dir().join("trust.json"), r#"{"issuers":[]}"#).expect("write");
    let reply = send(&h.app, post("/admin/rpu/reload", json!({}))).await;
    assert_eq!(reply.body["count"], 0, "{}", reply.text);
    let reply = send(
        &h.app,
        post("/admin/policy/capsules/adopt", json!({"capsule": signed(capsule("c"))})),
    )
    .await;
    assert_problem(&reply, StatusCode::FORBIDDEN, "capsule_verification_failed");
}

async fn home_view(h: &Harness) -> Value {
    send(&h.app, get("/admin/hierarchy/state", Some(TOKEN))).await.body["home"].clone()
}

/// Waits (at most 10 s) until the Home's own document satisfies `check`.
async fn home_until(h: &Harness, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let view = home_view(h).await;
        if check(&view) {
            return view;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_home_hands_out_only_what_an_administrator_adopted_and_steps_down_cleanly() {
    let h = harness().await;
    let reply = send(&h.app, post("/admin/hierarchy/role", json!({"role": "home"}))).await;
    assert_eq!(reply.status, StatusCode::OK);
    let first = home_until(&h, "the Home's first document", |v| v["pinned_by"] == "own").await;
    let epoch = first["policy_epoch"].as_u64().expect("epoch");

    // Presented in a header (before auth): held here, not handed to the workspace.
    let mut traveller = capsule("travel");
    traveller["propagate"] = json!("all");
    traveller["lease_duration_ms"] = json!(600_000);
    let traveller = signed(traveller);
    let reply =
        send(&h.app, with_capsule("/healthz", "X-ARW-Capsule", &traveller.to_string())).await;
    assert_eq!(reply.status, StatusCode::OK);
    // Adopted by an administrator: handed out in the next document.
    let body = json!({"capsule": traveller});
    assert_eq!(
        send(&h.app, post("/admin/policy/capsules/adopt", body.clone())).await.status,
        StatusCode::OK
    );
    let view = home_until(&h, "the capsule in the document", |v| v["capsules"] == 1).await;
    let handed = view["policy_epoch"].as_u64().expect("epoch");
    assert!(handed > epoch);
    // (That renewing it does not make a new document each time: capsule::set's unit tests.)

    let reply = send(&h.app, post("/admin/hierarchy/role", json!({"role": "edge"}))).await;
    assert_eq!(reply.status, StatusCode::OK);
    let view = home_until(&h, "stepping down", |v| v.get("pinned_by").is_none()).await;
    assert_eq!(view["policy_epoch"], 0, "{view}");
}

#[tokio::test]
async fn capsules_are_bounded_and_refusals_do_not_flood_the_journal() {
    let h = harness().await;
    for i in 0..arw_p2p::capsule::MAX_HELD {
        let reply = send(
            &h.app,
            post(
                "/admin/policy/capsules/adopt",
                json!({"capsule": signed(capsule(&format!("c{i}")))}),
            ),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    }
    let one_more = json!({"capsule": signed(capsule("straw"))});
    let reply = send(&h.app, post("/admin/policy/capsules/adopt", one_more)).await;
    assert_problem(&reply, StatusCode::CONFLICT, "capsule_limit");
    let again = json!({"capsule": signed(capsule("c0"))});
    assert_eq!(
        send(&h.app, post("/admin/policy/capsules/adopt", again)).await.status,
        StatusCode::OK,
        "a held id renews"
    );

    for _ in 0..30 {
        let reply = send(&h.app, with_capsule("/healthz", "X-ARW-Capsule", "garbage")).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    }
    send(&h.app, post("/admin/events/test", json!({}))).await;
    let failed = h.log.rows_of("policy.capsule.failed").len();
    assert!(failed <= 20, "{failed} refusal events journaled");

    let mut odd = capsule("odd");
    odd["contracts"] = json!([{"id": "k", "patterns": ["tools:*"], "subject_role": "boss"}]);
    let reply =
        send(&h.app, post("/admin/policy/capsules/adopt", json!({"capsule": signed(odd)}))).await;
    assert_problem(&reply, StatusCode::FORBIDDEN, "capsule_verification_failed");
}

#[tokio::test]
async fn capsules_presented_without_the_token_cannot_take_the_node() {
    let h = harness().await;
    let present = |c: &Value| with_capsule("/healthz", "X-ARW-Capsule", &header(c));
    // Undated or stale capsules are refused in headers (the admin may still adopt them).
    let mut undated = capsule("undated");
    undated["issued_at_ms"] = json!(0);
    let reply = send(&h.app, present(&signed(undated.clone()))).await;
    assert_problem(&reply, StatusCode::FORBIDDEN, "capsule_verification_failed");
    let adopt = json!({"capsule": signed(undated)});
    assert_eq!(
        send(&h.app, post("/admin/policy/capsules/adopt", adopt)).await.status,
        StatusCode::OK
    );

    // A capsule the admin tore down is not re-imposed by presenting it again.
    let freeze = signed(capsule("freeze"));
    assert_eq!(send(&h.app, present(&freeze)).await.status, StatusCode::OK);
    let teardown = json!({"ids": ["freeze"]});
    send(&h.app, post("/admin/policy/capsules/teardown", teardown)).await;
    assert_problem(
        &send(&h.app, present(&freeze)).await,
        StatusCode::FORBIDDEN,
        "capsule_torn_down",
    );
    let held = held(&h).await;
    assert!(held.iter().all(|c| c["id"] != "freeze"), "{held:?}");

    // One issuer (and one address) cannot fill the table: the admin keeps room.
    let mut adopted = 0;
    for i in 0..40 {
        let reply = send(&h.app, present(&signed(capsule(&format!("p{i}"))))).await;
        if reply.status == StatusCode::OK {
            adopted += 1;
        } else {
            assert!(
                [StatusCode::CONFLICT, StatusCode::TOO_MANY_REQUESTS].contains(&reply.status),
                "{}",
                reply.text
            );
        }
    }
    assert!(adopted <= arw_p2p::capsule::MAX_PRESENTED_PER_ISSUER, "{adopted} adopted");
    let mine = json!({"capsule": signed(capsule("admin-own"))});
    let reply = send(&h.app, post("/admin/policy/capsules/adopt", mine)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
}

#[tokio::test]
async fn each_client_address_may_bring_a_limited_number_of_new_capsules() {
    use axum::extract::ConnectInfo;
    let h = harness().await;
    let from = |ip: [u8; 4], c: &Value| {
        let mut request = with_capsule("/healthz", "X-ARW-Capsule", &header(c));
        let addr = std::net::SocketAddr::from((ip, 40_000));
        request.extensions_mut().insert(ConnectInfo(addr));
        request
    };
    let (a, b) = ([10, 0, 0, 1], [10, 0, 0, 2]);
    let first = signed(capsule("a0"));
    for i in 0..16 {
        let c = if i == 0 { first.clone() } else { signed(capsule(&format!("a{i}"))) };
        let reply = send(&h.app, from(a, &c)).await;
        assert_eq!(reply.status, StatusCode::OK, "capsule {i}: {}", reply.text);
    }
    let reply = send(&h.app, from(a, &signed(capsule("a16")))).await;
    assert_problem(&reply, StatusCode::TOO_MANY_REQUESTS, "capsule_rate_limited");
    // Renewing one it already brought is not a new capsule; another address is not limited by
    // this one.
    assert_eq!(send(&h.app, from(a, &first)).await.status, StatusCode::OK);
    let reply = send(&h.app, from(b, &signed(capsule("b0")))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
}
