//! Space on the file system, set aside (`fallocate`) before it is used, so that a full file
//! system is met where an operation can still be refused cleanly with `Error::NoSpace`, never
//! in the middle of a data write that is already mapped or of a sync point, which would fail
//! the pool (FORMAT.md, "Running out of space").
//!
//! - `data.grove` grows in chunks set aside ahead of use (its length is the end of what is set
//!   aside). Data blocks are handed out by the allocator in memory; when a write's blocks reach
//!   past the end, the file grows before the data is written. If it cannot, the blocks go back
//!   and the write fails with `NoSpace`: nothing was written or mapped.
//! - `meta.grove` and `journal.grove` keep a reserve set aside beyond their ends (with
//!   `FALLOC_FL_KEEP_SIZE`, so their lengths and the format do not change). The data file may
//!   grow only once both reserves are at least half full: data never takes the last space, so
//!   syncs, commits, branch and volume deletes and trims can still be made when it is gone.
//! - Every change that needs metadata pages or a journal record checks, before it changes
//!   anything, that its worst case fits what is set aside (topping up from the file system
//!   when it can); if not it is refused with `NoSpace` and the pool stays healthy. A write or
//!   sync of metadata that fails nevertheless (a copy-on-write file system, a disk error)
//!   still fails the pool.
//! - Space freed inside the files (trims, deletes, squashed commits, space scans) is reused by
//!   the allocators after the next sync point (`grace.rs`); it is not given back to the file
//!   system.
//!
//! The calls run under the state lock, like the metadata reads of the write path: the data file
//! grows once per chunk (1 to 64 MiB), and only a nearly full file system makes a write try
//! (and fail) a few `fallocate` calls of its own.
//!
//! Where `fallocate` is not supported nothing is set aside or checked: a data write that meets
//! ENOSPC still fails alone (its blocks were never mapped), but metadata may then fail the pool.

use std::io;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::format::PAGE_SIZE;
use crate::io::{FileKind, IoBackend};
use crate::pool::State;
use crate::types::BLOCK_SIZE;

/// The data file grows by an eighth of its length at a time, within these bounds (or by what a
/// write needs, when more).
pub(crate) const DATA_GROW_MIN_BYTES: u64 = 1 << 20;
pub(crate) const DATA_GROW_MAX_BYTES: u64 = 64 << 20;

/// Metadata pages kept set aside beyond the last page in use: 4 MiB.
pub(crate) const META_RESERVE_PAGES: u64 = 1024;

/// Journal bytes kept set aside beyond its end: 1 MiB, a few thousand sync records.
pub(crate) const JOURNAL_RESERVE_BYTES: u64 = 1 << 20;

/// Room a sync point needs in the journal before it changes anything. A larger record (many
/// heads or events at once) asks the file system for more once encoded; if that fails the
/// append fails and with it the pool, as any failed journal write does.
pub(crate) const JOURNAL_RECORD_ROOM_BYTES: u64 = 64 << 10;

/// How far `data.grove` and `journal.grove` are set aside (`meta.grove`'s reserve is kept by
/// the metadata store, `MetaStore::reserved_end_pages`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Reserved {
    /// The data file's length in blocks: every block below it is set aside.
    pub data_end_blocks: u64,
    /// `sums.grove` is set aside up to here: the checksum pages of the data blocks below
    /// `data_end_blocks`, or fewer where the file system had no room for them when the data
    /// file grew. Kept apart so that a block handed out always has its checksum page set
    /// aside too, or its write is refused before anything is written (`reserve_data`).
    pub sums_end_bytes: u64,
    /// The journal is set aside up to here.
    pub journal_end_bytes: u64,
    /// When the data file last could not grow for a write (`State::data_cannot_grow`).
    pub data_full_at: Option<Instant>,
}

/// After the data file could not grow for a write, writes take the small free runs they would
/// pass over for this long before growing it is tried again: rather than a few failed
/// `fallocate` calls under the state lock for every large write on a full file system.
const DATA_FULL_RETRY: Duration = Duration::from_secs(1);

/// New metadata pages a single extent-map replace can hold at once in a tree of `height`
/// levels: the copied paths to both ends of the range, a split at every level and a new root,
/// counted for one level more (a split may add it during the change).
pub(crate) fn replace_pages_max(height: u64) -> u64 {
    3 * (height + 1) + 2
}

