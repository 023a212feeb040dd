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
