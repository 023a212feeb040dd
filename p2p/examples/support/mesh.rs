//! A hostile member of the mesh: a bare libp2p swarm with gossipsub as the nodes run it
//! (anonymous, content-addressed ids), for the mesh flood example and the tests that check a
//! node cuts such a peer off.

use libp2p::{Swarm, SwarmBuilder, gossipsub, noise, tcp, yamux};
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};

use arw_p2p::{Multiaddr, transport::net::topic_name, wire};

/// A swarm under a new identity, dialled to `addrs` and subscribed to `workspace`'s topic (with
/// its gossipsub's metrics in `metrics`, when given), and that topic.
pub fn attacker(
    addrs: &[Multiaddr],
    workspace: &str,
    metrics: Option<&mut Registry>,
) -> (Swarm<gossipsub::Behaviour>, gossipsub::IdentTopic) {
    let topic = gossipsub::IdentTopic::new(topic_name(workspace));
    let mut swarm = SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
        .expect("tcp")
        .with_behaviour(|_| {
            let config = gossipsub::ConfigBuilder::default()
                .validation_mode(gossipsub::ValidationMode::Anonymous)
                .message_id_fn(|m: &gossipsub::Message| {
                    gossipsub::MessageId::from(Sha256::digest(&m.data).to_vec())
                })
                .max_transmit_size(wire::MAX_ENVELOPE + 1024)
                .build()
                .expect("gossipsub config");
            let behaviour =
                gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, config)
                    .expect("gossipsub");
            match metrics {
                Some(registry) => {
                    behaviour.with_metrics(registry, gossipsub::MetricsConfig::default())
                }
                None => behaviour,
            }
        })
        .expect("behaviour")
        .build();
    swarm.behaviour_mut().subscribe(&topic).expect("subscribe");
    for addr in addrs {
        swarm.dial(addr.clone()).expect("dial");
    }
    (swarm, topic)
}
