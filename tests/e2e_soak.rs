//! Load and soak: one grove serves 64 NBD connections at once, spread over the two branches
//! (`main`, `dev`) of four 256 MiB volumes, while API threads commit, diff, tag and branch the
//! same volumes, an observer lists sessions, scrapes `/metrics` and reclaims space, iSCSI
//! clients (qemu-io) write and read their own volumes, and a sampler records grove's RSS every
//! second. It ends with no error reply, no byte that differs from the model, RSS flat after the
//! warm-up, every session closed, a clean graceful stop, `grove fsck` clean, and every region
//! read back after a restart.
//!
//! Exactness: each connection owns a 4 MiB region of its branch (regions 32 MiB apart) and
//! keeps a model of it, one token per 4 KiB block (0: zeros); a block's bytes are derived from
//! its token and offset, so a wrong block names the write it came from. Requests of a
//! pipelined batch touch disjoint blocks. A commit takes its branch's gate: the branch's
//! writers finish their batch and wait, so the commit holds exactly the models' state at that
//! moment, which the commit export `VOL@ID` must then read back (and diffs must cover).
//!
//! Memory: after a warm-up (the first quarter of the samples), the highest RSS of the last
//! quarter may exceed the highest of the second quarter by at most max(10 %, 32 MiB): the
//! working set (regions, kept commits, tags, branches) is bounded, so real growth shows as a
//! climb over the run, while allocator arenas and the metadata cache settling stay within it.
//!
//! Run it longer (the soak) with, for example:
//!
//! ```sh
//! GROVE_SOAK_SECONDS=600 cargo test --release --test e2e_soak -- --nocapture
//! ```
//!
//! `GROVE_SOAK_SECONDS` (default 20) is the length of the load phase; `GROVE_SOAK_SEED`
//! (default 1) seeds every connection's workload, so a failure can be replayed.

mod support;

use std::collections::{BTreeMap, VecDeque};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::nbd::{
    self, Conn, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE,
    CMD_WRITE_ZEROES, REQUEST_MAGIC, TFLAG_SEND_FLUSH, TFLAG_SEND_FUA, TFLAG_SEND_TRIM,
    TFLAG_SEND_WRITE_ZEROES,
};
use support::{
    grove_bin, metric_sample, qemu_io, require_nbd_tools, require_tool, run, Grove, Launch, Rng,
    KIB, MIB,
};

const VOLUMES: usize = 4;
const VOLUME_BYTES: u64 = 256 * MIB;
const BRANCHES: [&str; 2] = ["main", "dev"];
const WORKERS: usize = 64;
const WORKERS_PER_BRANCH: usize = WORKERS / (VOLUMES * BRANCHES.len());
const BLOCK_BYTES: u64 = 4096;
/// What one connection owns on its branch. Small enough that the pool stays well under a
/// couple of GiB on disk however long the soak runs (regions, plus `COMMITS_KEPT` commits).
const REGION_BYTES: u64 = 4 * MIB;
const REGION_BLOCKS: u64 = REGION_BYTES / BLOCK_BYTES;
/// Regions are spread over the whole volume, one per slot.
const SLOT_BYTES: u64 = VOLUME_BYTES / WORKERS_PER_BRANCH as u64;
/// Largest request: 256 KiB.
const IO_BLOCKS_MAX: u64 = 64;
/// Requests a pipelined connection sends before reading the replies.
const PIPELINE_DEPTH_MAX: u64 = 8;
/// Commits kept per branch; older ones are deleted (squashed into their children).
const COMMITS_KEPT: usize = 3;
/// Tags kept per volume.
const TAGS_KEPT: usize = 2;
/// How long a delete refused with 409 (a session still closing) is retried.
const CONFLICT_RETRY_TIMEOUT: Duration = Duration::from_secs(30);

const ISCSI_CLIENTS: usize = 2;
const ISCSI_VOLUME_BYTES: u64 = 64 * MIB;
const ISCSI_SLOT_BYTES: u64 = 64 * KIB;
/// 16 MiB written by each iSCSI client.
const ISCSI_SLOTS: u64 = 256;

/// grove's metadata cache, kept small: the default (256 MiB) fills slowly under this load (it
/// holds every metadata page written until the bound evicts one), which would look like growth
/// for minutes; a small bound is reached during the warm-up, so what grows after it is not the
/// cache. It also keeps evictions (dirty pages written back) busy.
const CACHE_SIZE: &str = "16MiB";

const RSS_SLACK_FRACTION: f64 = 0.10;
const RSS_SLACK_MIN_BYTES: u64 = 32 * MIB;
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
const RECLAIM_EVERY_SAMPLES: u64 = 5;

const LATENCY_BUCKETS: usize = 128;

// ---------------------------------------------------------------------------------------------
// Layout and block contents

/// `(volume, branch index, slot)` of a worker: neighbours land on different volumes.
fn layout(worker: usize) -> (usize, usize, usize) {
    (
        worker % VOLUMES,
        (worker / VOLUMES) % BRANCHES.len(),
        worker / (VOLUMES * BRANCHES.len()),
    )
}

fn worker_of(volume: usize, branch: usize, slot: usize) -> usize {
    slot * VOLUMES * BRANCHES.len() + branch * VOLUMES + volume
}

fn gate_index(volume: usize, branch: usize) -> usize {
    volume * BRANCHES.len() + branch
}

fn volume_name(volume: usize) -> String {
    format!("v{volume}")
}

/// The export a worker opens: `vN` for main (as most clients would), `vN@dev` otherwise.
fn export_name(volume: usize, branch: usize) -> String {
    if branch == 0 {
        volume_name(volume)
    } else {
        format!("v{volume}@{}", BRANCHES[branch])
    }
}

fn region_start(slot: usize) -> u64 {
    slot as u64 * SLOT_BYTES
}

/// A write's token: who wrote it (worker + 1; churn writers use ids past the workers) and
/// the writer's sequence number.
fn token(writer: usize, seq: u64) -> u64 {
    ((writer as u64 + 1) << 40) | seq
}

/// The bytes of the block at `offset_bytes` written with `token`: the token, the offset, then
/// a pseudo-random stream seeded by both. Token 0 is a block of zeros.
fn fill_block(token: u64, offset_bytes: u64, out: &mut [u8]) {
    if token == 0 {
        out.fill(0);
        return;
    }
    let mut state = (token ^ offset_bytes.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
    for (index, word) in out.chunks_exact_mut(8).enumerate() {
        let value = match index {
            0 => token,
            1 => offset_bytes,
            _ => {
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                state.wrapping_mul(0x2545_F491_4F6C_DD1D)
            }
        };
        word.copy_from_slice(&value.to_le_bytes());
    }
}

fn blocks_bytes(tokens: &[u64], offset_bytes: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; tokens.len() * BLOCK_BYTES as usize];
    for (index, (block, &token)) in bytes
        .chunks_exact_mut(BLOCK_BYTES as usize)
        .zip(tokens)
        .enumerate()
    {
        fill_block(token, offset_bytes + index as u64 * BLOCK_BYTES, block);
    }
    bytes
}

