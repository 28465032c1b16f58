//! Comparing refs: diffs, merge bases and blame.
//!
//! Each commit stores a bitmap of the blocks it changed relative to its first parent, and a
//! head keeps one of the blocks it changed since its base commit. Between two refs, a block
//! can only differ if it is in one of those bitmaps along the two first-parent chains back to
//! the commit where they meet (or to the empty volume every chain starts from). The union of
//! those bitmaps is the candidate set, and its size is what a diff costs: neither the volume
//! size nor the length of history before the meeting point matter.
//!
//! Candidates are then checked against both maps: a block that maps to the same data block in
//! both, or reads as zeros in both, is dropped. So a diff lists exactly the blocks whose
//! mapping differs; a block rewritten with identical content maps to a new data block and is
//! still reported.

use std::collections::{BTreeMap, HashMap};

use roaring::RoaringTreemap;
use serde::{Deserialize, Serialize};

use crate::catalog::{BlobRef, Catalog};
use crate::error::{Error, Result};
use crate::extent_map::{LeafCursor, MapReader};
use crate::meta::MetaStore;
use crate::pool::{run_blocking, runs, Pool, PoolInner, State};
use crate::session::{segments, Segment};
use crate::types::*;

/// Candidate runs checked per hold of the state lock, so that a large diff never holds up I/O
/// for long.
const RUNS_PER_LOCK: usize = 256;

/// A ref's content, and where its history continues.
#[derive(Clone, Debug, Default)]
pub(crate) struct RefState {
    /// The newest commit of its history: the commit itself, or a head's base.
    pub commit: Option<CommitId>,
    /// A head's blocks changed since its base commit.
    pub uncommitted: Option<RoaringTreemap>,
}

impl Catalog {
    pub(crate) fn ref_state(&self, resolved: &ResolvedRef) -> Result<RefState> {
        Ok(match resolved {
            ResolvedRef::Branch { volume, branch } => {
                let head = self.head(self.head_id(volume, branch)?)?;
                RefState {
                    commit: head.record.base,
                    uncommitted: Some(head.changed.clone()),
                }
            }
            ResolvedRef::Tag { commit, .. } | ResolvedRef::Commit { commit, .. } => RefState {
                commit: Some(*commit),
                uncommitted: None,
            },
        })
    }

    /// The current map root of a resolved ref; refused if the ref is gone.
    pub(crate) fn root_of(&self, resolved: &ResolvedRef) -> Result<u64> {
        match resolved {
            ResolvedRef::Branch { volume, branch } => {
                Ok(self.head(self.head_id(volume, branch)?)?.record.root)
            }
            ResolvedRef::Tag { commit, .. } | ResolvedRef::Commit { commit, .. } => self
                .commit(commit)
                .map(|c| c.root)
                .ok_or_else(|| Error::not_found(format!("commit {commit}"))),
        }
    }

    /// The volume and the volumes it was cloned from, nearest first.
    fn lineage(&self, volume: &str) -> Vec<String> {
        let mut out = vec![volume.to_string()];
        while let Some(origin) = self
            .volumes
            .get(out.last().map(String::as_str).unwrap_or_default())
            .and_then(|v| v.origin.as_ref())
        {
            if out.contains(&origin.volume) {
                break;
            }
            out.push(origin.volume.clone());
        }
        out
    }

