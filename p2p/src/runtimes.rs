//! What a node advertises about its runtimes (the executors of its job kinds) and the runtime
//! matrix built from those adverts (`GET /state/runtime_matrix`, `runtime.health`). The health
//! itself is decided by [`crate::jobs::Runtimes`].

use serde::{Deserialize, Serialize};

/// Runtimes a node advertises at most.
pub const MAX_RUNTIMES: usize = 6;

/// Kinds listed per advertised runtime at most (what it runs for the Home is in `jobs.accepts`).
pub const MAX_LISTED_KINDS: usize = 4;

/// Longest `last_error` kept.
pub const MAX_ERROR: usize = 64;

/// A runtime's health.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeHealth {
    /// Runs its kinds; no fault within the window.
    Ready,
    /// Runs its kinds, but faulted within the window or is on probation after a quarantine.
    Degraded,
    /// Quarantined: runs nothing until its cool-down ends.
    Down,
}

impl RuntimeHealth {
    /// The JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeHealth::Ready => "ready",
            RuntimeHealth::Degraded => "degraded",
            RuntimeHealth::Down => "down",
        }
    }
}

/// One runtime as its node advertises it and the runtime matrix shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RuntimeStatus {
    /// `builtin`, or `exec:<kind>`.
    pub id: String,
    /// The kinds it runs (at most 4 listed in adverts).
    pub kinds: Vec<String>,
    /// `ready`, `degraded` or `down` (quarantined).
    pub health: RuntimeHealth,
    /// Faults within the window.
    pub failures: u32,
    /// Faults within the window that quarantine it.
    pub budget: u32,
    /// Quarantines since the node started (restart pressure).
    #[serde(default)]
    pub quarantines: u32,
    /// While quarantined: when it runs again (Unix ms, the node's clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined_until_ms: Option<u64>,
    /// The last fault, e.g. `spawn_failed: /opt/ocr: No such file or directory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl RuntimeStatus {
    /// A line for people, as of `now`.
    pub fn status(&self, now: u64) -> String {
        let last = self.last_error.as_deref().map(|e| format!(" (last: {e})")).unwrap_or_default();
        match self.health {
            RuntimeHealth::Ready => "ready".to_owned(),
            RuntimeHealth::Degraded if self.failures == 0 => {
                format!("on probation after a quarantine{last}")
            }
            RuntimeHealth::Degraded => {
                format!("degraded: {} of {} faults{last}", self.failures, self.budget)
            }
            RuntimeHealth::Down => {
                let left = self.quarantined_until_ms.map_or(0, |t| t.saturating_sub(now));
                format!("quarantined, {} s left{last}", left.div_ceil(1000))
            }
        }
    }

    /// The advertised form: kinds and the error cut to fit an advert.
    pub fn digest(&self) -> RuntimeStatus {
        let mut digest = self.clone();
        digest.kinds.truncate(MAX_LISTED_KINDS);
        if let Some(e) = &mut digest.last_error {
            truncate(e, MAX_ERROR);
        }
        digest
    }
}

/// Whether `runtimes`, as received in an advert, keep the limits a node's own digests keep (a
/// member that lists more, or longer, is refused like any malformed advert).
pub fn fits_an_advert(runtimes: &[RuntimeStatus]) -> bool {
    runtimes.len() <= MAX_RUNTIMES
        && runtimes.iter().all(|r| {
            r.id.len() <= 140
                && r.kinds.len() <= MAX_LISTED_KINDS
                && r.kinds.iter().all(|k| k.len() <= 128)
                && r.last_error.as_ref().is_none_or(|e| e.len() <= MAX_ERROR)
        })
}

pub(crate) fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
}

/// One node's row of `GET /state/runtime_matrix` (and the payload of `runtime.health`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RuntimeMatrixEntry {
    /// The node.
    pub target: String,
    /// When this was known: now for the answering node, the advert's time for the others.
    pub generated: String,
    /// Same, Unix ms.
    pub generated_ms: u64,
    /// The node's runtimes at a glance.
    pub status: MatrixStatus,
    /// Counts.
    pub runtime: RuntimeSummary,
    /// Each runtime.
    pub runtimes: Vec<RuntimeRow>,
}

