//! The executors: the job kinds this server runs, in-process, each attempt a task of its own
//! with a hard deadline and cancellation (an abort stops it at its next await). The node core
//! decides what runs where; this only runs what it is handed and reports back.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use tokio::{sync::mpsc, task::JoinSet};

use arw_p2p::{
    jobs::{Exec, Finished, Run},
    node::NodeHandle,
    time::now_ms,
};

/// The built-in kinds: the reference's sample tools, and two for tests and examples.
pub const BUILTIN: [&str; 4] = ["math.add", "time.now", "echo", "sleep"];
/// The longest `sleep`.
const MAX_SLEEP_MS: u64 = 60 * 60 * 1_000;

/// Runs what arrives on `runs` until the channel closes, reporting each end to `node`.
pub async fn serve(node: NodeHandle, mut runs: mpsc::UnboundedReceiver<Exec>) {
    let mut running: JoinSet<Finished> = JoinSet::new();
    let mut handles: BTreeMap<(String, u64), tokio::task::AbortHandle> = BTreeMap::new();
    loop {
        tokio::select! {
            exec = runs.recv() => match exec {
                Some(Exec::Run(run)) => {
                    let key = (run.job_id.clone(), run.fence);
                    handles.insert(key, running.spawn(attempt(run)));
                }
                Some(Exec::Abort { job_id, fence }) => {
                    if let Some(handle) = handles.remove(&(job_id, fence)) {
                        handle.abort();
                    }
                }
                None => break,
            },
            Some(done) = running.join_next(), if !running.is_empty() => {
                let Ok(done) = done else { continue };
                handles.remove(&(done.job_id.clone(), done.fence));
                if node.job_finished(done).await.is_err() {
                    break;
                }
            }
        }
    }
    running.abort_all();
}

/// One attempt, bounded by its deadline.
async fn attempt(run: Run) -> Finished {
    let started_ms = now_ms();
    let budget = std::time::Duration::from_millis(run.deadline_ms.saturating_sub(started_ms));
    let (ok, output) = match tokio::time::timeout(budget, builtin(&run.kind, &run.input)).await {
        Ok(result) => result,
        Err(_) => (false, json!({"error": "timeout", "timeout_ms": budget.as_millis() as u64})),
    };
    Finished { job_id: run.job_id, fence: run.fence, ok, output, started_ms, finished_ms: now_ms() }
}

/// Runs a built-in kind: `(ok, output)`.
pub async fn builtin(kind: &str, input: &Value) -> (bool, Value) {
    match kind {
        "echo" => (true, input.clone()),
        "sleep" => match input["ms"].as_u64().filter(|ms| *ms <= MAX_SLEEP_MS) {
            Some(ms) => {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                (true, json!({ "slept_ms": ms }))
            }
            None => (false, json!({ "error": "sleep needs ms, at most 3600000" })),
        },
        _ => crate::tasks::run(kind, input),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn builtins_answer_and_refuse_bad_input() {
        assert_eq!(builtin("echo", &json!({"x": 1})).await, (true, json!({"x": 1})));
        assert_eq!(builtin("sleep", &json!({"ms": 1})).await, (true, json!({"slept_ms": 1})));
        assert!(!builtin("sleep", &json!({"ms": "x"})).await.0);
        assert!(!builtin("rm.rf", &Value::Null).await.0);
    }

    #[tokio::test]
    async fn an_attempt_past_its_deadline_fails() {
        let run = Run {
            job_id: "j".into(),
            fence: 1,
            attempt: 1,
            kind: "sleep".into(),
            input: json!({"ms": 10_000}),
            idem_key: None,
            deadline_ms: now_ms() + 20,
        };
        let done = attempt(run).await;
        assert!(!done.ok);
        assert_eq!(done.output["error"], "timeout");
    }
}
