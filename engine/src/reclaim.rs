//! The reclaimer: returns space nothing references any more, and measures what each branch,
//! commit and volume holds alone (what deleting it would free).
//!
//! Branch deletes, trims and overwrites free what a head owned at once (generations make that
//! cheap). What becomes unreferenced otherwise, a squashed commit's own blocks, a reset
//! head's history, a deleted clone, is found by a scan: a mark phase over every root of the
//! pool, then a sweep of whatever the allocators hold that no root reaches. The scan runs
//! beside I/O without pausing it:
//!
//! 1. Both allocators start recording what they hand out, and the scan waits out the data
//!    I/O in flight, so every block allocated before is mapped (or freed) by then.
//! 2. A sync point makes the current state durable: its roots and everything under them are
//!    immutable from then on. Freed metadata pages are kept from reuse until the scan ends,
//!    so the pages the mark phase reads cannot change under it.
//! 3. The mark phase reads those nodes straight from the metadata file, without the state
//!    lock. Each node records which root reached it first; one reached from a second root is
//!    shared, and so is everything under it (each node changes state at most twice, so the
//!    walk costs at most twice the metadata, however much is shared).
//! 4. The sweep frees what is allocated but neither reached, nor allocated since step 1, nor
//!    already queued for freeing; like every free it becomes reusable after the next sync.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use roaring::RoaringTreemap;
use serde::{Deserialize, Serialize};

use crate::catalog::BlobRef;
use crate::error::{Error, Result};
use crate::format::PAGE_SIZE;
use crate::io::{self, FileKind, IoBackend};
use crate::meta::{Body, Node, PendingFree, Target, TREE_HEIGHT_MAX};
use crate::pool::{run_blocking, runs, Pool, PoolInner, State};
use crate::types::*;

/// After a background scan, the reclaimer waits this many times as long as the scan took
/// before the next one.
const SCAN_PAUSE_FACTOR: u32 = 3;

/// A burst of changes (a script deleting a thousand commits) gets one scan after it, not
/// several beside it: once woken, the background reclaimer scans when no change has asked
/// for this long...
const SCAN_QUIET: Duration = Duration::from_millis(500);
/// ...or when this long has passed since it woke, so that a steady stream of changes still
/// gets its space back, a scan about every ten seconds.
const SCAN_DELAY_MAX: Duration = Duration::from_secs(10);

/// What a volume's refs hold, as of a scan.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeSpace {
    /// Data bytes the volume's refs map, shared blocks counted once.
    pub referenced_bytes: u64,
    /// Data and metadata bytes no other volume references: what deleting the volume frees.
    pub exclusive_bytes: u64,
    /// Per branch: data and metadata bytes only that branch head references.
    pub branches: BTreeMap<String, u64>,
    /// Per commit: data and metadata bytes (its bitmap included) only that commit references.
    pub commits: BTreeMap<CommitId, u64>,
}

/// The result of a scan.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SpaceReport {
    /// The sync point the figures describe.
    pub generation: u64,
    pub computed_unix: u64,
    /// Bytes the scan found unreferenced and returned to the pool.
    pub reclaimed_bytes: u64,
    pub volumes: BTreeMap<String, VolumeSpace>,
}

/// Whose a root is.
#[derive(Clone, Debug)]
enum RootOf {
    Branch(String),
    Commit(CommitId),
}

struct Root {
    volume: u32,
    of: RootOf,
    page: u64,
    /// Bitmaps only this root references (a commit's changes, a merge branch's state).
    blobs: Vec<BlobRef>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Owner {
    Root(u32),
    Shared,
}

struct Mark {
    owner: Owner,
    /// Volumes that reached the node (few: a volume and its clones).
    volumes: Vec<u32>,
}

/// The mark phase over immutable nodes read from the metadata file.
struct Walk<'a> {
    backend: &'a dyn IoBackend,
    /// Pages at or past this are outside the metadata file.
    meta_end: u64,
    /// Every node and extent in the snapshot is born before this generation.
    birth_limit: u64,
    marks: HashMap<u64, Mark>,
    /// Data blocks reached from any root, and those reached from more than one.
    seen: RoaringTreemap,
    shared: RoaringTreemap,
    /// Per root: data blocks first reached from it.
    first: Vec<RoaringTreemap>,
    /// Per volume: data blocks its refs reach.
    volume_blocks: Vec<RoaringTreemap>,
}

