//! End-to-end: merges with strategy `manual`, "like a git merge in progress". A merge with
//! conflicts changes nothing on the target branch and opens a writable merge branch (exported
//! over NBD as `VOL@NAME`) holding the target's content with the merged side's changes taken
//! in; the conflicting ranges are resolved there with a real client (qemu-io), and the merge
//! is concluded into a two-parent commit, or aborted. Everything that would leave the merge
//! branch's state behind is refused (409), and a merge in progress survives restarts. Data is
//! checked byte for byte with qemu-io and nbdcopy only.

mod support;

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use support::{
    assert_patterns, assert_same_bytes, nbd, nbdcopy_out, qio_write, require_nbd_tools, run,
    write_pattern, Grove, HttpReply, KIB, MIB, TOOL_TIMEOUT,
};

const VOLUME_SIZE_BYTES: u64 = 16 * MIB;
/// Both sides change it, differently: the conflict.
const A: (u64, u64) = (MIB, 64 * KIB);
/// Only main (ours) changes it.
const B: (u64, u64) = (2 * MIB, 64 * KIB);
/// Only feature (theirs) changes it: taken.
const C: (u64, u64) = (3 * MIB, 64 * KIB);

/// The commits of the diverged history built by `diverge`.
struct History {
    base: String,
    ours: String,
    theirs: String,
}

/// Volume `mm`: 0x01 over its first 4 MiB (commit `base`); branch `feature` from there; main
/// writes A (0xa1) and B (0xb1), feature writes A (0xa2) and C (0xc2), each side commits.
fn diverge(grove: &Grove) -> History {
    grove.create_volume("mm", "16MiB");
    write_pattern(&grove.unix_uri("mm"), 0x01, 0, 4 * MIB);
    let base = grove.commit("mm", "base");
    grove.cli_ok(&["branch", "create", "mm", "feature"]);
    let main = grove.unix_uri("mm");
    write_pattern(&main, 0xa1, A.0, A.1);
    write_pattern(&main, 0xb1, B.0, B.1);
    let ours = grove.commit("mm", "ours");
    let feature = grove.unix_uri("mm@feature");
    write_pattern(&feature, 0xa2, A.0, A.1);
    write_pattern(&feature, 0xc2, C.0, C.1);
    let theirs = grove.commit("mm@feature", "theirs");
    grove.wait_no_sessions();
    History { base, ours, theirs }
}

/// The volume's image: the base (0x01 over 4 MiB, zeros after) with `layers` written in order.
fn image(layers: &[(u8, (u64, u64))]) -> Vec<u8> {
    let mut bytes = vec![0u8; VOLUME_SIZE_BYTES as usize];
    bytes[..(4 * MIB) as usize].fill(0x01);
    for (byte, (offset, len)) in layers {
        bytes[*offset as usize..(*offset + *len) as usize].fill(*byte);
    }
    bytes
}

fn ours_image() -> Vec<u8> {
    image(&[(0xa1, A), (0xb1, B)])
}

/// Checks the whole export against `expected` with nbdcopy.
fn assert_image(grove: &Grove, export: &str, expected: &[u8], context: &str) {
    let path = grove.root().join("check.img");
    let actual = nbdcopy_out(&grove.unix_uri(export), &path);
    assert_same_bytes(expected, &actual, context);
    grove.wait_no_sessions();
}

fn post(grove: &Grove, path: &str, body: Value) -> HttpReply {
    grove.http("POST", path, Some(&body.to_string()))
}

/// `POST /v1/volumes/mm/merges` with strategy manual and `extra` fields.
fn manual_merge(grove: &Grove, from: &str, extra: Value) -> HttpReply {
    let mut body = json!({"from": from, "into": "main", "strategy": "manual"});
    for (key, value) in extra.as_object().expect("extra fields") {
        body[key] = value.clone();
    }
    post(grove, "/v1/volumes/mm/merges", body)
}

fn ok_json(reply: HttpReply, status: u16, context: &str) -> Value {
    assert_eq!(reply.status, status, "{context}: {reply:?}");
    reply.json()
}

/// `(offset_bytes, len_bytes)` pairs of a JSON array of ranges.
fn ranges(value: &Value) -> Vec<(u64, u64)> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array of ranges: {value}"))
        .iter()
        .map(|r| {
            (
                r["offset_bytes"].as_u64().expect("offset_bytes"),
                r["len_bytes"].as_u64().expect("len_bytes"),
            )
        })
        .collect()
}

