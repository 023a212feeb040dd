//! Operators' commands: the hierarchy, admission at the Home, capsules and the governor. Each
//! applies its change to a copy, has the copy written, and only then puts it in force and
//! answers: a refused or unpersistable change leaves nothing behind.

use std::sync::Arc;

use base64::{Engine, engine::general_purpose::STANDARD as B64};

use super::{AdmissionChange, Command, CommandId, NodeCore, NodeError, Reply, Write};
use crate::{
    admission::{Admission, Roster},
    capsule::CapsuleSet,
    events::{self, CapsuleApplied, CapsuleRemoved, Event},
    governor::{Governor, Hints},
    hierarchy::{CoreHello, Hierarchy, HierarchyError},
    node_id::{IdSource, NodeId},
};

impl NodeCore {
    pub(super) fn command(&mut self, id: CommandId, command: Command, now: u64) {
        match command {
            Command::SetRole(role) => self.set_role(id, role, now),
            Command::Hello(hello) => self.hello(id, hello, now),
            Command::Offer(offer) => {
                let event = Event::Offer(offer.clone());
                self.change_hierarchy(id, move |h, me| h.offer(&offer, me), event, now);
            }
            Command::Accept(accept) => {
                let event = Event::Accepted(accept.clone());
                self.change_hierarchy(id, move |h, me| h.accept(&accept, me), event, now);
            }
            Command::Admit { id: node, key } => self.admit(id, &node, key),
            Command::Revoke(node) => self.revoke(id, &node),
            Command::AdoptCapsule(request) => self.adopt_capsule(id, *request, now),
            Command::Teardown(request) => self.teardown_capsules(id, request, now),
            Command::SetTrust(store) => self.set_trust(id, store),
            Command::SetProfile(name) => {
                let mut next = (*self.governor).clone();
                next.profile = Some(name.clone());
                let mut payload = serde_json::Map::new();
                payload.insert("profile".into(), name.into());
                self.set_governor(id, next, payload, "governor profile", now);
            }
            Command::SetHints(hints) => self.set_hints(id, *hints, now),
            Command::TrustHome(fingerprint) => self.trust_home(id, fingerprint),
            Command::UntrustHome => self.untrust_home(id),
            Command::SubmitJob(spec) => {
                let result = self.submit_job(*spec, now).map(Reply::Submitted);
                self.publish_snapshot();
                self.reply(id, result.map_err(NodeError::from));
            }
            Command::CancelJob(job) => {
                let result = self.cancel_job(&job, now).map(|()| Reply::Done);
                self.publish_snapshot();
                self.reply(id, result.map_err(NodeError::from));
            }
            Command::DrainJobs(on) => {
                self.drain_jobs(on, now);
                self.publish_snapshot();
                self.reply(id, Ok(Reply::Done));
            }
            Command::JobFinished(done) => {
                self.job_finished(*done, now);
                self.jobs_dirty = true;
                self.reply(id, Ok(Reply::Done));
            }
        }
    }

    /// The operator trusts a pending Home claim: the pin is written, then the claim's document
    /// is put in force (its capsules held, its roster's bindings applied).
    fn trust_home(&mut self, id: CommandId, fingerprint: String) {
        let mut next = self.protocol.policy().clone();
        if let Err(e) = next.trust(&fingerprint) {
            return self.reply(id, Err(e.into()));
        }
        self.persist_then(id, Write::Policy(next.stored()), move |core, now| {
            match core.protocol.trust_home(&fingerprint) {
                Ok(changes) => {
                    let view = core.policy_view();
                    core.emit(Event::HomeTrusted(events::HomeTrust {
                        home: view.home_id.clone(),
                        fingerprint: Some(fingerprint.clone()),
                        policy_epoch: view.policy_epoch,
                        trusted: true,
                    }));
                    core.apply_changes(changes, now);
                    core.reply(id, Ok(Reply::Done));
                }
                Err(e) => core.reply(id, Err(e.into())),
            }
        });
    }

