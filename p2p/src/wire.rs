//! The signed envelope every bus carries, and the messages inside it.
//!
//! ```text
//! {"v":1,"payload":{...},"key":"<base64 ed25519 public key>","sig":"<base64 signature>"}
//! signed bytes = "arw.federation.v1\n" || workspace || "\n" || payload bytes exactly as sent
//! ```
//!
//! The payload is kept as the raw JSON text it arrived as; the signature is checked over those
//! bytes with `verify_strict` before the payload is decoded, so nothing is ever re-serialised to
//! check a signature. The workspace is part of the signed bytes (it never travels in them), so a
//! message signed for one workspace fails verification in any other.
//!
//! Envelopes are written in exactly that layout and read only in it: the key and signature sit
//! at fixed offsets from the end (their base64 has a fixed length), so what an envelope claims is
//! read without scanning it, whatever its size, and nothing is parsed before the signature holds.
//! The same JSON in another layout (other field order, spaces) is refused as malformed.

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{cluster::Advert, identity::NodeKey, node_id::NodeId, policy::doc::PolicyDoc};

/// Domain-separation prefix of the signed bytes.
pub const DOMAIN: &[u8] = b"arw.federation.v1\n";
/// Largest envelope accepted (a policy document with its capsules).
pub const MAX_ENVELOPE: usize = 64 * 1024;
/// Largest payload accepted for anything but a policy document (an advert must stay within it).
pub const MAX_PAYLOAD: usize = 4 * 1024;
/// Largest policy document payload.
pub const MAX_POLICY_PAYLOAD: usize = MAX_ENVELOPE - 1024;

/// What a node says, inside the envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Everything the node claims about itself.
    Advert(Advert),
    /// "Still here": liveness between adverts.
    Heartbeat(Beat),
    /// Graceful departure.
    Leave(Beat),
    /// "I lost `target`" (its connection was reset, or it stopped answering my probes): a
    /// signed report that lets every node suspect it within one gossip round.
    Suspect(Suspicion),
    /// The Home's signed policy (roster, capsules) with its `policy_epoch`.
    Policy(PolicyDoc),
}

/// A suspicion report. The reporter's `(seq, beat)` position is shared with its heartbeats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspicion {
    /// The reporter.
    pub id: NodeId,
    /// Its workspace.
    pub workspace: String,
    /// The reporter's current advert `seq`.
    pub seq: u64,
    /// Its beat counter.
    pub beat: u64,
    /// The reporter's clock when sent.
    pub sent_ms: u64,
    /// The node lost (its connection reset, or its silence watched).
    pub target: NodeId,
    /// The target's newest advert `seq` the reporter had heard (0: unknown).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub target_seq: u64,
    /// The target's newest beat the reporter had heard: only a newer heartbeat refutes this.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub target_beat: u64,
}

impl Message {
    /// The claimed sender.
    pub fn id(&self) -> &NodeId {
        match self {
            Message::Advert(a) => &a.id,
            Message::Heartbeat(b) | Message::Leave(b) => &b.id,
            Message::Suspect(s) => &s.id,
            Message::Policy(p) => &p.id,
        }
    }

    /// The claimed workspace.
    pub fn workspace(&self) -> &str {
        match self {
            Message::Advert(a) => &a.workspace,
            Message::Heartbeat(b) | Message::Leave(b) => &b.workspace,
            Message::Suspect(s) => &s.workspace,
            Message::Policy(p) => &p.workspace,
        }
    }

    /// `advert`, `heartbeat`, `leave`, `suspect` or `policy`.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Advert(_) => "advert",
            Message::Heartbeat(_) => "heartbeat",
            Message::Leave(_) => "leave",
            Message::Suspect(_) => "suspect",
            Message::Policy(_) => "policy",
        }
    }
}

/// Heartbeat and leave body. `(seq, beat)` rises strictly: `seq` is the sender's current advert
/// sequence number, `beat` counts messages since that advert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beat {
    /// Sender.
    pub id: NodeId,
    /// Sender's workspace.
    pub workspace: String,
    /// Sender's current advert `seq`.
    pub seq: u64,
    /// Counter since that advert.
    pub beat: u64,
    /// Sender's clock when sent.
    pub sent_ms: u64,
    /// The policy epoch the sender holds (0: none): a receiver holding less asks for it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub policy: u64,
}

