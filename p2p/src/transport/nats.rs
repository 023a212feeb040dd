//! The NATS bus: the same signed envelopes as the libp2p mesh, through a broker, for sites that
//! multicast cannot join. The broker is trusted for nothing but delivery: authenticity, ordering
//! and freshness are the membership core's job.
//!
//! Subjects, scoped by workspace: `arw.cluster.<workspace>.msg.<peer id>` carries the adverts,
//! heartbeats, leaves and suspicion reports of the node with that peer id, and every node
//! listens to `arw.cluster.<workspace>.msg.*` (a broker that gives each node's credentials
//! publish rights on its own subject only so tells who sent a message: see [`Senders`]);
//! `arw.cluster.<workspace>.sync` carries anti-entropy requests, answered on the requester's
//! inbox with each node's own advert.

use std::time::Duration;

use libp2p::PeerId;

use futures::StreamExt;
use tokio::sync::mpsc;

use super::shed::{Senders, Shed, Shedder};
use super::types::{Inbound, SyncReply, SyncRequest, SyncResponse, TransportEvent};
use crate::wire::{self, Reason};

/// How to reach the broker.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// `nats://host:port` (or `tls://`).
    pub url: String,
    /// Rewrite `nats://` to `tls://` and `ws://` to `wss://`.
    pub tls: bool,
    /// Credentials, used when the URL carries none.
    pub user: Option<String>,
    /// See `user`.
    pub pass: Option<String>,
    /// Connection attempts at start before giving up (then keep trying in the background).
    pub connect_retries: u32,
    /// Delay between those attempts.
    pub connect_backoff: Duration,
    /// Client name shown by the broker.
    pub name: String,
}

impl NatsConfig {
    /// A broker at `url` without TLS or credentials, tried 3 more times 200 ms apart at start,
    /// the client named `name` (tests and benchmarks on loopback).
    pub fn plain(url: &str, name: &str) -> Self {
        Self {
            url: url.to_owned(),
            tls: false,
            user: None,
            pass: None,
            connect_retries: 3,
            connect_backoff: Duration::from_millis(200),
            name: name.to_owned(),
        }
    }

    /// The URL after the TLS rewrite.
    pub fn effective_url(&self) -> String {
        if !self.tls {
            return self.url.clone();
        }
        if let Some(rest) = self.url.strip_prefix("nats://") {
            format!("tls://{rest}")
        } else if let Some(rest) = self.url.strip_prefix("ws://") {
            format!("wss://{rest}")
        } else {
            self.url.clone()
        }
    }
}

/// Connects to the broker with the settings every NATS connection of this process uses (URL,
/// TLS, credentials), trying `connect_retries` more times `connect_backoff` apart. If the broker
/// is still unreachable the client is returned anyway and keeps connecting in the background; after
/// that it reconnects forever with backoff. Link changes (`true` = up) arrive on the channel. Only
/// an unusable URL is an error.
pub async fn connect(
    config: &NatsConfig,
) -> Result<(async_nats::Client, mpsc::UnboundedReceiver<bool>), String> {
    let url = config.effective_url();
    let (links, rx) = mpsc::unbounded_channel();
    for attempt in 0..=config.connect_retries {
        if attempt > 0 {
            tokio::time::sleep(config.connect_backoff).await;
        }
        match options(config, &url, links.clone()).connect(url.as_str()).await {
            // The connect callback has already reported the link up.
            Ok(client) => return Ok((client, rx)),
            Err(e) => tracing::warn!(%url, attempt, error = %e, "NATS connection failed"),
        }
    }
    tracing::warn!(%url, "NATS broker unreachable; connecting in the background");
    // With `retry_on_initial_connect` only an unusable URL can fail here.
    let client = options(config, &url, links)
        .retry_on_initial_connect()
        .connect(url.as_str())
        .await
        .map_err(|e| format!("NATS URL {url}: {e}"))?;
    Ok((client, rx))
}

