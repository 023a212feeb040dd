//! What the core does with what the bus brings: messages and their verdicts, syncs, probes and
//! their answers, connections coming and going, and the membership changes all that causes.

use std::ops::Bound::{Excluded, Unbounded};

use libp2p::PeerId;

use super::{
    Bus, Effect, NodeCore, REDIAL_EVERY_MS, REDIAL_FOR_MS, ReplyTo, SYNC_RETRY_MS, advert_event,
    node_changed,
};
use crate::{
    cluster::{Advert, Health},
    events::{self, Event},
    membership::{Change, Probe, Receipt, Verdict},
    protocol::{SyncRequest, SyncResponse},
    transport::{Inbound, net::topic_name},
    wire::{self, Reason},
};

impl NodeCore {
    pub(super) fn on_message(
        &mut self,
        bytes: Vec<u8>,
        via: Inbound,
        opened: Option<Box<Result<wire::Opened, Reason>>>,
        now: u64,
    ) {
        let source = match &via {
            Inbound::Gossip { source, .. } => Some(*source),
            Inbound::Broker => None,
        };
        let opened = match source {
            Some(source) => match self.open_unless_shed(&bytes, source, opened, now) {
                Some(opened) => opened,
                None => {
                    self.counters.shed += 1;
                    self.out.push(Effect::Validate { via, verdict: Verdict::Shed });
                    return;
                }
            },
            // Shed on the transport's own task, before its check.
            None => opened.map_or_else(|| wire::open(&bytes, &self.workspace), |o| *o),
        };
        let may_add = self.newcomers.has_room(source, now);
        let receipt = self.protocol.receive_from(opened, &bytes, now, may_add);
        if receipt.changes.iter().any(|c| matches!(c, Change::Advert { first: true, .. })) {
            self.newcomers.charge(source, now);
        }
        self.counters.received += 1;
        if matches!(via, Inbound::Gossip { .. }) {
            self.out.push(Effect::Validate { via, verdict: receipt.verdict });
        }
        self.on_receipt(receipt, source, now);
    }

    /// Checks a gossip message's signature (unless the executor did: `opened`) unless the key
    /// it claims sends too much, or `source` too many keys never seen valid (see
    /// [`crate::transport::shed::Shedder`]): `None`, shed. Invalid messages are not shed here:
    /// each is rejected, and the peer soon cut off.
    fn open_unless_shed(
        &mut self,
        bytes: &[u8],
        source: PeerId,
        opened: Option<Box<Result<wire::Opened, Reason>>>,
        now: u64,
    ) -> Option<Result<wire::Opened, Reason>> {
        let key = wire::claimed_key(bytes);
        self.shedder.before(key, Some(source), now).ok()?;
        let opened = opened.map_or_else(|| wire::open(bytes, &self.workspace), |o| *o);
        if opened.is_ok() {
            self.shedder.after(key, true, now).ok()?;
        }
        Some(opened)
    }

    fn on_receipt(&mut self, mut receipt: Receipt, source: Option<PeerId>, now: u64) {
        // Even a heartbeat that changes no health moves `last_seen`.
        self.snapshot_dirty |= receipt.verdict == Verdict::Accept;
        let behind = receipt.changes.iter().any(|c| matches!(c, Change::PolicyBehind { .. }));
        receipt.changes.retain(|c| !matches!(c, Change::PolicyBehind { .. }));
        if behind {
            // A peer holds a newer policy: ask whoever forwarded it (libp2p) or everyone (NATS).
            self.ask_sync(source, false, now);
        }
        self.apply_changes(receipt.changes, now);

        let Some(refusal) = receipt.refusal else { return };
        self.counters.refuse(refusal.reason);
        if refusal.reason == Reason::UnknownNode {
            // A heartbeat from a node whose advert never reached us: ask the forwarder (libp2p)
            // or everyone (NATS).
            self.ask_sync(source, false, now);
            return;
        }
        tracing::debug!(reason = refusal.reason.as_str(), kind = refusal.kind, claimed = ?refusal.claimed_id, "message refused");
        if let Some(suppressed) = self.rejections.admit(now) {
            self.emit(Event::MessageRejected(events::Rejected {
                subject: self.subject(),
                kind: refusal.kind.to_owned(),
                reason: refusal.reason.as_str().to_owned(),
                claimed_id: refusal.claimed_id,
                suppressed: (suppressed > 0).then_some(suppressed),
            }));
        }
    }

