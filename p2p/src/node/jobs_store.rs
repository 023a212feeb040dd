//! The jobs store (`jobs.sqlite`): one row per job a node owns, written whole at each change
//! (before the events about it go out), read back at start and by the API. Readers open their
//! own connection: SQLite's WAL gives each a consistent snapshot while the actor writes.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::jobs::{IDEM_KEEP_MS, JobRecord, StoredJobs};

const FILE: &str = "jobs.sqlite";
/// Ended jobs kept at most (the oldest go first)...
const KEEP_ENDED: u64 = 100_000;
/// ...and for at most this long.
const KEEP_ENDED_MS: u64 = 7 * 24 * 60 * 60 * 1_000;
/// Most jobs one listing returns (as the reference).
pub const MAX_LIST: usize = 2_000;

/// The writer, owned by the node actor.
#[derive(Debug)]
pub(super) struct JobStore {
    conn: std::sync::Arc<std::sync::Mutex<Connection>>,
}

/// Reads the jobs store: what `GET /state/actions` and `GET /actions/{id}` show.
#[derive(Debug, Clone)]
pub struct JobReader {
    path: PathBuf,
}

/// Which jobs a listing shows.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// Only in this state.
    pub state: Option<String>,
    /// Only owned by (running on, or last run on) this node.
    pub node_id: Option<String>,
    /// Only kinds starting with this.
    pub kind_prefix: Option<String>,
    /// Only changed at or after this time (ms).
    pub updated_since: Option<u64>,
    /// At most this many (1 to [`MAX_LIST`]).
    pub limit: usize,
}

/// A page of jobs and the change number it reflects.
#[derive(Debug, Clone)]
pub struct JobList {
    /// Newest change first.
    pub jobs: Vec<JobRecord>,
    /// The highest change number stored (the ETag).
    pub rev: u64,
}

impl JobStore {
    /// Opens (or creates) the store in `dir`, forgets old ended jobs, and reads what the
    /// ledger needs back.
    pub(super) fn open(dir: &Path, now_ms: u64) -> std::io::Result<(Self, JobReader, StoredJobs)> {
        let path = dir.join(FILE);
        let conn = Connection::open(&path).map_err(io)?;
        // NORMAL in WAL mode: a committed job survives the process being killed; only a power
        // cut can take the last commits back.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS jobs (
                 id TEXT PRIMARY KEY, rev INTEGER NOT NULL, fence INTEGER NOT NULL,
                 state TEXT NOT NULL, node_id TEXT, idem_key TEXT,
                 updated INTEGER NOT NULL, record TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS jobs_rev ON jobs (rev);
             CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
             CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs (idem_key)
                 WHERE idem_key IS NOT NULL;",
        )
        .map_err(io)?;
        let ended = "state IN ('completed', 'failed')";
        conn.execute(
            &format!("DELETE FROM jobs WHERE {ended} AND updated < ?1"),
            params![now_ms.saturating_sub(KEEP_ENDED_MS)],
        )
        .map_err(io)?;
        conn.execute(
            &format!(
                "DELETE FROM jobs WHERE {ended} AND rev <= (SELECT rev FROM jobs WHERE {ended}
                 ORDER BY rev DESC LIMIT 1 OFFSET ?1)"
            ),
            params![KEEP_ENDED],
        )
        .map_err(io)?;
        let (fence, rev): (u64, u64) = conn
            .query_row("SELECT coalesce(max(fence), 0), coalesce(max(rev), 0) FROM jobs", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(io)?;
        let mut records = Vec::new();
        {
            let mut statement = conn
                .prepare(&format!(
                    "SELECT id, record FROM jobs WHERE NOT ({ended})
                     OR (idem_key IS NOT NULL AND updated >= ?1) ORDER BY rev"
                ))
                .map_err(io)?;
            let rows = statement
                .query_map(params![now_ms.saturating_sub(IDEM_KEEP_MS)], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })
                .map_err(io)?;
            for row in rows {
                let (id, text) = row.map_err(io)?;
                match serde_json::from_str::<JobRecord>(&text) {
                    Ok(record) => records.push(record),
                    Err(e) => {
                        tracing::warn!(job = id, error = %e, "a stored job no longer parses; skipped")
                    }
                }
            }
        }
        let store = Self { conn: std::sync::Arc::new(std::sync::Mutex::new(conn)) };
        Ok((store, JobReader { path }, StoredJobs { records, fence, rev }))
    }

    /// Writes one job. On the actor's own thread: a commit without fsync (WAL, `NORMAL`) takes
    /// tens of microseconds, less than handing it to a blocking thread and back, and job
    /// throughput is one commit per change.
    pub(super) fn write(&self, record: &JobRecord) -> std::io::Result<()> {
        let mut conn =
            self.conn.lock().map_err(|_| std::io::Error::other("jobs store poisoned"))?;
        write_now(&mut conn, record)
    }
}

