//! Workloads 6 (versioning operations) and 7 (memory).
//!
//! 6 times grove's commit, branch and tag creation through its HTTP API, client-side over one
//! keep-alive connection, on a 1 GiB volume, on a 1 TiB sparse volume and after thousands of
//! commits, against `qemu-img snapshot -c` on qcow2 images holding the same data; times the
//! diff of two commits a given number of blocks apart against reading both versions of the
//! qcow2 chain in full (what a qcow2 user without dirty bitmaps must do); and takes workload
//! 1's p99 latency while commits are deleted, against a run before. 7 samples grove's resident
//! memory while it serves workload 1 on the 1 TiB volume, against the configured metadata cache.
//!
//! Targets are reported next to the figures, never asserted: this machine is shared and noisy.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::nbd_writer::{NbdWriter, BLOCK_BYTES};
use crate::{
    fio, fio_command, fio_uri, parse_fio_output, send_signal, snapshot, start_grove,
    start_qemu_nbd, start_qemu_nbd_with, Job, Server,
};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// Blocks written over NBD before each timed commit, so that every commit has changes.
const BLOCKS_PER_COMMIT_SAMPLE: usize = 4;

/// How much of everything to do: the specification's figures, or a small smoke test.
#[derive(Serialize, Clone, Copy)]
pub struct Scale {
    /// Timed requests per operation and volume.
    pub samples: usize,
    /// Commits made before the "after N commits" samples (one block written before each).
    pub history_commits: usize,
    /// Of those, how many are deleted while workload 1 runs.
    pub deletes: usize,
    /// Blocks written (4 KiB, random, each once) between the two commits diffed.
    pub diff_blocks: u64,
    pub diff_repeats: usize,
    /// Written in 64 KiB random writes over the 1 TiB volume.
    pub tib_written_bytes: u64,
    /// Written sequentially from the start of the 1 GiB volume.
    pub gib_written_bytes: u64,
    pub qcow2_snapshots: usize,
    pub runtime_s: u64,
    pub cache_bytes: u64,
}

impl Scale {
    pub fn new(quick: bool, volume_bytes: u64, runtime_s: u64, cache_bytes: u64) -> Scale {
        if quick {
            Scale {
                samples: 30,
                history_commits: 200,
                deletes: 50,
                diff_blocks: 16_384.min(volume_bytes / BLOCK_BYTES),
                diff_repeats: 3,
                // qcow2 allocates an L2 table for nearly every sparse write: slow, keep it small.
                tib_written_bytes: 16 * MIB,
                gib_written_bytes: 64 * MIB,
                qcow2_snapshots: 5,
                runtime_s,
                cache_bytes,
            }
        } else {
            Scale {
                samples: 300,
                history_commits: 10_000,
                deletes: 1_000,
                diff_blocks: 1_000_000.min(volume_bytes / BLOCK_BYTES),
                diff_repeats: 5,
                tib_written_bytes: 4 * GIB,
                gib_written_bytes: GIB,
                // Each takes a second or more on the 1 TiB image.
                qcow2_snapshots: 20,
                runtime_s,
                cache_bytes,
            }
        }
    }
}

/// Latency percentiles of some timed operations, in milliseconds.
#[derive(Serialize, Clone, Copy)]
pub struct Latency {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(durations: &[Duration]) -> Latency {
        let mut ms: Vec<f64> = durations.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        // Nearest rank: the smallest sample at or above the given share of all samples.
        let rank = |share: f64| {
            let index = (share * ms.len() as f64).ceil() as usize;
            ms.get(index.saturating_sub(1)).copied().unwrap_or(0.0)
        };
        Latency {
            samples: ms.len(),
            p50_ms: rank(0.50),
            p99_ms: rank(0.99),
            max_ms: ms.last().copied().unwrap_or(0.0),
        }
    }
}

/// One row of workload 6: a grove operation, and qcow2's counterpart where it has one.
#[derive(Serialize)]
pub struct OperationRow {
    pub operation: String,
    pub grove: Latency,
    /// `qemu-img snapshot -c` on an image with the same data (a whole process each).
    pub qcow2_snapshot: Option<Latency>,
    pub target: &'static str,
}

