//! End-to-end: lineage of the real binary. Every NBD connection is a session (`GET
//! /v1/sessions`, `grove sessions`); clients join sessions into a job with `?job=ID` after the
//! export name (`%3F` in NBD URIs). Each commit records the sessions that wrote its data and
//! the commits it was derived from: named in the commit request (`--source`, `"sources"`), or
//! read by a job that wrote the committed branch. `GET .../commits/{id}/lineage` and `grove
//! lineage` walk upstream (parents and sources, across volumes) and downstream (children and
//! commits naming it a source). Data is written and read only with independent clients
//! (qemu-io, nbdcopy, nbdinfo) and the raw protocol client of `support/nbd.rs` where a test
//! needs to know which session is which.

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{
    assert_pattern, nbd, qemu_io, qio_write, require_nbd_tools, run, write_pattern, CmdOut, Grove,
    KIB, MIB, TOOL_TIMEOUT,
};

/// How long a client that exited may take to disappear from `GET /v1/sessions`.
const SESSION_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads with qemu-io, read-only; every command must succeed.
fn qio_read(uri: &str, commands: &[&str]) {
    let commands: Vec<String> = commands.iter().map(|item| item.to_string()).collect();
    let out = qemu_io(uri, &commands, true);
    let text = out.combined();
    assert!(
        out.success() && !text.contains("failed") && !text.contains("error"),
        "qemu-io read on {uri} failed\n{}",
        out.report()
    );
}

fn nbdinfo_size(uri: &str) -> CmdOut {
    run(Command::new("nbdinfo").arg("--size").arg(uri), TOOL_TIMEOUT)
}

fn sessions(grove: &Grove) -> Vec<Value> {
    let reply = grove.http("GET", "/v1/sessions", None);
    assert_eq!(reply.status, 200, "GET /v1/sessions: {reply:?}");
    reply.json().as_array().expect("sessions array").clone()
}

/// The one open session whose export name is `export` (waiting for it to appear).
fn session_by_export(grove: &Grove, export: &str) -> Value {
    let started = Instant::now();
    loop {
        let all = sessions(grove);
        let found: Vec<&Value> = all.iter().filter(|s| s["export"] == export).collect();
        if found.len() == 1 {
            return found[0].clone();
        }
        assert!(
            found.len() < 2 && started.elapsed() < SESSION_TIMEOUT,
            "expected one session on {export:?}: {all:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn get_commit(grove: &Grove, volume: &str, id: &str) -> Value {
    let reply = grove.http("GET", &format!("/v1/volumes/{volume}/commits/{id}"), None);
    assert_eq!(reply.status, 200, "GET commit {volume}@{id}: {reply:?}");
    reply.json()
}

/// `POST /v1/volumes/{vol}/branches/{branch}/commits` with `body`; must answer 200/201.
fn api_commit(grove: &Grove, volume: &str, branch: &str, body: Value) -> Value {
    let reply = grove.http(
        "POST",
        &format!("/v1/volumes/{volume}/branches/{branch}/commits"),
        Some(&body.to_string()),
    );
    assert!(
        reply.status == 200 || reply.status == 201,
        "commit {volume}@{branch} with {body}: {reply:?}"
    );
    reply.json()
}

fn lineage_api(grove: &Grove, volume: &str, id: &str, query: &str) -> Value {
    let path = format!("/v1/volumes/{volume}/commits/{id}/lineage?{query}");
    let reply = grove.http("GET", &path, None);
    assert_eq!(reply.status, 200, "GET {path}: {reply:?}");
    reply.json()
}

/// The ids of the commits of a lineage graph, in order.
fn graph_ids(graph: &Value) -> Vec<String> {
    graph["commits"]
        .as_array()
        .unwrap_or_else(|| panic!("no commits in {graph}"))
        .iter()
        .map(|c| c["id"].as_str().expect("commit id").to_string())
        .collect()
}

fn id_set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|id| id.to_string()).collect()
}

/// The edges of a lineage graph as `(commit, from, kind)`, sorted.
fn graph_edges(graph: &Value) -> Vec<(String, String, String)> {
    let mut edges: Vec<(String, String, String)> = graph["edges"]
        .as_array()
        .unwrap_or_else(|| panic!("no edges in {graph}"))
        .iter()
        .map(|e| {
            (
                e["commit"].as_str().expect("edge commit").to_string(),
                e["from"].as_str().expect("edge from").to_string(),
                e["kind"].as_str().expect("edge kind").to_string(),
            )
        })
        .collect();
    edges.sort();
    edges
}

fn edge(commit: &str, from: &str, kind: &str) -> (String, String, String) {
    (commit.to_string(), from.to_string(), kind.to_string())
}

fn sorted(mut edges: Vec<(String, String, String)>) -> Vec<(String, String, String)> {
    edges.sort();
    edges
}

