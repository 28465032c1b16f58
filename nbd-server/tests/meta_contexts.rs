//! The diff metadata contexts (`grove:diff:REF`, `qemu:dirty-bitmap:REF`) over the in-memory
//! provider: listing and selecting them ("Metadata querying", `NBD_OPT_LIST_META_CONTEXT`,
//! `NBD_OPT_SET_META_CONTEXT`), one block status chunk per selected context
//! (`NBD_REPLY_TYPE_BLOCK_STATUS`, `_EXT`), `NBD_CMD_FLAG_REQ_ONE`, and when differences are
//! computed again.
//!
//! The fixture has the exports `vol` (writable), `vol@v1` (read-only) and `big` (another
//! volume); the in-memory provider compares block contents.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use grove_nbd_server::memory::Fault;
use grove_nbd_server::proto::*;
use support::{Client, OptionReplies, Server};

const KIB: u64 = 1024;

fn request(export: &str, queries: &[&str]) -> Vec<u8> {
    MetaContextRequest {
        name: export.into(),
        queries: queries.iter().map(|query| query.to_string()).collect(),
    }
    .encode()
}

/// `(id, name)` of every `NBD_REP_META_CONTEXT` reply.
fn contexts(replies: &OptionReplies) -> Vec<(u32, String)> {
    replies
        .of_type(NBD_REP_META_CONTEXT)
        .into_iter()
        .map(|reply| {
            (
                u32::from_be_bytes(reply.data[0..4].try_into().unwrap()),
                String::from_utf8(reply.data[4..].to_vec()).unwrap(),
            )
        })
        .collect()
}

/// Names listed by `NBD_OPT_LIST_META_CONTEXT`, checking the reply shape.
async fn list(client: &mut Client, export: &str, queries: &[&str]) -> Vec<String> {
    let replies = client
        .option(NBD_OPT_LIST_META_CONTEXT, &request(export, queries))
        .await;
    assert_eq!(replies.last_type(), NBD_REP_ACK, "{queries:?}");
    let listed = contexts(&replies);
    assert!(
        listed.iter().all(|(id, _)| *id == 0),
        "ids in LIST replies SHOULD be zero"
    );
    let mut names: Vec<String> = listed.into_iter().map(|(_, name)| name).collect();
    let count = names.len();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), count, "each context listed once: {names:?}");
    names
}

/// Selects `queries` for `export`; returns the selected `(id, name)` pairs.
async fn select(client: &mut Client, export: &str, queries: &[&str]) -> Vec<(u32, String)> {
    let replies = client
        .option(NBD_OPT_SET_META_CONTEXT, &request(export, queries))
        .await;
    assert_eq!(replies.last_type(), NBD_REP_ACK, "{queries:?}");
    let selected = contexts(&replies);
    let mut ids: Vec<u32> = selected.iter().map(|(id, _)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), selected.len(), "context ids are unique");
    selected
}

/// A client with `mode` negotiated, not yet in transmission.
async fn negotiating(server: &Server, mode: ReplyMode) -> Client {
    let mut client = server.client().await;
    let option = match mode {
        ReplyMode::Extended => NBD_OPT_EXTENDED_HEADERS,
        _ => NBD_OPT_STRUCTURED_REPLY,
    };
    assert_eq!(client.option(option, &[]).await.last_type(), NBD_REP_ACK);
    client
}

/// Ends the handshake with `NBD_OPT_ABORT`.
async fn abort(mut client: Client) {
    let replies = client.option(NBD_OPT_ABORT, &[]).await;
    assert_eq!(replies.last_type(), NBD_REP_ACK);
    assert!(client.closed().await);
}

fn id_of(selected: &[(u32, String)], name: &str) -> u32 {
    selected
        .iter()
        .find(|(_, selected_name)| selected_name == name)
        .unwrap_or_else(|| panic!("{name} not selected: {selected:?}"))
        .0
}

fn descriptors_of(outcome: &support::Outcome, id: u32) -> Vec<(u64, u64)> {
    let chunks: Vec<_> = outcome
        .contexts
        .iter()
        .filter(|(context_id, _)| *context_id == id)
        .collect();
    assert_eq!(chunks.len(), 1, "one chunk per context: {outcome:?}");
    chunks[0].1.clone()
}

