//! The catalog: volumes, branch heads, commits and tags, held in memory and made durable as
//! journal records (see FORMAT.md, "journal"). Replaying the journal from the start rebuilds it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use roaring::RoaringTreemap;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::types::*;

/// Where a roaring bitmap (a commit's changed blocks, a merge's taken or conflicting blocks)
/// is stored in the metadata file.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlobRef {
    pub page: u64,
    pub len_bytes: u64,
    pub crc: u32,
}

impl BlobRef {
    /// The metadata pages the blob occupies.
    pub fn pages(&self) -> std::ops::Range<u64> {
        let n = self
            .len_bytes
            .div_ceil(crate::format::PAGE_SIZE as u64)
            .max(1);
        // Saturating: a damaged record's pointer must not overflow; open refuses it
        // (`pool::recover_with` checks every blob lies inside the metadata file).
        self.page..self.page.saturating_add(n)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CommitRecord {
    pub info: CommitInfo,
    /// Root page of the commit's extent map (0: empty).
    pub root: u64,
    /// Generation of the sync point that made the commit: all its nodes and extents are born
    /// at or before it.
    pub gen: u64,
    pub bitmap: BlobRef,
}

/// The durable state of a branch head.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeadRecord {
    pub id: u64,
    pub volume: String,
    pub branch: String,
    pub root: u64,
    /// Nodes and data blocks born at or after this generation belong to this head alone.
    pub exclusive_since: u64,
    /// The commit the head continues from.
    pub base: Option<CommitId>,
    /// Generation of `base` (0 without one): extents born after it are the head's changes.
    pub base_gen: u64,
    pub created_unix: u64,
    /// Set on a merge branch: a merge left open for resolution by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<Box<MergeState>>,
    /// Who wrote the head's uncommitted data: the next commit's lineage.
    #[serde(default, skip_serializing_if = "HeadLineage::is_empty")]
    pub lineage: HeadLineage,
    /// Only merges change a protected branch: its exports are read-only, and it cannot be
    /// reset or deleted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub protected: bool,
}

/// The sessions (and their jobs) that wrote a head since its latest commit.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeadLineage {
    #[serde(default)]
    pub writers: Vec<SessionWriter>,
    #[serde(default)]
    pub jobs: Vec<String>,
}

impl HeadLineage {
    pub fn is_empty(&self) -> bool {
        self.writers.is_empty() && self.jobs.is_empty()
    }
}

impl HeadRecord {
    /// The commits the head needs: its base, and the merged commit of a merge in progress.
    pub fn needs(&self) -> impl Iterator<Item = CommitId> + '_ {
        self.base
            .into_iter()
            .chain(self.merge.as_ref().map(|m| m.theirs))
    }

    /// The metadata blobs the head references besides its map.
    pub fn blobs(&self) -> Vec<BlobRef> {
        match &self.merge {
            Some(merge) => vec![merge.taken, merge.conflicts],
            None => Vec::new(),
        }
    }
}

