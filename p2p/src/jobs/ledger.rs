//! The jobs a node owns: what `POST /actions` admitted there. Every node queues and runs its own
//! jobs; the Home also places them on workers. The ledger is the one writer of their state: it
//! admits (queue cap, idempotency), decides where each attempt runs (local first, then the best
//! worker), issues a rising fence with every attempt, holds the leases of remote attempts, and
//! accepts exactly one result per job: the one that names its current fence.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::{
    ASSIGN_TIMEOUT_MS, Attempt, DEFAULT_ATTEMPTS, DEFAULT_TIMEOUT_MS, Finished, IDEM_KEEP_MS,
    IDEM_MAX, JobRecord, JobSpec, JobState, JobsConfig, LEASE_MARGIN_MS, MAX_HOPS, MAX_INPUT,
    MAX_TIMEOUT_MS, Prefer, Run, Site, SubmitError, input_sha256,
    message::{Assign, Complete, JobMessage, JobRef, Rejection, Renew, RenewAck},
    place::{self, Candidate, Decision, Explain, Want},
};
use crate::{cluster::Advert, events::Event, events::JobEvent, node_id::NodeId};

/// Jobs looked at for placement per pass over the queue, so a long queue costs a bounded
/// amount per change.
const PUMP_SCAN: usize = 64;
/// How long a job that only a worker not `ok` (or draining) could run waits for it before it
/// fails `infeasible`: a Home that just restarted has not heard its workers yet, and a worker
/// may be back within a suspicion.
pub const UNHEALTHY_WAIT_MS: u64 = 30_000;

/// Something the node must do for its jobs.
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    /// Store this job (before the events about it go out).
    Persist(Box<JobRecord>),
    /// Publish an event.
    Emit(Box<Event>),
    /// Send a dispatch message to a node.
    Send {
        /// The node.
        to: NodeId,
        /// The message.
        body: JobMessage,
    },
    /// Start an attempt here.
    Execute(Run),
    /// An attempt on a worker ended: what it cost, for the egress ledger.
    Contribution(Box<super::Contribution>),
    /// Stop an attempt running here.
    Abort {
        /// Job id.
        job_id: String,
        /// Its fence.
        fence: u64,
    },
}

/// What a submission got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    /// Job id.
    pub id: String,
    /// An earlier job with the same `idem_key`.
    pub reused: bool,
}

/// What the ledger needs to know about the node and its cluster for one decision.
#[derive(Clone, Copy)]
pub struct Env<'a> {
    /// Now (ms).
    pub now: u64,
    /// This node.
    pub me: &'a NodeId,
    /// This node's capabilities and tags (for local feasibility).
    pub caps: &'a Map<String, Value>,
    /// See `caps`.
    pub tags: &'a [String],
    /// Local slots (`max_concurrency`, else `[jobs] slots`).
    pub slots: u32,
    /// Attempts running here for the Home (they share the slots).
    pub hosted: u32,
    /// Whether this node places jobs on workers (it is the Home), and how eagerly.
    pub offload: Offload,
    /// How long a job may wait behind the local queue before a worker takes it instead (ms;
    /// the hint `slo_ms`, else 250).
    pub queue_ms: u64,
    /// The policy epoch in force (sent with assignments).
    pub policy_epoch: u64,
    /// The workers.
    pub workers: &'a dyn Workers,
    /// Kinds whose runtime here is quarantined: they wait (or go to a worker) until it is back.
    pub quarantined: &'a [String],
}

impl std::fmt::Debug for Env<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env").field("now", &self.now).field("me", &self.me).finish_non_exhaustive()
    }
}

/// `offload` (governor hint): whether the Home gives jobs to workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offload {
    /// Never (also: this node is not the Home).
    Never,
    /// When the local slots are taken.
    Auto,
    /// Whenever a worker can.
    Prefer,
}

/// The workers a Home may place on.
pub trait Workers {
    /// Each remote node's advert, whether it is `ok`, and whether it is admitted.
    fn list(&self) -> Vec<(&Advert, bool, bool)>;

    /// When `node` last said it started (its advert's `jobs.boot`).
    fn boot(&self, node: &NodeId) -> Option<u64> {
        self.list()
            .into_iter()
            .find(|(a, _, _)| a.id == *node)
            .and_then(|(a, _, _)| a.jobs.as_ref().map(|j| j.boot))
    }

    /// The CPU threads `node` advertises (`capabilities.cpu.threads`).
    fn cpu_threads(&self, node: &NodeId) -> Option<u64> {
        self.list()
            .into_iter()
            .find(|(a, _, _)| a.id == *node)
            .and_then(|(a, _, _)| a.capabilities.get("cpu")?.get("threads")?.as_u64())
    }
}

/// No workers (a node that is not the Home).
#[derive(Debug)]
pub struct NoWorkers;

impl Workers for NoWorkers {
    fn list(&self) -> Vec<(&Advert, bool, bool)> {
        Vec::new()
    }
}

#[derive(Debug, Clone)]
enum Phase {
    /// Waiting for a slot here or a worker.
    Queued,
    /// Running here.
    Local,
    /// Offered to a worker, no answer yet.
    Assigning { node: NodeId, until: u64 },
    /// Running on a worker, leased until.
    Remote { node: NodeId, lease_until: u64 },
}

#[derive(Debug, Clone)]
struct Live {
    rec: JobRecord,
    phase: Phase,
    /// Workers that refused it for good: never asked again.
    tried: Vec<NodeId>,
    /// Workers whose lease on it ran out: asked again only when no other worker will do.
    lost_on: Vec<NodeId>,
    /// Workers that refused it for now, until when.
    resting: Vec<(NodeId, u64)>,
    /// Refusals in a row.
    hops: u32,
    /// The worker's start time when the current attempt was offered.
    boot: Option<u64>,
    /// Since when only workers not `ok` (or draining) could run it.
    unhealthy_since: Option<u64>,
}

impl Live {
    /// A job waiting for its first (or next) attempt.
    fn queued(rec: JobRecord) -> Self {
        Self {
            rec,
            phase: Phase::Queued,
            tried: Vec::new(),
            lost_on: Vec::new(),
            resting: Vec::new(),
            hops: 0,
            boot: None,
            unhealthy_since: None,
        }
    }
}

#[derive(Debug, Clone)]
struct Idem {
    id: String,
    kind: String,
    sha: String,
    ended_ms: Option<u64>,
}

/// The jobs a node owns. See the module docs.
#[derive(Debug, Clone)]
pub struct Ledger {
    config: JobsConfig,
    /// Jobs not yet ended.
    live: BTreeMap<String, Live>,
    /// Queued jobs in arrival order.
    queue: VecDeque<String>,
    running_local: u32,
    /// Attempts assigned or running per worker.
    inflight: BTreeMap<NodeId, u32>,
    idem: HashMap<String, Idem>,
    /// Ended jobs' keys, oldest first, for forgetting.
    idem_ended: VecDeque<(u64, String)>,
    /// The last fence issued.
    fence: u64,
    /// The last change number.
    rev: u64,
    /// Jobs created (makes ids unique).
    created: u64,
    /// Moving average of local run time (ms), for the local-first rule; none before the first
    /// local run ends (until then a job waits here only for a free slot).
    ewma_ms: Option<f64>,
    out: Vec<Out>,
}

