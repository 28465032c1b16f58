//! Operations that move or remove history, or share it with a new volume: reset (rollback),
//! commit deletion (squash) and clone.
//!
//! None of them copies data or a map. Reset and clone point a head at an existing root, the
//! way a fork does; squashing rewrites only catalog records and the children's bitmaps. What
//! they leave unreferenced (a discarded head's blocks, a squashed commit's own blocks) is
//! returned by the reclaimer (`reclaim.rs`).

use roaring::RoaringTreemap;

use crate::catalog::*;
use crate::error::{Error, Result};
use crate::events::Event;
use crate::history::{changes_between, read_bitmap};
use crate::merge::refuse_merge_branch;
use crate::meta::PendingFree;
use crate::pool::{check_gated, fork, free_head_space, Fork, Pool, PoolInner, State};
use crate::types::*;

impl Pool {
    /// Moves the head of `volume@branch` to a commit (`target`: a commit, a tag, or a branch,
    /// meaning its latest commit), as if the branch had just been made from it. Uncommitted
    /// writes on the head are refused unless `discard_uncommitted`; open sessions on the
    /// branch are refused (their device would change under them).
    pub async fn reset_branch(
        &self,
        volume: &str,
        branch: &str,
        target: &str,
        discard_uncommitted: bool,
    ) -> Result<BranchInfo> {
        let commit = self.commit_of(volume, target)?;
        let (gated, gate) = self.gate_head(volume, branch).await?;
        self.inner
            .refuse_branch_sessions(volume, branch, "a reset")?;
        let (v, b) = (volume.to_string(), branch.to_string());
        let (volume, branch) = (v.clone(), b.clone());
        let inner = self.inner.clone();
        self.inner
            .change_then_scan(Some(gate), self.actor.clone(), move |st| {
                inner.refuse_branch_sessions(&volume, &branch, "a reset")?;
                let id = st.catalog.head_id(&volume, &branch)?;
                check_gated(Some(gated), id, &branch)?;
                let target = st.catalog.commit_required(&commit)?.clone();
                st.catalog.check_related(&volume, &target.info.volume)?;
                let head = st.catalog.head(id)?;
                refuse_merge_branch(head, "reset it")?;
                if head.record.protected {
                    return Err(Error::Conflict(format!(
                        "branch {branch:?} of volume {volume:?} is protected: only merges change it"
                    )));
                }
                let discarded = head.changed.len();
                if discarded > 0 && !discard_uncommitted {
                    return Err(Error::Conflict(format!(
                        "branch {branch:?} has {discarded} uncommitted blocks; commit them, or reset with discard_uncommitted to throw them away"
                    )));
                }
                let from = head.record.base;
                free_head_space(st, id)?;
                let gen = st.meta.gen;
                let head = st.catalog.head_mut(id)?;
                head.record.root = target.root;
                head.record.base = Some(target.info.id);
                head.record.base_gen = target.gen;
                head.record.exclusive_since = gen + 1;
                head.changed = RoaringTreemap::new();
                // Whoever wrote the discarded data wrote nothing that lasts.
                head.record.lineage = Default::default();
                st.dirty_heads.insert(id);
                Ok((
                    vec![],
                    vec![Event::BranchReset {
                        volume: volume.clone(),
                        branch: branch.clone(),
                        from,
                        to: target.info.id,
                        discarded_blocks: discarded,
                    }],
                ))
            })
            .await?;
        self.branch(&v, &b)
    }

