//! Three-way merge at block granularity.
//!
//! With `base` the nearest common ancestor of the branch's latest commit (ours) and the
//! merged commit (theirs): blocks changed only on their side are taken from it, blocks
//! changed only on ours stay, and blocks changed on both sides are conflicts unless both
//! sides hold the same content. Taking a block shares the merged side's extent (same data
//! block, same birth): a merge never copies data. The result is a commit with two parents;
//! a branch whose latest commit is an ancestor of theirs is fast-forwarded instead.

use roaring::RoaringTreemap;
use serde::{Deserialize, Serialize};

use crate::catalog::*;
use crate::error::{Error, Result};
use crate::events::Event;
use crate::extent_map::{MapReader, MapWriter};
use crate::history::{candidates, refine, MapSource, RefState};
use crate::io::{self, FileKind};
use crate::pool::{check_gated, free_head_space, run_blocking, runs, Pool, PoolInner};
use crate::rewrite::write_bitmap;
use crate::session::segments;
use crate::types::*;

/// What to do with blocks both sides changed differently.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MergeStrategy {
    /// Change nothing and list the conflicting ranges.
    #[default]
    Fail,
    /// Keep the branch's content.
    Ours,
    /// Take the merged side's content.
    Theirs,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MergeRequest {
    /// The ref to merge: a commit, a tag, or a branch (its latest commit; uncommitted writes
    /// on it are not merged).
    pub from: String,
    /// The branch to merge into.
    pub into: String,
    pub strategy: MergeStrategy,
    /// Report what would happen, change nothing.
    pub dry_run: bool,
    pub message: Option<String>,
    pub author: Option<String>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MergeOutcome {
    /// Theirs is already in the branch's history: nothing to do.
    UpToDate,
    /// The branch's latest commit is an ancestor of theirs: the head moves to theirs.
    FastForward,
    /// A merge commit with two parents.
    Merged,
    /// Strategy `fail` met conflicts: nothing changed.
    Conflicts,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ByteRange {
    pub offset_bytes: u64,
    pub len_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MergeReport {
    pub outcome: MergeOutcome,
    pub dry_run: bool,
    pub volume: String,
    pub into: String,
    /// The commit merged in.
    pub from_commit: CommitId,
    /// The branch's latest commit before the merge.
    pub ours_commit: Option<CommitId>,
    /// Their nearest common ancestor (`None`: only the empty volume).
    pub base: Option<CommitId>,
    /// The merge commit made, or the commit fast-forwarded to (`None` on a dry run, when up
    /// to date, or on conflicts).
    pub commit: Option<CommitInfo>,
    /// Ranges taken from the merged side.
    pub taken: Vec<ByteRange>,
    pub taken_bytes: u64,
    /// Ranges both sides changed to different content.
    pub conflicts: Vec<ByteRange>,
    pub conflict_bytes: u64,
}

fn byte_ranges(blocks: &RoaringTreemap) -> Vec<ByteRange> {
    runs(blocks)
        .map(|(start, len)| ByteRange {
            offset_bytes: start * BLOCK_SIZE,
            len_bytes: len * BLOCK_SIZE,
        })
        .collect()
}

/// What a three-way merge takes from theirs, and what conflicts.
struct Plan {
    base: Option<CommitId>,
    take: RoaringTreemap,
    conflicts: RoaringTreemap,
}

impl Pool {
    /// Merges a ref into a branch of `volume`. The branch must have no uncommitted writes and
    /// no sessions attached (its content changes).
    pub async fn merge(&self, volume: &str, request: MergeRequest) -> Result<MergeReport> {
        let theirs = self.commit_of(volume, &request.from)?;
        let into = request.into.clone();
        // The head may not change while the merge is planned and made.
        let gated = if request.dry_run {
            None
        } else {
            Some(self.gate_head(volume, &into).await?)
        };
        if !request.dry_run {
            let export = ResolvedRef::Branch {
                volume: volume.to_string(),
                branch: into.clone(),
            };
            let attached = self.attached(|target| *target == export);
            if attached > 0 {
                return Err(Error::Conflict(format!(
                    "branch {into:?} of volume {volume:?} has {attached} open sessions; disconnect them before merging into it"
                )));
            }
        }
        let (head_id, ours) = {
            let st = self.inner.state.lock();
            let id = st.catalog.head_id(volume, &into)?;
            let head = st.catalog.head(id)?;
            let theirs_volume = &st.catalog.commit_required(&theirs)?.info.volume;
            st.catalog.check_related(volume, theirs_volume)?;
            if !head.changed.is_empty() {
                return Err(Error::Conflict(format!(
                    "branch {into:?} has {} uncommitted blocks: commit or reset them before merging",
                    head.changed.len()
                )));
            }
            (id, head.record.base)
        };
        if let Some((gated_id, _)) = &gated {
            check_gated(Some(*gated_id), head_id, &into)?;
        }
        let mut report = MergeReport {
            outcome: MergeOutcome::Merged,
            dry_run: request.dry_run,
            volume: volume.to_string(),
            into: into.clone(),
            from_commit: theirs,
            ours_commit: ours,
            base: None,
            commit: None,
            taken: Vec::new(),
            taken_bytes: 0,
            conflicts: Vec::new(),
            conflict_bytes: 0,
        };
        let inner = self.inner.clone();
        let strategy = request.strategy;
        let plan = run_blocking(move || plan(&inner, ours, theirs, strategy)).await?;
        report.base = plan.base;
        report.conflicts = byte_ranges(&plan.conflicts);
        report.conflict_bytes = plan.conflicts.len() * BLOCK_SIZE;
        report.taken = byte_ranges(&plan.take);
        report.taken_bytes = plan.take.len() * BLOCK_SIZE;
        report.outcome = if plan.base == Some(theirs) {
            MergeOutcome::UpToDate
        } else if plan.base == ours {
            MergeOutcome::FastForward
        } else if !plan.conflicts.is_empty() && strategy == MergeStrategy::Fail {
            MergeOutcome::Conflicts
        } else {
            MergeOutcome::Merged
        };
        let Some((_, gate)) = gated else {
            return Ok(report);
        };
        let commit_id = match report.outcome {
            MergeOutcome::UpToDate | MergeOutcome::Conflicts => return Ok(report),
            MergeOutcome::FastForward => theirs,
            MergeOutcome::Merged => CommitId::random(),
        };
        let outcome = report.outcome;
        let (volume, take, conflict_blocks) = (volume.to_string(), plan.take, plan.conflicts.len());
        let message = request
            .message
            .filter(|m| !m.trim().is_empty())
            .unwrap_or_else(|| format!("Merge {} into {into}", request.from));
        let author = request.author;
        // A failure after the map began to change leaves it half merged: the pool fails.
        let failing = self.inner.clone();
        self.inner
            .change_gated(Some(gate), move |st| {
                let id = st.catalog.head_id(&volume, &into)?;
                check_gated(Some(head_id), id, &into)?;
                let head = st.catalog.head(id)?;
                if head.record.base != ours || !head.changed.is_empty() {
                    return Err(Error::Conflict(format!(
                        "branch {into:?} changed while the merge was planned; try again"
                    )));
                }
                let target = st.catalog.commit_required(&theirs)?.clone();
                let gen = st.meta.gen;
                let mut events = Vec::new();
                let mut ops = Vec::new();
                if outcome == MergeOutcome::FastForward {
                    free_head_space(st, id)?;
                    let head = st.catalog.head_mut(id)?;
                    head.record.root = target.root;
                    head.record.base = Some(theirs);
                    head.record.base_gen = target.gen;
                } else {
                    let (root, exclusive_since) = (head.record.root, head.record.exclusive_since);
                    let mut root = root;
                    for (start, len) in runs(&take).collect::<Vec<_>>() {
                        let end = start + len;
                        let theirs_extents = MapReader {
                            store: &mut st.meta,
                        }
                        .lookup(target.root, start, end)
                        .map_err(|e| failing.fail_meta(e))?;
                        let mut writer = MapWriter {
                            store: &mut st.meta,
                            exclusive_since,
                        };
                        let (new_root, removed) = writer
                            .replace(root, start, end, None)
                            .map_err(|e| failing.fail_meta(e))?;
                        root = new_root;
                        for e in theirs_extents {
                            // Shared as it is, birth included: the head owns none of it.
                            root = writer.insert(root, e).map_err(|e| failing.fail_meta(e))?;
                        }
                        st.release_extents(&volume, &removed, exclusive_since);
                    }
                    let bitmap = write_bitmap(st, &take).map_err(|e| failing.fail_meta(e))?;
                    let size_bytes = st.catalog.volume(&volume)?.size_bytes;
                    let info = CommitInfo {
                        id: commit_id,
                        volume: volume.clone(),
                        branch: into.clone(),
                        parents: ours.into_iter().chain([theirs]).collect(),
                        message,
                        author,
                        meta: Default::default(),
                        created_unix: now_unix(),
                        changed_blocks: take.len(),
                        size_bytes,
                    };
                    let head = st.catalog.head_mut(id)?;
                    head.record.root = root;
                    head.record.base = Some(commit_id);
                    head.record.base_gen = gen;
                    ops.push(CatalogOp::Commit {
                        commit: CommitRecord {
                            info: info.clone(),
                            root,
                            gen,
                            bitmap,
                        },
                    });
                    events.push(Event::CommitCreated {
                        volume: volume.clone(),
                        branch: into.clone(),
                        commit: commit_id,
                        parents: info.parents.clone(),
                        changed_blocks: info.changed_blocks,
                    });
                }
                let head = st.catalog.head_mut(id)?;
                // Everything the head maps now is shared with a commit.
                head.record.exclusive_since = gen + 1;
                head.changed = RoaringTreemap::new();
                st.dirty_heads.insert(id);
                for op in &ops {
                    st.catalog.apply(op)?;
                }
                events.push(Event::MergeCompleted {
                    volume: volume.clone(),
                    branch: into.clone(),
                    from: theirs,
                    commit: commit_id,
                    fast_forward: outcome == MergeOutcome::FastForward,
                    taken_blocks: take.len(),
                    conflict_blocks,
                });
                Ok((ops, events))
            })
            .await?;
        // A fast-forward may land on a commit of a related volume.
        let st = self.inner.state.lock();
        report.commit = Some(st.catalog.commit_required(&commit_id)?.info.clone());
        Ok(report)
    }
}

/// Plans a merge of commit `theirs` into a head whose latest commit is `ours`.
fn plan(
    inner: &PoolInner,
    ours: Option<CommitId>,
    theirs: CommitId,
    strategy: MergeStrategy,
) -> Result<Plan> {
    let (base, ours_candidates, theirs_candidates) = {
        let st = inner.state.lock();
        let base = st.catalog.merge_base(ours, Some(theirs))?;
        let at = |c: Option<CommitId>| RefState {
            commit: c,
            uncommitted: None,
        };
        (
            base,
            candidates(&st, &at(base), &at(ours))?,
            candidates(&st, &at(base), &at(Some(theirs)))?,
        )
    };
    let mut plan = Plan {
        base,
        take: RoaringTreemap::new(),
        conflicts: RoaringTreemap::new(),
    };
    if base == Some(theirs) || base == ours {
        return Ok(plan);
    }
    let (base_map, ours_map, theirs_map) = (
        MapSource::Commit(base),
        MapSource::Commit(ours),
        MapSource::Commit(Some(theirs)),
    );
    let changed_ours = refine(inner, &base_map, &ours_map, &ours_candidates)?;
    let changed_theirs = refine(inner, &base_map, &theirs_map, &theirs_candidates)?;
    let both = &changed_ours & &changed_theirs;
    plan.take = &changed_theirs - &changed_ours;
    // Changed on both sides: the same data block is no conflict; different ones are, unless
    // their content is equal.
    let differing = refine(inner, &ours_map, &theirs_map, &both)?;
    for (start, len) in runs(&differing).collect::<Vec<_>>() {
        for chunk_start in (start..start + len).step_by(COMPARE_CHUNK_BLOCKS as usize) {
            let chunk_end = (chunk_start + COMPARE_CHUNK_BLOCKS).min(start + len);
            let a = read_map(inner, &ours_map, chunk_start, chunk_end)?;
            let b = read_map(inner, &theirs_map, chunk_start, chunk_end)?;
            for i in 0..(chunk_end - chunk_start) {
                let at = (i * BLOCK_SIZE) as usize..((i + 1) * BLOCK_SIZE) as usize;
                if a[at.clone()] != b[at] {
                    plan.conflicts.insert(chunk_start + i);
                }
            }
        }
    }
    if strategy == MergeStrategy::Theirs {
        plan.take |= &plan.conflicts;
    }
    Ok(plan)
}

/// Blocks compared per read when checking conflicting content.
const COMPARE_CHUNK_BLOCKS: u64 = 256;

/// Reads `[first, end)` of a commit's map. A grace guard keeps the blocks from being reused
/// while they are read.
fn read_map(inner: &PoolInner, map: &MapSource, first: u64, end: u64) -> Result<Vec<u8>> {
    let (segs, _grace) = {
        let mut st = inner.state.lock();
        let root = map.root(&st.catalog)?;
        let extents = MapReader {
            store: &mut st.meta,
        }
        .lookup(root, first, end)?;
        (segments(&extents, first, end), inner.grace.enter())
    };
    let mut out = vec![0u8; ((end - first) * BLOCK_SIZE) as usize];
    for seg in segs {
        if let Some(p) = seg.pblock {
            let data = io::read_blocking(
                &*inner.backend,
                FileKind::Data,
                p * BLOCK_SIZE,
                (seg.len * BLOCK_SIZE) as usize,
            )?;
            let at = ((seg.lblock - first) * BLOCK_SIZE) as usize;
            out[at..at + data.len()].copy_from_slice(&data);
        }
    }
    Ok(out)
}
