//! Block checksums (FORMAT.md, "Block checksums").
//!
//! Every data block has a crc32c in `sums.grove`, indexed by its physical block number: a block
//! shared by commits, branches and clones has one checksum, as it has one content. A write sets
//! the checksums of the blocks it wrote once its data is written (under the state lock, with
//! the mapping); a read checks every block it reads against them. Value 0 means "no checksum"
//! (blocks written with checksums off, or before the pool had them); a block whose crc32c is 0
//! is stored as 1, which costs one value of 2^32 in detection.
//!
//! Checksum pages are cached and written at sync points before the journal record, like
//! extent-map nodes, so a block mapped by a durable record has a durable checksum. A block
//! written in place is the exception: its write and its checksum's can reach the disk in any
//! order, or torn. So before a write goes in place into a region of blocks, the region is
//! recorded in the journal as possibly being written (`Intent`), and after a crash the
//! checksums of every block that could have been written in place there are computed again
//! from what the disk holds (old data, new data or a mix of sectors, all of which the
//! block-device contract allows). A region leaves the intent at a sync point once no in-place
//! write has touched it for a while: the sync point's data sync covers its writes.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::format::PAGE_SIZE;
use crate::io::{self, FileKind, IoBackend, IoOp, Piece};
use crate::types::BLOCK_SIZE;

/// Checksums per page of `sums.grove`: one page covers 4 MiB of data blocks.
pub const SUMS_PER_PAGE: u64 = PAGE_SIZE as u64 / 4;

/// Data blocks per intent region: 64 MiB. Larger regions mean fewer journal syncs before
/// in-place writes (a sequential writer records one per region), smaller ones less to compute
/// again after a crash.
pub const INTENT_REGION_BLOCKS: u64 = 16 * SUMS_PER_PAGE;

/// "This block has no checksum."
pub const NO_SUM: u32 = 0;

/// A region stays in the intent until no in-place write has touched it for this long, so that
/// a steady workload does not record the same regions over and over.
pub(crate) const INTENT_IDLE: Duration = Duration::from_secs(10);

/// The checksum stored for a block's content (never `NO_SUM`).
pub fn block_sum(block: &[u8]) -> u32 {
    crc32c::crc32c(block).max(1)
}

/// Length `sums.grove` needs to hold the checksums of `data_blocks` blocks.
pub(crate) fn file_bytes_for(data_blocks: u64) -> u64 {
    page_offset(data_blocks.div_ceil(SUMS_PER_PAGE))
}

/// Byte offset of checksum page `index` in `sums.grove` (page 0 of the file is its header).
fn page_offset(index: u64) -> u64 {
    (index + 1) * PAGE_SIZE as u64
}

/// The checksum page of a data block.
fn page_of(pblock: u64) -> u64 {
    pblock / SUMS_PER_PAGE
}

/// `len` blocks from `pblock` split at checksum-page boundaries: (page, index in the page,
/// blocks).
fn page_spans(pblock: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize)> {
    let end = pblock + len;
    let mut p = pblock;
    std::iter::from_fn(move || {
        if p >= end {
            return None;
        }
        let index = page_of(p);
        let upto = ((index + 1) * SUMS_PER_PAGE).min(end);
        let span = (index, (p % SUMS_PER_PAGE) as usize, (upto - p) as usize);
        p = upto;
        Some(span)
    })
}

/// The intent region of a data block.
pub fn region_of(pblock: u64) -> u64 {
    pblock / INTENT_REGION_BLOCKS
}

struct SumPage {
    sums: Box<[u32]>,
    used: u64,
}

/// The checksums, paged through a bounded cache. Lives behind the state lock.
pub(crate) struct SumStore {
    backend: Arc<dyn IoBackend>,
    pages: HashMap<u64, SumPage>,
    dirty: BTreeSet<u64>,
    /// Pages were written since the file was last synced.
    unsynced: bool,
    capacity: usize,
    clock: u64,
}

impl SumStore {
    pub fn new(backend: Arc<dyn IoBackend>, capacity_pages: usize) -> Self {
        SumStore {
            backend,
            pages: HashMap::new(),
            dirty: BTreeSet::new(),
            unsynced: false,
            capacity: capacity_pages.max(16),
            clock: 0,
        }
    }