pub(crate) fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Why a message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Not an envelope, or a payload that does not decode.
    Malformed,
    /// Envelope version other than 1.
    UnsupportedVersion,
    /// Over [`MAX_ENVELOPE`] / [`MAX_PAYLOAD`].
    TooLarge,
    /// The key is not a valid ed25519 public key.
    BadKey,
    /// The signature does not verify (tampering, another key, or another workspace).
    BadSignature,
    /// Signed for this workspace but claims another in its payload.
    WrongWorkspace,
    /// Older than its validity allows.
    Expired,
    /// Dated too far in the future.
    Future,
    /// The same advert `seq` as one already accepted, with other content.
    Replayed,
    /// The id is bound to another key.
    KeyConflict,
    /// The id is pinned (`ARW_TRUST_NODES`) to another key.
    UntrustedKey,
    /// A heartbeat or leave from a node whose advert has not been seen.
    UnknownNode,
    /// An exact copy of something already accepted (benign; not reported).
    Duplicate,
    /// Older than what was already accepted from its sender (an advert with a lower `seq`, a
    /// heartbeat or report from an earlier position): gossip reorders, and a copy can arrive
    /// after a newer one came by request (benign; not reported).
    Stale,
    /// A policy document signed by another key than the pinned Home's.
    UntrustedHome,
    /// A policy document that does not admit this (unpinned) node: nothing to pin yet (benign;
    /// not reported).
    NotAdmitted,
    /// A policy document, reaching an unpinned node, whose signer does not advertise role
    /// `root` under the document's id here (yet): not a Home this node could pin (benign; not
    /// reported).
    UnknownHome,
    /// A policy document admitting this unpinned node from a Home the operator has not trusted
    /// yet: held as a pending claim (see `policy`).
    HomeNotTrusted,
    /// An advert of a new node while the registry holds `[cluster] max_nodes` and none of them
    /// is gone (`down`, `stale`, `left`) to make room.
    RegistryFull,
    /// An advert of a new node from a sender that brought its share of new nodes this window.
    NewcomerLimit,
}

impl Reason {
    /// Every reason, in declaration order (`reason as usize` indexes it).
    pub const ALL: [Reason; 20] = [
        Reason::Malformed,
        Reason::UnsupportedVersion,
        Reason::TooLarge,
        Reason::BadKey,
        Reason::BadSignature,
        Reason::WrongWorkspace,
        Reason::Expired,
        Reason::Future,
        Reason::Replayed,
        Reason::KeyConflict,
        Reason::UntrustedKey,
        Reason::UnknownNode,
        Reason::Duplicate,
        Reason::Stale,
        Reason::UntrustedHome,
        Reason::NotAdmitted,
        Reason::UnknownHome,
        Reason::HomeNotTrusted,
        Reason::RegistryFull,
        Reason::NewcomerLimit,
    ];

    /// The `reason` in `cluster.event.rejected`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::UnsupportedVersion => "unsupported_version",
            Reason::TooLarge => "too_large",
            Reason::BadKey => "bad_key",
            Reason::BadSignature => "bad_signature",
            Reason::WrongWorkspace => "wrong_workspace",
            Reason::Expired => "expired",
            Reason::Future => "future",
            Reason::Replayed => "replayed",
            Reason::KeyConflict => "key_conflict",
            Reason::UntrustedKey => "untrusted_key",
            Reason::UnknownNode => "unknown_node",
            Reason::Duplicate => "duplicate",
            Reason::Stale => "stale",
            Reason::UntrustedHome => "untrusted_home",
            Reason::NotAdmitted => "not_admitted",
            Reason::UnknownHome => "unknown_home",
            Reason::HomeNotTrusted => "home_not_trusted",
            Reason::RegistryFull => "registry_full",
            Reason::NewcomerLimit => "newcomer_limit",
        }
    }

    /// Whether the message is invalid on its face, so whoever forwarded it misbehaves (its
    /// gossip score drops). Late, early, known, or conflicting with this node's own trust
    /// decisions (another node may have trusted a different key first) is not.
    pub fn is_invalid(self) -> bool {
        matches!(
            self,
            Reason::Malformed
                | Reason::UnsupportedVersion
                | Reason::TooLarge
                | Reason::BadKey
                | Reason::BadSignature
                | Reason::WrongWorkspace
        )
    }
}

