//! Durable relay state behind a trait, with one writer thread.
//!
//! Connection actors never touch SQLite: they send a command over a bounded
//! channel to the store thread, which drains whatever is waiting and applies
//! it in one transaction (group commit), then answers each caller. Issue #4's
//! message queue will reuse the same writer.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};
use w2w_proto::handshake::Registration;
use w2w_proto::Address;

/// Storage failures. The relay answers the client with `internal` and logs.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("opening store at {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    /// A write or read failed in the store thread (the message says why).
    #[error("store: {0}")]
    Backend(String),
    #[error("the store thread has stopped")]
    Closed,
}

/// One row of the registration table (the seed's table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationRow {
    pub address: Address,
    pub role: u8,
    pub url: String,
    pub sig_a: [u8; 64],
    pub sig_b: [u8; 64],
    pub sig_c: [u8; 64],
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub registrations: u64,
}

/// What a storage engine must do. Called only from the store thread.
pub trait Backend: Send + 'static {
    /// Applies a batch of writes atomically.
    fn apply(&mut self, batch: &[Write]) -> Result<(), StoreError>;
    fn registration(&mut self, address: &Address) -> Result<Option<RegistrationRow>, StoreError>;
}

/// A write command.
#[derive(Debug, Clone)]
pub enum Write {
    /// Upsert a completed registration: sets sigs and last seen, keeps
    /// first seen, counts registrations.
    Registered { reg: Box<Registration>, at_ms: u64 },
    /// The address disconnected at this time.
    Seen { address: Address, at_ms: u64 },
}

enum Cmd {
    Write(Write, Option<oneshot::Sender<Result<(), String>>>),
    Get(
        Address,
        oneshot::Sender<Result<Option<RegistrationRow>, String>>,
    ),
}

/// Async handle to the store thread. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Cmd>,
}

/// Most commands applied in one transaction.
const MAX_BATCH: usize = 1024;

impl Store {
    /// Starts the writer thread over `backend`.
    pub fn spawn(mut backend: impl Backend) -> Store {
        let (tx, mut rx) = mpsc::channel::<Cmd>(8192);
        std::thread::Builder::new()
            .name("w2w-store".into())
            .spawn(move || {
                let mut writes = Vec::new();
                let mut waiters = Vec::new();
                while let Some(first) = rx.blocking_recv() {
                    let mut next = Some(first);
                    while let Some(cmd) = next.take() {
                        match cmd {
                            Cmd::Write(w, reply) => {
                                writes.push(w);
                                waiters.extend(reply);
                            }
                            Cmd::Get(addr, reply) => {
                                // Reads see every write queued before them.
                                flush(&mut backend, &mut writes, &mut waiters);
                                let _ = reply
                                    .send(backend.registration(&addr).map_err(|e| e.to_string()));
                            }
                        }
                        if writes.len() < MAX_BATCH {
                            next = rx.try_recv().ok();
                        }
                    }
                    flush(&mut backend, &mut writes, &mut waiters);
                }
            })
            .expect("spawning the store thread");
        Store { tx }
    }

    /// Applies `w` and waits until it is committed.
    pub async fn write(&self, w: Write) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Write(w, Some(tx)))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await
            .map_err(|_| StoreError::Closed)?
            .map_err(StoreError::Backend)
    }

    /// Queues `w` without waiting for the commit (still applied in order).
    pub async fn write_later(&self, w: Write) -> Result<(), StoreError> {
        self.tx
            .send(Cmd::Write(w, None))
            .await
            .map_err(|_| StoreError::Closed)
    }

    pub async fn registration(
        &self,
        address: Address,
    ) -> Result<Option<RegistrationRow>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Get(address, tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await
            .map_err(|_| StoreError::Closed)?
            .map_err(StoreError::Backend)
    }
}

fn flush(
    backend: &mut impl Backend,
    writes: &mut Vec<Write>,
    waiters: &mut Vec<oneshot::Sender<Result<(), String>>>,
) {
    if writes.is_empty() {
        return;
    }
    let result = backend.apply(writes).map_err(|e| {
        tracing::error!(error = %e, "store write failed");
        e.to_string()
    });
    writes.clear();
    for w in waiters.drain(..) {
        let _ = w.send(result.clone());
    }
}

/// The embedded default: one SQLite file in WAL mode.
pub struct SqliteBackend {
    conn: Connection,
}

const MIGRATIONS: &[&str] = &[
    // v1: the seed's registration table.
    "CREATE TABLE registrations (
        address       BLOB PRIMARY KEY,
        role          INTEGER NOT NULL,
        url           TEXT NOT NULL,
        sig_a         BLOB NOT NULL,
        sig_b         BLOB NOT NULL,
        sig_c         BLOB NOT NULL,
        first_seen_ms INTEGER NOT NULL,
        last_seen_ms  INTEGER NOT NULL,
        registrations INTEGER NOT NULL
    ) WITHOUT ROWID;",
];

