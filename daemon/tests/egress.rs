//! The contribution and egress ledger across real processes: the Home records each offload
//! with the worker's id and the bytes each way, and keeps it across a kill -9; a worker's job
//! programs go through its egress proxy, which records each request and refuses what the Home's
//! policy denies.

mod common;

use std::{
    io::{Read, Write},
    net::TcpListener,
    time::Duration,
};

use serde_json::{Value, json};

const CLUSTER: &str =
    "[cluster]\nenabled = true\nmdns = false\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\n";

fn config(bootstrap: Option<&str>, extra: &str) -> String {
    let mut config = CLUSTER.to_owned();
    if let Some(addr) = bootstrap {
        config.push_str(&format!("bootstrap = [\"{addr}\"]\n"));
    }
    config.push_str(extra);
    config
}

fn submit(server: &common::Server, body: &Value) -> String {
    let (status, reply) = server.post("/actions", body);
    assert_eq!(status, 202, "{reply}");
    reply["id"].as_str().expect("job id").to_owned()
}

fn ended(server: &common::Server, id: &str) -> Value {
    common::eventually(Duration::from_secs(20), "the job to end", || {
        let (_, job) = server.get(&format!("/actions/{id}"));
        let state = job["state"].as_str().unwrap_or_default();
        ["completed", "failed"].contains(&state).then_some(job.clone()).ok_or(job.to_string())
    })
}

/// The Home (ledger on) with `w1` admitted under it; `w1_env` and `w1_config` set it up.
fn home_and_worker(
    dir: &std::path::Path,
    home_env: &[(&str, &str)],
    w1_env: &[(&str, &str)],
    w1_config: &str,
) -> (common::Server, common::Server) {
    let mut launch = common::Launch::new()
        .state_dir(&dir.join("home"))
        .env("ARW_NODE_ID", "home")
        .env("ARW_EGRESS_LEDGER_ENABLE", "1")
        .config(&config(None, ""));
    for (k, v) in home_env {
        launch = launch.env(k, v);
    }
    let home = launch.start();
    assert_eq!(home.post("/admin/hierarchy/role", &json!({"role": "home"})).0, 200);
    let home_key =
        home.get("/admin/hierarchy/state").1["home"]["home_key"].as_str().expect("key").to_owned();
    let boot = home.endpoints["p2p"][0].as_str().expect("p2p address").to_owned();
    let mut launch = common::Launch::new()
        .state_dir(&dir.join("w1"))
        .env("ARW_NODE_ID", "w1")
        .env("ARW_HOME_KEY", &home_key)
        .config(&config(Some(&boot), w1_config));
    for (k, v) in w1_env {
        launch = launch.env(k, v);
    }
    let w1 = launch.start();
    common::eventually(Duration::from_secs(20), "w1 seen and admitted", || {
        let (status, body) = home.post("/admin/cluster/admit", &json!({"id": "w1"}));
        (status == 200).then_some(()).ok_or(format!("{status} {body}"))
    });
    common::eventually(Duration::from_secs(20), "w1 taking work", || {
        let state = w1.get("/admin/hierarchy/state").1;
        (state["home"]["takes_work"] == true).then_some(()).ok_or(state.to_string())
    });
    (home, w1)
}

fn journal(server: &common::Server, kind: &str) -> Vec<Value> {
    let (_, page) = server.get(&format!("/admin/events/journal?prefix={kind}&limit=500"));
    page["entries"].as_array().cloned().unwrap_or_default()
}

