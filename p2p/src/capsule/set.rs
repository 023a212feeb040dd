//! The capsules a node holds, with their leases. A lease renews only when the capsule is
//! presented again (or the Home sends it again); at `lease_until_ms` the capsule is removed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Capsule, Subject};
use crate::policy::doc::PolicyCapsule;
use crate::time::rfc3339_ms;

/// `applied` events for an unchanged capsule re-presented within this window are skipped.
const QUIET_RENEWAL_MS: u64 = 2_000;
/// A lease with this little left is `expiring`.
const EXPIRING_MS: u64 = 60_000;
/// At most this many capsules are held; adopting another id beyond it is refused.
pub const MAX_HELD: usize = 256;
/// Of those, how many may have come only in a request header, without the admin token: the
/// rest is the administrator's room.
pub const MAX_PRESENTED: usize = 192;
/// Presented capsules held per issuer.
pub const MAX_PRESENTED_PER_ISSUER: usize = 32;
/// A capsule presented without the admin token is refused once it is older than this (by its
/// `issued_at_ms`), and a torn-down id stays refused until then.
pub const MAX_PRESENTED_AGE_MS: u64 = 30 * 24 * 3_600_000;
/// Torn-down ids remembered.
const MAX_TORN: usize = 1_024;

/// Where a held capsule came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// Presented to this node (header or adopt).
    Local,
    /// Carried by the Home's policy document of this epoch.
    Home {
        /// The policy epoch.
        epoch: u64,
    },
}

/// A held capsule.
#[derive(Debug, Clone, PartialEq)]
pub struct Adopted {
    /// The capsule.
    pub capsule: Capsule,
    /// When it was (last) adopted, on this node's clock.
    pub applied_ms: u64,
    /// When the lease ends; `None`: no lease.
    pub lease_until_ms: Option<u64>,
    /// Where it came from.
    pub source: Source,
    /// Hops it may still travel.
    pub remaining_hops: Option<u32>,
    /// Adopted by an administrator (not only presented in a header): the Home hands such
    /// capsules to every node when they propagate.
    pub shared: bool,
    fingerprint: [u8; 32],
    last_event_ms: u64,
}

/// Persisted form (`capsules.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    capsule: Value,
    applied_ms: u64,
    lease_until_ms: Option<u64>,
    source: Source,
    remaining_hops: Option<u32>,
    #[serde(default)]
    shared: bool,
}

/// What an adoption did.
#[derive(Debug, Clone, PartialEq)]
pub struct Adoption {
    /// The capsule as held now.
    pub item: CapsuleItem,
    /// It replaced a held capsule with the same id.
    pub renewal: bool,
    /// Worth a `policy.capsule.applied` event (not an identical re-presentation within 2 s).
    pub notify: bool,
}

/// What a teardown removed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Teardown {
    /// Removed (or, on a dry run, would be).
    pub removed: Vec<CapsuleItem>,
    /// Requested ids not held.
    pub not_found: Vec<String>,
}

/// A held capsule as `/state/policy/capsules` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CapsuleItem {
    pub id: String,
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    pub applied_ms: u64,
    pub applied: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hop_ttl: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining_hops: Option<u32>,
    pub denies: usize,
    pub contracts: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_until_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_until: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renew_within_ms: Option<u64>,
    pub status: String,
    pub status_label: String,
    pub aria_hint: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expired_since_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renew_in_ms: Option<u64>,
    pub renew_window_started: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renew_window_start_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renew_window_start: Option<String>,
    /// `local` or `home`.
    pub source: String,
    /// For `home`: the policy epoch that carried it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_epoch: Option<u64>,
}

impl Adopted {
    fn new(capsule: Capsule, now: u64, lease_until_ms: Option<u64>, source: Source) -> Self {
        let remaining_hops = match source {
            Source::Local => capsule.fields.hop_ttl,
            Source::Home { .. } => capsule.fields.hop_ttl.map(|h| h.saturating_sub(1)),
        };
        let fingerprint = capsule.fingerprint();
        Self {
            capsule,
            applied_ms: now,
            lease_until_ms,
            source,
            remaining_hops,
            shared: false,
            fingerprint,
            last_event_ms: now,
        }
    }

