//! Three arw-server processes federating over loopback: convergence through a bootstrap peer,
//! crash detection, graceful leave, restart.

mod common;

use std::time::{Duration, Instant};

use serde_json::Value;

const CLUSTER: &str =
    "[cluster]\nenabled = true\nmdns = false\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\n";

fn start(id: &str, state: &std::path::Path, bootstrap: Option<&str>) -> common::Server {
    launch(id, state, bootstrap).start()
}

fn launch(id: &str, state: &std::path::Path, bootstrap: Option<&str>) -> common::Launch {
    let mut config = CLUSTER.to_owned();
    if let Some(addr) = bootstrap {
        config.push_str(&format!("bootstrap = [\"{addr}\"]\n"));
    }
    common::Launch::new().state_dir(state).env("ARW_NODE_ID", id).config(&config)
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
    common::eventually(limit, what, || {
        let nodes = health(server);
        check(&nodes).then_some(()).ok_or_else(|| format!("{nodes:?}"))
    });
    started.elapsed()
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
    // What an operator alerts on, from the same view.
    let text = common::metrics(&a);
    assert!(text.contains("\narw_cluster_nodes{health=\"ok\"} 3\n"), "{text}");
    assert!(text.contains("\narw_cluster_connections 2\n"), "{text}");
    assert!(text.contains("\narw_journal_rows "), "{text}");
    // libp2p's own, in the same registry.
    assert!(text.contains("\narw_libp2p_swarm_connections_established_total{"), "{text}");
    assert!(text.contains("\narw_libp2p_gossipsub_mesh_peer_counts{"), "{text}");

    // A crash: no leave, so the others must notice on their own.
    c.kill();
    let seen = wait_for(&a, Duration::from_secs(10), "node-c not ok after kill -9", |nodes| {
        state_of(nodes, "node-c").is_some_and(|(h, _)| h != "ok")
    });
    eprintln!("crash noticed by node-a after {seen:?}");
    let text = common::metrics(&a);
    assert!(text.contains("\narw_cluster_nodes{health=\"ok\"} 2\n"), "{text}");
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

/// Sends `signal` (`STOP`, `CONT`) to `server`'s process.
fn signal(server: &common::Server, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &server.pid().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{signal}");
}

/// A node frozen for longer than `down_after` (SIGSTOP: a swapping machine, a paused VM) does
/// not take its own silence for its peers' when it runs again: it never marks them down, and
/// it says it was slow. Five nodes, so some of the nodes it watches are not among its own
/// watchers, whose reports about it would otherwise be the signs of life it needs.
#[test]
fn a_stalled_process_does_not_mark_its_peers_down_when_it_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start("node-a", &dir.path().join("a"), None);
    let boot = a.endpoints["p2p"][0].as_str().expect("p2p address").to_owned();
    let others: Vec<common::Server> = ["node-b", "node-c", "node-d", "node-e"]
        .iter()
        .map(|id| start(id, &dir.path().join(id), Some(&boot)))
        .collect();
    let all = |nodes: &[(String, String, u64)]| {
        nodes.len() == 5 && nodes.iter().all(|(_, h, _)| h == "ok")
    };
    for server in std::iter::once(&a).chain(&others) {
        wait_for(server, Duration::from_secs(30), "all five ok", all);
    }
    let journal_end = |server: &common::Server| -> i64 {
        let page = server.get("/admin/events/journal?limit=1000").1;
        page["entries"]
            .as_array()
            .and_then(|e| e.last())
            .and_then(|e| e["id"].as_i64())
            .unwrap_or(0)
    };
    let before = journal_end(&a);

    signal(&a, "STOP");
    // The others see it go: the stall lasts past down_after.
    for server in &others {
        wait_for(server, Duration::from_secs(20), "node-a down", |nodes| {
            state_of(nodes, "node-a").is_some_and(|(h, _)| h == "down")
        });
    }
    signal(&a, "CONT");

    // It notices its own stall, and the others see it back.
    common::eventually(Duration::from_secs(20), "node-a to say it was slow", || {
        let slowdown = a.get("/admin/hierarchy/state").1["liveness"]["slowdown"].as_u64();
        (slowdown > Some(1)).then_some(()).ok_or_else(|| format!("{slowdown:?}"))
    });
    for server in &others {
        wait_for(server, Duration::from_secs(20), "node-a ok again", |nodes| {
            state_of(nodes, "node-a").is_some_and(|(h, _)| h == "ok")
        });
    }
    let page = a
        .get(&format!(
            "/admin/events/journal?prefix=cluster.node.changed&after={before}&limit=1000"
        ))
        .1;
    let judged: Vec<(String, String)> = page["entries"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter(|x| x["payload"]["previous_health"].is_string())
                .map(|x| {
                    let p = &x["payload"];
                    let field = |k: &str| p[k].as_str().unwrap_or_default().to_owned();
                    (field("id"), field("health"))
                })
                .collect()
        })
        .unwrap_or_default();
    assert!(judged.iter().all(|(_, h)| h != "down"), "node-a judged a peer down: {judged:?}");
    wait_for(&a, Duration::from_secs(10), "node-a to see all five ok", all);
}

