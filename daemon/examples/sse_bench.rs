//! SSE fan-out and journal publish benchmark against a real `arw-server` process.
//!
//! ```sh
//! cargo build --release -p arw-daemon
//! cargo run --release -p arw-daemon --example sse_bench -- --subscribers 1000
//! ```
//!
//! Fan-out: opens N subscribers on `/events?prefix=service.test` (raw TCP, one task each), publishes
//! events 50 ms apart through `POST /admin/events/test` carrying their send time, and reports
//! delivery latency (send → each subscriber) p50/p99/max, and the server's RSS growth per
//! subscriber. Publish: P concurrent HTTP publishers for a few seconds, acknowledged (journaled)
//! events per second, with `[events] fsync` on and off.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};

const TOKEN: &str = "bench-token";

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_owned())
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

struct Server {
    child: Child,
    http: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(binary: &Path, config: &str) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    std::fs::write(state.join("config.toml"), config).expect("config");
    let child = Command::new(binary)
        .env("ARW_PORT", "0")
        .env("ARW_STATE_DIR", &state)
        .env("ARW_ADMIN_TOKEN", TOKEN)
        .env("ARW_CONFIG_DIR", dir.path())
        .env("ARW_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn arw-server");
    let ready = state.join("endpoints.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    let http = loop {
        if let Some(http) = std::fs::read_to_string(&ready)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v["http"].as_str().map(str::to_owned))
        {
            break http;
        }
        assert!(Instant::now() < deadline, "server not ready");
        std::thread::sleep(Duration::from_millis(20));
    };
    Server { child, http, _dir: dir }
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// One subscriber: reads frames and reports each bench event's latency in µs.
async fn subscriber(http: String, ready: mpsc::Sender<()>, latencies: mpsc::UnboundedSender<u64>) {
    let mut stream = TcpStream::connect(&http).await.expect("connect");
    let request = format!(
        "GET /events?prefix=service.test HTTP/1.1\r\nHost: {http}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut buf = vec![0u8; 4096];
    let mut pending = String::new();
    let mut connected = false;
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.push_str(&String::from_utf8_lossy(&buf[..n]));
        while let Some(pos) = pending.find("\n\n") {
            let frame: String = pending.drain(..pos + 2).collect();
            if frame.contains("event: service.connected") && !connected {
                connected = true;
                let _ = ready.send(()).await;
            }
            // A string scan instead of a JSON parse keeps the client's share of the CPU small.
            if let Some(sent) = frame.split("\"sent_us\":").nth(1).and_then(|rest| {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse::<u64>().ok()
            }) {
                let _ = latencies.send(now_us().saturating_sub(sent));
            }
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64 / 1000.0
}

async fn fanout(binary: &Path, subscribers: usize, events: usize) {
    let server = start(binary, "");
    let client = reqwest::Client::new();
    let base = format!("http://{}", server.http);
    let rss_before = rss_bytes(server.child.id());
    let (ready_tx, mut ready_rx) = mpsc::channel(subscribers);
    let (lat_tx, mut lat_rx) = mpsc::unbounded_channel();
    let connect_started = Instant::now();
    for _ in 0..subscribers {
        tokio::spawn(subscriber(server.http.clone(), ready_tx.clone(), lat_tx.clone()));
    }
    drop(lat_tx);
    for _ in 0..subscribers {
        tokio::time::timeout(Duration::from_secs(120), ready_rx.recv())
            .await
            .expect("subscribers connect");
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_bytes(server.child.id());
    for _ in 0..events {
        let body = json!({ "sent_us": now_us(), "kind_hint": "bench" });
        client
            .post(format!("{base}/admin/events/test"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .expect("publish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expected = subscribers * events;
    let mut latencies = Vec::with_capacity(expected);
    let deadline = Instant::now() + Duration::from_secs(120);
    while latencies.len() < expected && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), lat_rx.recv()).await {
            Ok(Some(us)) => latencies.push(us),
            _ => break,
        }
    }
    latencies.sort_unstable();
    let per_sub = (rss_after.saturating_sub(rss_before)) as f64 / subscribers as f64 / 1024.0;
    println!(
        "fanout subscribers={subscribers} events={events} delivered={}/{expected} connect_s={connect_secs:.2} \
         latency_ms p50={:.2} p99={:.2} max={:.2} rss_before_mib={:.1} rss_after_mib={:.1} rss_per_subscriber_kib={per_sub:.1}",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0),
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0,
    );
}

async fn publish_rate(binary: &Path, fsync: bool, publishers: usize, secs: u64) {
    let server = start(binary, &format!("[events]\nfsync = {fsync}\n"));
    let base = format!("http://{}", server.http);
    let stop = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..publishers {
        let (client, base) = (reqwest::Client::new(), base.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < stop {
                let ok = client
                    .post(format!("{base}/admin/events/test"))
                    .bearer_auth(TOKEN)
                    .json(&json!({ "n": n }))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                n += u64::from(ok);
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    println!(
        "publish fsync={fsync} publishers={publishers} secs={secs} acked={total} events_per_s={:.0}",
        total as f64 / secs as f64
    );
}

#[tokio::main]
async fn main() {
    let binary = PathBuf::from(arg("--server", "target/release/arw-server"));
    let subscribers: usize = arg("--subscribers", "1000").parse().expect("--subscribers N");
    let events: usize = arg("--events", "20").parse().expect("--events N");
    let publishers: usize = arg("--publishers", "8").parse().expect("--publishers N");
    let secs: u64 = arg("--publish-secs", "5").parse().expect("--publish-secs S");
    let mode = arg("--mode", "all");
    if mode == "all" || mode == "fanout" {
        fanout(&binary, subscribers, events).await;
    }
    if mode == "all" || mode == "publish" {
        publish_rate(&binary, true, publishers, secs).await;
        publish_rate(&binary, false, publishers, secs).await;
    }
}
