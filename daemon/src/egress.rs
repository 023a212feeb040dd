//! The contribution and egress ledger (`[egress] ledger`): every offload the node core reports
//! (a job's input sent to a worker, its output returned) and every request a job makes through
//! the egress proxy ([`crate::proxy`]), in SQLite beside the journal (`egress.sqlite`, WAL), the
//! oldest rows dropped beyond `max_rows`. One task writes; each append is then announced as
//! `egress.ledger.appended` and counted in `/metrics`. Readers open their own connection.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use rusqlite::{Connection, OpenFlags, params};
use tokio::sync::mpsc;

use arw_api::egress::{
    EgressFilter, EgressItem, EgressLog, EgressPage, EgressSettings, EgressTotals,
};
use arw_p2p::{
    events::{Event, EventTx},
    jobs::Contribution,
    time::rfc3339_ms,
};

/// Ledger file name in the state directory.
pub const FILE: &str = "egress.sqlite";
/// Rows written in one transaction at most.
const BATCH: usize = 256;

/// A request a job made through the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// When it ended (ms).
    pub time_ms: u64,
    /// Allowed.
    pub allowed: bool,
    /// For a denial: the policy that denied it.
    pub reason: Option<String>,
    /// This node.
    pub node_id: String,
    /// Destination.
    pub host: String,
    /// Destination port.
    pub port: u16,
    /// `connect` or `http`.
    pub protocol: &'static str,
    /// Bytes from the destination.
    pub bytes_in: u64,
    /// Bytes to it.
    pub bytes_out: u64,
    /// How long the connection lasted (ms).
    pub duration_ms: u64,
    /// The job, when its credentials named it.
    pub job_id: Option<String>,
}

/// A row to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// An attempt on a worker ended (from the node core).
    Offload(Contribution),
    /// A proxied request ended (or was refused).
    Request(Request),
}

impl Entry {
    fn item(&self) -> EgressItem {
        match self {
            Entry::Offload(c) => EgressItem {
                id: 0,
                time: rfc3339_ms(c.ended_ms),
                time_ms: c.ended_ms,
                decision: "offload".into(),
                reason: c.reason.clone(),
                node_id: c.node_id.clone(),
                dest_host: None,
                dest_port: None,
                protocol: Some("arw-job".into()),
                bytes_in: c.bytes_in,
                bytes_out: c.bytes_out,
                duration_ms: Some(c.duration_ms),
                cpu_ms: c.cpu_ms,
                job_id: Some(c.job_id.clone()),
                kind: Some(c.kind.clone()),
                attempt: Some(c.attempt),
                outcome: Some(c.outcome.clone()),
            },
            Entry::Request(r) => EgressItem {
                id: 0,
                time: rfc3339_ms(r.time_ms),
                time_ms: r.time_ms,
                decision: if r.allowed { "allow" } else { "deny" }.into(),
                reason: r.reason.clone(),
                node_id: r.node_id.clone(),
                dest_host: Some(r.host.clone()),
                dest_port: Some(r.port),
                protocol: Some(r.protocol.into()),
                bytes_in: r.bytes_in,
                bytes_out: r.bytes_out,
                duration_ms: Some(r.duration_ms),
                cpu_ms: None,
                job_id: r.job_id.clone(),
                kind: None,
                attempt: None,
                outcome: None,
            },
        }
    }
}

/// The ledger as readers see it.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    settings: EgressSettings,
    newest: AtomicI64,
    rows: AtomicU64,
}