fn head_commit(grove: &Grove, branch: &str) -> String {
    let reply = grove.http("GET", &format!("/v1/volumes/mm/branches/{branch}"), None);
    ok_json(reply, 200, "GET branch")["head_commit"]
        .as_str()
        .expect("the branch has a commit")
        .to_string()
}

fn assert_no_branch(grove: &Grove, path_name: &str) {
    let reply = grove.http("GET", &format!("/v1/volumes/mm/branches/{path_name}"), None);
    reply.assert_error(&[404], &format!("branch {path_name} must not exist"));
}

fn merges_in_progress(grove: &Grove) -> Vec<Value> {
    let reply = grove.http("GET", "/v1/volumes/mm/merges", None);
    ok_json(reply, 200, "GET merges")
        .as_array()
        .expect("an array")
        .clone()
}

/// Asserts the export cannot be opened (its branch is gone).
fn assert_no_export(grove: &Grove, export: &str) {
    let uri = grove.unix_uri(export);
    run(
        Command::new("nbdinfo").arg("--size").arg(&uri),
        TOOL_TIMEOUT,
    )
    .assert_failure();
}

/// A command line split on spaces.
fn words(line: &str) -> Vec<&str> {
    line.split(' ').collect()
}

/// `GET /v1/volumes/mm/merges/{name}` (`name` as a path segment), which must answer 200.
fn merge_state(grove: &Grove, name: &str) -> Value {
    let reply = grove.http("GET", &format!("/v1/volumes/mm/merges/{name}"), None);
    ok_json(reply, 200, &format!("GET merge {name}"))
}

/// `POST /v1/volumes/mm/merges/{name}/{action}` (`conclude` or `abort`) with `body`.
fn finish(grove: &Grove, name: &str, action: &str, body: Value) -> HttpReply {
    post(
        grove,
        &format!("/v1/volumes/mm/merges/{name}/{action}"),
        body,
    )
}

/// Asserts `reply` is a 409 with the documented error shape.
fn assert_conflict(reply: HttpReply, context: &str) {
    reply.assert_error(&[409], context);
}