    /// Refs of two volumes can be compared or merged only if the volumes share history: the
    /// same volume, or clones of a common source.
    pub(crate) fn check_related(&self, a: &str, b: &str) -> Result<()> {
        let la = self.lineage(a);
        if self.lineage(b).iter().any(|v| la.contains(v)) {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "volumes {a:?} and {b:?} are unrelated (neither is a clone of the other or of a common source)"
            )))
        }
    }

    /// The nearest common ancestor of two commits (`None` standing for the empty volume every
    /// history starts from): commits are visited newest first from both sides, and the first
    /// one reached from both is it. Costs the commits between the two and their ancestor.
    pub(crate) fn merge_base(
        &self,
        a: Option<CommitId>,
        b: Option<CommitId>,
    ) -> Result<Option<CommitId>> {
        const FROM_A: u8 = 1;
        const FROM_B: u8 = 2;
        let mut queue: BTreeMap<(u64, CommitId), u8> = BTreeMap::new();
        for (id, flag) in [(a, FROM_A), (b, FROM_B)] {
            match id {
                Some(id) => {
                    let gen = self.commit_required(&id)?.gen;
                    *queue.entry((gen, id)).or_default() |= flag;
                }
                // One side is the empty volume: it is everyone's ancestor.
                None => return Ok(None),
            }
        }
        while let Some(((_, id), flags)) = queue.pop_last() {
            if flags == FROM_A | FROM_B {
                return Ok(Some(id));
            }
            for parent in &self.commit_required(&id)?.info.parents {
                let gen = self.commit_required(parent)?.gen;
                *queue.entry((gen, *parent)).or_default() |= flags;
            }
        }
        Ok(None)
    }
}

/// A map to compare: a ref, or the empty volume every history starts from.
#[derive(Clone, Debug)]
pub(crate) enum MapSource {
    Ref(ResolvedRef),
    Commit(Option<CommitId>),
}

impl MapSource {
    pub(crate) fn root(&self, catalog: &Catalog) -> Result<u64> {
        match self {
            MapSource::Ref(resolved) => catalog.root_of(resolved),
            MapSource::Commit(None) => Ok(0),
            MapSource::Commit(Some(id)) => catalog
                .commit(id)
                .map(|c| c.root)
                .ok_or_else(|| Error::not_found(format!("commit {id}"))),
        }
    }
}

/// Reads a commit's stored bitmap of changed blocks.
pub(crate) fn read_bitmap(meta: &MetaStore, blob: &BlobRef) -> Result<RoaringTreemap> {
    let bytes = meta.read_blob(blob.page, blob.len_bytes, blob.crc)?;
    RoaringTreemap::deserialize_from(&bytes[..]).map_err(|e| {
        Error::corrupt(
            format!("block bitmap ({e})"),
            format!("meta page {}", blob.page),
        )
    })
}

/// Blocks that may differ between two refs: the bitmaps of both first-parent chains down to
/// where they meet, and the heads' uncommitted changes. Chains are walked newest commit first,
/// so the walk stops at the meeting point.
pub(crate) fn candidates(st: &State, a: &RefState, b: &RefState) -> Result<RoaringTreemap> {
    let mut out = RoaringTreemap::new();
    for side in [a, b] {
        if let Some(changed) = &side.uncommitted {
            out |= changed;
        }
    }
    let gen = |id: Option<CommitId>| -> Result<u64> {
        id.map_or(Ok(0), |id| Ok(st.catalog.commit_required(&id)?.gen))
    };
    let (mut x, mut y) = (a.commit, b.commit);
    while x != y {
        let side = if gen(x)? >= gen(y)? { &mut x } else { &mut y };
        // The newer side is a commit: the empty volume (generation 0) is never newer.
        let Some(id) = *side else { break };
        let commit = st.catalog.commit_required(&id)?;
        out |= read_bitmap(&st.meta, &commit.bitmap)?;
        *side = commit.info.parents.first().copied();
    }
    Ok(out)
}

/// Marks the blocks where two segment lists covering the same range map differently (zeros
/// and holes read alike).
fn mark_differing(a: &[Segment], b: &[Segment], out: &mut Runs) {
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (sa, sb) = (&a[i], &b[j]);
        let (end_a, end_b) = (sa.lblock + sa.len, sb.lblock + sb.len);
        let (from, to) = (sa.lblock.max(sb.lblock), end_a.min(end_b));
        if from < to {
            let pa = sa.pblock.map(|p| p + (from - sa.lblock));
            let pb = sb.pblock.map(|p| p + (from - sb.lblock));
            if pa != pb {
                out.push(from, to);
            }
        }
        if end_a <= end_b {
            i += 1;
        } else {
            j += 1;
        }
    }
}

