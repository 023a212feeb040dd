//! The durable event journal and the one publish path.
//!
//! A dedicated thread is the only consumer of the process's event pipeline. For each batch of
//! events it stamps the envelopes (time, normalised kind, origin, UUIDv7 `ce.id`, `corr_id`),
//! inserts them into SQLite (WAL) in one transaction, and only then acknowledges producers and fans
//! the stored events out to live subscribers. Row ids are the SSE ids: `AUTOINCREMENT` keeps them
//! unique and increasing across restarts and pruning. Retention (row count and age) is enforced a
//! chunk at a time between batches, so pruning never holds up publishing for long.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use rusqlite::{Connection, OpenFlags, params_from_iter, types::Value as SqlValue};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, watch};

use arw_api::{
    Metrics,
    dto::{CloudEvent, Envelope},
    events::{EventLog, LiveEvent, StoredEvent, normalize_kind},
};
use arw_p2p::{events::Emit, node::Snapshot, time};

/// Journal file name in the state directory.
pub const FILE: &str = "events.sqlite";
/// Most events written in one transaction.
const BATCH: usize = 512;
/// Most rows deleted by one pruning statement.
const PRUNE_CHUNK: i64 = 2_000;
/// How often the age limit is checked (the row limit is checked after every batch).
const AGE_CHECK_EVERY: Duration = Duration::from_secs(30);

/// Journal settings (`[events]`).
#[derive(Debug, Clone)]
pub struct JournalConfig {
    /// Keep at most this many rows.
    pub retention_rows: u64,
    /// Keep at most this many bytes of payloads.
    pub retention_bytes: u64,
    /// Drop rows older than this.
    pub retention_age: Duration,
    /// `PRAGMA synchronous = FULL` (fsync every commit) rather than `NORMAL`.
    pub fsync: bool,
    /// Live events buffered per subscriber before it is closed as lagging.
    pub live_capacity: usize,
    /// `ce.source` of events created here.
    pub source: String,
}

/// The journal as readers see it.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    live: broadcast::Sender<Arc<LiveEvent>>,
    oldest: AtomicI64,
    newest: AtomicI64,
}

impl Journal {
    /// Opens (creating if needed) the journal at `path`. Returns the shared reader side and the
    /// writer connection for [`spawn_writer`].
    pub fn open(path: &Path, config: &JournalConfig) -> Result<(Arc<Self>, Connection), String> {
        let conn = Connection::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let sync = if config.fsync { "FULL" } else { "NORMAL" };
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = {sync};
             CREATE TABLE IF NOT EXISTS events (
                 id      INTEGER PRIMARY KEY AUTOINCREMENT,
                 time    TEXT    NOT NULL,
                 time_ms INTEGER NOT NULL,
                 kind    TEXT    NOT NULL,
                 origin  TEXT,
                 source  TEXT    NOT NULL,
                 ce_id   TEXT    NOT NULL,
                 corr_id TEXT,
                 payload TEXT    NOT NULL
             );
             CREATE INDEX IF NOT EXISTS events_time_ms ON events (time_ms);"
        ))
        .map_err(|e| format!("{}: {e}", path.display()))?;
        let (oldest, newest) = bounds(&conn).map_err(|e| e.to_string())?;
        let (live, _) = broadcast::channel(config.live_capacity.max(1));
        let journal = Arc::new(Self {
            path: path.to_path_buf(),
            live,
            oldest: AtomicI64::new(oldest),
            newest: AtomicI64::new(newest),
        });
        Ok((journal, conn))
    }

    fn reader(&self) -> Result<Connection, String> {
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&self.path, flags).map_err(|e| e.to_string())?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(|e| e.to_string())?;
        Ok(conn)
    }
}