impl Walk<'_> {
    fn read(&self, page: u64) -> Result<Node> {
        if page == 0 || page >= self.meta_end {
            return Err(Error::corrupt(
                format!("extent-map pointer to page {page} outside the metadata file"),
                "meta.grove",
            ));
        }
        let offset = page * PAGE_SIZE as u64;
        // Nodes are mostly in the page cache: read there without a trip through the backend.
        let mut bytes = vec![0u8; PAGE_SIZE];
        let piece = [io::Piece {
            file_offset: offset,
            buf_offset: 0,
            len: PAGE_SIZE,
        }];
        let bytes = match self.backend.read_cached(FileKind::Meta, &mut bytes, &piece) {
            Some(Ok(())) => bytes,
            _ => io::read_blocking(self.backend, FileKind::Meta, offset, PAGE_SIZE)?,
        };
        let node = Node::decode(&bytes, page)?;
        if node.birth >= self.birth_limit {
            return Err(Error::corrupt(
                format!(
                    "extent-map node born in generation {} after the scanned sync point",
                    node.birth
                ),
                format!("meta page {page}"),
            ));
        }
        Ok(node)
    }

    /// Marks shared the blocks of `blocks` already seen from another root.
    fn mark_seen_shared(&mut self, blocks: std::ops::Range<u64>) {
        let mut seen = RoaringTreemap::new();
        seen.insert_range(blocks.clone());
        seen &= &self.seen;
        // Usually none or all of it: only a part seen is walked run by run.
        match seen.len() {
            0 => {}
            n if n == blocks.end - blocks.start => {
                self.shared.insert_range(blocks);
            }
            _ => {
                for (start, len) in runs(&seen) {
                    self.shared.insert_range(start..start + len);
                }
            }
        }
    }

    /// Visits a node from root `root` of volume `volume`; `shared` when a shared parent led
    /// here (so this node is shared too).
    fn visit(
        &mut self,
        page: u64,
        root: u32,
        volume: u32,
        shared: bool,
        level: Option<u8>,
        depth: u8,
    ) -> Result<()> {
        if page == 0 {
            return Ok(());
        }
        if depth > TREE_HEIGHT_MAX {
            return Err(Error::corrupt(
                "extent map deeper than any valid tree",
                format!("meta page {page}"),
            ));
        }
        let mark = self.marks.entry(page).or_insert(Mark {
            owner: if shared {
                Owner::Shared
            } else {
                Owner::Root(root)
            },
            volumes: Vec::new(),
        });
        let first_visit = mark.volumes.is_empty();
        let mut became_shared = false;
        if !first_visit {
            if let Owner::Root(r) = mark.owner {
                if r != root || shared {
                    mark.owner = Owner::Shared;
                    became_shared = true;
                }
            }
        }
        let new_for_volume = !mark.volumes.contains(&volume);
        if new_for_volume {
            mark.volumes.push(volume);
        }
        let now_shared = mark.owner == Owner::Shared;
        if !(first_visit || became_shared || new_for_volume) {
            return Ok(());
        }
        let node = self.read(page)?;
        if level.is_some_and(|l| l != node.level) {
            return Err(Error::corrupt(
                format!(
                    "extent-map node at level {} where {level:?} was expected",
                    node.level
                ),
                format!("meta page {page}"),
            ));
        }
        match &node.body {
            Body::Leaf(extents) => {
                for e in extents {
                    if e.birth >= self.birth_limit {
                        return Err(Error::corrupt(
                            format!(
                                "extent born in generation {} after the scanned sync point",
                                e.birth
                            ),
                            format!("logical block {}", e.lblock),
                        ));
                    }
                    let Target::Data(p) = e.target else { continue };
                    // Ranges go in with insert_range: a union with a one-extent bitmap would
                    // copy the whole container it lands in, for every extent.
                    let blocks = p..p + e.len;
                    if new_for_volume {
                        self.volume_blocks[volume as usize].insert_range(blocks.clone());
                    }
                    if first_visit && !now_shared {
                        // The same data block can sit in leaves of several roots (a leaf
                        // copied on write keeps its other extents): in a long history most
                        // extents of a leaf were reached before, and that is checked word by
                        // word, without building anything.
                        if contains_all(&self.seen, &blocks) {
                            if !contains_all(&self.shared, &blocks) {
                                self.shared.insert_range(blocks);
                            }
                            continue;
                        }
                        self.mark_seen_shared(blocks.clone());
                        self.first[root as usize].insert_range(blocks.clone());
                    } else if first_visit || became_shared {
                        self.shared.insert_range(blocks.clone());
                    }
                    self.seen.insert_range(blocks);
                }
            }
            Body::Internal(children) => {
                for c in children {
                    self.visit(
                        c.page,
                        root,
                        volume,
                        now_shared,
                        Some(node.level - 1),
                        depth + 1,
                    )?;
                }
            }
        }
        Ok(())
    }
}