    /// The gossip topic or broker subject messages arrive on.
    fn subject(&self) -> String {
        match self.bus {
            Some(Bus::Broker) => crate::transport::nats::msg_subjects(&self.workspace),
            _ => topic_name(&self.workspace),
        }
    }

    /// A peer of this workspace connected. A node that was alone says who it is (its boot
    /// advert reached nobody) and asks the peer for everything; a node that has lost nodes asks
    /// too (after a partition, that is how both sides learn the other is back). Otherwise the
    /// gossip already carried everything, and a sync would only repeat it.
    pub(super) fn on_connected(&mut self, peer: PeerId, now: u64) {
        self.snapshot_dirty = true;
        let alone = self.connected.is_empty();
        self.connected.insert(peer);
        if alone {
            // A fresh advert: gossip would drop a copy of one it has sent before.
            self.advertise("connected", now, |_, _| {});
            self.ask_sync(Some(peer), true, now);
        } else if !self.protocol.membership().lost().is_empty() {
            self.ask_sync(Some(peer), false, now);
        }
    }

    /// The last connection to a peer closed. Closed by this node, or by a peer this node does
    /// not watch, it means nothing (idle connections close, peers restart, and the node's
    /// watchers will judge it). A node this node watches keeps its connection busy with probes:
    /// when it closes, the node is most likely gone, and everyone is told at once.
    pub(super) fn on_disconnected(&mut self, peer: PeerId, ours: bool, now: u64) {
        self.snapshot_dirty = true;
        self.connected.remove(&peer);
        let membership = self.protocol.membership();
        if !ours && membership.id_of_peer(&peer).is_some_and(|id| membership.is_watched(id)) {
            self.on_unreachable(peer, now);
        }
    }

    /// A peer could not be reached at all (its process is gone), or the connection to a
    /// watched node closed: tell everyone, so they suspect the node now rather than after
    /// seconds of silence. At most once per node per [`SYNC_RETRY_MS`].
    pub(super) fn on_unreachable(&mut self, peer: PeerId, now: u64) {
        self.connected.remove(&peer);
        let Some(target) = self.protocol.membership().id_of_peer(&peer).cloned() else { return };
        if self.reported.get(&target).is_some_and(|t| now.saturating_sub(*t) < SYNC_RETRY_MS) {
            return;
        }
        self.reported.insert(target.clone(), now);
        let change = self.protocol.suspect(&target, now);
        self.apply_changes(change.into_iter().collect(), now);
    }

    /// Every [`super::SYNC_EVERY_MS`]: a sync with one connected peer, in turn, repairs
    /// whatever the gossip missed.
    pub(super) fn anti_entropy(&mut self, now: u64) {
        let next = match self.sync_turn {
            Some(last) => self.connected.range((Excluded(last), Unbounded)).next(),
            None => None,
        }
        .or_else(|| self.connected.iter().next())
        .copied();
        if let Some(peer) = next {
            self.sync_turn = Some(peer);
            self.ask_sync(Some(peer), false, now);
        }
    }

