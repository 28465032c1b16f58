//! Buffers of large reads and writes, kept for reuse.
//!
//! A read of a megabyte that allocates a fresh zeroed buffer spends more time in the kernel
//! (mapping, zeroing and later unmapping the pages of a large allocation) than in the read
//! itself, and large allocations freed from many threads fragment the heap. Large reads take
//! a buffer from here instead; the buffer comes back when the last `Bytes` slice of the read is
//! dropped (after the reply is sent). Large writes copy their data into one for the backend and
//! give it back when the disk write completes.
//!
//! Pooled buffers are a power of two long plus `ALIGN_SLACK` bytes, so that a direct write's
//! data can start at an aligned address inside one without moving it to the next size up
//! (`ReadBuffers::take_aligned`).
//!
//! A reused buffer holds bytes of an earlier read. That is never visible: a read exposes only
//! the ranges its pieces cover, and every piece is filled completely by the backend (data, or
//! zeros past the end of the file).

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

/// Reads smaller than this allocate their own buffer: cheap, and not worth a lock.
const POOLED_MIN_BYTES: usize = 64 * 1024;
/// Reads larger than this allocate their own buffer too (rare: NBD's and iSCSI's largest
/// requests are 32 MiB and 8 MiB).
const POOLED_MAX_BYTES: usize = 8 << 20;
/// Bytes of buffers kept for reuse at most; beyond that, returned buffers are freed.
const KEPT_MAX_BYTES: usize = 64 << 20;
/// Bytes each pooled buffer has beyond its power of two: room to align its start.
pub(crate) const ALIGN_SLACK: usize = crate::io::DIRECT_ALIGN;

/// The power of two a buffer of `len` bytes from `take` belongs to, if it is a pooled one.
fn pooled_class(buf_len: usize) -> Option<usize> {
    let class = buf_len.checked_sub(ALIGN_SLACK)?;
    ((POOLED_MIN_BYTES..=POOLED_MAX_BYTES).contains(&class) && class.is_power_of_two())
        .then_some(class)
}

#[derive(Default)]
pub(crate) struct ReadBuffers {
    free: Mutex<Free>,
}

#[derive(Default)]
struct Free {
    /// Each fully initialised (`len() == capacity`), a power of two plus `ALIGN_SLACK` long.
    buffers: Vec<Vec<u8>>,
    /// Their total length.
    bytes: usize,
}

impl ReadBuffers {
    /// A buffer of at least `len` bytes, zeroed only when newly allocated.
    pub fn take(&self, len: usize) -> Vec<u8> {
        if !(POOLED_MIN_BYTES..=POOLED_MAX_BYTES).contains(&len) {
            return vec![0u8; len];
        }
        let size = len.next_power_of_two() + ALIGN_SLACK;
        let mut free = self.free.lock();
        match free.buffers.iter().position(|buf| buf.len() == size) {
            Some(at) => {
                free.bytes -= size;
                free.buffers.swap_remove(at)
            }
            None => vec![0u8; size],
        }
    }

    /// A buffer of at least `len` bytes from an offset aligned to `ALIGN_SLACK` (returned
    /// with it): for direct writes, whose memory must be aligned.
    pub fn take_aligned(&self, len: usize) -> (Vec<u8>, usize) {
        let buf = if (POOLED_MIN_BYTES..=POOLED_MAX_BYTES).contains(&len) {
            self.take(len)
        } else {
            vec![0u8; len + ALIGN_SLACK]
        };
        let pad = (ALIGN_SLACK - buf.as_ptr() as usize % ALIGN_SLACK) % ALIGN_SLACK;
        (buf, pad)
    }

    /// Wraps the first `len` bytes of `buf` (from [`ReadBuffers::take`]) as `Bytes` that give
    /// the buffer back when dropped.
    pub fn freeze(self: &Arc<Self>, mut buf: Vec<u8>, len: usize) -> Bytes {
        if pooled_class(buf.len()).is_none() {
            buf.truncate(len);
            return Bytes::from(buf);
        }
        Bytes::from_owner(Loaned {
            buf,
            len,
            home: self.clone(),
        })
    }

    /// Takes back a buffer from [`ReadBuffers::take`] (one of another size is freed).
    pub fn give_back(&self, buf: Vec<u8>) {
        if pooled_class(buf.len()).is_none() {
            return;
        }
        let mut free = self.free.lock();
        if free.bytes + buf.len() <= KEPT_MAX_BYTES {
            free.bytes += buf.len();
            free.buffers.push(buf);
        }
    }
}

/// A pooled buffer lent to `Bytes` slices of one read.
struct Loaned {
    buf: Vec<u8>,
    len: usize,
    home: Arc<ReadBuffers>,
}

impl AsRef<[u8]> for Loaned {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Loaned {
    fn drop(&mut self) {
        self.home.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_come_back_and_small_ones_do_not() {
        let buffers = Arc::new(ReadBuffers::default());
        let buf = buffers.take(100_000);
        assert_eq!(buf.len(), 131_072 + ALIGN_SLACK);
        let ptr = buf.as_ptr();
        let bytes = buffers.freeze(buf, 100_000);
        assert_eq!(bytes.len(), 100_000);
        let slice = bytes.slice(10..20);
        drop(bytes);
        assert!(
            buffers.free.lock().buffers.is_empty(),
            "a slice still holds it"
        );
        drop(slice);
        assert_eq!(buffers.free.lock().buffers.len(), 1);
        let again = buffers.take(70_000);
        assert_eq!(again.as_ptr(), ptr, "reused");

        let small = buffers.take(4096);
        assert_eq!(small.len(), 4096);
        assert_eq!(buffers.freeze(small, 4096).len(), 4096);
        assert!(buffers.free.lock().buffers.is_empty());
    }

    #[test]
    fn kept_bytes_are_bounded() {
        let buffers = Arc::new(ReadBuffers::default());
        let loans: Vec<Bytes> = (0..20)
            .map(|_| {
                let buf = buffers.take(POOLED_MAX_BYTES);
                buffers.freeze(buf, POOLED_MAX_BYTES)
            })
            .collect();
        drop(loans);
        let kept: usize = buffers.free.lock().buffers.iter().map(Vec::len).sum();
        assert_eq!(kept, buffers.free.lock().bytes);
        assert!(kept <= KEPT_MAX_BYTES);
        assert!(kept > KEPT_MAX_BYTES - POOLED_MAX_BYTES - ALIGN_SLACK);
    }

    #[test]
    fn aligned_buffers_have_room_for_their_data_and_stay_in_their_size_class() {
        let buffers = Arc::new(ReadBuffers::default());
        for len in [
            4096,
            256 << 10,
            1 << 20,
            POOLED_MAX_BYTES,
            POOLED_MAX_BYTES + 4096,
        ] {
            let (buf, pad) = buffers.take_aligned(len);
            assert!(pad < ALIGN_SLACK);
            assert!((buf.as_ptr() as usize + pad).is_multiple_of(ALIGN_SLACK));
            assert!(buf.len() >= pad + len, "{len}");
            if (POOLED_MIN_BYTES..=POOLED_MAX_BYTES).contains(&len) {
                // The class of `len` itself, not the next one up.
                assert_eq!(pooled_class(buf.len()), Some(len.next_power_of_two()));
            }
            buffers.give_back(buf);
        }
        // The pooled ones came back; the others were freed.
        assert_eq!(buffers.free.lock().buffers.len(), 3);
    }
}
