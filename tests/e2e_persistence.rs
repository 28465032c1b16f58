//! End-to-end: data, branches, tags and commits survive a graceful restart (SIGTERM) and a
//! crash (SIGKILL) after a FLUSH, a FUA write, or a FLUSH on another connection
//! (NBD_FLAG_CAN_MULTI_CONN), and across rounds of random writes, commits and crashes checked
//! against an in-memory model, on both disk I/O backends.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use support::nbd;
use support::{
    assert_pattern, assert_patterns, assert_same_bytes, json_has_str, nbdcopy_out, qio_write,
    require_nbd_tools, serve_help, write_pattern, Grove, Launch, Rng, KIB, MIB,
};

#[test]
fn survives_graceful_restart() {
    require_nbd_tools();
    let mut grove = Grove::start();
    grove.create_volume("p", "64MiB");
    let main = grove.unix_uri("p");
    write_pattern(&main, 0x11, 0, 2 * MIB);
    let commit = grove.commit("p", "c1");
    write_pattern(&main, 0x22, MIB, MIB);
    grove.cli_ok(&["tag", "create", "p", "keep", &format!("p@{commit}")]);
    grove.cli_ok(&[
        "branch",
        "create",
        "p",
        "dev",
        "--from",
        &format!("p@{commit}"),
    ]);
    write_pattern(&grove.unix_uri("p@dev"), 0x33, 4 * MIB, MIB);

    let status = grove.terminate();
    assert!(
        status.success() || status.signal() == Some(15),
        "SIGTERM should end grove cleanly, got {status}\n{}",
        grove.log_text()
    );
    grove.spawn();

    let main = grove.unix_uri("p");
    assert_patterns(
        &main,
        &[(0x11, 0, MIB), (0x22, MIB, MIB), (0, 2 * MIB, MIB)],
    );
    assert_pattern(&grove.unix_uri(&format!("p@{commit}")), 0x11, 0, 2 * MIB);
    assert_pattern(&grove.unix_uri("p@keep"), 0x11, 0, 2 * MIB);
    assert_patterns(
        &grove.unix_uri("p@dev"),
        &[(0x11, 0, 2 * MIB), (0x33, 4 * MIB, MIB)],
    );
    let log = grove.cli_json(&["log", "p"]);
    assert!(
        json_has_str(&log, &commit),
        "commit {commit} must survive a restart: {log}"
    );
    let volumes = grove.cli_json(&["volume", "list"]);
    assert!(
        json_has_str(&volumes, "p"),
        "volume p must survive: {volumes}"
    );

    // The restarted server keeps working: new writes and commits.
    write_pattern(&main, 0x44, 8 * MIB, MIB);
    let after = grove.commit("p", "after restart");
    assert_ne!(after, commit);
    let log = grove.cli_json(&["log", "p"]);
    assert!(
        json_has_str(&log, &commit) && json_has_str(&log, &after),
        "the log holds the commits from before and after the restart: {log}"
    );
    grove.assert_healthy();
}

