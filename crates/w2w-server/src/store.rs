//! Durable relay state behind a trait, with one writer thread.
//!
//! Connection actors never touch SQLite: they send a command over a bounded
//! channel to the store thread, which drains whatever is waiting and applies
//! it in one transaction (group commit), then answers each caller. The
//! store-and-forward queue and the registration table share this writer.
//!
//! Two lanes: a small **priority** lane for what a client is waiting on
//! (registrations, group changes, reads of a returning client's backlog)
//! and the **bulk** lane for queued messages. The thread always empties the
//! priority lane first, and a bulk transaction is capped in count and bytes,
//! so a registration waits for at most one bulk commit, never behind a
//! flood. What the bulk lane may hold is bounded in bytes by the
//! [`StoreBudget`] before anything is submitted.

use std::path::Path;

use std::sync::Arc;

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};
use w2w_proto::frame::MsgId;
use w2w_proto::handshake::Registration;
use w2w_proto::s2s::RegistrationProof;
use w2w_proto::Address;

use crate::budget::{StoreBudget, StoredUse};

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
    /// Applies a batch of writes in one durable transaction: one outcome
    /// per write, and every queued message the batch deleted.
    fn apply(&mut self, batch: &[Write]) -> Result<Applied, StoreError>;
    /// What the queue holds: (recipient, sender, messages, charged bytes).
    fn stored_use(&mut self) -> Result<Vec<StoredUse>, StoreError>;
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
    /// Every address that registered here and is not forgotten.
    fn known_addresses(&mut self) -> Result<Vec<Address>, StoreError>;
    /// Up to `limit` addresses with messages queued here that never
    /// registered here (kept in custody, PROTOCOL 12.13).
    fn custody_addresses(&mut self, limit: usize) -> Result<Vec<Address>, StoreError>;
    /// The latest registration proof of each of them (rows written before
    /// v6 have none).
    fn registration_proofs(&mut self) -> Result<Vec<RegistrationProof>, StoreError>;
    /// Up to `limit` client addresses last seen before `before_ms` with no
    /// message queued for them: candidates for [`Write::Forget`].
    fn forgettable(&mut self, before_ms: u64, limit: usize) -> Result<Vec<Address>, StoreError>;
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
    /// Enqueue: this message (same recipient, id and sender) is already
    /// stored; nothing new was written.
    AlreadyStored,
    /// Enqueue refused: the recipient already has a stored message with this
    /// id from another sender (ids are the sender's to choose, so a reused
    /// id must not replace or hide someone else's message).
    Duplicate,
}

/// What a batch did.
#[derive(Debug, Default)]
pub struct Applied {
    pub outcomes: Vec<Outcome>,
    /// Queued messages deleted: (sender, recipient, frame length).
    pub removed: Vec<(Address, Address, usize)>,
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
    /// recipient, message id and sender). Admitted by the [`StoreBudget`]
    /// first; the store thread settles the reservation.
    Enqueue {
        recipient: Address,
        sender: Address,
        id: MsgId,
        frame: Bytes,
        queued_ms: u64,
        expires_ms: u64,
    },
    /// The recipient acknowledged the message: delete it.
    Dequeue { recipient: Address, id: MsgId },
    /// Delete every message whose time to live has passed.
    Expire { now_ms: u64 },
    /// Forget a registration, if it was still last seen before `before_ms`
    /// and nothing is queued for it (then messages for the address are
    /// `no_route` here, as for one that never registered).
    Forget { address: Address, before_ms: u64 },
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
    Custody(usize, Reply<Vec<Address>>),
    Proofs(Reply<Vec<RegistrationProof>>),
    Forgettable(u64, usize, Reply<Vec<Address>>),
    Groups(Reply<Vec<GroupRow>>),
}