    /// The broker link came up or went away. While away this node hears nobody: nobody is
    /// judged until it is back, and the silence before that is not held against anyone.
    pub(super) fn on_link(&mut self, up: bool, now: u64) {
        self.snapshot_dirty = true;
        self.linked = up;
        let broker = self.broker.clone();
        if !up {
            tracing::warn!("bus disconnected; reconnecting");
            self.emit(Event::BusDisconnected(events::Broker { broker }));
            return;
        }
        tracing::info!("bus connected");
        self.protocol.membership_mut().resume(now);
        self.emit(Event::BusConnected(events::Broker { broker }));
        // Whatever was missed while away: the others' adverts, and ours to them.
        self.ask_sync(None, true, now);
        if let Some(own) = self.protocol.own_advert() {
            self.out.push(Effect::Publish(own.to_vec()));
        }
    }

    /// Sends the asker what it lacks: everything known over libp2p (it asked one peer), only
    /// this node's own advert over NATS (every node answers). A probe is answered at once (with
    /// proof when asked, which also goes to everyone). Nodes the asker has lost but this node
    /// holds `ok` are asked for proof of life. A probe from a node never heard of means its
    /// advert missed us: ask it.
    pub(super) fn on_sync_request(
        &mut self,
        from: Option<PeerId>,
        request: SyncRequest,
        reply: ReplyTo,
        now: u64,
    ) {
        if self.bus.is_none() {
            return;
        }
        if request.probe {
            let response = self.protocol.answer_probe(request.proof, now);
            self.out.push(Effect::Respond { to: reply, response });
            if let Some(peer) = from
                && self.protocol.membership().id_of_peer(&peer).is_none()
            {
                self.ask_sync(Some(peer), false, now);
            }
            return;
        }
        let everything = self.bus == Some(Bus::Mesh);
        if let Some(response) = self.protocol.sync_answer(&request, everything) {
            self.out.push(Effect::Respond { to: reply, response });
        }
        // One proof per node per heartbeat interval, however many ask: whoever gets it passes
        // it on.
        let interval = self.beat_every_ms;
        let vouched = &mut self.vouched;
        vouched.retain(|_, at| now.saturating_sub(*at) < interval);
        let probes: Vec<Probe> = self
            .protocol
            .vouch(&request, now)
            .into_iter()
            .filter(|p| vouched.insert(p.id.clone(), now).is_none())
            .collect();
        self.send_probes(probes);
    }

    /// A peer answered a sync request or a probe. Any answer is a sign of life of the peer (the
    /// connection authenticates it).
    pub(super) fn on_answer(&mut self, from: Option<PeerId>, response: SyncResponse, now: u64) {
        let before = self.out.len();
        self.receive_answer(from, response, now);
        // A sync answer can name every node at once, in id order; dialled in that order, every
        // newcomer would dial the same first few. Each node orders them its own way instead.
        let key = self.key.verifying_key().to_bytes();
        let rank = |effect: &Effect| match effect {
            Effect::Dial(addrs) => {
                use sha2::{Digest, Sha256};
                let digest =
                    Sha256::new().chain_update(key).chain_update(addrs.join(" ")).finalize();
                u64::from_be_bytes(digest[..8].try_into().unwrap_or_default())
            }
            _ => 0,
        };
        let mut dials: Vec<Effect> = Vec::new();
        let mut rest: Vec<Effect> = Vec::new();
        for effect in self.out.drain(before..) {
            if matches!(effect, Effect::Dial(_)) { dials.push(effect) } else { rest.push(effect) }
        }
        dials.sort_by_cached_key(rank);
        self.out.extend(rest);
        self.out.extend(dials);
    }

    fn receive_answer(&mut self, from: Option<PeerId>, response: SyncResponse, now: u64) {
        if let Some(id) = from.and_then(|p| self.protocol.membership().id_of_peer(&p).cloned()) {
            self.snapshot_dirty = true;
            if self.protocol.probe_answered(&id, response.policy_epoch, now) {
                self.ask_sync(from, false, now);
            }
        }
        for envelope in response.envelopes {
            let receipt = self.protocol.receive(envelope.as_bytes(), now);
            self.counters.received += 1;
            // News that came by request (a node back, an advert this node lacked) may be news
            // to others too, whom the author's own flood did not reach (it was cut off, or
            // alone): pass it on. Gossip drops it wherever it is already known.
            let news = receipt.changes.iter().any(|c| {
                matches!(c, Change::Advert { .. } | Change::Health { to: Health::Ok, .. })
            });
            if news && receipt.verdict == Verdict::Accept {
                self.out.push(Effect::Publish(envelope.into_bytes()));
            }
            self.on_receipt(receipt, from, now);
        }
    }

