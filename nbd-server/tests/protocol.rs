//! The server over real Unix sockets, driven by the small client in `support/`: each test is
//! named after the spec section it pins, and hostile-input tests check for a clean error or
//! close and that the server keeps serving other clients.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use grove_nbd_server::memory::Fault;
use grove_nbd_server::proto::*;
use grove_nbd_server::ServerOptions;
use support::{Client, Server};

fn options(configure: impl FnOnce(&mut ServerOptions)) -> ServerOptions {
    let mut options = ServerOptions::default();
    configure(&mut options);
    options
}

// ---------------------------------------------------------------------------------------------
// Handshake.

#[tokio::test]
async fn nbd_opt_go_replies_info_then_ack() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let request = InfoRequest {
        name: "vol".into(),
        info_types: vec![NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE],
    };
    // INFO first: same information, no transmission.
    let info = client.option(NBD_OPT_INFO, &request.encode()).await;
    assert_eq!(info.last_type(), NBD_REP_ACK);
    let go = client.option(NBD_OPT_GO, &request.encode()).await;
    assert_eq!(go.last_type(), NBD_REP_ACK);
    for replies in [&info, &go] {
        let export = replies.info(NBD_INFO_EXPORT).unwrap();
        assert_eq!(
            u64::from_be_bytes(export[0..8].try_into().unwrap()),
            16 << 20
        );
        let flags = u16::from_be_bytes(export[8..10].try_into().unwrap());
        assert_ne!(flags & NBD_FLAG_HAS_FLAGS, 0);
        assert_eq!(flags & NBD_FLAG_READ_ONLY, 0);
        assert_ne!(flags & NBD_FLAG_CAN_MULTI_CONN, 0);
        let block_size = replies.info(NBD_INFO_BLOCK_SIZE).unwrap();
        assert_eq!(
            block_size,
            [
                1u32.to_be_bytes(),
                4096u32.to_be_bytes(),
                (32u32 << 20).to_be_bytes()
            ]
            .concat()
        );
        assert_eq!(replies.info(NBD_INFO_NAME).unwrap(), b"vol");
        assert_eq!(
            replies.info(NBD_INFO_DESCRIPTION).unwrap(),
            b"in-memory export vol"
        );
    }
    assert_eq!(
        info.0
            .iter()
            .map(|r| (r.reply_type, r.data.clone()))
            .collect::<Vec<_>>(),
        go.0.iter()
            .map(|r| (r.reply_type, r.data.clone()))
            .collect::<Vec<_>>(),
        "INFO then GO with the same parameters MUST give the same information"
    );
    // Simple replies: write then read back.
    let outcome = client.call(Command::Write, 0, 4096, 5, b"hello").await;
    assert_eq!(outcome.error, 0);
    let outcome = client.call(Command::Read, 0, 4094, 9, &[]).await;
    assert_eq!(outcome.data, b"\0\0hello\0\0");
    client.disconnect().await;
}

#[tokio::test]
async fn nbd_opt_export_name_sends_zeroes_unless_no_zeroes() {
    let server = Server::start().await;
    for (client_flags, padding) in [
        (NBD_FLAG_C_FIXED_NEWSTYLE, 124usize),
        (NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES, 0),
    ] {
        let mut client = Client::greet(server.raw().await, client_flags).await;
        client.send_option(NBD_OPT_EXPORT_NAME, b"vol@v1").await;
        let mut reply = vec![0u8; 10 + padding];
        client.read_exact(&mut reply).await;
        assert_eq!(
            u64::from_be_bytes(reply[0..8].try_into().unwrap()),
            16 << 20
        );
        let flags = u16::from_be_bytes(reply[8..10].try_into().unwrap());
        assert_ne!(flags & NBD_FLAG_READ_ONLY, 0);
        assert!(reply[10..].iter().all(|b| *b == 0));
        // The next bytes are the reply to the first request, so padding was exactly right.
        let outcome = client.call(Command::Read, 0, 0, 512, &[]).await;
        assert_eq!((outcome.error, outcome.data.len()), (0, 512));
        client.disconnect().await;
    }
}

#[tokio::test]
async fn nbd_opt_export_name_unknown_export_closes() {
    let server = Server::start().await;
    let mut client = server.client().await;
    client.send_option(NBD_OPT_EXPORT_NAME, b"missing").await;
    assert!(client.closed().await);
    let mut client = server.client().await;
    client.send_option(NBD_OPT_EXPORT_NAME, b"").await;
    assert!(client.closed().await, "no default export");
    server.assert_serving().await;
}

