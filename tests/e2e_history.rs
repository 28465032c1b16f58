//! End-to-end: history operations of the real binary, driven through its CLI (and a few raw
//! HTTP calls) with data written and checked only by independent NBD clients (qemu-io,
//! qemu-img, nbdcopy): diffs between siblings, ancestors and dirty heads; merges with every
//! strategy, fast-forwards and conflicts; reset; blame; clones; and space that really comes
//! back to the pool (`grove pool --json` before and after) when branches, commits and clones
//! are deleted. Bad input must fail with a clear error and change nothing.

mod support;

use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    assert_pattern, assert_patterns, assert_same_bytes, nbd, nbdcopy_out, pseudo_random_bytes,
    require_nbd_tools, run, write_pattern, CmdOut, Grove, KIB, MIB, TOOL_TIMEOUT,
};

/// How long the first space scan, which the server starts by itself, may take to appear.
const SPACE_SCAN_TIMEOUT: Duration = Duration::from_secs(60);

fn qemu_img(args: &[&str]) -> CmdOut {
    run(Command::new("qemu-img").args(args), TOOL_TIMEOUT)
}

/// `qemu-img compare` of two exports (or files): true when their content is equal.
fn same_content(left: &str, right: &str) -> bool {
    let out = qemu_img(&["compare", "-f", "raw", "-F", "raw", left, right]);
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("qemu-img compare failed\n{}", out.report()),
    }
}

/// Copies a file into an export with nbdcopy.
fn nbdcopy_in(path: &Path, uri: &str) {
    run(
        Command::new("nbdcopy").arg("--flush").arg(path).arg(uri),
        TOOL_TIMEOUT,
    )
    .assert_success();
}

/// A branch as `grove branch list VOL --json` shows it.
fn branch(grove: &Grove, volume: &str, name: &str) -> Value {
    let branches = grove.cli_json(&["branch", "list", volume]);
    branches
        .as_array()
        .expect("branch list is an array")
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no branch {name} in {branches}"))
}

fn head_commit(grove: &Grove, volume: &str, name: &str) -> String {
    branch(grove, volume, name)["head_commit"]
        .as_str()
        .expect("the branch has a commit")
        .to_string()
}

/// `(offset_bytes, len_bytes)` pairs of a JSON array of ranges.
fn ranges(value: &Value) -> Vec<(u64, u64)> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array of ranges: {value}"))
        .iter()
        .map(|r| {
            (
                r["offset_bytes"].as_u64().expect("offset_bytes"),
                r["len_bytes"].as_u64().expect("len_bytes"),
            )
        })
        .collect()
}

fn diff(grove: &Grove, from: &str, to: &str) -> Value {
    grove.cli_json(&["diff", from, to])
}

/// The 4 KiB blocks whose bytes differ between two images, as coalesced byte ranges.
fn differing_ranges(left: &[u8], right: &[u8]) -> Vec<(u64, u64)> {
    assert_eq!(left.len(), right.len(), "images of different sizes");
    let block = 4096usize;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (index, (a, b)) in left.chunks(block).zip(right.chunks(block)).enumerate() {
        if a != b {
            let offset = (index * block) as u64;
            match out.last_mut() {
                Some((start, len)) if *start + *len == offset => *len += block as u64,
                _ => out.push((offset, block as u64)),
            }
        }
    }
    out
}

/// Data bytes in use in the pool after a space scan has returned whatever nothing references.
fn used_after_reclaim(grove: &Grove) -> u64 {
    let report = grove.cli_json(&["pool", "reclaim"]);
    assert!(report["generation"].is_u64(), "reclaim report: {report}");
    let pool = grove.cli_json(&["pool"]);
    pool["used_bytes"].as_u64().expect("used_bytes")
}

fn volume_space(grove: &Grove, volume: &str) -> Value {
    let shown = grove.cli_json(&["volume", "show", volume]);
    assert!(
        shown["space"].is_object(),
        "a scan has run, so `volume show` has space figures: {shown}"
    );
    shown["space"].clone()
}