impl Ledger {
    /// A ledger with what was stored: jobs not yet ended, and the idempotency keys of recent
    /// ones. Running attempts are taken up again at [`Ledger::resume`].
    pub fn new(config: JobsConfig, stored: super::StoredJobs) -> Self {
        let mut ledger = Self {
            config,
            live: BTreeMap::new(),
            queue: VecDeque::new(),
            running_local: 0,
            inflight: BTreeMap::new(),
            idem: HashMap::new(),
            idem_ended: VecDeque::new(),
            fence: stored.fence,
            rev: stored.rev,
            created: 0,
            ewma_ms: None,
            out: Vec::new(),
        };
        for rec in stored.records {
            ledger.fence = ledger.fence.max(rec.fence);
            ledger.rev = ledger.rev.max(rec.rev);
            if let Some(key) = &rec.idem_key {
                ledger.remember(key, &rec);
            }
            if !rec.state.is_terminal() {
                ledger.live.insert(rec.id.clone(), Live::queued(rec));
            }
        }
        ledger
    }

    /// The change counter (the `/state/actions` ETag).
    pub fn rev(&self) -> u64 {
        self.rev
    }

    /// Jobs queued and running here.
    pub fn counts(&self) -> (usize, u32) {
        (self.queue.len(), self.running_local)
    }

    /// Jobs not yet ended.
    pub fn live(&self) -> usize {
        self.live.len()
    }

    /// The attempt of `job_id` holding a live lease, as `(node, fence, lease_until)`: for
    /// checks of the fencing invariants.
    pub fn lease(&self, job_id: &str) -> Option<(NodeId, u64, u64)> {
        let live = self.live.get(job_id)?;
        match &live.phase {
            Phase::Remote { node, lease_until } => {
                Some((node.clone(), live.rec.fence, *lease_until))
            }
            _ => None,
        }
    }

    /// Takes the effects of the last calls.
    pub fn take(&mut self) -> Vec<Out> {
        std::mem::take(&mut self.out)
    }

    fn emit(&mut self, event: Event) {
        self.out.push(Out::Emit(Box::new(event)));
    }

    /// After a restart: queued jobs queue again; an attempt that ran here died with the process
    /// (retried when it may be, else `lost`); one on a worker gets a fresh lease, so a worker
    /// that still runs it keeps it (its renewals confirm it) and one that does not loses it
    /// when the lease ends.
    pub fn resume(&mut self, env: &Env<'_>) {
        let ids: Vec<String> = self.live.keys().cloned().collect();
        for id in ids {
            let Some(live) = self.live.get_mut(&id) else { continue };
            // The attempt in progress when the node stopped, if any.
            let open = live.rec.attempts.last().filter(|a| a.ended.is_none()).cloned();
            let remote = live.rec.placement == Some(Site::Remote);
            match open.and_then(|a| Some((NodeId::parse(&a.node_id).ok()?, a.state))) {
                Some((node, state)) if remote => {
                    *self.inflight.entry(node.clone()).or_default() += 1;
                    live.phase = if state == "assigned" {
                        // Its answer may have been lost with the restart: a renewal from the
                        // worker confirms it, else it goes elsewhere.
                        Phase::Assigning { node, until: env.now + ASSIGN_TIMEOUT_MS }
                    } else {
                        let lease_until = env.now + self.config.lease_ms + LEASE_MARGIN_MS;
                        Phase::Remote { node, lease_until }
                    };
                }
                Some((node, _)) => self.lost(&id, node, false, "node_restarted", env),
                None => self.queue.push_back(id),
            }
        }
        self.pump(env);
    }

