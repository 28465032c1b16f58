//! The transmission phase: requests in, replies out, out of order.
//!
//! One reader (the connection task) decodes requests continuously. Each valid request runs in
//! its own task; its reply goes through a channel to a single writer task, which gathers
//! whatever replies are ready and sends them with vectored writes. Two bounds push back on
//! the client: at most `in_flight_requests_max` requests between being read and their reply
//! being written, and at most `in_flight_bytes_max` payload bytes (write data held, read data
//! to be sent). When either is exhausted the reader stops reading until replies drain.
//!
//! Checks that need no storage (flags, ranges, read-only, sizes) are made by the reader, which
//! answers failures directly. A request task that panics still gets an `NBD_EIO` reply,
//! so a client never waits forever.
//!
//! `NBD_CMD_DISC` stops reading, lets every request in flight finish and its reply be sent,
//! flushes a writable export (so a client that disconnects cleanly leaves its writes durable
//! even if it never sent `NBD_CMD_FLUSH`), then closes the connection. End of stream without
//! `NBD_CMD_DISC` does the same without the flush.

use std::io::{self, IoSlice};

use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

use grove_engine::{BlockStatus, ReadChunk, ZeroMode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, trace, Instrument};

use crate::error::{errno, Error};
use crate::export::ExportHandle;
use crate::handshake::Negotiated;
use crate::meta::{diff_descriptors, Contexts, DIFF_CONTEXTS_MAX};
use crate::payload::Payload;
use crate::proto::*;
use crate::ServerOptions;

/// A compact-mode WRITE longer than [`PAYLOAD_MAX_BYTES`] but at most this long has its
/// payload read and discarded, then gets `NBD_EINVAL`; a longer one closes the connection.
pub const WRITE_SKIP_MAX_BYTES: u64 = 2 * PAYLOAD_MAX_BYTES as u64;
/// Most descriptors in one block status reply (the spec says at most 2^20; this keeps a
/// reply near 1 MiB).
pub const BLOCK_STATUS_DESCRIPTORS_MAX: usize = 1 << 16;
/// Longest range one block status request asks the engine about: a 4 KiB-aligned length that
/// fits the 32-bit descriptor of compact replies. Longer requests get a shorter answer, which
/// the spec allows; clients continue from where it ends.
pub const BLOCK_STATUS_QUERY_MAX_BYTES: u64 = u32::MAX as u64 & !4095;
/// Bytes of budget a block status request holds for each selected context's chunk.
const BLOCK_STATUS_REPLY_BUDGET_BYTES: u32 = 16 * BLOCK_STATUS_DESCRIPTORS_MAX as u32 + 64;
// A block status request with every context selected must fit the smallest byte budget
// (`ServerOptions::clamped` keeps it at least one maximum payload), or it would wait forever.
const _: () = assert!(
    (DIFF_CONTEXTS_MAX as u64 + 1) * BLOCK_STATUS_REPLY_BUDGET_BYTES as u64
        <= PAYLOAD_MAX_BYTES as u64
);
/// Most replies the writer gathers into one batch of vectored writes.
pub const REPLY_BATCH_MAX: usize = 64;
/// Most buffers passed to one vectored write (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// What the reader knows about the export, enough to check a request without storage.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ExportView {
    pub size_bytes: u64,
    pub read_only: bool,
    pub mode: ReplyMode,
    /// How many metadata contexts the client selected for this export.
    pub contexts: usize,
}

/// A checked request, ready to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Read {
        len_bytes: u64,
        df: bool,
    },
    Write {
        fua: bool,
    },
    Flush,
    Trim {
        len_bytes: u64,
        fua: bool,
    },
    WriteZeroes {
        len_bytes: u64,
        mode: ZeroMode,
        fua: bool,
    },
    Cache {
        len_bytes: u64,
    },
    BlockStatus {
        len_bytes: u64,
        req_one: bool,
    },
    /// A zero-length READ, WRITE, TRIM, WRITE_ZEROES or CACHE inside the export. The spec
    /// leaves these unspecified (and says not to disconnect); they succeed without touching
    /// storage.
    Nothing,
}

/// Why a request is refused before it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub errno: u32,
    pub message: &'static str,
}

const fn reject(errno: u32, message: &'static str) -> Rejection {
    Rejection { errno, message }
}