fn options(
    config: &NatsConfig,
    url: &str,
    links: mpsc::UnboundedSender<bool>,
) -> async_nats::ConnectOptions {
    let mut options = async_nats::ConnectOptions::new()
        .name(&config.name)
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((100u64 << attempts.min(6)).min(5_000))
        })
        .event_callback(move |event| {
            let links = links.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        let _ = links.send(true);
                    }
                    async_nats::Event::Disconnected => {
                        let _ = links.send(false);
                    }
                    other => tracing::debug!(event = %other, "nats"),
                }
            }
        });
    if config.tls {
        options = options.require_tls(true);
    }
    if let (Some(user), Some(pass)) = (&config.user, &config.pass)
        && !url.contains('@')
    {
        options = options.user_and_password(user.clone(), pass.clone());
    }
    options
}

/// An envelope and what checking it said.
type Checked = (Vec<u8>, Result<wire::Opened, Reason>);

/// Checked envelopes waiting for the node.
const CHECKED_QUEUE: usize = 1_024;
/// What was shed is logged at most this often.
const REPORT_EVERY: Duration = Duration::from_secs(10);

use crate::jobs::message::Opened as OpenedJob;

/// Dispatch envelopes a proven key may send per second on a node's own subject.
const JOBS_PER_KEY: u32 = 5_000;

/// Checks every envelope from the message subject on its own task, so that signature checks
/// never hold up the node's timers, probes and commands (see [`check`]).
async fn check_messages(
    raw: async_nats::Subscriber,
    workspace: String,
    checked: mpsc::Sender<Checked>,
) {
    let senders = Some((format!("{}.", msg_prefix(&workspace)), Senders::default()));
    let open = move |bytes: &[u8]| wire::open(bytes, &workspace);
    check(raw, senders, Shedder::default(), open, None, checked, "messages on the bus").await;
}

/// Checks the dispatch envelopes sent to this node the same way; one passed on is
/// acknowledged (the sender learns it arrived), one shed is not, and its sender's timers take
/// over.
async fn check_jobs(
    client: async_nats::Client,
    raw: async_nats::Subscriber,
    workspace: String,
    checked: mpsc::Sender<(Vec<u8>, OpenedJob)>,
) {
    let open = move |bytes: &[u8]| crate::jobs::message::open(bytes, &workspace);
    let shedder = Shedder::with_per_key(JOBS_PER_KEY, JOBS_PER_KEY);
    check(raw, None, shedder, open, Some(client), checked, "dispatch messages").await;
}

/// Sheds what a flood would cost before it is checked (see [`Senders`], for subjects
/// `<prefix><peer id>`, and [`Shedder`]), checks the rest with `open`, and passes valid
/// envelopes (and invalid ones within their budget) on to the node, waiting for room; when the
/// node cannot keep up, the broker's slow-consumer limit sheds what is left. With `ack`,
/// answers each envelope passed on.
async fn check<T>(
    mut raw: async_nats::Subscriber,
    mut senders: Option<(String, Senders)>,
    mut shedder: Shedder,
    open: impl Fn(&[u8]) -> Result<T, Reason>,
    ack: Option<async_nats::Client>,
    checked: mpsc::Sender<(Vec<u8>, Result<T, Reason>)>,
    what: &'static str,
) {
    let mut shed: std::collections::BTreeMap<&'static str, u64> = Default::default();
    let mut reported = tokio::time::Instant::now();
    while let Some(message) = raw.next().await {
        let bytes = &message.payload[..];
        let key = wire::claimed_key(bytes);
        let now = crate::time::now_ms();
        let sender = match &mut senders {
            Some((prefix, senders)) => match message.subject.as_str().strip_prefix(prefix.as_str())
            {
                Some(peer) => senders.check(peer, key),
                None => Err(Shed::Subject),
            },
            None => Ok(()),
        };
        let verdict = sender.and_then(|()| shedder.before(key, None, now)).and_then(|()| {
            let opened = open(bytes);
            let valid = !opened.as_ref().is_err_and(|r| r.is_invalid());
            shedder.after(key, valid, now).map(|()| opened)
        });
        match verdict {
            Ok(opened) => {
                if let (Some(client), Some(reply)) = (&ack, message.reply) {
                    let _ = client.publish(reply, Vec::new().into()).await;
                }
                if checked.send((bytes.to_vec(), opened)).await.is_err() {
                    return;
                }
            }
            Err(why) => *shed.entry(why.as_str()).or_default() += 1,
        }
        if !shed.is_empty() && reported.elapsed() >= REPORT_EVERY {
            tracing::warn!(?shed, "{what} shed before the node");
            shed.clear();
            reported = tokio::time::Instant::now();
        }
    }
}

