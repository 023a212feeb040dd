//! `arw-connector`: a sample worker and completion relay on NATS.
//!
//! - **Worker:** takes tasks from `arw.tasks` in queue group `ARW_GROUP` (each task reaches one
//!   member of the group), runs the sample tools, and publishes each completion as a `task.completed`
//!   envelope with `node_id` on `arw.events.node.<node_id>.task.completed` and
//!   `arw.events.task.completed`.
//! - **Relay:** mirrors servers' node-specific completions (`arw.events.node.*.task.completed`,
//!   published by their event relay) onto the cluster-wide `arw.events.task.completed`; connectors
//!   share this in a queue group too, so each completion is mirrored once.

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use arw_p2p::{events::Emit, nats::NatsConfig, node_id::NodeId};

use crate::tasks::{COMPLETED, TASKS, Task, completion};

/// Connector settings.
#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    /// This connector's node id.
    pub node_id: NodeId,
    /// Queue group for tasks (mirroring uses `<group>-mirror`).
    pub group: String,
    /// Broker connection.
    pub nats: NatsConfig,
}

/// Runs until `cancel`.
pub async fn run(config: ConnectorConfig, cancel: CancellationToken) -> Result<(), String> {
    let (client, _links) = arw_p2p::nats::connect(&config.nats).await?;
    let me = config.node_id.to_string();
    let mut tasks = client
        .queue_subscribe(TASKS, config.group.clone())
        .await
        .map_err(|e| format!("subscribe {TASKS}: {e}"))?;
    let mirror_subject = "arw.events.node.*.task.completed";
    let mut completions = client
        .queue_subscribe(mirror_subject, format!("{}-mirror", config.group))
        .await
        .map_err(|e| format!("subscribe {mirror_subject}: {e}"))?;
    tracing::info!(node_id = %me, group = %config.group, "connector running");
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            Some(message) = tasks.next() => {
                let Some(task) = Task::decode(&message.payload) else { continue };
                let (kind, payload) = completion(&task, &me).into_parts();
                let mut emit = Emit { kind, payload, ack: None, relayed: None };
                let envelope = crate::journal::stamp(&mut emit, &me, "arw-connector");
                let body: bytes::Bytes = serde_json::to_vec(&envelope).unwrap_or_default().into();
                for subject in [format!("arw.events.node.{me}.task.completed"), COMPLETED.to_owned()] {
                    if let Err(e) = client.publish(subject, body.clone()).await {
                        tracing::warn!(error = %e, "completion not published");
                    }
                }
            }
            Some(message) = completions.next() => {
                let sender = message.subject.split('.').nth(3).unwrap_or_default();
                if sender != me
                    && let Err(e) = client.publish(COMPLETED, message.payload).await
                {
                    tracing::warn!(error = %e, "completion not mirrored");
                }
            }
        }
    }
    let _ = client.flush().await;
    Ok(())
}
