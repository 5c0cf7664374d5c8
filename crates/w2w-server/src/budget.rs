//! What the store-and-forward queue may hold, checked in memory before a
//! write is submitted: no row is ever counted on the store thread.
//!
//! Every stored copy is charged `max(frame length, MIN_CHARGE)` bytes
//! against four budgets, and one message against the recipient's quota:
//!
//! | budget | refusal |
//! |---|---|
//! | bytes submitted to the store thread and not yet committed | `store_busy` (retry soon) |
//! | bytes on disk for the whole relay | `storage_full` |
//! | bytes on disk sent by one address | `storage_full` |
//! | messages / bytes on disk for one recipient | `queue_full` / `storage_full` |
//!
//! A copy is reserved at admission ([`StoreBudget::admit`]), moves from
//! "pending" to "stored" when its write commits, and is given back when it
//! is refused, found already stored, acknowledged (dequeued) or expired.
//! The store thread reports each of those. The figures are loaded from the
//! database at start, so they hold across restarts.

use std::collections::HashMap;
use std::sync::Mutex;

use w2w_proto::{Address, ErrorCode};

/// The least a stored copy is charged: the row's overhead (ids, indexes)
/// and the bookkeeping here, so tiny messages cannot grow the tables for
/// free.
pub const MIN_CHARGE: u64 = 512;

/// The bytes one stored copy of a `len`-byte frame is charged.
pub fn charge(len: usize) -> u64 {
    (len as u64).max(MIN_CHARGE)
}