    /// Whether the Home hands it to every node: held here (not from a Home), adopted by an
    /// administrator, and meant to travel.
    pub fn handed_out(&self) -> bool {
        self.source == Source::Local && self.shared && self.capsule.fields.propagates()
    }

    /// How `/state/policy/capsules` shows it at `now`.
    pub fn item(&self, now: u64) -> CapsuleItem {
        let c = &self.capsule.fields;
        let renew_start = self
            .lease_until_ms
            .zip(c.renew_within_ms)
            .map(|(until, within)| until.saturating_sub(within));
        let (status, label) = match self.lease_until_ms {
            None => ("unbounded", "No lease"),
            Some(until) if now >= until => ("expired", "Expired"),
            Some(until) if until - now <= EXPIRING_MS => ("expiring", "Expiring soon"),
            Some(_) if renew_start.is_some_and(|s| now >= s) => ("renew_due", "Renewal due"),
            Some(_) => ("active", "Active"),
        };
        let left = self.lease_until_ms.map(|u| u.saturating_sub(now));
        let aria_hint = match left {
            None => format!("Capsule {} is held with no lease", c.id),
            Some(0) => format!("Capsule {} has expired", c.id),
            Some(ms) => format!(
                "Capsule {} is {}; its lease ends in {} s",
                c.id,
                label.to_lowercase(),
                ms / 1000
            ),
        };
        CapsuleItem {
            id: c.id.clone(),
            version: c.version.clone(),
            issuer: c.issuer.clone(),
            applied_ms: self.applied_ms,
            applied: rfc3339_ms(self.applied_ms),
            hop_ttl: c.hop_ttl,
            remaining_hops: self.remaining_hops,
            denies: c.denies.len(),
            contracts: c.contracts.len(),
            lease_until_ms: self.lease_until_ms,
            lease_until: self.lease_until_ms.map(rfc3339_ms),
            renew_within_ms: c.renew_within_ms,
            status: status.to_owned(),
            status_label: label.to_owned(),
            aria_hint,
            expires_in_ms: left.filter(|l| *l > 0),
            expired_since_ms: self.lease_until_ms.filter(|u| now >= *u).map(|u| now - u),
            renew_in_ms: renew_start.map(|s| s.saturating_sub(now)).filter(|l| *l > 0),
            renew_window_started: renew_start.is_some_and(|s| now >= s),
            renew_window_start_ms: renew_start,
            renew_window_start: renew_start.map(rfc3339_ms),
            source: match self.source {
                Source::Local => "local".to_owned(),
                Source::Home { .. } => "home".to_owned(),
            },
            policy_epoch: match self.source {
                Source::Home { epoch } => Some(epoch),
                Source::Local => None,
            },
        }
    }
}

/// The capsules this node holds, by id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CapsuleSet {
    held: BTreeMap<String, Adopted>,
    /// Ids the administrator tore down, refused in headers until then (ms).
    torn: BTreeMap<String, u64>,
}

/// The persisted form with torn-down ids (an array alone: none, as earlier releases wrote).
#[derive(Debug, Serialize, Deserialize)]
struct StoredSet {
    held: Vec<Stored>,
    torn_down: BTreeMap<String, u64>,
}

impl CapsuleSet {
    /// Restores `capsules.json` (`null`: none), dropping what expired while the node was down.
    /// Entries that no longer parse as capsules are dropped and described; a file of another
    /// shape is an error (held denies are never silently lost).
    pub fn restore(stored: Value, now: u64) -> Result<(Self, Vec<String>), String> {
        let (stored, torn): (Vec<Stored>, BTreeMap<String, u64>) = match stored {
            Value::Null => (Vec::new(), BTreeMap::new()),
            Value::Array(_) => (
                serde_json::from_value(stored).map_err(|e| format!("capsules.json: {e}"))?,
                BTreeMap::new(),
            ),
            other => {
                let set: StoredSet =
                    serde_json::from_value(other).map_err(|e| format!("capsules.json: {e}"))?;
                (set.held, set.torn_down)
            }
        };
        let mut set = Self { held: BTreeMap::new(), torn };
        set.torn.retain(|_, until| *until > now);
        let mut dropped = Vec::new();
        for s in stored {
            if s.lease_until_ms.is_some_and(|u| u <= now) {
                continue;
            }
            match Capsule::from_json(s.capsule) {
                Ok(capsule) => {
                    let mut adopted =
                        Adopted::new(capsule, s.applied_ms, s.lease_until_ms, s.source);
                    adopted.remaining_hops = s.remaining_hops;
                    adopted.shared = s.shared;
                    set.held.insert(adopted.capsule.fields.id.clone(), adopted);
                }
                Err(e) => dropped.push(e.to_string()),
            }
        }
        Ok((set, dropped))
    }