#[test]
fn manual_merge_resolved_with_qemu_io_and_concluded() {
    require_nbd_tools();
    let grove = Grove::start();
    let h = diverge(&grove);

    let report = ok_json(manual_merge(&grove, "feature", json!({})), 200, "merge");
    assert_eq!(report["outcome"], "in_progress", "{report}");
    assert_eq!(report["merge_branch"], "merge-main", "{report}");
    assert_eq!(ranges(&report["conflicts"]), [A], "{report}");
    assert_eq!(ranges(&report["taken"]), [C], "{report}");
    assert_eq!(
        [&report["conflict_bytes"], &report["taken_bytes"]],
        [A.1, C.1]
    );
    assert_eq!(report["from_commit"], h.theirs.as_str());
    assert_eq!(report["ours_commit"], h.ours.as_str());
    assert_eq!(report["base"], h.base.as_str());
    assert!(report["commit"].is_null(), "{report}");

    // Nothing changed on main; the merge branch holds ours with C taken, A still ours.
    assert_eq!(head_commit(&grove, "main"), h.ours);
    let main = ok_json(
        grove.http("GET", "/v1/volumes/mm/branches/main", None),
        200,
        "main",
    );
    assert_eq!(main["uncommitted_blocks"], 0, "{main}");
    assert_image(&grove, "mm", &ours_image(), "main during the merge");
    let merging = image(&[(0xa1, A), (0xb1, B), (0xc2, C)]);
    assert_image(&grove, "mm@merge-main", &merging, "the merge branch");

    let shown = merge_state(&grove, "merge-main");
    assert_eq!(shown["volume"], "mm");
    assert_eq!(shown["merge_branch"], "merge-main");
    assert_eq!(shown["into"], "main");
    assert_eq!(shown["from_commit"], h.theirs.as_str());
    assert_eq!(shown["ours_commit"], h.ours.as_str());
    assert_eq!(shown["base"], h.base.as_str());
    assert_eq!(ranges(&shown["conflicts"]), [A], "{shown}");
    assert_eq!(ranges(&shown["taken"]), [C], "{shown}");
    assert_eq!(
        [&shown["conflict_bytes"], &shown["taken_bytes"]],
        [A.1, C.1]
    );
    assert_eq!(shown["edited_bytes"], 0, "nothing written yet: {shown}");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    let started = shown["started_unix"].as_u64().expect("started_unix");
    assert!(
        started <= now.as_secs() && started + 300 >= now.as_secs(),
        "{shown}"
    );
    assert_eq!(merges_in_progress(&grove), std::slice::from_ref(&shown));

    // Resolve A by hand over NBD.
    let write = format!("write -P 0xab {} {}", A.0, A.1);
    qio_write(&grove.unix_uri("mm@merge-main"), &[&write, "flush"]);
    grove.wait_no_sessions();
    let shown = merge_state(&grove, "merge-main");
    assert_eq!(shown["edited_bytes"], A.1, "{shown}");

    let body = json!({"message": "resolve A by hand", "author": "ana"});
    let commit = ok_json(
        finish(&grove, "merge-main", "conclude", body),
        201,
        "conclude",
    );
    let id = commit["id"].as_str().expect("commit id").to_string();
    assert_eq!(commit["parents"], json!([h.ours, h.theirs]), "{commit}");
    assert_eq!(commit["message"], "resolve A by hand");
    assert_eq!(commit["author"], "ana");
    assert_eq!(head_commit(&grove, "main"), id);
    let resolved = image(&[(0xab, A), (0xb1, B), (0xc2, C)]);
    assert_image(&grove, "mm", &resolved, "main after the conclusion");
    assert_image(&grove, &format!("mm@{id}"), &resolved, "the merge commit");
    let feature = image(&[(0xa2, A), (0xc2, C)]);
    assert_image(&grove, "mm@feature", &feature, "feature after the merge");

    // The merge branch is gone, with its export and its merge.
    assert_no_branch(&grove, "merge-main");
    assert_no_export(&grove, "mm@merge-main");
    assert!(merges_in_progress(&grove).is_empty());
    let reply = grove.http("GET", "/v1/volumes/mm/merges/merge-main", None);
    reply.assert_error(&[404], "a concluded merge");

    let log = grove.cli_json(&["log", "mm"]);
    assert_eq!(log[0]["id"], id.as_str(), "{log}");
    assert_eq!(log[0]["parents"], json!([h.ours, h.theirs]), "{log}");
    assert!(grove.cli_ok(&["log", "mm"]).contains("resolve A by hand"));
    let diff = grove.cli_json(&["diff", &format!("mm@{}", h.ours), "mm"]);
    assert_eq!(ranges(&diff["extents"]), [A, C], "{diff}");
}

#[test]
fn manual_merge_aborted_leaves_main_untouched() {
    require_nbd_tools();
    let grove = Grove::start();
    let h = diverge(&grove);
    let before = ours_image();
    assert_image(&grove, "mm", &before, "main before the merge");

    let text = grove.cli_ok(&words(
        "merge mm --from feature --into main --strategy manual",
    ));
    for needle in ["merge-main", "1048576", "65536"] {
        assert!(text.contains(needle), "the CLI lacks {needle:?}:\n{text}");
    }
    let status = grove.cli_json(&["merge", "mm", "--status"]);
    let listed = status.as_array().expect("--status --json is an array");
    assert_eq!(listed.len(), 1, "{status}");
    assert_eq!(listed[0]["merge_branch"], "merge-main");
    assert_eq!(listed[0]["into"], "main");
    assert_eq!(listed[0]["from_commit"], h.theirs.as_str());
    let text = grove.cli_ok(&["merge", "mm", "--status"]);
    assert!(text.contains("merge-main"), "{text}");

    // Edits on the merge branch go with it.
    write_pattern(&grove.unix_uri("mm@merge-main"), 0xee, A.0, A.1);
    grove.wait_no_sessions();
    grove.cli_ok(&["merge", "mm", "--abort", "merge-main"]);
    assert_eq!(head_commit(&grove, "main"), h.ours);
    assert_image(&grove, "mm", &before, "main after the abort");
    assert_no_branch(&grove, "merge-main");
    assert_no_export(&grove, "mm@merge-main");
    assert_eq!(grove.cli_json(&["merge", "mm", "--status"]), json!([]));
    for name in ["merge-main", "feature", "nope"] {
        let reply = grove.http("GET", &format!("/v1/volumes/mm/merges/{name}"), None);
        reply.assert_error(&[404], &format!("no merge on {name}"));
    }
    let reply = finish(&grove, "feature", "abort", json!({}));
    reply.assert_error(&[400, 404, 409], "abort on a plain branch");
    assert_eq!(head_commit(&grove, "feature"), h.theirs);

    // A second merge starts afresh with the default name; its edits are not the old ones.
    let report = ok_json(manual_merge(&grove, "feature", json!({})), 200, "merge");
    assert_eq!(report["outcome"], "in_progress", "{report}");
    assert_eq!(report["merge_branch"], "merge-main");
    let fresh = [(0xa1, A.0, A.1), (0xc2, C.0, C.1)];
    assert_patterns(&grove.unix_uri("mm@merge-main"), &fresh);
    grove.wait_no_sessions();
    let reply = finish(&grove, "merge-main", "abort", json!({}));
    assert_eq!(reply.status, 204, "abort over HTTP: {reply:?}");
    assert_no_branch(&grove, "merge-main");

    // Deleting the merge branch aborts too.
    ok_json(manual_merge(&grove, "feature", json!({})), 200, "merge");
    let reply = grove.http("DELETE", "/v1/volumes/mm/branches/merge-main", None);
    assert_eq!(reply.status, 204, "delete the merge branch: {reply:?}");
    assert!(merges_in_progress(&grove).is_empty());
    assert_eq!(head_commit(&grove, "main"), h.ours);
    assert_image(&grove, "mm", &before, "main after all the aborts");
}

