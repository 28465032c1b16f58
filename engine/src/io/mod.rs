//! Disk I/O behind one trait. Three backends implement it:
//! - `uring`: io_uring through the `io-uring` crate, one ring owned by one thread;
//! - `threads`: a small pool of threads doing positional reads and writes, the portable fallback
//!   chosen automatically where io_uring is refused (a container's seccomp profile, old kernels);
//! - `sim`: in memory, with crash injection that drops or tears every write not yet covered by a
//!   completed sync. It is what makes crash tests possible.
//!
//! Operations pass owned buffers and get them back with the completion, so a buffer is never
//! freed or reused while the kernel may still touch it. Reads and writes that a thread only
//! waits for (metadata, checksums, the journal) run on that thread where the backend allows it
//! (`IoBackend::run_here`); a sync point's syncs are still submitted together. A short transfer
//! is retried for the rest; reading past the end of a file yields zeros (files are sparse).

pub mod sim;
pub mod threads;
pub mod uring;

use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::metrics::DISK_OPS_IN_FLIGHT;

/// The files of a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// Data blocks.
    Data = 0,
    /// Metadata pages: extent-map nodes and commit bitmaps.
    Meta = 1,
    /// The append-only journal of catalog changes and sync points.
    Journal = 2,
    /// Block checksums, indexed by data block (`sums.rs`).
    Sums = 3,
}

/// How many files a pool has.
pub const FILE_COUNT: usize = 4;

impl FileKind {
    pub const ALL: [FileKind; FILE_COUNT] = [
        FileKind::Data,
        FileKind::Meta,
        FileKind::Journal,
        FileKind::Sums,
    ];

    pub fn file_name(self) -> &'static str {
        match self {
            FileKind::Data => "data.grove",
            FileKind::Meta => "meta.grove",
            FileKind::Journal => "journal.grove",
            FileKind::Sums => "sums.grove",
        }
    }
}

/// One piece of a gather read or scatter write: `len` bytes at `file_offset` in the file,
/// at `buf_offset` in the operation's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub file_offset: u64,
    pub buf_offset: usize,
    pub len: usize,
}

#[derive(Debug)]
pub enum IoOp {
    /// Fill `buf` from `offset`.
    Read {
        file: FileKind,
        offset: u64,
        buf: Vec<u8>,
    },
    /// Write all of `buf` at `offset`.
    Write {
        file: FileKind,
        offset: u64,
        buf: Vec<u8>,
    },
    /// Fill the pieces of `buf` from their file offsets: one operation, one completion, for a
    /// request whose extents are scattered over the file.
    ReadMany {
        file: FileKind,
        buf: Vec<u8>,
        pieces: Vec<Piece>,
    },
    /// Write the pieces of `buf` to their file offsets.
    WriteMany {
        file: FileKind,
        buf: Vec<u8>,
        pieces: Vec<Piece>,
    },
    /// Write the pieces of `buf` to `file` past the page cache (`O_DIRECT`), for large data
    /// writes (see `DIRECT_WRITE_MIN_BYTES`). Only the data file is opened for
    /// it, and pieces must be aligned to `DIRECT_ALIGN` in memory and in the file: otherwise,
    /// or where the file system refuses, the write goes through the page cache as
    /// `WriteMany` would. Durable, like any write, only once the file is synced.
    WriteDirect {
        file: FileKind,
        buf: Vec<u8>,
        pieces: Vec<Piece>,
    },
    /// Make every completed write to `file` durable (fdatasync).
    Sync { file: FileKind },
}

/// Alignment of direct writes' memory, file offsets and lengths: the block size, a multiple of
/// every common device's logical block size.
pub const DIRECT_ALIGN: usize = 4096;

/// Data writes at least this long go past the page cache (`IoOp::WriteDirect`), to new blocks
/// or in place.
///
/// Why: writing blocks the page cache does not hold yet makes the kernel find a free page for
/// each, and on a virtual machine whose host takes back the guest's free memory (free page
/// reporting), touching such a page costs a fault on the host. Measured on such a 2-core VM
/// (Linux 6.18, ext4): 1 MiB writes to a new file ran at 272 MiB/s with 99% of a core in the
/// kernel, against 1,262 MiB/s at 18% straight to the disk. Blocks last written past the
/// cache are not cached either: 1 MiB writes over them in place through the page cache ran
/// at about 300 IOPS for their first 4 GiB, against about 2,000 past it; and where the pages
/// are cached, going past them was no slower (1 MiB sequential passes over a cached 4 GiB
/// volume: 1,563-1,810 IOPS against 1,574-1,575). Streaming writes are rarely read back at
/// once; small ones still go through the page cache, where reads find them.
pub const DIRECT_WRITE_MIN_BYTES: usize = 256 << 10;
/// ... and only when its runs average this long at least: a write scattered in small runs
/// would wait for the disk once per run.
pub const DIRECT_RUN_MIN_BYTES: usize = 64 << 10;

/// A pool's files, and its data file opened a second time for direct writes where that works.
/// Shared by the file-backed backends' threads.
pub(crate) struct Files {
    pub files: [std::fs::File; FILE_COUNT],
    pub direct_data: Option<std::fs::File>,
    /// Set once the file system refuses a direct write: later ones go through the page cache.
    direct_refused: std::sync::atomic::AtomicBool,
}

impl Files {
    pub fn new(files: [std::fs::File; FILE_COUNT], direct_data: Option<std::fs::File>) -> Self {
        Files {
            files,
            direct_data,
            direct_refused: Default::default(),
        }
    }

    pub fn get(&self, file: FileKind) -> &std::fs::File {
        &self.files[file as usize]
    }

