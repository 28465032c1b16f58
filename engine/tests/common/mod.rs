//! A backend wrapper for tests that need an operation to stop at an exact point: it can run a
//! hook when the next data sync completes, and fail metadata writes on demand.

#![allow(dead_code, clippy::unwrap_used)]

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use grove_engine::io::{Completion, FileKind, IoBackend, IoDone, IoOp};

#[derive(Default)]
pub struct Hooks {
    /// Runs on the syncing thread right after the next data fdatasync completes.
    pub after_data_sync: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Fails every metadata write with ENOSPC while set.
    pub fail_meta_writes: AtomicBool,
}

pub struct HookBackend {
    pub inner: Arc<dyn IoBackend>,
    pub hooks: Arc<Hooks>,
}

impl IoBackend for HookBackend {
    fn name(&self) -> &'static str {
        "hooked"
    }

    fn submit(&self, op: IoOp, done: Completion) {
        match &op {
            IoOp::Sync {
                file: FileKind::Data,
            } => {
                if let Some(hook) = self.hooks.after_data_sync.lock().unwrap().take() {
                    let wrapped: Completion = Box::new(move |result| {
                        hook();
                        done(result)
                    });
                    return self.inner.submit(op, wrapped);
                }
            }
            IoOp::Write {
                file: FileKind::Meta,
                ..
            }
            | IoOp::WriteMany {
                file: FileKind::Meta,
                ..
            } if self.hooks.fail_meta_writes.load(Ordering::SeqCst) => {
                let enospc = io::Error::from_raw_os_error(libc_enospc());
                return done(IoDone {
                    buf: Vec::new(),
                    result: Err(enospc),
                });
            }
            _ => {}
        }
        self.inner.submit(op, done)
    }

    fn file_len(&self, file: FileKind) -> io::Result<u64> {
        self.inner.file_len(file)
    }

    fn set_len(&self, file: FileKind, len: u64) -> io::Result<()> {
        self.inner.set_len(file, len)
    }
}

fn libc_enospc() -> i32 {
    28
}

/// A pause point: the hook blocks until the test lets it go.
pub fn pause_after_data_sync(
    hooks: &Hooks,
) -> (std::sync::mpsc::Receiver<()>, std::sync::mpsc::Sender<()>) {
    let (reached_tx, reached_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    *hooks.after_data_sync.lock().unwrap() = Some(Box::new(move || {
        let _ = reached_tx.send(());
        let _ = go_rx.recv();
    }));
    (reached_rx, go_tx)
}

/// Waits until `done` holds, for at most 30 s.
pub async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let started = std::time::Instant::now();
    while !done() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{what}: not within 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