/// Whether `set` holds every block of `blocks`. The treemap keeps a bitmap per 2^32 blocks;
/// each checks its part of the range in place.
fn contains_all(set: &RoaringTreemap, blocks: &std::ops::Range<u64>) -> bool {
    let Some(last) = blocks.end.checked_sub(1).filter(|&l| l >= blocks.start) else {
        return true;
    };
    // The first block not yet shown to be in `set`.
    let mut next = blocks.start;
    for (high, bitmap) in set.bitmaps() {
        let base = u64::from(high) << 32;
        let top = base + u64::from(u32::MAX);
        if top < next {
            continue;
        }
        if base > next {
            return false;
        }
        let end = last.min(top);
        // Both bounds lie in this bitmap's 2^32 blocks, so they fit in u32.
        if !bitmap.contains_range((next - base) as u32..=(end - base) as u32) {
            return false;
        }
        if end == last {
            return true;
        }
        next = end + 1;
    }
    false
}

/// Ends a scan however it ends: frees are released again, allocations no longer recorded.
struct ScanGuard<'a>(&'a PoolInner);

impl Drop for ScanGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.0.state.lock();
        st.scan_active = false;
        st.data.stop_tracking();
        st.meta.pages.stop_tracking();
    }
}

impl Pool {
    /// Runs a scan now (waiting for one in progress): returns unreferenced space to the pool
    /// and measures what each ref holds alone.
    pub async fn reclaim(&self) -> Result<SpaceReport> {
        let turn = self.inner.reclaim_lock.clone().lock_owned().await;
        self.scan_now(turn).await
    }

    /// Runs a scan, its turn (`reclaim_lock`) taken.
    async fn scan_now(
        &self,
        one_at_a_time: tokio::sync::OwnedMutexGuard<()>,
    ) -> Result<SpaceReport> {
        // The guard goes with the scan to its thread: a caller that gives up (an HTTP client
        // gone) must not let a second scan start beside one still running.
        self.inner.check_writable()?;
        let inner = self.inner.clone();
        run_blocking(move || {
            let (report, asked) = scan(&inner)?;
            // The sweep's frees become reusable at this sync point.
            inner.sync_writes(|_| Ok((Vec::new(), Vec::new())))?;
            *inner.space.lock() = Some(report.clone());
            inner.reclaim_covered.fetch_max(asked, Ordering::SeqCst);
            inner.space_scans.fetch_add(1, Ordering::SeqCst);
            drop(one_at_a_time);
            tracing::info!(
                reclaimed_bytes = report.reclaimed_bytes,
                generation = report.generation,
                "space scan done"
            );
            Ok(report)
        })
        .await
    }

    /// The figures of the latest scan, if any ran since the pool opened.
    pub fn space_report(&self) -> Option<SpaceReport> {
        self.inner.space.lock().clone()
    }

    /// How many scans completed since the pool opened.
    pub fn space_scans(&self) -> u64 {
        self.inner.space_scans.load(Ordering::SeqCst)
    }

    /// Starts the background reclaimer on the current tokio runtime: after deletes, resets
    /// and clones it scans (once a burst of them has passed, coalescing requests that arrive
    /// meanwhile), and once at start so the space figures exist. It ends once the pool is
    /// dropped (`PoolInner`'s drop wakes it).
    pub fn spawn_reclaimer(&self) -> tokio::task::JoinHandle<()> {
        let wanted = self.inner.reclaim_wanted.clone();
        let pool = Arc::downgrade(&self.inner);
        self.inner.reclaim_soon();
        tokio::spawn(async move {
            loop {
                wanted.notified().await;
                let first = tokio::time::Instant::now();
                while first.elapsed() < SCAN_DELAY_MAX {
                    let wait = SCAN_QUIET.min(SCAN_DELAY_MAX.saturating_sub(first.elapsed()));
                    if tokio::time::timeout(wait, wanted.notified()).await.is_err() {
                        break;
                    }
                }
                let Some(inner) = pool.upgrade() else { break };
                let pool = Pool { inner, actor: None };
                if pool.is_failed() {
                    continue;
                }
                let turn = pool.inner.reclaim_lock.clone().lock_owned().await;
                // A scan through the API may have seen every change since.
                let asked = pool.inner.reclaim_asked.load(Ordering::SeqCst);
                if pool.inner.reclaim_covered.load(Ordering::SeqCst) >= asked {
                    continue;
                }
                let started = tokio::time::Instant::now();
                if let Err(err) = pool.scan_now(turn).await {
                    tracing::warn!(error = %err, "space scan failed; it runs again after the next change");
                }
                // Requests that come meanwhile wait, so that scans take at most a quarter of
                // the time however fast changes come (a thousand commit deletes in a row
                // would otherwise keep a core scanning beside the I/O).
                drop(pool);
                tokio::time::sleep(started.elapsed() * SCAN_PAUSE_FACTOR).await;
            }
        })
    }
}

