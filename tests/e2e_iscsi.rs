//! End-to-end: the iSCSI target, driven by independent initiators — libiscsi's tools
//! (iscsi-ls, iscsi-inq, iscsi-readcapacity16, iscsi-test-cu) and qemu's iSCSI driver
//! (qemu-io with iscsi:// URLs) — and checked against NBD on the same refs.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use support::{
    assert_patterns, qemu_io, qio_write, require_nbd_tools, require_tool, run, write_pattern,
    CmdOut, Grove, Launch, MIB,
};

const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

fn require_iscsi_tools() {
    require_nbd_tools();
    require_tool("iscsi-inq", "libiscsi-bin");
    require_tool("iscsi-ls", "libiscsi-bin");
    require_tool("iscsi-readcapacity16", "libiscsi-bin");
    require_tool("iscsi-test-cu", "libiscsi-bin");
    assert!(
        std::path::Path::new("/usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so").exists()
            || qemu_iscsi_driver_loads(),
        "qemu's iSCSI driver is missing: install qemu-block-extra at the qemu-utils version \
         (scripts/test.sh does this when run as root)"
    );
}

fn qemu_iscsi_driver_loads() -> bool {
    run(Command::new("qemu-img").arg("--help"), TOOL_TIMEOUT)
        .stdout
        .contains("iscsi")
}

/// The target name of an export, by the rule documented in iscsi/src/names.rs, written here
/// from that description: `iqn.2026-11.io.grove:VOL` for the main branch,
/// `iqn.2026-11.io.grove:VOL.REF` otherwise, every byte of REF other than [a-z0-9.-] as ':'
/// and two lowercase hex digits.
fn target_name(export: &str) -> String {
    match export.split_once('@') {
        None => format!("iqn.2026-11.io.grove:{export}"),
        Some((volume, reference)) => {
            let mut name = format!("iqn.2026-11.io.grove:{volume}.");
            for byte in reference.bytes() {
                if byte.is_ascii_lowercase()
                    || byte.is_ascii_digit()
                    || byte == b'-'
                    || byte == b'.'
                {
                    name.push(byte as char);
                } else {
                    name.push_str(&format!(":{byte:02x}"));
                }
            }
            name
        }
    }
}

fn iscsi_uri(grove: &Grove, export: &str) -> String {
    format!(
        "iscsi://127.0.0.1:{}/{}/0",
        grove.iscsi_port,
        target_name(export)
    )
}

fn libiscsi(tool: &str, args: &[&str]) -> CmdOut {
    run(Command::new(tool).args(args), TOOL_TIMEOUT)
}

