//! Configuration: built-in defaults (configs/default.toml compiled in), then a discovered config
//! file, then `${state_dir}/config.toml`, then environment variables. Invalid values are refused
//! naming the key and where it came from; unknown keys are reported as warnings.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use figment::{
    Figment,
    providers::{Format, Serialized, Toml},
    value::Value,
};
use serde::{Deserialize, Serialize};

use arw_p2p::{Multiaddr, node_id::NodeId};

/// The documented defaults, compiled in.
pub const DEFAULT_TOML: &str = include_str!("../../configs/default.toml");

/// Exit status for configuration errors (`EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// `[server]`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerConfig {
    /// Listen address (IP literal or `localhost`).
    pub bind: String,
    /// Listen port; 0 = ephemeral.
    pub port: u16,
    /// Admin token (secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    /// Hex SHA-256 of the admin token (secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_sha256: Option<String>,
    /// Failed authentications per client and window; 0 = off.
    pub admin_rate_limit: u32,
    /// Rate window, seconds.
    pub admin_rate_window_secs: u64,
    /// Shutdown grace period, seconds.
    pub shutdown_grace_secs: u64,
    /// Open HTTP connections held at most.
    pub max_connections: usize,
    /// Requests handled at once; more wait their turn.
    pub max_concurrent_requests: usize,
    /// A connection must send a request's headers within this many seconds.
    pub header_timeout_secs: u64,
    /// A client that takes nothing we send for this many seconds is disconnected.
    pub send_timeout_secs: u64,
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("bind", &self.bind)
            .field("port", &self.port)
            .field("admin_token", &self.admin_token.as_ref().map(|_| REDACTED))
            .field("admin_token_sha256", &self.admin_token_sha256.as_ref().map(|_| REDACTED))
            .field("admin_rate_limit", &self.admin_rate_limit)
            .field("admin_rate_window_secs", &self.admin_rate_window_secs)
            .field("shutdown_grace_secs", &self.shutdown_grace_secs)
            .field("max_connections", &self.max_connections)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .field("header_timeout_secs", &self.header_timeout_secs)
            .field("send_timeout_secs", &self.send_timeout_secs)
            .finish()
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogConfig {
    /// tracing filter directive.
    pub filter: String,
}

/// `[events]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsConfig {
    /// Keep at most this many journal rows.
    pub retention_rows: u64,
    /// Keep at most this many bytes of journaled payloads.
    pub retention_bytes: u64,
    /// Drop journal rows older than this many days.
    pub retention_days: u64,
    /// fsync every journal commit.
    pub fsync: bool,
    /// SSE keep-alive interval, seconds.
    pub sse_keepalive_secs: u64,
    /// Live events buffered per SSE client.
    pub sse_buffer: usize,
}

/// `[nats]`: every NATS connection of the process (bus, relay, queue, arw-connector).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct NatsSection {
    /// Rewrite `nats://` to `tls://`.
    pub tls: bool,
    /// User name when the URL has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Password (secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass: Option<String>,
    /// Start-up connection retries.
    pub connect_retries: u32,
    /// Delay between them, ms.
    pub connect_backoff_ms: u64,
    /// Queue group on `arw.tasks`.
    pub group: String,
    /// Relay local events out (default: when `bus = "nats"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_out: Option<bool>,
    /// Kind prefixes relayed out.
    pub relay_out_filter: String,
}

impl fmt::Debug for NatsSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsSection")
            .field("tls", &self.tls)
            .field("user", &self.user)
            .field("pass", &self.pass.as_ref().map(|_| REDACTED))
            .field("connect_retries", &self.connect_retries)
            .field("group", &self.group)
            .field("relay_out", &self.relay_out)
            .field("relay_out_filter", &self.relay_out_filter)
            .finish_non_exhaustive()
    }
}

/// `[runtime]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RuntimeConfig {
    /// State directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
}

/// `[cluster] bus` / `queue`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// libp2p mesh (bus) or in-process queue.
    Local,
    /// NATS broker.
    Nats,
}

impl Transport {
    /// The config-file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Local => "local",
            Transport::Nats => "nats",
        }
    }
}