#[test]
fn diff_between_siblings_ancestors_and_dirty_heads() {
    require_nbd_tools();
    let grove = Grove::start();
    grove.create_volume("hv", "32MiB");
    let main = grove.unix_uri("hv");
    let dev = grove.unix_uri("hv@dev");
    write_pattern(&main, 0xaa, 0, MIB);
    let c1 = grove.commit("hv", "base");
    grove.cli_ok(&["branch", "create", "hv", "dev"]);
    write_pattern(&dev, 0xbb, MIB, 64 * KIB);
    write_pattern(&main, 0xcc, 4 * MIB, 8 * KIB);
    let c2 = grove.commit("hv", "main work");
    let d1 = grove.commit("hv@dev", "dev work");

    // Siblings: each side's changes since they split.
    let sibling = diff(&grove, "hv", "hv@dev");
    assert_eq!(
        ranges(&sibling["extents"]),
        [(MIB, 64 * KIB), (4 * MIB, 8 * KIB)],
        "{sibling}"
    );
    assert_eq!(sibling["extent_count"], 2);
    assert_eq!(sibling["changed_bytes"], 72 * KIB);
    assert_eq!(sibling["changed_blocks"], 18);
    assert_eq!(sibling["from"]["name"], "hv");
    assert_eq!(sibling["to"]["name"], "hv@dev");
    // The diff matches what the two exports really hold, block for block.
    let dir = grove.root().to_path_buf();
    let main_image = nbdcopy_out(&main, &dir.join("main.img"));
    let dev_image = nbdcopy_out(&dev, &dir.join("dev.img"));
    assert_eq!(
        differing_ranges(&main_image, &dev_image),
        ranges(&sibling["extents"])
    );

    // People get a table with the ranges, the counts, and the note on identical rewrites.
    let text = grove.cli_ok(&["diff", "hv", "hv@dev"]);
    for needle in [
        "1048576",
        "65536",
        "4194304",
        "8192",
        "2 ranges",
        "identical",
    ] {
        assert!(
            text.contains(needle),
            "`grove diff` lacks {needle:?}:\n{text}"
        );
    }

    // Ancestor and descendant, both ways, by id and by prefix.
    let forward = diff(&grove, &format!("hv@{c1}"), &format!("hv@{c2}"));
    assert_eq!(ranges(&forward["extents"]), [(4 * MIB, 8 * KIB)]);
    let backward = diff(&grove, &format!("hv@{}", &c2[..8]), &format!("hv@{c1}"));
    assert_eq!(ranges(&backward["extents"]), [(4 * MIB, 8 * KIB)]);
    assert_eq!(backward["from"]["commit"], c2.as_str());
    let nothing = diff(&grove, &format!("hv@{d1}"), "hv@dev");
    assert_eq!(nothing["extent_count"], 0);
    assert_eq!(nothing["changed_bytes"], 0);

    // A head with uncommitted writes.
    write_pattern(&main, 0xdd, 8 * MIB, 12 * KIB);
    let dirty = diff(&grove, &format!("hv@{c2}"), "hv");
    assert_eq!(ranges(&dirty["extents"]), [(8 * MIB, 12 * KIB)]);
    assert_eq!(dirty["to"]["kind"], "branch");

    // Bad input: clear errors.
    grove.create_volume("other", "32MiB");
    let out = grove.cli_err(&["diff", "hv", "hv@nope"]);
    assert!(out.stderr.contains("nope"), "{}", out.report());
    let out = grove.cli_err(&["diff", "hv", "other"]);
    assert!(out.stderr.contains("unrelated"), "{}", out.report());
    grove.cli_err(&["diff", "nope", "hv"]);
    grove.cli_err(&["diff", "hv", "hv@a b"]);
    grove.cli_err(&["diff", "Bad", "hv"]);
}

/// The 32 MiB image of volume `mv` at the start of the merge test: 0x01 in its first MiB.
fn merge_base_image() -> Vec<u8> {
    let mut image = vec![0u8; (32 * MIB) as usize];
    image[..MIB as usize].fill(0x01);
    image
}

fn fill(image: &mut [u8], byte: u8, offset: u64, len: u64) {
    image[offset as usize..(offset + len) as usize].fill(byte);
}