/// Sets aside `file` from byte `from` on: `want` bytes, or if the file system has no room for
/// that, as much as halving finds room for but at least `need` bytes. Returns the new end of
/// what is set aside, or `None` where setting aside is not supported.
pub(crate) fn set_aside(
    backend: &dyn IoBackend,
    file: FileKind,
    from: u64,
    need: u64,
    want: u64,
    keep_size: bool,
) -> Result<Option<u64>> {
    let mut len = want.max(need);
    if len == 0 {
        return Ok(Some(from));
    }
    // Bounded: `len` halves each round until it reaches `need`.
    loop {
        match backend.allocate(file, from, len, keep_size) {
            Ok(()) => return Ok(Some(from + len)),
            Err(err) if err.kind() == io::ErrorKind::Unsupported => return Ok(None),
            Err(err) => match Error::from_io(err) {
                Error::NoSpace if len > need => {
                    len = (len / 2).max(need);
                    if len == 0 {
                        return Ok(Some(from));
                    }
                }
                other => return Err(other),
            },
        }
    }
}

impl State {
    /// Sets aside the data file's length and the metadata and journal reserves at open, where
    /// the file system supports it. A reserve the file system has no room for now is counted
    /// for what halving finds (a reserve set aside by an earlier run costs nothing again).
    pub(crate) fn reserve_at_open(&mut self, backend: &dyn IoBackend) -> Result<()> {
        let journal = set_aside_or_none(
            backend,
            FileKind::Journal,
            self.journal_end,
            JOURNAL_RESERVE_BYTES,
        )?;
        let Some(journal_end_bytes) = journal else {
            tracing::warn!("the file system cannot preallocate (fallocate): running out of space may fail the pool");
            self.meta.reserved_end_pages = None;
            self.reserved = None;
            return Ok(());
        };
        let meta_end_bytes = self.meta.pages.end() * PAGE_SIZE as u64;
        // From offset 0: pages left unwritten by an earlier version get their blocks too.
        let meta = set_aside_or_none(
            backend,
            FileKind::Meta,
            0,
            meta_end_bytes + META_RESERVE_PAGES * PAGE_SIZE as u64,
        )?;
        self.meta.reserved_end_pages =
            Some(meta.unwrap_or(meta_end_bytes).max(meta_end_bytes) / PAGE_SIZE as u64);
        let mut data_end_blocks = backend.file_len(FileKind::Data)? / BLOCK_SIZE;
        if self.data.end() > data_end_blocks {
            // Blocks in use past the file's end cannot be: they were written before they were
            // mapped. Set them aside all the same rather than trust it.
            let from = data_end_blocks * BLOCK_SIZE;
            let len = (self.data.end() - data_end_blocks) * BLOCK_SIZE;
            if set_aside(backend, FileKind::Data, from, len, len, false).is_ok() {
                data_end_blocks = self.data.end();
            }
        }
        self.reserved = Some(Reserved {
            data_end_blocks,
            journal_end_bytes,
            sums_end_bytes: 0,
            data_full_at: None,
        });
        // Checksum pages for the blocks set aside. Without room, the next write that needs
        // them tries again, and is refused if there still is none.
        let _ = self.reserve_sums(backend, data_end_blocks);
        Ok(())
    }

    /// Makes sure the data blocks handed out so far are set aside, with their checksum pages,
    /// growing the data file when the allocator's end passed it; the metadata and journal
    /// reserves are topped up first. On `NoSpace` the caller gives its new blocks back.
    pub(crate) fn reserve_data(&mut self, backend: &dyn IoBackend) -> Result<()> {
        let Some(reserved) = self.reserved else {
            return Ok(());
        };
        let end_blocks = self.data.end();
        if crate::sums::file_bytes_for(end_blocks) <= reserved.sums_end_bytes
            && end_blocks <= reserved.data_end_blocks
        {
            return Ok(());
        }
        self.top_up_reserves(backend)?;
        if end_blocks > reserved.data_end_blocks {
            self.grow_data(backend, reserved.data_end_blocks, end_blocks)?;
        }
        self.reserve_sums(backend, end_blocks)
    }

