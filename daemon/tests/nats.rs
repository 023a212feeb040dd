//! NATS mode against a real nats-server (Debian's `nats-server`, started here on a free port):
//! the bus, broker restarts, forged messages, the event relay and arw-connector.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures::StreamExt;
use serde_json::{Value, json};

/// The workspace's signed messages: each node's on `<MSG>.<its peer id>`.
const MSG: &str = "arw.cluster.default.msg";

/// A nats-server on loopback, killed on drop.
struct Broker {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Broker {
    /// On a free port (`-p -1`), read back from its ports file.
    fn start(dir: &Path) -> Self {
        Self::start_on(dir, None)
    }

    /// With `config` (nats-server's configuration format) as its configuration file.
    fn start_configured(dir: &Path, config: &str) -> Self {
        std::fs::create_dir_all(dir).expect("dir");
        std::fs::write(dir.join("nats.conf"), config).expect("config");
        Self::start_on(dir, None)
    }

    fn start_on(dir: &Path, port: Option<u16>) -> Self {
        std::fs::create_dir_all(dir).expect("dir");
        for entry in std::fs::read_dir(dir).expect("dir").flatten() {
            if entry.path().extension().is_some_and(|e| e == "ports") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let port_arg = port.map_or("-1".to_owned(), |p| p.to_string());
        let mut command = Command::new("nats-server");
        let config = dir.join("nats.conf");
        if config.exists() {
            command.arg("-c").arg(config);
        }
        let child = command
            .args(["-a", "127.0.0.1", "-p", &port_arg, "--ports_file_dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is not installed: scripts/test.sh installs it (apt-get install nats-server)");
        let ports = dir.join(format!("nats-server_{}.ports", child.id()));
        let deadline = Instant::now() + Duration::from_secs(10);
        let port = loop {
            if let Some(port) = std::fs::read_to_string(&ports)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .and_then(|v| {
                    v["nats"][0]
                        .as_str()
                        .and_then(|u| u.rsplit(':').next())
                        .and_then(|p| p.parse().ok())
                })
            {
                break port;
            }
            assert!(Instant::now() < deadline, "nats-server did not report its port");
            std::thread::sleep(Duration::from_millis(20));
        };
        Self { child, port, dir: dir.to_path_buf() }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops it and starts a new one on the same port.
    fn restart(mut self) -> Self {
        let _ = self.child.kill();
        let _ = self.child.wait();
        Self::start_on(&self.dir.clone(), Some(self.port))
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node(id: &str, state: &Path, broker: &Broker, extra: &str) -> common::Server {
    let config = format!(
        "[cluster]\nenabled = true\nbus = \"nats\"\nnats_url = \"{}\"\nheartbeat_interval_ms = 500\nsuspect_after_ms = 2000\ndown_after_ms = 4000\n{extra}",
        broker.url()
    );
    common::Launch::new().state_dir(state).env("ARW_NODE_ID", id).config(&config).start()
}

/// The first message on `sub` whose payload is of `kind` (within 10 s): its subject and bytes.
async fn first_of_type(sub: &mut async_nats::Subscriber, kind: &str) -> (String, Vec<u8>) {
    let marker = format!(r#""type":"{kind}""#);
    let first = async {
        while let Some(m) = sub.next().await {
            if String::from_utf8_lossy(&m.payload).contains(&marker) {
                return (m.subject.to_string(), m.payload.to_vec());
            }
        }
        panic!("the subscription ended before a {kind}");
    };
    tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .unwrap_or_else(|_| panic!("no {kind} on the wire within 10 s"))
}

fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    common::eventually(limit, what, || check().then_some(()).ok_or_else(String::new));
}

fn all_ok(server: &common::Server, n: usize) -> bool {
    let rows = common::node_rows(&server.get("/state/cluster").1);
    rows.len() == n && rows.iter().all(|(_, h, _)| h == "ok")
}

fn journal(server: &common::Server, prefix: &str) -> Vec<Value> {
    let page = server.get(&format!("/admin/events/journal?prefix={prefix}&limit=1000")).1;
    page["entries"].as_array().cloned().unwrap_or_default()
}

#[test]
fn three_daemons_federate_over_nats_and_survive_a_broker_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(&dir.path().join("broker"));
    let nodes: Vec<common::Server> =
        ["w1", "w2", "w3"].iter().map(|id| node(id, &dir.path().join(id), &broker, "")).collect();
    for n in &nodes {
        wait_until(Duration::from_secs(20), "all three ok over NATS", || all_ok(n, 3));
    }
    let network = nodes[0].get("/admin/hierarchy/state").1["network"].clone();
    assert_eq!(
        (network["bus"].as_str(), network["state"].as_str()),
        (Some("nats"), Some("connected"))
    );
    assert!(
        nodes[0].endpoints["p2p"].as_array().is_some_and(Vec::is_empty),
        "no libp2p listener with bus = nats"
    );

    let broker = broker.restart();
    for n in &nodes {
        wait_until(Duration::from_secs(20), "reconnected", || {
            n.get("/admin/hierarchy/state").1["network"]["state"] == "connected"
        });
    }
    // Adverts resume: a change made after the restart reaches the others.
    assert_eq!(nodes[1].post("/admin/hierarchy/role", &json!({"role": "regional"})).0, 200);
    wait_until(Duration::from_secs(20), "w2's new role on w1", || {
        nodes[0].get("/admin/hierarchy/state").1["peers"]["w2"]["role"] == "regional"
    });
    for n in &nodes {
        assert!(all_ok(n, 3), "a node was marked down for the broker's outage");
        // Re-sent adverts are duplicates, never accepted twice.
        let mut seen = std::collections::BTreeSet::new();
        let me = n.endpoints["node_id"].clone();
        // (Events relayed from other nodes have their origin; only this node's own count here.)
        for e in journal(n, "cluster.node.advertise").into_iter().filter(|e| e["origin"] == me) {
            let key = (e["payload"]["id"].to_string(), e["payload"]["seq"].as_u64());
            assert!(seen.insert(key.clone()), "advert {key:?} accepted twice");
        }
        let kinds: Vec<String> = journal(n, "cluster.bus.")
            .iter()
            .filter(|e| e["origin"] == me)
            .filter_map(|e| e["kind"].as_str().map(str::to_owned))
            .collect();
        assert!(
            kinds.ends_with(&[
                "cluster.bus.disconnected".to_owned(),
                "cluster.bus.connected".to_owned()
            ]),
            "{kinds:?}"
        );
    }
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_messages_on_the_subject_are_refused_and_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(&dir.path().join("broker"));
    let w1 = node("w1", &dir.path().join("w1"), &broker, "");
    let w2 = node("w2", &dir.path().join("w2"), &broker, "");
    let (w1, w2) = tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(20), "both ok", || all_ok(&w1, 2) && all_ok(&w2, 2));
        (w1, w2)
    })
    .await
    .expect("wait");

    let client = async_nats::connect(broker.url()).await.expect("connect");
    // w2's real advert, captured off the wire (on w2's own subject), then tampered with.
    let mut sub = client.subscribe(format!("{MSG}.*")).await.expect("subscribe");
    assert_eq!(w2.post("/admin/hierarchy/role", &json!({"role": "observer"})).0, 200);
    let (subject, advert) = first_of_type(&mut sub, "advert").await;
    assert_eq!(subject, format!("{MSG}.{}", w2.endpoints["peer_id"].as_str().expect("peer id")));
    let tampered = String::from_utf8(advert.clone()).expect("utf8").replace("observer", "root");
    client.publish(subject.clone(), tampered.into_bytes().into()).await.expect("publish");
    // A different key claiming w2's id.
    let rogue = arw_p2p::identity::NodeKey::from_secret([42; 32]);
    let mut claim: Value = serde_json::from_slice(&advert).expect("json");
    let mut payload = claim["payload"].clone();
    payload["seq"] = json!(payload["seq"].as_u64().unwrap_or(0) + 1);
    let message: arw_p2p::wire::Message = serde_json::from_value(payload).expect("message");
    let forged = arw_p2p::wire::seal(&rogue, "default", &message);
    client.publish(format!("{MSG}.{}", rogue.peer_id()), forged.into()).await.expect("publish");
    // The original, replayed.
    client.publish(subject, advert.into()).await.expect("publish");
    client.flush().await.expect("flush");
    claim["v"] = json!(1);

    tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(20), "rejections reported on w1", || {
            let reasons: Vec<String> = journal(&w1, "cluster.event.rejected")
                .iter()
                .filter_map(|e| e["payload"]["reason"].as_str().map(str::to_owned))
                .collect();
            reasons.contains(&"bad_signature".to_owned())
                && reasons.contains(&"key_conflict".to_owned())
        });
        let conflicts = journal(&w1, "cluster.node.conflict");
        assert!(conflicts.iter().any(|e| e["payload"]["id"] == "w2"), "{conflicts:?}");
        // And counted for alerting, by the same reasons.
        let text = common::metrics(&w1);
        for reason in ["bad_signature", "key_conflict"] {
            let line = format!("arw_cluster_messages_refused_total{{reason=\"{reason}\"}} ");
            assert!(text.contains(&line), "{reason} not counted: {text}");
        }
        // w2's real advert (published by w2, so not ordered with the test's forgeries) wins.
        wait_until(Duration::from_secs(10), "w2's genuine advert on w1", || {
            w1.get("/admin/hierarchy/state").1["peers"]["w2"]["role"] == "observer"
        });
        drop(w2);
    })
    .await
    .expect("checks");
}