impl PoolInner {
    /// Asks the background reclaimer (see `Pool::spawn_reclaimer`) for a scan. Called once
    /// the change is applied, so that a scan that counts the request sees the change.
    pub(crate) fn reclaim_soon(&self) {
        self.reclaim_asked.fetch_add(1, Ordering::SeqCst);
        self.reclaim_wanted.notify_one();
    }
}

/// Runs a scan; returns its figures and how many requests for a scan it answers.
fn scan(inner: &PoolInner) -> Result<(SpaceReport, u64)> {
    // Counted when tracking starts, not at the snapshot: what a change applied before then
    // left unreferenced was allocated before then, so the sweep frees it; a change applied
    // between the two is in the snapshot, but blocks it allocated meanwhile are spared.
    let asked = {
        let mut st = inner.state.lock();
        if st.scan_active {
            return Err(Error::Conflict("a space scan is already running".into()));
        }
        st.scan_active = true;
        st.data.start_tracking();
        st.meta.pages.start_tracking();
        inner.reclaim_asked.load(Ordering::SeqCst)
    };
    let _guard = ScanGuard(inner);
    // Every data block allocated before tracking began is mapped or freed once this returns.
    inner.grace.synchronize();
    let mut snapshot = None;
    inner.sync_writes(|st| {
        snapshot = Some(roots(st));
        Ok((Vec::new(), Vec::new()))
    })?;
    let Some((roots, volumes, volume_counts)) = snapshot else {
        return Err(Error::invalid("the space scan took no snapshot"));
    };
    let (birth_limit, meta_end) = {
        let st = inner.state.lock();
        (st.meta.gen, st.meta.pages.end())
    };
    let mut walk = Walk {
        backend: &*inner.backend,
        meta_end,
        birth_limit,
        marks: HashMap::new(),
        seen: RoaringTreemap::new(),
        shared: RoaringTreemap::new(),
        first: vec![RoaringTreemap::new(); roots.len()],
        volume_blocks: vec![RoaringTreemap::new(); volumes.len()],
    };
    for (i, root) in roots.iter().enumerate() {
        walk.visit(root.page, i as u32, root.volume, false, None, 0)?;
    }
    let mut reached_pages: RoaringTreemap = walk.marks.keys().copied().collect();
    let mut exclusive_pages = vec![0u64; roots.len()];
    let mut volume_pages = vec![0u64; volumes.len()];
    for mark in walk.marks.values() {
        if let Owner::Root(r) = mark.owner {
            exclusive_pages[r as usize] += 1;
        }
        if let [v] = mark.volumes[..] {
            volume_pages[v as usize] += 1;
        }
    }
    for (i, root) in roots.iter().enumerate() {
        for blob in &root.blobs {
            let pages = blob.pages();
            let n = pages.end - pages.start;
            reached_pages.insert_range(pages);
            exclusive_pages[i] += n;
            volume_pages[root.volume as usize] += n;
        }
    }

    // Volume figures: blocks no other volume reaches are the volume's alone.
    let mut in_two = RoaringTreemap::new();
    let mut in_any = RoaringTreemap::new();
    for blocks in &walk.volume_blocks {
        in_two |= blocks & &in_any;
        in_any |= blocks;
    }
    let mut report = SpaceReport {
        generation: birth_limit - 1,
        computed_unix: now_unix(),
        ..Default::default()
    };
    for (v, name) in volumes.iter().enumerate() {
        let blocks = &walk.volume_blocks[v];
        report.volumes.insert(
            name.clone(),
            VolumeSpace {
                referenced_bytes: blocks.len() * BLOCK_SIZE,
                exclusive_bytes: ((blocks - &in_two).len() + volume_pages[v]) * BLOCK_SIZE,
                ..Default::default()
            },
        );
    }
    for (i, root) in roots.iter().enumerate() {
        let data = (&walk.first[i] - &walk.shared).len();
        let bytes = (data + exclusive_pages[i]) * BLOCK_SIZE;
        let space = report
            .volumes
            .entry(volumes[root.volume as usize].clone())
            .or_default();
        match &root.of {
            RootOf::Branch(name) => space.branches.insert(name.clone(), bytes),
            RootOf::Commit(id) => space.commits.insert(*id, bytes),
        };
    }

    // Sweep.
    let mut st = inner.state.lock();
    inner.check_writable()?;
    let pending = |list: &[PendingFree]| -> RoaringTreemap {
        let mut set = RoaringTreemap::new();
        for p in list {
            set.insert_range(p.start..p.start + p.len);
        }
        set
    };
    let free_data = st.data.used_set() - &walk.seen - st.data.tracked() - pending(&st.pending_data);
    let free_pages = st.meta.pages.used_set()
        - &reached_pages
        - st.meta.pages.tracked()
        - pending(&st.meta.pending_pages);
    let gen = report.generation;
    for (start, len) in runs(&free_data).collect::<Vec<_>>() {
        st.pending_data.push(PendingFree { gen, start, len });
    }
    for (start, len) in runs(&free_pages).collect::<Vec<_>>() {
        st.meta.pending_pages.push(PendingFree { gen, start, len });
    }
    report.reclaimed_bytes = free_data.len() * BLOCK_SIZE + free_pages.len() * PAGE_SIZE as u64;
    // The volumes' running counts drifted by what went unreferenced without being freed;
    // correct them by what the scan found, keeping what changed since.
    for (v, name) in volumes.iter().enumerate() {
        if let Some(vol) = st.catalog.volumes.get_mut(name) {
            let scanned = walk.volume_blocks[v].len();
            vol.blocks = (vol.blocks + scanned).saturating_sub(volume_counts[v]);
        }
    }
    drop(st);
    Ok((report, asked))
}

