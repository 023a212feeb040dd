//! Randomised histories of the Home's policy documents over an in-memory network: crashes and
//! restarts (from what was persisted), partitions and heals, delayed, duplicated, reordered and
//! lost deliveries, a rogue Home and forged documents. Whatever happens, no worker applies a
//! document not signed by its pinned Home or not newer than one it applied (restarts
//! included), and once the faults stop every worker converges on the Home's latest epoch.
//!
//! The default run checks 1,000 schedules; for the long run:
//! `PROPTEST_CASES=100000 cargo test --release -p arw-p2p --test policy_props`.

use std::collections::BTreeMap;

use proptest::prelude::*;

use arw_p2p::{
    cluster::Advert,
    identity::NodeKey,
    membership::{Change, MembershipConfig},
    node_id::NodeId,
    policy::{PolicyContent, StoredPolicy},
    protocol::Protocol,
    role::Role,
    wire::{self, Message},
};

const WORKERS: usize = 4;
const NOW: u64 = 1_800_000_000_000;

#[derive(Debug, Clone)]
enum Op {
    /// The Home signs a new document admitting the workers in the mask.
    Issue(u8),
    /// The rogue signs a document (with a high epoch) admitting only itself.
    Rogue(u8),
    /// Someone alters the Home's latest document (one byte) and sends it.
    Forge(usize),
    /// Deliver the in-flight message at this position (so: any order, any delay).
    Deliver(usize),
    Duplicate(usize),
    Drop(usize),
    Crash(usize),
    Restart(usize),
    /// The Home crashes and restarts from its persisted state.
    HomeRestart,
    Partition(usize),
    Heal(usize),
    /// Worker asks a peer (0 = the Home, else a worker) for what it lacks.
    Sync(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => any::<u8>().prop_map(Op::Issue),
        1 => (1u8..=u8::MAX).prop_map(Op::Rogue),
        1 => any::<usize>().prop_map(Op::Forge),
        8 => any::<usize>().prop_map(Op::Deliver),
        2 => any::<usize>().prop_map(Op::Duplicate),
        2 => any::<usize>().prop_map(Op::Drop),
        1 => (0..WORKERS).prop_map(Op::Crash),
        1 => (0..WORKERS).prop_map(Op::Restart),
        1 => Just(Op::HomeRestart),
        1 => (0..WORKERS).prop_map(Op::Partition),
        1 => (0..WORKERS).prop_map(Op::Heal),
        2 => (0..WORKERS, 0..=WORKERS).prop_map(|(w, from)| Op::Sync(w, from)),
    ]
}

struct Worker {
    key: NodeKey,
    id: NodeId,
    configured: bool,
    /// In memory; `None` while crashed.
    live: Option<Protocol>,
    /// What survives a crash (written after every change, as the actor does).
    disk: StoredPolicy,
    partitioned: bool,
    /// The highest epoch this worker ever applied (across restarts).
    applied: u64,
}

struct World {
    home_key: NodeKey,
    home: Protocol,
    /// The Home's advert (role root): what an unpinned worker needs to know before it pins.
    home_advert: Vec<u8>,
    home_disk: StoredPolicy,
    rogue: Protocol,
    workers: Vec<Worker>,
    /// In flight: (worker index, envelope).
    flight: Vec<(usize, Vec<u8>)>,
    roster: BTreeMap<NodeId, String>,
}

fn roster_only(roster: BTreeMap<NodeId, String>) -> PolicyContent {
    PolicyContent { roster, ..PolicyContent::default() }
}

fn protocol(key: &NodeKey, id: &NodeId, home_key: Option<[u8; 32]>) -> Protocol {
    let mut config = MembershipConfig::new("lab");
    config.home_key = home_key;
    // The unconfigured half trusts the first Home that admits it (`trust_first_home`).
    config.trust_first_home = true;
    Protocol::new(key.clone(), id.clone(), config, 0)
}

