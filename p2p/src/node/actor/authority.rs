//! The Home's authority inside the actor: capsules held here (with their leases), the trust
//! store they are checked against, the policy documents the Home signs and the ones a worker
//! applies. A document is on disk before it is in force or sent.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::{Map, Value, json};

use super::{Actor, json_of};
use crate::{
    capsule::{
        Adopted, Adoption, Capsule, CapsuleItem, CapsuleSet, IssuerInfo, Teardown, TrustStore,
    },
    governor::{Governor, Hints},
    node::{CapsuleRequest, NodeError, PolicyView, TeardownRequest},
    persist,
    policy::{Applied, PinSource, PolicyContent, PolicyDoc, PolicyState},
    role::Role,
    time::now_ms,
    wire,
};

pub(super) const CAPSULES_FILE: &str = "capsules.json";
pub(super) const POLICY_FILE: &str = "policy.json";
pub(super) const GOVERNOR_FILE: &str = "governor.json";
/// The Home signs at most one document this often; changes in between are issued together.
const POLICY_EVERY: Duration = Duration::from_secs(2);

impl Actor {
    /// Verifies `request.capsule` against the trust store and adopts it; the lease starts now.
    pub(super) async fn adopt_capsule(
        &mut self,
        request: CapsuleRequest,
    ) -> Result<Adoption, NodeError> {
        let now = now_ms();
        self.trust.verify(&request.capsule, now)?;
        let id = request.capsule.fields.id.clone();
        if !self.capsules.has_room_for(&id) {
            return Err(NodeError::CapsuleLimit(crate::capsule::MAX_HELD));
        }
        let mut next = (*self.capsules).clone();
        let adoption = next.adopt(request.capsule, now, request.shared);
        let handed_out = self.is_home() && self.hands_out(&next, &id);
        if handed_out && !self.policy_fits(&next, &self.governor) {
            return Err(NodeError::PolicyTooLarge);
        }
        if adoption.notify {
            self.commit_capsules(next).await?;
            self.emit("policy.capsule.applied", applied_payload(&adoption, &request.context)).await;
        } else {
            // The same capsule again within seconds: a renewal worth keeping, not an fsync.
            self.capsules = Arc::new(next);
            self.capsules_dirty = true;
            self.snapshot_dirty = true;
        }
        if handed_out {
            self.want_policy("capsule adopted").await;
        }
        Ok(adoption)
    }

    /// Removes capsules (or, on a dry run, says which would go).
    pub(super) async fn teardown_capsules(
        &mut self,
        request: TeardownRequest,
    ) -> Result<Teardown, NodeError> {
        let now = now_ms();
        let mut next = (*self.capsules).clone();
        let out = next.teardown(&request.ids, request.all, request.dry_run, now);
        if request.dry_run || out.removed.is_empty() {
            return Ok(out);
        }
        self.commit_capsules(next).await?;
        for item in &out.removed {
            let mut payload = json_of(item);
            payload["removed_ms"] = json!(now);
            if let Some(reason) = &request.reason {
                payload["removed_reason"] = json!(reason);
            }
            self.emit("policy.capsule.teardown", payload).await;
        }
        self.want_policy("capsule removed").await;
        Ok(out)
    }

    /// Sets the governor profile (`POST /admin/governor/profile`).
    pub(super) async fn set_profile(&mut self, name: String) -> Result<(), NodeError> {
        let mut next = (*self.governor).clone();
        next.profile = Some(name.clone());
        self.commit_governor(next).await?;
        self.emit("governor.changed", json!({ "profile": name })).await;
        self.governor_changed("governor profile").await;
        Ok(())
    }

    /// Merges hints (`POST /admin/governor/hints`).
    pub(super) async fn set_hints(&mut self, hints: Hints) -> Result<(), NodeError> {
        let mut next = (*self.governor).clone();
        next.hints = next.hints.overlaid(&hints);
        self.commit_governor(next).await?;
        let payload = json!({ "action": "governor.hints", "params": hints, "ok": true });
        self.emit("governor.changed", payload).await;
        self.governor_changed("governor hints").await;
        Ok(())
    }