#[test]
fn data_crosses_between_iscsi_and_nbd_on_every_ref() {
    require_iscsi_tools();
    let mut grove = Grove::start();
    grove.create_volume("disk", "64MiB");
    grove.cli_ok(&["branch", "create", "disk", "feature/Big_1"]);

    // Discovery lists every ref as a target, the branch under its escaped name.
    let listed = libiscsi(
        "iscsi-ls",
        &[&format!("iscsi://127.0.0.1:{}", grove.iscsi_port)],
    );
    listed.assert_success();
    for export in ["disk", "disk@feature/Big_1"] {
        assert!(
            listed
                .stdout
                .contains(&format!("Target:{} ", target_name(export))),
            "{export} not discovered\n{}",
            listed.report()
        );
    }

    // 512-byte logical blocks, 4 KiB physical, thin provisioned.
    let capacity = libiscsi("iscsi-readcapacity16", &[&iscsi_uri(&grove, "disk")]);
    capacity.assert_success();
    let text = capacity.stdout.clone();
    assert!(text.contains("LOGICAL BLOCK LENGTH IN BYTES:512"), "{text}");
    assert!(text.contains("Total size:67108864"), "{text}");
    assert!(text.contains("LBPME:1"), "{text}");
    let inquiry = libiscsi("iscsi-inq", &[&iscsi_uri(&grove, "disk")]);
    inquiry.assert_success();
    assert!(
        inquiry.stdout.contains("Vendor:GROVE"),
        "{}",
        inquiry.report()
    );

    // Written over iSCSI (whole blocks, a single sector, and a range across 4 KiB blocks),
    // read over NBD.
    qio_write(
        &iscsi_uri(&grove, "disk"),
        &[
            "write -P 0x5a 0 1M",
            "write -P 0x77 4608 512",
            "write -P 0x66 7680 1536",
        ],
    );
    let nbd_main = grove.unix_uri("disk");
    assert_patterns(
        &nbd_main,
        &[
            (0x5a, 0, 4608),
            (0x77, 4608, 512),
            (0x5a, 5120, 2560),
            (0x66, 7680, 1536),
            (0x5a, 9216, MIB - 9216),
            (0x00, MIB, MIB),
        ],
    );
    // Written over NBD, read over iSCSI.
    write_pattern(&nbd_main, 0x6b, 2 * MIB, 3 * MIB);
    assert_patterns(
        &iscsi_uri(&grove, "disk"),
        &[
            (0x5a, 0, 4096),
            (0x6b, 2 * MIB, 3 * MIB),
            (0x00, 5 * MIB, MIB),
        ],
    );

    // The branch is its own target.
    write_pattern(&iscsi_uri(&grove, "disk@feature/Big_1"), 0x42, 0, MIB);
    assert_patterns(&grove.unix_uri("disk@feature/Big_1"), &[(0x42, 0, MIB)]);
    assert_patterns(&nbd_main, &[(0x5a, 0, 4096)]);

    // A commit is a read-only target with the data of its moment.
    grove.wait_no_sessions();
    let commit = grove.commit("disk", "first");
    write_pattern(&nbd_main, 0x99, 0, MIB);
    let commit_uri = iscsi_uri(&grove, &format!("disk@{commit}"));
    assert_patterns(&commit_uri, &[(0x5a, 0, 4096), (0x6b, 2 * MIB, MIB)]);
    let refused = qemu_io(&commit_uri, &["write -P 0x01 0 4k".to_string()], false);
    assert!(
        !refused.success() || refused.combined().contains("failed"),
        "a write to a commit target went through\n{}",
        refused.report()
    );
    assert_patterns(&commit_uri, &[(0x5a, 0, 4096)]);

    // Sessions are logged and metered as iSCSI.
    let events = grove
        .http("GET", "/v1/events?type=session.opened", None)
        .json();
    assert!(
        events["events"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["protocol"] == "iscsi"),
        "{events}"
    );
    let metrics = grove.http("GET", "/metrics", None);
    assert!(
        metrics.body.contains("protocol=\"iscsi\""),
        "no iSCSI series in /metrics"
    );

    // Flushed over iSCSI (qemu closes with SYNCHRONIZE CACHE), then a crash: all there.
    write_pattern(&iscsi_uri(&grove, "disk"), 0x3c, 8 * MIB, 2 * MIB);
    grove.kill9();
    grove.restart_after_kill9();
    assert_patterns(
        &grove.unix_uri("disk"),
        &[(0x99, 0, MIB), (0x3c, 8 * MIB, 2 * MIB)],
    );
}

#[test]
fn header_digests_are_negotiated_and_checked() {
    require_iscsi_tools();
    let grove = Grove::start();
    grove.create_volume("dig", "16MiB");
    // qemu asks for CRC32C header digests only; libiscsi 1.19 offers no way to ask for data
    // digests, which the unit tests of iscsi/src/pdu.rs cover.
    let options = format!(
        "driver=raw,file.driver=iscsi,file.transport=tcp,file.portal=127.0.0.1:{},\
         file.target={},file.lun=0,file.header-digest=crc32c",
        grove.iscsi_port,
        target_name("dig")
    );
    let out = run(
        Command::new("qemu-io")
            .arg("--image-opts")
            .args(["-c", "write -P 0x4d 0 2M", "-c", "read -P 0x4d 0 2M"])
            .arg(&options),
        TOOL_TIMEOUT,
    );
    assert!(
        out.success() && !out.combined().contains("failed"),
        "{}",
        out.report()
    );
    assert_patterns(&grove.unix_uri("dig"), &[(0x4d, 0, 2 * MIB)]);
    let log = grove.log_text();
    assert!(
        log.lines()
            .any(|line| line.contains("iSCSI session started")
                && line.contains("header_digest=true")),
        "no session with header digests in the log:\n{log}"
    );
}

