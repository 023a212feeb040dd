//! The NATS event relay (reference §5.1).
//!
//! Out: every event created on this node whose kind matches the filter is published, as its
//! envelope, on `arw.events.node.<node_id>.<kind>`, signed with the node key (the signature of
//! subject and payload travels in the `Arw-Signature` header, so the payload stays the plain
//! envelope other consumers read). In: an event on `arw.events.node.>` is journaled here, with
//! the sender as `origin`, only when the sender is a node of this registry and signed it with
//! the key the registry holds for its id, it is at most [`MAX_RELAYED_BYTES`], it is not a
//! stream-control kind (`service.connected`, `service.lagged`), and the sender is within its budget. A relayed event is
//! never relayed again (only events whose origin is this node go out), copies are dropped by
//! `ce.id`, and node ids cannot contain dots, so the subject's fourth token is the sender.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::Arc,
};

use futures::StreamExt;
use tokio::sync::{broadcast::error::RecvError, watch};
use tokio_util::sync::CancellationToken;

use arw_api::{
    dto::Envelope,
    events::{EventLog, kind_matches},
};
use arw_p2p::{
    events::{EventTx, Relayed},
    identity::NodeKey,
    limit::Window,
    node::Snapshot,
    node_id::NodeId,
    time::now_ms,
    wire::{EVENT_SIGNATURE_HEADER, event_signed_by, sign_event},
};

use crate::journal::Journal;

/// Relayed event ids remembered for de-duplication.
const SEEN: usize = 4096;
/// The largest relayed event journaled (the limit of `POST /admin/events/test` too).
pub const MAX_RELAYED_BYTES: usize = 64 * 1024;
/// Events journaled per origin and [`BUDGET_WINDOW_MS`]; the rest are dropped.
const BUDGET: u32 = 1_000;
/// That window.
const BUDGET_WINDOW_MS: u64 = 10_000;
/// Kinds only an SSE stream itself may say (reference: "never on the bus"); a journaled copy
/// would look like a frame of the stream to a client that trusts kinds.
const STREAM_CONTROL: [&str; 2] = ["service.connected", "service.lagged"];
/// Refusals are summed up in the log at most this often.
const REPORT_EVERY_MS: u64 = 10_000;

/// What to relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Publish local events outward.
    pub out: bool,
    /// Kind prefixes published outward.
    pub filter: Vec<String>,
}

/// Runs the relay until `cancel`.
pub async fn run(
    client: async_nats::Client,
    key: NodeKey,
    journal: Arc<Journal>,
    events: EventTx,
    node: watch::Receiver<Arc<Snapshot>>,
    config: RelayConfig,
    cancel: CancellationToken,
) {
    let mut incoming = match client.subscribe("arw.events.node.>").await {
        Ok(sub) => sub,
        Err(e) => {
            tracing::error!(error = %e, "event relay cannot subscribe; relay off");
            return;
        }
    };
    let mut live = journal.subscribe();
    let mut seen = Seen::default();
    let mut gate = Gate::default();
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            received = live.recv(), if config.out => match received {
                Ok(event) => {
                    let me = node.borrow().id.to_string();
                    let envelope = &event.event.envelope;
                    if envelope.origin.as_deref() == Some(me.as_str())
                        && kind_matches(&envelope.kind, &config.filter)
                        && subject_safe(&envelope.kind)
                    {
                        let subject = format!("arw.events.node.{me}.{}", envelope.kind);
                        let mut headers = async_nats::HeaderMap::new();
                        headers.insert(
                            EVENT_SIGNATURE_HEADER,
                            sign_event(&key, &subject, event.data.as_bytes()).as_str(),
                        );
                        let payload = event.data.clone().into();
                        if let Err(e) = client.publish_with_headers(subject, headers, payload).await {
                            tracing::debug!(error = %e, "relay publish failed");
                        }
                    }
                }
                Err(RecvError::Lagged(skipped)) => {
                    tracing::warn!(skipped, "event relay fell behind; those events were not relayed");
                }
                Err(RecvError::Closed) => break,
            },
            Some(message) = incoming.next() => {
                let signature = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(EVENT_SIGNATURE_HEADER))
                    .map(|v| v.as_str());
                let snapshot = node.borrow().clone();
                let checked = inbound(&message.subject, &message.payload, signature, &snapshot.id, &snapshot.keys);
                match checked {
                    Ok((kind, payload, relayed)) => {
                        if gate.admit(&relayed.origin, now_ms()) && seen.insert(&relayed.ce_id) {
                            events.emit_relayed(&kind, payload, relayed).await;
                        }
                    }
                    Err(refused) => gate.refused(refused, now_ms()),
                }
            }
        }
    }
}

