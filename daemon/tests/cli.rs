//! `arw-cli` against a running server.

mod common;

#[test]
fn state_cluster_table_and_json() {
    let server = common::Launch::new().env("ARW_NODE_ID", "cli-node-1").start();
    let base = server.base();
    let token = server.token.clone();
    let env = [("ARW_ADMIN_TOKEN", token.as_str())];

    let out = common::cli(&["state", "cluster", "--base", &base], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "Cluster snapshot", "{text}");
    assert_eq!(lines[2], "  TTL       : 360s", "{text}");
    assert_eq!(lines[3], "  Nodes     : 1", "{text}");
    assert!(lines[5].starts_with("ID                   Role       Health     Last Seen"), "{text}");
    assert!(lines[6].starts_with("cli-node-1           edge       ok         "), "{text}");
    assert!(lines[6].contains(" no     "), "local node must not be stale: {text}");

    let out =
        common::cli(&["state", "cluster", "--json", "--base", &base, "--admin-token", &token], &[]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim_end().lines().count(), 1, "--json is one line");
    let view: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(view["nodes"][0]["id"], "cli-node-1");

    let out = common::cli(&["--base", &base, "state", "cluster", "--json", "--pretty"], &env);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).lines().count() > 5, "--pretty spans lines");
}

#[test]
fn unauthorized_and_usage_errors_exit_non_zero_with_a_hint() {
    let server = common::Launch::new().start();
    let base = server.base();
    let out = common::cli(&["state", "cluster", "--base", &base, "--admin-token", "wrong"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        format!(
            "request to {base}/state/cluster returned 401 Unauthorized; supply an admin token via --admin-token or ARW_ADMIN_TOKEN"
        )
    );

    let out = common::cli(&["state", "cluster", "--pretty", "--base", &base], &[]);
    assert_eq!(out.status.code(), Some(2), "--pretty without --json is a usage error");

    let out = common::cli(
        &["hierarchy", "role", "captain", "--base", &base, "--admin-token", &server.token],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("failed (422 Unprocessable Entity)") && err.contains("unknown_role"),
        "{err}"
    );
}

#[test]
fn hierarchy_commands_and_local_token_fallback() {
    let server = common::Launch::new().start();
    let base = server.base();
    let env = [("ARW_ADMIN_TOKEN", server.token.as_str())];
    let out = common::cli(&["hierarchy", "role", "home", "--base", &base], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("role: root"));

    let out = common::cli(
        &[
            "hierarchy",
            "hello",
            "--id",
            "w-1",
            "--role",
            "worker",
            "--scope-tag",
            "gpu",
            "--base",
            &base,
        ],
        &env,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A second hello with the default epoch reuses the stored epoch with a fresh nonce.
    let out = common::cli(&["hierarchy", "hello", "--id", "w-1", "--base", &base], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let out = common::cli(&["hierarchy", "state", "--base", &base], &env);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Node         : w-1") && text.contains("Role         : edge"), "{text}");

    // With no token given, arw-cli uses the token file of the server in ARW_STATE_DIR.
    std::fs::write(server.state_dir.join("admin-token"), format!("{}\n", server.token))
        .expect("write");
    let state_dir = server.state_dir.display().to_string();
    let out = common::cli(
        &["state", "cluster", "--base", &base, "--json"],
        &[("ARW_STATE_DIR", &state_dir)],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Lines printed by a running `arw-cli events tail`, read on a thread with a bounded wait.
struct TailOutput {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl TailOutput {
    fn start(base: &str, token: &str) -> Self {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_arw-cli"))
            .args(["events", "tail", "--json", "--prefix", "service.", "--after", "0"])
            .args(["--base", base, "--admin-token", token])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn arw-cli events tail");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in
                std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    fn next_json(&self) -> serde_json::Value {
        let line = self
            .lines
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("a line within 20 s");
        serde_json::from_str(&line).expect("one JSON object per line")
    }
}

impl Drop for TailOutput {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn events_tail_resumes_across_a_server_crash_without_loss_or_repeats() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let server = common::Launch::new().state_dir(&state).start();
    let base = server.base();
    let port = base.rsplit(':').next().expect("port").to_owned();
    let tail = TailOutput::start(&base, &server.token);

    let publish = |server: &common::Server, n: u64| {
        let (status, body) = server.post("/admin/events/test", &serde_json::json!({ "n": n }));
        assert_eq!(status, 200);
        body["id"].as_i64().expect("id")
    };
    // `--after 0` replays from the start of the journal, so events published before the tail
    // has connected still reach it.
    let mut expected = vec![publish(&server, 1), publish(&server, 2)];
    server.kill();
    let server = common::Launch::new().state_dir(&state).env("ARW_PORT", &port).start();
    expected.push(publish(&server, 3));
    expected.push(publish(&server, 4));

    let mut got = Vec::new();
    while got.len() < expected.len() {
        let event = tail.next_json();
        got.push(event["id"].as_i64().expect("id"));
        assert_eq!(event["kind"], "service.test");
    }
    assert_eq!(got, expected, "every event once, in order, across the crash");
    drop(server);
}

#[test]
fn capsules_signed_by_the_cli_verify_and_one_flipped_byte_does_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    let (key, trust, plain, signed) =
        (path("k"), path("trust.json"), path("c.json"), path("s.json"));
    let out = common::cli(&["capsule", "keygen", &key], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let entry = text.lines().last().expect("entry");
    std::fs::write(&trust, format!(r#"{{"issuers":[{entry}]}}"#)).expect("trust");
    let again = common::cli(&["capsule", "keygen", &key], &[]);
    assert!(!again.status.success(), "an existing key is never overwritten");

    std::fs::write(&plain, r#"{"id":"c1","version":"1","issued_at_ms":0,"denies":["net:*"]}"#)
        .expect("capsule");
    let out = common::cli(&["capsule", "sign-ed25519", &plain, "--key-file", &key], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&signed, &out.stdout).expect("signed");
    let ok = common::cli(&["capsule", "verify", &signed, "--trust", &trust], &[]);
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "valid: c1 signed by local-admin\n");

    // Flip one byte of the payload the signature covers.
    let tampered = String::from_utf8_lossy(&out.stdout).replacen("net:*", "net:+", 1);
    std::fs::write(&signed, tampered).expect("tampered");
    let bad = common::cli(&["capsule", "verify", &signed, "--trust", &trust], &[]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("signature does not match"), "{bad:?}");
}

/// Each binary names itself in `--version` (arw-connector: connector/tests/cli.rs).
#[test]
fn every_binary_names_itself_in_version() {
    for (name, path) in [
        ("arw-server", env!("CARGO_BIN_EXE_arw-server")),
        ("arw-cli", env!("CARGO_BIN_EXE_arw-cli")),
    ] {
        let out = std::process::Command::new(path).arg("--version").output().expect("run");
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.trim(), format!("{name} {}", env!("CARGO_PKG_VERSION")));
    }
}

/// `arw-cli events tail | head -n 1`: when the reader goes, the tail ends quietly (exit 0,
/// no panic), at its next event.
#[test]
fn events_tail_into_a_reader_that_stops_early_exits_quietly() {
    use std::io::{BufRead, BufReader};
    let server = common::Launch::new().start();
    let mut tail = std::process::Command::new(env!("CARGO_BIN_EXE_arw-cli"))
        // From the journal's start: the event below is printed whenever the tail connects.
        .args(["events", "tail", "--after", "0", "--base", &server.base()])
        .args(["--admin-token", &server.token])
        .env("HOME", "/nonexistent")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("arw-cli");
    let stdout = tail.stdout.take().expect("stdout");
    let role = |role: &str| {
        let body = serde_json::json!({ "role": role });
        assert_eq!(server.post("/admin/hierarchy/role", &body).0, 200);
    };
    role("regional");
    // One line read, at most 10 s waited for it; then the reader goes.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut first = String::new();
        let _ = BufReader::new(stdout).read_line(&mut first);
        let _ = tx.send(first);
    });
    let first = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("a first event");
    assert!(!first.is_empty());
    // The reader closes its end (as `head` does after its line); more events follow.
    for r in ["edge", "regional", "edge"] {
        role(r);
    }
    let status = common::wait_exit(&mut tail, std::time::Duration::from_secs(10));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut tail.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert!(status.success(), "{status}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A node that is not there (stopped, or a stale endpoints.json) is named, with what to check.
#[test]
fn an_unreachable_node_is_named_with_a_hint() {
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let out = common::cli(&["state", "cluster", "--base", &base, "--admin-token", "t"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!("cannot reach {base}/state/cluster: Connection refused")),
        "{err}"
    );
    assert!(
        err.contains("is arw-server running there?") && err.contains("endpoints.json"),
        "{err}"
    );
    assert!(!err.contains("error sending request"), "{err}");
}

/// Every command group teaches by example in its --help.
#[test]
fn every_command_group_has_help_examples() {
    for group in ["state", "hierarchy", "events", "cluster"] {
        let out = common::cli(&[group, "--help"], &[]);
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        let examples = text.split("Examples:\n").nth(1).unwrap_or_default();
        assert!(
            examples.lines().any(|l| l.trim_start().starts_with(&format!("arw-cli {group} "))),
            "{group} --help has no example of itself: {text}"
        );
    }
}
