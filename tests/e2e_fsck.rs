//! End-to-end: `grove fsck --data-dir DIR` on a real pool. Clean after history made with real
//! clients and a `kill -9` in the middle of writes; refused while grove has the pool open;
//! damaged metadata is reported (exit 1, the place named), never a panic.

mod support;

use std::process::Command;
use std::time::Duration;

use support::{grove_bin, qio_write, require_nbd_tools, run, write_pattern, CmdOut, Grove, MIB};

fn fsck(grove: &Grove, extra: &[&str]) -> CmdOut {
    run(
        Command::new(grove_bin())
            .arg("fsck")
            .arg("--data-dir")
            .arg(&grove.data_dir)
            .args(extra),
        Duration::from_secs(120),
    )
}

#[test]
fn fsck_checks_a_real_pool() {
    require_nbd_tools();
    let mut grove = Grove::start();
    grove.create_volume("f", "16MiB");
    write_pattern(&grove.unix_uri("f"), 0x11, 0, 2 * MIB);
    let c1 = grove.commit("f", "one");
    grove.cli_ok(&["branch", "create", "f", "dev"]);
    write_pattern(&grove.unix_uri("f@dev"), 0x22, MIB, 2 * MIB);
    grove.commit("f@dev", "on dev");
    grove.wait_no_sessions();
    grove.cli_ok(&["merge", "f", "--from", "dev", "--into", "main"]);
    grove.cli_ok(&["tag", "create", "f", "v1", &c1]);
    grove.cli_ok(&["volume", "clone", "f@v1", "g"]);
    write_pattern(&grove.unix_uri("g"), 0x33, 4 * MIB, MIB);
    grove.commit("g", "on the clone");

    // While grove runs, the pool is refused.
    let busy = fsck(&grove, &[]);
    busy.assert_failure();
    assert!(busy.stderr.contains("running grove"), "{}", busy.report());

    // kill -9 with unflushed writes in flight: still clean.
    qio_write(&grove.unix_uri("f@dev"), &["write -P 0x44 8M 1M"]);
    grove.kill9();
    let out = fsck(&grove, &[]);
    out.assert_success();
    assert!(out.stdout.contains("clean"), "{}", out.report());
    assert!(
        out.stdout.contains("2 volumes") && out.stdout.contains("3 commits"),
        "{}",
        out.report()
    );
    let json = fsck(&grove, &["--json"]);
    json.assert_success();
    let report: serde_json::Value = serde_json::from_str(&json.stdout).expect("JSON report");
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");

    // An interrupted journal append: reported, left alone, cut by --repair.
    let journal = grove.data_dir.join("journal.grove");
    let length = std::fs::metadata(&journal).expect("journal").len();
    let mut tail = std::fs::OpenOptions::new()
        .append(true)
        .open(&journal)
        .expect("open the journal");
    std::io::Write::write_all(&mut tail, b"GRVR\x40\x00\x00\x00torn").expect("append");
    drop(tail);
    let torn = fsck(&grove, &[]);
    torn.assert_success();
    assert!(
        torn.stdout.contains("incomplete last record of 12 bytes"),
        "{}",
        torn.report()
    );
    assert_eq!(
        std::fs::metadata(&journal).expect("journal").len(),
        length + 12
    );
    let repaired = fsck(&grove, &["--repair"]);
    repaired.assert_success();
    assert!(
        repaired
            .stdout
            .contains("repaired: cut the torn journal tail"),
        "{}",
        repaired.report()
    );
    assert_eq!(std::fs::metadata(&journal).expect("journal").len(), length);

    // A damaged extent-map node: reported with its place, exit 1, no panic.
    let meta = grove.data_dir.join("meta.grove");
    let mut bytes = std::fs::read(&meta).expect("read meta.grove");
    assert!(
        bytes.len() > 8192,
        "metadata file too small: {}",
        bytes.len()
    );
    for byte in &mut bytes[4096 + 64..4096 + 96] {
        *byte ^= 0xff;
    }
    std::fs::write(&meta, &bytes).expect("damage meta.grove");
    let damaged = fsck(&grove, &[]);
    damaged.assert_failure();
    assert!(
        damaged.stdout.contains("problem") && damaged.stdout.contains("meta page"),
        "{}",
        damaged.report()
    );
    assert!(!damaged.stderr.contains("panicked"), "{}", damaged.report());
}
