//! End-to-end: data integrity. Blocks written over NBD by qemu-io get checksums; a byte flipped
//! in `data.grove` while grove is stopped makes reads of that block fail with EIO (qemu-io,
//! nbdcopy, qemu-img convert) while its neighbours read fine, logs one `data.corrupted` event
//! with the block's offset, counts in `/metrics`, and makes `grove scrub --wait` exit non-zero
//! naming the offset; writing the block again makes everything clean. A volume created with
//! `--no-checksums` reads the damaged bytes back. After `kill -9` in the middle of unflushed
//! in-place overwrites, a full read and a scrub find no checksum errors.

mod support;

use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    assert_pattern, metric_sample, nbdcopy_out, promtool_check, qemu_io, qio_write,
    require_nbd_tools, require_tool, run, Grove, KIB, TOOL_TIMEOUT,
};

const BLOCK_BYTES: u64 = 4 * KIB;
/// Blocks written to each volume, block `i` filled with the volume's first pattern plus `i`.
const BLOCKS: u64 = 16;
/// The block damaged on disk.
const DAMAGED: u64 = 5;
const SUMS_PATTERN: u8 = 0x20;
const RAW_PATTERN: u8 = 0x60;
/// Where in its block the damaged byte is.
const DAMAGED_BYTE: usize = 100;

/// Writes blocks `0..BLOCKS` of `export`, block `i` filled with `first + i`.
fn write_blocks(grove: &Grove, export: &str, first: u8) {
    let commands: Vec<String> = (0..BLOCKS)
        .map(|i| {
            format!(
                "write -P 0x{:02x} {} {BLOCK_BYTES}",
                first + i as u8,
                i * BLOCK_BYTES
            )
        })
        .collect();
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    qio_write(&grove.tcp_uri(export), &commands);
}

/// Flips a byte of the one block of `data.grove` filled with `pattern`; returns the block's
/// index in the file.
fn damage(grove: &Grove, pattern: u8) -> u64 {
    let path = grove.data_dir.join("data.grove");
    let image = std::fs::read(&path).expect("read data.grove");
    let found: Vec<usize> = image
        .chunks_exact(BLOCK_BYTES as usize)
        .enumerate()
        .filter(|(_, block)| block.iter().all(|&b| b == pattern))
        .map(|(index, _)| index)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "blocks of data.grove filled with 0x{pattern:02x}: {found:?}"
    );
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open data.grove");
    let at = found[0] as u64 * BLOCK_BYTES + DAMAGED_BYTE as u64;
    file.write_all_at(&[pattern ^ 0x01], at)
        .expect("damage data.grove");
    file.sync_all().expect("sync data.grove");
    found[0] as u64
}

fn scrape(grove: &Grove) -> String {
    let reply = grove.http("GET", "/metrics", None);
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.body
}

/// `grove events --type data.corrupted --json`: one JSON object per line.
fn corruption_events(grove: &Grove) -> Vec<Value> {
    let out = grove.cli(&["events", "--type", "data.corrupted", "--json"]);
    out.assert_success();
    out.stdout
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).expect("an event per line"))
        .collect()
}

