//! The registry on disk (`cluster.sqlite`): this node's advert sequence and one row per known
//! node. Writes are incremental (the members whose advert changed, the ones removed), in one
//! transaction each, so their cost follows the change, not the size of the cluster. A
//! `cluster_nodes.json` left by an earlier release is imported once.

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use rusqlite::{Connection, OptionalExtension, params};

use crate::{core::ClusterStore, membership::StoredMember, node_id::NodeId, persist};

const FILE: &str = "cluster.sqlite";
/// The registry file of earlier releases.
const LEGACY_FILE: &str = "cluster_nodes.json";

/// The open registry database.
#[derive(Debug, Clone)]
pub(super) struct RegistryStore {
    conn: Arc<Mutex<Connection>>,
}

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
        let mut store = Self { conn: Arc::new(Mutex::new(conn)) };
        let legacy = dir.join(LEGACY_FILE);
        if let Some(old) = persist::load_json::<ClusterStore>(&legacy)? {
            let ids = old.nodes.iter().map(|m| m.record.advert.id.clone()).collect::<Vec<_>>();
            tracing::info!(nodes = ids.len(), "importing {LEGACY_FILE} into {FILE}");
            store.write_now(old.self_seq, &old.nodes, &[])?;
            std::fs::rename(&legacy, dir.join(format!("{LEGACY_FILE}.imported")))?;
        }
        let loaded = store.read()?;
        Ok((store, loaded))
    }

    fn read(&mut self) -> std::io::Result<ClusterStore> {
        let conn = self.conn.lock().map_err(|_| poisoned())?;
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

    /// Writes the sequence and the changed members, off the async worker threads.
    pub(super) async fn write(
        &self,
        self_seq: u64,
        upsert: Vec<StoredMember>,
        remove: Vec<NodeId>,
    ) -> std::io::Result<()> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.write_now(self_seq, &upsert, &remove))
            .await
            .map_err(std::io::Error::other)?
    }

    fn write_now(
        &self,
        self_seq: u64,
        upsert: &[StoredMember],
        remove: &[NodeId],
    ) -> std::io::Result<()> {
        let mut conn = self.conn.lock().map_err(|_| poisoned())?;
        let tx = conn.transaction().map_err(io)?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('self_seq', ?1)
             ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
            params![self_seq],
        )
        .map_err(io)?;
        for member in upsert {
            let stored = serde_json::to_string(member).map_err(std::io::Error::other)?;
            tx.execute(
                "INSERT INTO members (id, stored) VALUES (?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET stored = excluded.stored",
                params![member.record.advert.id.as_str(), stored],
            )
            .map_err(io)?;
        }
        for id in remove {
            tx.execute("DELETE FROM members WHERE id = ?1", params![id.as_str()]).map_err(io)?;
        }
        tx.commit().map_err(io)
    }
}

fn io(e: rusqlite::Error) -> std::io::Error {
    std::io::Error::other(format!("{FILE}: {e}"))
}

fn poisoned() -> std::io::Error {
    std::io::Error::other(format!("{FILE}: a write panicked earlier"))
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

    #[test]
    fn writes_are_incremental_and_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, empty) = RegistryStore::open(dir.path()).expect("open");
        assert_eq!((empty.self_seq, empty.nodes.len()), (0, 0));
        store.write_now(7, &[member("a", 1), member("b", 1)], &[]).expect("write");
        store.write_now(5, &[member("a", 2)], &[NodeId::parse("b").expect("id")]).expect("write");
        drop(store);
        let (_, loaded) = RegistryStore::open(dir.path()).expect("reopen");
        assert_eq!(loaded.self_seq, 7, "the sequence never goes back");
        assert_eq!(loaded.nodes.len(), 1);
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
