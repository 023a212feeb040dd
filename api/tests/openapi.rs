//! The OpenAPI contract: `docs/openapi.json` is the document the router is built with, it is
//! served at `/openapi.json`, and what it says about each route (that it exists, whether it
//! needs the admin token) is what the server does.

mod common;

use axum::{body::Body, http::Request, http::StatusCode};
use serde_json::Value;

use common::*;

const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");

fn generated() -> String {
    arw_api::openapi_doc().to_pretty_json().expect("serialises") + "\n"
}

#[test]
fn the_committed_document_is_the_one_the_routes_make() {
    let fresh = generated();
    if std::env::var_os("ARW_WRITE_OPENAPI").is_some() {
        std::fs::write(COMMITTED, &fresh).expect("write docs/openapi.json");
        return;
    }
    let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
    assert!(
        committed == fresh,
        "docs/openapi.json differs from the routes; regenerate it with \
         `ARW_WRITE_OPENAPI=1 cargo test -p arw-api --test openapi`"
    );
}

#[tokio::test]
async fn the_served_document_is_public_and_every_route_in_it_behaves_as_it_says() {
    let h = harness().await;
    let served = send(&h.app, get("/openapi.json", None)).await;
    assert_eq!(served.status, StatusCode::OK, "{}", served.text);
    assert_eq!(served.content_type, "application/json");
    let doc: Value = serde_json::from_str(&generated()).expect("json");
    assert_eq!(served.body, doc);

    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 34, "{} paths", paths.len());
    let mut checked = 0;
    for (path, item) in paths {
        for (method, operation) in item.as_object().expect("path item") {
            let uri = path.replace("{id}", "job-that-does-not-exist");
            let request = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(&uri)
                .body(Body::empty())
                .expect("request");
            let reply = send(&h.app, request).await;
            let routed = reply.body["code"] != "not_found" || path.contains("{id}");
            assert!(routed, "{method} {path}: {}", reply.text);
            assert_ne!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            let needs_token = operation.get("security").is_some();
            let refused = reply.status == StatusCode::UNAUTHORIZED;
            assert_eq!(needs_token, refused, "{method} {path}: {} {}", reply.status, reply.text);
            let errors = &operation["responses"]["default"]["content"]["application/problem+json"];
            assert!(errors.is_object(), "{method} {path} names no problem+json error");
            checked += 1;
        }
    }
    assert!(checked >= 37, "{checked} operations");
}