    pub(super) fn on_addresses(&mut self, addresses: Vec<String>, now: u64) {
        if addresses == self.addresses {
            return;
        }
        self.addresses = addresses;
        if self.local.is_some() {
            self.advertise("addresses", now, |_, _| {});
        }
    }

    /// Asks for what this node lacks: from `peer` (libp2p) or from everyone (NATS). Unless
    /// `force`d, at most once per peer per [`SYNC_RETRY_MS`].
    pub(super) fn ask_sync(&mut self, peer: Option<PeerId>, force: bool, now: u64) {
        if self.bus.is_none() || (self.bus == Some(Bus::Mesh) && peer.is_none()) {
            return;
        }
        let last = self.sync_asked.get(&peer);
        if !force && last.is_some_and(|t| now.saturating_sub(*t) < SYNC_RETRY_MS) {
            return;
        }
        self.sync_asked.insert(peer, now);
        self.counters.syncs += 1;
        let request = self.protocol.sync_request();
        self.out.push(Effect::Request { peer, request });
    }

    /// Once per heartbeat period: probe the watched nodes (probe mode), or tell everyone this
    /// node is alive (broadcast mode).
    pub(super) fn on_beat(&mut self, now: u64) {
        if self.protocol.membership().config().observers.is_none() {
            let beat = self.protocol.heartbeat(now);
            self.out.push(Effect::Publish(beat));
            return;
        }
        let probes = self.protocol.probes();
        self.send_probes(probes);
    }

    /// Probes `probes` now (each answer comes back as a sync response).
    fn send_probes(&mut self, probes: Vec<Probe>) {
        let policy_epoch = self.protocol.policy().epoch();
        for probe in probes {
            let Some(peer) = probe.peer else { continue };
            let request =
                SyncRequest { probe: true, proof: probe.proof, policy_epoch, ..Default::default() };
            self.counters.probes += 1;
            self.out.push(Effect::Request { peer: Some(peer), request });
        }
    }

    /// Moves silent nodes along `ok → suspect → down`. While the broker is unreachable this
    /// node cannot hear anyone: the silence is ours, not theirs, so nobody is judged until the
    /// link is back.
    pub(super) fn judge(&mut self, now: u64) {
        if self.linked {
            let changes = self.protocol.tick(now);
            self.apply_changes(changes, now);
        }
    }

