//! End-to-end: the git-like workflow (write, commit, write more, read old versions by commit id,
//! prefix and tag, branch, write to the branch without touching main), the export list, and
//! sparse volumes. Data is checked only with qemu-io and nbdinfo.

mod support;

use support::nbd;
use support::{
    assert_pattern, assert_patterns, extents_in, json_has_str, json_has_u64, nbdinfo_list,
    nbdinfo_map, nbdinfo_size, qemu_io, qio_write, require_nbd_tools, write_pattern, Grove, GIB,
    KIB, MIB,
};

/// Asserts that a write to a read-only export fails, both through qemu-io and at the protocol
/// level (EPERM for WRITE, TRIM and WRITE_ZEROES), and that nothing changed.
fn assert_export_read_only(grove: &Grove, export: &str, pattern: u8, offset: u64, length: u64) {
    let out = qemu_io(
        &grove.unix_uri(export),
        &[format!("write -P 0xee {offset} 4096")],
        false,
    );
    let text = out.combined();
    assert!(
        !out.success() || text.contains("failed") || text.contains("denied"),
        "writing to read-only export {export} through qemu-io should fail\n{}",
        out.report()
    );

    let (mut conn, info) = nbd::open(grove.nbd_port, export);
    assert!(
        info.read_only(),
        "export {export} must carry NBD_FLAG_READ_ONLY, flags {:#x}",
        info.flags
    );
    let error = conn
        .write(offset, &[0xee; 4096], 0)
        .expect("server answers a write to a read-only export");
    assert_eq!(
        error,
        nbd::EPERM,
        "NBD_CMD_WRITE on read-only {export} must fail with EPERM"
    );
    let error = conn
        .command(nbd::CMD_TRIM, 0, offset, 4096)
        .expect("server answers a trim to a read-only export");
    assert_eq!(
        error,
        nbd::EPERM,
        "NBD_CMD_TRIM on read-only {export} must fail with EPERM"
    );
    let error = conn
        .command(nbd::CMD_WRITE_ZEROES, 0, offset, 4096)
        .expect("server answers write-zeroes to a read-only export");
    assert_eq!(
        error,
        nbd::EPERM,
        "NBD_CMD_WRITE_ZEROES on read-only {export} must fail with EPERM"
    );
    conn.disconnect();
    assert_pattern(&grove.unix_uri(export), pattern, offset, length);
}

