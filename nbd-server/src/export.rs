//! What the NBD server serves: a provider of named exports and handles to open ones.
//!
//! [`ExportProvider`] and [`ExportHandle`] are the only view the protocol code has of storage.
//! [`PoolProvider`] implements them over the engine (`Pool` and `Session`);
//! [`crate::memory::MemoryProvider`] implements them in memory for tests.
//!
//! The protocol code is generic over the provider, so every call is statically dispatched
//! and no future is boxed.
//!
//! Besides data, a provider may offer the differences between an export and another ref
//! (the `grove:diff:REF` and `qemu:dirty-bitmap:REF` metadata contexts): it checks the ref
//! when a client selects the context ([`ExportProvider::diff_base`]) and the open export
//! computes the changed blocks on demand ([`ExportHandle::diff`]). The protocol code decides
//! when to compute again (see `meta.rs`).

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use grove_engine::{
    BlockStatus, Error, ExportInfo, Pool, ReadChunk, ResolvedRef, Result, RoaringTreemap, Session,
    SessionClient, ZeroMode, MAIN_BRANCH,
};

/// A ref an export can be compared with: the `REF` of a `grove:diff:REF` or
/// `qemu:dirty-bitmap:REF` context, as the provider accepted it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DiffBase {
    /// The ref as the provider wants it back in [`ExportHandle::diff`]: its own unambiguous
    /// spelling, pinned where it can be (a tag becomes its commit, so deleting the tag later
    /// changes nothing).
    pub reference: String,
    /// Whether the differences can never change while the connection lasts: the export and
    /// the base are both immutable (commits or tags). Then one computation serves the whole
    /// connection; otherwise every block status request computes them again.
    pub immutable: bool,
}

/// Refs offered as diff contexts when a client lists them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiffCandidates {
    /// Names to put after `grove:diff:` and `qemu:dirty-bitmap:`, most useful first.
    pub references: Vec<String>,
    /// Whether more refs would be accepted than listed (the lists are bounded).
    pub more: bool,
}

impl DiffCandidates {
    /// Adds `reference` unless already `seen`, or notes that there are `more` once `limit`
    /// refs are listed. True if the ref was new.
    fn offer(&mut self, seen: &mut HashSet<String>, reference: String, limit: usize) -> bool {
        if seen.contains(&reference) {
            return false;
        }
        if self.references.len() < limit {
            self.references.push(reference.clone());
        } else {
            self.more = true;
        }
        seen.insert(reference);
        true
    }
}

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

    /// Checks that the export `export` can be compared with `reference` (the `REF` of a diff
    /// context being selected or listed) and says how. An error means the context does not
    /// exist for that export; the client is not told why. A provider without history (the
    /// default) offers no diff contexts.
    fn diff_base(&self, export: &str, reference: &str) -> Result<DiffBase> {
        let _ = export;
        Err(Error::NotFound {
            what: format!("ref {reference:?} to compare with"),
        })
    }

    /// At most `limit` refs `export` can be compared with, for `NBD_OPT_LIST_META_CONTEXT`.
    fn diff_candidates(&self, export: &str, limit: usize) -> Result<DiffCandidates> {
        let _ = (export, limit);
        Ok(DiffCandidates::default())
    }
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
    /// The numbers of the 4 KiB blocks that differ between the export, as it is when called
    /// (every write completed before the call included), and `base`, a value
    /// [`ExportProvider::diff_base`] returned for this export.
    fn diff(&self, base: &DiffBase) -> impl Future<Output = Result<RoaringTreemap>> + Send {
        let _ = base;
        std::future::ready(Err(Error::NotFound {
            what: "history to compare with".to_string(),
        }))
    }
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

/// A resolved ref spelled so that it resolves the same way for the whole connection: a branch
/// as `VOL@BRANCH` (its head, which moves), a tag or commit as `VOL@COMMITID`.
fn pinned_reference(resolved: &ResolvedRef) -> String {
    match resolved {
        ResolvedRef::Branch { volume, branch } => format!("{volume}@{branch}"),
        ResolvedRef::Tag { volume, commit, .. } | ResolvedRef::Commit { volume, commit } => {
            format!("{volume}@{commit}")
        }
    }
}

impl ExportProvider for PoolProvider {
    type Handle = PoolExport;

    fn list(&self) -> Vec<ExportInfo> {
        self.pool.exports()
    }

    fn describe(&self, name: &str) -> Result<ExportInfo> {
        let target = self.pool.resolve(name)?;
        let info = self.pool.export_info(name)?;
        Ok(ExportInfo {
            description: describe_target(&target),
            ..info
        })
    }

    fn open(&self, name: &str, client: SessionClient) -> Result<Arc<PoolExport>> {
        let session = self.pool.open_session(name, client)?;
        let reference = pinned_reference(session.target());
        Ok(Arc::new(PoolExport {
            session,
            pool: self.pool.clone(),
            reference,
        }))
    }

