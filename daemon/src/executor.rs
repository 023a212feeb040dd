//! The executors: the job kinds this server runs, each attempt a task of its own with a hard
//! deadline and cancellation: the built-in kinds in-process (an abort stops one at its next
//! await), and the external programs of `[jobs.exec.<kind>]` as child processes in a process
//! group of their own (killed whole when the attempt ends early). The node core decides what
//! runs where; this only runs what it is handed and reports back.

use std::{collections::BTreeMap, path::PathBuf, process::Stdio, sync::Arc};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::{io::AsyncReadExt, io::AsyncWriteExt, sync::mpsc, task::JoinSet};

use arw_p2p::{
    jobs::{Exec, Finished, Run},
    node::NodeHandle,
    time::now_ms,
};

/// The built-in kinds: the reference's sample tools, and two for tests and examples.
pub const BUILTIN: [&str; 4] = ["math.add", "time.now", "echo", "sleep"];
/// The longest `sleep`.
const MAX_SLEEP_MS: u64 = 60 * 60 * 1_000;

/// The external programs, by kind, and where their runs get their working directories.
#[derive(Debug, Clone)]
pub struct Programs {
    exec: Arc<BTreeMap<String, ExecSpec>>,
    tmp: PathBuf,
    proxy: Option<std::net::SocketAddr>,
}

impl Programs {
    /// `exec` from `[jobs.exec]`; each run works in a fresh directory under `tmp`.
    pub fn new(exec: BTreeMap<String, ExecSpec>, tmp: PathBuf) -> Self {
        Self { exec: Arc::new(exec), tmp, proxy: None }
    }

    /// Points every run at the egress proxy at `addr` (`http_proxy`, `https_proxy` and their
    /// upper-case forms, with the job's id and fence as credentials).
    pub fn with_proxy(mut self, addr: std::net::SocketAddr) -> Self {
        self.proxy = Some(addr);
        self
    }
}

/// Runs what arrives on `runs` until the channel closes, reporting each end to `node`.
pub async fn serve(node: NodeHandle, mut runs: mpsc::UnboundedReceiver<Exec>, programs: Programs) {
    let mut running: JoinSet<Finished> = JoinSet::new();
    let mut handles: BTreeMap<(String, u64), tokio::task::AbortHandle> = BTreeMap::new();
    loop {
        tokio::select! {
            exec = runs.recv() => match exec {
                Some(Exec::Run(run)) => {
                    let key = (run.job_id.clone(), run.fence);
                    handles.insert(key, running.spawn(attempt(run, programs.clone())));
                }
                Some(Exec::Abort { job_id, fence }) => {
                    if let Some(handle) = handles.remove(&(job_id, fence)) {
                        handle.abort();
                    }
                }
                None => break,
            },
            Some(done) = running.join_next(), if !running.is_empty() => {
                let Ok(done) = done else { continue };
                handles.remove(&(done.job_id.clone(), done.fence));
                if node.job_finished(done).await.is_err() {
                    break;
                }
            }
        }
    }
    running.abort_all();
}

/// One attempt, bounded by its deadline (and a program's own `timeout_ms`).
async fn attempt(run: Run, programs: Programs) -> Finished {
    let started_ms = now_ms();
    let spec = programs.exec.get(&run.kind);
    let mut budget_ms = run.deadline_ms.saturating_sub(started_ms);
    if let Some(cap) = spec.and_then(|s| s.timeout_ms) {
        budget_ms = budget_ms.min(cap);
    }
    let budget = std::time::Duration::from_millis(budget_ms);
    let work = async {
        match spec {
            Some(spec) => program(spec, &run, &programs).await,
            None => {
                let (ok, output) = builtin(&run.kind, &run.input).await;
                (ok, output, None)
            }
        }
    };
    let (ok, output, cpu_ms) = match tokio::time::timeout(budget, work).await {
        Ok(result) => result,
        Err(_) => (false, json!({"error": "timeout", "timeout_ms": budget_ms}), None),
    };
    // A built-in kind fails only on its input; a program that fails is the runtime failing,
    // unless its arguments could not be made from the input.
    let fault = match (spec, ok, output["error"].as_str()) {
        (None, _, _) | (_, true, _) | (_, _, Some("bad_input")) => None,
        (Some(_), false, Some(error)) => {
            let detail = output["detail"].as_str().map(|d| format!(": {d}")).unwrap_or_default();
            Some(format!("{error}{detail}"))
        }
        (Some(_), false, None) => Some(match output["exit_code"].as_i64() {
            Some(code) => format!("exit status {code}"),
            None => "killed by a signal".to_owned(),
        }),
    };
    let finished_ms = now_ms();
    Finished {
        job_id: run.job_id,
        fence: run.fence,
        ok,
        output,
        started_ms,
        finished_ms,
        fault,
        cpu_ms,
    }
}

