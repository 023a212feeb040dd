//! `arw-cli`: drive a node's admin API from the shell.

mod actions;
mod capsule;
mod client;
pub mod cluster;
mod egress;
mod events;
mod matrix;

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use arw_api::dto::{
    self, AdmissionChange, AdmissionRequest, ClusterNode, ClusterView, CoreHello, HierarchyState,
    RoleRequest, TrustHomeRequest,
};

pub use client::{CliError, Client};

/// Operate an ARW federation node through its admin API.
///
/// The admin token comes from --admin-token, else ARW_ADMIN_TOKEN, else the token file a local
/// arw-server generated in its state directory (ARW_STATE_DIR, else the platform data dir).
#[derive(Debug, Parser)]
#[command(name = "arw-cli", version, about, long_about)]
pub struct Cli {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    command: Command,
}

/// Where and how to connect; accepted before or after the subcommand.
#[derive(Debug, Args)]
struct Connection {
    /// Server base URL.
    #[arg(long, global = true, default_value = "http://127.0.0.1:8091", env = "ARW_BASE")]
    base: String,
    /// Admin token (default: $ARW_ADMIN_TOKEN, then the local server's generated token).
    #[arg(long, global = true, env = "ARW_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Request timeout in seconds.
    #[arg(long, global = true, default_value_t = 5)]
    timeout: u64,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Read-only state views.
    #[command(subcommand, after_help = STATE_EXAMPLES)]
    State(StateCommand),
    /// The node's hierarchy role and identity.
    #[command(subcommand, after_help = HIERARCHY_EXAMPLES)]
    Hierarchy(HierarchyCommand),
    /// The event stream.
    #[command(subcommand, after_help = EVENTS_EXAMPLES)]
    Events(EventsCommand),
    /// Admission at the Home: which nodes may work in the workspace.
    #[command(subcommand, after_help = CLUSTER_EXAMPLES)]
    Cluster(ClusterCommand),
    /// Gating capsules: status, adopt, teardown, and offline keygen, signing and verification.
    #[command(subcommand)]
    Capsule(capsule::CapsuleCommand),
    /// Jobs (POST /actions): submit, list, show, cancel.
    #[command(subcommand)]
    Actions(actions::ActionsCommand),
    /// This node as a worker for its Home: drain.
    #[command(subcommand)]
    Jobs(actions::JobsCommand),
}

const STATE_EXAMPLES: &str = "Examples:
  arw-cli state cluster                          every node this node knows, as a table
  arw-cli state cluster --wide                   the same, no cell cut short
  arw-cli state cluster --json | jq '.nodes[] | {id, health}'
  arw-cli state cluster --base http://10.0.0.5:8091 --admin-token \"$TOKEN\"
  arw-cli state runtime-matrix                   every node's runtimes: ready, degraded, quarantined
  arw-cli state egress --since 2026-12-01T00:00:00Z   who contributed what since then";

const HIERARCHY_EXAMPLES: &str = "Examples:
  arw-cli hierarchy role home                    make this node the Home of its workspace
  arw-cli hierarchy state                        role, epoch, peers, the Home it obeys
  arw-cli hierarchy hello --id worker-gpu-01 --role worker --capability gpu:rtx-4090";

const EVENTS_EXAMPLES: &str = "Examples:
  arw-cli events tail                            new events, one line each, until Ctrl-C
  arw-cli events tail --prefix cluster.,actions. --after 0    everything kept, then live
  arw-cli events tail --json | jq -c 'select(.kind == \"cluster.node.changed\")'";