/// The candidates whose mapping differs between two refs, checked a batch of runs per hold of
/// the lock (each batch sees the refs' current roots).
pub(crate) fn refine(
    inner: &PoolInner,
    a: &MapSource,
    b: &MapSource,
    candidates: &RoaringTreemap,
) -> Result<RoaringTreemap> {
    let all: Vec<(u64, u64)> = runs(candidates).collect();
    let mut differing = Runs::default();
    for batch in all.chunks(RUNS_PER_LOCK) {
        refine_runs(&mut inner.state.lock(), a, b, batch, &mut differing)?;
    }
    Ok(differing.into_bitmap())
}

/// The blocks commit `to` maps differently from commit `from`: the candidates along both
/// first-parent chains, checked against both maps, for a caller that holds the state lock.
pub(crate) fn changes_between(
    st: &mut State,
    from: CommitId,
    to: CommitId,
) -> Result<RoaringTreemap> {
    let side = |id| RefState {
        commit: Some(id),
        uncommitted: None,
    };
    let candidates = candidates(st, &side(from), &side(to))?;
    let all: Vec<(u64, u64)> = runs(&candidates).collect();
    let mut differing = Runs::default();
    let (a, b) = (MapSource::Commit(Some(from)), MapSource::Commit(Some(to)));
    refine_runs(st, &a, &b, &all, &mut differing)?;
    Ok(differing.into_bitmap())
}

/// Adds to `differing` what of the ascending candidate runs maps differently in `a` and `b`.
fn refine_runs(
    st: &mut State,
    a: &MapSource,
    b: &MapSource,
    candidate_runs: &[(u64, u64)],
    differing: &mut Runs,
) -> Result<()> {
    // Runs come in ascending order, so each map is read leaf after leaf. The cursors live
    // for one hold of the lock: a head's newest nodes change in place between.
    let mut cursor_a = LeafCursor::new(a.root(&st.catalog)?);
    let mut cursor_b = LeafCursor::new(b.root(&st.catalog)?);
    let mut reader = MapReader {
        store: &mut st.meta,
    };
    for &(start, len) in candidate_runs {
        let end = start + len;
        let ea = cursor_a.lookup(&mut reader, start, end)?;
        let eb = cursor_b.lookup(&mut reader, start, end)?;
        mark_differing(
            &segments(&ea, start, end),
            &segments(&eb, start, end),
            differing,
        );
    }
    Ok(())
}

/// Ascending block ranges `[from, to)`, adjacent ones joined: gathered first and put into a
/// bitmap once, far cheaper than a bitmap insert per piece.
#[derive(Default)]
struct Runs(Vec<(u64, u64)>);

impl Runs {
    fn push(&mut self, from: u64, to: u64) {
        match self.0.last_mut() {
            Some(last) if last.1 == from => last.1 = to,
            _ => self.0.push((from, to)),
        }
    }

    fn into_bitmap(self) -> RoaringTreemap {
        let mut out = RoaringTreemap::new();
        for (from, to) in self.0 {
            out.insert_range(from..to);
        }
        out
    }
}

/// The blocks that differ between two refs.
#[derive(Clone, Debug)]
pub struct Diff {
    pub from: ResolvedRef,
    pub to: ResolvedRef,
    /// Blocks whose mapping differs. A block rewritten with identical content is included.
    pub blocks: RoaringTreemap,
    /// Blocks the history marked as possibly changed: what the diff had to check.
    pub candidate_blocks: u64,
}

impl Diff {
    /// Coalesced changed ranges in bytes, as (offset, length), in order.
    pub fn byte_ranges(&self) -> Vec<(u64, u64)> {
        runs(&self.blocks)
            .map(|(start, len)| (start * BLOCK_SIZE, len * BLOCK_SIZE))
            .collect()
    }

