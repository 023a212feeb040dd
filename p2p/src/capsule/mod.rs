//! Gating capsules: signed policy envelopes that deny capabilities for a lease.
//!
//! A capsule travels as JSON (an `X-ARW-Capsule` header, raw or base64, an adopt request, or inside
//! the Home's policy document). It is verified against the issuer trust store over ONE canonical
//! form ([`canonical_bytes`]): the JSON as received, without its top-level `signature`, written
//! compactly with object keys sorted bytewise at every depth. Nothing absent is ever added.

mod set;

use std::{collections::BTreeMap, path::Path};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub use set::{
    Adopted, Adoption, CapsuleItem, CapsuleSet, MAX_HELD, MAX_PRESENTED, MAX_PRESENTED_AGE_MS,
    MAX_PRESENTED_PER_ISSUER, PresentedRefusal, Source, Teardown, pattern_matches,
};

/// A capsule may be dated at most this far ahead of the verifier's clock.
pub const MAX_FUTURE_MS: u64 = 5 * 60 * 1000;

/// The fields a capsule is judged by. Unknown fields are kept in the JSON (and signed), not here.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GatingCapsule {
    /// Capsule id; adopting the same id again replaces (renews) it.
    pub id: String,
    /// Version string.
    pub version: String,
    /// When the issuer signed it.
    pub issued_at_ms: u64,
    /// Trust-store issuer id.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Network-hop budget: each relay spends one; at 0 it is not forwarded.
    #[serde(default)]
    pub hop_ttl: Option<u32>,
    /// `none`, `children`, `peers` or `all`.
    #[serde(default)]
    pub propagate: Option<String>,
    /// Capability patterns denied while the capsule is held (`net:*` is a prefix match).
    #[serde(default)]
    pub denies: Vec<String>,
    /// Contracts (only their ids are interpreted here).
    #[serde(default)]
    pub contracts: Vec<Contract>,
    /// The lease an adoption grants.
    #[serde(default)]
    pub lease_duration_ms: Option<u64>,
    /// How long before the lease ends re-presenting the capsule is due.
    #[serde(default)]
    pub renew_within_ms: Option<u64>,
    /// Base64 signature over [`canonical_bytes`].
    #[serde(default)]
    pub signature: Option<String>,
}

/// A gating contract inside a capsule: while active, and for the nodes it names, it denies its
/// patterns.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Contract {
    /// Contract id.
    pub id: String,
    /// Patterns it governs.
    #[serde(default)]
    pub patterns: Vec<String>,
    /// Only nodes with this role (canonical or alias).
    #[serde(default)]
    pub subject_role: Option<String>,
    /// Only this node id.
    #[serde(default)]
    pub subject_node: Option<String>,
    /// Only nodes carrying one of these tags.
    #[serde(default)]
    pub tags_any: Vec<String>,
    /// Active from (0: always).
    #[serde(default)]
    pub valid_from_ms: u64,
    /// Active until (0: no end).
    #[serde(default)]
    pub valid_to_ms: u64,
    /// A quota turns the deny into a counted allow (not enforced here: such a contract does not deny).
    #[serde(default)]
    pub quota_limit: Option<u64>,
}

/// The node a gating decision is about.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// Its role.
    pub role: crate::role::Role,
    /// Its id.
    pub node: &'a str,
    /// Its tags.
    pub tags: &'a [String],
}

impl Contract {
    /// Whether it denies for `subject` at `now`.
    pub fn applies(&self, subject: &Subject<'_>, now: u64) -> bool {
        let active =
            self.valid_from_ms <= now && (self.valid_to_ms == 0 || now <= self.valid_to_ms);
        let role = self
            .subject_role
            .as_deref()
            .is_none_or(|r| r.parse::<crate::role::Role>().is_ok_and(|r| r == subject.role));
        let node = self.subject_node.as_deref().is_none_or(|n| n == subject.node);
        let tags =
            self.tags_any.is_empty() || self.tags_any.iter().any(|t| subject.tags.contains(t));
        active && role && node && tags && self.quota_limit.is_none()
    }
}

impl GatingCapsule {
    /// Whether the Home should hand it to other nodes.
    pub fn propagates(&self) -> bool {
        self.propagate.as_deref().is_some_and(|p| p != "none") && self.hop_ttl != Some(0)
    }
}