/// `[cluster]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// Federation on or off.
    pub enabled: bool,
    /// Explicit node id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Workspace id.
    pub workspace: String,
    /// Bus transport.
    pub bus: Transport,
    /// Queue transport.
    pub queue: Transport,
    /// NATS URL.
    pub nats_url: String,
    /// libp2p listen multiaddrs.
    pub listen: Vec<String>,
    /// libp2p bootstrap multiaddrs.
    pub bootstrap: Vec<String>,
    /// mDNS discovery.
    pub mdns: bool,
    /// Re-advertise interval, seconds.
    pub advertise_interval_secs: u64,
    /// Staleness threshold, seconds.
    pub ttl_seconds: u64,
    /// Eviction threshold, seconds.
    pub evict_after_secs: u64,
    /// Heartbeat period, ms.
    pub heartbeat_interval_ms: u64,
    /// Silence before `suspect`, ms.
    pub suspect_after_ms: u64,
    /// Silence before `down`, ms.
    pub down_after_ms: u64,
    /// Clock skew bound, seconds.
    pub max_clock_skew_secs: u64,
    /// Most remote nodes held in the registry.
    pub max_nodes: usize,
    /// Pin the first Home that admits this node, without the operator.
    pub trust_first_home: bool,
    /// Pinned node keys file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_nodes: Option<PathBuf>,
    /// The Home's public key (base64 ed25519) to obey; unset: pinned on first admission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home_key: Option<String>,
    /// Ignored (set through the API); kept so a value can be warned about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// The effective configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// `[server]`.
    pub server: ServerConfig,
    /// `[log]`.
    pub log: LogConfig,
    /// `[events]`.
    pub events: EventsConfig,
    /// `[runtime]`.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// `[cluster]`.
    pub cluster: ClusterConfig,
    /// `[nats]`.
    pub nats: NatsSection,
    /// `[policy]`.
    pub policy: PolicySection,
    /// `[jobs]`.
    pub jobs: JobsSection,
    /// `[egress]`.
    #[serde(default)]
    pub egress: EgressSection,
}

/// `[egress]`: the contribution and egress ledger, and the egress proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EgressSection {
    /// Record offloads and proxied requests in `egress.sqlite` (`GET /state/egress`).
    pub ledger: bool,
    /// Run the egress proxy and point job programs at it.
    pub proxy: bool,
    /// The proxy's port on 127.0.0.1 (0: any free port, written to endpoints.json).
    pub proxy_port: u16,
    /// Rows kept at most; the oldest go first.
    pub max_rows: u64,
}

impl Default for EgressSection {
    fn default() -> Self {
        Self { ledger: false, proxy: false, proxy_port: 9080, max_rows: 100_000 }
    }
}

/// `[jobs]`: `POST /actions` jobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobsSection {
    /// Jobs run at once; 0: twice the CPU threads, at most 32.
    pub slots: u32,
    /// Jobs waiting at most.
    pub queue_max: usize,
    /// Kinds retried after a lost attempt (globs).
    pub idempotent_kinds: Vec<String>,
    /// Lease of a worker's attempt, ms.
    pub lease_ms: u64,
    /// `[jobs.remote]`.
    pub remote: JobsRemote,
    /// `[jobs.exec.<kind>]`: external programs, one per kind.
    #[serde(default)]
    pub exec: std::collections::BTreeMap<String, crate::executor::ExecSpec>,
    /// `[jobs.runtime]`: the failure budget of each runtime.
    #[serde(default)]
    pub runtime: arw_p2p::jobs::RuntimeBudget,
}

/// `[jobs.remote]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobsRemote {
    /// Kinds run for the Home (globs); empty: none.
    pub allow: Vec<String>,
}

/// `[policy]`: capsules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicySection {
    /// Issuers whose capsules are accepted (resolved against the config directory).
    pub trust_capsules: PathBuf,
    /// Directory of capsule presets (resolved against the config directory).
    pub capsule_presets: PathBuf,
}

const REDACTED: &str = "<redacted>";