#[derive(Serialize)]
pub struct DiffFigures {
    /// Blocks written between the two commits (each once).
    pub blocks_written: u64,
    /// What grove's diff reported.
    pub changed_blocks: u64,
    pub extent_count: u64,
    /// `GET /v1/volumes/vol/diff?from=&to=` with its default limit (up to 100,000 extents).
    pub grove_diff: Latency,
    /// The same with `limit=1`: the counts without the list of extents.
    pub grove_diff_counts_only: Latency,
    /// nbdcopy of both versions from qemu-nbd to `null:`, one after the other.
    pub qcow2_read_both_ms: f64,
    pub target: &'static str,
}

#[derive(Serialize)]
pub struct DeleteFigures {
    pub history_commits: usize,
    pub commits_deleted: usize,
    /// `DELETE /v1/volumes/gib/commits/{id}`, one after the other.
    pub delete: Latency,
    pub deletes_took_s: f64,
    /// `POST /v1/pool/reclaim` right after the deletes, still under the reads.
    pub reclaim_took_s: f64,
    pub read_p99_before_us: f64,
    pub read_p99_during_us: f64,
    pub read_iops_before: f64,
    pub read_iops_during: f64,
    pub target: &'static str,
}

#[derive(Serialize)]
pub struct MemoryFigures {
    pub volume_bytes: u64,
    pub written_bytes: u64,
    pub cache_bytes: u64,
    /// grove's VmHWM once workload 1 is over (grove was restarted just before it).
    pub peak_rss_bytes: u64,
    pub target_bytes: u64,
    pub read_iops: f64,
    pub read_p99_us: f64,
}

/// Workload 6 and 7's figures, as printed and written to the JSON report.
#[derive(Serialize)]
pub struct Report {
    pub scale: Scale,
    pub operations: Vec<OperationRow>,
    pub diff: DiffFigures,
    pub deletes_during_io: DeleteFigures,
    pub memory: MemoryFigures,
}

/// A blocking client of grove's API over one keep-alive connection.
struct Api {
    agent: ureq::Agent,
    base: String,
}

impl Api {
    fn new(base: &str) -> Api {
        Api {
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(600))
                .build(),
            base: base.to_string(),
        }
    }

    fn of(server: &Server) -> Result<Api> {
        Ok(Api::new(
            server.api.as_deref().context("a grove server has an API")?,
        ))
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let request = self.agent.request(method, &format!("{}{path}", self.base));
        let response = match body {
            Some(body) => request.send_json(body),
            None => request.call(),
        };
        let response = match response {
            Ok(response) => response,
            Err(ureq::Error::Status(status, response)) => bail!(
                "{method} {path} answered {status}: {}",
                response.into_string().unwrap_or_default()
            ),
            Err(error) => return Err(error).with_context(|| format!("{method} {path}")),
        };
        // Not into_string: a diff's extents can pass its 10 MB limit.
        let mut bytes = Vec::new();
        response.into_reader().read_to_end(&mut bytes)?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).with_context(|| format!("parsing the answer to {path}"))
    }

    /// Commits branch `main` of `volume`; returns the commit id.
    fn commit(&self, volume: &str, message: &str) -> Result<String> {
        let commit = self.call(
            "POST",
            &format!("/v1/volumes/{volume}/branches/main/commits"),
            Some(json!({ "message": message })),
        )?;
        commit["id"]
            .as_str()
            .map(str::to_string)
            .context("a commit without an id")
    }
}

fn timed<T>(operation: impl FnOnce() -> Result<T>) -> Result<(Duration, T)> {
    let started = Instant::now();
    let result = operation()?;
    Ok((started.elapsed(), result))
}

