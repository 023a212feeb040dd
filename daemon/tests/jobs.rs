//! Jobs across real `arw-server` processes on loopback libp2p: placement by capability and
//! admission, a worker killed mid-run, default-deny kinds, and idempotent submission.

mod common;

use std::time::Duration;

use serde_json::{Value, json};

const CLUSTER: &str =
    "[cluster]\nenabled = true\nmdns = false\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\n";

fn config(bootstrap: Option<&str>, allow: &[&str]) -> String {
    let mut config = CLUSTER.to_owned();
    if let Some(addr) = bootstrap {
        config.push_str(&format!("bootstrap = [\"{addr}\"]\n"));
    }
    config.push_str(&format!("[jobs]\nslots = 2\n[jobs.remote]\nallow = {}\n", json!(allow)));
    config
}

fn submit(server: &common::Server, body: &Value) -> String {
    let (status, reply) = server.post("/actions", body);
    assert_eq!(status, 202, "{reply}");
    reply["id"].as_str().expect("job id").to_owned()
}

/// Waits until job `id` on `server` has ended; returns it.
fn ended(server: &common::Server, id: &str, limit: Duration) -> Value {
    common::eventually(limit, "the job to end", || {
        let (_, job) = server.get(&format!("/actions/{id}"));
        let state = job["state"].as_str().unwrap_or_default();
        ["completed", "failed"].contains(&state).then_some(job.clone()).ok_or(job.to_string())
    })
}

/// A node `home` with its state in `dir`, federating on loopback.
fn start_home(dir: &std::path::Path) -> common::Server {
    common::Launch::new()
        .state_dir(dir)
        .env("ARW_NODE_ID", "home")
        .config(&config(None, &[]))
        .start()
}

/// Makes `home` the Home; its key (for workers' ARW_HOME_KEY) and p2p address (to bootstrap).
fn make_home(home: &common::Server) -> (String, String) {
    assert_eq!(home.post("/admin/hierarchy/role", &json!({"role": "home"})).0, 200);
    let home_key = home.get("/admin/hierarchy/state").1["home"]["home_key"]
        .as_str()
        .expect("the Home pins itself")
        .to_owned();
    let boot = home.endpoints["p2p"][0].as_str().expect("p2p address").to_owned();
    (home_key, boot)
}