#[test]
fn chap_is_required_when_configured() {
    require_iscsi_tools();
    let root = tempfile::tempdir().expect("temp dir");
    let config = root.path().join("chap.toml");
    std::fs::write(
        &config,
        "iscsi-chap-user = \"alice\"\n\
         iscsi-chap-secret = \"alice-secret-12\"\n\
         iscsi-mutual-chap-user = \"grove\"\n\
         iscsi-mutual-chap-secret = \"target-secret-34\"\n",
    )
    .expect("write config");
    let config = config.to_string_lossy().to_string();
    let grove = Grove::start_with(Launch::Flags, &["--config", &config]);
    grove.create_volume("sec", "8MiB");
    let target = target_name("sec");
    let port = grove.iscsi_port;
    let with = |credentials: &str| format!("iscsi://{credentials}127.0.0.1:{port}/{target}/0");

    // One-way CHAP with the right secret works; wrong or missing credentials do not.
    libiscsi("iscsi-inq", &[&with("alice%alice-secret-12@")]).assert_success();
    libiscsi("iscsi-inq", &[&with("alice%wrong-secret-99@")]).assert_failure();
    libiscsi("iscsi-inq", &[&with("bob%alice-secret-12@")]).assert_failure();
    libiscsi("iscsi-inq", &[&with("")]).assert_failure();
    // Discovery needs the credentials too.
    libiscsi("iscsi-ls", &[&format!("iscsi://127.0.0.1:{port}")]).assert_failure();
    libiscsi(
        "iscsi-ls",
        &[&format!("iscsi://alice%alice-secret-12@127.0.0.1:{port}")],
    )
    .assert_success();

    // Mutual CHAP: the initiator checks the target's answer; a wrong expected secret fails.
    let mutual = |secret: &str| {
        run(
            Command::new("iscsi-inq")
                .arg(with("alice%alice-secret-12@"))
                .env("LIBISCSI_CHAP_TARGET_USERNAME", "grove")
                .env("LIBISCSI_CHAP_TARGET_PASSWORD", secret),
            TOOL_TIMEOUT,
        )
    };
    mutual("target-secret-34").assert_success();
    mutual("not-the-secret").assert_failure();

    // Data moves once logged in.
    write_pattern(&with("alice%alice-secret-12@"), 0x21, 0, MIB);
    assert_patterns(&grove.unix_uri("sec"), &[(0x21, 0, MIB)]);
    let log = grove.log_text();
    assert!(
        !log.contains("alice-secret-12") && !log.contains("target-secret-34"),
        "a secret reached the log"
    );
}

/// Sends raw bytes on a new connection and reads until the server closes it (or 5 s pass).
fn raw_exchange(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = stream.write_all(bytes);
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    reply
}

fn login_pdu(data_len: u32, data: &[u8]) -> Vec<u8> {
    let mut pdu = vec![0u8; 48];
    pdu[0] = 0x43; // immediate Login Request
    pdu[1] = 0x87; // T, CSG 1 (operational), NSG 3 (full feature)
    pdu[5..8].copy_from_slice(&data_len.to_be_bytes()[1..]);
    pdu[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 1]);
    pdu.extend_from_slice(data);
    while !pdu.len().is_multiple_of(4) {
        pdu.push(0);
    }
    pdu
}

