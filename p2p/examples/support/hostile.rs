//! What the flood examples share: ids, the process's CPU time, an envelope whose signature does
//! not match, and the count of honest nodes judged `suspect` or `down`.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use arw_p2p::{
    identity::NodeKey,
    node_id::NodeId,
    time::now_ms,
    wire::{Message, Suspicion, seal},
};

/// A node id from a name the example made up.
pub fn id(s: &str) -> NodeId {
    NodeId::parse(s).expect("id")
}

/// This process's CPU time (user + system) in seconds.
#[allow(dead_code, reason = "the NATS example measures its nodes' processes instead")]
pub fn cpu_secs() -> f64 {
    cpu_secs_in("/proc/self/stat")
}

/// Process `pid`'s CPU time (user + system) in seconds.
#[allow(dead_code, reason = "the mesh example measures its own process")]
pub fn cpu_secs_of(pid: u32) -> f64 {
    cpu_secs_in(&format!("/proc/{pid}/stat"))
}

fn cpu_secs_in(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// The `n`th report of member `liar` (advertised at seq 1), naming honest node `w<n % honest>`
/// at a position beyond anything it published.
pub fn lie(n: u64, honest: usize) -> Message {
    Message::Suspect(Suspicion {
        id: id("liar"),
        workspace: "default".into(),
        seq: 1,
        beat: n + 1,
        sent_ms: now_ms(),
        target: id(&format!("w{}", n as usize % honest)),
        target_seq: u64::MAX,
        target_beat: u64::MAX,
    })
}

/// The key of the `i`th Sybil: fresh, and the same in every run.
pub fn sybil_key(i: u32) -> NodeKey {
    let mut secret = [9u8; 32];
    secret[..4].copy_from_slice(&i.to_be_bytes());
    NodeKey::from_secret(secret)
}

/// `message` sealed under `key`, then given a signature that matches nothing.
pub fn bad_signature(key: &NodeKey, message: &Message) -> Vec<u8> {
    let mut sealed = seal(key, "default", message);
    // The signature's base64 is the envelope's last 88 bytes before `"}`.
    let end = sealed.len() - 2;
    let forged = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 64]);
    sealed[end - forged.len()..end].copy_from_slice(forged.as_bytes());
    sealed
}

/// Delivery times (ms, sorted) of the adverts `seen` arriving, each from when its `seq` was
/// sent (`sent_at`); arrivals of adverts not in `sent_at` are left out.
#[allow(dead_code, reason = "the NATS example's nodes report from their own processes")]
pub fn delivery(
    seen: &mut tokio::sync::mpsc::UnboundedReceiver<(u64, std::time::Instant)>,
    sent_at: &std::collections::BTreeMap<u64, std::time::Instant>,
) -> Vec<f64> {
    let mut delivery = Vec::new();
    while let Ok((s, at)) = seen.try_recv() {
        if let Some(t) = sent_at.get(&s) {
            delivery.push(at.duration_since(*t).as_secs_f64() * 1000.0);
        }
    }
    delivery.sort_by(f64::total_cmp);
    delivery
}

/// Honest nodes (ids `w<n>`) judged `suspect` / `down` by another, counted from events.
#[derive(Debug, Clone, Default)]
pub struct Judged {
    suspects: Arc<AtomicU64>,
    downs: Arc<AtomicU64>,
}

impl Judged {
    /// Counts one event (`kind`, `payload`) of some node's; returns the health it counted.
    pub fn count(&self, kind: &str, p: &serde_json::Value) -> Option<&'static str> {
        let honest = p["id"].as_str().is_some_and(|s| s.starts_with('w'));
        if kind != "cluster.node.changed" || !honest || !p["previous_health"].is_string() {
            return None;
        }
        match p["health"].as_str() {
            Some("suspect") => self.suspects.fetch_add(1, Ordering::Relaxed),
            Some("down") => self.downs.fetch_add(1, Ordering::Relaxed),
            _ => return None,
        };
        p["health"].as_str().and_then(|h| ["suspect", "down"].into_iter().find(|k| *k == h))
    }

    /// `(suspect, down)` so far.
    #[allow(dead_code, reason = "the NATS example's nodes report each as it comes")]
    pub fn read(&self) -> (u64, u64) {
        (self.suspects.load(Ordering::Relaxed), self.downs.load(Ordering::Relaxed))
    }
}
