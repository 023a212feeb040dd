//! Jobs this node runs for its Home. Admission is decided here, where the work runs, and denies
//! by default: only kinds this node can execute and its operator allowed (`[jobs.remote]
//! allow`).
//!
//! An accepted assignment only reserves a slot: the attempt starts when the Home confirms it
//! (a `renew_ack` naming it), and from then on it holds a lease counted from this node's own
//! send time of the message the Home confirmed. It stops by itself when the lease is not
//! renewed in time, before the Home gives up on it, so two attempts of one job never run at
//! once whatever the message delays. Its result is sent until the Home acknowledges it.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde_json::json;

use super::{
    COMPLETE_RETRY_MS, Finished, JobsConfig, LEASE_MARGIN_MS, OUTBOX_MAX, Run, SEEN_MAX, glob,
    ledger::Out,
    message::{Assign, Complete, JobMessage, JobRef, Rejection, Renew, RenewAck},
};
use crate::{
    events::{Event, JobEvent, TaskCompleted},
    node_id::NodeId,
};

/// A renewal round not answered is sent again this often...
const RENEW_RETRY_MS: u64 = 250;
/// ...at most this many more times.
const RENEW_RETRIES: u32 = 3;
/// The longest lease a Home may grant.
const MAX_LEASE_MS: u64 = 10 * 60 * 1_000;
/// A result is given up after this long unacknowledged (the Home reassigned the job long ago).
const OUTBOX_FOR_MS: u64 = 10 * 60 * 1_000;

/// What the worker needs to know about the node for one decision.
#[derive(Debug, Clone, Copy)]
pub struct WorkerEnv<'a> {
    /// Now (ms).
    pub now: u64,
    /// This node.
    pub me: &'a NodeId,
    /// The policy epoch applied here.
    pub policy_epoch: u64,
    /// Slots (shared with this node's own jobs).
    pub slots: u32,
    /// This node's own jobs running now.
    pub own: u32,
}

#[derive(Debug, Clone)]
struct Held {
    fence: u64,
    attempt: u32,
    kind: String,
    home: NodeId,
    /// Reserved, not started: what to run once the Home confirms.
    run: Option<Run>,
    /// The lease the Home grants this attempt (ms).
    lease_ms: u64,
    /// When this node said it accepted (the lease counts from there once confirmed).
    accepted_ms: u64,
    /// Stop by then unless renewed; for a reservation, drop it by then (ms).
    deadline: u64,
}

#[derive(Debug, Clone)]
struct Pending {
    home: NodeId,
    complete: Complete,
    first_sent: u64,
    last_sent: u64,
}

/// The attempts this node runs for its Home. See the module docs.
#[derive(Debug, Clone)]
pub struct Worker {
    config: JobsConfig,
    accepts: Vec<String>,
    /// Kinds whose runtime is quarantined: refused until it is back.
    quarantined: Vec<String>,
    held: BTreeMap<String, Held>,
    /// The highest fence seen per job.
    seen: HashMap<String, u64>,
    seen_order: VecDeque<String>,
    outbox: BTreeMap<String, Pending>,
    draining: bool,
    /// When this node started.
    boot: u64,
    next_renew: u64,
    /// The current renewal round not yet answered: when it began, retries sent.
    unanswered: Option<(u64, u32)>,
    /// When the last renewal went out.
    last_renew: u64,
    out: Vec<Out>,
}

impl Worker {
    /// A worker with these settings.
    pub fn new(config: JobsConfig) -> Self {
        Self {
            accepts: config.accepts(),
            quarantined: Vec::new(),
            config,
            held: BTreeMap::new(),
            seen: HashMap::new(),
            seen_order: VecDeque::new(),
            outbox: BTreeMap::new(),
            draining: false,
            boot: 0,
            next_renew: 0,
            unanswered: None,
            last_renew: 0,
            out: Vec::new(),
        }
    }

    /// Takes the effects of the last calls.
    pub fn take(&mut self) -> Vec<Out> {
        std::mem::take(&mut self.out)
    }

