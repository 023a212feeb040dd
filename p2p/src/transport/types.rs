//! What the transports and the node actor exchange: events up, replies down, and the
//! transport's status as readers see it.

use libp2p::{PeerId, gossipsub, request_response::ResponseChannel};
use serde::{Deserialize, Serialize};

pub use crate::protocol::{SyncRequest, SyncResponse};

/// How a message arrived, for the validation report.
#[derive(Debug, Clone)]
pub enum Inbound {
    /// Gossip: report the verdict so gossipsub forwards (or not) and scores the forwarder.
    Gossip {
        /// Message id.
        id: gossipsub::MessageId,
        /// The forwarding peer.
        source: PeerId,
    },
    /// From the broker: nothing to report.
    Broker,
}

/// Where a sync answer goes.
#[derive(Debug)]
pub enum SyncReply {
    /// A libp2p request-response channel.
    Peer(ResponseChannel<SyncResponse>),
    /// A NATS reply subject.
    Subject(String),
}

/// What the node actor needs to know.
#[derive(Debug)]
pub enum TransportEvent {
    /// A message to validate.
    Message {
        /// The envelope bytes.
        bytes: Vec<u8>,
        /// How it came.
        via: Inbound,
        /// The envelope already checked by the transport, off the node's own task (NATS).
        opened: Option<Box<Result<crate::wire::Opened, crate::wire::Reason>>>,
    },
    /// A peer of this workspace is connected (libp2p: it subscribed to the topic).
    Connected(PeerId),
    /// The last connection to such a peer closed (libp2p).
    Disconnected {
        /// The peer.
        peer: PeerId,
        /// This node closed it (on purpose, or as idle): it says nothing about the peer.
        ours: bool,
    },
    /// A request to a peer failed because it could not be reached at all (libp2p).
    Unreachable(PeerId),
    /// The broker connection came up (`true`) or went away (NATS).
    Link(bool),
    /// Someone asks for adverts.
    SyncRequest {
        /// The asking peer (libp2p).
        from: Option<PeerId>,
        /// What they have.
        request: SyncRequest,
        /// Where the answer goes.
        reply: SyncReply,
    },
    /// Adverts we asked for.
    SyncResponse {
        /// The answering peer (libp2p).
        from: Option<PeerId>,
        /// The adverts.
        response: SyncResponse,
    },
    /// A dispatch envelope (jobs) arrived.
    JobMessage {
        /// The envelope.
        bytes: Vec<u8>,
        /// The sending peer (libp2p).
        from: Option<PeerId>,
        /// The envelope already checked by the transport, off the node's task (NATS).
        opened: Option<Box<crate::jobs::message::Opened>>,
    },
    /// A dispatch envelope to this peer was not delivered.
    JobUndelivered(PeerId),
    /// Listen addresses changed.
    Listening,
    /// Handled inside the transport.
    Internal,
}

/// A node whose advertised bus or queue differs from this node's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Mismatch {
    /// The node.
    pub id: String,
    /// Its bus.
    pub bus: String,
    /// Its queue.
    pub queue: String,
}

/// The transport as readers see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NetworkStatus {
    /// `disabled` (single node), `no_peers` (listening, nobody connected yet) or `connected`.
    pub state: String,
    /// `local` (libp2p) or `nats`.
    pub bus: String,
    /// The gossip topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Listen addresses with `/p2p/<peer id>`.
    pub listen: Vec<String>,
    /// Directly connected peers (libp2p).
    pub connected_peers: usize,
    /// The broker URL (NATS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    /// This node's queue setting.
    #[serde(default)]
    pub queue: String,
    /// Nodes advertising another bus or queue (they miss each other's broadcasts).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mismatched: Vec<Mismatch>,
}