/// A nats-server user named `name` that may publish its signed messages only on the subject of
/// `key`'s peer id (as docs/runbook.md's broker configuration).
fn bound_user(name: &str, key: &arw_p2p::identity::NodeKey) -> String {
    let publish = [
        format!("{MSG}.{}", key.peer_id()),
        "arw.cluster.default.sync".to_owned(),
        "_INBOX.>".to_owned(),
        "arw.jobs.default.>".to_owned(),
        format!("arw.events.node.{name}.>"),
    ];
    format!(
        r#"{{user: "{name}", password: "pw-{name}", permissions: {{publish: {publish:?}, subscribe: [">"]}}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_binds_each_client_to_its_subject_leaves_a_forger_no_way_in() {
    use arw_p2p::identity::NodeKey;
    let dir = tempfile::tempdir().expect("tempdir");
    // The keys are made here so that the broker's permissions can name each node's subject.
    let secrets = [[1u8; 32], [2u8; 32]];
    let keys = secrets.map(NodeKey::from_secret);
    let mallory = NodeKey::from_secret([66; 32]);
    let users = [bound_user("w1", &keys[0]), bound_user("w2", &keys[1]), bound_user("m", &mallory)];
    let config = format!("authorization {{ users = [\n{}\n] }}\n", users.join(",\n"));
    let broker = Broker::start_configured(&dir.path().join("broker"), &config);
    let start = |i: usize| {
        let (id, state) = (format!("w{}", i + 1), dir.path().join(format!("w{}", i + 1)));
        std::fs::create_dir_all(&state).expect("state dir");
        let secret = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, secrets[i]);
        std::fs::write(state.join("node.key"), format!("{secret}\n")).expect("key");
        let owner_only = std::os::unix::fs::PermissionsExt::from_mode(0o600);
        std::fs::set_permissions(state.join("node.key"), owner_only).expect("chmod");
        let credentials = format!("[nats]\nuser = \"{id}\"\npass = \"pw-{id}\"\n");
        node(&id, &state, &broker, &credentials)
    };
    let (w1, w2) = (start(0), start(1));
    let (w1, w2) = tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(20), "both ok through the bound broker", || {
            all_ok(&w1, 2) && all_ok(&w2, 2)
        });
        (w1, w2)
    })
    .await
    .expect("wait");

    // Mallory holds credentials of her own: she can read everything, publish on her subject.
    let client = async_nats::ConnectOptions::with_user_and_password("m".into(), "pw-m".into())
        .connect(broker.url())
        .await
        .expect("connect");
    let mut sub = client.subscribe(format!("{MSG}.*")).await.expect("subscribe");
    assert_eq!(w2.post("/admin/hierarchy/role", &json!({"role": "observer"})).0, 200);
    let (_, advert) = first_of_type(&mut sub, "advert").await;
    let tampered = String::from_utf8(advert).expect("utf8").replace("observer", "root");
    // On w2's subject the broker refuses her; on her own, the nodes drop it unchecked: it
    // claims w2's key there.
    let w2_subject = format!("{MSG}.{}", keys[1].peer_id());
    let own = format!("{MSG}.{}", mallory.peer_id());
    client.publish(w2_subject, tampered.clone().into_bytes().into()).await.expect("publish");
    client.publish(own.clone(), tampered.into_bytes().into()).await.expect("publish");
    // Then an honest advert of her own, on her subject: taken in (after the forgeries).
    let now = arw_p2p::time::now_ms();
    let id = arw_p2p::node_id::NodeId::parse("mallory").expect("id");
    let advert = arw_p2p::cluster::Advert::basic(id, "default", now, now);
    let envelope =
        arw_p2p::wire::seal(&mallory, "default", &arw_p2p::wire::Message::Advert(advert));
    client.publish(own, envelope.into()).await.expect("publish");
    client.flush().await.expect("flush");

    tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(20), "mallory's own advert on w1", || {
            w1.get("/state/cluster").1.to_string().contains("mallory")
        });
        let reasons: Vec<Value> = journal(&w1, "cluster.event.rejected")
            .iter()
            .map(|e| e["payload"]["reason"].clone())
            .collect();
        assert!(
            !reasons.contains(&json!("bad_signature")),
            "a forgery reached the signature check: {reasons:?}"
        );
        assert_eq!(
            w1.get("/admin/hierarchy/state").1["peers"]["w2"]["role"],
            "observer",
            "w2's real advert stands"
        );
        let rows = common::node_rows(&w1.get("/state/cluster").1);
        let honest = rows.iter().filter(|(id, h, _)| id.starts_with('w') && h == "ok").count();
        assert_eq!(honest, 2, "{rows:?}");
        drop(w2);
    })
    .await
    .expect("checks");
}