#[tokio::test]
async fn nbd_opt_list_returns_every_export() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let replies = client.option(NBD_OPT_LIST, &[]).await;
    assert_eq!(replies.last_type(), NBD_REP_ACK);
    let mut names: Vec<(String, String)> = replies
        .of_type(NBD_REP_SERVER)
        .into_iter()
        .map(|reply| {
            let len = u32::from_be_bytes(reply.data[0..4].try_into().unwrap()) as usize;
            let name = String::from_utf8(reply.data[4..4 + len].to_vec()).unwrap();
            let description = String::from_utf8(reply.data[4 + len..].to_vec()).unwrap();
            (name, description)
        })
        .collect();
    names.sort();
    assert_eq!(
        names
            .iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>(),
        ["big", "vol", "vol@v1"]
    );
    assert_eq!(names[1].1, "in-memory export vol");
    // NBD_OPT_LIST with data is invalid, and the handshake goes on.
    assert_eq!(
        client.option(NBD_OPT_LIST, b"x").await.last_type(),
        NBD_REP_ERR_INVALID
    );
    assert!(client.go("vol", &[]).await.is_ok());
}

#[tokio::test]
async fn option_types_unknown_option_is_unsupported_and_haggling_continues() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let replies = client.option(0x1234, b"some data").await;
    assert_eq!(replies.last_type(), NBD_REP_ERR_UNSUP);
    assert_eq!(
        client.option(NBD_OPT_PEEK_EXPORT, &[]).await.last_type(),
        NBD_REP_ERR_UNSUP
    );
    assert_eq!(
        client.option(NBD_OPT_STARTTLS, &[]).await.last_type(),
        NBD_REP_ERR_UNSUP
    );
    assert!(client.go("vol", &[]).await.is_ok());
    client.disconnect().await;
}

#[tokio::test]
async fn nbd_opt_info_and_go_errors() {
    let server = Server::start().await;
    let mut client = server.client().await;
    // Unknown export and the empty (default) name.
    for name in ["missing", ""] {
        let replies = client.go(name, &[]).await.unwrap_err();
        assert_eq!(replies.last_type(), NBD_REP_ERR_UNKNOWN);
        assert!(
            replies.of_type(NBD_REP_INFO).is_empty(),
            "no NBD_REP_INFO before NBD_REP_ERR_UNKNOWN"
        );
    }
    let request = InfoRequest {
        name: "missing".into(),
        info_types: vec![],
    };
    assert_eq!(
        client
            .option(NBD_OPT_INFO, &request.encode())
            .await
            .last_type(),
        NBD_REP_ERR_UNKNOWN
    );
    // Name length past the option data: invalid.
    let mut data = Vec::new();
    put_u32(&mut data, 1000);
    data.extend_from_slice(b"vol");
    put_u16(&mut data, 0);
    assert_eq!(
        client.option(NBD_OPT_GO, &data).await.last_type(),
        NBD_REP_ERR_INVALID
    );
    // Trailing bytes: invalid.
    let mut data = InfoRequest {
        name: "vol".into(),
        info_types: vec![],
    }
    .encode();
    data.extend_from_slice(&[0, 0, 0]);
    assert_eq!(
        client.option(NBD_OPT_GO, &data).await.last_type(),
        NBD_REP_ERR_INVALID
    );
    // Still negotiating: a good GO works.
    assert!(client.go("vol", &[]).await.is_ok());
    client.disconnect().await;
}

#[tokio::test]
async fn nbd_opt_abort_is_acknowledged() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let replies = client.option(NBD_OPT_ABORT, b"ignored").await;
    assert_eq!(replies.last_type(), NBD_REP_ACK);
    assert!(client.closed().await);
}

#[tokio::test]
async fn metadata_querying_base_allocation_contexts() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let query = |queries: &[&str]| {
        MetaContextRequest {
            name: "vol".into(),
            queries: queries.iter().map(|q| q.to_string()).collect(),
        }
        .encode()
    };
    // Structured replies first.
    assert_eq!(
        client
            .option(NBD_OPT_SET_META_CONTEXT, &query(&[BASE_ALLOCATION]))
            .await
            .last_type(),
        NBD_REP_ERR_INVALID
    );
    assert_eq!(
        client
            .option(NBD_OPT_STRUCTURED_REPLY, &[])
            .await
            .last_type(),
        NBD_REP_ACK
    );
    // LIST with the namespace wildcard, an unknown leaf, an unknown namespace, and a diff
    // context whose ref does not exist. (No query lists base:allocation among others; see
    // the diff context tests.)
    for (queries, expected) in [
        (vec!["base:"], true),
        (vec!["base:allocation", "base:"], true),
        (vec!["base:nothing", "x-foo:bar"], false),
        (vec!["qemu:dirty-bitmap:x"], false),
    ] {
        let replies = client
            .option(NBD_OPT_LIST_META_CONTEXT, &query(&queries))
            .await;
        assert_eq!(replies.last_type(), NBD_REP_ACK);
        let contexts = replies.of_type(NBD_REP_META_CONTEXT);
        assert_eq!(contexts.len(), usize::from(expected));
        if expected {
            assert_eq!(
                &contexts[0].data[0..4],
                &0u32.to_be_bytes(),
                "ids in LIST replies SHOULD be zero"
            );
            assert_eq!(&contexts[0].data[4..], BASE_ALLOCATION.as_bytes());
        }
    }
    // SET ignores `base:` and unknown leaves; selects base:allocation with a non-zero id.
    let replies = client
        .option(
            NBD_OPT_SET_META_CONTEXT,
            &query(&["base:", "base:nothing", "x-foo:bar"]),
        )
        .await;
    assert!(replies.of_type(NBD_REP_META_CONTEXT).is_empty());
    let replies = client
        .option(NBD_OPT_SET_META_CONTEXT, &query(&[BASE_ALLOCATION]))
        .await;
    assert_eq!(replies.last_type(), NBD_REP_ACK);
    let selected = replies.of_type(NBD_REP_META_CONTEXT);
    assert_eq!(selected.len(), 1);
    let context_id = u32::from_be_bytes(selected[0].data[0..4].try_into().unwrap());
    // Unknown export, and malformed data.
    let missing = MetaContextRequest {
        name: "missing".into(),
        queries: vec![BASE_ALLOCATION.into()],
    }
    .encode();
    assert_eq!(
        client
            .option(NBD_OPT_LIST_META_CONTEXT, &missing)
            .await
            .last_type(),
        NBD_REP_ERR_UNKNOWN
    );
    assert_eq!(
        client
            .option(NBD_OPT_LIST_META_CONTEXT, &[0, 0])
            .await
            .last_type(),
        NBD_REP_ERR_INVALID
    );
    // A failed SET clears the selection, so select again, then enter transmission.
    assert_eq!(
        client
            .option(NBD_OPT_SET_META_CONTEXT, &query(&[BASE_ALLOCATION]))
            .await
            .last_type(),
        NBD_REP_ACK
    );
    client.go("vol", &[]).await.unwrap();
    let outcome = client.call(Command::BlockStatus, 0, 0, 4096, &[]).await;
    assert_eq!(outcome.error, 0);
    assert_eq!(outcome.context_id, Some(context_id));
    client.disconnect().await;
}

