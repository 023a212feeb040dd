//! The dispatch messages, signed in the envelope adverts use under their own domain
//! (`arw.job.v1`), so a signature never carries over between the two:
//!
//! ```text
//! signed bytes = "arw.job.v1\n" || workspace || "\n" || payload bytes exactly as sent
//! payload      = {"node":"<sender id>","sent_ms":..,"type":"assign"|"accepted"|..., ...}
//! ```
//!
//! Each message travels one way, to one node (libp2p request-response `/arw/job/1`, or NATS
//! request-reply on `arw.jobs.<workspace>.<peer id>`), and is idempotent per `(job_id, fence)`.

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    identity::NodeKey,
    node_id::NodeId,
    wire::{self, Reason},
};

const DOMAIN: &[u8] = b"arw.job.v1\n";
/// Largest dispatch envelope: an input or output of [`super::MAX_INPUT`] and its frame.
pub const MAX_JOB_ENVELOPE: usize = super::MAX_INPUT + 16 * 1024;

/// A dispatch message and who sent it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signed {
    /// The sender's node id (checked against the key it is bound to).
    pub node: NodeId,
    /// The sender's clock when sent.
    pub sent_ms: u64,
    /// The message.
    #[serde(flatten)]
    pub body: JobMessage,
}

/// What one node tells another about a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobMessage {
    /// Home → worker: run this attempt.
    Assign(Assign),
    /// Worker → Home: it runs.
    Accepted(JobRef),
    /// Worker → Home: it will not run it.
    Rejected(Rejection),
    /// Worker → Home: these attempts still run here.
    Renew(Renew),
    /// Home → worker: leases renewed, except those to cancel.
    RenewAck(RenewAck),
    /// Worker → Home: the attempt ended.
    Complete(Complete),
    /// Home → worker: the completion is recorded (or was stale); forget it.
    CompleteAck(JobRef),
    /// Home → worker: stop this attempt.
    Cancel(JobRef),
}

impl JobMessage {
    /// `assign`, `accepted`, ...
    pub fn kind(&self) -> &'static str {
        match self {
            JobMessage::Assign(_) => "assign",
            JobMessage::Accepted(_) => "accepted",
            JobMessage::Rejected(_) => "rejected",
            JobMessage::Renew(_) => "renew",
            JobMessage::RenewAck(_) => "renew_ack",
            JobMessage::Complete(_) => "complete",
            JobMessage::CompleteAck(_) => "complete_ack",
            JobMessage::Cancel(_) => "cancel",
        }
    }
}

/// An attempt, named.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobRef {
    /// Job id.
    pub job_id: String,
    /// The attempt's fence.
    pub fence: u64,
}

/// An assignment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assign {
    /// Job id.
    pub job_id: String,
    /// Attempt number.
    pub attempt: u32,
    /// Fencing token: only a result naming the job's current fence is accepted.
    pub fence: u64,
    /// Kind.
    pub kind: String,
    /// Input.
    pub input: Value,
    /// Idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idem_key: Option<String>,
    /// The Home's policy epoch.
    pub policy_epoch: u64,
    /// How long the attempt may run (ms).
    pub timeout_ms: u64,
    /// Lease length (ms).
    pub lease_ms: u64,
}

/// A refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// Job id.
    pub job_id: String,
    /// Fence.
    pub fence: u64,
    /// `not_home`, `not_admitted`, `replay`, `stale_policy`, `kind_not_allowed`, `draining`,
    /// `busy`, or (from the Home's own transport) `unreachable` and `timeout`.
    pub code: String,
}

/// A batch of renewals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renew {
    /// Attempts running on the sender.
    pub jobs: Vec<JobRef>,
}

/// The answer to a renewal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewAck {
    /// The `sent_ms` of the renewal answered (the worker's own clock).
    pub echo_ms: u64,
    /// Attempts renewed.
    pub renewed: Vec<JobRef>,
    /// Attempts the worker must stop (not current, or cancelled).
    pub cancel: Vec<JobRef>,
}

/// A result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Complete {
    /// Job id.
    pub job_id: String,
    /// Fence.
    pub fence: u64,
    /// Success.
    pub ok: bool,
    /// Output, or `{error}`.
    pub output: Value,
    /// Started (worker's clock).
    pub started_ms: u64,
    /// Ended (worker's clock).
    pub finished_ms: u64,
    /// CPU time the run used, where the worker measured it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_ms: Option<u64>,
}

/// Signs `message` from `node` for `workspace`.
pub fn seal(key: &NodeKey, workspace: &str, message: &Signed) -> Vec<u8> {
    // Serialising our own types cannot fail.
    let payload = serde_json::to_string(message).unwrap_or_default();
    wire::seal_payload(DOMAIN, key, workspace, &payload)
}

/// A dispatch envelope checked: its signer and its message, or why it was refused.
pub type Opened = Result<(VerifyingKey, Signed), Reason>;

/// Checks a dispatch envelope's signature for `workspace`, then decodes it.
pub fn open(bytes: &[u8], workspace: &str) -> Opened {
    let (key, payload) = wire::open_payload(DOMAIN, bytes, workspace, MAX_JOB_ENVELOPE)?;
    let signed = serde_json::from_str(payload).map_err(|_| Reason::Malformed)?;
    Ok((key, signed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_bound_to_domain_and_workspace() {
        let key = NodeKey::from_secret([7; 32]);
        let message = Signed {
            node: NodeId::parse("w1").expect("id"),
            sent_ms: 5,
            body: JobMessage::Accepted(JobRef { job_id: "j".into(), fence: 3 }),
        };
        let bytes = seal(&key, "lab", &message);
        let (signer, opened) = open(&bytes, "lab").expect("opens");
        assert_eq!(signer, key.verifying_key());
        assert_eq!(opened, message);
        assert_eq!(open(&bytes, "other").err(), Some(Reason::BadSignature));
        // An advert envelope's signature does not open as a job message, nor the reverse.
        assert_eq!(crate::wire::open(&bytes, "lab").err(), Some(Reason::BadSignature));
    }
}