    /// The operator takes back the trust in the pinned Home: the cleared pin is written, then
    /// the Home's policy and the capsules it handed out are dropped.
    fn untrust_home(&mut self, id: CommandId) {
        let mut next = self.protocol.policy().clone();
        match next.untrust() {
            Err(e) => return self.reply(id, Err(e.into())),
            Ok(false) => return self.reply(id, Ok(Reply::Done)),
            Ok(true) => {}
        }
        self.persist_then(id, Write::Policy(next.stored()), move |core, now| {
            let changes = match core.protocol.untrust_home() {
                Ok(changes) => changes.unwrap_or_default(),
                Err(e) => return core.reply(id, Err(e.into())),
            };
            core.apply_changes(changes, now);
            core.drop_home_capsules(now);
            core.emit(Event::HomeTrusted(events::HomeTrust {
                home: None,
                fingerprint: None,
                policy_epoch: 0,
                trusted: false,
            }));
            core.reply(id, Ok(Reply::Done));
        });
    }

    /// Answers a command once readers can see what it did.
    pub(super) fn reply(&mut self, id: CommandId, result: Result<Reply, NodeError>) {
        self.publish_snapshot();
        self.out.push(super::Effect::Reply(id, result));
    }

    fn set_role(&mut self, id: CommandId, requested: String, now: u64) {
        let mut next = (*self.hierarchy).clone();
        let change = match next.set_role(&requested) {
            Ok(change) => change,
            Err(e) => return self.reply(id, Err(e.into())),
        };
        if !change.changed() {
            return self.reply(id, Ok(Reply::Role(change)));
        }
        self.commit_hierarchy(id, next, now, move |core, now| {
            core.emit(Event::RoleChanged(events::RoleChanged {
                role: change.role.as_str().to_owned(),
                requested,
                previous: change.previous.as_str().to_owned(),
            }));
            core.advertise("role", now, move |core, now| {
                core.check_home_claims();
                core.on_role_change(now);
                core.reply(id, Ok(Reply::Role(change)));
            });
        });
        let _ = now;
    }

    fn hello(&mut self, id: CommandId, hello: CoreHello, now: u64) {
        let explicit = self.id_source.is_explicit();
        let mut next = (*self.hierarchy).clone();
        let outcome = match next.hello(&hello, &self.id, explicit) {
            Ok(outcome) => outcome,
            Err(e) => return self.reply(id, Err(e.into())),
        };
        // Peers refuse an advert over the payload limit: refuse the hello that would make one.
        let new_id = outcome.new_id.as_ref().unwrap_or(&self.id);
        let advert = self.advert_as(new_id, &next, u64::MAX, now);
        let bytes =
            serde_json::to_vec(&crate::wire::Message::Advert(advert)).map_or(0, |b| b.len());
        if bytes > crate::wire::MAX_PAYLOAD {
            let limit = crate::wire::MAX_PAYLOAD;
            return self.reply(id, Err(NodeError::AdvertTooLarge { bytes, limit }));
        }
        self.commit_hierarchy(id, next, now, move |core, now| {
            if let Some(new_id) = &outcome.new_id {
                tracing::info!(from = %core.id, to = %new_id, "node id assigned by hello");
                // Tell the others the old id is gone before speaking under the new one.
                if core.bus.is_some() {
                    let leave = core.protocol.leave(now);
                    core.out.push(super::Effect::Publish(leave));
                }
                core.local = None;
                core.id = new_id.clone();
                core.id_source = IdSource::Hello;
                core.protocol.set_id(new_id.clone());
            }
            core.emit(Event::Hello(hello.clone()));
            if outcome.role.changed() {
                core.emit(Event::RoleChanged(events::RoleChanged {
                    role: outcome.role.role.as_str().to_owned(),
                    requested: hello.role.clone(),
                    previous: outcome.role.previous.as_str().to_owned(),
                }));
            }
            core.advertise("hello", now, move |core, now| {
                // As for a role set alone: a Home stepping down gives up its authority, and a
                // Home renamed signs its policy under its new id.
                if outcome.role.changed() || outcome.new_id.is_some() {
                    core.check_home_claims();
                    core.on_role_change(now);
                }
                core.reply(id, Ok(Reply::Hello(outcome)));
            });
        });
    }