#[test]
fn survives_kill_9_after_flush() {
    require_nbd_tools();
    let mut grove = Grove::start();
    grove.create_volume("k", "64MiB");
    let main = grove.unix_uri("k");
    write_pattern(&main, 0x11, 0, 2 * MIB);
    let commit = grove.commit("k", "before crash");
    grove.cli_ok(&[
        "branch",
        "create",
        "k",
        "dev",
        "--from",
        &format!("k@{commit}"),
    ]);
    grove.cli_ok(&["tag", "create", "k", "pinned", &format!("k@{commit}")]);
    // qemu-io writes then flushes explicitly.
    qio_write(&main, &[&format!("write -P 0x22 {} {}", MIB, MIB), "flush"]);
    qio_write(
        &grove.unix_uri("k@dev"),
        &[&format!("write -P 0x33 {} {}", 3 * MIB, MIB), "flush"],
    );

    // Raw connections that stay open across the crash, so no close-time flush can help:
    // a FUA write, a write followed by FLUSH on the same connection, and a write whose FLUSH
    // is sent on a different connection (which covers it when CAN_MULTI_CONN is advertised).
    let (mut fua_conn, info) = nbd::open(grove.nbd_port, "k");
    assert!(
        info.flags & nbd::TFLAG_SEND_FUA != 0,
        "a writable export must advertise NBD_FLAG_SEND_FUA, flags {:#x}",
        info.flags
    );
    assert!(
        info.flags & nbd::TFLAG_SEND_FLUSH != 0,
        "a writable export must advertise NBD_FLAG_SEND_FLUSH, flags {:#x}",
        info.flags
    );
    assert!(
        info.flags & nbd::TFLAG_CAN_MULTI_CONN != 0,
        "exports must advertise NBD_FLAG_CAN_MULTI_CONN, flags {:#x}",
        info.flags
    );
    let error = fua_conn
        .write(6 * MIB, &vec![0x44; 64 * 1024], nbd::CMD_FLAG_FUA)
        .expect("FUA write");
    assert_eq!(error, 0, "FUA write must succeed");

    let (mut flush_conn, _) = nbd::open(grove.nbd_port, "k");
    let error = flush_conn
        .write(7 * MIB, &vec![0x55; 64 * 1024], 0)
        .expect("write");
    assert_eq!(error, 0);
    assert_eq!(flush_conn.flush().expect("flush"), 0, "FLUSH must succeed");

    let (mut writer_conn, _) = nbd::open(grove.nbd_port, "k");
    let (mut other_conn, _) = nbd::open(grove.nbd_port, "k");
    let error = writer_conn
        .write(9 * MIB, &vec![0x66; 64 * 1024], 0)
        .expect("write");
    assert_eq!(error, 0);
    assert_eq!(
        other_conn.flush().expect("flush on another connection"),
        0,
        "FLUSH on another connection must succeed"
    );

    grove.restart_after_kill9();
    drop((fua_conn, flush_conn, writer_conn, other_conn));

    let main = grove.unix_uri("k");
    assert_patterns(
        &main,
        &[
            (0x11, 0, MIB),
            (0x22, MIB, MIB),
            (0, 2 * MIB, 4 * MIB),
            (0x44, 6 * MIB, 64 * 1024),
            (0x55, 7 * MIB, 64 * 1024),
        ],
    );
    assert_pattern(&main, 0x66, 9 * MIB, 64 * 1024);
    assert_pattern(&grove.unix_uri(&format!("k@{commit}")), 0x11, 0, 2 * MIB);
    assert_pattern(&grove.unix_uri("k@pinned"), 0x11, 0, 2 * MIB);
    assert_patterns(
        &grove.unix_uri("k@dev"),
        &[(0x11, 0, 2 * MIB), (0x33, 3 * MIB, MIB)],
    );
    let log = grove.cli_json(&["log", "k"]);
    assert!(
        json_has_str(&log, &commit),
        "commit {commit} must survive kill -9: {log}"
    );

    // A second crash right after a commit and a flush: the commit exists with all its data.
    write_pattern(&main, 0x77, 12 * MIB, MIB);
    let second = grove.commit("k", "second");
    qio_write(
        &main,
        &[&format!("write -P 0x78 {} {}", 12 * MIB, MIB), "flush"],
    );
    grove.restart_after_kill9();
    assert_pattern(&grove.unix_uri(&format!("k@{second}")), 0x77, 12 * MIB, MIB);
    assert_pattern(&grove.unix_uri("k"), 0x78, 12 * MIB, MIB);
    let log = grove.cli_json(&["log", "k"]);
    assert!(
        json_has_str(&log, &commit) && json_has_str(&log, &second),
        "both commits survive the second crash: {log}"
    );
    grove.assert_healthy();
}

const CYCLE_VOLUME_BYTES: u64 = 16 * MIB;

/// Random qemu-io commands over one head, applied to its in-memory model as well: unaligned
/// pattern writes, unaligned write-zeroes, and 64 KiB-aligned discards, then a flush.
fn random_commands(rng: &mut Rng, model: &mut [u8], count: usize) -> Vec<String> {
    let mut commands = Vec::with_capacity(count + 1);
    for _ in 0..count {
        let choice = rng.below(10);
        if choice < 7 {
            let length = 1 + rng.below(256 * KIB);
            let offset = rng.below(CYCLE_VOLUME_BYTES - length);
            let pattern = 1 + rng.below(255) as u8;
            model[offset as usize..(offset + length) as usize].fill(pattern);
            commands.push(format!("write -P 0x{pattern:02x} {offset} {length}"));
        } else if choice < 9 {
            let length = 1 + rng.below(128 * KIB);
            let offset = rng.below(CYCLE_VOLUME_BYTES - length);
            model[offset as usize..(offset + length) as usize].fill(0);
            commands.push(format!("write -z {offset} {length}"));
        } else {
            let length = (1 + rng.below(4)) * 64 * KIB;
            let offset = rng.below((CYCLE_VOLUME_BYTES - length) / (64 * KIB)) * 64 * KIB;
            model[offset as usize..(offset + length) as usize].fill(0);
            commands.push(format!("discard {offset} {length}"));
        }
    }
    commands.push("flush".to_string());
    commands
}

