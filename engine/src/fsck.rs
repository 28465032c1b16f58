//! The offline consistency check (`grove fsck`).
//!
//! Opening a pool already proves a lot: file headers, every journal record's checksum, the
//! catalog's replay, and a walk of every extent map (each node's checksum, level and birth)
//! to rebuild the allocators, which are derived from the maps and so cannot disagree with
//! them. The check adds what opening does not: the catalog's references (parents, tags, heads,
//! merges, clone origins), every bitmap blob's checksum, blobs overlapping nodes or each other,
//! extents outside their volume or the data file, and each commit's bitmap against the blocks
//! its map really changed from its first parent (a bitmap that misses one would make diffs,
//! merges and blame wrong). Without `repair` it writes nothing, not even the cut of a torn
//! journal tail; with it, it cuts the tail and rewrites bitmaps that miss blocks (adding what
//! the maps prove changed: nothing is guessed).

use std::path::Path;

use roaring::RoaringTreemap;
use serde::{Deserialize, Serialize};

use crate::catalog::{BlobRef, CatalogOp, CommitRecord};
use crate::error::{Error, Result};
use crate::extent_map::MapReader;
use crate::format::PAGE_SIZE;
use crate::history::{read_bitmap, refine, MapSource};
use crate::io::{self, BackendChoice, FileKind};
use crate::meta::Target;
use crate::pool::Pool;
use crate::rewrite::{free_blob, write_bitmap};
use crate::types::*;

/// A damaged or inconsistent structure: what, and where.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Problem {
    pub what: String,
    pub at: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FsckReport {
    pub volumes: usize,
    pub branches: usize,
    pub commits: usize,
    /// Distinct extent-map nodes and data blocks reached from every root.
    pub meta_pages: u64,
    pub data_blocks: u64,
    /// An incomplete record at the journal's end (an interrupted sync): harmless, cut at the
    /// next start, or by `repair`.
    pub torn_journal_bytes: u64,
    /// The pool could not be opened at all (the one problem says why).
    pub unopenable: bool,
    pub problems: Vec<Problem>,
    /// What `repair` fixed.
    pub repaired: Vec<String>,
}

impl FsckReport {
    pub fn clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// A commit whose bitmap misses blocks its map changed.
struct ShortBitmap {
    commit: CommitId,
    missing: RoaringTreemap,
}

/// Checks the pool in `dir`, which no running grove may have open. A pool too damaged to open
/// is reported as one problem naming the damage.
pub fn fsck(dir: &Path, repair: bool) -> Result<FsckReport> {
    if !dir.join(FileKind::Journal.file_name()).exists() {
        return Err(Error::not_found(format!(
            "a pool in {} (no {})",
            dir.display(),
            FileKind::Journal.file_name()
        )));
    }
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("grove.lock"))?;
    if lock.try_lock().is_err() {
        return Err(Error::Conflict(format!(
            "the pool in {} is open in a running grove: stop it first",
            dir.display()
        )));
    }
    let backend = io::open_backend(dir, BackendChoice::Threads)?;
    let pool = match Pool::open_with(backend, 64 << 20, Some(dir.to_path_buf()), repair) {
        Ok(pool) => pool,
        Err(Error::Corrupt { what, at }) => {
            return Ok(FsckReport {
                problems: vec![Problem {
                    what: format!("the pool cannot be opened: {what}"),
                    at,
                }],
                unopenable: true,
                ..Default::default()
            })
        }
        Err(other) => return Err(other),
    };
    let (mut report, short) = pool.check()?;
    if repair {
        let torn = report.torn_journal_bytes;
        if torn > 0 {
            report
                .repaired
                .push(format!("cut the torn journal tail ({torn} bytes)"));
            report.torn_journal_bytes = 0;
        }
        for bitmap in short {
            pool.extend_bitmap(bitmap.commit, bitmap.missing.clone())?;
            report.repaired.push(format!(
                "added {} changed blocks to the bitmap of commit {}",
                bitmap.missing.len(),
                bitmap.commit
            ));
            report
                .problems
                .retain(|p| !p.at.ends_with(&format!("commit {}", bitmap.commit)));
        }
    }
    drop(lock);
    Ok(report)
}

impl Pool {
    /// Checks an open pool the way `fsck` does (everything but repairs), for tests that
    /// drive a pool in process: flush it first (a node not yet written counts as damage).
    pub fn check_consistency(&self) -> Result<FsckReport> {
        Ok(self.check()?.0)
    }