#[test]
fn relayed_events_arrive_once_at_every_other_node_without_loops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(&dir.path().join("broker"));
    let relay = "[nats]\nrelay_out_filter = \"service.\"\n";
    let nodes: Vec<common::Server> = ["r1", "r2", "r3"]
        .iter()
        .map(|id| node(id, &dir.path().join(id), &broker, relay))
        .collect();
    for n in &nodes {
        wait_until(Duration::from_secs(20), "all three ok", || all_ok(n, 3));
    }
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n.post("/admin/events/test", &json!({ "from": i })).0, 200);
    }
    // Then a second round as markers: NATS keeps one publisher's order, so once a node has
    // every marker it has every first-round event too.
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n.post("/admin/events/test", &json!({ "marker": i })).0, 200);
    }
    for n in &nodes {
        wait_until(Duration::from_secs(20), "all markers", || {
            journal(n, "service.test").iter().filter(|e| e["payload"]["marker"].is_number()).count()
                == 3
        });
        let events = journal(n, "service.test");
        assert_eq!(events.len(), 6, "each event exactly once, no loops: {events:?}");
        let mut ids: Vec<&str> = events.iter().filter_map(|e| e["ce"]["id"].as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 6);
        let origins: std::collections::BTreeSet<&str> =
            events.iter().filter_map(|e| e["origin"].as_str()).collect();
        assert_eq!(origins.len(), 3, "relayed events keep their origin");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_and_server_queue_complete_tasks_with_their_node_ids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(&dir.path().join("broker"));
    let client = async_nats::connect(broker.url()).await.expect("connect");
    let mut cluster_wide = client.subscribe("arw.events.task.completed").await.expect("sub");
    let mut per_node = client.subscribe("arw.events.node.*.task.completed").await.expect("sub");
    client.flush().await.expect("flush");

    // The connector's library, in this process (the binary, in package arw-connector, only
    // parses its flags into this configuration).
    let stop_connector = tokio_util::sync::CancellationToken::new();
    let connector = tokio::spawn(arw_daemon::connector::run(
        arw_daemon::connector::ConnectorConfig {
            node_id: arw_p2p::node_id::NodeId::parse("connector-01").expect("id"),
            group: "workers".into(),
            nats: arw_p2p::nats::NatsConfig {
                url: broker.url(),
                tls: false,
                user: None,
                pass: None,
                connect_retries: 3,
                connect_backoff: Duration::from_millis(500),
                name: "arw-connector".into(),
            },
        },
        stop_connector.clone(),
    ));
    // The connector is the only worker in the group: wait until it takes a task.
    let task = |id: &str, kind: &str, payload: Value| -> bytes::Bytes {
        serde_json::to_vec(
            &json!({"id": id, "kind": kind, "payload": payload, "priority": 0, "attempt": 0}),
        )
        .expect("json")
        .into()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let done = loop {
        client
            .publish("arw.tasks", task("t1", "math.add", json!({"a": 2, "b": 3})))
            .await
            .expect("publish");
        if let Ok(Some(m)) =
            tokio::time::timeout(Duration::from_millis(500), cluster_wide.next()).await
        {
            break m;
        }
        assert!(tokio::time::Instant::now() < deadline, "the connector never completed a task");
    };
    let envelope: Value = serde_json::from_slice(&done.payload).expect("envelope");
    assert_eq!(envelope["kind"], "task.completed");
    let p = &envelope["payload"];
    assert_eq!(
        (&p["id"], &p["ok"], &p["output"], &p["node_id"]),
        (&json!("t1"), &json!(true), &json!({"sum": 5.0}), &json!("connector-01"))
    );
    let node_copy = tokio::time::timeout(Duration::from_secs(10), per_node.next())
        .await
        .expect("per-node")
        .expect("open");
    assert_eq!(node_copy.subject.as_str(), "arw.events.node.connector-01.task.completed");

    client.publish("arw.tasks", task("t2", "rm.rf", json!({}))).await.expect("publish");
    let failed = loop {
        let m = tokio::time::timeout(Duration::from_secs(10), cluster_wide.next())
            .await
            .expect("t2")
            .expect("open");
        let v: Value = serde_json::from_slice(&m.payload).expect("json");
        if v["payload"]["id"] == "t2" {
            break v;
        }
    };
    assert_eq!(failed["payload"]["ok"], false);
    assert_eq!(failed["payload"]["output"]["error"], "unknown tool");

    // A server with queue = "nats" shares the group: its completions go out on its own subject
    // (through its event relay), and the connector mirrors them cluster-wide.
    let state = dir.path().join("q1");
    let server = tokio::task::spawn_blocking({
        let broker_url = broker.url();
        move || {
            let config = format!("[cluster]\nenabled = true\nbus = \"nats\"\nqueue = \"nats\"\nnats_url = \"{broker_url}\"\n");
            common::Launch::new().state_dir(&state).env("ARW_NODE_ID", "q1").config(&config).start()
        }
    })
    .await
    .expect("server");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    let by_server = loop {
        n += 1;
        let id = format!("s{n}");
        client.publish("arw.tasks", task(&id, "time.now", json!({}))).await.expect("publish");
        let mut found = None;
        while let Ok(Some(m)) =
            tokio::time::timeout(Duration::from_millis(300), per_node.next()).await
        {
            if m.subject.as_str() == "arw.events.node.q1.task.completed" {
                found = Some(serde_json::from_slice::<Value>(&m.payload).expect("json"));
                break;
            }
        }
        if let Some(found) = found {
            break found;
        }
        assert!(tokio::time::Instant::now() < deadline, "the server never took a task");
    };
    assert_eq!(
        (by_server["origin"].as_str(), by_server["payload"]["node_id"].as_str()),
        (Some("q1"), Some("q1"))
    );
    assert_eq!(by_server["payload"]["ok"], true);
    let task_id = by_server["payload"]["id"].clone();
    let mirrored = loop {
        let m = tokio::time::timeout(Duration::from_secs(10), cluster_wide.next())
            .await
            .expect("mirror")
            .expect("open");
        let v: Value = serde_json::from_slice(&m.payload).expect("json");
        if v["payload"]["id"] == task_id {
            break v;
        }
    };
    assert_eq!(mirrored["payload"]["node_id"], "q1");
    let journaled = tokio::task::spawn_blocking(move || journal(&server, "task.completed"))
        .await
        .expect("journal");
    assert!(journaled.iter().any(|e| e["payload"]["id"] == task_id), "{journaled:?}");

    stop_connector.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(10), connector).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "the connector did not stop cleanly: {stopped:?}");
    drop(broker);
}

