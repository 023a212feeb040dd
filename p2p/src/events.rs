//! The one way anything in the process publishes an event. Producers hold an [`EventTx`]; the
//! daemon's publisher receives every [`Emit`], stamps the envelope, journals it and fans it out.

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

/// An event as produced, before it gets its envelope.
#[derive(Debug)]
pub struct Emit {
    /// Event kind (normalised by the publisher).
    pub kind: String,
    /// Event payload.
    pub payload: Value,
    /// Told the journal id once the event is durable, when the producer waits for it.
    pub ack: Option<oneshot::Sender<i64>>,
    /// Set for an event created on another node and relayed here: its origin, `ce.id` and time
    /// are kept.
    pub relayed: Option<Relayed>,
}

/// Where a relayed event came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayed {
    /// The node that created it.
    pub origin: String,
    /// Its `ce.id` there.
    pub ce_id: String,
    /// Its time there.
    pub time: String,
}

/// Cheap-clone sending half of the event pipeline. Bounded: a producer waits when the publisher
/// is behind rather than dropping events.
#[derive(Debug, Clone)]
pub struct EventTx(mpsc::Sender<Emit>);

impl EventTx {
    /// A pipeline holding at most `capacity` unpublished events.
    pub fn channel(capacity: usize) -> (Self, mpsc::Receiver<Emit>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Self(tx), rx)
    }

    /// Publishes an event. After shutdown (publisher gone) the event is dropped with a debug log.
    pub async fn emit(&self, kind: &str, payload: Value) {
        let emit = Emit { kind: kind.to_owned(), payload, ack: None, relayed: None };
        if self.0.send(emit).await.is_err() {
            tracing::debug!(kind, "event publisher stopped; event dropped");
        }
    }

    /// Journals an event another node created, keeping its origin, id and time.
    pub async fn emit_relayed(&self, kind: &str, payload: Value, relayed: Relayed) {
        let emit = Emit { kind: kind.to_owned(), payload, ack: None, relayed: Some(relayed) };
        if self.0.send(emit).await.is_err() {
            tracing::debug!(kind, "event publisher stopped; relayed event dropped");
        }
    }

    /// Publishes an event and waits until it is journaled; returns its journal id, or `None`
    /// when the publisher has stopped or could not store it.
    pub async fn emit_durable(&self, kind: &str, payload: Value) -> Option<i64> {
        let (tx, rx) = oneshot::channel();
        let emit = Emit { kind: kind.to_owned(), payload, ack: Some(tx), relayed: None };
        self.0.send(emit).await.ok()?;
        rx.await.ok()
    }
}
