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

/// `(id, name)` of the contexts a `NBD_OPT_SET_META_CONTEXT` selected.
async fn select_contexts(
    client: &mut Client,
    export: &str,
    queries: &[&str],
) -> Vec<(u32, String)> {
    let request = MetaContextRequest {
        name: export.into(),
        queries: queries.iter().map(|query| query.to_string()).collect(),
    };
    let replies = client
        .option(NBD_OPT_SET_META_CONTEXT, &request.encode())
        .await;
    assert_eq!(replies.last_type(), NBD_REP_ACK);
    replies
        .of_type(NBD_REP_META_CONTEXT)
        .iter()
        .map(|reply| {
            (
                u32::from_be_bytes(reply.data[0..4].try_into().unwrap()),
                String::from_utf8(reply.data[4..].to_vec()).unwrap(),
            )
        })
        .collect()
}

/// A structured-reply client with `queries` selected on `export`, in transmission.
async fn diff_session(
    server: &EngineServer,
    export: &str,
    queries: &[&str],
) -> (Client, Vec<(u32, String)>) {
    let mut client = Client::greet(
        UnixStream::connect(&server.socket_path).await.unwrap(),
        NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES,
    )
    .await;
    client.option(NBD_OPT_STRUCTURED_REPLY, &[]).await;
    let selected = select_contexts(&mut client, export, queries).await;
    client.go(export, &[]).await.unwrap();
    (client, selected)
}

/// Descriptors of every chunk of a whole-export block status request.
async fn diff_map(client: &mut Client) -> Vec<(u32, Vec<(u64, u64)>)> {
    let outcome = client.call(Command::BlockStatus, 0, 0, 64 << 20, &[]).await;
    assert_eq!(outcome.error, 0, "{}", outcome.message);
    outcome.contexts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_diff_contexts_between_refs() {
    let server = start().await;
    server.pool.create_volume("other", 64 << 20).await.unwrap();
    let mut client = session(&server.socket_path, "vol", ReplyMode::Structured).await;
    let write = |offset: u64, len: usize, byte: u8| (offset, vec![byte; len]);
    for (offset, data) in [write(1 << 20, 65536, 1), write(8 << 20, 4096, 2)] {
        let outcome = client
            .call(Command::Write, 0, offset, data.len() as u64, &data)
            .await;
        assert_eq!(outcome.error, 0);
    }
    let first = server
        .pool
        .commit(
            "vol",
            "main",
            CommitRequest {
                message: "diff test".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .id
        .to_hex();
    // Rewrite one block inside the first range, with the same bytes (still a change of the
    // mapping), and write a new range.
    for (offset, data) in [write((1 << 20) + 4096, 4096, 1), write(20 << 20, 8192, 3)] {
        let outcome = client
            .call(Command::Write, 0, offset, data.len() as u64, &data)
            .await;
        assert_eq!(outcome.error, 0);
    }
    client.disconnect().await;
    let second = server
        .pool
        .commit(
            "vol",
            "main",
            CommitRequest {
                message: "diff test".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .id
        .to_hex();
    server.pool.create_tag("vol", "v2", &second).await.unwrap();
    let changed = u64::from(GROVE_STATE_CHANGED);
    let expected = vec![
        ((1 << 20) + 4096, 0),
        (4096, changed),
        ((20 << 20) - (1 << 20) - 8192, 0),
        (8192, changed),
        ((44 << 20) - 8192, 0),
    ];

    // A commit export compared with the previous commit, named in three ways.
    let by_prefix = format!("qemu:dirty-bitmap:vol@{}", &first[..12]);
    let by_id = format!("grove:diff:{first}");
    for export in [format!("vol@{second}"), "vol@v2".to_string()] {
        let (mut client, selected) = diff_session(
            &server,
            &export,
            &["base:allocation", &by_id, &by_prefix, "grove:diff:nope"],
        )
        .await;
        assert_eq!(selected.len(), 3, "{selected:?}");
        let map = diff_map(&mut client).await;
        assert_eq!(map.len(), 3);
        for (id, name) in &selected[1..] {
            let (_, descriptors) = map.iter().find(|(context, _)| context == id).unwrap();
            assert_eq!(descriptors, &expected, "{export} {name}");
        }
        client.disconnect().await;
    }

    // The branch head: equal to the second commit, until someone writes.
    let (mut client, selected) = diff_session(&server, "vol", &["grove:diff:v2"]).await;
    assert_eq!(selected.len(), 1);
    assert_eq!(diff_map(&mut client).await[0].1, [(64 << 20, 0)]);
    let mut writer = session(&server.socket_path, "vol", ReplyMode::Simple).await;
    let outcome = writer
        .call(Command::Write, 0, 30 << 20, 4096, &[4u8; 4096])
        .await;
    assert_eq!(outcome.error, 0);
    assert_eq!(
        diff_map(&mut client).await[0].1,
        [(30 << 20, 0), (4096, changed), ((34 << 20) - 4096, 0)],
        "a write on another connection shows at once"
    );
    writer.disconnect().await;
    client.disconnect().await;

    // Refs that do not resolve, or belong to an unrelated volume, are not selected.
    let (mut client, selected) = diff_session(
        &server,
        "vol",
        &[
            "grove:diff:nope",
            "grove:diff:other@main",
            "qemu:dirty-bitmap:other",
            "grove:diff:vol@",
        ],
    )
    .await;
    assert!(selected.is_empty(), "{selected:?}");
    assert_eq!(
        client
            .call(Command::BlockStatus, 0, 0, 4096, &[])
            .await
            .error,
        NBD_EINVAL
    );
    client.disconnect().await;

    // A clone compares with its source's refs.
    server
        .pool
        .clone_volume(&format!("vol@{second}"), "copy")
        .await
        .unwrap();
    let source_first = format!("grove:diff:vol@{first}");
    let (mut client, selected) =
        diff_session(&server, "copy", &[&source_first, "grove:diff:other"]).await;
    assert_eq!(selected.len(), 1, "{selected:?}");
    assert_eq!(diff_map(&mut client).await[0].1, expected);
    client.disconnect().await;

    // The listing offers the volume's refs in both namespaces.
    let mut client = Client::greet(
        UnixStream::connect(&server.socket_path).await.unwrap(),
        NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES,
    )
    .await;
    client.option(NBD_OPT_STRUCTURED_REPLY, &[]).await;
    let request = MetaContextRequest {
        name: "vol@v2".into(),
        queries: vec![],
    };
    let replies = client
        .option(NBD_OPT_LIST_META_CONTEXT, &request.encode())
        .await;
    assert_eq!(replies.last_type(), NBD_REP_ACK);
    let names: Vec<String> = replies
        .of_type(NBD_REP_META_CONTEXT)
        .iter()
        .map(|reply| String::from_utf8(reply.data[4..].to_vec()).unwrap())
        .collect();
    for expected in [
        "base:allocation".to_string(),
        "grove:diff:vol".to_string(),
        "grove:diff:vol@v2".to_string(),
        format!("grove:diff:vol@{first}"),
        format!("grove:diff:vol@{second}"),
        format!("qemu:dirty-bitmap:vol@{first}"),
    ] {
        assert!(names.contains(&expected), "{expected} not in {names:?}");
    }
    assert!(
        !names.iter().any(|name| name.contains("other")),
        "{names:?}"
    );
}