    /// Offer and accept: apply, persist when it changed, then say so and answer.
    fn change_hierarchy(
        &mut self,
        id: CommandId,
        f: impl FnOnce(&mut Hierarchy, &NodeId) -> Result<bool, HierarchyError>,
        event: Event,
        now: u64,
    ) {
        let mut next = (*self.hierarchy).clone();
        let changed = match f(&mut next, &self.id) {
            Ok(changed) => changed,
            Err(e) => return self.reply(id, Err(e.into())),
        };
        self.commit_hierarchy(id, next, now, move |core, _| {
            core.emit(event);
            core.reply(id, Ok(Reply::Changed(changed)));
        });
    }

    /// Persists `next`, then makes it current (emitting `hierarchy.state` when the epoch
    /// moved) and runs `then`. An unchanged hierarchy is not written.
    fn commit_hierarchy(
        &mut self,
        id: CommandId,
        next: Hierarchy,
        now: u64,
        then: impl FnOnce(&mut NodeCore, u64) + Send + 'static,
    ) {
        if next == *self.hierarchy {
            return then(self, now);
        }
        self.persist_then(id, Write::Hierarchy(next.clone()), move |core, now| {
            let epoch_moved = next.epoch != core.hierarchy.epoch;
            core.hierarchy = Arc::new(next);
            core.snapshot_dirty = true;
            if epoch_moved {
                let epoch = core.hierarchy.epoch;
                core.emit(Event::HierarchyState(events::HierarchyState { epoch }));
            }
            then(core, now);
        })
    }

    /// [`NodeCore::persist`] for command `id`: `then` runs once `write` is on disk; a failed
    /// write answers the command with the error, and nothing changed.
    fn persist_then(
        &mut self,
        id: CommandId,
        write: Write,
        then: impl FnOnce(&mut NodeCore, u64) + Send + 'static,
    ) {
        self.persist(write, move |core, result, now| match result {
            Ok(()) => then(core, now),
            Err(e) => core.reply(id, Err(NodeError::Persist(e))),
        });
    }

    /// At the Home: admits `node` with `key`, or the key it advertises now.
    fn admit(&mut self, id: CommandId, node: &str, key: Option<String>) {
        if !self.is_home() {
            return self.reply(id, Err(NodeError::NotHome));
        }
        let node = match NodeId::parse(node) {
            Ok(node) => node,
            Err(e) => return self.reply(id, Err(HierarchyError::from(e).into())),
        };
        let key = match key {
            Some(key) => {
                let valid = B64
                    .decode(key.trim())
                    .ok()
                    .is_some_and(|bytes| <[u8; 32]>::try_from(bytes).is_ok());
                if !valid {
                    return self.reply(id, Err(NodeError::InvalidKey));
                }
                key.trim().to_owned()
            }
            None => match self.protocol.membership().members().get(&node) {
                Some(member) => B64.encode(member.key),
                None => {
                    let detail = format!("no node {node} has advertised; pass its key");
                    return self.reply(id, Err(NodeError::UnknownNode(detail)));
                }
            },
        };
        let mut next = (*self.roster).clone();
        if !next.admit(&node, &key) {
            let admission = self.roster.status(&node, &key);
            let change = AdmissionChange { id: node.to_string(), admission, key };
            return self.reply(id, Ok(Reply::Admission(change)));
        }
        self.commit_roster(id, next, move |core, now| {
            core.emit(Event::NodeAdmitted(events::NodeKeyed {
                id: node.to_string(),
                key: key.clone(),
            }));
            core.want_policy("node admitted", now);
            let admission = core.roster.status(&node, &key);
            let change = AdmissionChange { id: node.to_string(), admission, key };
            core.reply(id, Ok(Reply::Admission(change)));
        });
    }