#[test]
fn a_node_on_another_queue_setting_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(&dir.path().join("broker"));
    let a = node("m1", &dir.path().join("m1"), &broker, "");
    let b = node("m2", &dir.path().join("m2"), &broker, "queue = \"nats\"\n");
    wait_until(Duration::from_secs(20), "the mismatch reported on m1", || {
        let network = a.get("/admin/hierarchy/state").1["network"].clone();
        network["mismatched"] == json!([{"id": "m2", "bus": "nats", "queue": "nats"}])
    });
    let events = journal(&a, "cluster.bus.mismatch");
    let own: Vec<&Value> = events.iter().filter(|e| e["origin"] == "m1").collect();
    assert_eq!(own.len(), 1, "reported once: {events:?}");
    assert_eq!(own[0]["payload"]["local_queue"], "local");
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_pinned_by_home_key_obeys_only_its_home_over_nats() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(&dir.path().join("broker"));
    let home = node("home-1", &dir.path().join("home"), &broker, "");
    assert_eq!(home.post("/admin/hierarchy/role", &json!({"role": "home"})).0, 200);
    let home_key = home.get("/admin/hierarchy/state").1["home"]["home_key"].clone();
    let pin = format!("home_key = {home_key}\n");
    let worker = node("w1", &dir.path().join("w1"), &broker, &pin);
    let worker = tokio::task::spawn_blocking(move || {
        // No admission needed: the configured key is trusted from the start, and the Home's
        // current policy arrives through the sync a node asks for when it connects.
        wait_until(Duration::from_secs(20), "the Home's policy on w1", || {
            let view = worker.get("/admin/hierarchy/state").1["home"].clone();
            view["pinned_by"] == "config" && view["policy_epoch"].as_u64() >= Some(1)
        });
        worker
    })
    .await
    .expect("wait");

    let client = async_nats::connect(broker.url()).await.expect("connect");
    let mut sub = client.subscribe(format!("{MSG}.*")).await.expect("subscribe");
    let body = json!({"id": "w1"});
    assert_eq!(home.post("/admin/cluster/admit", &body).0, 200);
    let (subject, genuine) = first_of_type(&mut sub, "policy").await;
    let doc: Value = serde_json::from_slice(&genuine).expect("json");
    let epoch = doc["payload"]["policy_epoch"].as_u64().expect("epoch");
    // A forged copy (the roster emptied, the signature kept) and a rogue Home's newer policy.
    let forged = String::from_utf8(genuine.clone()).expect("utf8").replace(r#""w1":"#, r#""w9":"#);
    client.publish(subject, forged.into_bytes().into()).await.expect("publish");
    let mut payload = doc["payload"].clone();
    payload["policy_epoch"] = json!(epoch + 10);
    let message: arw_p2p::wire::Message = serde_json::from_value(payload).expect("message");
    let rogue = arw_p2p::identity::NodeKey::from_secret([43; 32]);
    client
        .publish(
            format!("{MSG}.{}", rogue.peer_id()),
            arw_p2p::wire::seal(&rogue, "default", &message).into(),
        )
        .await
        .expect("publish");
    client.flush().await.expect("flush");

    tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(20), "both refusals reported on w1", || {
            let reasons: Vec<String> = journal(&worker, "cluster.event.rejected")
                .iter()
                .filter_map(|e| e["payload"]["reason"].as_str().map(str::to_owned))
                .collect();
            reasons.contains(&"bad_signature".to_owned())
                && reasons.contains(&"untrusted_home".to_owned())
        });
        let view = worker.get("/admin/hierarchy/state").1["home"].clone();
        assert_eq!(
            (view["policy_epoch"].as_u64(), &view["admitted"]),
            (Some(epoch), &json!(["w1"])),
            "{view}"
        );
        assert_eq!(view["home_key"], home_key);
        drop(home);
    })
    .await
    .expect("checks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_worker_takes_no_tasks_until_the_home_admits_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(&dir.path().join("broker"));
    let home = node("home-1", &dir.path().join("home"), &broker, "");
    assert_eq!(home.post("/admin/hierarchy/role", &json!({"role": "home"})).0, 200);
    let home_key = home.get("/admin/hierarchy/state").1["home"]["home_key"].clone();
    let extra = format!("queue = \"nats\"\nhome_key = {home_key}\n");
    let worker = node("w1", &dir.path().join("w1"), &broker, &extra);
    let view = worker.get("/admin/hierarchy/state").1["home"].clone();
    assert_eq!(view["takes_work"], false, "pinned to a Home that has not admitted it: {view}");

    let client = async_nats::connect(broker.url()).await.expect("connect");
    let mut done = client.subscribe("arw.events.node.w1.task.completed").await.expect("sub");
    let task = |id: &str| -> bytes::Bytes {
        serde_json::to_vec(&json!({"id": id, "kind": "time.now", "payload": {}}))
            .expect("json")
            .into()
    };
    // Nobody in the group takes it (core NATS drops it): w1 is not listening.
    client.publish("arw.tasks", task("while-pending")).await.expect("publish");
    client.flush().await.expect("flush");

    let (home, worker) = tokio::task::spawn_blocking(move || {
        assert_eq!(home.post("/admin/cluster/admit", &json!({"id": "w1"})).0, 200);
        wait_until(Duration::from_secs(20), "w1 admitted", || {
            worker.get("/admin/hierarchy/state").1["home"]["takes_work"] == true
        });
        (home, worker)
    })
    .await
    .expect("admission");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let first = loop {
        client.publish("arw.tasks", task("admitted")).await.expect("publish");
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), done.next()).await {
            break serde_json::from_slice::<Value>(&m.payload).expect("json");
        }
        assert!(tokio::time::Instant::now() < deadline, "the admitted worker took no task");
    };
    assert_eq!(first["payload"]["id"], "admitted", "the task sent while pending was never taken");
    drop((home, worker));
}