/// The subject the node with `peer` id publishes its signed messages on.
pub fn msg_subject(workspace: &str, peer: &PeerId) -> String {
    format!("{}.{peer}", msg_prefix(workspace))
}

/// The subjects every node of a workspace listens to.
pub fn msg_subjects(workspace: &str) -> String {
    format!("{}.*", msg_prefix(workspace))
}

fn msg_prefix(workspace: &str) -> String {
    format!("arw.cluster.{workspace}.msg")
}

/// The federation bus over NATS.
#[derive(Debug)]
pub struct NatsBus {
    client: async_nats::Client,
    url: String,
    msg_subject: String,
    sync_subject: String,
    inbox: String,
    /// Envelopes from the message subject, checked by [`check_messages`].
    messages: mpsc::Receiver<Checked>,
    requests: async_nats::Subscriber,
    answers: async_nats::Subscriber,
    /// Dispatch envelopes (jobs) for this node, checked by [`check_jobs`].
    jobs: mpsc::Receiver<(Vec<u8>, OpenedJob)>,
    workspace: String,
    /// Dispatch envelopes nobody took.
    undelivered: (mpsc::UnboundedSender<PeerId>, mpsc::UnboundedReceiver<PeerId>),
    links: mpsc::UnboundedReceiver<bool>,
    connected: bool,
}

/// The subject a node's dispatch envelopes (jobs) go to.
pub fn jobs_subject(workspace: &str, peer: &PeerId) -> String {
    format!("arw.jobs.{workspace}.{peer}")
}

/// A dispatch envelope not answered within this long counts as undelivered.
const JOB_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

impl NatsBus {
    /// Subscribes to the workspace's subjects on an existing connection.
    pub async fn start(
        client: async_nats::Client,
        links: mpsc::UnboundedReceiver<bool>,
        url: &str,
        workspace: &str,
        peer: PeerId,
    ) -> Result<Self, String> {
        let msg_subject = msg_subject(workspace, &peer);
        let sync_subject = format!("arw.cluster.{workspace}.sync");
        let inbox = client.new_inbox();
        let subscribe = |subject: String| {
            let client = client.clone();
            async move {
                client
                    .subscribe(subject.clone())
                    .await
                    .map_err(|e| format!("subscribe {subject}: {e}"))
            }
        };
        let raw = subscribe(msg_subjects(workspace)).await?;
        let (checked, messages) = mpsc::channel(CHECKED_QUEUE);
        tokio::spawn(check_messages(raw, workspace.to_owned(), checked));
        let requests = subscribe(sync_subject.clone()).await?;
        let answers = subscribe(inbox.clone()).await?;
        let raw_jobs = subscribe(jobs_subject(workspace, &peer)).await?;
        let (checked_jobs, jobs) = mpsc::channel(CHECKED_QUEUE);
        tokio::spawn(check_jobs(client.clone(), raw_jobs, workspace.to_owned(), checked_jobs));
        let connected = client.connection_state() == async_nats::connection::State::Connected;
        Ok(Self {
            client,
            url: url.to_owned(),
            msg_subject,
            sync_subject,
            inbox,
            messages,
            requests,
            answers,
            jobs,
            workspace: workspace.to_owned(),
            undelivered: mpsc::unbounded_channel(),
            links,
            connected,
        })
    }

