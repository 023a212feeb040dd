//! Scenario files (`simnet/scenarios/*.toml`): what to run, on which tier, with which faults.

use std::path::Path;

use arw_p2p::jobs::Prefer;
use serde::{Deserialize, Serialize};

/// Where a scenario runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Deterministic, single-threaded, virtual time: the protocol core on a simulated network.
    Virtual,
    /// Real node actors in one process over loopback libp2p.
    Stack,
    /// `arw-server` processes in network namespaces with mDNS (needs root).
    Lan,
}

impl Tier {
    /// The file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Virtual => "virtual",
            Tier::Stack => "stack",
            Tier::Lan => "lan",
        }
    }
}

/// One-way link latency: fixed, or uniform in `[min, max]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Latency {
    /// Always this many ms.
    Fixed(f64),
    /// Uniform between the two, ms.
    Range([f64; 2]),
}

impl Default for Latency {
    fn default() -> Self {
        Latency::Fixed(1.0)
    }
}

/// `[link]`: the simulated (virtual) or injected (lan) network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Link {
    /// One-way latency (virtual tier).
    pub latency_ms: Latency,
    /// Probability that one transmission attempt is lost. Messages ride TCP, so a loss delays
    /// the message by a retransmission timeout (200 ms, doubling) rather than dropping it.
    pub loss: f64,
    /// Each node's gossip overlay degree (virtual tier); the graph also contains a ring, so it
    /// is connected.
    pub degree: usize,
}

impl Default for Link {
    fn default() -> Self {
        Self { latency_ms: Latency::default(), loss: 0.0, degree: 6 }
    }
}

/// `[protocol]`: liveness settings under test (defaults are the daemon's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProtocolSettings {
    /// Heartbeat period.
    pub heartbeat_interval_ms: u64,
    /// Silence before `suspect`.
    pub suspect_after_ms: u64,
    /// Silence before `down`.
    pub down_after_ms: u64,
    /// The libp2p mesh with this many watchers per node (probe mode); 0: the NATS bus, a
    /// broker that delivers every message to every node, heartbeats broadcast. Virtual tier
    /// only.
    pub observers: usize,
    /// Re-advert period (virtual tier; each node starts at a random phase).
    pub advertise_interval_secs: u64,
}

impl Default for ProtocolSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 1000,
            suspect_after_ms: 3000,
            down_after_ms: 5000,
            observers: arw_p2p::membership::DEFAULT_OBSERVERS,
            advertise_interval_secs: 300,
        }
    }
}

/// What happens at `at_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultKind {
    /// `node` signs a new advert (measured: convergence).
    Advert,
    /// `node` dies; its connections are reset (measured: detection).
    Crash,
    /// A crashed `node` comes back with its state (measured: convergence of its boot advert).
    Restart,
    /// Every link of `node` goes silent, no reset (measured: detection).
    Isolate,
    /// The first `fraction` of the nodes and the rest stop hearing each other, silently.
    Partition,
    /// The partition (and any isolation) ends (measured: time until every view is whole again).
    Heal,
}

/// One scheduled fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// When, in seconds from the start of a trial.
    pub at_secs: f64,
    /// What.
    pub kind: FaultKind,
    /// Which node (advert, crash, restart, isolate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<usize>,
    /// Which share of the nodes forms the first side (partition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
}

impl Fault {
    /// e.g. `crash node 3 at 10s`.
    pub fn describe(&self) -> String {
        let kind = match self.kind {
            FaultKind::Advert => "advert",
            FaultKind::Crash => "crash",
            FaultKind::Restart => "restart",
            FaultKind::Isolate => "isolate",
            FaultKind::Partition => "partition",
            FaultKind::Heal => "heal",
        };
        match (self.node, self.fraction) {
            (Some(n), _) => format!("{kind} node {n} at {}s", self.at_secs),
            (None, Some(f)) => format!("{kind} {f} at {}s", self.at_secs),
            (None, None) => format!("{kind} at {}s", self.at_secs),
        }
    }
}

/// A scenario file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name.
    pub name: String,
    /// What it measures.
    #[serde(default)]
    pub description: String,
    /// Where it runs.
    pub tier: Tier,
    /// How many nodes.
    pub nodes: usize,
    /// RNG seed (virtual tier); `--seed` overrides.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Independent repetitions (seed + trial index).
    #[serde(default = "default_trials")]
    pub trials: usize,
    /// Length of one trial, seconds (virtual time on the virtual tier).
    pub duration_secs: f64,
    /// Traffic is counted from this many seconds into a trial (virtual tier), so a steady
    /// state is not mixed with the start, when every node floods its first advert and syncs.
    #[serde(default)]
    pub traffic_after_secs: f64,
    /// Network.
    #[serde(default)]
    pub link: Link,
    /// Protocol settings.
    #[serde(default)]
    pub protocol: ProtocolSettings,
    /// Faults, in any order.
    #[serde(default)]
    pub faults: Vec<Fault>,
    /// Jobs (virtual tier): node 0 is the Home and places them on the others.
    #[serde(default)]
    pub jobs: JobsSettings,
}