/// The envelope's fixed parts around its version and payload.
const HEAD: &[u8] = b"{\"v\":";
const PAYLOAD_FIELD: &[u8] = b",\"payload\":";
const KEY_FIELD: &[u8] = b",\"key\":\"";
const SIG_FIELD: &[u8] = b"\",\"sig\":\"";
const TAIL: &[u8] = b"\"}";
/// Base64 lengths (with padding) of an ed25519 key and signature.
const KEY_B64: usize = 44;
const SIG_B64: usize = 88;

/// An envelope split at its fixed places (not yet checked).
struct Parts<'a> {
    payload: &'a [u8],
    key: &'a [u8],
    sig: &'a [u8],
}

/// Splits an envelope of version 1 in the layout [`seal_payload`] writes.
fn split(bytes: &[u8]) -> Result<Parts<'_>, Reason> {
    let rest = bytes.strip_prefix(HEAD).ok_or(Reason::Malformed)?;
    let version = rest.iter().position(|b| !b.is_ascii_digit()).unwrap_or(rest.len());
    match &rest[..version] {
        b"1" => {}
        [] => return Err(Reason::Malformed),
        _ => return Err(Reason::UnsupportedVersion),
    }
    let rest = rest[version..].strip_prefix(PAYLOAD_FIELD).ok_or(Reason::Malformed)?;
    /// The last `len` bytes of `rest`, and what comes before `field` ahead of them.
    fn cut<'b>(rest: &'b [u8], len: usize, field: &[u8]) -> Option<(&'b [u8], &'b [u8])> {
        let (rest, part) = rest.split_at_checked(rest.len().checked_sub(len)?)?;
        Some((rest.strip_suffix(field)?, part))
    }
    let rest = rest.strip_suffix(TAIL).ok_or(Reason::Malformed)?;
    let (rest, sig) = cut(rest, SIG_B64, SIG_FIELD).ok_or(Reason::Malformed)?;
    let (payload, key) = cut(rest, KEY_B64, KEY_FIELD).ok_or(Reason::Malformed)?;
    Ok(Parts { payload, key, sig })
}

/// A verified message and the key that signed it.
#[derive(Debug, Clone, PartialEq)]
pub struct Opened {
    /// The signer.
    pub key: VerifyingKey,
    /// The decoded payload.
    pub message: Message,
}

/// What is signed: a domain tag, a context line (the workspace, or a relayed event's subject)
/// and the payload, so that a signature never carries over to another use or context.
fn framed(domain: &[u8], context: &str, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(domain.len() + context.len() + 1 + payload.len());
    bytes.extend_from_slice(domain);
    bytes.extend_from_slice(context.as_bytes());
    bytes.push(b'\n');
    bytes.extend_from_slice(payload);
    bytes
}

/// Signs `message` for `workspace`.
pub fn seal(key: &NodeKey, workspace: &str, message: &Message) -> Vec<u8> {
    // Serialising our own types cannot fail.
    let payload = serde_json::to_string(message).unwrap_or_default();
    seal_payload(DOMAIN, key, workspace, &payload)
}

/// Signs a JSON `payload` under `domain` for `context`, in the envelope format.
pub(crate) fn seal_payload(domain: &[u8], key: &NodeKey, context: &str, payload: &str) -> Vec<u8> {
    let sig = key.sign(&framed(domain, context, payload.as_bytes()));
    let envelope = format!(
        r#"{{"v":1,"payload":{payload},"key":"{}","sig":"{}"}}"#,
        key.public_b64(),
        B64.encode(sig.to_bytes())
    );
    envelope.into_bytes()
}