impl Ledger {
    /// Opens (creating if needed) the ledger at `path`: the reader side, and the writer's
    /// connection for [`spawn_writer`].
    pub fn open(path: &Path, settings: EgressSettings) -> Result<(Arc<Self>, Connection), String> {
        let err = |e: rusqlite::Error| format!("{}: {e}", path.display());
        let conn = Connection::open(path).map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS egress (
                 id          INTEGER PRIMARY KEY AUTOINCREMENT,
                 time_ms     INTEGER NOT NULL,
                 decision    TEXT    NOT NULL,
                 reason      TEXT,
                 node_id     TEXT    NOT NULL,
                 dest_host   TEXT,
                 dest_port   INTEGER,
                 protocol    TEXT,
                 bytes_in    INTEGER NOT NULL,
                 bytes_out   INTEGER NOT NULL,
                 duration_ms INTEGER,
                 job_id      TEXT,
                 kind        TEXT,
                 attempt     INTEGER,
                 outcome     TEXT,
                 cpu_ms      INTEGER
             );
             CREATE INDEX IF NOT EXISTS egress_time ON egress (time_ms);",
        )
        .map_err(err)?;
        // A ledger written before runs' CPU time was kept gains the column.
        let has_cpu = conn.prepare("SELECT cpu_ms FROM egress LIMIT 0").is_ok();
        if !has_cpu {
            conn.execute_batch("ALTER TABLE egress ADD COLUMN cpu_ms INTEGER").map_err(err)?;
        }
        // Covers the per-node totals, so they read the index alone (replacing the narrower
        // indexes of earlier ledgers).
        conn.execute_batch(
            "DROP INDEX IF EXISTS egress_node;
             DROP INDEX IF EXISTS egress_totals;
             CREATE INDEX IF NOT EXISTS egress_node_totals ON egress
                 (node_id, time_ms, decision, outcome, bytes_in, bytes_out, duration_ms, cpu_ms);",
        )
        .map_err(err)?;
        let (newest, rows): (i64, i64) = conn
            .query_row("SELECT coalesce(max(id), 0), count(*) FROM egress", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(err)?;
        let ledger = Arc::new(Self {
            path: path.to_path_buf(),
            settings,
            newest: AtomicI64::new(newest),
            rows: AtomicU64::new(u64::try_from(rows).unwrap_or(0)),
        });
        Ok((ledger, conn))
    }

    fn reader(&self) -> Result<Connection, String> {
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&self.path, flags).map_err(|e| e.to_string())?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(|e| e.to_string())?;
        Ok(conn)
    }
}

const COLUMNS: &str = "id, time_ms, decision, reason, node_id, dest_host, dest_port, protocol, \
                       bytes_in, bytes_out, duration_ms, job_id, kind, attempt, outcome, cpu_ms";

fn row_to_item(row: &rusqlite::Row<'_>) -> rusqlite::Result<EgressItem> {
    let time_ms: i64 = row.get(1)?;
    let time_ms = u64::try_from(time_ms).unwrap_or(0);
    let count = |i: usize| -> rusqlite::Result<u64> {
        Ok(u64::try_from(row.get::<_, i64>(i)?).unwrap_or(0))
    };
    Ok(EgressItem {
        id: row.get(0)?,
        time: rfc3339_ms(time_ms),
        time_ms,
        decision: row.get(2)?,
        reason: row.get(3)?,
        node_id: row.get(4)?,
        dest_host: row.get(5)?,
        dest_port: row.get::<_, Option<i64>>(6)?.and_then(|p| u16::try_from(p).ok()),
        protocol: row.get(7)?,
        bytes_in: count(8)?,
        bytes_out: count(9)?,
        duration_ms: row.get::<_, Option<i64>>(10)?.and_then(|d| u64::try_from(d).ok()),
        job_id: row.get(11)?,
        kind: row.get(12)?,
        attempt: row.get::<_, Option<i64>>(13)?.and_then(|a| u32::try_from(a).ok()),
        outcome: row.get(14)?,
        cpu_ms: row.get::<_, Option<i64>>(15)?.and_then(|c| u64::try_from(c).ok()),
    })
}

