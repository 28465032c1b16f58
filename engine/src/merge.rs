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
use crate::history::read_bitmap;
use crate::history::{candidates, refine, MapSource, RefState};
use crate::io::{self, FileKind};
use crate::pool::{
    check_gated, check_name_free, free_head_space, run_blocking, runs, Pool, PoolInner, State,
};
use crate::rewrite::{free_blob, write_bitmap};
use crate::session::segments;
use crate::space::{replace_pages_max, META_RESERVE_PAGES};
use crate::sums::first_mismatch;
use crate::types::*;
use tokio::sync::OwnedRwLockWriteGuard;

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
    /// Leave the merge in progress on a writable merge branch: the blocks only the merged
    /// side changed are taken, the conflicting ones hold the branch's content until someone
    /// writes them; `conclude_merge` makes the merge commit, `abort_merge` drops it.
    Manual,
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
    /// Strategy `manual`: the merge branch's name (default `merge-INTO`).
    #[serde(default)]
    pub merge_branch: Option<String>,
    /// Refuse unless the merged ref still resolves to this commit, and the branch's latest
    /// commit is still this one: what a check (a pre-merge hook) looked at is what merges.
    #[serde(default)]
    pub expect: Option<(CommitId, Option<CommitId>)>,
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
    /// Strategy `manual` met conflicts: the merge waits on its merge branch.
    InProgress,
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
    /// Strategy `manual` with conflicts: the merge branch to resolve them on.
    pub merge_branch: Option<String>,
}

