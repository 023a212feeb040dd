//! Three arw-server processes federating over loopback: convergence through a bootstrap peer,
//! crash detection, graceful leave, restart.

mod common;

use std::time::{Duration, Instant};

use serde_json::Value;

const CLUSTER: &str =
    "[cluster]\nenabled = true\nmdns = false\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\n";

fn start(id: &str, state: &std::path::Path, bootstrap: Option<&str>) -> common::Server {
    let mut config = CLUSTER.to_owned();
    if let Some(addr) = bootstrap {
        config.push_str(&format!("bootstrap = [\"{addr}\"]\n"));
    }
    common::Launch::new().state_dir(state).env("ARW_NODE_ID", id).config(&config).start()
}

fn health(server: &common::Server) -> Vec<(String, String, u64)> {
    let (status, view) = server.get("/state/cluster");
    assert_eq!(status, 200);
    common::node_rows(&view)
}

/// Polls `server` until `check` holds, at most `limit`; returns how long it took.
fn wait_for(
    server: &common::Server,
    limit: Duration,
    what: &str,
    check: impl Fn(&[(String, String, u64)]) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let nodes = health(server);
        if check(&nodes) {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "{what} not seen within {limit:?}: {nodes:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn state_of(nodes: &[(String, String, u64)], id: &str) -> Option<(String, u64)> {
    nodes.iter().find(|(n, _, _)| n == id).map(|(_, h, s)| (h.clone(), *s))
}

#[test]
fn three_processes_federate_detect_a_crash_a_leave_and_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start("node-a", &dir.path().join("a"), None);
    let boot = a.endpoints["p2p"][0].as_str().expect("p2p address").to_owned();
    let b = start("node-b", &dir.path().join("b"), Some(&boot));
    let c_state = dir.path().join("c");
    let c = start("node-c", &c_state, Some(&boot));

    for server in [&a, &b, &c] {
        wait_for(server, Duration::from_secs(20), "all three ok", |nodes| {
            nodes.len() == 3 && nodes.iter().all(|(_, h, _)| h == "ok")
        });
    }
    let (_, state) = a.get("/admin/hierarchy/state");
    assert_eq!(state["network"]["state"], "connected");
    assert_eq!(state["peers"]["node-b"]["health"], "ok");
    let table =
        common::cli(&["state", "cluster", "--base", &a.base(), "--admin-token", &a.token], &[]);
    let text = String::from_utf8_lossy(&table.stdout);
    for id in ["node-a", "node-b", "node-c"] {
        assert!(
            text.lines().any(|l| l.starts_with(id) && l.contains(" ok ")),
            "{id} missing: {text}"
        );
    }
    let c_seq = state_of(&health(&a), "node-c").map(|(_, s)| s).expect("node-c");

    // A crash: no leave, so the others must notice on their own.
    c.kill();
    let seen = wait_for(&a, Duration::from_secs(10), "node-c not ok after kill -9", |nodes| {
        state_of(nodes, "node-c").is_some_and(|(h, _)| h != "ok")
    });
    eprintln!("crash noticed by node-a after {seen:?}");
    wait_for(&b, Duration::from_secs(10), "node-c down on node-b", |nodes| {
        state_of(nodes, "node-c").is_some_and(|(h, _)| h == "down")
    });

    // A graceful stop says goodbye: left at once.
    let status = b.stop();
    assert!(status.success());
    let seen = wait_for(&a, Duration::from_secs(2), "node-b left", |nodes| {
        state_of(nodes, "node-b").is_some_and(|(h, _)| h == "left")
    });
    eprintln!("leave seen by node-a after {seen:?}");

    // Back from the crash: ok again, with a higher sequence number.
    let c = start("node-c", &c_state, Some(&boot));
    wait_for(&a, Duration::from_secs(20), "node-c back", |nodes| {
        state_of(nodes, "node-c").is_some_and(|(h, s)| h == "ok" && s > c_seq)
    });
    let events: Value = a.get("/admin/events/journal?prefix=cluster.node.changed&limit=1000").1;
    let c_changes: Vec<&str> = events["entries"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter(|x| x["payload"]["id"] == "node-c")
                .filter_map(|x| x["payload"]["health"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert!(c_changes.contains(&"down") && c_changes.last() == Some(&"ok"), "{c_changes:?}");
    drop(c);
}

/// README's three-node walk-through, as written: start, status on every node, stop.
#[test]
fn the_local_cluster_script_starts_three_nodes_that_see_each_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/local-cluster.sh");
    let bin = common::bin_dir();
    let run = |cmd: &str| {
        std::process::Command::new(script)
            .args([cmd, &dir.path().display().to_string()])
            .env("ARW_BIN", &bin)
            .output()
            .expect("run scripts/local-cluster.sh")
    };
    let started = run("start");
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let status = run("status");
        let text = String::from_utf8_lossy(&status.stdout).into_owned();
        let ok_rows = text.lines().filter(|l| l.starts_with("node-") && l.contains(" ok ")).count();
        if status.status.success() && ok_rows == 9 {
            break text;
        }
        assert!(Instant::now() < deadline, "not all nodes see each other: {text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(text.matches("Nodes     : 3").count(), 3, "{text}");
    assert!(run("stop").status.success());
    for n in ["a", "b", "c"] {
        let ready = dir.path().join(n).join("endpoints.json");
        let deadline = Instant::now() + Duration::from_secs(20);
        while ready.exists() {
            assert!(Instant::now() < deadline, "node-{n} did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn admission_of(server: &common::Server, id: &str) -> Option<String> {
    let (_, view) = server.get("/state/cluster");
    view["nodes"].as_array()?.iter().find(|n| n["id"] == id)?["admission"]
        .as_str()
        .map(str::to_owned)
}

#[test]
fn the_home_admits_and_revokes_and_a_second_home_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home_state = dir.path().join("home");
    let home = start("home-1", &home_state, None);
    let boot = home.endpoints["p2p"][0].as_str().expect("p2p address").to_owned();
    let w1 = start("w1", &dir.path().join("w1"), Some(&boot));
    let w2 = start("w2", &dir.path().join("w2"), Some(&boot));
    assert_eq!(home.post("/admin/hierarchy/role", &serde_json::json!({"role": "home"})).0, 200);
    wait_for(&home, Duration::from_secs(20), "both workers", |nodes| nodes.len() == 3);
    assert_eq!(admission_of(&home, "w1").as_deref(), Some("pending"));
    assert_eq!(admission_of(&home, "home-1"), None, "the Home itself needs no admission");
    assert_eq!(admission_of(&w1, "w2"), None, "only the Home reports admission");

    let env = [("ARW_ADMIN_TOKEN", home.token.as_str())];
    let pending = common::cli(&["cluster", "pending", "--base", &home.base()], &env);
    let text = String::from_utf8_lossy(&pending.stdout);
    assert!(text.contains("w1") && text.contains("w2") && text.contains("pending"), "{text}");
    let admit = common::cli(&["cluster", "admit", "w1", "--base", &home.base()], &env);
    assert!(
        String::from_utf8_lossy(&admit.stdout).starts_with("w1 admitted"),
        "{}",
        String::from_utf8_lossy(&admit.stderr)
    );
    assert_eq!(admission_of(&home, "w1").as_deref(), Some("admitted"));
    assert_eq!(admission_of(&home, "w2").as_deref(), Some("pending"));
    let pending = common::cli(&["cluster", "pending", "--base", &home.base()], &env);
    let text = String::from_utf8_lossy(&pending.stdout);
    assert!(!text.contains("w1") && text.contains("w2"), "{text}");

    // The roster survives a restart of the Home.
    assert!(home.stop().success());
    let home = start("home-1", &home_state, None);
    wait_for(&home, Duration::from_secs(20), "workers back", |nodes| {
        nodes.iter().filter(|(_, h, _)| h == "ok").count() == 3
    });
    assert_eq!(admission_of(&home, "w1").as_deref(), Some("admitted"));
    let revoke = common::cli(
        &["cluster", "revoke", "w1", "--base", &home.base(), "--admin-token", &home.token],
        &[],
    );
    assert!(revoke.status.success());
    assert_eq!(admission_of(&home, "w1").as_deref(), Some("revoked"));

    // A second node claiming Home is reported on every node.
    assert_eq!(w2.post("/admin/hierarchy/role", &serde_json::json!({"role": "home"})).0, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, state) = w1.get("/admin/hierarchy/state");
        let claims: Vec<&str> = state["home_conflict"]
            .as_array()
            .map(|c| c.iter().filter_map(|x| x["id"].as_str()).collect())
            .unwrap_or_default();
        if claims == ["home-1", "w2"] {
            break;
        }
        assert!(Instant::now() < deadline, "no Home conflict reported: {state}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let events: Value = home.get("/admin/events/journal?prefix=cluster.home.conflict").1;
    assert!(events["total_matched"].as_u64().unwrap_or(0) >= 1, "{events}");
}