/// The configured budgets (see [`crate::config::Limits`]).
#[derive(Debug, Clone, Copy)]
pub struct BudgetLimits {
    pub pending_bytes: u64,
    pub max_bytes: u64,
    pub sender_bytes: u64,
    pub recipient_messages: u64,
    pub recipient_bytes: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Use {
    messages: u64,
    bytes: u64,
}

#[derive(Debug, Default)]
struct Usage {
    /// Reserved and not yet committed (or given back).
    pending: u64,
    /// Reserved and committed: on disk.
    stored: u64,
    /// Stored + pending, per recipient and per sender.
    recipients: HashMap<Address, Use>,
    senders: HashMap<Address, u64>,
}

/// The store budgets of one relay, shared by the router (admission) and the
/// store thread (commits and deletions).
#[derive(Debug)]
pub struct StoreBudget {
    limits: BudgetLimits,
    usage: Mutex<Usage>,
}

/// What is on disk: (recipient, sender, messages, charged bytes).
pub type StoredUse = (Address, Address, u64, u64);

impl StoreBudget {
    /// A budget starting from what the database already holds.
    pub fn new(limits: BudgetLimits, stored: impl IntoIterator<Item = StoredUse>) -> Self {
        let mut u = Usage::default();
        for (recipient, sender, messages, bytes) in stored {
            let r = u.recipients.entry(recipient).or_default();
            r.messages += messages;
            r.bytes += bytes;
            *u.senders.entry(sender).or_default() += bytes;
            u.stored += bytes;
        }
        StoreBudget {
            limits,
            usage: Mutex::new(u),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Usage> {
        self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves one copy of a `len`-byte frame from `sender` for each
    /// recipient that fits; the others get the code that refused them.
    pub fn admit(
        &self,
        sender: &Address,
        recipients: &[Address],
        len: usize,
    ) -> Vec<Result<(), ErrorCode>> {
        let c = charge(len);
        let l = &self.limits;
        let mut u = self.lock();
        recipients
            .iter()
            .map(|to| {
                if u.pending + c > l.pending_bytes {
                    return Err(ErrorCode::StoreBusy);
                }
                if u.pending + u.stored + c > l.max_bytes {
                    return Err(ErrorCode::StorageFull);
                }
                if u.senders.get(sender).copied().unwrap_or(0) + c > l.sender_bytes {
                    return Err(ErrorCode::StorageFull);
                }
                let r = u.recipients.get(to).copied().unwrap_or_default();
                if r.messages + 1 > l.recipient_messages {
                    return Err(ErrorCode::QueueFull);
                }
                if r.bytes + c > l.recipient_bytes {
                    return Err(ErrorCode::StorageFull);
                }
                u.pending += c;
                *u.senders.entry(*sender).or_default() += c;
                let r = u.recipients.entry(*to).or_default();
                r.messages += 1;
                r.bytes += c;
                Ok(())
            })
            .collect()
    }

    /// A reserved copy was written: it moves from pending to stored.
    pub fn committed(&self, len: usize) {
        let c = charge(len);
        let mut u = self.lock();
        u.pending = u.pending.saturating_sub(c);
        u.stored += c;
    }

    /// A reserved copy was not written (refused, failed, or already
    /// stored): its reservation is given back.
    pub fn released(&self, sender: &Address, recipient: &Address, len: usize) {
        let c = charge(len);
        let mut u = self.lock();
        u.pending = u.pending.saturating_sub(c);
        Self::forget(&mut u, sender, recipient, c);
    }

    /// A stored copy was deleted (acknowledged or expired).
    pub fn removed(&self, sender: &Address, recipient: &Address, len: usize) {
        let c = charge(len);
        let mut u = self.lock();
        u.stored = u.stored.saturating_sub(c);
        Self::forget(&mut u, sender, recipient, c);
    }

    fn forget(u: &mut Usage, sender: &Address, recipient: &Address, c: u64) {
        if let Some(s) = u.senders.get_mut(sender) {
            *s = s.saturating_sub(c);
            if *s == 0 {
                u.senders.remove(sender);
            }
        }
        if let Some(r) = u.recipients.get_mut(recipient) {
            r.messages = r.messages.saturating_sub(1);
            r.bytes = r.bytes.saturating_sub(c);
            if r.messages == 0 {
                u.recipients.remove(recipient);
            }
        }
    }

    /// Messages queued (on disk or being written), all recipients together:
    /// one pass over the recipients that have any, for metrics.
    pub fn queued_messages(&self) -> u64 {
        self.lock().recipients.values().map(|r| r.messages).sum()
    }

    /// (pending bytes, stored bytes), for metrics and health.
    pub fn totals(&self) -> (u64, u64) {
        let u = self.lock();
        (u.pending, u.stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> BudgetLimits {
        BudgetLimits {
            pending_bytes: 4 * MIN_CHARGE,
            max_bytes: 8 * MIN_CHARGE,
            sender_bytes: 6 * MIN_CHARGE,
            recipient_messages: 3,
            recipient_bytes: 3 * MIN_CHARGE,
        }
    }

    const A: Address = Address([1; 32]);
    const B: Address = Address([2; 32]);

    #[test]
    fn every_budget_refuses_with_its_code_and_gives_back() {
        let b = StoreBudget::new(limits(), []);
        let r = |n: u8| Address([10 + n; 32]);
        // Pending: four copies in flight, the fifth is busy.
        let out = b.admit(&A, &[r(0), r(1), r(2), r(3), r(4)], 10);
        assert_eq!(out[..4], [Ok(()), Ok(()), Ok(()), Ok(())]);
        assert_eq!(out[4], Err(ErrorCode::StoreBusy));
        for _ in 0..4 {
            b.committed(10);
        }
        assert_eq!(b.totals(), (0, 4 * MIN_CHARGE));
        // Sender: 6 charges in all.
        assert_eq!(b.admit(&A, &[r(5), r(6)], 10), vec![Ok(()), Ok(())]);
        assert_eq!(b.admit(&A, &[r(7)], 10), vec![Err(ErrorCode::StorageFull)]);
        b.committed(10);
        b.committed(10);
        // Relay: 8 in all; B fits 2 more, then the relay is full.
        assert_eq!(b.admit(&B, &[r(7), r(7)], 10), vec![Ok(()), Ok(())]);
        assert_eq!(b.admit(&B, &[r(8)], 10), vec![Err(ErrorCode::StorageFull)]);
        // Recipient quota in messages.
        b.released(&B, &r(7), 10);
        b.released(&B, &r(7), 10);
        let b = StoreBudget::new(limits(), []);
        assert_eq!(
            b.admit(&A, &[B, B, B, B], 1),
            vec![Ok(()), Ok(()), Ok(()), Err(ErrorCode::QueueFull)]
        );
        // Deleting gives the room back.
        b.committed(1);
        b.removed(&A, &B, 1);
        b.released(&A, &B, 1);
        b.released(&A, &B, 1);
        assert_eq!(b.totals(), (0, 0));
        assert_eq!(b.admit(&A, &[B], 1), vec![Ok(())]);
    }

    #[test]
    fn recipient_bytes_and_restart_figures() {
        let b = StoreBudget::new(limits(), [(B, A, 2, 2 * MIN_CHARGE)]);
        assert_eq!(b.totals(), (0, 2 * MIN_CHARGE));
        assert_eq!(b.admit(&A, &[B], 10), vec![Ok(())]);
        assert_eq!(
            b.admit(&Address([3; 32]), &[B], MIN_CHARGE as usize + 1),
            vec![Err(ErrorCode::QueueFull)]
        );
        let b = StoreBudget::new(limits(), [(B, A, 1, MIN_CHARGE)]);
        assert_eq!(
            b.admit(&A, &[B], 2 * MIN_CHARGE as usize + 1),
            vec![Err(ErrorCode::StorageFull)]
        );
    }
}
