//! Job bookkeeping for the virtual and stack tiers: which runs are in progress where, what the
//! Home said about each job, and the invariants every trial checks (no job runs twice at once;
//! a job's fences only rise; no job gets two results; one row per idempotency key; a job that
//! needs a GPU runs where there is one).

use std::collections::{HashMap, HashSet};

use arw_p2p::{
    events::Event,
    jobs::{GpuRequire, JobSpec, JobsConfig, PlacementSpec, Require, RetrySpec, Run},
    node::NodeConfig,
};
use serde_json::json;

use crate::{report::JobMeasures, scenario::JobsSettings};

/// What a trial knows about its jobs.
#[derive(Debug, Default)]
pub struct JobBook {
    /// Nodes that offer a GPU.
    gpu_nodes: HashSet<usize>,
    /// Job → when it was submitted (µs into the trial).
    submitted: HashMap<String, u64>,
    /// Jobs that have run (or run now) somewhere.
    started: HashSet<String>,
    /// Job → the highest fence it has started with.
    fences: HashMap<String, u64>,
    /// Job → the run in progress: (node, fence).
    runs: HashMap<String, (usize, u64)>,
    /// Job → when the node running it crashed.
    crashed: HashMap<String, u64>,
    /// Job → results accepted by the Home.
    results: HashMap<String, usize>,
    m: JobMeasures,
}

impl JobBook {
    /// A book for a trial whose `gpu_nodes` offer a GPU.
    pub fn new(gpu_nodes: impl IntoIterator<Item = usize>) -> Self {
        Self { gpu_nodes: gpu_nodes.into_iter().collect(), ..Self::default() }
    }

    /// `node` starts `run`; counts an overlap when another run of the job is in progress, a
    /// fence that did not rise, and a GPU job on a node without one.
    pub fn start(&mut self, node: usize, run: &Run) {
        let job = &run.job_id;
        if let Some(other) = self.runs.insert(job.clone(), (node, run.fence))
            && other != (node, run.fence)
        {
            self.m.overlapping_runs += 1;
        }
        let last = self.fences.entry(job.clone()).or_default();
        if run.fence <= *last {
            self.m.fence_regressions += 1;
        }
        *last = run.fence;
        if run.input.get("gpu").is_some_and(|g| g == true) && !self.gpu_nodes.contains(&node) {
            self.m.misplaced += 1;
        }
    }

    /// Whether that run is in progress.
    pub fn running(&self, node: usize, job: &str, fence: u64) -> bool {
        self.runs.get(job) == Some(&(node, fence))
    }

    /// That run ended (finished or stopped).
    pub fn ended(&mut self, node: usize, job: &str, fence: u64) {
        if self.running(node, job, fence) {
            self.runs.remove(job);
        }
    }

    /// `node` crashed at `now`: its runs end with it.
    pub fn crash(&mut self, node: usize, now: u64) {
        let crashed = &mut self.crashed;
        self.runs.retain(|job, (n, _)| {
            if *n == node {
                crashed.insert(job.clone(), now);
            }
            *n != node
        });
    }

    /// A submission was sent to the Home (first or repeated).
    pub fn sent(&mut self, repeat: bool) {
        if repeat {
            self.m.resubmitted += 1;
        } else {
            self.m.keys += 1;
        }
    }

    /// An event of the Home's, at `now` (µs).
    pub fn event(&mut self, event: &Event, now: u64) {
        let ms = |since: u64| (now - since) as f64 / 1000.0;
        match event {
            Event::ActionSubmitted(e) => {
                self.submitted.insert(e.id.clone(), now);
            }
            Event::ActionRunning(e) => {
                if self.started.insert(e.id.clone())
                    && let Some(at) = self.submitted.get(&e.id)
                {
                    self.m.to_running.push(ms(*at));
                }
                if let Some(at) = self.crashed.remove(&e.id) {
                    self.m.recovery.push(ms(at));
                }
                match e.placement.as_deref() {
                    Some("local") => self.m.ran_local += 1,
                    _ => self.m.ran_remote += 1,
                }
            }
            Event::ActionCompleted(e) => {
                let n = self.results.entry(e.id.clone()).or_default();
                *n += 1;
                if *n == 2 {
                    self.m.duplicate_results += 1;
                }
            }
            Event::ActionFailed(_) => self.m.failed += 1,
            Event::JobReassigned(e) => {
                self.m.reassigned += 1;
                if e.reason.as_deref() == Some("lease_expired") {
                    self.m.lease_expiries += 1;
                }
            }
            _ => {}
        }
    }

    /// The measures of the trial.
    pub fn finish(mut self) -> JobMeasures {
        self.m.submitted = self.submitted.len();
        self.m.completed = self.results.len();
        self.m.unfinished = self.m.submitted.saturating_sub(self.m.completed + self.m.failed);
        self.m
    }
}

/// Node `i`'s jobs settings in a trial with `[jobs]`: node 0 is the Home (running `work` too
/// when it has slots); the others obey it (pinned to `home_key`) and run `work` for it, and
/// the first `gpu_workers` of them offer a GPU.
pub fn configure(config: &mut NodeConfig, i: usize, s: &JobsSettings, home_key: [u8; 32]) {
    let home = i == 0;
    let work = || vec!["work".to_owned()];
    config.jobs = JobsConfig {
        slots: if home { s.home_slots.max(1) } else { s.slots },
        kinds: if home && s.home_slots == 0 { Vec::new() } else { work() },
        allow: if home { Vec::new() } else { vec!["*".into()] },
        idempotent_kinds: work(),
        ..JobsConfig::default()
    };
    if !home && i <= s.gpu_workers {
        config.capabilities.insert(
            "gpus".into(),
            json!([{"name": "NVIDIA simulated", "memory_total_bytes": 24u64 << 30}]),
        );
    }
    if let Some(f) = config.federation.as_mut().filter(|_| !home) {
        f.membership.home_key = Some(home_key);
    }
}

/// The `n`th job of a trial (the same spec each time it is submitted).
pub fn spec(s: &JobsSettings, n: usize) -> JobSpec {
    let gpu = s.gpu_every > 0 && n.is_multiple_of(s.gpu_every);
    JobSpec {
        kind: "work".into(),
        input: json!({ "n": n, "gpu": gpu }),
        idem_key: Some(format!("job-{n}")),
        placement: Some(PlacementSpec {
            prefer: s.prefer,
            require: Require {
                gpu: gpu.then_some(GpuRequire { count: 1, min_memory_mib: None, vendor: None }),
                ..Require::default()
            },
            ..PlacementSpec::default()
        }),
        timeout_ms: None,
        retry: Some(RetrySpec { max_attempts: 10 }),
    }
}
