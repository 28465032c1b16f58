//! The portable backend: a fixed pool of threads doing positional I/O on the pool files.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

use super::{Completion, FileKind, Files, IoBackend, IoDone, IoOp};

/// Worker threads; enough to keep a queue depth of this many requests in the kernel.
pub const THREADS_WORKERS: usize = 16;

type Job = (IoOp, Completion);

pub struct ThreadsBackend {
    files: Arc<Files>,
    sender: Mutex<Option<mpsc::Sender<Job>>>,
    workers: Vec<thread::JoinHandle<()>>,
    inline_writes: super::InlineWrites,
}

impl ThreadsBackend {
    /// `direct`: the data file opened with `O_DIRECT`, if the file system allows it.
    pub fn new(files: [File; super::FILE_COUNT], direct: Option<File>) -> Self {
        let files = Arc::new(Files::new(files, direct));
        let (sender, receiver) = mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        let workers = (0..THREADS_WORKERS)
            .map(|i| {
                let files = files.clone();
                let receiver = receiver.clone();
                thread::Builder::new()
                    .name(format!("grove-io-{i}"))
                    .spawn(move || worker(&files, &receiver))
                    .expect("spawning an I/O thread at start-up")
            })
            .collect();
        ThreadsBackend {
            files,
            sender: Mutex::new(Some(sender)),
            workers,
            inline_writes: super::InlineWrites::new(),
        }
    }
}

fn worker(files: &Files, receiver: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        let job = {
            let Ok(receiver) = receiver.lock() else {
                return;
            };
            receiver.recv()
        };
        let Ok((op, done)) = job else { return };
        done(execute(files, op));
    }
}

/// Runs one operation with positional I/O: this backend's workers, and `run_here` on this and
/// the io_uring backend.
pub(crate) fn execute(all: &Files, op: IoOp) -> IoDone {
    let files = &all.files;
    match op {
        IoOp::Read {
            file,
            offset,
            mut buf,
        } => {
            let result = read_full(&files[file as usize], offset, &mut buf);
            IoDone { buf, result }
        }
        IoOp::Write { file, offset, buf } => {
            let result = files[file as usize].write_all_at(&buf, offset);
            IoDone { buf, result }
        }
        IoOp::ReadMany { buf, pieces, .. }
        | IoOp::WriteMany { buf, pieces, .. }
        | IoOp::WriteDirect { buf, pieces, .. }
            if !IoOp::pieces_fit(&buf, &pieces) =>
        {
            let err = super::piece_outside_buffer();
            IoDone {
                buf,
                result: Err(err),
            }
        }
        IoOp::ReadMany {
            file,
            mut buf,
            pieces,
        } => {
            let file = &files[file as usize];
            let result = pieces.iter().try_for_each(|p| {
                read_full(
                    file,
                    p.file_offset,
                    &mut buf[p.buf_offset..p.buf_offset + p.len],
                )
            });
            IoDone { buf, result }
        }
        IoOp::WriteMany { file, buf, pieces } => {
            let file = &files[file as usize];
            let result = pieces.iter().try_for_each(|p| {
                file.write_all_at(&buf[p.buf_offset..p.buf_offset + p.len], p.file_offset)
            });
            IoDone { buf, result }
        }
        IoOp::WriteDirect { file, buf, pieces } => {
            let buffered = all.get(file);
            let result = pieces.iter().try_for_each(|p| {
                let bytes = &buf[p.buf_offset..p.buf_offset + p.len];
                let direct = all.direct_for(file, &buf, std::slice::from_ref(p));
                match direct.map(|direct| direct.write_all_at(bytes, p.file_offset)) {
                    // The file system refused it: this piece and later ones through the page
                    // cache (rewriting what a partial direct write wrote is harmless).
                    Some(Err(err)) if err.raw_os_error() == Some(libc::EINVAL) => {
                        all.refuse_direct();
                        buffered.write_all_at(bytes, p.file_offset)
                    }
                    Some(result) => result,
                    None => buffered.write_all_at(bytes, p.file_offset),
                }
            });
            IoDone { buf, result }
        }
        IoOp::Sync { file } => IoDone {
            buf: Vec::new(),
            result: files[file as usize].sync_data(),
        },
    }
}

/// Reads until `buf` is full; past the end of the file the rest is zeros.
fn read_full(file: &File, mut offset: u64, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => {
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

impl IoBackend for ThreadsBackend {
    fn name(&self) -> &'static str {
        "threads"
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
        if let Some((_, done)) = rejected {
            done(IoDone {
                buf: Vec::new(),
                result: Err(io::Error::other("I/O backend stopped")),
            });
        }
    }

    fn run_here(&self, op: IoOp) -> Result<IoDone, IoOp> {
        Ok(execute(&self.files, op))
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
        pieces: &[super::Piece],
    ) -> Option<io::Result<()>> {
        super::read_nowait(self.files.get(file), buf, pieces)
    }

    fn write_here(
        &self,
        file: FileKind,
        buf: &[u8],
        pieces: &[super::Piece],
    ) -> Option<io::Result<()>> {
        self.inline_writes.write(self.files.get(file), buf, pieces)
    }
}

impl Drop for ThreadsBackend {
    fn drop(&mut self) {
        if let Ok(mut sender) = self.sender.lock() {
            sender.take();
        }
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}