const CLUSTER_EXAMPLES: &str = "Examples:
  arw-cli cluster pending                        at the Home: who asks to be admitted
  arw-cli cluster admit worker-gpu-01            at the Home: admit it with its advertised key
  arw-cli cluster homes                          at the worker: Homes that admitted it
  arw-cli cluster trust-home 3f9a0c5e7b21d4aa    at the worker: obey that Home";

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Admit a node with the key it advertises (or the one given). Run against the Home.
    ///
    /// Example: arw-cli cluster admit worker-gpu-01
    Admit {
        /// Node id.
        id: String,
        /// Pin this base64 ed25519 key instead of the advertised one.
        #[arg(long)]
        key: Option<String>,
    },
    /// Revoke a node's admission. Run against the Home.
    ///
    /// Example: arw-cli cluster revoke worker-gpu-01
    Revoke {
        /// Node id.
        id: String,
    },
    /// Nodes that advertise but are not admitted (and revoked or key-mismatched ones).
    ///
    /// Example: arw-cli cluster pending --base http://home:8091
    Pending {
        /// Print the matching /state/cluster nodes as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Homes that admitted this node and wait for your trust. Run against the worker.
    ///
    /// Example: arw-cli cluster homes --base http://worker:8091
    Homes,
    /// Obey the Home of a pending claim (see `cluster homes`), by its key's fingerprint. Run
    /// against the worker; compare the fingerprint with the Home's own (`arw-cli cluster homes`
    /// on the Home shows none pending, `arw-cli hierarchy state --json` shows its key).
    ///
    /// Example: arw-cli cluster trust-home 3f9a0c5e7b21d4aa --base http://worker:8091
    TrustHome {
        /// The fingerprint (16 hex digits), or the Home's base64 key.
        fingerprint: String,
    },
    /// Obey no Home any more: drop its policy and the capsules it handed out. Run against the
    /// worker (a configured home_key cannot be taken back here).
    ///
    /// Example: arw-cli cluster untrust-home --base http://worker:8091
    UntrustHome,
}