/// Async handle to the store thread. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    /// Queued messages and their deletions.
    bulk_tx: mpsc::Sender<Cmd>,
    /// What a client is waiting on: registrations, groups, reads.
    prio_tx: mpsc::Sender<Cmd>,
    budget: Arc<StoreBudget>,
    /// False while the latest write failed (e.g. a full disk).
    healthy: Arc<std::sync::atomic::AtomicBool>,
    /// How long each durable transaction took (`w2w_store_commit_seconds`).
    commits: Arc<crate::metrics::Histogram>,
}

/// Most commands applied in one transaction.
const MAX_BATCH: usize = 1024;
/// Most frame bytes in one bulk transaction: bounds how long a
/// priority command can wait behind a bulk commit.
const MAX_BATCH_BYTES: usize = 4 << 20;

impl Cmd {
    fn bytes(&self) -> usize {
        match self {
            Cmd::Write(Write::Enqueue { frame, .. }, _) => frame.len(),
            _ => 0,
        }
    }
}

impl Store {
    /// Starts the writer thread over `backend`, with the queue's budgets
    /// starting from what the backend already holds.
    pub fn spawn(
        mut backend: impl Backend,
        limits: crate::budget::BudgetLimits,
    ) -> Result<Store, StoreError> {
        let budget = Arc::new(StoreBudget::new(limits, backend.stored_use()?));
        let (bulk_tx, mut bulk_rx) = mpsc::channel::<Cmd>(8192);
        let (prio_tx, mut prio_rx) = mpsc::channel::<Cmd>(8192);
        let b = budget.clone();
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let h = healthy.clone();
        let commits = Arc::new(crate::metrics::Histogram::default());
        let c = commits.clone();
        std::thread::Builder::new()
            .name("w2w-store".into())
            .spawn(move || {
                // Only to wait on two channels at once; all work is blocking.
                let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else {
                    tracing::error!("store thread: no runtime; the store is stopped");
                    return;
                };
                let mut batch = Batch {
                    commits: c,
                    ..Batch::default()
                };
                loop {
                    let first = rt.block_on(async {
                        tokio::select! {
                            biased;
                            c = prio_rx.recv() => c.map(|c| (true, c)),
                            c = bulk_rx.recv() => c.map(|c| (false, c)),
                        }
                    });
                    let Some((prio, first)) = first else { break };
                    let (rx, limit_bytes) = if prio {
                        (&mut prio_rx, usize::MAX)
                    } else {
                        (&mut bulk_rx, MAX_BATCH_BYTES)
                    };
                    let mut next = Some(first);
                    let mut bytes = 0;
                    while let Some(cmd) = next.take() {
                        bytes += cmd.bytes();
                        batch.run(&mut backend, &b, cmd);
                        if batch.writes.len() < MAX_BATCH && bytes < limit_bytes {
                            next = rx.try_recv().ok();
                        }
                    }
                    batch.flush(&mut backend, &b);
                    h.store(!batch.failed, std::sync::atomic::Ordering::Relaxed);
                }
            })
            .map_err(|e| StoreError::Backend(format!("spawning the store thread: {e}")))?;
        Ok(Store {
            bulk_tx,
            prio_tx,
            budget,
            healthy,
            commits,
        })
    }

    /// How long the store's durable transactions take (each a group
    /// commit: with `synchronous=FULL`, its fsync).
    pub fn commit_seconds(&self) -> &crate::metrics::Histogram {
        &self.commits
    }

    /// Whether the latest write committed (false after a failed one, until
    /// one succeeds).
    pub fn healthy(&self) -> bool {
        self.healthy.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The queue's budgets (admission happens before [`Store::submit`]).
    pub fn budget(&self) -> &Arc<StoreBudget> {
        &self.budget
    }

    /// Hands `w` to the writer (bulk lane: writes apply in submission
    /// order) and returns a receiver for its outcome, resolved once it is
    /// committed.
    pub async fn submit(
        &self,
        w: Write,
    ) -> Result<oneshot::Receiver<Result<Outcome, String>>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.bulk_tx
            .send(Cmd::Write(w, Some(tx)))
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    /// Applies `w` and waits until it is durably committed (priority lane:
    /// for writes a client is waiting on).
    pub async fn write(&self, w: Write) -> Result<Outcome, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.prio_tx
            .send(Cmd::Write(w, Some(tx)))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await
            .map_err(|_| StoreError::Closed)?
            .map_err(StoreError::Backend)
    }