/// A relayed event envelope as a node publishes it.
fn relayed(origin: &str, kind: &str, id: &str, payload: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "time": "2026-12-01T00:00:00.000Z", "kind": kind, "payload": payload, "origin": origin,
        "ce": {"specversion": "1.0", "type": kind, "source": "arw-server", "id": id,
               "time": "2026-12-01T00:00:00.000Z", "datacontenttype": "application/json"}
    }))
    .expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_events_are_journaled_only_when_their_origin_signed_them() {
    use base64::Engine;
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(&dir.path().join("broker"));
    let states: Vec<PathBuf> = ["r1", "r2", "r3"].iter().map(|id| dir.path().join(id)).collect();
    let nodes: Vec<common::Server> = ["r1", "r2", "r3"]
        .iter()
        .zip(&states)
        .map(|(id, state)| node(id, state, &broker, ""))
        .collect();
    let nodes = tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(20), "all ok", || nodes.iter().all(|n| all_ok(n, 3)));
        nodes
    })
    .await
    .expect("start");
    // Members' own keys, read from their state directories: members that lie with a valid
    // signature.
    let member_key = |state: &Path| {
        let secret = std::fs::read_to_string(state.join("node.key")).expect("key");
        let secret: [u8; 32] = base64::engine::general_purpose::STANDARD
            .decode(secret.trim())
            .expect("base64")
            .try_into()
            .expect("32 bytes");
        arw_p2p::identity::NodeKey::from_secret(secret)
    };
    let (r2_key, r3_key) = (member_key(&states[1]), member_key(&states[2]));
    let rogue = arw_p2p::identity::NodeKey::from_secret([42; 32]);
    let client = async_nats::connect(broker.url()).await.expect("connect");
    let publish =
        |subject: String, payload: Vec<u8>, signer: Option<&arw_p2p::identity::NodeKey>| {
            let mut headers = async_nats::HeaderMap::new();
            if let Some(key) = signer {
                let sig = arw_p2p::wire::sign_event(key, &subject, &payload);
                headers.insert(arw_p2p::wire::EVENT_SIGNATURE_HEADER, sig.as_str());
            }
            client.publish_with_headers(subject, headers, payload.into())
        };
    let task = "arw.events.node.r2.task.completed".to_owned();
    let forged = json!({"id": "forged", "ok": true});
    publish(task.clone(), relayed("r2", "task.completed", "unsigned", forged.clone()), None)
        .await
        .expect("publish");
    publish(task.clone(), relayed("r2", "task.completed", "rogue", forged.clone()), Some(&rogue))
        .await
        .expect("publish");
    let lagged = "arw.events.node.r2.service.lagged".to_owned();
    publish(
        lagged,
        relayed("r2", "service.lagged", "lagged", json!({"skipped": 1})),
        Some(&r2_key),
    )
    .await
    .expect("publish");
    let huge = json!({"id": "huge", "blob": "x".repeat(100_000)});
    publish(task.clone(), relayed("r2", "task.completed", "huge", huge), Some(&r2_key))
        .await
        .expect("publish");
    // A flood of validly signed small events: the origin's budget caps what is journaled.
    for i in 0..1_500 {
        let event = relayed("r2", "task.completed", &format!("flood-{i}"), json!({"id": "flood"}));
        publish(task.clone(), event, Some(&r2_key)).await.expect("publish");
    }
    // Then a genuine event of r3 on the same connection: once it is journaled, everything the
    // test published before it has been judged (NATS keeps one publisher's order).
    let marker = relayed("r3", "task.completed", "marker", json!({"id": "marker"}));
    publish("arw.events.node.r3.task.completed".to_owned(), marker, Some(&r3_key))
        .await
        .expect("publish");
    client.flush().await.expect("flush");

    tokio::task::spawn_blocking(move || {
        let journaled = || -> Vec<Value> {
            let page = nodes[0].get("/admin/events/journal?prefix=task.,service.&limit=2000").1;
            page["entries"].as_array().cloned().unwrap_or_default()
        };
        wait_until(Duration::from_secs(20), "the genuine marker on r1", || {
            journaled().iter().any(|e| e["ce"]["id"] == "marker")
        });
        let events = journaled();
        let ids: Vec<&str> = events.iter().filter_map(|e| e["ce"]["id"].as_str()).collect();
        for refused in ["unsigned", "rogue", "lagged", "huge"] {
            assert!(!ids.contains(&refused), "{refused} was journaled");
        }
        let flood = ids.iter().filter(|id| id.starts_with("flood-")).count();
        assert!((1..=1_000).contains(&flood), "{flood} of 1,500 flood events journaled");
    })
    .await
    .expect("checks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_new_node_ids_is_capped_and_honest_nodes_stay_ok() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(&dir.path().join("broker"));
    let capped = "max_nodes = 50\n";
    let (w1, w2) = (
        node("w1", &dir.path().join("w1"), &broker, capped),
        node("w2", &dir.path().join("w2"), &broker, capped),
    );
    let (w1, w2) = tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(20), "both ok", || all_ok(&w1, 2) && all_ok(&w2, 2));
        (w1, w2)
    })
    .await
    .expect("start");

    // 3,000 adverts, each under a fresh key and id: all validly signed.
    let client = async_nats::connect(broker.url()).await.expect("connect");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    for i in 0..3_000u32 {
        let mut secret = [7u8; 32];
        secret[..4].copy_from_slice(&i.to_be_bytes());
        let key = arw_p2p::identity::NodeKey::from_secret(secret);
        let id = arw_p2p::node_id::NodeId::parse(&format!("sybil-{i}")).expect("id");
        let advert = arw_p2p::cluster::Advert::basic(id, "default", 1, now);
        let envelope =
            arw_p2p::wire::seal(&key, "default", &arw_p2p::wire::Message::Advert(advert));
        client.publish(format!("{MSG}.{}", key.peer_id()), envelope.into()).await.expect("publish");
    }
    client.flush().await.expect("flush");

    tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(30), "the flood refused on w1", || {
            journal(&w1, "cluster.event.rejected").iter().any(|e| {
                matches!(e["payload"]["reason"].as_str(), Some("registry_full" | "newcomer_limit"))
            })
        });
        // Still live and heard: a change of w2's reaches w1.
        assert_eq!(w2.post("/admin/hierarchy/role", &json!({"role": "regional"})).0, 200);
        wait_until(Duration::from_secs(20), "w2's new role on w1", || {
            w1.get("/admin/hierarchy/state").1["peers"]["w2"]["role"] == "regional"
        });
        let rows = common::node_rows(&w1.get("/state/cluster").1);
        assert!(rows.len() <= 51, "the registry grew past max_nodes: {} rows", rows.len());
        let honest: Vec<&(String, String, u64)> =
            rows.iter().filter(|(id, _, _)| id == "w1" || id == "w2").collect();
        assert!(honest.iter().all(|(_, h, _)| h == "ok"), "{honest:?}");
        let journaled = journal(&w1, "cluster.").len();
        assert!(journaled < 400, "{journaled} cluster events journaled for a flood of 3,000");
    })
    .await
    .expect("checks");
}