impl World {
    fn new() -> Self {
        let home_key = NodeKey::from_secret([200; 32]);
        let home_id = NodeId::parse("home").expect("id");
        let rogue_key = NodeKey::from_secret([201; 32]);
        let mut home = protocol(&home_key, &home_id, None);
        let mut advert = Advert::basic(home_id.clone(), "lab", home.next_seq(NOW), NOW);
        advert.role = Role::Root;
        let home_advert = home.seal_advert(&advert);
        let workers = (0..WORKERS)
            .map(|i| {
                let key = NodeKey::from_secret([i as u8 + 1; 32]);
                let id = NodeId::parse(&format!("w{i}")).expect("id");
                // Half pin the Home by configuration, half on first admission.
                let configured = i % 2 == 0;
                let pin = configured.then(|| home_key.verifying_key().to_bytes());
                let mut live = protocol(&key, &id, pin);
                live.receive(&home_advert, NOW);
                let live = Some(live);
                Worker {
                    key,
                    id,
                    configured,
                    live,
                    disk: StoredPolicy::default(),
                    partitioned: false,
                    applied: 0,
                }
            })
            .collect();
        Self {
            home,
            home_advert,
            home_key,
            home_disk: StoredPolicy::default(),
            rogue: protocol(&rogue_key, &NodeId::parse("home").expect("id"), None),
            workers,
            flight: Vec::new(),
            roster: BTreeMap::new(),
        }
    }

    fn broadcast(&mut self, envelope: &[u8]) {
        for w in 0..WORKERS {
            if !self.workers[w].partitioned {
                self.flight.push((w, envelope.to_vec()));
            }
        }
    }

