//! arw-simnet as users run it: scenario files, the deterministic virtual tier, a small stack run
//! and the LAN tier in network namespaces.

use std::path::PathBuf;

use arw_simnet::scenario::Scenario;

fn scenarios_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

#[test]
fn every_shipped_scenario_parses() {
    let mut count = 0;
    for entry in std::fs::read_dir(scenarios_dir()).expect("scenarios dir").flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "toml") {
            Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
            count += 1;
        }
    }
    assert!(count >= 10, "only {count} scenarios");
}

fn run_cli(seed: u64, json: &std::path::Path) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_arw-simnet"))
        .arg("run")
        .arg(scenarios_dir().join("small-virtual.toml"))
        .args(["--seed", &seed.to_string(), "--json"])
        .arg(json)
        .output()
        .expect("arw-simnet");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("convergence"), "the table is printed");
    serde_json::from_str(&std::fs::read_to_string(json).expect("json")).expect("valid json")
}

#[test]
fn the_virtual_tier_is_deterministic_and_converges_without_false_positives() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = run_cli(11, &dir.path().join("a.json"));
    let mut b = run_cli(11, &dir.path().join("b.json"));
    for key in [
        "nodes",
        "trials",
        "seed",
        "tier",
        "faults",
        "commit",
        "convergence_ms",
        "missed",
        "detection_ms",
        "false_positives",
        "msgs_per_node_per_s",
        "bytes_per_node_per_s",
        "rss_bytes_per_node",
    ] {
        assert!(a.get(key).is_some(), "report lacks {key}");
    }
    a["commit"] = serde_json::Value::Null;
    b["commit"] = serde_json::Value::Null;
    assert_eq!(a, b, "same seed, same report");
    assert_eq!(a["missed"], 0);
    assert_eq!(a["false_positives"], 0);
    assert_eq!(a["convergence_ms"]["count"], 2 * 19, "every node got the advert in both trials");
    assert_eq!(a["detection_ms"]["count"], 2 * 19, "every survivor noticed the crash");
}

/// Forty node actors over loopback libp2p in this process, with the daemon's default liveness
/// settings: they find each other through one bootstrap node, a changed advert reaches every
/// node, a crash is seen by every survivor, and no live node is ever suspected.
#[test]
fn forty_real_nodes_form_and_converge_on_the_stack_tier() {
    let s = Scenario::parse(
        "name = \"stack-40\"\ntier = \"stack\"\nnodes = 40\nduration_secs = 8\n[[faults]]\nat_secs = 1\nkind = \"advert\"\nnode = 4\n[[faults]]\nat_secs = 2\nkind = \"crash\"\nnode = 17\n",
    )
    .expect("scenario");
    let report = arw_simnet::run::run(&s, 1).expect("the 40 nodes form");
    eprintln!("{}", report.table());
    assert_eq!(report.missed, 0);
    assert_eq!(report.convergence_ms.count, 39, "every other node got the changed advert");
    assert_eq!(report.detection_ms.count, 39, "every survivor saw the crash");
    assert_eq!(report.down_ms.count, 39, "and judged it down");
    assert_eq!((report.false_positives, report.false_suspects), (0, 0));
    assert!(report.rss_bytes_per_node.is_some_and(|r| r > 0));
}

/// Three arw-server processes in network namespaces: mDNS discovery, then 20 % loss on the
/// bridge, a crash, an isolation and its heal. Needs root; without it this says why and
/// passes, except where `ARW_REQUIRE_NETNS=1` (CI).
#[test]
fn lan_tier_discovers_with_mdns_and_never_marks_a_live_node_down_under_loss() {
    if let Err(why) = arw_simnet::lan::Lan::create(1) {
        assert!(
            std::env::var("ARW_REQUIRE_NETNS").as_deref() != Ok("1"),
            "network namespaces are required here but unavailable: {why}"
        );
        eprintln!(
            "skipped: network namespaces unavailable ({why}); run as root with iproute2 and nftables"
        );
        return;
    }
    let s = Scenario::load(&scenarios_dir().join("lan-3.toml")).expect("lan-3");
    let report = arw_simnet::run::run(&s, 1).expect("lan run");
    eprintln!("{}", report.table());
    assert_eq!(report.convergence_ms.count, 3, "every node discovered the others with mDNS");
    assert_eq!(report.false_positives, 0, "a live, reachable node was marked down under 20 % loss");
    assert!(
        report.detection_ms.count >= 3,
        "the crash was seen by both survivors, the isolation by the other"
    );
    assert!(report.heal_ms.count >= 1, "views became whole again after the heal");
}

/// Jobs on eight real node actors over loopback libp2p: the Home runs some itself and places
/// the rest (GPU jobs on the GPU worker) while a worker crashes and the Home itself crashes and
/// restarts, each job sent twice. Every job ends once, with one row per key, never running
/// twice at once.
#[test]
fn jobs_on_real_nodes_end_once_through_worker_and_home_crashes() {
    let s = Scenario::parse(
        "name = \"stack-jobs\"\ntier = \"stack\"\nnodes = 8\nduration_secs = 24\n\
         [jobs]\ncount = 100\nstart_secs = 2\nevery_ms = 100\nrun_ms = [200, 1500]\n\
         prefer = \"auto\"\nhome_slots = 1\ngpu_workers = 1\ngpu_every = 10\nresubmit = 1\n\
         [[faults]]\nat_secs = 5\nkind = \"crash\"\nnode = 3\n\
         [[faults]]\nat_secs = 8\nkind = \"crash\"\nnode = 0\n\
         [[faults]]\nat_secs = 10\nkind = \"restart\"\nnode = 0\n",
    )
    .expect("scenario");
    let report = arw_simnet::run::run(&s, 1).expect("the 8 nodes form");
    eprintln!("{}", report.table());
    let j = report.jobs.expect("jobs measured");
    assert_eq!((j.submitted, j.completed, j.failed, j.unfinished), (100, 100, 0, 0), "{j:?}");
    assert!(j.resubmitted >= 90, "{j:?}");
    assert_eq!(j.extra_rows, 0, "one row per key: {j:?}");
    assert_eq!((j.duplicate_results, j.overlapping_runs, j.fence_regressions), (0, 0, 0));
    assert_eq!(j.misplaced, 0, "GPU jobs on the GPU worker: {j:?}");
    assert!(j.ran_local > 0 && j.ran_remote > 0, "{j:?}");
}