/// Environment variables that override keys, with the key each one sets and whether its value
/// is a number.
const ENV_KEYS: &[(&str, &str, Kind)] = &[
    ("ARW_BIND", "server.bind", Kind::Text),
    ("ARW_PORT", "server.port", Kind::Number),
    ("ARW_ADMIN_TOKEN", "server.admin_token", Kind::Text),
    ("ARW_ADMIN_TOKEN_SHA256", "server.admin_token_sha256", Kind::Text),
    ("ARW_ADMIN_RATE_LIMIT", "server.admin_rate_limit", Kind::Number),
    ("ARW_ADMIN_RATE_WINDOW_SECS", "server.admin_rate_window_secs", Kind::Number),
    ("ARW_LOG", "log.filter", Kind::Text),
    ("ARW_STATE_DIR", "runtime.state_dir", Kind::Text),
    ("ARW_NODE_ID", "cluster.node_id", Kind::Text),
    ("ARW_NATS_URL", "cluster.nats_url", Kind::Text),
    ("ARW_TRUST_NODES", "cluster.trust_nodes", Kind::Text),
    ("ARW_HOME_KEY", "cluster.home_key", Kind::Text),
    ("ARW_TRUST_CAPSULES", "policy.trust_capsules", Kind::Text),
    ("ARW_NATS_TLS", "nats.tls", Kind::Flag),
    ("ARW_NATS_USER", "nats.user", Kind::Text),
    ("ARW_NATS_PASS", "nats.pass", Kind::Text),
    ("ARW_NATS_CONNECT_RETRIES", "nats.connect_retries", Kind::Number),
    ("ARW_NATS_CONNECT_BACKOFF_MS", "nats.connect_backoff_ms", Kind::Number),
    ("ARW_GROUP", "nats.group", Kind::Text),
    ("ARW_NATS_OUT", "nats.relay_out", Kind::Flag),
    ("ARW_NATS_OUT_FILTER", "nats.relay_out_filter", Kind::Text),
    ("ARW_WORKERS", "jobs.slots", Kind::Number),
    ("ARW_ACTIONS_QUEUE_MAX", "jobs.queue_max", Kind::Number),
    ("ARW_JOBS_ALLOW", "jobs.remote.allow", Kind::List),
    ("ARW_HTTP_MAX_CONC", "server.max_concurrent_requests", Kind::Number),
    ("ARW_EGRESS_LEDGER_ENABLE", "egress.ledger", Kind::Flag),
    ("ARW_EGRESS_PROXY_ENABLE", "egress.proxy", Kind::Flag),
    ("ARW_EGRESS_PROXY_PORT", "egress.proxy_port", Kind::Number),
];

/// The reference server's environment variables this one does not implement: each set one is
/// warned about at start, rather than silently ignored.
const NOT_IMPLEMENTED: [&str; 15] = [
    "ARW_API_ENVELOPE",
    "ARW_CAPSULE_REFRESH_MS",
    "ARW_CAPSULE_REFRESH_SECS",
    "ARW_CAPSULE_REQUEST_REFRESH_MS",
    "ARW_EVENTS_SSE_DECORATE",
    "ARW_EVENTS_SSE_MODE",
    "ARW_EVENT_SOURCE",
    "ARW_GATING_DENY",
    "ARW_GATING_FILE",
    "ARW_IDLE_PUBLISH_MS",
    "ARW_KERNEL_ENABLE",
    "ARW_RUNTIME_BUNDLE_SIGNERS",
    "ARW_RUNTIME_MATRIX_TTL_SEC",
    "ARW_SMOKE_MODE",
    "ARW_TRUST_FORWARD_HEADERS",
];

/// How an environment variable's text becomes a configuration value.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Text,
    Number,
    /// `1/true/yes/on` or `0/false/no/off`.
    Flag,
    /// Comma-separated texts.
    List,
}

impl Kind {
    fn value(self, raw: &str) -> Value {
        let trimmed = raw.trim();
        match self {
            Kind::Number => {
                trimmed.parse::<u64>().map_or_else(|_| Value::from(raw.to_owned()), Value::from)
            }
            Kind::Flag => match trimmed.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Value::from(true),
                "0" | "false" | "no" | "off" => Value::from(false),
                _ => Value::from(raw.to_owned()),
            },
            Kind::Text => Value::from(raw.to_owned()),
            Kind::List => Value::from(
                trimmed
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect::<Vec<_>>(),
            ),
        }
    }
}

/// A configuration that cannot be used. Its message names the key and its source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// The loaded configuration and how it was put together.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// Effective values.
    pub config: Config,
    /// Files read, in order (the built-in defaults first).
    pub sources: Vec<String>,
    /// The resolved state directory.
    pub state_dir: PathBuf,
    /// The parsed HTTP bind address.
    pub bind_ip: IpAddr,
    /// Whether the node id was set explicitly, and by which source.
    pub explicit_node_id: Option<(NodeId, arw_p2p::node_id::IdSource)>,
    /// Things worth a warning (unknown keys, ignored settings).
    pub warnings: Vec<String>,
    /// Directory of the config file read (relative paths in it resolve here); with none (the
    /// embedded defaults), relative paths resolve in the state directory.
    pub config_dir: Option<PathBuf>,
    /// Start under a new key even though the state directory holds another identity's state
    /// (`arw-server --new-identity`).
    pub new_identity: bool,
}