    /// The descriptor to write the pieces of `buf` to `file` past the page cache, if they can
    /// be written that way.
    pub fn direct_for(
        &self,
        file: FileKind,
        buf: &[u8],
        pieces: &[Piece],
    ) -> Option<&std::fs::File> {
        if file != FileKind::Data || self.direct_refused() || !direct_aligned(buf, pieces) {
            return None;
        }
        self.direct_data.as_ref()
    }

    pub fn direct_refused(&self) -> bool {
        self.direct_refused.load(Ordering::Relaxed)
    }

    /// Notes that the file system refused a direct write (EINVAL).
    pub fn refuse_direct(&self) {
        if !self.direct_refused.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "the file system refused a direct write; large writes go through the page cache"
            );
        }
    }
}

/// True when every piece of `buf` can be written with `O_DIRECT`.
pub(crate) fn direct_aligned(buf: &[u8], pieces: &[Piece]) -> bool {
    let base = buf.as_ptr() as usize;
    IoOp::pieces_fit(buf, pieces)
        && pieces.iter().all(|p| {
            (base + p.buf_offset).is_multiple_of(DIRECT_ALIGN)
                && p.len.is_multiple_of(DIRECT_ALIGN)
                && p.file_offset.is_multiple_of(DIRECT_ALIGN as u64)
        })
}

/// The error of an operation with a piece outside its buffer (refused, never executed).
pub(crate) fn piece_outside_buffer() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "piece outside its buffer")
}

impl IoOp {
    /// Checks that every piece lies inside the buffer; backends rely on it.
    pub fn pieces_fit(buf: &[u8], pieces: &[Piece]) -> bool {
        pieces.iter().all(|p| {
            p.buf_offset
                .checked_add(p.len)
                .is_some_and(|end| end <= buf.len())
        })
    }
}

/// The result of an operation, with the buffer handed back.
pub struct IoDone {
    pub buf: Vec<u8>,
    pub result: io::Result<()>,
}

pub type Completion = Box<dyn FnOnce(IoDone) + Send>;