    /// At the Home: revokes `node`.
    fn revoke(&mut self, id: CommandId, node: &str) {
        if !self.is_home() {
            return self.reply(id, Err(NodeError::NotHome));
        }
        let node = match NodeId::parse(node) {
            Ok(node) => node,
            Err(e) => return self.reply(id, Err(HierarchyError::from(e).into())),
        };
        let mut next = (*self.roster).clone();
        let Some(key) = next.revoke(&node) else {
            return self.reply(id, Err(NodeError::UnknownNode(format!("{node} is not admitted"))));
        };
        self.commit_roster(id, next, move |core, now| {
            core.emit(Event::NodeRevoked(events::NodeKeyed {
                id: node.to_string(),
                key: key.clone(),
            }));
            core.want_policy("node revoked", now);
            let change =
                AdmissionChange { id: node.to_string(), key, admission: Admission::Revoked };
            core.reply(id, Ok(Reply::Admission(change)));
        });
    }

    /// Persists a new roster, then makes it current.
    fn commit_roster(
        &mut self,
        id: CommandId,
        next: Roster,
        then: impl FnOnce(&mut NodeCore, u64) + Send + 'static,
    ) {
        self.persist_then(id, Write::Roster(next.clone()), move |core, now| {
            core.roster = Arc::new(next);
            then(core, now);
        })
    }

    /// Verifies the capsule against the trust store and adopts it; the lease starts now.
    fn adopt_capsule(&mut self, id: CommandId, request: super::CapsuleRequest, now: u64) {
        if let Err(e) = self.trust.verify(&request.capsule, now) {
            return self.reply(id, Err(e.into()));
        }
        let capsule_id = request.capsule.fields.id.clone();
        if !request.shared
            && let Some(refusal) = self.capsules.refuses_presented(&request.capsule, now)
        {
            return self.reply(id, Err(presented_refusal(refusal)));
        }
        if !self.capsules.has_room_for(&capsule_id) {
            return self.reply(id, Err(NodeError::CapsuleLimit(crate::capsule::MAX_HELD)));
        }
        let mut next = (*self.capsules).clone();
        let adoption = next.adopt(request.capsule, now, request.shared);
        let handed_out = self.is_home() && hands_out(&next, &capsule_id);
        if handed_out && !self.policy_fits(&next, &self.governor, now) {
            return self.reply(id, Err(NodeError::PolicyTooLarge));
        }
        if !adoption.notify {
            // The same capsule again within seconds: a renewal worth keeping, not an fsync.
            self.capsules = Arc::new(next);
            self.capsules_dirty = true;
            self.snapshot_dirty = true;
            if handed_out {
                self.want_policy("capsule adopted", now);
            }
            return self.reply(id, Ok(Reply::Adoption(Box::new(adoption))));
        }
        let context = request.context;
        self.commit_capsules(id, next, move |core, now| {
            core.emit(Event::CapsuleApplied(CapsuleApplied::new(
                &adoption.item,
                adoption.renewal,
                context,
            )));
            if handed_out {
                core.want_policy("capsule adopted", now);
            }
            core.reply(id, Ok(Reply::Adoption(Box::new(adoption))));
        });
    }

    /// Removes capsules (or, on a dry run, says which would go).
    fn teardown_capsules(&mut self, id: CommandId, request: super::TeardownRequest, now: u64) {
        let mut next = (*self.capsules).clone();
        let out = next.teardown(&request.ids, request.all, request.dry_run, now);
        if request.dry_run || out.removed.is_empty() {
            return self.reply(id, Ok(Reply::Teardown(out)));
        }
        self.commit_capsules(id, next, move |core, now| {
            for item in &out.removed {
                core.emit(Event::CapsuleTeardown(CapsuleRemoved {
                    item: item.clone(),
                    removed_ms: now,
                    removed_reason: request.reason.clone(),
                }));
            }
            core.want_policy("capsule removed", now);
            core.reply(id, Ok(Reply::Teardown(out)));
        });
    }

