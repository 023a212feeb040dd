//! arw-server as a process: start-up refusals, --check-config, the ready file and shutdown.

mod common;

use std::process::{Command, Stdio};

fn server_cmd(state: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_arw-server"));
    cmd.env_clear()
        .env("ARW_STATE_DIR", state)
        .env("ARW_CONFIG_DIR", state.join("none"))
        .env("ARW_PORT", "0")
        .stdin(Stdio::null());
    cmd
}

#[test]
fn invalid_config_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = server_cmd(dir.path()).env("ARW_PORT", "eighty").output().expect("run");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.port") && err.contains("ARW_PORT"), "{err}");

    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[cluster]\nadvertise_interval_secs = \"soon\"\n").expect("write");
    let out = server_cmd(dir.path()).env("ARW_CONFIG", &config).output().expect("run");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cluster.advertise_interval_secs") && err.contains("bad.toml"), "{err}");
}

#[test]
fn public_bind_without_token_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = server_cmd(dir.path()).env("ARW_BIND", "0.0.0.0").output().expect("run");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ARW_BIND=0.0.0.0 is public and ARW_ADMIN_TOKEN/ARW_ADMIN_TOKEN_SHA256 not set; refusing to start"),
        "{err}"
    );
    assert!(!dir.path().join("admin-token").exists(), "a token was generated for a public bind");
}

#[test]
fn check_config_prints_effective_values_with_secrets_redacted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = server_cmd(dir.path())
        .args(["--check-config"])
        .env("ARW_ADMIN_TOKEN", "hunter2-secret")
        .env("ARW_NODE_ID", "box-1")
        .output()
        .expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("hunter2-secret"), "{text}");
    assert!(text.contains(r#"admin_token = "<redacted>""#), "{text}");
    assert!(text.contains(r#"node_id = "box-1""#) && text.contains("port = 0"), "{text}");
    assert!(!dir.path().join("endpoints.json").exists(), "--check-config started a server");
}

#[test]
fn generated_token_file_is_private_and_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let mut child = server_cmd(&state).stderr(Stdio::piped()).spawn().expect("spawn");
    let ready = state.join("endpoints.json");
    let deadline = std::time::Instant::now() + common::START_TIMEOUT;
    while !ready.exists() {
        assert!(std::time::Instant::now() < deadline, "not ready");
        assert!(child.try_wait().expect("wait").is_none(), "server exited");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let token_path = state.join("admin-token");
    let token = std::fs::read_to_string(&token_path).expect("token").trim().to_owned();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let key_mode =
            std::fs::metadata(state.join("node.key")).expect("meta").permissions().mode() & 0o777;
        assert_eq!(key_mode, 0o600);
    }
    let endpoints: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ready).expect("ready")).expect("json");
    let url = format!("http://{}/state/cluster", endpoints["http"].as_str().expect("http"));
    let (status, _) = common::request("GET", &url, Some(&token), None);
    assert_eq!(status, 200);

    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let status = common::wait_exit(&mut child, std::time::Duration::from_secs(20));
    assert!(status.success());
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut log)
        .expect("log");
    assert!(log.contains("admin-token"), "token file path not logged: {log}");
    assert!(!log.contains(&token), "the token itself was logged");
    assert!(!ready.exists());
}

/// Runs `cmd` to its exit (bounded), returning its status code and stderr.
fn run_to_exit(mut cmd: Command) -> (Option<i32>, String) {
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn");
    let status = common::wait_exit(&mut child, common::START_TIMEOUT);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    (status.code(), err)
}

#[test]
fn debug_mode_with_a_public_bind_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("config.toml"), "[cluster]\nenabled = false\n").expect("write");
    let mut cmd = server_cmd(dir.path());
    cmd.env("ARW_BIND", "0.0.0.0").env("ARW_ADMIN_TOKEN", "t0ken").env("ARW_DEBUG", "1");
    let (code, err) = run_to_exit(cmd);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("ARW_DEBUG") && err.contains("non-loopback"), "{err}");
}

#[test]
fn a_lost_node_key_beside_its_state_is_not_silently_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let first = common::Launch::new().state_dir(&state).start();
    let key = std::fs::read_to_string(state.join("node.key")).expect("key");
    assert!(first.stop().success());
    std::fs::remove_file(state.join("node.key")).expect("lose the key");

    let (code, err) = run_to_exit(server_cmd(&state));
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("node.key is missing") && err.contains("--new-identity"), "{err}");
    assert!(!state.join("node.key").exists(), "a key was written anyway");

    let second = common::Launch::new().state_dir(&state).arg("--new-identity").start();
    let new_key = std::fs::read_to_string(state.join("node.key")).expect("new key");
    assert_ne!(key, new_key);
    assert!(second.stop().success());
}