    /// The persisted form.
    pub fn stored(&self) -> Value {
        let stored: Vec<Stored> = self
            .held
            .values()
            .map(|a| Stored {
                capsule: a.capsule.json.clone(),
                applied_ms: a.applied_ms,
                lease_until_ms: a.lease_until_ms,
                source: a.source,
                remaining_hops: a.remaining_hops,
                shared: a.shared,
            })
            .collect();
        if self.torn.is_empty() {
            return serde_json::to_value(stored).unwrap_or(Value::Null);
        }
        let set = StoredSet { held: stored, torn_down: self.torn.clone() };
        serde_json::to_value(set).unwrap_or(Value::Null)
    }

    /// Adopts a (verified) capsule presented to this node at `now`: the lease starts now.
    /// `shared`: an administrator adopted it (a header presentation keeps what an earlier
    /// adoption said).
    pub fn adopt(&mut self, capsule: Capsule, now: u64, shared: bool) -> Adoption {
        if shared {
            // The administrator's own adoption undoes their teardown.
            self.torn.remove(&capsule.fields.id);
        }
        let lease = capsule.fields.lease_duration_ms.map(|d| now.saturating_add(d));
        let mut adopted = Adopted::new(capsule, now, lease, Source::Local);
        let held = self.held.get(&adopted.capsule.fields.id);
        adopted.shared = shared || held.is_some_and(|h| h.source == Source::Local && h.shared);
        self.put(adopted, now)
    }

    /// The capsules a Home document carries (see [`Adopted::handed_out`]), each with its lease.
    /// A lease already `sent` in the document in force is kept until it has run half its
    /// course, so presenting a capsule again and again does not make the Home sign a document
    /// each time.
    pub fn handed_out(&self, sent: &[PolicyCapsule]) -> Vec<PolicyCapsule> {
        self.held
            .values()
            .filter(|a| a.handed_out())
            .map(|a| {
                let before = sent.iter().find(|c| c.capsule == a.capsule.json);
                let half = a.capsule.fields.lease_duration_ms.unwrap_or(0) / 2;
                let lease_until_ms = match (before.and_then(|c| c.lease_until_ms), a.lease_until_ms)
                {
                    (Some(sent), Some(now)) if sent.saturating_add(half) >= now => Some(sent),
                    (_, lease) => lease,
                };
                PolicyCapsule { capsule: a.capsule.json.clone(), lease_until_ms }
            })
            .collect()
    }

    /// Why `capsule`, presented in a request header without the admin token, may not be
    /// adopted at `now`: older than [`MAX_PRESENTED_AGE_MS`] (or undated), torn down by the
    /// administrator, or a new id beyond [`MAX_PRESENTED`] or [`MAX_PRESENTED_PER_ISSUER`].
    pub fn refuses_presented(&self, capsule: &Capsule, now: u64) -> Option<PresentedRefusal> {
        let f = &capsule.fields;
        if f.issued_at_ms == 0 || now.saturating_sub(f.issued_at_ms) > MAX_PRESENTED_AGE_MS {
            return Some(PresentedRefusal::TooOld);
        }
        if self.torn.get(&f.id).is_some_and(|until| *until > now) {
            return Some(PresentedRefusal::TornDown);
        }
        if self.held.contains_key(&f.id) {
            return None;
        }
        let presented: Vec<&Adopted> =
            self.held.values().filter(|a| a.source == Source::Local && !a.shared).collect();
        let same_issuer = presented.iter().filter(|a| a.capsule.fields.issuer == f.issuer).count();
        (presented.len() >= MAX_PRESENTED || same_issuer >= MAX_PRESENTED_PER_ISSUER)
            .then_some(PresentedRefusal::Full)
    }

