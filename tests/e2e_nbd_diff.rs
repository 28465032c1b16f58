//! End-to-end: the differences between refs over NBD, through the metadata contexts
//! `grove:diff:REF` and `qemu:dirty-bitmap:REF`, read by unmodified clients: `nbdinfo --map`,
//! `qemu-img map` with QEMU's `x-dirty-bitmap` option, and an incremental backup that copies
//! only the dirty extents with `qemu-img convert` and checks the result with `qemu-img
//! compare`. Writes go through qemu-io; volumes, commits, tags and clones through the CLI.

mod support;

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use support::{qio_write, require_nbd_tools, run, CmdOut, Grove, Rng, KIB, MIB, TOOL_TIMEOUT};

const BLOCK: u64 = 4 * KIB;
const VOLUME_SIZE: u64 = 64 * MIB;

/// One extent of an `nbdinfo --map=CONTEXT` listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MapEntry {
    offset: u64,
    length: u64,
    flags: u64,
}

fn nbdinfo_context(context: &str, uri: &str) -> CmdOut {
    run(
        Command::new("nbdinfo")
            .arg("--json")
            .arg(format!("--map={context}"))
            .arg(uri),
        TOOL_TIMEOUT,
    )
}

/// `nbdinfo --map=CONTEXT --json URI`, checked to cover the export exactly, in order, with
/// no flag but bit 0 (the only one the diff contexts define).
fn nbdinfo_context_map(context: &str, uri: &str) -> Vec<MapEntry> {
    let out = nbdinfo_context(context, uri);
    out.assert_success();
    let value: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|error| panic!("nbdinfo --map --json: {error}\n{}", out.report()));
    let entries: Vec<MapEntry> = value
        .as_array()
        .expect("nbdinfo --map --json prints an array")
        .iter()
        .map(|entry| MapEntry {
            offset: entry["offset"].as_u64().expect("offset"),
            length: entry["length"].as_u64().expect("length"),
            flags: entry["type"].as_u64().expect("type"),
        })
        .collect();
    let mut position = 0;
    for entry in &entries {
        assert_eq!(
            entry.offset, position,
            "the map of {context} is contiguous: {entries:?}"
        );
        assert!(entry.length > 0 && entry.flags <= 1, "{entry:?}");
        position += entry.length;
    }
    assert_eq!(position, VOLUME_SIZE, "the map covers the export");
    entries
}

/// The ranges flagged dirty (bit 0), coalesced.
fn dirty_ranges(entries: &[MapEntry]) -> Vec<(u64, u64)> {
    coalesce(
        entries
            .iter()
            .filter(|entry| entry.flags & 1 != 0)
            .map(|entry| (entry.offset, entry.length)),
    )
}

/// Sorted, merged `(offset, length)` ranges.
fn coalesce(ranges: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut sorted: Vec<(u64, u64)> = ranges.into_iter().filter(|r| r.1 > 0).collect();
    sorted.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (offset, length) in sorted {
        match out.last_mut() {
            Some(last) if last.0 + last.1 >= offset => {
                last.1 = last.1.max(offset + length - last.0);
            }
            _ => out.push((offset, length)),
        }
    }
    out
}

/// The 4 KiB blocks a set of written byte ranges touches, as coalesced byte ranges: what a
/// diff of block mappings must report.
fn touched_blocks(writes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut blocks = BTreeSet::new();
    for &(offset, length) in writes {
        for block in offset / BLOCK..(offset + length).div_ceil(BLOCK) {
            blocks.insert(block);
        }
    }
    coalesce(blocks.into_iter().map(|block| (block * BLOCK, BLOCK)))
}

fn total(ranges: &[(u64, u64)]) -> u64 {
    ranges.iter().map(|(_, length)| length).sum()
}

/// A volume `vm` with two commits. Returns `(C1, C2, ranges written between them)`.
fn two_commits(grove: &Grove) -> (String, String, Vec<(u64, u64)>) {
    grove.create_volume("vm", "64MiB");
    let uri = grove.unix_uri("vm");
    qio_write(
        &uri,
        &[
            "write -P 0xaa 0 1M",
            "write -P 0xbb 8M 64k",
            "write -P 0x11 40M 4k",
        ],
    );
    let first = grove.commit("vm", "base image");
    // Over data and holes, aligned and not, zeroes over data included.
    qio_write(
        &uri,
        &[
            "write -P 0xcc 512k 4k",
            "write -z 256k 64k",
            "write -P 0xdd 20M 100k",
            "write -P 0xee 31458280 10",
            "write -P 0xff 52426752 4k",
        ],
    );
    let written = vec![
        (512 * KIB, 4 * KIB),
        (256 * KIB, 64 * KIB),
        (20 * MIB, 100 * KIB),
        (31_458_280, 10),
        (52_426_752, 4 * KIB),
    ];
    let second = grove.commit("vm", "after a day of writes");
    (first, second, written)
}

