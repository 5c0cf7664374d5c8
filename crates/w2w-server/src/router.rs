//! Who is connected, and each connection's send queue.
//!
//! Each connection has an [`Outbox`], a byte-bounded queue drained by that
//! connection's own actor; the core's frames are put there without ever
//! awaiting. A connection whose queue is over its byte bound is a slow
//! consumer: the frame is not queued and the connection is told to close
//! (counted in metrics); the core then writes what it had handed over
//! unacknowledged. The [`Router`] lists who is connected (ONLINE, presence
//! notices): an address may hold several sessions (PROTOCOL 7.7).

/// aHash, keyed per process (see `federation`).
type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::sync::Notify;
use w2w_proto::frame::{Notice, Receipt, RelayToClient, Status};
use w2w_proto::{Address, ErrorCode};

use crate::metrics::Metrics;

/// Why a frame could not be queued for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnqueueError {
    /// The queue is over its byte bound; the connection is being closed.
    SlowConsumer,
    /// The connection is gone.
    Closed,
}

/// One connection's send queue, shared with the router; its writer takes
/// frames through the [`OutboxRx`].
pub struct Outbox {
    pub address: Address,
    pub conn_id: u64,
    /// The frames (no memory while empty: an idle connection holds none).
    frames: Mutex<VecDeque<Bytes>>,
    /// The writer's task, woken when a frame is queued (one atomic swap
    /// per frame; a `Notify` would take its own mutex).
    pushed: AtomicWaker,
    /// The writer (its [`OutboxRx`]) is gone.
    rx_gone: AtomicBool,
    queued: AtomicUsize,
    max_bytes: usize,
    close_code: AtomicU16,
    close: Notify,
    /// Whether this connection asked for join/leave notices.
    pub presence: AtomicBool,
    /// Woken when frames leave the queue (see [`Outbox::room_below`]),
    /// only while someone waits for room (`room_waiters`): waking a
    /// `Notify` takes its mutex, and the writer dequeues on every batch.
    room: Notify,
    room_waiters: AtomicUsize,
    metrics: Arc<Metrics>,
}