/// A capsule as received (its exact JSON) and the fields read from it.
#[derive(Debug, Clone, PartialEq)]
pub struct Capsule {
    /// The JSON as received, signature included.
    pub json: Value,
    /// What it says.
    pub fields: GatingCapsule,
}

impl Capsule {
    /// Reads a capsule from JSON. `Err` names what is wrong.
    pub fn from_json(json: Value) -> Result<Self, CapsuleError> {
        if !json.is_object() {
            return Err(CapsuleError::Invalid("a capsule is a JSON object".into()));
        }
        let fields = GatingCapsule::deserialize(&json)
            .map_err(|e| CapsuleError::Invalid(format!("not a capsule: {e}")))?;
        if fields.id.trim().is_empty() {
            return Err(CapsuleError::Invalid("capsule id is empty".into()));
        }
        Ok(Self { json, fields })
    }

    /// Decodes an `X-ARW-Capsule` header value: capsule JSON, or standard base64 of it.
    pub fn from_header(value: &str) -> Result<Self, CapsuleError> {
        let value = value.trim();
        let bytes = if value.starts_with('{') {
            value.as_bytes().to_vec()
        } else {
            B64.decode(value)
                .map_err(|_| CapsuleError::Invalid("neither JSON nor base64".into()))?
        };
        let json: Value = serde_json::from_slice(&bytes)
            .map_err(|e| CapsuleError::Invalid(format!("not JSON: {e}")))?;
        Self::from_json(json)
    }

    /// sha256 of the canonical form: the same capsule adopted twice has the same fingerprint.
    pub fn fingerprint(&self) -> [u8; 32] {
        Sha256::digest(canonical_bytes(&self.json)).into()
    }
}

/// Why a capsule was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapsuleError {
    /// Not a capsule at all (HTTP 400).
    #[error("invalid capsule: {0}")]
    Invalid(String),
    /// A capsule whose issuer, signature or dates do not hold (HTTP 403).
    #[error("capsule verification failed: {0}")]
    Verification(String),
}

/// The bytes a capsule signature covers: the JSON without its top-level `signature`, compact,
/// object keys sorted bytewise at every depth.
pub fn canonical_bytes(json: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    match json {
        Value::Object(map) => {
            let rest: serde_json::Map<String, Value> = map
                .iter()
                .filter(|(k, _)| *k != "signature")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            write_canonical(&Value::Object(rest), &mut out);
        }
        other => write_canonical(other, &mut out),
    }
    out
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                // Writing a string or a scalar into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut *out, key);
                out.push(b':');
                write_canonical(value, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => {
            let _ = serde_json::to_writer(&mut *out, scalar);
        }
    }
}

/// An issuer's public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssuerKey {
    /// 32-byte ed25519 key, checked with `verify_strict`.
    Ed25519(ed25519_dalek::VerifyingKey),
    /// SEC1 secp256k1 key; ECDSA over the SHA-256 of the signed bytes.
    Secp256k1(k256::ecdsa::VerifyingKey),
}

impl IssuerKey {
    /// `ed25519` or `secp256k1`.
    pub fn alg(&self) -> &'static str {
        match self {
            IssuerKey::Ed25519(_) => "ed25519",
            IssuerKey::Secp256k1(_) => "secp256k1",
        }
    }

    fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        match self {
            IssuerKey::Ed25519(key) => <[u8; 64]>::try_from(signature).is_ok_and(|sig| {
                key.verify_strict(message, &ed25519_dalek::Signature::from_bytes(&sig)).is_ok()
            }),
            IssuerKey::Secp256k1(key) => {
                use k256::ecdsa::{Signature, signature::Verifier};
                let sig =
                    Signature::from_der(signature).or_else(|_| Signature::from_slice(signature));
                sig.is_ok_and(|sig| key.verify(message, &sig).is_ok())
            }
        }
    }
}

/// `{"issuers":[{"id":"local-admin","alg":"ed25519","key_b64":"<base64>"}]}`: the issuers whose
/// capsules are accepted (the same format pins node keys in `ARW_TRUST_NODES`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustStore {
    issuers: BTreeMap<String, IssuerKey>,
}

#[derive(Deserialize)]
struct StoreFile {
    #[serde(default)]
    issuers: Vec<IssuerEntry>,
}

#[derive(Deserialize)]
struct IssuerEntry {
    id: String,
    alg: String,
    key_b64: String,
}

/// One trusted issuer as `/admin/rpu/trust` shows it (never the key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IssuerInfo {
    /// Issuer id.
    pub id: String,
    /// Key algorithm.
    pub alg: String,
}