#[test]
fn git_like_workflow_commit_tag_branch() {
    require_nbd_tools();
    let mut grove = Grove::start();
    grove.create_volume("v", "1GiB");
    assert_eq!(
        nbdinfo_size(&grove.unix_uri("v")),
        GIB,
        "a volume created with --size 1GiB exports 1 GiB"
    );
    let shown = grove.cli_json(&["volume", "show", "v"]);
    assert!(
        json_has_u64(&shown, GIB),
        "`volume show v --json` should report the size in bytes: {shown}"
    );
    let listed = grove.cli_json(&["volume", "list"]);
    assert!(
        json_has_str(&listed, "v"),
        "`volume list --json` should name v: {listed}"
    );

    // Pattern A over the first 4 MiB, then commit.
    let main = grove.unix_uri("v");
    write_pattern(&main, 0xa1, 0, 4 * MIB);
    let first = grove.commit("v", "first");
    assert!(
        first.len() > 8,
        "commit id {first:?} is too short to test unique prefixes"
    );

    // Pattern B over the second MiB of main.
    write_pattern(&main, 0xb2, MIB, MIB);
    assert_patterns(
        &main,
        &[(0xa1, 0, MIB), (0xb2, MIB, MIB), (0xa1, 2 * MIB, 2 * MIB)],
    );

    // The commit, by full id and by a unique prefix, still holds A only.
    assert_pattern(&grove.unix_uri(&format!("v@{first}")), 0xa1, 0, 4 * MIB);
    let prefix = &first[..8];
    assert_pattern(&grove.unix_uri(&format!("v@{prefix}")), 0xa1, 0, 4 * MIB);
    assert_pattern(&grove.tcp_uri(&format!("v@{first}")), 0xa1, 0, 4 * MIB);

    // A tag on the commit.
    grove.cli_ok(&["tag", "create", "v", "t1", &format!("v@{first}")]);
    assert_pattern(&grove.unix_uri("v@t1"), 0xa1, 0, 4 * MIB);
    let tags = grove.cli_json(&["tag", "list", "v"]);
    assert!(
        json_has_str(&tags, "t1"),
        "`tag list v --json` names t1: {tags}"
    );

    // A branch from the commit, then a write to it.
    grove.cli_ok(&[
        "branch",
        "create",
        "v",
        "dev",
        "--from",
        &format!("v@{first}"),
    ]);
    let dev = grove.unix_uri("v@dev");
    assert_pattern(&dev, 0xa1, 0, 4 * MIB);
    write_pattern(&dev, 0xc3, 2 * MIB, MIB);
    assert_patterns(
        &dev,
        &[
            (0xa1, 0, 2 * MIB),
            (0xc3, 2 * MIB, MIB),
            (0xa1, 3 * MIB, MIB),
        ],
    );
    // main and the commit are untouched by the branch write.
    assert_patterns(
        &main,
        &[(0xa1, 0, MIB), (0xb2, MIB, MIB), (0xa1, 2 * MIB, 2 * MIB)],
    );
    assert_pattern(&grove.unix_uri(&format!("v@{first}")), 0xa1, 0, 4 * MIB);
    // The same branch over TCP.
    assert_patterns(
        &grove.tcp_uri("v@dev"),
        &[(0xa1, 0, 2 * MIB), (0xc3, 2 * MIB, MIB)],
    );
    let branches = grove.cli_json(&["branch", "list", "v"]);
    assert!(
        json_has_str(&branches, "dev") && json_has_str(&branches, "main"),
        "`branch list v --json` names main and dev: {branches}"
    );

    // A commit on the branch; its log holds both commits, main's log only the first.
    let second = grove.commit("v@dev", "second");
    assert_ne!(first, second, "two commits must have different ids");
    assert_patterns(
        &grove.unix_uri(&format!("v@{second}")),
        &[
            (0xa1, 0, 2 * MIB),
            (0xc3, 2 * MIB, MIB),
            (0xa1, 3 * MIB, MIB),
        ],
    );
    let dev_log = grove.cli_json(&["log", "v@dev"]);
    assert!(
        json_has_str(&dev_log, &first) && json_has_str(&dev_log, &second),
        "`log v@dev --json` holds both commits {first} and {second}: {dev_log}"
    );
    let main_log = grove.cli_json(&["log", "v"]);
    assert!(
        json_has_str(&main_log, &first) && !json_has_str(&main_log, &second),
        "`log v --json` holds {first} and not the branch commit {second}: {main_log}"
    );
    assert!(
        json_has_str(&main_log, "first"),
        "`log v --json` carries the commit message: {main_log}"
    );
    let human_log = grove.cli_ok(&["log", "v"]);
    assert!(
        human_log.contains(&first[..8]) && human_log.contains("first"),
        "`grove log v` shows the commit id and message:\n{human_log}"
    );

    // Commits and tags are read-only exports; attempts to write them change nothing.
    assert_export_read_only(&grove, &format!("v@{first}"), 0xa1, 0, 4 * MIB);
    assert_export_read_only(&grove, "v@t1", 0xa1, 0, 4 * MIB);
    assert_export_read_only(&grove, &format!("v@{prefix}"), 0xa1, 0, 4 * MIB);
    // The writable heads still work afterwards.
    let (conn, info) = nbd::open(grove.nbd_port, "v@dev");
    assert!(!info.read_only(), "branch export v@dev must be writable");
    conn.disconnect();
    assert_patterns(
        &main,
        &[(0xa1, 0, MIB), (0xb2, MIB, MIB), (0xa1, 2 * MIB, 2 * MIB)],
    );

    // Deleting a branch and then the volume removes their exports.
    grove.cli_ok(&["branch", "delete", "v", "dev"]);
    let mut conn = nbd::Conn::connect(grove.nbd_port);
    conn.start_options();
    assert!(
        conn.go("v@dev").is_err(),
        "a deleted branch must not be served"
    );
    assert!(conn.go("v").is_ok(), "main is still served");
    conn.disconnect();
    assert_pattern(&grove.unix_uri(&format!("v@{second}")), 0xc3, 2 * MIB, MIB);
    grove.cli_ok(&["volume", "delete", "v"]);
    let out = qemu_io(&main, &["read 0 4096".to_string()], true);
    assert!(
        !out.success(),
        "a deleted volume must not be served\n{}",
        out.report()
    );
    let listed = grove.cli_json(&["volume", "list"]);
    assert!(
        !json_has_str(&listed, "v"),
        "a deleted volume is not listed: {listed}"
    );
    grove.assert_healthy();
}