    /// Whether another capsule with this id may be held (at most [`MAX_HELD`]).
    pub fn has_room_for(&self, id: &str) -> bool {
        self.held.contains_key(id) || self.held.len() < MAX_HELD
    }

    fn put(&mut self, mut adopted: Adopted, now: u64) -> Adoption {
        let previous = self.held.get(&adopted.capsule.fields.id);
        let renewal = previous.is_some();
        let quiet = previous.is_some_and(|p| {
            p.fingerprint == adopted.fingerprint
                && p.lease_until_ms.is_some() == adopted.lease_until_ms.is_some()
                && now.saturating_sub(p.last_event_ms) < QUIET_RENEWAL_MS
        });
        if quiet && let Some(p) = previous {
            adopted.last_event_ms = p.last_event_ms;
        }
        let item = adopted.item(now);
        self.held.insert(adopted.capsule.fields.id.clone(), adopted);
        Adoption { item, renewal, notify: !quiet }
    }

    /// Makes the Home's capsules of policy `epoch` the ones held from the Home: each with the
    /// lease the Home gave it. Returns what was adopted (or changed) and what was dropped.
    pub fn apply_home(
        &mut self,
        capsules: Vec<(Capsule, Option<u64>)>,
        epoch: u64,
        now: u64,
    ) -> (Vec<Adoption>, Vec<CapsuleItem>) {
        let incoming: BTreeMap<String, (Capsule, Option<u64>)> =
            capsules.into_iter().map(|(c, lease)| (c.fields.id.clone(), (c, lease))).collect();
        let gone: Vec<String> = self
            .held
            .iter()
            .filter(|(id, a)| {
                matches!(a.source, Source::Home { .. }) && !incoming.contains_key(*id)
            })
            .map(|(id, _)| id.clone())
            .collect();
        let removed =
            gone.iter().filter_map(|id| self.held.remove(id)).map(|a| a.item(now)).collect();
        let mut adopted = Vec::new();
        for (id, (capsule, lease)) in incoming {
            let same = self.held.get(&id).is_some_and(|held| {
                held.fingerprint == capsule.fingerprint() && held.lease_until_ms == lease
            });
            if same {
                if let Some(held) = self.held.get_mut(&id) {
                    held.source = Source::Home { epoch };
                }
                continue;
            }
            adopted.push(self.put(Adopted::new(capsule, now, lease, Source::Home { epoch }), now));
        }
        (adopted, removed)
    }

    /// Removes `ids` (or everything with `all`); with `dry_run` only says what would go.
    pub fn teardown(&mut self, ids: &[String], all: bool, dry_run: bool, now: u64) -> Teardown {
        let targets: Vec<String> =
            if all { self.held.keys().cloned().collect() } else { ids.to_vec() };
        let mut out = Teardown::default();
        for id in targets {
            let found = if dry_run { self.held.get(&id).cloned() } else { self.held.remove(&id) };
            match found {
                Some(a) => {
                    if !dry_run && a.source == Source::Local {
                        // Presenting it again in a header must not undo the teardown.
                        let until =
                            a.capsule.fields.issued_at_ms.saturating_add(MAX_PRESENTED_AGE_MS);
                        self.torn.insert(id, until);
                    }
                    out.removed.push(a.item(now));
                }
                None => out.not_found.push(id),
            }
        }
        self.torn.retain(|_, until| *until > now);
        while self.torn.len() > MAX_TORN {
            let soonest = self.torn.iter().min_by_key(|(_, u)| **u).map(|(id, _)| id.clone());
            soonest.and_then(|id| self.torn.remove(&id));
        }
        out
    }

    /// Removes and returns the capsules whose lease ended by `now`.
    pub fn sweep(&mut self, now: u64) -> Vec<Adopted> {
        let expired: Vec<String> = self
            .held
            .iter()
            .filter(|(_, a)| a.lease_until_ms.is_some_and(|u| u <= now))
            .map(|(id, _)| id.clone())
            .collect();
        expired.iter().filter_map(|id| self.held.remove(id)).collect()
    }

