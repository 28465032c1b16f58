//! End-to-end: the durable event log of the real binary. Every change made through the CLI,
//! the API and NBD clients (qemu-io) is logged with contiguous sequence numbers, its actor
//! (`X-Grove-Actor`, `api@IP`, `nbd:ADDRESS`) and its type's fields; `GET /v1/events` filters
//! and pages through it; `GET /v1/events/stream` (read here with a raw HTTP/1.1 client, so
//! that the test decides when the connection drops) resumes after `Last-Event-ID` with no gap
//! and no duplicate; the log survives `kill -9` unchanged and goes on without reusing a
//! number; `grove events` prints the same events, and `--follow` prints new ones.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use support::{
    grove_bin, http_with_headers, qio_write, require_nbd_tools, run, CmdOut, Grove, HttpReply, KIB,
    MIB, TOOL_TIMEOUT,
};

/// How long an event may take to show up (session events are logged in the background).
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the stream may take to deliver an event that is already in the log.
const STREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stream must stay silent to show that it sends nothing more.
const QUIET: Duration = Duration::from_millis(700);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

// ---------------------------------------------------------------------------------------------
// HTTP and CLI helpers

/// An API request with an optional `X-Grove-Actor` header.
fn request(
    grove: &Grove,
    method: &str,
    path: &str,
    body: Option<&Value>,
    actor: Option<&str>,
) -> HttpReply {
    let url = format!("{}{path}", grove.api());
    let body = body.map(Value::to_string);
    let headers: Vec<(&str, &str)> = actor.map(|a| ("X-Grove-Actor", a)).into_iter().collect();
    http_with_headers(method, &url, body.as_deref(), &headers)
}

fn request_ok(
    grove: &Grove,
    method: &str,
    path: &str,
    body: Option<&Value>,
    actor: Option<&str>,
) -> Value {
    let reply = request(grove, method, path, body, actor);
    assert!(
        (200..300).contains(&reply.status),
        "{method} {path} with {body:?} failed: {reply:?}"
    );
    if reply.body.trim().is_empty() {
        Value::Null
    } else {
        reply.json()
    }
}

/// Runs `grove --api URL ARGS...` with `GROVE_ACTOR` and `USER` set (`Some`) or removed.
fn cli_as(grove: &Grove, actor: Option<&str>, user: Option<&str>, args: &[&str]) -> CmdOut {
    let mut command = Command::new(grove_bin());
    command
        .arg("--api")
        .arg(grove.api())
        .args(args)
        .env_remove("GROVE_API")
        .current_dir(grove.root());
    match actor {
        Some(actor) => command.env("GROVE_ACTOR", actor),
        None => command.env_remove("GROVE_ACTOR"),
    };
    match user {
        Some(user) => command.env("USER", user),
        None => command.env_remove("USER"),
    };
    run(&mut command, TOOL_TIMEOUT)
}

fn cli_ok_as(grove: &Grove, actor: &str, args: &[&str]) -> String {
    let out = cli_as(grove, Some(actor), None, args);
    out.assert_success();
    out.stdout
}

/// `grove commit REF -m MSG` as `actor`: the new commit id.
fn commit_as(grove: &Grove, actor: &str, reference: &str, message: &str) -> String {
    let id = cli_ok_as(grove, actor, &["commit", reference, "-m", message])
        .trim()
        .to_string();
    assert_eq!(
        id.len(),
        32,
        "`grove commit` prints a full commit id: {id:?}"
    );
    id
}

// ---------------------------------------------------------------------------------------------
// The event log over GET /v1/events

fn events_page(grove: &Grove, query: &str) -> Value {
    let reply = grove.http("GET", &format!("/v1/events{query}"), None);
    assert_eq!(reply.status, 200, "GET /v1/events{query}: {reply:?}");
    assert!(
        reply.content_type.starts_with("application/json"),
        "GET /v1/events{query} answers JSON: {reply:?}"
    );
    let page = reply.json();
    for key in ["next_since", "first_seq", "last_seq"] {
        assert!(
            page[key].is_u64(),
            "GET /v1/events{query}: `{key}` must be a number: {page}"
        );
    }
    assert!(
        page["events"].is_array(),
        "GET /v1/events{query}: `events` must be an array: {page}"
    );
    page
}

fn page_events(page: &Value) -> Vec<Value> {
    page["events"].as_array().expect("events array").clone()
}