fn write_now(conn: &mut Connection, record: &JobRecord) -> std::io::Result<()> {
    let text = serde_json::to_string(record).map_err(std::io::Error::other)?;
    let tx = conn.transaction().map_err(io)?;
    if let Some(key) = &record.idem_key {
        // A key forgotten by the ledger (older than a day) may be used again.
        tx.execute(
            "UPDATE jobs SET idem_key = NULL WHERE idem_key = ?1 AND id != ?2",
            params![key, record.id],
        )
        .map_err(io)?;
    }
    tx.execute(
        "INSERT INTO jobs (id, rev, fence, state, node_id, idem_key, updated, record)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (id) DO UPDATE SET rev = excluded.rev, fence = excluded.fence,
             state = excluded.state, node_id = excluded.node_id, updated = excluded.updated,
             record = excluded.record",
        params![
            record.id,
            record.rev,
            record.fence,
            record.state.as_str(),
            record.node_id,
            record.idem_key,
            record.updated,
            text
        ],
    )
    .map_err(io)?;
    tx.commit().map_err(io)
}

impl JobReader {
    /// Jobs by most recent change, filtered.
    pub async fn list(&self, filter: JobFilter) -> std::io::Result<JobList> {
        let path = self.path.clone();
        let limit = filter.limit.clamp(1, MAX_LIST);
        tokio::task::spawn_blocking(move || {
            let conn = read_only(&path)?;
            let rev: u64 = conn
                .query_row("SELECT coalesce(max(rev), 0) FROM jobs", [], |r| r.get(0))
                .map_err(io)?;
            // The prefix is matched literally (substr), never as a LIKE pattern.
            let mut statement = conn
                .prepare(
                    "SELECT record FROM jobs WHERE (?1 IS NULL OR state = ?1)
                     AND (?2 IS NULL OR node_id = ?2)
                     AND (?3 IS NULL OR substr(json_extract(record, '$.kind'), 1, length(?3)) = ?3)
                     AND (?4 IS NULL OR updated >= ?4)
                     ORDER BY rev DESC LIMIT ?5",
                )
                .map_err(io)?;
            let rows = statement
                .query_map(
                    params![
                        filter.state,
                        filter.node_id,
                        filter.kind_prefix,
                        filter.updated_since,
                        limit
                    ],
                    |r| r.get::<_, String>(0),
                )
                .map_err(io)?;
            let mut jobs = Vec::new();
            for row in rows {
                if let Ok(record) = serde_json::from_str(&row.map_err(io)?) {
                    jobs.push(record);
                }
            }
            Ok(JobList { jobs, rev })
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// One job.
    pub async fn get(&self, id: String) -> std::io::Result<Option<JobRecord>> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = read_only(&path)?;
            let text: Option<String> = conn
                .query_row("SELECT record FROM jobs WHERE id = ?1", params![id], |r| r.get(0))
                .optional()
                .map_err(io)?;
            Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

fn read_only(path: &Path) -> std::io::Result<Connection> {
    Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(io)
}

fn io(e: rusqlite::Error) -> std::io::Error {
    std::io::Error::other(format!("{FILE}: {e}"))
}