#[test]
fn the_home_places_jobs_by_capability_and_reassigns_a_killed_worker_s_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = start_home(&dir.path().join("home"));
    let (home_key, boot) = make_home(&home);
    let worker = |id: &str, allow: &[&str]| {
        common::Launch::new()
            .state_dir(&dir.path().join(id))
            .env("ARW_NODE_ID", id)
            .env("ARW_HOME_KEY", &home_key)
            .config(&config(Some(&boot), allow))
            .start()
    };
    let gpu = worker("w-gpu", &["math.*", "sleep", "echo"]);
    let cpu = worker("w-cpu", &["math.*", "sleep"]);
    let pending = worker("w-pending", &["*"]);
    let hello = json!({"id": "w-gpu", "role": "edge", "capabilities": ["gpu:nvidia-test"],
        "scope_tags": [], "epoch": 1, "nonce": "n1"});
    assert_eq!(gpu.post("/admin/hierarchy/hello", &hello).0, 200);
    for id in ["w-gpu", "w-cpu"] {
        common::eventually(Duration::from_secs(20), "the worker seen and admitted", || {
            let (status, body) = home.post("/admin/cluster/admit", &json!({"id": id}));
            (status == 200).then_some(()).ok_or(format!("{status} {body}"))
        });
    }
    // Both admitted workers advertise what they take, and apply the Home's policy.
    common::eventually(Duration::from_secs(20), "workers ready for jobs", || {
        let (_, view) = home.get("/state/cluster");
        let nodes = view["nodes"].as_array().cloned().unwrap_or_default();
        let ready = |id: &str| {
            nodes.iter().any(|n| {
                n["id"] == id
                    && n["health"] == "ok"
                    && n["jobs"]["accepts"].is_array()
                    && n["capabilities"]["declared"].to_string().contains(if id == "w-gpu" {
                        "gpu"
                    } else {
                        ""
                    })
            })
        };
        let applied = [&gpu, &cpu]
            .iter()
            .all(|w| w.get("/admin/hierarchy/state").1["home"]["takes_work"] == true);
        (ready("w-gpu") && ready("w-cpu") && ready("w-pending") && applied)
            .then_some(())
            .ok_or(view.to_string())
    });

    // A GPU job goes to the one node with a GPU.
    let id = submit(
        &home,
        &json!({"kind": "math.add", "input": {"a": 1, "b": 2},
        "placement": {"require": {"gpu": {"count": 1, "vendor": "nvidia"}}}}),
    );
    let job = ended(&home, &id, Duration::from_secs(20));
    assert_eq!(
        (job["state"].as_str(), job["node_id"].as_str()),
        (Some("completed"), Some("w-gpu")),
        "{job}"
    );
    assert_eq!(job["output"], json!({"sum": 3.0}));

    // A kind only the GPU worker allows, pinned to the CPU worker: nobody may run it, and the
    // failure says why, at once.
    let id = submit(&home, &json!({"kind": "echo", "placement": {"node": "w-cpu"}}));
    let job = ended(&home, &id, Duration::from_secs(5));
    assert_eq!(job["state"], "failed", "{job}");
    let explain = &job["error"]["explain"]["filtered"];
    assert_eq!(explain["kind_not_allowed"], 1, "{job}");

    // Remote-preferred jobs never go to the node the Home has not admitted.
    let ids: Vec<String> = (0..6)
        .map(|i| {
            submit(
                &home,
                &json!({"kind": "math.add", "input": {"a": i, "b": 1},
            "placement": {"prefer": "remote"}}),
            )
        })
        .collect();
    for id in &ids {
        let job = ended(&home, id, Duration::from_secs(20));
        assert_eq!(job["state"], "completed", "{job}");
        assert!(["w-gpu", "w-cpu"].contains(&job["node_id"].as_str().unwrap_or_default()), "{job}");
    }

    // A worker killed mid-run: its job runs again elsewhere, with a higher attempt, and only one
    // result is ever accepted.
    let id = submit(
        &home,
        &json!({"kind": "sleep", "input": {"ms": 4000}, "idem_key": "slow-1",
        "placement": {"prefer": "remote"}}),
    );
    let owner = common::eventually(Duration::from_secs(10), "the slow job running", || {
        let job = home.get(&format!("/actions/{id}")).1;
        (job["state"] == "running")
            .then(|| job["node_id"].as_str().map(str::to_owned))
            .flatten()
            .ok_or(job.to_string())
    });
    let (victim, survivor) = if owner == "w-gpu" { (gpu, cpu) } else { (cpu, gpu) };
    victim.kill();
    let job = ended(&home, &id, Duration::from_secs(30));
    assert_eq!(job["state"], "completed", "{job}");
    let attempts = job["attempts"].as_array().cloned().unwrap_or_default();
    assert!(job["attempt"].as_u64() >= Some(2), "{job}");
    assert_eq!(attempts.iter().filter(|a| a["state"] == "completed").count(), 1, "{job}");
    assert_eq!(attempts[0]["state"], "lost", "{job}");
    assert_ne!(job["node_id"].as_str(), Some(owner.as_str()), "{job}");
    let fences: Vec<u64> = attempts.iter().filter_map(|a| a["fence"].as_u64()).collect();
    assert!(fences.windows(2).all(|w| w[0] < w[1]), "fences rise: {fences:?}");

    // The same idempotency key, sent concurrently, is one job.
    let body = json!({"kind": "echo", "input": {"n": 1}, "idem_key": "once"});
    let ids: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8).map(|_| s.spawn(|| submit(&home, &body))).collect();
        handles.into_iter().map(|h| h.join().expect("submit thread")).collect()
    });
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    let (status, conflict) =
        home.post("/actions", &json!({"kind": "echo", "input": {"n": 2}, "idem_key": "once"}));
    assert_eq!((status, conflict["code"].as_str()), (409, Some("idempotency_conflict")));

    let (_, listing) = home.get("/state/actions?node_id=w-pending");
    assert_eq!(listing["items"], json!([]), "the pending worker got nothing");
    drop((survivor, pending));
}

