//! Scrub: reads every live data block of the pool and checks it against its checksum, online
//! and under a bandwidth budget (`sums.rs` for the checksums).
//!
//! Every ref of every volume is walked in logical order, a chunk at a time; a block mapped by
//! several refs is checked once. On a branch head each chunk is read holding the head's range
//! lock, so no in-place write can land between the checksum and the data being read; a
//! commit's blocks never change. Each chunk is looked up again just before it is read (under
//! the state lock, with a grace guard, like any read), so a scrub can run beside writes,
//! commits and deletes: what was deleted meanwhile is skipped, what was written meanwhile is
//! checked as it is then.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use roaring::RoaringTreemap;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::events::Event;
use crate::extent_map::MapReader;
use crate::io::{self, FileKind, IoOp};
use crate::pool::{Pool, PoolInner};
use crate::session::segments;
use crate::sums::{block_sum, NO_SUM};
use crate::types::*;

/// Blocks read at a time.
const CHUNK_BLOCKS: u64 = 256;
/// Logical blocks looked up at a time to find where a ref has data.
const WINDOW_BLOCKS: u64 = 1 << 20;
/// Bad blocks listed in a report at most (all are counted).
pub const SCRUB_ERRORS_LISTED: usize = 1000;
/// Default budget: 64 MiB/s.
pub const SCRUB_RATE_DEFAULT_BYTES: u64 = 64 << 20;

/// A block found not matching its checksum.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ScrubError {
    /// The ref it was found through (another may map it too).
    pub export: String,
    pub offset_bytes: u64,
    /// Where it is in `data.grove`, in 4 KiB blocks.
    pub data_block: u64,
}

/// A scrub's progress, then its result.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ScrubReport {
    /// "running", "completed", "stopped" or "failed".
    pub state: String,
    pub started_unix: u64,
    pub finished_unix: Option<u64>,
    /// The bandwidth budget, bytes per second.
    pub rate_bytes_per_second: u64,
    /// Distinct data blocks read and checked.
    pub checked_blocks: u64,
    /// Blocks read that have no checksum (written with checksums off, or before the pool had
    /// them).
    pub unchecked_blocks: u64,
    pub bad_blocks: u64,
    /// The first `SCRUB_ERRORS_LISTED` bad blocks.
    pub errors: Vec<ScrubError>,
    /// Why a failed scrub stopped.
    pub failure: Option<String>,
}

/// A ref to walk: a head by id, or a commit by id.
enum Walk {
    Head { id: u64, name: String },
    Commit { id: CommitId, name: String },
}

impl Walk {
    fn name(&self) -> &str {
        match self {
            Walk::Head { name, .. } | Walk::Commit { name, .. } => name,
        }
    }
}

impl Pool {
    /// Starts a scrub in the background at `rate` bytes per second (the default when `None`);
    /// refused while one runs. Its progress and result: `scrub_status`.
    pub fn start_scrub(&self, rate: Option<u64>) -> Result<ScrubReport> {
        let rate = rate.unwrap_or(SCRUB_RATE_DEFAULT_BYTES);
        if rate == 0 {
            return Err(Error::invalid(
                "a scrub's rate must be above 0 bytes per second",
            ));
        }
        let report = {
            let mut status = self.inner.scrub.lock();
            if status.as_ref().is_some_and(|s| s.state == "running") {
                return Err(Error::Conflict("a scrub is already running".into()));
            }
            let report = ScrubReport {
                state: "running".into(),
                started_unix: now_unix(),
                rate_bytes_per_second: rate,
                ..Default::default()
            };
            *status = Some(report.clone());
            self.inner.scrub_stop.store(false, Ordering::Release);
            report
        };
        let pool = self.clone();
        tokio::spawn(async move {
            let result = pool.scrub_all(rate).await;
            let mut status = pool.inner.scrub.lock();
            if let Some(report) = status.as_mut() {
                report.finished_unix = Some(now_unix());
                match result {
                    Ok(true) => report.state = "completed".into(),
                    Ok(false) => report.state = "stopped".into(),
                    Err(err) => {
                        report.state = "failed".into();
                        report.failure = Some(err.to_string());
                    }
                }
            }
        });
        Ok(report)
    }