/// The argument list for `run`: `{input}` and `{input.<field>}` filled in, nothing else
/// interpreted.
fn arguments(argv: &[String], input: &Value) -> Result<Vec<String>, String> {
    argv.iter()
        .map(|arg| {
            let mut out = String::new();
            let mut rest = arg.as_str();
            while let Some(open) = rest.find("{input") {
                out.push_str(&rest[..open]);
                let Some(close) = rest[open..].find('}') else { break };
                let name = &rest[open + 1..open + close];
                let value = match name.strip_prefix("input.") {
                    None if name == "input" => input.to_string(),
                    Some(field) => match &input[field] {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        _ => return Err(format!("input.{field} is not a string or a number")),
                    },
                    None => rest[open..open + close + 1].to_owned(),
                };
                out.push_str(&value);
                rest = &rest[open + close + 1..];
            }
            out.push_str(rest);
            Ok(out)
        })
        .collect()
}

/// Kills a run's whole process group when the run ends, however it ends (finished, timed out,
/// or its task aborted).
struct Group(Option<i32>);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.and_then(rustix::process::Pid::from_raw) {
            // Gone already is fine.
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
        }
    }
}

/// Runs an external program for `run`: no shell, an empty environment but the job's ids, a
/// fresh working directory, its own process group, stdout capped.
async fn program(spec: &ExecSpec, run: &Run, programs: &Programs) -> (bool, Value, Option<u64>) {
    let fail =
        |error: &str, detail: String| (false, json!({"error": error, "detail": detail}), None);
    let args = match arguments(&spec.argv, &run.input) {
        Ok(args) => args,
        Err(e) => return fail("bad_input", e),
    };
    let Some((program, args)) = args.split_first() else {
        return fail("bad_config", "empty argv".into());
    };
    let dir = programs.tmp.join(format!("{}-{}", run.job_id, run.fence));
    if let Err(e) = tokio::fs::create_dir_all(&dir).await {
        return fail("spawn_failed", format!("{}: {e}", dir.display()));
    }
    let _cleanup = TempDir(dir.clone());
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env_clear()
        .env("ARW_JOB_ID", &run.job_id)
        .env("ARW_JOB_FENCE", run.fence.to_string())
        .env("ARW_JOB_ATTEMPT", run.attempt.to_string())
        .env("ARW_IDEM_KEY", run.idem_key.as_deref().unwrap_or_default())
        .envs(programs.proxy.iter().flat_map(|addr| {
            let url = crate::proxy::url_for(*addr, &run.job_id, run.fence);
            ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"].map(|k| (k, url.clone()))
        }))
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return fail("spawn_failed", format!("{program}: {e}")),
    };
    let _group = Group(child.id().and_then(|id| i32::try_from(id).ok()));
    if let Some(mut stdin) = child.stdin.take() {
        // A program that does not read its input closes stdin: that is not a failure.
        let _ = stdin.write_all(run.input.to_string().as_bytes()).await;
    }
    let cap = spec.max_output_bytes;
    let read = |pipe: Option<tokio::process::ChildStdout>| async move {
        let mut kept = Vec::new();
        if let Some(pipe) = pipe {
            let _ = pipe.take(cap as u64 + 1).read_to_end(&mut kept).await;
        }
        kept
    };
    let read_err = |pipe: Option<tokio::process::ChildStderr>| async move {
        let mut kept = Vec::new();
        if let Some(pipe) = pipe {
            let _ = pipe.take(STDERR_KEPT as u64).read_to_end(&mut kept).await;
        }
        kept
    };
    let (stdout, stderr) = tokio::join!(read(child.stdout.take()), read_err(child.stderr.take()));
    if stdout.len() > cap {
        return fail("output_too_large", format!("stdout over {cap} bytes"));
    }
    // Its CPU time, read once it has exited and before it is reaped.
    let cpu_ms = match child.id() {
        Some(pid) => tokio::task::spawn_blocking(move || cpu_at_exit(pid)).await.ok().flatten(),
        None => None,
    };
    let status = match child.wait().await {
        Ok(status) => status,
        Err(e) => return fail("wait_failed", e.to_string()),
    };
    let text = String::from_utf8_lossy(&stdout);
    let stdout = serde_json::from_str::<Value>(&text).unwrap_or_else(|_| json!(text));
    let output = json!({
        "stdout": stdout,
        "stderr": String::from_utf8_lossy(&stderr),
        "exit_code": status.code(),
    });
    (status.success(), output, cpu_ms)
}