/// `status` of a [`RuntimeMatrixEntry`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MatrixStatus {
    /// `ok` (all ready), `degraded` (one faulting or on probation), `down` (one quarantined)
    /// or `unknown` (no runtimes).
    pub code: String,
    /// `info`, `warn` or `error`.
    pub severity: String,
    /// `Info`, `Warning` or `Error`.
    pub severity_label: String,
    /// A short label.
    pub label: String,
    /// One line per runtime not ready.
    pub detail: Vec<String>,
    /// A sentence for screen readers.
    pub aria_hint: String,
}

/// `runtime` of a [`RuntimeMatrixEntry`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RuntimeSummary {
    /// Runtimes.
    pub total: usize,
    /// Same as the entry's `generated`.
    pub updated: String,
    /// Runtimes by health: `ready`, `degraded`, `down`.
    pub states: std::collections::BTreeMap<String, usize>,
    /// Quarantines since the node started, all runtimes together.
    pub restart_pressure: u32,
}

/// One runtime in the matrix: its status and a line for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RuntimeRow {
    /// What the node says.
    #[serde(flatten)]
    pub runtime: RuntimeStatus,
    /// E.g. `quarantined, 12 s left (last: exit status 3)`.
    pub status: String,
}

impl RuntimeMatrixEntry {
    /// The entry for node `target` with `runtimes`, known at `known_ms`, shown at `now`.
    pub fn of(target: &str, runtimes: &[RuntimeStatus], known_ms: u64, now: u64) -> Self {
        let count = |h: RuntimeHealth| runtimes.iter().filter(|r| r.health == h).count();
        let states = [RuntimeHealth::Ready, RuntimeHealth::Degraded, RuntimeHealth::Down]
            .into_iter()
            .map(|h| (h.as_str().to_owned(), count(h)))
            .collect();
        let worst = runtimes.iter().map(|r| r.health).max();
        let (code, severity, severity_label, label) = match worst {
            None => ("unknown", "info", "Info", "No runtimes"),
            Some(RuntimeHealth::Ready) => ("ok", "info", "Info", "Runtimes ready"),
            Some(RuntimeHealth::Degraded) => ("degraded", "warn", "Warning", "Runtime degraded"),
            Some(RuntimeHealth::Down) => ("down", "error", "Error", "Runtime quarantined"),
        };
        let detail: Vec<String> = runtimes
            .iter()
            .filter(|r| r.health != RuntimeHealth::Ready)
            .map(|r| format!("{}: {}", r.id, r.status(now)))
            .collect();
        let down = count(RuntimeHealth::Down);
        let generated = crate::time::rfc3339_ms(known_ms);
        RuntimeMatrixEntry {
            target: target.to_owned(),
            generated: generated.clone(),
            generated_ms: known_ms,
            status: MatrixStatus {
                code: code.to_owned(),
                severity: severity.to_owned(),
                severity_label: severity_label.to_owned(),
                label: label.to_owned(),
                aria_hint: format!(
                    "{target}: {} runtimes, {} ready, {down} quarantined",
                    runtimes.len(),
                    count(RuntimeHealth::Ready)
                ),
                detail,
            },
            runtime: RuntimeSummary {
                total: runtimes.len(),
                updated: generated,
                states,
                restart_pressure: runtimes.iter().map(|r| r.quarantines).sum(),
            },
            runtimes: runtimes
                .iter()
                .map(|r| RuntimeRow { runtime: r.clone(), status: r.status(now) })
                .collect(),
        }
    }
}

/// `GET /state/runtime_matrix`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RuntimeMatrix {
    /// By node id: the answering node, and every node that advertises runtimes.
    pub items: std::collections::BTreeMap<String, RuntimeMatrixEntry>,
    /// How long a node's entry holds without a new advert (the cluster's TTL).
    pub ttl_seconds: u64,
}
