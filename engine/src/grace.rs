//! Grace periods for freed space. Every data I/O runs inside a guard; before freed blocks are
//! handed out again, `synchronize` waits until every I/O that started before the free has
//! ended, so a read or write in flight never touches a block after it was reused.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

#[derive(Default)]
pub struct Grace {
    epoch: AtomicU64,
    active: [AtomicU64; 2],
    flip: Mutex<()>,
}

pub struct GraceGuard<'a> {
    grace: &'a Grace,
    slot: usize,
}

impl Grace {
    pub fn enter(&self) -> GraceGuard<'_> {
        loop {
            let epoch = self.epoch.load(Ordering::SeqCst);
            let slot = (epoch & 1) as usize;
            self.active[slot].fetch_add(1, Ordering::SeqCst);
            if self.epoch.load(Ordering::SeqCst) == epoch {
                return GraceGuard { grace: self, slot };
            }
            self.active[slot].fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Blocks until every guard entered before this call is dropped.
    pub fn synchronize(&self) {
        let _flip = self.flip.lock();
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst);
        let slot = (epoch & 1) as usize;
        while self.active[slot].load(Ordering::SeqCst) != 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

impl Drop for GraceGuard<'_> {
    fn drop(&mut self) {
        self.grace.active[self.slot].fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn synchronize_waits_for_earlier_guards_only() {
        let grace = Arc::new(Grace::default());
        let guard = grace.enter();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waiter = {
            let (grace, done) = (grace.clone(), done.clone());
            std::thread::spawn(move || {
                grace.synchronize();
                done.store(true, Ordering::SeqCst);
            })
        };
        // Wait until the waiter has flipped the epoch, however loaded the machine is.
        while grace.epoch.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        // A guard entered after the flip does not hold the waiter up.
        let later = grace.enter();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!done.load(Ordering::SeqCst));
        drop(guard);
        waiter.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
        drop(later);
    }
}
