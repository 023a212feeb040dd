//! Job bookkeeping for the virtual tier: which runs are in progress where, what the Home said
//! about each job, and the two invariants every trial checks (no job runs twice at once; no
//! job gets two results).

use std::collections::{HashMap, HashSet};

use arw_p2p::events::Event;

use crate::report::JobMeasures;

/// What a trial knows about its jobs.
#[derive(Debug, Default)]
pub struct JobBook {
    /// Job → when it was submitted (virtual µs).
    submitted: HashMap<String, u64>,
    /// Jobs that have run (or run now) somewhere.
    started: HashSet<String>,
    /// Job → the run in progress: (node, fence).
    runs: HashMap<String, (usize, u64)>,
    /// Job → when the worker running it crashed.
    crashed: HashMap<String, u64>,
    /// Job → results accepted by the Home.
    results: HashMap<String, usize>,
    m: JobMeasures,
}

impl JobBook {
    /// `node` starts `job` at `fence`; counts an overlap when another run of it is in progress.
    pub fn start(&mut self, node: usize, job: &str, fence: u64) {
        if let Some(other) = self.runs.insert(job.to_owned(), (node, fence))
            && other != (node, fence)
        {
            self.m.overlapping_runs += 1;
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
            }
            Event::ActionCompleted(e) => {
                let n = self.results.entry(e.id.clone()).or_default();
                *n += 1;
                if *n == 2 {
                    self.m.duplicate_results += 1;
                }
            }
            Event::ActionFailed(_) => self.m.failed += 1,
            Event::JobReassigned(_) => self.m.reassigned += 1,
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