/// Checks an envelope of at most `max` bytes signed under `domain` for `context`; returns the
/// signer and the payload exactly as sent (not yet decoded).
pub(crate) fn open_payload<'a>(
    domain: &[u8],
    bytes: &'a [u8],
    context: &str,
    max: usize,
) -> Result<(VerifyingKey, &'a str), Reason> {
    if bytes.len() > max {
        return Err(Reason::TooLarge);
    }
    let Parts { payload, key, sig } = split(bytes)?;
    let key: [u8; 32] =
        B64.decode(key).ok().and_then(|k| k.try_into().ok()).ok_or(Reason::BadKey)?;
    let key = VerifyingKey::from_bytes(&key).map_err(|_| Reason::BadKey)?;
    let sig: [u8; 64] =
        B64.decode(sig).ok().and_then(|s| s.try_into().ok()).ok_or(Reason::BadSignature)?;
    key.verify_strict(&framed(domain, context, payload), &Signature::from_bytes(&sig))
        .map_err(|_| Reason::BadSignature)?;
    let payload = std::str::from_utf8(payload).map_err(|_| Reason::Malformed)?;
    Ok((key, payload))
}

/// Checks an envelope's signature for `workspace`, then decodes its payload.
pub fn open(bytes: &[u8], workspace: &str) -> Result<Opened, Reason> {
    let (key, payload) = open_payload(DOMAIN, bytes, workspace, MAX_ENVELOPE)?;
    if payload.len() > MAX_POLICY_PAYLOAD {
        return Err(Reason::TooLarge);
    }
    let message: Message = serde_json::from_str(payload).map_err(|_| Reason::Malformed)?;
    if payload.len() > MAX_PAYLOAD && !matches!(message, Message::Policy(_)) {
        return Err(Reason::TooLarge);
    }
    if message.workspace() != workspace {
        return Err(Reason::WrongWorkspace);
    }
    if let Message::Advert(advert) = &message
        && !crate::runtimes::fits_an_advert(&advert.runtimes)
    {
        return Err(Reason::Malformed);
    }
    Ok(Opened { key, message })
}

/// The NATS header that carries a relayed event's signature (see [`sign_event`]).
pub const EVENT_SIGNATURE_HEADER: &str = "Arw-Signature";

const EVENT_DOMAIN: &[u8] = b"arw-event/1\n";

fn event_bytes(subject: &str, payload: &[u8]) -> Vec<u8> {
    framed(EVENT_DOMAIN, subject, payload)
}

/// Signs an event relayed on `subject` (`arw.events.node.<origin>.<kind>`) with the origin's
/// key: the subject and the payload exactly as published, so the payload stays the plain event
/// envelope other consumers read. Returns the base64 signature for [`EVENT_SIGNATURE_HEADER`].
pub fn sign_event(key: &NodeKey, subject: &str, payload: &[u8]) -> String {
    B64.encode(key.sign(&event_bytes(subject, payload)).to_bytes())
}

/// Whether `signature` (base64, from [`EVENT_SIGNATURE_HEADER`]) is `key`'s over `subject` and
/// `payload`.
pub fn event_signed_by(key: &[u8; 32], subject: &str, payload: &[u8], signature: &str) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(key) else { return false };
    let Some(sig) = B64.decode(signature).ok().and_then(|s| <[u8; 64]>::try_from(s).ok()) else {
        return false;
    };
    key.verify_strict(&event_bytes(subject, payload), &Signature::from_bytes(&sig)).is_ok()
}

/// The key (base64) an envelope claims to be signed with, unverified and read without a scan,
/// for shedding load before the signature is checked.
pub fn claimed_key(bytes: &[u8]) -> Option<&str> {
    split(bytes).ok().and_then(|parts| std::str::from_utf8(parts.key).ok())
}