/// Diffs two commits `scale.diff_blocks` blocks apart on grove's benchmark volume, and has qemu
/// write the same blocks on a new qcow2 layer, then read both versions in full.
pub fn diff_against_qcow2(
    scale: &Scale,
    grove: &Server,
    qemu: &mut Server,
    volume_bytes: u64,
) -> Result<DiffFigures> {
    let api = Api::of(grove)?;
    let number_ios = format!("--number_ios={}", scale.diff_blocks);
    // A random map (fio's default) writes each block once; the same seed, the same blocks.
    let writes = Job {
        name: "diff writes",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
        numjobs: 1,
        extra: &[&number_ios],
    };
    eprintln!(
        "6: diff: writing {} random 4 KiB blocks between two commits on grove and on a new qcow2 layer",
        scale.diff_blocks
    );
    let from = api.commit("vol", "diff from")?;
    fio(grove, &writes, None, volume_bytes)?;
    let to = api.commit("vol", "diff to")?;
    let mut full = Vec::new();
    let mut counts = Vec::new();
    let mut report = Value::Null;
    for _ in 0..scale.diff_repeats {
        let (took, answer) = timed(|| {
            api.call(
                "GET",
                &format!("/v1/volumes/vol/diff?from={from}&to={to}"),
                None,
            )
        })?;
        full.push(took);
        report = answer;
        let (took, _) = timed(|| {
            api.call(
                "GET",
                &format!("/v1/volumes/vol/diff?from={from}&to={to}&limit=1"),
                None,
            )
        })?;
        counts.push(took);
    }

    snapshot(qemu, 200)?;
    let (old_layer, new_layer) = (qemu.layer - 1, qemu.layer);
    fio(qemu, &writes, None, volume_bytes)?;
    qemu.stop()?;
    let mut read_both = Duration::ZERO;
    for layer in [old_layer, new_layer] {
        let reader = start_qemu_nbd_with(&qemu.dir, layer, true)?;
        let (took, ()) = timed(|| nbdcopy_to_null(&reader.uri()))?;
        read_both += took;
    }
    Ok(DiffFigures {
        blocks_written: scale.diff_blocks,
        changed_blocks: report["changed_blocks"].as_u64().unwrap_or(0),
        extent_count: report["extent_count"].as_u64().unwrap_or(0),
        grove_diff: Latency::of(&full),
        grove_diff_counts_only: Latency::of(&counts),
        qcow2_read_both_ms: read_both.as_secs_f64() * 1e3,
        target: "< 200 ms for 1,000,000 changed blocks",
    })
}

