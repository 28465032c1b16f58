//! A lock on block ranges: overlapping holders wait for each other, disjoint ones do not.

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Bound on ranges held at once on one head; more waiters queue on `notify`.
pub const RANGE_LOCK_HOLDERS_MAX: usize = 4096;

#[derive(Default)]
pub struct RangeLock {
    held: Mutex<Vec<(u64, u64)>>,
    notify: Notify,
}

pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

impl RangeLock {
    /// Waits until no holder overlaps `[from, to)`, then holds it.
    pub async fn lock(&self, from: u64, to: u64) -> RangeGuard<'_> {
        loop {
            let notified = self.notify.notified();
            {
                let mut held = self.held.lock();
                let busy = held.len() >= RANGE_LOCK_HOLDERS_MAX
                    || held.iter().any(|&(a, b)| a < to && from < b);
                if !busy {
                    held.push((from, to));
                    return RangeGuard {
                        lock: self,
                        range: (from, to),
                    };
                }
            }
            notified.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock();
        if let Some(i) = held.iter().position(|&r| r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.lock.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn overlapping_ranges_wait() {
        let lock = Arc::new(RangeLock::default());
        let a = lock.lock(0, 10).await;
        let _disjoint = lock.lock(10, 20).await;
        let waiter = {
            let lock = lock.clone();
            tokio::spawn(async move {
                let _g = lock.lock(5, 6).await;
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(a);
        waiter.await.unwrap();
    }
}