fn seq(event: &Value) -> u64 {
    event["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("event without a numeric seq: {event}"))
}

fn kind(event: &Value) -> &str {
    event["type"]
        .as_str()
        .unwrap_or_else(|| panic!("event without a type: {event}"))
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().map(seq).collect()
}

/// Every event, following `next_since` from `since` (with `extra` filters such as
/// `&type=...`), `limit` at a time; each page is checked to continue the previous one.
fn pages(grove: &Grove, extra: &str, limit: usize) -> Vec<Value> {
    let mut since = 0u64;
    let mut all: Vec<Value> = Vec::new();
    for _ in 0..10_000 {
        let page = events_page(grove, &format!("?since={since}&limit={limit}{extra}"));
        let events = page_events(&page);
        assert!(
            events.len() <= limit,
            "a page holds at most limit={limit} events: {page}"
        );
        for event in &events {
            assert!(
                seq(event) > since,
                "since={since} must only return events after it: {page}"
            );
        }
        if events.is_empty() {
            return all;
        }
        let next = page["next_since"].as_u64().expect("next_since");
        assert!(
            next >= seq(events.last().expect("last")),
            "next_since must be at least the last event returned: {page}"
        );
        assert!(next > since, "next_since must move forward: {page}");
        all.extend(events);
        since = next;
    }
    panic!("paging through the event log never ended (since={since})");
}

fn all_events(grove: &Grove) -> Vec<Value> {
    pages(grove, "", 10_000)
}

/// Asserts `events` are numbered exactly `1..=events.len()`.
fn assert_contiguous_from_one(events: &[Value], context: &str) {
    let got = seqs(events);
    let expected: Vec<u64> = (1..=events.len() as u64).collect();
    assert_eq!(
        got,
        expected,
        "{context}: seqs must be 1, 2, 3... with no gap\n{}",
        pretty(events)
    );
}

fn pretty(events: &[Value]) -> String {
    events
        .iter()
        .map(|event| event.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn count_type(events: &[Value], type_name: &str) -> usize {
    events.iter().filter(|e| kind(e) == type_name).count()
}

/// Polls the log until `done` holds for it; returns the log.
fn wait_for_log(grove: &Grove, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let events = all_events(grove);
        if done(&events) {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not in the event log after {EVENT_TIMEOUT:?}\n{}",
            pretty(&events)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Writes with qemu-io over TCP (one NBD session) and waits until the server has logged that
/// session's close.
fn write_and_wait(grove: &Grove, export: &str, commands: &[&str]) {
    let closed_before = count_type(&all_events(grove), "session.closed");
    qio_write(&grove.tcp_uri(export), commands);
    wait_for_log(
        grove,
        &format!("session.closed for the qemu-io session on {export}"),
        |events| count_type(events, "session.closed") > closed_before,
    );
}

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

/// Checks a `commit.created` event against what the test did.
#[allow(clippy::too_many_arguments)]
fn assert_commit_event(
    event: &Value,
    volume: &str,
    branch: &str,
    commit: &str,
    parents: &[&str],
    extents: &[(u64, u64)],
    actor: &str,
) {
    let context = format!("commit.created of {commit}: {event}");
    assert_eq!(kind(event), "commit.created", "{context}");
    assert_eq!(event["volume"], volume, "{context}");
    assert_eq!(event["branch"], branch, "{context}");
    assert_eq!(event["commit"], commit, "{context}");
    assert_eq!(event["parents"], json!(parents), "{context}");
    assert_eq!(ranges(&event["changed_extents"]), extents, "{context}");
    let blocks: u64 = extents.iter().map(|(_, len)| len / (4 * KIB)).sum();
    assert_eq!(event["changed_blocks"], blocks, "{context}");
    assert_eq!(event["changed_extents_complete"], true, "{context}");
    assert_eq!(event["actor"], actor, "{context}");
}

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1.1 server-sent-events client

#[derive(Debug, Clone)]
struct SseMessage {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

impl SseMessage {
    /// The event's JSON, after checking that `id:` is its seq and `event:` its type.
    fn checked_json(&self) -> Value {
        let value: Value = serde_json::from_str(&self.data)
            .unwrap_or_else(|error| panic!("SSE data is not JSON ({error}): {self:?}"));
        let id = self
            .id
            .as_deref()
            .unwrap_or_else(|| panic!("SSE event without `id:`: {self:?}"));
        assert_eq!(
            id,
            seq(&value).to_string(),
            "`id:` must be the event's seq: {self:?}"
        );
        assert_eq!(
            self.event.as_deref(),
            Some(kind(&value)),
            "`event:` must be the event's type: {self:?}"
        );
        value
    }
}

struct SseClient {
    stream: TcpStream,
    /// Bytes read from the socket and not decoded yet (chunked framing).
    raw: Vec<u8>,
    /// Decoded body bytes not parsed into lines yet.
    body: Vec<u8>,
    chunked: bool,
    ended: bool,
    /// Fields of the event being parsed.
    pending: SseMessage,
    pending_has_data: bool,
}

impl SseClient {
    /// Connects and sends `GET PATH_AND_QUERY` (with `Last-Event-ID` if given); returns once
    /// the response headers are in, which the server sends after it subscribed.
    fn open(grove: &Grove, path_and_query: &str, last_event_id: Option<u64>) -> SseClient {
        let stream =
            TcpStream::connect(("127.0.0.1", grove.api_port)).expect("connect to the API port");
        stream.set_nodelay(true).expect("set_nodelay");
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .expect("set_write_timeout");
        let mut head = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n",
            grove.api_port
        );
        if let Some(id) = last_event_id {
            head.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        head.push_str("\r\n");
        let mut client = SseClient {
            stream,
            raw: Vec::new(),
            body: Vec::new(),
            chunked: false,
            ended: false,
            pending: SseMessage {
                id: None,
                event: None,
                data: String::new(),
            },
            pending_has_data: false,
        };
        (&client.stream)
            .write_all(head.as_bytes())
            .expect("send the stream request");
        let deadline = Instant::now() + STREAM_TIMEOUT;
        let header_end = loop {
            if let Some(end) = find(&client.raw, b"\r\n\r\n") {
                break end;
            }
            assert!(
                client.read_some(deadline),
                "GET {path_and_query}: no complete response head within {STREAM_TIMEOUT:?}: {:?}",
                String::from_utf8_lossy(&client.raw)
            );
        };
        let head = String::from_utf8_lossy(&client.raw[..header_end]).into_owned();
        client.raw.drain(..header_end + 4);
        let status_line = head.lines().next().unwrap_or_default();
        assert!(
            status_line.starts_with("HTTP/1.1 200"),
            "GET {path_and_query} must answer 200: {head}"
        );
        let header = |name: &str| {
            head.lines().skip(1).find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| value.trim().to_ascii_lowercase())
            })
        };
        assert!(
            header("content-type").is_some_and(|v| v.starts_with("text/event-stream")),
            "GET {path_and_query} must be a text/event-stream: {head}"
        );
        client.chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        client
    }

    /// Reads what the socket has within a short while; false on timeout past `deadline` or
    /// end of stream.
    fn read_some(&mut self, deadline: Instant) -> bool {
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return false;
            }
            self.stream
                .set_read_timeout(Some(remaining.min(Duration::from_millis(200))))
                .expect("set_read_timeout");
            let mut buffer = [0u8; 16 * 1024];
            match self.stream.read(&mut buffer) {
                Ok(0) => {
                    self.ended = true;
                    return false;
                }
                Ok(count) => {
                    self.raw.extend_from_slice(&buffer[..count]);
                    return true;
                }
                Err(error)
                    if error.kind() == ErrorKind::WouldBlock
                        || error.kind() == ErrorKind::TimedOut =>
                {
                    continue
                }
                Err(error) if error.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.ended = true;
                    return false;
                }
            }
        }
    }

    /// Moves complete chunks (or everything, unchunked) from `raw` to `body`.
    fn decode(&mut self) {
        if !self.chunked {
            self.body.append(&mut self.raw);
            return;
        }
        loop {
            let Some(line_end) = find(&self.raw, b"\r\n") else {
                return;
            };
            let size_text = String::from_utf8_lossy(&self.raw[..line_end]).into_owned();
            let size_text = size_text.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_text, 16)
                .unwrap_or_else(|_| panic!("bad chunk size line {size_text:?}"));
            if size == 0 {
                self.ended = true;
                self.raw.clear();
                return;
            }
            let start = line_end + 2;
            if self.raw.len() < start + size + 2 {
                return;
            }
            self.body.extend_from_slice(&self.raw[start..start + size]);
            assert_eq!(
                &self.raw[start + size..start + size + 2],
                b"\r\n",
                "a chunk must end with CRLF"
            );
            self.raw.drain(..start + size + 2);
        }
    }

    /// The next event (comments skipped), or `None` if none arrives before `deadline`.
    fn next(&mut self, deadline: Instant) -> Option<SseMessage> {
        loop {
            self.decode();
            while let Some(line_end) = self.body.iter().position(|&b| b == b'\n') {
                let mut line = String::from_utf8_lossy(&self.body[..line_end]).into_owned();
                self.body.drain(..=line_end);
                if line.ends_with('\r') {
                    line.pop();
                }
                if line.is_empty() {
                    if self.pending_has_data {
                        let message = std::mem::replace(
                            &mut self.pending,
                            SseMessage {
                                id: None,
                                event: None,
                                data: String::new(),
                            },
                        );
                        self.pending_has_data = false;
                        return Some(message);
                    }
                    self.pending.id = None;
                    self.pending.event = None;
                    continue;
                }
                if line.starts_with(':') {
                    continue;
                }
                let (field, value) = match line.split_once(':') {
                    Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                    None => (line.as_str(), ""),
                };
                match field {
                    "id" => self.pending.id = Some(value.to_string()),
                    "event" => self.pending.event = Some(value.to_string()),
                    "data" => {
                        if self.pending_has_data {
                            self.pending.data.push('\n');
                        }
                        self.pending.data.push_str(value);
                        self.pending_has_data = true;
                    }
                    _ => {}
                }
            }
            if self.ended || !self.read_some(deadline) {
                return None;
            }
        }
    }

    /// The next event's JSON, which must arrive within `STREAM_TIMEOUT`.
    fn expect_event(&mut self, context: &str) -> Value {
        match self.next(Instant::now() + STREAM_TIMEOUT) {
            Some(message) => message.checked_json(),
            None => panic!(
                "{context}: no event within {STREAM_TIMEOUT:?} (stream ended: {})",
                self.ended
            ),
        }
    }

    /// Events up to and including seq `last`, in order.
    fn events_through(&mut self, last: u64, context: &str) -> Vec<Value> {
        let mut got = Vec::new();
        while got.last().map(seq).unwrap_or(0) < last {
            let event = self.expect_event(&format!("{context} (waiting for seq {last})"));
            got.push(event);
        }
        got
    }

    /// Asserts nothing more arrives for a while (keep-alive comments aside).
    fn assert_quiet(&mut self, context: &str) {
        if let Some(message) = self.next(Instant::now() + QUIET) {
            panic!("{context}: unexpected extra event {message:?}");
        }
    }

    /// Drops the connection abruptly.
    fn hang_up(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

// ---------------------------------------------------------------------------------------------
// A `grove events --follow` child

/// A child process killed by its PID when dropped, its stdout lines sent over a channel.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Follower {
    fn start(grove: &Grove, args: &[&str]) -> Follower {
        let mut command = Command::new(grove_bin());
        command
            .arg("--api")
            .arg(grove.api())
            .args(args)
            .env_remove("GROVE_API")
            .current_dir(grove.root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start grove events --follow");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        let (sender, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = stderr.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut text) = sink.lock() {
                    text.push_str(&line);
                    text.push('\n');
                }
            }
        });
        Follower {
            child,
            lines,
            stderr,
        }
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The next printed line as JSON, within `timeout`, or `None`.
    fn next_json(&mut self, timeout: Duration) -> Option<Value> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => Some(serde_json::from_str(&line).unwrap_or_else(|error| {
                panic!(
                    "`grove --json events --follow` printed a line that is not JSON ({error}): {line:?}\nstderr: {}",
                    self.stderr_text()
                )
            })),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.child.try_wait().ok().flatten();
                panic!(
                    "`grove events --follow` stopped printing (exit status {status:?})\nstderr: {}",
                    self.stderr_text()
                );
            }
        }
    }

    fn expect_json(&mut self, context: &str) -> Value {
        self.next_json(STREAM_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "{context}: `grove events --follow` printed nothing within {STREAM_TIMEOUT:?}\nstderr: {}",
                self.stderr_text()
            )
        })
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Sequence, content, actors, filters and paging

