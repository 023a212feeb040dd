//! Placement: filter the workers that can run a job, then rank those left (Nomad's
//! filter → rank, with Ray's spread among near-equals). Pure: the same inputs give the same
//! choice, so simulations replay exactly.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{Require, glob};
use crate::{cluster::Advert, node_id::NodeId};

/// A worker as the Home sees it when placing.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// Its advert.
    pub advert: &'a Advert,
    /// Health `ok` now.
    pub ok: bool,
    /// Admitted by this Home under the key it uses.
    pub admitted: bool,
    /// Attempts of this Home's running or being assigned there.
    pub inflight: u32,
}

/// What is being placed.
#[derive(Debug, Clone, Copy)]
pub struct Want<'a> {
    /// Job id (spreads equal candidates differently per job).
    pub job_id: &'a str,
    /// Kind.
    pub kind: &'a str,
    /// Hard constraints.
    pub require: &'a Require,
    /// Only this node.
    pub node: Option<&'a str>,
    /// Never these.
    pub avoid: &'a [String],
    /// Nodes that refused this job for good.
    pub tried: &'a [NodeId],
    /// Nodes that lost an attempt of this job: ranked last.
    pub lost_on: &'a [NodeId],
    /// Nodes that refused it for now (busy, draining, unanswered): skipped, and the job waits.
    pub resting: &'a [NodeId],
}

/// Why no worker was chosen: how many were looked at and how many each filter removed
/// (`{"evaluated": 5, "filtered": {"kind_not_allowed": 3, "gpu.count": 2}}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explain {
    /// Candidates looked at.
    pub evaluated: usize,
    /// Candidates removed, by the first filter that removed them.
    pub filtered: BTreeMap<String, usize>,
}

/// The outcome of a placement.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Run it there.
    Remote {
        /// The worker.
        node: NodeId,
        /// Its score.
        score: f64,
        /// Feasible candidates.
        feasible: usize,
    },
    /// No worker can.
    Infeasible(Explain),
}

/// Chooses a worker for `want` among `candidates`. O(n): each candidate is filtered, cheapest
/// test first, then the feasible ones are scored on spare capacity, with a per-job spread.
pub fn place<'a>(want: &Want<'_>, candidates: impl IntoIterator<Item = Candidate<'a>>) -> Decision {
    let mut explain = Explain::default();
    let seed = job_seed(want.job_id);
    let mut best: Option<(f64, &NodeId)> = None;
    let mut feasible = 0;
    for c in candidates {
        explain.evaluated += 1;
        if let Err(filter) = filter(want, &c) {
            *explain.filtered.entry(filter.to_owned()).or_default() += 1;
            continue;
        }
        feasible += 1;
        // The penalties only lower a score: a node already behind the best needs no more.
        let mut score = score(seed, &c);
        if best.is_some_and(|(s, _)| score < s) {
            continue;
        }
        if want.require.gpu.is_none() && has_gpu(&c.advert.capabilities) {
            score -= GPU_PENALTY;
        }
        if want.lost_on.contains(&c.advert.id) {
            score -= LOST_PENALTY;
        }
        if best.is_none_or(|(s, id)| score > s || (score == s && c.advert.id < *id)) {
            best = Some((score, &c.advert.id));
        }
    }
    match best {
        Some((score, node)) => Decision::Remote { node: node.clone(), score, feasible },
        None => Decision::Infeasible(explain),
    }
}

/// The first filter `c` fails, if any. What the worker is (its kinds, capabilities,
/// admission) comes first, what it is now (health, draining, resting, full) last: a job only
/// those last filters removed could run once the worker recovers, so it waits.
fn filter(want: &Want<'_>, c: &Candidate<'_>) -> Result<(), &'static str> {
    let advert = c.advert;
    let Some(jobs) = &advert.jobs else { return Err("takes_no_jobs") };
    if !jobs.accepts.iter().any(|g| glob(g, want.kind)) {
        return Err("kind_not_allowed");
    }
    if want.node.is_some_and(|n| n != advert.id.as_str()) {
        return Err("node");
    }
    if want.avoid.iter().any(|a| a == advert.id.as_str()) {
        return Err("avoid");
    }
    fits(want.require, &advert.capabilities, &advert.tags)?;
    if !c.admitted {
        return Err("admission");
    }
    if want.tried.contains(&advert.id) {
        return Err("tried");
    }
    if !c.ok {
        return Err(UNHEALTHY);
    }
    let quarantined = |r: &super::RuntimeStatus| {
        r.health == super::RuntimeHealth::Down && r.kinds.iter().any(|k| k == want.kind)
    };
    if advert.runtimes.iter().any(quarantined) {
        return Err(QUARANTINED);
    }
    if jobs.draining {
        return Err(DRAINING);
    }
    if want.resting.contains(&advert.id) {
        return Err(RESTING);
    }
    if c.inflight >= jobs.slots {
        return Err(SLOTS_FULL);
    }
    Ok(())
}