    /// Admits a job.
    pub fn submit(&mut self, spec: JobSpec, env: &Env<'_>) -> Result<Submitted, SubmitError> {
        validate(&spec)?;
        let sha = input_sha256(&spec.input);
        if let Some(key) = &spec.idem_key
            && let Some(seen) = self.idem.get(key)
        {
            if seen.kind != spec.kind || seen.sha != sha {
                return Err(SubmitError::IdempotencyConflict(key.clone()));
            }
            return Ok(Submitted { id: seen.id.clone(), reused: true });
        }
        let queued = self.queue.len();
        if queued >= self.config.queue_max {
            return Err(SubmitError::QueueFull { limit: self.config.queue_max, queued });
        }
        let retryable = spec.idem_key.is_some() || self.config.idempotent(&spec.kind);
        let max_attempts = match (retryable, spec.retry) {
            (false, _) => 1,
            (true, Some(r)) => r.max_attempts.clamp(1, 10),
            (true, None) => DEFAULT_ATTEMPTS,
        };
        let id = self.new_id(env);
        let rec = JobRecord {
            id: id.clone(),
            kind: spec.kind,
            input: spec.input,
            idem_key: spec.idem_key,
            input_sha256: sha,
            spec: spec.placement,
            timeout_ms: spec.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS),
            max_attempts,
            state: JobState::Queued,
            node_id: None,
            attempt: 0,
            fence: 0,
            placement: None,
            created: env.now,
            updated: env.now,
            rev: 0,
            attempts: Vec::new(),
            output: None,
            error: None,
        };
        if let Some(key) = &rec.idem_key {
            self.remember(key, &rec);
        }
        self.live.insert(id.clone(), Live::queued(rec));
        self.queue.push_back(id.clone());
        let event = {
            let rec = &self.live[&id].rec;
            JobEvent {
                id: id.clone(),
                kind: Some(rec.kind.clone()),
                status: Some("queued".into()),
                node_id: Some(env.me.to_string()),
                ..JobEvent::default()
            }
        };
        self.save(&id, env.now);
        self.emit(Event::ActionSubmitted(event));
        self.pump(env);
        Ok(Submitted { id, reused: false })
    }

    /// Cancels a job that has not ended.
    pub fn cancel(&mut self, id: &str, env: &Env<'_>) -> Result<(), SubmitError> {
        let Some(live) = self.live.get(id) else {
            return Err(SubmitError::NotFound(id.to_owned()));
        };
        let fence = live.rec.fence;
        match live.phase.clone() {
            Phase::Queued => self.queue.retain(|q| q != id),
            Phase::Local => {
                self.running_local = self.running_local.saturating_sub(1);
                self.out.push(Out::Abort { job_id: id.to_owned(), fence });
            }
            Phase::Assigning { node, .. } | Phase::Remote { node, .. } => {
                self.release(&node);
                let body = JobMessage::Cancel(JobRef { job_id: id.to_owned(), fence });
                self.out.push(Out::Send { to: node, body });
            }
        }
        self.end_attempt(id, "cancelled", Some("cancelled"), env.now);
        self.fail(id, "cancelled", json!({"code": "cancelled"}), None, env);
        self.pump(env);
        Ok(())
    }

    /// The kind of `job_id` when it runs here at `fence`.
    pub fn running_kind(&self, job_id: &str, fence: u64) -> Option<&str> {
        let live = self.live.get(job_id)?;
        let here = matches!(live.phase, Phase::Local) && live.rec.fence == fence;
        here.then_some(live.rec.kind.as_str())
    }

    /// A local attempt finished.
    pub fn finished(&mut self, done: Finished, env: &Env<'_>) {
        let current = self
            .live
            .get(&done.job_id)
            .is_some_and(|l| matches!(l.phase, Phase::Local) && l.rec.fence == done.fence);
        if !current {
            return;
        }
        self.running_local = self.running_local.saturating_sub(1);
        let took = done.finished_ms.saturating_sub(done.started_ms);
        let ms = took as f64;
        self.ewma_ms = Some(self.ewma_ms.map_or(ms, |ewma| 0.8 * ewma + 0.2 * ms));
        if let Some(live) = self.live.get(&done.job_id) {
            self.emit(Event::TaskCompleted(crate::events::TaskCompleted {
                id: json!(done.job_id),
                ok: done.ok,
                output: done.output.clone(),
                node_id: env.me.to_string(),
                kind: Some(live.rec.kind.clone()),
                attempt: Some(live.rec.attempt),
                duration_ms: Some(took),
            }));
        }
        let ran = Ran { took: Some(took), cpu_ms: done.cpu_ms };
        self.conclude(&done.job_id, done.ok, done.output, ran, env);
        self.pump(env);
    }

    /// A dispatch message from worker `from`.
    pub fn on_message(&mut self, from: &NodeId, sent_ms: u64, body: JobMessage, env: &Env<'_>) {
        match body {
            JobMessage::Accepted(r) => self.accepted(from, &r, Some(sent_ms), env),
            JobMessage::Rejected(r) => self.rejected(from, &r, env),
            JobMessage::Renew(r) => self.renew(from, sent_ms, r, env),
            JobMessage::Complete(c) => self.complete(from, c, env),
            // Home → worker messages: not for the ledger.
            JobMessage::Assign(_)
            | JobMessage::RenewAck(_)
            | JobMessage::CompleteAck(_)
            | JobMessage::Cancel(_) => {}
        }
    }

    /// Worker `node` could not be reached: what was being offered to it goes elsewhere.
    pub fn unreachable(&mut self, node: &NodeId, env: &Env<'_>) {
        let offered: Vec<(String, u64)> = self
            .live
            .iter()
            .filter(|(_, l)| matches!(&l.phase, Phase::Assigning { node: n, .. } if n == node))
            .map(|(id, l)| (id.clone(), l.rec.fence))
            .collect();
        for (job_id, fence) in offered {
            let r = Rejection { job_id, fence, code: "unreachable".into() };
            self.rejected(node, &r, env);
        }
    }

    /// Timers: unanswered offers and ended leases; then the queue.
    pub fn tick(&mut self, env: &Env<'_>) {
        let now = env.now;
        let mut timed_out = Vec::new();
        let mut expired = Vec::new();
        let mut restarted = Vec::new();
        for (id, live) in &self.live {
            if let (Phase::Assigning { node, .. } | Phase::Remote { node, .. }, Some(boot)) =
                (&live.phase, live.boot)
                && env.workers.boot(node).is_some_and(|now_boot| now_boot != boot)
            {
                restarted.push((node.clone(), id.clone()));
                continue;
            }
            match &live.phase {
                Phase::Assigning { node, until } if *until <= now => {
                    timed_out.push((node.clone(), id.clone(), live.rec.fence));
                }
                Phase::Remote { node, lease_until } if *lease_until <= now => {
                    expired.push((node.clone(), id.clone()));
                }
                _ => {}
            }
        }
        for (node, job_id, fence) in timed_out {
            self.rejected(&node, &Rejection { job_id, fence, code: "timeout".into() }, env);
        }
        for (node, id) in expired {
            self.release(&node);
            self.lost(&id, node, true, "lease_expired", env);
        }
        // The worker restarted: what it held is gone now, no need to wait for the lease.
        for (node, id) in restarted {
            self.release(&node);
            self.lost(&id, node, false, "worker_restarted", env);
        }
        while let Some((at, key)) = self.idem_ended.front() {
            if now.saturating_sub(*at) < IDEM_KEEP_MS && self.idem.len() <= IDEM_MAX {
                break;
            }
            let (at, key) = (*at, key.clone());
            self.idem_ended.pop_front();
            if self.idem.get(&key).is_some_and(|i| i.ended_ms == Some(at)) {
                self.idem.remove(&key);
            }
        }
        self.pump(env);
    }

    /// The earliest time a lease or an offer runs out.
    pub fn next_deadline(&self) -> Option<u64> {
        self.live
            .values()
            .filter_map(|l| match &l.phase {
                Phase::Assigning { until, .. } => Some(*until),
                Phase::Remote { lease_until, .. } => Some(*lease_until),
                _ => None,
            })
            .min()
    }

    /// Worker `from` took the current attempt: it runs from now, leased. `confirm` (the sender's
    /// time of its acceptance) has the worker start it; a renewal confirms on its own.
    fn accepted(&mut self, from: &NodeId, r: &JobRef, confirm: Option<u64>, env: &Env<'_>) {
        let Some(live) = self.live.get_mut(&r.job_id) else { return };
        let offered = matches!(&live.phase, Phase::Assigning { node, .. } if node == from);
        if !offered || live.rec.fence != r.fence {
            return;
        }
        let lease_until = env.now + self.config.lease_ms + LEASE_MARGIN_MS;
        live.phase = Phase::Remote { node: from.clone(), lease_until };
        live.hops = 0;
        live.rec.state = JobState::Running;
        if let Some(a) = live.rec.attempts.last_mut() {
            a.state = "running".into();
        }
        let event = JobEvent {
            id: r.job_id.clone(),
            node_id: Some(from.to_string()),
            attempt: Some(live.rec.attempt),
            placement: Some(Site::Remote.as_str().to_owned()),
            ..JobEvent::default()
        };
        self.save(&r.job_id, env.now);
        self.emit(Event::ActionRunning(event));
        if let Some(echo_ms) = confirm {
            let ack = RenewAck { echo_ms, renewed: vec![r.clone()], cancel: Vec::new() };
            self.out.push(Out::Send { to: from.clone(), body: JobMessage::RenewAck(ack) });
        }
    }

    fn rejected(&mut self, from: &NodeId, r: &Rejection, env: &Env<'_>) {
        let Some(live) = self.live.get_mut(&r.job_id) else { return };
        let offered = matches!(&live.phase, Phase::Assigning { node, .. } if node == from);
        if !offered || live.rec.fence != r.fence {
            return;
        }
        live.phase = Phase::Queued;
        // A worker's refusal code is stored with the job and in the ledger: a short word, or
        // `invalid` (a worker cannot grow the Home's records with long ones).
        let word = |c: &str| {
            !c.is_empty()
                && c.len() <= 64
                && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        };
        let code = if word(&r.code) { r.code.clone() } else { "invalid".to_owned() };
        if TRANSIENT.contains(&code.as_str()) {
            live.resting.retain(|(n, _)| n != from);
            live.resting.push((from.clone(), env.now + REST_MS));
        } else {
            live.tried.push(from.clone());
            live.hops += 1;
        }
        live.rec.state = JobState::Queued;
        let attempt = live.rec.attempt;
        self.release(from);
        self.end_attempt(&r.job_id, "rejected", Some(&code), env.now);
        self.emit(Event::JobError(JobEvent {
            id: r.job_id.clone(),
            node_id: Some(from.to_string()),
            attempt: Some(attempt),
            fence: Some(r.fence),
            code: Some(code.clone()),
            ..JobEvent::default()
        }));
        self.emit(Event::JobReassigned(JobEvent {
            id: r.job_id.clone(),
            node_id: Some(from.to_string()),
            attempt: Some(attempt),
            reason: Some("rejected".into()),
            code: Some(code),
            ..JobEvent::default()
        }));
        self.queue.push_front(r.job_id.clone());
        self.save(&r.job_id, env.now);
        self.pump(env);
    }

    fn renew(&mut self, from: &NodeId, sent_ms: u64, r: Renew, env: &Env<'_>) {
        let mut renewed = Vec::new();
        let mut cancel = Vec::new();
        let lease_until = env.now + self.config.lease_ms + LEASE_MARGIN_MS;
        let mut promoted = Vec::new();
        for job in r.jobs.into_iter().take(super::SEEN_MAX) {
            let current = self.live.get_mut(&job.job_id).filter(|l| l.rec.fence == job.fence);
            match current.map(|l| (&mut l.phase, &l.rec.id)) {
                Some((Phase::Remote { node, lease_until: until }, _)) if node == from => {
                    *until = lease_until;
                    renewed.push(job);
                }
                // Its acceptance was lost on the way: the renewal says it runs.
                Some((Phase::Assigning { node, .. }, id)) if node == from => {
                    promoted.push(JobRef { job_id: id.clone(), fence: job.fence });
                    renewed.push(job);
                }
                _ => cancel.push(job),
            }
        }
        for job in promoted {
            self.accepted(from, &job, None, env);
        }
        let ack = RenewAck { echo_ms: sent_ms, renewed, cancel };
        self.out.push(Out::Send { to: from.clone(), body: JobMessage::RenewAck(ack) });
    }

    fn complete(&mut self, from: &NodeId, c: Complete, env: &Env<'_>) {
        let r = JobRef { job_id: c.job_id.clone(), fence: c.fence };
        self.out.push(Out::Send { to: from.clone(), body: JobMessage::CompleteAck(r) });
        let Some(live) = self.live.get(&c.job_id) else { return };
        let owner = match &live.phase {
            Phase::Remote { node, .. } | Phase::Assigning { node, .. } => Some(node),
            _ => None,
        };
        if live.rec.fence != c.fence || owner != Some(from) {
            // A result of an attempt the Home already gave up on: never accepted.
            self.emit(Event::JobError(JobEvent {
                id: c.job_id.clone(),
                node_id: Some(from.to_string()),
                fence: Some(c.fence),
                code: Some("stale_fence".into()),
                ..JobEvent::default()
            }));
            return;
        }
        // The run time the worker reports, but never more than the Home saw pass since it
        // offered the attempt: a worker cannot claim more work than it had time for.
        let offered = live.rec.attempts.last().map_or(env.now, |a| a.started);
        let took = c.finished_ms.saturating_sub(c.started_ms).min(env.now.saturating_sub(offered));
        self.release(from);
        // And no more CPU time than its advertised threads (64 when it names none) could use
        // in that time.
        let threads = env.workers.cpu_threads(from).unwrap_or(64).clamp(1, 4_096);
        let cpu_ms = c.cpu_ms.map(|cpu| cpu.min(took.saturating_mul(threads)));
        let ran = Ran { took: Some(took), cpu_ms };
        self.conclude(&c.job_id, c.ok, c.output, ran, env);
        self.pump(env);
    }

    /// Starts what may start: local slots first, then workers for the rest.
    fn pump(&mut self, env: &Env<'_>) {
        let mut scanned = 0;
        let mut i = 0;
        while i < self.queue.len() && scanned < PUMP_SCAN {
            scanned += 1;
            let id = self.queue[i].clone();
            match self.decide(&id, env) {
                Step::Wait => {
                    // Waiting for a slot is not waiting for a worker to recover: that wait
                    // starts again from its next need.
                    if let Some(live) = self.live.get_mut(&id) {
                        live.unhealthy_since = None;
                    }
                    i += 1;
                }
                Step::Unhealthy(explain) => {
                    let Some(live) = self.live.get_mut(&id) else { return };
                    let since = *live.unhealthy_since.get_or_insert(env.now);
                    if env.now.saturating_sub(since) < UNHEALTHY_WAIT_MS {
                        i += 1;
                        continue;
                    }
                    self.queue.remove(i);
                    let error = json!({"code": "infeasible"});
                    self.fail(&id, "infeasible", error, Some(explain), env);
                }
                Step::Local => {
                    self.queue.remove(i);
                    self.start_local(&id, env);
                }
                Step::Remote(node, feasible) => {
                    self.queue.remove(i);
                    self.assign(&id, node, feasible, env);
                }
                Step::Fail(code, explain) => {
                    self.queue.remove(i);
                    self.fail(&id, code, json!({"code": code}), explain, env);
                }
            }
        }
    }

    /// Where a queued job goes now.
    fn decide(&self, id: &str, env: &Env<'_>) -> Step {
        let Some(live) = self.live.get(id) else { return Step::Wait };
        let rec = &live.rec;
        let spec = rec.spec.clone().unwrap_or_default();
        let local = self.local_fit(rec, &spec, env);
        let free_here = self.running_local + env.hosted < env.slots;
        let prefer = match (spec.prefer, env.offload) {
            (_, Offload::Never) => Prefer::Local,
            (Prefer::Auto, Offload::Prefer) => Prefer::Remote,
            (p, _) => p,
        };
        // Local first (Ray's hybrid policy): here while a slot is free or one is expected to
        // free up for this job (the jobs ahead of it and itself, at the usual run time spread
        // over the slots) within the offload wait.
        let short_queue = {
            let ahead = self.queue.iter().position(|q| q == id).unwrap_or(0) as f64;
            self.ewma_ms.is_some_and(|ewma| {
                (ahead + 1.0) * ewma / f64::from(env.slots.max(1)) <= env.queue_ms as f64
            })
        };
        if local.is_ok() && prefer != Prefer::Remote && (free_here || prefer == Prefer::Local) {
            return if free_here { Step::Local } else { Step::Wait };
        }
        if env.offload == Offload::Never || live.hops >= MAX_HOPS {
            return match local {
                Ok(()) if free_here => Step::Local,
                Ok(()) => Step::Wait,
                // Its runtime here is back after the cool-down.
                Err(QUARANTINED) => Step::Wait,
                Err(filter) => {
                    let mut explain = Explain { evaluated: 1, ..Explain::default() };
                    explain.filtered.insert(format!("local.{filter}"), 1);
                    if live.hops >= MAX_HOPS {
                        explain.filtered.insert("rejected".into(), live.hops as usize);
                    }
                    Step::Fail("infeasible", Some(explain))
                }
            };
        }
        if local.is_ok() && short_queue && prefer == Prefer::Auto {
            return Step::Wait;
        }
        let resting: Vec<NodeId> = live
            .resting
            .iter()
            .filter(|(_, until)| *until > env.now)
            .map(|(n, _)| n.clone())
            .collect();
        let want = Want {
            job_id: id,
            kind: &rec.kind,
            require: &spec.require,
            node: spec.node.as_deref(),
            avoid: &spec.avoid,
            tried: &live.tried,
            lost_on: &live.lost_on,
            resting: &resting,
        };
        let candidates = env.workers.list().into_iter().map(|(advert, ok, admitted)| Candidate {
            advert,
            ok,
            admitted,
            inflight: self.inflight.get(&advert.id).copied().unwrap_or(0),
        });
        let decision = place::place(&want, candidates);
        match decision {
            // A worker that lost the job runs it again only when nothing else can, this node
            // included.
            Decision::Remote { node, .. } if local.is_ok() && live.lost_on.contains(&node) => {
                if free_here {
                    Step::Local
                } else {
                    Step::Wait
                }
            }
            Decision::Remote { node, feasible, .. } => Step::Remote(node, feasible),
            Decision::Infeasible(mut explain) => {
                // Busy workers, or a slot here soon: wait. Workers that would do once they
                // are back: wait a while. Nothing could ever take it: fail.
                let has = |explain: &Explain, filter| explain.filtered.contains_key(filter);
                if local.is_ok() {
                    return if free_here { Step::Local } else { Step::Wait };
                }
                if has(&explain, place::SLOTS_FULL)
                    || has(&explain, place::RESTING)
                    || has(&explain, place::QUARANTINED)
                    || local == Err(QUARANTINED)
                {
                    return Step::Wait;
                }
                if let Err(filter) = local {
                    explain.evaluated += 1;
                    *explain.filtered.entry(format!("local.{filter}")).or_default() += 1;
                }
                if has(&explain, place::UNHEALTHY) || has(&explain, place::DRAINING) {
                    return Step::Unhealthy(explain);
                }
                Step::Fail("infeasible", Some(explain))
            }
        }
    }

    /// Whether this node can run `rec` itself.
    fn local_fit(
        &self,
        rec: &JobRecord,
        spec: &super::PlacementSpec,
        env: &Env<'_>,
    ) -> Result<(), &'static str> {
        if !self.config.kinds.iter().any(|k| k == &rec.kind) {
            return Err("kind_unknown");
        }
        if env.quarantined.iter().any(|k| k == &rec.kind) {
            return Err(QUARANTINED);
        }
        if spec.node.as_deref().is_some_and(|n| n != env.me.as_str()) {
            return Err("node");
        }
        if spec.avoid.iter().any(|a| a == env.me.as_str()) {
            return Err("avoid");
        }
        if live_tried(self.live.get(&rec.id), env.me) {
            return Err("tried");
        }
        place::fits(&spec.require, env.caps, env.tags)
    }

    fn start_local(&mut self, id: &str, env: &Env<'_>) {
        self.running_local += 1;
        let fence = self.next_fence();
        let Some(live) = self.live.get_mut(id) else { return };
        live.phase = Phase::Local;
        live.unhealthy_since = None;
        let rec = &mut live.rec;
        rec.attempt += 1;
        rec.fence = fence;
        rec.state = JobState::Running;
        rec.node_id = Some(env.me.to_string());
        rec.placement = Some(Site::Local);
        rec.attempts.push(Attempt {
            attempt: rec.attempt,
            fence,
            node_id: env.me.to_string(),
            state: "running".into(),
            started: env.now,
            ended: None,
            reason: None,
        });
        let run = Run {
            job_id: id.to_owned(),
            fence,
            attempt: rec.attempt,
            kind: rec.kind.clone(),
            input: rec.input.clone(),
            idem_key: rec.idem_key.clone(),
            deadline_ms: env.now.saturating_add(rec.timeout_ms),
        };
        let event = JobEvent {
            id: id.to_owned(),
            node_id: Some(env.me.to_string()),
            attempt: Some(rec.attempt),
            placement: Some(Site::Local.as_str().to_owned()),
            ..JobEvent::default()
        };
        self.save(id, env.now);
        self.emit(Event::ActionRunning(event));
        self.out.push(Out::Execute(run));
    }

    fn assign(&mut self, id: &str, node: NodeId, feasible: usize, env: &Env<'_>) {
        let fence = self.next_fence();
        *self.inflight.entry(node.clone()).or_default() += 1;
        let Some(live) = self.live.get_mut(id) else { return };
        live.phase = Phase::Assigning { node: node.clone(), until: env.now + ASSIGN_TIMEOUT_MS };
        live.unhealthy_since = None;
        live.boot = env.workers.boot(&node);
        let rec = &mut live.rec;
        rec.attempt += 1;
        rec.fence = fence;
        rec.node_id = Some(node.to_string());
        rec.placement = Some(Site::Remote);
        rec.attempts.push(Attempt {
            attempt: rec.attempt,
            fence,
            node_id: node.to_string(),
            state: "assigned".into(),
            started: env.now,
            ended: None,
            reason: None,
        });
        let assign = Assign {
            job_id: id.to_owned(),
            attempt: rec.attempt,
            fence,
            kind: rec.kind.clone(),
            input: rec.input.clone(),
            idem_key: rec.idem_key.clone(),
            policy_epoch: env.policy_epoch,
            timeout_ms: rec.timeout_ms,
            lease_ms: self.config.lease_ms,
        };
        let event = JobEvent {
            id: id.to_owned(),
            kind: Some(rec.kind.clone()),
            node_id: Some(node.to_string()),
            attempt: Some(rec.attempt),
            fence: Some(fence),
            placement: Some(Site::Remote.as_str().to_owned()),
            candidates: Some(feasible),
            ..JobEvent::default()
        };
        let preview = crate::events::EgressPreview {
            id: id.to_owned(),
            kind: assign.kind.clone(),
            node_id: node.to_string(),
            attempt: assign.attempt,
            fence,
            bytes_out: json_len(&assign.input),
        };
        self.save(id, env.now);
        self.emit(Event::JobAssigned(event));
        self.emit(Event::EgressPreview(preview));
        self.out.push(Out::Send { to: node, body: JobMessage::Assign(assign) });
    }

    /// An attempt is gone (its worker's lease ended, or this node restarted under it): the job
    /// runs again when it may, else fails `lost`. A worker blamed for it ranks last for the
    /// job (Nomad's reschedule penalty), but may take it again if no other can: it may only
    /// have been cut off for a while.
    fn lost(&mut self, id: &str, node: NodeId, blame: bool, reason: &str, env: &Env<'_>) {
        let Some(live) = self.live.get_mut(id) else { return };
        if blame && !live.lost_on.contains(&node) {
            live.lost_on.push(node.clone());
        }
        let attempt = live.rec.attempt;
        self.end_attempt(id, "lost", Some(reason), env.now);
        let Some(live) = self.live.get_mut(id) else { return };
        // Offers refused are not runs: only runs that started count against max_attempts.
        let runs = live.rec.attempts.iter().filter(|a| a.state != "rejected").count();
        if runs < live.rec.max_attempts as usize {
            live.phase = Phase::Queued;
            live.rec.state = JobState::Queued;
            self.emit(Event::JobReassigned(JobEvent {
                id: id.to_owned(),
                node_id: Some(node.to_string()),
                attempt: Some(attempt),
                reason: Some(reason.to_owned()),
                ..JobEvent::default()
            }));
            self.queue.push_front(id.to_owned());
            self.save(id, env.now);
        } else {
            let error = json!({"code": "lost", "reason": reason, "node_id": node.to_string()});
            self.fail(id, "lost", error, None, env);
        }
    }

    /// The current attempt ended with a result.
    fn conclude(&mut self, id: &str, ok: bool, output: Value, ran: Ran, env: &Env<'_>) {
        let state = if ok { "completed" } else { "failed" };
        self.end_attempt_with(id, state, None, env.now, Some((json_len(&output), ran)));
        let took = ran.took;
        let Some(mut live) = self.live.remove(id) else { return };
        let rec = &mut live.rec;
        let mut event = JobEvent {
            id: id.to_owned(),
            kind: Some(rec.kind.clone()),
            node_id: rec.node_id.clone(),
            attempt: Some(rec.attempt),
            duration_ms: took,
            ..JobEvent::default()
        };
        let event = if ok {
            rec.state = JobState::Completed;
            rec.output = Some(output.clone());
            event.output = Some(output);
            Event::ActionCompleted(event)
        } else {
            rec.state = JobState::Failed;
            rec.error = Some(output.clone());
            event.code = Some("failed".into());
            event.error = Some(output);
            Event::ActionFailed(event)
        };
        self.ended(live, env.now);
        self.emit(event);
    }

    /// The job ends without a result.
    fn fail(
        &mut self,
        id: &str,
        code: &str,
        error: Value,
        explain: Option<Explain>,
        env: &Env<'_>,
    ) {
        let Some(mut live) = self.live.remove(id) else { return };
        let rec = &mut live.rec;
        rec.state = JobState::Failed;
        let mut error = error;
        if let (Some(explain), Value::Object(map)) = (&explain, &mut error) {
            map.insert("explain".into(), json!(explain));
        }
        rec.error = Some(error.clone());
        let event = JobEvent {
            id: id.to_owned(),
            kind: Some(rec.kind.clone()),
            node_id: rec.node_id.clone(),
            attempt: Some(rec.attempt),
            code: Some(code.to_owned()),
            error: Some(error),
            explain: explain.map(|e| json!(e)),
            ..JobEvent::default()
        };
        self.ended(live, env.now);
        self.emit(Event::ActionFailed(event));
    }

    fn ended(&mut self, live: Live, now: u64) {
        let mut rec = live.rec;
        self.rev += 1;
        rec.rev = self.rev;
        rec.updated = now;
        if let Some(key) = &rec.idem_key
            && let Some(idem) = self.idem.get_mut(key)
        {
            idem.ended_ms = Some(now);
            self.idem_ended.push_back((now, key.clone()));
        }
        self.out.push(Out::Persist(Box::new(rec)));
    }

    fn end_attempt(&mut self, id: &str, state: &str, reason: Option<&str>, now: u64) {
        self.end_attempt_with(id, state, reason, now, None);
    }

    /// Ends the current attempt; one on a worker is counted as a contribution, with the bytes
    /// of output it `returned` and the run time it reported.
    fn end_attempt_with(
        &mut self,
        id: &str,
        state: &str,
        reason: Option<&str>,
        now: u64,
        returned: Option<(u64, Ran)>,
    ) {
        let Some(live) = self.live.get_mut(id) else { return };
        let Some(a) = live.rec.attempts.last_mut().filter(|a| a.ended.is_none()) else { return };
        a.state = state.to_owned();
        a.ended = Some(now);
        a.reason = reason.map(str::to_owned);
        let a = a.clone();
        let rec = &live.rec;
        if rec.placement != Some(Site::Remote) {
            return;
        }
        let (bytes_in, ran) = returned.unwrap_or((0, Ran::default()));
        let contribution = super::Contribution {
            job_id: id.to_owned(),
            kind: rec.kind.clone(),
            node_id: a.node_id.clone(),
            attempt: a.attempt,
            fence: a.fence,
            outcome: state.to_owned(),
            reason: reason.map(str::to_owned),
            bytes_out: json_len(&rec.input),
            bytes_in,
            duration_ms: ran.took.unwrap_or(now.saturating_sub(a.started)),
            cpu_ms: ran.cpu_ms,
            ended_ms: now,
        };
        self.out.push(Out::Contribution(Box::new(contribution)));
    }

    fn release(&mut self, node: &NodeId) {
        if let Some(n) = self.inflight.get_mut(node) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.inflight.remove(node);
            }
        }
    }

    fn save(&mut self, id: &str, now: u64) {
        self.rev += 1;
        let rev = self.rev;
        if let Some(live) = self.live.get_mut(id) {
            live.rec.rev = rev;
            live.rec.updated = now;
            self.out.push(Out::Persist(Box::new(live.rec.clone())));
        }
    }

    fn next_fence(&mut self) -> u64 {
        self.fence += 1;
        self.fence
    }

    fn remember(&mut self, key: &str, rec: &JobRecord) {
        let ended_ms = rec.state.is_terminal().then_some(rec.updated);
        let idem = Idem {
            id: rec.id.clone(),
            kind: rec.kind.clone(),
            sha: rec.input_sha256.clone(),
            ended_ms,
        };
        self.idem.insert(key.to_owned(), idem);
        if let Some(at) = ended_ms {
            self.idem_ended.push_back((at, key.to_owned()));
        }
    }

    /// A fresh job id, UUID-shaped, drawn from this node, a counter and the time (unique and
    /// the same on replay).
    fn new_id(&mut self, env: &Env<'_>) -> String {
        self.created += 1;
        let digest = Sha256::new()
            .chain_update(env.me.as_str().as_bytes())
            .chain_update(self.created.to_be_bytes())
            .chain_update(self.rev.to_be_bytes())
            .chain_update(env.now.to_be_bytes())
            .finalize();
        let h = hex::encode(&digest[..16]);
        format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
    }
}

