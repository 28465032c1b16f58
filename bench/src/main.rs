//! grove's benchmark: starts grove, qemu-nbd (qcow2 with a backing chain, the usual way to get a
//! versioned block device over NBD) and nbdkit's file plugin (a plain NBD server, no
//! versioning) on Unix sockets, runs the same fio jobs (`ioengine=nbd`) against each,
//! interleaved, and prints absolute figures and ratios. Also writes them as JSON.
//!
//! Then the iSCSI column: grove's iSCSI target against tgt (the Linux SCSI target framework's
//! daemon, `tgtd`, serving nbdkit's file as a LUN with its default `rdwr` backing store), the
//! same read jobs with libiscsi's `iscsi-perf` (reads only), interleaved. tgt starts only
//! after the NBD jobs, so it never competes with them, and needs root; without root or
//! without tgtd only grove's iSCSI figures are taken.
//!
//! Then workloads 6 and 7 (module `versioning`): commit, branch, tag and diff latency against
//! qcow2's snapshots and full reads, I/O latency while commits are deleted, and grove's peak
//! RSS against its metadata cache, each shown next to its target (never asserted).
//!
//! `--quick` is a smoke test of the benchmark itself (small volume, short jobs); its numbers
//! mean little. Machines are shared and noisy: compare ratios from one run, never absolute
//! thresholds.

mod nbd_writer;
mod versioning;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;

#[derive(Parser)]
#[command(
    about = "grove vs qemu-nbd (qcow2) vs nbdkit (file), same fio jobs, then grove vs tgt over iSCSI"
)]
struct Args {
    /// Small volume and short jobs: checks that the benchmark works, in well under a minute.
    #[arg(long)]
    quick: bool,
    /// Volume size in MiB (default 4096, quick 256).
    #[arg(long)]
    size_mib: Option<u64>,
    /// Seconds per fio or iscsi-perf job (default 20, quick 2).
    #[arg(long)]
    runtime_s: Option<u64>,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "bench-results.json")]
    json: PathBuf,
    /// The grove binary (default: target/release/grove, built if missing).
    #[arg(long)]
    grove: Option<PathBuf>,
    /// Leave out the iSCSI jobs (grove's iSCSI target against tgt with iscsi-perf).
    #[arg(long)]
    no_iscsi: bool,
    /// grove's metadata cache (`--cache-size`) in MiB; workload 7 sets peak RSS against it.
    #[arg(long, default_value_t = 256)]
    cache_mib: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
enum Peer {
    Grove,
    /// grove with the volume's block checksums off: what checksums cost.
    GroveNoChecksums,
    QemuNbd,
    Nbdkit,
    /// tgt serving nbdkit's file over iSCSI (the iSCSI jobs only).
    Tgt,
}

impl Peer {
    /// The NBD peers, each with its own server and data directory.
    const ALL: [Peer; 4] = [
        Peer::Grove,
        Peer::QemuNbd,
        Peer::Nbdkit,
        Peer::GroveNoChecksums,
    ];

    fn name(self) -> &'static str {
        match self {
            Peer::Grove => "grove",
            Peer::GroveNoChecksums => "grove-no-checksums",
            Peer::QemuNbd => "qemu-nbd+qcow2",
            Peer::Nbdkit => "nbdkit-file",
            Peer::Tgt => "tgt-file",
        }
    }
}

/// One running server and what is needed to restart it on a new qcow2 layer.
struct Server {
    peer: Peer,
    child: Child,
    socket: PathBuf,
    dir: PathBuf,
    api: Option<String>,
    /// The qcow2 layer currently served (qemu-nbd only).
    layer: usize,
    /// The port of grove's iSCSI target on 127.0.0.1 (grove only).
    iscsi_port: Option<u16>,
}

impl Server {
    fn uri(&self) -> String {
        self.export_uri("vol")
    }