/// Where to look for things; real process values in production, fakes in tests.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    /// Environment variables.
    pub vars: std::collections::HashMap<String, String>,
    /// The running executable.
    pub exe: Option<PathBuf>,
    /// The working directory.
    pub cwd: Option<PathBuf>,
    /// The platform data directory.
    pub data_dir: Option<PathBuf>,
}

impl Environment {
    /// The real process environment.
    pub fn from_process() -> Self {
        Self {
            vars: std::env::vars().collect(),
            exe: std::env::current_exe().ok(),
            cwd: std::env::current_dir().ok(),
            data_dir: directories::ProjectDirs::from("org", "arw", "arw")
                .map(|d| d.data_dir().to_path_buf()),
        }
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str).filter(|v| !v.trim().is_empty())
    }
}

/// Loads, merges and validates the configuration.
pub fn load(env: &Environment) -> Result<Loaded, ConfigError> {
    let mut sources = vec!["built-in defaults".to_owned()];
    let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
    let mut config_dir = None;
    if let Some(file) = discover(env)? {
        config_dir = file.parent().map(Path::to_path_buf).or_else(|| env.cwd.clone());
        sources.push(file.display().to_string());
        figment = figment.merge(Toml::file_exact(&file));
    }
    // The state dir may come from the environment or from the files read so far.
    let state_dir = match env.var("ARW_STATE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => figment
            .extract_inner::<Option<PathBuf>>("runtime.state_dir")
            .ok()
            .flatten()
            .or_else(|| env.data_dir.clone())
            .ok_or_else(|| {
                ConfigError("no state directory: set ARW_STATE_DIR or runtime.state_dir".into())
            })?,
    };
    let state_file = state_dir.join("config.toml");
    if state_file.is_file() {
        sources.push(state_file.display().to_string());
        figment = figment.merge(Toml::file_exact(&state_file));
    }
    for (var, key, kind) in ENV_KEYS {
        if let Some(raw) = env.var(var) {
            figment = figment.merge(Serialized::default(key, kind.value(raw)));
        }
    }

    let config: Config = figment.extract().map_err(|e| describe(e, env))?;
    let mut warnings = unknown_keys(&figment)?;
    for var in NOT_IMPLEMENTED.iter().filter(|v| env.var(v).is_some()) {
        warnings.push(format!(
            "{var} is set, but this server has no such setting and ignores it (docs/configuration.md, \"Reference settings not implemented\")"
        ));
    }
    let (bind_ip, explicit_node_id) = validate(&config, env, &mut warnings)?;
    Ok(Loaded {
        config,
        sources,
        state_dir,
        bind_ip,
        explicit_node_id,
        warnings,
        config_dir,
        new_identity: false,
    })
}

/// `ARW_CONFIG`, else the first `configs/default.toml` under `ARW_CONFIG_DIR`, the executable's
/// directory, its parent, or the working directory.
fn discover(env: &Environment) -> Result<Option<PathBuf>, ConfigError> {
    if let Some(path) = env.var("ARW_CONFIG") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(Some(path))
        } else {
            Err(ConfigError(format!("ARW_CONFIG={}: no such file", path.display())))
        };
    }
    let exe_dir = env.exe.as_deref().and_then(Path::parent);
    let candidates = [
        env.var("ARW_CONFIG_DIR").map(PathBuf::from),
        exe_dir.map(Path::to_path_buf),
        exe_dir.and_then(Path::parent).map(Path::to_path_buf),
        env.cwd.clone(),
    ];
    Ok(candidates
        .into_iter()
        .flatten()
        .map(|dir| dir.join("configs").join("default.toml"))
        .find(|p| p.is_file()))
}

fn describe(error: figment::Error, env: &Environment) -> ConfigError {
    let lines: Vec<String> = error
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let source = match e.metadata.as_ref().and_then(|m| m.source.as_ref()) {
                Some(figment::Source::File(path)) => format!(" in {}", path.display()),
                _ => ENV_KEYS
                    .iter()
                    .find(|(var, k, _)| *k == key && env.var(var).is_some())
                    .map(|(var, _, _)| format!(" (from {var})"))
                    .unwrap_or_default(),
            };
            if key.is_empty() {
                format!("{}{source}", e.kind)
            } else {
                format!("{key}: {}{source}", e.kind)
            }
        })
        .collect();
    ConfigError(lines.join("; "))
}

