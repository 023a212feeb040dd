//! The registry on disk (`cluster.sqlite`): this node's advert sequence and one row per known
//! node. Writes are incremental (the members whose advert changed, the ones removed), so their
//! cost follows the change, not the size of the cluster, and they are carried out by a writer
//! of their own ([`RegistryStore::writer`]): the node goes on handling messages and timers
//! while a write waits for the disk. A `cluster_nodes.json` left by an earlier release is
//! imported once.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::mpsc;

use crate::{
    core::{ClusterStore, Ticket},
    membership::StoredMember,
    node_id::NodeId,
    persist,
};

const FILE: &str = "cluster.sqlite";
/// The registry file of earlier releases.
const LEGACY_FILE: &str = "cluster_nodes.json";

/// The open registry database.
#[derive(Debug)]
pub(super) struct RegistryStore {
    conn: Connection,
}

/// One write the core asked for: the advert sequence and the changed members.
#[derive(Debug)]
pub(super) struct RegistryWrite {
    pub ticket: Ticket,
    pub self_seq: u64,
    pub upsert: Vec<StoredMember>,
    pub remove: Vec<NodeId>,
}

/// A write's outcome, for [`crate::core::Input::Persisted`].
pub(super) type Written = (Ticket, Result<(), String>);

impl RegistryStore {
    /// Opens (or creates) the registry in `dir` and reads it.
    pub(super) fn open(dir: &Path) -> std::io::Result<(Self, ClusterStore)> {
        let conn = Connection::open(dir.join(FILE)).map_err(io)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS members (id TEXT PRIMARY KEY, stored TEXT NOT NULL);",
        )
        .map_err(io)?;
        let mut store = Self { conn };
        let legacy = dir.join(LEGACY_FILE);
        if let Some(old) = persist::load_json::<ClusterStore>(&legacy)? {
            let ids = old.nodes.iter().map(|m| m.record.advert.id.clone()).collect::<Vec<_>>();
            tracing::info!(nodes = ids.len(), "importing {LEGACY_FILE} into {FILE}");
            let import = RegistryWrite {
                ticket: Ticket(0),
                self_seq: old.self_seq,
                upsert: old.nodes,
                remove: Vec::new(),
            };
            store.write_now(&[import])?;
            std::fs::rename(&legacy, dir.join(format!("{LEGACY_FILE}.imported")))?;
        }
        let loaded = store.read()?;
        Ok((store, loaded))
    }

    fn read(&self) -> std::io::Result<ClusterStore> {
        let conn = &self.conn;
        let self_seq: u64 = conn
            .query_row("SELECT value FROM meta WHERE key = 'self_seq'", [], |r| r.get(0))
            .optional()
            .map_err(io)?
            .unwrap_or(0);
        let mut statement = conn.prepare("SELECT id, stored FROM members").map_err(io)?;
        let rows = statement
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(io)?;
        let mut nodes = Vec::new();
        for row in rows {
            let (id, stored) = row.map_err(io)?;
            match serde_json::from_str::<StoredMember>(&stored) {
                Ok(member) => nodes.push(member),
                Err(e) => {
                    tracing::warn!(node = id, error = %e, "a stored node no longer parses; skipped")
                }
            }
        }
        Ok(ClusterStore { self_seq, nodes })
    }

    /// Starts the writer: writes sent to it are carried out in the order sent, off the async
    /// worker threads, those that queued up meanwhile together in one transaction; each
    /// outcome comes back with its ticket. It stops once the sender is dropped and what was
    /// sent is written.
    pub(super) fn writer(
        self,
    ) -> (mpsc::UnboundedSender<RegistryWrite>, mpsc::UnboundedReceiver<Written>) {
        let (writes, mut queue) = mpsc::unbounded_channel::<RegistryWrite>();
        let (done, outcomes) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut store = Some(self);
            while let Some(first) = queue.recv().await {
                let mut batch = vec![first];
                while let Ok(more) = queue.try_recv() {
                    batch.push(more);
                }
                let tickets: Vec<Ticket> = batch.iter().map(|w| w.ticket).collect();
                let result = match store.take() {
                    Some(mut s) => tokio::task::spawn_blocking(move || {
                        let result = s.write_now(&batch);
                        (s, result)
                    })
                    .await
                    .map(|(s, result)| {
                        store = Some(s);
                        result.map_err(|e| e.to_string())
                    })
                    .unwrap_or_else(|e| Err(format!("{FILE}: the write panicked: {e}"))),
                    None => Err(format!("{FILE}: closed after a write panicked")),
                };
                for ticket in tickets {
                    if done.send((ticket, result.clone())).is_err() {
                        return;
                    }
                }
            }
        });
        (writes, outcomes)
    }

    /// Applies `writes` in order, in one transaction.
    fn write_now(&mut self, writes: &[RegistryWrite]) -> std::io::Result<()> {
        let tx = self.conn.transaction().map_err(io)?;
        for write in writes {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('self_seq', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
                params![write.self_seq],
            )
            .map_err(io)?;
            for member in &write.upsert {
                let stored = serde_json::to_string(member).map_err(std::io::Error::other)?;
                tx.execute(
                    "INSERT INTO members (id, stored) VALUES (?1, ?2)
                     ON CONFLICT (id) DO UPDATE SET stored = excluded.stored",
                    params![member.record.advert.id.as_str(), stored],
                )
                .map_err(io)?;
            }
            for id in &write.remove {
                tx.execute("DELETE FROM members WHERE id = ?1", params![id.as_str()])
                    .map_err(io)?;
            }
        }
        tx.commit().map_err(io)
    }
}