    fn export_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// Stops the server with SIGTERM and waits for it, killing it after 30 s: grove flushes its
    /// pool, and qemu-nbd writes back its qcow2 metadata cache (after a SIGKILL the image's
    /// L2 tables would not map what was written).
    fn stop(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        send_signal(self.child.id(), "TERM")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("{} did not stop within 30 s of SIGTERM", self.peer.name());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

/// Sends `signal` (a name such as "TERM") to `pid`, a process this benchmark started.
fn send_signal(pid: u32, signal: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed");
    }
    Ok(())
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_socket(path: &Path, child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if path.exists() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("server exited early with {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("server did not create {} in time", path.display())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
fn wait_for_port(port: u16, child: &mut Child, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited early with {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} is not listening on 127.0.0.1:{port}")
}

fn tool_installed(tool: &str) -> bool {
    Command::new("which")
        .arg(tool)
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Disk a full run (4 GiB volumes) needs at its peak, in workload 6: the peers' images and
/// pools, qcow2's 10-deep chain, and the versioning volumes with qcow2's copies of them. One
/// run, sampled every 5 s, took 63.8 GB at its peak; this leaves some room.
const FULL_RUN_DISK_BYTES: u64 = 70_000_000_000;

/// Fails at the start, not 25 minutes in, when the temporary directory cannot hold the run:
/// what a full run needs, in proportion to the volume size.
fn check_free_space(dir: &Path, size_bytes: u64) -> Result<()> {
    let needed = (FULL_RUN_DISK_BYTES as f64 * size_bytes as f64 / (4u64 << 30) as f64) as u64;
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()?;
    let available = String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|line| line.trim().parse::<u64>().ok());
    match available {
        Some(free) if free < needed => bail!(
            "{} has {:.1} GB free; a run with {} MiB volumes needs about {:.1} GB (set TMPDIR \
             elsewhere, or pass a smaller --size-mib)",
            dir.display(),
            free as f64 / 1e9,
            size_bytes >> 20,
            needed as f64 / 1e9
        ),
        Some(_) => Ok(()),
        None => {
            eprintln!(
                "cannot tell the free space in {}: not checked",
                dir.display()
            );
            Ok(())
        }
    }
}

/// Starts grove on `dir` (a pool there is reopened) with a metadata cache of `cache_bytes`, and
/// creates `volumes` (name, size in bytes).
fn start_grove(
    grove: &Path,
    dir: &Path,
    cache_bytes: u64,
    volumes: &[(&str, u64)],
    checksums: bool,
) -> Result<Server> {
    let socket = dir.join("grove.sock");
    // A socket left by an earlier run on this directory would look like a ready server.
    let _ = std::fs::remove_file(&socket);
    let port = free_port()?;
    let iscsi_port = free_port()?;
    let api = format!("http://127.0.0.1:{port}");
    let mut child = Command::new(grove)
        .args(["serve", "--data-dir"])
        .arg(dir.join("data"))
        .args([
            "--nbd-listen",
            &format!("127.0.0.1:{}", free_port()?),
            "--api-listen",
            &format!("127.0.0.1:{port}"),
            "--iscsi-listen",
            &format!("127.0.0.1:{iscsi_port}"),
        ])
        .arg("--nbd-socket")
        .arg(&socket)
        .arg("--cache-size")
        .arg(cache_bytes.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting grove")?;
    wait_for_socket(&socket, &mut child)?;
    for (name, size_bytes) in volumes {
        ureq::post(&format!("{api}/v1/volumes"))
            .send_json(serde_json::json!({
                "name": name,
                "size": size_bytes,
                "checksums": checksums,
            }))
            .with_context(|| format!("creating the grove volume {name}"))?;
    }
    Ok(Server {
        peer: Peer::Grove,
        child,
        socket,
        dir: dir.to_path_buf(),
        api: Some(api),
        layer: 0,
        iscsi_port: Some(iscsi_port),
    })
}

fn qcow2_layer(dir: &Path, layer: usize) -> PathBuf {
    dir.join(format!("layer{layer}.qcow2"))
}

fn start_qemu_nbd(dir: &Path, layer: usize) -> Result<Server> {
    start_qemu_nbd_with(dir, layer, false)
}

/// qemu-nbd serving `layer` of the chain in `dir` (with its backing files), read-only if asked.
fn start_qemu_nbd_with(dir: &Path, layer: usize, read_only: bool) -> Result<Server> {
    let socket = dir.join("qemu.sock");
    let _ = std::fs::remove_file(&socket);
    let mut child = Command::new("qemu-nbd")
        .args(if read_only {
            &["--read-only"][..]
        } else {
            &[][..]
        })
        .args([
            "-f",
            "qcow2",
            "-x",
            "vol",
            "--shared=8",
            "--persistent",
            "--cache=writeback",
            "--aio=io_uring",
            "-k",
        ])
        .arg(&socket)
        .arg(qcow2_layer(dir, layer))
        .stdout(Stdio::null())
        .spawn()
        .context("starting qemu-nbd")?;
    wait_for_socket(&socket, &mut child)?;
    Ok(Server {
        peer: Peer::QemuNbd,
        child,
        socket,
        dir: dir.to_path_buf(),
        api: None,
        layer,
        iscsi_port: None,
    })
}

/// nbdkit's backing file; tgt serves the same file over iSCSI once the NBD jobs are done.
fn nbdkit_file(dir: &Path) -> PathBuf {
    dir.join("disk.raw")
}

fn start_nbdkit(dir: &Path, size_bytes: u64) -> Result<Server> {
    let socket = dir.join("nbdkit.sock");
    let file = nbdkit_file(dir);
    std::fs::File::create(&file)?.set_len(size_bytes)?;
    let mut child = Command::new("nbdkit")
        .args(["-f", "--exit-with-parent", "-U"])
        .arg(&socket)
        .args(["-e", "vol", "file"])
        .arg(&file)
        .stdout(Stdio::null())
        .spawn()
        .context("starting nbdkit")?;
    wait_for_socket(&socket, &mut child)?;
    Ok(Server {
        peer: Peer::Nbdkit,
        child,
        socket,
        dir: dir.to_path_buf(),
        api: None,
        layer: 0,
        iscsi_port: None,
    })
}

/// Takes a snapshot the way each peer does it: a grove commit, a new qcow2 layer.
fn snapshot(server: &mut Server, n: usize) -> Result<()> {
    match server.peer {
        Peer::Grove | Peer::GroveNoChecksums => {
            let api = server.api.as_deref().unwrap_or_default();
            ureq::post(&format!("{api}/v1/volumes/vol/branches/main/commits"))
                .send_json(serde_json::json!({ "message": format!("snapshot {n}") }))
                .context("grove commit")?;
        }
        Peer::QemuNbd => {
            server.stop()?;
            let next = server.layer + 1;
            let status = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(qcow2_layer(&server.dir, server.layer))
                .arg(qcow2_layer(&server.dir, next))
                .status()?;
            if !status.success() {
                bail!("qemu-img create failed");
            }
            let restarted = start_qemu_nbd(&server.dir, next)?;
            *server = restarted;
        }
        Peer::Nbdkit | Peer::Tgt => {}
    }
    Ok(())
}

#[derive(Serialize, Clone)]
struct Figure {
    workload: String,
    peer: Peer,
    iops: f64,
    mib_per_s: f64,
    /// None for the iSCSI jobs: iscsi-perf reports no latencies.
    lat_p99_us: Option<f64>,
    /// "fio" (NBD) or "iscsi-perf" (iSCSI).
    tool: &'static str,
}

struct Job<'a> {
    name: &'a str,
    rw: &'a str,
    bs: &'a str,
    iodepth: u32,
    numjobs: u32,
    extra: &'a [&'a str],
}

fn fio(
    server: &Server,
    job: &Job,
    runtime_s: Option<u64>,
    size_bytes: u64,
) -> Result<(f64, f64, f64)> {
    fio_uri(
        &server.uri(),
        server.peer.name(),
        job,
        runtime_s,
        size_bytes,
    )
}

/// Drops the files of every peer but the one in `keep` from the page cache: written back
/// (`sync -d`), then dropped (`dd iflag=nocache count=0`). The four peers' files together
/// outgrow the memory of a small machine (a 4 GiB qcow2 chain with the benchmark's history
/// takes some 30 GB), and without this a job would time the disk for one peer and the page
/// cache for another. Only the benchmark's own files are touched.
fn evict_others(dirs: &[PathBuf], keep: &Path) -> Result<()> {
    let mut files = Vec::new();
    let mut pending: Vec<PathBuf> = dirs.iter().filter(|d| *d != keep).cloned().collect();
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                files.push(entry.path());
            }
        }
    }
    if files.is_empty() {
        return Ok(());
    }
    let status = Command::new("sync").arg("-d").args(&files).status()?;
    if !status.success() {
        bail!("sync -d of the other peers' files failed");
    }
    for file in &files {
        let status = Command::new("dd")
            .arg(format!("if={}", file.display()))
            .args(["iflag=nocache", "count=0", "status=none"])
            .status()?;
        if !status.success() {
            bail!("dropping {} from the page cache failed", file.display());
        }
    }
    Ok(())
}