#[test]
fn merge_in_progress_refuses_what_would_break_it() {
    require_nbd_tools();
    let grove = Grove::start();
    let h = diverge(&grove);
    // Merge from a commit no head is based on, so that deleting it is otherwise allowed.
    write_pattern(&grove.unix_uri("mm@feature"), 0xd2, 5 * MIB, 4 * KIB);
    grove.commit("mm@feature", "later");
    grove.cli_ok(&["tag", "create", "mm", "v1", &h.base]);
    grove.wait_no_sessions();

    // A merge branch name taken by a branch or a tag.
    for name in ["feature", "v1"] {
        let reply = manual_merge(&grove, &h.theirs, json!({"merge_branch": name}));
        assert_conflict(reply, &format!("merge branch named {name}"));
    }
    assert!(merges_in_progress(&grove).is_empty());
    assert_eq!(head_commit(&grove, "main"), h.ours);

    let report = ok_json(manual_merge(&grove, &h.theirs, json!({})), 200, "merge");
    assert_eq!(report["outcome"], "in_progress", "{report}");
    let refusals = [
        (
            "branches/merge-main/commits",
            json!({"message": "x"}),
            "commit on it",
        ),
        (
            "branches/merge-main/reset",
            json!({"to": h.base, "discard_uncommitted": true}),
            "reset it",
        ),
        (
            "branches",
            json!({"name": "child", "from": "merge-main"}),
            "branch from it",
        ),
        (
            "clones",
            json!({"name": "mm-copy", "ref": "merge-main"}),
            "clone it",
        ),
        (
            "merges",
            json!({"from": "feature", "into": "merge-main", "strategy": "theirs"}),
            "merge into it",
        ),
        (
            "merges",
            json!({"from": "feature", "into": "main", "strategy": "manual"}),
            "a second merge branch named merge-main",
        ),
    ];
    for (path, body, what) in refusals {
        assert_conflict(post(&grove, &format!("/v1/volumes/mm/{path}"), body), what);
    }
    let path = format!("/v1/volumes/mm/commits/{}", h.theirs);
    assert_conflict(grove.http("DELETE", &path, None), "delete FROM's commit");
    assert_no_branch(&grove, "child");
    let reply = grove.http("GET", "/v1/volumes/mm-copy", None);
    reply.assert_error(&[404], "no clone was made");
    let shown = merge_state(&grove, "merge-main");
    assert_eq!(shown["from_commit"], h.theirs.as_str());
    assert_eq!(ranges(&shown["conflicts"]), [A]);
    assert_eq!(merges_in_progress(&grove).len(), 1);

    // main moves on: first uncommitted writes, then a commit; the merge cannot conclude.
    write_pattern(&grove.unix_uri("mm"), 0x77, 8 * MIB, 4 * KIB);
    grove.wait_no_sessions();
    let reply = finish(&grove, "merge-main", "conclude", json!({}));
    assert_conflict(reply, "conclude after writes on main");
    let moved = grove.commit("mm", "moved on");
    grove.wait_no_sessions();
    let reply = finish(&grove, "merge-main", "conclude", json!({}));
    assert_conflict(reply, "conclude after a commit on main");
    let shown = merge_state(&grove, "merge-main");
    assert_eq!(shown["ours_commit"], h.ours.as_str());
    assert_eq!(head_commit(&grove, "main"), moved);
    let reply = finish(&grove, "merge-main", "abort", json!({}));
    assert_eq!(reply.status, 204, "abort: {reply:?}");
    assert_no_branch(&grove, "merge-main");
    let moved_image = image(&[(0xa1, A), (0xb1, B), (0x77, (8 * MIB, 4 * KIB))]);
    assert_image(&grove, "mm", &moved_image, "main after the abort");

    // Again; sessions on the merge branch or on main block the conclusion.
    let report = ok_json(manual_merge(&grove, &h.theirs, json!({})), 200, "merge");
    assert_eq!(report["ours_commit"], moved.as_str(), "{report}");
    assert_eq!(ranges(&report["conflicts"]), [A], "{report}");
    write_pattern(&grove.unix_uri("mm@merge-main"), 0xab, A.0, A.1);
    grove.wait_no_sessions();
    for export in ["mm@merge-main", "mm"] {
        let (connection, _) = nbd::open(grove.nbd_port, export);
        let reply = finish(&grove, "merge-main", "conclude", json!({}));
        assert_conflict(reply, &format!("conclude with {export} attached"));
        grove.wait_session_closed(&connection.hang_up());
        merge_state(&grove, "merge-main");
    }
    grove.wait_no_sessions();
    let reply = finish(&grove, "merge-main", "conclude", json!({}));
    let commit = ok_json(reply, 201, "conclude");
    assert_eq!(commit["parents"], json!([moved, h.theirs]), "{commit}");
    let expected = image(&[(0xab, A), (0xb1, B), (0xc2, C), (0x77, (8 * MIB, 4 * KIB))]);
    assert_image(&grove, "mm", &expected, "main after the conclusion");
    assert_no_branch(&grove, "merge-main");
}