    /// A governor change re-advertises, and at the Home becomes the workspace's routing hints.
    async fn governor_changed(&mut self, reason: &str) {
        self.advertise("governor").await;
        self.want_policy(reason).await;
    }

    async fn commit_governor(&mut self, next: Governor) -> Result<(), NodeError> {
        // At the Home these settings travel in every policy document: they must still fit.
        if self.is_home() && !self.policy_fits(&self.capsules, &next) {
            return Err(NodeError::PolicyTooLarge);
        }
        persist::save_json_off_thread(self.path(GOVERNOR_FILE), next.clone())
            .await
            .map_err(|e| NodeError::Persist(e.to_string()))?;
        self.governor = Arc::new(next);
        self.snapshot_dirty = true;
        Ok(())
    }

    /// Reads the trust store file again; on error the previous store stays in force.
    pub(super) async fn reload_trust(&mut self) -> Result<Vec<IssuerInfo>, NodeError> {
        let Some(path) = self.config.capsule_trust.clone() else {
            return Ok(Vec::new());
        };
        let store = tokio::task::spawn_blocking(move || TrustStore::load(&path))
            .await
            .map_err(|e| NodeError::Trust(e.to_string()))?
            .map_err(NodeError::Trust)?;
        if store.is_empty() {
            tracing::warn!(
                "the capsule trust store lists no issuer: every capsule will be refused"
            );
        }
        self.trust = Arc::new(store);
        self.snapshot_dirty = true;
        Ok(self.trust.issuers())
    }

    /// Every tick: drops capsules whose lease ended (and says so), writes renewals kept in
    /// memory, and signs the policy document a change asked for once [`POLICY_EVERY`] allows.
    pub(super) async fn authority_tick(&mut self) {
        let now = now_ms();
        if self.capsules.held().any(|a| a.lease_until_ms.is_some_and(|u| u <= now)) {
            let mut next = (*self.capsules).clone();
            let expired = next.sweep(now);
            // Gone from memory whatever the disk says, so each expiry is announced once.
            self.capsules = Arc::new(next);
            self.capsules_dirty = true;
            // Readers see the capsule gone as soon as the events say so.
            self.publish_snapshot();
            for adopted in &expired {
                self.emit("policy.capsule.expired", expired_payload(adopted, now)).await;
            }
            if expired.iter().any(Adopted::handed_out) {
                self.want_policy("capsule expired").await;
            }
        }
        if self.capsules_dirty {
            let stored = self.capsules.stored();
            match persist::save_json_off_thread(self.path(CAPSULES_FILE), stored).await {
                Ok(()) => self.capsules_dirty = false,
                Err(e) => tracing::warn!(error = %e, "could not persist capsules; retrying"),
            }
        }
        if self.policy_pending.is_some()
            && self.last_policy.is_none_or(|t| t.elapsed() >= POLICY_EVERY)
        {
            let reason = self.policy_pending.take().unwrap_or_default();
            self.issue_policy(&reason).await;
        }
    }

    /// A newer policy document from the pinned Home is in force: hold the capsules it carries,
    /// persist both (capsules first: a crash in between leaves the older document, which the
    /// next sync replaces), then say what changed.
    pub(super) async fn on_policy(&mut self, applied: Applied) {
        let Some(doc) = self.protocol.policy().current().map(|c| c.doc.clone()) else { return };
        if applied.pinned {
            tracing::info!(home = %applied.home, "admitted: pinned the Home's key on first admission");
        }
        let now = now_ms();
        let mut next = (*self.capsules).clone();
        let (adopted, removed) = next.apply_home(home_capsules(&doc), doc.policy_epoch, now);
        if next != *self.capsules {
            self.capsules = Arc::new(next);
            self.snapshot_dirty = true;
            let stored = self.capsules.stored();
            if let Err(e) = persist::save_json_off_thread(self.path(CAPSULES_FILE), stored).await {
                self.capsules_dirty = true;
                tracing::warn!(error = %e, "could not persist the Home's capsules; retrying");
            }
        }
        let stored = self.protocol.policy().stored();
        if let Err(e) = persist::save_json_off_thread(self.path(POLICY_FILE), stored).await {
            tracing::error!(error = %e, "could not persist the policy document; a restart will sync it again");
        }
        self.publish_snapshot();
        let admitted = doc.roster.get(&self.id).is_some_and(|k| *k == self.config.key.public_b64());
        let payload = json!({
            "policy_epoch": applied.epoch, "home": applied.home, "pinned": applied.pinned,
            "admitted": admitted, "capsules": doc.capsules.len(),
        });
        self.emit("cluster.policy.applied", payload).await;
        let context = Map::from_iter([("policy_epoch".to_owned(), json!(applied.epoch))]);
        for adoption in &adopted {
            self.emit("policy.capsule.applied", applied_payload(adoption, &context)).await;
        }
        for item in removed {
            let mut payload = json_of(&item);
            payload["removed_ms"] = json!(now);
            payload["removed_reason"] =
                json!(format!("not in the Home's policy epoch {}", applied.epoch));
            self.emit("policy.capsule.teardown", payload).await;
        }
    }