    pub fn changed_bytes(&self) -> u64 {
        self.blocks.len() * BLOCK_SIZE
    }
}

/// Who last wrote a range.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum BlameSource {
    /// The commit whose change put the current content there.
    Committed { commit: Box<CommitInfo> },
    /// Written on the branch head since its last commit.
    Uncommitted,
    /// Never written since the volume was created: reads as zeros.
    NeverWritten,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlameRange {
    pub offset_bytes: u64,
    pub len_bytes: u64,
    #[serde(flatten)]
    pub source: BlameSource,
}

impl Pool {
    /// The blocks that differ between two refs, given in the context of `volume` (see
    /// `resolve_in`). Refs of another volume are accepted when the two volumes share history
    /// (clones).
    pub async fn diff(&self, volume: &str, from: &str, to: &str) -> Result<Diff> {
        let from = self.resolve_in(volume, from)?;
        let to = self.resolve_in(volume, to)?;
        let inner = self.inner.clone();
        run_blocking(move || {
            let candidates = {
                let st = inner.state.lock();
                st.catalog.check_related(from.volume(), to.volume())?;
                let (a, b) = (st.catalog.ref_state(&from)?, st.catalog.ref_state(&to)?);
                candidates(&st, &a, &b)?
            };
            let blocks = refine(
                &inner,
                &MapSource::Ref(from.clone()),
                &MapSource::Ref(to.clone()),
                &candidates,
            )?;
            Ok(Diff {
                from,
                to,
                blocks,
                candidate_blocks: candidates.len(),
            })
        })
        .await
    }