    /// `reference` resolves in the context of the export's volume (`Pool::resolve_in`): a
    /// bare branch, tag or commit name of that volume, or a full `VOL@NAME` of a volume that
    /// shares history with it.
    fn diff_base(&self, export: &str, reference: &str) -> Result<DiffBase> {
        let target = self.pool.resolve(export)?;
        let base = self.pool.resolve_in(target.volume(), reference)?;
        if self
            .pool
            .check_related(target.volume(), base.volume())
            .is_err()
        {
            return Err(Error::InvalidArgument(format!(
                "volumes {:?} and {:?} share no history",
                target.volume(),
                base.volume()
            )));
        }
        Ok(DiffBase {
            reference: pinned_reference(&base),
            immutable: target.read_only() && base.read_only(),
        })
    }

    /// The export volume's branches (main first), then its tags, then commits along the
    /// branches' first-parent histories, newest first (a clone's history continues into its
    /// source volume). Every name is a full ref, as exports are listed.
    fn diff_candidates(&self, export: &str, limit: usize) -> Result<DiffCandidates> {
        let target = self.pool.resolve(export)?;
        let volume = target.volume();
        let mut branches = self.pool.branches(volume)?;
        branches.sort_by_key(|branch| (branch.name != MAIN_BRANCH, branch.name.clone()));
        let tags = self.pool.tags(volume)?;
        let commits_of_volume = self.pool.volume(volume)?.commits;

        let mut candidates = DiffCandidates::default();
        let mut seen: HashSet<String> = HashSet::new();
        for branch in &branches {
            let resolved = ResolvedRef::Branch {
                volume: volume.to_string(),
                branch: branch.name.clone(),
            };
            candidates.offer(&mut seen, resolved.canonical_name(), limit);
        }
        for tag in &tags {
            candidates.offer(&mut seen, format!("{volume}@{}", tag.name), limit);
        }
        let mut commits_listed = 0usize;
        for branch in &branches {
            if candidates.references.len() >= limit {
                // Full: the commits not looked at are accepted all the same.
                candidates.more = true;
                break;
            }
            // At most `limit + 1` commits per branch are looked at: enough to fill the list
            // and to know whether more exist.
            let history = self
                .pool
                .log(&format!("{volume}@{}", branch.name), Some(limit + 1))?;
            for commit in history {
                let reference = format!("{}@{}", commit.volume, commit.id);
                if candidates.offer(&mut seen, reference, limit) && commit.volume == volume {
                    commits_listed += 1;
                }
            }
        }
        if commits_listed < commits_of_volume {
            // Commits no branch history reaches (or beyond the limit) are accepted too.
            candidates.more = true;
        }
        Ok(candidates)
    }
}

/// An export of a grove pool open for I/O: an engine session, and the pool for diffs.
pub struct PoolExport {
    session: Arc<Session>,
    pool: Pool,
    /// The exported ref, pinned as [`DiffBase::reference`] is.
    reference: String,
}

impl PoolExport {
    pub fn session(&self) -> &Session {
        &self.session
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

impl ExportHandle for PoolExport {
    fn name(&self) -> String {
        self.session.target().canonical_name()
    }

    fn description(&self) -> String {
        describe_target(self.session.target())
    }

    fn size_bytes(&self) -> u64 {
        self.session.size_bytes()
    }

    fn read_only(&self) -> bool {
        self.session.read_only()
    }

    async fn read(&self, offset_bytes: u64, len_bytes: u64) -> Result<Vec<u8>> {
        self.session.read(offset_bytes, len_bytes).await
    }

    async fn read_chunks(&self, offset_bytes: u64, len_bytes: u64) -> Result<Vec<ReadChunk>> {
        self.session.read_chunks(offset_bytes, len_bytes).await
    }

    async fn write(&self, offset_bytes: u64, data: &[u8], fua: bool) -> Result<()> {
        self.session.write(offset_bytes, data, fua).await
    }

    async fn write_zeroes(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> Result<()> {
        self.session
            .write_zeroes(offset_bytes, len_bytes, mode, fua)
            .await
    }

    async fn trim(&self, offset_bytes: u64, len_bytes: u64, fua: bool) -> Result<()> {
        self.session.trim(offset_bytes, len_bytes, fua).await
    }

    async fn flush(&self) -> Result<()> {
        self.session.flush().await
    }

    async fn cache(&self, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        self.session.cache(offset_bytes, len_bytes).await
    }

    async fn block_status(&self, offset_bytes: u64, len_bytes: u64) -> Result<Vec<BlockStatus>> {
        // The engine answers from its extent map (through the page cache) synchronously.
        self.session.block_status(offset_bytes, len_bytes)
    }

    async fn diff(&self, base: &DiffBase) -> Result<RoaringTreemap> {
        let volume = self.session.target().volume();
        let diff = self
            .pool
            .diff(volume, &base.reference, &self.reference)
            .await?;
        Ok(diff.blocks)
    }
}
