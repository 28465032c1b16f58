//! An in-memory [`ExportProvider`]: sparse exports kept as a map of 4 KiB blocks, with
//! counters and fault injection. It exists to test the protocol code (and to measure it
//! without storage); the grove daemon never uses it.
//!
//! Diff contexts follow a simple model of refs: an export named `VOL@NAME` belongs to the
//! volume `VOL` (an export without `@` is the volume itself), and any export of the same
//! volume can be a diff base, named as in the pool (`NAME`, `VOL@NAME`, or `VOL` for the
//! volume export). Blocks differ when their contents differ, a missing block reading as
//! zeros; the engine compares block mappings instead, which this model does not have.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use grove_engine::{
    BlockStatus, Error, ExportInfo, ReadChunk, Result, RoaringTreemap, SessionClient, ZeroMode,
    BLOCK_SIZE,
};
use parking_lot::{Mutex, RwLock};

use crate::export::{DiffBase, DiffCandidates, ExportHandle, ExportProvider};

/// Exports by name, shared with open handles (which look diff bases up in it).
type ExportMap = Arc<RwLock<BTreeMap<String, Arc<MemoryExport>>>>;

/// Exports by name. Names are matched exactly (no ref resolution).
#[derive(Default)]
pub struct MemoryProvider {
    exports: ExportMap,
}

impl MemoryProvider {
    pub fn new() -> Self {
        MemoryProvider::default()
    }

    /// Adds (or replaces) an empty export: every byte reads as zero and is a hole.
    pub fn add_export(&self, name: &str, size_bytes: u64, read_only: bool) -> Arc<MemoryExport> {
        let export = Arc::new(MemoryExport {
            name: name.to_string(),
            description: format!("in-memory export {name}"),
            size_bytes,
            read_only,
            blocks: Mutex::new(BTreeMap::new()),
            flushes: AtomicU64::new(0),
            fua_ops: AtomicU64::new(0),
            open_handles: AtomicUsize::new(0),
            diff_computations: AtomicU64::new(0),
            fault: Mutex::new(None),
            delays: Mutex::new(Vec::new()),
        });
        self.exports
            .write()
            .insert(name.to_string(), export.clone());
        export
    }

    /// Removes an export; handles already open keep working on it.
    pub fn remove_export(&self, name: &str) -> Option<Arc<MemoryExport>> {
        self.exports.write().remove(name)
    }

    pub fn export(&self, name: &str) -> Option<Arc<MemoryExport>> {
        self.exports.read().get(name).cloned()
    }

    /// Open handles over all exports.
    pub fn open_handles(&self) -> usize {
        self.exports
            .read()
            .values()
            .map(|export| export.open_handles())
            .sum()
    }

    fn lookup(&self, name: &str) -> Result<Arc<MemoryExport>> {
        lookup(&self.exports, name)
    }
}

fn lookup(exports: &ExportMap, name: &str) -> Result<Arc<MemoryExport>> {
    exports
        .read()
        .get(name)
        .cloned()
        .ok_or_else(|| Error::NotFound {
            what: format!("export {name:?}"),
        })
}

/// The volume an export name belongs to: the part before `@`.
fn volume_of(name: &str) -> &str {
    name.split_once('@').map_or(name, |(volume, _)| volume)
}

/// The export a diff ref names in the context of `export`'s volume.
fn resolve_base(exports: &ExportMap, export: &str, reference: &str) -> Result<Arc<MemoryExport>> {
    let volume = volume_of(export);
    let name = if reference.contains('@') || reference == volume {
        reference.to_string()
    } else {
        format!("{volume}@{reference}")
    };
    if volume_of(&name) != volume {
        return Err(Error::InvalidArgument(format!(
            "{reference:?} is not a ref of volume {volume:?}"
        )));
    }
    lookup(exports, &name)
}

impl ExportProvider for MemoryProvider {
    type Handle = MemoryHandle;

