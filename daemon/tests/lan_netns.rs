//! A LAN on one machine: three arw-server processes in their own network namespaces, joined by a
//! bridge, finding each other with mDNS only (no bootstrap), then running under 20 % packet loss
//! without ever marking a live node down.
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables). Without them the test says so and passes,
//! unless `ARW_REQUIRE_NETNS=1` (set by CI), where it fails. Multicast never leaves the
//! namespaces this test creates.

mod common;

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

const HOSTS: usize = 3;
const TOKEN: &str = "netns-token";

/// Namespaces `<prefix>-1..n` on a bridge in `<prefix>-sw`; removed on drop.
struct Lan {
    prefix: String,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out =
        Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Lan {
    fn create(hosts: usize) -> Result<Self, String> {
        let prefix = format!("a{}", std::process::id() % 100_000);
        let lan = Self { prefix };
        let p = &lan.prefix;
        let sw = format!("{p}-sw");
        run(&["ip", "netns", "add", &sw])?;
        run(&["ip", "-n", &sw, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"])?;
        run(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        for i in 1..=hosts {
            let (ns, veth, port) = (lan.ns(i), format!("{p}-{i}"), format!("{p}-{i}-br"));
            run(&["ip", "netns", "add", &ns])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            // Created in the root namespace and moved out at once.
            run(&["ip", "link", "add", &veth, "type", "veth", "peer", "name", &port])?;
            run(&["ip", "link", "set", &veth, "netns", &ns])?;
            run(&["ip", "link", "set", &port, "netns", &sw])?;
            run(&["ip", "-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            run(&["ip", "-n", &ns, "addr", "add", &format!("10.77.0.{i}/24"), "dev", &veth])?;
            run(&["ip", "-n", &ns, "link", "set", &veth, "up"])?;
        }
        run(&["ip", "netns", "exec", &sw, "nft", "add", "table", "bridge", "lab"])?;
        run(&[
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

    fn ns(&self, i: usize) -> String {
        format!("{}-{i}", self.prefix)
    }

    /// Drops `percent` % of the frames crossing the bridge, in both directions.
    fn loss(&self, percent: u32) -> Result<(), String> {
        let sw = format!("{}-sw", self.prefix);
        run(&[
            "ip",
            "netns",
            "exec",
            &sw,
            "nft",
            "add",
            "rule",
            "bridge",
            "lab",
            "wire",
            "numgen",
            "random",
            "mod",
            "100",
            "<",
            &percent.to_string(),
            "counter",
            "drop",
        ])
    }

    fn dropped(&self) -> String {
        let sw = format!("{}-sw", self.prefix);
        Command::new("ip")
            .args(["netns", "exec", &sw, "nft", "list", "chain", "bridge", "lab", "wire"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| l.contains("counter"))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for i in 1..=HOSTS {
            let _ = run(&["ip", "netns", "del", &self.ns(i)]);
        }
        let _ = run(&["ip", "netns", "del", &format!("{}-sw", self.prefix)]);
    }
}

struct Node {
    ns: String,
    child: Child,
    http: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(ns: &str, id: &str, state: &Path) -> Node {
    std::fs::create_dir_all(state).expect("state dir");
    std::fs::write(
        state.join("config.toml"),
        "[cluster]\nenabled = true\nmdns = true\nlisten = [\"/ip4/0.0.0.0/tcp/0\"]\n",
    )
    .expect("config");
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_arw-server")])
        .env("ARW_PORT", "0")
        .env("ARW_STATE_DIR", state)
        .env("ARW_CONFIG_DIR", state.join("none"))
        .env("ARW_NODE_ID", id)
        .env("ARW_ADMIN_TOKEN", TOKEN)
        .env("ARW_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn arw-server in its namespace");
    // `ip netns exec` execs the server, so the ready file carries this child's pid.
    let endpoints = common::wait_for_ready(&state.join("endpoints.json"), &mut child);
    let http = endpoints["http"].as_str().expect("http address").to_owned();
    Node { ns: ns.to_owned(), child, http }
}

/// `id → health` as `node` sees the cluster (reached with curl inside its namespace).
fn view(node: &Node) -> Vec<(String, String)> {
    let out = Command::new("ip")
        .args(["netns", "exec", &node.ns, "curl", "-sS", "--max-time", "5"])
        .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
        .arg(format!("http://{}/state/cluster", node.http))
        .output()
        .expect("curl");
    let value: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    common::node_rows(&value).into_iter().map(|(id, health, _)| (id, health)).collect()
}

#[test]
fn mdns_discovery_and_no_false_down_under_20_percent_loss() {
    let lan = match Lan::create(HOSTS) {
        Ok(lan) => lan,
        Err(why) => {
            assert!(
                std::env::var("ARW_REQUIRE_NETNS").as_deref() != Ok("1"),
                "network namespaces are required here but unavailable: {why}"
            );
            eprintln!(
                "skipped: network namespaces unavailable ({why}); run as root with iproute2 and nftables"
            );
            return;
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes: Vec<Node> = (1..=HOSTS)
        .map(|i| start(&lan.ns(i), &format!("lan-{i}"), &dir.path().join(format!("n{i}"))))
        .collect();

    let started = Instant::now();
    for node in &nodes {
        loop {
            let seen = view(node);
            if seen.len() == HOSTS && seen.iter().all(|(_, h)| h == "ok") {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "mDNS discovery incomplete on {}: {seen:?}",
                node.ns
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    eprintln!("mDNS discovery: all {HOSTS} nodes see each other after {:?}", started.elapsed());

    lan.loss(20).expect("loss rule");
    let window = Duration::from_secs(30);
    let started = Instant::now();
    let mut suspects = 0;
    while started.elapsed() < window {
        for node in &nodes {
            for (id, health) in view(node) {
                assert_ne!(health, "down", "{id} marked down by {} under 20 % loss", node.ns);
                assert_ne!(health, "left", "{id} marked left by {}", node.ns);
                suspects += usize::from(health == "suspect");
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "20 % loss for {window:?}: no node marked down; suspect observations: {suspects}; {}",
        lan.dropped()
    );
}
