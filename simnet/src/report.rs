//! What a run measured: the JSON written by `--json` and the table printed after a run.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use arw_p2p::core::Counters;

use crate::scenario::{Fault, Scenario, Tier};

/// Percentiles of a sample, in milliseconds; `null` when nothing was measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Median.
    pub p50: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// Largest.
    pub max: Option<f64>,
    /// Sample size.
    pub count: usize,
}

impl Stats {
    /// Percentiles of `values` (nearest rank), rounded to 0.1 ms.
    pub fn of(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        let at = |p: f64| -> Option<f64> {
            let last = v.len().checked_sub(1)?;
            let i = ((last as f64) * p).round() as usize;
            v.get(i).map(|x| (x * 10.0).round() / 10.0)
        };
        Self { p50: at(0.5), p99: at(0.99), max: at(1.0), count: v.len() }
    }

    fn cell(&self) -> String {
        match (self.p50, self.p99, self.max) {
            (Some(a), Some(b), Some(c)) => format!("{a:.1} / {b:.1} / {c:.1}"),
            _ => "—".to_owned(),
        }
    }
}

/// A node core's decisions per node per second.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Decisions {
    /// Sync requests.
    pub syncs: f64,
    /// Probes.
    pub probes: f64,
    /// Suspicion reports signed.
    pub reports: f64,
    /// Refutations and proofs of life signed.
    pub refutations: f64,
    /// Connections reset to nodes judged down.
    pub resets: f64,
    /// Redials of nodes judged down.
    pub redials: f64,
    /// Adverts signed.
    pub adverts: f64,
    /// Messages refused.
    pub refused: f64,
    /// Gossip messages shed unchecked as a flood (none in honest traffic).
    #[serde(default)]
    pub shed: f64,
}

/// The result of one scenario run (all trials).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// `virtual`, `stack` or `lan`.
    pub tier: String,
    /// Node count.
    pub nodes: usize,
    /// Trials run.
    pub trials: usize,
    /// Base seed.
    pub seed: u64,
    /// The faults, described.
    pub faults: Vec<String>,
    /// The network model, described.
    pub link: String,
    /// Source revision (`git describe`), or `unknown`.
    pub commit: String,
    /// Advert → every live node, ms (per receiving node).
    pub convergence_ms: Stats,
    /// Receivers that never got a measured advert within the trial.
    pub missed: usize,
    /// Crash or isolation → each observer marks the node not `ok`, ms.
    pub detection_ms: Stats,
    /// Crash or isolation → each observer marks the node `down`, ms.
    pub down_ms: Stats,
    /// Heal → each observer sees every live node `ok` again, ms.
    pub heal_ms: Stats,
    /// Start → every node sees every node `ok`, ms, one sample per trial (stack tier).
    #[serde(default)]
    pub formation_ms: Stats,
    /// Live, reachable nodes marked `down`.
    pub false_positives: usize,
    /// Live, reachable nodes marked `suspect` (transient; not counted as false positives).
    pub false_suspects: usize,
    /// Messages received per node per second (duplicates included).
    pub msgs_per_node_per_s: Option<f64>,
    /// Envelope bytes received per node per second (transport framing excluded).
    pub bytes_per_node_per_s: Option<f64>,
    /// Resident memory per node (stack and lan tiers).
    pub rss_bytes_per_node: Option<u64>,
    /// What each node core decided, per node per second while traffic was counted (virtual
    /// and stack tiers): the same counters whichever executor ran the core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decisions_per_node_per_s: Option<Decisions>,
    /// Jobs (scenarios with `[jobs]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<JobsReport>,
    /// Every convergence sample, for the CDF.
    #[serde(skip)]
    pub convergence_samples: Vec<f64>,
}

