//! The Home's authority in the core: the policy documents the Home signs (at most one per
//! [`POLICY_EVERY_MS`], on disk before it is in force or sent), the ones a worker applies, and
//! the capsules they carry with their leases.

use std::sync::Arc;

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use serde_json::{Map, json};

use super::{Effect, NodeCore, PolicyView, Write};
use crate::cluster::PendingHome;
use crate::{
    capsule::{Adopted, Capsule, CapsuleSet, TrustStore},
    events::{self, CapsuleApplied, CapsuleRemoved, Event},
    governor::Governor,
    policy::{Applied, PinSource, PolicyContent, PolicyDoc, PolicyState},
    role::Role,
    wire,
};

/// The Home signs at most one document this often; changes in between are issued together.
const POLICY_EVERY_MS: u64 = 2_000;

impl NodeCore {
    /// Every tick: drops capsules whose lease ended (and says so), writes renewals kept in
    /// memory, and signs the policy document a change asked for once [`POLICY_EVERY_MS`] allows.
    pub(super) fn authority_tick(&mut self, now: u64) {
        if self.capsules.held().any(|a| a.lease_until_ms.is_some_and(|u| u <= now)) {
            let mut next = (*self.capsules).clone();
            let expired = next.sweep(now);
            // Gone from memory whatever the disk says, so each expiry is announced once.
            self.capsules = Arc::new(next);
            self.capsules_dirty = true;
            // Readers see the capsule gone as soon as the events say so.
            self.publish_snapshot();
            for adopted in &expired {
                self.emit(expired_event(adopted, now));
            }
            if expired.iter().any(Adopted::handed_out) {
                self.want_policy("capsule expired", now);
            }
        }
        if self.capsules_dirty {
            self.write_capsules(now);
        }
        if self.policy_pending.is_some() && self.policy_due(now) {
            let reason = self.policy_pending.take().unwrap_or_default();
            self.issue_policy(&reason, now);
        }
    }

    /// Writes the capsules held (renewals kept in memory, a failed write); retried by the next
    /// tick while it fails.
    pub(super) fn write_capsules(&mut self, _now: u64) {
        self.capsules_dirty = false;
        self.persist(Write::Capsules(self.capsules.stored()), |core, result, _| {
            if let Err(e) = result {
                tracing::warn!(error = %e, "could not persist capsules; retrying");
                core.capsules_dirty = true;
            }
        });
    }

    /// A newer policy document from the pinned Home is in force: hold the capsules it carries,
    /// persist both (capsules first: a crash in between leaves the older document, which the
    /// next sync replaces), then say what changed.
    pub(super) fn on_policy(&mut self, applied: Applied, now: u64) {
        let Some(doc) = self.protocol.policy().current().map(|c| c.doc.clone()) else { return };
        if applied.pinned {
            tracing::info!(home = %applied.home, "admitted: pinned the Home's key on first admission");
        }
        let mut next = (*self.capsules).clone();
        let capsules = home_capsules(&doc, &self.trust, now);
        let (adopted, removed) = next.apply_home(capsules, doc.policy_epoch, now);
        if next != *self.capsules {
            self.capsules = Arc::new(next);
            self.snapshot_dirty = true;
            self.write_capsules(now);
        }
        let stored = self.protocol.policy().stored();
        self.persist(Write::Policy(stored), |_, result, _| {
            if let Err(e) = result {
                tracing::error!(error = %e, "could not persist the policy document; a restart will sync it again");
            }
        });
        self.publish_snapshot();
        let admitted = doc.roster.get(&self.id).is_some_and(|k| *k == self.public_b64);
        self.emit(Event::PolicyApplied(events::PolicyApplied {
            policy_epoch: applied.epoch,
            home: applied.home.to_string(),
            pinned: applied.pinned,
            admitted,
            capsules: doc.capsules.len(),
        }));
        let context = Map::from_iter([("policy_epoch".to_owned(), json!(applied.epoch))]);
        for adoption in &adopted {
            let event = CapsuleApplied::new(&adoption.item, adoption.renewal, context.clone());
            self.emit(Event::CapsuleApplied(event));
        }
        for item in removed {
            self.emit(Event::CapsuleTeardown(CapsuleRemoved {
                item,
                removed_ms: now,
                removed_reason: Some(format!("not in the Home's policy epoch {}", applied.epoch)),
            }));
        }
    }