/// Checks a request header against the export and the negotiated options ("Request types",
/// "Command flags", "Error values"). `NBD_CMD_DISC` is handled by the caller.
pub(crate) fn validate(header: &RequestHeader, export: &ExportView) -> Result<Op, Rejection> {
    let flags = header.flags;
    let offset = header.offset;
    let len_bytes = header.length;
    let extended = export.mode == ReplyMode::Extended;
    // FUA is accepted on every command (the spec requires that once SEND_FUA is advertised,
    // and ignoring it where nothing is written is always safe).
    let allowed = NBD_CMD_FLAG_FUA
        | match header.command {
            Command::Read if export.mode.chunked() => NBD_CMD_FLAG_DF,
            Command::Write if extended => NBD_CMD_FLAG_PAYLOAD_LEN,
            Command::WriteZeroes => NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
            Command::BlockStatus => NBD_CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    if let Command::Unsupported(_) = header.command {
        return Err(reject(NBD_EINVAL, "unknown command"));
    }
    if flags & !allowed != 0 {
        return Err(reject(
            NBD_EINVAL,
            "command flags not valid for this command",
        ));
    }
    let fua = flags & NBD_CMD_FLAG_FUA != 0;
    let in_range = offset
        .checked_add(len_bytes)
        .is_some_and(|end| end <= export.size_bytes);
    match header.command {
        Command::Read => {
            if !in_range {
                return Err(reject(NBD_EINVAL, "read beyond the end of the export"));
            }
            if len_bytes > u64::from(PAYLOAD_MAX_BYTES) {
                return Err(reject(
                    NBD_EINVAL,
                    "read longer than the maximum payload (32 MiB)",
                ));
            }
            if len_bytes == 0 {
                return Ok(Op::Nothing);
            }
            Ok(Op::Read {
                len_bytes,
                df: flags & NBD_CMD_FLAG_DF != 0,
            })
        }
        Command::Write => {
            if export.read_only {
                return Err(reject(NBD_EPERM, "the export is read-only"));
            }
            if !in_range {
                return Err(reject(NBD_ENOSPC, "write beyond the end of the export"));
            }
            if len_bytes > u64::from(PAYLOAD_MAX_BYTES) {
                return Err(reject(
                    NBD_EINVAL,
                    "write longer than the maximum payload (32 MiB)",
                ));
            }
            if len_bytes == 0 {
                return Ok(Op::Nothing);
            }
            Ok(Op::Write { fua })
        }
        Command::Flush => {
            if offset != 0 || len_bytes != 0 {
                return Err(reject(NBD_EINVAL, "flush offset and length must be zero"));
            }
            Ok(Op::Flush)
        }
        Command::Trim => {
            if export.read_only {
                return Err(reject(NBD_EPERM, "the export is read-only"));
            }
            if !in_range {
                return Err(reject(NBD_EINVAL, "trim beyond the end of the export"));
            }
            if len_bytes == 0 {
                return Ok(Op::Nothing);
            }
            Ok(Op::Trim { len_bytes, fua })
        }
        Command::WriteZeroes => {
            if export.read_only {
                return Err(reject(NBD_EPERM, "the export is read-only"));
            }
            if !in_range {
                return Err(reject(
                    NBD_ENOSPC,
                    "write zeroes beyond the end of the export",
                ));
            }
            let no_hole = flags & NBD_CMD_FLAG_NO_HOLE != 0;
            // Zeroing by deallocation is metadata-only, so it is fast; keeping the range
            // allocated writes every block, no faster than NBD_CMD_WRITE.
            if no_hole && flags & NBD_CMD_FLAG_FAST_ZERO != 0 {
                return Err(reject(
                    NBD_ENOTSUP,
                    "allocated zeroes (NO_HOLE) are not fast",
                ));
            }
            if len_bytes == 0 {
                return Ok(Op::Nothing);
            }
            let mode = if no_hole {
                ZeroMode::Allocate
            } else {
                ZeroMode::MayTrim
            };
            Ok(Op::WriteZeroes {
                len_bytes,
                mode,
                fua,
            })
        }
        Command::Cache => {
            if !in_range {
                return Err(reject(NBD_EINVAL, "cache beyond the end of the export"));
            }
            if len_bytes == 0 {
                return Ok(Op::Nothing);
            }
            Ok(Op::Cache { len_bytes })
        }
        Command::BlockStatus => {
            if export.contexts == 0 {
                return Err(reject(
                    NBD_EINVAL,
                    "no metadata context was selected for this export",
                ));
            }
            if !in_range {
                return Err(reject(
                    NBD_EINVAL,
                    "block status beyond the end of the export",
                ));
            }
            if len_bytes == 0 {
                return Err(reject(NBD_EINVAL, "block status of zero bytes"));
            }
            Ok(Op::BlockStatus {
                len_bytes,
                req_one: flags & NBD_CMD_FLAG_REQ_ONE != 0,
            })
        }
        // DISC never reaches here; unknown commands were refused above.
        Command::Disc | Command::Unsupported(_) => Err(reject(NBD_EINVAL, "unexpected command")),
    }
}

/// How many payload bytes follow a request header. A WRITE always carries `length` bytes;
/// in extended mode any command flagged `NBD_CMD_FLAG_PAYLOAD_LEN` does. The spec has
/// extended-mode WRITEs set that flag, but QEMU's client omits it (and QEMU's server
/// accepts that), so a WRITE's payload is taken from its length either way.
pub(crate) fn request_payload_len(header: &RequestHeader, mode: ReplyMode) -> u64 {
    if header.command == Command::Write
        || (mode == ReplyMode::Extended && header.flags & NBD_CMD_FLAG_PAYLOAD_LEN != 0)
    {
        header.length
    } else {
        0
    }
}

/// Bytes of in-flight budget a request holds until its reply is written.
fn budget_bytes(op: &Op, payload_len: u64, contexts: usize) -> u32 {
    match op {
        // Both are at most PAYLOAD_MAX_BYTES, checked by `validate`.
        Op::Read { len_bytes, .. } => *len_bytes as u32,
        Op::Write { .. } => payload_len as u32,
        // At most DIFF_CONTEXTS_MAX + 1 contexts, so this fits (asserted above).
        Op::BlockStatus { .. } => BLOCK_STATUS_REPLY_BUDGET_BYTES * contexts.max(1) as u32,
        _ => 0,
    }
}

// ---------------------------------------------------------------------------------------------
// Replies.

/// The budget a request holds; released when its reply has been written (or dropped).
pub(crate) struct Permits {
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// Every message of one request's reply, ready to write.
pub(crate) struct Reply {
    /// Headers and fixed-size payload fields of every message, back to back.
    meta: Vec<u8>,
    /// Data buffers, each sent after `meta[..at]`.
    data: Vec<(usize, Bytes)>,
    permits: Option<Permits>,
}

impl Reply {
    fn new() -> Self {
        Reply {
            meta: Vec::with_capacity(EXTENDED_REPLY_HEADER_BYTES),
            data: Vec::new(),
            permits: None,
        }
    }

    fn simple(error: u32, cookie: u64) -> Self {
        let mut reply = Reply::new();
        put_simple_reply(&mut reply.meta, error, cookie);
        reply
    }

    /// A chunk whose payload is `fixed` followed by `data`.
    #[allow(clippy::too_many_arguments)]
    fn chunk(
        &mut self,
        mode: ReplyMode,
        flags: u16,
        reply_type: u16,
        cookie: u64,
        request_offset: u64,
        fixed: &[u8],
        data: Option<Bytes>,
    ) {
        let data_len = data.as_ref().map_or(0, Bytes::len);
        let payload_len = (fixed.len() + data_len) as u64;
        put_chunk_header(
            &mut self.meta,
            mode,
            flags,
            reply_type,
            cookie,
            request_offset,
            payload_len,
        );
        self.meta.extend_from_slice(fixed);
        if let Some(data) = data {
            self.data.push((self.meta.len(), data));
        }
    }

    fn bytes_len(&self) -> usize {
        self.meta.len() + self.data.iter().map(|(_, data)| data.len()).sum::<usize>()
    }

    /// Appends this reply's buffers, in wire order, to `slices`.
    fn push_slices<'a>(&'a self, slices: &mut Vec<IoSlice<'a>>) {
        let mut start = 0;
        for (at, data) in &self.data {
            if *at > start {
                slices.push(IoSlice::new(&self.meta[start..*at]));
            }
            if !data.is_empty() {
                slices.push(IoSlice::new(data));
            }
            start = *at;
        }
        if self.meta.len() > start {
            slices.push(IoSlice::new(&self.meta[start..]));
        }
    }
}

/// Success without data: a simple reply, or `NBD_REPLY_TYPE_NONE` in extended mode (where
/// simple replies are not allowed) and for a READ once structured replies are agreed (a
/// zero-length read).
fn success(mode: ReplyMode, command: Command, cookie: u64, request_offset: u64) -> Reply {
    if mode == ReplyMode::Extended || (mode.chunked() && command == Command::Read) {
        let mut reply = Reply::new();
        reply.chunk(
            mode,
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_NONE,
            cookie,
            request_offset,
            &[],
            None,
        );
        reply
    } else {
        Reply::simple(0, cookie)
    }
}

/// An error: a simple reply, or an `NBD_REPLY_TYPE_ERROR` chunk carrying a message once
/// structured replies are agreed (the only form allowed for READ then).
fn failure(mode: ReplyMode, cookie: u64, request_offset: u64, error: u32, message: &str) -> Reply {
    debug_assert!(error != 0);
    if mode.chunked() {
        let mut reply = Reply::new();
        let payload = error_payload(error, message);
        reply.chunk(
            mode,
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_ERROR,
            cookie,
            request_offset,
            &payload,
            None,
        );
        reply
    } else {
        Reply::simple(error, cookie)
    }
}

fn engine_failure(
    mode: ReplyMode,
    cookie: u64,
    request_offset: u64,
    error: &grove_engine::Error,
) -> Reply {
    let code = errno(error);
    trace!(cookie, error = %error, errno = %ErrnoName(code), "request failed");
    failure(mode, cookie, request_offset, code, &error.to_string())
}

/// The chunks of a sparse read: `NBD_REPLY_TYPE_OFFSET_DATA` for data and
/// `NBD_REPLY_TYPE_OFFSET_HOLE` for zero runs, the last one flagged DONE. `None` if the
/// chunks do not cover exactly `len_bytes`.
fn read_chunks_reply(
    mode: ReplyMode,
    cookie: u64,
    offset: u64,
    len_bytes: u64,
    chunks: Vec<ReadChunk>,
) -> Option<Reply> {
    let total = chunks
        .iter()
        .try_fold(0u64, |sum, chunk| sum.checked_add(chunk.len_bytes()))?;
    if total != len_bytes {
        return None;
    }
    let count = chunks.iter().filter(|chunk| chunk.len_bytes() > 0).count();
    let mut reply = Reply::new();
    reply
        .meta
        .reserve(count * (EXTENDED_REPLY_HEADER_BYTES + 12));
    let mut position = offset;
    for (index, chunk) in chunks
        .into_iter()
        .filter(|chunk| chunk.len_bytes() > 0)
        .enumerate()
    {
        let flags = if index + 1 == count {
            NBD_REPLY_FLAG_DONE
        } else {
            0
        };
        let chunk_len = chunk.len_bytes();
        match chunk {
            ReadChunk::Data(data) => {
                reply.chunk(
                    mode,
                    flags,
                    NBD_REPLY_TYPE_OFFSET_DATA,
                    cookie,
                    offset,
                    &position.to_be_bytes(),
                    Some(data),
                );
            }
            ReadChunk::Zero { len_bytes } => {
                let mut fixed = [0u8; 12];
                fixed[..8].copy_from_slice(&position.to_be_bytes());
                // Reads are at most PAYLOAD_MAX_BYTES, so a hole fits the 32-bit size field.
                fixed[8..].copy_from_slice(&(len_bytes as u32).to_be_bytes());
                reply.chunk(
                    mode,
                    flags,
                    NBD_REPLY_TYPE_OFFSET_HOLE,
                    cookie,
                    offset,
                    &fixed,
                    None,
                );
            }
        }
        position += chunk_len;
    }
    Some(reply)
}

/// Turns the engine's allocation runs into `base:allocation` descriptors: zero-length runs
/// dropped, neighbours with equal flags merged, the total cut to `limit_bytes` (the request,
/// already capped to [`BLOCK_STATUS_QUERY_MAX_BYTES`], so compact 32-bit lengths fit), at most
/// [`BLOCK_STATUS_DESCRIPTORS_MAX`] descriptors, exactly one with `req_one`.
pub(crate) fn status_descriptors(
    runs: &[BlockStatus],
    limit_bytes: u64,
    req_one: bool,
) -> Vec<StatusDescriptor> {
    let mut descriptors: Vec<StatusDescriptor> = Vec::new();
    let mut covered = 0u64;
    for run in runs {
        if covered >= limit_bytes {
            break;
        }
        let len_bytes = run.len_bytes.min(limit_bytes - covered);
        if len_bytes == 0 {
            continue;
        }
        let flags =
            if run.hole { NBD_STATE_HOLE } else { 0 } | if run.zero { NBD_STATE_ZERO } else { 0 };
        match descriptors.last_mut() {
            Some(last) if last.flags == flags => last.len_bytes += len_bytes,
            _ => {
                if descriptors.len() == BLOCK_STATUS_DESCRIPTORS_MAX {
                    break;
                }
                descriptors.push(StatusDescriptor { len_bytes, flags });
            }
        }
        covered += len_bytes;
    }
    if req_one {
        descriptors.truncate(1);
    }
    descriptors
}

// ---------------------------------------------------------------------------------------------
// Running requests.

/// The export as every request task sees it.
struct Export<H> {
    handle: Arc<H>,
    view: ExportView,
    contexts: Contexts,
}

/// A request between being read and its reply being queued. If the task running it ends
/// without a reply (a panic in storage code), dropping this queues an `NBD_EIO` reply so the
/// client is not left waiting.
struct Pending {
    reply_tx: Option<mpsc::Sender<Reply>>,
    permits: Option<Permits>,
    mode: ReplyMode,
    cookie: u64,
    offset: u64,
}

impl Pending {
    async fn complete(mut self, mut reply: Reply) {
        if let (Some(reply_tx), Some(permits)) = (self.reply_tx.take(), self.permits.take()) {
            reply.permits = Some(permits);
            // Fails only when the writer is gone, and then nobody can be told anything.
            let _ = reply_tx.send(reply).await;
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let (Some(reply_tx), Some(permits)) = (self.reply_tx.take(), self.permits.take()) {
            debug!(
                cookie = self.cookie,
                "request ended without a reply; answering EIO"
            );
            let mut reply = failure(
                self.mode,
                self.cookie,
                self.offset,
                NBD_EIO,
                "internal server error",
            );
            reply.permits = Some(permits);
            // The channel has room for every request holding a slot, and this one still
            // holds its slot, so only a gone writer makes this fail.
            let _ = reply_tx.try_send(reply);
        }
    }
}

/// Runs a checked request. `sequence` numbers block status requests in the order they were
/// read (see `meta.rs`); other requests ignore it.
async fn execute<H: ExportHandle>(
    export: &Export<H>,
    header: &RequestHeader,
    op: Op,
    payload: Payload,
    sequence: u64,
) -> Reply {
    let handle = &*export.handle;
    let mode = export.view.mode;
    let cookie = header.cookie;
    let offset = header.offset;
    let result = match op {
        Op::Nothing => Ok(()),
        Op::Read { len_bytes, df } => return read(export, cookie, offset, len_bytes, df).await,
        Op::Write { fua } => handle.write(offset, &payload, fua).await,
        // A read-only export has nothing to make durable.
        Op::Flush if export.view.read_only => Ok(()),
        Op::Flush => handle.flush().await,
        Op::Trim { len_bytes, fua } => handle.trim(offset, len_bytes, fua).await,
        Op::WriteZeroes {
            len_bytes,
            mode: zero_mode,
            fua,
        } => handle.write_zeroes(offset, len_bytes, zero_mode, fua).await,
        Op::Cache { len_bytes } => handle.cache(offset, len_bytes).await,
        Op::BlockStatus { len_bytes, req_one } => {
            return block_status(export, cookie, offset, len_bytes, req_one, sequence).await;
        }
    };
    match result {
        Ok(()) => success(mode, header.command, cookie, offset),
        Err(error) => engine_failure(mode, cookie, offset, &error),
    }
}

/// `NBD_CMD_BLOCK_STATUS`: one `NBD_REPLY_TYPE_BLOCK_STATUS` (or `_EXT`) chunk per selected
/// context, `base:allocation` first, then the diff contexts in id order, the last chunk
/// flagged DONE. Every chunk starts at the request's offset and covers at most its length
/// (capped at [`BLOCK_STATUS_QUERY_MAX_BYTES`]); with `NBD_CMD_FLAG_REQ_ONE`, exactly one
/// descriptor each. If any context fails, the whole reply is one error chunk.
async fn block_status<H: ExportHandle>(
    export: &Export<H>,
    cookie: u64,
    offset: u64,
    len_bytes: u64,
    req_one: bool,
    sequence: u64,
) -> Reply {
    let handle = &*export.handle;
    let mode = export.view.mode;
    let contexts = &export.contexts;
    let query_len = len_bytes.min(BLOCK_STATUS_QUERY_MAX_BYTES);
    let mut chunks: Vec<(u32, Vec<StatusDescriptor>)> = Vec::with_capacity(contexts.count());
    if let Some(context_id) = contexts.allocation {
        match handle.block_status(offset, query_len).await {
            Ok(runs) => {
                let descriptors = status_descriptors(&runs, query_len, req_one);
                if descriptors.is_empty() {
                    return failure(mode, cookie, offset, NBD_EIO, "storage reported no extents");
                }
                chunks.push((context_id, descriptors));
            }
            Err(error) => return engine_failure(mode, cookie, offset, &error),
        }
    }
    for diff in &contexts.diffs {
        match contexts.changed_blocks(handle, diff, sequence).await {
            Ok(blocks) => {
                let flag = diff.namespace.changed_flag();
                let descriptors = diff_descriptors(&blocks, offset, query_len, req_one, flag);
                // `validate` refuses zero-length requests, so there is always one.
                debug_assert!(!descriptors.is_empty());
                chunks.push((diff.id, descriptors));
            }
            Err(error) => return engine_failure(mode, cookie, offset, &error),
        }
    }
    if chunks.is_empty() {
        // `validate` only lets BLOCK_STATUS through with a selected context.
        return failure(
            mode,
            cookie,
            offset,
            NBD_EINVAL,
            "no metadata context was selected for this export",
        );
    }
    let mut reply = Reply::new();
    let reply_type = block_status_reply_type(mode);
    let last = chunks.len() - 1;
    for (index, (context_id, descriptors)) in chunks.iter().enumerate() {
        let flags = if index == last {
            NBD_REPLY_FLAG_DONE
        } else {
            0
        };
        let payload = block_status_payload(mode, *context_id, descriptors);
        reply.chunk(mode, flags, reply_type, cookie, offset, &payload, None);
    }
    reply
}

async fn read<H: ExportHandle>(
    export: &Export<H>,
    cookie: u64,
    offset: u64,
    len_bytes: u64,
    df: bool,
) -> Reply {
    let handle = &*export.handle;
    let mode = export.view.mode;
    const SHORT: &str = "storage returned a read of the wrong length";
    if !mode.chunked() || df {
        // Dense: a simple reply, or with DF the single content chunk the spec demands.
        return match handle.read(offset, len_bytes).await {
            Ok(data) if data.len() as u64 == len_bytes => {
                if mode.chunked() {
                    let mut reply = Reply::new();
                    let fixed = offset.to_be_bytes();
                    reply.chunk(
                        mode,
                        NBD_REPLY_FLAG_DONE,
                        NBD_REPLY_TYPE_OFFSET_DATA,
                        cookie,
                        offset,
                        &fixed,
                        Some(data.into()),
                    );
                    reply
                } else {
                    let mut reply = Reply::simple(0, cookie);
                    let at = reply.meta.len();
                    reply.data.push((at, data.into()));
                    reply
                }
            }
            // A short buffer in a simple reply would desynchronize the stream.
            Ok(_) => failure(mode, cookie, offset, NBD_EIO, SHORT),
            Err(error) => engine_failure(mode, cookie, offset, &error),
        };
    }
    match handle.read_chunks(offset, len_bytes).await {
        Ok(chunks) => read_chunks_reply(mode, cookie, offset, len_bytes, chunks)
            .unwrap_or_else(|| failure(mode, cookie, offset, NBD_EIO, SHORT)),
        Err(error) => engine_failure(mode, cookie, offset, &error),
    }
}

// ---------------------------------------------------------------------------------------------
// The connection loop.

enum Ending {
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// The server is stopping (see `ServerOptions::stop`).
    Stopping,
    /// End of stream between requests (a hard disconnect by the client).
    EndOfStream,
    /// The writer stopped (socket error or reply timeout); its result says why.
    WriterStopped,
    Failed(Error),
}

/// Serves requests until the client disconnects or fails.
pub(crate) async fn serve<H, R, W>(
    negotiated: Negotiated<H>,
    reader: &mut R,
    writer: W,
    options: &ServerOptions,
) -> Result<(), Error>
where
    H: ExportHandle,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let contexts = Contexts::new(negotiated.contexts);
    let view = ExportView {
        size_bytes: negotiated.size_bytes,
        read_only: negotiated.read_only,
        mode: negotiated.mode,
        contexts: contexts.count(),
    };
    let export = Arc::new(Export {
        handle: negotiated.handle,
        view,
        contexts,
    });
    let slots_max = options.in_flight_requests_max;
    let slots = Arc::new(Semaphore::new(slots_max));
    let budget = Arc::new(Semaphore::new(options.in_flight_bytes_max));
    // Every queued reply holds a slot, so the channel never holds more than `slots_max`.
    let (reply_tx, reply_rx) = mpsc::channel::<Reply>(slots_max);
    let writer_task = tokio::spawn(
        write_replies(writer, reply_rx, options.reply_write_timeout).in_current_span(),
    );

    let ending = loop {
        let header = tokio::select! {
            biased;
            _ = reply_tx.closed() => break Ending::WriterStopped,
            // Requests not yet read were never acknowledged: the client resends them to
            // whatever serves the export next.
            _ = crate::stop_requested(&options.stop) => break Ending::Stopping,
            header = read_request(reader, view.mode) => header,
        };
        let header = match header {
            Ok(Some(header)) => header,
            Ok(None) => break Ending::EndOfStream,
            Err(error) => break Ending::Failed(error),
        };
        trace!(
            cookie = header.cookie,
            command = ?header.command,
            flags = header.flags,
            offset = header.offset,
            length = header.length,
            "request"
        );
        if header.command == Command::Disc {
            break Ending::Disconnect;
        }

        let payload_flag =
            view.mode == ReplyMode::Extended && header.flags & NBD_CMD_FLAG_PAYLOAD_LEN != 0;
        let payload_len = request_payload_len(&header, view.mode);
        if payload_len > u64::from(PAYLOAD_MAX_BYTES) {
            // A moderately oversized WRITE is skipped and refused; anything larger, or an
            // oversized payload announced with NBD_CMD_FLAG_PAYLOAD_LEN (where the spec says
            // to disconnect), closes the connection.
            if payload_flag || payload_len > WRITE_SKIP_MAX_BYTES {
                let message = "payload longer than the maximum payload (32 MiB)";
                let reply = failure(view.mode, header.cookie, header.offset, NBD_EINVAL, message);
                let _ = reply_tx.try_send(reply);
                break Ending::Failed(Error::protocol(format!(
                    "request payload of {payload_len} bytes"
                )));
            }
        }

        let op = match validate(&header, &view) {
            Ok(op) => op,
            Err(rejection) => {
                trace!(cookie = header.cookie, errno = %ErrnoName(rejection.errno), rejection.message, "refused");
                if payload_len > 0 {
                    if let Err(error) = skip(reader, payload_len).await {
                        break Ending::Failed(error);
                    }
                }
                let Some(permits) = acquire(&slots, &budget, 0, &reply_tx).await else {
                    break Ending::WriterStopped;
                };
                let mut reply = failure(
                    view.mode,
                    header.cookie,
                    header.offset,
                    rejection.errno,
                    rejection.message,
                );
                reply.permits = Some(permits);
                if reply_tx.send(reply).await.is_err() {
                    break Ending::WriterStopped;
                }
                continue;
            }
        };

        // Numbered here, in the order requests are read, before waiting for budget.
        let sequence = match op {
            Op::BlockStatus { .. } => export.contexts.arrive(),
            _ => 0,
        };
        let bytes = budget_bytes(&op, payload_len, view.contexts);
        let Some(permits) = acquire(&slots, &budget, bytes, &reply_tx).await else {
            break Ending::WriterStopped;
        };
        let mut payload = Payload::default();
        if payload_len > 0 {
            // `validate` passed, so this is a WRITE of at most PAYLOAD_MAX_BYTES.
            payload = Payload::take(payload_len as usize);
            if let Err(error) = reader.read_exact(payload.as_mut_slice()).await {
                break Ending::Failed(error.into());
            }
        }
        let pending = Pending {
            reply_tx: Some(reply_tx.clone()),
            permits: Some(permits),
            mode: view.mode,
            cookie: header.cookie,
            offset: header.offset,
        };
        let export = export.clone();
        tokio::spawn(
            async move {
                let reply = execute(&export, &header, op, payload, sequence).await;
                pending.complete(reply).await;
            }
            .in_current_span(),
        );
    };

    // Let every request already read finish and its reply be written: each holds a slot
    // until then. The semaphore is never closed, so this cannot fail.
    let all_slots = u32::try_from(slots_max).unwrap_or(u32::MAX);
    let _drained = slots.acquire_many(all_slots).await;
    if matches!(ending, Ending::Disconnect | Ending::Stopping) && !view.read_only {
        if let Err(error) = export.handle.flush().await {
            debug!(%error, "flush at disconnect failed");
        }
    }
    // The session ends before the client sees the connection close: a client that waits
    // for the close can count on it being gone.
    drop(export);
    drop(reply_tx);
    let written = match writer_task.await {
        Ok(result) => result,
        Err(join_error) => Err(Error::Io(io::Error::other(format!(
            "reply writer failed: {join_error}"
        )))),
    };
    match ending {
        Ending::Disconnect => {
            debug!("client disconnected");
            written
        }
        Ending::Stopping => {
            info!("server stopping: requests answered and flushed; closing");
            written
        }
        Ending::EndOfStream => {
            debug!("client closed the connection without NBD_CMD_DISC");
            written
        }
        Ending::WriterStopped => written,
        Ending::Failed(error) => Err(error),
    }
}

/// Takes a request slot and `bytes` of budget, or `None` if the writer stopped meanwhile.
async fn acquire(
    slots: &Arc<Semaphore>,
    budget: &Arc<Semaphore>,
    bytes: u32,
    reply_tx: &mpsc::Sender<Reply>,
) -> Option<Permits> {
    let acquired = async {
        let slot = slots.clone().acquire_owned().await.ok()?;
        let bytes = if bytes > 0 {
            Some(budget.clone().acquire_many_owned(bytes).await.ok()?)
        } else {
            None
        };
        Some(Permits {
            _slot: slot,
            _bytes: bytes,
        })
    };
    tokio::select! {
        biased;
        _ = reply_tx.closed() => None,
        permits = acquired => permits,
    }
}

/// Reads the next request header; `Ok(None)` at end of stream between requests.
async fn read_request<R: AsyncRead + Unpin>(
    reader: &mut R,
    mode: ReplyMode,
) -> Result<Option<RequestHeader>, Error> {
    let mut bytes = [0u8; REQUEST_HEADER_EXTENDED_BYTES];
    let size = if mode == ReplyMode::Extended {
        REQUEST_HEADER_EXTENDED_BYTES
    } else {
        REQUEST_HEADER_COMPACT_BYTES
    };
    let first = reader.read(&mut bytes[..size]).await?;
    if first == 0 {
        return Ok(None);
    }
    reader.read_exact(&mut bytes[first..size]).await?;
    let decoded = if mode == ReplyMode::Extended {
        RequestHeader::decode_extended(&bytes)
    } else {
        let mut compact = [0u8; REQUEST_HEADER_COMPACT_BYTES];
        compact.copy_from_slice(&bytes[..REQUEST_HEADER_COMPACT_BYTES]);
        RequestHeader::decode_compact(&compact)
    };
    decoded
        .map(Some)
        .map_err(|bad_magic| Error::protocol(bad_magic.to_string()))
}

/// Reads and discards `len_bytes` of payload.
async fn skip<R: AsyncRead + Unpin>(reader: &mut R, len_bytes: u64) -> Result<(), Error> {
    let copied = tokio::io::copy(&mut reader.take(len_bytes), &mut tokio::io::sink()).await?;
    if copied < len_bytes {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    Ok(())
}

/// The writer task: gathers ready replies and writes them with vectored writes, until every
/// sender is gone; then shuts the write side down.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut replies: mpsc::Receiver<Reply>,
    timeout: Duration,
) -> Result<(), Error> {
    let mut batch: Vec<Reply> = Vec::with_capacity(REPLY_BATCH_MAX);
    while let Some(reply) = replies.recv().await {
        batch.push(reply);
        while batch.len() < REPLY_BATCH_MAX {
            match replies.try_recv() {
                Ok(reply) => batch.push(reply),
                Err(_) => break,
            }
        }
        {
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2 + 1);
            for reply in &batch {
                reply.push_slices(&mut slices);
            }
            trace!(
                replies = batch.len(),
                bytes = batch.iter().map(Reply::bytes_len).sum::<usize>(),
                "writing"
            );
            write_all_vectored(&mut writer, &mut slices, timeout).await?;
        }
        // Dropping the replies releases their slots and budget.
        batch.clear();
    }
    writer.flush().await?;
    // Every reply is out; a client that already closed its end (as it may right after
    // NBD_CMD_DISC) makes the shutdown fail, which loses nothing.
    if let Err(error) = writer.shutdown().await {
        debug!(%error, "shutting down the connection's write side failed");
    }
    Ok(())
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    writer: &mut W,
    slices: &mut [IoSlice<'_>],
    timeout: Duration,
) -> Result<(), Error> {
    let mut remaining = slices;
    while !remaining.is_empty() {
        let window = remaining.len().min(IOV_MAX);
        let written = match tokio::time::timeout(
            timeout,
            writer.write_vectored(&remaining[..window]),
        )
        .await
        {
            Ok(written) => written?,
            Err(_) => return Err(Error::ReplyTimeout(timeout)),
        };
        if written == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero).into());
        }
        IoSlice::advance_slices(&mut remaining, written);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(mode: ReplyMode, read_only: bool) -> ExportView {
        ExportView {
            size_bytes: 1 << 20,
            read_only,
            mode,
            contexts: 1,
        }
    }

    fn request(command: Command, flags: u16, offset: u64, length: u64) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 1,
            offset,
            length,
        }
    }

    #[test]
    fn size_constraints_requests_past_the_end() {
        let export = view(ReplyMode::Structured, false);
        let past = |command| {
            validate(&request(command, 0, (1 << 20) - 512, 1024), &export).map_err(|r| r.errno)
        };
        assert_eq!(past(Command::Read), Err(NBD_EINVAL));
        assert_eq!(past(Command::Trim), Err(NBD_EINVAL));
        assert_eq!(past(Command::Cache), Err(NBD_EINVAL));
        assert_eq!(past(Command::BlockStatus), Err(NBD_EINVAL));
        // "Error values": writes past the end SHOULD get ENOSPC.
        assert_eq!(past(Command::Write), Err(NBD_ENOSPC));
        assert_eq!(past(Command::WriteZeroes), Err(NBD_ENOSPC));
        // Offset + length overflowing 64 bits is past the end too.
        let overflow = request(Command::Read, 0, u64::MAX, 2);
        assert_eq!(
            validate(&overflow, &export).map_err(|r| r.errno),
            Err(NBD_EINVAL)
        );
        // Exactly up to the end is fine.
        let to_end = request(Command::Read, 0, (1 << 20) - 512, 512);
        assert_eq!(
            validate(&to_end, &export),
            Ok(Op::Read {
                len_bytes: 512,
                df: false
            })
        );
    }

    #[test]
    fn size_constraints_maximum_payload() {
        let mut export = view(ReplyMode::Simple, false);
        export.size_bytes = 1 << 40;
        let big = u64::from(PAYLOAD_MAX_BYTES) + 1;
        assert_eq!(
            validate(&request(Command::Read, 0, 0, big), &export).map_err(|r| r.errno),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            validate(&request(Command::Write, 0, 0, big), &export).map_err(|r| r.errno),
            Err(NBD_EINVAL)
        );
        // Commands without payload may exceed it.
        let zeroes = validate(&request(Command::WriteZeroes, 0, 0, 1 << 39), &export);
        assert_eq!(
            zeroes,
            Ok(Op::WriteZeroes {
                len_bytes: 1 << 39,
                mode: ZeroMode::MayTrim,
                fua: false
            })
        );
    }

    #[test]
    fn error_values_read_only_export() {
        let export = view(ReplyMode::Simple, true);
        for command in [Command::Write, Command::Trim, Command::WriteZeroes] {
            assert_eq!(
                validate(&request(command, 0, 0, 4096), &export).map_err(|r| r.errno),
                Err(NBD_EPERM)
            );
        }
        assert!(validate(&request(Command::Read, 0, 0, 4096), &export).is_ok());
        assert_eq!(
            validate(&request(Command::Flush, 0, 0, 0), &export),
            Ok(Op::Flush)
        );
    }

    #[test]
    fn command_flags_per_command() {
        let export = view(ReplyMode::Simple, false);
        let refused = |command, flags| {
            validate(&request(command, flags, 0, 4096), &export).map_err(|r| r.errno)
        };
        assert_eq!(
            refused(Command::Read, NBD_CMD_FLAG_NO_HOLE),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            refused(Command::Write, NBD_CMD_FLAG_REQ_ONE),
            Err(NBD_EINVAL)
        );
        assert_eq!(refused(Command::Read, 1 << 15), Err(NBD_EINVAL));
        // DF needs structured replies.
        assert_eq!(refused(Command::Read, NBD_CMD_FLAG_DF), Err(NBD_EINVAL));
        let structured = view(ReplyMode::Structured, false);
        assert_eq!(
            validate(
                &request(Command::Read, NBD_CMD_FLAG_DF, 0, 4096),
                &structured
            ),
            Ok(Op::Read {
                len_bytes: 4096,
                df: true
            })
        );
        // FUA is accepted everywhere.
        assert_eq!(
            refused(Command::Write, NBD_CMD_FLAG_FUA),
            Ok(Op::Write { fua: true })
        );
        assert_eq!(
            refused(Command::Cache, NBD_CMD_FLAG_FUA),
            Ok(Op::Cache { len_bytes: 4096 })
        );
        // PAYLOAD_LEN only in extended mode; a WRITE there may omit it (QEMU does).
        assert_eq!(
            refused(Command::Write, NBD_CMD_FLAG_PAYLOAD_LEN),
            Err(NBD_EINVAL)
        );
        let extended = view(ReplyMode::Extended, false);
        assert_eq!(
            validate(&request(Command::Write, 0, 0, 4096), &extended),
            Ok(Op::Write { fua: false })
        );
        assert_eq!(
            validate(
                &request(Command::Write, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 4096),
                &extended
            ),
            Ok(Op::Write { fua: false })
        );
        assert_eq!(
            validate(
                &request(Command::BlockStatus, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 4096),
                &extended
            )
            .map_err(|r| r.errno),
            Err(NBD_EINVAL)
        );
    }

    #[test]
    fn request_message_payload_lengths() {
        let write = request(Command::Write, 0, 0, 4096);
        assert_eq!(request_payload_len(&write, ReplyMode::Simple), 4096);
        assert_eq!(request_payload_len(&write, ReplyMode::Extended), 4096);
        let flagged = request(Command::Write, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 4096);
        assert_eq!(request_payload_len(&flagged, ReplyMode::Extended), 4096);
        let status = request(Command::BlockStatus, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 12);
        assert_eq!(request_payload_len(&status, ReplyMode::Extended), 12);
        assert_eq!(
            request_payload_len(&status, ReplyMode::Structured),
            0,
            "PAYLOAD_LEN means nothing in compact mode"
        );
        assert_eq!(
            request_payload_len(&request(Command::Read, 0, 0, 4096), ReplyMode::Extended),
            0
        );
    }

    #[test]
    fn nbd_cmd_write_zeroes_modes_and_fast_zero() {
        let export = view(ReplyMode::Simple, false);
        let zero = |flags| validate(&request(Command::WriteZeroes, flags, 0, 8192), &export);
        assert_eq!(
            zero(0),
            Ok(Op::WriteZeroes {
                len_bytes: 8192,
                mode: ZeroMode::MayTrim,
                fua: false
            })
        );
        assert_eq!(
            zero(NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FUA),
            Ok(Op::WriteZeroes {
                len_bytes: 8192,
                mode: ZeroMode::Allocate,
                fua: true
            })
        );
        assert_eq!(
            zero(NBD_CMD_FLAG_FAST_ZERO),
            Ok(Op::WriteZeroes {
                len_bytes: 8192,
                mode: ZeroMode::MayTrim,
                fua: false
            })
        );
        assert_eq!(
            zero(NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_NO_HOLE).map_err(|r| r.errno),
            Err(NBD_ENOTSUP)
        );
    }

    #[test]
    fn request_types_zero_length_and_unknown() {
        let export = view(ReplyMode::Structured, false);
        for command in [
            Command::Read,
            Command::Write,
            Command::Trim,
            Command::WriteZeroes,
            Command::Cache,
        ] {
            assert_eq!(
                validate(&request(command, 0, 4096, 0), &export),
                Ok(Op::Nothing)
            );
        }
        assert_eq!(
            validate(&request(Command::BlockStatus, 0, 0, 0), &export).map_err(|r| r.errno),
            Err(NBD_EINVAL)
        );
        // Zero length still may not start past the end.
        assert_eq!(
            validate(&request(Command::Read, 0, 2 << 20, 0), &export).map_err(|r| r.errno),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            validate(&request(Command::Unsupported(42), 0, 0, 0), &export).map_err(|r| r.errno),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            validate(&request(Command::Flush, 0, 0, 1), &export).map_err(|r| r.errno),
            Err(NBD_EINVAL)
        );
    }

    #[test]
    fn nbd_cmd_block_status_needs_a_context() {
        let mut export = view(ReplyMode::Structured, false);
        export.contexts = 0;
        assert_eq!(
            validate(&request(Command::BlockStatus, 0, 0, 4096), &export).map_err(|r| r.errno),
            Err(NBD_EINVAL)
        );
    }

    #[test]
    fn nbd_reply_type_block_status_descriptors() {
        let runs = [
            BlockStatus {
                len_bytes: 4096,
                hole: false,
                zero: false,
            },
            BlockStatus {
                len_bytes: 0,
                hole: true,
                zero: true,
            },
            BlockStatus {
                len_bytes: 4096,
                hole: false,
                zero: false,
            },
            BlockStatus {
                len_bytes: 8192,
                hole: true,
                zero: true,
            },
            BlockStatus {
                len_bytes: 4096,
                hole: false,
                zero: true,
            },
        ];
        let descriptors = status_descriptors(&runs, 1 << 20, false);
        assert_eq!(
            descriptors,
            vec![
                StatusDescriptor {
                    len_bytes: 8192,
                    flags: 0
                },
                StatusDescriptor {
                    len_bytes: 8192,
                    flags: NBD_STATE_HOLE | NBD_STATE_ZERO
                },
                StatusDescriptor {
                    len_bytes: 4096,
                    flags: NBD_STATE_ZERO
                },
            ]
        );
        // The total never exceeds the limit, and REQ_ONE gives exactly one within it.
        let cut = status_descriptors(&runs, 10_000, false);
        assert_eq!(cut.iter().map(|d| d.len_bytes).sum::<u64>(), 10_000);
        assert_eq!(
            status_descriptors(&runs, 5000, true),
            vec![StatusDescriptor {
                len_bytes: 5000,
                flags: 0
            }]
        );
        assert!(status_descriptors(&[], 4096, false).is_empty());
    }

    #[test]
    fn nbd_reply_type_block_status_descriptor_cap() {
        let runs: Vec<BlockStatus> = (0..(BLOCK_STATUS_DESCRIPTORS_MAX + 10))
            .map(|index| BlockStatus {
                len_bytes: 4096,
                hole: index % 2 == 0,
                zero: index % 2 == 0,
            })
            .collect();
        let descriptors = status_descriptors(&runs, u64::MAX, false);
        assert_eq!(descriptors.len(), BLOCK_STATUS_DESCRIPTORS_MAX);
    }

    #[test]
    fn nbd_cmd_read_structured_chunks() {
        let chunks = vec![
            ReadChunk::Zero { len_bytes: 4096 },
            ReadChunk::Data(vec![7u8; 100].into()),
            ReadChunk::Zero { len_bytes: 0 },
            ReadChunk::Data(vec![8u8; 50].into()),
        ];
        let reply = read_chunks_reply(ReplyMode::Structured, 5, 1000, 4246, chunks).unwrap();
        let mut slices = Vec::new();
        reply.push_slices(&mut slices);
        let wire: Vec<u8> = slices
            .iter()
            .flat_map(|slice| slice.iter().copied())
            .collect();
        // Hole chunk: header (20) + offset + size.
        assert_eq!(&wire[6..8], &NBD_REPLY_TYPE_OFFSET_HOLE.to_be_bytes());
        assert_eq!(&wire[4..6], &0u16.to_be_bytes());
        assert_eq!(&wire[20..28], &1000u64.to_be_bytes());
        assert_eq!(&wire[28..32], &4096u32.to_be_bytes());
        // First data chunk at 1000 + 4096.
        let data = &wire[32..];
        assert_eq!(&data[6..8], &NBD_REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        assert_eq!(&data[16..20], &108u32.to_be_bytes());
        assert_eq!(&data[20..28], &5096u64.to_be_bytes());
        assert!(data[28..128].iter().all(|b| *b == 7));
        // Last data chunk carries DONE.
        let last = &data[128..];
        assert_eq!(&last[4..6], &NBD_REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&last[20..28], &5196u64.to_be_bytes());
        assert_eq!(last.len(), 20 + 8 + 50);
        // Chunks that do not cover the request are refused.
        assert!(read_chunks_reply(
            ReplyMode::Structured,
            5,
            0,
            10,
            vec![ReadChunk::Zero { len_bytes: 9 }]
        )
        .is_none());
    }

    #[test]
    fn extended_reply_chunks_carry_the_request_offset() {
        let chunks = vec![
            ReadChunk::Data(vec![1u8; 10].into()),
            ReadChunk::Zero { len_bytes: 10 },
        ];
        let reply = read_chunks_reply(ReplyMode::Extended, 5, 1 << 33, 20, chunks).unwrap();
        let mut slices = Vec::new();
        reply.push_slices(&mut slices);
        let wire: Vec<u8> = slices
            .iter()
            .flat_map(|slice| slice.iter().copied())
            .collect();
        assert_eq!(&wire[0..4], &NBD_EXTENDED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&wire[16..24], &(1u64 << 33).to_be_bytes());
        assert_eq!(&wire[24..32], &18u64.to_be_bytes());
        let hole = &wire[32 + 18..];
        assert_eq!(
            &hole[16..24],
            &(1u64 << 33).to_be_bytes(),
            "header offset is the request's"
        );
        assert_eq!(
            &hole[32..40],
            &((1u64 << 33) + 10).to_be_bytes(),
            "payload offset is the hole's"
        );
    }

    #[test]
    fn replies_for_each_mode() {
        let simple = success(ReplyMode::Structured, Command::Write, 3, 0);
        assert_eq!(simple.meta.len(), SIMPLE_REPLY_BYTES);
        let read = success(ReplyMode::Structured, Command::Read, 3, 0);
        assert_eq!(
            read.meta.len(),
            STRUCTURED_REPLY_HEADER_BYTES,
            "never a simple reply to READ"
        );
        let extended = success(ReplyMode::Extended, Command::Flush, 3, 0);
        assert_eq!(extended.meta.len(), EXTENDED_REPLY_HEADER_BYTES);
        let error = failure(ReplyMode::Simple, 3, 0, NBD_EPERM, "nope");
        assert_eq!(error.meta.len(), SIMPLE_REPLY_BYTES);
        let error = failure(ReplyMode::Structured, 3, 0, NBD_EPERM, "nope");
        assert_eq!(error.meta.len(), STRUCTURED_REPLY_HEADER_BYTES + 6 + 4);
    }
}