/// What happened to the jobs of a run, all trials.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobsReport {
    /// Admitted by the Home.
    pub submitted: usize,
    /// Ended with a result.
    pub completed: usize,
    /// Ended without one.
    pub failed: usize,
    /// Still running or queued when the trial ended.
    pub unfinished: usize,
    /// Attempts lost or refused and placed again.
    pub reassigned: usize,
    /// Of those, attempts whose lease ran out (the worker crashed, or was cut off longer than
    /// a lease; with no such fault, a false reassignment).
    pub lease_expiries: usize,
    /// Jobs with more than one accepted result (must be 0).
    pub duplicate_results: usize,
    /// Times a job started while another run of it was still in progress (must be 0).
    pub overlapping_runs: usize,
    /// Runs that started with a fence no higher than the job's previous run (must be 0).
    pub fence_regressions: usize,
    /// Runs of a job requiring a GPU on a node without one (must be 0).
    pub misplaced: usize,
    /// Attempts the Home ran itself (`actions.running` with placement `local`).
    pub ran_local: usize,
    /// Attempts that ran on a worker.
    pub ran_remote: usize,
    /// Submissions repeated with an earlier job's `idem_key` and input.
    pub resubmitted: usize,
    /// Rows beyond one per `idem_key` (must be 0).
    pub extra_rows: usize,
    /// Submission → the Home's `actions.running`, ms.
    pub submit_to_running_ms: Stats,
    /// A worker's crash → its job's next `actions.running` elsewhere, ms.
    pub crash_to_running_ms: Stats,
}

impl Report {
    /// The table printed after a run.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} ({} tier, {} nodes, {} trials, seed {})",
            self.scenario, self.tier, self.nodes, self.trials, self.seed
        );
        let _ = writeln!(out, "  link    : {}", self.link);
        let _ = writeln!(
            out,
            "  faults  : {}",
            if self.faults.is_empty() { "none".to_owned() } else { self.faults.join(", ") }
        );
        let _ = writeln!(out, "  {:<26} {:>28}", "measure", "p50 / p99 / max (ms)");
        for (name, stats) in [
            ("convergence", &self.convergence_ms),
            ("detection (not ok)", &self.detection_ms),
            ("detection (down)", &self.down_ms),
            ("heal", &self.heal_ms),
            ("formation (all see all ok)", &self.formation_ms),
        ] {
            if stats.count > 0 {
                let _ = writeln!(out, "  {:<26} {:>28}  (n={})", name, stats.cell(), stats.count);
            }
        }
        let _ = writeln!(out, "  missed                     {:>28}", self.missed);
        let _ = writeln!(out, "  false positives (down)     {:>28}", self.false_positives);
        let _ = writeln!(out, "  false suspects             {:>28}", self.false_suspects);
        if let (Some(m), Some(b)) = (self.msgs_per_node_per_s, self.bytes_per_node_per_s) {
            let _ = writeln!(out, "  per node                   {:>20.1} msg/s {:>9.0} B/s", m, b);
        }
        if let Some(d) = &self.decisions_per_node_per_s {
            let _ = writeln!(
                out,
                "  decisions per node per s   syncs {:.3}, probes {:.3}, reports {:.3}, refutations {:.3}, resets {:.3}, redials {:.3}, adverts {:.3}, refused {:.3}, shed {:.3}",
                d.syncs,
                d.probes,
                d.reports,
                d.refutations,
                d.resets,
                d.redials,
                d.adverts,
                d.refused,
                d.shed
            );
        }
        if let Some(j) = &self.jobs {
            let _ = writeln!(
                out,
                "  jobs                       {} submitted, {} completed, {} failed, {} unfinished, {} reassigned ({} lease expiries)",
                j.submitted, j.completed, j.failed, j.unfinished, j.reassigned, j.lease_expiries
            );
            let _ = writeln!(
                out,
                "  jobs: attempts             {} on the Home, {} on workers",
                j.ran_local, j.ran_remote
            );
            for (name, n) in [
                ("duplicate results", j.duplicate_results),
                ("overlapping runs", j.overlapping_runs),
                ("fence regressions", j.fence_regressions),
                ("GPU jobs without a GPU", j.misplaced),
                ("rows beyond one per key", j.extra_rows),
            ] {
                let _ = writeln!(out, "  jobs: {name:<26} {n:>22}");
            }
            if j.resubmitted > 0 {
                let _ = writeln!(out, "  jobs: resubmitted keys     {:>28}", j.resubmitted);
            }
            for (name, stats) in [
                ("submit → running", &j.submit_to_running_ms),
                ("crash → running elsewhere", &j.crash_to_running_ms),
            ] {
                if stats.count > 0 {
                    let _ =
                        writeln!(out, "  {:<26} {:>28}  (n={})", name, stats.cell(), stats.count);
                }
            }
        }
        if let Some(rss) = self.rss_bytes_per_node {
            let _ = writeln!(
                out,
                "  RSS per node               {:>24.2} MiB",
                rss as f64 / 1_048_576.0
            );
        }
        out
    }

    /// An SVG of the convergence CDF, when there are samples.
    pub fn convergence_svg(&self) -> Option<String> {
        let mut v = self.convergence_samples.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let max = v.last().copied().unwrap_or(1.0).max(1e-9);
        let (w, h, pad) = (640.0, 360.0, 40.0);
        let mut points = String::new();
        for (i, x) in v.iter().enumerate() {
            let px = pad + (x / max) * (w - 2.0 * pad);
            let py = h - pad - ((i + 1) as f64 / v.len() as f64) * (h - 2.0 * pad);
            let _ = write!(points, "{px:.1},{py:.1} ");
        }
        Some(format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\
<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
<text x=\"{pad}\" y=\"20\">{} — convergence CDF ({} samples)</text>\
<line x1=\"{pad}\" y1=\"{y0}\" x2=\"{x1}\" y2=\"{y0}\" stroke=\"black\"/><line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{y0}\" stroke=\"black\"/>\
<text x=\"{x1}\" y=\"{ylab}\" text-anchor=\"end\">{max:.1} ms</text><text x=\"{pad}\" y=\"{ylab}\">0</text>\
<text x=\"4\" y=\"{pad}\">100%</text>\
<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{points}\"/></svg>\n",
            self.scenario,
            v.len(),
            y0 = h - pad,
            x1 = w - pad,
            ylab = h - pad + 16.0,
        ))
    }
}