#[test]
fn merges_fast_forward_clean_and_conflicting_with_every_strategy() {
    require_nbd_tools();
    let grove = Grove::start();
    let dir = grove.root().to_path_buf();
    grove.create_volume("mv", "32MiB");
    let uri = |name: &str| grove.unix_uri(name);
    write_pattern(&uri("mv"), 0x01, 0, MIB);
    let base = grove.commit("mv", "base");
    for name in ["a", "b", "c"] {
        grove.cli_ok(&["branch", "create", "mv", name]);
    }

    // Fast-forward: main has nothing of its own since a split off.
    write_pattern(&uri("mv@a"), 0xa1, MIB, 64 * KIB);
    let a1 = grove.commit("mv@a", "a1");
    grove.wait_no_sessions();
    let text = grove.cli_ok(&["merge", "mv", "--from", "a", "--into", "main"]);
    assert!(text.contains("fast-forwarded"), "{text}");
    assert_eq!(head_commit(&grove, "mv", "main"), a1);
    assert_pattern(&uri("mv"), 0xa1, MIB, 64 * KIB);
    // The reader's session closes after qemu-io exits; merges into main wait for that.
    grove.wait_no_sessions();
    let again = grove.cli_json(&["merge", "mv", "--from", "mv@a", "--into", "main"]);
    assert_eq!(again["outcome"], "up_to_date");
    assert!(grove
        .cli_ok(&["merge", "mv", "--from", "a", "--into", "main"])
        .contains("up to date"));

    // A clean three-way merge: b changed other blocks.
    write_pattern(&uri("mv@b"), 0xb1, 2 * MIB, 64 * KIB);
    let b1 = grove.commit("mv@b", "b1");
    grove.wait_no_sessions();
    let report = grove.cli_json(&[
        "merge", "mv", "--from", "mv@b", "--into", "main", "-m", "take b", "--author", "bob",
    ]);
    assert_eq!(report["outcome"], "merged", "{report}");
    assert_eq!(report["base"], base.as_str());
    assert_eq!(ranges(&report["taken"]), [(2 * MIB, 64 * KIB)]);
    assert_eq!(report["commit"]["parents"], serde_json::json!([a1, b1]));
    assert_eq!(report["commit"]["author"], "bob");
    let merged = report["commit"]["id"].as_str().expect("id").to_string();
    assert_eq!(head_commit(&grove, "mv", "main"), merged);
    let mut expected = merge_base_image();
    fill(&mut expected, 0xa1, MIB, 64 * KIB);
    fill(&mut expected, 0xb1, 2 * MIB, 64 * KIB);
    assert_same_bytes(
        &expected,
        &nbdcopy_out(&uri("mv"), &dir.join("clean.img")),
        "main after the clean merge",
    );

    // Conflicts: main and c both change the block at 4 KiB, differently; c also changes the
    // block at 8 KiB and one at 3 MiB, which main left alone.
    write_pattern(&uri("mv"), 0xc1, 0, 8 * KIB);
    let ours = grove.commit("mv", "ours");
    write_pattern(&uri("mv@c"), 0xc2, 4 * KIB, 8 * KIB);
    write_pattern(&uri("mv@c"), 0xc3, 3 * MIB, 4 * KIB);
    grove.commit("mv@c", "theirs");
    grove.cli_ok(&["branch", "create", "mv", "try-ours"]);
    fill(&mut expected, 0xc1, 0, 8 * KIB);
    let before = nbdcopy_out(&uri("mv"), &dir.join("before.img"));
    assert_same_bytes(&expected, &before, "main before the conflicting merge");

    grove.wait_no_sessions();
    // Strategy fail: non-zero exit, the conflicting range listed, nothing changed.
    let out = grove.cli_err(&["merge", "mv", "--from", "c", "--into", "main"]);
    assert!(
        out.stderr.contains("conflicting ranges") && out.stderr.contains("4096    4096"),
        "the conflicting range must be listed\n{}",
        out.report()
    );
    assert!(!out.stderr.contains("3145728"), "{}", out.report());
    let out = grove.cli(&["merge", "mv", "--from", "c", "--into", "main", "--json"]);
    out.assert_failure();
    let error: Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("--json prints the error document ({e})\n{}", out.report()));
    assert_eq!(error["error"]["code"], "merge_conflict");
    assert_eq!(ranges(&error["error"]["conflicts"]), [(4 * KIB, 4 * KIB)]);
    // A dry run reports the same and also exits non-zero.
    let out = grove.cli(&[
        "merge",
        "mv",
        "--from",
        "c",
        "--into",
        "main",
        "--dry-run",
        "--json",
    ]);
    out.assert_failure();
    let dry: Value = serde_json::from_str(out.stdout.trim()).expect("dry-run report");
    assert_eq!(dry["outcome"], "conflicts");
    assert_eq!(ranges(&dry["conflicts"]), [(4 * KIB, 4 * KIB)]);
    assert_eq!(
        ranges(&dry["taken"]),
        [(8 * KIB, 4 * KIB), (3 * MIB, 4 * KIB)]
    );
    // A dry run with a strategy succeeds and changes nothing either.
    let dry = grove.cli_json(&[
        "merge",
        "mv",
        "--from",
        "c",
        "--into",
        "main",
        "--strategy",
        "theirs",
        "--dry-run",
    ]);
    assert_eq!(dry["outcome"], "merged");
    assert_eq!(dry["commit"], Value::Null);
    assert_eq!(head_commit(&grove, "mv", "main"), ours);
    assert_same_bytes(
        &before,
        &nbdcopy_out(&uri("mv"), &dir.join("unchanged.img")),
        "main after refused and dry-run merges",
    );

    grove.wait_no_sessions();
    // Strategy ours: main's block at 4 KiB stays, the rest of c comes in.
    let report = grove.cli_json(&[
        "merge",
        "mv",
        "--from",
        "c",
        "--into",
        "try-ours",
        "--strategy",
        "ours",
    ]);
    assert_eq!(report["outcome"], "merged");
    assert_eq!(ranges(&report["conflicts"]), [(4 * KIB, 4 * KIB)]);
    let mut expected_ours = expected.clone();
    fill(&mut expected_ours, 0xc2, 8 * KIB, 4 * KIB);
    fill(&mut expected_ours, 0xc3, 3 * MIB, 4 * KIB);
    assert_same_bytes(
        &expected_ours,
        &nbdcopy_out(&uri("mv@try-ours"), &dir.join("ours.img")),
        "strategy ours",
    );

    grove.wait_no_sessions();
    // Strategy theirs: c wins the conflict too.
    let text = grove.cli_ok(&[
        "merge",
        "mv",
        "--from",
        "mv@c",
        "--into",
        "main",
        "--strategy",
        "theirs",
    ]);
    assert!(text.contains("merged into mv@main"), "{text}");
    let mut expected_theirs = expected.clone();
    fill(&mut expected_theirs, 0xc2, 4 * KIB, 8 * KIB);
    fill(&mut expected_theirs, 0xc3, 3 * MIB, 4 * KIB);
    assert_same_bytes(
        &expected_theirs,
        &nbdcopy_out(&uri("mv"), &dir.join("theirs.img")),
        "strategy theirs",
    );
    // The merge commit is an export of its own with the same content.
    let theirs_commit = head_commit(&grove, "mv", "main");
    assert!(same_content(
        &uri("mv"),
        &uri(&format!("mv@{theirs_commit}"))
    ));

    // Bad input fails clearly and changes nothing.
    write_pattern(&uri("mv@try-ours"), 0xee, 5 * MIB, 4 * KIB);
    grove.wait_no_sessions();
    let head = head_commit(&grove, "mv", "try-ours");
    let out = grove.cli_err(&["merge", "mv", "--from", "c", "--into", "try-ours"]);
    assert!(out.stderr.contains("uncommitted"), "{}", out.report());
    assert_eq!(head_commit(&grove, "mv", "try-ours"), head);
    let (connection, _) = nbd::open(grove.nbd_port, "mv");
    let out = grove.cli_err(&[
        "merge",
        "mv",
        "--from",
        "c",
        "--into",
        "main",
        "--strategy",
        "ours",
    ]);
    assert!(out.stderr.contains("session"), "{}", out.report());
    connection.disconnect();
    grove.cli_err(&["merge", "mv", "--from", "nope", "--into", "main"]);
    grove.cli_err(&["merge", "mv", "--from", "c", "--into", "nope"]);
    grove.cli_err(&["merge", "nope", "--from", "c", "--into", "main"]);
    grove.cli_err(&[
        "merge",
        "mv",
        "--from",
        "c",
        "--into",
        "main",
        "--strategy",
        "mine",
    ]);
    grove.create_volume("stranger", "32MiB");
    write_pattern(&uri("stranger"), 0x77, 0, 4 * KIB);
    grove.commit("stranger", "unrelated");
    grove.wait_no_sessions();
    let out = grove.cli_err(&["merge", "mv", "--from", "stranger@main", "--into", "main"]);
    assert!(out.stderr.contains("unrelated"), "{}", out.report());
    assert_eq!(head_commit(&grove, "mv", "main"), theirs_commit);
    assert_same_bytes(
        &expected_theirs,
        &nbdcopy_out(&uri("mv"), &dir.join("final.img")),
        "main after refused merges",
    );
}