    /// Queues `w` without waiting for the commit (bulk lane, in order with
    /// the queued messages it may delete).
    pub async fn write_later(&self, w: Write) -> Result<(), StoreError> {
        self.bulk_tx
            .send(Cmd::Write(w, None))
            .await
            .map_err(|_| StoreError::Closed)
    }

    async fn ask<T>(&self, cmd: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.prio_tx
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

    /// See [`Backend::custody_addresses`].
    pub async fn custody_addresses(&self, limit: usize) -> Result<Vec<Address>, StoreError> {
        self.ask(|tx| Cmd::Custody(limit, tx)).await
    }

    /// The latest registration proof of each address that registered here.
    pub async fn registration_proofs(&self) -> Result<Vec<RegistrationProof>, StoreError> {
        self.ask(Cmd::Proofs).await
    }

    /// See [`Backend::forgettable`].
    pub async fn forgettable(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<Address>, StoreError> {
        self.ask(|tx| Cmd::Forgettable(before_ms, limit, tx)).await
    }

    /// Every group.
    pub async fn groups(&self) -> Result<Vec<GroupRow>, StoreError> {
        self.ask(Cmd::Groups).await
    }
}

/// Writes collected for one transaction and their waiters.
#[derive(Default)]
struct Batch {
    writes: Vec<Write>,
    waiters: Vec<Option<Reply<Outcome>>>,
    /// Whether the latest flush failed.
    failed: bool,
    commits: Arc<crate::metrics::Histogram>,
}

impl Batch {
    fn run(&mut self, backend: &mut impl Backend, budget: &StoreBudget, cmd: Cmd) {
        // Reads see every write collected before them.
        if !matches!(cmd, Cmd::Write(..)) {
            self.flush(backend, budget);
        }
        match cmd {
            Cmd::Write(w, reply) => {
                self.writes.push(w);
                self.waiters.push(reply);
            }
            Cmd::Get(addr, reply) => {
                let _ = reply.send(backend.registration(&addr).map_err(|e| e.to_string()));
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
                let _ = reply.send(backend.known_addresses().map_err(|e| e.to_string()));
            }
            Cmd::Custody(limit, reply) => {
                let _ = reply.send(backend.custody_addresses(limit).map_err(|e| e.to_string()));
            }
            Cmd::Proofs(reply) => {
                let _ = reply.send(backend.registration_proofs().map_err(|e| e.to_string()));
            }
            Cmd::Forgettable(before, limit, reply) => {
                let _ = reply.send(
                    backend
                        .forgettable(before, limit)
                        .map_err(|e| e.to_string()),
                );
            }
        }
    }

    /// Commits the collected writes, settles their budget reservations,
    /// and answers their waiters.
    fn flush(&mut self, backend: &mut impl Backend, budget: &StoreBudget) {
        if self.writes.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        let result = backend.apply(&self.writes).map_err(|e| {
            tracing::error!(error = %e, "store write failed");
            e.to_string()
        });
        self.commits.observe(started.elapsed());
        self.failed = result.is_err();
        for (i, w) in self.writes.iter().enumerate() {
            if let Write::Enqueue {
                recipient,
                sender,
                frame,
                ..
            } = w
            {
                match result.as_ref().map(|a| a.outcomes.get(i).copied()) {
                    Ok(Some(Outcome::Done)) => budget.committed(frame.len()),
                    _ => budget.released(sender, recipient, frame.len()),
                }
            }
        }
        if let Ok(applied) = &result {
            for (sender, recipient, len) in &applied.removed {
                budget.removed(sender, recipient, *len);
            }
        }
        self.writes.clear();
        for (i, w) in self.waiters.drain(..).enumerate() {
            if let Some(w) = w {
                let _ = w.send(match &result {
                    Ok(a) => Ok(a.outcomes.get(i).copied().unwrap_or(Outcome::Done)),
                    Err(e) => Err(e.clone()),
                });
            }
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
    // v4: who sent each queued message (per-sender disk budget; a reused
    // message id from another sender is refused, not taken as stored).
    "ALTER TABLE queue ADD COLUMN sender BLOB NOT NULL DEFAULT x'';",
    // v5: registrations by last seen, to forget the ones gone longer than
    // the queue's time to live without reading every row.
    "CREATE INDEX registrations_by_last_seen ON registrations (last_seen_ms);",
    // v6: the rest of each registration's proof (PROTOCOL 12.4), so a
    // restarted relay can publish its clients' directory records again.
    "ALTER TABLE registrations ADD COLUMN ts_ms INTEGER;
     ALTER TABLE registrations ADD COLUMN client_nonce BLOB;
     ALTER TABLE registrations ADD COLUMN relay_nonce BLOB;
     ALTER TABLE registrations ADD COLUMN relay_key BLOB;",
];

/// A stored sender or recipient column as an address (rows from before v4
/// have no sender: they count as the all-zero address).
fn address_of(v: Vec<u8>) -> Address {
    Address(<[u8; 32]>::try_from(v).unwrap_or([0; 32]))
}

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
    fn apply(&mut self, batch: &[Write]) -> Result<Applied, StoreError> {
        let tx = self.conn.transaction()?;
        let mut applied = Applied {
            outcomes: Vec::with_capacity(batch.len()),
            removed: Vec::new(),
        };
        {
            // Quotas are the budget's (checked in memory before a write is
            // submitted): nothing here counts rows.
            let mut existing =
                tx.prepare_cached("SELECT sender FROM queue WHERE recipient = ?1 AND msg_id = ?2")?;
            let mut enqueue = tx.prepare_cached(
                "INSERT INTO queue (recipient, msg_id, frame, queued_ms, expires_ms, sender)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            let mut dequeue = tx.prepare_cached(
                "DELETE FROM queue WHERE recipient = ?1 AND msg_id = ?2
                 RETURNING sender, length(frame)",
            )?;
            let mut expire = tx.prepare_cached(
                "DELETE FROM queue WHERE expires_ms <= ?1
                 RETURNING sender, recipient, length(frame)",
            )?;
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
                   (address, role, url, sig_a, sig_b, sig_c, first_seen_ms, last_seen_ms, registrations,
                    ts_ms, client_nonce, relay_nonce, relay_key)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, 1, ?8, ?9, ?10, ?11)
                 ON CONFLICT(address) DO UPDATE SET
                   role = ?2, url = ?3, sig_a = ?4, sig_b = ?5, sig_c = ?6,
                   last_seen_ms = ?7, registrations = registrations + 1,
                   ts_ms = ?8, client_nonce = ?9, relay_nonce = ?10, relay_key = ?11",
            )?;
            let mut seen = tx.prepare_cached(
                "UPDATE registrations SET last_seen_ms = MAX(last_seen_ms, ?2) WHERE address = ?1",
            )?;
            let mut forget = tx.prepare_cached(
                "DELETE FROM registrations WHERE address = ?1 AND last_seen_ms < ?2
                 AND NOT EXISTS (SELECT 1 FROM queue WHERE recipient = ?1)",
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
                            reg.timestamp_ms as i64,
                            &reg.client_nonce[..],
                            &reg.relay_nonce[..],
                            &reg.relay_key.0[..],
                        ])?;
                    }
                    Write::Seen { address, at_ms } => {
                        seen.execute(params![&address.0[..], *at_ms as i64])?;
                    }
                    Write::Forget { address, before_ms } => {
                        forget.execute(params![&address.0[..], *before_ms as i64])?;
                    }
                    Write::Enqueue {
                        recipient,
                        sender,
                        id,
                        frame,
                        queued_ms,
                        expires_ms,
                    } => {
                        // Idempotent for the same sender; a reused id from
                        // another sender is refused.
                        let prior: Option<Vec<u8>> = existing
                            .query_row(params![&recipient.0[..], &id.0[..]], |r| r.get(0))
                            .optional()?;
                        if let Some(prior) = prior {
                            let same = prior.is_empty() || prior == sender.0;
                            applied.outcomes.push(if same {
                                Outcome::AlreadyStored
                            } else {
                                Outcome::Duplicate
                            });
                            continue;
                        }
                        enqueue.execute(params![
                            &recipient.0[..],
                            &id.0[..],
                            &frame[..],
                            *queued_ms as i64,
                            *expires_ms as i64,
                            &sender.0[..],
                        ])?;
                    }
                    Write::Dequeue { recipient, id } => {
                        let rows = dequeue
                            .query_map(params![&recipient.0[..], &id.0[..]], |r| {
                                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?))
                            })?;
                        for row in rows {
                            let (sender, len) = row?;
                            applied
                                .removed
                                .push((address_of(sender), *recipient, len as usize));
                        }
                    }
                    Write::Expire { now_ms } => {
                        let rows = expire.query_map(params![*now_ms as i64], |r| {
                            Ok((
                                r.get::<_, Vec<u8>>(0)?,
                                r.get::<_, Vec<u8>>(1)?,
                                r.get::<_, i64>(2)?,
                            ))
                        })?;
                        for row in rows {
                            let (sender, recipient, len) = row?;
                            applied.removed.push((
                                address_of(sender),
                                address_of(recipient),
                                len as usize,
                            ));
                        }
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
                            prune_log.execute(params![
                                op.name,
                                oldest_kept.min(i64::MAX as u64) as i64
                            ])?;
                        }
                    }
                }
                applied.outcomes.push(Outcome::Done);
            }
        }
        tx.commit()?;
        Ok(applied)
    }

    fn stored_use(&mut self) -> Result<Vec<StoredUse>, StoreError> {
        let mut q = self.conn.prepare_cached(&format!(
            "SELECT recipient, sender, COUNT(*), SUM(MAX(length(frame), {}))
             FROM queue GROUP BY recipient, sender",
            crate::budget::MIN_CHARGE
        ))?;
        let rows = q.query_map([], |r| {
            Ok((
                address_of(r.get(0)?),
                address_of(r.get(1)?),
                r.get::<_, i64>(2)? as u64,
                r.get::<_, i64>(3)? as u64,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
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

    fn forgettable(&mut self, before_ms: u64, limit: usize) -> Result<Vec<Address>, StoreError> {
        let mut q = self.conn.prepare_cached(
            "SELECT address FROM registrations r WHERE role = 0 AND last_seen_ms < ?1
             AND NOT EXISTS (SELECT 1 FROM queue WHERE recipient = r.address) LIMIT ?2",
        )?;
        let rows = q.query_map(params![before_ms as i64, limit as i64], |r| {
            r.get::<_, Vec<u8>>(0)
        })?;
        let mut out = Vec::new();
        for row in rows {
            if let Ok(a) = <[u8; 32]>::try_from(row?) {
                out.push(Address(a));
            }
        }
        Ok(out)
    }

    fn registration_proofs(&mut self) -> Result<Vec<RegistrationProof>, StoreError> {
        let mut q = self.conn.prepare_cached(
            "SELECT address, relay_key, relay_nonce, client_nonce, ts_ms, url, sig_a
             FROM registrations WHERE ts_ms IS NOT NULL",
        )?;
        let rows = q.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, Vec<u8>>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, Vec<u8>>(6)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (a, k, rn, cn, ts, url, sig) = row?;
            let (Ok(a), Ok(k), Ok(rn), Ok(cn), Ok(sig)) = (
                <[u8; 32]>::try_from(a),
                <[u8; 32]>::try_from(k),
                <[u8; 32]>::try_from(rn),
                <[u8; 32]>::try_from(cn),
                <[u8; 64]>::try_from(sig),
            ) else {
                continue;
            };
            out.push(RegistrationProof {
                address: Address(a),
                relay_key: Address(k),
                relay_nonce: rn,
                client_nonce: cn,
                timestamp_ms: ts as u64,
                url,
                sig_a: sig,
            });
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

    fn custody_addresses(&mut self, limit: usize) -> Result<Vec<Address>, StoreError> {
        let mut q = self.conn.prepare_cached(
            "SELECT DISTINCT recipient FROM queue q
             WHERE NOT EXISTS (SELECT 1 FROM registrations r WHERE r.address = q.recipient)
             LIMIT ?1",
        )?;
        let rows = q.query_map(params![limit as i64], |r| r.get::<_, Vec<u8>>(0))?;
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

    fn budget(quota: u64) -> crate::budget::BudgetLimits {
        crate::budget::BudgetLimits {
            pending_bytes: 1 << 20,
            max_bytes: 1 << 30,
            sender_bytes: 1 << 30,
            recipient_messages: quota,
            recipient_bytes: 1 << 30,
        }
    }

    #[tokio::test]
    async fn each_durable_transaction_is_timed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::spawn(SqliteBackend::open(dir.path()).unwrap(), budget(3)).unwrap();
        assert_eq!(store.commit_seconds().count(), 0);
        for i in 1..=3 {
            let reg = Box::new(reg(i));
            store
                .write(Write::Registered { reg, at_ms: 100 })
                .await
                .unwrap();
        }
        // Each write was awaited before the next: three transactions.
        assert_eq!(store.commit_seconds().count(), 3);
        // Reads are not transactions of the queue.
        store.registration_proofs().await.unwrap();
        assert_eq!(store.commit_seconds().count(), 3);
    }

    #[tokio::test]
    async fn the_latest_registration_proof_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::spawn(SqliteBackend::open(dir.path()).unwrap(), budget(3)).unwrap();
        for ts in [5u64, 7] {
            let mut r = reg(1);
            r.timestamp_ms = ts;
            r.client_nonce = [ts as u8; 32];
            r.relay_nonce = [9; 32];
            r.relay_key = Address([8; 32]);
            store
                .write(Write::Registered {
                    reg: Box::new(r),
                    at_ms: 100,
                })
                .await
                .unwrap();
        }
        drop(store);
        let store = Store::spawn(SqliteBackend::open(dir.path()).unwrap(), budget(3)).unwrap();
        let proofs = store.registration_proofs().await.unwrap();
        assert_eq!(proofs.len(), 1);
        let p = &proofs[0];
        assert_eq!(
            (p.address, p.relay_key),
            (Address([1; 32]), Address([8; 32]))
        );
        assert_eq!(
            (p.timestamp_ms, p.client_nonce, p.relay_nonce),
            (7, [7; 32], [9; 32])
        );
        assert_eq!((p.url.as_str(), p.sig_a), ("ws://127.0.0.1:1/", [1; 64]));
    }

    #[tokio::test]
    async fn registrations_gone_long_with_nothing_queued_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::spawn(SqliteBackend::open(dir.path()).unwrap(), budget(3)).unwrap();
        for (b, at) in [(1u8, 100u64), (2, 100), (3, 900)] {
            store
                .write(Write::Registered {
                    reg: Box::new(reg(b)),
                    at_ms: at,
                })
                .await
                .unwrap();
        }
        // 2 has a message waiting: kept while it waits.
        store
            .budget()
            .admit(&Address([9; 32]), &[Address([2; 32])], 10);
        store
            .write(Write::Enqueue {
                recipient: Address([2; 32]),
                sender: Address([9; 32]),
                id: MsgId([1; 16]),
                frame: Bytes::from_static(b"0123456789"),
                queued_ms: 100,
                expires_ms: 10_000,
            })
            .await
            .unwrap();
        let gone = store.forgettable(500, 100).await.unwrap();
        assert_eq!(gone, vec![Address([1; 32])]);
        // Seen again after the list was made: not forgotten.
        store
            .write(Write::Seen {
                address: Address([1; 32]),
                at_ms: 600,
            })
            .await
            .unwrap();
        store
            .write(Write::Forget {
                address: Address([1; 32]),
                before_ms: 500,
            })
            .await
            .unwrap();
        assert_eq!(store.known_addresses().await.unwrap().len(), 3);
        store
            .write(Write::Forget {
                address: Address([1; 32]),
                before_ms: 700,
            })
            .await
            .unwrap();
        let mut known = store.known_addresses().await.unwrap();
        known.sort_by_key(|a| a.0);
        assert_eq!(known, vec![Address([2; 32]), Address([3; 32])]);
    }

    #[tokio::test]
    async fn registrations_persist_in_a_real_file() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::spawn(SqliteBackend::open(dir.path()).unwrap(), budget(3)).unwrap();
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
    async fn queue_is_ordered_idempotent_settles_its_budget_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::spawn(SqliteBackend::open(dir.path()).unwrap(), budget(3)).unwrap();
        let (alice, bob, mallory) = (Address([1; 32]), Address([2; 32]), Address([9; 32]));
        let enq = |i: u8, sender: Address, expires_ms: u64| Write::Enqueue {
            recipient: bob,
            sender,
            id: MsgId([i; 16]),
            frame: Bytes::from(vec![i; 10]),
            queued_ms: 1,
            expires_ms,
        };
        // Admission is the budget's; the store thread settles it.
        let admit = |n: usize| {
            let r = store.budget().admit(&alice, &vec![bob; n], 10);
            assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
        };
        let far = u64::MAX / 4;
        admit(3);
        for i in 1..=3 {
            assert_eq!(
                store.write(enq(i, alice, far)).await.unwrap(),
                Outcome::Done
            );
        }
        assert_eq!(
            store.budget().admit(&alice, &[bob], 10),
            vec![Err(w2w_proto::ErrorCode::QueueFull)]
        );
        // Same message again: already stored, stored once, reservation back.
        store.budget().released(&alice, &bob, 10);
        admit(1);
        assert_eq!(
            store.write(enq(1, alice, far)).await.unwrap(),
            Outcome::AlreadyStored
        );
        // The same id from someone else is refused, not taken as stored.
        store.budget().released(&alice, &bob, 10);
        assert_eq!(
            store.write(enq(1, mallory, far)).await.unwrap(),
            Outcome::Duplicate
        );
        let q = store.queued(bob, 0, 10).await.unwrap();
        assert_eq!(
            q.iter().map(|m| m.id.0[0]).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(&q[0].frame[..], &[1; 10], "alice's copy, not mallory's");
        assert_eq!(store.budget().totals(), (0, 3 * crate::budget::MIN_CHARGE));
        store
            .write(Write::Dequeue {
                recipient: bob,
                id: MsgId([2; 16]),
            })
            .await
            .unwrap();
        assert_eq!(store.budget().totals(), (0, 2 * crate::budget::MIN_CHARGE));
        let q = store.queued(bob, q[0].seq, 10).await.unwrap();
        assert_eq!(q.iter().map(|m| m.id.0[0]).collect::<Vec<_>>(), vec![3]);
        admit(1);
        store.write(enq(5, alice, 10)).await.unwrap();
        store.write(Write::Expire { now_ms: 20 }).await.unwrap();
        assert_eq!(store.queued(bob, 0, 10).await.unwrap().len(), 2);
        assert_eq!(store.budget().totals(), (0, 2 * crate::budget::MIN_CHARGE));
        // The figures are loaded again after a restart.
        drop(store);
        let mut b = SqliteBackend::open(dir.path()).unwrap();
        assert_eq!(
            b.stored_use().unwrap(),
            vec![(bob, alice, 2, 2 * crate::budget::MIN_CHARGE)]
        );
    }
}