#[test]
fn hostile_input_closes_only_its_own_connection() {
    require_iscsi_tools();
    let mut grove = Grove::start();
    grove.create_volume("h", "8MiB");
    let port = grove.iscsi_port;

    // Not iSCSI at all.
    raw_exchange(port, b"GET / HTTP/1.0\r\n\r\n");
    raw_exchange(port, &[0xffu8; 4096]);
    // A login announcing a 16 MiB data segment: refused before it is read.
    raw_exchange(port, &login_pdu(16 << 20, b""));
    // A SCSI command before login.
    let mut command = vec![0u8; 48];
    command[0] = 0x01;
    raw_exchange(port, &command);
    // A login for a target that does not exist: a Login Response with status class 2.
    let text = format!(
        "InitiatorName=iqn.2026-11.test:hostile\0TargetName={}\0SessionType=Normal\0",
        target_name("nope")
    );
    let reply = raw_exchange(port, &login_pdu(text.len() as u32, text.as_bytes()));
    assert!(reply.len() >= 48, "no login response: {reply:?}");
    assert_eq!(reply[0] & 0x3f, 0x23, "not a Login Response");
    assert_eq!(
        reply[36], 0x02,
        "status class of a login to a missing target"
    );
    // A login with malformed text.
    let garbage = b"InitiatorName\0=\0\xff\xfe";
    let reply = raw_exchange(port, &login_pdu(garbage.len() as u32, garbage));
    assert!(
        reply.len() >= 48 && reply[36] != 0,
        "malformed text accepted: {reply:?}"
    );
    // A connection that logs in halfway and stays silent does not hold anything up.
    let _idle = TcpStream::connect(("127.0.0.1", port)).expect("connect");

    grove.assert_alive();
    libiscsi("iscsi-inq", &[&iscsi_uri(&grove, "h")]).assert_success();
    write_pattern(&iscsi_uri(&grove, "h"), 0x11, 0, MIB);
    assert_patterns(&grove.unix_uri("h"), &[(0x11, 0, MIB)]);
}

/// The results iscsi-test-cu printed: `(test, passed)` per test line.
fn cu_results(out: &CmdOut) -> Vec<(String, bool)> {
    out.stdout
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Test: "))
        .map(|rest| {
            let name = rest.split(" ...").next().unwrap_or(rest).to_string();
            (name, rest.contains("...passed"))
        })
        .collect()
}

#[test]
fn conformance_suite_passes_every_test_tgt_passes() {
    require_iscsi_tools();
    let grove = Grove::start();
    grove.create_volume("conf", "1GiB");

    // libiscsi's whole suite, one process per group, compared with the stored results of
    // tgt (the Linux reference target): the script fails on any test tgt passes and grove
    // does not.
    let out_dir = grove.root().join("conformance");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/iscsi-conformance.sh");
    let url = iscsi_uri(&grove, "conf");
    let out = run(
        Command::new("bash")
            .arg(script)
            .args(["--url", &url, "--out"])
            .arg(&out_dir),
        Duration::from_secs(900),
    );
    assert!(
        out.success(),
        "grove fails tests that tgt passes\n{}",
        out.report()
    );
    eprintln!("{}", out.stdout);

    // The groups the script cannot run on one writable LUN: read-only refs (a commit) and
    // two sessions to the same target (multipath).
    grove.create_volume("ro", "64MiB");
    write_pattern(&grove.unix_uri("ro"), 0x17, 0, MIB);
    grove.wait_no_sessions();
    let commit = grove.commit("ro", "frozen");
    let read_only = libiscsi(
        "iscsi-test-cu",
        &[
            "--dataloss",
            "--test=SCSI.ReadOnly",
            &iscsi_uri(&grove, &format!("ro@{commit}")),
        ],
    );
    let results = cu_results(&read_only);
    assert!(
        !results.is_empty() && results.iter().all(|(_, passed)| *passed),
        "SCSI.ReadOnly on a commit\n{}",
        read_only.report()
    );
    assert!(
        !read_only.stdout.contains("[SKIPPED]"),
        "SCSI.ReadOnly skipped on a commit\n{}",
        read_only.report()
    );
    // On a fresh volume: the test compares block 256, past the 256 blocks it initialises.
    grove.create_volume("mp", "64MiB");
    let multipath_url = iscsi_uri(&grove, "mp");
    let multipath = libiscsi(
        "iscsi-test-cu",
        &[
            "--dataloss",
            "--test=SCSI.MultipathIO",
            &multipath_url,
            &multipath_url,
        ],
    );
    let results = cu_results(&multipath);
    assert!(
        !results.is_empty() && results.iter().all(|(_, passed)| *passed),
        "SCSI.MultipathIO with two sessions\n{}",
        multipath.report()
    );
    assert_patterns(&grove.unix_uri(&format!("ro@{commit}")), &[(0x17, 0, MIB)]);
}