    /// Persists a new capsule set, then makes it current.
    fn commit_capsules(
        &mut self,
        id: CommandId,
        next: CapsuleSet,
        then: impl FnOnce(&mut NodeCore, u64) + Send + 'static,
    ) {
        self.persist_then(id, Write::Capsules(next.stored()), move |core, now| {
            core.capsules = Arc::new(next);
            core.capsules_dirty = false;
            core.snapshot_dirty = true;
            then(core, now);
        })
    }

    /// A trust store the executor read; on error the previous one stays in force.
    fn set_trust(&mut self, id: CommandId, store: Result<crate::capsule::TrustStore, String>) {
        match store {
            Ok(store) => {
                if store.is_empty() {
                    tracing::warn!(
                        "the capsule trust store lists no issuer: every capsule will be refused"
                    );
                }
                self.trust = Arc::new(store);
                self.snapshot_dirty = true;
                let issuers = self.trust.issuers();
                self.reply(id, Ok(Reply::Issuers(issuers)));
            }
            Err(e) => self.reply(id, Err(NodeError::Trust(e))),
        }
    }

    fn set_hints(&mut self, id: CommandId, hints: Hints, now: u64) {
        let mut next = (*self.governor).clone();
        next.hints = next.hints.overlaid(&hints);
        let mut payload = serde_json::Map::new();
        payload.insert("action".into(), "governor.hints".into());
        payload.insert("params".into(), serde_json::to_value(&hints).unwrap_or_default());
        payload.insert("ok".into(), true.into());
        self.set_governor(id, next, payload, "governor hints", now);
    }

    /// A governor change is written, said, re-advertised, and at the Home becomes the
    /// workspace's routing hints. At the Home these settings travel in every policy document:
    /// they must still fit.
    fn set_governor(
        &mut self,
        id: CommandId,
        next: Governor,
        payload: serde_json::Map<String, serde_json::Value>,
        reason: &'static str,
        now: u64,
    ) {
        if self.is_home() && !self.policy_fits(&self.capsules, &next, now) {
            return self.reply(id, Err(NodeError::PolicyTooLarge));
        }
        self.persist_then(id, Write::Governor(next.clone()), move |core, now| {
            core.governor = Arc::new(next);
            core.snapshot_dirty = true;
            core.emit(Event::GovernorChanged(payload));
            core.advertise("governor", now, move |core, now| {
                core.want_policy(reason, now);
                core.reply(id, Ok(Reply::Done));
            });
        });
    }
}

/// Whether capsule `id` in `capsules` goes out in the Home's documents.
/// The answer to a capsule presented without the admin token that may not be adopted.
fn presented_refusal(refusal: crate::capsule::PresentedRefusal) -> NodeError {
    use crate::capsule::{CapsuleError, MAX_PRESENTED_AGE_MS, PresentedRefusal};
    match refusal {
        PresentedRefusal::TooOld => NodeError::Capsule(CapsuleError::Verification(format!(
            "issued_at_ms is unset or over {} days old: present a freshly signed capsule, or adopt it with the admin token",
            MAX_PRESENTED_AGE_MS / 86_400_000
        ))),
        PresentedRefusal::TornDown => NodeError::CapsuleTornDown,
        PresentedRefusal::Full => NodeError::CapsuleLimit(crate::capsule::MAX_PRESENTED),
    }
}

pub(super) fn hands_out(capsules: &CapsuleSet, id: &str) -> bool {
    capsules.held().any(|a| a.capsule.fields.id == id && a.handed_out())
}
