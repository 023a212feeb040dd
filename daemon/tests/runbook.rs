//! docs/runbook.md, executed: every ```bash block runs, in order, against a real arw-server on a
//! free port, with `curl` failing on HTTP errors. Then the node is restarted on the same state dir
//! and what the runbook configured must still be there.

mod common;

use std::process::Command;

use serde_json::json;

fn runbook_blocks() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/runbook.md"))
        .expect("docs/runbook.md");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```bash") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

#[test]
fn runbook_commands_work_as_written_and_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("state");
    let server = common::Launch::new().state_dir(&state_dir).start();
    let blocks = runbook_blocks();
    assert!(blocks.len() >= 8, "runbook lost its commands: {}", blocks.len());
    let path =
        format!("{}:{}", common::bin_dir().display(), std::env::var("PATH").unwrap_or_default());
    for (i, block) in blocks.iter().enumerate() {
        let script = format!(
            "set -euo pipefail\ncurl() {{ command curl --fail-with-body --max-time 10 \"$@\"; }}\n{}",
            block.replace("http://127.0.0.1:8091", &server.base())
        );
        let out = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .env("PATH", &path)
            .env("ARW_ADMIN_TOKEN", &server.token)
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "runbook block {i} failed:\n{block}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if block.contains("/healthz") {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), r#"{"ok":true}"#);
        }
        if block.contains(r#"select(.id=="worker-gpu-01")"#) {
            let node: serde_json::Value = serde_json::from_slice(&out.stdout).expect("node JSON");
            assert_eq!(node["role"], "edge");
            assert_eq!(node["health"], "ok");
            assert_eq!(node["tags"], json!(["gpu"]));
        }
    }

    let (_, state) = server.get("/admin/hierarchy/state");
    assert_eq!(state["self_node"]["id"], "worker-gpu-01");
    assert_eq!(state["self_node"]["role"], "edge");
    let peer_id = server.endpoints["peer_id"].clone();
    let key = std::fs::read_to_string(state_dir.join("node.key")).expect("key");
    let (_, cluster) = server.get("/state/cluster");
    let seq = cluster["nodes"][0]["seq"].as_u64().expect("seq");

    let status = server.stop();
    assert!(status.success(), "clean shutdown: {status}");
    assert!(!state_dir.join("endpoints.json").exists(), "endpoints.json left after clean shutdown");

    let again = common::Launch::new().state_dir(&state_dir).start();
    assert_eq!(again.endpoints["peer_id"], peer_id, "node key changed across restart");
    assert_eq!(std::fs::read_to_string(state_dir.join("node.key")).expect("key"), key);
    assert_eq!(again.endpoints["node_id"], "worker-gpu-01");
    let (_, state) = again.get("/admin/hierarchy/state");
    assert_eq!(state["self_node"]["role"], "edge");
    assert_eq!(state["self_node"]["tags"], json!(["gpu"]));
    assert_eq!(state["self_node"]["capabilities"], json!(["gpu:rtx-4090"]));
    assert_eq!(state["self_node"]["hello_epoch"], 0);
    let (_, cluster) = again.get("/state/cluster");
    assert!(cluster["nodes"][0]["seq"].as_u64().expect("seq") > seq, "advert seq did not rise");
    // The nonce used before the restart is still remembered.
    let replay = json!({
        "id": "worker-gpu-01", "role": "edge", "capabilities": [], "scope_tags": [],
        "epoch": 0, "nonce": "b75d4d48-3df2-4e1e-8fab-12efab809d4b"
    });
    let (status, body) = again.post("/admin/hierarchy/hello", &replay);
    assert_eq!((status, body["code"].as_str()), (409, Some("nonce_replay")));
}