/// Before a job: drops the other peers' files from the page cache (`evict_others`), then
/// reads `server`'s whole volume once, untimed, so that every peer starts with its own data
/// cached, as a host serving only it would have.
fn warm_alone(server: &Server, dirs: &[PathBuf], size_bytes: u64) -> Result<()> {
    evict_others(dirs, &server.dir)?;
    let job = Job {
        name: "warm: read the volume once",
        rw: "read",
        bs: "1M",
        iodepth: 8,
        numjobs: 1,
        extra: &[],
    };
    fio(server, &job, None, size_bytes).map(|_| ())
}

/// The fio command line of `job` against the NBD export `uri`.
fn fio_command(uri: &str, job: &Job, runtime_s: Option<u64>, size_bytes: u64) -> Command {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=bench",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        &format!("--rw={}", job.rw),
        &format!("--bs={}", job.bs),
        &format!("--iodepth={}", job.iodepth),
        &format!("--numjobs={}", job.numjobs),
        &format!("--size={size_bytes}"),
        "--group_reporting",
        "--output-format=json",
        "--randrepeat=1",
    ]);
    if let Some(runtime) = runtime_s {
        cmd.args(["--time_based", &format!("--runtime={runtime}")]);
    }
    cmd.args(job.extra);
    cmd
}