#[test]
fn nbdinfo_map_shows_exactly_the_changed_extents() {
    require_nbd_tools();
    let mut grove = Grove::start();
    let (first, second, written) = two_commits(&grove);
    let expected = touched_blocks(&written);
    assert_eq!(
        expected,
        [
            (256 * KIB, 64 * KIB),
            (512 * KIB, 4 * KIB),
            (20 * MIB, 100 * KIB),
            (30 * MIB, 4 * KIB),
            (50 * MIB - 2 * KIB - 2 * KIB, 8 * KIB),
        ]
    );
    grove.cli_ok(&["tag", "create", "vm", "monday", &first]);

    // The example: grove:diff:VOL@C1 on the export VOL@C2, over TCP.
    let c2_tcp = grove.tcp_uri(&format!("vm@{second}"));
    let map = nbdinfo_context_map(&format!("grove:diff:vm@{first}"), &c2_tcp);
    assert_eq!(dirty_ranges(&map), expected, "{map:?}");

    // The same through the QEMU name, over the Unix socket, naming C1 by prefix, by bare id
    // and by tag; and from a tag export of C2.
    grove.cli_ok(&["tag", "create", "vm", "tuesday", &second]);
    let prefix = &first[..10];
    for (context, export) in [
        (
            format!("qemu:dirty-bitmap:vm@{first}"),
            format!("vm@{second}"),
        ),
        (
            format!("qemu:dirty-bitmap:{prefix}"),
            format!("vm@{second}"),
        ),
        (format!("grove:diff:{first}"), "vm@tuesday".to_string()),
        (
            "qemu:dirty-bitmap:monday".to_string(),
            "vm@tuesday".to_string(),
        ),
        // The other direction marks the same blocks.
        (format!("grove:diff:{second}"), format!("vm@{first}")),
    ] {
        let map = nbdinfo_context_map(&context, &grove.unix_uri(&export));
        assert_eq!(
            dirty_ranges(&map),
            expected,
            "{context} on {export}: {map:?}"
        );
    }
    // A ref compared with itself: nothing differs.
    let map = nbdinfo_context_map(&format!("grove:diff:{second}"), &c2_tcp);
    assert_eq!(
        map,
        [MapEntry {
            offset: 0,
            length: VOLUME_SIZE,
            flags: 0
        }]
    );
    grove.assert_healthy();
}

#[test]
fn qemu_img_map_with_x_dirty_bitmap_reports_dirty_extents_as_holes() {
    require_nbd_tools();
    let mut grove = Grove::start();
    let (first, second, written) = two_commits(&grove);
    let expected = touched_blocks(&written);
    let socket = grove.socket.display().to_string();
    let port = grove.nbd_port.to_string();
    for (server, context) in [
        (
            format!("server.type=unix,server.path={socket}"),
            format!("qemu:dirty-bitmap:{first}"),
        ),
        (
            format!("server.type=inet,server.host=127.0.0.1,server.port={port}"),
            format!("qemu:dirty-bitmap:vm@{first}"),
        ),
    ] {
        let options = format!("driver=nbd,{server},export=vm@{second},x-dirty-bitmap={context}");
        let out = run(
            Command::new("qemu-img").args(["map", "--output=json", "--image-opts", &options]),
            TOOL_TIMEOUT,
        );
        out.assert_success();
        let entries: Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|error| panic!("qemu-img map json: {error}\n{}", out.report()));
        let entries = entries.as_array().expect("qemu-img map prints an array");
        // QEMU reads the dirty-bitmap context as if it were base:allocation: a dirty extent
        // (bit 0) comes back as a hole, "data": false; clean extents as data.
        let mut position = 0;
        let mut dirty = Vec::new();
        for entry in entries {
            let start = entry["start"].as_u64().expect("start");
            let length = entry["length"].as_u64().expect("length");
            assert_eq!(
                start,
                position,
                "qemu-img map is contiguous\n{}",
                out.report()
            );
            position += length;
            if entry["data"] == Value::Bool(false) {
                dirty.push((start, length));
            }
        }
        assert_eq!(position, VOLUME_SIZE);
        assert_eq!(coalesce(dirty), expected, "{}", out.report());
    }
    grove.assert_healthy();
}

