//! The embedded store: one SQLite file under the data directory holding an
//! append-only log of every VM's delta events (registrations included).
//! Nothing is ever updated or deleted (triggers refuse it), so any past
//! state is rebuilt by replaying the log up to a time.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, ErrorCode, OpenFlags};

use crate::model::{Change, DeltaEvent};
use crate::DiffusionError;

/// The store's file name inside the data directory.
pub const STORE_FILE: &str = "diffusion.sqlite3";
const SCHEMA_VERSION: u32 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id    INTEGER PRIMARY KEY,
    vm    TEXT NOT NULL,
    uuid  TEXT NOT NULL,
    at_ns INTEGER NOT NULL,
    kind  TEXT NOT NULL,
    body  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_vm ON events (vm, id);
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'the diffusion log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'the diffusion log is append-only'); END;
";

pub(crate) struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    /// Opens (creating if missing) `dir/diffusion.sqlite3`, checks it, and
    /// refuses a file that is not a readable store of this schema.
    pub fn open(dir: &Path) -> Result<Store, DiffusionError> {
        std::fs::create_dir_all(dir).map_err(|source| DiffusionError::DataDir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(STORE_FILE);
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| classify(&path, e))?;
        let store = Store { conn, path };
        store.check()?;
        Ok(store)
    }

    fn check(&self) -> Result<(), DiffusionError> {
        let err = |e| classify(&self.path, e);
        self.conn
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        // Reading the header is what fails on a file that is not SQLite.
        let quick: String = self
            .conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(err)?;
        if quick != "ok" {
            return Err(DiffusionError::Corrupt {
                path: self.path.clone(),
                detail: one_line(&quick),
            });
        }
        // WAL: appends do not rewrite the log, and readers never block the writer.
        let _: String = self
            .conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(err)?;
        self.conn
            .execute_batch("PRAGMA synchronous=NORMAL;")
            .map_err(err)?;
        self.conn.execute_batch(SCHEMA).map_err(err)?;
        let version: Option<String> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })
            .map_err(err)?;
        match version {
            None => {
                self.conn
                    .execute(
                        "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)",
                        params![SCHEMA_VERSION.to_string()],
                    )
                    .map_err(err)?;
            }
            Some(v) if v == SCHEMA_VERSION.to_string() => {}
            Some(v) => {
                return Err(DiffusionError::Schema {
                    path: self.path.clone(),
                    found: v,
                    expected: SCHEMA_VERSION,
                })
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends events in one transaction and sets their ids.
    pub fn append(&mut self, evs: &mut [DeltaEvent]) -> Result<(), DiffusionError> {
        let path = self.path.clone();
        let err = |e| classify(&path, e);
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO events (vm, uuid, at_ns, kind, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(err)?;
            for ev in evs.iter_mut() {
                let body =
                    serde_json::to_string(&ev.change).map_err(|e| DiffusionError::Store {
                        path: path.clone(),
                        detail: format!("cannot encode an event: {e}"),
                    })?;
                stmt.execute(params![ev.vm, ev.uuid, ev.at_ns, kind(&ev.change), body])
                    .map_err(err)?;
                ev.id = u64::try_from(tx.last_insert_rowid()).unwrap_or(0);
            }
        }
        tx.commit().map_err(err)
    }

    /// Calls `f` on every stored event of `vm` (all VMs when `None`) with
    /// `at_ns <= until` (all when `None`) and `id > after`, in log order,
    /// at most `limit` of them. An undecodable row is an error: the store
    /// is not what this vmwatch wrote.
    pub fn scan(
        &self,
        vm: Option<&str>,
        after: u64,
        until: Option<i64>,
        limit: Option<u64>,
        mut f: impl FnMut(DeltaEvent),
    ) -> Result<(), DiffusionError> {
        let err = |e| classify(&self.path, e);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, vm, uuid, at_ns, body FROM events
                 WHERE (?1 IS NULL OR vm = ?1) AND id > ?2 AND (?3 IS NULL OR at_ns <= ?3)
                 ORDER BY id LIMIT ?4",
            )
            .map_err(err)?;
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
        let mut rows = stmt.query(params![vm, after, until, limit]).map_err(err)?;
        while let Some(row) = rows.next().map_err(err)? {
            let id: i64 = row.get(0).map_err(err)?;
            let body: String = row.get(4).map_err(err)?;
            let change: Change =
                serde_json::from_str(&body).map_err(|e| DiffusionError::Corrupt {
                    path: self.path.clone(),
                    detail: format!("event {id} is not readable: {e}"),
                })?;
            f(DeltaEvent {
                id: u64::try_from(id).unwrap_or(0),
                vm: row.get(1).map_err(err)?,
                uuid: row.get(2).map_err(err)?,
                at_ns: row.get(3).map_err(err)?,
                change,
            });
        }
        Ok(())
    }
}

fn kind(c: &Change) -> &'static str {
    match c {
        Change::Track { .. } => "track",
        Change::Untrack { .. } => "untrack",
        Change::Added { .. } => "added",
        Change::Removed { .. } => "removed",
        Change::Renamed { .. } => "renamed",
        Change::Exec { .. } => "exec",
        Change::Send { .. } => "send",
        Change::Overflow { .. } => "overflow",
    }
}

/// A damaged or foreign file is `Corrupt` (the user must act); anything else
/// (disk full, permissions, locked) is a plain store error.
fn classify(path: &Path, e: rusqlite::Error) -> DiffusionError {
    let corrupt = matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt)
    );
    if corrupt {
        DiffusionError::Corrupt {
            path: path.to_path_buf(),
            detail: one_line(&e.to_string()),
        }
    } else {
        DiffusionError::Store {
            path: path.to_path_buf(),
            detail: one_line(&e.to_string()),
        }
    }
}

fn one_line(s: &str) -> String {
    let s: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.len() > 200 {
        let mut cut = 200;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}...", &s[..cut])
    } else {
        s
    }
}