#[test]
fn the_home_s_ledger_records_each_offload_with_its_worker_and_bytes_and_survives_a_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let allow = "[jobs.remote]\nallow = [\"echo\"]\n";
    let (home, w1) = home_and_worker(dir.path(), &[], &[], allow);
    let inputs: Vec<Value> = (0..3).map(|i| json!({"text": "x".repeat(100 * (i + 1))})).collect();
    let mut ids = Vec::new();
    for input in &inputs {
        let id =
            submit(&home, &json!({"kind": "echo", "input": input, "placement": {"node": "w1"}}));
        let job = ended(&home, &id);
        assert_eq!(
            (job["state"].as_str(), job["node_id"].as_str()),
            (Some("completed"), Some("w1"))
        );
        ids.push(id);
    }

    let ledger = common::eventually(Duration::from_secs(10), "three offloads recorded", || {
        let (status, view) = home.get("/state/egress");
        (status == 200 && view["count"] == 3).then_some(view.clone()).ok_or(view.to_string())
    });
    let items = ledger["items"].as_array().cloned().unwrap_or_default();
    for (id, input) in ids.iter().zip(&inputs) {
        let item = items.iter().find(|i| i["job_id"] == *id).expect("the job's row");
        let bytes = serde_json::to_vec(input).expect("json").len() as u64;
        assert_eq!(item["decision"], "offload", "{item}");
        assert_eq!(item["node_id"], "w1", "{item}");
        assert_eq!(item["outcome"], "completed", "{item}");
        assert_eq!(item["kind"], "echo", "{item}");
        assert_eq!(item["bytes_out"], bytes, "the input sent: {item}");
        assert_eq!(item["bytes_in"], bytes, "echo returns its input: {item}");
    }
    let sent: u64 = inputs.iter().map(|i| serde_json::to_vec(i).expect("json").len() as u64).sum();
    let totals = &ledger["totals"];
    assert_eq!(totals.as_array().map(Vec::len), Some(1), "{totals}");
    assert_eq!(
        (&totals[0]["node_id"], &totals[0]["offloads"], &totals[0]["completed"]),
        (&json!("w1"), &json!(3), &json!(3))
    );
    assert_eq!(totals[0]["job_bytes_out"], sent);
    assert_eq!(ledger["settings"]["ledger"], true);
    let previews = journal(&home, "egress.preview");
    assert_eq!(previews.len(), 3, "{previews:?}");
    assert!(previews.iter().all(|e| e["payload"]["node_id"] == "w1"));
    let appended = common::eventually(Duration::from_secs(5), "appended events", || {
        let appended = journal(&home, "egress.ledger.appended");
        (appended.len() == 3).then_some(appended.clone()).ok_or(format!("{appended:?}"))
    });
    assert!(appended.iter().all(|e| e["payload"]["decision"] == "offload"));
    let table = {
        let env = [("ARW_ADMIN_TOKEN", home.token.as_str())];
        let out = common::cli(&["state", "egress", "--base", &home.base()], &env);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(table.lines().any(|l| l.starts_with("w1") && l.contains(" 3 ")), "{table}");
    let metrics = common::metrics(&home);
    assert!(metrics.contains("arw_contribution_offloads_total{node_id=\"w1\"} 3"), "{metrics}");

    // A worker keeps no ledger unless asked: 501, with what to set.
    let (status, problem) = w1.get("/state/egress");
    assert_eq!((status, problem["code"].as_str()), (501, Some("egress_ledger_disabled")));

    // kill -9 of the Home: every acknowledged row is still there, with the same ids.
    let state_dir = home.state_dir.clone();
    home.kill();
    let again = common::Launch::new()
        .state_dir(&state_dir)
        .env("ARW_NODE_ID", "home")
        .env("ARW_EGRESS_LEDGER_ENABLE", "1")
        .config(&config(None, ""))
        .start();
    let (_, after) = again.get("/state/egress");
    let ids_of = |v: &Value| -> Vec<Value> {
        v["items"]
            .as_array()
            .map(|i| i.iter().map(|x| x["id"].clone()).collect())
            .unwrap_or_default()
    };
    assert_eq!(ids_of(&after), ids_of(&ledger), "{after}");
    assert_eq!(after["totals"], ledger["totals"]);
    drop(w1);
}

/// A one-connection-at-a-time HTTP server on loopback answering `hello` to anything.
fn destination() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
            );
        }
    });
    port
}

