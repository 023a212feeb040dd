//! The Home's authority inside the actor: capsules adopted here (with their leases), the trust
//! store they are checked against, the policy documents the Home signs and the ones a worker
//! applies. State changes are persisted before they take effect or are announced.

use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::{Actor, json_of};
use crate::{
    capsule::{
        Adopted, Adoption, Capsule, CapsuleItem, CapsuleSet, IssuerInfo, Teardown, TrustStore,
    },
    node::{CapsuleRequest, NodeError, PolicyView, TeardownRequest},
    persist,
    policy::{Applied, PinSource, PolicyCapsule},
    role::Role,
    time::now_ms,
};

pub(super) const CAPSULES_FILE: &str = "capsules.json";
pub(super) const POLICY_FILE: &str = "policy.json";

impl Actor {
    /// Verifies `request.capsule` against the trust store and adopts it; the lease starts now.
    pub(super) async fn adopt_capsule(
        &mut self,
        request: CapsuleRequest,
    ) -> Result<Adoption, NodeError> {
        let now = now_ms();
        self.trust.verify(&request.capsule, now)?;
        let propagates = request.capsule.fields.propagates();
        let mut next = (*self.capsules).clone();
        let adoption = next.adopt(request.capsule, now);
        self.commit_capsules(next).await?;
        if adoption.notify {
            self.emit("policy.capsule.applied", applied_payload(&adoption, &request.context)).await;
        }
        if propagates {
            self.refresh_policy("capsule adopted").await;
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
        self.refresh_policy("capsule removed").await;
        Ok(out)
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

    /// Drops capsules whose lease ended, and says so.
    pub(super) async fn sweep_capsules(&mut self) {
        let now = now_ms();
        if !self.capsules.held().any(|a| a.lease_until_ms.is_some_and(|u| u <= now)) {
            return;
        }
        let mut next = (*self.capsules).clone();
        let expired = next.sweep(now);
        if let Err(e) = self.commit_capsules(next).await {
            tracing::warn!(error = %e, "could not persist capsules after lease expiry");
        }
        for adopted in &expired {
            self.emit("policy.capsule.expired", expired_payload(adopted, now)).await;
        }
        if expired.iter().any(|a| a.capsule.fields.propagates()) {
            self.refresh_policy("capsule expired").await;
        }
    }

    /// A newer policy document from the pinned Home is in force: persist it, then hold the
    /// capsules it carries.
    pub(super) async fn on_policy(&mut self, applied: Applied) {
        self.snapshot_dirty = true;
        let stored = self.protocol.policy().stored();
        if let Err(e) = persist::save_json_off_thread(self.path(POLICY_FILE), stored).await {
            tracing::warn!(error = %e, "could not persist the policy document");
        }
        let Some(current) = self.protocol.policy().current() else { return };
        let doc = current.doc.clone();
        if applied.pinned {
            tracing::info!(home = %applied.home, "admitted: pinned the Home's key on first admission");
        }
        let mut capsules = Vec::new();
        for entry in &doc.capsules {
            match Capsule::from_json(entry.capsule.clone()) {
                Ok(capsule) => capsules.push((capsule, entry.lease_until_ms)),
                Err(e) => {
                    tracing::warn!(error = %e, "the Home's policy carries a capsule that does not parse; skipped")
                }
            }
        }
        let now = now_ms();
        let mut next = (*self.capsules).clone();
        let (adopted, removed) = next.apply_home(capsules, doc.policy_epoch, now);
        if let Err(e) = self.commit_capsules(next).await {
            tracing::warn!(error = %e, "could not persist the Home's capsules");
        }
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
        self.publish_snapshot();
    }

    /// At the Home: signs a new policy document when the roster or the capsules it hands out
    /// changed (or none was signed yet), persists it, puts it in force and sends it.
    pub(super) async fn refresh_policy(&mut self, reason: &str) {
        if self.hierarchy.role != Role::Root {
            return;
        }
        let roster = self.roster.admitted.clone();
        let capsules: Vec<PolicyCapsule> = self
            .capsules
            .held()
            .filter(|a| a.capsule.fields.propagates() && a.source == crate::capsule::Source::Local)
            .map(|a| PolicyCapsule {
                capsule: a.capsule.json.clone(),
                lease_until_ms: a.lease_until_ms,
            })
            .collect();
        let policy = self.protocol.policy();
        let own = policy.pin().is_some_and(|p| p.source == PinSource::Own);
        if own
            && let Some(current) = policy.current()
            && current.doc.roster == roster
            && current.doc.capsules == capsules
        {
            return;
        }
        let (envelope, changes) = self.protocol.issue_policy(roster, capsules, now_ms());
        if envelope.len() > crate::wire::MAX_ENVELOPE {
            tracing::error!(
                bytes = envelope.len(),
                "the policy document exceeds the envelope limit; nodes will refuse it (hand out fewer capsules)"
            );
        }
        // Nobody sees an epoch before it is on disk: a restarted Home never signs one twice.
        let stored = self.protocol.policy().stored();
        if let Err(e) = persist::save_json_off_thread(self.path(POLICY_FILE), stored).await {
            tracing::error!(error = %e, "could not persist the policy document; not sent");
            return;
        }
        let doc = &self.protocol.policy().current().map(|c| c.doc.clone());
        if let Some(doc) = doc {
            tracing::info!(epoch = doc.policy_epoch, reason, "policy document issued");
            let payload = json!({
                "policy_epoch": doc.policy_epoch, "reason": reason,
                "admitted": doc.roster.keys().collect::<Vec<_>>(), "capsules": doc.capsules.len(),
            });
            self.emit("cluster.policy.issued", payload).await;
        }
        if let Some(transport) = &mut self.transport {
            transport.publish(envelope).await;
        }
        self.snapshot_dirty = true;
        self.apply_changes(changes).await;
    }

    /// Persists a new capsule set, then makes it current.
    async fn commit_capsules(&mut self, next: CapsuleSet) -> Result<(), NodeError> {
        persist::save_json_off_thread(self.path(CAPSULES_FILE), next.stored())
            .await
            .map_err(|e| NodeError::Persist(e.to_string()))?;
        self.capsules = Arc::new(next);
        self.snapshot_dirty = true;
        Ok(())
    }

    /// The policy as readers see it.
    pub(super) fn policy_view(&self) -> PolicyView {
        let policy = self.protocol.policy();
        let doc = policy.current().map(|c| &c.doc);
        PolicyView {
            home_key: policy
                .pin()
                .map(|p| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, p.key)),
            pinned_by: policy.pin().map(|p| p.source),
            home_id: doc.map(|d| d.id.to_string()),
            policy_epoch: policy.epoch(),
            issued_ms: doc.map(|d| d.issued_ms),
            admitted: doc
                .map(|d| d.roster.keys().map(|k| k.to_string()).collect())
                .unwrap_or_default(),
            capsules: doc.map_or(0, |d| d.capsules.len()),
        }
    }
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