    /// Every held capsule, newest `applied_ms` first.
    pub fn items(&self, now: u64) -> Vec<CapsuleItem> {
        let mut items: Vec<CapsuleItem> = self.held.values().map(|a| a.item(now)).collect();
        items.sort_by(|a, b| b.applied_ms.cmp(&a.applied_ms).then_with(|| a.id.cmp(&b.id)));
        items
    }

    /// Held capsules.
    pub fn held(&self) -> impl Iterator<Item = &Adopted> {
        self.held.values()
    }

    /// The first held capsule denying `key` to `subject` at `now` (`pattern*` is a prefix
    /// match): its `denies`, then the patterns of its contracts that apply (see
    /// [`super::Contract::applies`]). Returns `(capsule id, pattern)`.
    pub fn denying(&self, key: &str, subject: &Subject<'_>, now: u64) -> Option<(&str, &str)> {
        self.held.values().find_map(|a| {
            let f = &a.capsule.fields;
            let contracts = f.contracts.iter().filter(|c| c.applies(subject, now));
            let patterns = f.denies.iter().chain(contracts.flat_map(|c| &c.patterns));
            patterns.filter(|p| pattern_matches(p, key)).map(|p| (f.id.as_str(), p.as_str())).next()
        })
    }

    /// Number held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Nothing held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// Why a capsule presented without the admin token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresentedRefusal {
    /// Undated, or older than [`MAX_PRESENTED_AGE_MS`].
    TooOld,
    /// The administrator tore this id down.
    TornDown,
    /// No room for another presented capsule (of this issuer).
    Full,
}