#[test]
fn manual_merge_without_conflicts_and_dry_runs() {
    require_nbd_tools();
    let grove = Grove::start();
    grove.create_volume("mm", "16MiB");
    write_pattern(&grove.unix_uri("mm"), 0x01, 0, 4 * MIB);
    grove.commit("mm", "base");
    for name in ["feature", "ff", "other"] {
        grove.cli_ok(&["branch", "create", "mm", name]);
    }
    write_pattern(&grove.unix_uri("mm"), 0xb1, B.0, B.1);
    let ours = grove.commit("mm", "ours");
    write_pattern(&grove.unix_uri("mm@feature"), 0xc2, C.0, C.1);
    let theirs = grove.commit("mm@feature", "theirs");
    grove.wait_no_sessions();

    // No conflicts: the merge commit is made directly, no merge branch.
    let report = grove.cli_json(&words(
        "merge mm --from feature --into main --strategy manual",
    ));
    assert_eq!(report["outcome"], "merged", "{report}");
    assert!(report["merge_branch"].is_null(), "{report}");
    assert_eq!(
        report["commit"]["parents"],
        json!([ours, theirs]),
        "{report}"
    );
    assert_eq!(ranges(&report["taken"]), [C]);
    let merged = report["commit"]["id"].as_str().expect("id").to_string();
    assert_eq!(head_commit(&grove, "main"), merged);
    assert_no_branch(&grove, "merge-main");
    assert!(merges_in_progress(&grove).is_empty());
    let clean = image(&[(0xb1, B), (0xc2, C)]);
    assert_image(&grove, "mm", &clean, "main after the clean merge");

    // Fast-forward and up to date, as with the other strategies.
    write_pattern(&grove.unix_uri("mm@ff"), 0xf1, 6 * MIB, 4 * KIB);
    let ff = grove.commit("mm@ff", "ff");
    grove.wait_no_sessions();
    grove.cli_ok(&["merge", "mm", "--from", "main", "--into", "ff"]);
    let head = head_commit(&grove, "ff");
    assert_ne!(head, ff);
    let report = ok_json(manual_merge(&grove, "ff", json!({})), 200, "merge ff");
    assert_eq!(report["outcome"], "fast_forward", "{report}");
    assert_eq!(head_commit(&grove, "main"), head);
    let report = ok_json(manual_merge(&grove, "ff", json!({})), 200, "merge ff again");
    assert_eq!(report["outcome"], "up_to_date", "{report}");
    assert_no_branch(&grove, "merge-main");

    // A dry run with conflicts reports them and creates nothing.
    write_pattern(&grove.unix_uri("mm"), 0xa1, A.0, A.1);
    let main_head = grove.commit("mm", "ours on A");
    write_pattern(&grove.unix_uri("mm@other"), 0xa2, A.0, A.1);
    grove.commit("mm@other", "theirs on A");
    grove.wait_no_sessions();
    for extra in [json!({}), json!({"merge_branch": "fix/a"})] {
        let mut extra = extra;
        extra["dry_run"] = json!(true);
        let report = ok_json(manual_merge(&grove, "other", extra), 200, "dry run");
        assert_eq!(report["outcome"], "in_progress", "{report}");
        assert_eq!(report["dry_run"], true);
        assert_eq!(ranges(&report["conflicts"]), [A], "{report}");
        assert!(report["commit"].is_null(), "{report}");
    }
    assert_no_branch(&grove, "merge-main");
    assert_no_branch(&grove, "fix%2Fa");
    assert!(merges_in_progress(&grove).is_empty());
    assert_eq!(head_commit(&grove, "main"), main_head);

    // A merge branch with '/' in its name.
    let extra = json!({"merge_branch": "fix/a"});
    let report = ok_json(manual_merge(&grove, "other", extra), 200, "merge");
    assert_eq!(report["merge_branch"], "fix/a", "{report}");
    assert_eq!(merge_state(&grove, "fix%2Fa")["merge_branch"], "fix/a");
    let ours_on_a = [(0xa1, A.0, A.1), (0xb1, B.0, B.1)];
    assert_patterns(&grove.unix_uri("mm@fix/a"), &ours_on_a);
    grove.wait_no_sessions();
    let reply = finish(&grove, "fix%2Fa", "abort", json!({}));
    assert_eq!(reply.status, 204, "abort: {reply:?}");
    assert_no_branch(&grove, "fix%2Fa");
    assert_eq!(head_commit(&grove, "main"), main_head);
}

