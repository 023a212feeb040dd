//! Job routing figures (docs/benchmarks.md, "Jobs"):
//!
//! - `place`: the Home's placement decision (`arw_p2p::jobs::place`) over N workers, and a whole
//!   admission (`Ledger::submit`: checks, record, placement, the assignment signed off as
//!   effects), timed per call in this process.
//! - `crash`: the same stack; a job runs on a worker whose node task is then aborted (its
//!   sockets close, as when the process dies); crash → the job's next `actions.running`.
//! - `stack`: a Home and N workers as real node actors in this process over loopback libp2p,
//!   each worker's executor answering at once; jobs submitted one after another at the Home;
//!   submit → `actions.running` and → `actions.completed` as the Home's events arrive.
//!
//! ```sh
//! cargo run --release -p arw-simnet --example jobs_bench -- place --workers 500
//! cargo run --release -p arw-simnet --example jobs_bench -- stack --workers 100 --jobs 1000
//! cargo run --release -p arw-simnet --example jobs_bench -- stack --workers 100 --nats nats://127.0.0.1:4222
//! cargo run --release -p arw-simnet --example jobs_bench -- crash --workers 20 --trials 20
//! ```

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use serde_json::{Map, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use arw_p2p::{
    cluster::Advert,
    events::{Event, EventTx},
    identity::NodeKey,
    jobs::{
        Candidate, Env, Exec, Finished, JobSpec, JobsAdvert, JobsConfig, Ledger, Offload,
        PlacementSpec, Prefer, Require, Want, Workers, place,
    },
    node::{self, FederationConfig, NodeConfig, NodeHandle},
    node_id::{IdSource, NodeId},
    time::now_ms,
};

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    match args.first().map(String::as_str) {
        Some("place") => {
            place_bench(flag("--workers", 500), flag("--rounds", 20_000));
            Ok(())
        }
        Some("stack") => {
            let nats = args.iter().position(|a| a == "--nats").and_then(|i| args.get(i + 1)).cloned();
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?
                .block_on(stack_bench(flag("--workers", 20), flag("--jobs", 500), nats))
        }
        Some("matrix") => {
            matrix_bench(flag("--workers", 500), flag("--rounds", 200));
            Ok(())
        }
        Some("crash") => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?
            .block_on(crash_bench(flag("--workers", 20), flag("--trials", 20))),
        _ => Err("usage: jobs_bench place [--workers N] [--rounds N] | matrix [--workers N] [--rounds N] | stack [--workers N] [--jobs N] [--nats URL] | crash [--workers N] [--trials N]".into()),
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(name: &str, mut d: Vec<Duration>) {
    d.sort_unstable();
    println!(
        "{name}: n={} p50={:?} p99={:?} max={:?}",
        d.len(),
        pct(&d, 0.5),
        pct(&d, 0.99),
        d.last().copied().unwrap_or_default()
    );
}

/// N adverts: 5 % with two GPUs, the rest CPU only; all take `work`.
fn adverts(n: usize) -> Vec<Advert> {
    (0..n)
        .map(|i| {
            let mut a = Advert::basic(NodeId::parse(&format!("w{i}")).expect("id"), "bench", 1, 0);
            let gpus = if i % 20 == 0 {
                let gpu = json!({"name": "NVIDIA H200", "memory_total_bytes": 150u64 << 30});
                json!([gpu.clone(), gpu])
            } else {
                json!([])
            };
            a.capabilities = json!({"os": "linux", "arch": "x86_64", "gpus": gpus,
                "cpu": {"cores": 16}, "memory": {"total_bytes": 64u64 << 30}})
            .as_object()
            .cloned()
            .unwrap_or_default();
            a.jobs = Some(JobsAdvert {
                slots: 8,
                accepts: vec!["work".into()],
                draining: false,
                boot: 0,
            });
            a
        })
        .collect()
}

struct All(Vec<Advert>);

impl Workers for All {
    fn list(&self) -> Vec<(&Advert, bool, bool)> {
        self.0.iter().map(|a| (a, true, true)).collect()
    }
}

/// `adverts` as daemons send them: each with its runtimes' health (the built-in kinds, and on
/// one node in 20 a program quarantined for another kind).
fn with_runtimes(adverts: &[Advert]) -> Vec<Advert> {
    use arw_p2p::jobs::{RuntimeBudget, RuntimeDecl, Runtimes};
    let builtin = RuntimeDecl { id: "builtin".into(), kinds: vec!["work".into(), "echo".into()] };
    let ocr = RuntimeDecl { id: "exec:ocr".into(), kinds: vec!["ocr".into()] };
    let mut sick = Runtimes::new(vec![builtin.clone(), ocr], RuntimeBudget::default());
    for t in 0..5 {
        sick.finished("ocr", Some("exit status 1"), t);
    }
    let well = Runtimes::new(vec![builtin], RuntimeBudget::default());
    adverts
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let mut a = a.clone();
            a.runtimes = if i % 20 == 7 { sick.digests() } else { well.digests() };
            a
        })
        .collect()
}

