//! Running real `arw-server` processes in tests: port 0, a private state dir, and the ready file
//! instead of fixed ports. Every wait is bounded.

#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

/// How long a server may take to write its ready file.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `arw-server`, killed when dropped.
pub struct Server {
    child: Option<Child>,
    pub state_dir: PathBuf,
    pub token: String,
    pub endpoints: Value,
    _dir: Option<tempfile::TempDir>,
}

/// Environment for a server: extra variables on top of `ARW_PORT=0`, a state dir and a token.
pub struct Launch {
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
    pub state_dir: Option<PathBuf>,
    pub config: Option<String>,
    /// Run as a fresh user would: this `HOME`, no state dir or token given (the server picks
    /// `~/.local/share/arw` and generates `admin-token` there).
    pub home: Option<PathBuf>,
}

impl Launch {
    pub fn new() -> Self {
        Self { env: Vec::new(), args: Vec::new(), state_dir: None, config: None, home: None }
    }

    /// Zero configuration under `home` (see [`Launch::home`]).
    pub fn home(mut self, home: &Path) -> Self {
        self.home = Some(home.to_path_buf());
        self
    }

    /// A command-line argument for arw-server.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }

    /// Writes `toml` to `${state_dir}/config.toml` before starting.
    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_owned());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn state_dir(mut self, dir: &Path) -> Self {
        self.state_dir = Some(dir.to_path_buf());
        self
    }

    pub fn start(self) -> Server {
        let (dir, state_dir) = match (&self.home, self.state_dir) {
            (Some(home), _) => (None, home.join(".local/share/arw")),
            (None, Some(path)) => (None, path),
            (None, None) => {
                let dir = tempfile::tempdir().expect("tempdir");
                let path = dir.path().join("state");
                (Some(dir), path)
            }
        };
        if let Some(toml) = &self.config {
            std::fs::create_dir_all(&state_dir).expect("state dir");
            std::fs::write(state_dir.join("config.toml"), toml).expect("config.toml");
        }
        let mut token = "test-admin-token".to_owned();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_arw-server"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("ARW_PORT", "0")
            .env("ARW_CONFIG_DIR", state_dir.join("no-such-config-dir"))
            .env("ARW_LOG", "warn")
            .current_dir(self.home.as_deref().or(state_dir.parent()).unwrap_or(Path::new("/")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        match &self.home {
            Some(home) => cmd.env("HOME", home),
            None => cmd.env("ARW_STATE_DIR", &state_dir).env("ARW_ADMIN_TOKEN", &token),
        };
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.args(&self.args);
        let ready = state_dir.join("endpoints.json");
        let _ = std::fs::remove_file(&ready);
        let mut child = cmd.spawn().expect("spawn arw-server");
        let endpoints = wait_for_ready(&ready, &mut child);
        if self.home.is_some() {
            let generated = std::fs::read_to_string(state_dir.join("admin-token"));
            token = generated.expect("a generated admin-token").trim().to_owned();
        }
        Server { child: Some(child), state_dir, token, endpoints, _dir: dir }
    }
}

/// Waits (bounded) until `path` holds a ready file written by `child`; panics if it exits first.
pub fn wait_for_ready(path: &Path, child: &mut Child) -> Value {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(value) = serde_json::from_str::<Value>(&text)
            && value["pid"].as_u64() == Some(u64::from(child.id()))
        {
            return value;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("arw-server exited before it was ready: {status}");
        }
        assert!(Instant::now() < deadline, "arw-server not ready within {START_TIMEOUT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Server {
    pub fn base(&self) -> String {
        format!("http://{}", self.endpoints["http"].as_str().expect("http address"))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    /// GET with the admin token; returns (status, JSON body).
    pub fn get(&self, path: &str) -> (u16, Value) {
        request("GET", &format!("{}{path}", self.base()), Some(&self.token), None)
    }

    /// POST JSON with the admin token.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        request("POST", &format!("{}{path}", self.base()), Some(&self.token), Some(body))
    }

    /// SIGTERM, then wait (bounded) for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -TERM failed");
        wait_exit(&mut child, Duration::from_secs(20))
    }

    /// SIGKILL, no cleanup.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP request with curl (as operators do); returns (status, JSON body or Null).
pub fn request(method: &str, url: &str, token: Option<&str>, body: Option<&Value>) -> (u16, Value) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "-X", method, "-o", "-", "-w", "\n%{http_code}", url]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if body.is_some() {
        // From stdin: a body may be larger than an argument may.
        cmd.args(["-H", "Content-Type: application/json", "--data-binary", "@-"]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl");
    if let (Some(b), Some(mut stdin)) = (body, child.stdin.take()) {
        use std::io::Write;
        stdin.write_all(b.to_string().as_bytes()).expect("body to curl");
    }
    let out = child.wait_with_output().expect("curl");
    assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (code.trim().parse().expect("status"), serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Polls `check` every 50 ms until it yields a value, at most `limit`; panics naming `what`
/// and the last thing `check` saw.
pub fn eventually<T>(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(value) => return value,
            Err(seen) if Instant::now() >= deadline => {
                panic!("{what} not seen within {limit:?}: {seen}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// `(id, health, seq)` of every node in a `/state/cluster` body.
pub fn node_rows(view: &Value) -> Vec<(String, String, u64)> {
    let rows = view["nodes"].as_array().map(Vec::as_slice).unwrap_or_default();
    rows.iter()
        .map(|n| {
            let text = |key: &str| n[key].as_str().unwrap_or("?").to_owned();
            (text("id"), text("health"), n["seq"].as_u64().unwrap_or(0))
        })
        .collect()
}

/// `GET /metrics` as text.
pub fn metrics(server: &Server) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", &format!("{}/metrics", server.base())])
        .output()
        .expect("curl");
    assert!(out.status.success(), "GET /metrics: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `arw-cli` with the given arguments and environment.
pub fn cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_arw-cli"));
    cmd.env_remove("ARW_ADMIN_TOKEN").env_remove("ARW_STATE_DIR").env_remove("ARW_BASE");
    cmd.env("HOME", "/nonexistent").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run arw-cli")
}

/// Directory holding the built binaries (for PATH in shell-driven tests).
pub fn bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_arw-cli")).parent().expect("bin dir").to_path_buf()
}

pub mod sse;
