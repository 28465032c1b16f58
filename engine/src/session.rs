//! Sessions: how frontends (NBD, iSCSI) do I/O on a ref. A session is opened on a ref, meters
//! every request, and reports `session.closed` with its counters when dropped.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::allocator::Fit;
use crate::error::{Error, Result};
use crate::events::Event;
use crate::extent_map::{MapReader, MapWriter};
use crate::grace::GraceGuard;
use crate::io::{self, FileKind, IoDone, IoOp, Piece};
use crate::meta::Target;
use crate::metrics::RequestOp;
use crate::pool::run_blocking;
use crate::pool::PoolInner;
use crate::range_lock::RangeLock;
use crate::space::replace_pages_max;
use crate::sums::{block_sum, first_mismatch, region_of};
use crate::types::{ResolvedRef, BLOCK_SIZE};

/// Who opened a session, for lineage and `grove sessions`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionClient {
    /// "nbd", "iscsi", ...
    pub protocol: String,
    /// The peer address ("127.0.0.1:50312", "unix").
    pub address: String,
}

impl SessionClient {
    /// The session's changes and events are logged as made by `PROTOCOL:ADDRESS`.
    pub fn actor(&self) -> Arc<str> {
        Arc::from(format!("{}:{}", self.protocol, self.address))
    }
}

/// I/O counters of one session; monotonically increasing.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionCounters {
    pub read_ops: u64,
    pub read_bytes: u64,
    pub write_ops: u64,
    pub write_bytes: u64,
    pub zero_ops: u64,
    pub zero_bytes: u64,
    pub trim_ops: u64,
    pub trim_bytes: u64,
    pub flush_ops: u64,
}

#[derive(Default)]
pub(crate) struct AtomicCounters {
    pub read_ops: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_ops: AtomicU64,
    pub write_bytes: AtomicU64,
    pub zero_ops: AtomicU64,
    pub zero_bytes: AtomicU64,
    pub trim_ops: AtomicU64,
    pub trim_bytes: AtomicU64,
    pub flush_ops: AtomicU64,
}

impl AtomicCounters {
    pub fn snapshot(&self) -> SessionCounters {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SessionCounters {
            read_ops: load(&self.read_ops),
            read_bytes: load(&self.read_bytes),
            write_ops: load(&self.write_ops),
            write_bytes: load(&self.write_bytes),
            zero_ops: load(&self.zero_ops),
            zero_bytes: load(&self.zero_bytes),
            trim_ops: load(&self.trim_ops),
            trim_bytes: load(&self.trim_bytes),
            flush_ops: load(&self.flush_ops),
        }
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A live session as `grove sessions` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: u64,
    pub export: String,
    pub target: ResolvedRef,
    pub client: SessionClient,
    /// The job the session joined (`?job=ID` after the export name).
    pub job: Option<String>,
    pub opened_unix: u64,
    pub counters: SessionCounters,
}

/// A piece of a sparse read: data, or a run of zeros that need not be sent as bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadChunk {
    /// A slice of the request's one read buffer (cheap to clone and to send).
    Data(Bytes),
    Zero {
        len_bytes: u64,
    },
}

impl ReadChunk {
    pub fn len_bytes(&self) -> u64 {
        match self {
            ReadChunk::Data(data) => data.len() as u64,
            ReadChunk::Zero { len_bytes } => *len_bytes,
        }
    }
}

/// Allocation state of a byte range, as NBD's `base:allocation` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockStatus {
    pub len_bytes: u64,
    /// No data block backs the range (never written, trimmed or zeroed).
    pub hole: bool,
    /// The range reads as zeros.
    pub zero: bool,
}

/// How `write_zeroes` may store the zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroMode {
    /// Deallocate the range (metadata only; fast).
    MayTrim,
    /// Keep the range allocated: write zero-filled blocks (NBD's NO_HOLE).
    Allocate,
}

/// Writes of at least this many blocks over a range whose blocks are scattered (several runs,
/// owned or not) are redirected as a whole to a new extent rather than split into pieces.
const REDIRECT_SCATTERED_MIN_BLOCKS: u64 = 16;

/// Largest single write the engine buffers for zeroing with `ZeroMode::Allocate`.
const ZERO_CHUNK_BYTES: u64 = 8 << 20;

pub(crate) enum SessionTarget {
    /// A writable branch head.
    Head {
        id: u64,
        gate: Arc<tokio::sync::RwLock<()>>,
        ranges: Arc<RangeLock>,
    },
    /// A commit's fixed extent map.
    Commit { root: u64 },
}

