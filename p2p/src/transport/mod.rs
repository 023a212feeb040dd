//! The buses a node can federate over, behind one type the node actor drives: the libp2p mesh
//! ([`Net`]) or a NATS broker ([`NatsBus`]). Both carry the same signed envelopes; the membership
//! core decides what is accepted either way.

pub mod nats;
pub mod net;
pub mod shed;
pub mod types;

use crate::membership::Verdict;
use libp2p::PeerId;
use nats::NatsBus;
use net::Net;
pub use types::{
    Inbound, Mismatch, NetworkStatus, SyncReply, SyncRequest, SyncResponse, TransportEvent,
};

/// The node's bus.
#[derive(Debug)]
pub enum Transport {
    /// Broker-less libp2p mesh.
    Libp2p(Box<Net>),
    /// NATS broker.
    Nats(Box<NatsBus>),
}

impl Transport {
    /// The next event.
    pub async fn next(&mut self) -> TransportEvent {
        match self {
            Transport::Libp2p(net) => net.next().await,
            Transport::Nats(bus) => bus.next().await,
        }
    }

    /// Sends a signed envelope to the workspace.
    pub async fn publish(&mut self, bytes: Vec<u8>) {
        match self {
            Transport::Libp2p(net) => {
                net.publish(bytes);
            }
            Transport::Nats(bus) => bus.publish(bytes).await,
        }
    }

    /// Reports a message's verdict where the transport cares.
    pub fn report(&mut self, via: &Inbound, verdict: Verdict) {
        if let (Transport::Libp2p(net), Inbound::Gossip { id, source }) = (self, via) {
            net.report(id, source, verdict);
        }
    }

    /// Asks for adverts: one peer on libp2p, everyone on NATS.
    pub async fn request_sync(&mut self, peer: Option<PeerId>, request: SyncRequest) {
        match self {
            Transport::Libp2p(net) => {
                if let Some(peer) = peer {
                    net.request_sync(&peer, request);
                }
            }
            Transport::Nats(bus) => bus.request_sync(&request).await,
        }
    }

    /// Sends a dispatch envelope to one node.
    pub async fn send_job(&mut self, peer: PeerId, bytes: Vec<u8>) {
        match self {
            Transport::Libp2p(net) => net.send_job(&peer, bytes),
            Transport::Nats(bus) => bus.send_job(peer, bytes),
        }
    }

    /// Answers a sync request.
    pub async fn respond(&mut self, reply: SyncReply, response: SyncResponse) {
        match (self, reply) {
            (Transport::Libp2p(net), SyncReply::Peer(channel)) => {
                net.respond_sync(channel, response)
            }
            (Transport::Nats(bus), SyncReply::Subject(subject)) => {
                bus.respond(subject, &response).await
            }
            _ => {}
        }
    }

    /// Periodic upkeep.
    pub fn maintain(&mut self) {
        if let Transport::Libp2p(net) = self {
            net.maintain();
        }
    }

    /// The node behind `peer` was judged down: drop a stalled connection to it (libp2p; over
    /// NATS there is no per-node connection).
    pub fn reset(&mut self, peer: PeerId) {
        if let Transport::Libp2p(net) = self {
            net.reset(peer);
        }
    }

    /// Dials a node judged down again (libp2p).
    pub fn redial(&mut self, peer: PeerId, addrs: &[String]) {
        if let Transport::Libp2p(net) = self {
            net.redial(peer, addrs.iter().filter_map(|a| a.parse().ok()).collect());
        }
    }

    /// Dials a node's advertised addresses (libp2p).
    pub fn dial_advertised(&mut self, addrs: &[String]) {
        if let Transport::Libp2p(net) = self {
            net.dial_advertised(addrs);
        }
    }

    /// Addresses other nodes can reach this one at.
    pub fn addresses(&self) -> Vec<String> {
        match self {
            Transport::Libp2p(net) => net.addresses(),
            Transport::Nats(_) => Vec::new(),
        }
    }

    /// The transport's state for `/admin/hierarchy/state` (the node fills in its settings).
    pub fn status(&self) -> NetworkStatus {
        match self {
            Transport::Libp2p(net) => NetworkStatus {
                state: if net.connected() == 0 { "no_peers" } else { "connected" }.to_owned(),
                topic: Some(net.topic()),
                listen: net.addresses(),
                connected_peers: net.connected(),
                ..NetworkStatus::default()
            },
            Transport::Nats(nats) => NetworkStatus {
                state: if nats.is_connected() { "connected" } else { "disconnected" }.to_owned(),
                topic: Some(nats.subject()),
                listen: Vec::new(),
                broker: Some(nats.url().to_owned()),
                ..NetworkStatus::default()
            },
        }
    }
}