/// Kinds go into subjects as tokens: only `a-z 0-9 _ -` between dots.
fn subject_safe(kind: &str) -> bool {
    !kind.is_empty()
        && kind.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        })
}

/// Why a relayed event was not journaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Refused {
    /// This node's own event coming back (not counted).
    Own,
    /// Not `arw.events.node.<id>.<kind>`, or a payload that is no envelope for that id and kind.
    Malformed,
    /// Over [`MAX_RELAYED_BYTES`].
    TooLarge,
    /// A stream-control kind ([`STREAM_CONTROL`]): only the node's own stream says those.
    Control,
    /// The sender is no node of this registry.
    UnknownOrigin,
    /// No signature, or not the sender's.
    BadSignature,
    /// The sender is over its budget.
    OverBudget,
}

/// Checks a relayed event from another node against the registry's `keys`.
fn inbound(
    subject: &str,
    payload: &[u8],
    signature: Option<&str>,
    me: &NodeId,
    keys: &BTreeMap<NodeId, [u8; 32]>,
) -> Result<(String, serde_json::Value, Relayed), Refused> {
    let mut tokens = subject.splitn(5, '.');
    let (Some("arw"), Some("events"), Some("node"), Some(sender), Some(kind)) =
        (tokens.next(), tokens.next(), tokens.next(), tokens.next(), tokens.next())
    else {
        return Err(Refused::Malformed);
    };
    if sender == me.as_str() {
        return Err(Refused::Own);
    }
    if payload.len() > MAX_RELAYED_BYTES {
        return Err(Refused::TooLarge);
    }
    if STREAM_CONTROL.contains(&kind) {
        return Err(Refused::Control);
    }
    let key = keys.get(sender).ok_or(Refused::UnknownOrigin)?;
    if !signature.is_some_and(|sig| event_signed_by(key, subject, payload, sig)) {
        return Err(Refused::BadSignature);
    }
    let envelope: Envelope = serde_json::from_slice(payload).map_err(|_| Refused::Malformed)?;
    let origin = envelope.origin.unwrap_or_else(|| sender.to_owned());
    // Relayed events are never relayed again, so the origin must be the sender itself.
    if origin != sender || envelope.kind != kind {
        return Err(Refused::Malformed);
    }
    let ce_id = envelope.ce.map(|ce| ce.id).ok_or(Refused::Malformed)?;
    Ok((envelope.kind, envelope.payload, Relayed { origin, ce_id, time: envelope.time }))
}

/// Per-origin budgets, and the refusals to report.
#[derive(Debug, Default)]
struct Gate {
    /// Events admitted per origin (registry members only reach this).
    budgets: HashMap<String, Window>,
    refused: BTreeMap<Refused, u64>,
    /// Refusals were last summed up then (ms).
    reported: u64,
}

impl Gate {
    /// Whether `origin` may have one more event journaled at `now` (ms).
    fn admit(&mut self, origin: &str, now: u64) -> bool {
        let window = self.budgets.entry(origin.to_owned()).or_default();
        let admitted = window.spend(now, BUDGET_WINDOW_MS, BUDGET);
        if !admitted {
            self.refused(Refused::OverBudget, now);
        }
        admitted
    }

    /// Counts a refusal, and says what was refused at most every [`REPORT_EVERY`].
    fn refused(&mut self, why: Refused, now: u64) {
        if why == Refused::Own {
            return;
        }
        *self.refused.entry(why).or_default() += 1;
        if now.saturating_sub(self.reported) >= REPORT_EVERY_MS {
            let counts = std::mem::take(&mut self.refused);
            tracing::warn!(?counts, "relayed events refused from the bus");
            self.reported = now;
        }
    }
}

/// Bounded set of recently relayed event ids.
#[derive(Debug, Default)]
struct Seen {
    order: VecDeque<String>,
    ids: HashSet<String>,
}