/// `GET /state/runtime_matrix` at the Home of `workers` workers, without the HTTP: an entry per
/// advert (as `Snapshot::runtime_matrix` makes them), then the JSON the route sends.
fn matrix_bench(workers: usize, rounds: usize) {
    use arw_p2p::runtimes::{RuntimeMatrix, RuntimeMatrixEntry};
    let adverts = with_runtimes(&adverts(workers));
    let mut times = Vec::with_capacity(rounds);
    let mut bytes = 0;
    for _ in 0..rounds {
        let started = Instant::now();
        let items = adverts
            .iter()
            .map(|a| {
                let entry = RuntimeMatrixEntry::of(a.id.as_str(), &a.runtimes, 1_000, 2_000);
                (a.id.to_string(), entry)
            })
            .collect();
        let json =
            serde_json::to_vec(&RuntimeMatrix { items, ttl_seconds: 360 }).unwrap_or_default();
        times.push(started.elapsed());
        bytes = json.len();
        std::hint::black_box(json);
    }
    summary(
        &format!("runtime matrix of {workers} workers, built and serialised ({bytes} bytes)"),
        times,
    );
}

fn place_bench(workers: usize, rounds: usize) {
    let plain = adverts(workers);
    let adverts = with_runtimes(&plain);
    let cpu = Require::default();
    let gpu = Require {
        gpu: Some(arw_p2p::jobs::GpuRequire {
            count: 1,
            min_memory_mib: Some(80_000),
            vendor: None,
        }),
        ..Require::default()
    };
    // The same rounds over adverts with and without runtime health, alternated, so the two
    // figures are taken under the same conditions.
    let mut times = Vec::with_capacity(rounds);
    let mut times_plain = Vec::with_capacity(rounds);
    for r in 0..rounds * 2 {
        let (adverts, times) =
            if r % 2 == 0 { (&adverts, &mut times) } else { (&plain, &mut times_plain) };
        let r = r / 2;
        let job = format!("job-{r}");
        let require = if r % 10 == 0 { &gpu } else { &cpu };
        let want = Want {
            job_id: &job,
            kind: "work",
            require,
            node: None,
            avoid: &[],
            tried: &[],
            lost_on: &[],
            resting: &[],
        };
        let started = Instant::now();
        let decision = place(
            &want,
            adverts.iter().enumerate().map(|(i, a)| Candidate {
                advert: a,
                ok: true,
                admitted: true,
                inflight: ((i + r) % 8) as u32,
            }),
        );
        times.push(started.elapsed());
        std::hint::black_box(decision);
    }
    summary(&format!("place() over {workers} workers"), times);
    summary(&format!("place() over {workers} workers, adverts without runtimes"), times_plain);

    // Whole admissions at the Home: each job placed remotely, then completed (not timed) so
    // the workers stay free.
    let me = NodeId::parse("home").expect("id");
    let caps = Map::new();
    let all = All(adverts);
    let config = JobsConfig { kinds: Vec::new(), queue_max: usize::MAX, ..JobsConfig::default() };
    let mut ledger = Ledger::new(config, Default::default());
    let mut times = Vec::with_capacity(rounds);
    let started_all = Instant::now();
    for r in 0..rounds {
        let now = 1_000_000 + r as u64;
        let env = Env {
            now,
            me: &me,
            caps: &caps,
            tags: &[],
            slots: 1,
            hosted: 0,
            offload: Offload::Prefer,
            queue_ms: 250,
            policy_epoch: 1,
            workers: &all,
            quarantined: &[],
        };
        let spec = JobSpec {
            kind: "work".into(),
            input: json!({"n": r}),
            idem_key: None,
            placement: Some(PlacementSpec { prefer: Prefer::Remote, ..PlacementSpec::default() }),
            timeout_ms: None,
            retry: None,
        };
        let started = Instant::now();
        let submitted = ledger.submit(spec, &env).expect("admitted");
        let outs = ledger.take();
        times.push(started.elapsed());
        let node = outs.iter().find_map(|o| match o {
            arw_p2p::jobs::Out::Send {
                to,
                body: arw_p2p::jobs::message::JobMessage::Assign(a),
            } => Some((to.clone(), a.fence)),
            _ => None,
        });
        if let Some((node, fence)) = node {
            use arw_p2p::jobs::message::{Complete, JobMessage};
            let done = Complete {
                job_id: submitted.id,
                fence,
                ok: true,
                output: json!(null),
                started_ms: now,
                finished_ms: now,
                cpu_ms: None,
            };
            ledger.on_message(&node, now, JobMessage::Complete(done), &env);
            ledger.take();
        }
    }
    let elapsed = started_all.elapsed();
    summary(&format!("Ledger::submit with {workers} workers"), times);
    println!("admit + place + complete cycles: {:.0}/s", rounds as f64 / elapsed.as_secs_f64());
}

