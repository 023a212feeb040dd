//! The NATS event relay (reference §5.1).
//!
//! Out: every event created on this node whose kind matches the filter is published, as its
//! envelope, on `arw.events.node.<node_id>.<kind>`. In: everything on `arw.events.node.>` from
//! other nodes is journaled here with the sender as `origin`. A relayed event is never relayed
//! again (only events whose origin is this node go out), copies are dropped by `ce.id`, and
//! node ids cannot contain dots, so the subject's fourth token is always the sender.

use std::{
    collections::{HashSet, VecDeque},
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
    node::Snapshot,
    node_id::NodeId,
};

use crate::journal::Journal;

/// Relayed event ids remembered for de-duplication.
const SEEN: usize = 4096;

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
                        if let Err(e) = client.publish(subject, event.data.clone().into()).await {
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
                let me = node.borrow().id.to_string();
                if let Some((kind, payload, relayed)) = inbound(&message.subject, &message.payload, &me)
                    && seen.insert(&relayed.ce_id)
                {
                    events.emit_relayed(&kind, payload, relayed).await;
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

/// Decodes a relayed event from another node; `None` for our own, malformed or mismatched ones.
fn inbound(
    subject: &str,
    payload: &[u8],
    me: &str,
) -> Option<(String, serde_json::Value, Relayed)> {
    let mut tokens = subject.splitn(5, '.');
    let (Some("arw"), Some("events"), Some("node"), Some(sender), Some(kind)) =
        (tokens.next(), tokens.next(), tokens.next(), tokens.next(), tokens.next())
    else {
        return None;
    };
    if sender == me || NodeId::parse(sender).is_err() {
        return None;
    }
    let envelope: Envelope = serde_json::from_slice(payload).ok()?;
    let origin = envelope.origin.unwrap_or_else(|| sender.to_owned());
    // Relayed events are never relayed again, so the origin must be the sender itself.
    if origin != sender || envelope.kind != kind {
        tracing::debug!(subject, "relayed event with mismatched origin or kind dropped");
        return None;
    }
    let ce_id = envelope.ce.map(|ce| ce.id)?;
    Some((envelope.kind, envelope.payload, Relayed { origin, ce_id, time: envelope.time }))
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

    #[test]
    fn own_looped_and_mismatched_events_are_dropped() {
        let ok = inbound(
            "arw.events.node.n2.cluster.node.changed",
            &envelope("n2", "cluster.node.changed", "e1"),
            "n1",
        );
        assert_eq!(
            ok.map(|(k, _, r)| (k, r.origin)),
            Some(("cluster.node.changed".into(), "n2".into()))
        );
        assert!(
            inbound(
                "arw.events.node.n1.task.completed",
                &envelope("n1", "task.completed", "e"),
                "n1"
            )
            .is_none()
        );
        // n3 re-publishing n2's event under its own subject: a loop, refused.
        assert!(
            inbound(
                "arw.events.node.n3.task.completed",
                &envelope("n2", "task.completed", "e"),
                "n1"
            )
            .is_none()
        );
        assert!(
            inbound("arw.events.node.n2.other", &envelope("n2", "task.completed", "e"), "n1")
                .is_none()
        );
        assert!(inbound("arw.events.node.n2", &envelope("n2", "x", "e"), "n1").is_none());
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