impl SqliteBackend {
    /// Opens (creating if needed) `dir/w2w.sqlite` and migrates it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("w2w.sqlite");
        let conn = Connection::open(&path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Self::init(conn)
    }

    /// An in-memory database (tests, `data_dir = None`).
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version) {
            conn.execute_batch(m)?;
            conn.pragma_update(None, "user_version", i + 1)?;
        }
        Ok(SqliteBackend { conn })
    }
}

impl Backend for SqliteBackend {
    fn apply(&mut self, batch: &[Write]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut upsert = tx.prepare_cached(
                "INSERT INTO registrations
                   (address, role, url, sig_a, sig_b, sig_c, first_seen_ms, last_seen_ms, registrations)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, 1)
                 ON CONFLICT(address) DO UPDATE SET
                   role = ?2, url = ?3, sig_a = ?4, sig_b = ?5, sig_c = ?6,
                   last_seen_ms = ?7, registrations = registrations + 1",
            )?;
            let mut seen = tx.prepare_cached(
                "UPDATE registrations SET last_seen_ms = MAX(last_seen_ms, ?2) WHERE address = ?1",
            )?;
            for w in batch {
                match w {
                    Write::Registered { reg, at_ms } => {
                        upsert.execute(params![
                            &reg.address.0[..],
                            reg.role as u8,
                            reg.url,
                            &reg.sig_a[..],
                            &reg.sig_b[..],
                            &reg.sig_c[..],
                            *at_ms as i64,
                        ])?;
                    }
                    Write::Seen { address, at_ms } => {
                        seen.execute(params![&address.0[..], *at_ms as i64])?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn registration(&mut self, address: &Address) -> Result<Option<RegistrationRow>, StoreError> {
        let mut q = self.conn.prepare_cached(
            "SELECT role, url, sig_a, sig_b, sig_c, first_seen_ms, last_seen_ms, registrations
             FROM registrations WHERE address = ?1",
        )?;
        let row = q
            .query_row(params![&address.0[..]], |r| {
                let sig = |i: usize| -> rusqlite::Result<[u8; 64]> {
                    let v: Vec<u8> = r.get(i)?;
                    v.try_into().map_err(|_| {
                        rusqlite::Error::InvalidColumnType(
                            i,
                            "sig".into(),
                            rusqlite::types::Type::Blob,
                        )
                    })
                };
                Ok(RegistrationRow {
                    address: *address,
                    role: r.get(0)?,
                    url: r.get(1)?,
                    sig_a: sig(2)?,
                    sig_b: sig(3)?,
                    sig_c: sig(4)?,
                    first_seen_ms: r.get::<_, i64>(5)? as u64,
                    last_seen_ms: r.get::<_, i64>(6)? as u64,
                    registrations: r.get::<_, i64>(7)? as u64,
                })
            })
            .optional()?;
        Ok(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use w2w_proto::frame::Role;

    fn reg(seed: u8) -> Registration {
        Registration {
            role: Role::Client,
            address: Address([seed; 32]),
            url: "ws://127.0.0.1:1/".into(),
            timestamp_ms: 1,
            client_nonce: [0; 32],
            relay_nonce: [0; 32],
            relay_key: Address([0; 32]),
            sig_a: [1; 64],
            sig_b: [2; 64],
            sig_c: [3; 64],
        }
    }

    #[tokio::test]
    async fn registrations_persist_in_a_real_file() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::spawn(SqliteBackend::open(dir.path()).unwrap());
            store
                .write(Write::Registered {
                    reg: Box::new(reg(7)),
                    at_ms: 100,
                })
                .await
                .unwrap();
            store
                .write(Write::Registered {
                    reg: Box::new(reg(7)),
                    at_ms: 200,
                })
                .await
                .unwrap();
            store
                .write(Write::Seen {
                    address: Address([7; 32]),
                    at_ms: 300,
                })
                .await
                .unwrap();
        }
        // A fresh backend over the same file sees the committed rows.
        let mut b = SqliteBackend::open(dir.path()).unwrap();
        let row = b.registration(&Address([7; 32])).unwrap().unwrap();
        assert_eq!(row.first_seen_ms, 100);
        assert_eq!(row.last_seen_ms, 300);
        assert_eq!(row.registrations, 2);
        assert_eq!(row.sig_c, [3; 64]);
        assert!(b.registration(&Address([8; 32])).unwrap().is_none());
    }
}
