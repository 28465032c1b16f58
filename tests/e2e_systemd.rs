//! End-to-end operations: the systemd notify protocol, checked against a datagram socket the
//! test listens on as systemd would (`READY=1` once the listeners answer, `WATCHDOG=1` when
//! `WATCHDOG_USEC` asks for it, `STOPPING=1` on SIGTERM, exit 0); `grove serve --check-config`;
//! `grove status`; JSON logs.

mod support;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{free_port, grove_bin, http, run, write_pattern, Grove, MIB};

fn receive(socket: &UnixDatagram, deadline: Instant) -> Option<String> {
    let mut buffer = [0u8; 4096];
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return None;
    }
    socket.set_read_timeout(Some(left)).expect("set timeout");
    let n = socket.recv(&mut buffer).ok()?;
    Some(String::from_utf8_lossy(&buffer[..n]).into_owned())
}

#[test]
fn serve_speaks_the_notify_protocol() {
    let root = tempfile::tempdir().expect("temp dir");
    let path = root.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    let api_port = free_port();
    // systemd names the watched process: the shell's pid, which `exec` hands to grove.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" \"$@\"")
        .arg(grove_bin())
        .arg("serve")
        .arg("--data-dir")
        .arg(root.path().join("data"))
        .arg("--nbd-listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--api-listen")
        .arg(format!("127.0.0.1:{api_port}"))
        .arg("--iscsi-listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "200000")
        .env("GROVE_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(root.path().join("grove.log")).expect("log file"),
        ))
        .spawn()
        .expect("start grove serve");

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut messages = Vec::new();
    while !messages
        .iter()
        .any(|m: &String| m.lines().any(|l| l == "READY=1"))
    {
        match receive(&socket, deadline) {
            Some(message) => messages.push(message),
            None => {
                let _ = child.kill();
                panic!("no READY=1 within 30 s; got {messages:?}");
            }
        }
    }
    // Ready means serving: the API answers.
    let health = http("GET", &format!("http://127.0.0.1:{api_port}/healthz"), None);
    assert_eq!(health.status, 200, "{health:?}");

    // The watchdog is pinged at half its interval.
    let pings_by = Instant::now() + Duration::from_secs(5);
    let mut pings = 0;
    while pings < 3 {
        match receive(&socket, pings_by) {
            Some(message) if message.lines().any(|l| l == "WATCHDOG=1") => pings += 1,
            Some(_) => {}
            None => break,
        }
    }
    assert!(
        pings >= 3,
        "expected watchdog pings every 100 ms, got {pings}"
    );

    // SIGTERM: STOPPING=1, then a clean exit.
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
    let stop_by = Instant::now() + Duration::from_secs(30);
    let mut stopping = false;
    while let Some(message) = receive(&socket, stop_by) {
        if message.lines().any(|l| l == "STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM");
    let exit = child.wait().expect("wait for grove");
    assert!(exit.success(), "grove exited with {exit}");

    // Structured logs: one JSON object per line, with level and message.
    let log = std::fs::read_to_string(root.path().join("grove.log")).expect("read the log");
    assert!(log.lines().count() >= 3, "{log}");
    for line in log.lines() {
        let entry: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {line}"));
        assert!(
            entry["level"].is_string() && entry["message"].is_string(),
            "{line}"
        );
    }
}

#[test]
fn check_config_prints_the_effective_configuration_or_names_the_bad_key() {
    let root = tempfile::tempdir().expect("temp dir");
    let good = root.path().join("good.toml");
    std::fs::write(&good, "cache-size = \"64MiB\"\nevent-retention-days = 7\n").expect("write");
    let out = run(
        Command::new(grove_bin())
            .args(["serve", "--check-config", "--config"])
            .arg(&good)
            .args(["--api-listen", "127.0.0.1:1"]),
        Duration::from_secs(30),
    );
    out.assert_success();
    assert!(
        out.stdout.contains("cache-size = 67108864"),
        "{}",
        out.report()
    );
    assert!(
        out.stdout.contains("event-retention-days = 7"),
        "{}",
        out.report()
    );
    assert!(
        out.stdout.contains("api-listen = \"127.0.0.1:1\""),
        "{}",
        out.report()
    );
    assert!(
        !root.path().join("grove-data").exists(),
        "--check-config must not start anything"
    );

    for (text, key) in [
        ("nbd-listn = \"127.0.0.1:1\"\n", "nbd-listn"),
        ("cache-size = \"1KiB\"\n", "cache-size"),
        ("event-retention-days = 0\n", "event-retention-days"),
    ] {
        let bad = root.path().join("bad.toml");
        std::fs::write(&bad, text).expect("write");
        let out = run(
            Command::new(grove_bin())
                .args(["serve", "--check-config", "--config"])
                .arg(&bad),
            Duration::from_secs(30),
        );
        out.assert_failure();
        assert!(out.stderr.contains(key), "{key}: {}", out.report());
    }
}

#[test]
fn status_gives_one_screen() {
    let grove = Grove::start();
    grove.create_volume("st", "8MiB");
    write_pattern(&grove.unix_uri("st"), 0x11, 0, MIB);
    grove.commit("st", "one");
    let out = grove.cli_ok(&["status"]);
    for needle in [
        "grove:",
        "serving",
        "pool:",
        "io backend:",
        "volumes:",
        "st ",
        "8 MiB",
    ] {
        assert!(
            out.contains(needle),
            "{needle:?} missing from grove status:\n{out}"
        );
    }
    let json = grove.cli_json(&["status"]);
    assert_eq!(json["volumes"][0]["name"], "st", "{json}");
    assert_eq!(json["pool"]["failed"], false, "{json}");
    assert!(
        json["pool"]["event_log_last_seq"]
            .as_u64()
            .unwrap_or_default()
            >= 2,
        "{json}"
    );
}

/// The unit passes `systemd-analyze verify` (its ExecStart pointed at the binary under test,
/// since /usr/bin/grove exists only once the package is installed).
#[test]
fn the_unit_passes_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not installed: skipping");
        return;
    }
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/systemd/grove.service"
    ))
    .expect("read the unit");
    assert!(unit.contains("Type=notify"), "{unit}");
    let root = tempfile::tempdir().expect("temp dir");
    let path = root.path().join("grove.service");
    std::fs::write(&path, unit.replace("/usr/bin/grove", grove_bin())).expect("write the unit");
    let out = run(
        Command::new("systemd-analyze").arg("verify").arg(&path),
        Duration::from_secs(60),
    );
    assert!(
        out.success() && out.stderr.trim().is_empty(),
        "systemd-analyze verify: {}",
        out.report()
    );
}