    /// No Home is trusted any more: the capsules it handed out go.
    pub(super) fn drop_home_capsules(&mut self, now: u64) {
        let mut next = (*self.capsules).clone();
        let (_, removed) = next.apply_home(Vec::new(), 0, now);
        if next == *self.capsules {
            return;
        }
        self.capsules = Arc::new(next);
        self.snapshot_dirty = true;
        self.write_capsules(now);
        for item in removed {
            self.emit(Event::CapsuleTeardown(CapsuleRemoved {
                item,
                removed_ms: now,
                removed_reason: Some("the Home that handed it out is no longer trusted".into()),
            }));
        }
    }

    /// At start: the capsules of the document in force, as that document says (repairs a crash
    /// between writing the capsules and the document).
    pub(super) fn reapply_home_capsules(&mut self, now: u64) {
        let policy = self.protocol.policy();
        if policy.pin().is_none_or(|p| p.source == PinSource::Own) {
            return;
        }
        let Some(doc) = policy.current().map(|c| c.doc.clone()) else { return };
        let mut next = (*self.capsules).clone();
        next.apply_home(home_capsules(&doc, &self.trust, now), doc.policy_epoch, now);
        if next != *self.capsules {
            self.capsules = Arc::new(next);
            self.capsules_dirty = true;
        }
    }

    /// The role changed: a new Home signs its first document; a former Home stops obeying
    /// itself.
    pub(super) fn on_role_change(&mut self, now: u64) {
        if self.is_home() {
            return self.want_policy("became the Home", now);
        }
        if self.protocol.policy_mut().step_down() {
            let changes = self.protocol.apply_roster();
            self.apply_changes(changes, now);
            let stored = self.protocol.policy().stored();
            self.persist(Write::Policy(stored), |_, result, _| {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "could not persist stepping down as the Home");
                }
            });
            self.snapshot_dirty = true;
        }
    }

    /// Asks for a new document (at the Home): signed now, or by the tick once
    /// [`POLICY_EVERY_MS`] has passed since the last one, so bursts of changes share one epoch.
    pub(super) fn want_policy(&mut self, reason: &str, now: u64) {
        if !self.is_home() {
            return;
        }
        if self.policy_due(now) {
            self.issue_policy(reason, now);
        } else if self.policy_pending.is_none() {
            self.policy_pending = Some(reason.to_owned());
        }
    }

    fn policy_due(&self, now: u64) -> bool {
        self.last_policy_ms.is_none_or(|t| now.saturating_sub(t) >= POLICY_EVERY_MS)
    }

    /// Signs, persists, puts in force and sends the document the Home's state calls for, unless
    /// the one in force already says it (under this node's current id).
    fn issue_policy(&mut self, reason: &str, now: u64) {
        let own = self.key.verifying_key().to_bytes();
        if !self.is_home() {
            return;
        }
        if !self.protocol.policy().may_issue(own) {
            tracing::warn!(
                "this node is root, but [cluster] home_key names another Home: it signs no policy"
            );
            return;
        }
        let content = self.wanted_policy(&self.capsules, &self.governor);
        let policy = self.protocol.policy();
        if policy.pin().is_some_and(|p| p.source == PinSource::Own)
            && policy.current().is_some_and(|c| content.matches(&c.doc) && c.doc.id == self.id)
        {
            return;
        }
        let (doc, envelope) = self.protocol.sign_policy(content, now);
        if !fits(&envelope) {
            tracing::error!(
                bytes = envelope.len(),
                "the policy document exceeds the envelope limit; not issued"
            );
            return;
        }
        // Nobody sees an epoch before it is on disk: a restarted Home never signs one twice.
        self.last_policy_ms = Some(now);
        let stored = PolicyState::stored_if_issued(own, &envelope);
        let reason = reason.to_owned();
        self.persist(Write::Policy(stored), move |core, result, now| {
            if let Err(e) = result {
                tracing::error!(error = %e, "could not persist the policy document; not issued");
                core.policy_pending = Some(reason);
                return;
            }
            let event = Event::PolicyIssued(events::PolicyIssued {
                policy_epoch: doc.policy_epoch,
                reason: reason.clone(),
                admitted: doc.roster.keys().map(|k| k.to_string()).collect(),
                capsules: doc.capsules.len(),
            });
            tracing::info!(epoch = doc.policy_epoch, reason, "policy document issued");
            let changes = core.protocol.issued(doc, envelope.clone());
            if core.bus.is_some() {
                core.out.push(Effect::Publish(envelope));
            }
            core.emit(event);
            core.snapshot_dirty = true;
            core.apply_changes(changes, now);
        });
    }

    /// What a document should carry with `capsules` held: the roster, the capsules handed out
    /// (see [`CapsuleSet::handed_out`]), and this node's governor settings as the routing hints.
    fn wanted_policy(&self, capsules: &CapsuleSet, governor: &Governor) -> PolicyContent {
        let sent = self.protocol.policy().current().map_or(&[][..], |c| &c.doc.capsules[..]);
        PolicyContent {
            roster: self.roster.admitted.clone(),
            capsules: capsules.handed_out(sent),
            routing: governor.clone(),
        }
    }

    /// Whether a document carrying `capsules` and `governor` stays within what nodes accept.
    pub(super) fn policy_fits(&self, capsules: &CapsuleSet, governor: &Governor, now: u64) -> bool {
        fits(&self.protocol.sign_policy(self.wanted_policy(capsules, governor), now).1)
    }

    /// The policy as readers see it.
    pub(super) fn policy_view(&self) -> PolicyView {
        let policy = self.protocol.policy();
        let doc = policy.current().map(|c| &c.doc);
        PolicyView {
            home_key: policy.pin().map(|p| B64.encode(p.key)),
            pinned_by: policy.pin().map(|p| p.source),
            home_id: doc.map(|d| d.id.to_string()),
            policy_epoch: policy.epoch(),
            issued_ms: doc.map(|d| d.issued_ms),
            admitted: doc
                .map(|d| d.roster.keys().map(|k| k.to_string()).collect())
                .unwrap_or_default(),
            capsules: doc.map_or(0, |d| d.capsules.len()),
            routing: doc.map(|d| d.routing.clone()).filter(|r| !r.is_empty()),
            pending_homes: policy
                .claims()
                .iter()
                .map(|c| PendingHome {
                    home_id: c.current.doc.id.to_string(),
                    home_key: B64.encode(c.key),
                    fingerprint: crate::policy::fingerprint(&c.key),
                    policy_epoch: c.current.doc.policy_epoch,
                })
                .collect(),
            takes_work: self.takes_work(),
        }
    }

    /// See [`PolicyView::takes_work`].
    fn takes_work(&self) -> bool {
        let policy = self.protocol.policy();
        let admitted =
            policy.current().is_some_and(|c| c.doc.roster.get(&self.id) == Some(&self.public_b64));
        let home_known = policy.pin().is_some()
            || self.protocol.membership().members().values().any(|m| {
                m.record.advert.role == Role::Root
                    && m.record.health != crate::cluster::Health::Left
            });
        let signs = self.is_home() && policy.may_issue(self.key.verifying_key().to_bytes());
        signs || admitted || !home_known
    }
}