/// What an attempt that ended with a result used: its run time and CPU time, as reported.
#[derive(Debug, Clone, Copy, Default)]
struct Ran {
    took: Option<u64>,
    cpu_ms: Option<u64>,
}

/// Bytes of `value` as JSON text.
fn json_len(value: &Value) -> u64 {
    serde_json::to_vec(value).map_or(0, |v| v.len() as u64)
}

/// Refusals that say "not now" rather than "never": the worker is skipped for [`REST_MS`] and
/// the job waits for it (or another) instead of failing. `not_admitted` is one: the Home has
/// admitted the worker (it offers only to those), so the worker has yet to receive the policy
/// that says so.
const TRANSIENT: [&str; 7] = [
    "busy",
    "draining",
    "not_admitted",
    "runtime_quarantined",
    "stale_policy",
    "timeout",
    "unreachable",
];
/// Local feasibility: the kind's runtime here is quarantined (it waits; it does not fail).
const QUARANTINED: &str = place::QUARANTINED;
/// How long a worker that refused a job for now is skipped for it.
const REST_MS: u64 = 1_000;

enum Step {
    Wait,
    /// Only workers not `ok` (or draining) could run it; the explain if it comes to failing.
    Unhealthy(Explain),
    Local,
    Remote(NodeId, usize),
    Fail(&'static str, Option<Explain>),
}

fn live_tried(live: Option<&Live>, me: &NodeId) -> bool {
    live.is_some_and(|l| l.tried.contains(me))
}

fn validate(spec: &JobSpec) -> Result<(), SubmitError> {
    let invalid = |m: &str| Err(SubmitError::Invalid(m.to_owned()));
    let kind_ok = !spec.kind.is_empty()
        && spec.kind.len() <= 128
        && spec.kind.chars().all(|c| c.is_ascii_alphanumeric() || "._-:/".contains(c));
    if !kind_ok {
        return invalid("kind must be 1 to 128 characters of letters, digits and . _ - : /");
    }
    if spec.input.to_string().len() > MAX_INPUT {
        return invalid("input is larger than 256 KiB");
    }
    if spec.idem_key.as_ref().is_some_and(|k| k.is_empty() || k.len() > 256) {
        return invalid("idem_key must be 1 to 256 bytes");
    }
    if spec.timeout_ms.is_some_and(|t| t == 0 || t > MAX_TIMEOUT_MS) {
        return invalid("timeout_ms must be between 1 and 86400000");
    }
    if spec.retry.is_some_and(|r| r.max_attempts == 0 || r.max_attempts > 10) {
        return invalid("retry.max_attempts must be between 1 and 10");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{JobsAdvert, LEASE_MS, message::Rejection};

    struct One(Advert);

    impl Workers for One {
        fn list(&self) -> Vec<(&Advert, bool, bool)> {
            vec![(&self.0, true, true)]
        }
    }

    fn worker() -> One {
        started(0)
    }

    /// The worker `w1`, started at `boot`.
    fn started(boot: u64) -> One {
        let mut advert = Advert::basic(NodeId::parse("w1").expect("id"), "lab", 1, 0);
        let jobs = JobsAdvert { slots: 2, accepts: vec!["work".into()], draining: false, boot };
        advert.jobs = Some(jobs);
        One(advert)
    }

    fn config() -> JobsConfig {
        JobsConfig { kinds: vec!["work".into()], ..JobsConfig::default() }
    }

    fn env<'a>(
        now: u64,
        me: &'a NodeId,
        caps: &'a Map<String, Value>,
        w: &'a dyn Workers,
    ) -> Env<'a> {
        Env {
            now,
            me,
            caps,
            tags: &[],
            slots: 1,
            hosted: 0,
            offload: Offload::Prefer,
            queue_ms: 250,
            policy_epoch: 1,
            workers: w,
            quarantined: &[],
        }
    }