impl Outbox {
    pub fn new(
        address: Address,
        conn_id: u64,
        max_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> (Arc<Outbox>, OutboxRx) {
        let o = Arc::new(Outbox {
            address,
            conn_id,
            frames: Mutex::new(VecDeque::new()),
            pushed: AtomicWaker::new(),
            rx_gone: AtomicBool::new(false),
            queued: AtomicUsize::new(0),
            max_bytes,
            close_code: AtomicU16::new(0),
            close: Notify::new(),
            presence: AtomicBool::new(false),
            room: Notify::new(),
            room_waiters: AtomicUsize::new(0),
            metrics,
        });
        (o.clone(), OutboxRx(o))
    }

    fn frames(&self) -> std::sync::MutexGuard<'_, VecDeque<Bytes>> {
        self.frames.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame unless that would put the queue over its byte bound.
    pub fn try_enqueue(&self, frame: Bytes) -> Result<(), EnqueueError> {
        if self.close_code.load(Ordering::Relaxed) != 0 {
            return Err(EnqueueError::Closed);
        }
        let len = frame.len();
        let before = self.queued.fetch_add(len, Ordering::Relaxed);
        if before + len > self.max_bytes {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            // Counted once, when the connection is closed with this code.
            self.close(ErrorCode::SlowConsumer);
            return Err(EnqueueError::SlowConsumer);
        }
        self.metrics
            .queued_bytes
            .fetch_add(len as i64, Ordering::Relaxed);
        if self.rx_gone.load(Ordering::Acquire) {
            self.dequeued(len);
            return Err(EnqueueError::Closed);
        }
        self.frames().push_back(frame);
        self.pushed.wake();
        Ok(())
    }

    /// Queues a best-effort frame (broadcast, presence notice) only if the
    /// queue is under half its bound: a receiver that is behind misses it
    /// instead of being closed as a slow consumer, so one sender's large
    /// broadcasts cannot disconnect everyone. `false`: skipped or closed.
    pub fn try_enqueue_soft(&self, frame: Bytes) -> bool {
        if self.queued.load(Ordering::Relaxed) + frame.len() > self.max_bytes / 2 {
            self.metrics
                .broadcast_skipped
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.try_enqueue(frame).is_ok()
    }

    /// Called by the connection actor once frames of `len` bytes in all
    /// have been taken from the queue to be written.
    pub fn dequeued(&self, len: usize) {
        // SeqCst with `room_below`'s count and load: either it sees the
        // queue shrunk or this sees it waiting.
        self.queued.fetch_sub(len, Ordering::SeqCst);
        self.metrics
            .queued_bytes
            .fetch_sub(len as i64, Ordering::Relaxed);
        if self.room_waiters.load(Ordering::SeqCst) > 0 {
            self.room.notify_waiters();
        }
    }

    /// The queue's bound in bytes.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Resolves once the queue holds at most `bytes` (or the connection is
    /// closing), woken by the writer rather than polled.
    pub async fn room_below(&self, bytes: usize) {
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.room_waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.room_waiters);
        loop {
            // (Made before the check: a `notify_waiters` after it wakes it.)
            let woken = self.room.notified();
            if self.queued.load(Ordering::SeqCst) <= bytes || self.is_closing() {
                return;
            }
            tokio::select! {
                _ = woken => {}
                _ = self.closed() => return,
            }
        }
    }

    /// Whether the connection has been asked to close.
    pub fn is_closing(&self) -> bool {
        self.close_code.load(Ordering::Relaxed) != 0 || self.rx_gone.load(Ordering::Acquire)
    }

    /// The code the connection was asked to close with, if any.
    pub fn close_code(&self) -> Option<ErrorCode> {
        ErrorCode::from_u16(self.close_code.load(Ordering::Acquire))
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Asks the connection to close with `code`. The first code wins.
    pub fn close(&self, code: ErrorCode) {
        if self
            .close_code
            .compare_exchange(0, code.as_u16(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.close.notify_one();
        }
    }

    /// Resolves once [`Outbox::close`] was called; returns the code.
    pub async fn closed(&self) -> ErrorCode {
        loop {
            if let Some(c) = ErrorCode::from_u16(self.close_code.load(Ordering::Acquire)) {
                return c;
            }
            self.close.notified().await;
        }
    }
}

/// The writer's end of an [`Outbox`] (one per connection, owned by its
/// actor); dropping it refuses further frames.
pub struct OutboxRx(Arc<Outbox>);

impl OutboxRx {
    /// The next queued frame, waiting for one (`None` never comes: the
    /// `Option` lets `select!` patterns match it).
    pub async fn recv(&mut self) -> Option<Bytes> {
        std::future::poll_fn(|cx| {
            if let Some(f) = self.try_recv() {
                return std::task::Poll::Ready(Some(f));
            }
            self.0.pushed.register(cx.waker());
            // A frame queued between the first check and the registration
            // woke no one: look again.
            match self.try_recv() {
                Some(f) => std::task::Poll::Ready(Some(f)),
                None => std::task::Poll::Pending,
            }
        })
        .await
    }

    /// A queued frame, if any. The queue's memory is given back once it is
    /// empty.
    pub fn try_recv(&mut self) -> Option<Bytes> {
        let mut q = self.0.frames();
        let f = q.pop_front();
        if q.is_empty() && q.capacity() > 0 {
            *q = VecDeque::new();
        }
        f
    }
}

impl Drop for OutboxRx {
    fn drop(&mut self) {
        self.0.rx_gone.store(true, Ordering::Release);
        // Frames never written are dropped now, not with the last `Arc`.
        drop(std::mem::take(&mut *self.0.frames()));
    }
}

/// The table of registered connections on this relay.
pub struct Router {
    inner: RwLock<Sessions>,
}

/// Every address's sessions, and how many take deliveries.
#[derive(Default)]
struct Sessions {
    /// Per address: its sessions, oldest first, each with whether it
    /// takes deliveries (false: send-only).
    by_address: HashMap<Address, Vec<(Arc<Outbox>, bool)>>,
    receivers: usize,
}

impl Sessions {
    fn receiving(&self, addr: &Address) -> bool {
        self.by_address
            .get(addr)
            .is_some_and(|v| v.iter().any(|(_, r)| *r))
    }
}

impl Default for Router {
    fn default() -> Self {
        Router::new()
    }
}

impl Router {
    pub fn new() -> Self {
        Router {
            inner: RwLock::new(Sessions::default()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Sessions> {
        // A panic elsewhere must not take routing down with it.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Sessions> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a session (`receive` false: send-only). The address's
    /// first receiving session is announced as a join.
    pub fn insert(&self, outbox: Arc<Outbox>, receive: bool) {
        let addr = outbox.address;
        let joined = {
            let mut s = self.write();
            let was = s.receiving(&addr);
            s.by_address
                .entry(addr)
                .or_default()
                .push((outbox, receive));
            if receive {
                s.receivers += 1;
            }
            receive && !was
        };
        if joined {
            self.presence(Notice::Join(addr), &addr);
        }
    }

    /// Removes a session; the address's last receiving session leaving is
    /// announced. False if it was not registered.
    pub fn remove(&self, outbox: &Outbox) -> bool {
        let addr = outbox.address;
        let (removed, left) = {
            let mut s = self.write();
            let Some(v) = s.by_address.get_mut(&addr) else {
                return false;
            };
            let Some(i) = v.iter().position(|(o, _)| o.conn_id == outbox.conn_id) else {
                return false;
            };
            let (_, receive) = v.remove(i);
            if v.is_empty() {
                s.by_address.remove(&addr);
            }
            if receive {
                s.receivers -= 1;
            }
            (true, receive && !s.receiving(&addr))
        };
        if left {
            self.presence(Notice::Leave(addr), &addr);
        }
        removed
    }

    /// Whether `addr` has a session here (receiving or send-only).
    pub fn contains(&self, addr: &Address) -> bool {
        self.read().by_address.contains_key(addr)
    }

    /// Whether `addr` has a session here that takes deliveries.
    pub fn receiving(&self, addr: &Address) -> bool {
        self.read().receiving(addr)
    }

    /// Sessions that take deliveries (what an a2n here reaches).
    pub fn len(&self) -> usize {
        self.read().receivers
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Page of online addresses (with a receiving session) in byte
    /// order, and the total.
    pub fn online(&self, offset: u32, limit: u16) -> (u32, Vec<Address>) {
        let mut all: Vec<Address> = {
            let s = self.read();
            s.by_address
                .iter()
                .filter(|(_, v)| v.iter().any(|(_, r)| *r))
                .map(|(a, _)| *a)
                .collect()
        };
        all.sort_unstable();
        let total = all.len() as u32;
        let page = all
            .into_iter()
            .skip(offset as usize)
            .take(limit as usize)
            .collect();
        (total, page)
    }

    /// Sends a join/leave notice to every connection that asked, except the
    /// subject's own.
    fn presence(&self, notice: Notice, subject: &Address) {
        let frame = RelayToClient::Notice(notice).encode();
        for v in self.read().by_address.values() {
            for (o, _) in v {
                if o.presence.load(Ordering::Relaxed) && &o.address != subject {
                    o.try_enqueue_soft(frame.clone());
                }
            }
        }
    }
}

/// A rejected receipt, counted.
pub fn reject(mut receipt: Receipt, code: ErrorCode, metrics: &Metrics) -> Receipt {
    metrics.error(code);
    receipt.status = Status::Rejected;
    receipt.reason = code.as_u16();
    receipt.delivered = 0;
    receipt.entries.clear();
    receipt
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_soft_frame_skips_a_receiver_that_is_behind_and_never_closes_it() {
        let m = Arc::new(Metrics::default());
        let (slow, _srx) = outbox(1, 1, 100, &m);
        let (fast, _frx) = outbox(2, 2, 100, &m);
        assert!(slow.try_enqueue(Bytes::from_static(&[0; 40])).is_ok());
        // 40 + 20 > 100 / 2: the slow one is skipped, the fast one served.
        let f = Bytes::from_static(&[1; 20]);
        assert!(!slow.try_enqueue_soft(f.clone()));
        assert!(fast.try_enqueue_soft(f));
        assert_eq!(fast.queued_bytes(), 20);
        assert_eq!(slow.queued_bytes(), 40);
        assert_eq!(slow.close_code(), None, "skipped, not closed");
        assert_eq!(m.broadcast_skipped.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn room_below_waits_for_the_writer_not_a_timer() {
        let m = Arc::new(Metrics::default());
        let (o, mut rx) = outbox(1, 1, 100, &m);
        o.try_enqueue(Bytes::from_static(&[0; 80])).unwrap();
        let waiter = {
            let o = o.clone();
            tokio::spawn(async move { o.room_below(50).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "80 bytes queued: no room yet");
        let f = rx.recv().await.unwrap();
        o.dequeued(f.len());
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken by the dequeue")
            .unwrap();
    }

    fn outbox(b: u8, id: u64, max: usize, m: &Arc<Metrics>) -> (Arc<Outbox>, OutboxRx) {
        Outbox::new(Address([b; 32]), id, max, m.clone())
    }

    #[test]
    fn slow_consumer_is_rejected_and_closed() {
        let m = Arc::new(Metrics::default());
        let (o, _rx) = outbox(1, 1, 10, &m);
        assert!(o.try_enqueue(Bytes::from_static(&[0; 8])).is_ok());
        assert_eq!(
            o.try_enqueue(Bytes::from_static(&[0; 8])),
            Err(EnqueueError::SlowConsumer)
        );
        assert_eq!(o.queued_bytes(), 8);
        assert_eq!(o.close_code(), Some(ErrorCode::SlowConsumer));
        assert_eq!(
            o.try_enqueue(Bytes::from_static(&[0; 1])),
            Err(EnqueueError::Closed)
        );
    }

    #[test]
    fn an_address_holds_several_sessions_and_is_online_while_one_receives() {
        let m = Arc::new(Metrics::default());
        let r = Router::new();
        let (a, _a) = outbox(1, 1, 100, &m);
        let (b, _b) = outbox(1, 2, 100, &m);
        let (sender, _s) = outbox(1, 3, 100, &m);
        r.insert(a.clone(), true);
        r.insert(b.clone(), true);
        r.insert(sender.clone(), false);
        assert_eq!(r.len(), 2, "receiving sessions");
        assert_eq!(r.online(0, 10).0, 1, "one address online");
        assert!(r.remove(&a));
        assert!(!r.remove(&a), "removed once");
        assert!(r.receiving(&b.address));
        assert!(r.remove(&b));
        assert!(
            !r.receiving(&b.address),
            "a send-only session is not online"
        );
        assert!(r.contains(&b.address));
        assert_eq!(r.online(0, 10).0, 0);
        assert!(r.remove(&sender));
        assert!(r.is_empty() && !r.contains(&b.address));
    }
}