/// `[jobs]`: node 0 becomes the Home, admits every other node, and from `start_secs` is
/// handed `count` jobs of kind `work`, `every_ms` apart, each carrying an `idem_key` (so a lost
/// attempt runs again). Every other node runs `work` for it in `slots` slots; a run takes
/// `run_ms` (uniform in `[min, max]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsSettings {
    /// Jobs submitted (0: none, no Home).
    pub count: usize,
    /// The first submission, seconds into a trial.
    pub start_secs: f64,
    /// Between submissions, ms.
    pub every_ms: u64,
    /// How long a run takes, ms.
    pub run_ms: [u64; 2],
    /// Slots per worker.
    pub slots: u32,
    /// Each job's `placement.prefer`: `remote` (default), `auto` or `local`.
    pub prefer: Prefer,
    /// Slots at the Home, which then runs `work` too (0: it only places).
    pub home_slots: u32,
    /// Workers 1..=gpu_workers offer a GPU.
    pub gpu_workers: usize,
    /// Every `gpu_every`-th job requires a GPU (0: none does).
    pub gpu_every: usize,
    /// With each new job, this many earlier ones are submitted again with the same
    /// `idem_key` and input (an idempotency storm: each must come back as the one row).
    pub resubmit: usize,
}

impl Default for JobsSettings {
    fn default() -> Self {
        Self {
            count: 0,
            start_secs: 10.0,
            every_ms: 100,
            run_ms: [500, 5_000],
            slots: 2,
            prefer: Prefer::Remote,
            home_slots: 0,
            gpu_workers: 0,
            gpu_every: 0,
            resubmit: 0,
        }
    }
}

fn default_seed() -> u64 {
    1
}

fn default_trials() -> usize {
    1
}

/// A scenario that cannot run.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ScenarioError(pub String);

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ScenarioError(format!("{}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| ScenarioError(format!("{}: {e}", path.display())))
    }

    /// Parses and checks scenario text.
    pub fn parse(text: &str) -> Result<Self, ScenarioError> {
        let scenario: Scenario = toml::from_str(text).map_err(|e| ScenarioError(e.to_string()))?;
        scenario.check()?;
        Ok(scenario)
    }

    fn check(&self) -> Result<(), ScenarioError> {
        let fail = |m: String| Err(ScenarioError(m));
        if self.nodes < 2 {
            return fail("nodes: at least 2".into());
        }
        if self.trials == 0 || self.duration_secs <= 0.0 {
            return fail("trials and duration_secs must be positive".into());
        }
        if !(0.0..self.duration_secs).contains(&self.traffic_after_secs) {
            return fail("traffic_after_secs must be in [0, duration_secs)".into());
        }
        if !(0.0..1.0).contains(&self.link.loss) {
            return fail("link.loss: a probability in [0, 1)".into());
        }
        if let Latency::Range([lo, hi]) = self.link.latency_ms
            && !(0.0 <= lo && lo <= hi)
        {
            return fail("link.latency_ms: [min, max] with 0 <= min <= max".into());
        }
        let p = &self.protocol;
        if p.heartbeat_interval_ms == 0
            || p.suspect_after_ms <= p.heartbeat_interval_ms
            || p.down_after_ms <= p.suspect_after_ms
        {
            return fail(
                "protocol: need 0 < heartbeat_interval_ms < suspect_after_ms < down_after_ms"
                    .into(),
            );
        }
        let j = &self.jobs;
        if j.count > 0 {
            if self.tier == Tier::Lan {
                return fail("jobs: the virtual and stack tiers only".into());
            }
            if j.run_ms[0] == 0 || j.run_ms[0] > j.run_ms[1] || j.slots == 0 || j.every_ms == 0 {
                return fail(
                    "jobs: run_ms [min, max] with 0 < min <= max; slots, every_ms > 0".into(),
                );
            }
            if j.gpu_workers >= self.nodes {
                return fail("jobs: gpu_workers must leave node 0 (the Home) out".into());
            }
            if j.gpu_every > 0 && j.gpu_workers == 0 {
                return fail("jobs: gpu_every needs gpu_workers".into());
            }
            if j.prefer == Prefer::Local && j.home_slots == 0 {
                return fail("jobs: prefer = \"local\" needs home_slots".into());
            }
        }
        for f in &self.faults {
            let needs_node = matches!(
                f.kind,
                FaultKind::Advert | FaultKind::Crash | FaultKind::Restart | FaultKind::Isolate
            );
            match (needs_node, f.node) {
                (true, None) => return fail(format!("{}: needs node", f.describe())),
                (true, Some(n)) if n >= self.nodes => {
                    return fail(format!("{}: no such node", f.describe()));
                }
                _ => {}
            }
            if f.kind == FaultKind::Partition && !f.fraction.is_some_and(|x| x > 0.0 && x < 1.0) {
                return fail(format!("{}: needs 0 < fraction < 1", f.describe()));
            }
            if f.at_secs < 0.0 || f.at_secs >= self.duration_secs {
                return fail(format!("{}: outside the trial", f.describe()));
            }
        }
        Ok(())
    }

    /// Faults sorted by time.
    pub fn schedule(&self) -> Vec<Fault> {
        let mut faults = self.faults.clone();
        faults.sort_by(|a, b| a.at_secs.total_cmp(&b.at_secs));
        faults
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_nonsense() {
        let ok = "name = \"x\"\ntier = \"virtual\"\nnodes = 5\nduration_secs = 10\n[link]\nlatency_ms = [10, 50]\n[[faults]]\nat_secs = 2\nkind = \"crash\"\nnode = 1\n";
        let s = Scenario::parse(ok).expect("valid");
        assert_eq!(s.link.latency_ms, Latency::Range([10.0, 50.0]));
        for bad in [
            ok.replace("node = 1", "node = 9"),
            ok.replace("at_secs = 2", "at_secs = 20"),
            ok.replace("nodes = 5", "nodes = 1"),
            ok.replace("[link]", "[link]\nlos = 0.1"),
        ] {
            assert!(Scenario::parse(&bad).is_err(), "{bad}");
        }
    }
}
