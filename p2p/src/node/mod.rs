//! The running node: the actor that executes the [`NodeCore`](crate::core::NodeCore)'s effects
//! over a real bus and disk. Handlers talk to it through a [`NodeHandle`]; readers get an
//! `Arc<Snapshot>` from a watch channel, never a lock.

mod actor;
mod jobs_store;
mod registry;

pub use jobs_store::{JobFilter, JobList, JobReader, MAX_LIST};

pub use crate::core::{
    AdmissionChange, BusConfig, CapsuleRequest, FederationConfig, HomeClaim, NodeConfig, NodeError,
    PolicyView, Snapshot, TeardownRequest,
};
pub use crate::transport::{Mismatch, NetworkStatus};

use std::sync::Arc;

use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use crate::{
    capsule::{Adoption, IssuerInfo, Teardown},
    core::{Command, Reply},
    events::EventTx,
    governor::Hints,
    hierarchy::{CoreAccept, CoreHello, CoreOffer, HelloOutcome, RoleChange},
    jobs::{Finished, JobSpec, Submitted},
};

/// What a handle asks of the actor.
#[derive(Debug)]
enum Request {
    /// A command for the core.
    Core(Command),
    /// Read the capsule trust store file, then hand it to the core.
    ReloadTrust,
}

/// A request with the channel its reply goes back on.
type Call = (Request, oneshot::Sender<Result<Reply, NodeError>>);

/// Cheap-clone handle to the node actor.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    commands: mpsc::Sender<Call>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    jobs: JobReader,
}

impl NodeHandle {
    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// A receiver that wakes on every snapshot change.
    pub fn watch(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.clone()
    }

    /// Sets the hierarchy role (aliases accepted).
    pub async fn set_role(&self, role: &str) -> Result<RoleChange, NodeError> {
        match self.call(Command::SetRole(role.to_owned())).await? {
            Reply::Role(change) => Ok(change),
            other => Err(unexpected(other)),
        }
    }

    /// Applies an operator hello.
    pub async fn hello(&self, hello: CoreHello) -> Result<HelloOutcome, NodeError> {
        match self.call(Command::Hello(hello)).await? {
            Reply::Hello(outcome) => Ok(outcome),
            other => Err(unexpected(other)),
        }
    }

    /// Records an offer; returns whether the epoch changed.
    pub async fn offer(&self, offer: CoreOffer) -> Result<bool, NodeError> {
        self.changed(Command::Offer(offer)).await
    }

    /// Records an accept; returns whether the epoch changed.
    pub async fn accept(&self, accept: CoreAccept) -> Result<bool, NodeError> {
        self.changed(Command::Accept(accept)).await
    }

    /// At the Home: admits `id` with `key`, or with the key it advertises now.
    pub async fn admit(&self, id: &str, key: Option<String>) -> Result<AdmissionChange, NodeError> {
        self.admission(Command::Admit { id: id.to_owned(), key }).await
    }

    /// At the Home: revokes `id`.
    pub async fn revoke(&self, id: &str) -> Result<AdmissionChange, NodeError> {
        self.admission(Command::Revoke(id.to_owned())).await
    }

    /// Verifies a capsule against the trust store and adopts it (a renewal when its id is held).
    pub async fn adopt_capsule(&self, request: CapsuleRequest) -> Result<Adoption, NodeError> {
        match self.call(Command::AdoptCapsule(Box::new(request))).await? {
            Reply::Adoption(adoption) => Ok(*adoption),
            other => Err(unexpected(other)),
        }
    }

    /// Removes capsules.
    pub async fn teardown_capsules(&self, request: TeardownRequest) -> Result<Teardown, NodeError> {
        match self.call(Command::Teardown(request)).await? {
            Reply::Teardown(teardown) => Ok(teardown),
            other => Err(unexpected(other)),
        }
    }

    /// Reads the capsule trust store file again (on error the previous store stays in force).
    pub async fn reload_trust(&self) -> Result<Vec<IssuerInfo>, NodeError> {
        match self.request(Request::ReloadTrust).await? {
            Reply::Issuers(issuers) => Ok(issuers),
            other => Err(unexpected(other)),
        }
    }