/// The edge `commit <- from` of a graph.
fn find_edge(graph: &Value, commit: &str, from: &str) -> Value {
    graph["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .find(|e| e["commit"] == commit && e["from"] == from)
        .cloned()
        .unwrap_or_else(|| panic!("no edge {commit} <- {from} in {graph}"))
}

fn head_commit(grove: &Grove, volume: &str) -> String {
    let log = grove.cli_json(&["log", volume, "--limit", "1"]);
    log[0]["id"].as_str().expect("log entry id").to_string()
}

fn log_len(grove: &Grove, volume: &str) -> usize {
    grove
        .cli_json(&["log", volume])
        .as_array()
        .expect("log array")
        .len()
}

/// The job example of the README: a training job reads `datasets@v3` (and a branch of a
/// third volume) and writes `models`; committing `models` records what the job read, with
/// the bytes; another job's reads stay out of it.
#[test]
fn a_job_records_what_it_read_as_sources_of_what_it_wrote() {
    require_nbd_tools();
    let grove = Grove::start();
    let data_size = 8 * MIB;
    grove.create_volume("datasets", "8MiB");
    grove.create_volume("labels", "4MiB");
    grove.create_volume("models", "16MiB");
    grove.create_volume("scratch", "4MiB");

    write_pattern(&grove.unix_uri("datasets"), 0x11, 0, data_size);
    let d3 = grove.commit("datasets", "dataset v3");
    grove.cli_ok(&["tag", "create", "datasets", "v3", &d3]);
    write_pattern(&grove.unix_uri("datasets"), 0x12, 0, MIB);
    let d4 = grove.commit("datasets", "dataset v4");
    write_pattern(&grove.unix_uri("labels"), 0x21, 0, MIB);
    let l1 = grove.commit("labels", "labels");
    let m0 = grove.commit("models", "empty model");
    let s0 = grove.commit("scratch", "empty scratch");
    grove.wait_no_sessions();

    // A raw client joins the job: its session says so, with what the export resolved to.
    let (mut conn, info) = nbd::open(grove.nbd_port, "datasets@v3?job=train-42");
    assert!(info.read_only(), "a tag export is read-only");
    let session = session_by_export(&grove, "datasets@v3?job=train-42");
    assert_eq!(session["job"], "train-42", "{session}");
    assert_eq!(session["client"]["protocol"], "nbd", "{session}");
    assert_eq!(session["target"]["kind"], "tag", "{session}");
    assert_eq!(session["target"]["volume"], "datasets", "{session}");
    assert_eq!(session["target"]["tag"], "v3", "{session}");
    assert_eq!(session["target"]["commit"], d3.as_str(), "{session}");
    assert!(session["id"].is_u64() && session["opened_unix"].is_u64());
    let listed = grove.cli_json(&["sessions"]);
    assert!(
        listed
            .as_array()
            .expect("grove sessions --json")
            .iter()
            .any(|s| s["id"] == session["id"] && s["job"] == "train-42"),
        "`grove sessions --json` lists the job: {listed}"
    );
    let text = grove.cli_ok(&["sessions"]);
    assert!(
        text.contains(&session["id"].to_string()) && text.contains("datasets@v3"),
        "`grove sessions` lists the session:\n{text}"
    );
    let data = conn.read(0, 4096).expect("read").expect("read succeeds");
    assert!(data.iter().all(|&b| b == 0x11));
    let counted = session_by_export(&grove, "datasets@v3?job=train-42");
    assert_eq!(counted["counters"]["read_bytes"], 4096, "{counted}");
    let address = conn.hang_up();
    assert_eq!(session["client"]["address"], address.as_str());
    grove.wait_session_closed(&address);

    // The job reads the whole dataset with qemu-io over TCP, writes the model, and reads a
    // branch of `labels` (its latest commit) over the Unix socket after writing.
    qio_read(
        &grove.tcp_uri("datasets@v3%3Fjob=train-42"),
        &[&format!("read -P 0x11 0 {data_size}")],
    );
    qio_write(
        &grove.tcp_uri("models%3Fjob=train-42"),
        &["write -P 0x77 0 1M", "write -P 0x78 2M 512K"],
    );
    qio_read(
        &grove.unix_uri("labels%3Fjob=train-42"),
        &["read -P 0x21 0 1M"],
    );
    // Another job reads v4 by commit id and writes scratch; a session with no job reads v3.
    let out = run(
        Command::new("nbdcopy")
            .arg(grove.tcp_uri(&format!("datasets@{d4}%3Fjob=train-43")))
            .arg("null:"),
        TOOL_TIMEOUT,
    );
    out.assert_success();
    write_pattern(&grove.tcp_uri("scratch%3Fjob=train-43"), 0x43, 0, 64 * KIB);
    qio_read(&grove.tcp_uri("datasets@v3"), &["read -P 0x11 0 1M"]);
    grove.wait_no_sessions();

    // The commit response, the commit and the log all carry the lineage.
    let response = api_commit(&grove, "models", "main", json!({"message": "trained"}));
    let m1 = response["id"].as_str().expect("commit id").to_string();
    let lineage = &response["lineage"];
    let writers = lineage["sessions"].as_array().expect("lineage.sessions");
    assert_eq!(writers.len(), 1, "one session wrote models: {lineage}");
    let writer = &writers[0];
    assert_eq!(writer["job"], "train-42", "{lineage}");
    assert_eq!(writer["protocol"], "nbd", "{lineage}");
    assert_eq!(writer["bytes_written"], MIB + 512 * KIB, "{lineage}");
    assert!(
        writer["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("127.0.0.1:")),
        "{lineage}"
    );
    assert!(
        writer["session"].as_u64() > session["id"].as_u64(),
        "session ids grow: {lineage}"
    );
    assert!(writer["opened_unix"].as_u64() >= session["opened_unix"].as_u64());

    let mut sources: Vec<Value> = lineage["sources"].as_array().expect("sources").clone();
    sources.sort_by_key(|s| s["volume"].as_str().unwrap_or_default().to_string());
    assert_eq!(
        sources,
        [
            json!({"commit": d3, "volume": "datasets", "kind": "job", "job": "train-42",
                   "bytes_read": data_size + 4096}),
            json!({"commit": l1, "volume": "labels", "kind": "job", "job": "train-42",
                   "bytes_read": MIB}),
        ],
        "the job's reads, and only them: {lineage}"
    );
    assert_eq!(get_commit(&grove, "models", &m1)["lineage"], *lineage);
    let log = grove.cli_json(&["log", "models"]);
    assert_eq!(log[0]["id"], m1.as_str());
    assert_eq!(log[0]["lineage"], *lineage);
    assert_eq!(
        log[1]["lineage"],
        json!({"sessions": [], "sources": []}),
        "{log}"
    );

    // The other job's commit has its own read, not the first job's.
    let s1 = grove.commit("scratch", "scratch work");
    let scratch = get_commit(&grove, "scratch", &s1);
    assert_eq!(scratch["lineage"]["sessions"][0]["job"], "train-43");
    assert_eq!(
        scratch["lineage"]["sources"],
        json!([{"commit": d4, "volume": "datasets", "kind": "job", "job": "train-43",
                "bytes_read": data_size}]),
        "{scratch}"
    );

    // Upstream from models: its parent and the job's sources, across volumes.
    let up = grove.cli_json(&["lineage", "models", "--upstream"]);
    assert_eq!(up, lineage_api(&grove, "models", &m1, "direction=upstream"));
    assert_eq!(up["commit"], m1.as_str());
    assert_eq!(up["direction"], "upstream");
    assert_eq!(up["truncated"], false);
    let ids = graph_ids(&up);
    assert_eq!(ids[0], m1, "the start comes first: {up}");
    assert_eq!(
        ids.iter().cloned().collect::<BTreeSet<_>>(),
        id_set(&[&m1, &m0, &d3, &l1]),
        "{up}"
    );
    assert_eq!(ids.len(), 4, "{up}");
    assert_eq!(
        graph_edges(&up),
        sorted(vec![
            edge(&m1, &m0, "parent"),
            edge(&m1, &d3, "source"),
            edge(&m1, &l1, "source"),
        ]),
        "{up}"
    );
    assert_eq!(find_edge(&up, &m1, &m0)["source"], Value::Null);
    let via = find_edge(&up, &m1, &d3)["source"].clone();
    assert_eq!(via["kind"], "job", "{up}");
    assert_eq!(via["job"], "train-42", "{up}");
    assert_eq!(via["bytes_read"], data_size + 4096, "{up}");
    let datasets_commit = up["commits"]
        .as_array()
        .expect("commits")
        .iter()
        .find(|c| c["id"] == d3.as_str())
        .expect("d3 in the walk");
    assert_eq!(datasets_commit["volume"], "datasets");
    assert_eq!(datasets_commit["message"], "dataset v3");

    let text = grove.cli_ok(&["lineage", "models", "--upstream"]);
    for needle in [&m1[..12], &d3[..12], &l1[..12], "datasets", "train-42"] {
        assert!(
            text.contains(needle),
            "`grove lineage models --upstream` lacks {needle:?}:\n{text}"
        );
    }
    assert!(!text.contains(&d4[..12]), "{text}");
    // Upstream is the default.
    assert_eq!(grove.cli_json(&["lineage", "models"]), up);

    // Downstream from datasets@v3: its child v4, the model trained on it, and what the other
    // job derived from v4.
    let down = grove.cli_json(&["lineage", "datasets@v3", "--downstream"]);
    assert_eq!(
        down,
        lineage_api(&grove, "datasets", &d3, "direction=downstream")
    );
    assert_eq!(down["commit"], d3.as_str());
    assert_eq!(down["direction"], "downstream");
    let ids = graph_ids(&down);
    assert_eq!(ids[0], d3, "{down}");
    assert_eq!(
        ids.iter().cloned().collect::<BTreeSet<_>>(),
        id_set(&[&d3, &d4, &m1, &s1]),
        "{down}"
    );
    assert_eq!(ids.len(), 4, "{down}");
    assert_eq!(
        graph_edges(&down),
        sorted(vec![
            edge(&d4, &d3, "parent"),
            edge(&m1, &d3, "source"),
            edge(&s1, &d4, "source"),
        ]),
        "{down}"
    );
    assert_eq!(find_edge(&down, &m1, &d3)["source"]["job"], "train-42");
    let text = grove.cli_ok(&["lineage", "datasets@v3", "--downstream"]);
    assert!(text.contains(&m1[..12]), "{text}");
    // By commit id (prefix) too.
    assert_eq!(
        grove.cli_json(&[
            "lineage",
            &format!("datasets@{}", &d3[..10]),
            "--downstream"
        ]),
        down
    );
    // The labels commit leads to the model only.
    let down = lineage_api(&grove, "labels", &l1, "direction=downstream");
    assert_eq!(graph_ids(&down), [l1.clone(), m1.clone()], "{down}");
    // The scratch commit is not derived from v3.
    let up = lineage_api(&grove, "scratch", &s1, "direction=upstream");
    assert_eq!(
        graph_ids(&up).into_iter().collect::<BTreeSet<_>>(),
        id_set(&[&s1, &s0, &d4, &d3]),
        "{up}"
    );
}

/// Sources named in the commit request: other volumes' tags and branches, same-volume tags,
/// commit ids; unknown refs are 404 and bad refs 400, committing nothing; walks across two
/// hops with a depth.
#[test]
fn named_sources_and_walks_across_volumes() {
    require_nbd_tools();
    let grove = Grove::start();
    for volume in ["crawl", "corpus", "weights", "models"] {
        grove.create_volume(volume, "4MiB");
    }
    write_pattern(&grove.unix_uri("crawl"), 0x01, 0, 64 * KIB);
    let c = grove.commit("crawl", "raw crawl");
    grove.cli_ok(&["tag", "create", "crawl", "v1", &c]);

    // CLI --source with a full ref to another volume's tag.
    write_pattern(&grove.unix_uri("corpus"), 0x02, 0, 64 * KIB);
    let out = grove.cli(&["commit", "corpus", "-m", "cleaned", "--source", "crawl@v1"]);
    out.assert_success();
    let b = out.stdout.trim().to_string();
    let corpus = get_commit(&grove, "corpus", &b);
    assert_eq!(
        corpus["lineage"]["sources"],
        json!([{"commit": c, "volume": "crawl", "kind": "named", "job": null, "bytes_read": 0}]),
        "{corpus}"
    );
    assert_eq!(corpus["lineage"]["sessions"][0]["bytes_written"], 64 * KIB);

    // API with a full commit id of another volume.
    write_pattern(&grove.unix_uri("weights"), 0x03, 0, 64 * KIB);
    let a = api_commit(
        &grove,
        "weights",
        "main",
        json!({"message": "trained", "sources": [format!("corpus@{b}")]}),
    );
    assert_eq!(
        a["lineage"]["sources"],
        json!([{"commit": b, "volume": "corpus", "kind": "named", "job": null, "bytes_read": 0}]),
        "{a}"
    );
    let a = a["id"].as_str().expect("id").to_string();

    // Same-volume tag, another volume's branch (its latest commit), together.
    let m0 = grove.commit("models", "base");
    grove.cli_ok(&["tag", "create", "models", "base-tag", &m0]);
    write_pattern(&grove.unix_uri("models"), 0x04, 0, 16 * KIB);
    let m1 = api_commit(
        &grove,
        "models",
        "main",
        json!({"message": "m1", "sources": ["base-tag", "crawl@main"]}),
    );
    let mut sources = m1["lineage"]["sources"]
        .as_array()
        .expect("sources")
        .clone();
    sources.sort_by_key(|s| s["volume"].as_str().unwrap_or_default().to_string());
    assert_eq!(
        sources,
        [
            json!({"commit": c, "volume": "crawl", "kind": "named", "job": null, "bytes_read": 0}),
            json!({"commit": m0, "volume": "models", "kind": "named", "job": null, "bytes_read": 0}),
        ],
        "{m1}"
    );
    let m1 = m1["id"].as_str().expect("id").to_string();
    // The CLI resolves a bare name in the committed volume.
    write_pattern(&grove.unix_uri("models"), 0x05, 0, 4 * KIB);
    let m2 = grove
        .cli_ok(&["commit", "models", "-m", "m2", "--source", "base-tag"])
        .trim()
        .to_string();
    assert_eq!(
        get_commit(&grove, "models", &m2)["lineage"]["sources"],
        json!([{"commit": m0, "volume": "models", "kind": "named", "job": null, "bytes_read": 0}])
    );

    // Unknown sources: 404; bad ones: 400; nothing committed, the writes stay pending.
    write_pattern(&grove.unix_uri("models"), 0x06, 8 * KIB, 8 * KIB);
    let commits_before = log_len(&grove, "models");
    for (sources, statuses) in [
        (json!(["crawl@nope"]), &[404][..]),
        (json!(["nope@v1"]), &[404]),
        (json!(["no-such-tag"]), &[404]),
        (json!(["crawl@v1", "corpus@ffffffffffffffff"]), &[404]),
        (json!(["crawl@"]), &[400]),
        (json!(["bad name"]), &[400]),
        (json!(["Bad_Vol@v1"]), &[400]),
        (json!([""]), &[400]),
    ] {
        let body = json!({"message": "refused", "sources": sources});
        grove
            .http(
                "POST",
                "/v1/volumes/models/branches/main/commits",
                Some(&body.to_string()),
            )
            .assert_error(statuses, &format!("commit with sources {sources}"));
    }
    let out = grove.cli_err(&[
        "commit",
        "models",
        "-m",
        "refused",
        "--source",
        "crawl@nope",
    ]);
    assert!(out.stderr.contains("nope"), "{}", out.report());
    grove.cli_err(&["commit", "models", "-m", "refused", "--source", "bad name"]);
    assert_eq!(log_len(&grove, "models"), commits_before);
    assert_eq!(head_commit(&grove, "models"), m2);
    grove.wait_no_sessions();
    let m3 = grove.commit("models", "after refusals");
    let pending = get_commit(&grove, "models", &m3);
    assert_eq!(pending["parents"], json!([m2]));
    assert_eq!(pending["lineage"]["sources"], json!([]));
    assert_eq!(
        pending["lineage"]["sessions"][0]["bytes_written"],
        8 * KIB,
        "the writes made before the refused commits are recorded once: {pending}"
    );
    assert_eq!(
        pending["lineage"]["sessions"].as_array().map(Vec::len),
        Some(1)
    );
    assert_pattern(
        &grove.unix_uri(&format!("models@{m3}")),
        0x06,
        8 * KIB,
        8 * KIB,
    );

    // Two hops upstream: weights <- corpus <- crawl.
    let one = lineage_api(&grove, "weights", &a, "direction=upstream&depth=1");
    assert_eq!(graph_ids(&one), [a.clone(), b.clone()], "{one}");
    assert_eq!(graph_edges(&one), [edge(&a, &b, "source")], "{one}");
    assert_eq!(one["truncated"], true, "{one}");
    assert_eq!(find_edge(&one, &a, &b)["source"]["kind"], "named");
    assert_eq!(one["commits"][1]["volume"], "corpus");
    let five = lineage_api(&grove, "weights", &a, "direction=upstream&depth=5");
    assert_eq!(
        graph_ids(&five),
        [a.clone(), b.clone(), c.clone()],
        "{five}"
    );
    assert_eq!(
        graph_edges(&five),
        sorted(vec![edge(&a, &b, "source"), edge(&b, &c, "source")]),
        "{five}"
    );
    assert_eq!(five["truncated"], false, "{five}");
    assert_eq!(five["commits"][2]["volume"], "crawl");
    let two = lineage_api(&grove, "weights", &a, "direction=upstream&depth=2");
    assert_eq!(graph_ids(&two), graph_ids(&five), "{two}");
    assert_eq!(two["truncated"], false, "nothing lies beyond crawl: {two}");
    assert_eq!(
        grove.cli_json(&["lineage", "weights", "--upstream", "--depth", "1"]),
        one
    );
    let text = grove.cli_ok(&["lineage", "weights", "--depth", "1"]);
    assert!(
        text.contains(&b[..12]) && !text.contains(&c[..12]),
        "depth 1 stops at corpus:\n{text}"
    );
    assert!(text.contains("more beyond"), "{text}");

    // And back down from the crawl.
    let one = lineage_api(&grove, "crawl", &c, "direction=downstream&depth=1");
    let ids = graph_ids(&one);
    assert_eq!(ids[0], c, "{one}");
    assert_eq!(
        ids.iter().cloned().collect::<BTreeSet<_>>(),
        id_set(&[&c, &b, &m1]),
        "{one}"
    );
    assert_eq!(one["truncated"], true, "{one}");
    let all = grove.cli_json(&["lineage", "crawl@v1", "--downstream", "--depth", "5"]);
    let ids = graph_ids(&all);
    assert_eq!(
        ids.iter().cloned().collect::<BTreeSet<_>>(),
        id_set(&[&c, &b, &a, &m1, &m2, &m3]),
        "{all}"
    );
    assert_eq!(ids.len(), 6, "{all}");
    assert!(
        ids.iter().position(|id| *id == b) < ids.iter().position(|id| *id == a),
        "nearest first: {all}"
    );
    assert_eq!(
        graph_edges(&all),
        sorted(vec![
            edge(&b, &c, "source"),
            edge(&a, &b, "source"),
            edge(&m1, &c, "source"),
            edge(&m2, &m1, "parent"),
            edge(&m3, &m2, "parent"),
        ]),
        "{all}"
    );
    assert_eq!(all["truncated"], false);
    // The same-volume source is an edge upstream of m2, next to its parent.
    let up = lineage_api(&grove, "models", &m2, "direction=upstream&depth=1");
    assert_eq!(
        graph_edges(&up),
        sorted(vec![edge(&m2, &m1, "parent"), edge(&m2, &m0, "source")]),
        "{up}"
    );
}

/// Who wrote a commit: every session that wrote the branch since the previous commit, with
/// its bytes; sessions that only read are left out; across a `kill -9` restart the head still
/// knows its writers, and session ids keep growing.
#[test]
fn commits_record_the_sessions_that_wrote_them() {
    require_nbd_tools();
    let mut grove = Grove::start();
    grove.create_volume("lv", "16MiB");
    let base = grove.commit("lv", "base");

    // A raw client on `lv@main` and qemu-io over the Unix socket on `lv` both write.
    let (mut raw, _) = nbd::open(grove.nbd_port, "lv@main");
    let raw_session = session_by_export(&grove, "lv@main");
    assert_eq!(raw_session["job"], Value::Null, "{raw_session}");
    assert_eq!(raw_session["target"]["kind"], "branch", "{raw_session}");
    let raw_id = raw_session["id"].as_u64().expect("session id");
    let raw_address = raw_session["client"]["address"]
        .as_str()
        .expect("address")
        .to_string();
    for index in 0..3u64 {
        let block = vec![0xa0 + index as u8; 4096];
        assert_eq!(raw.write(index * 4096, &block, 0).expect("write"), 0);
    }
    write_pattern(&grove.unix_uri("lv"), 0xb0, MIB, 64 * KIB);
    // Sessions that only read: read-only qemu-io on the branch, read-write qemu-io that only
    // reads, nbdcopy out of it, and the raw client reading.
    qio_read(&grove.tcp_uri("lv"), &["read -P 0xb0 1M 64K"]);
    let out = qemu_io(&grove.tcp_uri("lv"), &["read 0 1M".to_string()], false);
    out.assert_success();
    run(
        Command::new("nbdcopy")
            .arg(grove.tcp_uri("lv"))
            .arg("null:"),
        TOOL_TIMEOUT,
    )
    .assert_success();
    assert!(raw.read(0, 8192).expect("read").is_ok());
    let c1 = grove.commit("lv", "two writers");
    let lineage = get_commit(&grove, "lv", &c1)["lineage"].clone();
    let writers = lineage["sessions"].as_array().expect("sessions").clone();
    assert_eq!(writers.len(), 2, "exactly the two writers: {lineage}");
    let raw_writer = writers
        .iter()
        .find(|w| w["session"] == raw_id)
        .unwrap_or_else(|| panic!("the raw client's session {raw_id} is missing: {lineage}"));
    assert_eq!(raw_writer["bytes_written"], 3 * 4096, "{lineage}");
    assert_eq!(raw_writer["client"], raw_address.as_str(), "{lineage}");
    assert_eq!(raw_writer["protocol"], "nbd");
    assert_eq!(raw_writer["job"], Value::Null);
    assert_eq!(raw_writer["opened_unix"], raw_session["opened_unix"]);
    let qemu_writer = writers
        .iter()
        .find(|w| w["session"] != raw_id)
        .expect("the other writer");
    assert_eq!(qemu_writer["bytes_written"], 64 * KIB, "{lineage}");
    assert!(
        qemu_writer["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("unix")),
        "a Unix socket client: {lineage}"
    );
    assert_eq!(lineage["sources"], json!([]));
    let mut max_id = writers
        .iter()
        .map(|w| w["session"].as_u64().expect("session"))
        .max()
        .expect("writers");

    // The next commit lists only who wrote since: the raw client stays connected but idle.
    write_pattern(&grove.tcp_uri("lv"), 0xc0, 2 * MIB, 8 * KIB);
    let c2 = grove.commit("lv", "one writer");
    let lineage = get_commit(&grove, "lv", &c2)["lineage"].clone();
    assert_eq!(
        lineage["sessions"].as_array().map(Vec::len),
        Some(1),
        "{lineage}"
    );
    let writer = &lineage["sessions"][0];
    assert_ne!(writer["session"], raw_id, "{lineage}");
    assert_eq!(writer["bytes_written"], 8 * KIB, "{lineage}");
    assert!(writer["client"]
        .as_str()
        .is_some_and(|c| c.starts_with("127.0.0.1:")));
    max_id = max_id.max(writer["session"].as_u64().expect("session"));
    // The raw client writes again: counted afresh.
    assert_eq!(raw.write(3 * MIB, &[0xd0; 4096], 0).expect("write"), 0);
    let c3 = grove.commit("lv", "raw again");
    let lineage = get_commit(&grove, "lv", &c3)["lineage"].clone();
    assert_eq!(
        lineage["sessions"].as_array().map(Vec::len),
        Some(1),
        "{lineage}"
    );
    assert_eq!(lineage["sessions"][0]["session"], raw_id);
    assert_eq!(lineage["sessions"][0]["bytes_written"], 4096);
    // A commit with no writes records no session.
    let c4 = grove.commit("lv", "nothing new");
    assert_eq!(
        get_commit(&grove, "lv", &c4)["lineage"],
        json!({"sessions": [], "sources": []})
    );
    assert_eq!(
        get_commit(&grove, "lv", &base)["lineage"],
        json!({"sessions": [], "sources": []})
    );

    // Writes flushed before a kill -9, committed after the restart, keep their writers.
    assert_eq!(raw.write(4 * MIB, &[0xe0; 8192], 0).expect("write"), 0);
    assert_eq!(raw.flush().expect("flush"), 0);
    write_pattern(&grove.unix_uri("lv@main"), 0xe1, 5 * MIB, 16 * KIB);
    // The last sessions before the crash only read: their ids must not come back either.
    qio_read(&grove.tcp_uri("lv"), &["read -P 0xe1 5M 16K"]);
    qio_read(&grove.tcp_uri(&format!("lv@{c4}")), &["read 0 4K"]);
    let opened = grove.http("GET", "/v1/events?type=session.opened", None);
    assert_eq!(opened.status, 200, "{opened:?}");
    for event in opened.json()["events"].as_array().expect("events") {
        max_id = max_id.max(event["session"].as_u64().expect("session id in event"));
    }
    grove.restart_after_kill9();
    drop(raw);
    let c5 = grove.commit("lv", "after the crash");
    let lineage = get_commit(&grove, "lv", &c5)["lineage"].clone();
    let writers = lineage["sessions"].as_array().expect("sessions").clone();
    assert_eq!(writers.len(), 2, "{lineage}");
    let raw_writer = writers
        .iter()
        .find(|w| w["session"] == raw_id)
        .unwrap_or_else(|| panic!("the raw client's session is gone after restart: {lineage}"));
    assert_eq!(raw_writer["bytes_written"], 8192, "{lineage}");
    assert_eq!(raw_writer["client"], raw_address.as_str());
    let qemu_writer = writers
        .iter()
        .find(|w| w["session"] != raw_id)
        .expect("the other writer");
    assert_eq!(qemu_writer["bytes_written"], 16 * KIB, "{lineage}");
    assert!(
        qemu_writer["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("unix")),
        "{lineage}"
    );
    for writer in &writers {
        max_id = max_id.max(writer["session"].as_u64().expect("session"));
    }
    assert_pattern(&grove.unix_uri(&format!("lv@{c5}")), 0xe0, 4 * MIB, 8 * KIB);
    assert_pattern(
        &grove.unix_uri(&format!("lv@{c5}")),
        0xe1,
        5 * MIB,
        16 * KIB,
    );

    // Session ids after the restart are larger than any before it.
    let (raw2, _) = nbd::open(grove.nbd_port, "lv@main");
    let session = session_by_export(&grove, "lv@main");
    let new_id = session["id"].as_u64().expect("id");
    assert!(
        new_id > max_id,
        "session id {new_id} after the restart is not above {max_id} from before it"
    );
    raw2.disconnect();
    write_pattern(&grove.tcp_uri("lv"), 0xf0, 6 * MIB, 4 * KIB);
    let c6 = grove.commit("lv", "new writer");
    let lineage = get_commit(&grove, "lv", &c6)["lineage"].clone();
    assert_eq!(
        lineage["sessions"].as_array().map(Vec::len),
        Some(1),
        "{lineage}"
    );
    assert!(lineage["sessions"][0]["session"].as_u64() > Some(new_id));
}

/// Bad job ids and options in export names are refused at negotiation; bad lineage queries
/// are 400 (or 404 for what does not exist), in the API and the CLI.
#[test]
fn bad_jobs_and_lineage_queries_are_refused() {
    require_nbd_tools();
    let grove = Grove::start();
    grove.create_volume("bv", "4MiB");
    let c1 = grove.commit("bv", "base");

    // Good job ids, up to 128 characters of the allowed set.
    let longest = "a".repeat(128);
    for job in ["x", "train-42", "A.b_c-9", longest.as_str()] {
        let out = nbdinfo_size(&grove.tcp_uri(&format!("bv%3Fjob={job}")));
        out.assert_success();
        assert_eq!(out.stdout.trim(), (4 * MIB).to_string());
    }
    let too_long = "a".repeat(129);
    for suffix in [
        "%3Fjob=".to_string(),
        format!("%3Fjob={too_long}"),
        "%3Fjob=a%20b".to_string(),
        "%3Fjob=a/b".to_string(),
        "%3Fjob=a:b".to_string(),
        "%3Ffoo=1".to_string(),
        "%3Fjob=x%26foo=1".to_string(),
        "%3Fjob".to_string(),
        "%3F".to_string(),
    ] {
        for export in [format!("bv{suffix}"), format!("bv@{c1}{suffix}")] {
            nbdinfo_size(&grove.tcp_uri(&export)).assert_failure();
        }
    }
    // The raw client sees an error reply, not a dropped connection, and may try again.
    let mut conn = nbd::Conn::connect(grove.nbd_port);
    conn.start_options();
    let reply = conn.go("bv?job=a b").expect_err("a bad job id is refused");
    assert!(reply.is_error());
    let message = String::from_utf8_lossy(&reply.data).into_owned();
    assert!(message.contains("job"), "the refusal says why: {message:?}");
    let reply = conn.go("bv?foo=1").expect_err("another option is refused");
    assert!(reply.is_error());
    let message = String::from_utf8_lossy(&reply.data).into_owned();
    assert!(message.contains("job"), "the refusal says why: {message:?}");
    let info = conn.go("bv?job=ok").expect("a good job id after refusals");
    assert_eq!(info.size_bytes, 4 * MIB);
    conn.disconnect();
    grove.wait_no_sessions();

    // Lineage queries.
    let path = |query: &str| format!("/v1/volumes/bv/commits/{c1}/lineage{query}");
    for query in [
        "?direction=sideways",
        "?direction=",
        "?depth=0",
        "?depth=1001",
        "?depth=-1",
        "?depth=abc",
        "?direction=upstream&depth=0",
        "?direction=downstream&depth=1001",
    ] {
        grove
            .http("GET", &path(query), None)
            .assert_error(&[400], &format!("lineage{query}"));
    }
    for (method, path) in [
        (
            "GET",
            "/v1/volumes/bv/commits/ffffffffffffffffffffffffffffffff/lineage".to_string(),
        ),
        ("GET", format!("/v1/volumes/nope/commits/{c1}/lineage")),
    ] {
        grove.http(method, &path, None).assert_error(&[404], &path);
    }
    for query in ["?depth=1000", "?depth=1", "?direction=downstream", ""] {
        let reply = grove.http("GET", &path(query), None);
        assert_eq!(reply.status, 200, "lineage{query}: {reply:?}");
        assert_eq!(graph_ids(&reply.json()), std::slice::from_ref(&c1));
    }
    grove.cli_err(&["lineage", "bv", "--depth", "0"]);
    grove.cli_err(&["lineage", "bv", "--depth", "1001"]);
    grove.cli_err(&["lineage", "bv", "--upstream", "--downstream"]);
    grove.cli_err(&["lineage", "bv@nope"]);
    grove.cli_err(&["lineage", "nope"]);
    grove.cli_err(&["lineage", "Bad Name"]);
    grove.create_volume("empty", "4MiB");
    grove.cli_err(&["lineage", "empty"]);
    let document = grove.http("GET", "/v1/openapi.json", None).json();
    assert!(
        document["paths"]["/v1/volumes/{vol}/commits/{id}/lineage"]["get"].is_object(),
        "openapi.json lacks the lineage route"
    );
}

/// Squashing a commit folds its lineage into its child (writers and sources), and a walk never
/// returns an edge to a commit that no longer exists.
#[test]
fn squashes_keep_lineage_and_walks_skip_deleted_sources() {
    require_nbd_tools();
    let grove = Grove::start();
    grove.create_volume("md", "4MiB");
    grove.create_volume("sq", "4MiB");
    write_pattern(&grove.unix_uri("md"), 0x0d, 0, 64 * 1024);
    let source = grove.commit("md", "source data");
    write_pattern(&grove.unix_uri("sq"), 0x01, 0, 64 * 1024);
    let s1 = grove.commit("sq", "s1");
    write_pattern(&grove.unix_uri("sq"), 0x02, 0, 64 * 1024);
    grove.wait_no_sessions();
    let s2 = api_commit(
        &grove,
        "sq",
        "main",
        json!({"message": "s2", "sources": ["md"]}),
    )["id"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_default();
    let s2_writers = get_commit(&grove, "sq", &s2)["lineage"]["sessions"].clone();
    write_pattern(&grove.unix_uri("sq"), 0x03, MIB, 64 * 1024);
    let s3 = grove.commit("sq", "s3");
    grove.wait_no_sessions();
    grove.cli_ok(&["commit", "delete", "sq", &s2]);

    let child = get_commit(&grove, "sq", &s3);
    assert_eq!(child["parents"], json!([s1]), "{child}");
    let writers = child["lineage"]["sessions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(writers.len(), 2, "s2's writer and s3's: {child}");
    assert_eq!(
        writers[0], s2_writers[0],
        "s2's writer comes first: {child}"
    );
    let sources = &child["lineage"]["sources"];
    assert_eq!(sources.as_array().map(Vec::len), Some(1), "{child}");
    assert_eq!(sources[0]["commit"], source.as_str(), "{child}");
    let upstream = lineage_api(&grove, "sq", &s3, "direction=upstream");
    assert!(graph_ids(&upstream).contains(&source), "{upstream}");

    // The source's volume goes: its commit is left out of walks, edges included.
    grove.cli_ok(&["volume", "delete", "md"]);
    let upstream = lineage_api(&grove, "sq", &s3, "direction=upstream");
    let ids = graph_ids(&upstream);
    assert!(!ids.contains(&source), "{upstream}");
    for (commit, from, _) in graph_edges(&upstream) {
        assert!(
            ids.contains(&commit) && ids.contains(&from),
            "an edge to a commit not in the graph: {upstream}"
        );
    }
}
