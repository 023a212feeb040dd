//! The task queue over NATS: workers take tasks from `arw.tasks` in a queue group (each task goes
//! to one worker, at most once) and run the sample tools.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use arw_p2p::events::{Event, TaskCompleted};

/// Subject tasks are enqueued on.
pub const TASKS: &str = "arw.tasks";
/// Cluster-wide completion subject.
pub const COMPLETED: &str = "arw.events.task.completed";

/// A task on `arw.tasks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Task id.
    pub id: String,
    /// Routing hint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_key: Option<String>,
    /// The tool, e.g. `math.add`.
    pub kind: String,
    /// Its input.
    #[serde(default)]
    pub payload: Value,
    /// Idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idem_key: Option<String>,
    /// Priority.
    #[serde(default)]
    pub priority: i32,
    /// Attempt number.
    #[serde(default)]
    pub attempt: u32,
}

impl Task {
    /// Decodes a task from `arw.tasks`; an undecodable one is logged and dropped.
    pub fn decode(payload: &[u8]) -> Option<Self> {
        let task = serde_json::from_slice(payload);
        if let Err(e) = &task {
            tracing::warn!(error = %e, "undecodable task on {TASKS} dropped");
        }
        task.ok()
    }
}

/// Runs a sample tool: `math.add {a, b}` → `{sum}`, `time.now` → `{now_ms}`. Returns `(ok, output)`;
/// an unknown tool or bad input is `ok: false` with an `error`.
pub fn run(kind: &str, input: &Value) -> (bool, Value) {
    match kind {
        "math.add" => match (input["a"].as_f64(), input["b"].as_f64()) {
            (Some(a), Some(b)) => (true, json!({ "sum": a + b })),
            _ => (false, json!({ "error": "math.add needs numbers a and b", "id": kind })),
        },
        "time.now" => (true, json!({ "now_ms": arw_p2p::time::now_ms() })),
        _ => (false, json!({ "error": "unknown tool", "id": kind })),
    }
}

/// The `task.completed` payload.
pub fn completion(task: &Task, node_id: &str) -> Event {
    let (ok, output) = run(&task.kind, &task.payload);
    Event::TaskCompleted(TaskCompleted {
        id: json!(task.id),
        ok,
        output,
        node_id: node_id.to_owned(),
        kind: Some(task.kind.clone()),
        attempt: None,
        duration_ms: None,
    })
}

/// A server's queue worker (`queue = "nats"`): takes tasks from `arw.tasks` in `group`, runs them
/// and journals `task.completed` with this node's id (the relay then publishes it on
/// `arw.events.node.<node_id>.task.completed`). It takes tasks only while the node's snapshot
/// says it takes work (a node the Home has not admitted is pending): otherwise it leaves the
/// queue group, so the tasks go to the other workers. Runs until `cancel`.
pub async fn serve(
    client: async_nats::Client,
    group: String,
    mut node: tokio::sync::watch::Receiver<std::sync::Arc<arw_p2p::node::Snapshot>>,
    events: arw_p2p::events::EventTx,
    cancel: tokio_util::sync::CancellationToken,
) {
    use futures::StreamExt;
    let takes_work = |node: &tokio::sync::watch::Receiver<
        std::sync::Arc<arw_p2p::node::Snapshot>,
    >| { node.borrow().policy.takes_work };
    loop {
        while !takes_work(&node) {
            tokio::select! {
                () = cancel.cancelled() => return,
                changed = node.changed() => if changed.is_err() { return },
            }
        }
        let mut tasks = match client.queue_subscribe(TASKS, group.clone()).await {
            Ok(sub) => sub,
            Err(e) => {
                tracing::error!(error = %e, "cannot subscribe to {TASKS}; this node takes no tasks");
                return;
            }
        };
        tracing::info!(%group, "taking tasks from {TASKS}");
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                changed = node.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if !takes_work(&node) {
                        tracing::info!("not admitted by the Home: no longer taking tasks");
                        break;
                    }
                }
                message = tasks.next() => {
                    let Some(message) = message else {
                        tracing::warn!("the {TASKS} subscription ended; subscribing again");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        break;
                    };
                    let Some(task) = Task::decode(&message.payload) else { continue };
                    let me = node.borrow().id.to_string();
                    events.emit(completion(&task, &me)).await;
                }
            }
        }
        // Dropping the subscription leaves the queue group. Tasks the broker had already handed
        // to it are lost with it (core NATS delivers at most once), as with any worker leaving.
        drop(tasks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_tools() {
        assert_eq!(run("math.add", &json!({"a": 2, "b": 3})), (true, json!({"sum": 5.0})));
        assert!(!run("math.add", &json!({"a": "x"})).0);
        let (ok, out) = run("time.now", &Value::Null);
        assert!(ok && out["now_ms"].as_u64().is_some());
        assert_eq!(
            run("rm.rf", &Value::Null),
            (false, json!({"error": "unknown tool", "id": "rm.rf"}))
        );
    }
}
