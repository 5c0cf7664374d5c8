//! Durable relay state behind a trait, with one writer thread.
//!
//! Connection actors never touch SQLite: they send a command over a bounded
//! channel to the store thread, which drains whatever is waiting and applies
//! it in one transaction (group commit), then answers each caller. The
//! store-and-forward queue and the registration table share this writer.

use std::path::Path;

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};
use w2w_proto::frame::MsgId;
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
    /// Applies a batch of writes in one durable transaction; one outcome
    /// per write.
    fn apply(&mut self, batch: &[Write]) -> Result<Vec<Outcome>, StoreError>;
    fn registration(&mut self, address: &Address) -> Result<Option<RegistrationRow>, StoreError>;
    /// Up to `limit` unexpired queued messages for `recipient`, oldest
    /// first, after sequence number `after`.
    fn queued(
        &mut self,
        recipient: &Address,
        after: i64,
        limit: usize,
        now_ms: u64,
    ) -> Result<Vec<QueuedMsg>, StoreError>;
    /// Every address that ever registered here.
    fn known_addresses(&mut self) -> Result<Vec<Address>, StoreError>;
    /// Every group: (name, owner, seq, members).
    fn groups(&mut self) -> Result<Vec<GroupRow>, StoreError>;
}

/// A stored group: (name, owner, seq, members with admin flags).
pub type GroupRow = (String, Address, u64, Vec<(Address, bool)>);

/// A stored message waiting for its recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMsg {
    pub seq: i64,
    pub id: MsgId,
    pub frame: Bytes,
}

/// What one write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// Enqueue refused: the recipient's queue is at its quota.
    QueueFull,
}

/// A write command.
#[derive(Debug, Clone)]
pub enum Write {
    /// Upsert a completed registration: sets sigs and last seen, keeps
    /// first seen, counts registrations.
    Registered { reg: Box<Registration>, at_ms: u64 },
    /// The address disconnected at this time.
    Seen { address: Address, at_ms: u64 },
    /// Store a MSG frame for an offline recipient (idempotent per
    /// recipient and message id).
    Enqueue {
        recipient: Address,
        id: MsgId,
        frame: Bytes,
        queued_ms: u64,
        expires_ms: u64,
        quota: usize,
    },
    /// The recipient acknowledged the message: delete it.
    Dequeue { recipient: Address, id: MsgId },
    /// Delete every message whose time to live has passed.
    Expire { now_ms: u64 },
    /// A group's new state and the signed operation that made it.
    Group {
        op: Box<w2w_proto::group::GroupOp>,
        owner: Address,
        seq: u64,
        members: Vec<(Address, bool)>,
        /// Operations of the log to keep (the newest); older are deleted.
        keep_log: u64,
    },
}

type Reply<T> = oneshot::Sender<Result<T, String>>;

