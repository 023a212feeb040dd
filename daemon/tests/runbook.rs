//! docs/runbook.md, executed: every ```bash block runs, in order, against a real arw-server on a
//! free port (with the egress ledger on, as the runbook sets it), with `curl` failing on HTTP
//! errors. Then the node is restarted on the same state dir and what the runbook configured must
//! still be there.

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
    // As the runbook asks of every federated node (its "Contribution and egress").
    let launch =
        || common::Launch::new().state_dir(&state_dir).env("ARW_EGRESS_LEDGER_ENABLE", "1");
    let server = launch().start();
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

    let again = launch().start();
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

/// The first ```sh block after `heading` in README.md.
fn readme_block(heading: &str) -> String {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let after = text.split_once(heading).expect("README heading").1;
    let start = after.split_once("```sh\n").expect("a sh block").1;
    start.split_once("```").expect("block end").0.to_owned()
}

/// README's walk-through, run as written by a new user: a node started with no configuration
/// under a fresh `HOME` (so `~/.local/share/arw/admin-token` is the generated one), the commands
/// in one shell. The only substitutions: the server's free port for 8091, the built `arw-cli`
/// for `cargo run … --bin arw-cli --`, and a time limit on the two commands that follow events
/// until Ctrl-C.
#[test]
fn the_readme_walk_through_works_as_written() {
    let home = tempfile::tempdir().expect("tempdir");
    let server = common::Launch::new().home(home.path()).start();
    let block = readme_block("## Walk-through");
    assert!(block.contains("export ARW_ADMIN_TOKEN=$(cat ~/.local/share/arw/admin-token)"));
    let script = format!(
        "set -euo pipefail\n\
         curl() {{ if [[ \" $* \" == *' -N '* ]]; then command curl --max-time 2 \"$@\" || [ $? = 28 ]; \
         else command curl --fail-with-body --max-time 10 \"$@\"; fi; }}\n\
         arw-cli() {{ if [ \"$1\" = events ]; then timeout 3 \"$(type -P arw-cli)\" \"$@\" || [ $? = 124 ]; \
         else command arw-cli \"$@\"; fi; }}\n{}",
        block
            .replace("http://127.0.0.1:8091", &server.base())
            .replace("cargo run -q -p arw-daemon --bin arw-cli --", "arw-cli")
    );
    let path =
        format!("{}:{}", common::bin_dir().display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env_clear()
        .env("PATH", &path)
        .env("HOME", home.path())
        .env("ARW_BASE", server.base())
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "walk-through failed:\n{script}\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.starts_with("{\"ok\":true}"), "healthz: {stdout}");
    assert!(stdout.contains("\"pinned_by\": \"own\""), "the node is the Home: {stdout}");
    assert!(stdout.contains("math.add"), "the job is listed: {stdout}");
    assert!(stdout.contains("event: hierarchy.role.changed"), "live events: {stdout}");
    let (_, state) = server.get("/admin/hierarchy/state");
    assert_eq!(state["self_node"]["role"], "root", "the walk-through leaves a Home");
}