    fn spec(key: Option<&str>) -> JobSpec {
        JobSpec {
            kind: "work".into(),
            input: Value::Null,
            idem_key: key.map(str::to_owned),
            placement: None,
            timeout_ms: None,
            retry: None,
        }
    }

    /// The records the ledger last wrote, as a store would hold them.
    fn stored(outs: &[Out]) -> super::super::StoredJobs {
        let mut records: BTreeMap<String, JobRecord> = BTreeMap::new();
        for out in outs {
            if let Out::Persist(rec) = out {
                records.insert(rec.id.clone(), (**rec).clone());
            }
        }
        let fence = records.values().map(|r| r.fence).max().unwrap_or(0);
        let rev = records.values().map(|r| r.rev).max().unwrap_or(0);
        super::super::StoredJobs { records: records.into_values().collect(), fence, rev }
    }

    /// `w1` as [`worker`], health not `ok`.
    struct Sick(Advert);

    impl Workers for Sick {
        fn list(&self) -> Vec<(&Advert, bool, bool)> {
            vec![(&self.0, false, true)]
        }
    }

    fn failed(outs: &[Out]) -> Option<JobEvent> {
        outs.iter().find_map(|o| match o {
            Out::Emit(e) => match &**e {
                Event::ActionFailed(f) => Some(f.clone()),
                _ => None,
            },
            _ => None,
        })
    }

