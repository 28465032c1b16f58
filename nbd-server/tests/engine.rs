//! The server over a real engine pool through the public entry point `serve_unix`: export
//! names resolve to branches, tags and commit prefixes, read-only refs refuse writes, commits
//! see the data written over NBD, and block status comes from the extent map.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use grove_engine::{CommitRequest, IoChoice, Pool, PoolOptions};
use grove_nbd_server::proto::*;
use grove_nbd_server::serve_unix;
use support::{session, Client};
use tokio::net::{UnixListener, UnixStream};

struct EngineServer {
    pool: Pool,
    socket_path: std::path::PathBuf,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for EngineServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start() -> EngineServer {
    support::init_logging();
    let dir = tempfile::tempdir().unwrap();
    let mut options = PoolOptions::new(dir.path().join("pool"));
    options.io = IoChoice::Threads;
    options.cache_bytes = 16 << 20;
    let pool = Pool::open(options).unwrap();
    pool.create_volume("vol", 64 << 20).await.unwrap();
    let socket_path = dir.path().join("nbd.sock");
    let listener = UnixListener::bind(&socket_path).unwrap();
    let task = tokio::spawn(serve_unix(pool.clone(), listener));
    EngineServer {
        pool,
        socket_path,
        task,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_refs_as_exports() {
    let server = start().await;

    // Write on the main branch (`VOL`), with simple and with structured replies.
    let mut client = session(&server.socket_path, "vol", ReplyMode::Simple).await;
    let first: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8).collect();
    assert_eq!(
        client
            .call(Command::Write, 0, 1 << 20, 65536, &first)
            .await
            .error,
        0
    );
    assert_eq!(client.call(Command::Flush, 0, 0, 0, &[]).await.error, 0);
    client.disconnect().await;

    let commit = server
        .pool
        .commit(
            "vol",
            "main",
            CommitRequest {
                message: "first".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    server
        .pool
        .create_tag("vol", "v1", &commit.id.to_hex())
        .await
        .unwrap();

    // Overwrite on main after the commit, through extended headers.
    let mut client = session(&server.socket_path, "vol@main", ReplyMode::Extended).await;
    assert_eq!(
        client
            .call(
                Command::Write,
                NBD_CMD_FLAG_FUA,
                1 << 20,
                4096,
                &[0xee; 4096]
            )
            .await
            .error,
        0
    );
    let outcome = client.call(Command::BlockStatus, 0, 0, 4 << 20, &[]).await;
    assert_eq!(outcome.error, 0);
    let hole_zero = u64::from(NBD_STATE_HOLE | NBD_STATE_ZERO);
    assert_eq!(
        outcome.descriptors,
        [
            (1 << 20, hole_zero),
            (65536, 0),
            ((3 << 20) - 65536, hole_zero)
        ]
    );
    client.disconnect().await;

    // The tag and a commit-id prefix are read-only views of the commit.
    let prefix = &commit.id.to_hex()[..10];
    for export in ["vol@v1".to_string(), format!("vol@{prefix}")] {
        let mut client = support::Client::greet(
            UnixStream::connect(&server.socket_path).await.unwrap(),
            NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES,
        )
        .await;
        client.option(NBD_OPT_STRUCTURED_REPLY, &[]).await;
        let summary = client.go(&export, &[NBD_INFO_NAME]).await.unwrap();
        assert_eq!(summary.size_bytes, 64 << 20);
        assert_ne!(
            summary.flags & NBD_FLAG_READ_ONLY,
            0,
            "{export} is read-only"
        );
        let outcome = client.call(Command::Read, 0, 1 << 20, 65536, &[]).await;
        assert_eq!(outcome.error, 0);
        assert_eq!(outcome.data, first, "{export} shows the committed data");
        assert_eq!(
            client
                .call(Command::Write, 0, 0, 512, &[1u8; 512])
                .await
                .error,
            NBD_EPERM
        );
        assert_eq!(
            client.call(Command::Trim, 0, 0, 4096, &[]).await.error,
            NBD_EPERM
        );
        client.disconnect().await;
    }

    // The listing has every ref; unknown refs and bad names are refused cleanly.
    let mut client = Client::greet(
        UnixStream::connect(&server.socket_path).await.unwrap(),
        NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES,
    )
    .await;
    let listing = client.option(NBD_OPT_LIST, &[]).await;
    let names: Vec<String> = listing
        .of_type(NBD_REP_SERVER)
        .iter()
        .map(|reply| {
            let len = u32::from_be_bytes(reply.data[0..4].try_into().unwrap()) as usize;
            String::from_utf8(reply.data[4..4 + len].to_vec()).unwrap()
        })
        .collect();
    assert!(
        names.contains(&"vol".to_string()) && names.contains(&"vol@v1".to_string()),
        "{names:?}"
    );
    assert!(names.contains(&format!("vol@{}", commit.id)), "{names:?}");
    let info = InfoRequest {
        name: "vol@v1".into(),
        info_types: vec![NBD_INFO_NAME, NBD_INFO_DESCRIPTION],
    };
    let replies = client.option(NBD_OPT_INFO, &info.encode()).await;
    assert_eq!(replies.last_type(), NBD_REP_ACK);
    assert_eq!(replies.info(NBD_INFO_NAME).unwrap(), b"vol@v1");
    for name in ["vol@nope", "other", "Bad Name", "vol@"] {
        let replies = client.go(name, &[]).await.unwrap_err();
        assert_eq!(replies.last_type(), NBD_REP_ERR_UNKNOWN, "{name}");
    }
    client.disconnect().await;

    // Sessions are closed once their connections end.
    for _ in 0..200 {
        if server.pool.sessions().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(
        server.pool.sessions().is_empty(),
        "{:?}",
        server.pool.sessions()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_sessions_record_nbd_clients() {
    let server = start().await;
    let mut client = session(&server.socket_path, "vol", ReplyMode::Structured).await;
    assert_eq!(
        client
            .call(Command::Write, 0, 0, 4096, &[3u8; 4096])
            .await
            .error,
        0
    );
    let sessions = server.pool.sessions();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].client.protocol, "nbd");
    assert!(
        sessions[0].client.address.starts_with("unix"),
        "{}",
        sessions[0].client.address
    );
    assert_eq!(sessions[0].counters.write_bytes, 4096);
    client.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_against_an_engine_pool() {
    if !std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join("qemu-io").is_file()))
        .unwrap_or(false)
    {
        eprintln!("skipping: qemu-io is not installed (apt package qemu-utils)");
        return;
    }
    let server = start().await;
    let uri = format!("nbd+unix:///vol?socket={}", server.socket_path.display());
    let mut command = tokio::process::Command::new("qemu-io");
    command.kill_on_drop(true).args(["-f", "raw", &uri]);
    for step in [
        "write -P 0xab 0 64k",
        "write -P 0xcd 100k 3k",
        "write -z 8k 8k",
        "flush",
        "read -P 0xab 0 8k",
        "read -P 0 8k 8k",
        "read -P 0xcd 100k 3k",
    ] {
        command.args(["-c", step]);
    }
    let output = tokio::time::timeout(std::time::Duration::from_secs(120), command.output())
        .await
        .unwrap()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{text}");
    assert!(
        output.status.success() && !text.contains("failed"),
        "{text}"
    );
}