/// Waits for `count` `data.corrupted` events (they are logged just after the read that found
/// the damage is answered).
fn wait_corruption_events(grove: &Grove, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = corruption_events(grove);
        if events.len() >= count || Instant::now() > deadline {
            return events;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `qemu-img convert` of a whole export into a file; the command's result and the file.
fn convert(grove: &Grove, export: &str, name: &str) -> (support::CmdOut, std::path::PathBuf) {
    let path = grove.root().join(name);
    let out = run(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(grove.tcp_uri(export))
            .arg(&path),
        TOOL_TIMEOUT,
    );
    (out, path)
}

fn scrub_status(grove: &Grove) -> Value {
    grove.cli_json(&["scrub", "--status"])
}

#[test]
fn damaged_blocks_fail_their_reads_and_scrubs_find_them() {
    require_nbd_tools();
    require_tool("promtool", "prometheus");
    let mut grove = Grove::start();
    let created = grove.http(
        "POST",
        "/v1/volumes",
        Some(r#"{"name": "sums", "size": "16MiB"}"#),
    );
    assert_eq!(created.status, 201, "{created:?}");
    assert_eq!(created.json()["checksums"], true, "{created:?}");
    let out = grove.cli_ok(&[
        "volume",
        "create",
        "raw",
        "--size",
        "16MiB",
        "--no-checksums",
    ]);
    assert!(out.contains("checksums off"), "{out}");
    assert_eq!(
        grove.cli_json(&["volume", "show", "raw"])["checksums"],
        false
    );
    let listed = grove.cli_ok(&["volume", "list"]);
    let row = |name: &str| {
        listed
            .lines()
            .find(|line| line.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name}:\n{listed}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert!(listed
        .lines()
        .next()
        .is_some_and(|h| h.contains("CHECKSUMS")));
    assert!(row("raw").contains(&"off"), "{listed}");
    assert!(row("sums").contains(&"on"), "{listed}");

    write_blocks(&grove, "sums", SUMS_PATTERN);
    write_blocks(&grove, "raw", RAW_PATTERN);
    grove.wait_no_sessions();
    let status = grove.terminate();
    assert!(status.success(), "grove exited with {status}");
    let damaged_sums = damage(&grove, SUMS_PATTERN + DAMAGED as u8);
    damage(&grove, RAW_PATTERN + DAMAGED as u8);
    grove.spawn();

    // The damaged block fails its reads; its neighbours read fine.
    let sums = grove.tcp_uri("sums");
    let offset = DAMAGED * BLOCK_BYTES;
    let read = qemu_io(
        &sums,
        &[format!(
            "read -P 0x{:02x} {offset} 4k",
            SUMS_PATTERN + DAMAGED as u8
        )],
        true,
    );
    assert!(
        read.combined().contains("Input/output error"),
        "a read of the damaged block must fail with EIO\n{}",
        read.report()
    );
    assert_pattern(
        &sums,
        SUMS_PATTERN + DAMAGED as u8 - 1,
        offset - BLOCK_BYTES,
        BLOCK_BYTES,
    );
    assert_pattern(
        &sums,
        SUMS_PATTERN + DAMAGED as u8 + 1,
        offset + BLOCK_BYTES,
        BLOCK_BYTES,
    );
    // Whole-volume copies fail rather than copy bad data.
    let copy = run(
        Command::new("nbdcopy")
            .arg(&sums)
            .arg(grove.root().join("sums-nbdcopy.img")),
        TOOL_TIMEOUT,
    );
    assert!(
        !copy.success(),
        "nbdcopy must fail on the damaged block\n{}",
        copy.report()
    );
    let (converted, _) = convert(&grove, "sums", "sums-convert.img");
    assert!(
        !converted.success(),
        "qemu-img convert must fail on the damaged block\n{}",
        converted.report()
    );

    // One event for the block, however often it was read.
    let events = wait_corruption_events(&grove, 1);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["volume"], "sums");
    assert_eq!(events[0]["export"], "sums");
    assert_eq!(events[0]["offset_bytes"], offset);
    assert_eq!(events[0]["data_block"], damaged_sums);
    assert_eq!(events[0]["found_by"], "read");
    let metrics = scrape(&grove);
    assert!(
        metric_sample(&metrics, "grove_checksum_errors_total", &[]).unwrap_or_default() >= 1.0,
        "{metrics}"
    );

    // A scrub finds it, names it, and fails.
    let none = grove.cli_err(&["scrub", "--status"]);
    assert!(
        none.stderr.contains("no scrub has run"),
        "{}",
        none.report()
    );
    grove
        .http("GET", "/v1/pool/scrub", None)
        .assert_error(&[404], "GET /v1/pool/scrub before any scrub");
    let out = grove.cli_err(&["scrub", "--wait"]);
    assert!(
        out.stdout.contains(&offset.to_string()) && out.stdout.contains("sums"),
        "`grove scrub --wait` must name the bad block\n{}",
        out.report()
    );
    assert!(out.stderr.contains("1 block"), "{}", out.report());
    let report = scrub_status(&grove);
    assert_eq!(report["state"], "completed", "{report}");
    assert_eq!(report["checked_blocks"], BLOCKS, "{report}");
    assert_eq!(report["unchecked_blocks"], BLOCKS, "{report}");
    assert_eq!(report["bad_blocks"], 1, "{report}");
    assert_eq!(report["errors"][0]["export"], "sums");
    assert_eq!(report["errors"][0]["offset_bytes"], offset);
    assert_eq!(report["errors"][0]["data_block"], damaged_sums);
    assert_eq!(
        corruption_events(&grove).len(),
        1,
        "found before: no new event"
    );
    let metrics = scrape(&grove);
    promtool_check(&metrics);
    assert_eq!(
        metric_sample(&metrics, "grove_scrub_bad_blocks", &[]),
        Some(1.0)
    );
    assert!(metric_sample(&metrics, "grove_checksum_errors_total", &[]).unwrap_or_default() >= 2.0);

    // Without checksums the damaged bytes come back, and nothing else changed.
    let raw = grove.tcp_uri("raw");
    qemu_io(&raw, &[format!("read {offset} 4k")], true).assert_success();
    let image = nbdcopy_out(&raw, &grove.root().join("raw.img"));
    for i in 0..BLOCKS {
        let start = (i * BLOCK_BYTES) as usize;
        let mut want = vec![RAW_PATTERN + i as u8; BLOCK_BYTES as usize];
        if i == DAMAGED {
            want[DAMAGED_BYTE] ^= 0x01;
        }
        assert!(
            image[start..start + BLOCK_BYTES as usize] == want[..],
            "block {i} of the volume without checksums"
        );
    }
    assert!(image[(BLOCKS * BLOCK_BYTES) as usize..]
        .iter()
        .all(|&b| b == 0));

    // Writing the block again repairs it.
    qio_write(&sums, &[&format!("write -P 0x77 {offset} 4k")]);
    assert_pattern(&sums, 0x77, offset, BLOCK_BYTES);
    let (converted, path) = convert(&grove, "sums", "sums-repaired.img");
    converted.assert_success();
    let image = std::fs::read(&path).expect("read the copy");
    assert!(image[offset as usize..(offset + BLOCK_BYTES) as usize]
        .iter()
        .all(|&b| b == 0x77));
    let out = grove.cli_ok(&["scrub", "--wait"]);
    assert!(out.contains("bad:"), "{out}");
    let report = scrub_status(&grove);
    assert_eq!(report["bad_blocks"], 0, "{report}");
    assert_eq!(report["checked_blocks"], BLOCKS, "{report}");
    assert_eq!(report["errors"], serde_json::json!([]));
}

#[test]
fn a_crash_during_in_place_overwrites_leaves_no_checksum_errors() {
    require_nbd_tools();
    let mut grove = Grove::start();
    grove.create_volume("crash", "16MiB");
    // 1 MiB written and flushed, then overwritten in place, whole blocks and parts of blocks,
    // many times without a flush, until grove is killed.
    let mut commands = vec!["write -P 0x01 0 1M".to_string(), "flush".to_string()];
    for i in 0..4000u64 {
        let pattern = 2 + (i % 250);
        let region = (i % 16) * 64 * KIB;
        commands.push(match i % 3 {
            0 => format!("write -P {pattern} {region} 64k"),
            1 => format!("write -P {pattern} {} 4k", region + 8 * KIB),
            _ => format!("write -P {pattern} {} 3000", region + 1000),
        });
    }
    let mut writer = Command::new("qemu-io");
    writer.args(["-f", "raw"]);
    for command in &commands {
        writer.arg("-c").arg(command);
    }
    let mut writer = writer
        .arg(grove.tcp_uri("crash"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-io");
    // Kill grove once the overwrites are well under way.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sessions = grove.http("GET", "/v1/sessions", None).json();
        let writes = sessions
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["export"] == "crash")
            .filter_map(|s| s["counters"]["write_ops"].as_u64())
            .max()
            .unwrap_or(0);
        if writes >= 300 {
            break;
        }
        assert!(
            writer.try_wait().expect("try_wait").is_none(),
            "qemu-io ended before the overwrites were under way"
        );
        assert!(
            Instant::now() < deadline,
            "qemu-io wrote {writes} times in 30 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    grove.kill9();
    let deadline = Instant::now() + Duration::from_secs(30);
    while writer.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = writer.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = writer.wait();
    grove.spawn();
    assert!(
        grove.log_text().contains("not closed cleanly"),
        "the crash must leave in-place writes to recover\n{}",
        grove.log_text()
    );

    // Every block reads: the flushed megabyte holds one pattern or another, never zeros.
    let (converted, path) = convert(&grove, "crash", "crash.img");
    converted.assert_success();
    let image = std::fs::read(&path).expect("read the copy");
    assert_eq!(image.len() as u64, 16 * 1024 * KIB);
    assert!(
        image[..(1024 * KIB) as usize].iter().all(|&b| b != 0),
        "a zero byte in the flushed megabyte"
    );
    assert!(image[(1024 * KIB) as usize..].iter().all(|&b| b == 0));
    assert_eq!(
        metric_sample(&scrape(&grove), "grove_checksum_errors_total", &[]),
        Some(0.0)
    );
    grove.cli_ok(&["scrub", "--wait"]);
    let report = scrub_status(&grove);
    assert_eq!(report["bad_blocks"], 0, "{report}");
    assert_eq!(report["checked_blocks"], 256, "{report}");
    assert!(corruption_events(&grove).is_empty());
}