    /// At start: the capsules of the document in force, as that document says (repairs a crash
    /// between writing the capsules and the document).
    pub(super) fn reapply_home_capsules(&mut self) {
        let policy = self.protocol.policy();
        if policy.pin().is_none_or(|p| p.source == PinSource::Own) {
            return;
        }
        let Some(doc) = policy.current().map(|c| c.doc.clone()) else { return };
        let mut next = (*self.capsules).clone();
        next.apply_home(home_capsules(&doc), doc.policy_epoch, now_ms());
        if next != *self.capsules {
            self.capsules = Arc::new(next);
            self.capsules_dirty = true;
        }
    }

    /// The role changed: a new Home signs its first document; a former Home stops obeying
    /// itself.
    pub(super) async fn on_role_change(&mut self) {
        if self.is_home() {
            self.want_policy("became the Home").await;
            return;
        }
        if self.protocol.policy_mut().step_down() {
            let _ = self.protocol.apply_roster();
            let stored = self.protocol.policy().stored();
            if let Err(e) = persist::save_json_off_thread(self.path(POLICY_FILE), stored).await {
                tracing::warn!(error = %e, "could not persist stepping down as the Home");
            }
            self.snapshot_dirty = true;
        }
    }

    /// Asks for a new document (at the Home): signed now, or by the tick once
    /// [`POLICY_EVERY`] has passed since the last one, so bursts of changes share one epoch.
    pub(super) async fn want_policy(&mut self, reason: &str) {
        if !self.is_home() {
            return;
        }
        if self.last_policy.is_none_or(|t| t.elapsed() >= POLICY_EVERY) {
            self.issue_policy(reason).await;
        } else if self.policy_pending.is_none() {
            self.policy_pending = Some(reason.to_owned());
        }
    }