    #[test]
    fn a_job_only_an_unhealthy_worker_could_run_waits_for_it_then_fails_with_explain() {
        let (me, caps) = (NodeId::parse("home").expect("id"), Map::new());
        let (sick, well) = (Sick(worker().0), worker());
        let no_local = JobsConfig { kinds: Vec::new(), ..config() };
        // The worker comes back within the wait: the job runs there.
        let mut ledger = Ledger::new(no_local.clone(), Default::default());
        ledger.submit(spec(None), &env(10, &me, &caps, &sick)).expect("admitted");
        ledger.tick(&env(10 + UNHEALTHY_WAIT_MS / 2, &me, &caps, &sick));
        assert_eq!(failed(&ledger.take()), None, "failed while its worker might come back");
        ledger.tick(&env(11 + UNHEALTHY_WAIT_MS / 2, &me, &caps, &well));
        let outs = ledger.take();
        assert!(outs.iter().any(|o| matches!(o, Out::Send { body: JobMessage::Assign(_), .. })));
        // It does not: the job fails once the wait is over, saying why.
        let mut ledger = Ledger::new(no_local, Default::default());
        ledger.submit(spec(None), &env(10, &me, &caps, &sick)).expect("admitted");
        ledger.tick(&env(10 + UNHEALTHY_WAIT_MS, &me, &caps, &sick));
        let failed = failed(&ledger.take()).expect("failed after the wait");
        assert_eq!(failed.code.as_deref(), Some("infeasible"));
        let explain = failed.explain.expect("explain");
        assert_eq!(explain["filtered"]["health"], 1, "{explain:?}");
    }

