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
//! turn. Delivery is publish → a node's `cluster.node.advertise` event (wall clock, one machine);
//! "broker p99" is the same to a plain subscriber in this program (what the broker and the
//! machine add before any node sees a message), and "added p99" the p99 of each node's delivery
//! less the plain subscriber's of the same advert (what the node itself adds). With two CPUs or more, the nodes share CPU 0 and
//! the rest (broker, flooder, this program) the others: on a WAN they run on machines of their
//! own. After each phase the next waits until every honest advert is in (at most 10 s).
//!
//! Floods: `garbage` (3.3 KB of noise); `bad_signature` (a 3.3 KB envelope under a key nobody
//! knows, whose signature does not match); `forged_member` (the same under the key of member
//! w0, sent on w0's subject as an open broker allows: a forgery the node cannot shed unchecked
//! without muting w0); `forged_member_bound` (the same sent on the flooder's own subject, all a
//! broker that binds each client to its subject lets it do); `forged_suspicion` (a member
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
    nats::NatsConfig,
    node::{self, FederationConfig, NodeConfig},
    node_id::IdSource,
    time::now_ms,
    wire::{Message, seal},
};

/// Where `key`'s messages go.
fn subject(key: &NodeKey) -> String {
    arw_p2p::nats::msg_subject("default", &key.peer_id())
}
/// Honest sources outside the nodes.
const SOURCES: usize = 4;
/// One honest advert this often (from the sources in turn).
const HONEST_EVERY: Duration = Duration::from_millis(50);
const PHASES: [&str; 13] = [
    "baseline",
    "garbage",
    "baseline",
    "bad_signature",
    "baseline",
    "forged_member",
    "baseline",
    "forged_member_bound",
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

/// The flood of one phase (subject, envelope), made before it starts so that sending costs
/// little. The flooder sends on its own subject but for `forged_member`, which it sends on
/// w0's, as an open broker lets it (a broker that binds each client to its own subject would
/// refuse: `forged_member_bound` is what it can send there instead).
fn flood(kind: &str, count: usize, honest: usize) -> Vec<(String, Vec<u8>)> {
    let rogue = NodeKey::from_secret([77; 32]);
    let own = subject(&rogue);
    let forged = || hostile::bad_signature(&member_key(0), &advert("w0", u64::MAX / 2, 40));
    match kind {
        "garbage" => vec![(own, vec![b'#'; 3_300])],
        "bad_signature" => {
            vec![(own, hostile::bad_signature(&rogue, &advert("w0", u64::MAX / 2, 40)))]
        }
        "forged_member" => vec![(subject(&member_key(0)), forged())],
        "forged_member_bound" => vec![(own, forged())],
        "forged_suspicion" => {
            let mut out = vec![seal(&rogue, "default", &advert("liar", 1, 0))];
            out.extend(
                (0..count as u64).map(|i| seal(&rogue, "default", &hostile::lie(i, honest))),
            );
            out.into_iter().map(|envelope| (own.clone(), envelope)).collect()
        }
        "sybil" => (0..count as u32)
            .map(|i| {
                let key = hostile::sybil_key(i);
                (subject(&key), seal(&key, "default", &advert(&format!("s{i}"), 1, 0)))
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
    let nats = NatsConfig::plain(url, &format!("flood-{i}"));
    config.federation = Some(FederationConfig::broker("default", nats, Duration::from_secs(1)));
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
            let (subject, bytes) = payloads[sent.min(payloads.len() - 1)].clone();
            client.publish(subject, bytes.into()).await.expect("publish");
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

/// This program with `args`, on `cpus` (a `taskset` list) when given.
fn spawn_self(args: &[String], cpus: Option<&str>) -> Child {
    let exe = std::env::current_exe().expect("this program");
    let mut command = match cpus {
        Some(cpus) => {
            let mut taskset = Command::new("taskset");
            taskset.args(["-c", cpus]).arg(exe);
            taskset
        }
        None => Command::new(exe),
    };
    command.args(args).stdout(Stdio::piped()).kill_on_drop(true).spawn().expect("spawn")
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
    /// Delivery to a plain subscriber beside this program (ms, sorted).
    broker_delivery: Vec<f64>,
    /// Each node's delivery less the plain subscriber's of the same advert (ms, sorted): what
    /// the node adds to what the broker and the machine take.
    added: Vec<f64>,
}

async fn run_bench(n: usize, rate: usize, secs: usize, kinds: &[String]) {
    // The nodes on CPU 0; this program, the flooders and the broker (which on a WAN run on
    // machines of their own) on the others.
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let split = cpus >= 2;
    if split {
        let others = format!("1-{}", cpus - 1);
        let own = std::process::id().to_string();
        let pinned = std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", &others, &own])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(pinned, "taskset (util-linux) could not pin this program");
    }
    let node_cpus = split.then_some("0");
    let broker = support::Broker::start().await;
    let url = broker.url.clone();
    let (report_tx, mut reports) = mpsc::unbounded_channel::<Report>();
    let (ready_tx, mut ready) = mpsc::unbounded_channel::<()>();
    let mut nodes = Vec::new();
    for i in 0..n {
        let mut child = spawn_self(&["node".into(), i.to_string(), url.clone()], node_cpus);
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
    // A plain subscriber beside this program: what the broker (and the machine) add alone.
    let (probe_tx, mut probed) = mpsc::unbounded_channel::<(u64, u64)>();
    let probe = async_nats::connect(&url).await.expect("connect");
    for key in &sources {
        let mut sub = probe.subscribe(subject(key)).await.expect("subscribe");
        let probe_tx = probe_tx.clone();
        tokio::spawn(async move {
            while let Some(m) = futures::StreamExt::next(&mut sub).await {
                let at = unix_us();
                let v = serde_json::from_slice::<serde_json::Value>(&m.payload).ok();
                if let Some(seq) = v.and_then(|v| v["payload"]["seq"].as_u64()) {
                    let _ = probe_tx.send((seq, at));
                }
            }
        });
    }
    let pids: Vec<u32> = nodes.iter().filter_map(Child::id).collect();
    println!(
        "{n} nodes (one process each{}) on NATS; floods of {rate} messages/s for {secs} s; \
         a valid advert every {} ms",
        if split { ", all on CPU 0; broker and flooder on the rest" } else { "" },
        HONEST_EVERY.as_millis()
    );
    println!(
        "{:<19} {:>7} {:>7} {:>7} {:>6} {:>7} {:>5} {:>7} {:>8} {:>11} {:>6} {:>10} {:>10} {:>8}",
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
        "broker",
        "broker p99",
        "added p99",
        "added ×"
    );
    let mut seq = 0u64;
    let mut phases: Vec<Phase> = Vec::new();
    for kind in kinds {
        let kind = kind.as_str();
        while reports.try_recv().is_ok() {}
        while probed.try_recv().is_ok() {}
        let cpu0: Vec<f64> = pids.iter().map(|&p| hostile::cpu_secs_of(p)).collect();
        let broker0 = hostile::cpu_secs_of(broker.pid());
        let start = Instant::now();
        let flooder = (kind != "baseline").then(|| {
            let args = [kind, &rate.to_string(), &secs.to_string(), &url, &n.to_string()];
            let args: Vec<String> =
                std::iter::once("flood").chain(args).map(str::to_owned).collect();
            spawn_self(&args, None)
        });
        let mut sent_at = BTreeMap::new();
        let mut tick = 0u32;
        while start.elapsed() < Duration::from_secs(secs as u64) {
            seq += 1;
            let source = seq as usize % SOURCES;
            let key = &sources[source];
            let bytes = seal(key, "default", &advert(&format!("src{source}"), seq, 0));
            sent_at.insert(seq, unix_us());
            publisher.publish(subject(key), bytes.into()).await.expect("publish");
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
        // Until every honest advert is in (what a flood left queued is worked off), at most 10 s.
        let (mut seen, mut suspect, mut down) = (Vec::new(), 0, 0);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while seen.len() < sent_at.len() * n {
            let Ok(Some(report)) = tokio::time::timeout_at(deadline, reports.recv()).await else {
                break;
            };
            match report {
                Report::Seen { seq, at_us } if sent_at.contains_key(&seq) => {
                    seen.push((seq, at_us));
                }
                Report::Seen { .. } => {}
                Report::Judged(health) if health == "down" => down += 1,
                Report::Judged(_) => suspect += 1,
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        while let Ok(report) = reports.try_recv() {
            match report {
                Report::Judged(health) if health == "down" => down += 1,
                Report::Judged(_) => suspect += 1,
                Report::Seen { .. } => {}
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        let ms = |from: u64, to: u64| (to as f64 - from as f64) / 1000.0;
        let probe_at: BTreeMap<u64, u64> = std::iter::from_fn(|| probed.try_recv().ok()).collect();
        let sorted = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v
        };
        let delivery = sorted(seen.iter().map(|(seq, at)| ms(sent_at[seq], *at)).collect());
        let added = sorted(
            seen.iter().filter_map(|(seq, at)| Some(ms(*probe_at.get(seq)?, *at))).collect(),
        );
        let broker_delivery = sorted(
            probe_at.iter().filter_map(|(seq, at)| Some(ms(*sent_at.get(seq)?, *at))).collect(),
        );
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
            broker_delivery,
            added,
        };
        print_phase(&phase, None);
        phases.push(phase);
    }
    println!(
        "\nEach flood beside the baselines either side of it (p99 × their mean; the same for \
         the node-added p99):"
    );
    for (i, phase) in phases.iter().enumerate().filter(|(_, p)| p.kind != "baseline") {
        let ratio = |of: for<'p> fn(&'p Phase<'_>) -> &'p [f64]| {
            let around = [i.checked_sub(1), Some(i + 1)]
                .into_iter()
                .flatten()
                .filter_map(|j| phases.get(j))
                .map(|b| support::pct(of(b), 0.99))
                .collect::<Vec<_>>();
            let baseline = around.iter().sum::<f64>() / around.len().max(1) as f64;
            support::pct(of(phase), 0.99) / baseline
        };
        print_phase(phase, Some((ratio(|p| &p.delivery), ratio(|p| &p.added))));
    }
    drop(nodes);
    drop(broker);
}

fn print_phase(phase: &Phase, ratios: Option<(f64, f64)>) {
    let mean = phase.node_cores.iter().sum::<f64>() / phase.node_cores.len().max(1) as f64;
    let max = phase.node_cores.iter().copied().fold(0.0, f64::max);
    println!(
        "{:<19} {:>7.2} {:>7.2} {:>7.2} {:>6} {:>7} {:>5} {:>7} {:>8} {:>5.2}/{:<5.2} {:>6.2} {:>10.2} {:>10.2} {:>8}",
        phase.kind,
        support::pct(&phase.delivery, 0.5),
        support::pct(&phase.delivery, 0.99),
        phase.delivery.last().copied().unwrap_or(f64::NAN),
        phase.missed,
        phase.suspect,
        phase.down,
        phase.sent,
        ratios.map_or("".into(), |r| format!("{:.2}", r.0)),
        mean,
        max,
        phase.broker_cores,
        support::pct(&phase.broker_delivery, 0.99),
        support::pct(&phase.added, 0.99),
        ratios.map_or("".into(), |r| format!("{:.2}", r.1)),
    );
}