    /// Signs, persists, puts in force and sends the document the Home's state calls for, unless
    /// the one in force already says it.
    async fn issue_policy(&mut self, reason: &str) {
        let own = self.config.key.verifying_key().to_bytes();
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
            && policy.current().is_some_and(|c| content.matches(&c.doc))
        {
            return;
        }
        let (doc, envelope) = self.protocol.sign_policy(content, now_ms());
        if !fits(&envelope) {
            tracing::error!(
                bytes = envelope.len(),
                "the policy document exceeds the envelope limit; not issued"
            );
            return;
        }
        // Nobody sees an epoch before it is on disk: a restarted Home never signs one twice.
        let stored = PolicyState::stored_if_issued(own, &envelope);
        if let Err(e) = persist::save_json_off_thread(self.path(POLICY_FILE), stored).await {
            tracing::error!(error = %e, "could not persist the policy document; not issued");
            self.policy_pending = Some(reason.to_owned());
            return;
        }
        self.last_policy = Some(Instant::now());
        let payload = json!({
            "policy_epoch": doc.policy_epoch, "reason": reason,
            "admitted": doc.roster.keys().collect::<Vec<_>>(), "capsules": doc.capsules.len(),
        });
        tracing::info!(epoch = doc.policy_epoch, reason, "policy document issued");
        let changes = self.protocol.issued(doc, envelope.clone());
        if let Some(transport) = &mut self.transport {
            transport.publish(envelope).await;
        }
        self.emit("cluster.policy.issued", payload).await;
        self.snapshot_dirty = true;
        self.apply_changes(changes).await;
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

    /// Whether a document carrying `capsules` stays within what nodes accept.
    fn policy_fits(&self, capsules: &CapsuleSet, governor: &Governor) -> bool {
        fits(&self.protocol.sign_policy(self.wanted_policy(capsules, governor), now_ms()).1)
    }

    /// Whether capsule `id` in `capsules` goes out in the Home's documents.
    fn hands_out(&self, capsules: &CapsuleSet, id: &str) -> bool {
        capsules.held().any(|a| a.capsule.fields.id == id && a.handed_out())
    }

    fn is_home(&self) -> bool {
        self.hierarchy.role == Role::Root
    }

    /// Persists a new capsule set, then makes it current.
    async fn commit_capsules(&mut self, next: CapsuleSet) -> Result<(), NodeError> {
        persist::save_json_off_thread(self.path(CAPSULES_FILE), next.stored())
            .await
            .map_err(|e| NodeError::Persist(e.to_string()))?;
        self.capsules = Arc::new(next);
        self.capsules_dirty = false;
        self.snapshot_dirty = true;
        Ok(())
    }

    /// The policy as readers see it.
    pub(super) fn policy_view(&self) -> PolicyView {
        use base64::{Engine, engine::general_purpose::STANDARD as B64};
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
            takes_work: self.takes_work(),
        }
    }

    /// See [`PolicyView::takes_work`].
    fn takes_work(&self) -> bool {
        let policy = self.protocol.policy();
        let own = self.config.key.public_b64();
        let admitted = policy.current().is_some_and(|c| c.doc.roster.get(&self.id) == Some(&own));
        let home_known = policy.pin().is_some()
            || self.protocol.membership().members().values().any(|m| {
                m.record.advert.role == Role::Root
                    && m.record.health != crate::cluster::Health::Left
            });
        let signs = self.is_home()
            && self.protocol.policy().may_issue(self.config.key.verifying_key().to_bytes());
        signs || admitted || !home_known
    }
}

/// Whether a signed document stays within the limits receivers apply (its payload, shorter
/// than the envelope, within the policy payload limit).
fn fits(envelope: &[u8]) -> bool {
    envelope.len() <= wire::MAX_POLICY_PAYLOAD
}

/// The capsules a document carries, with their leases (any that do not parse are skipped).
fn home_capsules(doc: &PolicyDoc) -> Vec<(Capsule, Option<u64>)> {
    doc.capsules
        .iter()
        .filter_map(|entry| match Capsule::from_json(entry.capsule.clone()) {
            Ok(capsule) => Some((capsule, entry.lease_until_ms)),
            Err(e) => {
                tracing::warn!(error = %e, "the Home's policy carries a capsule that does not parse; skipped");
                None
            }
        })
        .collect()
}

fn applied_payload(adoption: &Adoption, context: &Map<String, Value>) -> Value {
    let item: &CapsuleItem = &adoption.item;
    let mut payload = json!({
        "id": item.id, "version": item.version, "issuer": item.issuer, "applied_ms": item.applied_ms,
        "hop_ttl": item.hop_ttl, "denies": item.denies, "contracts": item.contracts,
        "lease_until_ms": item.lease_until_ms, "renew_within_ms": item.renew_within_ms,
        "source": item.source,
    });
    if adoption.renewal {
        payload["renewal"] = json!(true);
    }
    if let Value::Object(map) = &mut payload {
        map.extend(context.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    payload
}

fn expired_payload(adopted: &Adopted, now: u64) -> Value {
    let c = &adopted.capsule.fields;
    json!({
        "id": c.id, "version": c.version, "issuer": c.issuer, "expired_ms": now,
        "applied_ms": adopted.applied_ms, "lease_until_ms": adopted.lease_until_ms,
    })
}