/// An open I/O session on one ref. Share it between the tasks of one connection
/// (`Arc<Session>`); every method is safe to call concurrently.
///
/// Drive every I/O future to completion (run each request in its own task, as the NBD server
/// does): a write dropped while its data is in flight releases its range lock, its head's gate
/// and its grace guard early, so its data could land after a commit made that block shared, or
/// after the block was freed and reused.
pub struct Session {
    pub(crate) pool: Arc<PoolInner>,
    /// Where this session's requests are counted (per export and protocol).
    pub(crate) io: Arc<crate::metrics::ExportIo>,
    pub(crate) info: SessionInfo,
    /// A commit, a tag, or a protected branch: reads only.
    pub(crate) read_only: bool,
    /// On a candidate commit being checked: set once it is withdrawn.
    pub(crate) withdrawn: Option<Arc<std::sync::atomic::AtomicBool>>,
    pub(crate) counters: Arc<AtomicCounters>,
    pub(crate) size_bytes: u64,
    /// The volume stores and checks block checksums (`sums.rs`).
    pub(crate) checksums: bool,
    pub(crate) target: SessionTarget,
}

/// A block read back with content that does not match its checksum.
#[derive(Clone, Copy, Debug)]
struct BadBlock {
    lblock: u64,
    pblock: u64,
    stored: u32,
    computed: u32,
}

/// A run of logical blocks and where its data is.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Segment {
    pub lblock: u64,
    pub len: u64,
    /// First physical block, or `None` for zeros.
    pub pblock: Option<u64>,
    /// Generation the extent was written in; 0 for a range never written.
    pub birth: u64,
}

/// Splits `[first, end)` into data and zero segments from looked-up extents.
pub(crate) fn segments(extents: &[crate::meta::Extent], first: u64, end: u64) -> Vec<Segment> {
    let mut out = Vec::with_capacity(extents.len() * 2 + 1);
    let mut cursor = first;
    for e in extents {
        if e.lblock > cursor {
            out.push(Segment {
                lblock: cursor,
                len: e.lblock - cursor,
                pblock: None,
                birth: 0,
            });
        }
        let pblock = match e.target {
            Target::Data(p) => Some(p),
            Target::Zero => None,
        };
        out.push(Segment {
            lblock: e.lblock,
            len: e.len,
            pblock,
            birth: e.birth,
        });
        cursor = e.end();
    }
    if cursor < end {
        out.push(Segment {
            lblock: cursor,
            len: end - cursor,
            pblock: None,
            birth: 0,
        });
    }
    out
}

impl Session {
    pub fn id(&self) -> u64 {
        self.info.id
    }

    /// The export name the session was opened with.
    pub fn export_name(&self) -> &str {
        &self.info.export
    }