/// Reads from `stream` until it is closed (Ok(0) or a reset), at most `limit`; true if it was.
fn closed_within(stream: &mut std::net::TcpStream, limit: std::time::Duration) -> bool {
    use std::io::Read;
    let deadline = std::time::Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).expect("timeout");
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// An SSE request on a raw socket, once the response headers arrived. A connection closed at
/// once (the server is still releasing an earlier one's place) is tried again, for at most 10 s.
fn open_stream(addr: &str, token: &str) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut stream = std::net::TcpStream::connect(addr).expect("connect");
        let request = format!(
            "GET /events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).expect("request");
        stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).expect("timeout");
        let mut head = [0u8; 12];
        match stream.read_exact(&mut head) {
            Ok(()) => {
                assert_eq!(&head[..12], b"HTTP/1.1 200", "{}", String::from_utf8_lossy(&head));
                return stream;
            }
            Err(e) => assert!(std::time::Instant::now() < deadline, "no stream: {e}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn sse_clients(server: &common::Server) -> Option<u64> {
    common::metrics(server)
        .lines()
        .find(|l| l.starts_with("arw_events_sse_clients ") || l.starts_with("events_sse_clients "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

#[test]
fn silent_excess_and_stalled_connections_are_closed() {
    use std::time::Duration;
    let server = common::Launch::new()
        .config("[server]\nmax_connections = 3\nheader_timeout_secs = 1\nsend_timeout_secs = 1\n")
        .start();
    let addr = server.endpoints["http"].as_str().expect("http").to_owned();

    // A connection that never sends a request is closed.
    let mut silent = std::net::TcpStream::connect(&addr).expect("connect");
    assert!(closed_within(&mut silent, Duration::from_secs(5)), "a silent connection was held");

    // Three streams fill the server; a fourth connection is closed at once.
    let streams: Vec<std::net::TcpStream> =
        (0..3).map(|_| open_stream(&addr, &server.token)).collect();
    let mut fourth = std::net::TcpStream::connect(&addr).expect("connect");
    assert!(closed_within(&mut fourth, Duration::from_secs(2)), "over max_connections");
    drop(streams);

    // A stream whose client stops reading is dropped once the server cannot send to it.
    let _stalled = open_stream(&addr, &server.token);
    let blob = serde_json::json!({ "blob": "x".repeat(60_000) });
    common::eventually(Duration::from_secs(60), "the stalled stream dropped", || {
        for _ in 0..20 {
            let (status, _) = server.post("/admin/events/test", &blob);
            if status != 200 {
                return Err(format!("publish: {status}"));
            }
        }
        match sse_clients(&server) {
            Some(0) => Ok(()),
            other => Err(format!("SSE clients: {other:?}")),
        }
    });
}

/// The reference's ARW_HTTP_MAX_CONC is a setting here; its variables this server lacks are
/// named at start instead of silently ignored.
#[test]
fn reference_variables_are_honoured_or_named_as_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = server_cmd(dir.path())
        .args(["--check-config"])
        .env("ARW_HTTP_MAX_CONC", "7")
        .env("ARW_KERNEL_ENABLE", "1")
        .env("ARW_EGRESS_PROXY_ENABLE", "1")
        .output()
        .expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("max_concurrent_requests = 7"), "{text}");
    assert!(text.contains("[egress]\nledger = false\nproxy = true"), "{text}");
    let err = String::from_utf8_lossy(&out.stderr);
    let ignored = |var: &str| err.contains(&format!("{var} is set, but this server has no such"));
    assert!(ignored("ARW_KERNEL_ENABLE"), "{err}");
    for honoured in ["ARW_HTTP_MAX_CONC", "ARW_EGRESS_PROXY_ENABLE"] {
        assert!(!ignored(honoured), "{err}");
    }
}

/// Every metric the shipped alert rules and Grafana dashboard use is one a server exports.
#[test]
fn the_shipped_alerts_and_dashboard_name_only_exported_metrics() {
    // Federating on loopback, so libp2p's own metrics are there too.
    let server = common::Launch::new()
        .config("[cluster]\nenabled = true\nmdns = false\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\n")
        .start();
    // A family with no samples yet is left out: one request first, as any scrape after the
    // first sees.
    assert_eq!(server.get("/healthz").0, 200);
    let exported = common::metrics(&server);
    let families: Vec<&str> =
        exported.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/");
    let mut named = 0;
    for file in ["prometheus/arw-alerts.yml", "grafana/arw-federation.json"] {
        let text = std::fs::read_to_string(format!("{root}{file}")).expect("config file");
        let mut rest = text.as_str();
        while let Some(at) = rest.find("arw_") {
            let name: String =
                rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            rest = &rest[at + name.len()..];
            let family = ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(&name);
            assert!(families.contains(&family), "{file} names {name}, which /metrics lacks");
            named += 1;
        }
    }
    assert!(named >= 20, "only {named} metric names found in the shipped files");
}

/// The shipped systemd unit passes `systemd-analyze verify` (with this build's binary in
/// place of the installed path). Skipped where systemd-analyze is missing.
#[test]
fn the_shipped_systemd_unit_verifies() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("skipped: no systemd-analyze");
        return;
    }
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../configs/systemd/arw-server.service"
    ))
    .expect("unit");
    assert!(unit.contains("ExecStart=/usr/local/bin/arw-server\n"));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("arw-server.service");
    let unit = unit.replace("/usr/local/bin/arw-server", env!("CARGO_BIN_EXE_arw-server"));
    std::fs::write(&path, unit).expect("write");
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
}