/// Waits for process `pid` (a child of this one) to exit without reaping it, then reads the
/// CPU time it and the children it waited for used, from `/proc/<pid>/stat` (ms).
fn cpu_at_exit(pid: u32) -> Option<u64> {
    use rustix::process::{Pid, WaitId, WaitIdOptions, waitid};
    let pid = Pid::from_raw(i32::try_from(pid).ok()?)?;
    waitid(WaitId::Pid(pid), WaitIdOptions::EXITED | WaitIdOptions::NOWAIT).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): utime, stime, cutime, cstime are
    // the 12th to 15th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = (11..15).filter_map(|i| fields.get(i)?.parse::<u64>().ok()).sum();
    Some(ticks * 1000 / rustix::param::clock_ticks_per_second().max(1))
}

/// Stderr kept per run.
const STDERR_KEPT: usize = 16 * 1024;

/// Removes a run's working directory when the run ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a built-in kind: `(ok, output)`.
pub async fn builtin(kind: &str, input: &Value) -> (bool, Value) {
    match kind {
        "echo" => (true, input.clone()),
        "sleep" => match input["ms"].as_u64().filter(|ms| *ms <= MAX_SLEEP_MS) {
            Some(ms) => {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                (true, json!({ "slept_ms": ms }))
            }
            None => (false, json!({ "error": "sleep needs ms, at most 3600000" })),
        },
        _ => crate::tasks::run(kind, input),
    }
}

/// `[jobs.exec.<kind>]`: how a kind runs as an external program. Never through a shell: `argv`
/// is the program and its arguments, where `{input.<field>}` becomes that field of the job's
/// input (a string or number; anything else fails the job) and `{input}` the whole input as
/// JSON; the input also arrives as JSON on stdin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    /// Absolute path of the program, then its arguments.
    pub argv: Vec<String>,
    /// Longest run, ms (the job's own `timeout_ms` may only shorten it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Most bytes of stdout kept; more fails the job (`output_too_large`).
    #[serde(default = "default_max_output")]
    pub max_output_bytes: usize,
}