    #[test]
    fn a_home_that_has_not_timed_a_local_run_yet_offloads_rather_than_queue_behind_it() {
        let (me, caps, w) = (NodeId::parse("home").expect("id"), Map::new(), worker());
        let mut ledger = Ledger::new(config(), Default::default());
        let auto = Env { offload: Offload::Auto, ..env(10, &me, &caps, &w) };
        ledger.submit(spec(None), &auto).expect("admitted");
        ledger.submit(spec(None), &auto).expect("admitted");
        let outs = ledger.take();
        // The only slot here takes the first; the second goes to the worker at once.
        assert!(outs.iter().any(|o| matches!(o, Out::Execute(_))), "{outs:?}");
        assert!(outs.iter().any(|o| matches!(o, Out::Send { body: JobMessage::Assign(_), .. })));
    }

    #[test]
    fn a_local_run_cut_by_a_restart_runs_again_here() {
        let (me, caps, none) = (NodeId::parse("home").expect("id"), Map::new(), NoWorkers);
        let mut ledger = Ledger::new(config(), Default::default());
        ledger.submit(spec(Some("k")), &env(10, &me, &caps, &none)).expect("admitted");
        let outs = ledger.take();
        assert!(outs.iter().any(|o| matches!(o, Out::Execute(_))));
        let mut restarted = Ledger::new(config(), stored(&outs));
        restarted.resume(&env(20, &me, &caps, &none));
        let outs = restarted.take();
        let run = outs.iter().find_map(|o| match o {
            Out::Execute(run) => Some(run.clone()),
            _ => None,
        });
        let run = run.expect("run again after the restart");
        assert_eq!((run.attempt, run.fence), (2, 2), "a new attempt with a higher fence");
    }

    #[test]
    fn refused_offers_neither_survive_a_restart_nor_count_as_runs() {
        let (me, caps, w) = (NodeId::parse("home").expect("id"), Map::new(), worker());
        let no_local = JobsConfig { kinds: Vec::new(), ..config() };
        let mut ledger = Ledger::new(no_local.clone(), Default::default());
        let id = ledger.submit(spec(None), &env(10, &me, &caps, &w)).expect("admitted").id;
        let w1 = NodeId::parse("w1").expect("id");
        assert_eq!(ledger.lease(&id), None);
        let rejection = Rejection { job_id: id.clone(), fence: 1, code: "busy".into() };
        ledger.on_message(&w1, 11, JobMessage::Rejected(rejection), &env(11, &me, &caps, &w));
        let outs = ledger.take();
        // Nobody else: it waits queued (w1 refused; it may take it later), still live.
        assert_eq!(ledger.live(), 1);
        let mut restarted = Ledger::new(no_local, stored(&outs));
        restarted.resume(&env(20, &me, &caps, &w));
        let outs = restarted.take();
        let assign = outs.iter().find_map(|o| match o {
            Out::Send { body: JobMessage::Assign(a), .. } => Some(a.clone()),
            _ => None,
        });
        let assign = assign.expect("offered again after the restart, not waiting on a lease");
        assert_eq!(assign.fence, 2);
        // The refusal did not use the job's only run: it is accepted, then lost, and only then
        // does it fail.
        let accepted = JobRef { job_id: id.clone(), fence: 2 };
        restarted.on_message(&w1, 21, JobMessage::Accepted(accepted), &env(21, &me, &caps, &w));
        restarted.tick(&env(21 + 10_000, &me, &caps, &w));
        let outs = restarted.take();
        assert!(outs.iter().any(|o| matches!(o, Out::Emit(e) if matches!(**e, Event::ActionFailed(ref f) if f.code.as_deref() == Some("lost")))), "{outs:?}");
    }