    /// Turns membership changes into events and connection decisions, and has readers see the
    /// state at once: a change in health or content is visible as soon as the events are
    /// (plain heartbeats wait for the tick).
    pub(super) fn apply_changes(&mut self, changes: Vec<Change>, now: u64) {
        if changes.is_empty() {
            return;
        }
        self.publish_snapshot();
        let ttl = self.ttl_ms;
        for change in changes {
            match change {
                Change::Advert { id, changed, .. } => {
                    let Some(member) = self.protocol.membership().members().get(&id) else {
                        continue;
                    };
                    let record = member.record.clone();
                    if self.bus.is_some() {
                        self.out.push(Effect::Dial(record.advert.addrs.clone()));
                    }
                    self.check_transport_match(&record.advert);
                    self.check_home_claims();
                    self.emit(advert_event(&record.advert));
                    if changed {
                        self.emit(node_changed(&record, now, ttl, None));
                    }
                }
                Change::Health { id, from, to } => {
                    tracing::info!(node = %id, from = from.as_str(), to = to.as_str(), "node health changed");
                    let Some(member) = self.protocol.membership().members().get(&id) else {
                        continue;
                    };
                    let record = member.record.clone();
                    if to == Health::Down
                        && let Some(peer) = member.peer_id
                        && self.connected.remove(&peer)
                    {
                        // A connection still open to a node judged down over the mesh is
                        // stalled (after a partition TCP would resume only seconds after the
                        // network is back): close it and dial afresh until one gets through.
                        self.counters.resets += 1;
                        self.out.push(Effect::Reset(peer));
                        self.redialling.insert(id.clone(), (now, now));
                    }
                    self.emit(node_changed(&record, now, ttl, Some(from)));
                }
                Change::Evicted { record } => {
                    let mut event = node_changed(&record, now, ttl, None);
                    if let Event::NodeChanged(changed) = &mut event {
                        changed.evicted = true;
                    }
                    self.emit(event);
                }
                Change::Policy(applied) => self.on_policy(applied, now),
                Change::HomeClaim { home, fingerprint, epoch } => {
                    tracing::warn!(
                        %home,
                        %fingerprint,
                        "a Home admitted this node; it is obeyed once an operator trusts it: arw-cli cluster trust-home {fingerprint}"
                    );
                    self.snapshot_dirty = true;
                    self.emit(Event::HomePending(events::HomeTrust {
                        home: Some(home.to_string()),
                        fingerprint: Some(fingerprint),
                        policy_epoch: epoch,
                        trusted: false,
                    }));
                }
                Change::PolicyBehind { .. } => {}
                Change::SelfSuspected { .. } => {
                    tracing::debug!("a report said this node was lost; refuted");
                }
                Change::Conflict { id, known_key, claimed_key } => {
                    tracing::warn!(node = %id, "a message claimed this id with another key");
                    self.emit(Event::NodeConflict(events::KeyConflict {
                        id: id.to_string(),
                        known_key,
                        claimed_key,
                    }));
                }
            }
        }
    }

    /// Every [`REDIAL_EVERY_MS`], for [`REDIAL_FOR_MS`] after it was judged down, dials each
    /// node still down at the addresses it advertised.
    pub(super) fn redial(&mut self, now: u64) {
        let members = self.protocol.membership().members();
        let mut dials = Vec::new();
        self.redialling.retain(|id, (since, last)| {
            let Some(member) = members.get(id) else { return false };
            let still =
                member.record.health == Health::Down && now.saturating_sub(*since) < REDIAL_FOR_MS;
            if still && now.saturating_sub(*last) >= REDIAL_EVERY_MS {
                *last = now;
                if let Some(peer) = member.peer_id {
                    dials.push(Effect::Redial { peer, addrs: member.record.advert.addrs.clone() });
                }
            }
            still
        });
        self.counters.redials += dials.len() as u64;
        self.out.extend(dials);
    }

    /// Reports (once per change) a node whose bus or queue setting differs from ours: such nodes
    /// do not hear each other's broadcasts or share a task queue.
    fn check_transport_match(&mut self, advert: &Advert) {
        let theirs = (advert.bus.clone(), advert.queue.clone());
        if theirs.0 == self.bus_name && theirs.1 == self.queue {
            if self.mismatched.remove(&advert.id).is_some() {
                self.snapshot_dirty = true;
            }
            return;
        }
        if self.mismatched.get(&advert.id) == Some(&theirs) {
            return;
        }
        tracing::warn!(node = %advert.id, bus = %theirs.0, queue = %theirs.1, "node uses another bus or queue");
        let event = Event::BusMismatch(events::BusMismatch {
            id: advert.id.to_string(),
            bus: theirs.0.clone(),
            queue: theirs.1.clone(),
            local_bus: self.bus_name.clone(),
            local_queue: self.queue.clone(),
        });
        self.mismatched.insert(advert.id.clone(), theirs);
        self.snapshot_dirty = true;
        self.emit(event);
    }
}