/// Filters that pass of themselves: a worker not `ok` now, draining, resting after a
/// transient refusal, or with every slot taken.
pub const UNHEALTHY: &str = "health";
/// See [`UNHEALTHY`].
pub const DRAINING: &str = "draining";
/// See [`UNHEALTHY`].
pub const RESTING: &str = "resting";
/// See [`UNHEALTHY`].
pub const SLOTS_FULL: &str = "slots_full";
/// The worker's runtime for the kind is quarantined (its advert says until when): wait.
pub const QUARANTINED: &str = "runtime_quarantined";

/// Whether a node with `caps` and `tags` meets `require`; otherwise the constraint it misses.
pub fn fits(
    require: &Require,
    caps: &Map<String, Value>,
    tags: &[String],
) -> Result<(), &'static str> {
    let text = |key: &str| caps.get(key).and_then(Value::as_str);
    if require.os.as_deref().is_some_and(|os| text("os") != Some(os)) {
        return Err("os");
    }
    if require.arch.as_deref().is_some_and(|arch| text("arch") != Some(arch)) {
        return Err("arch");
    }
    if !require.tags_all.iter().all(|t| tags.contains(t)) {
        return Err("tags");
    }
    if let Some(gpu) = &require.gpu {
        let vendor = gpu.vendor.as_deref();
        let (mut all, mut matching, mut big) = (0u64, 0u64, 0u64);
        for g in gpus(caps) {
            all += 1;
            if vendor.is_some_and(|v| !contains_ignore_case(g.name, v)) {
                continue;
            }
            matching += 1;
            if gpu.min_memory_mib.is_none_or(|min| g.memory_mib.is_some_and(|m| m >= min)) {
                big += 1;
            }
        }
        let count = u64::from(gpu.count);
        if matching < count {
            return Err(if vendor.is_some() && all >= count { "gpu.vendor" } else { "gpu.count" });
        }
        if big < count {
            return Err("gpu.memory");
        }
    }
    if let Some(min) = require.memory_min_mib {
        let total = caps.get("memory").and_then(|m| m["total_bytes"].as_u64()).unwrap_or(0);
        if total / (1024 * 1024) < min {
            return Err("memory");
        }
    }
    if let Some(min) = require.cpu_min {
        let cores = caps.get("cpu").and_then(|c| c["cores"].as_u64()).unwrap_or(0);
        if cores < min {
            return Err("cpu");
        }
    }
    Ok(())
}

struct Gpu<'a> {
    name: &'a str,
    memory_mib: Option<u64>,
}

/// The GPUs a node offers: those its probe found (`capabilities.gpus`), else those its
/// operator declared (`gpu:<name>` in `capabilities.declared`, memory unknown).
fn gpus(caps: &Map<String, Value>) -> impl Iterator<Item = Gpu<'_>> {
    let list = |key: &str| caps.get(key).and_then(Value::as_array).map(Vec::as_slice);
    let probed = list("gpus").unwrap_or_default();
    let declared = if probed.is_empty() { list("declared").unwrap_or_default() } else { &[] };
    let probed = probed.iter().map(|g| Gpu {
        name: g["name"].as_str().unwrap_or_default(),
        memory_mib: g["memory_total_bytes"].as_u64().map(|b| b / (1024 * 1024)),
    });
    let declared = declared
        .iter()
        .filter_map(|d| d.as_str()?.strip_prefix("gpu:"))
        .map(|name| Gpu { name, memory_mib: None });
    probed.chain(declared)
}