    /// Grows the data file from `have` blocks to at least `end_blocks`.
    fn grow_data(&mut self, backend: &dyn IoBackend, have: u64, end_blocks: u64) -> Result<()> {
        let grow_blocks = ((have * BLOCK_SIZE) / 8)
            .clamp(DATA_GROW_MIN_BYTES, DATA_GROW_MAX_BYTES)
            .div_ceil(BLOCK_SIZE);
        let need = end_blocks - have;
        let result = set_aside(
            backend,
            FileKind::Data,
            have * BLOCK_SIZE,
            need * BLOCK_SIZE,
            need.max(grow_blocks) * BLOCK_SIZE,
            false,
        );
        match result {
            Ok(Some(end_bytes)) => {
                self.set_data_end(end_bytes / BLOCK_SIZE);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(err) => {
                // A failed attempt may have grown the file part of the way.
                if let Ok(len) = backend.file_len(FileKind::Data) {
                    self.set_data_end((len / BLOCK_SIZE).max(have));
                }
                Err(err)
            }
        }
    }

    /// Sets aside the checksum pages of data blocks below `end_blocks`, and of the rest of the
    /// data file if there is room; `NoSpace` if there is none for the first.
    fn reserve_sums(&mut self, backend: &dyn IoBackend, end_blocks: u64) -> Result<()> {
        let Some(reserved) = self.reserved else {
            return Ok(());
        };
        let from = reserved.sums_end_bytes;
        let need_end = crate::sums::file_bytes_for(end_blocks);
        if need_end <= from {
            return Ok(());
        }
        let want_end = crate::sums::file_bytes_for(reserved.data_end_blocks).max(need_end);
        let end = set_aside(
            backend,
            FileKind::Sums,
            from,
            need_end - from,
            want_end - from,
            false,
        )?;
        if let Some(reserved) = &mut self.reserved {
            // Where the file system cannot set the pages aside, asking again would not help.
            reserved.sums_end_bytes = end.unwrap_or(want_end);
        }
        Ok(())
    }

    /// Whether new data blocks may go past the end of the data file when the free space inside
    /// is only in small runs (`allocator::Fit::Whole`): where growing it is set aside first and
    /// was not refused just now. Where nothing is set aside a full file system would be met
    /// only by the data write.
    pub(crate) fn data_may_grow(&self) -> bool {
        self.reserved.is_some_and(|reserved| {
            reserved
                .data_full_at
                .is_none_or(|at| at.elapsed() >= DATA_FULL_RETRY)
        })
    }

    /// Notes that the data file could not grow for a write (`data_may_grow`).
    pub(crate) fn data_cannot_grow(&mut self) {
        if let Some(reserved) = &mut self.reserved {
            reserved.data_full_at = Some(Instant::now());
        }
    }

    fn set_data_end(&mut self, data_end_blocks: u64) {
        if let Some(reserved) = &mut self.reserved {
            reserved.data_end_blocks = data_end_blocks;
        }
    }

    /// Tops up the metadata and journal reserves to full when they are less than half full;
    /// `NoSpace` if the file system cannot give at least half.
    fn top_up_reserves(&mut self, backend: &dyn IoBackend) -> Result<()> {
        self.meta.top_up_reserve()?;
        let Some(reserved) = self.reserved else {
            return Ok(());
        };
        let half_end = self.journal_end + JOURNAL_RESERVE_BYTES / 2;
        if reserved.journal_end_bytes >= half_end {
            return Ok(());
        }
        let from = reserved.journal_end_bytes;
        let want_end = self.journal_end + JOURNAL_RESERVE_BYTES;
        if let Some(end) = set_aside(
            backend,
            FileKind::Journal,
            from,
            half_end - from,
            want_end - from,
            true,
        )? {
            self.set_journal_end(end);
        }
        Ok(())
    }

    fn set_journal_end(&mut self, journal_end_bytes: u64) {
        if let Some(reserved) = &mut self.reserved {
            reserved.journal_end_bytes = reserved.journal_end_bytes.max(journal_end_bytes);
        }
    }

    /// Makes sure the next `bytes` of the journal are set aside; `NoSpace` when the file
    /// system has no room for them.
    pub(crate) fn reserve_journal(&mut self, backend: &dyn IoBackend, bytes: u64) -> Result<()> {
        let Some(reserved) = self.reserved else {
            return Ok(());
        };
        let need_end = self.journal_end + bytes;
        if need_end <= reserved.journal_end_bytes {
            return Ok(());
        }
        let from = reserved.journal_end_bytes;
        let want_end = need_end.max(self.journal_end + JOURNAL_RESERVE_BYTES);
        if let Some(end) = set_aside(
            backend,
            FileKind::Journal,
            from,
            need_end - from,
            want_end - from,
            true,
        )? {
            self.set_journal_end(end);
        }
        Ok(())
    }

    /// Data bytes set aside beyond the allocator's end: free, and certain to be writable.
    pub(crate) fn data_reserved_free_bytes(&self) -> u64 {
        self.reserved.map_or(0, |r| {
            r.data_end_blocks.saturating_sub(self.data.end()) * BLOCK_SIZE
        })
    }
}

/// Sets aside `[from, want_end)` of `file` (or what halving finds room for). `None` where not
/// supported; with no room at all, the end stays at `from`.
fn set_aside_or_none(
    backend: &dyn IoBackend,
    file: FileKind,
    from: u64,
    want_end: u64,
) -> Result<Option<u64>> {
    let want = want_end.saturating_sub(from);
    match set_aside(backend, file, from, 0, want, true) {
        Err(Error::NoSpace) => Ok(Some(from)),
        other => other,
    }
}