fn nbdcopy_to_null(uri: &str) -> Result<()> {
    let out = Command::new("nbdcopy")
        .args([uri, "null:"])
        .stdin(Stdio::null())
        .output()
        .context("running nbdcopy (Debian: apt-get install libnbd-bin)")?;
    if !out.status.success() {
        bail!(
            "nbdcopy {uri} null: failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// 64 KiB random writes over the whole volume (fio's random map: each place once); `extra`
/// holds the `--number_ios` option.
fn sparse_writes_job<'a>(extra: &'a [&'a str]) -> Job<'a> {
    Job {
        name: "sparse 64k writes",
        rw: "randwrite",
        bs: "64k",
        iodepth: 32,
        numjobs: 1,
        extra,
    }
}

/// Workload 1's job (4k random reads at QD32).
fn random_reads() -> Job<'static> {
    Job {
        name: "workload 1 reads",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
        numjobs: 1,
        extra: &[],
    }
}

fn sequential_fill() -> Job<'static> {
    Job {
        name: "fill",
        rw: "write",
        bs: "1M",
        iodepth: 8,
        numjobs: 1,
        extra: &[],
    }
}

/// What the grove part of workloads 6 and 7 measured.
pub struct GroveFigures {
    /// Commit, branch and tag latencies per case, in that order.
    pub tib: [Latency; 3],
    pub gib: [Latency; 3],
    pub history: [Latency; 3],
    /// The commits made to build the history, each timed too.
    pub history_commits: Latency,
    pub deletes: DeleteFigures,
    pub memory: MemoryFigures,
}

/// Runs the grove side of workloads 6 and 7 on a grove of its own in `dir`: a 1 TiB volume
/// `tib` (sparse) and a 1 GiB volume `gib`.
pub fn grove_versioning(scale: &Scale, grove_binary: &Path, dir: &Path) -> Result<GroveFigures> {
    std::fs::create_dir_all(dir)?;
    let volumes = [("tib", TIB), ("gib", GIB)];
    let mut server = start_grove(grove_binary, dir, scale.cache_bytes, &volumes, true)?;
    let api = Api::of(&server)?;
    eprintln!(
        "6/7: writing {} MiB at random on a 1 TiB volume and {} MiB on a 1 GiB volume",
        scale.tib_written_bytes / MIB,
        scale.gib_written_bytes / MIB
    );
    let tib_ios = sparse_number_ios(scale);
    fio_uri(
        &server.export_uri("tib"),
        "grove",
        &sparse_writes_job(&[&tib_ios]),
        None,
        TIB,
    )?;
    fio_uri(
        &server.export_uri("gib"),
        "grove",
        &sequential_fill(),
        None,
        scale.gib_written_bytes,
    )?;
    api.commit("tib", "data")?;
    api.commit("gib", "data")?;

    // Restarted, so that its peak RSS covers serving workload 1 only (opening the pool too).
    server.stop()?;
    drop(server);
    let server = start_grove(grove_binary, dir, scale.cache_bytes, &[], true)?;
    let api = Api::of(&server)?;
    let memory = memory_during_reads(scale, &server)?;

    eprintln!(
        "6: commit, branch and tag creation, {} of each on each volume",
        scale.samples
    );
    let tib = operation_samples(&api, &server, "tib", "tib", scale.samples)?;
    let gib = operation_samples(&api, &server, "gib", "gib", scale.samples)?;

    eprintln!(
        "6: {} commits on the 1 GiB volume, one block written before each",
        scale.history_commits
    );
    let mut history_ids = Vec::with_capacity(scale.history_commits);
    let mut history_latencies = Vec::with_capacity(scale.history_commits);
    {
        let mut writer = NbdWriter::connect(&server.socket, "gib")?;
        for n in 0..scale.history_commits {
            writer.write_random_blocks(1)?;
            let (took, id) = timed(|| api.commit("gib", &format!("history {n}")))?;
            history_latencies.push(took);
            history_ids.push(id);
        }
    }
    let history = operation_samples(&api, &server, "gib", "history", scale.samples)?;
    let deletes = deletes_during_reads(scale, &api, &server, &history_ids)?;
    Ok(GroveFigures {
        tib,
        gib,
        history,
        history_commits: Latency::of(&history_latencies),
        deletes,
        memory,
    })
}

/// Times `samples` commits (each after a few blocks written over NBD), then as many branch
/// creations and tag creations from `main`; names are prefixed with `case`.
fn operation_samples(
    api: &Api,
    server: &Server,
    volume: &str,
    case: &str,
    samples: usize,
) -> Result<[Latency; 3]> {
    let mut commits = Vec::with_capacity(samples);
    {
        let mut writer = NbdWriter::connect(&server.socket, volume)?;
        for n in 0..samples {
            writer.write_random_blocks(BLOCKS_PER_COMMIT_SAMPLE)?;
            let (took, _) = timed(|| api.commit(volume, &format!("{case} sample {n}")))?;
            commits.push(took);
        }
    }
    let mut branches = Vec::with_capacity(samples);
    for n in 0..samples {
        let body = json!({ "name": format!("{case}-branch-{n}"), "from": "main" });
        let (took, _) = timed(|| {
            api.call(
                "POST",
                &format!("/v1/volumes/{volume}/branches"),
                Some(body),
            )
        })?;
        branches.push(took);
    }
    let mut tags = Vec::with_capacity(samples);
    for n in 0..samples {
        let body = json!({ "name": format!("{case}-tag-{n}"), "ref": "main" });
        let (took, _) =
            timed(|| api.call("POST", &format!("/v1/volumes/{volume}/tags"), Some(body)))?;
        tags.push(took);
    }
    Ok([
        Latency::of(&commits),
        Latency::of(&branches),
        Latency::of(&tags),
    ])
}

/// `key`'s value in /proc/PID/status, in bytes (the file gives kB).
fn proc_status_bytes(pid: u32, key: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|line| line.starts_with(key))
        .with_context(|| format!("no {key} in /proc/{pid}/status"))?;
    let kib: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("parsing {line:?}"))?;
    Ok(kib * 1024)
}

/// A fio run in the background, its JSON report going to a file; killed if dropped while
/// running (after an error).
struct BackgroundFio {
    process: crate::Children,
    output: PathBuf,
    errors: PathBuf,
}

impl BackgroundFio {
    fn start(uri: &str, job: &Job, runtime_s: u64, size_bytes: u64, dir: &Path) -> Result<Self> {
        let output = dir.join("fio-background.json");
        let errors = dir.join("fio-background.err");
        let process = fio_command(uri, job, Some(runtime_s), size_bytes)
            .stdout(std::fs::File::create(&output)?)
            .stderr(std::fs::File::create(&errors)?)
            .spawn()
            .context("starting fio")?;
        Ok(BackgroundFio {
            process: crate::Children(vec![process]),
            output,
            errors,
        })
    }

