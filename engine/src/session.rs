//! Sessions: how frontends (NBD, iSCSI) do I/O on a ref. A session is opened on a ref, meters
//! every request, and reports `session.closed` with its counters when dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::pool::PoolInner;
use crate::types::ResolvedRef;

/// Who opened a session, for lineage and `grove sessions`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionClient {
    /// "nbd", "iscsi", ...
    pub protocol: String,
    /// The peer address ("127.0.0.1:50312", "unix").
    pub address: String,
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
    pub opened_unix: u64,
    pub counters: SessionCounters,
}

/// A piece of a sparse read: data, or a run of zeros that need not be sent as bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadChunk {
    Data(Vec<u8>),
    Zero { len_bytes: u64 },
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

/// An open I/O session on one ref. Cheap to share between the tasks of one connection
/// (`Arc<Session>`); every method is safe to call concurrently.
pub struct Session {
    pub(crate) pool: Arc<PoolInner>,
    pub(crate) info: SessionInfo,
    pub(crate) counters: AtomicCounters,
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
        self.info.target.read_only()
    }

    pub fn size_bytes(&self) -> u64 {
        todo!()
    }

    pub fn counters(&self) -> SessionCounters {
        self.counters.snapshot()
    }

    /// Reads `len_bytes` at `offset_bytes`; unwritten ranges read as zeros.
    pub async fn read(&self, offset_bytes: u64, len_bytes: u64) -> Result<Vec<u8>> {
        let _ = (offset_bytes, len_bytes);
        todo!()
    }

    /// Reads a range as data chunks and runs of zeros (for sparse replies). The chunks cover the
    /// range exactly, in order.
    pub async fn read_chunks(&self, offset_bytes: u64, len_bytes: u64) -> Result<Vec<ReadChunk>> {
        let _ = (offset_bytes, len_bytes);
        todo!()
    }

    /// Writes `data` at `offset_bytes`. Any alignment; sub-block writes read-modify-write inside
    /// the engine. With `fua`, the write is durable when this returns.
    pub async fn write(&self, offset_bytes: u64, data: &[u8], fua: bool) -> Result<()> {
        let _ = (offset_bytes, data, fua);
        todo!()
    }

    /// Makes a range read as zeros.
    pub async fn write_zeroes(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> Result<()> {
        let _ = (offset_bytes, len_bytes, mode, fua);
        todo!()
    }

    /// Discards a range: whole blocks inside it are deallocated and read as zeros afterwards;
    /// partial blocks at the edges are left as they are (a trim is advisory).
    pub async fn trim(&self, offset_bytes: u64, len_bytes: u64, fua: bool) -> Result<()> {
        let _ = (offset_bytes, len_bytes, fua);
        todo!()
    }

    /// Makes every write acknowledged before this call durable, on this session and on every
    /// other session of the pool.
    pub async fn flush(&self) -> Result<()> {
        todo!()
    }

    /// Prefetches the metadata for a range (NBD_CMD_CACHE).
    pub async fn cache(&self, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        let _ = (offset_bytes, len_bytes);
        todo!()
    }

    /// Allocation status of a range, as consecutive runs covering at least the first byte and at
    /// most the whole range.
    pub fn block_status(&self, offset_bytes: u64, len_bytes: u64) -> Result<Vec<BlockStatus>> {
        let _ = (offset_bytes, len_bytes);
        todo!()
    }
}