    fn emit(&mut self, event: Event) {
        self.out.push(Out::Emit(Box::new(event)));
    }

    /// What this node advertises (none when it runs no kind for the Home).
    pub fn advert(&self) -> Option<super::JobsAdvert> {
        (!self.accepts.is_empty()).then(|| super::JobsAdvert {
            slots: self.config.slots,
            accepts: self.accepts.clone(),
            draining: self.draining,
            boot: self.boot,
        })
    }

    /// The node started at `now` (advertised, so a Home learns of a restart at once).
    pub fn start(&mut self, now: u64) {
        self.boot = now;
    }

    /// The kinds whose runtime is quarantined now: assignments of them are refused for now
    /// (the advert's runtimes tell the Home so before it asks).
    pub fn set_quarantined(&mut self, kinds: Vec<String>) {
        self.quarantined = kinds;
    }

    /// The kind of `job_id` when it runs here for the Home at `fence`.
    pub fn running_kind(&self, job_id: &str, fence: u64) -> Option<&str> {
        self.held.get(job_id).filter(|h| h.fence == fence).map(|h| h.kind.as_str())
    }

    /// Stops (or resumes) taking new attempts; returns whether that changed.
    pub fn drain(&mut self, on: bool) -> bool {
        std::mem::replace(&mut self.draining, on) != on
    }

    /// Attempts running here.
    pub fn hosted(&self) -> u32 {
        u32::try_from(self.held.len()).unwrap_or(u32::MAX)
    }

    /// Whether `job_id` at `fence` runs (or is reserved) here for the Home.
    pub fn holds(&self, job_id: &str, fence: u64) -> bool {
        self.held.get(job_id).is_some_and(|h| h.fence == fence)
    }

    /// The attempts running here (started, not reserved) with the time each must stop by.
    pub fn running(&self) -> impl Iterator<Item = (&str, u64, u64)> {
        self.held
            .iter()
            .filter(|(_, h)| h.run.is_none())
            .map(|(id, h)| (id.as_str(), h.fence, h.deadline))
    }

    /// An assignment from the Home (its signer already checked).
    pub fn assign(&mut self, home: &NodeId, a: Assign, env: &WorkerEnv<'_>) {
        let seen = self.seen.get(&a.job_id).copied().unwrap_or(0);
        if a.fence == seen
            && (self.holds(&a.job_id, a.fence) || self.outbox.contains_key(&a.job_id))
        {
            // A repeat of what runs (or ran) here: the answer was lost.
            let body = JobMessage::Accepted(JobRef { job_id: a.job_id, fence: a.fence });
            self.out.push(Out::Send { to: home.clone(), body });
            return;
        }
        let code = if a.fence <= seen {
            Some("replay")
        } else if a.policy_epoch < env.policy_epoch {
            Some("stale_policy")
        } else if self.quarantined.contains(&a.kind) {
            Some("runtime_quarantined")
        } else if !self.accepts.iter().any(|g| glob(g, &a.kind)) {
            Some("kind_not_allowed")
        } else if self.draining {
            Some("draining")
        } else if self.hosted() + env.own >= env.slots.max(1) {
            Some("busy")
        } else {
            None
        };
        if let Some(code) = code {
            self.emit(Event::JobError(JobEvent {
                id: a.job_id.clone(),
                kind: Some(a.kind.clone()),
                node_id: Some(env.me.to_string()),
                attempt: Some(a.attempt),
                fence: Some(a.fence),
                code: Some(code.to_owned()),
                ..JobEvent::default()
            }));
            let body = JobMessage::Rejected(Rejection {
                job_id: a.job_id,
                fence: a.fence,
                code: code.into(),
            });
            self.out.push(Out::Send { to: home.clone(), body });
            return;
        }
        self.see(&a.job_id, a.fence);
        // A newer attempt of a job held here replaces the older one.
        if let Some(old) = self.held.remove(&a.job_id) {
            self.out.push(Out::Abort { job_id: a.job_id.clone(), fence: old.fence });
        }
        self.outbox.remove(&a.job_id);
        let run = Run {
            job_id: a.job_id.clone(),
            fence: a.fence,
            attempt: a.attempt,
            kind: a.kind.clone(),
            input: a.input,
            idem_key: a.idem_key,
            deadline_ms: a.timeout_ms,
        };
        self.held.insert(
            a.job_id.clone(),
            Held {
                fence: a.fence,
                attempt: a.attempt,
                kind: a.kind,
                home: home.clone(),
                run: Some(run),
                lease_ms: a.lease_ms.clamp(3 * self.config.renew_ms, MAX_LEASE_MS),
                accepted_ms: env.now,
                deadline: env.now + a.lease_ms.clamp(3 * self.config.renew_ms, MAX_LEASE_MS),
            },
        );
        let body = JobMessage::Accepted(JobRef { job_id: a.job_id, fence: a.fence });
        self.out.push(Out::Send { to: home.clone(), body });
    }

