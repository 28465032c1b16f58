//! Metadata contexts: which ones a client selected with `NBD_OPT_SET_META_CONTEXT`, and how
//! the diff contexts (`grove:diff:REF`, `qemu:dirty-bitmap:REF`) answer
//! `NBD_CMD_BLOCK_STATUS`. The names and flags are described in `proto.rs`.
//!
//! When the differences are computed: the blocks that differ between the export and a base
//! ref come from [`ExportHandle::diff`], the engine's diff of the two refs. When both are
//! immutable (a commit or tag export compared with a commit or tag) the answer cannot change,
//! so it is computed once, at the first block status request that needs it, and kept for the
//! connection. When either is a branch head, writes change it: through this connection, other
//! NBD connections, iSCSI, or a reset or merge of the branch. No cheap sign tells when that
//! happened, so the answer is computed again for each block status request, with one
//! exception that keeps it correct: a computation that *started after* a request was read
//! reflects every write completed before that request (the engine applies a write before
//! acknowledging it, and a client that waits for a write's reply before asking, on any
//! connection, sends its request after), so such a computation may serve that request too.
//! Computations for one base are serialized per connection; requests that queued behind one
//! share its result. A client asking for the whole export in a few large requests (nbdinfo,
//! libnbd) pays a handful of diffs; one walking extent by extent with `NBD_CMD_FLAG_REQ_ONE`
//! (QEMU) pays one per extent on a branch head, which is why backups should read a commit.
//!
//! Memory: each selected base keeps its last answer (a roaring bitmap of changed 4 KiB
//! blocks) for the connection's life; [`DIFF_CONTEXTS_MAX`] bounds the number of bases.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use grove_engine::{Result, RoaringTreemap, BLOCK_SIZE};
use tokio::sync::Mutex;

use crate::export::{DiffBase, ExportHandle};
use crate::proto::{DiffNamespace, StatusDescriptor};
use crate::transmission::BLOCK_STATUS_DESCRIPTORS_MAX;

/// The metadata context id this server gives `base:allocation` in `NBD_OPT_SET_META_CONTEXT`.
pub const BASE_ALLOCATION_CONTEXT_ID: u32 = 1;
/// Most diff contexts one `NBD_OPT_SET_META_CONTEXT` may select; asking for more gets
/// `NBD_REP_ERR_TOO_BIG`. With `base:allocation`, the reply to one block status request then
/// stays within [`crate::transmission`]'s budget for it.
pub const DIFF_CONTEXTS_MAX: usize = 8;
/// Most refs listed per diff namespace in one `NBD_OPT_LIST_META_CONTEXT` reply; past it, the
/// namespace wildcard is listed to say that more refs are accepted.
pub const LISTED_REFS_MAX: usize = 100;

/// A diff context the client selected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DiffContext {
    pub id: u32,
    pub namespace: DiffNamespace,
    /// The name exactly as the client asked for it (clients match replies by name).
    pub name: String,
    pub base: DiffBase,
}

/// What the last `NBD_OPT_SET_META_CONTEXT` selected, for which export.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Selection {
    pub export: String,
    /// The id of `base:allocation`, if selected.
    pub allocation: Option<u32>,
    pub diffs: Vec<DiffContext>,
}

impl Selection {
    pub fn count(&self) -> usize {
        usize::from(self.allocation.is_some()) + self.diffs.len()
    }
}

/// A base's last computed differences.
struct Computed {
    /// Block status requests with a sequence number below this were read before the
    /// computation started, so it reflects every write they may expect (`u64::MAX` for an
    /// immutable pair: valid for all).
    valid_below: u64,
    blocks: Arc<RoaringTreemap>,
}

/// One base ref of the connection and its cached differences.
struct BaseState {
    base: DiffBase,
    /// Held while computing, so one computation at a time per base.
    computed: Mutex<Option<Computed>>,
}

/// A selected diff context in transmission: its id, flag, and which base it reads.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DiffReader {
    pub id: u32,
    pub namespace: DiffNamespace,
    base_index: usize,
}

/// The selected contexts of a connection in transmission.
pub(crate) struct Contexts {
    pub allocation: Option<u32>,
    pub diffs: Vec<DiffReader>,
    /// Distinct bases (two names for the same ref share one).
    bases: Vec<BaseState>,
    /// Block status requests read so far; the reader numbers each one.
    block_status_read: AtomicU64,
}

impl Contexts {
    pub fn new(selection: Option<Selection>) -> Self {
        let mut contexts = Contexts {
            allocation: None,
            diffs: Vec::new(),
            bases: Vec::new(),
            block_status_read: AtomicU64::new(0),
        };
        let Some(selection) = selection else {
            return contexts;
        };
        contexts.allocation = selection.allocation;
        for diff in selection.diffs {
            let base_index = match contexts
                .bases
                .iter()
                .position(|state| state.base == diff.base)
            {
                Some(index) => index,
                None => {
                    contexts.bases.push(BaseState {
                        base: diff.base,
                        computed: Mutex::new(None),
                    });
                    contexts.bases.len() - 1
                }
            };
            contexts.diffs.push(DiffReader {
                id: diff.id,
                namespace: diff.namespace,
                base_index,
            });
        }
        contexts
    }