fn describe_token(token: u64) -> String {
    if token == 0 {
        "zeros".to_string()
    } else {
        format!(
            "write {} of writer {}",
            token & ((1 << 40) - 1),
            (token >> 40) - 1
        )
    }
}

/// What a block that differs from the model holds, as far as can be told.
fn describe_block(bytes: &[u8], offset_bytes: u64) -> String {
    if bytes.iter().all(|&byte| byte == 0) {
        return "zeros".to_string();
    }
    let token = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let offset = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let mut expected = vec![0u8; BLOCK_BYTES as usize];
    fill_block(token, offset, &mut expected);
    if token >> 40 != 0 && expected == bytes {
        let place = if offset == offset_bytes {
            String::new()
        } else {
            format!(", meant for offset {offset}")
        };
        format!("{}{place}", describe_token(token))
    } else {
        format!(
            "unrecognised data (first bytes {:02x?})",
            &bytes[..16.min(bytes.len())]
        )
    }
}

/// Checks `data`, read at `offset_bytes`, against the model's tokens for those blocks.
fn check_blocks(context: &str, tokens: &[u64], offset_bytes: u64, data: &[u8]) {
    assert_eq!(
        data.len(),
        tokens.len() * BLOCK_BYTES as usize,
        "{context}: read of {} bytes at offset {offset_bytes} returned {} bytes",
        tokens.len() * BLOCK_BYTES as usize,
        data.len()
    );
    let mut expected = vec![0u8; BLOCK_BYTES as usize];
    for (index, (actual, &token)) in data
        .chunks_exact(BLOCK_BYTES as usize)
        .zip(tokens)
        .enumerate()
    {
        let block_offset = offset_bytes + index as u64 * BLOCK_BYTES;
        fill_block(token, block_offset, &mut expected);
        if actual != expected.as_slice() {
            let within = actual
                .iter()
                .zip(&expected)
                .position(|(a, e)| a != e)
                .unwrap_or(0);
            panic!(
                "{context}: DATA MISMATCH at offset {} (block at {block_offset}, byte {within}): \
                 expected {}, found {}",
                block_offset + within as u64,
                describe_token(token),
                describe_block(actual, block_offset)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state

struct Soak {
    seed: u64,
    deadline: Instant,
    nbd_port: u16,
    iscsi_port: u16,
    /// Set by any thread that panics: every loop stops.
    failed: AtomicBool,
    /// Workers with an open connection.
    connected: AtomicUsize,
    /// Set once the API and observer threads are done: workers may hang up then.
    may_hang_up: AtomicBool,
    /// One per working branch: a worker holds it shared for each batch, a commit exclusively.
    gates: Vec<RwLock<()>>,
    /// One per worker: the token of every block of its region.
    models: Vec<Mutex<Vec<u64>>>,
    /// What each worker sent, published once its I/O is over (for the session counters).
    finished: Vec<Mutex<Option<IoStats>>>,
}

impl Soak {
    fn running(&self) -> bool {
        !self.failed.load(Ordering::SeqCst) && Instant::now() < self.deadline
    }

    fn model(&self, worker: usize) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.models[worker]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Sleeps up to `duration`, returning early once the run is over.
    fn nap(&self, duration: Duration) {
        let until = Instant::now() + duration;
        while self.running() && Instant::now() < until {
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Marks the run as failed when the thread holding it unwinds.
struct FailOnPanic<'a>(&'a AtomicBool);

impl Drop for FailOnPanic<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

#[derive(Clone)]
struct Latency {
    counts: [u64; LATENCY_BUCKETS],
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            counts: [0; LATENCY_BUCKETS],
        }
    }
}

impl Latency {
    /// Buckets a quarter of a binary order of magnitude wide, in microseconds.
    fn record(&mut self, elapsed: Duration) {
        let micros = elapsed.as_micros().max(1) as f64;
        let bucket = (micros.log2() * 4.0) as usize;
        self.counts[bucket.min(LATENCY_BUCKETS - 1)] += 1;
    }

    fn merge(&mut self, other: &Latency) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts.iter()) {
            *mine += theirs;
        }
    }

    /// The upper edge of the bucket holding quantile `q`, in milliseconds.
    fn quantile_ms(&self, q: f64) -> f64 {
        let total: u64 = self.counts.iter().sum();
        let wanted = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bucket, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= wanted {
                return 2f64.powf((bucket + 1) as f64 / 4.0) / 1000.0;
            }
        }
        0.0
    }
}

#[derive(Clone, Default)]
struct IoStats {
    reads: u64,
    writes: u64,
    fua_writes: u64,
    trims: u64,
    zeroes: u64,
    flushes: u64,
    batches: u64,
    pipelined_batches: u64,
    bytes_read: u64,
    bytes_written: u64,
    bytes_trimmed: u64,
    bytes_zeroed: u64,
    latency: Latency,
}

impl IoStats {
    fn requests(&self) -> u64 {
        self.reads + self.writes + self.trims + self.zeroes + self.flushes
    }

    fn merge(&mut self, other: &IoStats) {
        self.reads += other.reads;
        self.writes += other.writes;
        self.fua_writes += other.fua_writes;
        self.trims += other.trims;
        self.zeroes += other.zeroes;
        self.flushes += other.flushes;
        self.batches += other.batches;
        self.pipelined_batches += other.pipelined_batches;
        self.bytes_read += other.bytes_read;
        self.bytes_written += other.bytes_written;
        self.bytes_trimmed += other.bytes_trimmed;
        self.bytes_zeroed += other.bytes_zeroed;
        self.latency.merge(&other.latency);
    }
}

#[derive(Clone, Default)]
struct ApiStats {
    commits: u64,
    commits_verified_bytes: u64,
    diffs: u64,
    diff_changed_bytes: u64,
    tags_created: u64,
    tags_deleted: u64,
    branches_created: u64,
    branches_deleted: u64,
    commits_deleted: u64,
    conflicts_retried: u64,
}

impl ApiStats {
    fn merge(&mut self, other: &ApiStats) {
        self.commits += other.commits;
        self.commits_verified_bytes += other.commits_verified_bytes;
        self.diffs += other.diffs;
        self.diff_changed_bytes += other.diff_changed_bytes;
        self.tags_created += other.tags_created;
        self.tags_deleted += other.tags_deleted;
        self.branches_created += other.branches_created;
        self.branches_deleted += other.branches_deleted;
        self.commits_deleted += other.commits_deleted;
        self.conflicts_retried += other.conflicts_retried;
    }
}

// ---------------------------------------------------------------------------------------------
// NBD workers

#[derive(Clone, Copy, Debug)]
enum Kind {
    Write { fua: bool },
    Read,
    Trim,
    Zero { no_hole: bool },
    Flush,
}

#[derive(Clone, Copy, Debug)]
struct Op {
    kind: Kind,
    /// First block within the region.
    first: u64,
    blocks: u64,
}

impl Op {
    /// Requests with a payload go first and reads last, so that a pipelined batch never has
    /// the client blocked sending data while the server is blocked sending read data back.
    fn order(&self) -> u8 {
        match self.kind {
            Kind::Write { .. } => 0,
            Kind::Trim | Kind::Zero { .. } | Kind::Flush => 1,
            Kind::Read => 2,
        }
    }
}

fn plan_batch(rng: &mut Rng, depth: u64) -> Vec<Op> {
    let mut ops: Vec<Op> = Vec::new();
    for _ in 0..depth {
        let kind = match rng.below(100) {
            0..=39 => Kind::Write {
                fua: rng.below(8) == 0,
            },
            40..=77 => Kind::Read,
            78..=85 => Kind::Trim,
            86..=95 => Kind::Zero {
                no_hole: rng.below(2) == 0,
            },
            _ => Kind::Flush,
        };
        if matches!(kind, Kind::Flush) {
            ops.push(Op {
                kind,
                first: 0,
                blocks: 0,
            });
            continue;
        }
        // Sizes spread over 4 KiB..256 KiB, small ones more often.
        for _attempt in 0..4 {
            let scale = 1u64 << rng.below(7);
            let blocks = (scale + rng.below(scale)).min(IO_BLOCKS_MAX);
            let first = rng.below(REGION_BLOCKS - blocks + 1);
            let overlaps = ops.iter().any(|other| {
                other.blocks > 0
                    && first < other.first + other.blocks
                    && other.first < first + blocks
            });
            if !overlaps {
                ops.push(Op {
                    kind,
                    first,
                    blocks,
                });
                break;
            }
        }
    }
    ops.sort_by_key(Op::order);
    ops
}

fn nbd_worker(soak: &Soak, worker: usize) -> IoStats {
    let _fail = FailOnPanic(&soak.failed);
    let (volume, branch, slot) = layout(worker);
    let export = export_name(volume, branch);
    let base = region_start(slot);
    let context = format!(
        "worker {worker} on {export} (region {base}..{})",
        base + REGION_BYTES
    );
    let (mut conn, info) = nbd::open(soak.nbd_port, &export);
    assert_eq!(info.size_bytes, VOLUME_BYTES, "{context}: export size");
    assert!(!info.read_only(), "{context}: export is read-only");
    for (flag, name) in [
        (TFLAG_SEND_FLUSH, "FLUSH"),
        (TFLAG_SEND_FUA, "FUA"),
        (TFLAG_SEND_TRIM, "TRIM"),
        (TFLAG_SEND_WRITE_ZEROES, "WRITE_ZEROES"),
    ] {
        assert!(info.flags & flag != 0, "{context}: {name} not offered");
    }
    soak.connected.fetch_add(1, Ordering::SeqCst);
    let pipelined = worker.is_multiple_of(3);
    let mut rng = Rng::new(
        soak.seed
            .wrapping_mul(1_000_003)
            .wrapping_add(worker as u64),
    );
    let mut seq = 0u64;
    let mut stats = IoStats::default();
    let gate = &soak.gates[gate_index(volume, branch)];

    while soak.running() {
        let depth = if pipelined {
            1 + rng.below(PIPELINE_DEPTH_MAX)
        } else {
            1
        };
        let ops = plan_batch(&mut rng, depth);
        let _open = gate.read().unwrap_or_else(PoisonError::into_inner);
        run_batch(
            soak, &mut conn, worker, &context, &ops, &mut seq, &mut stats,
        );
        stats.batches += 1;
        if ops.len() > 1 {
            stats.pipelined_batches += 1;
        }
    }
    if soak.failed.load(Ordering::SeqCst) {
        return stats;
    }

    // The whole region, once more, then a flush and a polite goodbye.
    let model = soak.model(worker).clone();
    for chunk in 0..REGION_BLOCKS / IO_BLOCKS_MAX {
        let first = chunk * IO_BLOCKS_MAX;
        let offset = base + first * BLOCK_BYTES;
        let data = read_ok(&mut conn, offset, IO_BLOCKS_MAX * BLOCK_BYTES, &context);
        check_blocks(
            &format!("{context}, final read"),
            &model[first as usize..(first + IO_BLOCKS_MAX) as usize],
            offset,
            &data,
        );
        stats.reads += 1;
        stats.bytes_read += data.len() as u64;
    }
    let error = conn
        .flush()
        .unwrap_or_else(|e| panic!("{context}: final flush: connection failed: {e}"));
    assert_eq!(
        error, 0,
        "{context}: final flush failed with NBD error {error}"
    );
    stats.flushes += 1;
    *soak.finished[worker]
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(stats.clone());
    while !soak.may_hang_up.load(Ordering::SeqCst) && !soak.failed.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(20));
    }
    conn.disconnect();
    stats
}