#[test]
fn jobs_run_on_a_worker_over_nats_and_move_when_it_is_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(&dir.path().join("broker"));
    let home = node("home-1", &dir.path().join("home"), &broker, "");
    assert_eq!(home.post("/admin/hierarchy/role", &json!({"role": "home"})).0, 200);
    let home_key = home.get("/admin/hierarchy/state").1["home"]["home_key"].clone();
    let extra = format!("home_key = {home_key}\n[jobs.remote]\nallow = [\"sleep\", \"math.*\"]\n");
    let worker = node("w1", &dir.path().join("w1"), &broker, &extra);
    common::eventually(Duration::from_secs(20), "w1 admitted and applying", || {
        let (status, body) = home.post("/admin/cluster/admit", &json!({"id": "w1"}));
        let applied = worker.get("/admin/hierarchy/state").1["home"]["takes_work"] == true;
        (status == 200 && applied).then_some(()).ok_or(format!("{status} {body}"))
    });
    let submit = |body: Value| {
        let (status, reply) = home.post("/actions", &body);
        assert_eq!(status, 202, "{reply}");
        reply["id"].as_str().expect("id").to_owned()
    };
    let job_of = |id: &str| home.get(&format!("/actions/{id}")).1;
    let quick = submit(json!({"kind": "math.add", "input": {"a": 1, "b": 1},
        "placement": {"prefer": "remote"}}));
    let job = common::eventually(Duration::from_secs(20), "the job done on w1", || {
        let job = job_of(&quick);
        (job["state"] == "completed").then_some(job.clone()).ok_or(job.to_string())
    });
    assert_eq!(job["node_id"], "w1", "{job}");
    // The worker's own journal has the run, with its node id (relayed on NATS as the reference).
    let ran = journal(&worker, "task.completed");
    assert!(
        ran.iter().any(|e| e["payload"]["id"] == quick.as_str() && e["payload"]["node_id"] == "w1")
    );

    let slow = submit(json!({"kind": "sleep", "input": {"ms": 3000}, "idem_key": "s1",
        "placement": {"prefer": "remote"}}));
    common::eventually(Duration::from_secs(10), "the slow job running on w1", || {
        let job = job_of(&slow);
        (job["state"] == "running" && job["node_id"] == "w1").then_some(()).ok_or(job.to_string())
    });
    worker.kill();
    // No other worker: the Home runs it itself, as attempt 2, once the lease has run out.
    let job = common::eventually(Duration::from_secs(30), "the slow job done elsewhere", || {
        let job = job_of(&slow);
        (job["state"] == "completed").then_some(job.clone()).ok_or(job.to_string())
    });
    assert_eq!(
        (job["node_id"].as_str(), job["attempt"].as_u64()),
        (Some("home-1"), Some(2)),
        "{job}"
    );
    assert_eq!(job["attempts"][0]["state"], "lost", "{job}");
}