    pub fn count(&self) -> usize {
        usize::from(self.allocation.is_some()) + self.diffs.len()
    }

    /// Numbers a block status request; called by the reader, in the order requests are read.
    pub fn arrive(&self) -> u64 {
        self.block_status_read.fetch_add(1, Ordering::SeqCst)
    }

    /// The blocks that differ for `diff`, valid for the block status request numbered
    /// `sequence`: the cached answer if it may serve that request, else a new computation.
    pub async fn changed_blocks<H: ExportHandle>(
        &self,
        handle: &H,
        diff: &DiffReader,
        sequence: u64,
    ) -> Result<Arc<RoaringTreemap>> {
        let state = &self.bases[diff.base_index];
        let mut computed = state.computed.lock().await;
        if let Some(cached) = computed.as_ref() {
            if sequence < cached.valid_below {
                return Ok(cached.blocks.clone());
            }
        }
        let valid_below = if state.base.immutable {
            u64::MAX
        } else {
            // Read before the computation starts: every request numbered below it was read
            // before, so the computation sees every write it may expect.
            self.block_status_read.load(Ordering::SeqCst)
        };
        let blocks = Arc::new(handle.diff(&state.base).await?);
        *computed = Some(Computed {
            valid_below,
            blocks: blocks.clone(),
        });
        Ok(blocks)
    }
}

/// Turns changed blocks into block status descriptors for `[offset_bytes, offset_bytes +
/// limit_bytes)`: alternating runs of unchanged (flags 0) and changed (`changed_flag`) bytes,
/// at 4 KiB block granularity except where the range starts or ends inside a block. At most
/// [`BLOCK_STATUS_DESCRIPTORS_MAX`] descriptors, exactly one with `req_one`; the total never
/// exceeds `limit_bytes`. The range must not overflow (the caller checked it against the
/// export size).
pub(crate) fn diff_descriptors(
    blocks: &RoaringTreemap,
    offset_bytes: u64,
    limit_bytes: u64,
    req_one: bool,
    changed_flag: u32,
) -> Vec<StatusDescriptor> {
    let end_bytes = offset_bytes.saturating_add(limit_bytes);
    let end_block = end_bytes.div_ceil(BLOCK_SIZE);
    let descriptors_max = if req_one {
        1
    } else {
        BLOCK_STATUS_DESCRIPTORS_MAX
    };
    let mut descriptors = Vec::new();
    let mut position = offset_bytes;
    while position < end_bytes && descriptors.len() < descriptors_max {
        let block = position / BLOCK_SIZE;
        let changed = blocks.contains(block);
        let run_end_block = if changed {
            changed_run_end(blocks, block, end_block)
        } else {
            next_changed(blocks, block, end_block)
        };
        // Each run ends past `block`, so the loop advances by at least one block.
        debug_assert!(run_end_block > block);
        let run_end = run_end_block.saturating_mul(BLOCK_SIZE).min(end_bytes);
        descriptors.push(StatusDescriptor {
            len_bytes: run_end - position,
            flags: if changed { changed_flag } else { 0 },
        });
        position = run_end;
    }
    descriptors
}

/// How many blocks below `block` are set.
fn rank_below(blocks: &RoaringTreemap, block: u64) -> u64 {
    match block.checked_sub(1) {
        Some(last) => blocks.rank(last),
        None => 0,
    }
}

/// The first set block at or after `from`, or `limit` if there is none below it.
fn next_changed(blocks: &RoaringTreemap, from: u64, limit: u64) -> u64 {
    blocks
        .select(rank_below(blocks, from))
        .map_or(limit, |next| next.min(limit))
}