impl Seen {
    /// True the first time an id is seen.
    fn insert(&mut self, id: &str) -> bool {
        if self.ids.contains(id) {
            return false;
        }
        if self.order.len() == SEEN
            && let Some(old) = self.order.pop_front()
        {
            self.ids.remove(&old);
        }
        self.order.push_back(id.to_owned());
        self.ids.insert(id.to_owned());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(origin: &str, kind: &str, id: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "time": "2025-10-16T12:00:00.000Z", "kind": kind, "payload": {"x": 1}, "origin": origin,
            "ce": {"specversion": "1.0", "type": kind, "source": "arw-server", "id": id,
                   "time": "2025-10-16T12:00:00.000Z", "datacontenttype": "application/json"}
        }))
        .expect("json")
    }

    fn id(s: &str) -> NodeId {
        NodeId::parse(s).expect("id")
    }

    /// `n2` and `n3` known, with keys 2 and 3; checks at node `n1`.
    fn check(subject: &str, payload: &[u8], signer: Option<u8>) -> Result<String, Refused> {
        let keys = BTreeMap::from([
            (id("n2"), NodeKey::from_secret([2; 32]).verifying_key().to_bytes()),
            (id("n3"), NodeKey::from_secret([3; 32]).verifying_key().to_bytes()),
        ]);
        let sig = signer.map(|k| sign_event(&NodeKey::from_secret([k; 32]), subject, payload));
        inbound(subject, payload, sig.as_deref(), &id("n1"), &keys).map(|(_, _, r)| r.origin)
    }

    #[test]
    fn only_events_signed_by_their_registered_origin_are_taken() {
        let subject = "arw.events.node.n2.cluster.node.changed";
        let event = envelope("n2", "cluster.node.changed", "e1");
        assert_eq!(check(subject, &event, Some(2)), Ok("n2".into()));
        assert_eq!(check(subject, &event, None), Err(Refused::BadSignature), "unsigned");
        assert_eq!(check(subject, &event, Some(3)), Err(Refused::BadSignature), "another's key");
        let other = "arw.events.node.n2.task.completed";
        let sig = sign_event(&NodeKey::from_secret([2; 32]), subject, &event);
        let keys =
            BTreeMap::from([(id("n2"), NodeKey::from_secret([2; 32]).verifying_key().to_bytes())]);
        assert_eq!(
            inbound(other, &event, Some(&sig), &id("n1"), &keys).map(|_| ()),
            Err(Refused::BadSignature),
            "a signature does not move to another subject"
        );
        let stranger = "arw.events.node.n9.cluster.node.changed";
        assert_eq!(
            check(stranger, &envelope("n9", "cluster.node.changed", "e"), Some(9)),
            Err(Refused::UnknownOrigin)
        );
        let lagged = "arw.events.node.n2.service.lagged";
        assert_eq!(
            check(lagged, &envelope("n2", "service.lagged", "e"), Some(2)),
            Err(Refused::Control)
        );
        let big = envelope("n2", "task.completed", &"x".repeat(MAX_RELAYED_BYTES));
        assert_eq!(
            check("arw.events.node.n2.task.completed", &big, Some(2)),
            Err(Refused::TooLarge)
        );
    }

    #[test]
    fn own_looped_and_mismatched_events_are_dropped() {
        let own = envelope("n1", "task.completed", "e");
        assert_eq!(check("arw.events.node.n1.task.completed", &own, Some(1)), Err(Refused::Own));
        // n3 re-publishing n2's event under its own subject: a loop, refused.
        let looped = envelope("n2", "task.completed", "e");
        assert_eq!(
            check("arw.events.node.n3.task.completed", &looped, Some(3)),
            Err(Refused::Malformed)
        );
        let event = envelope("n2", "task.completed", "e");
        assert_eq!(check("arw.events.node.n2.other", &event, Some(2)), Err(Refused::Malformed));
        assert_eq!(check("arw.events.node.n2", &event, Some(2)), Err(Refused::Malformed));
    }

    #[test]
    fn an_origin_over_its_budget_is_cut_off_until_the_next_window() {
        let mut gate = Gate::default();
        let now = 1_800_000_000_000;
        let admitted = (0..BUDGET + 10).filter(|_| gate.admit("n2", now)).count();
        assert_eq!(admitted, BUDGET as usize);
        assert!(gate.admit("n3", now), "others are not charged");
        assert!(gate.admit("n2", now + BUDGET_WINDOW_MS));
    }

    #[test]
    fn seen_is_bounded_and_deduplicates() {
        let mut seen = Seen::default();
        assert!(seen.insert("a"));
        assert!(!seen.insert("a"));
        for i in 0..SEEN {
            seen.insert(&i.to_string());
        }
        assert!(seen.insert("a"), "the oldest id was forgotten");
        assert_eq!(seen.ids.len(), SEEN);
    }

    #[test]
    fn only_plain_kinds_become_subjects() {
        assert!(subject_safe("cluster.node.changed"));
        assert!(subject_safe("task.completed"));
        for bad in ["", "a..b", "a.*", "a.>", "a b", "A.b"] {
            assert!(!subject_safe(bad), "{bad}");
        }
    }
}