    /// The checks beyond what opening proves.
    fn check(&self) -> Result<(FsckReport, Vec<ShortBitmap>)> {
        let inner = &self.inner;
        let data_blocks_in_file = inner.backend.file_len(FileKind::Data)? / BLOCK_SIZE;
        let meta_pages_in_file = inner
            .backend
            .file_len(FileKind::Meta)?
            .div_ceil(PAGE_SIZE as u64);
        let mut report = FsckReport::default();
        let mut problem = |what: String, at: String| report.problems.push(Problem { what, at });
        let mut nodes = RoaringTreemap::new();
        let mut blocks = RoaringTreemap::new();
        let mut blobs: Vec<(BlobRef, String)> = Vec::new();
        let commits: Vec<CommitRecord>;
        let (volumes, branches, torn);
        {
            let mut st = inner.state.lock();
            torn = st.torn_journal_bytes;
            volumes = st.catalog.volumes.len();
            branches = st.catalog.heads.len();
            commits = st
                .catalog
                .volumes
                .values()
                .flat_map(|v| v.commits.values().cloned())
                .collect();
            let gen = st.meta.gen;
            // References between catalog records.
            let mut roots: Vec<(u64, u64, String)> = Vec::new();
            for vol in st.catalog.volumes.values() {
                let size_blocks = vol.size_bytes / BLOCK_SIZE;
                if let Some(origin) = &vol.origin {
                    if !st.catalog.volumes.contains_key(&origin.volume) {
                        problem(
                            format!("cloned from volume {:?}, which is gone", origin.volume),
                            format!("volume {}", vol.name),
                        );
                    }
                }
                for (name, id) in &vol.branches {
                    let at = format!("branch {}@{name}", vol.name);
                    let Some(head) = st.catalog.heads.get(id) else {
                        problem("no head record".into(), at);
                        continue;
                    };
                    for needed in head.record.needs() {
                        if st.catalog.commit_required(&needed).is_err() {
                            problem(format!("needs commit {needed}, which is gone"), at.clone());
                        }
                    }
                    for blob in head.record.blobs() {
                        blobs.push((blob, at.clone()));
                    }
                    roots.push((head.record.root, size_blocks, at));
                }
                for tag in vol.tags.values() {
                    if st.catalog.commit_required(&tag.commit).is_err() {
                        problem(
                            format!("names commit {}, which is gone", tag.commit),
                            format!("tag {}@{}", vol.name, tag.name),
                        );
                    }
                }
                for commit in vol.commits.values() {
                    let at = format!("commit {}", commit.info.id);
                    for parent in &commit.info.parents {
                        if st.catalog.commit_required(parent).is_err() {
                            problem(format!("parent {parent} is gone"), at.clone());
                        }
                    }
                    blobs.push((commit.bitmap, at.clone()));
                    roots.push((commit.root, size_blocks, at));
                }
            }
            // Every map: nodes inside the metadata file, extents inside their volume and the
            // data file. Nodes' checksums, levels and births are checked as they are read.
            for (root, size_blocks, at) in roots {
                let mut reader = MapReader {
                    store: &mut st.meta,
                };
                let mut bad_extent: Option<String> = None;
                let walked = reader.walk(
                    root,
                    gen,
                    &mut |p| nodes.insert(p),
                    &mut |e| {
                        if e.end() > size_blocks && bad_extent.is_none() {
                            bad_extent = Some(format!(
                                "maps logical blocks {}..{} past the volume's {size_blocks}",
                                e.lblock,
                                e.end()
                            ));
                        }
                        if let Target::Data(p) = e.target {
                            if p + e.len > data_blocks_in_file && bad_extent.is_none() {
                                bad_extent = Some(format!(
                                    "maps data blocks {p}..{} past the data file's {data_blocks_in_file}",
                                    p + e.len
                                ));
                            }
                            blocks.insert_range(p..p + e.len);
                        }
                    },
                );
                if let Err(error) = walked {
                    problem(format!("extent map unreadable: {error}"), at.clone());
                }
                if let Some(what) = bad_extent {
                    problem(what, at);
                }
            }
            if let Some(past) = nodes.max().filter(|&p| p >= meta_pages_in_file) {
                problem(
                    format!("an extent-map node at page {past} is past the metadata file's end"),
                    "meta.grove".into(),
                );
            }
            // Blobs: readable, and sharing no page with a node or another blob.
            let mut blob_pages = RoaringTreemap::new();
            for (blob, at) in &blobs {
                if let Err(error) = read_bitmap(&st.meta, blob) {
                    problem(format!("bitmap unreadable: {error}"), at.clone());
                }
                let pages: RoaringTreemap = blob.pages().collect();
                if !(&pages & &nodes).is_empty() || !(&pages & &blob_pages).is_empty() {
                    problem(
                        format!(
                            "bitmap at meta page {} shares pages with another structure",
                            blob.page
                        ),
                        at.clone(),
                    );
                }
                blob_pages |= pages;
            }
        }
        // Each commit's bitmap against what its map changed from its first parent.
        let mut short = Vec::new();
        for commit in &commits {
            let at = format!("commit {}", commit.info.id);
            let parent = commit.info.parents.first().copied();
            let missing = (|| -> Result<RoaringTreemap> {
                let mut candidates = RoaringTreemap::new();
                let mut st = inner.state.lock();
                let parent_root = match parent {
                    Some(p) => st.catalog.commit_required(&p)?.root,
                    None => 0,
                };
                for root in [commit.root, parent_root] {
                    MapReader {
                        store: &mut st.meta,
                    }
                    .walk(root, u64::MAX, &mut |_| true, &mut |e| {
                        candidates.insert_range(e.lblock..e.end());
                    })?;
                }
                let bitmap = read_bitmap(&st.meta, &commit.bitmap)?;
                drop(st);
                let changed = refine(
                    inner,
                    &MapSource::Commit(parent),
                    &MapSource::Commit(Some(commit.info.id)),
                    &candidates,
                )?;
                Ok(&changed - &bitmap)
            })();
            match missing {
                Ok(missing) if missing.is_empty() => {}
                Ok(missing) => {
                    problem(
                        format!(
                            "its bitmap misses {} blocks its map changed from its first parent (diffs, merges and blame would miss them)",
                            missing.len()
                        ),
                        at,
                    );
                    short.push(ShortBitmap {
                        commit: commit.info.id,
                        missing,
                    });
                }
                Err(error) => problem(format!("cannot compare with its parent: {error}"), at),
            }
        }
        report.volumes = volumes;
        report.branches = branches;
        report.commits = commits.len();
        report.meta_pages = nodes.len();
        report.data_blocks = blocks.len();
        report.torn_journal_bytes = torn;
        Ok((report, short))
    }