/// The end (exclusive) of the run of set blocks starting at the set block `start`, at most
/// `limit`. Galloping then bisection over ranks: O(log² run) rank queries, however long the
/// run.
fn changed_run_end(blocks: &RoaringTreemap, start: u64, limit: u64) -> u64 {
    let before = rank_below(blocks, start);
    let all_set = |end: u64| rank_below(blocks, end) - before == end - start;
    // [start, low) is all set; [start, high) is not.
    let mut low = start + 1;
    if low >= limit {
        return limit.max(low);
    }
    let mut step = 1u64;
    let mut high = loop {
        let probe = low.saturating_add(step);
        if probe >= limit {
            if all_set(limit) {
                return limit;
            }
            break limit;
        }
        if all_set(probe) {
            low = probe;
            step = step.saturating_mul(2);
        } else {
            break probe;
        }
    };
    while high - low > 1 {
        let middle = low + (high - low) / 2;
        if all_set(middle) {
            low = middle;
        } else {
            high = middle;
        }
    }
    low
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The descriptors, computed block by block.
    fn model(
        blocks: &RoaringTreemap,
        offset_bytes: u64,
        limit_bytes: u64,
        req_one: bool,
        changed_flag: u32,
    ) -> Vec<StatusDescriptor> {
        let mut out: Vec<StatusDescriptor> = Vec::new();
        let end = offset_bytes + limit_bytes;
        let mut position = offset_bytes;
        while position < end {
            let next = ((position / BLOCK_SIZE) + 1) * BLOCK_SIZE;
            let piece_end = next.min(end);
            let flags = if blocks.contains(position / BLOCK_SIZE) {
                changed_flag
            } else {
                0
            };
            match out.last_mut() {
                Some(last) if last.flags == flags => last.len_bytes += piece_end - position,
                _ => out.push(StatusDescriptor {
                    len_bytes: piece_end - position,
                    flags,
                }),
            }
            position = piece_end;
        }
        if req_one {
            out.truncate(1);
        }
        out
    }

    #[test]
    fn diff_descriptors_runs_and_edges() {
        let mut blocks = RoaringTreemap::new();
        blocks.insert_range(2..5);
        blocks.insert(9);
        let descriptors = diff_descriptors(&blocks, 0, 16 * BLOCK_SIZE, false, 1);
        let runs: Vec<(u64, u32)> = descriptors
            .iter()
            .map(|d| (d.len_bytes / BLOCK_SIZE, d.flags))
            .collect();
        assert_eq!(runs, [(2, 0), (3, 1), (4, 0), (1, 1), (6, 0)]);
        // A range starting and ending inside blocks.
        let descriptors = diff_descriptors(&blocks, 3 * BLOCK_SIZE + 100, 2 * BLOCK_SIZE, false, 1);
        assert_eq!(
            descriptors,
            [
                StatusDescriptor {
                    len_bytes: 2 * BLOCK_SIZE - 100,
                    flags: 1
                },
                StatusDescriptor {
                    len_bytes: 100,
                    flags: 0
                },
            ]
        );
        // REQ_ONE: one descriptor, no longer than the request.
        assert_eq!(
            diff_descriptors(&blocks, 0, 3 * BLOCK_SIZE, true, 1),
            [StatusDescriptor {
                len_bytes: 2 * BLOCK_SIZE,
                flags: 0
            }]
        );
        assert_eq!(
            diff_descriptors(&blocks, 2 * BLOCK_SIZE, 1000, true, 1),
            [StatusDescriptor {
                len_bytes: 1000,
                flags: 1
            }]
        );
        // Nothing changed: one clean extent; everything changed: one dirty extent.
        assert_eq!(
            diff_descriptors(&RoaringTreemap::new(), 512, 1 << 30, false, 1),
            [StatusDescriptor {
                len_bytes: 1 << 30,
                flags: 0
            }]
        );
        let mut all = RoaringTreemap::new();
        all.insert_range(0..(1 << 20));
        assert_eq!(
            diff_descriptors(&all, 0, 1 << 32, false, 1),
            [StatusDescriptor {
                len_bytes: 1 << 32,
                flags: 1
            }]
        );
        assert!(diff_descriptors(&all, 7, 0, false, 1).is_empty());
    }

    #[test]
    fn diff_descriptors_descriptor_cap() {
        let mut blocks = RoaringTreemap::new();
        for block in (0..(4 * BLOCK_STATUS_DESCRIPTORS_MAX as u64)).step_by(2) {
            blocks.insert(block);
        }
        let descriptors = diff_descriptors(&blocks, 0, 1 << 40, false, 1);
        assert_eq!(descriptors.len(), BLOCK_STATUS_DESCRIPTORS_MAX);
        assert!(descriptors.iter().all(|d| d.len_bytes == BLOCK_SIZE));
    }

    #[test]
    fn diff_descriptors_match_a_block_by_block_model() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..2000 {
            let mut blocks = RoaringTreemap::new();
            let span = 1 + next() % 200;
            for _ in 0..next() % 12 {
                let start = next() % span;
                let len = 1 + next() % 40;
                blocks.insert_range(start..start + len);
            }
            let offset = next() % (span * BLOCK_SIZE);
            let limit = 1 + next() % (span * BLOCK_SIZE);
            let req_one = next() % 4 == 0;
            assert_eq!(
                diff_descriptors(&blocks, offset, limit, req_one, 1),
                model(&blocks, offset, limit, req_one, 1),
                "blocks {blocks:?} offset {offset} limit {limit} req_one {req_one}"
            );
        }
    }

    #[test]
    fn changed_run_end_long_runs() {
        let mut blocks = RoaringTreemap::new();
        blocks.insert_range(10..1_000_010);
        blocks.insert_range(1_000_011..1_000_020);
        assert_eq!(changed_run_end(&blocks, 10, u64::MAX), 1_000_010);
        assert_eq!(changed_run_end(&blocks, 500, 600), 600);
        assert_eq!(changed_run_end(&blocks, 1_000_011, u64::MAX), 1_000_020);
        assert_eq!(next_changed(&blocks, 1_000_010, u64::MAX), 1_000_011);
        assert_eq!(next_changed(&blocks, 1_000_020, 5_000_000), 5_000_000);
        assert_eq!(next_changed(&blocks, 0, 5), 5);
    }
}