/// README's three-node walk-through, as written: start, status on every node (with another
/// node's token exported, as after the single-node walk-through), a crashed node named as
/// such, stop.
#[test]
fn the_local_cluster_script_starts_three_nodes_that_see_each_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/local-cluster.sh");
    let bin = common::bin_dir();
    let run = |cmd: &str| {
        std::process::Command::new(script)
            .args([cmd, &dir.path().display().to_string()])
            .env("ARW_BIN", &bin)
            .env("ARW_ADMIN_TOKEN", "the-token-of-some-other-node")
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
    // kill -9 node-c: its endpoints.json stays behind, and status says what happened.
    let c_endpoints = dir.path().join("c").join("endpoints.json");
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&c_endpoints).expect("endpoints")).expect("json");
    let pid = c["pid"].as_u64().expect("pid").to_string();
    assert!(
        std::process::Command::new("kill").args(["-9", &pid]).status().expect("kill").success()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let status = run("status");
        let text = String::from_utf8_lossy(&status.stdout).into_owned();
        if text.contains(&format!("not running: pid {pid} in ")) {
            assert_eq!(status.status.code(), Some(1), "{text}");
            break text;
        }
        assert!(Instant::now() < deadline, "node-c's crash not reported: {text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(text.matches("Nodes     : 3").count(), 2, "a and b still answer: {text}");
    assert!(run("stop").status.success());
    for n in ["a", "b"] {
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

/// Runs `arw-cli` and returns its stdout, failing the test on a non-zero exit.
fn cli_ok(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = common::cli(args, env);
    assert!(out.status.success(), "arw-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn admitted_workers_obey_the_home_s_policy_and_refuse_a_rogue_home() {
    let dir = tempfile::tempdir().expect("tempdir");
    let [key, trust, plain, signed] = ["issuer.key", "trust.json", "capsule.json", "signed.json"]
        .map(|f| dir.path().join(f).to_string_lossy().into_owned());
    // The operator's capsule tooling: a key, its trust-store entry, a signed capsule.
    let keygen = cli_ok(&["capsule", "keygen", &key, "--issuer", "ops"], &[]);
    let entry = keygen.lines().last().expect("trust entry");
    std::fs::write(&trust, format!(r#"{{"issuers":[{entry}]}}"#)).expect("trust store");
    let capsule = serde_json::json!({"id": "lockdown", "version": "1", "issued_at_ms": 0,
        "propagate": "children", "hop_ttl": 2, "denies": ["net:*"], "lease_duration_ms": 600_000});
    std::fs::write(&plain, capsule.to_string()).expect("capsule");
    let signed_text =
        cli_ok(&["capsule", "sign-ed25519", &plain, "--key-file", &key, "--issuer", "ops"], &[]);
    std::fs::write(&signed, signed_text).expect("signed capsule");

    let home = common::Launch::new()
        .state_dir(&dir.path().join("home"))
        .env("ARW_NODE_ID", "home-1")
        .env("ARW_TRUST_CAPSULES", &trust)
        .config(CLUSTER)
        .start();
    assert_eq!(home.post("/admin/hierarchy/role", &serde_json::json!({"role": "home"})).0, 200);
    let boot = home.endpoints["p2p"][0].as_str().expect("p2p address").to_owned();
    // w1 trusts the capsule issuer too: capsules from the Home are verified like any other.
    let worker = |id: &str| launch(id, &dir.path().join(id), Some(&boot));
    let w1 = worker("w1").env("ARW_TRUST_CAPSULES", &trust).start();
    let w2 = worker("w2").start();
    wait_for(&home, Duration::from_secs(20), "both workers", |nodes| nodes.len() == 3);
    let home_key = home.get("/admin/hierarchy/state").1["home"]["home_key"].clone();
    assert!(home_key.is_string(), "the Home pins itself");

    let env = [("ARW_ADMIN_TOKEN", home.token.as_str())];
    cli_ok(&["cluster", "admit", "w1", "--base", &home.base()], &env);
    // Admitted, w1 holds the Home's document as a claim until its own operator trusts it.
    let w1_env = [("ARW_ADMIN_TOKEN", w1.token.as_str())];
    let homes = common::eventually(Duration::from_secs(20), "the Home's claim on w1", || {
        let homes = cli_ok(&["cluster", "homes", "--base", &w1.base()], &w1_env);
        homes.starts_with("home-1").then_some(homes.clone()).ok_or(homes)
    });
    let unpinned = w1.get("/admin/hierarchy/state").1["home"].clone();
    assert_eq!(
        (unpinned.get("home_key"), &unpinned["policy_epoch"]),
        (None, &serde_json::json!(0))
    );
    let fingerprint = homes.split_whitespace().nth(1).expect("fingerprint").to_owned();
    let refused =
        common::cli(&["cluster", "trust-home", "00000000deadbeef", "--base", &w1.base()], &w1_env);
    assert!(!refused.status.success(), "a fingerprint nobody claims is refused");
    cli_ok(&["cluster", "trust-home", &fingerprint, "--base", &w1.base()], &w1_env);
    let pinned = common::eventually(Duration::from_secs(20), "w1 pinning the Home", || {
        let home_view = w1.get("/admin/hierarchy/state").1["home"].clone();
        (home_view["pinned_by"] == "operator")
            .then_some(home_view.clone())
            .ok_or(home_view.to_string())
    });
    assert_eq!(pinned["home_key"], home_key);
    assert_eq!(pinned["admitted"], serde_json::json!(["w1"]));

    // The Home's governor hints are the workspace's routing hints; a worker's own win.
    let hints = serde_json::json!({"slo_ms": 120, "mode": "batch"});
    assert_eq!(home.post("/admin/governor/hints", &hints).0, 200);
    common::eventually(Duration::from_secs(20), "the Home's routing hints on w1", || {
        let effective = w1.get("/admin/governor/hints").1;
        (effective == hints).then_some(()).ok_or(effective.to_string())
    });
    assert_eq!(w1.post("/admin/governor/hints", &serde_json::json!({"slo_ms": 30})).0, 200);
    let effective = w1.get("/admin/governor/hints").1;
    assert_eq!(effective, serde_json::json!({"slo_ms": 30, "mode": "batch"}));

    let adopted = cli_ok(&["capsule", "adopt", &signed, "--base", &home.base()], &env);
    assert!(adopted.starts_with("lockdown adopted (active"), "{adopted}");
    let held = common::eventually(Duration::from_secs(20), "the Home's capsule on w1", || {
        let items = w1.get("/state/policy/capsules").1["items"].clone();
        let found =
            items.as_array().and_then(|i| i.iter().find(|c| c["id"] == "lockdown")).cloned();
        found.ok_or(items.to_string())
    });
    assert_eq!((held["source"].as_str(), held["remaining_hops"].as_u64()), (Some("home"), Some(1)));
    assert_eq!(held["policy_epoch"], w1.get("/admin/hierarchy/state").1["home"]["policy_epoch"]);
    let status =
        cli_ok(&["capsule", "status", "--base", &w1.base(), "--admin-token", &w1.token], &[]);
    assert!(status.contains("lockdown") && status.contains("home"), "{status}");
    // w2 is pending: it pinned nobody and holds nothing from the Home.
    let w2_home = w2.get("/admin/hierarchy/state").1["home"].clone();
    assert_eq!(
        (w2_home["policy_epoch"].as_u64(), w2_home.get("home_key")),
        (Some(0), None),
        "{w2_home}"
    );
    assert_eq!(w2.get("/state/policy/capsules").1["count"], 0);

    // w2 claims to be the Home and signs its own policy: w1 refuses it and says so.
    let epoch = pinned["policy_epoch"].clone();
    assert_eq!(w2.post("/admin/hierarchy/role", &serde_json::json!({"role": "home"})).0, 200);
    common::eventually(Duration::from_secs(20), "w1 refusing w2's policy", || {
        let page = w1.get("/admin/events/journal?prefix=cluster.event.rejected").1;
        let refused = page["entries"].as_array().is_some_and(|e| {
            e.iter().any(|e| {
                e["payload"]["kind"] == "policy" && e["payload"]["reason"] == "untrusted_home"
            })
        });
        refused.then_some(()).ok_or(page.to_string())
    });
    let after = w1.get("/admin/hierarchy/state").1["home"].clone();
    assert_eq!((&after["home_key"], &after["home_id"]), (&home_key, &serde_json::json!("home-1")));
    assert!(after["policy_epoch"].as_u64() >= epoch.as_u64(), "{after}");
    assert_eq!(w1.get("/state/policy/capsules").1["count"], 1);

    // The Home changes its policy while w1 is down: w1 restarts on what it persisted, then
    // catches up with the newer epoch from its peers.
    let w1_state = w1.state_dir.clone();
    assert!(w1.stop().success());
    let before = home.get("/admin/hierarchy/state").1["home"]["policy_epoch"].as_u64();
    let out = cli_ok(&["capsule", "teardown", "lockdown", "--base", &home.base()], &env);
    assert!(out.starts_with("removed lockdown"), "{out}");
    // Changes within 2 s of the last document are signed together, a moment later.
    let latest = common::eventually(Duration::from_secs(10), "the Home's next epoch", || {
        let epoch = home.get("/admin/hierarchy/state").1["home"]["policy_epoch"].clone();
        (epoch.as_u64() > before).then_some(epoch.clone()).ok_or(epoch.to_string())
    });
    let w1 = launch("w1", &w1_state, Some(&boot)).env("ARW_TRUST_CAPSULES", &trust).start();
    let restored = w1.get("/admin/hierarchy/state").1["home"].clone();
    assert_eq!(
        (&restored["home_key"], &restored["pinned_by"]),
        (&home_key, &serde_json::json!("operator"))
    );
    common::eventually(Duration::from_secs(20), "w1 catching up", || {
        let now = w1.get("/admin/hierarchy/state").1["home"]["policy_epoch"].clone();
        let count = w1.get("/state/policy/capsules").1["count"].clone();
        (now == latest && count == 0).then_some(()).ok_or(format!("epoch {now}, {count} capsules"))
    });

    // A capsule from the Home that denies every hierarchy route cannot lock w1's admin out:
    // the state stays readable, and taking back the trust in the Home drops the capsule.
    let lockout = serde_json::json!({"id": "lockout", "version": "1", "issued_at_ms": 0,
        "propagate": "children", "hop_ttl": 2, "denies": ["hierarchy:*"],
        "lease_duration_ms": 600_000});
    std::fs::write(&plain, lockout.to_string()).expect("capsule");
    let signed_text =
        cli_ok(&["capsule", "sign-ed25519", &plain, "--key-file", &key, "--issuer", "ops"], &[]);
    std::fs::write(&signed, signed_text).expect("signed capsule");
    cli_ok(&["capsule", "adopt", &signed, "--base", &home.base()], &env);
    let role = serde_json::json!({"role": "edge"});
    common::eventually(Duration::from_secs(20), "the lockout on w1", || {
        let (status, body) = w1.post("/admin/hierarchy/role", &role);
        (status == 403).then_some(()).ok_or(format!("{status} {body}"))
    });
    assert_eq!(w1.get("/admin/hierarchy/state").0, 200, "the admin can always look");
    let w1_env = [("ARW_ADMIN_TOKEN", w1.token.as_str())];
    cli_ok(&["cluster", "untrust-home", "--base", &w1.base()], &w1_env);
    let freed = w1.get("/admin/hierarchy/state").1["home"].clone();
    assert_eq!((freed.get("home_key"), &freed["policy_epoch"]), (None, &serde_json::json!(0)));
    assert_eq!(w1.get("/state/policy/capsules").1["count"], 0);
    assert_eq!(w1.post("/admin/hierarchy/role", &role).0, 200, "the lockout went with its Home");
}

/// A second node given a p2p port the first already listens on refuses to start, saying why,
/// rather than sharing the port (libp2p listens with SO_REUSEPORT).
#[test]
fn a_second_node_on_a_taken_p2p_port_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start("node-a", &dir.path().join("a"), None);
    let taken = a.endpoints["p2p"][0].as_str().expect("p2p address");
    let taken = taken.split("/p2p/").next().expect("address").to_owned();
    let b_state = dir.path().join("b");
    std::fs::create_dir_all(&b_state).expect("state dir");
    let config = format!("[cluster]\nenabled = true\nmdns = false\nlisten = [\"{taken}\"]\n");
    std::fs::write(b_state.join("config.toml"), config).expect("config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_arw-server"))
        .env_clear()
        .env("ARW_STATE_DIR", &b_state)
        .env("ARW_CONFIG_DIR", b_state.join("none"))
        .env("ARW_PORT", "0")
        .env("ARW_NODE_ID", "node-b")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot listen for peers on {taken}")), "{err}");
    assert!(err.contains("another arw-server on this host?"), "{err}");
    // The first node is unharmed.
    assert_eq!(a.get("/healthz").0, 200);
}