/// What the trials of one run measured, before it becomes a [`Report`]. Every tier fills the
/// parts it can measure.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Measures {
    /// Advert → receiver, ms.
    pub convergence: Vec<f64>,
    /// Receivers that never got a watched advert.
    pub missed: usize,
    /// Fault → observer sees not `ok`, ms.
    pub detection: Vec<f64>,
    /// Fault → observer sees `down`, ms.
    pub down: Vec<f64>,
    /// Heal → observer's view whole again, ms.
    pub heal: Vec<f64>,
    /// Live, reachable nodes marked `down`.
    pub false_positives: usize,
    /// Live, reachable nodes marked `suspect`.
    pub false_suspects: usize,
    /// Messages and envelope bytes received, all nodes (virtual tier).
    pub traffic: Option<(u64, u64)>,
    /// Resident memory samples, one per node.
    pub rss: Vec<u64>,
    /// The node cores' decisions, all nodes, while traffic was counted.
    pub decisions: Option<Counters>,
    /// Start of the first node → every node sees every node `ok`, ms, per trial (stack tier).
    pub formation: Vec<f64>,
    /// Jobs (scenarios with `[jobs]`).
    pub jobs: Option<JobMeasures>,
}

/// Jobs, counted and timed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobMeasures {
    /// See [`JobsReport`].
    pub submitted: usize,
    /// See [`JobsReport`].
    pub completed: usize,
    /// See [`JobsReport`].
    pub failed: usize,
    /// See [`JobsReport`].
    pub unfinished: usize,
    /// See [`JobsReport`].
    pub reassigned: usize,
    /// See [`JobsReport`].
    pub duplicate_results: usize,
    /// See [`JobsReport`].
    pub overlapping_runs: usize,
    /// See [`JobsReport`].
    pub lease_expiries: usize,
    /// See [`JobsReport`].
    pub fence_regressions: usize,
    /// See [`JobsReport`].
    pub misplaced: usize,
    /// See [`JobsReport`].
    pub ran_local: usize,
    /// See [`JobsReport`].
    pub ran_remote: usize,
    /// Distinct `idem_key`s submitted.
    pub keys: usize,
    /// See [`JobsReport`].
    pub resubmitted: usize,
    /// Submission → running, ms.
    pub to_running: Vec<f64>,
    /// Crash → running elsewhere, ms.
    pub recovery: Vec<f64>,
}

impl JobMeasures {
    fn merge(&mut self, o: JobMeasures) {
        self.submitted += o.submitted;
        self.completed += o.completed;
        self.failed += o.failed;
        self.unfinished += o.unfinished;
        self.reassigned += o.reassigned;
        self.duplicate_results += o.duplicate_results;
        self.overlapping_runs += o.overlapping_runs;
        self.lease_expiries += o.lease_expiries;
        self.fence_regressions += o.fence_regressions;
        self.misplaced += o.misplaced;
        self.ran_local += o.ran_local;
        self.ran_remote += o.ran_remote;
        self.keys += o.keys;
        self.resubmitted += o.resubmitted;
        self.to_running.extend(o.to_running);
        self.recovery.extend(o.recovery);
    }
}