    fn pid(&self) -> u32 {
        self.process.0[0].id()
    }

    /// Whether fio is still running.
    fn running(&mut self) -> Result<bool> {
        Ok(self.process.0[0].try_wait()?.is_none())
    }

    /// Waits for fio to exit (at most `limit`); returns IOPS, MiB/s and p99 latency (us). After
    /// SIGINT (`interrupted`) fio exits non-zero but still writes its report.
    fn finish(mut self, limit: Duration, interrupted: bool) -> Result<(f64, f64, f64)> {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.process.0[0].try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                bail!("fio did not finish in time");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if !status.success() && !interrupted {
            bail!(
                "fio failed with {status}: {}",
                std::fs::read_to_string(&self.errors)
                    .unwrap_or_default()
                    .trim()
            );
        }
        parse_fio_output(&std::fs::read_to_string(&self.output)?).with_context(|| {
            format!(
                "fio's report ({status}; {})",
                std::fs::read_to_string(&self.errors)
                    .unwrap_or_default()
                    .trim()
            )
        })
    }
}

/// Workload 7: workload 1 on the 1 TiB volume, grove's resident memory sampled throughout.
fn memory_during_reads(scale: &Scale, server: &Server) -> Result<MemoryFigures> {
    eprintln!("7: workload 1 on the 1 TiB volume, sampling grove's RSS");
    let pid = server.child.id();
    let mut reads = BackgroundFio::start(
        &server.export_uri("tib"),
        &random_reads(),
        scale.runtime_s,
        TIB,
        &server.dir,
    )?;
    let mut peak_sampled = 0;
    while reads.running()? {
        peak_sampled = peak_sampled.max(proc_status_bytes(pid, "VmRSS:")?);
        std::thread::sleep(Duration::from_millis(50));
    }
    let (read_iops, _, read_p99_us) = reads.finish(Duration::ZERO, false)?;
    // The high-water mark also catches peaks between two samples.
    let peak_rss_bytes = proc_status_bytes(pid, "VmHWM:")?.max(peak_sampled);
    Ok(MemoryFigures {
        volume_bytes: TIB,
        written_bytes: scale.tib_written_bytes,
        cache_bytes: scale.cache_bytes,
        peak_rss_bytes,
        target_bytes: scale.cache_bytes + 128 * MIB,
        read_iops,
        read_p99_us,
    })
}