fn bounds(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.query_row("SELECT coalesce(min(id), 0), coalesce(max(id), 0) FROM events", [], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
}

/// `(substr(kind,1,length(?1)) = ?1 OR ...)` for the prefixes, numbering parameters from `first`.
fn prefix_clause(prefixes: &[String], first: usize) -> String {
    if prefixes.is_empty() {
        return "1".to_owned();
    }
    let terms: Vec<String> = (0..prefixes.len())
        .map(|i| format!("substr(kind, 1, length(?{n})) = ?{n}", n = first + i))
        .collect();
    format!("({})", terms.join(" OR "))
}

const COLUMNS: &str = "id, time, kind, origin, source, ce_id, payload";

fn row_to_event(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEvent> {
    let kind: String = row.get(2)?;
    let time: String = row.get(1)?;
    let payload: String = row.get(6)?;
    Ok(StoredEvent {
        id: row.get(0)?,
        envelope: Envelope {
            ce: Some(CloudEvent {
                specversion: "1.0".into(),
                kind: kind.clone(),
                source: row.get(4)?,
                id: row.get(5)?,
                time: time.clone(),
                datacontenttype: "application/json".into(),
            }),
            time,
            kind,
            payload: serde_json::from_str(&payload).unwrap_or(Value::Null),
            origin: row.get(3)?,
            policy: None,
        },
    })
}

impl EventLog for Journal {
    fn subscribe(&self) -> broadcast::Receiver<Arc<LiveEvent>> {
        self.live.subscribe()
    }

    fn read_after(
        &self,
        after: i64,
        limit: usize,
        prefixes: &[String],
    ) -> Result<Vec<StoredEvent>, String> {
        let conn = self.reader()?;
        let sql = format!(
            "SELECT {COLUMNS} FROM events WHERE id > ?1 AND {} ORDER BY id LIMIT {limit}",
            prefix_clause(prefixes, 2)
        );
        let mut params = vec![SqlValue::Integer(after)];
        params.extend(prefixes.iter().map(|p| SqlValue::Text(p.clone())));
        let mut stmt = conn.prepare(&sql).map_err(|e| e.to_string())?;
        let rows =
            stmt.query_map(params_from_iter(params), row_to_event).map_err(|e| e.to_string())?;
        rows.collect::<Result<_, _>>().map_err(|e| e.to_string())
    }

    fn read_last(
        &self,
        limit: usize,
        prefixes: &[String],
    ) -> Result<(Vec<StoredEvent>, u64), String> {
        let conn = self.reader()?;
        let filter = prefix_clause(prefixes, 1);
        let params: Vec<SqlValue> = prefixes.iter().map(|p| SqlValue::Text(p.clone())).collect();
        let sql =
            format!("SELECT {COLUMNS} FROM events WHERE {filter} ORDER BY id DESC LIMIT {limit}");
        let mut stmt = conn.prepare(&sql).map_err(|e| e.to_string())?;
        let rows = stmt
            .query_map(params_from_iter(params.clone()), row_to_event)
            .map_err(|e| e.to_string())?;
        let mut events: Vec<StoredEvent> =
            rows.collect::<Result<_, _>>().map_err(|e| e.to_string())?;
        events.reverse();
        let total: i64 = conn
            .query_row(
                &format!("SELECT count(*) FROM events WHERE {filter}"),
                params_from_iter(params),
                |r| r.get(0),
            )
            .map_err(|e| e.to_string())?;
        Ok((events, u64::try_from(total).unwrap_or(0)))
    }

    fn bounds(&self) -> (i64, i64) {
        (self.oldest.load(Ordering::Acquire), self.newest.load(Ordering::Acquire))
    }
}

/// Starts the writer thread. It ends when every `EventTx` has been dropped.
pub fn spawn_writer(
    journal: Arc<Journal>,
    conn: Connection,
    config: JournalConfig,
    rx: mpsc::Receiver<Emit>,
    node: watch::Receiver<Arc<Snapshot>>,
    metrics: Arc<Metrics>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("arw-journal".into()).spawn(move || {
        let bytes = payload_bytes(&conn, i64::MAX).unwrap_or(0);
        let mut writer =
            Writer { journal, conn, config, metrics, last_age_check: Instant::now(), bytes };
        writer.prune_all();
        writer.count();
        writer.run(rx, &node);
    })
}

struct Writer {
    journal: Arc<Journal>,
    conn: Connection,
    config: JournalConfig,
    metrics: Arc<Metrics>,
    last_age_check: Instant,
    /// Payload bytes in the journal.
    bytes: u64,
}

/// Payload bytes of the rows up to `upto`.
fn payload_bytes(conn: &Connection, upto: i64) -> rusqlite::Result<u64> {
    conn.query_row(
        "SELECT coalesce(sum(length(CAST(payload AS BLOB))), 0) FROM events WHERE id <= ?1",
        [upto],
        |r| r.get::<_, i64>(0),
    )
    .map(|b| u64::try_from(b).unwrap_or(0))
}

impl Writer {
    fn run(&mut self, mut rx: mpsc::Receiver<Emit>, node: &watch::Receiver<Arc<Snapshot>>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(emit) => batch.push(emit),
                    Err(_) => break,
                }
            }
            let origin = node.borrow().id.to_string();
            self.publish(batch, &origin);
            if self.over_size_limit() || self.last_age_check.elapsed() >= AGE_CHECK_EVERY {
                self.prune_chunk();
            }
        }
        tracing::debug!("event journal writer stopped");
    }

    fn publish(&mut self, batch: Vec<Emit>, origin: &str) {
        let stamped: Vec<(Envelope, Option<tokio::sync::oneshot::Sender<i64>>)> = batch
            .into_iter()
            .map(|mut emit| (stamp(&mut emit, origin, &self.config.source), emit.ack))
            .collect();
        let ids = match self.insert(stamped.iter().map(|(e, _)| e)) {
            Ok(ids) => ids,
            Err(e) => {
                tracing::error!(error = %e, events = stamped.len(), "events could not be journaled and were dropped");
                return;
            }
        };
        if let Some(&last) = ids.last() {
            self.journal.newest.store(last, Ordering::Release);
            if self.journal.oldest.load(Ordering::Acquire) == 0 {
                self.journal.oldest.store(ids[0], Ordering::Release);
            }
        }
        self.count();
        for ((envelope, ack), id) in stamped.into_iter().zip(ids) {
            if let Some(ack) = ack {
                let _ = ack.send(id);
            }
            self.metrics.events_published.inc();
            // No subscribers is normal.
            let _ = self.journal.live.send(Arc::new(LiveEvent::new(StoredEvent { id, envelope })));
        }
    }

    fn insert<'a>(
        &mut self,
        envelopes: impl Iterator<Item = &'a Envelope>,
    ) -> rusqlite::Result<Vec<i64>> {
        let tx = self.conn.transaction()?;
        let mut ids = Vec::new();
        let mut added = 0;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO events (time, time_ms, kind, origin, source, ce_id, corr_id, payload)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for e in envelopes {
                let time_ms = chrono::DateTime::parse_from_rfc3339(&e.time)
                    .map_or(0, |t| t.timestamp_millis());
                let (source, ce_id) =
                    e.ce.as_ref().map_or(("", ""), |ce| (ce.source.as_str(), ce.id.as_str()));
                let corr_id = e.payload.get("corr_id").and_then(Value::as_str);
                let payload = e.payload.to_string();
                added += payload.len() as u64;
                stmt.execute(rusqlite::params![
                    e.time, time_ms, e.kind, e.origin, source, ce_id, corr_id, payload
                ])?;
                ids.push(tx.last_insert_rowid());
            }
        }
        let started = Instant::now();
        tx.commit()?;
        self.metrics.journal_commit_seconds.observe(started.elapsed().as_secs_f64());
        self.bytes += added;
        Ok(ids)
    }

    /// The journal's size, for the metrics.
    fn count(&self) {
        let (oldest, newest) = self.journal.bounds();
        let rows = if oldest > 0 { newest - oldest + 1 } else { 0 };
        self.metrics.journal_rows.set(rows);
        self.metrics.journal_bytes.set(i64::try_from(self.bytes).unwrap_or(i64::MAX));
    }

    fn over_size_limit(&self) -> bool {
        let (oldest, newest) = self.journal.bounds();
        let rows = u64::try_from(newest - oldest + 1).unwrap_or(0);
        oldest > 0
            && (rows > self.config.retention_rows || self.bytes > self.config.retention_bytes)
    }

    /// The highest id that retention says must go (0 = none).
    fn prune_target(&self) -> i64 {
        let newest = self.journal.newest.load(Ordering::Acquire);
        let by_rows = newest - i64::try_from(self.config.retention_rows).unwrap_or(i64::MAX);
        let cutoff_ms = time::now_ms().saturating_sub(
            u64::try_from(self.config.retention_age.as_millis()).unwrap_or(u64::MAX),
        );
        let by_age: i64 = self
            .conn
            .query_row(
                "SELECT coalesce(max(id), 0) FROM events WHERE time_ms < ?1",
                [i64::try_from(cutoff_ms).unwrap_or(i64::MAX)],
                |r| r.get(0),
            )
            .unwrap_or(0);
        let excess = self.bytes.saturating_sub(self.config.retention_bytes);
        let by_bytes: i64 = if excess == 0 {
            0
        } else {
            // The first row at which the payloads from the oldest on add up to the excess.
            self.conn
                .query_row(
                    "SELECT coalesce(min(id), 0) FROM (
                         SELECT id, sum(length(CAST(payload AS BLOB))) OVER (ORDER BY id) AS run
                         FROM events
                     ) WHERE run >= ?1",
                    [i64::try_from(excess).unwrap_or(i64::MAX)],
                    |r| r.get(0),
                )
                .unwrap_or(0)
        };
        by_rows.max(by_age).max(by_bytes)
    }

    /// Deletes at most one chunk of expired rows.
    fn prune_chunk(&mut self) -> bool {
        self.last_age_check = Instant::now();
        let target = self.prune_target();
        let oldest = self.journal.oldest.load(Ordering::Acquire);
        if target < oldest || oldest == 0 {
            return false;
        }
        let upto = target.min(oldest + PRUNE_CHUNK - 1);
        let freed = payload_bytes(&self.conn, upto).unwrap_or(0);
        if let Err(e) = self.conn.execute("DELETE FROM events WHERE id <= ?1", [upto]) {
            tracing::warn!(error = %e, "journal pruning failed");
            return false;
        }
        self.bytes = self.bytes.saturating_sub(freed);
        let new_oldest = bounds(&self.conn).map(|(o, _)| o).unwrap_or(upto + 1);
        self.journal.oldest.store(new_oldest, Ordering::Release);
        self.count();
        tracing::debug!(upto, "journal pruned");
        upto < target
    }

    fn prune_all(&mut self) {
        while self.prune_chunk() {}
    }
}