pub trait IoBackend: Send + Sync + 'static {
    /// "io_uring", "threads" or "sim".
    fn name(&self) -> &'static str;
    /// Starts `op`; `done` runs exactly once, on some backend thread, when it completes.
    fn submit(&self, op: IoOp, done: Completion);
    /// The current length of a file.
    fn file_len(&self, file: FileKind) -> io::Result<u64>;
    /// Shortens or extends a file (used to cut a torn journal tail).
    fn set_len(&self, file: FileKind, len: u64) -> io::Result<()>;

    /// Makes the file system set aside blocks for `len` bytes of `file` from `offset`
    /// (`fallocate`), so that later writes there cannot fail for lack of space. With
    /// `keep_size` the file's length is left as it is (the blocks wait beyond its end until
    /// writes reach them); without it the file is extended to cover the range. Blocks already
    /// set aside cost nothing more. A failure may leave part of the range set aside.
    /// `ErrorKind::Unsupported` where the backend or the file system cannot (see `space.rs`).
    fn allocate(&self, file: FileKind, offset: u64, len: u64, keep_size: bool) -> io::Result<()> {
        let _ = (file, offset, len, keep_size);
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Runs `op` on the calling thread, for I/O whose caller would only wait for it (metadata,
    /// checksum and journal I/O, often under the state lock). Handing it to another thread and
    /// waiting for the completion costs a wake-up each way, and each wake-up waits for a free
    /// core when requests keep every core busy: milliseconds, against microseconds for a write
    /// into the page cache. Measured on 2 cores, 1,000 commit deletes beside 4 KiB random reads
    /// at QD32: 585 of their sync points held the state lock (which every read takes) for over
    /// 0.5 ms with the hand-off, 17 without. `Err(op)` gives it back where the backend must see
    /// every operation through `submit` (the simulation, test wrappers): it is submitted then.
    fn run_here(&self, op: IoOp) -> Result<IoDone, IoOp> {
        Err(op)
    }

    /// Reads the pieces on the calling thread if, and only if, every byte is already in the
    /// page cache: never blocks. `None` means "not all cached (or not supported): submit it".
    /// Cached reads then run on every core instead of queueing behind one ring thread.
    fn read_cached(
        &self,
        file: FileKind,
        buf: &mut [u8],
        pieces: &[Piece],
    ) -> Option<io::Result<()>> {
        let _ = (file, buf, pieces);
        None
    }

    /// Writes the pieces of `buf` on the calling thread where that is cheaper than handing
    /// them over: a small write into the page cache (see `InlineWrites`). `None` means "not
    /// here (too large, paused, or not supported): submit it".
    fn write_here(&self, file: FileKind, buf: &[u8], pieces: &[Piece]) -> Option<io::Result<()>> {
        let _ = (file, buf, pieces);
        None
    }
}

/// Writes the pieces of `buf` with positional writes on the calling thread, when `buf` is
/// small enough (`INLINE_WRITE_MAX_BYTES`) and the pool's inline writes are not paused:
/// `None` means "submit it". The file-backed backends' `IoBackend::write_here`.
///
/// Why: a 4 KiB write into the page cache costs the kernel about 5 us on the caller's thread.
/// Through io_uring it costs far more on file systems that cannot write to the page cache
/// without blocking (ext4 refuses `RWF_NOWAIT` for buffered writes, so every such write is
/// handed to an io-wq worker): measured on 2 cores (Linux 6.18, ext4), 4 KiB random writes at
/// QD32 took 38-42 us of grove's CPU per request through the ring and 25-27 us here, and ran
/// at 27-30k IOPS against 37-39k.
///
/// A write that sleeps in the kernel (dirty-page throttling, memory reclaim) would hold up
/// every request sharing the caller's thread, so one that takes longer than
/// `INLINE_WRITE_SLOW` pauses inline writes for `INLINE_WRITE_PAUSE`: the writes of a
/// throttled pool wait in the ring's workers instead, beside reads that do not.
pub(crate) struct InlineWrites {
    epoch: std::time::Instant,
    /// Until when (nanoseconds since `epoch`) writes are submitted instead.
    paused_until_ns: std::sync::atomic::AtomicU64,
    /// Set while a write runs here. One at a time: a file system that serialises writes to a
    /// file (ext4 holds the inode's lock, also while the kernel throttles the writer) would
    /// hold a second caller's thread for nothing, and one thread held up leaves the others
    /// serving requests; a write that finds it set is submitted.
    busy: std::sync::atomic::AtomicBool,
}

/// Writes of at most this many bytes may run on the calling thread (`InlineWrites`); larger
/// ones are copied in the ring's workers, beside the caller.
pub const INLINE_WRITE_MAX_BYTES: usize = 64 << 10;
/// An inline write slower than this was held up by the kernel, not by copying. Well above a
/// time slice: on a busy machine a thread waits a few milliseconds for its core now and then
/// (seen about once a second at 2-4 ms on 2 cores), and that is no reason to stop.
pub const INLINE_WRITE_SLOW: std::time::Duration = std::time::Duration::from_millis(10);
/// How long inline writes stay paused after a slow one.
pub const INLINE_WRITE_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

impl InlineWrites {
    pub(crate) fn new() -> Self {
        InlineWrites {
            epoch: std::time::Instant::now(),
            paused_until_ns: Default::default(),
            busy: Default::default(),
        }
    }

    pub(crate) fn write(
        &self,
        file: &std::fs::File,
        buf: &[u8],
        pieces: &[Piece],
    ) -> Option<io::Result<()>> {
        use std::os::unix::fs::FileExt;
        if !IoOp::pieces_fit(buf, pieces) {
            return Some(Err(piece_outside_buffer()));
        }
        if buf.len() > INLINE_WRITE_MAX_BYTES
            || self.paused()
            || self.busy.swap(true, Ordering::Acquire)
        {
            return None;
        }
        let started = std::time::Instant::now();
        let result = pieces.iter().try_for_each(|p| {
            file.write_all_at(&buf[p.buf_offset..p.buf_offset + p.len], p.file_offset)
        });
        self.busy.store(false, Ordering::Release);
        self.note(started.elapsed());
        Some(result)
    }

    fn paused(&self) -> bool {
        let now = self.epoch.elapsed().as_nanos() as u64;
        now < self.paused_until_ns.load(Ordering::Relaxed)
    }

    /// Pauses inline writes after one that took `took`, if that was slow.
    fn note(&self, took: std::time::Duration) {
        if took > INLINE_WRITE_SLOW {
            let until = self.epoch.elapsed() + INLINE_WRITE_PAUSE;
            self.paused_until_ns
                .fetch_max(until.as_nanos() as u64, Ordering::Relaxed);
            tracing::debug!(
                took_us = took.as_micros() as u64,
                "a data write on the calling thread was held up; submitting writes for a while"
            );
        }
    }
}

/// `preadv2(RWF_NOWAIT)` of every piece: `None` as soon as one would block or come back short.
#[allow(unsafe_code)]
pub(crate) fn read_nowait(
    file: &std::fs::File,
    buf: &mut [u8],
    pieces: &[Piece],
) -> Option<io::Result<()>> {
    use std::os::fd::AsRawFd;
    if !IoOp::pieces_fit(buf, pieces) {
        return Some(Err(piece_outside_buffer()));
    }
    for p in pieces {
        let iov = libc::iovec {
            iov_base: buf[p.buf_offset..].as_mut_ptr().cast(),
            iov_len: p.len,
        };
        // SAFETY: `iov` points into `buf`, which is borrowed mutably for the whole call and
        // holds `p.len` bytes from `p.buf_offset` (checked above); the call is synchronous.
        let n = unsafe {
            libc::preadv2(
                file.as_raw_fd(),
                &iov,
                1,
                p.file_offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if n != p.len as isize {
            // Would block, short (end of file or partly cached), unsupported, or failed: the
            // submitted path handles every one of those properly.
            return None;
        }
    }
    Some(Ok(()))
}

/// Runs `op` and waits for it asynchronously.
pub async fn run(backend: &dyn IoBackend, op: IoOp) -> IoDone {
    let (tx, rx) = tokio::sync::oneshot::channel();
    DISK_OPS_IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
    backend.submit(
        op,
        Box::new(move |done| {
            DISK_OPS_IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
            // The receiver is gone only if the caller was cancelled; nothing to do then.
            let _ = tx.send(done);
        }),
    );
    match rx.await {
        Ok(done) => done,
        Err(_) => IoDone {
            buf: Vec::new(),
            result: Err(io::Error::other("I/O backend stopped")),
        },
    }
}

/// Runs `op` and blocks the calling thread until it completes: on this thread where the
/// backend can (`IoBackend::run_here`). For metadata I/O, which runs on blocking threads.
pub fn run_blocking(backend: &dyn IoBackend, op: IoOp) -> IoDone {
    DISK_OPS_IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
    let op = match backend.run_here(op) {
        Ok(done) => {
            DISK_OPS_IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
            return done;
        }
        Err(op) => op,
    };
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    backend.submit(
        op,
        Box::new(move |done| {
            DISK_OPS_IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
            let _ = tx.send(done);
        }),
    );
    rx.recv().unwrap_or_else(|_| IoDone {
        buf: Vec::new(),
        result: Err(io::Error::other("I/O backend stopped")),
    })
}

pub fn read_blocking(
    backend: &dyn IoBackend,
    file: FileKind,
    offset: u64,
    len: usize,
) -> io::Result<Vec<u8>> {
    let done = run_blocking(
        backend,
        IoOp::Read {
            file,
            offset,
            buf: vec![0; len],
        },
    );
    done.result.map(|()| done.buf)
}

pub fn write_blocking(
    backend: &dyn IoBackend,
    file: FileKind,
    offset: u64,
    buf: Vec<u8>,
) -> io::Result<()> {
    run_blocking(backend, IoOp::Write { file, offset, buf }).result
}

pub fn sync_blocking(backend: &dyn IoBackend, file: FileKind) -> io::Result<()> {
    run_blocking(backend, IoOp::Sync { file }).result
}

/// Syncs `files` concurrently and blocks until every sync has completed: one wait for the
/// slowest instead of one per file in turn, and the block layer may serve several with one
/// device cache flush. The first failure is returned, after all have completed.
pub fn sync_all_blocking(backend: &dyn IoBackend, files: &[FileKind]) -> io::Result<()> {
    let (tx, rx) = std::sync::mpsc::sync_channel(files.len());
    for &file in files {
        let tx = tx.clone();
        DISK_OPS_IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
        backend.submit(
            IoOp::Sync { file },
            Box::new(move |done| {
                DISK_OPS_IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
                let _ = tx.send(done.result);
            }),
        );
    }
    drop(tx);
    let mut outcome = Ok(());
    for _ in files {
        let result = rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("I/O backend stopped")));
        if outcome.is_ok() {
            outcome = result;
        }
    }
    outcome
}

/// Opens (creating if needed) the pool files in `dir` for a file-backed backend.
pub(crate) fn open_files(dir: &Path) -> io::Result<[std::fs::File; FILE_COUNT]> {
    let open = |kind: FileKind| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(kind.file_name()))
    };
    let data = open(FileKind::Data)?;
    advise_random(&data);
    Ok([
        data,
        open(FileKind::Meta)?,
        open(FileKind::Journal)?,
        open(FileKind::Sums)?,
    ])
}