/// A merge waiting on its merge branch for conflicts to be resolved by hand.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MergeInProgress {
    pub volume: String,
    /// The merge branch: writable, exported as `VOLUME@BRANCH`.
    pub merge_branch: String,
    /// The branch the merge concludes into.
    pub into: String,
    /// The ref merged, as given.
    pub from: String,
    pub from_commit: CommitId,
    /// The target branch's latest commit when the merge began; concluding requires it
    /// still to be.
    pub ours_commit: Option<CommitId>,
    pub base: Option<CommitId>,
    /// Ranges taken from the merged side.
    pub taken: Vec<ByteRange>,
    pub taken_bytes: u64,
    /// Ranges both sides changed differently: they hold the target branch's content until
    /// written on the merge branch.
    pub conflicts: Vec<ByteRange>,
    pub conflict_bytes: u64,
    /// Blocks written on the merge branch since the merge began.
    pub edited_bytes: u64,
    pub started_unix: u64,
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
        let merge_branch = match request.strategy {
            MergeStrategy::Manual => {
                let name = request
                    .merge_branch
                    .clone()
                    .unwrap_or_else(|| format!("merge-{into}"));
                validate_ref_name("merge branch", &name)?;
                self.check_ref_name_free(volume, &name)?;
                Some(name)
            }
            _ => None,
        };
        // The head may not change while the merge is planned and made.
        let gated = if request.dry_run {
            None
        } else {
            Some(self.gate_head(volume, &into).await?)
        };
        // A manual merge leaves the branch as it is until it concludes.
        if !request.dry_run && merge_branch.is_none() {
            self.inner
                .refuse_branch_sessions(volume, &into, "merging into it")?;
        }
        let (head_id, ours) = {
            let st = self.inner.state.lock();
            let id = st.catalog.head_id(volume, &into)?;
            let head = st.catalog.head(id)?;
            refuse_merge_branch(head, "merge into it")?;
            let theirs_volume = &st.catalog.commit_required(&theirs)?.info.volume;
            st.catalog.check_related(volume, theirs_volume)?;
            if !head.changed.is_empty() {
                return Err(Error::Conflict(format!(
                    "branch {into:?} has {} uncommitted blocks: commit or reset them before merging",
                    head.changed.len()
                )));
            }
            if let Some((expected_theirs, expected_ours)) = request.expect {
                if expected_theirs != theirs || expected_ours != head.record.base {
                    return Err(Error::Conflict(format!(
                        "{} or branch {into:?} moved on since the merge was checked; try again",
                        request.from
                    )));
                }
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
            merge_branch: None,
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
        } else if !plan.conflicts.is_empty() && strategy == MergeStrategy::Manual {
            report.merge_branch = merge_branch.clone();
            MergeOutcome::InProgress
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
            MergeOutcome::InProgress => {
                let state = MergeState {
                    into: into.clone(),
                    from: request.from.clone(),
                    ours,
                    theirs,
                    base: plan.base,
                    // Written with the branch, under the same lock.
                    taken: BlobRef {
                        page: 0,
                        len_bytes: 0,
                        crc: 0,
                    },
                    conflicts: BlobRef {
                        page: 0,
                        len_bytes: 0,
                        crc: 0,
                    },
                    message: request.message.filter(|m| !m.trim().is_empty()),
                    author: request.author,
                    started_unix: now_unix(),
                    started_gen: 0,
                };
                let name = merge_branch.expect("a manual merge has a merge branch");
                self.open_merge_branch(volume, head_id, name, gate, state, plan)
                    .await?;
                return Ok(report);
            }
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
            .change_gated(Some(gate), self.actor.clone(), move |st| {
                failing.refuse_branch_sessions(&volume, &into, "merging into it")?;
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
                    let root = graft(
                        st,
                        &volume,
                        root,
                        exclusive_since,
                        target.root,
                        &take,
                        blob_pages(&take),
                    )
                    .map_err(|e| refused_or_failed(&failing, e))?;
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
                        // Its parents say where its data came from.
                        lineage: Default::default(),
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
                    events.push(Event::commit_created(&info, &take));
                }
                let head = st.catalog.head_mut(id)?;
                // Everything the head maps now is shared with a commit.
                head.record.exclusive_since = gen + 1;
                head.changed = RoaringTreemap::new();
                head.record.lineage = Default::default();
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

/// Replaces the blocks `take` of the map at `root` with the extents `from` maps there,
/// shared as they are (birth included: the head owns none of them). Returns the new root.
///
/// Before it changes anything it makes sure the metadata pages it needs, and `blob_pages` for
/// the bitmaps written after it, are set aside (`space.rs`): `NoSpace` then changes nothing.
/// The bound counts every change as its own replace, capped at half the metadata reserve
/// (changes in one generation share the nodes they copy); a graft beyond it on a full file
/// system may still fail the pool.
fn graft(
    st: &mut State,
    volume: &str,
    mut root: u64,
    exclusive_since: u64,
    from: u64,
    take: &RoaringTreemap,
    blob_pages: u64,
) -> Result<u64> {
    let mut plan = Vec::new();
    for (start, len) in runs(take) {
        let end = start + len;
        let theirs = MapReader {
            store: &mut st.meta,
        }
        .lookup(from, start, end)?;
        plan.push((start, end, theirs));
    }
    let changes: u64 = plan
        .iter()
        .map(|(_, _, theirs)| 1 + theirs.len() as u64)
        .sum();
    let height = MapReader {
        store: &mut st.meta,
    }
    .height(root)?;
    let nodes = (changes * replace_pages_max(height)).min(META_RESERVE_PAGES / 2);
    st.meta.reserve_pages(nodes, blob_pages)?;
    for (start, end, theirs) in plan {
        let mut writer = MapWriter {
            store: &mut st.meta,
            exclusive_since,
        };
        let (new_root, removed) = writer.replace(root, start, end, None)?;
        root = new_root;
        for e in theirs {
            root = writer.insert(root, e)?;
        }
        st.release_extents(volume, &removed, exclusive_since);
    }
    Ok(root)
}

/// Metadata pages a bitmap's blob takes.
fn blob_pages(bitmap: &RoaringTreemap) -> u64 {
    (bitmap.serialized_size() as u64)
        .div_ceil(crate::format::PAGE_SIZE as u64)
        .max(1)
}

/// `NoSpace` from a check made before anything changed refuses the operation; any other
/// failure of a metadata change fails the pool.
fn refused_or_failed(failing: &PoolInner, err: Error) -> Error {
    match err {
        Error::NoSpace => err,
        err => failing.fail_meta(err),
    }
}

/// Refuses what would leave a merge branch's state behind or make it wrong.
pub(crate) fn refuse_merge_branch(head: &Head, action: &str) -> Result<()> {
    match &head.record.merge {
        Some(merge) => Err(Error::Conflict(format!(
            "branch {:?} holds a merge into {:?} in progress: conclude or abort the merge before you {action}",
            head.record.branch, merge.into
        ))),
        None => Ok(()),
    }
}

impl Pool {
    /// Opens the merge branch of a manual merge: `ours` with the blocks only theirs changed
    /// grafted in, its state (taken and conflicting blocks) on the head record.
    async fn open_merge_branch(
        &self,
        volume: &str,
        into_id: u64,
        name: String,
        gate: OwnedRwLockWriteGuard<()>,
        mut state: MergeState,
        plan: Plan,
    ) -> Result<()> {
        let volume = volume.to_string();
        let failing = self.inner.clone();
        self.inner
            .change_gated(Some(gate), self.actor.clone(), move |st| {
                let id = st.catalog.head_id(&volume, &state.into)?;
                check_gated(Some(into_id), id, &state.into)?;
                if st.catalog.head(id)?.record.base != state.ours {
                    return Err(Error::Conflict(format!(
                        "branch {:?} changed while the merge was planned; try again",
                        state.into
                    )));
                }
                check_name_free(&st.catalog, &volume, &name)?;
                let (root, base_gen) = match state.ours {
                    Some(ours) => {
                        let c = st.catalog.commit_required(&ours)?;
                        (c.root, c.gen)
                    }
                    None => (0, 0),
                };
                let theirs_root = st.catalog.commit_required(&state.theirs)?.root;
                let gen = st.meta.gen;
                // Nodes written now are the merge branch's own; every grafted extent was born
                // before and stays shared.
                let blobs = blob_pages(&plan.take) + blob_pages(&plan.conflicts);
                let root = graft(st, &volume, root, gen, theirs_root, &plan.take, blobs)
                    .map_err(|e| refused_or_failed(&failing, e))?;
                state.taken = write_bitmap(st, &plan.take).map_err(|e| failing.fail_meta(e))?;
                state.conflicts =
                    write_bitmap(st, &plan.conflicts).map_err(|e| failing.fail_meta(e))?;
                state.started_gen = gen;
                let record = HeadRecord {
                    id: st.catalog.new_id(),
                    volume: volume.clone(),
                    branch: name.clone(),
                    root,
                    exclusive_since: gen,
                    base: state.ours,
                    base_gen,
                    created_unix: now_unix(),
                    merge: Some(Box::new(state.clone())),
                    lineage: Default::default(),
                    protected: false,
                };
                st.catalog.apply_head(&record)?;
                st.catalog.head_mut(record.id)?.changed = plan.take.clone();
                st.dirty_heads.insert(record.id);
                let events = vec![
                    Event::BranchCreated {
                        volume: volume.clone(),
                        branch: name.clone(),
                        from: state.ours,
                    },
                    Event::MergeStarted {
                        volume: volume.clone(),
                        branch: state.into.clone(),
                        merge_branch: name.clone(),
                        from: state.theirs,
                        taken_blocks: plan.take.len(),
                        conflict_blocks: plan.conflicts.len(),
                    },
                ];
                Ok((vec![], events))
            })
            .await
    }

    /// The merge waiting on `merge_branch` of `volume`.
    pub fn merge_in_progress(&self, volume: &str, merge_branch: &str) -> Result<MergeInProgress> {
        let mut st = self.inner.state.lock();
        let id = st.catalog.head_id(volume, merge_branch)?;
        merge_in_progress(&mut st, id)?.ok_or_else(|| {
            Error::not_found(format!(
                "a merge in progress on branch {merge_branch:?} of volume {volume:?}"
            ))
        })
    }

    /// Every merge of `volume` waiting on its merge branch.
    pub fn merges_in_progress(&self, volume: &str) -> Result<Vec<MergeInProgress>> {
        let mut st = self.inner.state.lock();
        let ids: Vec<u64> = st
            .catalog
            .volume(volume)?
            .branches
            .values()
            .copied()
            .collect();
        let mut out = Vec::new();
        for id in ids {
            out.extend(merge_in_progress(&mut st, id)?);
        }
        Ok(out)
    }

    /// Concludes a manual merge: commits the merge branch with parents `[ours, theirs]`,
    /// moves the target branch to that commit and deletes the merge branch. Refused while
    /// sessions are attached to either branch, or when the target branch moved on since the
    /// merge began.
    pub async fn conclude_merge(
        &self,
        volume: &str,
        merge_branch: &str,
        message: Option<String>,
        author: Option<String>,
    ) -> Result<CommitInfo> {
        let into = self.merge_in_progress(volume, merge_branch)?.into;
        for branch in [merge_branch, into.as_str()] {
            self.inner
                .refuse_branch_sessions(volume, branch, "concluding the merge")?;
        }
        // Writes on the merge branch finish before it is committed; none lands on either
        // branch until the change is made.
        let (merge_id, merge_gate) = self.gate_head(volume, merge_branch).await?;
        let (into_id, into_gate) = self.gate_head(volume, &into).await?;
        let (volume, name) = (volume.to_string(), merge_branch.to_string());
        let v = volume.clone();
        let commit_id = CommitId::random();
        let failing = self.inner.clone();
        self.inner
            .change_gated(Some(merge_gate), self.actor.clone(), move |st| {
                let _into_gate = into_gate;
                let id = st.catalog.head_id(&volume, &name)?;
                check_gated(Some(merge_id), id, &name)?;
                let head = st.catalog.head(id)?;
                let Some(state) = head.record.merge.clone() else {
                    return Err(Error::not_found(format!(
                        "a merge in progress on branch {name:?} of volume {volume:?}"
                    )));
                };
                let (root, changed) = (head.record.root, head.changed.clone());
                for branch in [&name, &state.into] {
                    failing.refuse_branch_sessions(&volume, branch, "concluding the merge")?;
                }
                let target_id = st.catalog.head_id(&volume, &state.into)?;
                check_gated(Some(into_id), target_id, &state.into)?;
                let target = st.catalog.head(target_id)?;
                if target.record.base != state.ours || !target.changed.is_empty() {
                    return Err(Error::Conflict(format!(
                        "branch {:?} changed since the merge began on {name:?}: abort the merge and merge again",
                        state.into
                    )));
                }
                st.catalog.commit_required(&state.theirs)?;
                let gen = st.meta.gen;
                // Nothing has changed yet: no space for the bitmap refuses the conclusion cleanly.
                let bitmap =
                    write_bitmap(st, &changed).map_err(|e| refused_or_failed(&failing, e))?;
                // Who resolved the conflicts on the merge branch.
                let lineage = st.take_lineage(id, Vec::new())?;
                let info = CommitInfo {
                    id: commit_id,
                    volume: volume.clone(),
                    branch: state.into.clone(),
                    parents: state.ours.into_iter().chain([state.theirs]).collect(),
                    message: message
                        .filter(|m| !m.trim().is_empty())
                        .or(state.message.clone())
                        .unwrap_or_else(|| format!("Merge {} into {}", state.from, state.into)),
                    author: author.or(state.author.clone()),
                    meta: Default::default(),
                    created_unix: now_unix(),
                    changed_blocks: changed.len(),
                    size_bytes: st.catalog.volume(&volume)?.size_bytes,
                    lineage,
                };
                // The target had nothing of its own since `ours`: it simply moves on.
                free_head_space(st, target_id)?;
                let target = st.catalog.head_mut(target_id)?;
                target.record.root = root;
                target.record.base = Some(commit_id);
                target.record.base_gen = gen;
                target.record.exclusive_since = gen + 1;
                target.changed = RoaringTreemap::new();
                st.dirty_heads.insert(target_id);
                let conflicts = read_bitmap(&st.meta, &state.conflicts)?.len();
                let taken = read_bitmap(&st.meta, &state.taken)?.len();
                // What the merge branch owned now belongs to the commit: nothing is freed
                // with it but its state.
                free_blob(st, &state.taken);
                free_blob(st, &state.conflicts);
                let ops = vec![
                    CatalogOp::Commit {
                        commit: CommitRecord {
                            info: info.clone(),
                            root,
                            gen,
                            bitmap,
                        },
                    },
                    CatalogOp::DeleteBranch {
                        volume: volume.clone(),
                        branch: name.clone(),
                    },
                ];
                for op in &ops {
                    st.catalog.apply(op)?;
                }
                let events = vec![
                    Event::commit_created(&info, &changed),
                    Event::MergeCompleted {
                        volume: volume.clone(),
                        branch: state.into.clone(),
                        from: state.theirs,
                        commit: commit_id,
                        fast_forward: false,
                        taken_blocks: taken,
                        conflict_blocks: conflicts,
                    },
                    Event::BranchDeleted {
                        volume: volume.clone(),
                        branch: name.clone(),
                    },
                ];
                Ok((ops, events))
            })
            .await?;
        self.commit_info(&v, &commit_id.to_hex())
    }

    /// Aborts a manual merge: deletes its merge branch with everything written on it. The
    /// target branch never changed.
    pub async fn abort_merge(&self, volume: &str, merge_branch: &str) -> Result<()> {
        self.drop_branch(volume, merge_branch, true).await
    }
}

/// The public view of a head's merge state, if it has one.
fn merge_in_progress(st: &mut State, head_id: u64) -> Result<Option<MergeInProgress>> {
    let head = st.catalog.head(head_id)?;
    let Some(state) = head.record.merge.clone() else {
        return Ok(None);
    };
    let (volume, branch, root) = (
        head.record.volume.clone(),
        head.record.branch.clone(),
        head.record.root,
    );
    let taken = read_bitmap(&st.meta, &state.taken)?;
    let conflicts = read_bitmap(&st.meta, &state.conflicts)?;
    let mut edited = RoaringTreemap::new();
    MapReader {
        store: &mut st.meta,
    }
    .changed_since(root, state.started_gen, &mut edited)?;
    Ok(Some(MergeInProgress {
        volume,
        merge_branch: branch,
        into: state.into,
        from: state.from,
        from_commit: state.theirs,
        ours_commit: state.ours,
        base: state.base,
        taken: byte_ranges(&taken),
        taken_bytes: taken.len() * BLOCK_SIZE,
        conflicts: byte_ranges(&conflicts),
        conflict_bytes: conflicts.len() * BLOCK_SIZE,
        edited_bytes: edited.len() * BLOCK_SIZE,
        started_unix: state.started_unix,
    }))
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
    let (segs, sums, _grace) = {
        let mut st = inner.state.lock();
        let root = map.root(&st.catalog)?;
        let extents = MapReader {
            store: &mut st.meta,
        }
        .lookup(root, first, end)?;
        let segs = segments(&extents, first, end);
        let mut sums = Vec::new();
        for seg in &segs {
            if let Some(p) = seg.pblock {
                st.sums.get_run(p, seg.len, &mut sums)?;
            }
        }
        (segs, sums, inner.grace.enter())
    };
    let mut out = vec![0u8; ((end - first) * BLOCK_SIZE) as usize];
    let mut next_sum = 0;
    for seg in segs {
        if let Some(p) = seg.pblock {
            let data = io::read_blocking(
                &*inner.backend,
                FileKind::Data,
                p * BLOCK_SIZE,
                (seg.len * BLOCK_SIZE) as usize,
            )?;
            // Merged content is compared, never copied, but a damaged block must not decide
            // a conflict silently. (Commits' blocks never change, so no retry is needed.)
            let want = &sums[next_sum..next_sum + seg.len as usize];
            next_sum += seg.len as usize;
            if let Some((i, _)) = first_mismatch(&data, want) {
                return Err(Error::corrupt(
                    "data block checksum mismatch",
                    format!("data block {}", p + i as u64),
                ));
            }
            let at = ((seg.lblock - first) * BLOCK_SIZE) as usize;
            out[at..at + data.len()].copy_from_slice(&data);
        }
    }
    Ok(out)
}