fn io(e: rusqlite::Error) -> std::io::Error {
    std::io::Error::other(format!("{FILE}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Advert, Health, NodeRecord};

    fn member(id: &str, seq: u64) -> StoredMember {
        let advert = Advert::basic(NodeId::parse(id).expect("id"), "lab", seq, 1);
        StoredMember {
            record: NodeRecord {
                advert: advert.into(),
                last_seen_ms: 1,
                health: Health::Ok,
                local: false,
            },
            key: "k".into(),
            envelope: "e".into(),
        }
    }

    fn write(
        ticket: u64,
        self_seq: u64,
        upsert: Vec<StoredMember>,
        remove: &[&str],
    ) -> RegistryWrite {
        let remove = remove.iter().map(|id| NodeId::parse(id).expect("id")).collect();
        RegistryWrite { ticket: Ticket(ticket), self_seq, upsert, remove }
    }

    #[tokio::test]
    async fn writes_are_carried_out_in_order_and_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, empty) = RegistryStore::open(dir.path()).expect("open");
        assert_eq!((empty.self_seq, empty.nodes.len()), (0, 0));
        let (writes, mut outcomes) = store.writer();
        let sent = [
            write(1, 7, vec![member("a", 1), member("b", 1)], &[]),
            write(2, 5, vec![member("a", 2)], &["b"]),
            write(3, 8, vec![member("b", 3)], &[]),
            write(4, 9, vec![], &["b"]),
        ];
        for w in sent {
            writes.send(w).expect("writer");
        }
        drop(writes);
        let mut done = Vec::new();
        while let Some((ticket, result)) = outcomes.recv().await {
            result.expect("written");
            done.push(ticket.0);
        }
        assert_eq!(done, [1, 2, 3, 4], "every outcome, in order; the writer stops when dropped");
        let (_, loaded) = RegistryStore::open(dir.path()).expect("reopen");
        assert_eq!(loaded.self_seq, 9, "the sequence never goes back");
        assert_eq!(loaded.nodes.len(), 1, "b removed last");
        assert_eq!(loaded.nodes[0].record.advert.seq, 2);
    }

    #[test]
    fn an_earlier_release_s_registry_file_is_imported_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = ClusterStore { self_seq: 42, nodes: vec![member("a", 3)] };
        persist::save_json(&dir.path().join(LEGACY_FILE), &old).expect("legacy");
        let (_, loaded) = RegistryStore::open(dir.path()).expect("open");
        assert_eq!((loaded.self_seq, loaded.nodes.len()), (42, 1));
        assert!(!dir.path().join(LEGACY_FILE).exists());
    }
}