fn default_max_output() -> usize {
    1024 * 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn builtins_answer_and_refuse_bad_input() {
        assert_eq!(builtin("echo", &json!({"x": 1})).await, (true, json!({"x": 1})));
        assert_eq!(builtin("sleep", &json!({"ms": 1})).await, (true, json!({"slept_ms": 1})));
        assert!(!builtin("sleep", &json!({"ms": "x"})).await.0);
        assert!(!builtin("rm.rf", &Value::Null).await.0);
    }

    fn run(kind: &str, input: Value, within_ms: u64) -> Run {
        Run {
            job_id: "j".into(),
            fence: 1,
            attempt: 1,
            kind: kind.into(),
            input,
            idem_key: Some("k".into()),
            deadline_ms: now_ms() + within_ms,
        }
    }

    fn programs(dir: &std::path::Path, kind: &str, argv: &[&str]) -> Programs {
        let spec = ExecSpec {
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            timeout_ms: None,
            max_output_bytes: 64,
        };
        Programs::new(BTreeMap::from([(kind.to_owned(), spec)]), dir.to_path_buf())
    }

    #[tokio::test]
    async fn an_attempt_past_its_deadline_fails() {
        let none = Programs::new(BTreeMap::new(), std::env::temp_dir());
        let done = attempt(run("sleep", json!({"ms": 10_000}), 20), none).await;
        assert!(!done.ok);
        assert_eq!(done.output["error"], "timeout");
    }

    #[test]
    fn arguments_take_input_fields_and_nothing_else() {
        let argv: Vec<String> = ["/bin/x", "{input.path}", "-n={input.n}", "{input}", "{other}"]
            .map(String::from)
            .to_vec();
        let input = json!({"path": "a b; rm -rf /", "n": 3});
        let args = arguments(&argv, &input).expect("filled");
        assert_eq!(args[1], "a b; rm -rf /", "one argument, never split or interpreted");
        assert_eq!(args[2], "-n=3");
        assert_eq!(serde_json::from_str::<Value>(&args[3]).expect("json"), input);
        assert_eq!(args[4], "{other}");
        assert!(arguments(&argv, &json!({"path": [1]})).is_err());
    }

    #[tokio::test]
    async fn a_program_runs_with_its_input_an_empty_environment_and_its_own_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = programs(dir.path(), "env", &["/usr/bin/env"]);
        let done = attempt(run("env", json!({}), 10_000), p).await;
        assert!(done.ok, "{:?}", done.output);
        let env = done.output["stdout"].as_str().unwrap_or_default().to_owned();
        assert!(env.contains("ARW_JOB_ID=j") && env.contains("ARW_IDEM_KEY=k"), "{env}");
        assert!(!env.contains("PATH="), "the environment is cleared: {env}");
        let p = programs(dir.path(), "echo", &["/bin/echo", "{input.msg}"]);
        let done = attempt(run("echo", json!({"msg": "hi"}), 10_000), p.clone()).await;
        assert_eq!(done.output["stdout"], "hi\n");
        let done = attempt(run("echo", json!({"msg": "x".repeat(100)}), 10_000), p).await;
        assert_eq!((done.ok, done.output["error"].as_str()), (false, Some("output_too_large")));
        let p = programs(dir.path(), "false", &["/bin/false"]);
        let done = attempt(run("false", json!({}), 10_000), p).await;
        assert_eq!((done.ok, done.output["exit_code"].as_i64()), (false, Some(1)));
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("tmp").count(),
            0,
            "run directories removed"
        );
    }

    #[tokio::test]
    async fn a_program_s_cpu_time_is_measured_a_built_in_kind_s_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        // About a tenth of a second of the shell's own CPU.
        let busy = "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done";
        let p = programs(dir.path(), "busy", &["/bin/sh", "-c", busy]);
        let done = attempt(run("busy", json!({}), 60_000), p).await;
        assert!(done.ok, "{:?}", done.output);
        let cpu = done.cpu_ms.expect("measured");
        let wall = done.finished_ms - done.started_ms;
        assert!(cpu >= 20 && cpu <= wall + 20, "cpu {cpu} ms in {wall} ms");
        let p = programs(dir.path(), "none", &[]);
        let done = attempt(run("echo", json!({"a": 1}), 10_000), p).await;
        assert_eq!((done.ok, done.cpu_ms), (true, None));
    }

    #[tokio::test]
    async fn a_run_cut_short_takes_its_whole_process_group_with_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("pid");
        let script = format!("echo $$ > {}; sleep 30 & sleep 30", pidfile.display());
        let p = programs(dir.path(), "sh", &["/bin/sh", "-c", &script]);
        let done = attempt(run("sh", json!({}), 300), p).await;
        assert_eq!(done.output["error"], "timeout");
        let pgid: i32 =
            std::fs::read_to_string(&pidfile).expect("the script ran").trim().parse().expect("pid");
        // Killed processes may linger as zombies until reaped: count the live ones.
        let live = || {
            let entries = std::fs::read_dir("/proc").into_iter().flatten().flatten();
            entries
                .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
                .filter(|stat| {
                    // pid (comm) state ppid pgrp ...: after the last ')'.
                    let fields: Vec<&str> = stat
                        .rsplit_once(')')
                        .map(|(_, r)| r.split_whitespace().collect())
                        .unwrap_or_default();
                    fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid)
                        && fields.first() != Some(&"Z")
                })
                .count()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while live() > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(live(), 0, "the program's children outlived it");
    }
}