/// The envelope of an event: created on this node (`origin`), or relayed from another node,
/// whose origin, `ce.id` and time it keeps.
pub fn stamp(emit: &mut Emit, origin: &str, source: &str) -> Envelope {
    let kind = normalize_kind(&emit.kind);
    let mut payload = std::mem::take(&mut emit.payload);
    let (origin, id, time) = match emit.relayed.take() {
        Some(r) => (r.origin, r.ce_id, r.time),
        None => {
            if let Value::Object(map) = &mut payload {
                map.entry("corr_id")
                    .or_insert_with(|| Value::String(uuid::Uuid::now_v7().to_string()));
            }
            (origin.to_owned(), uuid::Uuid::now_v7().to_string(), time::rfc3339_ms(time::now_ms()))
        }
    };
    Envelope {
        ce: Some(CloudEvent {
            specversion: "1.0".into(),
            kind: kind.clone(),
            source: source.to_owned(),
            id,
            time: time.clone(),
            datacontenttype: "application/json".into(),
        }),
        time,
        kind,
        payload,
        origin: Some(origin),
        policy: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(rows: u64) -> JournalConfig {
        JournalConfig {
            retention_rows: rows,
            retention_bytes: u64::MAX,
            retention_age: Duration::from_secs(3600),
            fsync: false,
            live_capacity: 64,
            source: "arw-server".into(),
        }
    }

    fn writer(dir: &Path, rows: u64) -> Writer {
        writer_with(dir, config(rows))
    }

    fn writer_with(dir: &Path, cfg: JournalConfig) -> Writer {
        let (journal, conn) = Journal::open(&dir.join(FILE), &cfg).expect("open");
        let bytes = payload_bytes(&conn, i64::MAX).expect("bytes");
        Writer {
            journal,
            conn,
            config: cfg,
            metrics: Arc::new(Metrics::new()),
            last_age_check: Instant::now(),
            bytes,
        }
    }

    fn emit(kind: &str) -> Emit {
        Emit { kind: kind.into(), payload: serde_json::json!({"n": 1}), ack: None, relayed: None }
    }

    #[test]
    fn ids_rise_across_reopen_and_prefixes_filter_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = writer(dir.path(), 1000);
        w.publish(
            vec![
                emit("cluster.node.advertise"),
                emit("Hierarchy.State"),
                emit("cluster.node.changed"),
            ],
            "n1",
        );
        let (ids, _) = w.journal.read_last(10, &[]).expect("read");
        assert_eq!(ids.iter().map(|e| e.id).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(ids[1].envelope.kind, "hierarchy.state");
        let cluster = w.journal.read_after(0, 10, &["cluster.".into()]).expect("read");
        assert_eq!(cluster.iter().map(|e| e.id).collect::<Vec<_>>(), vec![1, 3]);
        assert!(cluster[0].envelope.payload["corr_id"].is_string());
        drop(w);

        let mut w = writer(dir.path(), 1000);
        assert_eq!(w.journal.bounds(), (1, 3));
        w.publish(vec![emit("service.test")], "n1");
        assert_eq!(w.journal.bounds(), (1, 4));
    }

    #[test]
    fn retention_keeps_the_newest_rows_and_ids_never_reuse() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = writer(dir.path(), 5);
        for _ in 0..20 {
            w.publish(vec![emit("service.test")], "n1");
        }
        w.prune_all();
        assert_eq!(w.journal.bounds(), (16, 20));
        let (rows, total) = w.journal.read_last(100, &[]).expect("read");
        assert_eq!((rows.len(), total), (5, 5));
        // Delete everything, reopen: AUTOINCREMENT still continues after 20.
        w.conn.execute("DELETE FROM events", []).expect("delete");
        drop(w);
        let mut w = writer(dir.path(), 5);
        w.publish(vec![emit("service.test")], "n1");
        assert_eq!(w.journal.bounds().1, 21);
    }

    #[test]
    fn retention_bounds_bytes_too_and_counts_them_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = |n: usize| Emit {
            kind: "service.test".into(),
            payload: serde_json::json!({ "blob": "x".repeat(n) }),
            ack: None,
            relayed: None,
        };
        let mut cfg = config(1000);
        cfg.retention_bytes = 10_000;
        let mut w = writer_with(dir.path(), cfg.clone());
        for _ in 0..5 {
            w.publish(vec![emit("service.test")], "n1");
        }
        // Three events of ~4 KB: the journal may hold two of them, and nothing older.
        for _ in 0..3 {
            w.publish(vec![big(4_000)], "n1");
            if w.over_size_limit() {
                w.prune_all();
            }
        }
        assert_eq!(w.journal.bounds(), (7, 8), "only the two newest fit in 10,000 bytes");
        assert!(w.bytes <= 10_000 && w.bytes == payload_bytes(&w.conn, i64::MAX).expect("sum"));
        drop(w);
        let w = writer_with(dir.path(), cfg);
        assert!(!w.over_size_limit(), "the count survives a restart");
    }

    #[test]
    fn live_subscribers_get_only_journaled_events_with_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = writer(dir.path(), 1000);
        let mut rx = w.journal.subscribe();
        let (ack_tx, mut ack_rx) = tokio::sync::oneshot::channel();
        w.publish(
            vec![Emit {
                kind: "service.test".into(),
                payload: serde_json::json!({}),
                ack: Some(ack_tx),
                relayed: None,
            }],
            "n1",
        );
        let live = rx.try_recv().expect("live event");
        assert_eq!(Some(live.event.id), ack_rx.try_recv().ok());
        let stored = w.journal.read_after(live.event.id - 1, 1, &[]).expect("read");
        assert_eq!(stored[0], live.event);
        let data: Envelope = serde_json::from_str(&live.data).expect("data");
        assert_eq!(data, live.event.envelope);
    }
}