#[test]
fn reset_rolls_a_branch_back() {
    require_nbd_tools();
    let grove = Grove::start();
    grove.create_volume("rv", "16MiB");
    let main = grove.unix_uri("rv");
    write_pattern(&main, 0x10, 0, 2 * MIB);
    let c1 = grove.commit("rv", "first");
    write_pattern(&main, 0x20, MIB, 2 * MIB);
    let c2 = grove.commit("rv", "second");
    write_pattern(&main, 0x30, 8 * MIB, 64 * KIB);
    grove.wait_no_sessions();

    // Uncommitted writes are not thrown away unless asked.
    let out = grove.cli_err(&["reset", "rv", &format!("rv@{c1}")]);
    assert!(
        out.stderr.contains("--discard-uncommitted"),
        "{}",
        out.report()
    );
    let head = branch(&grove, "rv", "main");
    assert_eq!(head["head_commit"], c2.as_str());
    assert_eq!(head["uncommitted_blocks"], 16);
    assert_pattern(&main, 0x30, 8 * MIB, 64 * KIB);

    // An open session on the branch blocks a reset.
    let (connection, _) = nbd::open(grove.nbd_port, "rv");
    let out = grove.cli_err(&["reset", "rv", &c1, "--discard-uncommitted"]);
    assert!(out.stderr.contains("session"), "{}", out.report());
    connection.disconnect();
    grove.wait_no_sessions();
    assert_eq!(head_commit(&grove, "rv", "main"), c2);

    let text = grove.cli_ok(&["reset", "rv@main", &c1[..10], "--discard-uncommitted"]);
    assert!(text.contains(&c1[..12]), "{text}");
    let head = branch(&grove, "rv", "main");
    assert_eq!(head["head_commit"], c1.as_str());
    assert_eq!(head["uncommitted_blocks"], 0);
    assert!(same_content(&main, &grove.unix_uri(&format!("rv@{c1}"))));
    assert_patterns(&main, &[(0x10, 0, 2 * MIB), (0x00, 2 * MIB, 14 * MIB)]);
    // The commit left behind is still readable by id, and the branch moves on from c1.
    assert_patterns(
        &grove.unix_uri(&format!("rv@{c2}")),
        &[(0x10, 0, MIB), (0x20, MIB, 2 * MIB)],
    );
    write_pattern(&main, 0x40, 0, 4 * KIB);
    let c3 = grove.commit("rv", "after the reset");
    let log = grove.cli_json(&["log", "rv"]);
    assert_eq!(log[0]["id"], c3.as_str());
    assert_eq!(log[0]["parents"], serde_json::json!([c1]));

    // Forward again, on a branch with '/' in its name, by tag.
    grove.cli_ok(&["tag", "create", "rv", "v2", &c2]);
    grove.cli_ok(&["branch", "create", "rv", "release/1", "--from", &c1]);
    grove.wait_no_sessions();
    grove.cli_ok(&["reset", "rv@release/1", "rv@v2"]);
    assert_eq!(head_commit(&grove, "rv", "release/1"), c2);
    assert!(same_content(
        &grove.unix_uri("rv@release/1"),
        &grove.unix_uri("rv@v2")
    ));

    // Unknown refs and branches change nothing.
    grove.cli_err(&["reset", "rv", "nope"]);
    grove.cli_err(&["reset", "rv@nope", &c1]);
    grove.cli_err(&["reset", "rv", "rv@ffffffffffff"]);
    assert_eq!(head_commit(&grove, "rv", "main"), c3);
}