impl Measures {
    /// Adds another trial's measures.
    pub fn merge(&mut self, other: Measures) {
        self.convergence.extend(other.convergence);
        self.missed += other.missed;
        self.detection.extend(other.detection);
        self.down.extend(other.down);
        self.heal.extend(other.heal);
        self.false_positives += other.false_positives;
        self.false_suspects += other.false_suspects;
        if let Some((msgs, bytes)) = other.traffic {
            let (m, b) = self.traffic.get_or_insert((0, 0));
            *m += msgs;
            *b += bytes;
        }
        self.rss.extend(other.rss);
        self.formation.extend(other.formation);
        if let Some(theirs) = other.decisions {
            let ours = self.decisions.get_or_insert_default();
            *ours = *ours + theirs;
        }
        if let Some(theirs) = other.jobs {
            self.jobs.get_or_insert_default().merge(theirs);
        }
    }

    /// Counts one received message of `bytes` envelope bytes.
    pub fn received(&mut self, bytes: u64) {
        let (m, b) = self.traffic.get_or_insert((0, 0));
        *m += 1;
        *b += bytes;
    }
}

impl Report {
    /// The report of scenario `s` run from `seed` on `tier`, over a network described by `link`.
    pub fn build(s: &Scenario, seed: u64, tier: Tier, link: String, m: Measures) -> Self {
        let counted = s.duration_secs - s.traffic_after_secs;
        let node_seconds = (s.nodes as f64) * counted * (s.trials as f64);
        let per_node_second = |x: u64| ((x as f64 / node_seconds) * 10.0).round() / 10.0;
        let rate = |x: u64| ((x as f64 / node_seconds) * 1000.0).round() / 1000.0;
        Self {
            scenario: s.name.clone(),
            tier: tier.as_str().to_owned(),
            nodes: s.nodes,
            trials: s.trials,
            seed,
            faults: s.schedule().iter().map(Fault::describe).collect(),
            link,
            commit: commit(),
            convergence_ms: Stats::of(&m.convergence),
            missed: m.missed,
            detection_ms: Stats::of(&m.detection),
            down_ms: Stats::of(&m.down),
            heal_ms: Stats::of(&m.heal),
            formation_ms: Stats::of(&m.formation),
            false_positives: m.false_positives,
            false_suspects: m.false_suspects,
            msgs_per_node_per_s: m.traffic.map(|(msgs, _)| per_node_second(msgs)),
            bytes_per_node_per_s: m.traffic.map(|(_, bytes)| per_node_second(bytes)),
            rss_bytes_per_node: (!m.rss.is_empty())
                .then(|| m.rss.iter().sum::<u64>() / m.rss.len() as u64),
            decisions_per_node_per_s: m.decisions.map(|c| Decisions {
                syncs: rate(c.syncs),
                probes: rate(c.probes),
                reports: rate(c.reports),
                refutations: rate(c.refutations),
                resets: rate(c.resets),
                redials: rate(c.redials),
                adverts: rate(c.adverts),
                refused: rate(c.refused),
                shed: rate(c.shed),
            }),
            jobs: m.jobs.map(|j| JobsReport {
                submitted: j.submitted,
                completed: j.completed,
                failed: j.failed,
                unfinished: j.unfinished,
                reassigned: j.reassigned,
                duplicate_results: j.duplicate_results,
                overlapping_runs: j.overlapping_runs,
                lease_expiries: j.lease_expiries,
                fence_regressions: j.fence_regressions,
                misplaced: j.misplaced,
                ran_local: j.ran_local,
                ran_remote: j.ran_remote,
                resubmitted: j.resubmitted,
                extra_rows: j.submitted.saturating_sub(j.keys),
                submit_to_running_ms: Stats::of(&j.to_running),
                crash_to_running_ms: Stats::of(&j.recovery),
            }),
            convergence_samples: m.convergence,
        }
    }
}

/// `VmRSS` of a process (`/proc/<pid>/status`, or `/proc/self/status` for `None`), in bytes.
pub fn rss_bytes(pid: Option<u32>) -> u64 {
    let path = pid.map_or_else(|| "/proc/self/status".to_owned(), |p| format!("/proc/{p}/status"));
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:").map(str::to_owned)))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The source revision, for reports.
pub fn commit() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = Stats::of(&(1..=100).map(f64::from).collect::<Vec<_>>());
        assert_eq!((s.p50, s.p99, s.max, s.count), (Some(51.0), Some(99.0), Some(100.0), 100));
        assert_eq!(Stats::of(&[]), Stats::default());
    }
}