impl EgressLog for Ledger {
    fn page(&self, filter: &EgressFilter) -> Result<EgressPage, String> {
        let conn = self.reader()?;
        let since = i64::try_from(filter.since_ms.unwrap_or(0)).unwrap_or(i64::MAX);
        let node = filter.node_id.as_deref();
        let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
        let wanted = "(?1 IS NULL OR node_id = ?1) AND time_ms >= ?2";
        let sql = format!("SELECT {COLUMNS} FROM egress WHERE {wanted} ORDER BY id DESC LIMIT ?3");
        let mut stmt = conn.prepare(&sql).map_err(|e| e.to_string())?;
        let items = stmt
            .query_map(params![node, since, limit], row_to_item)
            .map_err(|e| e.to_string())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let sum = |expr: &str| format!("coalesce(sum({expr}), 0)");
        let sql = format!(
            "SELECT node_id, {}, {}, {}, {}, {}, {}, {}, {}, {}, {} FROM egress WHERE {wanted} \
             GROUP BY node_id ORDER BY node_id",
            sum("decision = 'offload'"),
            sum("decision = 'offload' AND outcome = 'completed'"),
            sum("CASE WHEN decision = 'offload' THEN duration_ms END"),
            sum("CASE WHEN decision = 'offload' THEN cpu_ms END"),
            sum("CASE WHEN decision = 'offload' THEN bytes_out END"),
            sum("CASE WHEN decision = 'offload' THEN bytes_in END"),
            sum("decision = 'allow'"),
            sum("decision = 'deny'"),
            sum("CASE WHEN decision <> 'offload' THEN bytes_out END"),
            sum("CASE WHEN decision <> 'offload' THEN bytes_in END"),
        );
        let mut stmt = conn.prepare(&sql).map_err(|e| e.to_string())?;
        let totals = stmt
            .query_map(params![node, since], |r| {
                let n = |i: usize| -> rusqlite::Result<u64> {
                    Ok(u64::try_from(r.get::<_, i64>(i)?).unwrap_or(0))
                };
                Ok(EgressTotals {
                    node_id: r.get(0)?,
                    offloads: n(1)?,
                    completed: n(2)?,
                    run_ms: n(3)?,
                    cpu_ms: n(4)?,
                    job_bytes_out: n(5)?,
                    job_bytes_in: n(6)?,
                    requests: n(7)?,
                    denied: n(8)?,
                    net_bytes_out: n(9)?,
                    net_bytes_in: n(10)?,
                })
            })
            .map_err(|e| e.to_string())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        Ok(EgressPage {
            version: self.newest.load(Ordering::Acquire),
            items,
            totals,
            rows: self.rows.load(Ordering::Acquire),
        })
    }

    fn settings(&self) -> EgressSettings {
        self.settings.clone()
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node_id: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    node_id: String,
    via: &'static str,
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    node_id: String,
    decision: &'static str,
}

/// Per-node contribution counters (since the process started), registered in `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    offloads: Family<NodeLabels, Counter>,
    run_seconds: Family<NodeLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    bytes: Family<BytesLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
}

impl Counters {
    /// Registers the families in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let counters = Self::default();
        registry.register(
            "contribution_offloads",
            "Attempts this node (as the Home) offloaded to each worker, however they ended",
            counters.offloads.clone(),
        );
        registry.register(
            "contribution_run_seconds",
            "Run time each worker reported for this node's offloaded attempts",
            counters.run_seconds.clone(),
        );
        registry.register(
            "egress_bytes",
            "Bytes leaving (out) and returning (in) per node: job input and output of offloads, and requests through the egress proxy",
            counters.bytes.clone(),
        );
        registry.register(
            "egress_requests",
            "Requests through this node's egress proxy, allowed or denied by policy",
            counters.requests.clone(),
        );
        counters
    }

    fn count(&self, entry: &Entry) {
        let bytes = |node: &str, via, bytes_in, bytes_out| {
            for (direction, n) in [("in", bytes_in), ("out", bytes_out)] {
                let labels = BytesLabels { node_id: node.to_owned(), via, direction };
                self.bytes.get_or_create(&labels).inc_by(n);
            }
        };
        match entry {
            Entry::Offload(c) => {
                let node = NodeLabels { node_id: c.node_id.clone() };
                self.offloads.get_or_create(&node).inc();
                self.run_seconds.get_or_create(&node).inc_by(c.duration_ms as f64 / 1000.0);
                bytes(&c.node_id, "offload", c.bytes_in, c.bytes_out);
            }
            Entry::Request(r) => {
                let decision = if r.allowed { "allow" } else { "deny" };
                let labels = RequestLabels { node_id: r.node_id.clone(), decision };
                self.requests.get_or_create(&labels).inc();
                bytes(&r.node_id, "proxy", r.bytes_in, r.bytes_out);
            }
        }
    }
}