    /// For each part of `[offset_bytes, offset_bytes + len_bytes)` of a ref, the commit that
    /// last wrote it. Through a merge commit, a range taken unchanged from the merged side is
    /// followed into that side's history, so it is credited to the commit that wrote it there.
    pub async fn blame(
        &self,
        refspec: &str,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<Vec<BlameRange>> {
        let resolved = self.resolve(refspec)?;
        let size_bytes = self.volume(resolved.volume())?.size_bytes;
        let end_bytes = offset_bytes
            .checked_add(len_bytes)
            .filter(|&e| e <= size_bytes);
        let Some(end_bytes) = end_bytes else {
            return Err(Error::OutOfRange {
                offset_bytes,
                len_bytes,
                size_bytes,
            });
        };
        if len_bytes == 0 {
            return Ok(Vec::new());
        }
        let inner = self.inner.clone();
        run_blocking(move || {
            let (first, end) = (offset_bytes / BLOCK_SIZE, end_bytes.div_ceil(BLOCK_SIZE));
            let mut unresolved = RoaringTreemap::new();
            unresolved.insert_range(first..end);
            let mut found: HashMap<Option<CommitId>, RoaringTreemap> = HashMap::new();
            let mut uncommitted = RoaringTreemap::new();
            // Commits still to look at, newest first, with the blocks to resolve in each.
            let mut pending: BTreeMap<(u64, CommitId), RoaringTreemap> = BTreeMap::new();
            {
                let st = inner.state.lock();
                let state = st.catalog.ref_state(&resolved)?;
                if let Some(changed) = &state.uncommitted {
                    uncommitted = &unresolved & changed;
                    unresolved -= &uncommitted;
                }
                queue(
                    &st.catalog,
                    &mut pending,
                    &mut found,
                    state.commit,
                    unresolved,
                )?;
            }
            while let Some(((_, id), mut blocks)) = pending.pop_last() {
                let mut st = inner.state.lock();
                let commit = st.catalog.commit_required(&id)?.clone();
                let mut hit = &blocks & &read_bitmap(&st.meta, &commit.bitmap)?;
                blocks -= &hit;
                let first_parent = commit.info.parents.first().copied();
                queue(&st.catalog, &mut pending, &mut found, first_parent, blocks)?;
                // A merge: what is the same as on a merged side came from there.
                for parent in commit.info.parents.iter().skip(1) {
                    if hit.is_empty() {
                        break;
                    }
                    let mut ours = LeafCursor::new(commit.root);
                    let mut theirs = LeafCursor::new(st.catalog.commit_required(parent)?.root);
                    let mut reader = MapReader {
                        store: &mut st.meta,
                    };
                    let mut differing = Runs::default();
                    for (start, len) in runs(&hit) {
                        let end = start + len;
                        mark_differing(
                            &segments(&ours.lookup(&mut reader, start, end)?, start, end),
                            &segments(&theirs.lookup(&mut reader, start, end)?, start, end),
                            &mut differing,
                        );
                    }
                    let same = &hit - &differing.into_bitmap();
                    hit -= &same;
                    queue(&st.catalog, &mut pending, &mut found, Some(*parent), same)?;
                }
                *found.entry(Some(id)).or_default() |= hit;
            }
            let st = inner.state.lock();
            let mut out: Vec<BlameRange> = Vec::new();
            let mut sources: Vec<(BlameSource, &RoaringTreemap)> =
                vec![(BlameSource::Uncommitted, &uncommitted)];
            for (id, blocks) in &found {
                let source = match id {
                    Some(id) => BlameSource::Committed {
                        commit: Box::new(st.catalog.commit_required(id)?.info.clone()),
                    },
                    None => BlameSource::NeverWritten,
                };
                sources.push((source, blocks));
            }
            let mut ranges: Vec<(u64, u64, usize)> = sources
                .iter()
                .enumerate()
                .flat_map(|(i, (_, blocks))| runs(blocks).map(move |(s, l)| (s, l, i)))
                .collect();
            ranges.sort_unstable();
            for (start, len, i) in ranges {
                let from = (start * BLOCK_SIZE).max(offset_bytes);
                let to = ((start + len) * BLOCK_SIZE).min(end_bytes);
                match out.last_mut() {
                    Some(last)
                        if last.offset_bytes + last.len_bytes == from
                            && last.source == sources[i].0 =>
                    {
                        last.len_bytes += to - from
                    }
                    _ => out.push(BlameRange {
                        offset_bytes: from,
                        len_bytes: to - from,
                        source: sources[i].0.clone(),
                    }),
                }
            }
            Ok(out)
        })
        .await
    }

    /// Whether refs of the two volumes can be compared or merged: the same volume, or
    /// volumes sharing history through clones (an `InvalidArgument` error says why not).
    pub fn check_related(&self, a: &str, b: &str) -> Result<()> {
        self.inner.state.lock().catalog.check_related(a, b)
    }

    /// The nearest common ancestor of two refs' histories (`None`: only the empty volume).
    pub fn merge_base(&self, volume: &str, a: &str, b: &str) -> Result<Option<CommitId>> {
        let (a, b) = (self.resolve_in(volume, a)?, self.resolve_in(volume, b)?);
        let st = self.inner.state.lock();
        st.catalog.check_related(a.volume(), b.volume())?;
        let (a, b) = (st.catalog.ref_state(&a)?, st.catalog.ref_state(&b)?);
        st.catalog.merge_base(a.commit, b.commit)
    }
}

/// Queues blocks to resolve in a commit's history, or records them as never written at the
/// start of history.
fn queue(
    catalog: &Catalog,
    pending: &mut BTreeMap<(u64, CommitId), RoaringTreemap>,
    found: &mut HashMap<Option<CommitId>, RoaringTreemap>,
    commit: Option<CommitId>,
    blocks: RoaringTreemap,
) -> Result<()> {
    if blocks.is_empty() {
        return Ok(());
    }
    match commit {
        Some(id) => {
            let gen = catalog.commit_required(&id)?.gen;
            *pending.entry((gen, id)).or_default() |= blocks;
        }
        None => *found.entry(None).or_default() |= blocks,
    }
    Ok(())
}