/// Keys present in the merged configuration that no setting reads.
fn unknown_keys(figment: &Figment) -> Result<Vec<String>, ConfigError> {
    let merged: serde_json::Value = figment.extract().map_err(|e| ConfigError(e.to_string()))?;
    let mut unknown = Vec::new();
    let _: Result<Config, _> = serde_ignored::deserialize(merged, |path| {
        let key = path.to_string();
        let source = figment
            .find_metadata(&key)
            .and_then(|m| m.source.as_ref())
            .map(|s| format!(" in {s}"))
            .unwrap_or_default();
        unknown.push(format!("unknown configuration key `{key}`{source} (ignored)"));
    });
    Ok(unknown)
}

fn validate(
    config: &Config,
    env: &Environment,
    warnings: &mut Vec<String>,
) -> Result<(IpAddr, Option<(NodeId, arw_p2p::node_id::IdSource)>), ConfigError> {
    use arw_p2p::node_id::IdSource;
    let s = &config.server;
    let bind_ip = parse_bind(&s.bind).ok_or_else(|| {
        ConfigError(format!("server.bind: {:?} is not an IP address or `localhost`", s.bind))
    })?;
    if s.admin_rate_window_secs == 0 {
        return Err(ConfigError("server.admin_rate_window_secs: must be at least 1".into()));
    }
    if let Some(digest) = &s.admin_token_sha256
        && (digest.len() != 64 || !digest.chars().all(|c| c.is_ascii_hexdigit()))
    {
        return Err(ConfigError("server.admin_token_sha256: must be 64 hexadecimal digits".into()));
    }
    let ev = &config.events;
    let sv = &config.server;
    for (key, value) in [
        ("server.max_connections", sv.max_connections as u64),
        ("server.max_concurrent_requests", sv.max_concurrent_requests as u64),
        ("server.header_timeout_secs", sv.header_timeout_secs),
        ("server.send_timeout_secs", sv.send_timeout_secs),
        ("events.retention_rows", ev.retention_rows),
        ("events.retention_bytes", ev.retention_bytes),
        ("events.retention_days", ev.retention_days),
        ("events.sse_keepalive_secs", ev.sse_keepalive_secs),
        ("events.sse_buffer", ev.sse_buffer as u64),
    ] {
        if value == 0 {
            return Err(ConfigError(format!("{key}: must be at least 1")));
        }
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&config.log.filter) {
        return Err(ConfigError(format!("log.filter: {e}")));
    }

    let c = &config.cluster;
    let explicit_node_id = match &c.node_id {
        Some(id) => {
            let id = NodeId::parse(id).map_err(|e| ConfigError(format!("cluster.node_id: {e}")))?;
            let source =
                if env.var("ARW_NODE_ID").is_some() { IdSource::Env } else { IdSource::Config };
            Some((id, source))
        }
        None => None,
    };
    if let Some(key) = &c.home_key
        && arw_p2p::identity::public_key_from_b64(key).is_none()
    {
        return Err(ConfigError(
            "cluster.home_key: must be a base64 ed25519 public key (32 bytes)".into(),
        ));
    }
    NodeId::parse(&c.workspace).map_err(|_| {
        ConfigError(format!(
            "cluster.workspace: {:?} must be 1-64 characters from A-Z a-z 0-9 _ -",
            c.workspace
        ))
    })?;
    for (key, addrs) in [("cluster.listen", &c.listen), ("cluster.bootstrap", &c.bootstrap)] {
        for addr in addrs {
            addr.parse::<Multiaddr>()
                .map_err(|e| ConfigError(format!("{key}: {addr:?} is not a multiaddr: {e}")))?;
        }
    }
    if c.heartbeat_interval_ms == 0 || c.suspect_after_ms <= c.heartbeat_interval_ms {
        return Err(ConfigError(format!(
            "cluster.suspect_after_ms: {} must be above heartbeat_interval_ms ({}, itself at least 1)",
            c.suspect_after_ms, c.heartbeat_interval_ms
        )));
    }
    if c.down_after_ms <= c.suspect_after_ms {
        return Err(ConfigError(format!(
            "cluster.down_after_ms: {} must be above suspect_after_ms ({})",
            c.down_after_ms, c.suspect_after_ms
        )));
    }
    if !c.nats_url.contains("://") {
        return Err(ConfigError(format!(
            "cluster.nats_url: {:?} must be a URL such as nats://127.0.0.1:4222",
            c.nats_url
        )));
    }
    if !config.nats.group.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
        || config.nats.group.is_empty()
    {
        return Err(ConfigError(format!(
            "nats.group: {:?} must be 1 or more characters from A-Z a-z 0-9 _ -",
            config.nats.group
        )));
    }
    if c.advertise_interval_secs == 0 {
        return Err(ConfigError("cluster.advertise_interval_secs: must be at least 1".into()));
    }
    if c.ttl_seconds <= c.advertise_interval_secs {
        warnings.push(format!(
            "cluster.ttl_seconds ({}) is not above cluster.advertise_interval_secs ({}): healthy nodes will show as stale between adverts",
            c.ttl_seconds, c.advertise_interval_secs
        ));
    }
    if c.max_nodes == 0 {
        return Err(ConfigError("cluster.max_nodes: must be at least 1".into()));
    }
    if c.evict_after_secs < c.ttl_seconds {
        return Err(ConfigError(format!(
            "cluster.evict_after_secs: {} is below ttl_seconds ({})",
            c.evict_after_secs, c.ttl_seconds
        )));
    }
    if c.role.is_some() {
        warnings.push(
            "cluster.role is ignored: set the role with POST /admin/hierarchy/role".to_owned(),
        );
    }
    let jobs = &config.jobs;
    if jobs.slots > 256 {
        return Err(ConfigError(format!("jobs.slots: {} is above 256", jobs.slots)));
    }
    if jobs.lease_ms < 3_000 {
        return Err(ConfigError(format!("jobs.lease_ms: {} is below 3000", jobs.lease_ms)));
    }
    if jobs.queue_max == 0 {
        return Err(ConfigError("jobs.queue_max: must be at least 1".into()));
    }
    if config.egress.max_rows == 0 {
        return Err(ConfigError("egress.max_rows: must be at least 1".into()));
    }
    let budget = &jobs.runtime;
    if budget.failures == 0 || budget.window_ms < 1_000 || budget.cooldown_ms < 1_000 {
        return Err(ConfigError(
            "jobs.runtime: failures must be at least 1, window_ms and cooldown_ms at least 1000"
                .into(),
        ));
    }
    for (kind, spec) in &jobs.exec {
        let key = format!("jobs.exec.{kind}");
        if crate::executor::BUILTIN.contains(&kind.as_str()) {
            return Err(ConfigError(format!("{key}: {kind} is a built-in kind")));
        }
        let name_ok = !kind.is_empty()
            && kind.len() <= 128
            && kind.chars().all(|c| c.is_ascii_alphanumeric() || "._-:/".contains(c));
        if !name_ok {
            return Err(ConfigError(format!(
                "{key}: a kind is 1 to 128 characters of letters, digits and . _ - : /"
            )));
        }
        match spec.argv.first() {
            Some(program) if std::path::Path::new(program).is_absolute() => {}
            _ => {
                return Err(ConfigError(format!(
                    "{key}.argv: must start with the program's absolute path"
                )));
            }
        }
    }
    Ok((bind_ip, explicit_node_id))
}

