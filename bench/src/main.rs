//! grove's benchmark: starts grove, qemu-nbd (qcow2 with a backing chain, the usual way to get a
//! versioned block device over NBD) and nbdkit's file plugin (a plain NBD server, no
//! versioning) on Unix sockets, runs the same fio jobs (`ioengine=nbd`) against each,
//! interleaved, and prints absolute figures and ratios. Also writes them as JSON.
//!
//! `--quick` is a smoke test of the benchmark itself (small volume, short jobs); its numbers
//! mean little. Machines are shared and noisy: compare ratios from one run, never absolute
//! thresholds.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;

#[derive(Parser)]
#[command(about = "grove vs qemu-nbd (qcow2) vs nbdkit (file), same fio jobs, one run")]
struct Args {
    /// Small volume and short jobs: checks that the benchmark works, in well under a minute.
    #[arg(long)]
    quick: bool,
    /// Volume size in MiB (default 4096, quick 256).
    #[arg(long)]
    size_mib: Option<u64>,
    /// Seconds per fio job (default 20, quick 2).
    #[arg(long)]
    runtime_s: Option<u64>,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "bench-results.json")]
    json: PathBuf,
    /// The grove binary (default: target/release/grove, built if missing).
    #[arg(long)]
    grove: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
enum Peer {
    Grove,
    QemuNbd,
    Nbdkit,
}

impl Peer {
    const ALL: [Peer; 3] = [Peer::Grove, Peer::QemuNbd, Peer::Nbdkit];

    fn name(self) -> &'static str {
        match self {
            Peer::Grove => "grove",
            Peer::QemuNbd => "qemu-nbd+qcow2",
            Peer::Nbdkit => "nbdkit-file",
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
}

impl Server {
    fn uri(&self) -> String {
        format!("nbd+unix:///vol?socket={}", self.socket.display())
    }
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

fn start_grove(grove: &Path, dir: &Path, size_bytes: u64) -> Result<Server> {
    let socket = dir.join("grove.sock");
    let port = free_port()?;
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
            "127.0.0.1:0",
        ])
        .arg("--nbd-socket")
        .arg(&socket)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting grove")?;
    wait_for_socket(&socket, &mut child)?;
    ureq::post(&format!("{api}/v1/volumes"))
        .send_json(serde_json::json!({ "name": "vol", "size": size_bytes }))
        .context("creating the grove volume")?;
    Ok(Server {
        peer: Peer::Grove,
        child,
        socket,
        dir: dir.to_path_buf(),
        api: Some(api),
        layer: 0,
    })
}

fn qcow2_layer(dir: &Path, layer: usize) -> PathBuf {
    dir.join(format!("layer{layer}.qcow2"))
}

fn start_qemu_nbd(dir: &Path, layer: usize) -> Result<Server> {
    let socket = dir.join("qemu.sock");
    let _ = std::fs::remove_file(&socket);
    let mut child = Command::new("qemu-nbd")
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
    })
}

fn start_nbdkit(dir: &Path, size_bytes: u64) -> Result<Server> {
    let socket = dir.join("nbdkit.sock");
    let file = dir.join("disk.raw");
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
    })
}

/// Takes a snapshot the way each peer does it: a grove commit, a new qcow2 layer.
fn snapshot(server: &mut Server, n: usize) -> Result<()> {
    match server.peer {
        Peer::Grove => {
            let api = server.api.as_deref().unwrap_or_default();
            ureq::post(&format!("{api}/v1/volumes/vol/branches/main/commits"))
                .send_json(serde_json::json!({ "message": format!("snapshot {n}") }))
                .context("grove commit")?;
        }
        Peer::QemuNbd => {
            let _ = server.child.kill();
            let _ = server.child.wait();
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
        Peer::Nbdkit => {}
    }
    Ok(())
}

#[derive(Serialize, Clone)]
struct Figure {
    workload: String,
    peer: Peer,
    iops: f64,
    mib_per_s: f64,
    lat_p99_us: f64,
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
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=bench",
        "--ioengine=nbd",
        &format!("--uri={}", server.uri()),
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
    let out = cmd.output().context("running fio")?;
    if !out.status.success() {
        bail!(
            "fio {} on {} failed: {}",
            job.name,
            server.peer.name(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
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

fn main() -> Result<()> {
    let args = Args::parse();
    let size_mib = args.size_mib.unwrap_or(if args.quick { 256 } else { 4096 });
    let runtime_s = args.runtime_s.unwrap_or(if args.quick { 2 } else { 20 });
    let size_bytes = size_mib << 20;
    let grove = match args.grove {
        Some(path) => path,
        None => {
            let status = Command::new("cargo")
                .args(["build", "--release", "-q", "-p", "grove", "--bin", "grove"])
                .status()?;
            if !status.success() {
                bail!("building grove failed");
            }
            PathBuf::from("target/release/grove")
        }
    };
    for tool in ["fio", "qemu-nbd", "qemu-img", "nbdkit"] {
        if Command::new("which")
            .arg(tool)
            .stdout(Stdio::null())
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            bail!("{tool} is not installed (Debian: apt-get install fio qemu-utils nbdkit)");
        }
    }
    let tmp = tempfile::tempdir()?;
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
        start_grove(&grove, &dirs[0], size_bytes)?,
        start_qemu_nbd(&dirs[1], 0)?,
        start_nbdkit(&dirs[2], size_bytes)?,
    ];

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
        Job {
            name: "5: 4 connections, 4k randrw 70/30 QD8 each",
            rw: "randrw",
            bs: "4k",
            iodepth: 8,
            numjobs: 4,
            extra: &["--rwmixread=70"],
        },
    ];
    let mut figures = Vec::new();
    for job in &jobs {
        if job.name.starts_with("2:") {
            for (n, server) in servers.iter_mut().enumerate() {
                snapshot(server, 100 + n)?;
            }
        }
        for server in &servers {
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
                lat_p99_us,
            });
        }
    }

    println!(
        "\n{:<48} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "workload (IOPS)", "grove", "qemu-nbd", "nbdkit", "/qemu-nbd", "/nbdkit"
    );
    for job in &jobs {
        let get = |peer| {
            figures
                .iter()
                .find(|f| f.workload == job.name && f.peer == peer)
                .map(|f| f.iops)
                .unwrap_or(0.0)
        };
        let (g, q, k) = (get(Peer::Grove), get(Peer::QemuNbd), get(Peer::Nbdkit));
        println!(
            "{:<48} {:>12.0} {:>12.0} {:>12.0} {:>9.2}x {:>9.2}x",
            job.name,
            g,
            q,
            k,
            g / q.max(1.0),
            g / k.max(1.0)
        );
    }
    let report = serde_json::json!({ "size_mib": size_mib, "runtime_s": runtime_s, "quick": args.quick, "figures": figures });
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)?)?;
    println!("\nwritten to {}", args.json.display());
    Ok(())
}
