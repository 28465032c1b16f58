//! The io_uring backend. One thread owns the ring: it takes requests from a channel, keeps them
//! in a bounded slab while the kernel works on them, and runs each completion when its CQE
//! arrives. Submitters wake the thread through an eventfd that the ring always has a read
//! pending on, so a new request never waits behind a slow one (an fsync) already in the kernel.
//!
//! Buffers are owned by the slab from submission to completion: the kernel never writes into
//! memory that was freed or handed back.

#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

use io_uring::{opcode, squeue, types, IoUring};

use super::{Completion, FileKind, Files, IoBackend, IoDone, IoOp, Piece};

/// Submission queue entries of the ring.
pub const URING_ENTRIES: u32 = 256;
/// Requests in the kernel at once; one entry stays free for the wake-up read.
pub const URING_INFLIGHT_MAX: usize = URING_ENTRIES as usize - 1;
/// Completion queue entries (the kernel's default: twice the submission queue); entries in
/// flight never exceed it, so completions are never dropped or refused.
pub const URING_COMPLETIONS_MAX: usize = 2 * URING_ENTRIES as usize;
/// `user_data` of the eventfd read; slab keys are below it.
const WAKE_TOKEN: u64 = u64::MAX;

type Job = (IoOp, Completion);

pub struct UringBackend {
    files: Arc<Files>,
    sender: Mutex<Option<mpsc::Sender<Job>>>,
    wake: Arc<File>,
    stopping: Arc<AtomicBool>,
    /// Set while the ring thread may block: only then does a submitter need to wake it.
    sleeping: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
    inline_writes: super::InlineWrites,
}

impl UringBackend {
    /// Creates the ring; fails (so the caller can fall back) where the kernel refuses io_uring.
    /// `direct`: the data file opened with `O_DIRECT`, if the file system allows it.
    pub fn new(files: [File; super::FILE_COUNT], direct: Option<File>) -> io::Result<Self> {
        let ring = IoUring::new(URING_ENTRIES)?;
        // Probe with a real no-op: some sandboxes allow io_uring_setup but refuse io_uring_enter.
        let mut ring = probe(ring)?;
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked below.
        let wake_fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if wake_fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `wake_fd` is a freshly created descriptor that nothing else owns.
        let wake = Arc::new(unsafe { File::from_raw_fd(wake_fd) });
        let files = Arc::new(Files::new(files, direct));
        let (sender, receiver) = mpsc::channel::<Job>();
        let stopping = Arc::new(AtomicBool::new(false));
        let sleeping = Arc::new(AtomicBool::new(false));
        let thread = {
            let (files, wake) = (files.clone(), wake.clone());
            let (stopping, sleeping) = (stopping.clone(), sleeping.clone());
            thread::Builder::new()
                .name("grove-uring".into())
                .spawn(move || {
                    RingThread::new(&files, &wake, receiver, &stopping, &sleeping).run(&mut ring)
                })?
        };
        Ok(UringBackend {
            files,
            sender: Mutex::new(Some(sender)),
            wake,
            stopping,
            sleeping,
            thread: Some(thread),
            inline_writes: super::InlineWrites::new(),
        })
    }

    fn wake(&self) {
        // A failed wake-up write can only mean the counter is saturated, which wakes the thread
        // anyway.
        let _ = (&*self.wake).write(&1u64.to_ne_bytes());
    }
}

fn probe(mut ring: IoUring) -> io::Result<IoUring> {
    let nop = opcode::Nop::new().build().user_data(0);
    // SAFETY: a NOP references no memory.
    unsafe { ring.submission().push(&nop) }.map_err(|_| io::Error::other("io_uring queue full"))?;
    ring.submit_and_wait(1)?;
    let result = ring
        .completion()
        .next()
        .map(|cqe| cqe.result())
        .unwrap_or(-libc::EIO);
    if result < 0 {
        return Err(io::Error::from_raw_os_error(-result));
    }
    Ok(ring)
}