#[tokio::test]
async fn metadata_querying_context_for_another_export_is_not_active() {
    let server = Server::start().await;
    let mut client = server.client().await;
    client.option(NBD_OPT_STRUCTURED_REPLY, &[]).await;
    let request = MetaContextRequest {
        name: "vol@v1".into(),
        queries: vec![BASE_ALLOCATION.into()],
    };
    assert_eq!(
        client
            .option(NBD_OPT_SET_META_CONTEXT, &request.encode())
            .await
            .last_type(),
        NBD_REP_ACK
    );
    client.go("vol", &[]).await.unwrap();
    let outcome = client.call(Command::BlockStatus, 0, 0, 4096, &[]).await;
    assert_eq!(outcome.error, NBD_EINVAL);
    client.disconnect().await;
}

#[tokio::test]
async fn nbd_opt_extended_headers_takes_precedence() {
    let server = Server::start().await;
    let mut client = server.client().await;
    assert_eq!(
        client
            .option(NBD_OPT_EXTENDED_HEADERS, b"x")
            .await
            .last_type(),
        NBD_REP_ERR_INVALID
    );
    assert_eq!(
        client
            .option(NBD_OPT_EXTENDED_HEADERS, &[])
            .await
            .last_type(),
        NBD_REP_ACK
    );
    assert_eq!(
        client
            .option(NBD_OPT_STRUCTURED_REPLY, &[])
            .await
            .last_type(),
        NBD_REP_ERR_EXT_HEADER_REQD
    );
    client.mode = ReplyMode::Extended;
    // NBD_OPT_EXPORT_NAME is forbidden once extended headers are agreed.
    client.send_option(NBD_OPT_EXPORT_NAME, b"vol").await;
    assert!(client.closed().await);
}

#[tokio::test]
async fn fixed_newstyle_unknown_client_flags_close() {
    let server = Server::start().await;
    let mut client = Client::greet(server.raw().await, NBD_FLAG_C_FIXED_NEWSTYLE | 1 << 7).await;
    assert!(client.closed().await);
    server.assert_serving().await;
}

#[tokio::test]
async fn fixed_newstyle_bad_option_magic_closes() {
    let server = Server::start().await;
    let mut client = server.client().await;
    client.send(b"NOTMAGIC\0\0\0\x07\0\0\0\0").await;
    assert!(client.closed().await);
    server.assert_serving().await;
}

#[tokio::test]
async fn oversized_option_data_closes_after_too_big() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let mut header = Vec::new();
    put_u64(&mut header, IHAVEOPT);
    put_u32(&mut header, NBD_OPT_GO);
    put_u32(&mut header, 1 << 20);
    client.send(&header).await;
    let reply = client.option_reply().await;
    assert_eq!(reply.reply_type, NBD_REP_ERR_TOO_BIG);
    assert!(client.closed().await);
    server.assert_serving().await;
}

#[tokio::test]
async fn too_many_options_close() {
    let server = Server::start_with(options(|o| o.handshake_options_max = 3)).await;
    let mut client = server.client().await;
    for _ in 0..3 {
        assert_eq!(client.option(99, &[]).await.last_type(), NBD_REP_ERR_UNSUP);
    }
    assert!(
        client.closed().await,
        "closed after the last allowed option"
    );
    server.assert_serving().await;
}