/// A merge in progress (strategy `manual`). Its merge branch starts from the target branch's
/// latest commit (`ours`) with the blocks only the merged side changed grafted in; the
/// conflicting blocks hold ours until someone writes them. Concluding commits the merge
/// branch with parents `[ours, theirs]`, moves the target branch there and drops the merge
/// branch.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MergeState {
    /// The branch the merge concludes into.
    pub into: String,
    /// The ref merged, as given.
    pub from: String,
    pub ours: Option<CommitId>,
    pub theirs: CommitId,
    pub base: Option<CommitId>,
    /// Blocks taken from theirs: part of the merge branch's changes even where they were
    /// born before `ours` (its generation alone cannot tell them apart after a reopen).
    pub taken: BlobRef,
    /// Blocks both sides changed differently.
    pub conflicts: BlobRef,
    pub message: Option<String>,
    pub author: Option<String>,
    pub started_unix: u64,
    /// Generation of the sync point that opened the merge branch: extents born after it
    /// were written on the merge branch.
    pub started_gen: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum CatalogOp {
    CreateVolume {
        id: u64,
        name: String,
        size_bytes: u64,
        created_unix: u64,
        /// For a clone: the ref it was cloned from.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        origin: Option<VolumeOrigin>,
        /// Whether its writes store block checksums and its reads check them (`sums.rs`).
        #[serde(default = "checksums_default")]
        checksums: bool,
    },
    DeleteVolume {
        name: String,
    },
    DeleteBranch {
        volume: String,
        branch: String,
    },
    /// Adds a commit, or replaces the record of an existing one (a child rewritten when its
    /// parent is squashed).
    Commit {
        commit: CommitRecord,
    },
    /// Removes a commit (squashed into its children).
    DeleteCommit {
        volume: String,
        id: CommitId,
    },
    /// Sets a control-plane record (a hook, a hook's delivery progress): opaque JSON that
    /// the engine keeps durable with everything else.
    PutRecord {
        kind: String,
        id: String,
        value: serde_json::Value,
    },
    DeleteRecord {
        kind: String,
        id: String,
    },
    CreateTag {
        volume: String,
        tag: String,
        commit: CommitId,
        created_unix: u64,
    },
    DeleteTag {
        volume: String,
        tag: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Record {
    /// A durable sync point: catalog changes, then the heads whose state changed.
    Sync {
        gen: u64,
        ops: Vec<CatalogOp>,
        heads: Vec<HeadRecord>,
        /// The events of the changes this sync point makes durable.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        events: Vec<crate::events::LoggedEvent>,
        /// Regions of data blocks that leave the intent: every in-place write into them is
        /// covered by this sync point (`sums.rs`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        intent_cleared: Vec<u64>,
    },
    /// Regions of data blocks about to be written in place: after a crash, their checksums
    /// are computed again from what the disk holds (`sums.rs`).
    Intent { regions: Vec<u64> },
}

/// A live branch head.
pub struct Head {
    pub record: HeadRecord,
    /// Blocks written since `base` (what the next commit records).
    pub changed: RoaringTreemap,
    /// Writes hold it shared; commit and branch forks hold it exclusively, so that no in-place
    /// write lands in a block while it becomes shared.
    pub gate: Arc<tokio::sync::RwLock<()>>,
    /// Serialises overlapping writes on this head (sub-block read-modify-write needs it).
    pub ranges: Arc<crate::range_lock::RangeLock>,
}

impl Head {
    pub fn new(record: HeadRecord) -> Head {
        Head {
            record,
            changed: RoaringTreemap::new(),
            gate: Default::default(),
            ranges: Default::default(),
        }
    }
}

pub struct Volume {
    pub name: String,
    pub size_bytes: u64,
    pub created_unix: u64,
    pub origin: Option<VolumeOrigin>,
    /// Branch name -> head id.
    pub branches: BTreeMap<String, u64>,
    pub commits: BTreeMap<CommitId, CommitRecord>,
    pub tags: BTreeMap<String, TagInfo>,
    /// Open sessions on any ref of the volume.
    pub sessions: usize,
    /// Data blocks the volume's refs map (shared ones once).
    pub blocks: u64,
    /// Block checksums stored on write and checked on read.
    pub checksums: bool,
}

/// Volumes recorded before checksums existed have them from now on (their older blocks have
/// none, which reads skip).
fn checksums_default() -> bool {
    true
}

#[derive(Default)]
pub struct Catalog {
    pub volumes: BTreeMap<String, Volume>,
    pub heads: HashMap<u64, Head>,
    pub next_id: u64,
    /// Commit id -> volume holding it. Commit ids are unique across the pool, and a clone's
    /// history continues into the volume it was cloned from.
    pub commit_volumes: HashMap<CommitId, String>,
    /// Commit id -> the commits naming it as a parent, kept with every change so that
    /// squashing a commit finds its children without reading the whole history.
    children: HashMap<CommitId, BTreeSet<CommitId>>,
    /// Control-plane records by (kind, id).
    pub records: BTreeMap<(String, String), serde_json::Value>,
}

impl Catalog {
    pub fn volume(&self, name: &str) -> Result<&Volume> {
        self.volumes
            .get(name)
            .ok_or_else(|| Error::not_found(format!("volume {name:?}")))
    }

    pub fn volume_mut(&mut self, name: &str) -> Result<&mut Volume> {
        self.volumes
            .get_mut(name)
            .ok_or_else(|| Error::not_found(format!("volume {name:?}")))
    }

    pub fn head_id(&self, volume: &str, branch: &str) -> Result<u64> {
        self.volume(volume)?
            .branches
            .get(branch)
            .copied()
            .ok_or_else(|| Error::not_found(format!("branch {branch:?} of volume {volume:?}")))
    }

    pub fn head(&self, id: u64) -> Result<&Head> {
        self.heads
            .get(&id)
            .ok_or_else(|| Error::not_found("branch"))
    }

    pub fn head_mut(&mut self, id: u64) -> Result<&mut Head> {
        self.heads
            .get_mut(&id)
            .ok_or_else(|| Error::not_found("branch"))
    }

    /// Any commit of the pool, by full id.
    pub fn commit(&self, id: &CommitId) -> Option<&CommitRecord> {
        let volume = self.commit_volumes.get(id)?;
        self.volumes.get(volume)?.commits.get(id)
    }

    /// The commits that name `id` as a parent, in id order.
    pub fn children(&self, id: &CommitId) -> Vec<&CommitRecord> {
        self.children
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|child| self.commit(child))
            .collect()
    }

    fn link_parents(&mut self, commit: &CommitInfo) {
        for parent in &commit.parents {
            self.children.entry(*parent).or_default().insert(commit.id);
        }
    }

    fn unlink_parents(&mut self, id: &CommitId) {
        let Some(parents) = self.commit(id).map(|c| c.info.parents.clone()) else {
            return;
        };
        for parent in parents {
            if let Some(children) = self.children.get_mut(&parent) {
                children.remove(id);
                if children.is_empty() {
                    self.children.remove(&parent);
                }
            }
        }
    }

    /// A commit that must exist (a parent or base named by the catalog itself).
    pub fn commit_required(&self, id: &CommitId) -> Result<&CommitRecord> {
        self.commit(id).ok_or_else(|| {
            Error::corrupt(format!("commit {id} is referenced but missing"), "catalog")
        })
    }

    pub fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Finds a commit by full id or unique prefix (at least 4 hex digits).
    pub fn find_commit(&self, volume: &str, prefix: &str) -> Result<&CommitRecord> {
        let vol = self.volume(volume)?;
        let prefix = prefix.to_ascii_lowercase();
        if prefix.len() < 4 || prefix.len() > 32 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::not_found(format!(
                "commit {prefix:?} in volume {volume:?}"
            )));
        }
        let low = CommitId::try_from(format!("{prefix:0<32}")).map_err(Error::InvalidArgument)?;
        let mut matches = vol
            .commits
            .range(low..)
            .take_while(|(id, _)| id.to_hex().starts_with(&prefix));
        let first = matches.next();
        let rest = matches.count();
        match first {
            None => Err(Error::not_found(format!(
                "commit {prefix:?} in volume {volume:?}"
            ))),
            Some((_, commit)) if rest == 0 => Ok(commit),
            Some(_) => Err(Error::Ambiguous {
                prefix,
                count: rest + 1,
            }),
        }
    }

    /// Resolves a ref string: a branch, then a tag, then a commit id or prefix.
    pub fn resolve(&self, spec: &str) -> Result<ResolvedRef> {
        let spec = RefSpec::parse(spec)?;
        let vol = self.volume(&spec.volume)?;
        let name = spec.name.as_deref().unwrap_or(MAIN_BRANCH);
        if vol.branches.contains_key(name) {
            return Ok(ResolvedRef::Branch {
                volume: vol.name.clone(),
                branch: name.to_string(),
            });
        }
        if let Some(tag) = vol.tags.get(name) {
            return Ok(ResolvedRef::Tag {
                volume: vol.name.clone(),
                tag: name.to_string(),
                commit: tag.commit,
            });
        }
        match self.find_commit(&vol.name, name) {
            Ok(commit) => Ok(ResolvedRef::Commit {
                volume: vol.name.clone(),
                commit: commit.info.id,
            }),
            Err(Error::NotFound { .. }) => Err(Error::not_found(format!(
                "ref {name:?} (no branch, tag or commit) in volume {:?}",
                vol.name
            ))),
            Err(err) => Err(err),
        }
    }

    /// Applies a replayed or new catalog change.
    pub fn apply(&mut self, op: &CatalogOp) -> Result<()> {
        match op {
            CatalogOp::CreateVolume {
                id,
                name,
                size_bytes,
                created_unix,
                origin,
                checksums,
            } => {
                self.next_id = self.next_id.max(*id);
                self.volumes.insert(
                    name.clone(),
                    Volume {
                        name: name.clone(),
                        size_bytes: *size_bytes,
                        created_unix: *created_unix,
                        origin: origin.clone(),
                        branches: BTreeMap::new(),
                        commits: BTreeMap::new(),
                        tags: BTreeMap::new(),
                        sessions: 0,
                        blocks: 0,
                        checksums: *checksums,
                    },
                );
            }
            CatalogOp::DeleteVolume { name } => {
                let commits: Vec<CommitId> = match self.volumes.get(name) {
                    Some(vol) => vol.commits.keys().copied().collect(),
                    None => Vec::new(),
                };
                for id in &commits {
                    self.unlink_parents(id);
                }
                if let Some(vol) = self.volumes.remove(name) {
                    for id in vol.branches.values() {
                        self.heads.remove(id);
                    }
                    for id in vol.commits.keys() {
                        self.commit_volumes.remove(id);
                        self.children.remove(id);
                    }
                }
            }
            CatalogOp::DeleteBranch { volume, branch } => {
                if let Some(id) = self.volume_mut(volume)?.branches.remove(branch) {
                    self.heads.remove(&id);
                }
            }
            CatalogOp::Commit { commit } => {
                self.volume(&commit.info.volume)?;
                self.unlink_parents(&commit.info.id);
                self.link_parents(&commit.info);
                self.volume_mut(&commit.info.volume)?
                    .commits
                    .insert(commit.info.id, commit.clone());
                self.commit_volumes
                    .insert(commit.info.id, commit.info.volume.clone());
            }
            CatalogOp::DeleteCommit { volume, id } => {
                self.volume(volume)?;
                self.unlink_parents(id);
                self.volume_mut(volume)?.commits.remove(id);
                self.commit_volumes.remove(id);
                self.children.remove(id);
            }
            CatalogOp::CreateTag {
                volume,
                tag,
                commit,
                created_unix,
            } => {
                let info = TagInfo {
                    volume: volume.clone(),
                    name: tag.clone(),
                    commit: *commit,
                    created_unix: *created_unix,
                };
                self.volume_mut(volume)?.tags.insert(tag.clone(), info);
            }
            CatalogOp::DeleteTag { volume, tag } => {
                self.volume_mut(volume)?.tags.remove(tag);
            }
            CatalogOp::PutRecord { kind, id, value } => {
                self.records
                    .insert((kind.clone(), id.clone()), value.clone());
            }
            CatalogOp::DeleteRecord { kind, id } => {
                self.records.remove(&(kind.clone(), id.clone()));
            }
        }
        Ok(())
    }

    /// Applies a head's durable state, creating the head if it is new.
    pub fn apply_head(&mut self, record: &HeadRecord) -> Result<()> {
        self.next_id = self.next_id.max(record.id);
        let vol = self.volume_mut(&record.volume)?;
        vol.branches.insert(record.branch.clone(), record.id);
        match self.heads.get_mut(&record.id) {
            Some(head) => head.record = record.clone(),
            None => {
                self.heads.insert(record.id, Head::new(record.clone()));
            }
        }
        Ok(())
    }
}
