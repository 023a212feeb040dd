//! The HTTP surface without sockets: status codes, problem+json bodies and hierarchy behaviour.

mod common;

use axum::{
    body::Body,
    http::{Request, StatusCode, header},
};
use serde_json::{Value, json};

use arw_p2p::identity::NodeKey;

use common::*;

const PROTECTED_POSTS: [&str; 4] = [
    "/admin/hierarchy/role",
    "/admin/hierarchy/hello",
    "/admin/hierarchy/offer",
    "/admin/hierarchy/accept",
];

#[tokio::test]
async fn every_protected_route_is_401_without_a_token_whatever_the_body() {
    let h = harness().await;
    let big = "x".repeat(arw_api::BODY_LIMIT * 2);
    let bodies: [(&str, String); 5] = [
        ("application/json", json!({"role": "home"}).to_string()),
        ("application/json", "{not json".into()),
        ("application/json", "{}".into()),
        ("text/plain", "role=home".into()),
        ("application/json", big),
    ];
    for path in PROTECTED_POSTS {
        for (content_type, body) in &bodies {
            for token in [None, Some("wrong")] {
                let reply = send(&h.app, post_raw(path, token, content_type, body.clone())).await;
                assert_problem(&reply, StatusCode::UNAUTHORIZED, "unauthorized");
                assert_eq!(
                    reply.body,
                    json!({"type": "about:blank", "title": "Unauthorized", "status": 401, "code": "unauthorized"})
                );
            }
        }
    }
    for path in
        ["/state/cluster", "/admin/hierarchy/state", "/admin/nope", "/state/nope", "/events"]
    {
        let reply = send(&h.app, get(path, None)).await;
        assert_problem(&reply, StatusCode::UNAUTHORIZED, "unauthorized");
    }
}

#[tokio::test]
async fn healthz_and_metrics_are_open() {
    let h = harness().await;
    let reply = send(&h.app, get("/healthz", None)).await;
    assert_eq!((reply.status, reply.body.clone()), (StatusCode::OK, json!({"ok": true})));
    send(&h.app, get("/state/cluster", Some(TOKEN))).await;
    let metrics = send(&h.app, get("/metrics", None)).await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(metrics.text.contains("arw_build_info"), "{}", metrics.text);
    assert!(
        metrics.text.contains(
            r#"arw_http_requests_total{route="/state/cluster",method="GET",status="200"} 1"#
        ),
        "{}",
        metrics.text
    );
}

#[tokio::test]
async fn role_table_aliases_and_unknown_roles() {
    let h = harness().await;
    for (input, canonical) in [
        ("home", "root"),
        ("Worker", "edge"),
        ("REGIONAL", "regional"),
        ("connector", "connector"),
        ("observer", "observer"),
        ("root", "root"),
        ("edge", "edge"),
    ] {
        let reply = send(&h.app, post("/admin/hierarchy/role", json!({ "role": input }))).await;
        assert_eq!(
            (reply.status, reply.body.clone()),
            (StatusCode::OK, json!({"ok": true})),
            "{input}"
        );
        let state = send(&h.app, get("/admin/hierarchy/state", Some(TOKEN))).await.body;
        assert_eq!(state["self_node"]["role"], canonical, "{input}");
        let cluster = send(&h.app, get("/state/cluster", Some(TOKEN))).await.body;
        assert_eq!(cluster["nodes"][0]["role"], canonical, "{input}");
    }
    let before = send(&h.app, get("/admin/hierarchy/state", Some(TOKEN))).await.body;
    let reply = send(&h.app, post("/admin/hierarchy/role", json!({"role": "admin"}))).await;
    assert_problem(&reply, StatusCode::UNPROCESSABLE_ENTITY, "unknown_role");
    assert_eq!(
        reply.body["valid_roles"],
        json!(["root", "regional", "edge", "connector", "observer"])
    );
    let after = send(&h.app, get("/admin/hierarchy/state", Some(TOKEN))).await.body;
    assert_eq!(before, after, "an unknown role changed state");
}