#[tokio::test]
async fn handshake_timeout_closes_a_silent_client() {
    let server = Server::start_with(options(|o| {
        o.handshake_timeout = Duration::from_millis(300)
    }))
    .await;
    let mut silent = server.client().await;
    let started = std::time::Instant::now();
    assert!(silent.closed().await);
    assert!(started.elapsed() < Duration::from_secs(10));
    // A truncated option header, then silence.
    let mut truncated = server.client().await;
    truncated.send(b"IHAVE").await;
    assert!(truncated.closed().await);
    server.wait_handles_closed().await;
}

#[tokio::test]
async fn truncated_handshake_streams_end_cleanly() {
    let server = Server::start().await;
    // Close at every point of a GO exchange.
    let mut full = Vec::new();
    full.extend_from_slice(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes());
    put_u64(&mut full, IHAVEOPT);
    let data = InfoRequest {
        name: "vol".into(),
        info_types: vec![NBD_INFO_NAME],
    }
    .encode();
    put_u32(&mut full, NBD_OPT_GO);
    put_u32(&mut full, data.len() as u32);
    full.extend_from_slice(&data);
    for cut in [0, 2, 4, 10, 16, 20, full.len() - 1] {
        let mut stream = server.raw().await;
        use tokio::io::AsyncWriteExt;
        stream.write_all(&full[..cut]).await.unwrap();
        drop(stream);
    }
    server.assert_serving().await;
    server.wait_handles_closed().await;
}

// ---------------------------------------------------------------------------------------------
// Transmission.

#[tokio::test]
async fn nbd_cmd_read_structured_reply_uses_holes() {
    let server = Server::start().await;
    let mut client = server.session("vol", ReplyMode::Structured).await;
    let pattern: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        client
            .call(Command::Write, 0, 65536, 65536, &pattern)
            .await
            .error,
        0
    );
    let outcome = client.call(Command::Read, 0, 0, 196608, &[]).await;
    assert_eq!(outcome.error, 0);
    assert_eq!(&outcome.data[65536..131072], &pattern[..]);
    assert!(outcome.data[..65536]
        .iter()
        .chain(&outcome.data[131072..])
        .all(|b| *b == 0));
    assert_eq!(
        outcome.chunk_types,
        [
            NBD_REPLY_TYPE_OFFSET_HOLE,
            NBD_REPLY_TYPE_OFFSET_DATA,
            NBD_REPLY_TYPE_OFFSET_HOLE
        ]
    );
    // DF: exactly one content chunk, zeros included.
    let outcome = client
        .call(Command::Read, NBD_CMD_FLAG_DF, 0, 196608, &[])
        .await;
    assert_eq!(outcome.chunk_types, [NBD_REPLY_TYPE_OFFSET_DATA]);
    assert_eq!(&outcome.data[65536..131072], &pattern[..]);
    // A zero-length read succeeds with no content.
    let outcome = client.call(Command::Read, 0, 4096, 0, &[]).await;
    assert_eq!(
        (outcome.error, outcome.chunk_types.clone()),
        (0, vec![NBD_REPLY_TYPE_NONE])
    );
    client.disconnect().await;
}

#[tokio::test]
async fn nbd_cmd_block_status_base_allocation() {
    let server = Server::start().await;
    let mut client = server.session("vol", ReplyMode::Structured).await;
    assert_eq!(
        client
            .call(Command::Write, 0, 8192, 4096, &[1u8; 4096])
            .await
            .error,
        0
    );
    assert_eq!(
        client
            .call(Command::WriteZeroes, NBD_CMD_FLAG_NO_HOLE, 16384, 4096, &[])
            .await
            .error,
        0
    );
    let outcome = client.call(Command::BlockStatus, 0, 0, 32768, &[]).await;
    assert_eq!(outcome.error, 0);
    let hole_zero = u64::from(NBD_STATE_HOLE | NBD_STATE_ZERO);
    assert_eq!(
        outcome.descriptors,
        [
            (8192, hole_zero),
            (4096, 0),
            (4096, hole_zero),
            (4096, u64::from(NBD_STATE_ZERO)),
            (12288, hole_zero)
        ]
    );
    // REQ_ONE: one descriptor, no longer than the request.
    let outcome = client
        .call(Command::BlockStatus, NBD_CMD_FLAG_REQ_ONE, 0, 4000, &[])
        .await;
    assert_eq!(outcome.descriptors, [(4000, hole_zero)]);
    // Past the end and zero length are invalid.
    assert_eq!(
        client
            .call(Command::BlockStatus, 0, 16 << 20, 1, &[])
            .await
            .error,
        NBD_EINVAL
    );
    assert_eq!(
        client.call(Command::BlockStatus, 0, 0, 0, &[]).await.error,
        NBD_EINVAL
    );
    client.disconnect().await;
}

