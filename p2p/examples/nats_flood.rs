//! Invalid and hostile message floods on the NATS bus against N nodes, each a process of its
//! own as in a deployment, with a baseline before and after every flood: what honest nodes see
//! (advert delivery, false suspicions) and what each node and the broker spend.
//!
//! ```sh
//! cargo run --release -p arw-p2p --example nats_flood -- 5 10000 15
//! ```
//!
//! Arguments: nodes (5), flood messages per second (10,000), seconds per phase (15), and
//! optionally the phases (comma-separated; by default each flood between baselines). Processes:
//! a `nats-server` on a free port; N nodes (this program as `node <i> <url>`), each one node
//! actor with the default liveness settings (heartbeat 1 s, suspect 3 s, down 5 s) on its own
//! runtime, reporting on its stdout the adverts it took in and the honest nodes it judged; for
//! each flood phase a flooder (`flood <kind> <rate> <secs> <url> <n>`); and this one, which
//! publishes the honest traffic: four sources outside the nodes, one valid advert every 50 ms in
//! turn. Delivery is publish → a node's `cluster.node.advertise` event (wall clock, one machine).
//!
//! Floods: `garbage` (3.3 KB of noise); `bad_signature` (a 3.3 KB envelope under a key nobody
//! knows, whose signature does not match); `forged_member` (the same under the key of member
//! w0: a forgery the node cannot shed unchecked without muting w0); `forged_suspicion` (a member
//! that advertised once, then signs reports naming the honest nodes at any position); `sybil`
//! (adverts of fresh keys and ids). Each flood is compared with the baselines either side of it.

#[path = "support/mod.rs"]
mod support;

#[path = "support/hostile.rs"]
mod hostile;