    fn page(&mut self, index: u64) -> Result<&mut SumPage> {
        self.clock += 1;
        let clock = self.clock;
        if !self.pages.contains_key(&index) {
            self.make_room()?;
            let bytes = io::read_blocking(
                &*self.backend,
                FileKind::Sums,
                page_offset(index),
                PAGE_SIZE,
            )?;
            let sums = bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            self.pages.insert(index, SumPage { sums, used: clock });
        }
        let page = self.pages.get_mut(&index).expect("page just loaded");
        page.used = clock;
        Ok(page)
    }

    /// Keeps the cache within its bound: dirty pages are written (not synced; see the module
    /// comment for why that is safe) and the least recently used quarter is dropped.
    fn make_room(&mut self) -> Result<()> {
        if self.pages.len() < self.capacity {
            return Ok(());
        }
        self.write_dirty()?;
        let mut by_use: Vec<(u64, u64)> = self.pages.iter().map(|(i, p)| (p.used, *i)).collect();
        by_use.sort_unstable();
        for (_, index) in by_use.iter().take(self.capacity / 4 + 1) {
            self.pages.remove(index);
        }
        Ok(())
    }

    /// The checksums of `len` blocks from `pblock`, appended to `out`.
    pub fn get_run(&mut self, pblock: u64, len: u64, out: &mut Vec<u32>) -> Result<()> {
        for (index, at, n) in page_spans(pblock, len) {
            out.extend_from_slice(&self.page(index)?.sums[at..at + n]);
        }
        Ok(())
    }

    /// Sets the checksums of consecutive blocks from `pblock`.
    pub fn set_run(&mut self, pblock: u64, sums: &[u32]) -> Result<()> {
        let mut done = 0;
        for (index, at, n) in page_spans(pblock, sums.len() as u64) {
            self.page(index)?.sums[at..at + n].copy_from_slice(&sums[done..done + n]);
            self.dirty.insert(index);
            done += n;
        }
        Ok(())
    }

    /// Marks `len` blocks from `pblock` as having no checksum.
    pub fn clear_run(&mut self, pblock: u64, len: u64) -> Result<()> {
        for (index, at, n) in page_spans(pblock, len) {
            let span = &mut self.page(index)?.sums[at..at + n];
            if span.iter().any(|&s| s != NO_SUM) {
                span.fill(NO_SUM);
                self.dirty.insert(index);
            }
        }
        Ok(())
    }

    /// Writes every changed page (one gather write); the caller syncs the file.
    pub fn write_dirty(&mut self) -> Result<()> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        let indexes: Vec<u64> = std::mem::take(&mut self.dirty).into_iter().collect();
        let mut buf = Vec::with_capacity(indexes.len() * PAGE_SIZE);
        let mut pieces = Vec::with_capacity(indexes.len());
        for index in &indexes {
            let page = &self.pages[index];
            pieces.push(Piece {
                file_offset: page_offset(*index),
                buf_offset: buf.len(),
                len: PAGE_SIZE,
            });
            buf.extend(page.sums.iter().flat_map(|s| s.to_le_bytes()));
        }
        let op = IoOp::WriteMany {
            file: FileKind::Sums,
            buf,
            pieces,
        };
        self.unsynced = true;
        if let Err(err) = io::run_blocking(&*self.backend, op).result {
            // Still in memory, still to be written.
            self.dirty.extend(indexes);
            return Err(Error::from_io(err));
        }
        Ok(())
    }

    /// Whether pages were written since the last call: a sync point syncs the file only then.
    pub fn take_unsynced(&mut self) -> bool {
        std::mem::take(&mut self.unsynced)
    }
}

/// Checks `data` (whole blocks) against `sums`, one per block; `NO_SUM` blocks pass. Returns
/// the index of the first block that fails and the checksum it has.
pub fn first_mismatch(data: &[u8], sums: &[u32]) -> Option<(usize, u32)> {
    data.chunks_exact(BLOCK_SIZE as usize)
        .zip(sums)
        .enumerate()
        .find_map(|(i, (block, &want))| {
            if want == NO_SUM {
                return None;
            }
            let got = block_sum(block);
            (got != want).then_some((i, got))
        })
}

#[derive(Clone, Copy)]
struct Region {
    /// Recorded in a durable journal record as possibly being written in place.
    recorded: bool,
    /// In-place writes into it that have begun and not ended.
    writing: u32,
    last_write: Option<Instant>,
}

/// Regions of data blocks that in-place writes may have changed since the last sync point.
#[derive(Default)]
pub(crate) struct Intent {
    regions: Mutex<HashMap<u64, Region>>,
}

/// Held by an in-place write while it may change the blocks of its regions.
pub(crate) struct IntentGuard<'a> {
    intent: &'a Intent,
    regions: Vec<u64>,
}