#[test]
fn blame_names_the_commit_behind_each_range() {
    require_nbd_tools();
    let grove = Grove::start();
    grove.create_volume("bv", "16MiB");
    let main = grove.unix_uri("bv");
    write_pattern(&main, 0x11, 0, 64 * KIB);
    let c1 = grove
        .cli_ok(&["commit", "bv", "-m", "first", "--author", "alice"])
        .trim()
        .to_string();
    write_pattern(&main, 0x22, 16 * KIB, 16 * KIB);
    let c2 = grove
        .cli_ok(&["commit", "bv", "-m", "second", "--author", "bob"])
        .trim()
        .to_string();
    write_pattern(&main, 0x33, 48 * KIB, 4 * KIB);
    let c3 = grove.commit("bv", "third");
    write_pattern(&main, 0x44, 60 * KIB, 4 * KIB);

    let blame = grove.cli_json(&["blame", "bv", "--offset", "0", "--length", "128KiB"]);
    let parts: Vec<(u64, u64, String, String)> = blame["ranges"]
        .as_array()
        .expect("ranges")
        .iter()
        .map(|r| {
            (
                r["offset_bytes"].as_u64().expect("offset"),
                r["len_bytes"].as_u64().expect("length"),
                r["state"].as_str().expect("state").to_string(),
                r["commit"]["id"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect();
    let part = |offset: u64, len: u64, state: &str, commit: &str| {
        (offset, len, state.to_string(), commit.to_string())
    };
    assert_eq!(
        parts,
        [
            part(0, 16 * KIB, "committed", &c1),
            part(16 * KIB, 16 * KIB, "committed", &c2),
            part(32 * KIB, 16 * KIB, "committed", &c1),
            part(48 * KIB, 4 * KIB, "committed", &c3),
            part(52 * KIB, 8 * KIB, "committed", &c1),
            part(60 * KIB, 4 * KIB, "uncommitted", "-"),
            part(64 * KIB, 64 * KIB, "never_written", "-"),
        ],
        "{blame}"
    );

    let text = grove.cli_ok(&["blame", "bv", "--offset", "0", "--length", "131072"]);
    for needle in [
        "alice",
        "bob",
        "third",
        "uncommitted",
        "never written",
        &c2[..12],
    ] {
        assert!(
            text.contains(needle),
            "`grove blame` lacks {needle:?}:\n{text}"
        );
    }

    // An older commit, an unaligned range.
    let blame = grove.cli_json(&[
        "blame",
        &format!("bv@{c2}"),
        "--offset",
        "20000",
        "--length",
        "100",
    ]);
    assert_eq!(blame["ranges"].as_array().map(Vec::len), Some(1));
    assert_eq!(blame["ranges"][0]["offset_bytes"], 20000);
    assert_eq!(blame["ranges"][0]["len_bytes"], 100);
    assert_eq!(blame["ranges"][0]["commit"]["author"], "bob");

    // Through a merge, a range is credited to the commit that wrote it on the merged branch.
    grove.commit("bv", "fourth");
    grove.cli_ok(&["branch", "create", "bv", "feature"]);
    write_pattern(&grove.unix_uri("bv@feature"), 0x55, 80 * KIB, 4 * KIB);
    let f1 = grove.commit("bv@feature", "feature work");
    write_pattern(&main, 0x66, 96 * KIB, 4 * KIB);
    grove.commit("bv", "fifth");
    grove.wait_no_sessions();
    let report = grove.cli_json(&["merge", "bv", "--from", "feature", "--into", "main"]);
    assert_eq!(report["outcome"], "merged");
    let blame = grove.cli_json(&["blame", "bv", "--offset", "80KiB", "--length", "4KiB"]);
    assert_eq!(blame["ranges"][0]["commit"]["id"], f1.as_str(), "{blame}");

    // Bad input.
    grove.cli_err(&["blame", "bv", "--offset", "16MiB", "--length", "1"]);
    grove.cli_err(&["blame", "bv", "--offset", "abc", "--length", "1"]);
    grove.cli_err(&["blame", "bv", "--offset", "0"]);
    grove.cli_err(&["blame", "bv@nope", "--offset", "0", "--length", "1"]);
    grove.cli_err(&["blame", "nope", "--offset", "0", "--length", "1"]);
}

#[test]
fn clones_share_blocks_then_diverge() {
    require_nbd_tools();
    let grove = Grove::start();
    let dir = grove.root().to_path_buf();
    grove.create_volume("src", "16MiB");
    let image = pseudo_random_bytes((16 * MIB) as usize, 11);
    let image_path = dir.join("src.img");
    std::fs::write(&image_path, &image).expect("write image");
    nbdcopy_in(&image_path, &grove.unix_uri("src"));
    let c1 = grove.commit("src", "image");
    grove.cli_ok(&["tag", "create", "src", "v1", &c1]);

    let used_before = used_after_reclaim(&grove);
    let text = grove.cli_ok(&["volume", "clone", "src@v1", "dst"]);
    assert!(text.contains("dst"), "{text}");
    // O(1): no data block was copied.
    assert_eq!(used_after_reclaim(&grove), used_before);
    let shown = grove.cli_json(&["volume", "show", "dst"]);
    assert_eq!(shown["size_bytes"], 16 * MIB);
    assert_eq!(shown["origin"]["volume"], "src");
    assert_eq!(shown["origin"]["source"], "src@v1");
    assert_eq!(shown["origin"]["commit"], c1.as_str());
    assert!(grove
        .cli_ok(&["volume", "show", "dst"])
        .contains("clone of src@v1"));

    // Equal content.
    assert!(same_content(
        &grove.unix_uri("src@v1"),
        &grove.unix_uri("dst")
    ));
    assert_same_bytes(
        &image,
        &nbdcopy_out(&grove.unix_uri("dst"), &dir.join("dst.img")),
        "the clone",
    );

    // Independent writes afterwards.
    write_pattern(&grove.unix_uri("dst"), 0xee, 0, MIB);
    write_pattern(&grove.unix_uri("src"), 0xdd, 2 * MIB, 64 * KIB);
    let mut src_expected = image.clone();
    fill(&mut src_expected, 0xdd, 2 * MIB, 64 * KIB);
    let mut dst_expected = image.clone();
    fill(&mut dst_expected, 0xee, 0, MIB);
    assert_same_bytes(
        &src_expected,
        &nbdcopy_out(&grove.unix_uri("src"), &dir.join("src-after.img")),
        "the source after writes on both sides",
    );
    assert_same_bytes(
        &dst_expected,
        &nbdcopy_out(&grove.unix_uri("dst"), &dir.join("dst-after.img")),
        "the clone after writes on both sides",
    );
    assert!(same_content(
        &grove.unix_uri("src@v1"),
        &image_path.display().to_string()
    ));

    // The two share history: diff across volumes.
    let across = diff(&grove, "src", "dst");
    assert_eq!(
        ranges(&across["extents"]),
        [(0, MIB), (2 * MIB, 64 * KIB)],
        "{across}"
    );

    // A clone of a branch head takes its uncommitted writes along.
    grove.cli_ok(&["volume", "clone", "src", "src-head"]);
    assert!(same_content(
        &grove.unix_uri("src"),
        &grove.unix_uri("src-head")
    ));

    // Bad input: clear errors, nothing created or deleted. (Sessions are refused first: the
    // comparison's clients must be gone for the refusal to be about the clone.)
    grove.wait_no_sessions();
    let out = grove.cli_err(&["volume", "delete", "src"]);
    assert!(out.stderr.contains("dst"), "{}", out.report());
    grove.cli_err(&["volume", "clone", "src", "dst"]);
    grove.cli_err(&["volume", "clone", "src@nope", "other"]);
    grove.cli_err(&["volume", "clone", "nope", "other"]);
    grove.cli_err(&["volume", "clone", "src", "Bad_Name"]);
    let names: Vec<String> = grove
        .cli_json(&["volume", "list"])
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| v["name"].as_str().expect("name").to_string())
        .collect();
    assert_eq!(names, ["dst", "src", "src-head"]);
    assert!(same_content(
        &grove.unix_uri("src@v1"),
        &image_path.display().to_string()
    ));
}

#[test]
fn space_comes_back_after_deletes() {
    require_nbd_tools();
    let grove = Grove::start();
    grove.create_volume("sp", "64MiB");
    let main = grove.unix_uri("sp");
    write_pattern(&main, 0x01, 0, MIB);
    grove.commit("sp", "base");

    // The reclaimer scans at start, by itself: the pool gets space figures.
    let started = Instant::now();
    while !grove.cli_json(&["pool"])["space"].is_object() {
        assert!(
            started.elapsed() < SPACE_SCAN_TIMEOUT,
            "no space scan within {SPACE_SCAN_TIMEOUT:?} of the start"
        );
        thread::sleep(Duration::from_millis(50));
    }

    // A branch with uncommitted writes: deleting it frees them.
    let used0 = used_after_reclaim(&grove);
    grove.cli_ok(&["branch", "create", "sp", "scratch"]);
    write_pattern(&grove.unix_uri("sp@scratch"), 0x5a, 8 * MIB, 8 * MIB);
    let used1 = used_after_reclaim(&grove);
    assert!(
        used1 >= used0 + 8 * MIB,
        "writes take space: {used0} -> {used1}"
    );
    let space = volume_space(&grove, "sp");
    assert!(
        space["branches"]["scratch"].as_u64().expect("scratch") >= 8 * MIB,
        "the branch holds its writes alone: {space}"
    );
    grove.wait_no_sessions();
    grove.cli_ok(&["branch", "delete", "sp", "scratch"]);
    let used2 = used_after_reclaim(&grove);
    assert!(
        used2 + 8 * MIB <= used1,
        "deleting the branch frees its writes: {used1} -> {used2}"
    );

    // A commit whose blocks its child overwrote: deleting (squashing) it frees them.
    write_pattern(&main, 0x61, 16 * MIB, 4 * MIB);
    let a = grove.commit("sp", "a");
    write_pattern(&main, 0x62, 16 * MIB, 4 * MIB);
    let b = grove.commit("sp", "b");
    let used3 = used_after_reclaim(&grove);
    let space = volume_space(&grove, "sp");
    let a_exclusive = space["commits"][&a].as_u64().expect("a's figure");
    assert!(a_exclusive >= 4 * MIB, "{space}");
    let text = grove.cli_ok(&["commit", "delete", "sp", &a[..12]]);
    assert!(text.contains("deleted commit"), "{text}");
    let used4 = used_after_reclaim(&grove);
    assert!(
        used4 + 4 * MIB <= used3,
        "squashing the commit frees its blocks: {used3} -> {used4}"
    );
    assert!(
        used3 - used4 <= a_exclusive,
        "no more than its exclusive figure is freed"
    );
    assert_pattern(&main, 0x62, 16 * MIB, 4 * MIB);
    let log = grove.cli_json(&["log", "sp"]);
    assert_eq!(log[0]["id"], b.as_str());
    assert_ne!(log[1]["id"], a.as_str());
    grove.cli_err(&["log", &format!("sp@{a}")]);

    // A deleted branch leaves its commits behind; deleting the orphan commit frees them.
    grove.cli_ok(&["branch", "create", "sp", "feature"]);
    write_pattern(&grove.unix_uri("sp@feature"), 0x70, 24 * MIB, 4 * MIB);
    let f = grove.commit("sp@feature", "feature");
    grove.wait_no_sessions();
    let used5 = used_after_reclaim(&grove);
    grove.cli_ok(&["branch", "delete", "sp", "feature"]);
    assert_eq!(
        used_after_reclaim(&grove),
        used5,
        "the commit still holds the branch's data"
    );
    grove.cli_ok(&["commit", "delete", "sp", &f]);
    let used6 = used_after_reclaim(&grove);
    assert!(used6 + 4 * MIB <= used5, "{used5} -> {used6}");

    // A reset that discards writes frees them.
    write_pattern(&main, 0x80, 32 * MIB, 4 * MIB);
    let used7 = used_after_reclaim(&grove);
    grove.wait_no_sessions();
    grove.cli_ok(&["reset", "sp", &b, "--discard-uncommitted"]);
    let used8 = used_after_reclaim(&grove);
    assert!(used8 + 4 * MIB <= used7, "{used7} -> {used8}");

    // A clone's own writes go when the clone is deleted.
    grove.cli_ok(&["volume", "clone", "sp", "sp-copy"]);
    write_pattern(&grove.unix_uri("sp-copy"), 0x90, 40 * MIB, 4 * MIB);
    grove.commit("sp-copy", "copy work");
    let used9 = used_after_reclaim(&grove);
    let copy_space = volume_space(&grove, "sp-copy");
    assert!(
        copy_space["exclusive_bytes"].as_u64().expect("exclusive") >= 4 * MIB,
        "{copy_space}"
    );
    grove.wait_no_sessions();
    grove.cli_ok(&["volume", "delete", "sp-copy"]);
    let used10 = used_after_reclaim(&grove);
    assert!(used10 + 4 * MIB <= used9, "{used9} -> {used10}");
    // The source is untouched.
    assert_patterns(
        &main,
        &[
            (0x01, 0, MIB),
            (0x62, 16 * MIB, 4 * MIB),
            (0x00, 32 * MIB, 4 * MIB),
        ],
    );

    // Commits still needed are refused and stay.
    let out = grove.cli_err(&["commit", "delete", "sp", &b]);
    assert!(out.stderr.contains("branch"), "{}", out.report());
    grove.cli_ok(&["tag", "create", "sp", "keep", &b]);
    write_pattern(&main, 0x91, 0, 4 * KIB);
    grove.commit("sp", "on top");
    let out = grove.cli_err(&["commit", "delete", "sp", &b]);
    assert!(out.stderr.contains("tag"), "{}", out.report());
    grove.cli_err(&["commit", "delete", "sp", "ffffffffffff"]);
    grove.cli_err(&["commit", "delete", "sp", "xyz"]);
    grove.cli_err(&["commit", "delete", "nope", &b]);
    assert_pattern(&grove.unix_uri("sp@keep"), 0x62, 16 * MIB, 4 * MIB);
}

#[test]
fn history_routes_over_http() {
    let grove = Grove::start();
    grove.create_volume("hv", "16MiB");
    grove.commit("hv", "base");
    grove.cli_ok(&["branch", "create", "hv", "x/y"]);

    let document = grove.http("GET", "/v1/openapi.json", None).json();
    for (path, method) in [
        ("/v1/volumes/{vol}/diff", "get"),
        ("/v1/volumes/{vol}/blame", "get"),
        ("/v1/volumes/{vol}/merges", "post"),
        ("/v1/volumes/{vol}/clones", "post"),
        ("/v1/volumes/{vol}/branches/{branch}/reset", "post"),
        ("/v1/volumes/{vol}/commits/{id}", "delete"),
        ("/v1/pool/reclaim", "post"),
    ] {
        assert!(
            document["paths"][path][method].is_object(),
            "openapi.json lacks {method} {path}"
        );
    }

    let reply = grove.http(
        "POST",
        "/v1/volumes/hv/branches/x%2Fy/reset",
        Some(r#"{"to": "main"}"#),
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["name"], "x/y");
    for (method, path, body, statuses) in [
        ("GET", "/v1/volumes/hv/diff?from=main", None, &[400][..]),
        ("GET", "/v1/volumes/hv/diff?from=main&to=nope", None, &[404]),
        (
            "GET",
            "/v1/volumes/hv/blame?offset=0&length=1GiB",
            None,
            &[400],
        ),
        (
            "POST",
            "/v1/volumes/hv/merges",
            Some(r#"{"from": "x/y", "into": "main", "strategy": "bogus"}"#),
            &[400],
        ),
        (
            "POST",
            "/v1/volumes/hv/branches/main/reset",
            Some(r#"{"to": "nope"}"#),
            &[404],
        ),
        ("DELETE", "/v1/volumes/hv/commits/abcd", None, &[404]),
        (
            "POST",
            "/v1/volumes/hv/clones",
            Some(r#"{"name": "hv"}"#),
            &[409],
        ),
    ] {
        grove
            .http(method, path, body)
            .assert_error(statuses, &format!("{method} {path}"));
    }
    let reclaim = grove.http("POST", "/v1/pool/reclaim", None);
    assert_eq!(reclaim.status, 200, "{reclaim:?}");
    assert!(reclaim.json()["volumes"]["hv"].is_object());
}