/// Whether a node offers any GPU (as [`gpus`] would list one, without reading them).
fn has_gpu(caps: &Map<String, Value>) -> bool {
    let list = |key: &str| caps.get(key).and_then(Value::as_array);
    match list("gpus") {
        Some(probed) if !probed.is_empty() => true,
        _ => list("declared")
            .is_some_and(|d| d.iter().any(|d| d.as_str().is_some_and(|d| d.starts_with("gpu:")))),
    }
}

/// Whether `needle` occurs in `hay`, ASCII case ignored.
fn contains_ignore_case(hay: &str, needle: &str) -> bool {
    let (hay, needle) = (hay.as_bytes(), needle.as_bytes());
    needle.is_empty() || hay.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

/// Spare capacity (a node under half full counts as empty, so near-equals tie), plus a spread
/// drawn from the job (`seed`) and the node's id so equal nodes share the work. [`place`]
/// subtracts the penalties: [`GPU_PENALTY`] for GPUs a job that needs none would sit on (they
/// stay free for the jobs that do), [`LOST_PENALTY`] for a node that lost the job.
fn score(seed: u64, c: &Candidate<'_>) -> f64 {
    let slots = c.advert.jobs.as_ref().map_or(1, |j| j.slots.max(1));
    let util = f64::from(c.inflight) / f64::from(slots);
    let util = if util < 0.5 { 0.0 } else { util };
    0.5 * (1.0 - util) + 0.1 * spread(seed, c.advert.id.as_str())
}

/// What losing an attempt of a job costs a node when placing that job again: more than any
/// other term, so it is chosen only when no other node will do.
const LOST_PENALTY: f64 = 1.0;

/// What a GPU costs a job that needs none: an idle GPU node ranks below a half-full one
/// without (best fit for scarce hardware, as Nomad's device-aware bin packing).
const GPU_PENALTY: f64 = 0.3;

/// A number in [0, 1) from `seed` and `id`: the same for the same inputs, every run.
fn spread(seed: u64, id: &str) -> f64 {
    let mut h = seed;
    for b in id.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finaliser, so nearby ids land far apart.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// The job's part of the spread.
fn job_seed(job_id: &str) -> u64 {
    let digest = Sha256::digest(job_id.as_bytes());
    let mut first = [0; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::jobs::{GpuRequire, JobsAdvert};

    fn worker(id: &str, accepts: &[&str], caps: Value) -> Advert {
        let mut a = Advert::basic(NodeId::parse(id).expect("id"), "lab", 1, 0);
        a.capabilities = caps.as_object().cloned().unwrap_or_default();
        a.jobs = Some(JobsAdvert {
            slots: 2,
            accepts: accepts.iter().map(|s| (*s).to_owned()).collect(),
            draining: false,
            boot: 0,
        });
        a
    }

    fn want<'a>(require: &'a Require, tried: &'a [NodeId]) -> Want<'a> {
        Want {
            job_id: "j1",
            kind: "math.add",
            require,
            node: None,
            avoid: &[],
            tried,
            lost_on: &[],
            resting: &[],
        }
    }

    #[test]
    fn filters_count_in_explain_and_capability_decides() {
        let gpu = worker(
            "gpu",
            &["math.*"],
            json!({"gpus":[{"name":"NVIDIA H200","memory_total_bytes": 150_000u64 << 20}]}),
        );
        let cpu = worker("cpu", &["math.add"], json!({"gpus": []}));
        let closed = worker("closed", &[], json!({}));
        let require = Require {
            gpu: Some(GpuRequire { count: 1, min_memory_mib: Some(80_000), vendor: None }),
            ..Require::default()
        };
        let cands = |ok: bool| {
            [&gpu, &cpu, &closed].map(|a| Candidate { advert: a, ok, admitted: true, inflight: 0 })
        };
        match place(&want(&require, &[]), cands(true)) {
            Decision::Remote { node, feasible, .. } => {
                assert_eq!(node.as_str(), "gpu");
                assert_eq!(feasible, 1);
            }
            other => panic!("{other:?}"),
        }
        let Decision::Infeasible(explain) = place(&want(&require, &[]), cands(false)) else {
            panic!("placed on unhealthy nodes")
        };
        // What a node is comes before what it is now: only the node that would fit counts as
        // unhealthy, so a job waits for it rather than failing.
        assert_eq!(explain.evaluated, 3);
        assert_eq!(explain.filtered["health"], 1);
        assert_eq!(explain.filtered["gpu.count"], 1);
        assert_eq!(explain.filtered["kind_not_allowed"], 1);
        let tried = [NodeId::parse("gpu").expect("id")];
        let Decision::Infeasible(explain) = place(&want(&require, &tried), cands(true)) else {
            panic!("placed twice on a node that refused")
        };
        assert_eq!(explain.filtered["tried"], 1);
        assert_eq!(explain.filtered["gpu.count"], 1);
        assert_eq!(explain.filtered["kind_not_allowed"], 1);
    }

    #[test]
    fn a_node_that_lost_the_job_is_chosen_again_only_when_no_other_will_do() {
        let a = worker("a", &["*"], json!({}));
        let b = worker("b", &["*"], json!({}));
        let require = Require::default();
        let lost = [NodeId::parse("a").expect("id")];
        let want = Want { lost_on: &lost, ..want(&require, &[]) };
        let cand = |advert| Candidate { advert, ok: true, admitted: true, inflight: 0 };
        for job in 0..20 {
            let id = format!("job-{job}");
            let want = Want { job_id: &id, ..want };
            let Decision::Remote { node, .. } = place(&want, [cand(&a), cand(&b)]) else {
                panic!("b was free")
            };
            assert_eq!(node.as_str(), "b");
            let Decision::Remote { node, .. } = place(&want, [cand(&a)]) else {
                panic!("a lease lost is no refusal: a may run it again")
            };
            assert_eq!(node.as_str(), "a");
        }
    }

    #[test]
    fn a_worker_whose_runtime_for_the_kind_is_quarantined_is_skipped_for_now() {
        use crate::jobs::{RuntimeBudget, RuntimeDecl, Runtimes};
        let mut sick = worker("sick", &["*"], json!({}));
        let decl = RuntimeDecl { id: "builtin".into(), kinds: vec!["math.add".into()] };
        let mut runtimes = Runtimes::new(vec![decl], RuntimeBudget::default());
        for t in 0..5 {
            runtimes.finished("math.add", Some("crashed"), t);
        }
        sick.runtimes = runtimes.digests();
        let well = worker("well", &["*"], json!({}));
        let require = Require::default();
        let cand = |advert| Candidate { advert, ok: true, admitted: true, inflight: 0 };
        let Decision::Remote { node, .. } = place(&want(&require, &[]), [cand(&sick), cand(&well)])
        else {
            panic!("well can run it")
        };
        assert_eq!(node.as_str(), "well");
        let Decision::Infeasible(explain) = place(&want(&require, &[]), [cand(&sick)]) else {
            panic!("sick cannot run it now")
        };
        assert_eq!(explain.filtered.get(QUARANTINED), Some(&1));
        let other = Want { kind: "echo", ..want(&require, &[]) };
        assert!(matches!(place(&other, [cand(&sick)]), Decision::Remote { .. }));
    }

    #[test]
    fn declared_gpus_count_and_full_nodes_are_skipped() {
        let declared = worker("d", &["*"], json!({"declared": ["gpu:nvidia-test"]}));
        let require = Require {
            gpu: Some(GpuRequire { count: 1, min_memory_mib: None, vendor: Some("NVIDIA".into()) }),
            ..Require::default()
        };
        let free = Candidate { advert: &declared, ok: true, admitted: true, inflight: 0 };
        assert!(matches!(place(&want(&require, &[]), [free]), Decision::Remote { .. }));
        let full = Candidate { inflight: 2, ..free };
        let Decision::Infeasible(explain) = place(&want(&require, &[]), [full]) else {
            panic!("placed on a full node")
        };
        assert_eq!(explain.filtered["slots_full"], 1);
    }

    #[test]
    fn equal_nodes_share_the_work() {
        let adverts: Vec<Advert> =
            (0..20).map(|i| worker(&format!("w{i}"), &["*"], json!({}))).collect();
        let require = Require::default();
        let mut chosen = std::collections::BTreeSet::new();
        for j in 0..200 {
            let job = format!("job-{j}");
            let want = Want { job_id: &job, ..want(&require, &[]) };
            let cands = adverts.iter().map(|a| Candidate {
                advert: a,
                ok: true,
                admitted: true,
                inflight: 0,
            });
            if let Decision::Remote { node, .. } = place(&want, cands) {
                chosen.insert(node);
            }
        }
        assert!(chosen.len() >= 15, "only {} of 20 nodes chosen", chosen.len());
    }
}