impl TrustStore {
    /// Parses a store; any invalid entry is an error naming it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: StoreFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut issuers = BTreeMap::new();
        for entry in file.issuers {
            let bytes = B64
                .decode(entry.key_b64.trim())
                .map_err(|_| format!("issuer {:?}: key_b64 is not base64", entry.id))?;
            let key = match entry.alg.as_str() {
                "ed25519" => <[u8; 32]>::try_from(bytes.as_slice())
                    .ok()
                    .and_then(|k| ed25519_dalek::VerifyingKey::from_bytes(&k).ok())
                    .map(IssuerKey::Ed25519),
                "secp256k1" => k256::ecdsa::VerifyingKey::from_sec1_bytes(&bytes)
                    .ok()
                    .map(IssuerKey::Secp256k1),
                other => {
                    return Err(format!(
                        "issuer {:?}: alg {other:?} is not ed25519 or secp256k1",
                        entry.id
                    ));
                }
            }
            .ok_or_else(|| {
                format!("issuer {:?}: key_b64 is not a valid {} key", entry.id, entry.alg)
            })?;
            issuers.insert(entry.id, key);
        }
        Ok(Self { issuers })
    }

    /// Reads a store file; `Ok(empty)` when it does not exist. Errors name the file.
    pub fn load(path: &Path) -> Result<Self, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// No issuer: every capsule is refused.
    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// Issuer ids and algorithms.
    pub fn issuers(&self) -> Vec<IssuerInfo> {
        self.issuers
            .iter()
            .map(|(id, key)| IssuerInfo { id: id.clone(), alg: key.alg().to_owned() })
            .collect()
    }

    /// The key of `id`.
    pub fn key(&self, id: &str) -> Option<&IssuerKey> {
        self.issuers.get(id)
    }

    /// Checks, in order: issuer listed, signature present and base64, signature valid over the
    /// canonical bytes, not dated more than [`MAX_FUTURE_MS`] ahead of `now_ms`, `hop_ttl` not 0,
    /// `propagate` known.
    pub fn verify(&self, capsule: &Capsule, now_ms: u64) -> Result<(), CapsuleError> {
        let fail = |why: &str| Err(CapsuleError::Verification(why.to_owned()));
        let c = &capsule.fields;
        let Some(issuer) = c.issuer.as_deref() else { return fail("no issuer") };
        let Some(key) = self.issuers.get(issuer) else {
            return fail(&format!("issuer {issuer:?} is not in the trust store"));
        };
        let Some(signature) = c.signature.as_deref() else { return fail("no signature") };
        let Ok(signature) = B64.decode(signature.trim()) else {
            return fail("signature is not base64");
        };
        if !key.verify(&canonical_bytes(&capsule.json), &signature) {
            return fail("signature does not match the capsule");
        }
        if c.issued_at_ms > now_ms.saturating_add(MAX_FUTURE_MS) {
            return fail("issued_at_ms is more than 5 minutes in the future");
        }
        if c.hop_ttl == Some(0) {
            return fail("hop_ttl is 0");
        }
        if let Some(p) = c.propagate.as_deref()
            && !matches!(p, "none" | "children" | "peers" | "all")
        {
            return fail(&format!("propagate {p:?} is not none, children, peers or all"));
        }
        for contract in &c.contracts {
            if let Some(role) = contract.subject_role.as_deref()
                && role.parse::<crate::role::Role>().is_err()
            {
                return fail(&format!(
                    "contract {:?}: subject_role {role:?} is not a role",
                    contract.id
                ));
            }
        }
        Ok(())
    }
}