/// The claimed sender of an envelope that could not be opened, for reports (unverified).
pub fn claimed_id(bytes: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    value["payload"]["id"].as_str().map(|s| s.chars().take(64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(id: &str) -> Message {
        Message::Heartbeat(Beat {
            id: NodeId::parse(id).expect("id"),
            workspace: "lab".into(),
            seq: 1,
            beat: 1,
            sent_ms: 1,
            policy: 0,
        })
    }

    #[test]
    fn round_trip_and_workspace_binding() {
        let key = NodeKey::from_secret([1; 32]);
        let bytes = seal(&key, "lab", &beat("n1"));
        let opened = open(&bytes, "lab").expect("valid");
        assert_eq!(opened.message, beat("n1"));
        assert_eq!(opened.key, key.verifying_key());
        assert_eq!(open(&bytes, "other"), Err(Reason::BadSignature));
    }

    #[test]
    fn a_signed_advert_listing_more_runtimes_than_a_node_may_is_refused() {
        use crate::runtimes::{MAX_RUNTIMES, RuntimeHealth, RuntimeStatus};
        let key = NodeKey::from_secret([4; 32]);
        let runtime = |i: usize| RuntimeStatus {
            id: format!("r{i}"),
            kinds: vec![],
            health: RuntimeHealth::Down,
            failures: 0,
            budget: 1,
            quarantines: 0,
            quarantined_until_ms: None,
            last_error: None,
        };
        let mut advert = Advert::basic(NodeId::parse("liar").expect("id"), "lab", 1, 1);
        advert.runtimes = (0..MAX_RUNTIMES).map(runtime).collect();
        let bytes = seal(&key, "lab", &Message::Advert(advert.clone()));
        assert!(open(&bytes, "lab").is_ok(), "as many as a node lists");
        advert.runtimes.push(runtime(MAX_RUNTIMES));
        let bytes = seal(&key, "lab", &Message::Advert(advert));
        assert_eq!(open(&bytes, "lab").map(|_| ()), Err(Reason::Malformed));
    }

    #[test]
    fn payload_bytes_are_verified_as_sent() {
        // Whitespace inside the payload is part of what was signed: changing it breaks the
        // signature even though the JSON means the same.
        let key = NodeKey::from_secret([2; 32]);
        let bytes = String::from_utf8(seal(&key, "lab", &beat("n1"))).expect("utf8");
        let spaced = bytes.replacen(r#"{"type""#, r#"{ "type""#, 1);
        assert_eq!(open(spaced.as_bytes(), "lab"), Err(Reason::BadSignature));
    }

    #[test]
    fn envelopes_are_read_only_in_the_layout_they_are_written_in() {
        let key = NodeKey::from_secret([5; 32]);
        let sealed = seal(&key, "lab", &beat("n1"));
        assert_eq!(claimed_key(&sealed), Some(key.public_b64().as_str()));
        // The same JSON, fields in another order or spaced: refused before any check, and
        // nothing claimed (so no shedding budget is charged to the key it names).
        let value: serde_json::Value = serde_json::from_slice(&sealed).expect("json");
        let reordered = value.to_string();
        assert_ne!(reordered.as_bytes(), sealed, "serde_json orders fields by name");
        let spaced = String::from_utf8(sealed.clone()).expect("utf8").replacen(',', ", ", 1);
        for other in [reordered.as_bytes(), spaced.as_bytes(), b"", b"{}", b"garbage"] {
            assert_eq!(open(other, "lab"), Err(Reason::Malformed));
            assert_eq!(claimed_key(other), None);
        }
        let newer = String::from_utf8(sealed.clone()).expect("utf8").replacen("1", "2", 1);
        assert_eq!(open(newer.as_bytes(), "lab"), Err(Reason::UnsupportedVersion));
        // Cut short at either end, or with a byte after it: refused, never a panic.
        for end in 0..sealed.len() {
            assert!(open(&sealed[..end], "lab").is_err());
            assert!(open(&sealed[sealed.len() - end..], "lab").is_err());
        }
        assert!(open(&[&sealed[..], b" "].concat(), "lab").is_err());
    }

    #[test]
    fn claimed_workspace_must_match() {
        let key = NodeKey::from_secret([3; 32]);
        let mut msg = beat("n1");
        if let Message::Heartbeat(b) = &mut msg {
            b.workspace = "elsewhere".into();
        }
        assert_eq!(open(&seal(&key, "lab", &msg), "lab"), Err(Reason::WrongWorkspace));
    }
}
