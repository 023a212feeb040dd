//! The core's side of job routing: it hands the [`Ledger`] (jobs this node owns) and the
//! [`Worker`] (attempts it runs for its Home) what they need to decide, checks who signed each
//! dispatch message before either sees it, and turns their decisions into effects.

use libp2p::PeerId;

use super::{Effect, NodeCore, Write};
use crate::{
    admission::Admission,
    capsule::{Subject, pattern_matches},
    cluster::{Advert, Health},
    jobs::{
        Env, Finished, JobSpec, Ledger, NoWorkers, Offload, Out, SubmitError, Submitted, Worker,
        WorkerEnv, Workers,
        message::{self, JobMessage, Signed},
    },
    membership::Member,
    node_id::NodeId,
    role::Role,
};

/// The remote members as candidates for the Home's placements.
struct Members<'a> {
    members: &'a std::collections::BTreeMap<NodeId, Member>,
    roster: &'a crate::admission::Roster,
    now: u64,
    ttl_ms: u64,
}

impl Workers for Members<'_> {
    fn list(&self) -> Vec<(&Advert, bool, bool)> {
        self.members
            .iter()
            .map(|(id, m)| {
                let ok = m.record.health_at(self.now, self.ttl_ms) == Health::Ok;
                let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, m.key);
                let admitted = self.roster.status(id, &key) == Admission::Admitted;
                (&*m.record.advert, ok, admitted)
            })
            .collect()
    }

    fn boot(&self, node: &NodeId) -> Option<u64> {
        self.members.get(node)?.record.advert.jobs.as_ref().map(|j| j.boot)
    }

    fn cpu_threads(&self, node: &NodeId) -> Option<u64> {
        let caps = &self.members.get(node)?.record.advert.capabilities;
        caps.get("cpu")?.get("threads")?.as_u64()
    }
}

impl NodeCore {
    /// `POST /actions`.
    pub(super) fn submit_job(&mut self, spec: JobSpec, now: u64) -> Result<Submitted, SubmitError> {
        self.with_ledger(now, |ledger, env| ledger.submit(spec, env))
    }

    /// Cancels a job this node owns.
    pub(super) fn cancel_job(&mut self, id: &str, now: u64) -> Result<(), SubmitError> {
        self.with_ledger(now, |ledger, env| ledger.cancel(id, env))
    }

    /// Stops or resumes taking attempts from the Home; a change is advertised at once.
    pub(super) fn drain_jobs(&mut self, on: bool, now: u64) {
        if self.worker.drain(on) {
            self.advertise("drain", now, |_, _| {});
        }
    }

    /// An executor finished a run: one of this node's jobs, or one it runs for the Home.
    pub(super) fn job_finished(&mut self, done: Finished, now: u64) {
        let kind = self
            .worker
            .running_kind(&done.job_id, done.fence)
            .or_else(|| self.ledger.running_kind(&done.job_id, done.fence))
            .map(str::to_owned);
        let changed = kind.and_then(|k| self.runtimes.finished(&k, done.fault.as_deref(), now));
        if self.worker.holds(&done.job_id, done.fence) {
            self.with_worker(now, |worker, env| worker.finished(done, env));
        } else {
            self.with_ledger(now, |ledger, env| ledger.finished(done, env));
        }
        if changed.is_some() {
            self.runtimes_changed(now);
        }
    }

    /// A runtime changed health: what this node accepts and advertises follows, readers and
    /// `runtime.health` say so, and jobs waiting for it are looked at again.
    fn runtimes_changed(&mut self, now: u64) {
        self.worker.set_quarantined(self.runtimes.quarantined());
        let entry = crate::runtimes::RuntimeMatrixEntry::of(
            self.id.as_str(),
            &self.runtimes.statuses(),
            now,
            now,
        );
        for line in &entry.status.detail {
            tracing::warn!(runtime = %line, "runtime health changed");
        }
        self.emit(crate::events::Event::RuntimeHealth(Box::new(entry)));
        self.advertise("runtime", now, |_, _| {});
        self.with_ledger(now, |ledger, env| ledger.tick(env));
    }