/// A request the kernel is working on: one or more pieces, each its own SQE, all writing into
/// or reading from the request's one buffer. The request completes when every piece has.
struct InFlight {
    op: OpKind,
    file: FileKind,
    /// To be written through the data file's `O_DIRECT` descriptor (`IoOp::WriteDirect`).
    direct: bool,
    buf: Vec<u8>,
    pieces: Vec<PieceState>,
    /// Pieces not finished yet.
    remaining: usize,
    /// The first error of any piece.
    error: Option<io::Error>,
    completion: Completion,
}

struct PieceState {
    file_offset: u64,
    buf_offset: usize,
    len: usize,
    /// Bytes already transferred; a short transfer is resubmitted for the rest.
    done_bytes: usize,
    /// Submitted (last) through the `O_DIRECT` descriptor.
    direct: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Read,
    Write,
    Sync,
}

/// `user_data` layout: slab key in the low 16 bits, piece index above.
fn token(key: usize, piece: usize) -> u64 {
    key as u64 | ((piece as u64) << 16)
}

struct RingThread<'a> {
    files: &'a Files,
    wake: &'a File,
    receiver: mpsc::Receiver<Job>,
    stopping: &'a AtomicBool,
    sleeping: &'a AtomicBool,
    slab: Vec<Option<InFlight>>,
    free_keys: Vec<usize>,
    /// Requests received but not yet in the kernel (the slab was full).
    backlog: std::collections::VecDeque<Job>,
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
    /// Entries in the kernel whose completions are not reaped yet; kept within the completion
    /// queue so that it never overflows.
    entries_inflight: usize,
    /// Pieces waiting for room in the completion queue: (slab key, piece).
    deferred: std::collections::VecDeque<(usize, usize)>,
}

impl<'a> RingThread<'a> {
    fn new(
        files: &'a Files,
        wake: &'a File,
        receiver: mpsc::Receiver<Job>,
        stopping: &'a AtomicBool,
        sleeping: &'a AtomicBool,
    ) -> Self {
        RingThread {
            files,
            wake,
            receiver,
            stopping,
            sleeping,
            slab: (0..URING_INFLIGHT_MAX).map(|_| None).collect(),
            free_keys: (0..URING_INFLIGHT_MAX).rev().collect(),
            backlog: Default::default(),
            wake_buf: Box::new([0; 8]),
            wake_armed: false,
            entries_inflight: 0,
            deferred: Default::default(),
        }
    }

    fn inflight(&self) -> usize {
        URING_INFLIGHT_MAX - self.free_keys.len()
    }

    /// Moves received requests to the backlog; true when the channel is closed.
    fn receive(&mut self) -> bool {
        loop {
            match self.receiver.try_recv() {
                Ok(job) => self.backlog.push_back(job),
                Err(mpsc::TryRecvError::Empty) => return false,
                Err(mpsc::TryRecvError::Disconnected) => return true,
            }
        }
    }