    /// Deletes a commit, folding its changes into its children (squashing history): each
    /// child whose first parent it was records its changes too, and takes its parents (a
    /// merge child of a commit without parents compares its maps again, since its next
    /// parent becomes its first). Refused while a tag points at it, it is a branch's latest
    /// commit, or sessions read it. The space only it held returns to the pool.
    pub async fn delete_commit(&self, volume: &str, id_or_prefix: &str) -> Result<()> {
        let id = self.commit_info(volume, id_or_prefix)?.id;
        let refuse_readers = move |inner: &PoolInner| {
            let attached = inner.attached(|target| match target {
                ResolvedRef::Commit { commit, .. } | ResolvedRef::Tag { commit, .. } => {
                    *commit == id
                }
                ResolvedRef::Branch { .. } => false,
            });
            if attached > 0 {
                return Err(Error::Conflict(format!(
                    "commit {id} has {attached} open sessions; disconnect them first"
                )));
            }
            Ok(())
        };
        refuse_readers(&self.inner)?;
        let (volume, prefix) = (volume.to_string(), id.to_hex());
        let inner = self.inner.clone();
        self.inner
            .change_then_scan(None, self.actor.clone(), move |st| {
                refuse_readers(&inner)?;
                let commit = st.catalog.find_commit(&volume, &prefix)?.clone();
                let id = commit.info.id;
                check_unneeded(st, &commit)?;
                let bitmap = read_bitmap(&st.meta, &commit.bitmap)?;
                let children: Vec<CommitRecord> =
                    st.catalog.children(&id).into_iter().cloned().collect();
                let mut ops = Vec::new();
                // Frees are queued only once nothing can fail any more: a blob written for a
                // change that fails is merely unreferenced, and the reclaimer returns it.
                let mut replaced_blobs = vec![commit.bitmap];
                for mut child in children.iter().cloned() {
                    let mut parents: Vec<CommitId> = Vec::new();
                    for p in &child.info.parents {
                        let replaced = if *p == id {
                            commit.info.parents.clone()
                        } else {
                            vec![*p]
                        };
                        for q in replaced {
                            if !parents.contains(&q) {
                                parents.push(q);
                            }
                        }
                    }
                    if child.info.parents.first() == Some(&id) {
                        // Its bitmap is relative to its new first parent. When that is the
                        // squashed commit's own first parent (or the empty volume for both),
                        // it is the child's changes plus the squashed commit's; otherwise (a
                        // merge child of a commit without parents) the maps are compared.
                        let changed = match parents.first() {
                            Some(&first) if parents.first() != commit.info.parents.first() => {
                                changes_between(st, first, child.info.id)?
                            }
                            _ => read_bitmap(&st.meta, &child.bitmap)? | &bitmap,
                        };
                        replaced_blobs.push(child.bitmap);
                        child.bitmap = write_bitmap(st, &changed)?;
                        child.info.changed_blocks = changed.len();
                        // Its data now includes the squashed commit's: so does its lineage.
                        child.info.lineage.absorb(&commit.info.lineage);
                    }
                    child.info.parents = parents;
                    ops.push(CatalogOp::Commit { commit: child });
                }
                for blob in &replaced_blobs {
                    free_blob(st, blob);
                }
                ops.push(CatalogOp::DeleteCommit {
                    volume: volume.clone(),
                    id,
                });
                for op in &ops {
                    st.catalog.apply(op)?;
                }
                Ok((
                    ops,
                    vec![Event::CommitDeleted {
                        volume: volume.clone(),
                        commit: id,
                        children: children.iter().map(|c| c.info.id).collect(),
                    }],
                ))
            })
            .await?;
        Ok(())
    }