#[tokio::test]
async fn nbd_opt_list_meta_context_offers_diff_contexts() {
    let server = Server::start().await;
    let mut client = negotiating(&server, ReplyMode::Structured).await;
    let all = [
        "base:allocation",
        "grove:diff:vol",
        "grove:diff:vol@v1",
        "qemu:dirty-bitmap:vol",
        "qemu:dirty-bitmap:vol@v1",
    ];
    // No query: everything the export offers (refs of its own volume only).
    assert_eq!(list(&mut client, "vol", &[]).await, all);
    assert_eq!(list(&mut client, "vol@v1", &[]).await, all);
    // Namespace and prefix wildcards list their namespace.
    for query in ["grove:", "grove:diff:"] {
        assert_eq!(
            list(&mut client, "vol", &[query]).await,
            ["grove:diff:vol", "grove:diff:vol@v1"]
        );
    }
    for query in ["qemu:", "qemu:dirty-bitmap:"] {
        assert_eq!(
            list(&mut client, "vol", &[query]).await,
            ["qemu:dirty-bitmap:vol", "qemu:dirty-bitmap:vol@v1"]
        );
    }
    // Overlapping queries list each name once.
    assert_eq!(
        list(
            &mut client,
            "vol",
            &[
                "grove:",
                "grove:diff:",
                "grove:diff:vol@v1",
                "base:",
                "qemu:"
            ]
        )
        .await,
        all
    );
    // Exact names are listed as given when they could be selected; bad refs, refs of
    // another volume, unknown leaves and namespaces are ignored.
    assert_eq!(
        list(
            &mut client,
            "vol",
            &[
                "grove:diff:v1",
                "qemu:dirty-bitmap:vol",
                "grove:diff:nope",
                "grove:diff:big",
                "qemu:dirty-bitmap:big@x",
                "grove:other",
                "x-grove:diff:v1",
            ]
        )
        .await,
        ["grove:diff:v1", "qemu:dirty-bitmap:vol"]
    );
    assert_eq!(
        list(&mut client, "big", &["grove:"]).await,
        ["grove:diff:big"]
    );
    abort(client).await;
}

#[tokio::test]
async fn nbd_opt_list_meta_context_is_bounded() {
    let server = Server::start().await;
    for index in 0..150 {
        server
            .provider
            .add_export(&format!("vol@s{index:03}"), 16 << 20, true);
    }
    let mut client = negotiating(&server, ReplyMode::Structured).await;
    let names = list(&mut client, "vol", &["grove:"]).await;
    assert_eq!(names.len(), 101, "100 refs and the wildcard");
    assert!(names.contains(&"grove:diff:".to_string()), "{names:?}");
    // A ref beyond the listed ones is still selected by name.
    assert!(!names.contains(&"grove:diff:vol@v1".to_string()));
    let selected = select(&mut client, "vol", &["grove:diff:vol@v1"]).await;
    assert_eq!(selected.len(), 1);
    abort(client).await;
}

#[tokio::test]
async fn nbd_opt_set_meta_context_selects_diff_contexts_by_exact_name() {
    let server = Server::start().await;
    let mut client = negotiating(&server, ReplyMode::Structured).await;
    let selected = select(
        &mut client,
        "vol",
        &[
            "grove:diff:v1",
            "base:allocation",
            "qemu:dirty-bitmap:vol@v1",
            "grove:diff:v1",
            "grove:diff:nope",
            "grove:diff:big",
            "grove:diff:",
            "grove:",
            "qemu:dirty-bitmap:",
            "x-foo:bar",
        ],
    )
    .await;
    let mut names: Vec<&str> = selected.iter().map(|(_, name)| name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "base:allocation",
            "grove:diff:v1",
            "qemu:dirty-bitmap:vol@v1"
        ],
        "selected names are echoed as asked, duplicates once, wildcards and bad refs never"
    );
    assert!(selected.iter().all(|(id, _)| *id != 0));
    // Only bad refs: an empty selection, still ACK.
    assert!(select(&mut client, "vol", &["grove:diff:nope"])
        .await
        .is_empty());
    // An unknown export is an error, and clears the selection.
    let replies = client
        .option(
            NBD_OPT_SET_META_CONTEXT,
            &request("missing", &["grove:diff:v1"]),
        )
        .await;
    assert_eq!(replies.last_type(), NBD_REP_ERR_UNKNOWN);
    client.go("vol", &[]).await.unwrap();
    assert_eq!(
        client
            .call(Command::BlockStatus, 0, 0, 4096, &[])
            .await
            .error,
        NBD_EINVAL,
        "no context is selected after a failed SET"
    );
    client.disconnect().await;
}