fn read_ok(conn: &mut Conn, offset: u64, length: u64, context: &str) -> Vec<u8> {
    conn.read(offset, length as u32)
        .unwrap_or_else(|e| {
            panic!("{context}: read of {length} at {offset}: connection failed: {e}")
        })
        .unwrap_or_else(|error| {
            panic!("{context}: read of {length} at {offset} failed with NBD error {error}")
        })
}

/// Sends every request of the batch, then reads the replies in whatever order they come,
/// checks them, and only then applies the batch to the model.
fn run_batch(
    soak: &Soak,
    conn: &mut Conn,
    worker: usize,
    context: &str,
    ops: &[Op],
    seq: &mut u64,
    stats: &mut IoStats,
) {
    let (_, _, slot) = layout(worker);
    let base = region_start(slot);
    let started = Instant::now();
    // handle -> (op, the token a write put in every block)
    let mut pending: BTreeMap<u64, (Op, u64)> = BTreeMap::new();
    for op in ops {
        let offset = base + op.first * BLOCK_BYTES;
        let length = (op.blocks * BLOCK_BYTES) as u32;
        let describe = |e: std::io::Error| -> String {
            format!("{context}: sending {op:?} at offset {offset}: connection failed: {e}")
        };
        let (handle, written) = match op.kind {
            Kind::Write { fua } => {
                *seq += 1;
                let written = token(worker, *seq);
                let payload = blocks_bytes(&vec![written; op.blocks as usize], offset);
                let flags = if fua { CMD_FLAG_FUA } else { 0 };
                let handle = conn
                    .send_request(REQUEST_MAGIC, flags, CMD_WRITE, offset, length, &payload)
                    .unwrap_or_else(|e| panic!("{}", describe(e)));
                (handle, written)
            }
            Kind::Read => (
                conn.send_request(REQUEST_MAGIC, 0, CMD_READ, offset, length, &[])
                    .unwrap_or_else(|e| panic!("{}", describe(e))),
                0,
            ),
            Kind::Trim => (
                conn.send_request(REQUEST_MAGIC, 0, CMD_TRIM, offset, length, &[])
                    .unwrap_or_else(|e| panic!("{}", describe(e))),
                0,
            ),
            Kind::Zero { no_hole } => {
                let flags = if no_hole { CMD_FLAG_NO_HOLE } else { 0 };
                (
                    conn.send_request(REQUEST_MAGIC, flags, CMD_WRITE_ZEROES, offset, length, &[])
                        .unwrap_or_else(|e| panic!("{}", describe(e))),
                    0,
                )
            }
            Kind::Flush => (
                conn.send_request(REQUEST_MAGIC, 0, CMD_FLUSH, 0, 0, &[])
                    .unwrap_or_else(|e| panic!("{}", describe(e))),
                0,
            ),
        };
        pending.insert(handle, (*op, written));
    }
    let mut done: Vec<(Op, u64)> = Vec::with_capacity(ops.len());
    while !pending.is_empty() {
        let (error, handle) = conn.any_simple_reply().unwrap_or_else(|e| {
            panic!(
                "{context}: waiting for {} replies of a batch of {}: connection failed: {e}",
                pending.len(),
                ops.len()
            )
        });
        let (op, written) = pending
            .remove(&handle)
            .unwrap_or_else(|| panic!("{context}: reply for unknown handle {handle}"));
        let offset = base + op.first * BLOCK_BYTES;
        assert_eq!(
            error,
            0,
            "{context}: {op:?} at offset {offset} ({} bytes) failed with NBD error {error}",
            op.blocks * BLOCK_BYTES
        );
        stats.latency.record(started.elapsed());
        let length = op.blocks * BLOCK_BYTES;
        match op.kind {
            Kind::Read => {
                let data = conn.recv_exact(length as usize).unwrap_or_else(|e| {
                    panic!("{context}: read data at {offset}: connection failed: {e}")
                });
                let model = soak.model(worker);
                check_blocks(
                    context,
                    &model[op.first as usize..(op.first + op.blocks) as usize],
                    offset,
                    &data,
                );
                stats.reads += 1;
                stats.bytes_read += length;
            }
            Kind::Write { fua } => {
                stats.writes += 1;
                stats.fua_writes += u64::from(fua);
                stats.bytes_written += length;
            }
            Kind::Trim => {
                stats.trims += 1;
                stats.bytes_trimmed += length;
            }
            Kind::Zero { .. } => {
                stats.zeroes += 1;
                stats.bytes_zeroed += length;
            }
            Kind::Flush => stats.flushes += 1,
        }
        done.push((op, written));
    }
    let mut model = soak.model(worker);
    for (op, written) in done {
        let range = op.first as usize..(op.first + op.blocks) as usize;
        match op.kind {
            Kind::Write { .. } => model[range].fill(written),
            Kind::Trim | Kind::Zero { .. } => model[range].fill(0),
            Kind::Read | Kind::Flush => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// API threads

struct CommitRecord {
    id: String,
    /// The models of the branch's workers at the commit, by slot.
    images: Vec<Vec<u64>>,
    tag: Option<String>,
}

/// Reads `ranges` (slot, first block, blocks) of a read-only export and checks them.
fn verify_export(
    nbd_port: u16,
    export: &str,
    images: &[Vec<u64>],
    ranges: &[(usize, u64, u64)],
    read_only: bool,
) -> u64 {
    let context = format!("reading {export}");
    let (mut conn, info) = nbd::open(nbd_port, export);
    assert_eq!(info.read_only(), read_only, "{context}: read-only flag");
    let mut bytes = 0;
    for &(slot, first, blocks) in ranges {
        let mut block = first;
        while block < first + blocks {
            let count = IO_BLOCKS_MAX.min(first + blocks - block);
            let offset = region_start(slot) + block * BLOCK_BYTES;
            let data = read_ok(&mut conn, offset, count * BLOCK_BYTES, &context);
            check_blocks(
                &format!("{context} (slot {slot}, worker {})", slot),
                &images[slot][block as usize..(block + count) as usize],
                offset,
                &data,
            );
            bytes += data.len() as u64;
            block += count;
        }
    }
    conn.disconnect();
    bytes
}

/// A random 256 KiB piece of every slot.
fn spot_ranges(rng: &mut Rng) -> Vec<(usize, u64, u64)> {
    (0..WORKERS_PER_BRANCH)
        .map(|slot| {
            (
                slot,
                rng.below(REGION_BLOCKS - IO_BLOCKS_MAX + 1),
                IO_BLOCKS_MAX,
            )
        })
        .collect()
}

/// Commits a branch while its writers wait at their gate, so the commit holds exactly the
/// models' state.
fn commit_quiescent(
    soak: &Soak,
    grove: &Grove,
    volume: usize,
    branch: usize,
    message: &str,
) -> CommitRecord {
    let gate = soak.gates[gate_index(volume, branch)]
        .write()
        .unwrap_or_else(PoisonError::into_inner);
    let images: Vec<Vec<u64>> = (0..WORKERS_PER_BRANCH)
        .map(|slot| soak.model(worker_of(volume, branch, slot)).clone())
        .collect();
    let reply = grove.http(
        "POST",
        &format!(
            "/v1/volumes/{}/branches/{}/commits",
            volume_name(volume),
            BRANCHES[branch]
        ),
        Some(&json!({ "message": message, "author": "soak" }).to_string()),
    );
    drop(gate);
    assert_eq!(
        reply.status, 201,
        "commit of v{volume}@{}: {reply:?}",
        BRANCHES[branch]
    );
    let id = reply.json()["id"]
        .as_str()
        .unwrap_or_else(|| panic!("commit answer without id: {reply:?}"))
        .to_string();
    CommitRecord {
        id,
        images,
        tag: None,
    }
}

/// The diff between two commits of a branch covers every block whose content changed
/// between their images, and nothing outside the branch's regions.
fn check_diff(
    grove: &Grove,
    volume: usize,
    branch: usize,
    from: &CommitRecord,
    to: &CommitRecord,
) -> u64 {
    let context = format!(
        "diff of v{volume}@{} from {} to {}",
        BRANCHES[branch], from.id, to.id
    );
    let reply = grove.http(
        "GET",
        &format!(
            "/v1/volumes/{}/diff?from={}&to={}&limit=1000000",
            volume_name(volume),
            from.id,
            to.id
        ),
        None,
    );
    assert_eq!(reply.status, 200, "{context}: {reply:?}");
    let report = reply.json();
    assert_eq!(
        report["extents_truncated"],
        json!(false),
        "{context}: {report}"
    );
    let changed_bytes = report["changed_bytes"].as_u64().expect("changed_bytes");
    let changed_blocks = report["changed_blocks"].as_u64().expect("changed_blocks");
    assert_eq!(
        changed_bytes,
        changed_blocks * BLOCK_BYTES,
        "{context}: {report}"
    );
    let extents: Vec<(u64, u64)> = report["extents"]
        .as_array()
        .expect("extents")
        .iter()
        .map(|extent| {
            let offset = extent["offset_bytes"].as_u64().expect("offset_bytes");
            (
                offset,
                offset + extent["len_bytes"].as_u64().expect("len_bytes"),
            )
        })
        .collect();
    let listed: u64 = extents.iter().map(|(start, end)| end - start).sum();
    assert_eq!(
        listed, changed_bytes,
        "{context}: extents do not add up: {report}"
    );
    for &(start, end) in &extents {
        let inside = (0..WORKERS_PER_BRANCH)
            .any(|slot| start >= region_start(slot) && end <= region_start(slot) + REGION_BYTES);
        assert!(
            inside,
            "{context}: changed range {start}..{end} lies outside every region written on the branch"
        );
    }
    let mut must_change = 0u64;
    for slot in 0..WORKERS_PER_BRANCH {
        for block in 0..REGION_BLOCKS as usize {
            if from.images[slot][block] == to.images[slot][block] {
                continue;
            }
            must_change += 1;
            let offset = region_start(slot) + block as u64 * BLOCK_BYTES;
            let index = extents.partition_point(|&(_, end)| end <= offset);
            assert!(
                index < extents.len() && extents[index].0 <= offset,
                "{context}: block at offset {offset} changed ({} -> {}) but the diff leaves it out",
                describe_token(from.images[slot][block]),
                describe_token(to.images[slot][block])
            );
        }
    }
    assert!(
        changed_blocks >= must_change,
        "{context}: {changed_blocks} blocks reported, {must_change} known to differ"
    );
    changed_bytes
}

/// Deletes through the API, retrying while a session that just closed still holds the target.
fn delete_retrying(grove: &Grove, path: &str, stats: &mut ApiStats) {
    let deadline = Instant::now() + CONFLICT_RETRY_TIMEOUT;
    loop {
        let reply = grove.http("DELETE", path, None);
        match reply.status {
            204 => return,
            409 if Instant::now() < deadline => {
                stats.conflicts_retried += 1;
                thread::sleep(Duration::from_millis(50));
            }
            _ => panic!("DELETE {path}: {reply:?}"),
        }
    }
}

/// One volume's API traffic: commits of its two branches in turn (each checked through its
/// export and against the previous commit's diff), tags, short-lived branches written over
/// NBD, and old commits deleted (squashed) with the next one checked again.
fn api_worker(soak: &Soak, grove: &Grove, volume: usize) -> ApiStats {
    let _fail = FailOnPanic(&soak.failed);
    let vol = volume_name(volume);
    let mut rng = Rng::new(
        soak.seed
            .wrapping_mul(7_777)
            .wrapping_add(volume as u64 + 101),
    );
    let mut stats = ApiStats::default();
    let mut histories: Vec<VecDeque<CommitRecord>> =
        (0..BRANCHES.len()).map(|_| VecDeque::new()).collect();
    let mut tags: VecDeque<(usize, String)> = VecDeque::new();
    let mut cycle = 0u64;
    // Let the writers get going before the first commit.
    soak.nap(Duration::from_millis(300 + 200 * volume as u64));
    while soak.running() {
        cycle += 1;
        let branch = (cycle % BRANCHES.len() as u64) as usize;
        let record = commit_quiescent(soak, grove, volume, branch, &format!("soak cycle {cycle}"));
        stats.commits += 1;
        let commit_export = format!("{vol}@{}", record.id);

        // The commit reads back exactly: one region whole, a piece of every other one.
        let full = rng.below(WORKERS_PER_BRANCH as u64) as usize;
        let mut ranges = spot_ranges(&mut rng);
        ranges.push((full, 0, REGION_BLOCKS));
        stats.commits_verified_bytes +=
            verify_export(soak.nbd_port, &commit_export, &record.images, &ranges, true);

        if let Some(previous) = histories[branch].back() {
            stats.diff_changed_bytes += check_diff(grove, volume, branch, previous, &record);
            stats.diffs += 1;
        }
        histories[branch].push_back(record);

        if cycle.is_multiple_of(3) {
            let name = format!("soak-{cycle}");
            let record = histories[branch].back_mut().expect("just pushed");
            let reply = grove.http(
                "POST",
                &format!("/v1/volumes/{vol}/tags"),
                Some(&json!({ "name": name, "ref": record.id }).to_string()),
            );
            assert_eq!(reply.status, 201, "tag {name} on {}: {reply:?}", record.id);
            record.tag = Some(name.clone());
            stats.tags_created += 1;
            let ranges = spot_ranges(&mut rng);
            stats.commits_verified_bytes += verify_export(
                soak.nbd_port,
                &format!("{vol}@{name}"),
                &record.images,
                &ranges,
                true,
            );
            tags.push_back((branch, name));
            if tags.len() > TAGS_KEPT {
                let (tag_branch, old) = tags.pop_front().expect("more than kept");
                delete_retrying(grove, &format!("/v1/volumes/{vol}/tags/{old}"), &mut stats);
                stats.tags_deleted += 1;
                for record in histories[tag_branch].iter_mut() {
                    if record.tag.as_deref() == Some(old.as_str()) {
                        record.tag = None;
                    }
                }
            }
        }

        if cycle.is_multiple_of(4) {
            churn_branch(
                soak,
                grove,
                volume,
                branch,
                cycle,
                &histories[branch],
                &mut rng,
                &mut stats,
            );
        }

        while histories[branch].len() > COMMITS_KEPT {
            let old = histories[branch].pop_front().expect("more than kept");
            if let Some(tag) = &old.tag {
                delete_retrying(grove, &format!("/v1/volumes/{vol}/tags/{tag}"), &mut stats);
                stats.tags_deleted += 1;
                tags.retain(|(_, name)| name != tag);
            }
            delete_retrying(
                grove,
                &format!("/v1/volumes/{vol}/commits/{}", old.id),
                &mut stats,
            );
            stats.commits_deleted += 1;
            // The oldest kept commit took the deleted one's changes: it must read the same.
            let next = histories[branch].front().expect("kept commits");
            let ranges = spot_ranges(&mut rng);
            stats.commits_verified_bytes += verify_export(
                soak.nbd_port,
                &format!("{vol}@{}", next.id),
                &next.images,
                &ranges,
                true,
            );
        }
    }
    stats
}

/// A branch made from a kept commit, read and written over NBD, then deleted.
#[allow(clippy::too_many_arguments)]
fn churn_branch(
    soak: &Soak,
    grove: &Grove,
    volume: usize,
    branch: usize,
    cycle: u64,
    history: &VecDeque<CommitRecord>,
    rng: &mut Rng,
    stats: &mut ApiStats,
) {
    let vol = volume_name(volume);
    let base = &history[rng.below(history.len() as u64) as usize];
    let name = format!("churn-{cycle}");
    let reply = grove.http(
        "POST",
        &format!("/v1/volumes/{vol}/branches"),
        Some(&json!({ "name": name, "from": base.id }).to_string()),
    );
    assert_eq!(
        reply.status, 201,
        "branch {name} from {}: {reply:?}",
        base.id
    );
    stats.branches_created += 1;
    let export = format!("{vol}@{name}");
    let context = format!("{export} (from {} of {})", base.id, BRANCHES[branch]);
    let (mut conn, info) = nbd::open(soak.nbd_port, &export);
    assert!(
        !info.read_only(),
        "{context}: a new branch must be writable"
    );
    let slot = rng.below(WORKERS_PER_BRANCH as u64) as usize;
    let mut image = base.images[slot].clone();
    let first = rng.below(REGION_BLOCKS - IO_BLOCKS_MAX + 1);
    let offset = region_start(slot) + first * BLOCK_BYTES;
    let range = first as usize..(first + IO_BLOCKS_MAX) as usize;
    let data = read_ok(&mut conn, offset, IO_BLOCKS_MAX * BLOCK_BYTES, &context);
    check_blocks(&context, &image[range.clone()], offset, &data);
    // A write of its own, read back, over half the piece.
    let written = token(WORKERS + volume, cycle);
    let half = IO_BLOCKS_MAX / 2;
    image[first as usize..(first + half) as usize].fill(written);
    let payload = blocks_bytes(&image[first as usize..(first + half) as usize], offset);
    let error = conn
        .write(offset, &payload, 0)
        .unwrap_or_else(|e| panic!("{context}: write: connection failed: {e}"));
    assert_eq!(
        error, 0,
        "{context}: write at {offset} failed with NBD error {error}"
    );
    let data = read_ok(&mut conn, offset, IO_BLOCKS_MAX * BLOCK_BYTES, &context);
    check_blocks(
        &format!("{context} after its write"),
        &image[range],
        offset,
        &data,
    );
    conn.disconnect();
    delete_retrying(grove, &format!("/v1/volumes/{vol}/branches/{name}"), stats);
    stats.branches_deleted += 1;
}

// ---------------------------------------------------------------------------------------------
// Observer, RSS sampler, iSCSI clients

#[derive(Default)]
struct ObserverStats {
    session_checks: u64,
    metrics_scrapes: u64,
    reclaims: u64,
    pool_used_bytes_max: u64,
}

/// Session counts per working export, from `grove sessions --json`.
fn sessions_per_export(grove: &Grove) -> (BTreeMap<String, u64>, Value) {
    let sessions = grove.cli_json(&["sessions"]);
    let mut counts = BTreeMap::new();
    for session in sessions.as_array().expect("sessions are an array") {
        if let Some(export) = session["export"].as_str() {
            *counts.entry(export.to_string()).or_insert(0) += 1;
        }
    }
    (counts, sessions)
}

fn observer(soak: &Soak, grove: &Grove) -> ObserverStats {
    let _fail = FailOnPanic(&soak.failed);
    let mut stats = ObserverStats::default();
    let mut round = 0u64;
    while soak.running() {
        soak.nap(SAMPLE_INTERVAL);
        if !soak.running() {
            break;
        }
        round += 1;
        if soak.connected.load(Ordering::SeqCst) == WORKERS {
            let (counts, sessions) = sessions_per_export(grove);
            for volume in 0..VOLUMES {
                for branch in 0..BRANCHES.len() {
                    let export = export_name(volume, branch);
                    assert_eq!(
                        counts.get(&export).copied().unwrap_or(0),
                        WORKERS_PER_BRANCH as u64,
                        "grove sessions should list {WORKERS_PER_BRANCH} sessions on {export}: {sessions}"
                    );
                }
            }
            stats.session_checks += 1;
        }
        let reply = grove.http("GET", "/metrics", None);
        assert_eq!(reply.status, 200, "/metrics: {reply:?}");
        assert_eq!(
            metric_sample(&reply.body, "grove_pool_failed", &[]),
            Some(0.0),
            "the pool reports failure"
        );
        let nbd_sessions =
            metric_sample(&reply.body, "grove_sessions", &[("protocol", "nbd")]).unwrap_or(0.0);
        if soak.connected.load(Ordering::SeqCst) == WORKERS {
            assert!(
                nbd_sessions >= WORKERS as f64,
                "grove_sessions{{protocol=\"nbd\"}} is {nbd_sessions} with {WORKERS} workers connected"
            );
        }
        stats.metrics_scrapes += 1;
        if round.is_multiple_of(RECLAIM_EVERY_SAMPLES) {
            let reply = grove.http("POST", "/v1/pool/reclaim", None);
            assert_eq!(reply.status, 200, "reclaim: {reply:?}");
            stats.reclaims += 1;
            let pool = grove.http("GET", "/v1/pool", None);
            assert_eq!(pool.status, 200, "GET /v1/pool: {pool:?}");
            let used = pool.json()["used_bytes"].as_u64().unwrap_or(0);
            stats.pool_used_bytes_max = stats.pool_used_bytes_max.max(used);
        }
    }
    stats
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("bad VmRSS line {line:?}"));
    kib * 1024
}

fn sample_rss(soak: &Soak, pid: u32) -> Vec<u64> {
    let _fail = FailOnPanic(&soak.failed);
    let started = Instant::now();
    let mut samples = Vec::new();
    while soak.running() {
        samples.push(rss_bytes(pid));
        let next = SAMPLE_INTERVAL * samples.len() as u32;
        soak.nap(next.saturating_sub(started.elapsed()));
    }
    samples
}

fn iscsi_uri(soak: &Soak, client: usize) -> String {
    format!(
        "iscsi://127.0.0.1:{}/iqn.2026-11.io.grove:i{client}/0",
        soak.iscsi_port
    )
}

/// qemu-io over iSCSI on its own volume, in rounds: a few pattern writes (or zero writes) of
/// 64 KiB slots, then reads of those and of other slots against the model.
fn iscsi_client(soak: &Soak, client: usize) -> (u64, u64, Vec<u8>) {
    let _fail = FailOnPanic(&soak.failed);
    let uri = iscsi_uri(soak, client);
    let mut rng = Rng::new(soak.seed.wrapping_mul(31).wrapping_add(client as u64 + 500));
    let mut patterns = vec![0u8; ISCSI_SLOTS as usize];
    let (mut rounds, mut bytes) = (0u64, 0u64);
    while soak.running() {
        let mut commands = Vec::new();
        let mut touched = Vec::new();
        for _ in 0..3 {
            let slots = 1 + rng.below(4);
            let first = rng.below(ISCSI_SLOTS - slots + 1);
            let pattern = if rng.below(8) == 0 {
                0
            } else {
                1 + rng.below(255) as u8
            };
            let (offset, length) = (first * ISCSI_SLOT_BYTES, slots * ISCSI_SLOT_BYTES);
            if pattern == 0 {
                commands.push(format!("write -z {offset} {length}"));
            } else {
                commands.push(format!("write -P 0x{pattern:02x} {offset} {length}"));
            }
            for slot in first..first + slots {
                patterns[slot as usize] = pattern;
                touched.push(slot);
            }
            bytes += length;
        }
        for _ in 0..3 {
            touched.push(rng.below(ISCSI_SLOTS));
        }
        for &slot in &touched {
            commands.push(format!(
                "read -P 0x{:02x} {} {ISCSI_SLOT_BYTES}",
                patterns[slot as usize],
                slot * ISCSI_SLOT_BYTES
            ));
        }
        let out = qemu_io(&uri, &commands, false);
        let text = out.combined();
        let reads = text
            .lines()
            .filter(|line| line.starts_with("read "))
            .count();
        let writes = text
            .lines()
            .filter(|line| line.starts_with("wrote "))
            .count();
        assert!(
            out.success()
                && !text.contains("failed")
                && !text.contains("error")
                && reads == touched.len()
                && writes == 3,
            "iSCSI client {client} round {rounds} on {uri}: {reads} of {} reads and {writes} of 3 writes done\n{}",
            touched.len(),
            out.report()
        );
        rounds += 1;
    }
    if soak.failed.load(Ordering::SeqCst) {
        return (rounds, bytes, patterns);
    }
    // Every slot, at the end.
    let commands: Vec<String> = (0..ISCSI_SLOTS)
        .map(|slot| {
            format!(
                "read -P 0x{:02x} {} {ISCSI_SLOT_BYTES}",
                patterns[slot as usize],
                slot * ISCSI_SLOT_BYTES
            )
        })
        .collect();
    let out = qemu_io(&uri, &commands, true);
    let text = out.combined();
    let reads = text
        .lines()
        .filter(|line| line.starts_with("read "))
        .count();
    assert!(
        out.success() && !text.contains("failed") && reads == ISCSI_SLOTS as usize,
        "iSCSI client {client}: final read of every slot\n{}",
        out.report()
    );
    (rounds, bytes, patterns)
}

fn require_iscsi_tools() {
    require_tool("qemu-io", "qemu-utils");
    let driver = std::path::Path::new("/usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so").exists()
        || run(
            Command::new("qemu-img").arg("--help"),
            Duration::from_secs(60),
        )
        .stdout
        .contains("iscsi");
    assert!(
        driver,
        "qemu's iSCSI driver is missing: install qemu-block-extra at the qemu-utils version \
         (scripts/test.sh does this when run as root)"
    );
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        text.to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "(non-text panic)".to_string()
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|value| {
            value
                .parse()
                .unwrap_or_else(|_| panic!("{name}={value:?} is not a number"))
        })
        .unwrap_or(default)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// The highest RSS of the last quarter against the highest of the second quarter (the first
/// quarter is warm-up).
fn check_rss_flat(samples: &[u64]) -> String {
    let series: Vec<String> = samples.iter().map(|&b| format!("{:.0}", mib(b))).collect();
    eprintln!("RSS series (MiB, one a second): {}", series.join(" "));
    let quarter = samples.len() / 4;
    if quarter < 2 {
        return format!("only {} RSS samples: too few to judge", samples.len());
    }
    let second_max = *samples[quarter..2 * quarter].iter().max().expect("samples");
    let last_max = *samples[samples.len() - quarter..]
        .iter()
        .max()
        .expect("samples");
    let slack = ((second_max as f64 * RSS_SLACK_FRACTION) as u64).max(RSS_SLACK_MIN_BYTES);
    let summary = format!(
        "RSS: first {:.0} MiB, second-quarter max {:.0} MiB, last-quarter max {:.0} MiB, \
         overall max {:.0} MiB (allowed up to {:.0} MiB)",
        mib(samples[0]),
        mib(second_max),
        mib(last_max),
        mib(*samples.iter().max().expect("samples")),
        mib(second_max + slack)
    );
    assert!(
        last_max <= second_max + slack,
        "grove's memory grows under steady load: {summary}\nseries (MiB): {}",
        series.join(" ")
    );
    summary
}

/// Reads every worker's region on its branch head and checks it against the final models.
fn verify_all_heads(soak: &Soak, nbd_port: u16) {
    thread::scope(|scope| {
        let handles: Vec<_> = (0..VOLUMES * BRANCHES.len())
            .map(|index| {
                scope.spawn(move || {
                    let (volume, branch) = (index / BRANCHES.len(), index % BRANCHES.len());
                    let images: Vec<Vec<u64>> = (0..WORKERS_PER_BRANCH)
                        .map(|slot| soak.model(worker_of(volume, branch, slot)).clone())
                        .collect();
                    let ranges: Vec<(usize, u64, u64)> = (0..WORKERS_PER_BRANCH)
                        .map(|slot| (slot, 0, REGION_BLOCKS))
                        .collect();
                    let export = export_name(volume, branch);
                    verify_export(nbd_port, &export, &images, &ranges, false);
                })
            })
            .collect();
        for handle in handles {
            if let Err(payload) = handle.join() {
                panic!("after the restart: {}", panic_message(&*payload));
            }
        }
    });
}

#[test]
fn sixty_four_connections_with_api_traffic_stay_correct_and_flat() {
    require_nbd_tools();
    require_iscsi_tools();
    let seconds = env_u64("GROVE_SOAK_SECONDS", 20);
    let seed = env_u64("GROVE_SOAK_SEED", 1);
    eprintln!(
        "soak: {seconds} s, seed {seed}, {WORKERS} NBD connections, {ISCSI_CLIENTS} iSCSI clients"
    );
    let mut grove = Grove::start_with(Launch::Flags, &["--cache-size", CACHE_SIZE]);
    for volume in 0..VOLUMES {
        grove.create_volume(&volume_name(volume), &VOLUME_BYTES.to_string());
        for branch in &BRANCHES[1..] {
            grove.cli_ok(&["branch", "create", &volume_name(volume), branch]);
        }
    }
    for client in 0..ISCSI_CLIENTS {
        grove.create_volume(&format!("i{client}"), &ISCSI_VOLUME_BYTES.to_string());
    }

    let soak = Soak {
        seed,
        deadline: Instant::now() + Duration::from_secs(seconds),
        nbd_port: grove.nbd_port,
        iscsi_port: grove.iscsi_port,
        failed: AtomicBool::new(false),
        connected: AtomicUsize::new(0),
        may_hang_up: AtomicBool::new(false),
        gates: (0..VOLUMES * BRANCHES.len())
            .map(|_| RwLock::new(()))
            .collect(),
        models: (0..WORKERS)
            .map(|_| Mutex::new(vec![0u64; REGION_BLOCKS as usize]))
            .collect(),
        finished: (0..WORKERS).map(|_| Mutex::new(None)).collect(),
    };
    let pid = grove.pid();
    let started = Instant::now();
    let mut io = IoStats::default();
    let mut api = ApiStats::default();
    let mut observed = ObserverStats::default();
    let mut rss = Vec::new();
    let (mut iscsi_rounds, mut iscsi_bytes) = (0u64, 0u64);
    let mut counters_checked = false;
    let mut iscsi_patterns: Vec<Vec<u8>> = Vec::new();

    thread::scope(|scope| {
        let soak = &soak;
        let grove = &grove;
        let workers: Vec<_> = (0..WORKERS)
            .map(|worker| scope.spawn(move || nbd_worker(soak, worker)))
            .collect();
        let api_threads: Vec<_> = (0..VOLUMES)
            .map(|volume| scope.spawn(move || api_worker(soak, grove, volume)))
            .collect();
        let iscsi_threads: Vec<_> = (0..ISCSI_CLIENTS)
            .map(|client| scope.spawn(move || iscsi_client(soak, client)))
            .collect();
        let observer_thread = scope.spawn(move || observer(soak, grove));
        let sampler = scope.spawn(move || sample_rss(soak, pid));

        let mut failures: Vec<String> = Vec::new();
        let mut note = |what: String, payload: Box<dyn std::any::Any + Send>| {
            failures.push(format!("{what}: {}", panic_message(&*payload)));
        };
        for (volume, handle) in api_threads.into_iter().enumerate() {
            match handle.join() {
                Ok(stats) => api.merge(&stats),
                Err(payload) => note(format!("API thread of v{volume}"), payload),
            }
        }
        match observer_thread.join() {
            Ok(stats) => observed = stats,
            Err(payload) => note("observer".into(), payload),
        }
        match sampler.join() {
            Ok(samples) => rss = samples,
            Err(payload) => note("RSS sampler".into(), payload),
        }
        for (client, handle) in iscsi_threads.into_iter().enumerate() {
            match handle.join() {
                Ok((rounds, bytes, patterns)) => {
                    iscsi_rounds += rounds;
                    iscsi_bytes += bytes;
                    iscsi_patterns.push(patterns);
                }
                Err(payload) => note(format!("iSCSI client {client}"), payload),
            }
        }
        // Once every worker is done with I/O (and still connected), the sessions' counters
        // must match what the workers sent, request for request.
        let wait_until = Instant::now() + Duration::from_secs(120);
        while !soak.failed.load(Ordering::SeqCst) && Instant::now() < wait_until {
            let done = soak
                .finished
                .iter()
                .filter(|slot| {
                    slot.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .is_some()
                })
                .count();
            if done == WORKERS {
                check_session_counters(grove, soak);
                counters_checked = true;
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        soak.may_hang_up.store(true, Ordering::SeqCst);
        for (worker, handle) in workers.into_iter().enumerate() {
            match handle.join() {
                Ok(stats) => io.merge(&stats),
                Err(payload) => note(format!("worker {worker}"), payload),
            }
        }
        if !failures.is_empty() {
            panic!(
                "the soak failed (seed {seed}); {} thread(s) failed, first failure first:\n{}",
                failures.len(),
                failures.join("\n")
            );
        }
    });
    assert!(
        counters_checked,
        "the workers did not finish their I/O within 120 s of the end"
    );
    let load_time = started.elapsed();

    let rss_summary = check_rss_flat(&rss);
    grove.wait_no_sessions();
    grove.assert_healthy();

    // A graceful stop, a clean pool, and everything back after a restart.
    let status = grove.terminate();
    assert!(
        status.success(),
        "grove exited with {status}\n{}",
        grove.log_text()
    );
    // The server's own account: no error, no panic; warnings are shown.
    let log = grove.log_text();
    let warnings: Vec<&str> = log.lines().filter(|line| line.contains(" WARN ")).collect();
    if !warnings.is_empty() {
        eprintln!(
            "{} warnings in the grove log, the first ones:\n{}",
            warnings.len(),
            warnings[..warnings.len().min(10)].join("\n")
        );
    }
    let errors: Vec<&str> = log
        .lines()
        .filter(|line| line.contains(" ERROR ") || line.contains("panicked"))
        .collect();
    assert!(
        errors.is_empty(),
        "the grove log has {} error lines, the first ones:\n{}",
        errors.len(),
        errors[..errors.len().min(20)].join("\n")
    );
    let fsck = run(
        Command::new(grove_bin())
            .arg("fsck")
            .arg("--data-dir")
            .arg(&grove.data_dir),
        Duration::from_secs(300),
    );
    fsck.assert_success();
    assert!(fsck.stdout.contains("clean"), "{}", fsck.report());
    grove.spawn();
    verify_all_heads(&soak, grove.nbd_port);
    for (client, patterns) in iscsi_patterns.iter().enumerate() {
        let commands: Vec<String> = patterns
            .iter()
            .enumerate()
            .map(|(slot, pattern)| {
                format!(
                    "read -P 0x{pattern:02x} {} {ISCSI_SLOT_BYTES}",
                    slot as u64 * ISCSI_SLOT_BYTES
                )
            })
            .collect();
        let out = qemu_io(&grove.unix_uri(&format!("i{client}")), &commands, true);
        let text = out.combined();
        let reads = text
            .lines()
            .filter(|line| line.starts_with("read "))
            .count();
        assert!(
            out.success() && !text.contains("failed") && reads == ISCSI_SLOTS as usize,
            "iSCSI volume i{client} after the restart\n{}",
            out.report()
        );
    }
    let status = grove.terminate();
    assert!(
        status.success(),
        "grove exited with {status} after the restart"
    );

    let seconds_run = load_time.as_secs_f64();
    eprintln!(
        "soak summary (seed {seed}, {seconds_run:.0} s of load):\n\
         NBD: {} requests in {} batches ({} pipelined): {} reads ({:.0} MiB, all verified), \
         {} writes ({:.0} MiB, {} FUA), {} trims ({:.0} MiB), {} write-zeroes ({:.0} MiB), {} flushes; \
         {:.0} requests/s; latency p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms\n\
         API: {} commits ({:.0} MiB read back from commit exports), {} diffs ({:.0} MiB changed), \
         {} tags created / {} deleted, {} branches created / {} deleted, {} commits deleted, \
         {} deletes retried on 409\n\
         observer: {} session listings, {} /metrics scrapes, {} reclaims, pool used at most {:.0} MiB\n\
         iSCSI: {iscsi_rounds} qemu-io rounds, {:.0} MiB written and verified\n\
         {rss_summary}",
        io.requests(),
        io.batches,
        io.pipelined_batches,
        io.reads,
        mib(io.bytes_read),
        io.writes,
        mib(io.bytes_written),
        io.fua_writes,
        io.trims,
        mib(io.bytes_trimmed),
        io.zeroes,
        mib(io.bytes_zeroed),
        io.flushes,
        io.requests() as f64 / seconds_run,
        io.latency.quantile_ms(0.5),
        io.latency.quantile_ms(0.99),
        io.latency.quantile_ms(0.999),
        api.commits,
        mib(api.commits_verified_bytes),
        api.diffs,
        mib(api.diff_changed_bytes),
        api.tags_created,
        api.tags_deleted,
        api.branches_created,
        api.branches_deleted,
        api.commits_deleted,
        api.conflicts_retried,
        observed.session_checks,
        observed.metrics_scrapes,
        observed.reclaims,
        mib(observed.pool_used_bytes_max),
        mib(iscsi_bytes),
    );
}

/// The per-session counters of `grove sessions --json` equal, export by export, what the
/// workers on it sent.
fn check_session_counters(grove: &Grove, soak: &Soak) {
    let sessions = grove.cli_json(&["sessions"]);
    for volume in 0..VOLUMES {
        for branch in 0..BRANCHES.len() {
            let export = export_name(volume, branch);
            let mut sent = IoStats::default();
            for slot in 0..WORKERS_PER_BRANCH {
                let worker = worker_of(volume, branch, slot);
                let finished = soak.finished[worker]
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                sent.merge(finished.as_ref().expect("every worker finished"));
            }
            let mut counted = BTreeMap::<&str, u64>::new();
            for session in sessions.as_array().expect("sessions are an array") {
                if session["export"].as_str() != Some(export.as_str()) {
                    continue;
                }
                for key in [
                    "read_ops",
                    "read_bytes",
                    "write_ops",
                    "write_bytes",
                    "zero_ops",
                    "zero_bytes",
                    "trim_ops",
                    "trim_bytes",
                    "flush_ops",
                ] {
                    *counted.entry(key).or_insert(0) +=
                        session["counters"][key].as_u64().unwrap_or(0);
                }
            }
            let expected = BTreeMap::from([
                ("read_ops", sent.reads),
                ("read_bytes", sent.bytes_read),
                ("write_ops", sent.writes),
                ("write_bytes", sent.bytes_written),
                ("zero_ops", sent.zeroes),
                ("zero_bytes", sent.bytes_zeroed),
                ("trim_ops", sent.trims),
                ("trim_bytes", sent.bytes_trimmed),
                ("flush_ops", sent.flushes),
            ]);
            assert_eq!(
                counted, expected,
                "session counters on {export} differ from what its {WORKERS_PER_BRANCH} workers sent"
            );
        }
    }
}
