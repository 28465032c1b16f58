//! What the NBD server serves: a provider of named exports and handles to open ones.
//!
//! [`ExportProvider`] and [`ExportHandle`] are the only view the protocol code has of storage.
//! [`PoolProvider`] implements them over the engine (`Pool` and `Session`);
//! [`crate::memory::MemoryProvider`] implements them in memory for tests.
//!
//! The protocol code is generic over the provider, so every call is statically dispatched
//! and no future is boxed.

use std::future::Future;
use std::sync::Arc;

use grove_engine::{
    BlockStatus, ExportInfo, Pool, ReadChunk, ResolvedRef, Result, Session, SessionClient, ZeroMode,
};

/// A source of exports: lists them, describes one, opens one for I/O.
pub trait ExportProvider: Send + Sync + 'static {
    type Handle: ExportHandle;

    /// Every export, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<ExportInfo>;

    /// Looks an export up without opening it (`NBD_OPT_INFO`, metadata context options).
    /// `name` in the answer is the canonical name.
    fn describe(&self, name: &str) -> Result<ExportInfo>;

    /// Opens an export for I/O (`NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME`). Dropping the last
    /// clone of the handle closes it.
    fn open(&self, name: &str, client: SessionClient) -> Result<Arc<Self::Handle>>;
}

/// An open export. Every method may be called concurrently from many tasks. Ranges are
/// checked against [`ExportHandle::size_bytes`] by the caller; implementations still refuse
/// bad ones with `Error::OutOfRange`.
pub trait ExportHandle: Send + Sync + 'static {
    /// The canonical export name (`NBD_INFO_NAME`).
    fn name(&self) -> String;
    /// A description for humans (`NBD_INFO_DESCRIPTION`).
    fn description(&self) -> String;
    fn size_bytes(&self) -> u64;
    fn read_only(&self) -> bool;

    /// Reads a range as one buffer of exactly `len_bytes`.
    fn read(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> impl Future<Output = Result<Vec<u8>>> + Send;
    /// Reads a range as data and zero runs that cover it exactly, in order.
    fn read_chunks(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> impl Future<Output = Result<Vec<ReadChunk>>> + Send;
    /// Writes; with `fua` the data is durable when the future completes.
    fn write(
        &self,
        offset_bytes: u64,
        data: &[u8],
        fua: bool,
    ) -> impl Future<Output = Result<()>> + Send;
    fn write_zeroes(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> impl Future<Output = Result<()>> + Send;
    fn trim(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        fua: bool,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Makes every write acknowledged before the call durable.
    fn flush(&self) -> impl Future<Output = Result<()>> + Send;
    fn cache(&self, offset_bytes: u64, len_bytes: u64) -> impl Future<Output = Result<()>> + Send;
    /// Allocation runs covering at least the first byte of the range and at most all of it.
    fn block_status(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> impl Future<Output = Result<Vec<BlockStatus>>> + Send;
}

/// Serves the refs of a grove pool: `VOL` and `VOL@BRANCH` writable, `VOL@TAG` and
/// `VOL@COMMIT` (full id or unique prefix) read-only, exactly as `Pool::open_session`
/// resolves them.
#[derive(Clone)]
pub struct PoolProvider {
    pool: Pool,
}

impl PoolProvider {
    pub fn new(pool: Pool) -> Self {
        PoolProvider { pool }
    }
}

impl ExportProvider for PoolProvider {
    type Handle = Session;

    fn list(&self) -> Vec<ExportInfo> {
        self.pool.exports()
    }

    fn describe(&self, name: &str) -> Result<ExportInfo> {
        let target = self.pool.resolve(name)?;
        let size_bytes = match &target {
            ResolvedRef::Branch { volume, .. } => self.pool.volume(volume)?.size_bytes,
            ResolvedRef::Tag { volume, commit, .. } | ResolvedRef::Commit { volume, commit } => {
                self.pool.commit_info(volume, &commit.to_hex())?.size_bytes
            }
        };
        Ok(ExportInfo {
            name: target.canonical_name(),
            read_only: target.read_only(),
            size_bytes,
            description: describe_target(&target),
        })
    }

    fn open(&self, name: &str, client: SessionClient) -> Result<Arc<Session>> {
        self.pool.open_session(name, client)
    }
}

/// The description shown for a resolved ref, the same for `NBD_OPT_INFO` and `NBD_OPT_GO`.
pub fn describe_target(target: &ResolvedRef) -> String {
    match target {
        ResolvedRef::Branch { volume, branch } => format!("branch {branch} of volume {volume}"),
        ResolvedRef::Tag {
            volume,
            tag,
            commit,
        } => {
            format!("tag {tag} (commit {commit}) of volume {volume}")
        }
        ResolvedRef::Commit { volume, commit } => {
            format!("commit {commit} of volume {volume}")
        }
    }
}

impl ExportHandle for Session {
    fn name(&self) -> String {
        self.target().canonical_name()
    }

    fn description(&self) -> String {
        describe_target(self.target())
    }

    fn size_bytes(&self) -> u64 {
        Session::size_bytes(self)
    }

    fn read_only(&self) -> bool {
        Session::read_only(self)
    }

    async fn read(&self, offset_bytes: u64, len_bytes: u64) -> Result<Vec<u8>> {
        Session::read(self, offset_bytes, len_bytes).await
    }

    async fn read_chunks(&self, offset_bytes: u64, len_bytes: u64) -> Result<Vec<ReadChunk>> {
        Session::read_chunks(self, offset_bytes, len_bytes).await
    }

    async fn write(&self, offset_bytes: u64, data: &[u8], fua: bool) -> Result<()> {
        Session::write(self, offset_bytes, data, fua).await
    }

    async fn write_zeroes(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> Result<()> {
        Session::write_zeroes(self, offset_bytes, len_bytes, mode, fua).await
    }

    async fn trim(&self, offset_bytes: u64, len_bytes: u64, fua: bool) -> Result<()> {
        Session::trim(self, offset_bytes, len_bytes, fua).await
    }

    async fn flush(&self) -> Result<()> {
        Session::flush(self).await
    }

    async fn cache(&self, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        Session::cache(self, offset_bytes, len_bytes).await
    }

    async fn block_status(&self, offset_bytes: u64, len_bytes: u64) -> Result<Vec<BlockStatus>> {
        // The engine answers from its extent map (through the page cache) synchronously.
        Session::block_status(self, offset_bytes, len_bytes)
    }
}
