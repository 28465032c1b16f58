//! The pool: the data directory with its data file, metadata pages and journal, and the
//! catalog of volumes, branches, commits and tags in it.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::error::Result;
use crate::events::{Event, EventBus};
use crate::session::{Session, SessionClient, SessionInfo};
use crate::types::*;

/// Which disk I/O backend to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoChoice {
    /// io_uring where the kernel allows it, else the thread pool.
    #[default]
    Auto,
    IoUring,
    Threads,
}

#[derive(Clone, Debug)]
pub struct PoolOptions {
    pub data_dir: PathBuf,
    pub io: IoChoice,
    /// Bound on the metadata page cache.
    pub cache_bytes: u64,
}

impl PoolOptions {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        PoolOptions { data_dir: data_dir.into(), io: IoChoice::Auto, cache_bytes: 256 << 20 }
    }
}

pub(crate) struct PoolInner {
    pub(crate) events: EventBus,
}

/// A handle on an open pool; clones share it.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

impl Pool {
    /// Opens the pool in `options.data_dir`, creating it if the directory holds none.
    pub fn open(options: PoolOptions) -> Result<Pool> {
        let _ = options;
        todo!()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    pub fn stats(&self) -> Result<PoolStats> {
        todo!()
    }

    pub async fn create_volume(&self, name: &str, size_bytes: u64) -> Result<VolumeInfo> {
        let _ = (name, size_bytes);
        todo!()
    }

    pub fn volumes(&self) -> Vec<VolumeInfo> {
        todo!()
    }

    pub fn volume(&self, name: &str) -> Result<VolumeInfo> {
        let _ = name;
        todo!()
    }

    pub async fn delete_volume(&self, name: &str) -> Result<()> {
        let _ = name;
        todo!()
    }

    /// Creates `branch` on `volume` from `from` (a ref string; default `VOL@main`). Forking a
    /// branch head includes its uncommitted writes.
    pub async fn create_branch(&self, volume: &str, branch: &str, from: Option<&str>) -> Result<BranchInfo> {
        let _ = (volume, branch, from);
        todo!()
    }

    pub fn branches(&self, volume: &str) -> Result<Vec<BranchInfo>> {
        let _ = volume;
        todo!()
    }

    pub fn branch(&self, volume: &str, branch: &str) -> Result<BranchInfo> {
        let _ = (volume, branch);
        todo!()
    }

    pub async fn delete_branch(&self, volume: &str, branch: &str) -> Result<()> {
        let _ = (volume, branch);
        todo!()
    }

    /// Commits the head of `volume@branch`: every write acknowledged before the call is in it.
    pub async fn commit(&self, volume: &str, branch: &str, request: CommitRequest) -> Result<CommitInfo> {
        let _ = (volume, branch, request);
        todo!()
    }

    /// Looks up a commit by full id or unique prefix.
    pub fn commit_info(&self, volume: &str, id_or_prefix: &str) -> Result<CommitInfo> {
        let _ = (volume, id_or_prefix);
        todo!()
    }

    /// History from a ref backwards along first parents, newest first.
    pub fn log(&self, refspec: &str, limit: Option<usize>) -> Result<Vec<CommitInfo>> {
        let _ = (refspec, limit);
        todo!()
    }

    pub async fn create_tag(&self, volume: &str, tag: &str, target: &str) -> Result<TagInfo> {
        let _ = (volume, tag, target);
        todo!()
    }

    pub fn tags(&self, volume: &str) -> Result<Vec<TagInfo>> {
        let _ = volume;
        todo!()
    }

    pub async fn delete_tag(&self, volume: &str, tag: &str) -> Result<()> {
        let _ = (volume, tag);
        todo!()
    }

    /// Resolves `VOL`, `VOL@BRANCH`, `VOL@TAG`, `VOL@COMMIT` (full or unique prefix).
    pub fn resolve(&self, refspec: &str) -> Result<ResolvedRef> {
        let _ = refspec;
        todo!()
    }

    /// Every ref of every volume, as exports.
    pub fn exports(&self) -> Vec<ExportInfo> {
        todo!()
    }

    /// Opens an I/O session on a ref (an export name).
    pub fn open_session(&self, export: &str, client: SessionClient) -> Result<Arc<Session>> {
        let _ = (export, client);
        todo!()
    }

    /// Live sessions.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        todo!()
    }

    /// Makes everything acknowledged so far durable.
    pub async fn flush(&self) -> Result<()> {
        todo!()
    }
}