/// Runs `job` against `uri` (`what` names the server in errors); returns IOPS, MiB/s and the
/// p99 completion latency in microseconds.
fn fio_uri(
    uri: &str,
    what: &str,
    job: &Job,
    runtime_s: Option<u64>,
    size_bytes: u64,
) -> Result<(f64, f64, f64)> {
    let out = fio_command(uri, job, runtime_s, size_bytes)
        .output()
        .context("running fio")?;
    if !out.status.success() {
        bail!(
            "fio {} on {} failed: {}",
            job.name,
            what,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_fio_output(&String::from_utf8_lossy(&out.stdout))
}

/// IOPS, MiB/s and p99 completion latency (microseconds) from fio's JSON output.
fn parse_fio_output(text: &str) -> Result<(f64, f64, f64)> {
    // fio may print notices before the JSON document.
    let json: serde_json::Value =
        serde_json::from_str(&text[text.find('{').unwrap_or(0)..]).context("parsing fio output")?;
    let job0 = &json["jobs"][0];
    let (mut iops, mut bw, mut p99) = (0.0, 0.0, 0.0f64);
    for dir in ["read", "write"] {
        iops += job0[dir]["iops"].as_f64().unwrap_or(0.0);
        bw += job0[dir]["bw_bytes"].as_f64().unwrap_or(0.0);
        p99 = p99.max(
            job0[dir]["clat_ns"]["percentile"]["99.000000"]
                .as_f64()
                .unwrap_or(0.0)
                / 1000.0,
        );
    }
    Ok((iops, bw / (1 << 20) as f64, p99))
}

/// The target name tgt serves nbdkit's file under, as LUN 1 (LUN 0 is tgt's controller).
const TGT_IQN: &str = "iqn.2026-11.io.grove.bench:tgt";

/// How long tgtd gets to come up, and to exit when told to.
const TGT_WAIT: Duration = Duration::from_secs(10);

/// A tgtd of our own: a private control port (`tgtadm -C`, so a tgtd started by systemd is
/// never touched), a portal on 127.0.0.1 and one target with `file` as LUN 1, bound to all
/// initiators. Dropping it stops tgtd and removes its control sockets, also on errors.
struct Tgt {
    child: Child,
    control_port: u32,
    portal_port: u16,
}

impl Tgt {
    fn start(file: &Path, log: &Path) -> Result<Tgt> {
        let file = file
            .to_str()
            .context("the tgt backing file's path is not UTF-8")?;
        // tgtd's control socket is /var/run/tgtd/socket.N: pick an N no tgtd uses. The clock
        // and our pid are random enough, and a taken N is skipped.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos()
            ^ std::process::id();
        let control_port = (0..100u32)
            .map(|attempt| 1000 + seed.wrapping_add(attempt.wrapping_mul(7919)) % 8000)
            .find(|n| !Path::new(&format!("/var/run/tgtd/socket.{n}")).exists())
            .context("no free tgtd control port in 100 attempts")?;
        let portal_port = free_port()?;
        let log_file = std::fs::File::create(log)?;
        let child = Command::new("tgtd")
            .args(["-f", "-C", &control_port.to_string(), "--iscsi"])
            .arg(format!("portal=127.0.0.1:{portal_port}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("starting tgtd")?;
        // From here on, dropping `tgt` stops tgtd.
        let mut tgt = Tgt {
            child,
            control_port,
            portal_port,
        };
        eprintln!(
            "tgt: tgtd on 127.0.0.1:{portal_port}, control port {control_port} (if the \
             benchmark is killed: tgtadm -C {control_port} --op delete --mode system)"
        );
        let deadline = Instant::now() + TGT_WAIT;
        while tgt.tgtadm(&["--op", "show", "--mode", "sys"]).is_err() {
            if let Some(status) = tgt.child.try_wait()? {
                bail!("tgtd exited early with {status}; see {}", log.display());
            }
            if Instant::now() > deadline {
                bail!("tgtd did not answer tgtadm in time; see {}", log.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let tid = ["--lld", "iscsi", "--tid", "1"];
        tgt.tgtadm(
            &[
                &tid[..],
                &["--op", "new", "--mode", "target", "-T", TGT_IQN],
            ]
            .concat(),
        )?;
        tgt.tgtadm(
            &[
                &tid[..],
                &[
                    "--op",
                    "new",
                    "--mode",
                    "logicalunit",
                    "--lun",
                    "1",
                    "-b",
                    file,
                ],
            ]
            .concat(),
        )?;
        tgt.tgtadm(&[&tid[..], &["--op", "bind", "--mode", "target", "-I", "ALL"]].concat())?;
        wait_for_port(portal_port, &mut tgt.child, "tgtd")?;
        Ok(tgt)
    }

    fn tgtadm(&self, args: &[&str]) -> Result<()> {
        let out = Command::new("tgtadm")
            .args(["-C", &self.control_port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running tgtadm")?;
        if !out.status.success() {
            bail!(
                "tgtadm {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn url(&self) -> String {
        format!("iscsi://127.0.0.1:{}/{TGT_IQN}/1", self.portal_port)
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        // tgtd ignores SIGTERM while it has targets: delete the target, then tell it to exit.
        let _ = self.tgtadm(&[
            "--lld", "iscsi", "--op", "delete", "--mode", "target", "--tid", "1", "--force",
        ]);
        let _ = self.tgtadm(&["--op", "delete", "--mode", "system"]);
        let deadline = Instant::now() + TGT_WAIT;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            eprintln!(
                "tgtd (pid {}) did not stop within {TGT_WAIT:?}; killing it",
                self.child.id()
            );
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        for suffix in ["", ".lock"] {
            let _ = std::fs::remove_file(format!(
                "/var/run/tgtd/socket.{}{suffix}",
                self.control_port
            ));
        }
    }
}

/// Logical block size of both iSCSI LUNs (grove's and tgt's file LUN).
const ISCSI_BLOCK_BYTES: u64 = 512;

/// One iSCSI job: `sessions` iscsi-perf processes at once, each with its own session.
struct IscsiJob<'a> {
    name: &'a str,
    blocks_per_request: u64,
    max_in_flight: u32,
    random: bool,
    sessions: u32,
}

/// Kills the iscsi-perf processes still running when dropped (after an error).
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Runs `job` against `url` for `runtime_s` seconds; returns the summed "iops average" of its
/// iscsi-perf processes. Their output goes to files in `dir` (read after they exit).
fn iscsi_perf(url: &str, peer: Peer, job: &IscsiJob, runtime_s: u64, dir: &Path) -> Result<f64> {
    let mut children = Children(Vec::new());
    let mut logs = Vec::new();
    for session in 0..job.sessions {
        let log = dir.join(format!("iscsi-perf-{}-{session}.log", peer.name()));
        let log_file = std::fs::File::create(&log)?;
        let mut cmd = Command::new("iscsi-perf");
        // One initiator name per process: two sessions of one initiator with the same ISID
        // would be a session reinstatement, which ends the first one.
        cmd.args([
            "-i",
            &format!("iqn.2026-11.io.grove.bench:initiator-{session}"),
            "-t",
            &runtime_s.to_string(),
            "-b",
            &job.blocks_per_request.to_string(),
            "-m",
            &job.max_in_flight.to_string(),
        ]);
        if job.random {
            cmd.arg("-r");
        }
        cmd.arg(url)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        children.0.push(cmd.spawn().context("starting iscsi-perf")?);
        logs.push(log);
    }
    // iscsi-perf stops by itself after runtime_s; a hung target must not hang the benchmark.
    let deadline = Instant::now() + Duration::from_secs(runtime_s + 30);
    let mut statuses = Vec::new();
    for child in &mut children.0 {
        loop {
            if let Some(status) = child.try_wait()? {
                statuses.push(status);
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "iscsi-perf ({}) on {} did not finish within {}s; see {}",
                    job.name,
                    peer.name(),
                    runtime_s + 30,
                    dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mut iops_sum = 0.0;
    for (status, log) in statuses.iter().zip(&logs) {
        // iscsi-perf redraws its progress line with '\r'; the last "iops average" is the total.
        let text = std::fs::read_to_string(log)?.replace('\r', "\n");
        let iops = text
            .rfind("iops average ")
            .and_then(|at| text[at + "iops average ".len()..].split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok());
        match iops {
            Some(iops) if status.success() => iops_sum += iops,
            _ => {
                let tail: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
                bail!(
                    "iscsi-perf {} on {} ({url}) failed ({status}): {}",
                    job.name,
                    peer.name(),
                    tail[tail.len().saturating_sub(5)..].join(" | ")
                );
            }
        }
    }
    Ok(iops_sum)
}

/// Why tgt cannot run here, if it cannot: it needs root and the tgt package.
fn tgt_unavailable() -> Option<String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string());
    if uid.as_deref() != Some("0") {
        return Some("tgtd needs root".to_string());
    }
    for tool in ["tgtd", "tgtadm"] {
        if !tool_installed(tool) {
            return Some(format!(
                "{tool} is not installed (Debian: apt-get install tgt)"
            ));
        }
    }
    None
}

fn main() -> Result<()> {
    let args = Args::parse();
    let size_mib = args.size_mib.unwrap_or(if args.quick { 256 } else { 4096 });
    let runtime_s = args.runtime_s.unwrap_or(if args.quick { 2 } else { 20 });
    let size_bytes = size_mib << 20;
    let cache_bytes = args.cache_mib << 20;
    let grove = match args.grove {
        Some(path) => path,
        None => {
            let status = Command::new("cargo")
                .args(["build", "--release", "-q", "-p", "grove", "--bin", "grove"])
                .status()?;
            if !status.success() {
                bail!("building grove failed");
            }
            // Where that build put it: $CARGO_TARGET_DIR when set.
            std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| PathBuf::from("target"), PathBuf::from)
                .join("release/grove")
        }
    };
    for tool in ["fio", "qemu-nbd", "qemu-img", "nbdkit", "nbdcopy"] {
        if !tool_installed(tool) {
            bail!("{tool} is not installed (Debian: apt-get install fio qemu-utils nbdkit libnbd-bin)");
        }
    }
    if !args.no_iscsi && !tool_installed("iscsi-perf") {
        bail!("iscsi-perf is not installed (Debian: apt-get install libiscsi-bin), or pass --no-iscsi");
    }
    // Checked now, so that the message comes before the long NBD part.
    let tgt_skipped = if args.no_iscsi {
        None
    } else {
        tgt_unavailable()
    };
    if let Some(why) = &tgt_skipped {
        eprintln!("iSCSI: {why}: no tgt column, grove's iSCSI figures only");
    }
    let tmp = tempfile::tempdir()?;
    check_free_space(tmp.path(), size_bytes)?;
    let dirs: Vec<PathBuf> = Peer::ALL
        .iter()
        .map(|p| tmp.path().join(p.name()))
        .collect();
    for d in &dirs {
        std::fs::create_dir_all(d)?;
    }
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(qcow2_layer(&dirs[1], 0))
        .arg(size_bytes.to_string())
        .status()?;
    if !status.success() {
        bail!("qemu-img create failed");
    }
    let mut servers = vec![
        start_grove(&grove, &dirs[0], cache_bytes, &[("vol", size_bytes)], true)?,
        start_qemu_nbd(&dirs[1], 0)?,
        start_nbdkit(&dirs[2], size_bytes)?,
    ];
    // The same grove with the volume's checksums off, to show what they cost.
    let mut plain = start_grove(&grove, &dirs[3], cache_bytes, &[("vol", size_bytes)], false)?;
    plain.peer = Peer::GroveNoChecksums;
    servers.push(plain);

    eprintln!(
        "filling {size_mib} MiB on each peer, then 10 snapshots each after rewriting 5% of blocks"
    );
    let fill = Job {
        name: "fill",
        rw: "write",
        bs: "1M",
        iodepth: 8,
        numjobs: 1,
        extra: &[],
    };
    let blocks = size_bytes / 4096;
    let rewrite_ios = format!("--number_ios={}", blocks / 20);
    let rewrite = Job {
        name: "rewrite-5pct",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
        numjobs: 1,
        extra: &[&rewrite_ios],
    };
    for server in servers.iter_mut() {
        fio(server, &fill, None, size_bytes)?;
        for n in 0..10 {
            snapshot(server, n)?;
            fio(server, &rewrite, None, size_bytes)?;
        }
    }

    let jobs = [
        Job {
            name: "1: 4k randread QD32, 10 snapshots deep",
            rw: "randread",
            bs: "4k",
            iodepth: 32,
            numjobs: 1,
            extra: &[],
        },
        Job {
            name: "2: 4k randwrite QD32 after a snapshot",
            rw: "randwrite",
            bs: "4k",
            iodepth: 32,
            numjobs: 1,
            extra: &[],
        },
        Job {
            name: "3: 4k randwrite QD32 steady state",
            rw: "randwrite",
            bs: "4k",
            iodepth: 32,
            numjobs: 1,
            extra: &[],
        },
        Job {
            name: "4a: 1M sequential read QD8",
            rw: "read",
            bs: "1M",
            iodepth: 8,
            numjobs: 1,
            extra: &[],
        },
        Job {
            name: "4b: 1M sequential write QD8",
            rw: "write",
            bs: "1M",
            iodepth: 8,
            numjobs: 1,
            extra: &[],
        },
        // The same again: 4b's first pass copies on write every block still shared with the
        // snapshot taken before workload 2 (qcow2 did so per 64 KiB cluster in workloads 2
        // and 3); this one shows sequential writes over blocks the head already owns.
        Job {
            name: "4c: 1M sequential write QD8, again",
            rw: "write",
            bs: "1M",
            iodepth: 8,
            numjobs: 1,
            extra: &[],
        },
        Job {
            name: "5: 4 connections, 4k randrw 70/30 QD8 each",
            rw: "randrw",
            bs: "4k",
            iodepth: 8,
            numjobs: 4,
            extra: &["--rwmixread=70"],
        },
    ];
    // Workload 1 once on every server, untimed, before the timed jobs. The first job after
    // the fills has come out well below what the same server does later (grove with checksums
    // 53,487 IOPS there, grove without 72,419, on the same data), for reasons outside the
    // servers (the machine settling after writing some 30 GB); this gives that place to no one.
    for server in &servers {
        warm_alone(server, &dirs, size_bytes)?;
        fio(server, &jobs[0], Some(runtime_s), size_bytes)?;
    }
    let mut figures = Vec::new();
    for job in &jobs {
        if job.name.starts_with("2:") {
            for (n, server) in servers.iter_mut().enumerate() {
                snapshot(server, 100 + n)?;
            }
        }
        for server in &servers {
            warm_alone(server, &dirs, size_bytes)?;
            let (iops, mib_per_s, lat_p99_us) = fio(server, job, Some(runtime_s), size_bytes)?;
            eprintln!(
                "{:<48} {:<16} {:>10.0} IOPS {:>8.1} MiB/s p99 {:>8.0} us",
                job.name,
                server.peer.name(),
                iops,
                mib_per_s,
                lat_p99_us
            );
            figures.push(Figure {
                workload: job.name.to_string(),
                peer: server.peer,
                iops,
                mib_per_s,
                lat_p99_us: Some(lat_p99_us),
                tool: "fio",
            });
        }
    }

    // Workload 1 once more on both groves, after every other job, grove without checksums
    // first: what checksums cost on random reads, with the two groves in the other order.
    // Only the two groves of this row compare: workloads 4b and 4c have rewritten the volume
    // since workload 1.
    let repeat = Job {
        name: "1 again, after the other jobs",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
        numjobs: 1,
        extra: &[],
    };
    for server in servers
        .iter()
        .rev()
        .filter(|s| matches!(s.peer, Peer::Grove | Peer::GroveNoChecksums))
    {
        warm_alone(server, &dirs, size_bytes)?;
        let (iops, mib_per_s, lat_p99_us) = fio(server, &repeat, Some(runtime_s), size_bytes)?;
        eprintln!(
            "{:<48} {:<16} {:>10.0} IOPS {:>8.1} MiB/s p99 {:>8.0} us",
            repeat.name,
            server.peer.name(),
            iops,
            mib_per_s,
            lat_p99_us
        );
        figures.push(Figure {
            workload: repeat.name.to_string(),
            peer: server.peer,
            iops,
            mib_per_s,
            lat_p99_us: Some(lat_p99_us),
            tool: "fio",
        });
    }

    // The iSCSI jobs: reads only (iscsi-perf cannot write), on the data the NBD jobs left.
    let iscsi_jobs = [
        IscsiJob {
            name: "i1: 4k random read QD32",
            blocks_per_request: 8,
            max_in_flight: 32,
            random: true,
            sessions: 1,
        },
        IscsiJob {
            name: "i2: 1M sequential read QD8",
            blocks_per_request: 2048,
            max_in_flight: 8,
            random: false,
            sessions: 1,
        },
        IscsiJob {
            name: "i3: 4 sessions, 4k random read QD8 each",
            blocks_per_request: 8,
            max_in_flight: 8,
            random: true,
            sessions: 4,
        },
    ];
    let mut iscsi_figures = Vec::new();
    if !args.no_iscsi {
        let grove_server = &mut servers[0];
        let grove_port = grove_server
            .iscsi_port
            .context("grove was started without an iSCSI port")?;
        wait_for_port(grove_port, &mut grove_server.child, "grove's iSCSI target")?;
        let mut targets = vec![(
            Peer::Grove,
            format!("iscsi://127.0.0.1:{grove_port}/iqn.2026-11.io.grove:vol/0"),
        )];
        // Dropped at the end of this block, which stops tgtd, also when a job fails.
        let tgt = match tgt_skipped {
            Some(_) => None,
            None => Some(Tgt::start(
                &nbdkit_file(&dirs[2]),
                &tmp.path().join("tgtd.log"),
            )?),
        };
        if let Some(tgt) = &tgt {
            targets.push((Peer::Tgt, tgt.url()));
        }
        for job in &iscsi_jobs {
            for (peer, url) in &targets {
                // nbdkit serves the file tgt does: reading through it warms tgt's data.
                let warmed = &servers[if *peer == Peer::Grove { 0 } else { 2 }];
                warm_alone(warmed, &dirs, size_bytes)?;
                let iops = iscsi_perf(url, *peer, job, runtime_s, tmp.path())?;
                let mib_per_s =
                    iops * (job.blocks_per_request * ISCSI_BLOCK_BYTES) as f64 / (1 << 20) as f64;
                eprintln!(
                    "{:<48} {:<16} {:>10.0} IOPS {:>8.1} MiB/s",
                    job.name,
                    peer.name(),
                    iops,
                    mib_per_s
                );
                iscsi_figures.push(Figure {
                    workload: job.name.to_string(),
                    peer: *peer,
                    iops,
                    mib_per_s,
                    lat_p99_us: None,
                    tool: "iscsi-perf",
                });
            }
        }
    }

    // Workloads 6 and 7. The diff uses the benchmark volume and qcow2 chain as the jobs left
    // them; nbdkit's file and the second grove go first, as the diff's writes need their room
    // (all four together come close to the 70 GB the README asks for). Then the rest of the
    // peers' data goes and a grove of its own takes the rest.
    let scale = versioning::Scale::new(args.quick, size_bytes, runtime_s, cache_bytes);
    servers.truncate(2);
    for dir in &dirs[2..] {
        std::fs::remove_dir_all(dir)?;
    }
    let (grove_server, peers) = servers.split_at_mut(1);
    let diff = versioning::diff_against_qcow2(&scale, &grove_server[0], &mut peers[0], size_bytes)?;
    drop(servers);
    for dir in &dirs[..2] {
        std::fs::remove_dir_all(dir)?;
    }
    let versioning_dir = tmp.path().join("grove-versioning");
    let grove_figures = versioning::grove_versioning(&scale, &grove, &versioning_dir)?;
    std::fs::remove_dir_all(&versioning_dir)?;
    let qcow2_snapshots = versioning::qcow2_snapshots(&scale, tmp.path())?;
    let versioning = versioning::Report::new(scale, grove_figures, qcow2_snapshots, diff);

    println!(
        "\n{:<48} {:>12} {:>12} {:>12} {:>10} {:>10} {:>14}",
        "workload (IOPS)", "grove", "qemu-nbd", "nbdkit", "/qemu-nbd", "/nbdkit", "/no-checksums"
    );
    for job in jobs.iter().chain([&repeat]) {
        let get = |peer| {
            figures
                .iter()
                .find(|f| f.workload == job.name && f.peer == peer)
                .map(|f| f.iops)
        };
        let g = get(Peer::Grove).unwrap_or(0.0);
        // A peer that did not run the job (the repeat) shows a dash.
        let against = |peer| match get(peer) {
            Some(iops) => (format!("{iops:.0}"), format!("{:.2}x", g / iops.max(1.0))),
            None => ("-".to_string(), "-".to_string()),
        };
        let (q, q_ratio) = against(Peer::QemuNbd);
        let (k, k_ratio) = against(Peer::Nbdkit);
        let (_, plain_ratio) = against(Peer::GroveNoChecksums);
        println!(
            "{:<48} {:>12.0} {:>12} {:>12} {:>10} {:>10} {:>14}",
            job.name, g, q, k, q_ratio, k_ratio, plain_ratio
        );
    }
    if !args.no_iscsi {
        println!(
            "\n{:<48} {:>12} {:>12} {:>10}",
            "iSCSI (iscsi-perf, reads)", "grove", "tgt", "/tgt"
        );
        for job in &iscsi_jobs {
            let get = |peer| {
                iscsi_figures
                    .iter()
                    .find(|f| f.workload == job.name && f.peer == peer)
                    .map(|f| f.iops)
            };
            let g = get(Peer::Grove).unwrap_or(0.0);
            let (t, ratio) = match get(Peer::Tgt) {
                Some(t) => (format!("{t:.0}"), format!("{:.2}x", g / t.max(1.0))),
                None => ("-".to_string(), "-".to_string()),
            };
            println!("{:<48} {:>12.0} {:>12} {:>10}", job.name, g, t, ratio);
        }
        if let Some(why) = &tgt_skipped {
            println!("(no tgt column: {why})");
        }
    }
    versioning.print(args.quick);
    figures.extend(iscsi_figures);
    let iscsi = match (args.no_iscsi, &tgt_skipped) {
        (true, _) => "skipped (--no-iscsi)".to_string(),
        (false, Some(why)) => format!("grove only ({why})"),
        (false, None) => "grove and tgt".to_string(),
    };
    let report = serde_json::json!({
        "size_mib": size_mib,
        "runtime_s": runtime_s,
        "quick": args.quick,
        "iscsi": iscsi,
        "figures": figures,
        "cache_mib": args.cache_mib,
        "versioning": versioning,
    });
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)?)?;
    println!("\nwritten to {}", args.json.display());
    Ok(())
}