use std::{
    collections::BTreeMap,
    process::Stdio,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use hostile::id;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;

use arw_p2p::{
    cluster::Advert,
    events::EventTx,
    identity::NodeKey,
    membership::MembershipConfig,
    nats::NatsConfig,
    node::{self, BusConfig, FederationConfig, NodeConfig},
    node_id::IdSource,
    time::now_ms,
    wire::{Message, Suspicion, seal},
};

const SUBJECT: &str = "arw.cluster.default.msg";
/// Honest sources outside the nodes.
const SOURCES: usize = 4;
/// One honest advert this often (from the sources in turn).
const HONEST_EVERY: Duration = Duration::from_millis(50);
const PHASES: [&str; 11] = [
    "baseline",
    "garbage",
    "baseline",
    "bad_signature",
    "baseline",
    "forged_member",
    "baseline",
    "forged_suspicion",
    "baseline",
    "sybil",
    "baseline",
];

/// Node `i`'s key: known to this program, so that a flood can forge under it.
fn member_key(i: usize) -> NodeKey {
    NodeKey::from_secret([100 + i as u8; 32])
}

fn unix_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

fn advert(name: &str, seq: u64, tags: usize) -> Message {
    let mut advert = Advert::basic(id(name), "default", seq, now_ms());
    advert.tags = (0..tags).map(|i| format!("{i:02}{}", "x".repeat(70))).collect();
    advert.bus = "nats".into();
    Message::Advert(advert)
}

/// The flood of one phase, made before it starts so that sending costs little.
fn flood(kind: &str, count: usize, honest: usize) -> Vec<Vec<u8>> {
    let rogue = NodeKey::from_secret([77; 32]);
    match kind {
        "garbage" => vec![vec![b'#'; 3_300]],
        "bad_signature" => vec![hostile::bad_signature(&rogue, &advert("w0", u64::MAX / 2, 40))],
        "forged_member" => {
            vec![hostile::bad_signature(&member_key(0), &advert("w0", u64::MAX / 2, 40))]
        }
        "forged_suspicion" => {
            let mut out = vec![seal(&rogue, "default", &advert("liar", 1, 0))];
            out.extend((0..count as u64).map(|i| {
                let report = Suspicion {
                    id: id("liar"),
                    workspace: "default".into(),
                    seq: 1,
                    beat: i + 1,
                    sent_ms: now_ms(),
                    target: id(&format!("w{}", i as usize % honest)),
                    target_seq: u64::MAX,
                    target_beat: u64::MAX,
                };
                seal(&rogue, "default", &Message::Suspect(report))
            }));
            out
        }
        "sybil" => (0..count as u32)
            .map(|i| {
                let mut secret = [9u8; 32];
                secret[..4].copy_from_slice(&i.to_be_bytes());
                seal(&NodeKey::from_secret(secret), "default", &advert(&format!("s{i}"), 1, 0))
            })
            .collect(),
        _ => Vec::new(),
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number =
        |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    match args.first().map(String::as_str) {
        Some("node") => run_node(number(1, 0), &args[2]).await,
        Some("flood") => {
            run_flooder(&args[1], number(2, 10_000), number(3, 15), &args[4], number(5, 5)).await
        }
        _ => {
            let phases = match args.get(3) {
                Some(list) => list.split(',').map(str::to_owned).collect(),
                None => PHASES.map(str::to_owned).to_vec(),
            };
            run_bench(number(0, 5), number(1, 10_000), number(2, 15), &phases).await
        }
    }
}

/// One node: reports `seen <seq> <unix µs>` for each honest source's advert it takes in and
/// `judged <health>` when it judges an honest node `suspect` or `down`.
async fn run_node(i: usize, url: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (events, mut events_rx) = EventTx::channel(65_536);
    let mut config = NodeConfig::new(member_key(i), "default", dir.path().to_path_buf());
    config.explicit_id = Some((id(&format!("w{i}")), IdSource::Config));
    config.bus = "nats".into();
    config.federation = Some(FederationConfig {
        bus: BusConfig::Nats(NatsConfig {
            url: url.to_owned(),
            tls: false,
            user: None,
            pass: None,
            connect_retries: 3,
            connect_backoff: Duration::from_millis(200),
            name: format!("flood-{i}"),
        }),
        heartbeat_interval: Duration::from_secs(1),
        membership: MembershipConfig::new("default"),
    });
    let cancel = CancellationToken::new();
    let _node = node::spawn(config, events, cancel.child_token()).await.expect("node");
    println!("ready");
    let judged = hostile::Judged::default();
    while let Some(emit) = events_rx.recv().await {
        let p = &emit.payload;
        if emit.kind == "cluster.node.advertise"
            && p["id"].as_str().is_some_and(|s| s.starts_with("src"))
        {
            println!("seen {} {}", p["seq"].as_u64().unwrap_or(0), unix_us());
        }
        if let Some(health) = judged.count(&emit.kind, p) {
            println!("judged {health}");
        }
    }
}

/// Publishes one phase's flood at `rate` a second for `secs`, then prints how many it sent.
async fn run_flooder(kind: &str, rate: usize, secs: usize, url: &str, honest: usize) {
    let payloads = flood(kind, rate * secs, honest);
    let client = async_nats::connect(url).await.expect("connect");
    let (start, per_tick) = (Instant::now(), (rate / 100).max(1));
    let (mut sent, mut tick) = (0usize, 0u32);
    while start.elapsed() < Duration::from_secs(secs as u64) && !payloads.is_empty() {
        for _ in 0..per_tick {
            let bytes = payloads[sent.min(payloads.len() - 1)].clone();
            client.publish(SUBJECT, bytes.into()).await.expect("publish");
            sent += 1;
        }
        tick += 1;
        tokio::time::sleep_until((start + Duration::from_millis(10) * tick).into()).await;
    }
    client.flush().await.expect("flush");
    println!("{sent}");
}

/// What the nodes report, tagged with the node.
enum Report {
    Seen { seq: u64, at_us: u64 },
    Judged(String),
}

fn spawn_self(args: &[String]) -> Child {
    let exe = std::env::current_exe().expect("this program");
    Command::new(exe).args(args).stdout(Stdio::piped()).kill_on_drop(true).spawn().expect("spawn")
}

/// One phase as measured.
struct Phase<'a> {
    kind: &'a str,
    delivery: Vec<f64>,
    missed: usize,
    suspect: usize,
    down: usize,
    sent: usize,
    /// Cores used per node over the phase.
    node_cores: Vec<f64>,
    broker_cores: f64,
}

async fn run_bench(n: usize, rate: usize, secs: usize, kinds: &[String]) {
    let broker = support::Broker::start().await;
    let url = broker.url.clone();
    let (report_tx, mut reports) = mpsc::unbounded_channel::<Report>();
    let (ready_tx, mut ready) = mpsc::unbounded_channel::<()>();
    let mut nodes = Vec::new();
    for i in 0..n {
        let mut child = spawn_self(&["node".into(), i.to_string(), url.clone()]);
        let stdout = child.stdout.take().expect("stdout");
        let (report_tx, ready_tx) = (report_tx.clone(), ready_tx.clone());
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let words: Vec<&str> = line.split(' ').collect();
                let report = match words.as_slice() {
                    ["ready"] => {
                        let _ = ready_tx.send(());
                        continue;
                    }
                    ["seen", seq, at] => Report::Seen {
                        seq: seq.parse().unwrap_or(0),
                        at_us: at.parse().unwrap_or(0),
                    },
                    ["judged", health] => Report::Judged((*health).to_owned()),
                    _ => continue,
                };
                let _ = report_tx.send(report);
            }
        });
        nodes.push(child);
    }
    for _ in 0..n {
        ready.recv().await.expect("a node started");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    let sources: Vec<NodeKey> = (0..SOURCES).map(|_| NodeKey::generate().expect("key")).collect();
    let publisher = async_nats::connect(&url).await.expect("connect");
    let pids: Vec<u32> = nodes.iter().filter_map(Child::id).collect();
    println!(
        "{n} nodes (one process each) on NATS; floods of {rate} messages/s for {secs} s; \
         a valid advert every {} ms",
        HONEST_EVERY.as_millis()
    );
    println!(
        "{:<17} {:>7} {:>7} {:>7} {:>6} {:>7} {:>5} {:>7} {:>8} {:>11} {:>6}",
        "phase",
        "p50 ms",
        "p99 ms",
        "max ms",
        "missed",
        "suspect",
        "down",
        "sent",
        "p99 ×",
        "node cores",
        "broker"
    );
    let mut seq = 0u64;
    let mut phases: Vec<Phase> = Vec::new();
    for kind in kinds {
        let kind = kind.as_str();
        while reports.try_recv().is_ok() {}
        let cpu0: Vec<f64> = pids.iter().map(|&p| hostile::cpu_secs_of(p)).collect();
        let broker0 = hostile::cpu_secs_of(broker.pid());
        let start = Instant::now();
        let flooder = (kind != "baseline").then(|| {
            spawn_self(&[
                "flood".into(),
                kind.into(),
                rate.to_string(),
                secs.to_string(),
                url.clone(),
                n.to_string(),
            ])
        });
        let mut sent_at = BTreeMap::new();
        let mut tick = 0u32;
        while start.elapsed() < Duration::from_secs(secs as u64) {
            seq += 1;
            let source = seq as usize % SOURCES;
            let bytes = seal(&sources[source], "default", &advert(&format!("src{source}"), seq, 0));
            sent_at.insert(seq, unix_us());
            publisher.publish(SUBJECT, bytes.into()).await.expect("publish");
            tick += 1;
            tokio::time::sleep_until((start + HONEST_EVERY * tick).into()).await;
        }
        publisher.flush().await.expect("flush");
        let sent = match flooder {
            Some(child) => {
                let out = child.wait_with_output().await.expect("flooder");
                String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
            }
            None => 0,
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        let elapsed = start.elapsed().as_secs_f64();
        let (mut delivery, mut suspect, mut down) = (Vec::new(), 0, 0);
        while let Ok(report) = reports.try_recv() {
            match report {
                Report::Seen { seq, at_us } => {
                    if let Some(t) = sent_at.get(&seq) {
                        delivery.push(at_us.saturating_sub(*t) as f64 / 1000.0);
                    }
                }
                Report::Judged(health) if health == "down" => down += 1,
                Report::Judged(_) => suspect += 1,
            }
        }
        delivery.sort_by(f64::total_cmp);
        let phase = Phase {
            kind,
            missed: (sent_at.len() * n).saturating_sub(delivery.len()),
            delivery,
            suspect,
            down,
            sent,
            node_cores: pids
                .iter()
                .zip(&cpu0)
                .map(|(&p, c0)| (hostile::cpu_secs_of(p) - c0) / elapsed)
                .collect(),
            broker_cores: (hostile::cpu_secs_of(broker.pid()) - broker0) / elapsed,
        };
        print_phase(&phase, None);
        phases.push(phase);
    }
    println!("\nEach flood beside the baselines either side of it (p99 × their mean):");
    for (i, phase) in phases.iter().enumerate().filter(|(_, p)| p.kind != "baseline") {
        let around = [i.checked_sub(1), Some(i + 1)]
            .into_iter()
            .flatten()
            .filter_map(|j| phases.get(j))
            .map(|b| support::pct(&b.delivery, 0.99))
            .collect::<Vec<_>>();
        let baseline = around.iter().sum::<f64>() / around.len().max(1) as f64;
        print_phase(phase, Some(support::pct(&phase.delivery, 0.99) / baseline));
    }
    drop(nodes);
    drop(broker);
}

fn print_phase(phase: &Phase, ratio: Option<f64>) {
    let mean = phase.node_cores.iter().sum::<f64>() / phase.node_cores.len().max(1) as f64;
    let max = phase.node_cores.iter().copied().fold(0.0, f64::max);
    println!(
        "{:<17} {:>7.2} {:>7.2} {:>7.2} {:>6} {:>7} {:>5} {:>7} {:>8} {:>5.2}/{:<5.2} {:>6.2}",
        phase.kind,
        support::pct(&phase.delivery, 0.5),
        support::pct(&phase.delivery, 0.99),
        phase.delivery.last().copied().unwrap_or(f64::NAN),
        phase.missed,
        phase.suspect,
        phase.down,
        phase.sent,
        ratio.map_or("".into(), |r| format!("{r:.2}")),
        mean,
        max,
        phase.broker_cores,
    );
}
