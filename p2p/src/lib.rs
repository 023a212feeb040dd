//! arw-p2p: the federation core. Node identity, the hierarchy state machine, adverts and the
//! registry, and the node actor that owns them. No HTTP, no CLI parsing, no process environment.

pub mod admission;
pub mod capsule;
pub mod cluster;
pub mod core;
pub mod events;
pub mod governor;
pub mod hierarchy;
pub mod identity;
pub mod jobs;
pub mod limit;
pub mod membership;
pub mod node;
pub mod node_id;
pub mod persist;
pub mod policy;
pub mod protocol;
pub mod role;
pub mod runtimes;
pub mod time;
pub mod transport;
pub mod wire;

pub use libp2p::{Multiaddr, PeerId, multiaddr};
pub use transport::{nats, net};
