//! Buffers of large WRITE payloads, kept for reuse by every connection of the process.
//!
//! A fresh megabyte for each payload costs more in the kernel than receiving it: the daemon
//! maps allocations over 128 KiB (`grove serve` sets the malloc mmap threshold), so each one
//! is mapped, faulted in page by page while the socket is read into it, and unmapped again.
//! A payload buffer comes back here when its request is done.

use std::ops::Deref;

use parking_lot::Mutex;

/// Payloads smaller than this allocate their own buffer: cheap, and not worth a lock.
const POOLED_MIN_BYTES: usize = 64 * 1024;
/// Payloads larger than this allocate their own buffer too (rare: clients split large writes).
const POOLED_MAX_BYTES: usize = 8 << 20;
/// Bytes of buffers kept for reuse at most; beyond that, returned buffers are freed.
const KEPT_MAX_BYTES: usize = 64 << 20;

static BUFFERS: Buffers = Buffers::new();

struct Buffers {
    free: Mutex<Free>,
}

struct Free {
    /// Each fully initialised and a power of two long.
    buffers: Vec<Vec<u8>>,
    /// Their total length.
    bytes: usize,
}

impl Buffers {
    const fn new() -> Buffers {
        Buffers {
            free: Mutex::new(Free {
                buffers: Vec::new(),
                bytes: 0,
            }),
        }
    }
}

/// The payload of one request: the first `len` bytes of its buffer.
pub(crate) struct Payload {
    buf: Vec<u8>,
    len: usize,
    home: &'static Buffers,
}

impl Payload {
    /// A payload of `len` bytes to be read into; a reused buffer holds an earlier payload's
    /// bytes until it is.
    pub(crate) fn take(len: usize) -> Payload {
        Payload::take_from(&BUFFERS, len)
    }

    fn take_from(home: &'static Buffers, len: usize) -> Payload {
        let buf = if (POOLED_MIN_BYTES..=POOLED_MAX_BYTES).contains(&len) {
            let size = len.next_power_of_two();
            let mut free = home.free.lock();
            match free.buffers.iter().position(|buf| buf.len() == size) {
                Some(at) => {
                    free.bytes -= size;
                    free.buffers.swap_remove(at)
                }
                None => vec![0u8; size],
            }
        } else {
            vec![0u8; len]
        };
        Payload { buf, len, home }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

impl Default for Payload {
    fn default() -> Self {
        Payload::take(0)
    }
}

impl Deref for Payload {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        let size = self.buf.len();
        if !(POOLED_MIN_BYTES..=POOLED_MAX_BYTES).contains(&size) || !size.is_power_of_two() {
            return;
        }
        let mut free = self.home.free.lock();
        if free.bytes + size <= KEPT_MAX_BYTES {
            free.bytes += size;
            free.buffers.push(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> &'static Buffers {
        Box::leak(Box::new(Buffers::new()))
    }

    #[test]
    fn large_payloads_reuse_their_buffers() {
        let home = pool();
        let mut first = Payload::take_from(home, 1 << 20);
        assert_eq!(first.len(), 1 << 20);
        first.as_mut_slice()[0] = 7;
        let ptr = first.as_ptr();
        drop(first);
        let again = Payload::take_from(home, 700_000);
        assert_eq!(again.len(), 700_000);
        assert_eq!(again.as_ptr(), ptr, "reused");

        let small = Payload::take_from(home, 4096);
        assert_eq!(small.len(), 4096);
        drop(small);
        assert!(
            home.free.lock().buffers.is_empty(),
            "small buffers are not kept"
        );
        assert!(Payload::default().is_empty());
    }

    #[test]
    fn kept_bytes_are_bounded() {
        let home = pool();
        let payloads: Vec<Payload> = (0..20)
            .map(|_| Payload::take_from(home, POOLED_MAX_BYTES))
            .collect();
        drop(payloads);
        let free = home.free.lock();
        assert_eq!(free.bytes, KEPT_MAX_BYTES);
        assert_eq!(free.buffers.len() * POOLED_MAX_BYTES, KEPT_MAX_BYTES);
    }
}