    /// A dispatch envelope arrived (over libp2p from `from`, or from the broker).
    pub(super) fn on_job_message(
        &mut self,
        bytes: &[u8],
        from: Option<PeerId>,
        opened: Option<Box<message::Opened>>,
        now: u64,
    ) {
        self.counters.received += 1;
        let opened = match opened {
            Some(opened) => *opened,
            None => message::open(bytes, &self.workspace),
        };
        let (key, signed) = match opened {
            Ok(opened) => opened,
            Err(reason) => {
                self.counters.refuse(reason);
                tracing::debug!(reason = reason.as_str(), "dispatch message refused");
                return;
            }
        };
        let Signed { node, sent_ms, body } = signed;
        let member = self.protocol.membership().members().get(&node);
        let bound = member.is_some_and(|m| m.key == key.to_bytes());
        let same_peer = from.is_none_or(|p| member.is_some_and(|m| m.peer_id == Some(p)));
        if !bound || !same_peer {
            self.counters.refuse(crate::wire::Reason::KeyConflict);
            tracing::debug!(%node, "dispatch message from a key not bound to its sender; refused");
            return;
        }
        match body {
            JobMessage::Assign(_)
            | JobMessage::RenewAck(_)
            | JobMessage::CompleteAck(_)
            | JobMessage::Cancel(_) => {
                let from_home =
                    self.protocol.policy().pin().is_some_and(|p| p.key == key.to_bytes());
                if !from_home || self.is_home() {
                    self.counters.refuse(crate::wire::Reason::UntrustedHome);
                    tracing::debug!(%node, kind = body.kind(), "dispatch message not from the pinned Home; refused");
                    if let JobMessage::Assign(a) = body {
                        let rejection = message::Rejection {
                            job_id: a.job_id,
                            fence: a.fence,
                            code: "not_home".into(),
                        };
                        self.send_job(&node, JobMessage::Rejected(rejection), now);
                    }
                    return;
                }
                match body {
                    JobMessage::Assign(a) if self.policy_view().takes_work => {
                        if let Some(code) = self.denied_here(&a.kind, now) {
                            self.emit(crate::events::Event::JobError(crate::events::JobEvent {
                                id: a.job_id.clone(),
                                kind: Some(a.kind.clone()),
                                node_id: Some(self.id.to_string()),
                                attempt: Some(a.attempt),
                                fence: Some(a.fence),
                                code: Some(code.to_owned()),
                                ..Default::default()
                            }));
                            let rejection = message::Rejection {
                                job_id: a.job_id,
                                fence: a.fence,
                                code: code.into(),
                            };
                            self.send_job(&node, JobMessage::Rejected(rejection), now);
                            return;
                        }
                        self.with_worker(now, |worker, env| worker.assign(&node, a, env));
                    }
                    JobMessage::Assign(a) => {
                        let rejection = message::Rejection {
                            job_id: a.job_id,
                            fence: a.fence,
                            code: "not_admitted".into(),
                        };
                        self.send_job(&node, JobMessage::Rejected(rejection), now);
                    }
                    other => self.with_worker(now, |worker, env| worker.on_message(other, env)),
                }
            }
            JobMessage::Accepted(_)
            | JobMessage::Rejected(_)
            | JobMessage::Renew(_)
            | JobMessage::Complete(_) => {
                self.with_ledger(now, |ledger, env| ledger.on_message(&node, sent_ms, body, env));
            }
        }
    }

    /// A dispatch message to `peer` could not be delivered.
    pub(super) fn on_job_undelivered(&mut self, peer: PeerId, now: u64) {
        let node = self
            .protocol
            .membership()
            .members()
            .iter()
            .find(|(_, m)| m.peer_id == Some(peer))
            .map(|(id, _)| id.clone());
        if let Some(node) = node {
            self.with_ledger(now, |ledger, env| ledger.unreachable(&node, env));
        }
    }

    /// Timers of both sides.
    pub(super) fn jobs_tick(&mut self, now: u64) {
        if !self.runtimes.tick(now).is_empty() {
            self.runtimes_changed(now);
        }
        self.with_ledger(now, |ledger, env| ledger.tick(env));
        self.with_worker(now, |worker, env| worker.tick(env));
    }

    /// After a restart: take up the stored jobs.
    pub(super) fn resume_jobs(&mut self, now: u64) {
        self.with_ledger(now, |ledger, env| ledger.resume(env));
    }