    fn run(mut self, ring: &mut IoUring) {
        loop {
            let mut disconnected = self.receive();
            while !self.free_keys.is_empty() {
                let Some((op, completion)) = self.backlog.pop_front() else {
                    break;
                };
                self.start(ring, op, completion);
            }
            if (disconnected || self.stopping.load(Ordering::Acquire))
                && self.inflight() == 0
                && self.backlog.is_empty()
            {
                self.disarm(ring);
                return;
            }
            if !self.wake_armed {
                let read = opcode::Read::new(
                    types::Fd(self.wake.as_raw_fd()),
                    self.wake_buf.as_mut_ptr(),
                    8,
                )
                .build()
                .user_data(WAKE_TOKEN);
                // SAFETY: `wake_buf` is a boxed buffer owned by this thread that outlives the ring
                // operation: `run` ends only after `disarm` has reaped this read.
                if self.push_entry(ring, &read) {
                    self.wake_armed = true;
                }
            }
            // Tell submitters to wake us, then look once more, so that no request sent between
            // the look above and the sleep is missed.
            self.sleeping.store(true, Ordering::SeqCst);
            std::sync::atomic::fence(Ordering::SeqCst);
            disconnected |= self.receive();
            // Block unless a request can start now, or the thread can end: with the slab full,
            // or requests in flight while stopping, the next completion is what to wait for.
            let can_start = !self.backlog.is_empty() && !self.free_keys.is_empty();
            let stopping = disconnected || self.stopping.load(Ordering::Acquire);
            let can_end = stopping && self.inflight() == 0 && self.backlog.is_empty();
            let must_wait = !can_start && !can_end;
            let entered = if must_wait {
                ring.submit_and_wait(1)
            } else {
                ring.submit()
            };
            self.sleeping.store(false, Ordering::SeqCst);
            match entered {
                Ok(_) => {}
                Err(err)
                    if err.raw_os_error() == Some(libc::EINTR)
                        || err.raw_os_error() == Some(libc::EBUSY) => {}
                Err(err) => {
                    tracing::error!(error = %err, "io_uring_enter failed");
                    self.fail_all(err);
                    return;
                }
            }
            let completions: Vec<(u64, i32)> = ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result()))
                .collect();
            self.entries_inflight -= completions.len();
            for (token, result) in completions {
                if token == WAKE_TOKEN {
                    self.wake_armed = false;
                } else {
                    self.complete(
                        ring,
                        (token & 0xffff) as usize,
                        (token >> 16) as usize,
                        result,
                    );
                }
            }
            while self.entries_inflight + 1 < URING_COMPLETIONS_MAX {
                let Some((key, piece)) = self.deferred.pop_front() else {
                    break;
                };
                self.push_piece(ring, key, piece);
            }
        }
    }

    /// Completes the pending eventfd read, so that the kernel holds no pointer into `wake_buf`
    /// when the thread ends.
    fn disarm(&mut self, ring: &mut IoUring) {
        while self.wake_armed {
            let _ = (&*self.wake).write(&1u64.to_ne_bytes());
            if let Err(err) = ring.submit_and_wait(1) {
                if err.raw_os_error() != Some(libc::EINTR) {
                    // The ring is unusable; leak the buffer rather than free it under the kernel.
                    std::mem::forget(std::mem::take(&mut self.wake_buf));
                    return;
                }
            }
            for cqe in ring.completion() {
                if cqe.user_data() == WAKE_TOKEN {
                    self.wake_armed = false;
                }
            }
        }
    }

    /// Pushes an entry, first handing queued entries to the kernel if the queue is full.
    fn push_entry(&mut self, ring: &mut IoUring, entry: &squeue::Entry) -> bool {
        for _ in 0..2 {
            // SAFETY: callers guarantee that every buffer an entry points to stays owned and
            // unmoved until its completion is reaped (see `push_piece` and `run`).
            if unsafe { ring.submission().push(entry) }.is_ok() {
                self.entries_inflight += 1;
                return true;
            }
            if ring.submit().is_err() {
                return false;
            }
        }
        false
    }

    fn start(&mut self, ring: &mut IoUring, op: IoOp, completion: Completion) {
        let Some(key) = self.free_keys.pop() else {
            self.backlog.push_front((op, completion));
            return;
        };
        let whole = |offset: u64, len: usize| {
            vec![PieceState {
                file_offset: offset,
                buf_offset: 0,
                len,
                done_bytes: 0,
                direct: false,
            }]
        };
        let to_state = |pieces: Vec<Piece>| -> Vec<PieceState> {
            pieces
                .into_iter()
                .map(|p| PieceState {
                    file_offset: p.file_offset,
                    buf_offset: p.buf_offset,
                    len: p.len,
                    done_bytes: 0,
                    direct: false,
                })
                .collect()
        };
        let mut direct = false;
        let (kind, file, pieces, buf) = match op {
            IoOp::Read { file, offset, buf } => (OpKind::Read, file, whole(offset, buf.len()), buf),
            IoOp::Write { file, offset, buf } => {
                (OpKind::Write, file, whole(offset, buf.len()), buf)
            }
            IoOp::ReadMany { buf, pieces, .. }
            | IoOp::WriteMany { buf, pieces, .. }
            | IoOp::WriteDirect { buf, pieces, .. }
                if !IoOp::pieces_fit(&buf, &pieces) =>
            {
                self.free_keys.push(key);
                completion(IoDone {
                    buf,
                    result: Err(super::piece_outside_buffer()),
                });
                return;
            }
            IoOp::ReadMany { file, buf, pieces } => (OpKind::Read, file, to_state(pieces), buf),
            IoOp::WriteMany { file, buf, pieces } => (OpKind::Write, file, to_state(pieces), buf),
            IoOp::WriteDirect { file, buf, pieces } => {
                direct = self.files.direct_for(file, &buf, &pieces).is_some();
                (OpKind::Write, file, to_state(pieces), buf)
            }
            IoOp::Sync { file } => (OpKind::Sync, file, Vec::new(), Vec::new()),
        };
        let count = if kind == OpKind::Sync {
            1
        } else {
            pieces.len()
        };
        self.slab[key] = Some(InFlight {
            op: kind,
            file,
            direct,
            buf,
            pieces,
            remaining: count,
            error: None,
            completion,
        });
        if count == 0 {
            self.finish(key);
            return;
        }
        for piece in 0..count {
            self.push_piece(ring, key, piece);
        }
    }

    /// Pushes the (rest of the) piece `piece` of `slab[key]` to the submission queue.
    fn push_piece(&mut self, ring: &mut IoUring, key: usize, piece: usize) {
        // One entry stays free for the wake-up read.
        if self.entries_inflight + 1 >= URING_COMPLETIONS_MAX {
            self.deferred.push_back((key, piece));
            return;
        }
        let Some(req) = self.slab[key].as_mut() else {
            return;
        };
        let direct = match &self.files.direct_data {
            Some(file) if req.direct && !self.files.direct_refused() => Some(file),
            _ => None,
        };
        if let Some(p) = req.pieces.get_mut(piece) {
            p.direct = direct.is_some();
        }
        let fd = types::Fd(direct.unwrap_or(self.files.get(req.file)).as_raw_fd());
        let entry: squeue::Entry = match req.op {
            OpKind::Sync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            op => {
                let p = &req.pieces[piece];
                let rest = p.len - p.done_bytes;
                // Chunks above 1 GiB are split; the remainder goes as a short transfer would.
                let len = rest.min(1 << 30) as u32;
                let offset = p.file_offset + p.done_bytes as u64;
                let at = p.buf_offset + p.done_bytes;
                if op == OpKind::Read {
                    // SAFETY: in bounds: pieces were checked to fit the buffer at `start`.
                    let ptr = unsafe { req.buf.as_mut_ptr().add(at) };
                    opcode::Read::new(fd, ptr, len).offset(offset).build()
                } else {
                    // SAFETY: as above.
                    let ptr = unsafe { req.buf.as_ptr().add(at) };
                    opcode::Write::new(fd, ptr, len).offset(offset).build()
                }
            }
        }
        .user_data(token(key, piece));
        // The buffer is owned by `slab[key]` until every piece's CQE is reaped and the entry is
        // taken in `finish`; a Vec's heap memory does not move while nothing resizes it.
        if !self.push_entry(ring, &entry) {
            self.piece_done(
                key,
                Some(io::Error::other("io_uring submission queue full")),
            );
        }
    }

    fn complete(&mut self, ring: &mut IoUring, key: usize, piece: usize, result: i32) {
        let Some(req) = self.slab.get_mut(key).and_then(|r| r.as_mut()) else {
            return;
        };
        if result < 0 {
            if -result == libc::EINVAL && req.pieces.get(piece).is_some_and(|p| p.direct) {
                // The file system refused a direct write: this piece, and every piece sent
                // from now on, goes through the page cache.
                self.files.refuse_direct();
                self.push_piece(ring, key, piece);
            } else if -result == libc::EINTR || -result == libc::EAGAIN {
                self.push_piece(ring, key, piece);
            } else {
                self.piece_done(key, Some(io::Error::from_raw_os_error(-result)));
            }
            return;
        }
        if req.op == OpKind::Sync {
            self.piece_done(key, None);
            return;
        }
        let Some(p) = req.pieces.get_mut(piece) else {
            return;
        };
        let n = result as usize;
        if n == 0 {
            if req.op == OpKind::Read {
                // End of file: the rest of a sparse file reads as zeros.
                let (from, to) = (p.buf_offset + p.done_bytes, p.buf_offset + p.len);
                // SAFETY: `from..to` is inside the buffer (pieces were checked at `start`) and
                // belongs to this piece alone; the kernel may be writing other pieces of the
                // same buffer, so no reference to the whole buffer is formed.
                unsafe { std::ptr::write_bytes(req.buf.as_mut_ptr().add(from), 0, to - from) };
                self.piece_done(key, None);
            } else {
                self.piece_done(
                    key,
                    Some(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "write returned 0 bytes",
                    )),
                );
            }
            return;
        }
        p.done_bytes += n;
        if p.done_bytes < p.len {
            self.push_piece(ring, key, piece);
        } else {
            self.piece_done(key, None);
        }
    }

    fn piece_done(&mut self, key: usize, error: Option<io::Error>) {
        let Some(req) = self.slab[key].as_mut() else {
            return;
        };
        if let Some(error) = error {
            req.error.get_or_insert(error);
        }
        req.remaining -= 1;
        if req.remaining == 0 {
            self.finish(key);
        }
    }

    fn finish(&mut self, key: usize) {
        if let Some(req) = self.slab[key].take() {
            self.free_keys.push(key);
            let result = match req.error {
                Some(err) => Err(err),
                None => Ok(()),
            };
            (req.completion)(IoDone {
                buf: req.buf,
                result,
            });
        }
    }

    fn fail_all(&mut self, err: io::Error) {
        // Nothing can be reaped from a ring that failed to enter; the buffers are leaked rather
        // than freed while the kernel might still use them.
        if self.wake_armed {
            std::mem::forget(std::mem::take(&mut self.wake_buf));
        }
        self.deferred.clear();
        for slot in self.slab.iter_mut() {
            if let Some(req) = slot.take() {
                let InFlight {
                    buf, completion, ..
                } = req;
                std::mem::forget(buf);
                completion(IoDone {
                    buf: Vec::new(),
                    result: Err(io::Error::new(err.kind(), err.to_string())),
                });
            }
        }
        while let Some((_, completion)) = self.backlog.pop_front() {
            completion(IoDone {
                buf: Vec::new(),
                result: Err(io::Error::new(err.kind(), err.to_string())),
            });
        }
    }
}