    /// Asks a running scrub to stop (it ends within a chunk); returns its report, or `None`
    /// when no scrub ran since the pool was opened.
    pub fn stop_scrub(&self) -> Option<ScrubReport> {
        self.inner.scrub_stop.store(true, Ordering::Release);
        self.scrub_status()
    }

    /// The running or last scrub since the pool was opened.
    pub fn scrub_status(&self) -> Option<ScrubReport> {
        self.inner.scrub.lock().clone()
    }

    /// Runs a scrub to its end and returns its report.
    pub async fn scrub(&self, rate: Option<u64>) -> Result<ScrubReport> {
        self.start_scrub(rate)?;
        loop {
            let status = self.scrub_status().unwrap_or_default();
            if status.state != "running" {
                return match status.failure {
                    Some(failure) => Err(Error::Io(std::io::Error::other(failure))),
                    None => Ok(status),
                };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Scrubs everything; `false` if asked to stop first.
    async fn scrub_all(&self, rate: u64) -> Result<bool> {
        let walks: Vec<(String, u64, Walk)> = {
            let st = self.inner.state.lock();
            let mut walks = Vec::new();
            for vol in st.catalog.volumes.values() {
                for (branch, id) in &vol.branches {
                    let name = ResolvedRef::Branch {
                        volume: vol.name.clone(),
                        branch: branch.clone(),
                    }
                    .canonical_name();
                    walks.push((
                        vol.name.clone(),
                        vol.size_bytes,
                        Walk::Head { id: *id, name },
                    ));
                }
                for id in vol.commits.keys() {
                    let name = format!("{}@{id}", vol.name);
                    let walk = Walk::Commit { id: *id, name };
                    walks.push((vol.name.clone(), vol.size_bytes, walk));
                }
            }
            walks
        };
        let mut seen = RoaringTreemap::new();
        let stop = &self.inner.scrub_stop;
        let mut pace = Pace {
            started: Instant::now(),
            rate,
            bytes: 0,
        };
        for (volume, size_bytes, walk) in walks {
            let blocks = size_bytes / BLOCK_SIZE;
            let mut from = 0;
            while from < blocks {
                let to = (from + WINDOW_BLOCKS).min(blocks);
                // Where the ref has data in this window (looked up again chunk by chunk).
                let Some(extents) = self.inner.lookup_walk(&walk, from, to)? else {
                    break;
                };
                for seg in segments(&extents, from, to) {
                    if seg.pblock.is_none() {
                        continue;
                    }
                    let mut l = seg.lblock;
                    while l < seg.lblock + seg.len {
                        let n = CHUNK_BLOCKS.min(seg.lblock + seg.len - l);
                        let read = self.scrub_chunk(&volume, &walk, l, n, &mut seen).await?;
                        if !pace.wait(read, stop).await {
                            return Ok(false);
                        }
                        l += n;
                    }
                }
                from = to;
            }
        }
        let report = self.scrub_status().unwrap_or_default();
        let event = Event::ScrubCompleted {
            checked_blocks: report.checked_blocks,
            bad_blocks: report.bad_blocks,
            unchecked_blocks: report.unchecked_blocks,
        };
        self.inner
            .change(self.actor.clone(), move |_| Ok((Vec::new(), vec![event])))
            .await?;
        Ok(true)
    }

    /// Checks the blocks of `[l, l + n)` of a ref not checked yet; returns the bytes read.
    async fn scrub_chunk(
        &self,
        volume: &str,
        walk: &Walk,
        l: u64,
        n: u64,
        seen: &mut RoaringTreemap,
    ) -> Result<u64> {
        let ranges = match walk {
            Walk::Head { id, .. } => {
                let st = self.inner.state.lock();
                match st.catalog.heads.get(id) {
                    Some(head) => Some(head.ranges.clone()),
                    None => return Ok(0),
                }
            }
            Walk::Commit { .. } => None,
        };
        let _range = match &ranges {
            Some(ranges) => Some(ranges.lock(l, l + n).await),
            None => None,
        };
        // (lblock, pblock, blocks, sums), looked up again now that writes are held off.
        let mut runs = Vec::new();
        let _grace = {
            let Some(extents) = self.inner.lookup_walk(walk, l, l + n)? else {
                return Ok(0);
            };
            let mut st = self.inner.state.lock();
            for seg in segments(&extents, l, l + n) {
                let Some(p) = seg.pblock else { continue };
                let mut sums = Vec::new();
                st.sums.get_run(p, seg.len, &mut sums)?;
                runs.push((seg.lblock, p, seg.len, sums));
            }
            self.inner.grace.enter()
        };
        let mut read = 0;
        for (lblock, pblock, len, sums) in runs {
            if (pblock..pblock + len).all(|p| seen.contains(p)) {
                continue;
            }
            let op = IoOp::Read {
                file: FileKind::Data,
                offset: pblock * BLOCK_SIZE,
                buf: vec![0; (len * BLOCK_SIZE) as usize],
            };
            let done = io::run(&*self.inner.backend, op).await;
            done.result.map_err(Error::Io)?;
            read += len * BLOCK_SIZE;
            let mut bad = Vec::new();
            let (mut checked, mut unchecked) = (0, 0);
            for (i, block) in done.buf.chunks_exact(BLOCK_SIZE as usize).enumerate() {
                let p = pblock + i as u64;
                if !seen.insert(p) {
                    continue;
                }
                if sums[i] == NO_SUM {
                    unchecked += 1;
                    continue;
                }
                checked += 1;
                if block_sum(block) != sums[i] {
                    bad.push(ScrubError {
                        export: walk.name().to_string(),
                        offset_bytes: (lblock + i as u64) * BLOCK_SIZE,
                        data_block: p,
                    });
                }
            }
            self.note_scrubbed(volume, checked, unchecked, bad);
        }
        Ok(read)
    }

    fn note_scrubbed(&self, volume: &str, checked: u64, unchecked: u64, bad: Vec<ScrubError>) {
        for error in &bad {
            self.inner.checksum_errors.fetch_add(1, Ordering::Relaxed);
            if self.inner.bad_blocks.lock().insert(error.data_block) {
                tracing::error!(
                    export = %error.export,
                    offset_bytes = error.offset_bytes,
                    data_block = error.data_block,
                    "scrub: data block fails its checksum"
                );
                let event = Event::DataCorrupted {
                    volume: volume.to_string(),
                    export: error.export.clone(),
                    offset_bytes: error.offset_bytes,
                    data_block: error.data_block,
                    found_by: "scrub".into(),
                };
                self.inner.state.lock().pending_events.push((event, None));
                self.inner.log_soon();
            }
        }
        let mut status = self.inner.scrub.lock();
        if let Some(report) = status.as_mut() {
            report.checked_blocks += checked;
            report.unchecked_blocks += unchecked;
            report.bad_blocks += bad.len() as u64;
            let room = SCRUB_ERRORS_LISTED.saturating_sub(report.errors.len());
            report.errors.extend(bad.into_iter().take(room));
        }
    }
}

impl PoolInner {
    /// The extents of `[from, to)` of a walked ref as it is now; `None` once it is gone.
    fn lookup_walk(
        &self,
        walk: &Walk,
        from: u64,
        to: u64,
    ) -> Result<Option<Vec<crate::meta::Extent>>> {
        let mut st = self.state.lock();
        let root = match walk {
            Walk::Head { id, .. } => match st.catalog.heads.get(id) {
                Some(head) => head.record.root,
                None => return Ok(None),
            },
            Walk::Commit { id, .. } => match st.catalog.commit_required(id) {
                Ok(commit) => commit.root,
                Err(_) => return Ok(None),
            },
        };
        let extents = MapReader {
            store: &mut st.meta,
        }
        .lookup(root, from, to)
        .map_err(|e| self.fail_meta(e))?;
        Ok(Some(extents))
    }
}

/// Keeps a scrub within its budget.
struct Pace {
    started: Instant,
    rate: u64,
    bytes: u64,
}

impl Pace {
    /// Waits until `bytes` more are within the budget; `false` as soon as `stop` is set.
    async fn wait(&mut self, bytes: u64, stop: &AtomicBool) -> bool {
        self.bytes += bytes;
        let due = Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
        loop {
            if stop.load(Ordering::Acquire) {
                return false;
            }
            let elapsed = self.started.elapsed();
            if due <= elapsed {
                return true;
            }
            tokio::time::sleep((due - elapsed).min(Duration::from_millis(100))).await;
        }
    }
}