    /// Creates volume `name` from any ref of another volume, sharing every block: nothing is
    /// copied. Its history continues from the source's (a branch with uncommitted writes
    /// passes them on as the clone's uncommitted writes).
    pub async fn clone_volume(&self, source: &str, name: &str) -> Result<VolumeInfo> {
        validate_volume_name(name)?;
        let source = self.resolve(source)?;
        let (gated, gate) = match &source {
            ResolvedRef::Branch { volume, branch } => {
                let (id, guard) = self.gate_head(volume, branch).await?;
                (Some(id), Some(guard))
            }
            _ => (None, None),
        };
        let name = name.to_string();
        let created = name.clone();
        self.inner
            .change_then_scan(gate, self.actor.clone(), move |st| {
                if st.catalog.volumes.contains_key(&name) {
                    return Err(Error::exists(format!("volume {name:?}")));
                }
                let src = st.catalog.volume(source.volume())?;
                let (size_bytes, src_blocks, checksums) =
                    (src.size_bytes, src.blocks, src.checksums);
                let gen = st.meta.gen;
                let Fork {
                    root,
                    base,
                    base_gen,
                    changed,
                    lineage,
                } = fork(st, &source, gated, "clone it")?;
                let origin = VolumeOrigin {
                    volume: source.volume().to_string(),
                    source: source.canonical_name(),
                    commit: base,
                };
                let op = CatalogOp::CreateVolume {
                    id: st.catalog.new_id(),
                    name: name.clone(),
                    size_bytes,
                    created_unix: now_unix(),
                    origin: Some(origin.clone()),
                    checksums,
                };
                st.catalog.apply(&op)?;
                let record = HeadRecord {
                    id: st.catalog.new_id(),
                    volume: name.clone(),
                    branch: MAIN_BRANCH.to_string(),
                    root,
                    exclusive_since: gen + 1,
                    base,
                    base_gen,
                    created_unix: now_unix(),
                    merge: None,
                    lineage,
                    protected: false,
                };
                st.catalog.apply_head(&record)?;
                st.catalog.head_mut(record.id)?.changed = changed;
                st.dirty_heads.insert(record.id);
                // An estimate until the reclaimer's next scan counts the blocks exactly.
                st.catalog.volume_mut(&name)?.blocks = src_blocks;
                Ok((
                    vec![op],
                    vec![Event::VolumeCreated {
                        volume: name.clone(),
                        size_bytes,
                        origin: Some(origin.source),
                    }],
                ))
            })
            .await?;
        self.volume(&created)
    }

    /// The commit a ref names in the context of `volume`: a commit, a tag's commit, or a
    /// branch's latest commit.
    pub(crate) fn commit_of(&self, volume: &str, refspec: &str) -> Result<CommitId> {
        match self.resolve_in(volume, refspec)? {
            ResolvedRef::Tag { commit, .. } | ResolvedRef::Commit { commit, .. } => Ok(commit),
            ResolvedRef::Branch { volume, branch } => {
                self.branch(&volume, &branch)?.head_commit.ok_or_else(|| {
                    Error::invalid(format!(
                        "branch {branch:?} of volume {volume:?} has no commits yet"
                    ))
                })
            }
        }
    }
}

/// Refuses to delete a commit a tag points at, or that is a branch's latest commit.
fn check_unneeded(st: &State, commit: &CommitRecord) -> Result<()> {
    let id = commit.info.id;
    let mut needed_by = Vec::new();
    for vol in st.catalog.volumes.values() {
        for tag in vol.tags.values().filter(|t| t.commit == id) {
            needed_by.push(format!("tag {}@{}", vol.name, tag.name));
        }
        for head_id in vol.branches.values() {
            let head = st.catalog.head(*head_id)?;
            if head.record.base == Some(id) {
                needed_by.push(format!(
                    "branch {}@{} (its latest commit)",
                    vol.name, head.record.branch
                ));
            }
            if head.record.merge.as_ref().is_some_and(|m| m.theirs == id) {
                needed_by.push(format!(
                    "the merge in progress on {}@{}",
                    vol.name, head.record.branch
                ));
            }
        }
    }
    if needed_by.is_empty() {
        Ok(())
    } else {
        Err(Error::Conflict(format!(
            "commit {id} is still needed by {}: delete the tags, reset the branches or settle the merges first",
            needed_by.join(", ")
        )))
    }
}

/// Stores a bitmap as a new blob.
pub(crate) fn write_bitmap(st: &mut State, bitmap: &RoaringTreemap) -> Result<BlobRef> {
    let mut bytes = Vec::new();
    bitmap.serialize_into(&mut bytes).map_err(Error::Io)?;
    let page = st.meta.write_blob(&bytes)?;
    Ok(BlobRef {
        page,
        len_bytes: bytes.len() as u64,
        crc: crc32c::crc32c(&bytes),
    })
}

/// Frees a blob's pages after the next sync point.
pub(crate) fn free_blob(st: &mut State, blob: &BlobRef) {
    let gen = st.meta.gen;
    let pages = blob.pages();
    st.meta.pending_pages.push(PendingFree {
        gen,
        start: pages.start,
        len: pages.end - pages.start,
    });
}