#[tokio::test]
async fn extended_headers_64_bit_requests() {
    let server = Server::start().await;
    let mut client = server.session("big", ReplyMode::Extended).await;
    let far = 7u64 << 40;
    assert_eq!(
        client
            .call(Command::Write, 0, far, 8192, &[9u8; 8192])
            .await
            .error,
        0
    );
    let outcome = client.call(Command::Read, 0, far - 4096, 16384, &[]).await;
    assert_eq!(outcome.error, 0);
    assert!(
        outcome.data[..4096].iter().all(|b| *b == 0)
            && outcome.data[4096..12288].iter().all(|b| *b == 9)
    );
    // Block status over more than 4 GiB in one request: 64-bit descriptors.
    let outcome = client.call(Command::BlockStatus, 0, 0, 8 << 40, &[]).await;
    assert_eq!(outcome.error, 0);
    assert_eq!(outcome.chunk_types, [NBD_REPLY_TYPE_BLOCK_STATUS_EXT]);
    assert!(
        outcome.descriptors[0].0 > 0
            && outcome.descriptors[0].1 == u64::from(NBD_STATE_HOLE | NBD_STATE_ZERO)
    );
    let near = client
        .call(Command::BlockStatus, 0, far - 4096, 1 << 20, &[])
        .await;
    assert_eq!(
        near.descriptors[..2],
        [
            (4096, u64::from(NBD_STATE_HOLE | NBD_STATE_ZERO)),
            (8192, 0)
        ]
    );
    // A 64-bit effect length: zero 6 TiB at once.
    let outcome = client
        .call(Command::WriteZeroes, 0, 2 << 40, 6 << 40, &[])
        .await;
    assert_eq!(outcome.error, 0);
    assert_eq!(
        outcome.chunk_types,
        [NBD_REPLY_TYPE_NONE],
        "extended mode never uses simple replies"
    );
    assert_eq!(server.provider.export("big").unwrap().allocated_blocks(), 0);
    // Errors come as extended error chunks.
    let outcome = client.call(Command::Read, 0, 8 << 40, 1, &[]).await;
    assert_eq!(outcome.error, NBD_EINVAL);
    assert_eq!(outcome.chunk_types, [NBD_REPLY_TYPE_ERROR]);
    // A payload on a command that takes none is consumed, then refused.
    let cookie = client
        .request(Command::Flush, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 16, &[0u8; 16])
        .await;
    let outcome = client.next_outcome().await;
    assert_eq!((outcome.cookie, outcome.error), (cookie, NBD_EINVAL));
    assert_eq!(client.call(Command::Flush, 0, 0, 0, &[]).await.error, 0);
    client.disconnect().await;
}

#[tokio::test]
async fn extended_headers_oversized_payload_closes() {
    let server = Server::start().await;
    let mut client = server.session("vol", ReplyMode::Extended).await;
    let (_, header) = client.header(Command::Write, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 1 << 30);
    client.send(&header).await;
    assert!(client.closed().await);
    server.assert_serving().await;
}

#[tokio::test]
async fn error_values_read_only_export_refuses_writes() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let summary = client.go("vol@v1", &[]).await.unwrap();
    assert_ne!(summary.flags & NBD_FLAG_READ_ONLY, 0);
    assert_eq!(
        summary.flags & (NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES),
        0
    );
    // The write payload is consumed: the next request parses.
    assert_eq!(
        client
            .call(Command::Write, 0, 0, 4096, &[1u8; 4096])
            .await
            .error,
        NBD_EPERM
    );
    assert_eq!(
        client.call(Command::Trim, 0, 0, 4096, &[]).await.error,
        NBD_EPERM
    );
    assert_eq!(
        client
            .call(Command::WriteZeroes, 0, 0, 4096, &[])
            .await
            .error,
        NBD_EPERM
    );
    assert_eq!(client.call(Command::Read, 0, 0, 4096, &[]).await.error, 0);
    assert_eq!(client.call(Command::Flush, 0, 0, 0, &[]).await.error, 0);
    assert_eq!(
        server.provider.export("vol@v1").unwrap().allocated_blocks(),
        0
    );
    client.disconnect().await;
}

#[tokio::test]
async fn size_constraints_requests_past_the_end() {
    let server = Server::start().await;
    let mut client = server.session("vol", ReplyMode::Simple).await;
    let end = 16u64 << 20;
    assert_eq!(
        client
            .call(Command::Read, 0, end - 512, 1024, &[])
            .await
            .error,
        NBD_EINVAL
    );
    assert_eq!(
        client
            .call(Command::Write, 0, end - 512, 1024, &[7u8; 1024])
            .await
            .error,
        NBD_ENOSPC
    );
    assert_eq!(
        client.call(Command::Trim, 0, end, 1, &[]).await.error,
        NBD_EINVAL
    );
    assert_eq!(
        client
            .call(Command::WriteZeroes, 0, u64::MAX - 10, 100, &[])
            .await
            .error,
        NBD_ENOSPC
    );
    assert_eq!(
        client.call(Command::Cache, 0, end + 1, 0, &[]).await.error,
        NBD_EINVAL
    );
    // Nothing was written, and the stream is still in step.
    assert_eq!(server.provider.export("vol").unwrap().allocated_blocks(), 0);
    assert_eq!(
        client
            .call(Command::Read, 0, end - 512, 512, &[])
            .await
            .error,
        0
    );
    client.disconnect().await;
}