/// `net:*` matches every key starting with `net:`; anything else matches itself.
pub fn pattern_matches(pattern: &str, key: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => key.starts_with(prefix),
        None => pattern == key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn capsule(id: &str, lease: Option<u64>, renew: Option<u64>) -> Capsule {
        let mut v = json!({"id":id,"version":"1","issued_at_ms":0,"denies":["net:*"],"hop_ttl":2});
        if let Some(l) = lease {
            v["lease_duration_ms"] = json!(l);
        }
        if let Some(r) = renew {
            v["renew_within_ms"] = json!(r);
        }
        Capsule::from_json(v).expect("capsule")
    }

    #[test]
    fn leases_run_out_unless_presented_again() {
        let mut set = CapsuleSet::default();
        let first = set.adopt(capsule("c", Some(600_000), Some(240_000)), 1_000, false);
        assert!(first.notify && !first.renewal);
        assert_eq!(first.item.status, "active");
        assert_eq!(set.items(400_000)[0].status, "renew_due");
        assert_eq!(set.items(560_000)[0].status, "expiring");
        let quiet = set.adopt(capsule("c", Some(600_000), Some(240_000)), 2_000, false);
        assert!(quiet.renewal && !quiet.notify, "identical re-presentation within 2 s");
        let renewed = set.adopt(capsule("c", Some(600_000), Some(240_000)), 500_000, false);
        assert!(renewed.notify);
        assert!(set.sweep(601_000).is_empty(), "the renewal moved the lease");
        assert_eq!(set.sweep(1_100_000).len(), 1);
        assert!(set.is_empty());
    }

    #[test]
    fn home_capsules_follow_the_latest_policy() {
        let mut set = CapsuleSet::default();
        set.adopt(capsule("local", None, None), 0, false);
        let (adopted, removed) =
            set.apply_home(vec![(capsule("h1", None, None), Some(9_000))], 1, 10);
        assert_eq!((adopted.len(), removed.len()), (1, 0));
        assert_eq!(adopted[0].item.remaining_hops, Some(1), "one hop spent");
        let (adopted, removed) =
            set.apply_home(vec![(capsule("h1", None, None), Some(9_000))], 2, 20);
        assert!(adopted.is_empty() && removed.is_empty(), "unchanged capsule: nothing to say");
        let (_, removed) = set.apply_home(Vec::new(), 3, 30);
        assert_eq!(removed.len(), 1);
        assert_eq!(set.items(40).iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["local"]);
        let tags = ["gpu".to_owned()];
        let me = Subject { role: crate::role::Role::Edge, node: "w1", tags: &tags };
        assert_eq!(set.denying("net:http", &me, 40), Some(("local", "net:*")));
        assert_eq!(set.denying("tools:x", &me, 40), None);
    }

    #[test]
    fn contracts_deny_only_their_subjects_while_active() {
        let contract = |extra: serde_json::Value| {
            let mut c = json!({"id":"c","patterns":["tools:*"]});
            if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
                c.extend(extra.clone());
            }
            let v = json!({"id":"k","version":"1","issued_at_ms":0,"contracts":[c]});
            let mut set = CapsuleSet::default();
            set.adopt(Capsule::from_json(v).expect("capsule"), 0, false);
            set
        };
        let tags = ["gpu".to_owned()];
        let me = Subject { role: crate::role::Role::Edge, node: "w1", tags: &tags };
        let denies = |set: &CapsuleSet, now| set.denying("tools:run", &me, now).is_some();
        assert!(denies(&contract(json!({})), 5));
        let aimed = json!({"subject_role":"worker","subject_node":"w1","tags_any":["gpu"]});
        assert!(denies(&contract(aimed), 5));
        assert!(!denies(&contract(json!({"subject_role":"root"})), 5));
        assert!(!denies(&contract(json!({"subject_node":"w2"})), 5));
        assert!(!denies(&contract(json!({"tags_any":["cpu"]})), 5));
        assert!(!denies(&contract(json!({"valid_from_ms":10})), 5));
        assert!(!denies(&contract(json!({"valid_to_ms":4})), 5));
        assert!(!denies(&contract(json!({"quota_limit":3})), 5), "a quota is a counted allow");
    }

    #[test]
    fn an_administrator_s_adoption_stays_shared_when_presented_again() {
        let mut set = CapsuleSet::default();
        set.adopt(capsule("c", None, None), 0, false);
        assert!(!set.held().any(|a| a.shared), "a header presentation alone is not shared");
        set.adopt(capsule("c", None, None), 10, true);
        set.adopt(capsule("c", None, None), 20, false);
        assert!(set.held().all(|a| a.shared));
        let (restored, _) = CapsuleSet::restore(set.stored(), 30).expect("restore");
        assert!(restored.held().all(|a| a.shared), "kept across restarts");
        assert!(CapsuleSet::restore(serde_json::json!({"not": "a list"}), 0).is_err());
        assert!(set.has_room_for("c") && set.has_room_for("d"));
    }

    #[test]
    fn the_home_re_sends_a_renewed_lease_only_at_half_life() {
        let mut json = capsule("t", Some(600_000), None).json;
        json["propagate"] = json!("all");
        let travel = Capsule::from_json(json).expect("capsule");
        let mut set = CapsuleSet::default();
        set.adopt(travel.clone(), 0, false);
        assert!(set.handed_out(&[]).is_empty(), "presented in a header only: stays here");
        set.adopt(travel.clone(), 0, true);
        let first = set.handed_out(&[]);
        assert_eq!(first[0].lease_until_ms, Some(600_000));
        set.adopt(travel.clone(), 1_000, false);
        assert_eq!(set.handed_out(&first), first, "renewed early: the document stays the same");
        set.adopt(travel, 300_001, false);
        assert_eq!(set.handed_out(&first)[0].lease_until_ms, Some(900_001), "past half-life");
    }

    #[test]
    fn restore_drops_expired_and_teardown_reports_missing_ids() {
        let mut set = CapsuleSet::default();
        set.adopt(capsule("short", Some(10), None), 0, false);
        set.adopt(capsule("long", Some(10_000), None), 0, false);
        let (mut restored, dropped) = CapsuleSet::restore(set.stored(), 100).expect("restore");
        assert!(dropped.is_empty());
        assert_eq!(restored.len(), 1);
        let dry = restored.teardown(&["long".into(), "nope".into()], false, true, 100);
        assert_eq!((dry.removed.len(), dry.not_found.clone()), (1, vec!["nope".to_owned()]));
        assert_eq!(restored.len(), 1, "dry run removes nothing");
        assert_eq!(restored.teardown(&[], true, false, 100).removed.len(), 1);
        assert!(restored.is_empty());
    }
}