impl IoBackend for UringBackend {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn submit(&self, op: IoOp, done: Completion) {
        let sender = self.sender.lock().ok().and_then(|s| s.clone());
        let rejected = match sender {
            Some(sender) => sender
                .send((op, done))
                .err()
                .map(|mpsc::SendError(job)| job),
            None => Some((op, done)),
        };
        match rejected {
            Some((_, done)) => done(IoDone {
                buf: Vec::new(),
                result: Err(io::Error::other("I/O backend stopped")),
            }),
            None => {
                // Pairs with the fence in `run`: either the ring thread sees this request before
                // it sleeps, or this sees `sleeping` and wakes it.
                std::sync::atomic::fence(Ordering::SeqCst);
                if self.sleeping.load(Ordering::SeqCst) {
                    self.wake();
                }
            }
        }
    }

    fn run_here(&self, op: IoOp) -> Result<IoDone, IoOp> {
        // Positional I/O on the calling thread: a small write into the page cache takes
        // microseconds, a trip through the ring and back two wake-ups.
        Ok(super::threads::execute(&self.files, op))
    }

    fn file_len(&self, file: FileKind) -> io::Result<u64> {
        Ok(self.files.get(file).metadata()?.len())
    }

    fn set_len(&self, file: FileKind, len: u64) -> io::Result<()> {
        self.files.get(file).set_len(len)
    }

    fn allocate(&self, file: FileKind, offset: u64, len: u64, keep_size: bool) -> io::Result<()> {
        super::fallocate(self.files.get(file), offset, len, keep_size)
    }

    fn read_cached(
        &self,
        file: FileKind,
        buf: &mut [u8],
        pieces: &[Piece],
    ) -> Option<io::Result<()>> {
        super::read_nowait(self.files.get(file), buf, pieces)
    }

    fn write_here(&self, file: FileKind, buf: &[u8], pieces: &[Piece]) -> Option<io::Result<()>> {
        self.inline_writes.write(self.files.get(file), buf, pieces)
    }
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        if let Ok(mut sender) = self.sender.lock() {
            sender.take();
        }
        self.stopping.store(true, Ordering::Release);
        self.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