impl Drop for IntentGuard<'_> {
    fn drop(&mut self) {
        let mut regions = self.intent.regions.lock();
        let now = Instant::now();
        for index in &self.regions {
            if let Some(region) = regions.get_mut(index) {
                region.writing -= 1;
                region.last_write = Some(now);
            }
        }
    }
}

impl Intent {
    /// Regions found in the intent at open: their checksums were computed again, and they
    /// leave the intent with the next sync point that writes a record.
    pub fn recovered(regions: impl IntoIterator<Item = u64>) -> Intent {
        let regions = regions
            .into_iter()
            .map(|index| {
                let region = Region {
                    recorded: true,
                    writing: 0,
                    last_write: None,
                };
                (index, region)
            })
            .collect();
        Intent {
            regions: Mutex::new(regions),
        }
    }

    /// Begins in-place writes into `regions` (sorted, without repeats); returns the guard and
    /// the regions not yet recorded, which must be before any of the writes is issued.
    pub fn begin(&self, regions: Vec<u64>) -> (IntentGuard<'_>, Vec<u64>) {
        let mut map = self.regions.lock();
        let mut unrecorded = Vec::new();
        for &index in &regions {
            let region = map.entry(index).or_insert(Region {
                recorded: false,
                writing: 0,
                last_write: None,
            });
            region.writing += 1;
            if !region.recorded {
                unrecorded.push(index);
            }
        }
        (
            IntentGuard {
                intent: self,
                regions,
            },
            unrecorded,
        )
    }

    /// Of `regions`, those still not recorded.
    pub fn unrecorded(&self, regions: &[u64]) -> Vec<u64> {
        let map = self.regions.lock();
        regions
            .iter()
            .copied()
            .filter(|index| !map.get(index).is_some_and(|r| r.recorded))
            .collect()
    }

    /// Every region that writes have begun in but that is not recorded yet.
    pub fn awaited(&self) -> Vec<u64> {
        let map = self.regions.lock();
        let mut regions: Vec<u64> = map
            .iter()
            .filter(|(_, r)| !r.recorded && r.writing > 0)
            .map(|(index, _)| *index)
            .collect();
        regions.sort_unstable();
        regions
    }

    /// `regions` are recorded by a durable journal record.
    pub fn set_recorded(&self, regions: &[u64]) {
        let mut map = self.regions.lock();
        for &index in regions {
            if let Some(region) = map.get_mut(&index) {
                region.recorded = true;
            }
        }
    }

    /// Takes out of the intent the recorded regions with no write in progress that have been
    /// idle for `idle` (all of them with `Duration::ZERO`); the sync point about to write a
    /// record lists them as cleared. Its data sync covers every write they had, since each
    /// ended before this call.
    pub fn take_idle(&self, idle: Duration) -> Vec<u64> {
        let mut map = self.regions.lock();
        let now = Instant::now();
        let mut cleared: Vec<u64> = map
            .iter()
            .filter(|(_, r)| {
                r.recorded
                    && r.writing == 0
                    && r.last_write
                        .is_none_or(|at| now.saturating_duration_since(at) >= idle)
            })
            .map(|(index, _)| *index)
            .collect();
        for index in &cleared {
            map.remove(index);
        }
        // Regions never recorded and no longer written are forgotten too.
        map.retain(|_, r| r.recorded || r.writing > 0);
        cleared.sort_unstable();
        cleared
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sum_is_never_no_sum_and_detects_a_flip() {
        let mut block = vec![7u8; BLOCK_SIZE as usize];
        let sum = block_sum(&block);
        assert_ne!(sum, NO_SUM);
        block[100] ^= 1;
        assert_eq!(first_mismatch(&block, &[sum]), Some((0, block_sum(&block))));
        assert_eq!(first_mismatch(&block, &[NO_SUM]), None);
    }

    #[test]
    fn intent_keeps_regions_with_writes_in_progress() {
        let intent = Intent::default();
        let (guard, unrecorded) = intent.begin(vec![1, 2]);
        assert_eq!(unrecorded, vec![1, 2]);
        intent.set_recorded(&[1, 2]);
        assert!(intent.take_idle(Duration::ZERO).is_empty());
        let (_again, unrecorded) = intent.begin(vec![2]);
        assert!(unrecorded.is_empty());
        drop(guard);
        assert_eq!(intent.take_idle(Duration::ZERO), vec![1]);
        assert!(intent.unrecorded(&[1]) == vec![1]);
    }
}