    fn list(&self) -> Vec<ExportInfo> {
        self.exports
            .read()
            .values()
            .map(|export| export.info())
            .collect()
    }

    fn describe(&self, name: &str) -> Result<ExportInfo> {
        Ok(self.lookup(name)?.info())
    }

    fn open(&self, name: &str, _client: SessionClient) -> Result<Arc<MemoryHandle>> {
        let export = self.lookup(name)?;
        export.open_handles.fetch_add(1, Ordering::SeqCst);
        Ok(Arc::new(MemoryHandle {
            export,
            exports: self.exports.clone(),
        }))
    }

    fn diff_base(&self, export: &str, reference: &str) -> Result<DiffBase> {
        let target = self.lookup(export)?;
        let base = resolve_base(&self.exports, export, reference)?;
        Ok(DiffBase {
            reference: base.name.clone(),
            immutable: target.read_only && base.read_only,
        })
    }

    /// Every export of the export's volume, in name order.
    fn diff_candidates(&self, export: &str, limit: usize) -> Result<DiffCandidates> {
        self.lookup(export)?;
        let volume = volume_of(export);
        let mut candidates = DiffCandidates::default();
        for name in self.exports.read().keys() {
            if volume_of(name) != volume {
                continue;
            }
            if candidates.references.len() < limit {
                candidates.references.push(name.clone());
            } else {
                candidates.more = true;
            }
        }
        Ok(candidates)
    }
}

/// What an injected fault makes every I/O call do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Fail with `Error::NoSpace`.
    NoSpace,
    /// Fail with `Error::Io`.
    Io,
    /// Panic, as a bug in storage code would.
    Panic,
}

/// One sparse in-memory export.
pub struct MemoryExport {
    name: String,
    description: String,
    size_bytes: u64,
    read_only: bool,
    /// Allocated blocks by index; a missing block is a hole that reads as zeros.
    blocks: Mutex<BTreeMap<u64, Box<[u8]>>>,
    flushes: AtomicU64,
    fua_ops: AtomicU64,
    open_handles: AtomicUsize,
    /// Diffs computed with this export as the exported side.
    diff_computations: AtomicU64,
    fault: Mutex<Option<Fault>>,
    /// Requests starting at one of these offsets wait this long first.
    delays: Mutex<Vec<(u64, Duration)>>,
}

impl MemoryExport {
    pub fn info(&self) -> ExportInfo {
        ExportInfo {
            name: self.name.clone(),
            read_only: self.read_only,
            size_bytes: self.size_bytes,
            description: self.description.clone(),
        }
    }

    /// Flushes so far (`NBD_CMD_FLUSH` and the flush at `NBD_CMD_DISC`).
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// Writes, zero writes and trims that asked for FUA.
    pub fn fua_ops(&self) -> u64 {
        self.fua_ops.load(Ordering::SeqCst)
    }

    pub fn open_handles(&self) -> usize {
        self.open_handles.load(Ordering::SeqCst)
    }

    pub fn allocated_blocks(&self) -> usize {
        self.blocks.lock().len()
    }

    /// Diffs computed so far with this export as the exported side ([`ExportHandle::diff`]).
    pub fn diff_computations(&self) -> u64 {
        self.diff_computations.load(Ordering::SeqCst)
    }

    /// Makes every later I/O call fail (or panic) until cleared with `None`.
    pub fn set_fault(&self, fault: Option<Fault>) {
        *self.fault.lock() = fault;
    }

    /// Makes requests starting at `offset_bytes` wait `delay` before running.
    pub fn set_delay(&self, offset_bytes: u64, delay: Duration) {
        self.delays.lock().push((offset_bytes, delay));
    }

    /// Writes without going through a handle (read-only exports included), to set up tests.
    pub fn load(&self, offset_bytes: u64, data: &[u8]) {
        let mut blocks = self.blocks.lock();
        for_each_block(
            offset_bytes,
            data.len() as u64,
            |index, in_block, in_range| {
                let block = blocks
                    .entry(index)
                    .or_insert_with(|| vec![0u8; BLOCK_SIZE as usize].into_boxed_slice());
                block[in_block].copy_from_slice(&data[in_range]);
            },
        );
    }