/// The data file in `dir` opened a second time, with `O_DIRECT`, for `IoOp::WriteDirect`.
/// `None` unless the file system says (`statx`, `STATX_DIOALIGN`) that it does direct I/O
/// with alignments `DIRECT_ALIGN` meets, and pages are 4 KiB (with larger pages, a buffered
/// write to a neighbouring block shares the page a direct write must drop from the cache).
/// Without it, those writes go through the page cache.
pub(crate) fn open_direct(dir: &Path) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(FileKind::Data.file_name());
    let page_size = page_size();
    let alignment = direct_io_alignment(&path);
    let fits = |align: u32| align != 0 && DIRECT_ALIGN.is_multiple_of(align as usize);
    match alignment {
        Some((memory, offset)) if page_size == DIRECT_ALIGN && fits(memory) && fits(offset) => {}
        _ => {
            tracing::info!(
                page_size,
                alignment = ?alignment,
                "no direct I/O on the data file; large writes go through the page cache"
            );
            return None;
        }
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
    {
        Ok(file) => Some(file),
        Err(err) => {
            tracing::info!(error = %err, "no direct I/O on the data file; large writes go through the page cache");
            None
        }
    }
}

/// Turns off the kernel's readahead on the data file (`POSIX_FADV_RANDOM`).
///
/// The engine reads exactly the blocks a client asks for, and clients read ahead themselves.
/// Readahead fills the page cache with large folios (up to megabytes each on current kernels),
/// and a 4 KiB write into a cached large folio dirties, and writes back, all of it. Measured on
/// ext4 (Linux 6.18): 2,000 random 4 KiB writes dirtied 970 MiB after 1 MiB reads with
/// readahead, 7 MiB after the same reads without it; the benchmark's mixed workload (5) ran at
/// 22-24k IOPS after a read pass with readahead, 34-41k after one without. Advice only: a
/// failure changes nothing but speed.
#[allow(unsafe_code)]
fn advise_random(file: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise touches no memory of ours; the descriptor belongs to `file`, which
    // is borrowed for the whole call.
    let err = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    if err != 0 {
        tracing::debug!(
            error = %io::Error::from_raw_os_error(err),
            "posix_fadvise(RANDOM) on the data file failed"
        );
    }
}

/// Which backend to open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    Auto,
    IoUring,
    Threads,
}

/// Opens a file-backed backend on the pool files in `dir`. `Auto` tries io_uring first and
/// falls back to threads when the kernel refuses it.
pub fn open_backend(dir: &Path, choice: BackendChoice) -> io::Result<Arc<dyn IoBackend>> {
    let files = open_files(dir)?;
    let direct = open_direct(dir);
    match choice {
        BackendChoice::Threads => Ok(Arc::new(threads::ThreadsBackend::new(files, direct))),
        BackendChoice::IoUring => Ok(Arc::new(uring::UringBackend::new(files, direct)?)),
        BackendChoice::Auto => match uring::UringBackend::new(files, direct) {
            Ok(backend) => Ok(Arc::new(backend)),
            Err(err) => {
                tracing::warn!(error = %err, "io_uring is unavailable; using the thread-pool I/O backend");
                Ok(Arc::new(threads::ThreadsBackend::new(
                    open_files(dir)?,
                    open_direct(dir),
                )))
            }
        },
    }
}

/// `fallocate` on a pool file (see `IoBackend::allocate`); "not supported" errors come back as
/// `ErrorKind::Unsupported`.
#[allow(unsafe_code)]
pub(crate) fn fallocate(
    file: &std::fs::File,
    offset: u64,
    len: u64,
    keep_size: bool,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "range beyond the largest file offset",
        ));
    };
    let mode = if keep_size {
        libc::FALLOC_FL_KEEP_SIZE
    } else {
        0
    };
    loop {
        // SAFETY: fallocate touches no memory of ours; the descriptor belongs to `file`, which
        // is borrowed for the whole call.
        if unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EOPNOTSUPP | libc::ENOSYS) => {
                return Err(io::Error::new(io::ErrorKind::Unsupported, err))
            }
            _ => return Err(err),
        }
    }
}

