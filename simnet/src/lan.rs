//! The lan tier: `arw-server` processes in Linux network namespaces joined by a bridge in its own
//! namespace, discovering each other with mDNS. Packet loss, isolation and partitions are
//! nftables rules on the bridge. Needs root, `ip` (iproute2), `nft` (nftables) and `curl`; the
//! namespaces are this run's own and are removed afterwards, so multicast never leaves them.
//!
//! Times here come from polling each node's `/state/cluster` (every 100 ms), so they include up
//! to one polling period.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    report::{Measures, Report, rss_bytes},
    scenario::{FaultKind, Scenario, Tier},
};

const TOKEN: &str = "lan-tier-token";
const POLL: Duration = Duration::from_millis(100);

fn run_cmd(args: &[&str]) -> Result<(), String> {
    let out =
        Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Namespaces `<prefix>-1..=n` (hosts `10.77.0.<i>`) on a bridge in `<prefix>-sw`.
#[derive(Debug)]
pub struct Lan {
    prefix: String,
    hosts: usize,
}

impl Lan {
    /// Builds the namespaces. Fails (changing nothing lasting) when not permitted.
    pub fn create(hosts: usize) -> Result<Self, String> {
        if hosts == 0 || hosts > 250 {
            return Err("1 to 250 hosts".into());
        }
        let prefix = format!("a{}", std::process::id() % 100_000);
        let lan = Self { prefix, hosts: 0 };
        let sw = lan.switch();
        run_cmd(&["ip", "netns", "add", &sw])?;
        let mut lan = lan;
        lan.hosts = hosts;
        run_cmd(&["ip", "-n", &sw, "link", "set", "lo", "up"])?;
        run_cmd(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"])?;
        run_cmd(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        for i in 1..=hosts {
            let (ns, veth, port) =
                (lan.ns(i), format!("{}-{i}", lan.prefix), format!("{}-{i}-b", lan.prefix));
            run_cmd(&["ip", "netns", "add", &ns])?;
            run_cmd(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            // Created in the root namespace and moved out at once.
            run_cmd(&["ip", "link", "add", &veth, "type", "veth", "peer", "name", &port])?;
            run_cmd(&["ip", "link", "set", &veth, "netns", &ns])?;
            run_cmd(&["ip", "link", "set", &port, "netns", &sw])?;
            run_cmd(&["ip", "-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            run_cmd(&["ip", "-n", &ns, "addr", "add", &format!("10.77.0.{i}/24"), "dev", &veth])?;
            run_cmd(&["ip", "-n", &ns, "link", "set", &veth, "up"])?;
        }
        run_cmd(&["ip", "netns", "exec", &sw, "nft", "add", "table", "bridge", "lab"])?;
        run_cmd(&[
            "ip",
            "netns",
            "exec",
            &sw,
            "nft",
            "add",
            "chain",
            "bridge",
            "lab",
            "wire",
            "{ type filter hook forward priority 0; policy accept; }",
        ])?;
        Ok(lan)
    }

    /// Host `i`'s namespace (1-based).
    pub fn ns(&self, i: usize) -> String {
        format!("{}-{i}", self.prefix)
    }

    fn switch(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    fn rule(&self, rule: &str) -> Result<(), String> {
        let sw = self.switch();
        let mut args =
            vec!["ip", "netns", "exec", &sw, "nft", "add", "rule", "bridge", "lab", "wire"];
        args.extend(rule.split_whitespace());
        run_cmd(&args)
    }

    /// Drops `percent` % of all frames crossing the bridge.
    pub fn loss(&self, percent: f64) -> Result<(), String> {
        self.rule(&format!(
            "numgen random mod 1000 < {} counter drop",
            (percent * 10.0).round() as u32
        ))
    }

    /// Drops everything to and from host `i`.
    pub fn isolate(&self, i: usize) -> Result<(), String> {
        self.rule(&format!("ip saddr 10.77.0.{i} drop"))?;
        self.rule(&format!("ip daddr 10.77.0.{i} drop"))
    }

    /// Drops everything between hosts `1..=cut` and the rest.
    pub fn partition(&self, cut: usize) -> Result<(), String> {
        let a = format!("10.77.0.1-10.77.0.{cut}");
        let b = format!("10.77.0.{}-10.77.0.{}", cut + 1, self.hosts);
        self.rule(&format!("ip saddr {a} ip daddr {b} drop"))?;
        self.rule(&format!("ip saddr {b} ip daddr {a} drop"))
    }

    /// Removes every rule (loss included).
    pub fn heal(&self) -> Result<(), String> {
        let sw = self.switch();
        run_cmd(&["ip", "netns", "exec", &sw, "nft", "flush", "chain", "bridge", "lab", "wire"])
    }

    /// The drop counters, for reports.
    pub fn counters(&self) -> String {
        let sw = self.switch();
        Command::new("ip")
            .args(["netns", "exec", &sw, "nft", "list", "chain", "bridge", "lab", "wire"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| l.contains("counter"))
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for i in 1..=self.hosts {
            let _ = run_cmd(&["ip", "netns", "del", &self.ns(i)]);
        }
        let _ = run_cmd(&["ip", "netns", "del", &self.switch()]);
    }
}

/// One `arw-server` in a namespace, killed on drop.
#[derive(Debug)]
pub struct Server {
    /// Its namespace.
    pub ns: String,
    /// The process.
    pub child: Child,
    /// Its HTTP address (loopback inside the namespace).
    pub http: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where `arw-server` is: `ARW_SERVER_BIN`, else beside this executable or one folder up
/// (`target/<profile>/` for binaries, `target/<profile>/deps/` for tests).
pub fn server_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("ARW_SERVER_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("arw-server"))
        .find(|p| p.is_file())
        .ok_or_else(|| "arw-server not found next to this program; build it (cargo build -p arw-daemon) or set ARW_SERVER_BIN".into())
}

/// Starts `arw-server` as node `id` in namespace `ns` with mDNS on and the given liveness
/// settings; returns once its ready file is written.
pub fn start(
    binary: &Path,
    ns: &str,
    id: &str,
    state: &Path,
    cluster_extra: &str,
) -> Result<Server, String> {
    std::fs::create_dir_all(state).map_err(|e| e.to_string())?;
    let config = format!(
        "[cluster]\nenabled = true\nmdns = true\nlisten = [\"/ip4/0.0.0.0/tcp/0\"]\n{cluster_extra}"
    );
    std::fs::write(state.join("config.toml"), config).map_err(|e| e.to_string())?;
    let ready = state.join("endpoints.json");
    let _ = std::fs::remove_file(&ready);
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(binary)
        .env("ARW_PORT", "0")
        .env("ARW_STATE_DIR", state)
        .env("ARW_CONFIG_DIR", state.join("none"))
        .env("ARW_NODE_ID", id)
        .env("ARW_ADMIN_TOKEN", TOKEN)
        // The servers' own log (stderr): warnings, or what ARW_SIMNET_SERVER_LOG asks for.
        .env("ARW_LOG", std::env::var("ARW_SIMNET_SERVER_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("ip netns exec {ns} arw-server: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // `ip netns exec` execs the server, so the ready file carries this child's pid.
        if let Some(http) = std::fs::read_to_string(&ready)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .filter(|v| v["pid"].as_u64() == Some(u64::from(child.id())))
            .and_then(|v| v["http"].as_str().map(str::to_owned))
        {
            return Ok(Server { ns: ns.to_owned(), child, http });
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{id} exited before it was ready: {status}"));
        }
        if Instant::now() > deadline {
            return Err(format!("{id} not ready within 30 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Server {
    /// `id → health` as this node sees the cluster.
    pub fn view(&self) -> BTreeMap<String, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "curl", "-sS", "--max-time", "5"])
            .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
            .arg(format!("http://{}/state/cluster", self.http))
            .output();
        let value: Value =
            out.ok().and_then(|o| serde_json::from_slice(&o.stdout).ok()).unwrap_or(Value::Null);
        value["nodes"]
            .as_array()
            .map(|nodes| {
                nodes
                    .iter()
                    .map(|n| {
                        (
                            n["id"].as_str().unwrap_or("?").to_owned(),
                            n["health"].as_str().unwrap_or("?").to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A POST with the admin token, inside the namespace.
    pub fn post(&self, path: &str, body: &str) -> Result<(), String> {
        run_cmd(&[
            "ip",
            "netns",
            "exec",
            &self.ns,
            "curl",
            "-sS",
            "--fail",
            "--max-time",
            "5",
            "-X",
            "POST",
            "-H",
            &format!("Authorization: Bearer {TOKEN}"),
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            &format!("http://{}{path}", self.http),
        ])
    }

    fn rss(&self) -> u64 {
        rss_bytes(Some(self.child.id()))
    }
}

/// Runs every trial of a lan-tier scenario.
pub fn run(s: &Scenario, seed: u64, progress: &mut dyn FnMut(usize)) -> Result<Report, String> {
    let binary = server_binary()?;
    let mut m = Measures::default();
    for trial in 0..s.trials {
        run_trial(s, &binary, &mut m)?;
        progress(trial + 1);
    }
    let link = format!(
        "veth + bridge in network namespaces, mDNS, loss {:.0} % (nftables), heartbeat {} ms, suspect {} ms, down {} ms; times polled every {} ms",
        s.link.loss * 100.0,
        s.protocol.heartbeat_interval_ms,
        s.protocol.suspect_after_ms,
        s.protocol.down_after_ms,
        POLL.as_millis()
    );
    Ok(Report::build(s, seed, Tier::Lan, link, m))
}

fn run_trial(s: &Scenario, binary: &Path, m: &mut Measures) -> Result<(), String> {
    let lan = Lan::create(s.nodes)?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let p = &s.protocol;
    let extra = format!(
        "heartbeat_interval_ms = {}\nsuspect_after_ms = {}\ndown_after_ms = {}\n",
        p.heartbeat_interval_ms, p.suspect_after_ms, p.down_after_ms
    );
    let mut servers: Vec<Option<Server>> = Vec::new();
    let started = Instant::now();
    for i in 1..=s.nodes {
        servers.push(Some(start(
            binary,
            &lan.ns(i),
            &format!("n{}", i - 1),
            &dir.path().join(format!("n{i}")),
            &extra,
        )?));
    }
    // Formation: every node sees every node ok (this is mDNS discovery, measured as convergence
    // of the boot adverts).
    let mut formed = vec![None; s.nodes];
    while formed.iter().any(Option::is_none) {
        for (i, server) in servers.iter().enumerate() {
            if formed[i].is_none()
                && let Some(server) = server
                && {
                    let v = server.view();
                    v.len() == s.nodes && v.values().all(|h| h == "ok")
                }
            {
                formed[i] = Some(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
        if started.elapsed() > Duration::from_secs(90) {
            return Err("the nodes did not discover each other within 90 s".into());
        }
        std::thread::sleep(POLL);
    }
    m.convergence.extend(formed.into_iter().flatten());
    m.rss.extend(servers.iter().flatten().map(Server::rss));
    if s.link.loss > 0.0 {
        lan.loss(s.link.loss * 100.0)?;
    }

    let start_at = Instant::now();
    let end = start_at + Duration::from_secs_f64(s.duration_secs);
    let mut faults = s.schedule().into_iter().peekable();
    let mut gone: BTreeMap<usize, Instant> = BTreeMap::new();
    let mut unreachable: BTreeSet<(usize, usize)> = BTreeSet::new();
    // Pairs cut by a partition re-form after the heal: each connection resumes from TCP
    // retransmission backoff, and on a lossy link it can stall again for seconds. Such a pair is
    // judged again once the observer has seen the target `ok` for `down_after` without a break;
    // the value is since when it has been `ok`.
    let mut reforming: BTreeMap<(usize, usize), Option<Instant>> = BTreeMap::new();
    let settle = Duration::from_millis(s.protocol.down_after_ms);
    let mut detected = BTreeSet::new();
    let mut downed = BTreeSet::new();
    let mut heal_since: Option<Instant> = None;
    let mut healed = vec![false; s.nodes];
    let mut last: Vec<BTreeMap<String, String>> = vec![BTreeMap::new(); s.nodes];
    while Instant::now() < end {
        while faults
            .peek()
            .is_some_and(|f| start_at + Duration::from_secs_f64(f.at_secs) <= Instant::now())
        {
            let Some(f) = faults.next() else { break };
            let node = f.node.unwrap_or(0);
            match f.kind {
                FaultKind::Crash => {
                    if let Some(mut server) = servers[node].take() {
                        let _ = server.child.kill();
                        let _ = server.child.wait();
                        gone.insert(node, Instant::now());
                    }
                }
                FaultKind::Isolate => {
                    lan.isolate(node + 1)?;
                    gone.insert(node, Instant::now());
                    for other in (0..s.nodes).filter(|&o| o != node) {
                        unreachable.insert((node, other));
                        unreachable.insert((other, node));
                    }
                }
                FaultKind::Partition => {
                    let cut = ((s.nodes as f64) * f.fraction.unwrap_or(0.5)).ceil() as usize;
                    lan.partition(cut)?;
                    for a in 0..cut {
                        for b in cut..s.nodes {
                            unreachable.insert((a, b));
                            unreachable.insert((b, a));
                        }
                    }
                }
                FaultKind::Heal => {
                    lan.heal()?;
                    if s.link.loss > 0.0 {
                        lan.loss(s.link.loss * 100.0)?;
                    }
                    reforming
                        .extend(std::mem::take(&mut unreachable).into_iter().map(|p| (p, None)));
                    gone.retain(|n, _| servers[*n].is_none());
                    heal_since = Some(Instant::now());
                    healed = vec![false; s.nodes];
                }
                FaultKind::Advert => {
                    if let Some(server) = &servers[node] {
                        server.post("/admin/hierarchy/role", r#"{"role":"regional"}"#)?;
                    }
                }
                FaultKind::Restart => {
                    if servers[node].is_none() {
                        servers[node] = Some(start(
                            binary,
                            &lan.ns(node + 1),
                            &format!("n{node}"),
                            &dir.path().join(format!("n{}", node + 1)),
                            &extra,
                        )?);
                        gone.remove(&node);
                    }
                }
            }
        }
        for (o, server) in servers.iter().enumerate() {
            let Some(server) = server else { continue };
            let view = server.view();
            for (id, health) in &view {
                let Some(t) = id.strip_prefix('n').and_then(|x| x.parse::<usize>().ok()) else {
                    continue;
                };
                let settled = match reforming.get_mut(&(o, t)) {
                    Some(ok_since) if health == "ok" => {
                        ok_since.get_or_insert_with(Instant::now).elapsed() >= settle
                    }
                    Some(ok_since) => {
                        *ok_since = None;
                        false
                    }
                    None => false,
                };
                if settled {
                    reforming.remove(&(o, t));
                }
                if last[o].get(id) == Some(health) || health == "ok" {
                    continue;
                }
                if let Some(since) = gone.get(&t) {
                    let ms = since.elapsed().as_secs_f64() * 1000.0;
                    if detected.insert((o, t)) {
                        m.detection.push(ms);
                    }
                    if health == "down" && downed.insert((o, t)) {
                        m.down.push(ms);
                    }
                } else if reforming.contains_key(&(o, t)) {
                    if health == "down" {
                        tracing::warn!(observer = o, target = t, at = ?start_at.elapsed(), "down while re-forming after the heal (not counted as a false positive)");
                    }
                } else if !unreachable.contains(&(o, t)) && servers[t].is_some() {
                    tracing::warn!(observer = o, target = t, %health, at = ?start_at.elapsed(), "false positive");
                    match health.as_str() {
                        "down" => m.false_positives += 1,
                        "suspect" => m.false_suspects += 1,
                        _ => {}
                    }
                }
            }
            if let Some(since) = heal_since
                && !healed[o]
                && (0..s.nodes)
                    .filter(|&t| t != o && servers[t].is_some())
                    .all(|t| view.get(&format!("n{t}")).is_some_and(|h| h == "ok"))
            {
                healed[o] = true;
                m.heal.push(since.elapsed().as_secs_f64() * 1000.0);
            }
            last[o] = view;
        }
        std::thread::sleep(POLL);
    }
    tracing::info!(counters = %lan.counters(), "lan trial done");
    drop(servers);
    Ok(())
}