fn check_export(grove: &Grove, export: &str, model: &[u8], context: &str) {
    let path = grove.root().join("check.img");
    let bytes = nbdcopy_out(&grove.unix_uri(export), &path);
    assert_same_bytes(model, &bytes, &format!("{context}: export {export}"));
}

/// Several rounds of random writes on two branches, commits, and a `kill -9` after each
/// round's flush; after every restart each head and each commit must match its model exactly.
/// The last round also kills the server while a client is still writing, and checks that
/// everything outside the range being written is intact.
fn crash_cycles(grove: &mut Grove, seed: u64) {
    let mut rng = Rng::new(seed);
    grove.create_volume("cyc", "16MiB");
    let mut main_model = vec![0u8; CYCLE_VOLUME_BYTES as usize];
    let mut side_model: Option<Vec<u8>> = None;
    let mut commits: Vec<(String, Vec<u8>)> = Vec::new();

    for round in 0..4 {
        let context = format!("seed {seed}, round {round}");
        let commands = random_commands(&mut rng, &mut main_model, 24);
        let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
        qio_write(&grove.unix_uri("cyc"), &commands);
        if let Some(model) = side_model.as_mut() {
            let commands = random_commands(&mut rng, model, 12);
            let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
            qio_write(&grove.unix_uri("cyc@side"), &commands);
        }
        if round % 2 == 0 {
            let id = grove.commit("cyc", &format!("round {round}"));
            if side_model.is_none() {
                grove.cli_ok(&[
                    "branch",
                    "create",
                    "cyc",
                    "side",
                    "--from",
                    &format!("cyc@{id}"),
                ]);
                side_model = Some(main_model.clone());
            }
            commits.push((id, main_model.clone()));
        }

        grove.restart_after_kill9();

        check_export(grove, "cyc", &main_model, &context);
        if let Some(model) = side_model.as_ref() {
            check_export(grove, "cyc@side", model, &context);
        }
        for (id, model) in &commits {
            check_export(grove, &format!("cyc@{id}"), model, &context);
        }
    }

    // A crash while a client is writing 0xee over [8 MiB, 12 MiB).
    let mut writer = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            &format!("write -P 0xee {} {}", 8 * MIB, 4 * MIB),
        ])
        .arg(grove.unix_uri("cyc"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-io");
    thread::sleep(Duration::from_millis(30));
    grove.kill9();
    let started = Instant::now();
    while writer.try_wait().expect("try_wait").is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = writer.kill();
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = writer.wait();
    grove.spawn();
    let path = grove.root().join("check.img");
    let bytes = nbdcopy_out(&grove.unix_uri("cyc"), &path);
    let (start, end) = ((8 * MIB) as usize, (12 * MIB) as usize);
    assert_same_bytes(
        &main_model[..start],
        &bytes[..start],
        "after a crash mid-write: before the range",
    );
    assert_same_bytes(
        &main_model[end..],
        &bytes[end..],
        "after a crash mid-write: after the range",
    );
    for (id, model) in &commits {
        check_export(
            grove,
            &format!("cyc@{id}"),
            model,
            "after a crash mid-write",
        );
    }
    if let Some(model) = side_model.as_ref() {
        check_export(grove, "cyc@side", model, "after a crash mid-write");
    }
    grove.assert_healthy();
}

#[test]
fn crash_cycles_with_random_writes() {
    require_nbd_tools();
    let mut grove = Grove::start();
    crash_cycles(&mut grove, 0x5eed_0001);
}

#[test]
fn crash_cycles_with_thread_pool_io_backend() {
    require_nbd_tools();
    assert!(
        serve_help().contains("--io-backend"),
        "grove serve should let the disk I/O backend be chosen (--io-backend threads)"
    );
    let mut grove = Grove::start_with(Launch::Flags, &["--io-backend", "threads"]);
    crash_cycles(&mut grove, 0x5eed_0002);
}
