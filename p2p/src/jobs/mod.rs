//! Job routing: `POST /actions` work runs here or on a capable worker, exactly once, and is
//! reassigned when that worker is lost.
//!
//! Everything here is IO-less, owned by the node core ([`crate::core`]) so the daemon and the
//! simulator run the same decisions:
//!
//! - [`Ledger`]: the jobs this node owns (every node queues and runs its own `/actions`; only
//!   the Home offloads). Admission (queue cap, idempotency), local-first placement, dispatch,
//!   leases, fencing and reassignment.
//! - [`Worker`]: jobs another node (the pinned Home) handed to this one: default-deny admission,
//!   lease renewal, self-fencing, the completion outbox.
//! - [`place()`]: the pure placement function (filter, then rank) with its `explain`.
//! - [`message`]: the signed dispatch messages both buses carry.
//!
//! See docs/protocol.md, "Jobs", for the protocol and its guarantees.

mod ledger;
pub mod message;
mod place;
pub mod runtime;
mod worker;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub use crate::cluster::JobsAdvert;
pub use crate::runtimes::{RuntimeHealth, RuntimeStatus};
pub use ledger::{Env, Ledger, NoWorkers, Offload, Out, Submitted, Workers};
pub use place::{Candidate, Decision, Explain, Want, fits, place};
pub use runtime::{RuntimeBudget, RuntimeDecl, Runtimes};
pub use worker::{Worker, WorkerEnv};

/// How long an attempt's lease lasts without a renewal.
pub const LEASE_MS: u64 = 5_000;
/// How often a worker renews the leases it holds.
pub const RENEW_EVERY_MS: u64 = 1_000;
/// The worker stops this long before its lease ends; the Home waits this long after.
pub const LEASE_MARGIN_MS: u64 = 500;
/// An assignment not accepted or refused within this long goes to the next candidate.
pub const ASSIGN_TIMEOUT_MS: u64 = 2_000;
/// A completion not acknowledged is sent again this often.
pub const COMPLETE_RETRY_MS: u64 = 1_000;
/// Candidates tried for one placement before the job queues here or fails.
pub const MAX_HOPS: u32 = 3;
/// Largest job input (and output) carried inline, in bytes of JSON.
pub const MAX_INPUT: usize = 256 * 1024;
/// Attempts a retryable job gets by default.
pub const DEFAULT_ATTEMPTS: u32 = 3;
/// A job with no `timeout_ms` runs at most this long.
pub const DEFAULT_TIMEOUT_MS: u64 = 10 * 60 * 1_000;
/// The longest `timeout_ms` accepted.
pub const MAX_TIMEOUT_MS: u64 = 24 * 60 * 60 * 1_000;
/// An idempotency key is remembered this long after its job ended...
pub const IDEM_KEEP_MS: u64 = 24 * 60 * 60 * 1_000;
/// ...and at most this many are (the oldest ended ones are forgotten first).
pub const IDEM_MAX: usize = 65_536;
/// Completions a worker keeps while the Home has not acknowledged them.
pub const OUTBOX_MAX: usize = 256;
/// Jobs whose highest fence a worker remembers (older assignments are refused as replays).
pub const SEEN_MAX: usize = 4_096;
/// Accept globs a node advertises at most.
pub const MAX_ACCEPTS: usize = 16;

/// A node's job settings (`[jobs]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobsConfig {
    /// Jobs this node runs at once (its own and others').
    pub slots: u32,
    /// Kinds this node can execute (its built-in and configured executors).
    pub kinds: Vec<String>,
    /// The executors serving those kinds, each with its own failure budget.
    pub runtimes: Vec<RuntimeDecl>,
    /// `[jobs.runtime]`: faults that quarantine a runtime, and for how long.
    pub runtime_budget: RuntimeBudget,
    /// Kinds this node runs for the Home (`[jobs.remote] allow`, globs): none by default.
    pub allow: Vec<String>,
    /// Kinds safe to run twice, retried after a lost attempt even without an `idem_key`.
    pub idempotent_kinds: Vec<String>,
    /// Jobs queued here (not yet running) at most: more answer 429.
    pub queue_max: usize,
    /// Lease length for remote attempts.
    pub lease_ms: u64,
    /// How often a worker renews.
    pub renew_ms: u64,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            slots: 2,
            kinds: Vec::new(),
            runtimes: Vec::new(),
            runtime_budget: RuntimeBudget::default(),
            allow: Vec::new(),
            idempotent_kinds: Vec::new(),
            queue_max: 1024,
            lease_ms: LEASE_MS,
            renew_ms: RENEW_EVERY_MS,
        }
    }
}

impl JobsConfig {
    /// Kinds this node runs for the Home: those it can execute that an allow glob matches.
    pub fn accepts(&self) -> Vec<String> {
        let mut kinds: Vec<String> =
            self.kinds.iter().filter(|k| self.allow.iter().any(|g| glob(g, k))).cloned().collect();
        kinds.sort();
        kinds.dedup();
        kinds.truncate(MAX_ACCEPTS);
        kinds
    }

