//! The event publisher: the single consumer of the process's event pipeline. Each event gets
//! its envelope (time, normalised kind, origin, a UUIDv7 `ce.id`, a `corr_id` in the payload)
//! and is fanned out to subscribers.

use std::sync::Arc;

use serde_json::Value;
use tokio::{
    sync::{broadcast, mpsc, watch},
    task::JoinHandle,
};

use arw_api::{
    dto::{CloudEvent, Envelope},
    events::normalize_kind,
};
use arw_p2p::{events::Emit, node::Snapshot, time};

/// Live subscribers' buffer, per subscriber.
pub const LIVE_CAPACITY: usize = 1024;

/// Starts the publisher. It ends when every `EventTx` is dropped.
pub fn spawn(
    mut rx: mpsc::Receiver<Emit>,
    node: watch::Receiver<Arc<Snapshot>>,
    source: String,
) -> (broadcast::Sender<Arc<Envelope>>, JoinHandle<()>) {
    let (live, _) = broadcast::channel(LIVE_CAPACITY);
    let tx = live.clone();
    let task = tokio::spawn(async move {
        while let Some(emit) = rx.recv().await {
            let origin = node.borrow().id.to_string();
            let envelope = Arc::new(envelope(emit, &origin, &source));
            tracing::debug!(kind = %envelope.kind, "event");
            // No subscribers is normal.
            let _ = tx.send(envelope);
        }
    });
    (live, task)
}

fn envelope(emit: Emit, origin: &str, source: &str) -> Envelope {
    let now = time::rfc3339_ms(time::now_ms());
    let kind = normalize_kind(&emit.kind);
    let mut payload = emit.payload;
    if let Value::Object(map) = &mut payload {
        map.entry("corr_id")
            .or_insert_with(|| Value::String(uuid::Uuid::now_v7().to_string()));
    }
    Envelope {
        ce: Some(CloudEvent {
            specversion: "1.0".into(),
            kind: kind.clone(),
            source: source.to_owned(),
            id: uuid::Uuid::now_v7().to_string(),
            time: now.clone(),
            datacontenttype: "application/json".into(),
        }),
        time: now,
        kind,
        payload,
        origin: Some(origin.to_owned()),
        policy: None,
    }
}
