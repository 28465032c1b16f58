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

use super::{Completion, FileKind, IoBackend, IoDone, IoOp};

/// Submission queue entries of the ring.
pub const URING_ENTRIES: u32 = 256;
/// Requests in the kernel at once; one entry stays free for the wake-up read.
pub const URING_INFLIGHT_MAX: usize = URING_ENTRIES as usize - 1;
/// `user_data` of the eventfd read; slab keys are below it.
const WAKE_TOKEN: u64 = u64::MAX;

type Job = (IoOp, Completion);

pub struct UringBackend {
    files: Arc<[File; 3]>,
    sender: Mutex<Option<mpsc::Sender<Job>>>,
    wake: Arc<File>,
    stopping: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl UringBackend {
    /// Creates the ring; fails (so the caller can fall back) where the kernel refuses io_uring.
    pub fn new(files: [File; 3]) -> io::Result<Self> {
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
        let files = Arc::new(files);
        let (sender, receiver) = mpsc::channel::<Job>();
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = {
            let (files, wake, stopping) = (files.clone(), wake.clone(), stopping.clone());
            thread::Builder::new()
                .name("grove-uring".into())
                .spawn(move || RingThread::new(&files, &wake, receiver, &stopping).run(&mut ring))?
        };
        Ok(UringBackend {
            files,
            sender: Mutex::new(Some(sender)),
            wake,
            stopping,
            thread: Some(thread),
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

/// A request the kernel is working on.
struct InFlight {
    op: OpKind,
    file: FileKind,
    offset: u64,
    buf: Vec<u8>,
    /// Bytes already transferred; short transfers are resubmitted for the rest.
    done_bytes: usize,
    completion: Completion,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Read,
    Write,
    Sync,
}

struct RingThread<'a> {
    files: &'a [File; 3],
    wake: &'a File,
    receiver: mpsc::Receiver<Job>,
    stopping: &'a AtomicBool,
    slab: Vec<Option<InFlight>>,
    free_keys: Vec<usize>,
    /// Requests received but not yet in the kernel (the slab was full).
    backlog: std::collections::VecDeque<Job>,
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
}

impl<'a> RingThread<'a> {
    fn new(
        files: &'a [File; 3],
        wake: &'a File,
        receiver: mpsc::Receiver<Job>,
        stopping: &'a AtomicBool,
    ) -> Self {
        RingThread {
            files,
            wake,
            receiver,
            stopping,
            slab: (0..URING_INFLIGHT_MAX).map(|_| None).collect(),
            free_keys: (0..URING_INFLIGHT_MAX).rev().collect(),
            backlog: Default::default(),
            wake_buf: Box::new([0; 8]),
            wake_armed: false,
        }
    }

    fn inflight(&self) -> usize {
        URING_INFLIGHT_MAX - self.free_keys.len()
    }

    fn run(mut self, ring: &mut IoUring) {
        loop {
            let mut disconnected = false;
            loop {
                match self.receiver.try_recv() {
                    Ok(job) => self.backlog.push_back(job),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
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
                // operation: it is only dropped after `run` returns, and `run` returns only when
                // nothing is in flight. The slab keeps one entry free for this read.
                if unsafe { ring.submission().push(&read) }.is_ok() {
                    self.wake_armed = true;
                }
            }
            match ring.submit_and_wait(1) {
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
            for (key, result) in completions {
                if key == WAKE_TOKEN {
                    self.wake_armed = false;
                } else {
                    self.complete(ring, key as usize, result);
                }
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

    fn start(&mut self, ring: &mut IoUring, op: IoOp, completion: Completion) {
        let Some(key) = self.free_keys.pop() else {
            self.backlog.push_front((op, completion));
            return;
        };
        let (kind, file, offset, buf) = match op {
            IoOp::Read { file, offset, buf } => (OpKind::Read, file, offset, buf),
            IoOp::Write { file, offset, buf } => (OpKind::Write, file, offset, buf),
            IoOp::Sync { file } => (OpKind::Sync, file, 0, Vec::new()),
        };
        self.slab[key] = Some(InFlight {
            op: kind,
            file,
            offset,
            buf,
            done_bytes: 0,
            completion,
        });
        self.push(ring, key);
    }

    /// Pushes the (rest of the) request in `slab[key]` to the submission queue.
    fn push(&mut self, ring: &mut IoUring, key: usize) {
        let Some(req) = self.slab[key].as_mut() else {
            return;
        };
        let fd = types::Fd(self.files[req.file as usize].as_raw_fd());
        let rest = req.buf.len() - req.done_bytes;
        // Chunks above 1 GiB are split; the remainder goes as a short transfer would.
        let len = rest.min(1 << 30) as u32;
        let offset = req.offset + req.done_bytes as u64;
        let entry: squeue::Entry = match req.op {
            OpKind::Read => {
                // SAFETY: in bounds: done_bytes + len <= buf.len().
                let ptr = unsafe { req.buf.as_mut_ptr().add(req.done_bytes) };
                opcode::Read::new(fd, ptr, len).offset(offset).build()
            }
            OpKind::Write => {
                // SAFETY: in bounds: done_bytes + len <= buf.len().
                let ptr = unsafe { req.buf.as_ptr().add(req.done_bytes) };
                opcode::Write::new(fd, ptr, len).offset(offset).build()
            }
            OpKind::Sync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(key as u64);
        // SAFETY: the buffer is owned by `slab[key]` until this request's CQE is reaped and the
        // slab entry is taken; a Vec's heap memory does not move while the Vec itself does not
        // reallocate, and nothing resizes it in flight.
        let pushed = unsafe { ring.submission().push(&entry) }.is_ok();
        if !pushed {
            // The queue is sized above the slab, so this cannot happen; fail the request
            // rather than lose it.
            self.finish(key, Err(io::Error::other("io_uring submission queue full")));
        }
    }

    fn complete(&mut self, ring: &mut IoUring, key: usize, result: i32) {
        let Some(req) = self.slab.get_mut(key).and_then(|r| r.as_mut()) else {
            return;
        };
        if result < 0 {
            if -result == libc::EINTR || -result == libc::EAGAIN {
                self.push(ring, key);
                return;
            }
            self.finish(key, Err(io::Error::from_raw_os_error(-result)));
            return;
        }
        if req.op == OpKind::Sync {
            self.finish(key, Ok(()));
            return;
        }
        let n = result as usize;
        if n == 0 {
            if req.op == OpKind::Read {
                // End of file: the rest of a sparse file reads as zeros.
                let from = req.done_bytes;
                req.buf[from..].fill(0);
                self.finish(key, Ok(()));
            } else {
                self.finish(
                    key,
                    Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "write returned 0 bytes",
                    )),
                );
            }
            return;
        }
        req.done_bytes += n;
        if req.done_bytes < req.buf.len() {
            self.push(ring, key);
        } else {
            self.finish(key, Ok(()));
        }
    }

    fn finish(&mut self, key: usize, result: io::Result<()>) {
        if let Some(req) = self.slab[key].take() {
            self.free_keys.push(key);
            (req.completion)(IoDone {
                buf: req.buf,
                result,
            });
        }
    }

    fn fail_all(&mut self, err: io::Error) {
        // Nothing can be reaped from a ring that failed to enter; the buffers are leaked rather
        // than freed while the kernel might still use them.
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
            None => self.wake(),
        }
    }

    fn file_len(&self, file: FileKind) -> io::Result<u64> {
        Ok(self.files[file as usize].metadata()?.len())
    }

    fn set_len(&self, file: FileKind, len: u64) -> io::Result<()> {
        self.files[file as usize].set_len(len)
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