fn sh(args: &[&str]) -> String {
    let out = common::cli(args, &[]);
    assert!(out.status.success(), "arw-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_worker_s_proxy_records_its_jobs_requests_and_refuses_what_the_home_s_policy_denies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let [key, trust, plain] = ["issuer.key", "trust.json", "capsule.json"]
        .map(|f| dir.path().join(f).display().to_string());
    let keygen = sh(&["capsule", "keygen", &key, "--issuer", "ops"]);
    let entry = keygen.lines().last().expect("trust entry");
    std::fs::write(&trust, format!(r#"{{"issuers":[{entry}]}}"#)).expect("trust store");
    let capsule = json!({"id": "no-egress", "version": "1", "issued_at_ms": arw_p2p::time::now_ms(),
        "propagate": "children", "hop_ttl": 2, "denies": ["net:*"], "lease_duration_ms": 600_000});
    std::fs::write(&plain, capsule.to_string()).expect("capsule");
    let signed = sh(&["capsule", "sign-ed25519", &plain, "--key-file", &key, "--issuer", "ops"]);
    let signed: Value = serde_json::from_str(&signed).expect("signed capsule");

    let port = destination();
    let w1_config = "[jobs.remote]\nallow = [\"fetch\"]\n\
        [jobs.exec.fetch]\nargv = [\"/usr/bin/curl\", \"-sS\", \"--fail\", \"--max-time\", \"5\", \"{input.url}\"]\n";
    let proxy_env = [
        ("ARW_EGRESS_LEDGER_ENABLE", "1"),
        ("ARW_EGRESS_PROXY_ENABLE", "1"),
        ("ARW_EGRESS_PROXY_PORT", "0"),
        ("ARW_TRUST_CAPSULES", trust.as_str()),
    ];
    let home_env = [("ARW_TRUST_CAPSULES", trust.as_str())];
    let (home, w1) = home_and_worker(dir.path(), &home_env, &proxy_env, w1_config);
    let proxy = w1.endpoints["egress_proxy"].as_str().expect("the proxy's address").to_owned();
    assert!(proxy.starts_with("127.0.0.1:"), "{proxy}");
    let url = format!("http://127.0.0.1:{port}/data");
    let fetch = json!({"kind": "fetch", "input": {"url": url}, "placement": {"node": "w1"},
        "retry": {"max_attempts": 1}});

    // Allowed: the program's request goes through w1's proxy, recorded with the job.
    let allowed = submit(&home, &fetch);
    let job = ended(&home, &allowed);
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["output"]["stdout"], "hello", "{job}");
    let row = |decision: &str| {
        common::eventually(Duration::from_secs(10), "the proxied request recorded", || {
            let (_, view) = w1.get("/state/egress");
            let items = view["items"].as_array().cloned().unwrap_or_default();
            items.into_iter().find(|i| i["decision"] == decision).ok_or(view.to_string())
        })
    };
    let allow = row("allow");
    assert_eq!(allow["job_id"], allowed, "{allow}");
    assert_eq!(allow["node_id"], "w1");
    assert_eq!((&allow["dest_host"], &allow["dest_port"]), (&json!("127.0.0.1"), &json!(port)));
    assert_eq!(allow["protocol"], "http");
    assert!(allow["bytes_in"].as_u64() > Some(5), "the reply came back: {allow}");

    // The Home's policy denies all egress: w1 holds the capsule, its proxy refuses the request.
    let (status, adopted) =
        home.post("/admin/policy/capsules/adopt", &json!({"capsule": signed, "reason": "lock"}));
    assert_eq!(status, 200, "{adopted}");
    common::eventually(Duration::from_secs(20), "w1 holding the Home's capsule", || {
        let (_, held) = w1.get("/state/policy/capsules");
        let ids: Vec<&str> = held["items"]
            .as_array()
            .map(|i| i.iter().filter_map(|c| c["id"].as_str()).collect())
            .unwrap_or_default();
        ids.contains(&"no-egress").then_some(()).ok_or(held.to_string())
    });
    let denied = submit(&home, &fetch);
    let job = ended(&home, &denied);
    assert_eq!(job["state"], "failed", "{job}");
    let deny = row("deny");
    assert_eq!(deny["job_id"], denied, "{deny}");
    assert_eq!(deny["node_id"], "w1");
    assert!(deny["reason"].as_str().is_some_and(|r| r.contains("no-egress")), "{deny}");
    // The Home's ledger has both offloads, with the CPU time w1 measured for each run.
    let (_, home_view) = home.get("/state/egress");
    let offloads: Vec<&Value> = home_view["items"]
        .as_array()
        .map(|i| i.iter().filter(|x| x["decision"] == "offload").collect())
        .unwrap_or_default();
    assert_eq!(offloads.len(), 2, "{home_view}");
    assert!(offloads.iter().all(|o| o["node_id"] == "w1" && o["cpu_ms"].is_u64()), "{home_view}");
    let (_, view) = w1.get("/state/egress");
    let totals = &view["totals"][0];
    assert_eq!((&totals["requests"], &totals["denied"]), (&json!(1), &json!(1)), "{view}");
    let metrics = common::metrics(&w1);
    let line = "arw_egress_requests_total{node_id=\"w1\",decision=\"deny\"} 1";
    assert!(metrics.contains(line), "{metrics}");
}