/// Workload 1 on the 1 GiB volume alone, then again while `scale.deletes` of `history` (spread
/// evenly) are deleted one after the other; fio is stopped (SIGINT: it still reports) once the
/// deletes are done, so its figures cover the deletes only.
fn deletes_during_reads(
    scale: &Scale,
    api: &Api,
    server: &Server,
    history: &[String],
) -> Result<DeleteFigures> {
    let uri = server.export_uri("gib");
    let (read_iops_before, _, read_p99_before_us) =
        fio_uri(&uri, "grove", &random_reads(), Some(scale.runtime_s), GIB)?;
    let step = (history.len() / scale.deletes.max(1)).max(1);
    let doomed: Vec<&String> = history.iter().step_by(step).take(scale.deletes).collect();
    eprintln!(
        "6: workload 1 while deleting {} of the {} commits",
        doomed.len(),
        history.len()
    );
    // Runs until told to stop; an hour is only a bound.
    let mut reads = BackgroundFio::start(&uri, &random_reads(), 3600, GIB, &server.dir)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let sessions = api.call("GET", "/v1/sessions", None)?;
        if sessions.as_array().is_some_and(|s| !s.is_empty()) {
            break;
        }
        if !reads.running()? || Instant::now() > deadline {
            bail!(
                "fio did not connect to grove within 20 s: {}",
                std::fs::read_to_string(&reads.errors)
                    .unwrap_or_default()
                    .trim()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(doomed.len());
    for id in &doomed {
        let path = format!("/v1/volumes/gib/commits/{id}");
        let (took, _) = timed(|| api.call("DELETE", &path, None))?;
        latencies.push(took);
    }
    let deletes_took = started.elapsed();
    // The deletes leave space to reclaim, by scans beside I/O: a scan run now returns once
    // that is done, so fio's figures cover it too.
    let (reclaim_took, _) = timed(|| api.call("POST", "/v1/pool/reclaim", None))?;
    send_signal(reads.pid(), "INT")?;
    let (read_iops_during, _, read_p99_during_us) = reads.finish(Duration::from_secs(30), true)?;
    Ok(DeleteFigures {
        history_commits: history.len(),
        commits_deleted: doomed.len(),
        delete: Latency::of(&latencies),
        deletes_took_s: deletes_took.as_secs_f64(),
        reclaim_took_s: reclaim_took.as_secs_f64(),
        read_p99_before_us,
        read_p99_during_us,
        read_iops_before,
        read_iops_during,
        target: "read p99 during the deletes within 2x of before",
    })
}

fn sparse_number_ios(scale: &Scale) -> String {
    format!("--number_ios={}", scale.tib_written_bytes / (64 << 10))
}

/// `qemu-img snapshot -c` latency (the whole process, as a user runs it) on a qcow2 image of
/// `image_bytes` in `dir`, after qemu-nbd served it `job` over its first `job_bytes` (the same
/// writes grove got).
fn qcow2_snapshot_latency(
    dir: &Path,
    image_bytes: u64,
    job: &Job,
    job_bytes: u64,
    samples: usize,
) -> Result<Latency> {
    std::fs::create_dir_all(dir)?;
    let image = crate::qcow2_layer(dir, 0);
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg(image_bytes.to_string())
        .status()?;
    if !status.success() {
        bail!("qemu-img create failed");
    }
    let mut server = start_qemu_nbd(dir, 0)?;
    fio(&server, job, None, job_bytes)?;
    // A clean stop writes qcow2's metadata back; the image must be closed before snapshots.
    server.stop()?;
    let mut latencies = Vec::with_capacity(samples);
    for n in 0..samples {
        let (took, status) = timed(|| {
            Ok(Command::new("qemu-img")
                .args(["snapshot", "-c", &format!("snap{n}")])
                .arg(&image)
                .status()?)
        })?;
        if !status.success() {
            bail!("qemu-img snapshot -c failed on {}", image.display());
        }
        latencies.push(took);
    }
    Ok(Latency::of(&latencies))
}

/// qcow2's side of the commit rows: a 1 GiB and a 1 TiB image written as grove's volumes were;
/// returns their `qemu-img snapshot -c` latencies in that order.
pub fn qcow2_snapshots(scale: &Scale, dir: &Path) -> Result<(Latency, Latency)> {
    eprintln!(
        "6: qemu-img snapshot -c on qcow2 images with the same data, {} on each",
        scale.qcow2_snapshots
    );
    let gib_dir = dir.join("qcow2-1gib");
    let gib = qcow2_snapshot_latency(
        &gib_dir,
        GIB,
        &sequential_fill(),
        scale.gib_written_bytes,
        scale.qcow2_snapshots,
    )?;
    std::fs::remove_dir_all(&gib_dir)?;
    let tib_dir = dir.join("qcow2-1tib");
    let tib_ios = sparse_number_ios(scale);
    let tib = qcow2_snapshot_latency(
        &tib_dir,
        TIB,
        &sparse_writes_job(&[&tib_ios]),
        TIB,
        scale.qcow2_snapshots,
    )?;
    std::fs::remove_dir_all(&tib_dir)?;
    Ok((gib, tib))
}

/// Targets of the specification, shown next to the figures.
const OPERATION_TARGET: &str = "p99 < 5 ms";

impl Report {
    pub fn new(
        scale: Scale,
        grove: GroveFigures,
        qcow2_snapshot: (Latency, Latency),
        diff: DiffFigures,
    ) -> Report {
        let (qcow2_gib, qcow2_tib) = qcow2_snapshot;
        let mut operations = Vec::new();
        let mut add_case = |case: &str, latencies: [Latency; 3], qcow2: Option<Latency>| {
            for (name, latency) in ["commit", "branch create", "tag create"]
                .into_iter()
                .zip(latencies)
            {
                operations.push(OperationRow {
                    operation: format!("{name}, {case}"),
                    grove: latency,
                    qcow2_snapshot: if name == "commit" { qcow2 } else { None },
                    target: OPERATION_TARGET,
                });
            }
        };
        add_case("1 GiB volume", grove.gib, Some(qcow2_gib));
        add_case("1 TiB sparse volume", grove.tib, Some(qcow2_tib));
        add_case(
            &format!("after {} commits", scale.history_commits),
            grove.history,
            None,
        );
        // The commits that built the history, each timed too: does latency grow with them?
        operations.insert(
            6,
            OperationRow {
                operation: format!("commit, making {} commits", scale.history_commits),
                grove: grove.history_commits,
                qcow2_snapshot: None,
                target: OPERATION_TARGET,
            },
        );
        Report {
            scale,
            operations,
            diff,
            deletes_during_io: grove.deletes,
            memory: grove.memory,
        }
    }

    pub fn print(&self, quick: bool) {
        let scale = &self.scale;
        let row = |what: String, grove: &Latency, qcow2: [Option<f64>; 2], target: &str| {
            let qcow2 = qcow2.map(|ms| ms.map_or("-".to_string(), |ms| format!("{ms:.2}")));
            println!(
                "{:<44} {:>9.2} {:>9.2} {:>10} {:>10}  {target}",
                format!("{what} (n={})", grove.samples),
                grove.p50_ms,
                grove.p99_ms,
                qcow2[0],
                qcow2[1],
            );
        };
        println!(
            "\n{:<44} {:>9} {:>9} {:>10} {:>10}  target",
            "6: versioning (ms, client-side)", "grove p50", "grove p99", "qcow2 p50", "qcow2 p99"
        );
        for operation in &self.operations {
            let qcow2 = operation.qcow2_snapshot;
            row(
                operation.operation.clone(),
                &operation.grove,
                [qcow2.map(|l| l.p50_ms), qcow2.map(|l| l.p99_ms)],
                operation.target,
            );
        }
        let diff = &self.diff;
        row(
            format!("diff, {} blocks apart", diff.blocks_written),
            &diff.grove_diff,
            [Some(diff.qcow2_read_both_ms), None],
            diff.target,
        );
        row(
            "diff, counts only (limit=1)".to_string(),
            &diff.grove_diff_counts_only,
            [None, None],
            "",
        );
        let deletes = &self.deletes_during_io;
        row(
            "commit delete, under workload 1".to_string(),
            &deletes.delete,
            [None, None],
            "",
        );
        println!(
            "  qcow2: a commit is `qemu-img snapshot -c` (a whole process) on an image with the \
             same data; the diff is nbdcopy of both versions to null: from qemu-nbd (backing chain)"
        );
        println!(
            "  commits timed after {BLOCKS_PER_COMMIT_SAMPLE} random 4 KiB blocks written over NBD \
             (the {} history commits after 1 block); diff: grove reported {} changed blocks in {} \
             extents, the first 100000 returned",
            scale.history_commits, diff.changed_blocks, diff.extent_count
        );
        println!(
            "  workload 1 read p99 while deleting {} commits ({:.1} s) and reclaiming their space \
             ({:.1} s): {:.0} us, before: {:.0} us ({:.2}x; target: within 2x)",
            deletes.commits_deleted,
            deletes.deletes_took_s,
            deletes.reclaim_took_s,
            deletes.read_p99_during_us,
            deletes.read_p99_before_us,
            deletes.read_p99_during_us / deletes.read_p99_before_us.max(1.0)
        );
        let memory = &self.memory;
        println!(
            "\n{:<44} {:>15} {:>15}  target",
            "7: memory (MiB)", "grove peak RSS", "metadata cache"
        );
        println!(
            "{:<44} {:>15} {:>15}  <= {} (cache + 128)",
            format!(
                "workload 1, 1 TiB volume, {} MiB written",
                memory.written_bytes / MIB
            ),
            memory.peak_rss_bytes / MIB,
            memory.cache_bytes / MIB,
            memory.target_bytes / MIB,
        );
        println!(
            "  grove's VmHWM, restarted before the reads: {:.0} IOPS, p99 {:.0} us",
            memory.read_iops, memory.read_p99_us
        );
        if quick {
            println!(
                "(--quick: {} commits instead of 10000, {} diff blocks instead of 1000000, \
                 {} MiB on the 1 TiB volume instead of 4096: a smoke test, not the figures)",
                scale.history_commits,
                scale.diff_blocks,
                scale.tib_written_bytes / MIB
            );
        }
    }
}