/// A server started from one of the shipped configuration files, on `broker`.
fn shipped(file: &str, state: &Path, broker: &Broker, extra: &[(&str, &str)]) -> common::Server {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs").join(file);
    let mut launch = common::Launch::new()
        .state_dir(state)
        .env("ARW_CONFIG", &path.display().to_string())
        .env("ARW_NATS_URL", &broker.url());
    for (k, v) in extra {
        launch = launch.env(k, v);
    }
    launch.start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_shipped_configs_each_queued_task_runs_once() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(&dir.path().join("broker"));
    let home = shipped("nats-home.toml", &dir.path().join("home"), &broker, &[]);
    assert_eq!(home.post("/admin/hierarchy/role", &json!({"role": "home"})).0, 200);
    let key = home.get("/admin/hierarchy/state").1["home"]["home_key"]
        .as_str()
        .expect("home key")
        .to_owned();
    let worker =
        shipped("nats-worker.toml", &dir.path().join("worker"), &broker, &[("ARW_HOME_KEY", &key)]);
    let (home, worker) = (Arc::new(home), Arc::new(worker));
    let (h, w) = (home.clone(), worker.clone());
    tokio::task::spawn_blocking(move || {
        common::eventually(Duration::from_secs(20), "the worker admitted and taking work", || {
            let (status, body) = h.post("/admin/cluster/admit", &json!({"id": "worker-gpu-01"}));
            let takes = w.get("/admin/hierarchy/state").1["home"]["takes_work"] == true;
            (status == 200 && takes).then_some(()).ok_or(format!("{status} {body}"))
        });
    })
    .await
    .expect("admission");
    let client = async_nats::connect(broker.url()).await.expect("connect");
    let task = |id: &str| -> bytes::Bytes {
        serde_json::to_vec(&json!({"id": id, "kind": "math.add", "payload": {"a": 1, "b": 2}}))
            .expect("json")
            .into()
    };
    // Tasks a node ran itself (its journal also holds the other's, relayed), by id prefix.
    let ran = |server: &common::Server, prefix: &str| {
        let me = server.endpoints["node_id"].clone();
        journal(server, "task.completed")
            .into_iter()
            .filter(|e| e["origin"] == me)
            .filter(|e| e["payload"]["id"].as_str().is_some_and(|id| id.starts_with(prefix)))
            .count()
    };
    // Sends `prefix<n>` tasks until both nodes ran one: each node handles its share in order,
    // so by then it has run every task the broker gave it before.
    let until_both = |prefix: &'static str| {
        let (home, worker, client) = (home.clone(), worker.clone(), client.clone());
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            for n in 0.. {
                client.publish("arw.tasks", task(&format!("{prefix}{n}"))).await.expect("publish");
                client.flush().await.expect("flush");
                let (h, w) = (home.clone(), worker.clone());
                let both =
                    tokio::task::spawn_blocking(move || ran(&h, prefix) > 0 && ran(&w, prefix) > 0)
                        .await
                        .expect("journals");
                if both {
                    return;
                }
                assert!(tokio::time::Instant::now() < deadline, "{prefix}: not on both nodes");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    until_both("probe-").await;
    for i in 0..8 {
        client.publish("arw.tasks", task(&format!("t{i}"))).await.expect("publish");
    }
    until_both("sentinel-").await;
    let total = tokio::task::spawn_blocking(move || ran(&home, "t") + ran(&worker, "t"))
        .await
        .expect("journals");
    assert_eq!(total, 8, "8 tasks, each run once across the workspace");
}