/// The memory and file-offset alignments of direct I/O on `path` (`statx`), `None` where the
/// file system does no direct I/O or the kernel cannot say (before Linux 6.1).
#[allow(unsafe_code)]
fn direct_io_alignment(path: &Path) -> Option<(u32, u32)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: all-zero bytes are a valid `statx` (integers only).
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx writes only into `stx`, which we own; `path` is a valid C string.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            path.as_ptr(),
            0,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

#[allow(unsafe_code)]
fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the system.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(0)
}

/// Free bytes available to this process on the file system holding `dir`.
#[allow(unsafe_code)]
pub fn fs_available_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: statvfs writes only into the zeroed struct we pass; `path` is a valid C string.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `stat` lives across the call.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every backend, the file-backed ones each in a directory of its own under `dir`.
    fn backends(dir: &Path) -> Vec<Arc<dyn IoBackend>> {
        for sub in ["threads", "uring"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let mut out: Vec<Arc<dyn IoBackend>> = vec![
            Arc::new(threads::ThreadsBackend::new(
                open_files(&dir.join("threads")).unwrap(),
                open_direct(&dir.join("threads")),
            )),
            sim::SimDisk::new().backend(),
        ];
        let uring_dir = dir.join("uring");
        match uring::UringBackend::new(open_files(&uring_dir).unwrap(), open_direct(&uring_dir)) {
            Ok(backend) => out.push(Arc::new(backend)),
            Err(err) => eprintln!("io_uring unavailable here ({err}); testing the others"),
        }
        out
    }

    /// Completes every op on a thread of its own, later for earlier files; fails the sync of
    /// `failing`. Counts the completions.
    struct SlowSyncs {
        failing: FileKind,
        completed: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl IoBackend for SlowSyncs {
        fn name(&self) -> &'static str {
            "slow syncs"
        }
        fn submit(&self, op: IoOp, done: Completion) {
            let IoOp::Sync { file } = op else {
                panic!("only syncs here");
            };
            let (failing, completed) = (self.failing, self.completed.clone());
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(30 - 10 * file as u64));
                completed.fetch_add(1, Ordering::SeqCst);
                let result = match file == failing {
                    true => Err(io::Error::other("sync failed")),
                    false => Ok(()),
                };
                done(IoDone {
                    buf: Vec::new(),
                    result,
                });
            });
        }
        fn file_len(&self, _: FileKind) -> io::Result<u64> {
            Ok(0)
        }
        fn set_len(&self, _: FileKind, _: u64) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn syncing_files_together_waits_for_all_and_reports_a_failure() {
        let completed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let backend = SlowSyncs {
            failing: FileKind::Meta,
            completed: completed.clone(),
        };
        let files = [FileKind::Data, FileKind::Meta, FileKind::Sums];
        let err = sync_all_blocking(&backend, &files).unwrap_err();
        assert_eq!(err.to_string(), "sync failed");
        assert_eq!(completed.load(Ordering::SeqCst), 3);

        let backend = SlowSyncs {
            failing: FileKind::Journal,
            completed: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        };
        sync_all_blocking(&backend, &files).unwrap();
        // On the real backends too.
        let dir = tempfile::tempdir().unwrap();
        for backend in backends(dir.path()) {
            sync_all_blocking(&*backend, &files).unwrap();
        }
    }

    /// Submits `op` and waits, never on the calling thread.
    fn submitted(backend: &dyn IoBackend, op: IoOp) -> IoDone {
        let (tx, rx) = std::sync::mpsc::channel();
        backend.submit(op, Box::new(move |done| tx.send(done).unwrap()));
        rx.recv().unwrap()
    }

    /// Through `submit`: the ring's own paths (`run_blocking` would run them here).
    #[test]
    fn scatter_writes_and_gather_reads_on_every_backend() {
        let dir = tempfile::tempdir().unwrap();
        for backend in backends(dir.path()) {
            let buf: Vec<u8> = (0..3 * 4096).map(|i| (i / 4096 + 1) as u8).collect();
            let pieces = vec![
                Piece {
                    file_offset: 40960,
                    buf_offset: 0,
                    len: 4096,
                },
                Piece {
                    file_offset: 0,
                    buf_offset: 4096,
                    len: 8192,
                },
            ];
            let done = submitted(
                &*backend,
                IoOp::WriteMany {
                    file: FileKind::Data,
                    buf,
                    pieces,
                },
            );
            done.result.unwrap();
            // Read back in another order, with a piece past the end of the file (zeros).
            let pieces = vec![
                Piece {
                    file_offset: 4096,
                    buf_offset: 0,
                    len: 4096,
                },
                Piece {
                    file_offset: 40960,
                    buf_offset: 4096,
                    len: 4096,
                },
                Piece {
                    file_offset: 1 << 30,
                    buf_offset: 8192,
                    len: 4096,
                },
            ];
            let done = submitted(
                &*backend,
                IoOp::ReadMany {
                    file: FileKind::Data,
                    buf: vec![9; 3 * 4096],
                    pieces,
                },
            );
            done.result.unwrap();
            assert!(
                done.buf[..4096].iter().all(|&b| b == 3),
                "{}",
                backend.name()
            );
            assert!(
                done.buf[4096..8192].iter().all(|&b| b == 1),
                "{}",
                backend.name()
            );
            assert!(
                done.buf[8192..].iter().all(|&b| b == 0),
                "{}",
                backend.name()
            );
            // A piece outside its buffer is refused, not executed.
            let bad = vec![Piece {
                file_offset: 0,
                buf_offset: 4000,
                len: 200,
            }];
            let done = submitted(
                &*backend,
                IoOp::ReadMany {
                    file: FileKind::Data,
                    buf: vec![0; 4096],
                    pieces: bad,
                },
            );
            assert!(done.result.is_err(), "{}", backend.name());
        }
    }

    #[test]
    fn requests_with_more_pieces_than_the_completion_queue() {
        let dir = tempfile::tempdir().unwrap();
        for backend in backends(dir.path()) {
            // 4096 pieces of 512 bytes each, scattered in reverse order; several requests at once.
            let pieces = |n: usize| -> Vec<Piece> {
                (0..n)
                    .map(|i| Piece {
                        file_offset: ((n - 1 - i) * 1024) as u64,
                        buf_offset: i * 512,
                        len: 512,
                    })
                    .collect()
            };
            let buf: Vec<u8> = (0..4096 * 512).map(|i| (i / 512 % 251) as u8).collect();
            let done = submitted(
                &*backend,
                IoOp::WriteMany {
                    file: FileKind::Meta,
                    buf: buf.clone(),
                    pieces: pieces(4096),
                },
            );
            done.result.unwrap();
            let receivers: Vec<_> = (0..4)
                .map(|_| {
                    let (tx, rx) = std::sync::mpsc::channel();
                    let op = IoOp::ReadMany {
                        file: FileKind::Meta,
                        buf: vec![0; 4096 * 512],
                        pieces: pieces(4096),
                    };
                    backend.submit(op, Box::new(move |done| tx.send(done).unwrap()));
                    rx
                })
                .collect();
            for rx in receivers {
                let done = rx.recv().unwrap();
                done.result.unwrap();
                assert!(done.buf == buf, "{}", backend.name());
            }
        }
    }

    /// Counts what goes through `submit`; runs here what the wrapped backend runs here.
    struct CountingSubmits {
        inner: Arc<dyn IoBackend>,
        submits: std::sync::atomic::AtomicUsize,
    }

    impl IoBackend for CountingSubmits {
        fn name(&self) -> &'static str {
            self.inner.name()
        }
        fn submit(&self, op: IoOp, done: Completion) {
            self.submits.fetch_add(1, Ordering::SeqCst);
            self.inner.submit(op, done)
        }
        fn run_here(&self, op: IoOp) -> Result<IoDone, IoOp> {
            self.inner.run_here(op)
        }
        fn file_len(&self, file: FileKind) -> io::Result<u64> {
            self.inner.file_len(file)
        }
        fn set_len(&self, file: FileKind, len: u64) -> io::Result<()> {
            self.inner.set_len(file, len)
        }
    }

    #[test]
    fn blocking_io_runs_here_where_the_backend_can() {
        let dir = tempfile::tempdir().unwrap();
        for inner in backends(dir.path()) {
            let backend = CountingSubmits {
                inner,
                submits: Default::default(),
            };
            write_blocking(&backend, FileKind::Journal, 0, vec![3; 4096]).unwrap();
            assert_eq!(
                read_blocking(&backend, FileKind::Journal, 0, 4096).unwrap(),
                vec![3; 4096]
            );
            sync_blocking(&backend, FileKind::Journal).unwrap();
            let submits = backend.submits.load(Ordering::SeqCst);
            match backend.name() {
                "sim" => assert_eq!(submits, 3),
                name => assert_eq!(submits, 0, "{name}"),
            }
        }
    }

    #[test]
    fn running_here_and_submitting_see_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        for backend in backends(dir.path()) {
            let name = backend.name();
            let data: Vec<u8> = (0..8192).map(|i| (i % 251) as u8).collect();
            let write = IoOp::Write {
                file: FileKind::Meta,
                offset: 4096,
                buf: data.clone(),
            };
            let done = match backend.run_here(write) {
                Ok(done) => done,
                Err(op) => {
                    // Handed back whole, to be submitted.
                    assert_eq!(name, "sim");
                    let IoOp::Write { buf, offset, .. } = &op else {
                        panic!("{name}: another operation came back");
                    };
                    assert_eq!((buf, *offset), (&data, 4096));
                    submitted(&*backend, op)
                }
            };
            done.result.unwrap();
            // What one path wrote, the other reads; past the end of the file, zeros.
            let read = |offset| IoOp::Read {
                file: FileKind::Meta,
                offset,
                buf: vec![7; 4096],
            };
            let done = submitted(&*backend, read(8192));
            done.result.unwrap();
            assert_eq!(done.buf, data[4096..], "{name}");
            let done = submitted(
                &*backend,
                IoOp::Write {
                    file: FileKind::Meta,
                    offset: 0,
                    buf: vec![5; 4096],
                },
            );
            done.result.unwrap();
            for (offset, want) in [(0, vec![5; 4096]), (4096, data[..4096].to_vec())] {
                let done = run_blocking(&*backend, read(offset));
                done.result.unwrap();
                assert_eq!(done.buf, want, "{name}");
            }
            let done = run_blocking(&*backend, read(1 << 30));
            done.result.unwrap();
            assert!(done.buf.iter().all(|&b| b == 0), "{name}");
            run_blocking(
                &*backend,
                IoOp::Sync {
                    file: FileKind::Meta,
                },
            )
            .result
            .unwrap();
        }
    }

    #[test]
    fn small_writes_run_here_large_or_paused_ones_are_submitted() {
        let dir = tempfile::tempdir().unwrap();
        for backend in backends(dir.path()) {
            let name = backend.name();
            let data: Vec<u8> = (0..8192).map(|i| (i % 241) as u8).collect();
            // Scattered: the second half first.
            let pieces = [
                Piece {
                    file_offset: 4096,
                    buf_offset: 4096,
                    len: 4096,
                },
                Piece {
                    file_offset: 16384,
                    buf_offset: 0,
                    len: 4096,
                },
            ];
            match backend.write_here(FileKind::Data, &data, &pieces) {
                Some(result) => result.unwrap(),
                // The simulation must see every write through `submit`.
                None => {
                    assert_eq!(name, "sim");
                    continue;
                }
            }
            let read = |offset| read_blocking(&*backend, FileKind::Data, offset, 4096).unwrap();
            assert_eq!(read(4096), data[4096..], "{name}");
            assert_eq!(read(16384), data[..4096], "{name}");
            // A piece outside its buffer is refused, not written.
            let bad = [Piece {
                file_offset: 0,
                buf_offset: 8000,
                len: 4096,
            }];
            let refused = backend.write_here(FileKind::Data, &data, &bad);
            assert!(matches!(refused, Some(Err(_))), "{name}");
            // Too large to copy here.
            let large = vec![1u8; INLINE_WRITE_MAX_BYTES + 4096];
            let whole = [Piece {
                file_offset: 0,
                buf_offset: 0,
                len: large.len(),
            }];
            assert!(backend.write_here(FileKind::Data, &large, &whole).is_none());
        }
    }

    /// How many pages of the file at `path` in `offset..offset + len` the page cache holds.
    /// `offset` is page aligned.
    #[allow(unsafe_code)]
    fn cached_pages(path: &Path, offset: u64, len: usize) -> usize {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(path).unwrap();
        let page = 4096;
        let mut resident = vec![0u8; len.div_ceil(page)];
        // SAFETY: a read-only shared mapping of an open file, never dereferenced (mincore only
        // asks the kernel about its pages) and unmapped before returning; `resident` has a
        // byte for every page of it.
        let rc = unsafe {
            let addr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            );
            assert_ne!(addr, libc::MAP_FAILED, "{}", io::Error::last_os_error());
            let rc = libc::mincore(addr, len, resident.as_mut_ptr());
            libc::munmap(addr, len);
            rc
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        resident.iter().filter(|&&b| b & 1 != 0).count()
    }

    #[test]
    fn direct_writes_land_aligned_or_not_and_reads_through_the_cache_see_them() {
        let dir = tempfile::tempdir().unwrap();
        for backend in backends(dir.path()) {
            let name = backend.name();
            // Cached first: the direct write must replace what the page cache holds.
            write_blocking(&*backend, FileKind::Data, 0, vec![1; 64 << 10]).unwrap();
            assert_eq!(
                read_blocking(&*backend, FileKind::Data, 8192, 4096).unwrap(),
                vec![1; 4096]
            );
            // Aligned (the data at the first 4 KiB boundary of the buffer), two pieces in
            // reverse order, one past the end of the file.
            let mut buf = vec![0u8; 3 * DIRECT_ALIGN + DIRECT_ALIGN];
            let pad = (DIRECT_ALIGN - buf.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN;
            buf[pad..pad + DIRECT_ALIGN].fill(2);
            buf[pad + DIRECT_ALIGN..pad + 3 * DIRECT_ALIGN].fill(3);
            let aligned = vec![
                Piece {
                    file_offset: 1 << 20,
                    buf_offset: pad,
                    len: DIRECT_ALIGN,
                },
                Piece {
                    file_offset: 4096,
                    buf_offset: pad + DIRECT_ALIGN,
                    len: 2 * DIRECT_ALIGN,
                },
            ];
            assert!(direct_aligned(&buf, &aligned));
            let op = IoOp::WriteDirect {
                file: FileKind::Data,
                buf,
                pieces: aligned,
            };
            submitted(&*backend, op).result.unwrap();
            // Past the page cache indeed, where the file system allows it: nothing cached. The
            // kernel may fall back to the page cache for one (when it cannot drop cached pages
            // of the range), so a few blocks get a chance; none of them bypassing it is a bug.
            // Asked with mincore: a read, even RWF_NOWAIT, starts reading the page it misses,
            // and may find it there by the time it looks.
            let sub = if name == "threads" {
                "threads"
            } else {
                "uring"
            };
            let data_path = dir.path().join(sub).join(FileKind::Data.file_name());
            if name != "sim" && open_direct(&dir.path().join(sub)).is_some() {
                let bypassed = (0..4u64).any(|k| {
                    let file_offset = (2 << 20) + k * 65536;
                    let mut buf = vec![5u8; 2 * DIRECT_ALIGN];
                    let pad = (DIRECT_ALIGN - buf.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN;
                    buf.truncate(pad + DIRECT_ALIGN);
                    let pieces = vec![Piece {
                        file_offset,
                        buf_offset: pad,
                        len: DIRECT_ALIGN,
                    }];
                    let op = IoOp::WriteDirect {
                        file: FileKind::Data,
                        buf,
                        pieces,
                    };
                    submitted(&*backend, op).result.unwrap();
                    cached_pages(&data_path, file_offset, DIRECT_ALIGN) == 0
                });
                assert!(bypassed, "{name}: every direct write left its data cached");
            }
            // Not aligned in the file: written all the same, through the page cache.
            let odd = vec![4u8; DIRECT_ALIGN];
            let unaligned = vec![Piece {
                file_offset: 32768 + 100,
                buf_offset: 0,
                len: DIRECT_ALIGN,
            }];
            assert!(!direct_aligned(&odd, &unaligned));
            let op = IoOp::WriteDirect {
                file: FileKind::Data,
                buf: odd,
                pieces: unaligned,
            };
            submitted(&*backend, op).result.unwrap();
            let read = |offset| read_blocking(&*backend, FileKind::Data, offset, 4096).unwrap();
            assert_eq!(read(0), vec![1; 4096], "{name}");
            assert_eq!(read(4096), vec![3; 4096], "{name}");
            assert_eq!(read(8192), vec![3; 4096], "{name}");
            assert_eq!(read(12288), vec![1; 4096], "{name}");
            assert_eq!(read(32768 + 100), vec![4; 4096], "{name}");
            assert_eq!(read(1 << 20), vec![2; 4096], "{name}");
            sync_blocking(&*backend, FileKind::Data).unwrap();
        }
    }

    #[test]
    fn a_slow_inline_write_pauses_inline_writes_for_a_while() {
        let dir = tempfile::tempdir().unwrap();
        let file = tempfile::tempfile_in(dir.path()).unwrap();
        let inline = InlineWrites::new();
        let one = [Piece {
            file_offset: 0,
            buf_offset: 0,
            len: 4096,
        }];
        let buf = vec![7u8; 4096];
        assert!(inline.write(&file, &buf, &one).is_some());
        // Whatever that write took, from here on the pause follows `note` alone.
        inline.paused_until_ns.store(0, Ordering::Relaxed);
        // A time slice's wait is not a reason to stop.
        inline.note(INLINE_WRITE_SLOW / 2);
        assert!(!inline.paused());
        inline.note(INLINE_WRITE_SLOW + std::time::Duration::from_millis(1));
        assert!(inline.paused());
        assert!(inline.write(&file, &buf, &one).is_none());
        let until = inline.paused_until_ns.load(Ordering::Relaxed);
        let now = inline.epoch.elapsed().as_nanos() as u64;
        assert!(until > now && until <= now + INLINE_WRITE_PAUSE.as_nanos() as u64);
        // Once the pause is over, writes run here again.
        inline.paused_until_ns.store(now, Ordering::Relaxed);
        assert!(!inline.paused());
        // One at a time: while a write runs here, another is submitted.
        inline.busy.store(true, Ordering::Relaxed);
        assert!(inline.write(&file, &buf, &one).is_none());
        inline.busy.store(false, Ordering::Relaxed);
        // A piece outside its buffer is refused whatever the state.
        let bad = [Piece {
            file_offset: 0,
            buf_offset: 1,
            len: 4096,
        }];
        assert!(matches!(inline.write(&file, &buf, &bad), Some(Err(_))));
    }

    #[test]
    fn refused_direct_writes_go_through_the_page_cache_every_piece_and_later_ones_too() {
        // Stands in for a file system that refuses direct writes: a descriptor whose writes
        // the kernel refuses with EINVAL (our own OOM score adjustment, written with bytes
        // that are no number; nothing changes).
        let refusing = || {
            std::fs::OpenOptions::new()
                .write(true)
                .open("/proc/self/oom_score_adj")
                .ok()
        };
        if refusing().is_none() {
            eprintln!("no /proc/self/oom_score_adj here; skipped");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for sub in ["threads", "uring"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        let mut backends: Vec<Arc<dyn IoBackend>> = vec![Arc::new(threads::ThreadsBackend::new(
            open_files(&dir.path().join("threads")).unwrap(),
            refusing(),
        ))];
        let uring_dir = dir.path().join("uring");
        if let Ok(backend) = uring::UringBackend::new(open_files(&uring_dir).unwrap(), refusing()) {
            backends.push(Arc::new(backend));
        }
        for backend in backends {
            let name = backend.name();
            for round in 0..2u8 {
                // Three aligned pieces, all sent at once.
                let mut buf = vec![0u8; 3 * DIRECT_ALIGN + DIRECT_ALIGN];
                let pad = (DIRECT_ALIGN - buf.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN;
                for i in 0..3 {
                    let at = pad + i * DIRECT_ALIGN;
                    buf[at..at + DIRECT_ALIGN].fill(10 * round + i as u8 + 1);
                }
                let pieces: Vec<Piece> = (0..3)
                    .map(|i| Piece {
                        file_offset: (8 - 2 * i as u64) * 4096,
                        buf_offset: pad + i * DIRECT_ALIGN,
                        len: DIRECT_ALIGN,
                    })
                    .collect();
                let op = IoOp::WriteDirect {
                    file: FileKind::Data,
                    buf,
                    pieces,
                };
                submitted(&*backend, op).result.unwrap();
                for i in 0..3u64 {
                    let offset = (8 - 2 * i) * 4096;
                    let want = vec![10 * round + i as u8 + 1; 4096];
                    let read = read_blocking(&*backend, FileKind::Data, offset, 4096).unwrap();
                    assert_eq!(read, want, "{name}, round {round}, piece {i}");
                }
            }
        }
    }

    #[test]
    fn cached_reads_never_block_and_fall_back_when_they_cannot_finish() {
        let dir = tempfile::tempdir().unwrap();
        for backend in backends(dir.path()) {
            let data: Vec<u8> = (0..8192).map(|i| (i % 253) as u8).collect();
            write_blocking(&*backend, FileKind::Data, 4096, data.clone()).unwrap();
            let pieces = [
                Piece {
                    file_offset: 8192,
                    buf_offset: 0,
                    len: 4096,
                },
                Piece {
                    file_offset: 4096,
                    buf_offset: 4096,
                    len: 4096,
                },
            ];
            let mut buf = vec![0u8; 8192];
            match backend.read_cached(FileKind::Data, &mut buf, &pieces) {
                Some(result) => {
                    result.unwrap();
                    assert_eq!(&buf[..4096], &data[4096..], "{}", backend.name());
                    assert_eq!(&buf[4096..], &data[..4096], "{}", backend.name());
                }
                // The simulation has no page cache: it always submits.
                None => assert_eq!(backend.name(), "sim"),
            }
            // Past the end of the file the read comes back short: it must be submitted.
            let beyond = [Piece {
                file_offset: 1 << 30,
                buf_offset: 0,
                len: 4096,
            }];
            assert!(backend
                .read_cached(FileKind::Data, &mut buf[..4096], &beyond)
                .is_none());
        }
    }
}