    fn idempotent(&self, kind: &str) -> bool {
        self.idempotent_kinds.iter().any(|g| glob(g, kind))
    }
}

/// `POST /actions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobSpec {
    /// The job kind, e.g. `math.add`.
    pub kind: String,
    /// Its input.
    #[serde(default)]
    pub input: Value,
    /// Submitting again with the same key returns the first job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idem_key: Option<String>,
    /// Where it may run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementSpec>,
    /// How long one attempt may run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Attempts, for jobs that may run again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
}

/// `retry` of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts in all (1: never retried).
    pub max_attempts: u32,
}

/// `placement` of a job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementSpec {
    /// What the node must offer.
    #[serde(default)]
    pub require: Require,
    /// Where it should run when both would do.
    #[serde(default)]
    pub prefer: Prefer,
    /// Only this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Never these nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub avoid: Vec<String>,
}

/// `placement.prefer`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Prefer {
    /// Here until the local queue is long, then a worker.
    #[default]
    Auto,
    /// Here, whenever this node can run it.
    Local,
    /// A worker, whenever one can run it.
    Remote,
}

/// `placement.require`: hard constraints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Require {
    /// GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuRequire>,
    /// Memory, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_min_mib: Option<u64>,
    /// CPU cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_min: Option<u64>,
    /// Tags the node must all carry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags_all: Vec<String>,
    /// `linux`, `macos`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// `x86_64`, `aarch64`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
}

/// `placement.require.gpu`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GpuRequire {
    /// GPUs at least.
    #[serde(default = "one")]
    pub count: u32,
    /// Memory of each, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_memory_mib: Option<u64>,
    /// Vendor (matched case-insensitively against the name, e.g. `nvidia`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor: Option<String>,
}

fn one() -> u32 {
    1
}

/// A refused submission.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The request is malformed (empty kind, oversized input, bad timeout...).
    #[error("{0}")]
    Invalid(String),
    /// The local queue is full.
    #[error("the job queue holds {queued} jobs, its limit")]
    QueueFull {
        /// The limit.
        limit: usize,
        /// Jobs queued now.
        queued: usize,
    },
    /// The `idem_key` belongs to a job with another kind or input.
    #[error("idem_key {0:?} was used for a job with another kind or input")]
    IdempotencyConflict(String),
    /// No such job.
    #[error("no job {0}")]
    NotFound(String),
    /// The job has ended.
    #[error("job {0} has already ended")]
    Ended(String),
}

/// A job's state, as the reference names them.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Admitted, not yet running.
    Queued,
    /// Running on its owner (`node_id`).
    Running,
    /// Ended with a result.
    Completed,
    /// Ended without one.
    Failed,
}

impl JobState {
    /// The name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
        }
    }

    /// `completed` or `failed`.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Completed | JobState::Failed)
    }
}

/// Where an attempt runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Site {
    /// On the node that owns the job.
    Local,
    /// On a worker.
    Remote,
}

impl Site {
    /// `local` or `remote`.
    pub fn as_str(self) -> &'static str {
        match self {
            Site::Local => "local",
            Site::Remote => "remote",
        }
    }
}

/// One attempt of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Attempt {
    /// 1, 2, ...
    pub attempt: u32,
    /// Its fencing token.
    pub fence: u64,
    /// Where it ran.
    pub node_id: String,
    /// `assigned`, `running`, `completed`, `failed`, `rejected`, `lost`, `cancelled`.
    pub state: String,
    /// When it was assigned (ms).
    pub started: u64,
    /// When it ended (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<u64>,
    /// Why it ended, when not `completed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A job as stored and shown by `GET /actions/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobRecord {
    /// Job id.
    pub id: String,
    /// Kind.
    pub kind: String,
    /// Input.
    pub input: Value,
    /// Idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idem_key: Option<String>,
    /// SHA-256 of the input's JSON text (hex).
    pub input_sha256: String,
    /// Where it may run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<PlacementSpec>,
    /// Time limit of one attempt.
    pub timeout_ms: u64,
    /// Attempts it may take.
    pub max_attempts: u32,
    /// State.
    pub state: JobState,
    /// The node running it (or that ran it last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// The current attempt (0 before the first).
    pub attempt: u32,
    /// The current fence.
    pub fence: u64,
    /// `local` or `remote` (the current attempt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Site>,
    /// Created (ms).
    pub created: u64,
    /// Last changed (ms).
    pub updated: u64,
    /// Change counter across all jobs (ETags).
    pub rev: u64,
    /// Every attempt, oldest first.
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    /// The result, once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
}

/// One item of `/state/actions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobSummary {
    /// Job id.
    pub id: String,
    /// Kind.
    pub kind: String,
    /// State.
    pub state: JobState,
    /// The node running it (or that ran it last); `null` before the first attempt.
    pub node_id: Option<String>,
    /// The current attempt (0 before the first).
    pub attempt: u32,
    /// `local` or `remote` (the current attempt); `null` before the first.
    pub placement: Option<Site>,
    /// Created, RFC 3339.
    pub created: String,
    /// Last changed, RFC 3339.
    pub updated: String,
}