struct StackNode {
    handle: NodeHandle,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

async fn start(
    i: usize,
    home: Option<[u8; 32]>,
    boot: &[String],
    nats: Option<&str>,
    cancel: &CancellationToken,
) -> Result<(StackNode, mpsc::Receiver<arw_p2p::events::Emit>), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let key = NodeKey::from_secret([i as u8 + 1; 32]);
    let mut config = NodeConfig::new(key, "bench", dir.path().to_path_buf());
    let id = if i == 0 { "home".to_owned() } else { format!("w{i}") };
    config.explicit_id = Some((NodeId::parse(&id).map_err(|e| e.to_string())?, IdSource::Config));
    let mut federation = FederationConfig::loopback(
        "bench",
        boot.iter().filter_map(|a| a.parse().ok()).collect(),
        Duration::from_millis(1_000),
    );
    federation.membership.home_key = home;
    if let Some(url) = nats {
        federation.bus = node::BusConfig::Nats(arw_p2p::nats::NatsConfig::plain(url, &id));
    }
    config.federation = Some(federation);
    config.jobs = JobsConfig {
        slots: 8,
        kinds: vec!["echo".into()],
        allow: if i == 0 { Vec::new() } else { vec!["echo".into()] },
        ..JobsConfig::default()
    };
    let (runs, mut runs_rx) = mpsc::unbounded_channel();
    config.executor = Some(runs);
    let (events, rx) = EventTx::channel(65_536);
    let (handle, task) =
        node::spawn(config, events, cancel.child_token()).await.map_err(|e| e.to_string())?;
    let executor = handle.clone();
    tokio::spawn(async move {
        // Echoes at once, or after `input.ms`.
        while let Some(exec) = runs_rx.recv().await {
            if let Exec::Run(run) = exec {
                let executor = executor.clone();
                tokio::spawn(async move {
                    let started_ms = now_ms();
                    if let Some(ms) = run.input["ms"].as_u64() {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    let done = Finished {
                        job_id: run.job_id,
                        fence: run.fence,
                        ok: true,
                        output: run.input,
                        started_ms,
                        finished_ms: now_ms(),
                        fault: None,
                        cpu_ms: None,
                    };
                    let _ = executor.job_finished(done).await;
                });
            }
        }
    });
    Ok((StackNode { handle, task, _dir: dir }, rx))
}

/// A Home and `workers` admitted workers that apply its policy.
async fn cluster(
    workers: usize,
    nats: Option<&str>,
    cancel: &CancellationToken,
) -> Result<(StackNode, mpsc::Receiver<arw_p2p::events::Emit>, Vec<StackNode>), String> {
    let (home, mut events) = start(0, None, &[], nats, cancel).await?;
    home.handle.set_role("home").await.map_err(|e| e.to_string())?;
    let snapshot = home.handle.snapshot();
    let key = arw_p2p::identity::public_key_from_b64(&snapshot.public_key).ok_or("home key")?;
    let boot: Vec<String> = snapshot.network.listen.clone();
    let mut nodes = Vec::new();
    for i in 1..=workers {
        let (node, mut rx) = start(i, Some(key), &boot, nats, cancel).await?;
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        nodes.push(node);
    }
    let formed = Instant::now();
    for i in 1..=workers {
        let id = format!("w{i}");
        loop {
            if home.handle.admit(&id, None).await.is_ok() {
                break;
            }
            if formed.elapsed() > Duration::from_secs(120) {
                return Err(format!("{id} never seen by the Home"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for node in &nodes {
        let mut rx = node.handle.watch();
        tokio::time::timeout(Duration::from_secs(120), rx.wait_for(|s| s.policy.takes_work))
            .await
            .map_err(|_| "a worker never applied the Home's policy")?
            .map_err(|e| e.to_string())?;
    }
    println!("{workers} workers admitted in {:?}", formed.elapsed());
    // Drain what formation emitted.
    while events.try_recv().is_ok() {}
    Ok((home, events, nodes))
}

async fn stack_bench(workers: usize, jobs: usize, nats: Option<String>) -> Result<(), String> {
    let cancel = CancellationToken::new();
    let nats = nats.as_deref();
    let (home, mut events, _nodes) = cluster(workers, nats, &cancel).await?;
    let mut submitted: BTreeMap<String, Instant> = BTreeMap::new();
    let mut running = Vec::new();
    let mut completed = Vec::new();
    let mut placed: BTreeMap<String, usize> = BTreeMap::new();
    let spec = |n: usize| JobSpec {
        kind: "echo".into(),
        input: json!({"n": n}),
        idem_key: None,
        placement: Some(PlacementSpec { prefer: Prefer::Remote, ..PlacementSpec::default() }),
        timeout_ms: None,
        retry: None,
    };
    let started = Instant::now();
    for n in 0..jobs {
        let at = Instant::now();
        let s = home.handle.submit_job(spec(n)).await.map_err(|e| e.to_string())?;
        submitted.insert(s.id, at);
        // One at a time: wait for this job's end, recording what arrives meanwhile.
        loop {
            let emit = tokio::time::timeout(Duration::from_secs(30), events.recv())
                .await
                .map_err(|_| "no event within 30 s")?
                .ok_or("events closed")?;
            let arrived = Instant::now();
            match emit.event() {
                Some(Event::ActionRunning(e)) => {
                    if let Some(t) = submitted.get(&e.id) {
                        running.push(arrived - *t);
                        *placed.entry(e.node_id.unwrap_or_default()).or_default() += 1;
                    }
                }
                Some(Event::ActionCompleted(e)) => {
                    if let Some(t) = submitted.get(&e.id) {
                        completed.push(arrived - *t);
                    }
                    break;
                }
                Some(Event::ActionFailed(e)) => return Err(format!("job failed: {e:?}")),
                _ => {}
            }
        }
    }
    let elapsed = started.elapsed();
    let bus = if nats.is_some() { "NATS" } else { "libp2p" };
    summary(&format!("submit → actions.running (remote, {bus})"), running);
    summary(&format!("submit → actions.completed (remote, {bus})"), completed);
    println!(
        "{jobs} jobs one at a time in {elapsed:?}; {} of {workers} workers used; most on one: {}",
        placed.len(),
        placed.values().max().unwrap_or(&0)
    );
    cancel.cancel();
    Ok(())
}

async fn crash_bench(workers: usize, trials: usize) -> Result<(), String> {
    let cancel = CancellationToken::new();
    let (home, mut events, nodes) = cluster(workers, None, &cancel).await?;
    let mut nodes: BTreeMap<String, StackNode> =
        nodes.into_iter().enumerate().map(|(i, n)| (format!("w{}", i + 1), n)).collect();
    let mut recovered = Vec::new();
    for trial in 0..trials {
        let spec = JobSpec {
            kind: "echo".into(),
            input: json!({"ms": 60_000, "trial": trial}),
            idem_key: Some(format!("crash-{trial}")),
            placement: Some(PlacementSpec { prefer: Prefer::Remote, ..PlacementSpec::default() }),
            timeout_ms: None,
            retry: None,
        };
        let id = home.handle.submit_job(spec).await.map_err(|e| e.to_string())?.id;
        let mut crashed: Option<Instant> = None;
        loop {
            let emit = tokio::time::timeout(Duration::from_secs(30), events.recv())
                .await
                .map_err(|_| "no event within 30 s")?
                .ok_or("events closed")?;
            let Some(Event::ActionRunning(e)) = emit.event() else { continue };
            if e.id != id {
                continue;
            }
            match crashed {
                None => {
                    // Let it run a random part of a renewal period, then kill its worker.
                    tokio::time::sleep(Duration::from_millis(200 + 97 * trial as u64 % 1_000))
                        .await;
                    let owner = e.node_id.unwrap_or_default();
                    let node = nodes.remove(&owner).ok_or("the owner is a live worker")?;
                    node.task.abort();
                    crashed = Some(Instant::now());
                }
                Some(at) => {
                    recovered.push(at.elapsed());
                    home.handle.cancel_job(&id).await.map_err(|e| e.to_string())?;
                    break;
                }
            }
        }
    }
    summary("worker crash → job running elsewhere", recovered);
    cancel.cancel();
    Ok(())
}