/// Copies `[offset, offset + length)` of an export into `image` at the same offset, reading
/// it with `qemu-img convert` through the raw driver's offset and size options.
fn copy_range(grove: &Grove, export: &str, offset: u64, length: u64, image: &Path, work: &Path) {
    let piece = work.join("piece.raw");
    let options = format!(
        "driver=raw,offset={offset},size={length},file.driver=nbd,file.server.type=unix,file.server.path={},file.export={export}",
        grove.socket.display()
    );
    run(
        Command::new("qemu-img")
            .args(["convert", "--image-opts", &options, "-O", "raw"])
            .arg(&piece),
        TOOL_TIMEOUT,
    )
    .assert_success();
    let bytes = std::fs::read(&piece).expect("read the copied range");
    assert_eq!(
        bytes.len() as u64,
        length,
        "qemu-img convert copied the range"
    );
    let target = OpenOptions::new()
        .write(true)
        .open(image)
        .expect("open the backup image");
    target
        .write_all_at(&bytes, offset)
        .expect("write into the backup image");
}

fn qemu_img_compare(image: &Path, uri: &str) -> CmdOut {
    run(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(image)
            .arg(uri),
        TOOL_TIMEOUT,
    )
}

#[test]
fn incremental_backup_copies_only_dirty_extents() {
    require_nbd_tools();
    let mut grove = Grove::start();
    grove.create_volume("db", "64MiB");
    let uri = grove.unix_uri("db");
    qio_write(&uri, &["write -P 0x5a 0 16M", "write -P 0xa5 40M 8M"]);
    let full = grove.commit("db", "full backup point");

    // Random writes of random sizes, some crossing block boundaries, some zeroes.
    let mut rng = Rng::new(2026);
    let mut written = Vec::new();
    let mut zeroed = Vec::new();
    let mut commands = Vec::new();
    for index in 0..60 {
        let length = 1 + rng.below(48 * KIB);
        let offset = rng.below(VOLUME_SIZE - length);
        if index % 7 == 0 {
            commands.push(format!("write -z {offset} {length}"));
            zeroed.push((offset, length));
        } else {
            let pattern = 1 + rng.below(254);
            commands.push(format!("write -P {pattern} {offset} {length}"));
        }
        written.push((offset, length));
    }
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    qio_write(&uri, &commands);
    let incremental = grove.commit("db", "incremental backup point");

    // The full backup: C1's whole content.
    let work = grove.root().to_path_buf();
    let image = work.join("backup.raw");
    let c1_uri = grove.unix_uri(&format!("db@{full}"));
    let c2_uri = grove.unix_uri(&format!("db@{incremental}"));
    run(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &c1_uri])
            .arg(&image),
        TOOL_TIMEOUT,
    )
    .assert_success();
    let out = qemu_img_compare(&image, &c2_uri);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the full backup differs from C2 before the incremental step\n{}",
        out.report()
    );

    // The incremental step: only what the dirty bitmap marks.
    let map = nbdinfo_context_map(&format!("qemu:dirty-bitmap:db@{full}"), &c2_uri);
    let dirty = dirty_ranges(&map);
    // Nothing outside the written blocks is dirty, and every block only data was written to
    // is (zeroes written over holes change nothing, so those blocks may be clean).
    let touched = touched_blocks(&written);
    let inside = |ranges: &[(u64, u64)], (offset, length): (u64, u64)| {
        ranges
            .iter()
            .any(|(start, len)| *start <= offset && offset + length <= start + len)
    };
    assert!(
        dirty.iter().all(|range| inside(&touched, *range)),
        "dirty {dirty:?}\ntouched {touched:?}"
    );
    let zeroed = touched_blocks(&zeroed);
    for block in touched
        .iter()
        .flat_map(|(start, len)| (*start..start + len).step_by(BLOCK as usize))
        .filter(|block| !inside(&zeroed, (*block, BLOCK)))
    {
        assert!(
            inside(&dirty, (block, BLOCK)),
            "block at {block} is dirty: {dirty:?}"
        );
    }
    assert!(
        total(&dirty) * 10 < VOLUME_SIZE,
        "an incremental copies a small part: {} bytes",
        total(&dirty)
    );
    for &(offset, length) in &dirty {
        copy_range(
            &grove,
            &format!("db@{incremental}"),
            offset,
            length,
            &image,
            &work,
        );
    }
    let out = qemu_img_compare(&image, &c2_uri);
    assert!(
        out.success(),
        "C1's full copy plus the dirty extents equals C2\n{}",
        out.report()
    );
    // The same check against a whole-image copy of C2 made by qemu-img convert.
    let whole = work.join("c2.raw");
    run(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &c2_uri])
            .arg(&whole),
        TOOL_TIMEOUT,
    )
    .assert_success();
    assert_eq!(
        std::fs::read(&image).expect("read backup"),
        std::fs::read(&whole).expect("read copy"),
        "the incremental backup is byte-identical to a full copy of C2"
    );
    grove.assert_healthy();
}