#[derive(Debug, Subcommand)]
enum EventsCommand {
    /// Follow events as they happen, one line each (time, kind, origin, payload).
    ///
    /// Reconnects after a dropped connection or a server restart and resumes with
    /// Last-Event-ID, so no event is lost or printed twice. Stop with Ctrl-C.
    ///
    /// Example: arw-cli events tail --prefix cluster.,hierarchy. --after 120
    Tail {
        /// Only kinds starting with one of these comma-separated prefixes.
        #[arg(long)]
        prefix: Option<String>,
        /// Replay events after this id first (default: only new events).
        #[arg(long)]
        after: Option<i64>,
        /// Print each event as one JSON object (the envelope plus its `id`).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum StateCommand {
    /// Nodes this node knows, with health, last-seen times and stale markers.
    ///
    /// Example: arw-cli state cluster --base http://127.0.0.1:8091 --json --pretty
    Cluster {
        /// Every column as wide as its longest cell, nothing cut (the default is the fixed
        /// reference layout).
        #[arg(long)]
        wide: bool,
        #[command(flatten)]
        out: JsonOutput,
    },
    /// Every node's runtimes (built-in kinds, configured programs): health, faults of the
    /// budget, kinds, and for a quarantined one how long until it runs again.
    ///
    /// Example: arw-cli state runtime-matrix --node-id worker-gpu-01
    RuntimeMatrix {
        /// Only this node.
        #[arg(long)]
        node_id: Option<String>,
        #[command(flatten)]
        out: JsonOutput,
    },
    /// The egress ledger (needs [egress] ledger on the node): who contributed what, per node
    /// (jobs offloaded to it, their run time and bytes; requests its jobs made through the
    /// egress proxy, allowed and denied), then the newest rows.
    ///
    /// Example: arw-cli state egress --since 2026-12-01T00:00:00Z --node-id worker-gpu-01
    Egress {
        /// Only rows about this node.
        #[arg(long)]
        node_id: Option<String>,
        /// Only rows at or after this RFC 3339 time (the totals cover the same window).
        #[arg(long)]
        since: Option<String>,
        /// Rows shown at most, 1–2000.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        out: JsonOutput,
    },
}

#[derive(Debug, Args)]
struct JsonOutput {
    /// Print the raw JSON body on one line.
    #[arg(long)]
    json: bool,
    /// Pretty-print the JSON (requires --json).
    #[arg(long, requires = "json")]
    pretty: bool,
}

#[derive(Debug, Subcommand)]
enum HierarchyCommand {
    /// Set this node's role: root (alias home), regional, edge (alias worker), connector, observer.
    ///
    /// Example: arw-cli hierarchy role home
    Role {
        /// The role or alias, case-insensitive.
        role: String,
    },
    /// Configure this node's identity, role and advertised capabilities.
    ///
    /// Example: arw-cli hierarchy hello --id worker-gpu-01 --role worker --capability gpu:rtx-4090 --scope-tag gpu
    Hello(HelloArgs),
    /// Show this node's hierarchy state.
    ///
    /// Example: arw-cli hierarchy state --json --pretty
    State(JsonOutput),
}

#[derive(Debug, Args)]
struct HelloArgs {
    /// Node id (must match ARW_NODE_ID / cluster.node_id when those are set).
    #[arg(long)]
    id: String,
    /// Role or alias.
    #[arg(long, default_value = "edge")]
    role: String,
    /// A declared capability (repeatable), e.g. gpu:rtx-4090.
    #[arg(long = "capability")]
    capabilities: Vec<String>,
    /// A scope tag (repeatable), e.g. gpu.
    #[arg(long = "scope-tag")]
    scope_tags: Vec<String>,
    /// Hello epoch (default: the node's current hello epoch, or 0).
    #[arg(long)]
    epoch: Option<u64>,
    /// Nonce (default: a fresh UUID).
    #[arg(long)]
    nonce: Option<String>,
}

impl Cli {
    /// Runs the command, returning what to print on stdout.
    pub async fn run(self) -> Result<String, CliError> {
        let token = self.conn.admin_token.clone().or_else(local_token);
        let timeout = Duration::from_secs(self.conn.timeout);
        let base = &self.conn.base;
        match self.command {
            Command::State(StateCommand::Cluster { wide, out }) => {
                let client = Client::new(base, token, timeout)?;
                if out.json {
                    return Ok(json_text(&client.get("/state/cluster").await?, out.pretty));
                }
                let view: ClusterView = client.get("/state/cluster").await?;
                let now = chrono::Utc::now().timestamp_millis();
                Ok(cluster::render_as(&view, now, &chrono::Local, wide))
            }
            Command::State(StateCommand::RuntimeMatrix { node_id, out }) => {
                let client = Client::new(base, token, timeout)?;
                let path = match &node_id {
                    Some(id) => format!("/state/runtime_matrix?node_id={}", actions::encode(id)),
                    None => "/state/runtime_matrix".to_owned(),
                };
                if out.json {
                    return Ok(json_text(&client.get(&path).await?, out.pretty));
                }
                Ok(matrix::render(&client.get(&path).await?))
            }
            Command::State(StateCommand::Egress { node_id, since, limit, out }) => {
                let client = Client::new(base, token, timeout)?;
                let mut path = format!("/state/egress?limit={limit}");
                for (key, value) in [("node_id", node_id), ("since", since)] {
                    if let Some(value) = value {
                        let _ = write!(path, "&{key}={}", actions::encode(&value));
                    }
                }
                if out.json {
                    return Ok(json_text(&client.get(&path).await?, out.pretty));
                }
                Ok(egress::render(&client.get(&path).await?))
            }
            Command::Hierarchy(command) => {
                hierarchy(&Client::new(base, token, timeout)?, command).await
            }
            Command::Cluster(command) => {
                cluster_admission(&Client::new(base, token, timeout)?, command).await
            }
            Command::Capsule(command) => {
                let client = if command.needs_server() {
                    Some(Client::new(base, token, timeout)?)
                } else {
                    None
                };
                capsule::run(command, client).await
            }
            Command::Actions(command) => {
                actions::actions(&Client::new(base, token, timeout)?, command).await
            }
            Command::Jobs(command) => {
                actions::jobs(&Client::new(base, token, timeout)?, command).await
            }
            Command::Events(EventsCommand::Tail { prefix, after, json }) => {
                // A stream has no overall deadline: the timeout bounds connecting, and a read
                // timeout well above the keep-alive interval detects a dead connection.
                let client = Client::streaming(base, token, timeout)?;
                events::tail(&client, events::Tail { prefix, after, json }).await
            }
        }
    }
}

async fn cluster_admission(client: &Client, command: ClusterCommand) -> Result<String, CliError> {
    let line = |c: AdmissionChange| format!("{} {} (key {})\n", c.id, c.admission.as_str(), c.key);
    match command {
        ClusterCommand::Admit { id, key } => {
            let body = AdmissionRequest { id, key };
            Ok(line(client.post("/admin/cluster/admit", &body).await?))
        }
        ClusterCommand::Revoke { id } => {
            let body = AdmissionRequest { id, key: None };
            Ok(line(client.post("/admin/cluster/revoke", &body).await?))
        }
        ClusterCommand::Homes => {
            let view: ClusterView = client.get("/state/cluster").await?;
            if view.pending_homes.is_empty() {
                return Ok("no Home claims pending\n".into());
            }
            Ok(view
                .pending_homes
                .iter()
                .map(|h| format!("{:<20} {}  epoch {}\n", h.home_id, h.fingerprint, h.policy_epoch))
                .collect())
        }
        ClusterCommand::TrustHome { fingerprint } => {
            let body = TrustHomeRequest { fingerprint: fingerprint.clone() };
            let _: dto::Ok = client.post("/admin/cluster/trust-home", &body).await?;
            Ok(format!("trusted the Home with key fingerprint {fingerprint}\n"))
        }
        ClusterCommand::UntrustHome => {
            let _: dto::Ok = client.post("/admin/cluster/untrust-home", &json!({})).await?;
            Ok("this node obeys no Home now\n".into())
        }
        ClusterCommand::Pending { json } => {
            let view: ClusterView = client.get("/state/cluster").await?;
            if view.nodes.len() > 1 && view.nodes.iter().all(|n| n.admission.is_none()) {
                return Err(CliError(
                    "this node reports no admission: is it the Home (role root)?".into(),
                ));
            }
            let pending: Vec<&ClusterNode> = view
                .nodes
                .iter()
                .filter(|n| n.admission.as_deref().is_some_and(|a| a != "admitted"))
                .collect();
            if json {
                return Ok(json_text(&json!(pending), false));
            }
            if pending.is_empty() {
                return Ok("no pending nodes\n".into());
            }
            Ok(pending
                .iter()
                .map(|n| {
                    let admission = n.admission.as_deref().unwrap_or("?");
                    format!("{:<20} {:<12} {}\n", n.id, admission, n.role)
                })
                .collect())
        }
    }
}

async fn hierarchy(client: &Client, command: HierarchyCommand) -> Result<String, CliError> {
    match command {
        HierarchyCommand::Role { role } => {
            let _: dto::Ok = client.post("/admin/hierarchy/role", &RoleRequest { role }).await?;
            let state: HierarchyState = client.get("/admin/hierarchy/state").await?;
            Ok(format!("role: {} (hierarchy epoch {})\n", state.self_node.role, state.epoch))
        }
        HierarchyCommand::Hello(args) => hello(client, args).await,
        HierarchyCommand::State(out) => {
            if out.json {
                let state: Value = client.get("/admin/hierarchy/state").await?;
                return Ok(json_text(&state, out.pretty));
            }
            Ok(hierarchy_text(&client.get("/admin/hierarchy/state").await?))
        }
    }
}

async fn hello(client: &Client, args: HelloArgs) -> Result<String, CliError> {
    let epoch = match args.epoch {
        Some(epoch) => epoch,
        None => {
            let state: HierarchyState = client.get("/admin/hierarchy/state").await?;
            state.self_node.hello_epoch.unwrap_or(0)
        }
    };
    let nonce = args.nonce.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let body = CoreHello {
        id: args.id.clone(),
        role: args.role.clone(),
        capabilities: args.capabilities,
        scope_tags: args.scope_tags,
        epoch,
        nonce,
    };
    let _: dto::Ok = client.post("/admin/hierarchy/hello", &body).await?;
    Ok(format!("hello accepted: id {} role {} epoch {epoch}\n", args.id, args.role))
}

fn json_text(value: &Value, pretty: bool) -> String {
    let text =
        if pretty { serde_json::to_string_pretty(value) } else { serde_json::to_string(value) };
    format!("{}\n", text.unwrap_or_default())
}

fn hierarchy_text(state: &HierarchyState) -> String {
    let node = &state.self_node;
    let list =
        |items: &[String]| if items.is_empty() { "—".to_owned() } else { items.join(", ") };
    format!(
        "Node         : {}\nRole         : {}\nEpoch        : {}\nHello epoch  : {}\nTags         : {}\nCapabilities : {}\nParent       : {}\nChildren     : {}\nPeers        : {}\n",
        node.id,
        node.role,
        state.epoch,
        node.hello_epoch.map_or_else(|| "—".to_owned(), |e| e.to_string()),
        list(&node.tags),
        list(node.capabilities.as_deref().unwrap_or_default()),
        node.parent.as_deref().unwrap_or("—"),
        list(&node.children),
        state.peers.len(),
    )
}

/// The token a local server generated, if readable.
fn local_token() -> Option<String> {
    let dir = std::env::var_os("ARW_STATE_DIR").map(PathBuf::from).or_else(|| {
        directories::ProjectDirs::from("org", "arw", "arw").map(|d| d.data_dir().to_path_buf())
    })?;
    let token = std::fs::read_to_string(dir.join(crate::state_dir::TOKEN_FILE)).ok()?;
    Some(token.trim().to_owned()).filter(|t| !t.is_empty())
}