#[tokio::test]
async fn nbd_opt_set_meta_context_too_many_contexts() {
    let server = Server::start().await;
    for index in 0..9 {
        server
            .provider
            .add_export(&format!("vol@s{index}"), 16 << 20, true);
    }
    let mut client = negotiating(&server, ReplyMode::Structured).await;
    let names: Vec<String> = (0..9).map(|index| format!("grove:diff:s{index}")).collect();
    let queries: Vec<&str> = names.iter().map(String::as_str).collect();
    let replies = client
        .option(NBD_OPT_SET_META_CONTEXT, &request("vol", &queries))
        .await;
    assert_eq!(replies.last_type(), NBD_REP_ERR_TOO_BIG);
    // Eight are fine, with base:allocation besides.
    let mut eight = queries[..8].to_vec();
    eight.push("base:allocation");
    let selected = select(&mut client, "vol", &eight).await;
    assert_eq!(selected.len(), 9);
    client.go("vol", &[]).await.unwrap();
    let outcome = client.call(Command::BlockStatus, 0, 0, 16 << 20, &[]).await;
    assert_eq!(outcome.error, 0);
    assert_eq!(outcome.contexts.len(), 9);
    client.disconnect().await;
}

#[tokio::test]
async fn nbd_cmd_block_status_one_chunk_per_context() {
    for mode in [ReplyMode::Structured, ReplyMode::Extended] {
        let server = Server::start().await;
        let base = server.provider.export("vol@v1").unwrap();
        base.load(64 * KIB, &[7u8; 8192]);
        let mut client = negotiating(&server, mode).await;
        let selected = select(
            &mut client,
            "vol",
            &[
                "base:allocation",
                "grove:diff:v1",
                "qemu:dirty-bitmap:vol@v1",
            ],
        )
        .await;
        client.go("vol", &[]).await.unwrap();
        let grove = id_of(&selected, "grove:diff:v1");
        let qemu = id_of(&selected, "qemu:dirty-bitmap:vol@v1");
        let allocation = id_of(&selected, "base:allocation");

        // Unaligned writes: every block they touch differs.
        for (offset, len) in [(4 * KIB + 100, 10), (12 * KIB, 8 * KIB), (200 * KIB, 1)] {
            let outcome = client
                .call(Command::Write, 0, offset, len, &vec![1u8; len as usize])
                .await;
            assert_eq!(outcome.error, 0);
        }
        let outcome = client
            .call(Command::BlockStatus, 0, 0, 256 * KIB, &[])
            .await;
        assert_eq!(outcome.error, 0, "{mode:?}");
        assert_eq!(outcome.contexts.len(), 3);
        assert_eq!(
            outcome.contexts[0].0, allocation,
            "base:allocation comes first"
        );
        let dirty = u64::from(NBD_STATE_DIRTY);
        let expected = vec![
            (4 * KIB, 0),
            (4 * KIB, dirty),
            (4 * KIB, 0),
            (8 * KIB, dirty),
            // The base has data at 64 KiB that the export lacks.
            (44 * KIB, 0),
            (8 * KIB, dirty),
            (128 * KIB, 0),
            (4 * KIB, dirty),
            (52 * KIB, 0),
        ];
        assert_eq!(descriptors_of(&outcome, grove), expected);
        assert_eq!(descriptors_of(&outcome, qemu), expected);
        // An unaligned window: extents cover exactly the request.
        let outcome = client
            .call(Command::BlockStatus, 0, 6 * KIB, 10 * KIB, &[])
            .await;
        assert_eq!(
            descriptors_of(&outcome, qemu),
            [(2 * KIB, dirty), (4 * KIB, 0), (4 * KIB, dirty)]
        );
        // REQ_ONE: exactly one extent per context, no longer than the request.
        let outcome = client
            .call(
                Command::BlockStatus,
                NBD_CMD_FLAG_REQ_ONE,
                12 * KIB,
                100 * KIB,
                &[],
            )
            .await;
        assert_eq!(outcome.contexts.len(), 3);
        assert_eq!(descriptors_of(&outcome, grove), [(8 * KIB, dirty)]);
        assert_eq!(descriptors_of(&outcome, allocation).len(), 1);
        assert!(descriptors_of(&outcome, allocation)[0].0 <= 100 * KIB);
        client.disconnect().await;
    }
}