/// Parses `localhost`, `::1`, `[::1]` and IP literals.
pub fn parse_bind(bind: &str) -> Option<IpAddr> {
    let bind = bind.trim();
    if bind.eq_ignore_ascii_case("localhost") {
        return Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    }
    let inner = bind.strip_prefix('[').and_then(|b| b.strip_suffix(']')).unwrap_or(bind);
    inner.parse::<IpAddr>().ok().or_else(|| inner.parse::<Ipv6Addr>().ok().map(IpAddr::V6))
}

impl Loaded {
    /// How this process connects to NATS (every connection uses the same settings).
    pub fn nats(&self, name: &str) -> arw_p2p::nats::NatsConfig {
        let n = &self.config.nats;
        arw_p2p::nats::NatsConfig {
            url: self.config.cluster.nats_url.clone(),
            tls: n.tls,
            user: n.user.clone(),
            pass: n.pass.clone(),
            connect_retries: n.connect_retries,
            connect_backoff: Duration::from_millis(n.connect_backoff_ms),
            name: name.to_owned(),
        }
    }

    /// `path` as written in the config: relative paths resolve against the config file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            return path.to_path_buf();
        }
        self.config_dir.as_deref().unwrap_or(&self.state_dir).join(path)
    }
}

impl JobsSection {
    /// The node's job settings: the built-in kinds and the configured programs run here.
    pub fn node_config(&self) -> arw_p2p::jobs::JobsConfig {
        let mut kinds: Vec<String> = crate::executor::BUILTIN.map(str::to_owned).to_vec();
        kinds.extend(self.exec.keys().cloned());
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let slots = match self.slots {
            0 => u32::try_from((2 * threads).clamp(1, 32)).unwrap_or(32),
            n => n,
        };
        let builtin = arw_p2p::jobs::RuntimeDecl {
            id: "builtin".to_owned(),
            kinds: crate::executor::BUILTIN.map(str::to_owned).to_vec(),
        };
        let programs = self.exec.keys().map(|kind| arw_p2p::jobs::RuntimeDecl {
            id: format!("exec:{kind}"),
            kinds: vec![kind.clone()],
        });
        arw_p2p::jobs::JobsConfig {
            slots,
            kinds,
            runtimes: std::iter::once(builtin).chain(programs).collect(),
            runtime_budget: self.runtime,
            allow: self.remote.allow.clone(),
            idempotent_kinds: self.idempotent_kinds.clone(),
            queue_max: self.queue_max,
            lease_ms: self.lease_ms,
            ..arw_p2p::jobs::JobsConfig::default()
        }
    }
}