#[test]
fn events_sequence_content_actors_and_filters() {
    require_nbd_tools();
    let grove = Grove::start();
    let started_ms = now_ms();

    let page = events_page(&grove, "");
    assert!(
        page_events(&page).is_empty(),
        "a new server has an empty log: {page}"
    );

    // 1: volume.created, by the API caller's address (no X-Grove-Actor).
    request_ok(
        &grove,
        "POST",
        "/v1/volumes",
        Some(&json!({"name": "ev", "size": "64MiB"})),
        None,
    );
    // 2, 3: a qemu-io session on ev.
    write_and_wait(&grove, "ev", &["write -P 0xaa 1M 64k"]);
    // 4: commit with `grove commit -m`, as carol.
    let c1 = commit_as(&grove, "carol", "ev", "first");
    // 5: a tag, by a POST with `X-Grove-Actor: alice`.
    request_ok(
        &grove,
        "POST",
        "/v1/volumes/ev/tags",
        Some(&json!({"name": "t1", "ref": "main"})),
        Some("alice"),
    );
    // 6: a branch.
    cli_ok_as(&grove, "carol", &["branch", "create", "ev", "b"]);
    // 7, 8, 9: write and commit on the branch.
    write_and_wait(&grove, "ev@b", &["write -P 0xbb 4M 8k"]);
    let c2 = commit_as(&grove, "carol", "ev@b", "second");
    // 10, 11, 12: write two ranges on main and commit.
    write_and_wait(
        &grove,
        "ev",
        &["write -P 0xcc 8M 4k", "write -P 0xdd 12M 12k"],
    );
    let c3 = commit_as(&grove, "carol", "ev", "third");
    // Refused changes and dry runs log nothing.
    let logged = all_events(&grove);
    assert_eq!(logged.len(), 12, "{}", pretty(&logged));
    let refused = [
        (
            "/v1/volumes",
            json!({"name": "ev", "size": "64MiB"}),
            "an existing volume",
        ),
        (
            "/v1/volumes/ev/tags",
            json!({"name": "t1", "ref": "main"}),
            "an existing tag",
        ),
        (
            "/v1/volumes/ev/tags",
            json!({"name": "t9", "ref": "no-such-ref"}),
            "a tag on a missing ref",
        ),
        (
            "/v1/volumes/ev/branches/no-such-branch/commits",
            json!({"message": "x"}),
            "a commit on a missing branch",
        ),
    ];
    for (path, body, what) in refused {
        let reply = request(&grove, "POST", path, Some(&body), Some("mallory"));
        reply.assert_error(&[404, 409], what);
    }
    cli_ok_as(
        &grove,
        "carol",
        &[
            "merge",
            "ev",
            "--from",
            "ev@b",
            "--into",
            "main",
            "--dry-run",
        ],
    );
    assert_eq!(
        all_events(&grove),
        logged,
        "refused requests and a dry-run merge must not log events"
    );
    // 13, 14: a real merge: the merge commit, then merge.completed.
    let merge: Value = serde_json::from_str(
        cli_ok_as(
            &grove,
            "carol",
            &["--json", "merge", "ev", "--from", "ev@b", "--into", "main"],
        )
        .trim(),
    )
    .expect("merge --json prints JSON");
    let c4 = merge["commit"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("the merge made a commit: {merge}"))
        .to_string();
    // 15: reset main back to t1 (c1).
    cli_ok_as(&grove, "carol", &["reset", "ev@main", "ev@t1"]);
    // 16: delete the branch.
    cli_ok_as(&grove, "carol", &["branch", "delete", "ev", "b"]);
    // 17, 18: another volume, created and deleted.
    cli_ok_as(
        &grove,
        "carol",
        &["volume", "create", "other", "--size", "1MiB"],
    );
    cli_ok_as(&grove, "carol", &["volume", "delete", "other"]);

    let events = all_events(&grove);
    assert_contiguous_from_one(&events, "the whole log");
    let types: Vec<&str> = events.iter().map(kind).collect();
    assert_eq!(
        types,
        vec![
            "volume.created",
            "session.opened",
            "session.closed",
            "commit.created",
            "tag.created",
            "branch.created",
            "session.opened",
            "session.closed",
            "commit.created",
            "session.opened",
            "session.closed",
            "commit.created",
            "commit.created",
            "merge.completed",
            "branch.reset",
            "branch.deleted",
            "volume.created",
            "volume.deleted",
        ],
        "event types in the order the changes happened\n{}",
        pretty(&events)
    );
    let at = |n: u64| &events[(n - 1) as usize];

    // Times: in the test's window and in log order.
    let ended_ms = now_ms();
    let mut previous = 0;
    for event in &events {
        let time = event["time_unix_ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("time_unix_ms must be a number: {event}"));
        assert!(
            time + 1000 >= started_ms && time <= ended_ms + 1000,
            "time_unix_ms {time} is outside the test's run [{started_ms}, {ended_ms}]: {event}"
        );
        assert!(
            time >= previous,
            "events are logged in time order: {event} after {previous}"
        );
        previous = time;
    }

    // Content of each change.
    assert_eq!(at(1)["volume"], "ev", "{}", at(1));
    assert_eq!(at(1)["size_bytes"], 64 * MIB, "{}", at(1));
    assert_eq!(
        at(1)["actor"],
        "api@127.0.0.1",
        "without X-Grove-Actor the actor is api@CLIENT_IP: {}",
        at(1)
    );
    assert_commit_event(at(4), "ev", "main", &c1, &[], &[(MIB, 64 * KIB)], "carol");
    assert_eq!(at(5)["tag"], "t1", "{}", at(5));
    assert_eq!(at(5)["commit"], c1.as_str(), "{}", at(5));
    assert_eq!(
        at(5)["actor"],
        "alice",
        "X-Grove-Actor names the actor: {}",
        at(5)
    );
    assert_eq!(at(6)["branch"], "b", "{}", at(6));
    assert_eq!(at(6)["volume"], "ev", "{}", at(6));
    assert!(
        support::json_has_str(at(6), &c1),
        "branch.created names the commit it starts from: {}",
        at(6)
    );
    assert_eq!(
        at(6)["actor"],
        "carol",
        "the CLI sends $GROVE_ACTOR: {}",
        at(6)
    );
    assert_commit_event(
        at(9),
        "ev",
        "b",
        &c2,
        &[&c1],
        &[(4 * MIB, 8 * KIB)],
        "carol",
    );
    assert_commit_event(
        at(12),
        "ev",
        "main",
        &c3,
        &[&c1],
        &[(8 * MIB, 4 * KIB), (12 * MIB, 12 * KIB)],
        "carol",
    );
    // The merge commit: first parent the branch's head, then the merged commit; what changed
    // since the first parent is what was taken from the other side.
    assert_commit_event(
        at(13),
        "ev",
        "main",
        &c4,
        &[&c3, &c2],
        &[(4 * MIB, 8 * KIB)],
        "carol",
    );
    assert_eq!(at(14)["volume"], "ev", "{}", at(14));
    assert_eq!(at(14)["branch"], "main", "{}", at(14));
    assert_eq!(at(14)["commit"], c4.as_str(), "{}", at(14));
    assert!(
        support::json_has_str(at(14), &c2),
        "merge.completed names the merged commit: {}",
        at(14)
    );
    assert_eq!(at(14)["fast_forward"], false, "{}", at(14));
    assert_eq!(at(14)["actor"], "carol", "{}", at(14));
    assert_eq!(at(15)["branch"], "main", "{}", at(15));
    assert!(
        support::json_has_str(at(15), &c1) && support::json_has_str(at(15), &c4),
        "branch.reset names where the branch was and where it went: {}",
        at(15)
    );
    assert_eq!(at(16)["branch"], "b", "{}", at(16));
    assert_eq!(at(17)["volume"], "other", "{}", at(17));
    assert_eq!(at(18)["volume"], "other", "{}", at(18));
    assert_eq!(at(18)["actor"], "carol", "{}", at(18));

    // Sessions: opened before closed, by the NBD client.
    for (opened, closed, export) in [(2, 3, "ev"), (7, 8, "ev@b"), (10, 11, "ev")] {
        let (opened, closed) = (at(opened), at(closed));
        let actor = opened["actor"].as_str().unwrap_or_default();
        assert!(
            actor.starts_with("nbd:127.0.0.1:"),
            "a session event's actor is nbd:CLIENT_ADDRESS: {opened}"
        );
        assert_eq!(
            closed["actor"], opened["actor"],
            "the same connection opens and closes a session: {opened} / {closed}"
        );
        assert_eq!(closed["session"], opened["session"], "{opened} / {closed}");
        assert_eq!(opened["export"], export, "{opened}");
        assert_eq!(closed["export"], export, "{closed}");
    }

    // first_seq / last_seq / next_since of an unfiltered page.
    let page = events_page(&grove, "");
    assert_eq!(page_events(&page), events);
    assert_eq!(page["first_seq"], 1, "{page}");
    assert_eq!(page["last_seq"], 18, "{page}");
    assert_eq!(page["next_since"], 18, "{page}");

    // type=
    let by_type = |query: &str, wanted: &[&str]| {
        let page = events_page(&grove, query);
        let expected: Vec<Value> = events
            .iter()
            .filter(|e| wanted.contains(&kind(e)))
            .cloned()
            .collect();
        assert_eq!(
            page_events(&page),
            expected,
            "GET /v1/events{query} must return exactly the {wanted:?} events"
        );
        assert_eq!(page["last_seq"], 18, "{query}: {page}");
        assert_eq!(page["first_seq"], 1, "{query}: {page}");
    };
    by_type("?type=commit.created", &["commit.created"]);
    by_type(
        "?type=commit.created,merge.completed",
        &["commit.created", "merge.completed"],
    );
    by_type(
        "?type=session.opened,session.closed",
        &["session.opened", "session.closed"],
    );
    by_type("?type=volume.deleted", &["volume.deleted"]);
    assert_eq!(
        seqs(&page_events(&events_page(&grove, "?type=commit.created"))),
        vec![4, 9, 12, 13]
    );

    // volume=
    let other = page_events(&events_page(&grove, "?volume=other"));
    assert_eq!(other, vec![at(17).clone(), at(18).clone()], "volume=other");
    let ev = page_events(&events_page(&grove, "?volume=ev"));
    for event in &events {
        let about_ev = event["volume"] == "ev";
        let listed = ev.contains(event);
        if about_ev {
            assert!(listed, "volume=ev must list {event}");
        }
        if event["volume"].is_string() && !about_ev {
            assert!(!listed, "volume=ev must not list {event}");
        }
    }
    let ev_commits = page_events(&events_page(&grove, "?volume=other&type=commit.created"));
    assert!(ev_commits.is_empty(), "no commits on other: {ev_commits:?}");
    let ev_commits = page_events(&events_page(
        &grove,
        "?volume=ev&type=commit.created,branch.reset",
    ));
    assert_eq!(seqs(&ev_commits), vec![4, 9, 12, 13, 15]);

    // since= and limit=
    let after = events_page(&grove, "?since=12");
    assert_eq!(page_events(&after), events[12..].to_vec(), "since=12");
    let after_all = events_page(&grove, "?since=18");
    assert!(page_events(&after_all).is_empty(), "since=18: {after_all}");
    assert_eq!(after_all["last_seq"], 18, "{after_all}");
    let beyond = events_page(&grove, "?since=1000");
    assert!(page_events(&beyond).is_empty(), "since=1000: {beyond}");
    let first = events_page(&grove, "?limit=4");
    assert_eq!(page_events(&first), events[..4].to_vec(), "limit=4");
    assert_eq!(first["next_since"], 4, "{first}");
    let middle = events_page(&grove, "?since=4&limit=3");
    assert_eq!(
        page_events(&middle),
        events[4..7].to_vec(),
        "since=4&limit=3"
    );
    assert_eq!(middle["next_since"], 7, "{middle}");
    let max = events_page(&grove, "?limit=10000");
    assert_eq!(page_events(&max), events, "limit=10000");

    // Paging with next_since visits each event exactly once.
    for limit in [1, 2, 5, 7, 17, 18, 100] {
        assert_eq!(pages(&grove, "", limit), events, "paging {limit} at a time");
    }
    let commits: Vec<Value> = events
        .iter()
        .filter(|e| kind(e) == "commit.created")
        .cloned()
        .collect();
    for limit in [1, 3] {
        assert_eq!(
            pages(&grove, "&type=commit.created", limit),
            commits,
            "paging commits {limit} at a time"
        );
    }
    assert_eq!(
        pages(&grove, "&volume=other", 1),
        vec![at(17).clone(), at(18).clone()],
        "paging volume=other"
    );

    // Bad queries: 400 with the JSON error shape, and no change to the log.
    for query in [
        "?type=bogus",
        "?type=commit.created,bogus",
        "?type=commit",
        "?limit=0",
        "?limit=10001",
        "?limit=-1",
        "?limit=abc",
        "?since=abc",
        "?volume=Bad_Name",
    ] {
        let reply = grove.http("GET", &format!("/v1/events{query}"), None);
        reply.assert_error(&[400], &format!("GET /v1/events{query}"));
    }
    assert_eq!(all_events(&grove), events, "bad queries change nothing");

    // first_seq is the oldest event the log holds and last_seq the newest, whatever the page
    // (the API documents `first_seq` as "The oldest event the log still holds").
    for query in [
        "?since=4&limit=3",
        "?since=12",
        "?since=12&type=volume.created",
        "?since=18",
        "?since=1000",
    ] {
        let page = events_page(&grove, query);
        assert_eq!(
            (page["first_seq"].as_u64(), page["last_seq"].as_u64()),
            (Some(1), Some(18)),
            "GET /v1/events{query}: first_seq/last_seq describe the whole log: {page}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. The stream: resume after Last-Event-ID, no gap, no duplicate; filters

#[test]
fn event_stream_resumes_without_gap_or_duplicate() {
    require_nbd_tools();
    let grove = Grove::start();

    // A stream opened on an empty log gets everything from seq 1 on.
    let mut first = SseClient::open(&grove, "/v1/events/stream", None);
    // A commit-only stream from the start of the log.
    let mut commits_only =
        SseClient::open(&grove, "/v1/events/stream?type=commit.created", Some(0));

    grove.create_volume("s", "16MiB");
    write_and_wait(&grove, "s", &["write -P 0x11 0 64k"]);
    let c1 = grove.commit("s", "one");
    grove.cli_ok(&["branch", "create", "s", "b"]);
    grove.cli_ok(&["tag", "create", "s", "t1", "s"]);
    let c2 = grove.commit("s", "empty two");

    // Read a few, then drop the connection mid-way.
    let mut received: Vec<Value> = Vec::new();
    for _ in 0..3 {
        received.push(first.expect_event("the first stream"));
    }
    assert_eq!(
        seqs(&received),
        vec![1, 2, 3],
        "the first stream starts at seq 1\n{}",
        pretty(&received)
    );
    let last_seen = seq(received.last().expect("an event"));
    first.hang_up();

    // Changes while disconnected, including a session logged in the background.
    write_and_wait(&grove, "s@b", &["write -P 0x22 1M 8k"]);
    let c3 = grove.commit("s@b", "three");
    grove.cli_ok(&["tag", "create", "s", "t2", "s@b"]);
    grove.cli_ok(&["tag", "delete", "s", "t1"]);
    let logged = all_events(&grove);
    let n_disconnected = logged.len() as u64;

    // Reconnect after the last event seen: the missed ones, then live ones.
    let mut resumed = SseClient::open(&grove, "/v1/events/stream", Some(last_seen));
    received.extend(resumed.events_through(n_disconnected, "the resumed stream"));
    let c4 = grove.commit("s@b", "four live");
    grove.cli_ok(&["branch", "create", "s", "c", "--from", "s@t2"]);
    write_and_wait(&grove, "s@c", &["write -P 0x33 2M 4k"]);
    let total = all_events(&grove).len() as u64;
    received.extend(resumed.events_through(total, "the resumed stream, live"));
    resumed.assert_quiet("the resumed stream after the last event");

    let log = all_events(&grove);
    assert_contiguous_from_one(&log, "the log");
    assert_eq!(
        seqs(&received),
        (1..=total).collect::<Vec<_>>(),
        "the events of both connections are exactly 1..={total}, no gap, no duplicate\n{}",
        pretty(&received)
    );
    assert_eq!(
        received, log,
        "streamed events are the same JSON as GET /v1/events"
    );
    assert!(
        log.iter()
            .any(|e| kind(e) == "session.closed" && seq(e) > last_seen),
        "a session event was logged while disconnected and replayed: {}",
        pretty(&log)
    );

    // The commit-only stream got exactly the commits, in order.
    let expected_commits: Vec<Value> = log
        .iter()
        .filter(|e| kind(e) == "commit.created")
        .cloned()
        .collect();
    let commit_ids: Vec<&str> = expected_commits
        .iter()
        .map(|e| e["commit"].as_str().expect("commit id"))
        .collect();
    assert_eq!(commit_ids, vec![&c1, &c2, &c3, &c4]);
    let last_commit = seq(expected_commits.last().expect("commits"));
    let got_commits = commits_only.events_through(last_commit, "the commit-only stream");
    assert_eq!(got_commits, expected_commits, "?type=commit.created stream");
    commits_only.assert_quiet("the commit-only stream after the last commit");
    commits_only.hang_up();

    // Resuming a filtered stream: `Last-Event-ID` is a seq of the whole log.
    let third_commit = seq(&expected_commits[2]);
    let mut filtered = SseClient::open(
        &grove,
        "/v1/events/stream?type=commit.created",
        Some(third_commit - 1),
    );
    let got = filtered.events_through(last_commit, "the resumed commit-only stream");
    assert_eq!(got, expected_commits[2..].to_vec());
    // Live: a tag (filtered out), then a commit.
    grove.cli_ok(&["tag", "create", "s", "t3", "s"]);
    let c5 = grove.commit("s@c", "five live");
    let live = filtered.expect_event("the commit-only stream, live");
    assert_eq!(live["type"], "commit.created", "{live}");
    assert_eq!(live["commit"], c5.as_str(), "{live}");
    filtered.assert_quiet("the commit-only stream after five");
    filtered.hang_up();

    // ?since=N replays from N like Last-Event-ID.
    let mut since = SseClient::open(&grove, "/v1/events/stream?since=5", None);
    let log = all_events(&grove);
    let last = log.len() as u64;
    let got = since.events_through(last, "?since=5");
    assert_eq!(
        got,
        log[5..].to_vec(),
        "?since=5 replays every event after 5"
    );
    since.hang_up();

    // ?volume= on the stream.
    grove.create_volume("z", "1MiB");
    let mut by_volume = SseClient::open(&grove, "/v1/events/stream?volume=z", Some(0));
    let z_created = by_volume.expect_event("the volume=z stream");
    assert_eq!(z_created["type"], "volume.created", "{z_created}");
    assert_eq!(z_created["volume"], "z", "{z_created}");
    by_volume.assert_quiet("the volume=z stream");
    by_volume.hang_up();

    // Without Last-Event-ID or since, a stream starts with the next new event.
    let before = all_events(&grove).len() as u64;
    let mut fresh = SseClient::open(&grove, "/v1/events/stream", None);
    fresh.assert_quiet("a fresh stream before any new event");
    grove.cli_ok(&["tag", "create", "s", "t4", "s"]);
    let next = fresh.expect_event("a fresh stream");
    assert_eq!(
        seq(&next),
        before + 1,
        "a fresh stream starts after the log: {next}"
    );
    assert_eq!(next["type"], "tag.created", "{next}");
    fresh.hang_up();

    // Bad filters are refused before streaming.
    for query in ["?type=bogus", "?limit=5", "?volume=Bad_Name"] {
        let reply = grove.http("GET", &format!("/v1/events/stream{query}"), None);
        reply.assert_error(&[400], &format!("GET /v1/events/stream{query}"));
    }
    // The server still answers after streams were dropped mid-way.
    let reply = grove.http("GET", "/healthz", None);
    assert_eq!(reply.status, 200, "/healthz after streams: {reply:?}");
}

// ---------------------------------------------------------------------------------------------
// 3. Durability across kill -9

/// Commit ids from `grove log` over every branch of `volume`.
fn commits_in_logs(grove: &Grove, volume: &str) -> BTreeSet<String> {
    let branches = grove.cli_json(&["branch", "list", volume]);
    let mut ids = BTreeSet::new();
    for branch in branches.as_array().expect("branch list is an array") {
        let name = branch["name"].as_str().expect("branch name");
        let log = grove.cli_json(&["log", &format!("{volume}@{name}")]);
        for commit in log.as_array().expect("log is an array") {
            ids.insert(commit["id"].as_str().expect("commit id").to_string());
        }
    }
    ids
}

fn commits_in_events(events: &[Value], volume: &str) -> BTreeSet<String> {
    events
        .iter()
        .filter(|e| kind(e) == "commit.created" && e["volume"] == volume)
        .map(|e| e["commit"].as_str().expect("commit id").to_string())
        .collect()
}

#[test]
fn event_log_survives_kill_9() {
    require_nbd_tools();
    let mut grove = Grove::start();

    grove.create_volume("d", "16MiB");
    write_and_wait(&grove, "d", &["write -P 0x41 0 64k"]);
    let c1 = grove.commit("d", "one");
    grove.cli_ok(&["tag", "create", "d", "v1", "d"]);
    grove.cli_ok(&["branch", "create", "d", "side"]);
    write_and_wait(&grove, "d@side", &["write -P 0x42 1M 64k"]);
    let c2 = grove.commit("d@side", "side");
    write_and_wait(&grove, "d", &["write -P 0x43 2M 64k"]);
    grove.commit("d", "main two");
    grove.cli_ok(&["merge", "d", "--from", "d@side", "--into", "main"]);
    // The last change right before the crash: a commit.
    let c_last = grove.commit("d@side", "just before the crash");

    let before = all_events(&grove);
    assert_contiguous_from_one(&before, "the log before the crash");
    assert!(
        commits_in_events(&before, "d").contains(&c_last),
        "the commit's event is logged once the commit is made: {}",
        pretty(&before)
    );

    grove.restart_after_kill9();
    let after = all_events(&grove);
    assert_eq!(
        after, before,
        "the log after kill -9 is the log before it, event for event"
    );
    let page = events_page(&grove, "");
    assert_eq!(page["last_seq"], before.len() as u64, "{page}");
    assert_eq!(page["first_seq"], 1, "{page}");
    assert_eq!(
        commits_in_logs(&grove, "d"),
        commits_in_events(&after, "d"),
        "every commit in `grove log` has its commit.created event and vice versa"
    );
    assert!(commits_in_logs(&grove, "d").contains(&c1));
    assert!(commits_in_logs(&grove, "d").contains(&c2));

    // New events continue the numbering.
    let n = before.len() as u64;
    let crash_ms = now_ms();
    grove.cli_ok(&["tag", "create", "d", "v2", "d@side"]);
    let c_after = grove.commit("d", "after the crash");
    let events = all_events(&grove);
    assert_contiguous_from_one(&events, "the log after new changes");
    assert_eq!(events[..n as usize].to_vec(), before);
    assert_eq!(kind(&events[n as usize]), "tag.created");
    assert_eq!(seq(&events[n as usize]), n + 1, "no seq is reused");
    assert_eq!(events[n as usize + 1]["commit"], c_after.as_str());
    assert!(
        events[n as usize]["time_unix_ms"].as_u64().unwrap_or(0) + 1000 >= crash_ms,
        "new events carry the new time: {}",
        events[n as usize]
    );

    // A second crash right after a commit, then a graceful restart: still the same log.
    grove.restart_after_kill9();
    assert_eq!(all_events(&grove), events, "the log after a second kill -9");
    let status = grove.terminate();
    assert!(
        status.success(),
        "grove serve exits cleanly on SIGTERM: {status}"
    );
    grove.spawn();
    let final_events = all_events(&grove);
    assert_eq!(final_events, events, "the log after a graceful restart");
    assert_eq!(
        commits_in_logs(&grove, "d"),
        commits_in_events(&final_events, "d"),
        "commits and their events still match"
    );
    grove.cli_ok(&["branch", "delete", "d", "side"]);
    let last = all_events(&grove);
    assert_eq!(last.len(), events.len() + 1);
    assert_eq!(kind(last.last().expect("event")), "branch.deleted");
    assert_contiguous_from_one(&last, "the log at the end");
}

// ---------------------------------------------------------------------------------------------
// 4. The CLI: `grove events` and `grove events --follow`

/// `grove --json events ARGS...`: one JSON object per line.
fn cli_events(grove: &Grove, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["--json", "events"];
    all.extend_from_slice(args);
    let out = grove.cli(&all);
    out.assert_success();
    out.stdout
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|error| {
                panic!(
                    "`grove --json events` line is not JSON ({error}): {line:?}\n{}",
                    out.report()
                )
            })
        })
        .collect()
}

#[test]
fn cli_events_and_follow() {
    let grove = Grove::start();
    grove.create_volume("c", "8MiB");
    grove.commit("c", "one");
    grove.cli_ok(&["branch", "create", "c", "b"]);
    grove.cli_ok(&["tag", "create", "c", "t", "c"]);
    grove.commit("c@b", "two");
    grove.create_volume("c2", "4MiB");
    grove.commit("c2", "other volume");

    // Actors from the CLI's environment: $GROVE_ACTOR, else $USER.
    let out = cli_as(
        &grove,
        Some("dave"),
        Some("erin"),
        &["tag", "create", "c", "by-dave", "c"],
    );
    out.assert_success();
    let out = cli_as(
        &grove,
        None,
        Some("erin"),
        &["tag", "create", "c", "by-erin", "c"],
    );
    out.assert_success();
    let api = all_events(&grove);
    let n = api.len();
    assert_eq!(api[n - 2]["actor"], "dave", "$GROVE_ACTOR: {}", api[n - 2]);
    assert_eq!(api[n - 1]["actor"], "erin", "$USER: {}", api[n - 1]);

    // --json: one object per line, the API's events.
    let printed = cli_events(&grove, &[]);
    assert_eq!(
        printed, api,
        "`grove --json events` prints the API's events"
    );
    let printed = cli_events(&grove, &["--since", "3"]);
    assert_eq!(printed, api[3..].to_vec(), "--since 3");
    let printed = cli_events(&grove, &["--limit", "2"]);
    assert_eq!(printed, api[..2].to_vec(), "--limit 2");
    let printed = cli_events(&grove, &["--type", "commit.created"]);
    assert_eq!(
        printed,
        page_events(&events_page(&grove, "?type=commit.created")),
        "--type commit.created"
    );
    assert_eq!(printed.len(), 3);
    let printed = cli_events(
        &grove,
        &["--type", "commit.created", "--type", "volume.created"],
    );
    assert_eq!(
        printed,
        page_events(&events_page(&grove, "?type=commit.created,volume.created")),
        "--type twice"
    );
    let printed = cli_events(&grove, &["--volume", "c2"]);
    assert_eq!(
        printed,
        page_events(&events_page(&grove, "?volume=c2")),
        "--volume c2"
    );
    assert_eq!(printed.len(), 2, "c2: created and committed: {printed:?}");

    // Human output: one line per event, starting with its seq.
    let text = grove.cli_ok(&["events"]);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), n, "one line per event:\n{text}");
    for (line, event) in lines.iter().zip(&api) {
        assert!(
            line.split_whitespace().next() == Some(&seq(event).to_string())
                && line.contains(kind(event)),
            "line {line:?} shows event {event}"
        );
    }

    // Bad arguments fail with a message.
    grove.cli_err(&["events", "--type", "bogus"]);
    grove.cli_err(&["events", "--volume", "Bad_Name"]);

    // --follow from the current end: exactly the events made after it started.
    let last = n as u64;
    let mut follow = Follower::start(
        &grove,
        &["--json", "events", "--follow", "--since", &last.to_string()],
    );
    let c3 = grove.commit("c", "while following");
    let first_event = follow.expect_json("--follow --since");
    assert_eq!(seq(&first_event), last + 1, "{first_event}");
    assert_eq!(first_event["type"], "commit.created", "{first_event}");
    assert_eq!(first_event["commit"], c3.as_str(), "{first_event}");
    grove.cli_ok(&["tag", "create", "c", "t-follow", "c"]);
    let second_event = follow.expect_json("--follow --since, second event");
    assert_eq!(seq(&second_event), last + 2, "{second_event}");
    assert_eq!(second_event["type"], "tag.created", "{second_event}");
    let api = all_events(&grove);
    assert_eq!(
        vec![first_event, second_event],
        api[last as usize..].to_vec(),
        "--follow prints the API's events"
    );
    assert!(
        follow.next_json(QUIET).is_none(),
        "--follow printed an event nobody made"
    );
    drop(follow);

    // --follow without --since prints only new events: commit until it has started.
    let start = all_events(&grove).len() as u64;
    let mut follow = Follower::start(
        &grove,
        &["--json", "events", "--follow", "--type", "commit.created"],
    );
    let deadline = Instant::now() + EVENT_TIMEOUT;
    let mut made: BTreeMap<u64, String> = BTreeMap::new();
    let mut printed: Vec<Value> = Vec::new();
    while printed.is_empty() {
        assert!(
            Instant::now() < deadline,
            "`grove --json events --follow` printed nothing for {EVENT_TIMEOUT:?} of commits\nstderr: {}",
            follow.stderr_text()
        );
        grove.cli_ok(&["tag", "create", "c", &format!("noise-{}", made.len()), "c"]);
        let id = grove.commit("c", "follow me");
        let event = all_events(&grove)
            .into_iter()
            .find(|e| e["commit"] == id.as_str() && kind(e) == "commit.created")
            .expect("the commit's event");
        made.insert(seq(&event), id);
        if let Some(event) = follow.next_json(Duration::from_millis(500)) {
            printed.push(event);
        }
    }
    // One more, made surely after it started, must be printed right after the others.
    let id = grove.commit("c", "follow me too");
    let api = all_events(&grove);
    let last_seq = seq(api.last().expect("event"));
    made.insert(last_seq, id);
    while seq(printed.last().expect("printed")) < last_seq {
        printed.push(follow.expect_json("--follow, the last commit"));
    }
    let first_printed = seq(&printed[0]);
    assert!(
        first_printed > start,
        "--follow printed an old event: {}",
        printed[0]
    );
    let expected: Vec<Value> = api
        .iter()
        .filter(|e| seq(e) >= first_printed && kind(e) == "commit.created")
        .cloned()
        .collect();
    assert_eq!(
        printed, expected,
        "--follow --type commit.created prints every new commit once, in order, nothing else"
    );
    for event in &printed {
        assert_eq!(
            made.get(&seq(event)).map(String::as_str),
            event["commit"].as_str()
        );
    }
    drop(follow);
}