#[tokio::test]
async fn diff_contexts_of_a_writable_export_follow_writes_on_any_connection() {
    let server = Server::start().await;
    let export = server.provider.export("vol").unwrap();
    let mut client = negotiating(&server, ReplyMode::Structured).await;
    select(
        &mut client,
        "vol",
        &["grove:diff:v1", "qemu:dirty-bitmap:v1"],
    )
    .await;
    client.go("vol", &[]).await.unwrap();
    let outcome = client.call(Command::BlockStatus, 0, 0, 16 << 20, &[]).await;
    assert_eq!(outcome.contexts.len(), 2);
    assert!(outcome
        .contexts
        .iter()
        .all(|(_, descriptors)| *descriptors == [(16 << 20, 0)]));
    // Both contexts compare with the same ref: one computation per request.
    assert_eq!(export.diff_computations(), 1);

    // A write on another connection shows on the next request.
    let mut other = server.session("vol", ReplyMode::Simple).await;
    assert_eq!(
        other
            .call(Command::Write, 0, 1 << 20, 4096, &[9u8; 4096])
            .await
            .error,
        0
    );
    other.disconnect().await;
    let outcome = client.call(Command::BlockStatus, 0, 0, 16 << 20, &[]).await;
    let dirty = u64::from(GROVE_STATE_CHANGED);
    for (_, descriptors) in &outcome.contexts {
        assert_eq!(
            *descriptors,
            [(1 << 20, 0), (4096, dirty), ((15 << 20) - 4096, 0)]
        );
    }
    assert_eq!(export.diff_computations(), 2);
    // Writing the base's content back (zeros) makes the block equal again.
    assert_eq!(
        client
            .call(Command::Write, 0, 1 << 20, 4096, &[0u8; 4096])
            .await
            .error,
        0
    );
    let outcome = client.call(Command::BlockStatus, 0, 0, 16 << 20, &[]).await;
    assert_eq!(
        descriptors_of(&outcome, outcome.contexts[0].0),
        [(16 << 20, 0)]
    );

    // Pipelined requests are all answered, sharing computations where they may.
    let before = export.diff_computations();
    let mut cookies = Vec::new();
    for index in 0..16u64 {
        cookies.push(
            client
                .request(Command::BlockStatus, 0, index << 20, 1 << 20, &[])
                .await,
        );
    }
    for _ in 0..16 {
        let outcome = client.next_outcome().await;
        assert_eq!(outcome.error, 0);
        assert!(cookies.contains(&outcome.cookie));
    }
    let computed = export.diff_computations() - before;
    assert!((1..=16).contains(&computed), "{computed} computations");
    client.disconnect().await;
}

#[tokio::test]
async fn diff_contexts_of_immutable_refs_are_computed_once() {
    let server = Server::start().await;
    let newer = server.provider.add_export("vol@v2", 16 << 20, true);
    newer.load(0, &[3u8; 4096]);
    let mut client = negotiating(&server, ReplyMode::Extended).await;
    select(&mut client, "vol@v2", &["qemu:dirty-bitmap:v1"]).await;
    client.go("vol@v2", &[]).await.unwrap();
    for _ in 0..5 {
        let outcome = client.call(Command::BlockStatus, 0, 0, 16 << 20, &[]).await;
        assert_eq!(
            outcome.descriptors,
            [(4096, u64::from(NBD_STATE_DIRTY)), ((16 << 20) - 4096, 0)]
        );
    }
    assert_eq!(newer.diff_computations(), 1);
    client.disconnect().await;
}

#[tokio::test]
async fn diff_context_failures_are_error_replies() {
    let server = Server::start().await;
    let mut client = negotiating(&server, ReplyMode::Structured).await;
    select(&mut client, "vol", &["grove:diff:v1"]).await;
    client.go("vol", &[]).await.unwrap();
    let export = server.provider.export("vol").unwrap();
    export.set_fault(Some(Fault::Io));
    let outcome = client.call(Command::BlockStatus, 0, 0, 4096, &[]).await;
    assert_eq!(outcome.error, NBD_EIO);
    assert!(outcome.contexts.is_empty(), "no partial reply");
    export.set_fault(None);
    let outcome = client.call(Command::BlockStatus, 0, 0, 4096, &[]).await;
    assert_eq!(outcome.error, 0);
    // A base that disappeared under the connection.
    server.provider.remove_export("vol@v1");
    let outcome = client.call(Command::BlockStatus, 0, 0, 4096, &[]).await;
    assert_eq!(outcome.error, NBD_EIO);
    client.disconnect().await;
    server.assert_serving().await;
}