/// Every root of the pool, the volumes in order, and each volume's block count at the snapshot.
fn roots(st: &State) -> (Vec<Root>, Vec<String>, Vec<u64>) {
    let mut roots = Vec::new();
    let mut volumes = Vec::new();
    let mut counts = Vec::new();
    for (v, vol) in st.catalog.volumes.values().enumerate() {
        volumes.push(vol.name.clone());
        counts.push(vol.blocks);
        for (name, id) in &vol.branches {
            if let Some(head) = st.catalog.heads.get(id) {
                roots.push(Root {
                    volume: v as u32,
                    of: RootOf::Branch(name.clone()),
                    page: head.record.root,
                    blobs: head.record.blobs(),
                });
            }
        }
        for commit in vol.commits.values() {
            roots.push(Root {
                volume: v as u32,
                of: RootOf::Commit(commit.info.id),
                page: commit.root,
                blobs: vec![commit.bitmap],
            });
        }
    }
    (roots, volumes, counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_all_checks_every_block_across_the_treemaps_partitions() {
        const PART: u64 = 1 << 32;
        let mut set = RoaringTreemap::new();
        set.insert_range(10..20);
        set.insert_range(PART - 5..PART + 5);
        set.insert_range(3 * PART..3 * PART + 2);

        assert!(contains_all(&set, &(10..20)));
        assert!(contains_all(&set, &(12..13)));
        assert!(contains_all(&set, &(15..15)), "an empty range");
        assert!(!contains_all(&set, &(9..20)));
        assert!(!contains_all(&set, &(10..21)));
        assert!(!contains_all(&set, &(20..21)));
        // Across the boundary between two partitions.
        assert!(contains_all(&set, &(PART - 5..PART + 5)));
        assert!(!contains_all(&set, &(PART - 6..PART + 5)));
        assert!(!contains_all(&set, &(PART - 5..PART + 6)));
        // Partition 2 is missing altogether.
        assert!(!contains_all(&set, &(3 * PART - 1..3 * PART + 1)));
        assert!(contains_all(&set, &(3 * PART..3 * PART + 2)));
        assert!(!contains_all(&set, &(4 * PART..4 * PART + 1)));
        assert!(!contains_all(&RoaringTreemap::new(), &(0..1)));
    }
}