    /// Runs `f` on the ledger with the node's state, then carries out what it decided.
    fn with_ledger<R>(&mut self, now: u64, f: impl FnOnce(&mut Ledger, &Env<'_>) -> R) -> R {
        let mut ledger = std::mem::replace(
            &mut self.ledger,
            Ledger::new(Default::default(), Default::default()),
        );
        let hints =
            self.governor.effective(self.protocol.policy().current().map(|c| &c.doc.routing));
        let slots = hints.hints.max_concurrency.unwrap_or(self.jobs_config.slots).max(1);
        let offload = if !self.is_home() || self.bus.is_none() {
            Offload::Never
        } else {
            match hints.hints.offload.as_deref() {
                Some("never") => Offload::Never,
                Some("prefer") => Offload::Prefer,
                _ => Offload::Auto,
            }
        };
        let members = Members {
            members: self.protocol.membership().members(),
            roster: &self.roster,
            now,
            ttl_ms: self.ttl_ms,
        };
        let no_workers = NoWorkers;
        let quarantined = self.runtimes.quarantined();
        let (caps, tags) = match &self.local {
            Some(local) => (&local.advert.capabilities, local.advert.tags.as_slice()),
            None => (&self.capabilities, self.hierarchy.tags.as_slice()),
        };
        let env = Env {
            now,
            me: &self.id,
            caps,
            tags,
            slots,
            hosted: self.worker.hosted(),
            offload,
            queue_ms: hints.hints.slo_ms.unwrap_or(250),
            policy_epoch: self.protocol.policy().epoch(),
            workers: if offload == Offload::Never { &no_workers } else { &members },
            quarantined: &quarantined,
        };
        let result = f(&mut ledger, &env);
        let outs = ledger.take();
        self.ledger = ledger;
        self.carry_out(outs, now);
        result
    }

    /// Runs `f` on the worker with the node's state, then carries out what it decided.
    fn with_worker<R>(&mut self, now: u64, f: impl FnOnce(&mut Worker, &WorkerEnv<'_>) -> R) -> R {
        let mut worker = std::mem::replace(&mut self.worker, Worker::new(Default::default()));
        let hints =
            self.governor.effective(self.protocol.policy().current().map(|c| &c.doc.routing));
        let env = WorkerEnv {
            now,
            me: &self.id,
            policy_epoch: self.protocol.policy().epoch(),
            slots: hints.hints.max_concurrency.unwrap_or(self.jobs_config.slots).max(1),
            own: self.ledger.counts().1,
        };
        let result = f(&mut worker, &env);
        let outs = worker.take();
        self.worker = worker;
        self.carry_out(outs, now);
        result
    }

    fn carry_out(&mut self, outs: Vec<Out>, now: u64) {
        for out in outs {
            match out {
                Out::Persist(record) => {
                    self.jobs_dirty = true;
                    self.persist(Write::Job(record), |_, result, _| {
                        if let Err(e) = result {
                            tracing::warn!(error = %e, "could not store a job; it is written again at its next change");
                        }
                    });
                }
                Out::Emit(event) => self.emit(*event),
                Out::Send { to, body } => self.send_job(&to, body, now),
                Out::Execute(run) => self.out.push(Effect::Execute(run)),
                Out::Abort { job_id, fence } => self.out.push(Effect::Abort { job_id, fence }),
                Out::Contribution(c) => self.out.push(Effect::Contribution(c)),
            }
        }
    }

    /// Signs `body` and sends it to `to`, when its libp2p identity is known.
    fn send_job(&mut self, to: &NodeId, body: JobMessage, now: u64) {
        let Some(peer) = self.protocol.membership().members().get(to).and_then(|m| m.peer_id)
        else {
            tracing::debug!(node = %to, "no route to a node for a dispatch message");
            return;
        };
        let signed = Signed { node: self.id.clone(), sent_ms: now, body };
        let bytes = message::seal(&self.key, &self.workspace, &signed);
        self.out.push(Effect::SendJob { peer, bytes });
    }

    /// What this node advertises about the jobs it takes: nothing on the Home, which hands
    /// them out, nor on a role that may run no task (observer).
    pub(super) fn jobs_advert(&self) -> Option<crate::jobs::JobsAdvert> {
        let role = self.hierarchy.role;
        let no_tasks = role.denies().iter().any(|p| pattern_matches(p, "task:any"));
        if role == Role::Root || no_tasks { None } else { self.worker.advert() }
    }

    /// Why this node's own gates refuse to run `kind` for the Home, if they do: its role, or a
    /// capsule it holds denying `task:<kind>` (as `POST /actions` would be refused here).
    pub(super) fn denied_here(&self, kind: &str, now: u64) -> Option<&'static str> {
        let key = format!("task:{kind}");
        let role = self.hierarchy.role;
        if role.denies().iter().any(|p| pattern_matches(p, &key)) {
            return Some("role_denied");
        }
        let subject = Subject { role, node: self.id.as_str(), tags: &self.hierarchy.tags };
        self.capsules.denying(&key, &subject, now).map(|_| "capsule_denied")
    }
}