    /// Adds `missing` to a commit's bitmap (a repair: the maps prove those blocks changed).
    fn extend_bitmap(&self, id: CommitId, missing: RoaringTreemap) -> Result<()> {
        self.inner.sync(None, move |st| {
            let mut commit = st.catalog.commit_required(&id)?.clone();
            let mut bitmap = read_bitmap(&st.meta, &commit.bitmap)?;
            bitmap |= missing;
            let old = commit.bitmap;
            commit.bitmap = write_bitmap(st, &bitmap)?;
            commit.info.changed_blocks = bitmap.len();
            free_blob(st, &old);
            let op = CatalogOp::Commit { commit };
            st.catalog.apply(&op)?;
            Ok((vec![op], Vec::new()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::sim::SimDisk;
    use crate::session::SessionClient;

    #[tokio::test]
    async fn a_bitmap_missing_changed_blocks_is_found_and_completed() {
        let disk = SimDisk::new();
        let pool = Pool::open_with_backend(disk.backend(), 1 << 20, None).unwrap();
        pool.create_volume("v", 64 * BLOCK_SIZE).await.unwrap();
        let client = SessionClient {
            protocol: "test".into(),
            address: "sim".into(),
        };
        let session = pool.open_session("v", client).unwrap();
        session
            .write(3 * BLOCK_SIZE, &[7; 8192], false)
            .await
            .unwrap();
        let commit = pool
            .commit(
                "v",
                "main",
                CommitRequest {
                    message: "c".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert!(pool.check_consistency().unwrap().clean());

        // Damage: a valid bitmap that misses what the commit changed.
        pool.inner
            .sync(None, |st| {
                let mut record = st.catalog.commit_required(&commit.id)?.clone();
                record.bitmap = write_bitmap(st, &RoaringTreemap::new())?;
                let op = CatalogOp::Commit { commit: record };
                st.catalog.apply(&op)?;
                Ok((vec![op], Vec::new()))
            })
            .unwrap();
        let (report, short) = pool.check().unwrap();
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert!(report.problems[0].what.contains("misses 2 blocks"));
        assert_eq!(short[0].missing.iter().collect::<Vec<_>>(), [3, 4]);

        pool.extend_bitmap(commit.id, short[0].missing.clone())
            .unwrap();
        assert!(pool.check_consistency().unwrap().clean());
        assert_eq!(
            pool.commit_changes("v", &commit.id.to_hex())
                .unwrap()
                .iter()
                .collect::<Vec<_>>(),
            [3, 4]
        );
    }
}