#[tokio::test]
async fn role_change_emits_events_and_reads_emit_nothing() {
    let h = harness().await;
    // The boot advert went out before the harness returned; events reach the log asynchronously,
    // so order checks against a marker event published and acknowledged through the same path.
    let marker = send(&h.app, post("/admin/events/test", json!({}))).await;
    assert_eq!(marker.status, StatusCode::OK, "{}", marker.text);
    h.log.take();
    send(&h.app, get("/admin/hierarchy/state", Some(TOKEN))).await;
    send(&h.app, post("/admin/events/test", json!({"marker": 1}))).await;
    assert_eq!(h.log.kinds(), vec!["service.test".to_owned()], "a read emitted an event");

    h.log.take();
    send(&h.app, post("/admin/hierarchy/role", json!({"role": "Home"}))).await;
    send(&h.app, post("/admin/events/test", json!({"marker": 2}))).await;
    let events = h.log.take();
    let changed =
        events.iter().find(|e| e.envelope.kind == "hierarchy.role.changed").expect("role event");
    assert_eq!(
        changed.envelope.payload,
        json!({"role": "root", "requested": "Home", "previous": "edge"})
    );
    let kinds: Vec<&str> = events.iter().map(|e| e.envelope.kind.as_str()).collect();
    for kind in ["hierarchy.state", "cluster.node.advertise", "cluster.node.changed"] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
}