impl Config {
    /// The configuration as TOML with secrets replaced by `<redacted>`.
    pub fn redacted_toml(&self) -> String {
        let mut shown = self.clone();
        for secret in [
            &mut shown.server.admin_token,
            &mut shown.server.admin_token_sha256,
            &mut shown.nats.pass,
        ] {
            if secret.is_some() {
                *secret = Some(REDACTED.to_owned());
            }
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# could not render: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> (Environment, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut vars: std::collections::HashMap<String, String> =
            vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        vars.entry("ARW_STATE_DIR".into())
            .or_insert_with(|| dir.path().join("state").display().to_string());
        (Environment { vars, exe: None, cwd: None, data_dir: None }, dir)
    }

    #[test]
    fn shipped_configs_load_without_warnings() {
        let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        for name in ["default.toml", "nats-home.toml", "nats-worker.toml"] {
            let (mut e, _d) = env(&[]);
            e.vars.insert("ARW_CONFIG".into(), configs.join(name).display().to_string());
            let loaded = load(&e).unwrap_or_else(|err| panic!("{name}: {err}"));
            assert!(loaded.warnings.is_empty(), "{name}: {:?}", loaded.warnings);
        }
    }

    #[test]
    fn job_programs_need_an_absolute_path_and_a_kind_of_their_own() {
        let load_with = |toml: &str| {
            let (mut e, dir) = env(&[("ARW_JOBS_ALLOW", "math.*, ocr.page")]);
            let file = dir.path().join("arw.toml");
            std::fs::write(&file, toml).expect("write");
            e.vars.insert("ARW_CONFIG".into(), file.display().to_string());
            load(&e)
        };
        let ok = load_with(
            "[jobs.exec.\"ocr.page\"]\nargv = [\"/usr/bin/tesseract\", \"{input.path}\", \"-\"]\n",
        )
        .expect("loads");
        let jobs = ok.config.jobs.node_config();
        assert!(
            jobs.kinds.contains(&"ocr.page".to_owned()) && jobs.kinds.contains(&"echo".to_owned())
        );
        assert_eq!(jobs.allow, vec!["math.*".to_owned(), "ocr.page".to_owned()]);
        assert_eq!(jobs.accepts(), vec!["math.add".to_owned(), "ocr.page".to_owned()]);
        let err = load_with("[jobs.exec.x]\nargv = [\"tesseract\"]\n").expect_err("relative");
        assert!(err.to_string().contains("jobs.exec.x.argv"), "{err}");
        let err = load_with("[jobs.exec.echo]\nargv = [\"/bin/echo\"]\n").expect_err("built-in");
        assert!(err.to_string().contains("built-in"), "{err}");
    }

    #[test]
    fn built_in_defaults_are_the_documented_ones() {
        let (e, _d) = env(&[]);
        let loaded = load(&e).expect("defaults load");
        let c = &loaded.config;
        assert_eq!((c.server.bind.as_str(), c.server.port), ("127.0.0.1", 8091));
        assert!(!c.cluster.enabled);
        assert_eq!(c.cluster.bus, Transport::Local);
        assert_eq!((c.cluster.advertise_interval_secs, c.cluster.ttl_seconds), (300, 360));
        assert_eq!(c.cluster.evict_after_secs, 24 * 360);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(loaded.sources, vec!["built-in defaults".to_owned()]);
    }

    #[test]
    fn precedence_file_then_state_config_then_env() {
        let (mut e, dir) = env(&[]);
        let file = dir.path().join("arw.toml");
        std::fs::write(
            &file,
            "[server]\nport = 9000\nbind = \"::1\"\n[cluster]\nworkspace = \"lab\"\n",
        )
        .expect("write");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).expect("mkdir");
        std::fs::write(state.join("config.toml"), "[server]\nport = 9100\n").expect("write");
        e.vars.insert("ARW_CONFIG".into(), file.display().to_string());
        let c = load(&e).expect("load").config;
        assert_eq!(c.server.port, 9100);
        assert_eq!(c.server.bind, "::1");
        assert_eq!(c.cluster.workspace, "lab");
        e.vars.insert("ARW_PORT".into(), "0".into());
        assert_eq!(load(&e).expect("load").config.server.port, 0);
    }