/// Appends the node core's offloads and the proxy's requests until both channels close: a
/// batch per transaction, the oldest rows beyond `max_rows` dropped, then each row announced
/// and counted.
pub fn spawn_writer(
    ledger: Arc<Ledger>,
    conn: Connection,
    mut offloads: mpsc::UnboundedReceiver<Contribution>,
    mut requests: mpsc::UnboundedReceiver<Entry>,
    events: EventTx,
    counters: Counters,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut conn = Some(conn);
        let max_rows = i64::try_from(ledger.settings.max_rows).unwrap_or(i64::MAX);
        loop {
            let first = tokio::select! {
                Some(c) = offloads.recv() => Entry::Offload(c),
                Some(r) = requests.recv() => r,
                else => break,
            };
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match offloads.try_recv() {
                    Ok(c) => batch.push(Entry::Offload(c)),
                    Err(_) => match requests.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    },
                }
            }
            let Some(c) = conn.take() else { break };
            let rows = ledger.rows.load(Ordering::Acquire);
            let written =
                tokio::task::spawn_blocking(move || append(c, batch, rows, max_rows)).await;
            let Ok((c, result)) = written else { break };
            conn = Some(c);
            match result {
                Ok((appended, rows)) => {
                    if let Some((last, _)) = appended.last() {
                        ledger.newest.store(*last, Ordering::Release);
                    }
                    ledger.rows.store(rows, Ordering::Release);
                    for (id, entry) in appended {
                        counters.count(&entry);
                        let mut item = entry.item();
                        item.id = id;
                        if let Ok(serde_json::Value::Object(payload)) = serde_json::to_value(&item)
                        {
                            events.emit(Event::EgressAppended(payload)).await;
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not write to the egress ledger"),
            }
        }
    })
}

type Appended = (Vec<(i64, Entry)>, u64);

/// Appends `batch` to a ledger of `rows` rows; returns the rows' ids and the new row count.
fn append(
    mut conn: Connection,
    batch: Vec<Entry>,
    rows: u64,
    max_rows: i64,
) -> (Connection, Result<Appended, String>) {
    let result = (|| {
        let tx = conn.transaction().map_err(|e| e.to_string())?;
        let mut appended = Vec::with_capacity(batch.len());
        {
            let mut insert = tx
                .prepare_cached(&format!(
                    "INSERT INTO egress ({}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, \
                     ?11, ?12, ?13, ?14, ?15)",
                    COLUMNS.trim_start_matches("id, ")
                ))
                .map_err(|e| e.to_string())?;
            for entry in batch {
                let i = entry.item();
                let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                insert
                    .execute(params![
                        n(i.time_ms),
                        i.decision,
                        i.reason,
                        i.node_id,
                        i.dest_host,
                        i.dest_port,
                        i.protocol,
                        n(i.bytes_in),
                        n(i.bytes_out),
                        i.duration_ms.map(n),
                        i.job_id,
                        i.kind,
                        i.attempt,
                        i.outcome,
                        i.cpu_ms.map(n),
                    ])
                    .map_err(|e| e.to_string())?;
                appended.push((tx.last_insert_rowid(), entry));
            }
        }
        let dropped = tx
            .execute(
                "DELETE FROM egress WHERE id <= (SELECT max(id) FROM egress) - ?1",
                params![max_rows],
            )
            .map_err(|e| e.to_string())?;
        tx.commit().map_err(|e| e.to_string())?;
        let rows = (rows + appended.len() as u64).saturating_sub(dropped as u64);
        Ok((appended, rows))
    })();
    (conn, result)
}