/// Whether a signed document stays within the limits receivers apply (its payload, shorter
/// than the envelope, within the policy payload limit).
fn fits(envelope: &[u8]) -> bool {
    envelope.len() <= wire::MAX_POLICY_PAYLOAD
}

/// The capsules a document carries, with their leases: only those that verify against this
/// node's own trust store, like any capsule presented to it (the Home's signature on the
/// document says who sent them, not that their issuer is trusted here).
fn home_capsules(doc: &PolicyDoc, trust: &TrustStore, now: u64) -> Vec<(Capsule, Option<u64>)> {
    doc.capsules
        .iter()
        .filter_map(|entry| {
            let capsule = Capsule::from_json(entry.capsule.clone())
                .and_then(|c| trust.verify(&c, now).map(|()| c));
            match capsule {
                Ok(capsule) => Some((capsule, entry.lease_until_ms)),
                Err(e) => {
                    tracing::warn!(error = %e, "the Home's policy carries a capsule this node does not accept; skipped");
                    None
                }
            }
        })
        .collect()
}

fn expired_event(adopted: &Adopted, now: u64) -> Event {
    let c = &adopted.capsule.fields;
    Event::CapsuleExpired(events::CapsuleExpired {
        id: c.id.clone(),
        version: c.version.clone(),
        issuer: c.issuer.clone(),
        expired_ms: now,
        applied_ms: adopted.applied_ms,
        lease_until_ms: adopted.lease_until_ms,
    })
}