/// Signs `json` (a capsule object) with an ed25519 key as `issuer`: sets `issuer`, then
/// `signature` over the canonical bytes. What `arw-cli capsule sign-ed25519` does.
pub fn sign_ed25519(
    json: &mut Value,
    issuer: &str,
    key: &ed25519_dalek::SigningKey,
) -> Result<(), CapsuleError> {
    let Value::Object(map) = json else {
        return Err(CapsuleError::Invalid("a capsule is a JSON object".into()));
    };
    map.insert("issuer".into(), Value::String(issuer.to_owned()));
    map.remove("signature");
    use ed25519_dalek::Signer;
    let signature = key.sign(&canonical_bytes(json));
    if let Value::Object(map) = json {
        map.insert("signature".into(), Value::String(B64.encode(signature.to_bytes())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store_with(id: &str, key: &ed25519_dalek::SigningKey) -> TrustStore {
        let text = json!({"issuers":[{"id":id,"alg":"ed25519","key_b64":B64.encode(key.verifying_key().to_bytes())}]});
        TrustStore::parse(&text.to_string()).expect("store")
    }

    fn sample() -> Value {
        json!({"id":"capsule.strict-egress","version":"1","issued_at_ms":1_760_000_000_000u64,
               "hop_ttl":4,"propagate":"children","denies":["net:*"],"contracts":[{"patterns":["a"],"id":"c1"}],
               "lease_duration_ms":600_000})
    }

    #[test]
    fn canonical_form_sorts_keys_at_every_depth_and_drops_the_signature() {
        let value = json!({"b":1,"a":{"z":[{"y":1,"x":2}],"é":true,"Z":null},"signature":"s"});
        assert_eq!(
            String::from_utf8(canonical_bytes(&value)).expect("utf8"),
            r#"{"a":{"Z":null,"z":[{"x":2,"y":1}],"é":true},"b":1}"#
        );
    }

    #[test]
    fn signed_capsules_verify_and_any_change_breaks_them() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let store = store_with("local-admin", &key);
        let mut value = sample();
        sign_ed25519(&mut value, "local-admin", &key).expect("sign");
        let now = 1_760_000_000_000;
        let capsule = Capsule::from_json(value.clone()).expect("capsule");
        assert_eq!(store.verify(&capsule, now), Ok(()));
        // Base64 of the same JSON, in another key order, still verifies: the form is canonical.
        let header = B64.encode(serde_json::to_vec(&value).expect("json"));
        assert_eq!(store.verify(&Capsule::from_header(&header).expect("b64"), now), Ok(()));

        let mut tampered = value.clone();
        tampered["denies"] = json!(["net:http"]);
        let tampered = Capsule::from_json(tampered).expect("capsule");
        assert!(matches!(store.verify(&tampered, now), Err(CapsuleError::Verification(_))));
        let other = store_with("local-admin", &ed25519_dalek::SigningKey::from_bytes(&[8; 32]));
        assert!(matches!(other.verify(&capsule, now), Err(CapsuleError::Verification(_))));
        assert!(matches!(
            TrustStore::default().verify(&capsule, now),
            Err(CapsuleError::Verification(_))
        ));
        let early = now - MAX_FUTURE_MS - 1;
        assert!(matches!(store.verify(&capsule, early), Err(CapsuleError::Verification(_))));
    }

    #[test]
    fn secp256k1_issuers_verify_der_and_compact_signatures() {
        use k256::ecdsa::{Signature, SigningKey, signature::Signer};
        let key = SigningKey::from_bytes(&[7u8; 32].into()).expect("key");
        let public = B64.encode(key.verifying_key().to_sec1_bytes());
        let store = TrustStore::parse(
            &json!({"issuers":[{"id":"k1","alg":"secp256k1","key_b64":public}]}).to_string(),
        )
        .expect("store");
        let mut value = sample();
        value["issuer"] = json!("k1");
        let sig: Signature = key.sign(&canonical_bytes(&value));
        for encoded in [sig.to_der().as_bytes().to_vec(), sig.to_bytes().to_vec()] {
            value["signature"] = json!(B64.encode(&encoded));
            let capsule = Capsule::from_json(value.clone()).expect("capsule");
            assert_eq!(store.verify(&capsule, 1_760_000_000_000), Ok(()));
        }
    }

    #[test]
    fn undecodable_headers_and_bad_stores_are_refused_with_reasons() {
        assert!(matches!(Capsule::from_header("%%%"), Err(CapsuleError::Invalid(_))));
        assert!(matches!(Capsule::from_header("{\"id\":1}"), Err(CapsuleError::Invalid(_))));
        assert!(matches!(Capsule::from_header(&B64.encode("[1]")), Err(CapsuleError::Invalid(_))));
        let err = TrustStore::parse(r#"{"issuers":[{"id":"x","alg":"rsa","key_b64":"AA=="}]}"#)
            .expect_err("rsa");
        assert!(err.contains("\"x\"") && err.contains("rsa"), "{err}");
        let err = TrustStore::parse(r#"{"issuers":[{"id":"y","alg":"ed25519","key_b64":"AA=="}]}"#)
            .expect_err("short");
        assert!(err.contains("\"y\""), "{err}");
    }
}
