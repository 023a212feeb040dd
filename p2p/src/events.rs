//! The one way anything in the process publishes an event. Producers hold an [`EventTx`]; the
//! daemon's publisher receives every [`Emit`], stamps the envelope, journals it and fans it out.

use serde_json::Value;
use tokio::sync::mpsc;

/// An event as produced, before it gets its envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct Emit {
    /// Event kind (normalised by the publisher).
    pub kind: String,
    /// Event payload.
    pub payload: Value,
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
        let emit = Emit {
            kind: kind.to_owned(),
            payload,
        };
        if self.0.send(emit).await.is_err() {
            tracing::debug!(kind, "event publisher stopped; event dropped");
        }
    }
}