#[tokio::test]
async fn size_constraints_oversized_read_and_write() {
    let server = Server::start().await;
    let mut client = server.session("big", ReplyMode::Simple).await;
    let over = u64::from(PAYLOAD_MAX_BYTES) + 4096;
    assert_eq!(
        client.call(Command::Read, 0, 0, over, &[]).await.error,
        NBD_EINVAL
    );
    // A moderately oversized WRITE is skipped and refused; the connection goes on.
    let payload = vec![3u8; over as usize];
    assert_eq!(
        client
            .call(Command::Write, 0, 0, over, &payload)
            .await
            .error,
        NBD_EINVAL
    );
    assert_eq!(server.provider.export("big").unwrap().allocated_blocks(), 0);
    assert_eq!(
        client
            .call(Command::Write, 0, 0, 4096, &payload[..4096])
            .await
            .error,
        0
    );
    // One too large to skip closes the connection (its payload is never sent).
    let (_, header) = client.header(Command::Write, 0, 0, u64::from(u32::MAX));
    client.send(&header).await;
    assert!(client.closed().await);
    server.assert_serving().await;
}

#[tokio::test]
async fn request_types_unknown_command_is_einval_and_serving_continues() {
    let server = Server::start().await;
    for mode in [ReplyMode::Simple, ReplyMode::Structured] {
        let mut client = server.session("vol", mode).await;
        let outcome = client.call(Command::Unsupported(99), 0, 0, 0, &[]).await;
        assert_eq!(outcome.error, NBD_EINVAL);
        let outcome = client.call(Command::Read, 1 << 12, 0, 512, &[]).await;
        assert_eq!(outcome.error, NBD_EINVAL, "unknown command flag");
        assert_eq!(client.call(Command::Read, 0, 0, 512, &[]).await.error, 0);
        client.disconnect().await;
    }
}

#[tokio::test]
async fn request_message_bad_magic_closes() {
    let server = Server::start().await;
    let mut client = server.session("vol", ReplyMode::Structured).await;
    let (_, mut header) = client.header(Command::Read, 0, 0, 512);
    header[0] ^= 0xff;
    client.send(&header).await;
    assert!(client.closed().await);
    server.assert_serving().await;
    server.wait_handles_closed().await;
}

#[tokio::test]
async fn truncated_request_streams_release_the_session() {
    let server = Server::start().await;
    // Half a header.
    let mut client = server.session("vol", ReplyMode::Simple).await;
    let (_, header) = client.header(Command::Read, 0, 0, 512);
    client.send(&header[..10]).await;
    drop(client);
    // A write whose payload stops short.
    let mut client = server.session("vol", ReplyMode::Structured).await;
    let (_, header) = client.header(Command::Write, 0, 0, 65536);
    client.send(&header).await;
    client.send(&[1u8; 1000]).await;
    drop(client);
    // No NBD_CMD_DISC at all.
    let client = server.session("vol", ReplyMode::Extended).await;
    drop(client);
    server.wait_handles_closed().await;
    assert_eq!(
        server.provider.export("vol").unwrap().allocated_blocks(),
        0,
        "a partial write is never applied"
    );
    server.assert_serving().await;
}

#[tokio::test]
async fn nbd_cmd_write_zeroes_no_hole_and_fast_zero() {
    let server = Server::start().await;
    let mut client = server.session("vol", ReplyMode::Structured).await;
    let export = server.provider.export("vol").unwrap();
    assert_eq!(
        client
            .call(Command::Write, 0, 0, 65536, &[5u8; 65536])
            .await
            .error,
        0
    );
    // FAST_ZERO without NO_HOLE: deallocation is fast, so it succeeds.
    assert_eq!(
        client
            .call(Command::WriteZeroes, NBD_CMD_FLAG_FAST_ZERO, 0, 32768, &[])
            .await
            .error,
        0
    );
    assert_eq!(export.allocated_blocks(), 8);
    // FAST_ZERO with NO_HOLE fails at once and changes nothing.
    let outcome = client
        .call(
            Command::WriteZeroes,
            NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_NO_HOLE,
            32768,
            32768,
            &[],
        )
        .await;
    assert_eq!(outcome.error, NBD_ENOTSUP);
    assert!(export.contents(32768, 32768).iter().all(|b| *b == 5));
    // NO_HOLE keeps the blocks allocated.
    assert_eq!(
        client
            .call(
                Command::WriteZeroes,
                NBD_CMD_FLAG_NO_HOLE,
                32768,
                32768,
                &[]
            )
            .await
            .error,
        0
    );
    assert_eq!(export.allocated_blocks(), 8);
    assert!(export.contents(0, 65536).iter().all(|b| *b == 0));
    // TRIM deallocates whole blocks only.
    assert_eq!(
        client
            .call(Command::Trim, 0, 32768 + 100, 8192, &[])
            .await
            .error,
        0
    );
    assert_eq!(export.allocated_blocks(), 7);
    client.disconnect().await;
}