    #[test]
    fn a_worker_that_restarted_loses_its_attempts_at_once() {
        let (me, caps) = (NodeId::parse("home").expect("id"), Map::new());
        let (before, after) = (started(100), started(200));
        let mut ledger = Ledger::new(config(), Default::default());
        let id =
            ledger.submit(spec(Some("k")), &env(10, &me, &caps, &before)).expect("admitted").id;
        let w1 = NodeId::parse("w1").expect("id");
        let accepted = JobRef { job_id: id.clone(), fence: 1 };
        ledger.on_message(&w1, 11, JobMessage::Accepted(accepted), &env(11, &me, &caps, &before));
        ledger.tick(&env(1_000, &me, &caps, &before));
        assert!(ledger.lease(&id).is_some(), "still leased while the worker is the same");
        ledger.take();
        // Its advert says it started again: the attempt is lost now, not when the lease ends,
        // and runs again (here: this node may run it, and has a free slot).
        ledger.tick(&env(1_100, &me, &caps, &after));
        let outs = ledger.take();
        let reassigned = outs.iter().any(|o| {
            matches!(o, Out::Emit(e) if matches!(**e, Event::JobReassigned(ref r) if r.reason.as_deref() == Some("worker_restarted")))
        });
        assert!(reassigned, "{outs:?}");
        assert_eq!(ledger.lease(&id), None);
    }

    #[test]
    fn a_worker_lying_with_a_valid_signature_cannot_end_or_keep_another_s_attempt() {
        let (me, caps, w) = (NodeId::parse("home").expect("id"), Map::new(), worker());
        let no_local = JobsConfig { kinds: Vec::new(), ..config() };
        let mut ledger = Ledger::new(no_local, Default::default());
        let id = ledger.submit(spec(None), &env(10, &me, &caps, &w)).expect("admitted").id;
        let (w1, liar) = (NodeId::parse("w1").expect("id"), NodeId::parse("w2").expect("id"));
        let accepted = JobRef { job_id: id.clone(), fence: 1 };
        ledger.on_message(
            &w1,
            11,
            JobMessage::Accepted(accepted.clone()),
            &env(11, &me, &caps, &w),
        );
        ledger.take();
        // The liar names the right job and fence: its result is refused, its renewal cancelled.
        let forged = Complete {
            job_id: id.clone(),
            fence: 1,
            ok: true,
            output: serde_json::json!("forged"),
            started_ms: 12,
            finished_ms: 12,
            cpu_ms: None,
        };
        ledger.on_message(&liar, 12, JobMessage::Complete(forged), &env(12, &me, &caps, &w));
        let renew = Renew { jobs: vec![accepted.clone()] };
        ledger.on_message(&liar, 13, JobMessage::Renew(renew), &env(13, &me, &caps, &w));
        let outs = ledger.take();
        assert_eq!(ledger.live(), 1, "the job did not end");
        let cancelled = outs.iter().any(|o| {
            matches!(o, Out::Send { to, body: JobMessage::RenewAck(a) } if *to == liar && a.cancel == vec![accepted.clone()])
        });
        assert!(cancelled, "{outs:?}");
        assert!(!outs.iter().any(|o| matches!(o, Out::Persist(r) if r.state.is_terminal())));
        // Nor does the liar's renewal keep the real worker's lease alive.
        ledger.tick(&env(11 + LEASE_MS + LEASE_MARGIN_MS, &me, &caps, &w));
        assert_eq!(ledger.lease(&id), None, "the lease ran out on time");
    }

    #[test]
    fn an_offload_is_counted_once_with_its_bytes_and_no_more_run_time_than_the_home_saw() {
        let (me, caps, w) = (NodeId::parse("home").expect("id"), Map::new(), worker());
        let no_local = JobsConfig { kinds: Vec::new(), ..config() };
        let mut ledger = Ledger::new(no_local, Default::default());
        let input = serde_json::json!({"text": "abc"});
        let job = JobSpec { input: input.clone(), ..spec(None) };
        let id = ledger.submit(job, &env(10, &me, &caps, &w)).expect("admitted").id;
        let outs = ledger.take();
        let preview = outs.iter().find_map(|o| match o {
            Out::Emit(e) => match &**e {
                Event::EgressPreview(p) => Some(p.clone()),
                _ => None,
            },
            _ => None,
        });
        let preview = preview.expect("the input's leaving is announced");
        assert_eq!((preview.node_id.as_str(), preview.bytes_out), ("w1", 14));
        let w1 = NodeId::parse("w1").expect("id");
        let accepted = JobRef { job_id: id.clone(), fence: 1 };
        ledger.on_message(&w1, 11, JobMessage::Accepted(accepted), &env(11, &me, &caps, &w));
        // The worker claims a day's work for an attempt offered 100 ms ago.
        let done = Complete {
            job_id: id.clone(),
            fence: 1,
            ok: true,
            output: serde_json::json!({"n": 12345}),
            started_ms: 0,
            finished_ms: 86_400_000,
            cpu_ms: Some(86_400_000),
        };
        ledger.on_message(&w1, 110, JobMessage::Complete(done), &env(110, &me, &caps, &w));
        let contributions: Vec<_> = ledger
            .take()
            .into_iter()
            .filter_map(|o| match o {
                Out::Contribution(c) => Some(*c),
                _ => None,
            })
            .collect();
        assert_eq!(contributions.len(), 1, "{contributions:?}");
        let c = &contributions[0];
        assert_eq!(
            (c.job_id.as_str(), c.node_id.as_str(), c.outcome.as_str()),
            (id.as_str(), "w1", "completed")
        );
        assert_eq!((c.bytes_out, c.bytes_in, c.fence), (14, 11, 1));
        assert_eq!(c.duration_ms, 100, "no more than the Home saw pass");
        // Nor more CPU than 64 threads (it names none) could use in that time.
        assert_eq!(c.cpu_ms, Some(6_400));
    }

    #[test]
    fn a_worker_cannot_grow_the_home_s_records_with_a_long_refusal_code() {
        let (me, caps, w) = (NodeId::parse("home").expect("id"), Map::new(), worker());
        let no_local = JobsConfig { kinds: Vec::new(), ..config() };
        let mut ledger = Ledger::new(no_local, Default::default());
        let id = ledger.submit(spec(None), &env(10, &me, &caps, &w)).expect("admitted").id;
        ledger.take();
        let w1 = NodeId::parse("w1").expect("id");
        let rejection = Rejection { job_id: id.clone(), fence: 1, code: "busy".repeat(2_500) };
        ledger.on_message(&w1, 11, JobMessage::Rejected(rejection), &env(11, &me, &caps, &w));
        let outs = ledger.take();
        let reasons: Vec<Option<String>> = outs
            .iter()
            .filter_map(|o| match o {
                Out::Contribution(c) => Some(c.reason.clone()),
                Out::Persist(r) => r.attempts.last().map(|a| a.reason.clone()),
                _ => None,
            })
            .collect();
        assert!(!reasons.is_empty(), "{outs:?}");
        assert!(reasons.iter().all(|r| r.as_deref() == Some("invalid")), "{reasons:?}");
    }
}
