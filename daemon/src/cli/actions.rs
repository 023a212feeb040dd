//! `arw-cli actions ...` and `arw-cli jobs ...`: submit, list, show and cancel jobs; drain a
//! worker.

use std::{fmt::Write as _, time::Duration};

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::{CliError, Client, cluster::truncate, json_text};
use arw_api::dto;

#[derive(Debug, Subcommand)]
pub(super) enum ActionsCommand {
    /// Submit a job; prints its id (and with --wait, how it ended).
    ///
    /// Example: arw-cli actions submit math.add --input '{"a":2,"b":3}' --wait
    /// Example: arw-cli actions submit sleep --input '{"ms":500}' --prefer remote --require '{"gpu":{"count":1}}'
    Submit(SubmitArgs),
    /// Jobs this node owns, most recently changed first.
    ///
    /// Example: arw-cli actions list --state running
    List {
        /// Only jobs in this state: queued, running, completed or failed.
        #[arg(long)]
        state: Option<String>,
        /// Only jobs owned by (running on, or last run on) this node.
        #[arg(long)]
        node: Option<String>,
        /// At most this many (1 to 2000).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print the raw JSON body.
        #[arg(long)]
        json: bool,
    },
    /// One job with its attempts.
    ///
    /// Example: arw-cli actions show 3f2a…
    Show {
        /// Job id.
        id: String,
        /// Print the raw JSON body.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job that has not ended.
    ///
    /// Example: arw-cli actions cancel 3f2a…
    Cancel {
        /// Job id.
        id: String,
    },
}

#[derive(Debug, Args)]
pub(super) struct SubmitArgs {
    /// The job kind, e.g. math.add.
    kind: String,
    /// Its input, as JSON.
    #[arg(long, default_value = "null")]
    input: String,
    /// Submitting again with this key returns the first job (and lets a lost attempt retry).
    #[arg(long)]
    idem_key: Option<String>,
    /// Where it should run: auto (default), local or remote.
    #[arg(long)]
    prefer: Option<String>,
    /// Only this node.
    #[arg(long)]
    node: Option<String>,
    /// Hard constraints, as JSON: {"gpu":{"count":1,"min_memory_mib":8000},"tags_all":["gpu"]}.
    #[arg(long)]
    require: Option<String>,
    /// Time limit of one attempt, ms.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Wait for the job to end (at most this many seconds) and print how it ended.
    #[arg(long, num_args = 0..=1, default_missing_value = "60")]
    wait: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub(super) enum JobsCommand {
    /// Stop taking jobs from the Home (running ones finish); --off takes them again. Run
    /// against the worker.
    ///
    /// Example: arw-cli jobs drain --base http://worker:8091
    Drain {
        /// Take jobs again.
        #[arg(long)]
        off: bool,
    },
}

pub(super) async fn actions(client: &Client, command: ActionsCommand) -> Result<String, CliError> {
    match command {
        ActionsCommand::Submit(args) => submit(client, args).await,
        ActionsCommand::List { state, node, limit, json } => {
            let mut query = format!("/state/actions?limit={limit}");
            if let Some(state) = state {
                let _ = write!(query, "&state={}", encode(&state));
            }
            if let Some(node) = node {
                let _ = write!(query, "&node_id={}", encode(&node));
            }
            let body: Value = client.get(&query).await?;
            if json {
                return Ok(json_text(&body, false));
            }
            Ok(table(body["items"].as_array().map(Vec::as_slice).unwrap_or_default()))
        }
        ActionsCommand::Show { id, json } => {
            let job: Value = client.get(&format!("/actions/{}", encode(&id))).await?;
            if json {
                return Ok(json_text(&job, true));
            }
            Ok(show(&job))
        }
        ActionsCommand::Cancel { id } => {
            let _: dto::Ok =
                client.post(&format!("/actions/{}/cancel", encode(&id)), &json!({})).await?;
            Ok(format!("cancelled {id}\n"))
        }
    }
}

pub(super) async fn jobs(client: &Client, command: JobsCommand) -> Result<String, CliError> {
    match command {
        JobsCommand::Drain { off } => {
            let _: dto::Ok = client.post("/admin/jobs/drain", &json!({ "on": !off })).await?;
            Ok(if off { "taking jobs again\n" } else { "draining: no new jobs from the Home\n" }
                .into())
        }
    }
}

async fn submit(client: &Client, args: SubmitArgs) -> Result<String, CliError> {
    let parse = |what: &str, text: &str| {
        serde_json::from_str::<Value>(text)
            .map_err(|e| CliError(format!("--{what} is not JSON: {e}")))
    };
    let mut body = json!({ "kind": args.kind, "input": parse("input", &args.input)? });
    if let Some(key) = args.idem_key {
        body["idem_key"] = json!(key);
    }
    if let Some(ms) = args.timeout_ms {
        body["timeout_ms"] = json!(ms);
    }
    if args.prefer.is_some() || args.node.is_some() || args.require.is_some() {
        let mut placement = json!({});
        if let Some(prefer) = args.prefer {
            placement["prefer"] = json!(prefer);
        }
        if let Some(node) = args.node {
            placement["node"] = json!(node);
        }
        if let Some(require) = args.require {
            placement["require"] = parse("require", &require)?;
        }
        body["placement"] = placement;
    }
    let reply: Value = client.post("/actions", &body).await?;
    let id = reply["id"].as_str().unwrap_or_default().to_owned();
    let reused = if reply["reused"] == true { " (an earlier job with this idem_key)" } else { "" };
    let Some(wait) = args.wait else { return Ok(format!("{id}{reused}\n")) };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    loop {
        let job: Value = client.get(&format!("/actions/{id}")).await?;
        if ["completed", "failed"].contains(&job["state"].as_str().unwrap_or_default()) {
            let ended = show(&job);
            return if job["state"] == "failed" {
                Err(CliError(ended.trim_end().to_owned()))
            } else {
                Ok(ended)
            };
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CliError(format!(
                "job {id} is still {} after {wait}s",
                job["state"].as_str().unwrap_or("?")
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const WIDTHS: [usize; 6] = [36, 16, 10, 20, 7, 9];

fn table(items: &[Value]) -> String {
    if items.is_empty() {
        return "no jobs\n".into();
    }
    let mut out = String::new();
    let mut row = |cells: [String; 7]| {
        for (cell, width) in cells.iter().zip(WIDTHS) {
            let _ = write!(out, "{:<width$} ", truncate(cell, width));
        }
        let _ = writeln!(out, "{}", cells[6]);
    };
    row(["ID", "Kind", "State", "Node", "Attempt", "Placement", "Updated"].map(String::from));
    for job in items {
        let text = |key: &str| job[key].as_str().unwrap_or("—").to_owned();
        row([
            text("id"),
            text("kind"),
            text("state"),
            text("node_id"),
            job["attempt"].as_u64().unwrap_or(0).to_string(),
            text("placement"),
            text("updated"),
        ]);
    }
    out
}

fn show(job: &Value) -> String {
    let text = |key: &str| job[key].as_str().unwrap_or("—").to_owned();
    let mut out = format!(
        "Job       : {}\nKind      : {}\nState     : {}\nNode      : {}\nAttempt   : {} (fence {})\n",
        text("id"),
        text("kind"),
        text("state"),
        text("node_id"),
        job["attempt"].as_u64().unwrap_or(0),
        job["fence"].as_u64().unwrap_or(0),
    );
    if let Some(output) = job.get("output") {
        let _ = writeln!(out, "Output    : {output}");
    }
    if let Some(error) = job.get("error") {
        let _ = writeln!(out, "Error     : {error}");
    }
    for a in job["attempts"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  attempt {} fence {} on {}: {}{}",
            a["attempt"],
            a["fence"],
            a["node_id"].as_str().unwrap_or("?"),
            a["state"].as_str().unwrap_or("?"),
            a["reason"].as_str().map(|r| format!(" ({r})")).unwrap_or_default(),
        );
    }
    out
}

/// Percent-encodes a query or path value.
pub(super) fn encode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}