    #[test]
    fn config_dir_discovery() {
        let (mut e, dir) = env(&[]);
        let configs = dir.path().join("etc/configs");
        std::fs::create_dir_all(&configs).expect("mkdir");
        std::fs::write(configs.join("default.toml"), "[cluster]\nenabled = true\n").expect("write");
        e.vars.insert("ARW_CONFIG_DIR".into(), dir.path().join("etc").display().to_string());
        let loaded = load(&e).expect("load");
        assert!(loaded.config.cluster.enabled);
        assert_eq!(loaded.sources.len(), 2);
    }

    #[test]
    fn invalid_values_name_the_key_and_source() {
        let (e, _d) = env(&[("ARW_PORT", "eighty")]);
        let err = load(&e).expect_err("bad port").to_string();
        assert!(err.contains("server.port") && err.contains("ARW_PORT"), "{err}");

        let (mut e, dir) = env(&[]);
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "[cluster]\nbus = \"carrier-pigeon\"\n").expect("write");
        e.vars.insert("ARW_CONFIG".into(), file.display().to_string());
        let err = load(&e).expect_err("bad bus").to_string();
        assert!(err.contains("cluster.bus") && err.contains("bad.toml"), "{err}");

        for (var, value, key) in [
            ("ARW_NODE_ID", "has.dot", "cluster.node_id"),
            ("ARW_BIND", "example.com", "server.bind"),
            ("ARW_PORT", "70000", "server.port"),
        ] {
            let (e, _d) = env(&[(var, value)]);
            let err = load(&e).expect_err(var).to_string();
            assert!(err.contains(key), "{var}: {err}");
        }
    }

    #[test]
    fn numeric_looking_strings_stay_strings() {
        let (e, _d) = env(&[("ARW_NODE_ID", "1234"), ("ARW_ADMIN_TOKEN", "42")]);
        let loaded = load(&e).expect("load");
        assert_eq!(loaded.config.cluster.node_id.as_deref(), Some("1234"));
        assert_eq!(loaded.config.server.admin_token.as_deref(), Some("42"));
    }

    #[test]
    fn unknown_keys_warn_with_their_file() {
        let (mut e, dir) = env(&[]);
        let file = dir.path().join("arw.toml");
        std::fs::write(&file, "[cluster]\nenabeld = true\nrole = \"home\"\n[extra]\nx = 1\n")
            .expect("write");
        e.vars.insert("ARW_CONFIG".into(), file.display().to_string());
        let warnings = load(&e).expect("load").warnings.join("\n");
        assert!(
            warnings.contains("cluster.enabeld") && warnings.contains("arw.toml"),
            "{warnings}"
        );
        assert!(warnings.contains("`extra"), "{warnings}");
        assert!(warnings.contains("cluster.role is ignored"), "{warnings}");
    }

    #[test]
    fn missing_explicit_config_file_is_an_error() {
        let (e, _d) = env(&[("ARW_CONFIG", "/nonexistent/arw.toml")]);
        assert!(load(&e).expect_err("missing").to_string().contains("ARW_CONFIG"));
    }

    #[test]
    fn bind_forms() {
        for (input, loopback) in [
            ("localhost", true),
            ("::1", true),
            ("[::1]", true),
            ("127.0.0.1", true),
            ("0.0.0.0", false),
        ] {
            assert_eq!(parse_bind(input).map(|ip| ip.is_loopback()), Some(loopback), "{input}");
        }
        assert_eq!(parse_bind("example.com"), None);
    }

    #[test]
    fn check_config_redacts_secrets() {
        let (e, _d) = env(&[("ARW_ADMIN_TOKEN", "hunter2")]);
        let loaded = load(&e).expect("load");
        let shown = loaded.config.redacted_toml();
        assert!(!shown.contains("hunter2") && shown.contains("<redacted>"), "{shown}");
        assert!(!format!("{:?}", loaded.config).contains("hunter2"));
    }
}