#[test]
fn export_list_shows_branches_tags_and_commits() {
    require_nbd_tools();
    let mut grove = Grove::start();
    grove.create_volume("lv", "64MiB");
    write_pattern(&grove.unix_uri("lv"), 0x42, 0, MIB);
    let commit = grove.commit("lv", "listed");
    grove.cli_ok(&["tag", "create", "lv", "rel-1", &format!("lv@{commit}")]);
    grove.cli_ok(&[
        "branch",
        "create",
        "lv",
        "dev",
        "--from",
        &format!("lv@{commit}"),
    ]);

    let listing = nbdinfo_list(&grove.tcp_server_uri());
    let exports = listing["exports"]
        .as_array()
        .unwrap_or_else(|| panic!("nbdinfo --list --json has no exports array: {listing}"));
    let find = |name: &str| {
        exports
            .iter()
            .find(|export| export["export-name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("NBD_OPT_LIST does not list export {name:?}: {listing}"))
    };
    let commit_export = format!("lv@{commit}");
    for (name, read_only) in [
        ("lv", false),
        ("lv@dev", false),
        ("lv@rel-1", true),
        (commit_export.as_str(), true),
    ] {
        let export = find(name);
        assert_eq!(
            export["is_read_only"].as_bool(),
            Some(read_only),
            "export {name} read-only should be {read_only}: {export}"
        );
        assert_eq!(
            export["export-size"].as_u64(),
            Some(64 * MIB),
            "export {name} size: {export}"
        );
    }

    // The same through the raw protocol: NBD_OPT_LIST replies, one NBD_REP_SERVER each.
    let mut conn = nbd::Conn::connect(grove.nbd_port);
    conn.start_options();
    let names = conn.list();
    for name in ["lv", "lv@dev", "lv@rel-1", commit_export.as_str()] {
        assert!(
            names.iter().any(|listed| listed == name),
            "raw NBD_OPT_LIST misses {name}: {names:?}"
        );
    }
    // The session goes on after a LIST.
    let info = conn.go("lv").expect("NBD_OPT_GO after NBD_OPT_LIST");
    assert_eq!(info.size_bytes, 64 * MIB);
    let data = conn
        .read(0, 4096)
        .expect("read after LIST")
        .expect("read succeeds");
    assert!(data.iter().all(|&byte| byte == 0x42), "lv reads its data");
    conn.disconnect();

    // Deleting the tag removes its export from the list.
    grove.cli_ok(&["tag", "delete", "lv", "rel-1"]);
    let listing = nbdinfo_list(&grove.tcp_server_uri());
    assert!(
        !json_has_str(&listing["exports"], "lv@rel-1"),
        "a deleted tag must not be listed: {listing}"
    );
    grove.assert_healthy();
}

#[test]
fn sparse_volume_holes_trim_and_write_zeroes() {
    require_nbd_tools();
    let mut grove = Grove::start();
    grove.create_volume("sp", "64MiB");
    let uri = grove.unix_uri("sp");

    // A new volume is one big hole and reads as zeros.
    let map = nbdinfo_map(&uri);
    let covered: u64 = map.iter().map(|extent| extent.length).sum();
    assert_eq!(covered, 64 * MIB, "the map covers the volume: {map:?}");
    assert!(
        map.iter().all(|extent| extent.is_hole()),
        "a new volume must report holes only (base:allocation): {map:?}"
    );
    assert_pattern(&uri, 0, 0, 64 * MIB);

    // Written data shows up as data, the rest stays a hole.
    write_pattern(&uri, 0x5a, 8 * MIB, MIB);
    let map = nbdinfo_map(&uri);
    let written = extents_in(&map, 8 * MIB, MIB);
    assert!(
        written.iter().all(|extent| !extent.is_hole()),
        "the written range 8M..9M must be data: {map:?}"
    );
    for (offset, length) in [(0, 4 * MIB), (16 * MIB, 48 * MIB)] {
        assert!(
            extents_in(&map, offset, length)
                .iter()
                .all(|extent| extent.is_hole()),
            "the unwritten range {offset}+{length} must stay a hole: {map:?}"
        );
    }
    assert_patterns(
        &uri,
        &[
            (0, 0, 8 * MIB),
            (0x5a, 8 * MIB, MIB),
            (0, 9 * MIB, 55 * MIB),
        ],
    );

    // Trim reads back as zeros, write-zeroes reads back as zeros; neighbours are kept.
    qio_write(&uri, &[&format!("discard {} {}", 8 * MIB, 512 * KIB)]);
    qio_write(
        &uri,
        &[&format!("write -z {} {}", 8 * MIB + 512 * KIB, 256 * KIB)],
    );
    assert_patterns(
        &uri,
        &[
            (0, 8 * MIB, 768 * KIB),
            (0x5a, 8 * MIB + 768 * KIB, 256 * KIB),
            (0, 9 * MIB, MIB),
        ],
    );
    // Write-zeroes that may unmap, too.
    qio_write(
        &uri,
        &[&format!(
            "write -z -u {} {}",
            8 * MIB + 768 * KIB,
            128 * KIB
        )],
    );
    assert_patterns(
        &uri,
        &[
            (0, 8 * MIB, 896 * KIB),
            (0x5a, 8 * MIB + 896 * KIB, 128 * KIB),
        ],
    );

    // A commit keeps the pre-trim data even after the head is trimmed.
    write_pattern(&uri, 0x6b, 20 * MIB, MIB);
    let commit = grove.commit("sp", "before trim");
    qio_write(&uri, &[&format!("discard {} {}", 20 * MIB, MIB)]);
    assert_pattern(&uri, 0, 20 * MIB, MIB);
    assert_pattern(
        &grove.unix_uri(&format!("sp@{commit}")),
        0x6b,
        20 * MIB,
        MIB,
    );
    grove.assert_healthy();
}

#[test]
fn unaligned_and_sub_block_io() {
    require_nbd_tools();
    let mut grove = Grove::start();
    grove.create_volume("un", "16MiB");
    let uri = grove.unix_uri("un");
    // Unaligned writes inside one block, across blocks, and at the very end of the volume.
    qio_write(
        &uri,
        &[
            "write -P 0x11 100 200",
            "write -P 0x22 4000 9000",
            &format!("write -P 0x33 {} 1000", 16 * MIB - 1000),
        ],
    );
    assert_patterns(
        &uri,
        &[
            (0, 0, 100),
            (0x11, 100, 200),
            (0, 300, 3700),
            (0x22, 4000, 9000),
            (0, 13000, 16 * MIB - 1000 - 13000),
            (0x33, 16 * MIB - 1000, 1000),
        ],
    );
    // An unaligned overwrite of a block shared with a commit leaves the commit alone.
    let commit = grove.commit("un", "unaligned");
    write_pattern(&uri, 0x44, 4100, 10);
    assert_patterns(
        &uri,
        &[(0x22, 4000, 100), (0x44, 4100, 10), (0x22, 4110, 8890)],
    );
    assert_pattern(&grove.unix_uri(&format!("un@{commit}")), 0x22, 4000, 9000);
    // Unaligned reads through qemu-io's byte-granular path.
    assert_patterns(&uri, &[(0x11, 101, 3), (0x22, 4001, 7)]);
    grove.assert_healthy();
}

#[test]
fn deep_history_prefixes_and_branches_from_heads() {
    require_nbd_tools();
    let mut grove = Grove::start();
    grove.create_volume("h", "64MiB");
    let head = grove.unix_uri("h");
    let stripe = 64 * KIB;
    let shared = 4 * MIB;
    let rounds = 40u64;

    // Each round writes its own stripe and overwrites a shared one, then commits.
    let mut ids = Vec::new();
    for round in 0..rounds {
        let pattern = (round + 1) as u8;
        qio_write(
            &head,
            &[
                &format!("write -P 0x{pattern:02x} {} {stripe}", round * stripe),
                &format!("write -P 0x{pattern:02x} {shared} {stripe}"),
            ],
        );
        ids.push(grove.commit("h", &format!("round {round}")));
    }
    // Every commit shows exactly the stripes written up to it and its own shared stripe.
    for (round, id) in ids.iter().enumerate() {
        let round = round as u64;
        let mut ranges: Vec<(u8, u64, u64)> = (0..=round)
            .map(|earlier| ((earlier + 1) as u8, earlier * stripe, stripe))
            .collect();
        if round + 1 < rounds {
            ranges.push((0, (round + 1) * stripe, (rounds - round - 1) * stripe));
        }
        ranges.push(((round + 1) as u8, shared, stripe));
        assert_patterns(&grove.unix_uri(&format!("h@{id}")), &ranges);
    }
    let log = grove.cli_json(&["log", "h"]);
    for id in &ids {
        assert!(json_has_str(&log, id), "log h misses commit {id}");
    }
    let limited = grove.cli_json(&["log", "h", "--limit", "5"]);
    assert!(
        json_has_str(&limited, &ids[ids.len() - 1]) && !json_has_str(&limited, &ids[0]),
        "`log h --limit 5` shows the newest commits only: {limited}"
    );

    // A prefix shared by two commits is ambiguous and must be refused, never guessed.
    let mut ambiguous = None;
    for (left_index, left) in ids.iter().enumerate() {
        for right in &ids[left_index + 1..] {
            let common = left
                .chars()
                .zip(right.chars())
                .take_while(|(a, b)| a == b)
                .count();
            if common > 0
                && ambiguous
                    .as_ref()
                    .is_none_or(|(_, best): &(String, usize)| common > *best)
            {
                ambiguous = Some((left[..common].to_string(), common));
            }
        }
    }
    let (prefix, _) = ambiguous.expect("40 commit ids always share some prefix");
    let mut conn = nbd::Conn::connect(grove.nbd_port);
    conn.start_options();
    assert!(
        conn.go(&format!("h@{prefix}")).is_err(),
        "the ambiguous prefix h@{prefix} must not be served"
    );
    conn.go("h").expect("h is served");
    conn.disconnect();
    grove.cli_err(&["log", &format!("h@{prefix}")]);

    // Branches from a branch head (with uncommitted writes), from the default, and from
    // another branch; each is a snapshot of its source at creation and independent after.
    write_pattern(&head, 0xd1, 10 * MIB, MIB);
    grove.cli_ok(&["branch", "create", "h", "fromhead", "--from", "h"]);
    let from_head = grove.unix_uri("h@fromhead");
    assert_patterns(&from_head, &[(0xd1, 10 * MIB, MIB), (0x28, shared, stripe)]);
    write_pattern(&head, 0xd2, 10 * MIB, MIB);
    write_pattern(&from_head, 0xd3, 11 * MIB, MIB);
    assert_patterns(&from_head, &[(0xd1, 10 * MIB, MIB), (0xd3, 11 * MIB, MIB)]);
    assert_patterns(&head, &[(0xd2, 10 * MIB, MIB), (0, 11 * MIB, MIB)]);
    grove.cli_ok(&["branch", "create", "h", "implicit"]);
    assert_patterns(
        &grove.unix_uri("h@implicit"),
        &[(0xd2, 10 * MIB, MIB), (0, 11 * MIB, MIB)],
    );
    grove.cli_ok(&["branch", "create", "h", "grand", "--from", "h@fromhead"]);
    write_pattern(&from_head, 0xd4, 11 * MIB, MIB);
    assert_patterns(
        &grove.unix_uri("h@grand"),
        &[
            (0xd1, 10 * MIB, MIB),
            (0xd3, 11 * MIB, MIB),
            (0x01, 0, stripe),
        ],
    );
    grove.assert_healthy();
}

fn disk_usage_kib(path: &std::path::Path) -> u64 {
    let out = support::run(
        std::process::Command::new("du").arg("-sk").arg(path),
        support::TOOL_TIMEOUT,
    );
    out.assert_success();
    out.stdout
        .split_whitespace()
        .next()
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("du printed no size\n{}", out.report()))
}

#[test]
fn huge_sparse_volume_takes_no_space() {
    require_nbd_tools();
    let mut grove = Grove::start();
    let tib = 1024 * GIB;
    let before_kib = disk_usage_kib(&grove.data_dir);
    grove.create_volume("big", "16TiB");
    let uri = grove.unix_uri("big");
    assert_eq!(nbdinfo_size(&uri), 16 * tib, "a 16 TiB volume");
    let end = 16 * tib;
    qio_write(
        &uri,
        &[
            &format!("write -P 0x61 {} {}", end - MIB, MIB),
            &format!("write -P 0x62 {} {}", 8 * tib, MIB),
            "write -P 0x63 0 4096",
        ],
    );
    let commit = grove.commit("big", "sparse");
    write_pattern(&uri, 0x64, end - MIB, 4096);
    assert_patterns(
        &uri,
        &[
            (0x64, end - MIB, 4096),
            (0x61, end - MIB + 4096, MIB - 4096),
            (0, end - 2 * MIB, MIB),
            (0x62, 8 * tib, MIB),
            (0, 8 * tib + MIB, MIB),
            (0x63, 0, 4096),
            (0, 4096, MIB),
            (0, 4 * tib, MIB),
        ],
    );
    assert_patterns(
        &grove.unix_uri(&format!("big@{commit}")),
        &[(0x61, end - MIB, MIB), (0x62, 8 * tib, MIB)],
    );
    let grown_kib = disk_usage_kib(&grove.data_dir).saturating_sub(before_kib);
    assert!(
        grown_kib < 64 * 1024,
        "a 16 TiB volume with about 3 MiB written grew the data directory by {grown_kib} KiB"
    );
    grove.assert_healthy();
}