    /// Sets the governor profile; re-advertises (and at the Home, sends it as a routing hint).
    pub async fn set_profile(&self, name: &str) -> Result<(), NodeError> {
        self.done(Command::SetProfile(name.to_owned())).await
    }

    /// Trusts the pending Home claim whose key has `fingerprint` (or is this base64 key).
    pub async fn trust_home(&self, fingerprint: &str) -> Result<(), NodeError> {
        self.done(Command::TrustHome(fingerprint.to_owned())).await
    }

    /// Takes back the trust in the pinned Home.
    pub async fn untrust_home(&self) -> Result<(), NodeError> {
        self.done(Command::UntrustHome).await
    }

    /// Merges governor hints; re-advertises (and at the Home, sends them as routing hints).
    pub async fn set_hints(&self, hints: Hints) -> Result<(), NodeError> {
        self.done(Command::SetHints(Box::new(hints))).await
    }

    /// Admits a job (`POST /actions`).
    pub async fn submit_job(&self, spec: JobSpec) -> Result<Submitted, NodeError> {
        match self.call(Command::SubmitJob(Box::new(spec))).await? {
            Reply::Submitted(submitted) => Ok(submitted),
            other => Err(unexpected(other)),
        }
    }

    /// Cancels a job this node owns.
    pub async fn cancel_job(&self, id: &str) -> Result<(), NodeError> {
        self.done(Command::CancelJob(id.to_owned())).await
    }

    /// Stops (`true`) or resumes taking jobs from the Home.
    pub async fn drain_jobs(&self, on: bool) -> Result<(), NodeError> {
        self.done(Command::DrainJobs(on)).await
    }

    /// Reports a finished run.
    pub async fn job_finished(&self, done: Finished) -> Result<(), NodeError> {
        self.done(Command::JobFinished(Box::new(done))).await
    }

    /// Reads the jobs this node owns.
    pub fn jobs(&self) -> &JobReader {
        &self.jobs
    }

    async fn changed(&self, command: Command) -> Result<bool, NodeError> {
        match self.call(command).await? {
            Reply::Changed(changed) => Ok(changed),
            other => Err(unexpected(other)),
        }
    }

    async fn admission(&self, command: Command) -> Result<AdmissionChange, NodeError> {
        match self.call(command).await? {
            Reply::Admission(change) => Ok(change),
            other => Err(unexpected(other)),
        }
    }

    async fn done(&self, command: Command) -> Result<(), NodeError> {
        match self.call(command).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn call(&self, command: Command) -> Result<Reply, NodeError> {
        self.request(Request::Core(command)).await
    }

    async fn request(&self, request: Request) -> Result<Reply, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send((request, tx)).await.map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }
}

/// A reply of another kind than the command asked for: a bug in the core.
fn unexpected(reply: Reply) -> NodeError {
    tracing::error!(?reply, "the node core answered a command with another kind of reply");
    NodeError::Stopped
}

/// Loads persisted state, resolves the node id, starts the transport and the actor. The first
/// advert goes out before this returns, so the local node is in the first snapshot, and the
/// listen addresses are known.
pub async fn spawn(
    config: NodeConfig,
    events: EventTx,
    cancel: CancellationToken,
) -> std::io::Result<(NodeHandle, JoinHandle<()>)> {
    spawn_with_metrics(config, events, cancel, None).await
}

/// [`spawn`], registering libp2p's own metrics (connections, bandwidth, gossipsub, identify,
/// Kademlia, ping) in `metrics` when the node federates over libp2p.
pub async fn spawn_with_metrics(
    config: NodeConfig,
    events: EventTx,
    cancel: CancellationToken,
    metrics: Option<&mut prometheus_client::registry::Registry>,
) -> std::io::Result<(NodeHandle, JoinHandle<()>)> {
    let (commands, rx) = mpsc::channel(actor::COMMAND_QUEUE);
    let (actor, snapshot, jobs) = actor::Actor::start(config, events, metrics).await?;
    let task = tokio::spawn(actor.run(rx, cancel));
    Ok((NodeHandle { commands, snapshot, jobs }, task))
}