    /// A message from the Home other than an assignment.
    pub fn on_message(&mut self, body: JobMessage, env: &WorkerEnv<'_>) {
        match body {
            JobMessage::RenewAck(ack) => self.renewed(ack, env),
            JobMessage::CompleteAck(r) => {
                self.outbox.retain(|id, p| *id != r.job_id || p.complete.fence != r.fence);
            }
            JobMessage::Cancel(r) => self.stop(&r, "cancelled", env),
            _ => {}
        }
    }

    /// An attempt held here finished.
    pub fn finished(&mut self, done: Finished, env: &WorkerEnv<'_>) {
        if !self.holds(&done.job_id, done.fence) {
            return;
        }
        let Some(held) = self.held.remove(&done.job_id) else { return };
        let took = done.finished_ms.saturating_sub(done.started_ms);
        self.emit(Event::TaskCompleted(TaskCompleted {
            id: json!(done.job_id),
            ok: done.ok,
            output: done.output.clone(),
            node_id: env.me.to_string(),
            kind: Some(held.kind),
            attempt: Some(held.attempt),
            duration_ms: Some(took),
        }));
        let complete = Complete {
            job_id: done.job_id.clone(),
            fence: done.fence,
            ok: done.ok,
            output: done.output,
            started_ms: done.started_ms,
            finished_ms: done.finished_ms,
            cpu_ms: done.cpu_ms,
        };
        if self.outbox.len() >= OUTBOX_MAX {
            // Full: the oldest result goes (the Home has long reassigned its job).
            let oldest =
                self.outbox.iter().min_by_key(|(_, p)| p.first_sent).map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.outbox.remove(&k);
            }
        }
        let body = JobMessage::Complete(complete.clone());
        self.out.push(Out::Send { to: held.home.clone(), body });
        self.outbox.insert(
            done.job_id,
            Pending { home: held.home, complete, first_sent: env.now, last_sent: env.now },
        );
    }

    /// Timers: attempts whose lease ran out stop; renewals and unacknowledged results go out.
    pub fn tick(&mut self, env: &WorkerEnv<'_>) {
        let now = env.now;
        let lapsed: Vec<JobRef> = self
            .held
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(id, h)| JobRef { job_id: id.clone(), fence: h.fence })
            .collect();
        for r in lapsed {
            self.stop(&r, "lease_lost", env);
        }
        // A renewal round: one renewal, then up to RENEW_RETRIES more RENEW_RETRY_MS apart
        // while none of them is answered, so a lease is lost only when every message of
        // several rounds in a row is.
        let round = now >= self.next_renew;
        let retry = self.unanswered.is_some_and(|(_, retries)| retries < RENEW_RETRIES)
            && now >= self.last_renew + RENEW_RETRY_MS;
        if (round || retry) && !self.held.is_empty() {
            if round {
                self.next_renew = now + self.config.renew_ms;
                self.unanswered = Some((now, 0));
            } else if let Some((_, retries)) = &mut self.unanswered {
                *retries += 1;
            }
            self.last_renew = now;
            let mut by_home: BTreeMap<&NodeId, Vec<JobRef>> = BTreeMap::new();
            for (id, h) in &self.held {
                by_home
                    .entry(&h.home)
                    .or_default()
                    .push(JobRef { job_id: id.clone(), fence: h.fence });
            }
            for (home, jobs) in by_home {
                let body = JobMessage::Renew(Renew { jobs });
                self.out.push(Out::Send { to: home.clone(), body });
            }
        }
        self.outbox.retain(|_, p| now.saturating_sub(p.first_sent) < OUTBOX_FOR_MS);
        for p in self.outbox.values_mut() {
            if now.saturating_sub(p.last_sent) >= COMPLETE_RETRY_MS {
                p.last_sent = now;
                let body = JobMessage::Complete(p.complete.clone());
                self.out.push(Out::Send { to: p.home.clone(), body });
            }
        }
    }

    /// The earliest time something is due.
    pub fn next_deadline(&self) -> Option<u64> {
        let lapse = self.held.values().map(|h| h.deadline).min();
        let retry = self
            .unanswered
            .filter(|(_, r)| *r < RENEW_RETRIES)
            .map(|_| self.last_renew + RENEW_RETRY_MS);
        let renew = (!self.held.is_empty())
            .then_some(retry.map_or(self.next_renew, |r| r.min(self.next_renew)));
        let resend = self.outbox.values().map(|p| p.last_sent + COMPLETE_RETRY_MS).min();
        [lapse, renew, resend].into_iter().flatten().min()
    }

    fn renewed(&mut self, ack: RenewAck, env: &WorkerEnv<'_>) {
        if self.unanswered.is_some_and(|(began, _)| ack.echo_ms >= began) {
            self.unanswered = None;
        }
        // Renewed from when the confirmed message left this node: the Home's lease started no
        // earlier.
        for r in &ack.renewed {
            let Some(h) = self.held.get_mut(&r.job_id).filter(|h| h.fence == r.fence) else {
                continue;
            };
            let lease = h.lease_ms.saturating_sub(LEASE_MARGIN_MS);
            match h.run.take() {
                // Confirmed: it starts, leased from its acceptance or the renewal echoed.
                Some(mut run) => {
                    let anchor = ack.echo_ms.max(h.accepted_ms).min(env.now);
                    if anchor + lease <= env.now {
                        // A confirmation too old to lease anything: the next renewal's will do.
                        h.run = Some(run);
                        continue;
                    }
                    h.deadline = anchor + lease;
                    run.deadline_ms = env.now.saturating_add(run.deadline_ms);
                    self.out.push(Out::Execute(run));
                }
                None => h.deadline = h.deadline.max(ack.echo_ms + lease),
            }
        }
        for r in &ack.cancel {
            if let Some(h) = self.held.remove(&r.job_id) {
                if h.fence != r.fence {
                    self.held.insert(r.job_id.clone(), h);
                } else if h.run.is_none() {
                    self.out.push(Out::Abort { job_id: r.job_id.clone(), fence: r.fence });
                }
            }
        }
    }

    fn stop(&mut self, r: &JobRef, code: &str, env: &WorkerEnv<'_>) {
        let Some(held) = self.held.get(&r.job_id).filter(|h| h.fence == r.fence) else { return };
        let (attempt, started) = (held.attempt, held.run.is_none());
        self.held.remove(&r.job_id);
        if !started {
            // A reservation the Home never confirmed: nothing runs.
            return;
        }
        self.out.push(Out::Abort { job_id: r.job_id.clone(), fence: r.fence });
        self.emit(Event::JobError(JobEvent {
            id: r.job_id.clone(),
            node_id: Some(env.me.to_string()),
            attempt: Some(attempt),
            fence: Some(r.fence),
            code: Some(code.to_owned()),
            ..JobEvent::default()
        }));
    }

    fn see(&mut self, job_id: &str, fence: u64) {
        if self.seen.insert(job_id.to_owned(), fence).is_none() {
            self.seen_order.push_back(job_id.to_owned());
            while self.seen_order.len() > SEEN_MAX {
                if let Some(old) = self.seen_order.pop_front() {
                    self.seen.remove(&old);
                }
            }
        }
    }
}