fn cli_ok(args: &[&str], server: &common::Server) -> String {
    let base = server.base();
    let mut all = args.to_vec();
    all.extend(["--base", &base]);
    let out = common::cli(&all, &[("ARW_ADMIN_TOKEN", server.token.as_str())]);
    assert!(out.status.success(), "arw-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_cli_submits_lists_shows_cancels_and_drains() {
    let node = common::Launch::new().config(&config(None, &["sleep"])).start();
    let done =
        cli_ok(&["actions", "submit", "math.add", "--input", r#"{"a":2,"b":3}"#, "--wait"], &node);
    assert!(done.contains("State     : completed") && done.contains(r#"{"sum":5.0}"#), "{done}");

    let id = cli_ok(&["actions", "submit", "sleep", "--input", r#"{"ms":60000}"#], &node);
    let id = id.trim();
    common::eventually(Duration::from_secs(10), "the sleep running", || {
        let listed = cli_ok(&["actions", "list", "--state", "running"], &node);
        listed.contains(&id[..30]).then_some(()).ok_or(listed)
    });
    assert_eq!(cli_ok(&["actions", "cancel", id], &node), format!("cancelled {id}\n"));
    let shown = cli_ok(&["actions", "show", id], &node);
    assert!(shown.contains("State     : failed") && shown.contains("cancelled"), "{shown}");

    // A job nobody can run fails at once, and --wait says why (exit status 1).
    let out = common::cli(
        &["actions", "submit", "gpu.train", "--wait", "--base", &node.base()],
        &[("ARW_ADMIN_TOKEN", node.token.as_str())],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("infeasible"), "{stderr}");

    assert_eq!(cli_ok(&["jobs", "drain"], &node), "draining: no new jobs from the Home\n");
    common::eventually(Duration::from_secs(10), "the drain advertised", || {
        let (_, view) = node.get("/state/cluster");
        let jobs = view["nodes"][0]["jobs"].clone();
        (jobs["draining"] == true && jobs["accepts"] == json!(["sleep"]))
            .then_some(())
            .ok_or(view.to_string())
    });
}

#[test]
fn large_inputs_fit_and_ended_jobs_cannot_be_cancelled() {
    let node = common::Launch::new().start();
    let big = "x".repeat(200 * 1024);
    let id = submit(&node, &json!({"kind": "echo", "input": {"blob": big}}));
    let job = ended(&node, &id, Duration::from_secs(10));
    assert_eq!(job["output"]["blob"].as_str().map(str::len), Some(200 * 1024));
    let (status, problem) = node.post(&format!("/actions/{id}/cancel"), &json!({}));
    assert_eq!((status, problem["code"].as_str()), (409, Some("job_ended")));
    let (status, _) = node.post("/actions/no-such-job/cancel", &json!({}));
    assert_eq!(status, 404);
    // The reference's listing filters.
    let add = submit(&node, &json!({"kind": "math.add", "input": {"a": 1, "b": 1}}));
    ended(&node, &add, Duration::from_secs(10));
    let kinds = |query: &str| {
        let (status, page) = node.get(&format!("/state/actions?{query}"));
        assert_eq!(status, 200, "{query}: {page}");
        let items = page["items"].as_array().cloned().unwrap_or_default();
        items.iter().filter_map(|i| i["kind"].as_str().map(str::to_owned)).collect::<Vec<_>>()
    };
    assert_eq!(kinds("kind_prefix=ech"), vec!["echo".to_owned()]);
    assert_eq!(kinds("kind_prefix=math."), vec!["math.add".to_owned()]);
    assert_eq!(
        kinds("kind_prefix=%25"),
        Vec::<String>::new(),
        "a prefix is literal, not a pattern"
    );
    assert_eq!(kinds("updated_since=2999-01-01T00:00:00Z"), Vec::<String>::new());
    assert_eq!(kinds("updated_since=2000-01-01T00:00:00Z&limit=2000").len(), 2);
    assert_eq!(node.get("/state/actions?updated_since=yesterday").0, 400);
    assert_eq!(node.get("/state/actions?limit=2001").0, 400);
    let too_big = "x".repeat(300 * 1024);
    let (status, problem) = node.post("/actions", &json!({"kind": "echo", "input": too_big}));
    assert_eq!((status, problem["code"].as_str()), (413, Some("payload_too_large")));
}

#[test]
fn a_home_killed_and_restarted_mid_run_keeps_the_worker_s_attempt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home_dir = dir.path().join("home");
    let home = start_home(&home_dir);
    let (home_key, boot) = make_home(&home);
    let worker = common::Launch::new()
        .state_dir(&dir.path().join("w1"))
        .env("ARW_NODE_ID", "w1")
        .env("ARW_HOME_KEY", &home_key)
        .config(&config(Some(&boot), &["sleep"]))
        .start();
    common::eventually(Duration::from_secs(20), "w1 admitted and applying", || {
        let (status, body) = home.post("/admin/cluster/admit", &json!({"id": "w1"}));
        let applied = worker.get("/admin/hierarchy/state").1["home"]["takes_work"] == true;
        (status == 200 && applied).then_some(()).ok_or(format!("{status} {body}"))
    });
    let id = submit(
        &home,
        &json!({"kind": "sleep", "input": {"ms": 2500}, "idem_key": "h1",
        "placement": {"prefer": "remote"}}),
    );
    common::eventually(Duration::from_secs(10), "the job running on w1", || {
        let job = home.get(&format!("/actions/{id}")).1;
        (job["state"] == "running" && job["node_id"] == "w1").then_some(()).ok_or(job.to_string())
    });
    home.kill();
    let home = start_home(&home_dir);
    // The restarted Home takes the attempt up again: the worker's renewals keep it, its result
    // is accepted; nothing runs twice.
    let job = ended(&home, &id, Duration::from_secs(30));
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!((job["attempt"].as_u64(), job["node_id"].as_str()), (Some(1), Some("w1")), "{job}");
    assert_eq!(job["attempts"].as_array().map(Vec::len), Some(1), "{job}");
    drop(worker);
}

/// The runtime matrix across processes: a worker's program that keeps failing is quarantined,
/// the Home's `/state/runtime_matrix` says so and places that kind on the other worker only;
/// after the cool-down it runs there again, and one good run makes it ready.
#[test]
fn a_runtime_failing_past_its_budget_is_quarantined_and_returns_after_its_cool_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = start_home(&dir.path().join("home"));
    let (home_key, boot) = make_home(&home);
    let worker = |id: &str| {
        let marker = dir.path().join(format!("{id}-healthy"));
        let script = format!("test -e {} && echo '{{\"ran\":true}}'", marker.display());
        let mut config = config(Some(&boot), &["flaky"]);
        config.push_str(&format!(
            "[jobs.exec.flaky]\nargv = [\"/bin/sh\", \"-c\", {}]\n\
             [jobs.runtime]\nfailures = 2\nwindow_ms = 60000\ncooldown_ms = 3000\n",
            json!(script)
        ));
        let server = common::Launch::new()
            .state_dir(&dir.path().join(id))
            .env("ARW_NODE_ID", id)
            .env("ARW_HOME_KEY", &home_key)
            .config(&config)
            .start();
        (server, marker)
    };
    let (w1, w1_healthy) = worker("w1");
    let (w2, w2_healthy) = worker("w2");
    std::fs::write(&w2_healthy, "").expect("marker");
    for id in ["w1", "w2"] {
        common::eventually(Duration::from_secs(20), "the worker seen and admitted", || {
            let (status, body) = home.post("/admin/cluster/admit", &json!({"id": id}));
            (status == 200).then_some(()).ok_or(format!("{status} {body}"))
        });
    }
    let runtime = |server: &common::Server, node: &str| {
        let (_, matrix) = server.get(&format!("/state/runtime_matrix?node_id={node}"));
        let rows = matrix["items"][node]["runtimes"].as_array().cloned().unwrap_or_default();
        rows.into_iter().find(|r| r["id"] == "exec:flaky").unwrap_or(Value::Null)
    };
    common::eventually(Duration::from_secs(20), "both workers ready, on the Home's matrix", || {
        let applied = [&w1, &w2]
            .iter()
            .all(|w| w.get("/admin/hierarchy/state").1["home"]["takes_work"] == true);
        let ready = ["w1", "w2"].iter().all(|id| runtime(&home, id)["health"] == "ready");
        (applied && ready).then_some(()).ok_or(home.get("/state/runtime_matrix").1.to_string())
    });

    // Two faults on w1 (its program exits 1): the budget is spent.
    let on_w1 = json!({"kind": "flaky", "placement": {"node": "w1"}, "retry": {"max_attempts": 1}});
    for _ in 0..2 {
        let job = ended(&home, &submit(&home, &on_w1), Duration::from_secs(20));
        assert_eq!((job["state"].as_str(), job["node_id"].as_str()), (Some("failed"), Some("w1")));
    }
    let quarantined = runtime(&w1, "w1");
    assert_eq!(quarantined["health"], "down", "{quarantined}");
    assert_eq!(quarantined["quarantines"], 1);
    assert_eq!(quarantined["last_error"], "exit status 1");
    common::eventually(Duration::from_secs(10), "the Home's matrix to show it", || {
        let row = runtime(&home, "w1");
        (row["health"] == "down").then_some(()).ok_or(row.to_string())
    });
    let (_, matrix) = home.get("/state/runtime_matrix");
    assert_eq!(matrix["items"]["w1"]["status"]["code"], "down", "{matrix}");
    assert_eq!(matrix["items"]["w2"]["status"]["code"], "ok", "{matrix}");
    let table = cli_ok(&["state", "runtime-matrix"], &home);
    assert!(table.lines().any(|l| l.starts_with("w1") && l.contains("quarantined")), "{table}");

    // Meanwhile that kind goes to w2 only, and a job only w1 may run waits instead of failing.
    let ids: Vec<String> = (0..4).map(|_| submit(&home, &json!({"kind": "flaky"}))).collect();
    let waiting = submit(&home, &on_w1);
    for id in &ids {
        let job = ended(&home, id, Duration::from_secs(20));
        assert_eq!(
            (job["state"].as_str(), job["node_id"].as_str()),
            (Some("completed"), Some("w2"))
        );
    }
    let (_, job) = home.get(&format!("/actions/{waiting}"));
    assert_eq!(job["state"], "queued", "{job}");

    // w1's program is mended; after the cool-down the waiting job runs there, and w1 is ready.
    std::fs::write(&w1_healthy, "").expect("marker");
    let job = ended(&home, &waiting, Duration::from_secs(20));
    assert_eq!((job["state"].as_str(), job["node_id"].as_str()), (Some("completed"), Some("w1")));
    assert_eq!(runtime(&w1, "w1")["health"], "ready");
    common::eventually(Duration::from_secs(10), "the Home's matrix to show w1 ready", || {
        let row = runtime(&home, "w1");
        (row["health"] == "ready").then_some(()).ok_or(row.to_string())
    });
    let (_, journal) = w1.get("/admin/events/journal?prefix=runtime.health");
    let codes: Vec<&str> = journal["entries"]
        .as_array()
        .map(|e| e.iter().filter_map(|x| x["payload"]["status"]["code"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(codes, ["degraded", "down", "degraded", "ok"], "{journal}");
    let metrics = common::metrics(&w1);
    let quarantines = "arw_runtime_quarantines_total{runtime=\"exec:flaky\"} 1";
    assert!(metrics.contains(quarantines), "{metrics}");
    let ready = "arw_runtime_health{runtime=\"exec:flaky\",health=\"ready\"} 1";
    assert!(metrics.contains(ready), "{metrics}");
}