enum Cmd {
    Write(Write, Option<Reply<Outcome>>),
    Get(Address, Reply<Option<RegistrationRow>>),
    Queued(Address, i64, usize, Reply<Vec<QueuedMsg>>),
    Known(Reply<Vec<Address>>),
    Groups(Reply<Vec<GroupRow>>),
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
                        // Reads see every write queued before them.
                        if !matches!(cmd, Cmd::Write(..)) {
                            flush(&mut backend, &mut writes, &mut waiters);
                        }
                        match cmd {
                            Cmd::Write(w, reply) => {
                                writes.push(w);
                                waiters.push(reply);
                            }
                            Cmd::Get(addr, reply) => {
                                let _ = reply
                                    .send(backend.registration(&addr).map_err(|e| e.to_string()));
                            }
                            Cmd::Queued(addr, after, limit, reply) => {
                                let _ = reply.send(
                                    backend
                                        .queued(&addr, after, limit, crate::unix_ms())
                                        .map_err(|e| e.to_string()),
                                );
                            }
                            Cmd::Groups(reply) => {
                                let _ = reply.send(backend.groups().map_err(|e| e.to_string()));
                            }
                            Cmd::Known(reply) => {
                                let _ = reply
                                    .send(backend.known_addresses().map_err(|e| e.to_string()));
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

    /// Hands `w` to the writer (writes apply in submission order) and
    /// returns a receiver for its outcome, resolved once it is committed.
    pub async fn submit(
        &self,
        w: Write,
    ) -> Result<oneshot::Receiver<Result<Outcome, String>>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Write(w, Some(tx)))
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    /// Applies `w` and waits until it is durably committed.
    pub async fn write(&self, w: Write) -> Result<Outcome, StoreError> {
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

    async fn ask<T>(&self, cmd: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(cmd(tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await
            .map_err(|_| StoreError::Closed)?
            .map_err(StoreError::Backend)
    }

    pub async fn registration(
        &self,
        address: Address,
    ) -> Result<Option<RegistrationRow>, StoreError> {
        self.ask(|tx| Cmd::Get(address, tx)).await
    }

    /// Up to `limit` queued messages for `recipient` after `after`.
    pub async fn queued(
        &self,
        recipient: Address,
        after: i64,
        limit: usize,
    ) -> Result<Vec<QueuedMsg>, StoreError> {
        self.ask(|tx| Cmd::Queued(recipient, after, limit, tx))
            .await
    }

    /// Every address that ever registered here.
    pub async fn known_addresses(&self) -> Result<Vec<Address>, StoreError> {
        self.ask(Cmd::Known).await
    }

    /// Every group.
    pub async fn groups(&self) -> Result<Vec<GroupRow>, StoreError> {
        self.ask(Cmd::Groups).await
    }
}

fn flush(
    backend: &mut impl Backend,
    writes: &mut Vec<Write>,
    waiters: &mut Vec<Option<Reply<Outcome>>>,
) {
    if writes.is_empty() {
        return;
    }
    let result = backend.apply(writes).map_err(|e| {
        tracing::error!(error = %e, "store write failed");
        e.to_string()
    });
    writes.clear();
    for (i, w) in waiters.drain(..).enumerate() {
        if let Some(w) = w {
            let _ = w.send(match &result {
                Ok(outcomes) => Ok(outcomes.get(i).copied().unwrap_or(Outcome::Done)),
                Err(e) => Err(e.clone()),
            });
        }
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
    // v2: store-and-forward queue, in send order per recipient.
    "CREATE TABLE queue (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        recipient  BLOB NOT NULL,
        msg_id     BLOB NOT NULL,
        frame      BLOB NOT NULL,
        queued_ms  INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL,
        UNIQUE (recipient, msg_id)
    );
    CREATE INDEX queue_by_recipient ON queue (recipient, seq);
    CREATE INDEX queue_by_expiry ON queue (expires_ms);",
    // v3: named groups, their members, and the signed log of changes.
    "CREATE TABLE groups (
        name    TEXT PRIMARY KEY,
        owner   BLOB NOT NULL,
        seq     INTEGER NOT NULL,
        members BLOB NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE group_ops (
        name   TEXT NOT NULL,
        seq    INTEGER NOT NULL,
        actor  BLOB NOT NULL,
        action BLOB NOT NULL,
        sig    BLOB NOT NULL,
        PRIMARY KEY (name, seq)
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
        // FULL: a commit is on disk before the relay answers "queued".
        conn.pragma_update(None, "synchronous", "FULL")?;
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
    fn apply(&mut self, batch: &[Write]) -> Result<Vec<Outcome>, StoreError> {
        let tx = self.conn.transaction()?;
        let mut outcomes = Vec::with_capacity(batch.len());
        {
            let mut count = tx.prepare_cached("SELECT COUNT(*) FROM queue WHERE recipient = ?1")?;
            let mut exists =
                tx.prepare_cached("SELECT 1 FROM queue WHERE recipient = ?1 AND msg_id = ?2")?;
            let mut enqueue = tx.prepare_cached(
                "INSERT OR IGNORE INTO queue (recipient, msg_id, frame, queued_ms, expires_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut dequeue =
                tx.prepare_cached("DELETE FROM queue WHERE recipient = ?1 AND msg_id = ?2")?;
            let mut expire = tx.prepare_cached("DELETE FROM queue WHERE expires_ms <= ?1")?;
            let mut group = tx.prepare_cached(
                "INSERT INTO groups (name, owner, seq, members) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name) DO UPDATE SET owner = ?2, seq = ?3, members = ?4",
            )?;
            let mut group_op = tx.prepare_cached(
                "INSERT OR REPLACE INTO group_ops (name, seq, actor, action, sig) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut prune_log =
                tx.prepare_cached("DELETE FROM group_ops WHERE name = ?1 AND seq <= ?2")?;
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
                    Write::Enqueue {
                        recipient,
                        id,
                        frame,
                        queued_ms,
                        expires_ms,
                        quota,
                    } => {
                        // Idempotent: the same message again is already stored.
                        if exists.exists(params![&recipient.0[..], &id.0[..]])? {
                            outcomes.push(Outcome::Done);
                            continue;
                        }
                        let n: i64 = count.query_row(params![&recipient.0[..]], |r| r.get(0))?;
                        if n as usize >= *quota {
                            outcomes.push(Outcome::QueueFull);
                            continue;
                        }
                        enqueue.execute(params![
                            &recipient.0[..],
                            &id.0[..],
                            &frame[..],
                            *queued_ms as i64,
                            *expires_ms as i64
                        ])?;
                    }
                    Write::Dequeue { recipient, id } => {
                        dequeue.execute(params![&recipient.0[..], &id.0[..]])?;
                    }
                    Write::Expire { now_ms } => {
                        expire.execute(params![*now_ms as i64])?;
                    }
                    Write::Group {
                        op,
                        owner,
                        seq,
                        members,
                        keep_log,
                    } => {
                        let blob: Vec<u8> = members
                            .iter()
                            .flat_map(|(a, admin)| a.0.iter().copied().chain([*admin as u8]))
                            .collect();
                        group.execute(params![op.name, &owner.0[..], *seq as i64, blob])?;
                        // The signed operation, exactly as signed, so the
                        // log can be re-verified.
                        let action = op.action.to_bytes();
                        group_op.execute(params![
                            op.name,
                            op.seq as i64,
                            &op.actor.0[..],
                            action,
                            &op.sig[..]
                        ])?;
                        // The log is bounded: the newest `keep_log` stay.
                        let oldest_kept = op.seq.saturating_sub(*keep_log);
                        if oldest_kept > 0 {
                            prune_log.execute(params![op.name, oldest_kept.min(i64::MAX as u64) as i64])?;
                        }
                    }
                }
                outcomes.push(Outcome::Done);
            }
        }
        tx.commit()?;
        Ok(outcomes)
    }

    fn queued(
        &mut self,
        recipient: &Address,
        after: i64,
        limit: usize,
        now_ms: u64,
    ) -> Result<Vec<QueuedMsg>, StoreError> {
        let mut q = self.conn.prepare_cached(
            "SELECT seq, msg_id, frame FROM queue
             WHERE recipient = ?1 AND seq > ?2 AND expires_ms > ?3
             ORDER BY seq LIMIT ?4",
        )?;
        let rows = q.query_map(
            params![&recipient.0[..], after, now_ms as i64, limit as i64],
            |r| {
                let id: Vec<u8> = r.get(1)?;
                let frame: Vec<u8> = r.get(2)?;
                Ok((r.get::<_, i64>(0)?, id, frame))
            },
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, id, frame) = row?;
            let Ok(id) = <[u8; 16]>::try_from(id) else {
                continue;
            };
            out.push(QueuedMsg {
                seq,
                id: MsgId(id),
                frame: Bytes::from(frame),
            });
        }
        Ok(out)
    }

    fn groups(&mut self) -> Result<Vec<GroupRow>, StoreError> {
        let mut q = self
            .conn
            .prepare_cached("SELECT name, owner, seq, members FROM groups")?;
        let rows = q.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Vec<u8>>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, owner, seq, blob) = row?;
            let Ok(owner) = <[u8; 32]>::try_from(owner) else {
                continue;
            };
            let members = blob
                .chunks_exact(33)
                .filter_map(|c| Some((Address(c[..32].try_into().ok()?), c[32] != 0)))
                .collect();
            out.push((name, Address(owner), seq as u64, members));
        }
        Ok(out)
    }

    fn known_addresses(&mut self) -> Result<Vec<Address>, StoreError> {
        let mut q = self
            .conn
            .prepare_cached("SELECT address FROM registrations")?;
        let rows = q.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for row in rows {
            if let Ok(a) = <[u8; 32]>::try_from(row?) {
                out.push(Address(a));
            }
        }
        Ok(out)
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

    #[tokio::test]
    async fn queue_is_ordered_bounded_idempotent_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::spawn(SqliteBackend::open(dir.path()).unwrap());
        let bob = Address([2; 32]);
        let enq = |i: u8, expires_ms: u64| Write::Enqueue {
            recipient: bob,
            id: MsgId([i; 16]),
            frame: Bytes::from(vec![i; 10]),
            queued_ms: 1,
            expires_ms,
            quota: 3,
        };
        let far = u64::MAX / 4;
        for i in 1..=3 {
            assert_eq!(store.write(enq(i, far)).await.unwrap(), Outcome::Done);
        }
        assert_eq!(store.write(enq(4, far)).await.unwrap(), Outcome::QueueFull);
        // Same message again: accepted (already stored), stored once.
        assert_eq!(store.write(enq(1, far)).await.unwrap(), Outcome::Done);
        let q = store.queued(bob, 0, 10).await.unwrap();
        assert_eq!(
            q.iter().map(|m| m.id.0[0]).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        store
            .write(Write::Dequeue {
                recipient: bob,
                id: MsgId([2; 16]),
            })
            .await
            .unwrap();
        let q = store.queued(bob, q[0].seq, 10).await.unwrap();
        assert_eq!(q.iter().map(|m| m.id.0[0]).collect::<Vec<_>>(), vec![3]);
        store.write(enq(5, 10)).await.unwrap();
        store.write(Write::Expire { now_ms: 20 }).await.unwrap();
        assert_eq!(store.queued(bob, 0, 10).await.unwrap().len(), 2);
    }
}