    /// Reads without going through a handle, for checks in tests.
    pub fn contents(&self, offset_bytes: u64, len_bytes: u64) -> Vec<u8> {
        let mut out = vec![0u8; len_bytes as usize];
        let blocks = self.blocks.lock();
        for_each_block(offset_bytes, len_bytes, |index, in_block, in_range| {
            if let Some(block) = blocks.get(&index) {
                out[in_range].copy_from_slice(&block[in_block]);
            }
        });
        out
    }

    async fn enter(&self, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        let delay = self
            .delays
            .lock()
            .iter()
            .find(|(at, _)| *at == offset_bytes)
            .map(|(_, delay)| *delay);
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        match *self.fault.lock() {
            Some(Fault::NoSpace) => return Err(Error::NoSpace),
            Some(Fault::Io) => return Err(Error::Io(io::Error::other("injected I/O fault"))),
            Some(Fault::Panic) => panic!("injected panic in the in-memory export"),
            None => {}
        }
        match offset_bytes.checked_add(len_bytes) {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(Error::OutOfRange {
                offset_bytes,
                len_bytes,
                size_bytes: self.size_bytes,
            }),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly(self.name.clone()))
        } else {
            Ok(())
        }
    }

    fn count_fua(&self, fua: bool) {
        if fua {
            self.fua_ops.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Zeroes (MayTrim: deallocates whole blocks) or trims (deallocates whole blocks only) a
    /// range, touching only blocks that exist.
    fn discard(&self, offset_bytes: u64, len_bytes: u64, zero_partial: bool) {
        let mut blocks = self.blocks.lock();
        let indexes: Vec<u64> = match block_span(offset_bytes, len_bytes) {
            Some((first, last)) => blocks
                .range(first..=last)
                .map(|(index, _)| *index)
                .collect(),
            None => return,
        };
        for index in indexes {
            let (in_block, _) = overlap(index, offset_bytes, len_bytes);
            if in_block.len() as u64 == BLOCK_SIZE {
                blocks.remove(&index);
            } else if zero_partial {
                if let Some(block) = blocks.get_mut(&index) {
                    block[in_block].fill(0);
                }
            }
        }
    }
}

/// An open in-memory export.
pub struct MemoryHandle {
    export: Arc<MemoryExport>,
    exports: ExportMap,
}

impl Drop for MemoryHandle {
    fn drop(&mut self) {
        self.export.open_handles.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ExportHandle for MemoryHandle {
    fn name(&self) -> String {
        self.export.name.clone()
    }

    fn description(&self) -> String {
        self.export.description.clone()
    }

    fn size_bytes(&self) -> u64 {
        self.export.size_bytes
    }

    fn read_only(&self) -> bool {
        self.export.read_only
    }

    async fn read(&self, offset_bytes: u64, len_bytes: u64) -> Result<Vec<u8>> {
        self.export.enter(offset_bytes, len_bytes).await?;
        Ok(self.export.contents(offset_bytes, len_bytes))
    }

    async fn read_chunks(&self, offset_bytes: u64, len_bytes: u64) -> Result<Vec<ReadChunk>> {
        self.export.enter(offset_bytes, len_bytes).await?;
        let blocks = self.export.blocks.lock();
        let mut chunks: Vec<ReadChunk> = Vec::new();
        let mut position = offset_bytes;
        let end = offset_bytes + len_bytes;
        if let Some((first, last)) = block_span(offset_bytes, len_bytes) {
            for (&index, block) in blocks.range(first..=last) {
                let (in_block, in_range) = overlap(index, offset_bytes, len_bytes);
                let from = offset_bytes + in_range.start as u64;
                if from > position {
                    chunks.push(ReadChunk::Zero {
                        len_bytes: from - position,
                    });
                }
                match chunks.last_mut() {
                    Some(ReadChunk::Data(data)) if from == position => {
                        let mut joined = Vec::with_capacity(data.len() + in_block.len());
                        joined.extend_from_slice(data);
                        joined.extend_from_slice(&block[in_block]);
                        *data = joined.into();
                    }
                    _ => chunks.push(ReadChunk::Data(block[in_block].to_vec().into())),
                }
                position = offset_bytes + in_range.end as u64;
            }
        }
        if position < end {
            chunks.push(ReadChunk::Zero {
                len_bytes: end - position,
            });
        }
        Ok(chunks)
    }

    async fn write(&self, offset_bytes: u64, data: &[u8], fua: bool) -> Result<()> {
        self.export.check_writable()?;
        self.export.enter(offset_bytes, data.len() as u64).await?;
        let mut blocks = self.export.blocks.lock();
        for_each_block(
            offset_bytes,
            data.len() as u64,
            |index, in_block, in_range| {
                let block = blocks
                    .entry(index)
                    .or_insert_with(|| vec![0u8; BLOCK_SIZE as usize].into_boxed_slice());
                block[in_block].copy_from_slice(&data[in_range]);
            },
        );
        self.export.count_fua(fua);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> Result<()> {
        self.export.check_writable()?;
        self.export.enter(offset_bytes, len_bytes).await?;
        match mode {
            ZeroMode::MayTrim => self.export.discard(offset_bytes, len_bytes, true),
            ZeroMode::Allocate => {
                let mut blocks = self.export.blocks.lock();
                for_each_block(offset_bytes, len_bytes, |index, in_block, _| {
                    let block = blocks
                        .entry(index)
                        .or_insert_with(|| vec![0u8; BLOCK_SIZE as usize].into_boxed_slice());
                    block[in_block].fill(0);
                });
            }
        }
        self.export.count_fua(fua);
        Ok(())
    }

    async fn trim(&self, offset_bytes: u64, len_bytes: u64, fua: bool) -> Result<()> {
        self.export.check_writable()?;
        self.export.enter(offset_bytes, len_bytes).await?;
        self.export.discard(offset_bytes, len_bytes, false);
        self.export.count_fua(fua);
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        self.export.enter(0, 0).await?;
        self.export.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn cache(&self, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        self.export.enter(offset_bytes, len_bytes).await
    }

    async fn block_status(&self, offset_bytes: u64, len_bytes: u64) -> Result<Vec<BlockStatus>> {
        self.export.enter(offset_bytes, len_bytes).await?;
        let blocks = self.export.blocks.lock();
        let mut runs: Vec<BlockStatus> = Vec::new();
        let mut push = |len_bytes: u64, hole: bool, zero: bool| match runs.last_mut() {
            Some(last) if last.hole == hole && last.zero == zero => last.len_bytes += len_bytes,
            _ => runs.push(BlockStatus {
                len_bytes,
                hole,
                zero,
            }),
        };
        let mut position = offset_bytes;
        let end = offset_bytes + len_bytes;
        if let Some((first, last)) = block_span(offset_bytes, len_bytes) {
            for (&index, block) in blocks.range(first..=last) {
                let (in_block, in_range) = overlap(index, offset_bytes, len_bytes);
                let from = offset_bytes + in_range.start as u64;
                if from > position {
                    push(from - position, true, true);
                }
                let zero = block[in_block.clone()].iter().all(|byte| *byte == 0);
                push(in_block.len() as u64, false, zero);
                position = offset_bytes + in_range.end as u64;
            }
        }
        if position < end {
            push(end - position, true, true);
        }
        Ok(runs)
    }

    async fn diff(&self, base: &DiffBase) -> Result<RoaringTreemap> {
        self.export.enter(0, 0).await?;
        self.export.diff_computations.fetch_add(1, Ordering::SeqCst);
        let base = lookup(&self.exports, &base.reference)?;
        let mut changed = RoaringTreemap::new();
        if Arc::ptr_eq(&base, &self.export) {
            return Ok(changed);
        }
        // One block map locked at a time (a copy of the base's), so two handles comparing
        // two exports in opposite directions never wait for each other.
        let base_blocks = base.blocks.lock().clone();
        let blocks = self.export.blocks.lock();
        let is_zero = |block: &[u8]| block.iter().all(|byte| *byte == 0);
        for (index, block) in blocks.iter() {
            let same = match base_blocks.get(index) {
                Some(other) => other == block,
                None => is_zero(block),
            };
            if !same {
                changed.insert(*index);
            }
        }
        for (index, block) in base_blocks.iter() {
            if !blocks.contains_key(index) && !is_zero(block) {
                changed.insert(*index);
            }
        }
        Ok(changed)
    }
}

/// First and last block index a non-empty range touches.
fn block_span(offset_bytes: u64, len_bytes: u64) -> Option<(u64, u64)> {
    if len_bytes == 0 {
        return None;
    }
    Some((
        offset_bytes / BLOCK_SIZE,
        (offset_bytes + len_bytes - 1) / BLOCK_SIZE,
    ))
}

/// The part of block `index` inside the range, as byte ranges within the block and within
/// the range.
fn overlap(
    index: u64,
    offset_bytes: u64,
    len_bytes: u64,
) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    let block_start = index * BLOCK_SIZE;
    let from = offset_bytes.max(block_start);
    let to = (offset_bytes + len_bytes).min(block_start + BLOCK_SIZE);
    (
        (from - block_start) as usize..(to - block_start) as usize,
        (from - offset_bytes) as usize..(to - offset_bytes) as usize,
    )
}

fn for_each_block(
    offset_bytes: u64,
    len_bytes: u64,
    mut visit: impl FnMut(u64, std::ops::Range<usize>, std::ops::Range<usize>),
) {
    if let Some((first, last)) = block_span(offset_bytes, len_bytes) {
        for index in first..=last {
            let (in_block, in_range) = overlap(index, offset_bytes, len_bytes);
            visit(index, in_block, in_range);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> SessionClient {
        SessionClient {
            protocol: "nbd".into(),
            address: "test".into(),
        }
    }

    #[tokio::test]
    async fn sparse_reads_writes_and_status() {
        let provider = MemoryProvider::new();
        provider.add_export("vol", 1 << 20, false);
        let handle = provider.open("vol", client()).unwrap();
        handle.write(5000, &[0xab; 5000], false).await.unwrap();
        let data = handle.read(4096, 8192).await.unwrap();
        assert!(data[..904].iter().all(|b| *b == 0));
        assert!(data[904..5904].iter().all(|b| *b == 0xab));
        let chunks = handle.read_chunks(0, 16384).await.unwrap();
        assert_eq!(chunks.iter().map(ReadChunk::len_bytes).sum::<u64>(), 16384);
        assert!(matches!(chunks[0], ReadChunk::Zero { len_bytes: 4096 }));
        assert!(matches!(&chunks[1], ReadChunk::Data(data) if data.len() == 8192));
        let status = handle.block_status(0, 16384).await.unwrap();
        assert_eq!(
            status,
            vec![
                BlockStatus {
                    len_bytes: 4096,
                    hole: true,
                    zero: true
                },
                BlockStatus {
                    len_bytes: 8192,
                    hole: false,
                    zero: false
                },
                BlockStatus {
                    len_bytes: 4096,
                    hole: true,
                    zero: true
                },
            ]
        );
        handle
            .write_zeroes(4096, 8192, ZeroMode::MayTrim, false)
            .await
            .unwrap();
        assert_eq!(provider.export("vol").unwrap().allocated_blocks(), 0);
        handle
            .write_zeroes(0, 4096, ZeroMode::Allocate, false)
            .await
            .unwrap();
        assert_eq!(provider.export("vol").unwrap().allocated_blocks(), 1);
        assert!(handle.read(1 << 20, 1).await.is_err());
        drop(handle);
        assert_eq!(provider.open_handles(), 0);
    }
}