impl JobRecord {
    /// The `/state/actions` item.
    pub fn summary(&self) -> JobSummary {
        JobSummary {
            id: self.id.clone(),
            kind: self.kind.clone(),
            state: self.state,
            node_id: self.node_id.clone(),
            attempt: self.attempt,
            placement: self.placement,
            created: crate::time::rfc3339_ms(self.created),
            updated: crate::time::rfc3339_ms(self.updated),
        }
    }
}

/// What an executor is asked to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// Job id.
    pub job_id: String,
    /// Its fence (the result must name it).
    pub fence: u64,
    /// Attempt.
    pub attempt: u32,
    /// Kind.
    pub kind: String,
    /// Input.
    pub input: Value,
    /// Idempotency key, for handlers that dedupe downstream.
    pub idem_key: Option<String>,
    /// Stop it by then (ms).
    pub deadline_ms: u64,
}

/// Jobs as stored: those not ended and recent ones (for their idempotency keys), with the
/// highest fence and change number ever issued.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoredJobs {
    /// The jobs.
    pub records: Vec<JobRecord>,
    /// Highest fence.
    pub fence: u64,
    /// Highest change number.
    pub rev: u64,
}

/// What the node asks of its executors.
#[derive(Debug, Clone, PartialEq)]
pub enum Exec {
    /// Start a run.
    Run(Run),
    /// Stop a run (nothing is reported for it).
    Abort {
        /// Job id.
        job_id: String,
        /// Its fence.
        fence: u64,
    },
}

/// What an offload cost: one attempt on a worker, as the Home saw it end. The daemon keeps
/// these in its egress ledger (`GET /state/egress`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contribution {
    /// Job id.
    pub job_id: String,
    /// Kind.
    pub kind: String,
    /// The worker.
    pub node_id: String,
    /// The attempt.
    pub attempt: u32,
    /// Its fence.
    pub fence: u64,
    /// How it ended: `completed`, `failed`, `lost`, `rejected` or `cancelled`.
    pub outcome: String,
    /// Why, when not completed or failed (`lease_expired`, `busy`, ...).
    pub reason: Option<String>,
    /// Bytes of input sent to the worker (the job's input as JSON).
    pub bytes_out: u64,
    /// Bytes of output it returned (0 without a result).
    pub bytes_in: u64,
    /// The run time the worker reported, else from the assignment to the end (ms).
    pub duration_ms: u64,
    /// The CPU time the worker reported for the run (ms); none when it measured none.
    pub cpu_ms: Option<u64>,
    /// When it ended here (ms).
    pub ended_ms: u64,
}

/// What an executor reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// Job id.
    pub job_id: String,
    /// Fence of the run.
    pub fence: u64,
    /// Success.
    pub ok: bool,
    /// Output, or `{error}`.
    pub output: Value,
    /// When it started (ms).
    pub started_ms: u64,
    /// When it ended (ms).
    pub finished_ms: u64,
    /// When the runtime itself failed (it could not start the run, crashed, timed out, wrote
    /// too much): what happened. Counted against the runtime's failure budget; a job that
    /// failed on its own input has none.
    pub fault: Option<String>,
    /// CPU time the run used (its process and the children it waited for), where the executor
    /// can measure it (a program; not a built-in kind).
    pub cpu_ms: Option<u64>,
}

/// Whether `kind` matches `pattern`, where `*` stands for any run of characters.
pub fn glob(pattern: &str, kind: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == kind,
        Some((head, rest)) => {
            let Some(tail) = kind.strip_prefix(head) else { return false };
            if rest.is_empty() {
                return true;
            }
            (0..=tail.len()).filter(|&i| tail.is_char_boundary(i)).any(|i| glob(rest, &tail[i..]))
        }
    }
}

/// Hex SHA-256 of `input` as JSON text.
pub fn input_sha256(input: &Value) -> String {
    hex::encode(Sha256::digest(input.to_string().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("math.*", "math.add"));
        assert!(glob("*", "anything"));
        assert!(glob("a*c", "abbc"));
        assert!(!glob("math.*", "mathx"));
        assert!(!glob("math.add", "math.addx"));
        assert!(glob("*.add", "math.add"));
    }

    #[test]
    fn accepts_only_allowed_executable_kinds() {
        let config = JobsConfig {
            kinds: vec!["math.add".into(), "echo".into(), "sleep".into()],
            allow: vec!["math.*".into(), "sleep".into(), "gpu.*".into()],
            ..JobsConfig::default()
        };
        assert_eq!(config.accepts(), vec!["math.add".to_owned(), "sleep".to_owned()]);
        assert!(
            JobsConfig { kinds: vec!["echo".into()], ..JobsConfig::default() }.accepts().is_empty()
        );
    }
}
