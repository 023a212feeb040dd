//! What the NATS examples share: their own `nats-server` on a free port, and percentiles.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

/// A `nats-server` on loopback, stopped on drop.
pub struct Broker {
    child: Child,
    /// `nats://127.0.0.1:<port>`.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Broker {
    /// Starts one on a free port (`-p -1`) and reads its URL back from its ports file.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", "-1", "--ports_file_dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (apt-get install nats-server)");
        let ports = dir.path().join(format!("nats-server_{}.ports", child.id()));
        let url = loop {
            if let Some(url) = std::fs::read_to_string(&ports)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v["nats"][0].as_str().map(str::to_owned))
            {
                break url;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Self { child, url, _dir: dir }
    }
}

impl Broker {
    /// The broker's process id.
    #[allow(dead_code, reason = "only the flood example measures the broker")]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The nearest-rank `p` percentile of `sorted` (NaN when empty).
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len().saturating_sub(1)) as f64 * p).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}