#[test]
fn merge_in_progress_survives_restarts() {
    require_nbd_tools();
    let mut grove = Grove::start();
    let h = diverge(&grove);
    let start = "merge mm --from feature --into main --strategy manual --merge-branch resolution";
    let report = grove.cli_json(&words(start));
    assert_eq!(report["outcome"], "in_progress", "{report}");
    assert_eq!(report["merge_branch"], "resolution");
    // The conflict resolved, and one more edit outside it.
    let resolve = format!("write -P 0xab {} {}", A.0, A.1);
    let edit = format!("write -P 0xcd {} 4096", B.0);
    qio_write(
        &grove.unix_uri("mm@resolution"),
        &[&resolve, &edit, "flush"],
    );
    grove.wait_no_sessions();
    let before = merge_state(&grove, "resolution");
    assert_eq!(before["edited_bytes"], A.1 + 4 * KIB, "{before}");
    let expected = image(&[(0xab, A), (0xb1, B), (0xcd, (B.0, 4 * KIB)), (0xc2, C)]);

    grove.terminate();
    grove.spawn();
    assert_eq!(merge_state(&grove, "resolution"), before, "after SIGTERM");
    grove.restart_after_kill9();
    assert_eq!(merge_state(&grove, "resolution"), before, "after kill -9");
    assert_image(
        &grove,
        "mm@resolution",
        &expected,
        "the merge branch after restarts",
    );
    assert_image(&grove, "mm", &ours_image(), "main after restarts");

    let out = grove.cli_ok(&["merge", "mm", "--conclude", "resolution", "-m", "resolved"]);
    let log = grove.cli_json(&["log", "mm"]);
    let id = log[0]["id"].as_str().expect("id");
    assert!(
        out.contains(id),
        "`merge --conclude` prints the commit id {id}:\n{out}"
    );
    assert_eq!(log[0]["parents"], json!([h.ours, h.theirs]), "{log}");
    assert_eq!(log[0]["message"], "resolved");
    assert_image(&grove, "mm", &expected, "main after the conclusion");
    assert_no_branch(&grove, "resolution");
    assert_eq!(grove.cli_json(&["merge", "mm", "--status"]), json!([]));
}
