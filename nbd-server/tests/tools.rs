//! The server against independent NBD clients: qemu-io and qemu-img (QEMU's client, which
//! negotiates extended headers) and libnbd's nbdinfo and nbdcopy (structured replies,
//! multi-connection). Each test is skipped, with a message, when its tool is not installed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use grove_nbd_server::{serve_tcp_with, MemoryProvider, ServerOptions};
use support::Server;
use tokio::net::TcpListener;
use tokio::process::Command;

/// Longest any one tool run may take before the test fails (the child is killed).
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

fn installed(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    if !found {
        eprintln!("skipping: {tool} is not installed (apt packages qemu-utils and libnbd-bin provide the tools)");
    }
    found
}

async fn run(program: &str, args: &[&str]) -> Output {
    let mut command = Command::new(program);
    command.args(args).kill_on_drop(true);
    let output = tokio::time::timeout(TOOL_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("{program} timed out"))
        .unwrap_or_else(|error| panic!("cannot run {program}: {error}"));
    eprintln!(
        "$ {program} {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn unix_uri(server: &Server, export: &str) -> String {
    format!(
        "nbd+unix:///{export}?socket={}",
        server.socket_path.display()
    )
}

/// Runs qemu-io commands and checks every one succeeded.
async fn qemu_io_ok(uri: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw", uri];
    for command in commands {
        args.push("-c");
        args.push(command);
    }
    let output = run("qemu-io", &args).await;
    let text = format!(
        "{}{}",
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "qemu-io failed: {text}");
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "qemu-io reported a failure: {text}"
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_and_reads_patterns_over_unix_socket() {
    if !installed("qemu-io") {
        return;
    }
    let server = Server::start().await;
    let uri = unix_uri(&server, "vol");
    qemu_io_ok(
        &uri,
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            "write -P 0xcd -f 1m 4k",
            "read -P 0xcd 1m 4k",
            "write -z 16k 16k",
            "read -P 0 16k 16k",
            "read -P 0xab 32k 32k",
            "write -P 0x11 3m 1536",
            "read -P 0x11 3m 1536",
            "discard 3m 4k",
            "flush",
            "read -P 0 2m 1m",
            "read -P 0 15m 1m",
        ],
    )
    .await;
    let export = server.provider.export("vol").unwrap();
    assert!(export.contents(0, 16384).iter().all(|b| *b == 0xab));
    assert!(export.contents(1 << 20, 4096).iter().all(|b| *b == 0xcd));
    assert!(export.fua_ops() >= 1, "write -f sends FUA");
    // In a second process, the data is still there.
    qemu_io_ok(
        &uri,
        &[
            "read -P 0xab 0 16k",
            "read -P 0 16k 16k",
            "read -P 0xcd 1m 4k",
        ],
    )
    .await;
    server.wait_handles_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_over_tcp_on_loopback() {
    if !installed("qemu-io") {
        return;
    }
    let provider = Arc::new(MemoryProvider::new());
    provider.add_export("vol", 8 << 20, false);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(serve_tcp_with(
        provider.clone(),
        listener,
        ServerOptions::default(),
    ));
    let uri = format!("nbd://127.0.0.1:{port}/vol");
    // Parallel requests from one client (aio), then a pattern check.
    qemu_io_ok(
        &uri,
        &[
            "aio_write -P 0x21 0 256k",
            "aio_write -P 0x22 256k 256k",
            "aio_flush",
            "read -P 0x21 0 256k",
            "read -P 0x22 256k 256k",
        ],
    )
    .await;
    assert!(provider
        .export("vol")
        .unwrap()
        .contents(0, 262144)
        .iter()
        .all(|b| *b == 0x21));
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_read_only_export_refuses_writes() {
    if !installed("qemu-io") {
        return;
    }
    let server = Server::start().await;
    let uri = unix_uri(&server, "vol@v1");
    // Opening read-write fails: the export says it is read-only.
    let output = run("qemu-io", &["-f", "raw", &uri, "-c", "read 0 4k"]).await;
    assert!(!output.status.success());
    let output = run(
        "qemu-io",
        &["-r", "-f", "raw", &uri, "-c", "read -P 0 0 64k"],
    )
    .await;
    assert!(output.status.success());
    // QEMU refuses the write itself once it sees NBD_FLAG_READ_ONLY; the server's EPERM for
    // writes that do arrive is pinned by the protocol tests.
    let output = run(
        "qemu-io",
        &["-r", "-f", "raw", &uri, "-c", "write -P 1 0 4k"],
    )
    .await;
    let text = format!(
        "{}{}",
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains("read-only"),
        "write to a read-only export is refused: {text}"
    );
    assert_eq!(
        server.provider.export("vol@v1").unwrap().allocated_blocks(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_map_reads_block_status() {
    if !installed("qemu-img") || !installed("qemu-io") {
        return;
    }
    let server = Server::start().await;
    let uri = unix_uri(&server, "vol");
    qemu_io_ok(&uri, &["write -P 0x77 1m 64k", "write -z 4m 64k"]).await;
    let output = run("qemu-img", &["map", "--output=json", "-f", "raw", &uri]).await;
    assert!(output.status.success());
    let map = stdout(&output);
    // Data where written, zero holes elsewhere.
    assert!(map.contains("\"start\": 1048576, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"), "{map}");
    assert!(map.contains("\"start\": 0, \"length\": 1048576, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false")
        || map.contains("\"start\": 0, \"length\": 1048576, \"depth\": 0, \"present\": false, \"zero\": true, \"data\": false"), "{map}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_exports_and_details() {
    if !installed("nbdinfo") {
        return;
    }
    let server = Server::start().await;
    let socket = server.socket_path.display().to_string();
    let output = run(
        "nbdinfo",
        &["--list", &format!("nbd+unix:///?socket={socket}")],
    )
    .await;
    assert!(output.status.success());
    let list = stdout(&output);
    for name in ["export=\"vol\"", "export=\"vol@v1\"", "export=\"big\""] {
        assert!(list.contains(name), "{name} listed: {list}");
    }
    assert!(list.contains("description: in-memory export vol"), "{list}");

    let output = run("nbdinfo", &["--json", &unix_uri(&server, "vol@v1")]).await;
    assert!(output.status.success());
    let json = stdout(&output);
    for expected in [
        "\"export-size\": 16777216",
        "\"is_read_only\": true",
        "\"can_multi_conn\": true",
        "\"can_flush\": false",
        "\"block_size_minimum\": 1",
        "\"block_size_preferred\": 4096",
        "\"block_size_maximum\": 33554432",
        "\"base:allocation\"",
    ] {
        assert!(json.contains(expected), "{expected} in {json}");
    }
    let output = run("nbdinfo", &["--json", &unix_uri(&server, "vol")]).await;
    let json = stdout(&output);
    for expected in [
        "\"is_read_only\": false",
        "\"can_flush\": true",
        "\"can_fua\": true",
        "\"can_trim\": true",
        "\"can_zero\": true",
        "\"can_fast_zero\": true",
        "\"can_cache\": true",
        "\"can_df\": true",
    ] {
        assert!(json.contains(expected), "{expected} in {json}");
    }
    // An unknown export is an error, not a hang.
    let output = run("nbdinfo", &[&unix_uri(&server, "missing")]).await;
    assert!(!output.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_map_shows_holes_and_data() {
    if !installed("nbdinfo") {
        return;
    }
    let server = Server::start().await;
    let export = server.provider.export("vol").unwrap();
    {
        let mut client = server
            .session("vol", grove_nbd_server::proto::ReplyMode::Structured)
            .await;
        let outcome = client
            .call(
                grove_nbd_server::proto::Command::Write,
                0,
                2 << 20,
                1 << 20,
                &vec![1u8; 1 << 20],
            )
            .await;
        assert_eq!(outcome.error, 0);
        client.disconnect().await;
    }
    assert_eq!(export.allocated_blocks(), 256);
    let output = run("nbdinfo", &["--map", &unix_uri(&server, "vol")]).await;
    assert!(output.status.success());
    let lines: Vec<Vec<String>> = stdout(&output)
        .lines()
        .map(|line| line.split_whitespace().map(str::to_string).collect())
        .collect();
    let expected = [
        ["0", "2097152", "3", "hole,zero"],
        ["2097152", "1048576", "0", "data"],
        ["3145728", "13631488", "3", "hole,zero"],
    ];
    assert_eq!(lines.len(), expected.len(), "{lines:?}");
    for (line, expected) in lines.iter().zip(expected) {
        assert_eq!(line, &expected.map(str::to_string).to_vec());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_round_trip_with_multi_conn() {
    if !installed("nbdcopy") {
        return;
    }
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    let copy = dir.path().join("copy.img");
    // 16 MiB with data islands and zero runs, so the copy uses both data and zeroing.
    let mut image = vec![0u8; 16 << 20];
    for (index, chunk) in image.chunks_mut(1 << 20).enumerate() {
        if index % 3 != 1 {
            for (offset, byte) in chunk[..300_000].iter_mut().enumerate() {
                *byte = ((offset * 7 + index) % 253) as u8;
            }
        }
    }
    std::fs::write(&source, &image).unwrap();
    let uri = unix_uri(&server, "vol");
    let output = run(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=16",
            source.to_str().unwrap(),
            &uri,
        ],
    )
    .await;
    assert!(output.status.success());
    assert_eq!(
        server.provider.export("vol").unwrap().contents(0, 16 << 20),
        image
    );
    std::fs::write(&copy, []).unwrap();
    let output = run(
        "nbdcopy",
        &["--connections=4", &uri, copy.to_str().unwrap()],
    )
    .await;
    assert!(output.status.success());
    assert_eq!(std::fs::read(&copy).unwrap(), image);
    server.wait_handles_closed().await;
}