    fn issue(&mut self, mask: u8) {
        self.roster = self
            .workers
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, w)| (w.id.clone(), w.key.public_b64()))
            .collect();
        let (envelope, _) = self.home.issue_policy(roster_only(self.roster.clone()), NOW);
        self.home_disk = self.home.policy().stored();
        self.broadcast(&envelope);
    }

    fn home_restart(&mut self) {
        let mut home = protocol(&self.home_key, &NodeId::parse("home").expect("id"), None);
        home.policy_mut().restore(self.home_disk.clone());
        self.home = home;
    }

    fn rogue(&mut self, jump: u8) {
        for _ in 0..jump % 4 {
            self.rogue.issue_policy(roster_only(BTreeMap::new()), NOW);
        }
        let (envelope, _) = self.rogue.issue_policy(roster_only(BTreeMap::new()), NOW);
        self.broadcast(&envelope);
    }

    fn forge(&mut self, at: usize) {
        let Some(current) = self.home.policy().current() else { return };
        let mut forged = current.envelope.clone();
        let i = at % forged.len();
        forged[i] ^= 0x01;
        self.broadcast(&forged);
    }

    fn deliver(&mut self, w: usize, envelope: &[u8]) -> Result<(), TestCaseError> {
        let home_public = self.home_key.verifying_key().to_bytes();
        let worker = &mut self.workers[w];
        if worker.partitioned {
            return Ok(());
        }
        let Some(live) = worker.live.as_mut() else { return Ok(()) };
        let receipt = live.receive(envelope, NOW);
        for change in receipt.changes {
            let Change::Policy(applied) = change else { continue };
            let current = live.policy().current().expect("applied means current");
            let signer = match wire::open(&current.envelope, "lab") {
                Ok(wire::Opened { key, message: Message::Policy(_) }) => key.to_bytes(),
                other => {
                    return Err(TestCaseError::fail(format!(
                        "applied an unopenable document: {other:?}"
                    )));
                }
            };
            prop_assert_eq!(signer, home_public, "applied a document not signed by the Home");
            prop_assert_eq!(Some(signer), live.policy().pin().map(|p| p.key), "not the pinned key");
            prop_assert!(
                applied.epoch > worker.applied,
                "epoch {} after {}",
                applied.epoch,
                worker.applied
            );
            worker.applied = applied.epoch;
            worker.disk = live.policy().stored();
        }
        Ok(())
    }

    fn sync(&mut self, w: usize, from: usize) -> Result<(), TestCaseError> {
        let Some(request) = self.workers[w].live.as_ref().map(Protocol::sync_request) else {
            return Ok(());
        };
        let answer = if from == 0 {
            self.home.sync_answer(&request, true)
        } else {
            let peer = &self.workers[from - 1];
            if peer.partitioned || self.workers[w].partitioned {
                return Ok(());
            }
            peer.live.as_ref().and_then(|p| p.sync_answer(&request, true))
        };
        for envelope in answer.map(|a| a.envelopes).unwrap_or_default() {
            self.deliver(w, envelope.as_bytes())?;
        }
        Ok(())
    }

    fn restart(&mut self, w: usize) -> Result<(), TestCaseError> {
        let home_public = self.home_key.verifying_key().to_bytes();
        let worker = &mut self.workers[w];
        if worker.live.is_some() {
            return Ok(());
        }
        let pin = worker.configured.then_some(home_public);
        let mut live = protocol(&worker.key, &worker.id, pin);
        // The registry survives restarts (cluster_nodes.json): the Home's advert is known.
        live.receive(&self.home_advert, NOW);
        prop_assert_eq!(live.policy_mut().restore(worker.disk.clone()), None);
        prop_assert_eq!(live.policy().epoch(), worker.applied, "restart lost or invented an epoch");
        worker.live = Some(live);
        Ok(())
    }

    fn step(&mut self, op: Op) -> Result<(), TestCaseError> {
        let pick = |n: usize, len: usize| (len > 0).then(|| n % len);
        match op {
            Op::Issue(mask) => self.issue(mask),
            Op::Rogue(jump) => self.rogue(jump),
            Op::Forge(at) => self.forge(at),
            Op::Deliver(n) => {
                if let Some(i) = pick(n, self.flight.len()) {
                    let (w, envelope) = self.flight.remove(i);
                    self.deliver(w, &envelope)?;
                }
            }
            Op::Duplicate(n) => {
                if let Some(i) = pick(n, self.flight.len()) {
                    let copy = self.flight[i].clone();
                    self.flight.push(copy);
                }
            }
            Op::Drop(n) => {
                if let Some(i) = pick(n, self.flight.len()) {
                    self.flight.remove(i);
                }
            }
            Op::Crash(w) => self.workers[w].live = None,
            Op::Restart(w) => self.restart(w)?,
            Op::HomeRestart => self.home_restart(),
            Op::Partition(w) => self.workers[w].partitioned = true,
            Op::Heal(w) => self.workers[w].partitioned = false,
            Op::Sync(w, from) => self.sync(w, from)?,
        }
        Ok(())
    }

    /// Faults stop: everyone is up and connected, the Home admits everyone, whatever is in
    /// flight arrives, and each worker syncs with the Home once.
    fn settle(&mut self) -> Result<(), TestCaseError> {
        for w in 0..WORKERS {
            self.workers[w].partitioned = false;
            self.restart(w)?;
        }
        self.issue(u8::MAX);
        for (w, envelope) in std::mem::take(&mut self.flight) {
            self.deliver(w, &envelope)?;
        }
        for w in 0..WORKERS {
            self.sync(w, 0)?;
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1_000, ..ProptestConfig::default() })]

    #[test]
    fn workers_obey_only_their_home_and_converge_after_faults(ops in prop::collection::vec(op(), 1..80)) {
        let mut world = World::new();
        for op in ops {
            world.step(op)?;
        }
        world.settle()?;
        let latest = world.home.policy().epoch();
        for worker in &world.workers {
            let live = worker.live.as_ref().expect("restarted");
            prop_assert_eq!(live.policy().epoch(), latest, "{} did not converge", worker.id);
            prop_assert_eq!(
                live.policy().pin().map(|p| p.key),
                Some(world.home_key.verifying_key().to_bytes())
            );
        }
    }
}