#[test]
fn branch_head_diff_shows_uncommitted_writes() {
    require_nbd_tools();
    let mut grove = Grove::start();
    let (first, second, written) = two_commits(&grove);
    let head = grove.tcp_uri("vm");
    let since_first = format!("grove:diff:vm@{first}");
    let since_second = format!("qemu:dirty-bitmap:{second}");
    // The head equals C2 until someone writes.
    assert_eq!(dirty_ranges(&nbdinfo_context_map(&since_second, &head)), []);
    qio_write(
        &grove.unix_uri("vm"),
        &["write -P 0x77 60M 12k", "write -P 0x78 100k 1"],
    );
    let uncommitted = vec![(60 * MIB, 12 * KIB), (100 * KIB, 1)];
    assert_eq!(
        dirty_ranges(&nbdinfo_context_map(&since_second, &head)),
        touched_blocks(&uncommitted)
    );
    let mut both = written.clone();
    both.extend_from_slice(&uncommitted);
    assert_eq!(
        dirty_ranges(&nbdinfo_context_map(&since_first, &head)),
        touched_blocks(&both)
    );
    // More writes show at once (nothing is cached across requests for a branch head).
    qio_write(&grove.unix_uri("vm"), &["write -P 0x79 10M 4k"]);
    let more = [(60 * MIB, 12 * KIB), (100 * KIB, 1), (10 * MIB, 4 * KIB)];
    assert_eq!(
        dirty_ranges(&nbdinfo_context_map(&since_second, &head)),
        touched_blocks(&more)
    );

    // A branch from C1 and a clone of C1 compare with C1 and with each other's history.
    grove.cli_ok(&["branch", "create", "vm", "dev", "--from", &first]);
    qio_write(&grove.unix_uri("vm@dev"), &["write -P 0x01 4M 8k"]);
    assert_eq!(
        dirty_ranges(&nbdinfo_context_map(
            &format!("grove:diff:{first}"),
            &grove.unix_uri("vm@dev")
        )),
        [(4 * MIB, 8 * KIB)]
    );
    grove.cli_ok(&["volume", "clone", &format!("vm@{first}"), "vmcopy"]);
    qio_write(&grove.unix_uri("vmcopy"), &["write -P 0x02 5M 4k"]);
    assert_eq!(
        dirty_ranges(&nbdinfo_context_map(
            &format!("grove:diff:vm@{first}"),
            &grove.unix_uri("vmcopy")
        )),
        [(5 * MIB, 4 * KIB)]
    );
    grove.assert_healthy();
}

#[test]
fn bad_refs_are_not_selected() {
    require_nbd_tools();
    let mut grove = Grove::start();
    let (first, second, _) = two_commits(&grove);
    grove.create_volume("other", "64MiB");
    let c2 = format!("vm@{second}");
    for context in [
        "grove:diff:nope".to_string(),
        "qemu:dirty-bitmap:vm@nope".to_string(),
        "grove:diff:other".to_string(),
        "grove:diff:".to_string(),
        "qemu:dirty-bitmap:".to_string(),
        "grove:diff:deadbeefdeadbeef".to_string(),
    ] {
        let out = nbdinfo_context(&context, &grove.unix_uri(&c2));
        assert!(
            !out.success() && out.stderr.contains("does not support metadata context"),
            "{context} must not be selected\n{}",
            out.report()
        );
    }
    let options = format!(
        "driver=nbd,server.type=unix,server.path={},export={c2},x-dirty-bitmap=qemu:dirty-bitmap:nope",
        grove.socket.display()
    );
    let out = run(
        Command::new("qemu-img").args(["map", "--output=json", "--image-opts", &options]),
        TOOL_TIMEOUT,
    );
    assert!(
        !out.success(),
        "qemu refuses a bitmap the server lacks\n{}",
        out.report()
    );

    // The listing nbdinfo prints offers the volume's refs in both namespaces, and nothing of
    // the other volume.
    let out = run(
        Command::new("nbdinfo")
            .arg("--json")
            .arg(grove.unix_uri(&c2)),
        TOOL_TIMEOUT,
    );
    out.assert_success();
    let info: Value = serde_json::from_str(&out.stdout).expect("nbdinfo --json");
    let contexts: Vec<String> = info["exports"][0]["contexts"]
        .as_array()
        .unwrap_or_else(|| panic!("nbdinfo lists contexts\n{}", out.report()))
        .iter()
        .filter_map(|context| context.as_str().map(str::to_string))
        .collect();
    for expected in [
        "base:allocation".to_string(),
        "grove:diff:vm".to_string(),
        format!("grove:diff:vm@{first}"),
        format!("qemu:dirty-bitmap:vm@{first}"),
        format!("qemu:dirty-bitmap:vm@{second}"),
    ] {
        assert!(contexts.contains(&expected), "{expected} in {contexts:?}");
    }
    assert!(!contexts.iter().any(|context| context.contains("other")));
    grove.assert_healthy();
}
