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

#[test]
fn the_home_places_jobs_by_capability_and_reassigns_a_killed_worker_s_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = common::Launch::new()
        .state_dir(&dir.path().join("home"))
        .env("ARW_NODE_ID", "home")
        .config(&config(None, &[]))
        .start();
    assert_eq!(home.post("/admin/hierarchy/role", &json!({"role": "home"})).0, 200);
    let home_key = home.get("/admin/hierarchy/state").1["home"]["home_key"]
        .as_str()
        .expect("the Home pins itself")
        .to_owned();
    let boot = home.endpoints["p2p"][0].as_str().expect("p2p address").to_owned();
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