    pub fn target(&self) -> &ResolvedRef {
        &self.info.target
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn counters(&self) -> SessionCounters {
        self.counters.snapshot()
    }

    fn check_range(&self, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        match offset_bytes.checked_add(len_bytes) {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(Error::OutOfRange {
                offset_bytes,
                len_bytes,
                size_bytes: self.size_bytes,
            }),
        }
    }

    fn head(&self) -> Result<(u64, &tokio::sync::RwLock<()>, &RangeLock)> {
        match &self.target {
            SessionTarget::Head { .. } if self.read_only => Err(Error::ReadOnly(format!(
                "{} (a protected branch: only merges change it)",
                self.info.export
            ))),
            SessionTarget::Head { id, gate, ranges } => Ok((*id, gate, ranges)),
            SessionTarget::Commit { .. } => Err(Error::ReadOnly(self.info.export.clone())),
        }
    }

    fn root(&self, st: &crate::pool::State) -> Result<u64> {
        match &self.target {
            SessionTarget::Head { id, .. } => Ok(st.catalog.head(*id)?.record.root),
            SessionTarget::Commit { .. }
                if self
                    .withdrawn
                    .as_ref()
                    .is_some_and(|w| w.load(Ordering::Acquire)) =>
            {
                Err(Error::Conflict(format!(
                    "{} was a candidate commit, withdrawn when its check refused it",
                    self.info.export
                )))
            }
            SessionTarget::Commit { root } => Ok(*root),
        }
    }

    /// Reads `len_bytes` at `offset_bytes`; unwritten ranges read as zeros.
    pub async fn read(&self, offset_bytes: u64, len_bytes: u64) -> Result<Vec<u8>> {
        let chunks = self.read_chunks(offset_bytes, len_bytes).await?;
        Ok(flatten(chunks, len_bytes))
    }

    /// Reads a range as data chunks and runs of zeros (for sparse replies). The chunks cover the
    /// range exactly, in order.
    pub async fn read_chunks(&self, offset_bytes: u64, len_bytes: u64) -> Result<Vec<ReadChunk>> {
        let started = Instant::now();
        let result = self.read_chunks_unmeasured(offset_bytes, len_bytes).await;
        self.io
            .observe(RequestOp::Read, len_bytes, started.elapsed(), &result);
        result
    }

    async fn read_chunks_unmeasured(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<Vec<ReadChunk>> {
        self.check_range(offset_bytes, len_bytes)?;
        AtomicCounters::add(&self.counters.read_ops, 1);
        AtomicCounters::add(&self.counters.read_bytes, len_bytes);
        if let Some(job) = &self.info.job {
            self.pool
                .state
                .lock()
                .note_read(job, &self.info.target, len_bytes);
        }
        self.read_inner(offset_bytes, len_bytes, false).await
    }

    /// Reads a range, checking block checksums. `ranges_held`: the caller holds the head's range
    /// lock over it (a read-modify-write).
    async fn read_inner(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        ranges_held: bool,
    ) -> Result<Vec<ReadChunk>> {
        if let Ok(chunks) = self.read_once(offset_bytes, len_bytes).await? {
            return Ok(chunks);
        }
        // Reads take no range lock, so a read that crossed an in-place write of the same block
        // can pair the old checksum with new data: read once more with writes held off.
        let _range = match &self.target {
            SessionTarget::Head { ranges, .. } if !ranges_held => {
                let first = offset_bytes / BLOCK_SIZE;
                let end = (offset_bytes + len_bytes).div_ceil(BLOCK_SIZE);
                Some(ranges.lock(first, end).await)
            }
            _ => None,
        };
        self.read_once(offset_bytes, len_bytes)
            .await?
            .map_err(|bad| self.report_bad(bad))
    }

    /// Reads a range once; a block that fails its checksum comes back as `Ok(Err(..))`.
    async fn read_once(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<std::result::Result<Vec<ReadChunk>, BadBlock>> {
        if len_bytes == 0 {
            return Ok(Ok(Vec::new()));
        }
        let end_bytes = offset_bytes + len_bytes;
        let (first, end) = (offset_bytes / BLOCK_SIZE, end_bytes.div_ceil(BLOCK_SIZE));
        // Checked blocks are read whole, so the buffer starts at the first block.
        let verify = self.checksums;
        let base = if verify {
            first * BLOCK_SIZE
        } else {
            offset_bytes
        };
        let buf_len = if verify {
            (end - first) * BLOCK_SIZE
        } else {
            len_bytes
        };
        // The checksums of the data blocks read, in buffer order, and the runs they cover:
        // (buffer offset, first lblock, first pblock, blocks).
        let mut sums: Vec<u32> = Vec::new();
        let mut checks: Vec<(usize, u64, u64, u64)> = Vec::new();
        let (segs, _grace) = {
            let mut st = self.pool.state.lock();
            let root = self.root(&st)?;
            let extents = MapReader {
                store: &mut st.meta,
            }
            .lookup(root, first, end)
            .map_err(|e| self.pool.fail_meta(e))?;
            let segs = segments(&extents, first, end);
            if verify {
                for seg in &segs {
                    if let Some(p) = seg.pblock {
                        st.sums.get_run(p, seg.len, &mut sums)?;
                        let at = ((seg.lblock - first) * BLOCK_SIZE) as usize;
                        checks.push((at, seg.lblock, p, seg.len));
                    }
                }
            }
            (segs, self.pool.grace.enter())
        };
        // Lay the request out: byte ranges of data (with their file offsets) and of zeros.
        let mut pieces: Vec<Piece> = Vec::new();
        let mut layout: Vec<(u64, u64, bool)> = Vec::new();
        for seg in segs {
            let from = (seg.lblock * BLOCK_SIZE).max(offset_bytes);
            let to = ((seg.lblock + seg.len) * BLOCK_SIZE).min(end_bytes);
            if let Some(p) = seg.pblock {
                let (read_from, read_to) = if verify {
                    (seg.lblock * BLOCK_SIZE, (seg.lblock + seg.len) * BLOCK_SIZE)
                } else {
                    (from, to)
                };
                let file_offset = p * BLOCK_SIZE + (read_from - seg.lblock * BLOCK_SIZE);
                let buf_offset = (read_from - base) as usize;
                let len = (read_to - read_from) as usize;
                match pieces.last_mut() {
                    Some(last)
                        if last.buf_offset + last.len == buf_offset
                            && last.file_offset + last.len as u64 == file_offset =>
                    {
                        last.len += len;
                    }
                    _ => pieces.push(Piece {
                        file_offset,
                        buf_offset,
                        len,
                    }),
                }
            }
            match layout.last_mut() {
                Some((_, last_to, data)) if *data == seg.pblock.is_some() => *last_to = to,
                _ => layout.push((from, to, seg.pblock.is_some())),
            }
        }
        if pieces.is_empty() {
            return Ok(Ok(vec![ReadChunk::Zero { len_bytes }]));
        }
        let mut buf = self.pool.read_buffers.take(buf_len as usize);
        let done = match self
            .pool
            .backend
            .read_cached(FileKind::Data, &mut buf, &pieces)
        {
            Some(result) => IoDone { buf, result },
            None => {
                let op = IoOp::ReadMany {
                    file: FileKind::Data,
                    buf,
                    pieces,
                };
                io::run(&*self.pool.backend, op).await
            }
        };
        done.result.map_err(Error::Io)?;
        let mut next_sum = 0;
        for &(at, lblock, pblock, len) in &checks {
            let data = &done.buf[at..at + (len * BLOCK_SIZE) as usize];
            let want = &sums[next_sum..next_sum + len as usize];
            if let Some((i, got)) = first_mismatch(data, want) {
                let bad = BadBlock {
                    lblock: lblock + i as u64,
                    pblock: pblock + i as u64,
                    stored: want[i],
                    computed: got,
                };
                return Ok(Err(bad));
            }
            next_sum += len as usize;
        }
        let bytes = self.pool.read_buffers.freeze(done.buf, buf_len as usize);
        Ok(Ok(layout
            .into_iter()
            .map(|(from, to, data)| {
                let (a, b) = ((from - base) as usize, (to - base) as usize);
                if data {
                    ReadChunk::Data(bytes.slice(a..b))
                } else {
                    ReadChunk::Zero {
                        len_bytes: to - from,
                    }
                }
            })
            .collect()))
    }

    /// A block that failed its checksum: an error for the client, and (once per block while
    /// the pool is open) an error in the log and a `data.corrupted` event.
    fn report_bad(&self, bad: BadBlock) -> Error {
        let offset_bytes = bad.lblock * BLOCK_SIZE;
        self.pool.checksum_errors.fetch_add(1, Ordering::Relaxed);
        if self.pool.bad_blocks.lock().insert(bad.pblock) {
            tracing::error!(
                export = %self.info.export,
                offset_bytes,
                data_block = bad.pblock,
                stored = format_args!("{:08x}", bad.stored),
                computed = format_args!("{:08x}", bad.computed),
                "data block fails its checksum"
            );
            let event = Event::DataCorrupted {
                volume: self.info.target.volume().to_string(),
                export: self.info.export.clone(),
                offset_bytes,
                data_block: bad.pblock,
                found_by: "read".to_string(),
            };
            self.pool
                .state
                .lock()
                .pending_events
                .push((event, Some(self.info.client.actor())));
            self.pool.log_soon();
        }
        Error::corrupt(
            format!(
                "data block checksum mismatch (stored {:08x}, computed {:08x})",
                bad.stored, bad.computed
            ),
            format!(
                "{} offset {offset_bytes} (data block {})",
                self.info.export, bad.pblock
            ),
        )
    }

    /// Writes `data` at `offset_bytes`. Any alignment; sub-block writes read-modify-write inside
    /// the engine. With `fua`, the write is durable when this returns.
    pub async fn write(&self, offset_bytes: u64, data: &[u8], fua: bool) -> Result<()> {
        let started = Instant::now();
        let result = self.write_unmeasured(offset_bytes, data, fua).await;
        self.io.observe(
            RequestOp::Write,
            data.len() as u64,
            started.elapsed(),
            &result,
        );
        result
    }

    async fn write_unmeasured(&self, offset_bytes: u64, data: &[u8], fua: bool) -> Result<()> {
        self.head()?;
        self.check_range(offset_bytes, data.len() as u64)?;
        AtomicCounters::add(&self.counters.write_ops, 1);
        AtomicCounters::add(&self.counters.write_bytes, data.len() as u64);
        self.write_at(offset_bytes, data).await?;
        if fua {
            self.pool.flush().await?;
        }
        Ok(())
    }

    /// The work of a write, uncounted (write-zeroes uses it for partial blocks).
    async fn write_at(&self, offset_bytes: u64, data: &[u8]) -> Result<()> {
        let (id, gate, ranges) = self.head()?;
        self.check_range(offset_bytes, data.len() as u64)?;
        self.pool.check_writable()?;
        if !data.is_empty() {
            let end_bytes = offset_bytes + data.len() as u64;
            let (first, end) = (offset_bytes / BLOCK_SIZE, end_bytes.div_ceil(BLOCK_SIZE));
            let _range = ranges.lock(first, end).await;
            let _gate = gate.read().await;
            let blocks: Cow<[u8]> = if offset_bytes.is_multiple_of(BLOCK_SIZE)
                && end_bytes.is_multiple_of(BLOCK_SIZE)
            {
                Cow::Borrowed(data)
            } else {
                // Read-modify-write of the partial blocks at either edge.
                let mut full = vec![0u8; ((end - first) * BLOCK_SIZE) as usize];
                if !offset_bytes.is_multiple_of(BLOCK_SIZE) {
                    let old = flatten(
                        self.read_inner(first * BLOCK_SIZE, BLOCK_SIZE, true)
                            .await?,
                        BLOCK_SIZE,
                    );
                    full[..BLOCK_SIZE as usize].copy_from_slice(&old);
                }
                if !end_bytes.is_multiple_of(BLOCK_SIZE)
                    && (end - 1 > first || offset_bytes.is_multiple_of(BLOCK_SIZE))
                {
                    let old = flatten(
                        self.read_inner((end - 1) * BLOCK_SIZE, BLOCK_SIZE, true)
                            .await?,
                        BLOCK_SIZE,
                    );
                    let at = full.len() - BLOCK_SIZE as usize;
                    full[at..].copy_from_slice(&old);
                }
                let at = (offset_bytes - first * BLOCK_SIZE) as usize;
                full[at..at + data.len()].copy_from_slice(data);
                Cow::Owned(full)
            };
            self.write_blocks(id, first, &blocks).await?;
        }
        Ok(())
    }

    /// Decides where a write of `n` blocks from `first` goes: runs of (lblock, len, pblock,
    /// fresh), in place where the head owns the blocks, new blocks elsewhere (allocated and set
    /// aside here). The grace guard keeps freed blocks from reuse until the write is done.
    #[allow(clippy::type_complexity)]
    fn plan_write(
        &self,
        head_id: u64,
        first: u64,
        n: u64,
    ) -> Result<(Vec<(u64, u64, u64, bool)>, u64, String, GraceGuard<'_>)> {
        let mut runs: Vec<(u64, u64, u64, bool)> = Vec::new();
        let mut st = self.pool.state.lock();
        let head = st.catalog.head(head_id)?;
        let (root, exclusive_since, volume) = (
            head.record.root,
            head.record.exclusive_since,
            head.record.volume.clone(),
        );
        let extents = MapReader {
            store: &mut st.meta,
        }
        .lookup(root, first, first + n)
        .map_err(|e| self.pool.fail_meta(e))?;
        // Blocks the head owns are overwritten in place; the rest go to new blocks.
        let mut fresh: Vec<(u64, u64)> = Vec::new();
        for seg in segments(&extents, first, first + n) {
            match seg.pblock {
                Some(p) if seg.birth >= exclusive_since => match runs.last_mut() {
                    Some((l, len, q, _)) if *l + *len == seg.lblock && *q + *len == p => {
                        *len += seg.len
                    }
                    _ => runs.push((seg.lblock, seg.len, p, false)),
                },
                _ => match fresh.last_mut() {
                    Some((l, len)) if *l + *len == seg.lblock => *len += seg.len,
                    _ => fresh.push((seg.lblock, seg.len)),
                },
            }
        }
        if n >= REDIRECT_SCATTERED_MIN_BLOCKS && runs.len() + fresh.len() > 1 {
            // A large write over scattered blocks goes to one new extent instead: one I/O
            // rather than many small ones, and the range reads back contiguously. The
            // owned blocks it replaces are freed at the next sync point.
            runs.clear();
            fresh = vec![(first, n)];
        }
        // Large runs of new blocks pass over small free runs for room past the end
        // (`allocator::Fit::Whole`), where the data file can grow for them.
        let in_place = runs.len();
        let whole = st.data_may_grow();
        allocate_fresh(&mut st, &mut runs, &fresh, whole);
        // New blocks past the end of what the file system set aside grow the data file
        // first; if it cannot grow, the write fails here, before anything is written, unless
        // the small free runs passed over hold it.
        let mut reserved = st.reserve_data(&*self.pool.backend);
        if whole && matches!(reserved, Err(Error::NoSpace)) && st.data.free_inside() > 0 {
            st.data_cannot_grow();
            free_fresh(&mut st, &runs);
            runs.truncate(in_place);
            allocate_fresh(&mut st, &mut runs, &fresh, false);
            reserved = st.reserve_data(&*self.pool.backend);
        }
        if let Err(err) = reserved {
            free_fresh(&mut st, &runs);
            return Err(err);
        }
        Ok((runs, exclusive_since, volume, self.pool.grace.enter()))
    }

    /// Writes whole blocks from `first`: in place where the head alone owns the block, to new
    /// blocks elsewhere (redirect on write), then maps the new blocks.
    async fn write_blocks(&self, head_id: u64, first: u64, data: &[u8]) -> Result<()> {
        let n = data.len() as u64 / BLOCK_SIZE;
        let sums: Option<Vec<u32>> = self.checksums.then(|| {
            data.chunks_exact(BLOCK_SIZE as usize)
                .map(block_sum)
                .collect()
        });
        let (runs, exclusive_since, volume, _grace, _intent) = loop {
            let (runs, exclusive_since, volume, grace) = self.plan_write(head_id, first, n)?;
            // Blocks written in place change under checksums already durable: their regions
            // are recorded first, so that a crash makes them be computed again (`sums.rs`).
            let mut regions: Vec<u64> = runs
                .iter()
                .filter(|run| !run.3 && self.checksums)
                .flat_map(|&(_, len, p, _)| region_of(p)..=region_of(p + len - 1))
                .collect();
            regions.sort_unstable();
            regions.dedup();
            if regions.is_empty() {
                break (runs, exclusive_since, volume, grace, None);
            }
            let (intent, unrecorded) = self.pool.intent.begin(regions);
            if unrecorded.is_empty() {
                break (runs, exclusive_since, volume, grace, Some(intent));
            }
            // Recording waits for the sync lock, and a sync point holding it waits for grace
            // guards to end: give the new blocks and the guard back first, then plan again
            // (the range lock and the gate keep the plan from changing meanwhile).
            free_fresh(&mut self.pool.state.lock(), &runs);
            drop(grace);
            let pool = self.pool.clone();
            let recorded = run_blocking(move || pool.record_intent(&unrecorded)).await;
            drop(intent);
            recorded?;
        };
        let pieces: Vec<Piece> = runs
            .iter()
            .map(|&(l, len, p, _)| Piece {
                file_offset: p * BLOCK_SIZE,
                buf_offset: ((l - first) * BLOCK_SIZE) as usize,
                len: (len * BLOCK_SIZE) as usize,
            })
            .collect();
        // A small write goes into the page cache on this thread (`io::InlineWrites`); others
        // are submitted, with a buffer of their own: a pooled one, not a fresh megabyte mapped,
        // faulted in and unmapped for every large write.
        let written = match self.pool.backend.write_here(FileKind::Data, data, &pieces) {
            Some(result) => result,
            None => {
                // Large writes, in runs long enough, go past the page cache
                // (`io::DIRECT_WRITE_MIN_BYTES`), from memory aligned for it.
                let direct = data.len() >= io::DIRECT_WRITE_MIN_BYTES
                    && data.len() / runs.len().max(1) >= io::DIRECT_RUN_MIN_BYTES;
                let (mut buf, pad) = if direct {
                    self.pool.read_buffers.take_aligned(data.len())
                } else {
                    (self.pool.read_buffers.take(data.len()), 0)
                };
                buf[pad..pad + data.len()].copy_from_slice(data);
                let mut pieces = pieces;
                for piece in &mut pieces {
                    piece.buf_offset += pad;
                }
                let op = if direct {
                    IoOp::WriteDirect {
                        file: FileKind::Data,
                        buf,
                        pieces,
                    }
                } else {
                    IoOp::WriteMany {
                        file: FileKind::Data,
                        buf,
                        pieces,
                    }
                };
                let done = io::run(&*self.pool.backend, op).await;
                self.pool.read_buffers.give_back(done.buf);
                done.result
            }
        };
        let failure = written.err();
        let mut st = self.pool.state.lock();
        if let Some(err) = failure {
            // The new blocks were never mapped: nothing references them.
            free_fresh(&mut st, &runs);
            let err = Error::from_io(err);
            if !matches!(err, Error::NoSpace) {
                self.pool.poison(&err);
            }
            return Err(err);
        }
        let mut root = st.catalog.head(head_id)?.record.root;
        // The mapping's worst case in metadata pages must fit what is set aside: if not, the
        // write fails with its new blocks unmapped and the map unchanged.
        let fresh_runs = runs.iter().filter(|run| run.3).count() as u64;
        let height = MapReader {
            store: &mut st.meta,
        }
        .height(root)
        .map_err(|e| self.pool.fail_meta(e))?;
        if let Err(err) = st
            .meta
            .reserve_pages(fresh_runs * replace_pages_max(height), 0)
        {
            free_fresh(&mut st, &runs);
            return Err(err);
        }
        let mut mapped = 0;
        for &(l, len, p, fresh) in &runs {
            if fresh {
                let mut writer = MapWriter {
                    store: &mut st.meta,
                    exclusive_since,
                };
                let (new_root, removed) = writer
                    .replace(root, l, l + len, Some(Target::Data(p)))
                    .map_err(|e| self.pool.fail_meta(e))?;
                root = new_root;
                st.release_extents(&volume, &removed, exclusive_since);
                mapped += len;
            }
        }
        if let Some(vol) = st.catalog.volumes.get_mut(&volume) {
            vol.blocks += mapped;
        }
        // The checksums change with the mapping, and only after the data is written: a sync
        // point never sees one without the other.
        for &(l, len, p, _) in &runs {
            let stored = match &sums {
                Some(sums) => {
                    let at = (l - first) as usize;
                    st.sums.set_run(p, &sums[at..at + len as usize])
                }
                None => st.sums.clear_run(p, len),
            };
            stored.map_err(|e| self.pool.fail_meta(e))?;
        }
        {
            let mut bad = self.pool.bad_blocks.lock();
            if !bad.is_empty() {
                for &(_, len, p, _) in &runs {
                    bad.retain(|b| !(p..p + len).contains(b));
                }
            }
        }
        let head = st.catalog.head_mut(head_id)?;
        head.record.root = root;
        for &(l, len, _, _) in &runs {
            head.changed.insert_range(l..l + len);
        }
        st.dirty_heads.insert(head_id);
        st.note_writer(head_id, &self.info, data.len() as u64);
        Ok(())
    }

    /// Makes a range read as zeros.
    pub async fn write_zeroes(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> Result<()> {
        let started = Instant::now();
        let result = self
            .write_zeroes_unmeasured(offset_bytes, len_bytes, mode, fua)
            .await;
        self.io.observe(
            RequestOp::WriteZeroes,
            len_bytes,
            started.elapsed(),
            &result,
        );
        result
    }

    async fn write_zeroes_unmeasured(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> Result<()> {
        self.head()?;
        self.check_range(offset_bytes, len_bytes)?;
        AtomicCounters::add(&self.counters.zero_ops, 1);
        AtomicCounters::add(&self.counters.zero_bytes, len_bytes);
        let end_bytes = offset_bytes + len_bytes;
        match mode {
            ZeroMode::Allocate => {
                let mut at = offset_bytes;
                while at < end_bytes {
                    let len = (end_bytes - at).min(ZERO_CHUNK_BYTES);
                    self.write_at(at, &vec![0; len as usize]).await?;
                    at += len;
                }
            }
            ZeroMode::MayTrim => {
                let (first, end) = (offset_bytes.div_ceil(BLOCK_SIZE), end_bytes / BLOCK_SIZE);
                if first >= end {
                    self.write_at(offset_bytes, &vec![0; len_bytes as usize])
                        .await?;
                } else {
                    if offset_bytes < first * BLOCK_SIZE {
                        self.write_at(
                            offset_bytes,
                            &vec![0; (first * BLOCK_SIZE - offset_bytes) as usize],
                        )
                        .await?;
                    }
                    self.deallocate(first, end).await?;
                    if end * BLOCK_SIZE < end_bytes {
                        self.write_at(
                            end * BLOCK_SIZE,
                            &vec![0; (end_bytes - end * BLOCK_SIZE) as usize],
                        )
                        .await?;
                    }
                }
            }
        }
        if fua {
            self.pool.flush().await?;
        }
        Ok(())
    }

    /// Discards a range: whole blocks inside it are deallocated and read as zeros afterwards;
    /// partial blocks at the edges are left as they are (a trim is advisory).
    pub async fn trim(&self, offset_bytes: u64, len_bytes: u64, fua: bool) -> Result<()> {
        let started = Instant::now();
        let result = self.trim_unmeasured(offset_bytes, len_bytes, fua).await;
        self.io
            .observe(RequestOp::Trim, len_bytes, started.elapsed(), &result);
        result
    }

    async fn trim_unmeasured(&self, offset_bytes: u64, len_bytes: u64, fua: bool) -> Result<()> {
        self.head()?;
        self.check_range(offset_bytes, len_bytes)?;
        AtomicCounters::add(&self.counters.trim_ops, 1);
        AtomicCounters::add(&self.counters.trim_bytes, len_bytes);
        let (first, end) = (
            offset_bytes.div_ceil(BLOCK_SIZE),
            (offset_bytes + len_bytes) / BLOCK_SIZE,
        );
        if first < end {
            self.deallocate(first, end).await?;
        }
        if fua {
            self.pool.flush().await?;
        }
        Ok(())
    }

    /// Unmaps whole blocks `[first, end)`. A head with history keeps explicit zero extents so
    /// the change is recorded; one without history simply drops the mapping.
    async fn deallocate(&self, first: u64, end: u64) -> Result<()> {
        let (id, gate, ranges) = self.head()?;
        self.pool.check_writable()?;
        let _range = ranges.lock(first, end).await;
        let _gate = gate.read().await;
        let mut st = self.pool.state.lock();
        let head = st.catalog.head(id)?;
        let (root, exclusive_since, volume) = (
            head.record.root,
            head.record.exclusive_since,
            head.record.volume.clone(),
        );
        let has_history = head.record.base.is_some();
        let target = has_history.then_some(Target::Zero);
        // A trim frees space but needs metadata pages itself: refused cleanly when even the
        // reserve has none left (`space.rs`).
        let height = MapReader {
            store: &mut st.meta,
        }
        .height(root)
        .map_err(|e| self.pool.fail_meta(e))?;
        st.meta.reserve_pages(replace_pages_max(height), 0)?;
        let mut writer = MapWriter {
            store: &mut st.meta,
            exclusive_since,
        };
        let (root, removed) = writer
            .replace(root, first, end, target)
            .map_err(|e| self.pool.fail_meta(e))?;
        st.release_extents(&volume, &removed, exclusive_since);
        let head = st.catalog.head_mut(id)?;
        head.record.root = root;
        if has_history {
            head.changed.insert_range(first..end);
        } else {
            head.changed.remove_range(first..end);
        }
        st.dirty_heads.insert(id);
        st.note_writer(id, &self.info, (end - first) * BLOCK_SIZE);
        Ok(())
    }

    /// Makes every write acknowledged before this call durable, on this session and on every
    /// other session of the pool.
    pub async fn flush(&self) -> Result<()> {
        let started = Instant::now();
        let result = self.flush_unmeasured().await;
        self.io
            .observe(RequestOp::Flush, 0, started.elapsed(), &result);
        result
    }

    async fn flush_unmeasured(&self) -> Result<()> {
        AtomicCounters::add(&self.counters.flush_ops, 1);
        self.pool.flush().await
    }

    /// Prefetches the metadata for a range (NBD_CMD_CACHE).
    pub async fn cache(&self, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        self.block_status(offset_bytes, len_bytes).map(|_| ())
    }

    /// Allocation status of a range, as consecutive runs covering it exactly.
    pub fn block_status(&self, offset_bytes: u64, len_bytes: u64) -> Result<Vec<BlockStatus>> {
        let started = Instant::now();
        let result = self.block_status_unmeasured(offset_bytes, len_bytes);
        self.io.observe(
            RequestOp::BlockStatus,
            len_bytes,
            started.elapsed(),
            &result,
        );
        result
    }

    fn block_status_unmeasured(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<Vec<BlockStatus>> {
        self.check_range(offset_bytes, len_bytes)?;
        if len_bytes == 0 {
            return Ok(Vec::new());
        }
        let end_bytes = offset_bytes + len_bytes;
        let (first, end) = (offset_bytes / BLOCK_SIZE, end_bytes.div_ceil(BLOCK_SIZE));
        let extents = {
            let mut st = self.pool.state.lock();
            let root = self.root(&st)?;
            MapReader {
                store: &mut st.meta,
            }
            .lookup(root, first, end)
            .map_err(|e| self.pool.fail_meta(e))?
        };
        let mut out: Vec<BlockStatus> = Vec::new();
        for seg in segments(&extents, first, end) {
            let from = (seg.lblock * BLOCK_SIZE).max(offset_bytes);
            let to = ((seg.lblock + seg.len) * BLOCK_SIZE).min(end_bytes);
            let hole = seg.pblock.is_none();
            match out.last_mut() {
                Some(last) if last.hole == hole => last.len_bytes += to - from,
                _ => out.push(BlockStatus {
                    len_bytes: to - from,
                    hole,
                    zero: hole,
                }),
            }
        }
        Ok(out)
    }
}

/// Allocates new blocks for each (lblock, len) of `fresh`, adding their runs: large ones
/// whole where they can be if `whole`, else from the first free runs.
fn allocate_fresh(
    st: &mut crate::pool::State,
    runs: &mut Vec<(u64, u64, u64, bool)>,
    fresh: &[(u64, u64)],
    whole: bool,
) {
    for &(mut l, len) in fresh {
        let fit = if whole {
            Fit::for_request(len)
        } else {
            Fit::First
        };
        st.data.alloc_all(len, fit, |p, got| {
            runs.push((l, got, p, true));
            l += got;
        });
    }
}

/// Gives back the new blocks of a write that is not mapped: nothing references them.
fn free_fresh(st: &mut crate::pool::State, runs: &[(u64, u64, u64, bool)]) {
    for &(_, len, p, fresh) in runs {
        if fresh {
            st.data.free(p, len);
        }
    }
}

/// Joins read chunks into one buffer of `len_bytes`.
fn flatten(mut chunks: Vec<ReadChunk>, len_bytes: u64) -> Vec<u8> {
    if let [ReadChunk::Data(data)] = chunks.as_mut_slice() {
        return Vec::from(std::mem::take(data));
    }
    let mut out = Vec::with_capacity(len_bytes as usize);
    for chunk in chunks {
        match chunk {
            ReadChunk::Data(data) => out.extend_from_slice(&data),
            ReadChunk::Zero { len_bytes } => out.resize(out.len() + len_bytes as usize, 0),
        }
    }
    out
}

impl Drop for Session {
    fn drop(&mut self) {
        self.pool.sessions.lock().remove(&self.info.id);
        {
            let mut st = self.pool.state.lock();
            if let Some(vol) = st.catalog.volumes.get_mut(self.info.target.volume()) {
                vol.sessions = vol.sessions.saturating_sub(1);
            }
            let event = Event::SessionClosed {
                session: self.info.id,
                export: self.info.export.clone(),
                counters: self.counters.snapshot(),
            };
            st.pending_events
                .push((event, Some(self.info.client.actor())));
        }
        self.pool.log_soon();
    }
}