#[tokio::test]
async fn test_event_merges_the_body_and_the_journal_pages_it() {
    let h = harness().await;
    let reply =
        send(&h.app, post("/admin/events/test", json!({"message": "hi", "extra": 7}))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(
        (reply.body["who"].as_str(), reply.body["message"].as_str()),
        (Some("admin"), Some("hi"))
    );
    assert_eq!(reply.body["extra"], 7);
    let id = reply.body["id"].as_i64().expect("journal id");

    let empty = Request::post("/admin/events/test")
        .header("X-ARW-Admin", TOKEN)
        .body(Body::empty())
        .expect("req");
    assert_eq!(send(&h.app, empty).await.status, StatusCode::OK, "a body is optional");
    let array = send(&h.app, post("/admin/events/test", json!([1]))).await;
    assert_problem(&array, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");

    let page =
        send(&h.app, get("/admin/events/journal?prefix=SERVICE.&limit=1", Some(TOKEN))).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text);
    assert_eq!(page.body["prefixes"], json!(["service."]));
    assert_eq!(page.body["limit"], 1);
    assert_eq!(page.body["total_matched"], 2);
    assert_eq!(page.body["truncated"], true);
    assert_eq!(page.body["source_files"], json!(["sqlite:events"]));
    assert!(page.body["entries"][0]["id"].as_i64().expect("id") > id);
    let bad = send(&h.app, get("/admin/events/journal?limit=lots", Some(TOKEN))).await;
    assert_problem(&bad, StatusCode::BAD_REQUEST, "invalid_limit");
}

#[tokio::test]
async fn non_numeric_cursors_are_refused() {
    let h = harness().await;
    let reply = send(&h.app, get("/events?after=yesterday", Some(TOKEN))).await;
    assert_problem(&reply, StatusCode::BAD_REQUEST, "invalid_cursor");
    let request = Request::get("/events")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header("Last-Event-ID", "abc")
        .body(Body::empty())
        .expect("request");
    assert_problem(&send(&h.app, request).await, StatusCode::BAD_REQUEST, "invalid_cursor");
    let replay = send(&h.app, get("/events?replay=-1", Some(TOKEN))).await;
    assert_problem(&replay, StatusCode::BAD_REQUEST, "invalid_replay");
}

#[tokio::test]
async fn oversized_filters_and_bodies_are_problem_json() {
    let h = harness().await;
    let many: Vec<String> = (0..=arw_api::events::MAX_PREFIXES).map(|i| format!("k{i}.")).collect();
    let many = many.join(",");
    for path in ["/events", "/admin/events/journal", "/admin/policy/capsules/audit"] {
        let reply = send(&h.app, get(&format!("{path}?prefix={many}"), Some(TOKEN))).await;
        assert_problem(&reply, StatusCode::BAD_REQUEST, "too_many_prefixes");
    }
    let long = "k".repeat(200);
    let reply = send(&h.app, get(&format!("/events?prefix={long}"), Some(TOKEN))).await;
    assert_problem(&reply, StatusCode::BAD_REQUEST, "invalid_prefix");
    let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(arw_api::BODY_LIMIT));
    let request = post_raw("/admin/events/test", Some(TOKEN), "application/json", big);
    assert_problem(
        &send(&h.app, request).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
}

fn hello(id: &str, epoch: u64, nonce: &str) -> Value {
    json!({
        "id": id, "role": "worker", "capabilities": ["gpu:rtx-4090", "memory:96g"],
        "scope_tags": ["gpu", "balanced"], "epoch": epoch, "nonce": nonce,
    })
}

#[tokio::test]
async fn a_hello_that_would_make_the_advert_too_large_changes_nothing() {
    let h = harness().await;
    let mut big = hello("worker-gpu-01", 5, "n1");
    big["scope_tags"] =
        json!((0..80).map(|i| format!("{i:02}{}", "t".repeat(58))).collect::<Vec<_>>());
    let reply = send(&h.app, post("/admin/hierarchy/hello", big)).await;
    assert_problem(&reply, StatusCode::UNPROCESSABLE_ENTITY, "advert_too_large");
    let state = send(&h.app, get("/admin/hierarchy/state", Some(TOKEN))).await.body;
    assert_ne!(state["self_node"]["id"], "worker-gpu-01", "nothing of it was kept: {state}");
    let fits = send(&h.app, post("/admin/hierarchy/hello", hello("worker-gpu-01", 5, "n2"))).await;
    assert_eq!(fits.status, StatusCode::OK, "{}", fits.text);
}

#[tokio::test]
async fn hello_is_stored_advertised_and_guarded() {
    let h = harness().await;
    let reply = send(&h.app, post("/admin/hierarchy/hello", hello("worker-gpu-01", 5, "n1"))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);

    let state = send(&h.app, get("/admin/hierarchy/state", Some(TOKEN))).await.body;
    assert_eq!(state["self_node"]["id"], "worker-gpu-01");
    assert_eq!(state["self_node"]["role"], "edge");
    assert_eq!(state["self_node"]["tags"], json!(["gpu", "balanced"]));
    assert_eq!(state["self_node"]["capabilities"], json!(["gpu:rtx-4090", "memory:96g"]));
    assert_eq!(state["self_node"]["hello_epoch"], 5);

    let cluster = send(&h.app, get("/state/cluster", Some(TOKEN))).await.body;
    let nodes = cluster["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 1, "the hostname-named record was not replaced: {cluster}");
    assert_eq!(nodes[0]["id"], "worker-gpu-01");
    assert_eq!(nodes[0]["tags"], json!(["gpu", "balanced"]));
    assert_eq!(nodes[0]["capabilities"]["declared"], json!(["gpu:rtx-4090", "memory:96g"]));
    assert_eq!(nodes[0]["epoch"], 5);

    let replay =
        send(&h.app, post("/admin/hierarchy/hello", hello("worker-gpu-01", 5, "n1"))).await;
    assert_problem(&replay, StatusCode::CONFLICT, "nonce_replay");
    let stale = send(&h.app, post("/admin/hierarchy/hello", hello("worker-gpu-01", 4, "n2"))).await;
    assert_problem(&stale, StatusCode::CONFLICT, "stale_epoch");
    let home = send(&h.app, post("/admin/hierarchy/hello", json!({
        "id": "worker-gpu-01", "role": "home", "capabilities": [], "scope_tags": [], "epoch": 6, "nonce": "n3"
    }))).await;
    assert_eq!(home.status, StatusCode::OK, "hello must accept the runbook's alias: {}", home.text);

    let bad_role = send(&h.app, post("/admin/hierarchy/hello", json!({
        "id": "worker-gpu-01", "role": "captain", "capabilities": [], "scope_tags": [], "epoch": 7, "nonce": "n4"
    }))).await;
    assert_problem(&bad_role, StatusCode::UNPROCESSABLE_ENTITY, "unknown_role");
    let bad_id = send(&h.app, post("/admin/hierarchy/hello", hello("a.b", 7, "n5"))).await;
    assert_problem(&bad_id, StatusCode::UNPROCESSABLE_ENTITY, "invalid_node_id");
}

#[tokio::test]
async fn hello_must_match_an_explicit_node_id() {
    let h = harness_with(Some("home-east"), 0).await;
    let reply = send(&h.app, post("/admin/hierarchy/hello", hello("worker-gpu-01", 0, "n"))).await;
    assert_problem(&reply, StatusCode::CONFLICT, "node_id_mismatch");
    let ok = send(&h.app, post("/admin/hierarchy/hello", hello("home-east", 0, "n"))).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
}

#[tokio::test]
async fn bodies_are_validated_after_auth_as_problem_json() {
    let h = harness().await;
    let path = "/admin/hierarchy/role";
    let malformed =
        send(&h.app, post_raw(path, Some(TOKEN), "application/json", "{not json")).await;
    assert_problem(&malformed, StatusCode::BAD_REQUEST, "invalid_json");
    let missing = send(&h.app, post_raw(path, Some(TOKEN), "application/json", "{}")).await;
    assert_problem(&missing, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
    let wrong_type =
        send(&h.app, post_raw(path, Some(TOKEN), "application/json", r#"{"role":7}"#)).await;
    assert_problem(&wrong_type, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
    let text = send(&h.app, post_raw(path, Some(TOKEN), "text/plain", r#"{"role":"home"}"#)).await;
    assert_problem(&text, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    let big = format!(r#"{{"role":"{}"}}"#, "x".repeat(arw_api::BODY_LIMIT));
    let oversize = send(&h.app, post_raw(path, Some(TOKEN), "application/json", big)).await;
    assert_problem(&oversize, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    let hello_missing =
        send(&h.app, post("/admin/hierarchy/hello", json!({"id": "x", "role": "edge"}))).await;
    assert_problem(&hello_missing, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
}

#[tokio::test]
async fn unknown_paths_and_methods_are_problem_json() {
    let h = harness().await;
    let missing = send(&h.app, get("/nope", None)).await;
    assert_problem(&missing, StatusCode::NOT_FOUND, "not_found");
    let admin_missing = send(&h.app, get("/admin/nope", Some(TOKEN))).await;
    assert_problem(&admin_missing, StatusCode::NOT_FOUND, "not_found");
    let method = send(&h.app, get("/admin/hierarchy/role", Some(TOKEN))).await;
    assert_problem(&method, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
}

#[tokio::test]
async fn repeated_failures_are_rate_limited_with_retry_after() {
    let h = harness_with(None, 3).await;
    for _ in 0..3 {
        let reply = send(&h.app, get("/state/cluster", Some("guess"))).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    let limited = send(&h.app, get("/state/cluster", Some("guess"))).await;
    assert_problem(&limited, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let retry: u64 =
        limited.retry_after.as_deref().and_then(|v| v.parse().ok()).expect("Retry-After");
    assert!((1..=60).contains(&retry), "{retry}");
    let healthz = send(&h.app, get("/healthz", None)).await;
    assert_eq!(healthz.status, StatusCode::OK, "open routes are never limited");
}

#[tokio::test]
async fn offer_and_accept_fill_children_and_peers() {
    let h = harness_with(Some("root-1"), 0).await;
    let offer = json!({"from_id": "edge-7", "proposed_role": "worker", "parent_hint": "root-1", "shard_ranges": [], "capacity_hint": 8});
    assert_eq!(send(&h.app, post("/admin/hierarchy/offer", offer)).await.status, StatusCode::OK);
    let accept = json!({"child_id": "edge-7", "parent_id": "root-1", "role": "edge", "epoch": 4});
    assert_eq!(send(&h.app, post("/admin/hierarchy/accept", accept)).await.status, StatusCode::OK);
    let state = send(&h.app, get("/admin/hierarchy/state", Some(TOKEN))).await.body;
    assert_eq!(state["self_node"]["children"], json!(["edge-7"]));
    assert_eq!(state["epoch"], 1, "accepting a known child must not bump the epoch: {state}");
    assert_eq!(state["peers"]["edge-7"]["role"], "edge");
    assert_eq!(state["peers"]["edge-7"]["parent"], "root-1");
    let bad = json!({"from_id": "edge-8", "proposed_role": "boss", "shard_ranges": []});
    assert_problem(
        &send(&h.app, post("/admin/hierarchy/offer", bad)).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown_role",
    );
}

#[tokio::test]
async fn admission_is_decided_at_the_home_only_and_checks_its_input() {
    let h = harness_with(Some("home-1"), 0).await;
    let not_home = send(&h.app, post("/admin/cluster/admit", json!({"id": "w1"}))).await;
    assert_problem(&not_home, StatusCode::CONFLICT, "not_home");
    send(&h.app, post("/admin/hierarchy/role", json!({"role": "home"}))).await;

    let unknown = send(&h.app, post("/admin/cluster/admit", json!({"id": "w1"}))).await;
    assert_problem(&unknown, StatusCode::NOT_FOUND, "unknown_node");
    let bad_key =
        send(&h.app, post("/admin/cluster/admit", json!({"id": "w1", "key": "c2hvcnQ="}))).await;
    assert_problem(&bad_key, StatusCode::UNPROCESSABLE_ENTITY, "invalid_key");
    let bad_id = send(&h.app, post("/admin/cluster/admit", json!({"id": "w.1"}))).await;
    assert_problem(&bad_id, StatusCode::UNPROCESSABLE_ENTITY, "invalid_node_id");

    let key = NodeKey::from_secret([5; 32]).public_b64();
    let admitted =
        send(&h.app, post("/admin/cluster/admit", json!({"id": "w1", "key": key}))).await;
    assert_eq!(admitted.status, StatusCode::OK, "{}", admitted.text);
    assert_eq!(admitted.body, json!({"id": "w1", "key": key, "admission": "admitted"}));
    let revoked = send(&h.app, post("/admin/cluster/revoke", json!({"id": "w1"}))).await;
    assert_eq!(revoked.body["admission"], "revoked");
    let again = send(&h.app, post("/admin/cluster/revoke", json!({"id": "w1"}))).await;
    assert_problem(&again, StatusCode::NOT_FOUND, "unknown_node");
    let kinds = h.log.kinds();
    assert!(
        kinds.contains(&"cluster.node.admitted".to_owned())
            && kinds.contains(&"cluster.node.revoked".to_owned()),
        "{kinds:?}"
    );
}

#[tokio::test]
async fn governor_hints_merge_and_at_the_home_become_routing_hints() {
    let h = harness().await;
    let set = |body: Value| post("/admin/governor/hints", body);
    assert_eq!(
        send(&h.app, set(json!({"slo_ms": 200, "mode": "fast"}))).await.status,
        StatusCode::OK
    );
    assert_eq!(send(&h.app, set(json!({"slo_ms": 50}))).await.status, StatusCode::OK);
    let hints = send(&h.app, get("/admin/governor/hints", Some(TOKEN))).await.body;
    assert_eq!(hints, json!({"slo_ms": 50, "mode": "fast"}));
    assert_problem(
        &send(&h.app, set(json!({"slo": 1}))).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
    );
    assert_problem(
        &send(&h.app, set(json!({"slo_ms": "soon"}))).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
    );
    let long = "x".repeat(2_000);
    assert_problem(
        &send(&h.app, set(json!({"joiner": long}))).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
    );
    let profile = |body: Value| post("/admin/governor/profile", body);
    assert_problem(
        &send(&h.app, profile(json!({"name": " "}))).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
    );
    assert_eq!(send(&h.app, profile(json!({"name": "balanced"}))).await.status, StatusCode::OK);
    let reply = send(&h.app, get("/admin/governor/profile", Some(TOKEN))).await;
    assert_eq!(reply.body, json!({"profile": "balanced"}));

    // At the Home the same settings go out as the workspace's routing hints.
    assert_eq!(
        send(&h.app, post("/admin/hierarchy/role", json!({"role": "home"}))).await.status,
        StatusCode::OK
    );
    let state = send(&h.app, get("/admin/hierarchy/state", Some(TOKEN))).await.body;
    assert_eq!(
        state["home"]["routing"],
        json!({"profile": "balanced", "hints": {"slo_ms": 50, "mode": "fast"}})
    );
    send(&h.app, post("/admin/events/test", json!({}))).await;
    let changed: Vec<Value> = h
        .log
        .take()
        .into_iter()
        .filter(|e| e.envelope.kind == "governor.changed")
        .map(|e| e.envelope.payload)
        .collect();
    assert_eq!(changed.len(), 3, "{changed:?}");
    assert_eq!(changed[2]["profile"], "balanced");
    assert_eq!(changed[0]["params"], json!({"slo_ms": 200, "mode": "fast"}));
}

/// X-Request-Id and X-ARW-Corr come back as sent; without them every response gets new ones,
/// a refused request too.
#[tokio::test]
async fn correlation_headers_are_echoed_or_made() {
    let h = harness().await;
    let ask = |headers: &[(&str, &str)], token: Option<&str>| {
        let mut request = get("/state/cluster", token);
        for (name, value) in headers {
            request.headers_mut().insert(
                axum::http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                value.parse().expect("value"),
            );
        }
        let app = h.app.clone();
        async move {
            let response = tower::ServiceExt::oneshot(app, request).await.expect("infallible");
            let header = |name: &str| {
                response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
            };
            (header("x-request-id"), header("x-arw-corr"), header("x-arw-corr-source"))
        }
    };
    let (id, corr, source) = ask(&[("x-request-id", "req-42")], Some(TOKEN)).await;
    assert_eq!(
        (id.as_deref(), corr.as_deref(), source.as_deref()),
        (Some("req-42"), Some("req-42"), Some("x-request-id"))
    );
    let (id, corr, source) =
        ask(&[("x-request-id", "req-43"), ("x-arw-corr", "flow-7")], None).await;
    assert_eq!(
        (id.as_deref(), corr.as_deref(), source.as_deref()),
        (Some("req-43"), Some("flow-7"), Some("x-arw-corr")),
        "on a 401 too"
    );
    let (id, corr, source) = ask(&[], Some(TOKEN)).await;
    let (id, corr) = (id.expect("a request id"), corr.expect("a correlation id"));
    assert_eq!((id.len(), source.as_deref()), (36, Some("generated")));
    assert_eq!(id, corr);
    // An id that is not a short printable token is replaced, not echoed.
    let long = "x".repeat(200);
    let (id, _, _) = ask(&[("x-request-id", long.as_str())], Some(TOKEN)).await;
    assert_ne!(id.as_deref(), Some(long.as_str()));
}

/// `/admin/governor` (the runbook's route) sets and shows profile and hints together; a bad
/// part refuses the whole request, changing nothing.
#[tokio::test]
async fn the_governor_route_sets_profile_and_hints_together_or_not_at_all() {
    let h = harness().await;
    let set = |body: Value| post("/admin/governor", body);
    let reply =
        send(&h.app, set(json!({"profile": "performance", "hints": {"offload": "prefer"}}))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let shown = send(&h.app, get("/admin/governor", Some(TOKEN))).await.body;
    assert_eq!(shown, json!({"profile": "performance", "hints": {"offload": "prefer"}}));
    for bad in [
        json!({"profile": "eco", "hints": {"slo_ms": "soon"}}),
        json!({"profile": "", "hints": {"slo_ms": 10}}),
        json!({"profile": "eco", "extra": 1}),
        json!({}),
        json!(["profile"]),
    ] {
        assert_problem(
            &send(&h.app, set(bad)).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        );
    }
    let shown = send(&h.app, get("/admin/governor", Some(TOKEN))).await.body;
    assert_eq!(shown, json!({"profile": "performance", "hints": {"offload": "prefer"}}));
    assert_eq!(send(&h.app, get("/admin/governor", None)).await.status, StatusCode::UNAUTHORIZED);
}