#[tokio::test]
async fn command_flags_fua_reaches_storage() {
    let server = Server::start().await;
    let mut client = server.session("vol", ReplyMode::Simple).await;
    let export = server.provider.export("vol").unwrap();
    assert_eq!(
        client
            .call(Command::Write, NBD_CMD_FLAG_FUA, 0, 512, &[1u8; 512])
            .await
            .error,
        0
    );
    assert_eq!(
        client
            .call(Command::WriteZeroes, NBD_CMD_FLAG_FUA, 0, 512, &[])
            .await
            .error,
        0
    );
    assert_eq!(
        client
            .call(Command::Write, 0, 0, 512, &[1u8; 512])
            .await
            .error,
        0
    );
    assert_eq!(export.fua_ops(), 2);
    assert_eq!(client.call(Command::Flush, 0, 0, 0, &[]).await.error, 0);
    assert_eq!(export.flushes(), 1);
    assert_eq!(
        client.call(Command::Flush, 0, 0, 512, &[]).await.error,
        NBD_EINVAL
    );
    client.disconnect().await;
}

#[tokio::test]
async fn replies_out_of_order() {
    let server = Server::start().await;
    let export = server.provider.export("vol").unwrap();
    export.set_delay(0, Duration::from_millis(300));
    let mut client = server.session("vol", ReplyMode::Structured).await;
    let slow = client.request(Command::Read, 0, 0, 4096, &[]).await;
    let fast = client.request(Command::Read, 0, 4096, 4096, &[]).await;
    let write = client
        .request(Command::Write, 0, 8192, 4096, &[2u8; 4096])
        .await;
    let mut order = Vec::new();
    for _ in 0..3 {
        let outcome = client.next_outcome().await;
        assert_eq!(outcome.error, 0);
        order.push(outcome.cookie);
    }
    assert_eq!(order.last(), Some(&slow), "the slow read is answered last");
    assert!(order.contains(&fast) && order.contains(&write));
    client.disconnect().await;
}

#[tokio::test]
async fn pipelining_beyond_the_in_flight_bound() {
    let server = Server::start_with(options(|o| o.in_flight_requests_max = 2)).await;
    let mut client = server.session("vol", ReplyMode::Simple).await;
    // Far more requests than the bound, all sent before reading any reply. (This client does
    // not read while it writes, so the replies are kept small enough for the socket buffer.)
    let mut cookies = Vec::new();
    for index in 0..200u64 {
        let offset = (index % 64) * 4096;
        let cookie = if index % 2 == 0 {
            client
                .request(Command::Write, 0, offset, 512, &[index as u8; 512])
                .await
        } else {
            client.request(Command::Read, 0, offset, 512, &[]).await
        };
        cookies.push(cookie);
    }
    let mut answered = Vec::new();
    for _ in 0..200 {
        let outcome = client.next_outcome().await;
        assert_eq!(outcome.error, 0);
        answered.push(outcome.cookie);
    }
    answered.sort();
    assert_eq!(answered, cookies);
    client.disconnect().await;
}

#[tokio::test]
async fn nbd_cmd_disc_finishes_in_flight_requests_then_flushes() {
    let server = Server::start().await;
    let export = server.provider.export("vol").unwrap();
    export.set_delay(12288, Duration::from_millis(300));
    let mut client = server.session("vol", ReplyMode::Structured).await;
    let cookie = client
        .request(Command::Write, 0, 12288, 4096, &[8u8; 4096])
        .await;
    let (_, disc) = client.header(Command::Disc, 0, 0, 0);
    client.send(&disc).await;
    let outcome = client.next_outcome().await;
    assert_eq!(
        (outcome.cookie, outcome.error),
        (cookie, 0),
        "the in-flight write is answered"
    );
    assert!(client.closed().await);
    assert!(export.contents(12288, 4096).iter().all(|b| *b == 8));
    assert_eq!(export.flushes(), 1, "a clean disconnect flushes");
    server.wait_handles_closed().await;
}