    /// The broker URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The subject this node publishes on.
    pub fn subject(&self) -> String {
        self.msg_subject.clone()
    }

    /// Whether the broker connection is up.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Publishes an envelope. While disconnected the client buffers it.
    pub async fn publish(&mut self, bytes: Vec<u8>) {
        if let Err(e) = self.client.publish(self.msg_subject.clone(), bytes.into()).await {
            tracing::debug!(error = %e, "NATS publish failed");
        }
    }

    /// Asks every node for the adverts this node lacks.
    pub async fn request_sync(&mut self, request: &SyncRequest) {
        let body = serde_json::to_vec(request).unwrap_or_default();
        let sent = self
            .client
            .publish_with_reply(self.sync_subject.clone(), self.inbox.clone(), body.into())
            .await;
        if let Err(e) = sent {
            tracing::debug!(error = %e, "NATS sync request failed");
        }
    }

    /// Sends a dispatch envelope to the node behind `peer` (request-reply: "no responders"
    /// reports it undelivered; a missing answer proves nothing and is left to the core's
    /// timers).
    pub fn send_job(&mut self, peer: PeerId, bytes: Vec<u8>) {
        let client = self.client.clone();
        let subject = jobs_subject(&self.workspace, &peer);
        let undelivered = self.undelivered.0.clone();
        tokio::spawn(async move {
            let sent =
                tokio::time::timeout(JOB_REQUEST_TIMEOUT, client.request(subject, bytes.into()));
            if !matches!(sent.await, Ok(Ok(_))) {
                let _ = undelivered.send(peer);
            }
        });
    }

    /// Answers a sync request on its reply subject.
    pub async fn respond(&mut self, subject: String, response: &SyncResponse) {
        let body = serde_json::to_vec(response).unwrap_or_default();
        if let Err(e) = self.client.publish(subject, body.into()).await {
            tracing::debug!(error = %e, "NATS sync answer failed");
        }
    }

    /// The next event.
    pub async fn next(&mut self) -> TransportEvent {
        tokio::select! {
            Some(up) = self.links.recv() => {
                // The client reports every attempt; only changes matter.
                if up == self.connected {
                    return TransportEvent::Internal;
                }
                self.connected = up;
                TransportEvent::Link(up)
            }
            Some((bytes, opened)) = self.messages.recv() => {
                TransportEvent::Message { bytes, via: Inbound::Broker, opened: Some(Box::new(opened)) }
            }
            Some(message) = self.requests.next() => {
                match (serde_json::from_slice::<SyncRequest>(&message.payload), message.reply) {
                    (Ok(request), Some(reply)) => {
                        TransportEvent::SyncRequest { from: None, request, reply: SyncReply::Subject(reply.to_string()) }
                    }
                    _ => TransportEvent::Internal,
                }
            }
            Some((bytes, opened)) = self.jobs.recv() => {
                TransportEvent::JobMessage { bytes, from: None, opened: Some(Box::new(opened)) }
            }
            Some(peer) = self.undelivered.1.recv() => TransportEvent::JobUndelivered(peer),
            Some(message) = self.answers.next() => {
                match serde_json::from_slice::<SyncResponse>(&message.payload) {
                    Ok(response) => TransportEvent::SyncResponse { from: None, response },
                    Err(_) => TransportEvent::Internal,
                }
            }
            else => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_rewrites_the_scheme() {
        let mut c = NatsConfig {
            url: "nats://broker:4222".into(),
            tls: true,
            user: None,
            pass: None,
            connect_retries: 0,
            connect_backoff: Duration::ZERO,
            name: "t".into(),
        };
        assert_eq!(c.effective_url(), "tls://broker:4222");
        c.url = "ws://broker".into();
        assert_eq!(c.effective_url(), "wss://broker");
        c.tls = false;
        assert_eq!(c.effective_url(), "ws://broker");
    }
}