#[tokio::test]
async fn error_values_engine_errors_and_panics() {
    let server = Server::start().await;
    let export = server.provider.export("vol").unwrap();
    for mode in [
        ReplyMode::Simple,
        ReplyMode::Structured,
        ReplyMode::Extended,
    ] {
        let mut client = server.session("vol", mode).await;
        export.set_fault(Some(Fault::NoSpace));
        assert_eq!(
            client
                .call(Command::Write, 0, 0, 4096, &[1u8; 4096])
                .await
                .error,
            NBD_ENOSPC
        );
        export.set_fault(Some(Fault::Io));
        let outcome = client.call(Command::Read, 0, 0, 4096, &[]).await;
        assert_eq!(outcome.error, NBD_EIO);
        assert!(
            outcome.data.is_empty() || mode.chunked(),
            "no payload after a simple error reply"
        );
        if mode.chunked() {
            assert!(
                outcome.message.contains("injected"),
                "the error chunk carries the message"
            );
        }
        // A panic in storage code is an EIO reply, not a hung client or a dead server.
        export.set_fault(Some(Fault::Panic));
        assert_eq!(
            client.call(Command::Read, 0, 0, 4096, &[]).await.error,
            NBD_EIO
        );
        assert_eq!(
            client.call(Command::Flush, 0, 0, 0, &[]).await.error,
            NBD_EIO
        );
        export.set_fault(None);
        assert_eq!(client.call(Command::Read, 0, 0, 4096, &[]).await.error, 0);
        client.disconnect().await;
    }
    server.assert_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_at_once() {
    let server = std::sync::Arc::new(Server::start().await);
    let mut tasks = Vec::new();
    for index in 0..8u8 {
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            let mode = [
                ReplyMode::Simple,
                ReplyMode::Structured,
                ReplyMode::Extended,
            ][usize::from(index % 3)];
            let mut client = server.session("vol", mode).await;
            let offset = u64::from(index) * (1 << 20);
            for round in 0..16u64 {
                let data = vec![index.wrapping_mul(31).wrapping_add(round as u8); 65536];
                assert_eq!(
                    client
                        .call(Command::Write, 0, offset + round * 65536, 65536, &data)
                        .await
                        .error,
                    0
                );
                let outcome = client
                    .call(Command::Read, 0, offset + round * 65536, 65536, &[])
                    .await;
                assert_eq!(outcome.data, data);
            }
            client.disconnect().await;
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    server.wait_handles_closed().await;
}

// ---------------------------------------------------------------------------------------------
// Limits and random input.

#[tokio::test]
async fn connections_beyond_the_limit_are_closed() {
    let server = Server::start_with(options(|o| o.connections_max = 1)).await;
    let flags = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
    let first = server.session("vol", ReplyMode::Simple).await;
    // Accepted, then closed at once: the greeting never comes.
    assert!(Client::try_greet(server.raw().await, flags).await.is_none());
    first.disconnect().await;
    // The slot frees once the first connection's task has ended.
    let mut client = None;
    for _ in 0..200 {
        client = Client::try_greet(server.raw().await, flags).await;
        if client.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut client = client.expect("a connection is accepted again");
    client.go("vol", &[]).await.unwrap();
    assert_eq!(client.call(Command::Read, 0, 0, 512, &[]).await.error, 0);
    client.disconnect().await;
}

/// A small deterministic generator, so a failing round can be replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Random and half-valid byte streams, in the handshake and in transmission, each followed by
/// the client closing its side. The server must answer or close every one without hanging,
/// and keep serving afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_random_streams_never_break_the_server() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server =
        Server::start_with(options(|o| o.handshake_timeout = Duration::from_secs(5))).await;
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for round in 0..120u64 {
        let mut bytes = Vec::new();
        let extended = round % 3 == 2;
        if round % 3 != 0 {
            bytes.extend_from_slice(
                &(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes(),
            );
            let mut option = |code: u32, data: &[u8]| {
                put_u64(&mut bytes, IHAVEOPT);
                put_u32(&mut bytes, code);
                put_u32(&mut bytes, data.len() as u32);
                bytes.extend_from_slice(data);
            };
            option(
                if extended {
                    NBD_OPT_EXTENDED_HEADERS
                } else {
                    NBD_OPT_STRUCTURED_REPLY
                },
                &[],
            );
            let meta = MetaContextRequest {
                name: "vol".into(),
                queries: vec![BASE_ALLOCATION.into()],
            };
            option(NBD_OPT_SET_META_CONTEXT, &meta.encode());
            option(
                NBD_OPT_GO,
                &InfoRequest {
                    name: "vol".into(),
                    info_types: vec![],
                }
                .encode(),
            );
            // Requests with valid magic and random fields, some with payloads.
            for _ in 0..rng.below(20) {
                let command = Command::from_wire(rng.below(10) as u16);
                let flags = if rng.below(3) == 0 {
                    rng.next() as u16
                } else {
                    0
                };
                let offset = if rng.below(4) == 0 {
                    rng.next()
                } else {
                    rng.below(32 << 20)
                };
                let length = if rng.below(8) == 0 {
                    rng.next()
                } else {
                    rng.below(70_000)
                };
                let header = RequestHeader {
                    flags,
                    command,
                    cookie: rng.next(),
                    offset,
                    length,
                };
                if extended {
                    bytes.extend_from_slice(&header.encode_extended());
                } else {
                    bytes.extend_from_slice(&header.encode_compact());
                }
                if command == Command::Write && length < 70_000 && rng.below(2) == 0 {
                    bytes.extend(rng.bytes(length as usize));
                }
            }
        }
        let noise = rng.below(300) as usize;
        bytes.extend(rng.bytes(noise));

        let (mut reader, mut writer) = server.raw().await.into_split();
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            tokio::time::timeout(support::STEP_TIMEOUT, reader.read_to_end(&mut sink))
                .await
                .is_ok()
        });
        let _ = writer.write_all(&bytes).await;
        let _ = writer.shutdown().await;
        assert!(
            drain.await.unwrap(),
            "round {round}: the server closed the connection in time"
        );
    }
    server.assert_serving().await;
    server.wait_handles_closed().await;
}
