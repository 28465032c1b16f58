//! End-to-end: hooks of the real binary, checked by a receiver written here (a small HTTP/1.1
//! server on 127.0.0.1 that records every request, and can answer 2xx, fail with 500, refuse
//! with 403 and a reason, answer too late, or be down so that connections are refused) and by
//! exec hooks writing what they get to files. Webhooks get the matching events logged after
//! they were made, in order, signed with HMAC-SHA256 (checked here with the `hmac` crate),
//! with bodies equal to `GET /v1/events` items; a receiver that is down or failing gets the
//! same event again with backoff before any later one, and `hook.failed` is logged after five
//! failures; progress survives SIGTERM and `kill -9` with nothing lost. Blocking hooks
//! (`pre-commit`, `pre-merge`, `pre-delete`) veto with 409 `vetoed_by_hook` and change
//! nothing; a pre-commit hook reads the candidate commit over NBD (nbdcopy) while it is called,
//! and writes to the branch wait for it. The `grove hook` CLI and bad input are covered too.

mod support;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use support::{assert_patterns, require_nbd_tools, run, write_pattern, Grove, HttpReply, KIB, MIB};

/// How long a delivery that should happen now may take to arrive.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long to watch a receiver to show that nothing more arrives.
const QUIET: Duration = Duration::from_millis(1500);
/// An API call or a commit while a receiver is down or failing must take less than this.
const PROMPT: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// The receiver

/// One request the receiver got, and how it answered.
#[derive(Clone, Debug)]
struct Received {
    method: String,
    path: String,
    /// Names in lower case.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// When the request (headers and body) had arrived.
    at: Instant,
    /// Just before the answer was written.
    answered_at: Instant,
    /// The status it was answered with.
    status: u16,
    /// What the inspection run while handling it found (the bytes read over NBD), or why it
    /// failed.
    note: Option<Result<Vec<u8>, String>>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "hook body is not JSON ({error}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn seq(&self) -> u64 {
        self.json()["seq"]
            .as_u64()
            .unwrap_or_else(|| panic!("delivered event without a seq: {}", self.json()))
    }

    fn taken(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Runs while a request is handled, before the answer (e.g. reads the candidate commit).
type Inspect = Arc<dyn Fn(&Value) -> Result<Vec<u8>, String> + Send + Sync>;

#[derive(Clone)]
struct Behaviour {
    status: u16,
    body: String,
    delay: Duration,
    inspect: Option<Inspect>,
}

struct Shared {
    behaviour: Mutex<Behaviour>,
    received: Mutex<Vec<Received>>,
    /// The listener while the receiver is up; `None` refuses connections.
    listener: Mutex<Option<TcpListener>>,
    /// Requests whose inspection is done and whose answer is pending or written.
    inspected: AtomicUsize,
    stop: AtomicBool,
}

/// A webhook receiver on 127.0.0.1: one request per connection, `Connection: close`.
struct Receiver {
    shared: Arc<Shared>,
    port: u16,
    accept_thread: Option<JoinHandle<()>>,
}

impl Receiver {
    /// A receiver that is up and answers 200.
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the receiver");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let port = listener.local_addr().expect("local_addr").port();
        let shared = Arc::new(Shared {
            behaviour: Mutex::new(Behaviour {
                status: 200,
                body: "ok".into(),
                delay: Duration::ZERO,
                inspect: None,
            }),
            received: Mutex::new(Vec::new()),
            listener: Mutex::new(Some(listener)),
            inspected: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let accept_shared = shared.clone();
        let accept_thread = thread::spawn(move || accept_loop(accept_shared));
        Receiver {
            shared,
            port,
            accept_thread: Some(accept_thread),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// Answer every request with `status` and `body`.
    fn answer(&self, status: u16, body: &str) {
        let mut behaviour = self.shared.behaviour.lock().expect("behaviour lock");
        behaviour.status = status;
        behaviour.body = body.to_string();
    }

    /// Wait this long before answering.
    fn delay(&self, delay: Duration) {
        self.shared.behaviour.lock().expect("behaviour lock").delay = delay;
    }

    fn inspect(&self, inspect: Inspect) {
        self.shared
            .behaviour
            .lock()
            .expect("behaviour lock")
            .inspect = Some(inspect);
    }

    /// Stops listening: connections to the port are refused.
    fn down(&self) {
        let listener = self.shared.listener.lock().expect("listener lock").take();
        drop(listener);
        // Nothing listens on the port now.
        assert!(
            TcpStream::connect(("127.0.0.1", self.port)).is_err(),
            "the receiver's port {} still accepts connections after it went down",
            self.port
        );
    }

    /// Listens on the same port again.
    fn up(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(listener) => break listener,
                Err(error) => {
                    assert!(
                        Instant::now() < deadline,
                        "cannot bind the receiver's port {} again: {error}",
                        self.port
                    );
                    thread::sleep(Duration::from_millis(50));
                }
            }
        };
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        *self.shared.listener.lock().expect("listener lock") = Some(listener);
    }

    fn received(&self) -> Vec<Received> {
        self.shared.received.lock().expect("received lock").clone()
    }

    fn inspected(&self) -> usize {
        self.shared.inspected.load(Ordering::SeqCst)
    }

    /// The requests once `done` says they are enough; fails after `timeout`.
    fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let received = self.received();
            if done(&received) {
                return received;
            }
            assert!(
                Instant::now() < deadline,
                "receiver: {what} did not happen within {timeout:?}; received: {}",
                describe_requests(&received)
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until at least `count` requests were answered 2xx.
    fn wait_taken(&self, count: usize, timeout: Duration) -> Vec<Received> {
        self.wait_for(&format!("{count} deliveries taken"), timeout, |all| {
            all.iter().filter(|r| r.taken()).count() >= count
        })
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.accept_thread.take() {
            let _ = thread.join();
        }
    }
}

fn describe_requests(received: &[Received]) -> String {
    let lines: Vec<String> = received
        .iter()
        .map(|r| {
            format!(
                "  {} {} -> {} {}",
                r.method,
                r.path,
                r.status,
                String::from_utf8_lossy(&r.body)
            )
        })
        .collect();
    format!("{} request(s)\n{}", received.len(), lines.join("\n"))
}

fn accept_loop(shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        let accepted = {
            let guard = shared.listener.lock().expect("listener lock");
            match guard.as_ref() {
                Some(listener) => match listener.accept() {
                    Ok((stream, _)) => Some(stream),
                    Err(error) if error.kind() == ErrorKind::WouldBlock => None,
                    Err(_) => None,
                },
                None => None,
            }
        };
        match accepted {
            Some(stream) => {
                let shared = shared.clone();
                thread::spawn(move || handle(shared, stream));
            }
            None => thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Reads one request, runs the inspection, waits the delay, records it and answers.
fn handle(shared: Arc<Shared>, stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(stream) => stream,
        Err(_) => return,
    });
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let name = name.trim().to_ascii_lowercase();
            let value = value.trim().to_string();
            if name == "content-length" {
                length = value.parse().unwrap_or(0);
            }
            headers.push((name, value));
        }
    }
    let mut body = vec![0u8; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let at = Instant::now();
    let behaviour = shared.behaviour.lock().expect("behaviour lock").clone();
    let note = behaviour.inspect.as_ref().map(|inspect| {
        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        catch_unwind(AssertUnwindSafe(|| inspect(&value)))
            .unwrap_or_else(|_| Err("the inspection panicked".to_string()))
    });
    shared.inspected.fetch_add(1, Ordering::SeqCst);
    if !behaviour.delay.is_zero() {
        thread::sleep(behaviour.delay);
    }
    let answered_at = Instant::now();
    shared
        .received
        .lock()
        .expect("received lock")
        .push(Received {
            method,
            path,
            headers,
            body,
            at,
            answered_at,
            status: behaviour.status,
            note,
        });
    let reason = match behaviour.status {
        200..=299 => "OK",
        403 => "Forbidden",
        _ => "Error",
    };
    let answer = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        behaviour.status,
        behaviour.body.len(),
        behaviour.body
    );
    let mut stream = stream;
    let _ = stream.write_all(answer.as_bytes());
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Both);
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("sha256={hex}")
}

fn add_hook(grove: &Grove, body: &Value) -> Value {
    let reply = grove.http("POST", "/v1/hooks", Some(&body.to_string()));
    assert_eq!(reply.status, 201, "POST /v1/hooks {body}: {reply:?}");
    let hook = reply.json();
    assert!(
        hook["id"].as_str().is_some_and(|id| !id.is_empty()),
        "a new hook has an id: {hook}"
    );
    hook
}

fn hook_id(hook: &Value) -> String {
    hook["id"].as_str().expect("hook id").to_string()
}

fn show_hook(grove: &Grove, id: &str) -> Value {
    let reply = grove.http("GET", &format!("/v1/hooks/{id}"), None);
    assert_eq!(reply.status, 200, "GET /v1/hooks/{id}: {reply:?}");
    reply.json()
}

fn delete_hook(grove: &Grove, id: &str) {
    let reply = grove.http("DELETE", &format!("/v1/hooks/{id}"), None);
    assert!(
        (200..300).contains(&reply.status),
        "DELETE /v1/hooks/{id}: {reply:?}"
    );
}

fn deliveries(grove: &Grove, id: &str) -> Vec<Value> {
    let reply = grove.http("GET", &format!("/v1/hooks/{id}/deliveries"), None);
    assert_eq!(
        reply.status, 200,
        "GET /v1/hooks/{id}/deliveries: {reply:?}"
    );
    reply
        .json()
        .as_array()
        .unwrap_or_else(|| panic!("deliveries are an array: {reply:?}"))
        .clone()
}

/// Every event after `since`, with `extra` query filters (`&type=...`).
fn events_after(grove: &Grove, since: u64, extra: &str) -> Vec<Value> {
    let mut since = since;
    let mut all = Vec::new();
    for _ in 0..1000 {
        let reply = grove.http("GET", &format!("/v1/events?since={since}{extra}"), None);
        assert_eq!(reply.status, 200, "GET /v1/events: {reply:?}");
        let page = reply.json();
        let events = page["events"].as_array().expect("events array").clone();
        let next = page["next_since"].as_u64().expect("next_since");
        if events.is_empty() || next <= since {
            all.extend(events);
            return all;
        }
        all.extend(events);
        since = next;
    }
    panic!("GET /v1/events never ended");
}

fn last_seq(grove: &Grove) -> u64 {
    let reply = grove.http("GET", "/v1/events?limit=1", None);
    assert_eq!(reply.status, 200, "GET /v1/events: {reply:?}");
    reply.json()["last_seq"].as_u64().expect("last_seq")
}

fn seq_of(event: &Value) -> u64 {
    event["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("event without seq: {event}"))
}

/// The `commit.created` event of `commit`.
fn commit_event(grove: &Grove, commit: &str) -> Value {
    events_after(grove, 0, "&type=commit.created")
        .into_iter()
        .find(|event| event["commit"] == commit)
        .unwrap_or_else(|| panic!("no commit.created event for {commit}"))
}

fn api_commit(grove: &Grove, volume: &str, branch: &str, message: &str) -> HttpReply {
    grove.http(
        "POST",
        &format!("/v1/volumes/{volume}/branches/{branch}/commits"),
        Some(&json!({ "message": message, "author": "hook-tester" }).to_string()),
    )
}

/// Asserts a veto: 409, code `vetoed_by_hook`, and `reason` in the message.
fn assert_vetoed(reply: &HttpReply, reason: &str, context: &str) {
    reply.assert_error(&[409], context);
    let body = reply.json();
    assert_eq!(
        body["error"]["code"], "vetoed_by_hook",
        "{context}: the error code must be vetoed_by_hook: {reply:?}"
    );
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(reason),
        "{context}: the message must quote the hook's answer {reason:?}: {reply:?}"
    );
}

fn commit_ids(grove: &Grove, reference: &str) -> Vec<String> {
    let log = grove.cli_json(&["log", reference]);
    log.as_array()
        .unwrap_or_else(|| panic!("log is an array: {log}"))
        .iter()
        .map(|commit| commit["id"].as_str().expect("commit id").to_string())
        .collect()
}

fn branch_names(grove: &Grove, volume: &str) -> Vec<String> {
    let branches = grove.cli_json(&["branch", "list", volume]);
    branches
        .as_array()
        .unwrap_or_else(|| panic!("branch list is an array: {branches}"))
        .iter()
        .map(|b| b["name"].as_str().expect("branch name").to_string())
        .collect()
}

fn head_commit(grove: &Grove, volume: &str, branch: &str) -> Option<String> {
    let branches = grove.cli_json(&["branch", "list", volume]);
    let found = branches
        .as_array()
        .expect("branch list is an array")
        .iter()
        .find(|b| b["name"] == branch)
        .cloned()
        .unwrap_or_else(|| panic!("no branch {branch} in {branches}"));
    found["head_commit"].as_str().map(str::to_string)
}

/// `grove commit` that must succeed promptly (hooks never hold commits back).
fn prompt_commit(grove: &Grove, reference: &str, message: &str) -> String {
    let started = Instant::now();
    let id = grove.commit(reference, message);
    let took = started.elapsed();
    assert!(
        took < PROMPT,
        "`grove commit {reference}` took {took:?} while a receiver was not taking events; deliveries must not hold back the API"
    );
    id
}

/// Reads a whole export with nbdcopy into memory.
fn read_export(uri: &str, scratch: &std::path::Path) -> Result<Vec<u8>, String> {
    let out = run(
        Command::new("nbdcopy").arg(uri).arg(scratch),
        Duration::from_secs(60),
    );
    if !out.success() {
        return Err(out.report());
    }
    let bytes = std::fs::read(scratch).map_err(|error| format!("read {scratch:?}: {error}"))?;
    let _ = std::fs::remove_file(scratch);
    Ok(bytes)
}

fn image(size: usize, ranges: &[(u8, u64, u64)]) -> Vec<u8> {
    let mut bytes = vec![0u8; size];
    for &(pattern, offset, length) in ranges {
        bytes[offset as usize..(offset + length) as usize].fill(pattern);
    }
    bytes
}

fn first_difference(expected: &[u8], actual: &[u8]) -> Option<String> {
    if expected.len() != actual.len() {
        return Some(format!(
            "length {} instead of {}",
            actual.len(),
            expected.len()
        ));
    }
    expected
        .iter()
        .zip(actual)
        .position(|(a, b)| a != b)
        .map(|offset| {
            format!(
                "byte {offset}: 0x{:02x} instead of 0x{:02x}",
                actual[offset], expected[offset]
            )
        })
}

// ---------------------------------------------------------------------------------------------
// Tests

/// A signed hook with a volume glob gets exactly the matching events logged after it was made,
/// in order, once each, with valid signatures, its headers, and bodies equal to the log's
/// items; a branch glob takes commits and tags by their branch or tag name and never an event
/// without one.
#[test]
fn signed_deliveries_in_order() {
    require_nbd_tools();
    let grove = Grove::start();
    let signed = Receiver::start();
    let by_branch = Receiver::start();
    grove.create_volume("sig-a", "16MiB");
    grove.create_volume("other-b", "16MiB");
    write_pattern(&grove.unix_uri("sig-a"), 0x01, 0, 64 * KIB);
    let before = grove.commit("sig-a", "before the hook");

    let secret = "s3cr3t-\u{e9}-key";
    let hook = add_hook(
        &grove,
        &json!({
            "url": signed.url(),
            "events": ["commit.created", "tag.created"],
            "volume": "sig-*",
            "secret": secret,
        }),
    );
    let id = hook_id(&hook);
    assert_eq!(hook["url"], signed.url().as_str(), "{hook}");
    assert_eq!(hook["exec"], Value::Null, "{hook}");
    assert_eq!(hook["events"], json!(["commit.created", "tag.created"]));
    assert_eq!(hook["volume"], "sig-*", "{hook}");
    assert_eq!(hook["branch"], Value::Null, "{hook}");
    assert_eq!(hook["has_secret"], true, "{hook}");
    assert_eq!(hook["allow_on_timeout"], false, "{hook}");
    assert!(hook["timeout_ms"].as_u64().is_some_and(|t| t > 0), "{hook}");
    assert!(hook["created_unix"].as_u64().is_some(), "{hook}");
    for key in [
        "delivered_seq",
        "consecutive_failures",
        "deliveries_ok",
        "deliveries_failed",
    ] {
        assert!(hook["status"][key].is_u64(), "status.{key}: {hook}");
    }
    assert_eq!(hook["status"]["failing"], false, "{hook}");
    let shown = grove.http("GET", &format!("/v1/hooks/{id}"), None);
    assert_eq!(shown.status, 200, "{shown:?}");
    assert!(
        !shown.body.contains("s3cr3t"),
        "a hook's secret is never shown: {shown:?}"
    );
    let listed = grove.http("GET", "/v1/hooks", None);
    assert!(
        listed
            .json()
            .as_array()
            .is_some_and(|hooks| hooks.iter().any(|h| h["id"] == id.as_str())
                && !listed.body.contains("s3cr3t")),
        "GET /v1/hooks lists the hook without its secret: {listed:?}"
    );
    let start = last_seq(&grove);

    let branch_hook = add_hook(
        &grove,
        &json!({
            "url": by_branch.url(),
            "events": ["commit.created", "tag.created", "volume.created", "branch.created"],
            "branch": "rel-*",
        }),
    );
    assert_eq!(branch_hook["has_secret"], false, "{branch_hook}");
    let branch_start = last_seq(&grove);

    // Events on both volumes; only sig-a's commits and tags match the first hook.
    let main_a = grove.unix_uri("sig-a");
    write_pattern(&main_a, 0x11, 0, 64 * KIB);
    let c1 = grove.commit("sig-a", "one");
    write_pattern(&grove.unix_uri("other-b"), 0x22, 0, 64 * KIB);
    let other = grove.commit("other-b", "not for the hook");
    grove.cli_ok(&["tag", "create", "sig-a", "v1", &c1]);
    grove.cli_ok(&["tag", "create", "other-b", "rel-other", &other]);
    grove.cli_ok(&["branch", "create", "sig-a", "rel-1", "--from", &c1]);
    write_pattern(&grove.unix_uri("sig-a@rel-1"), 0x33, 64 * KIB, 64 * KIB);
    let c2 = grove.commit("sig-a@rel-1", "on rel-1");
    grove.cli_ok(&["tag", "create", "sig-a", "rel-tag", &c2]);
    write_pattern(&main_a, 0x44, 128 * KIB, 64 * KIB);
    let c3 = grove.commit("sig-a", "three");
    grove.create_volume("rel-vol", "16MiB");

    // What the log says each hook should get.
    let logged = events_after(&grove, start, "");
    let expected: Vec<Value> = logged
        .iter()
        .filter(|e| e["type"] == "commit.created" || e["type"] == "tag.created")
        .filter(|e| e["volume"].as_str().is_some_and(|v| v.starts_with("sig-")))
        .cloned()
        .collect();
    assert_eq!(
        expected.len(),
        5,
        "three commits and two tags on sig-a are logged: {expected:?}"
    );
    assert!(
        expected
            .iter()
            .all(|e| e["commit"] != before.as_str() || e["type"] != "commit.created"),
        "the commit made before the hook is not expected"
    );
    let received = signed.wait_taken(expected.len(), DELIVERY_TIMEOUT);
    thread::sleep(QUIET);
    let received = {
        let now = signed.received();
        assert_eq!(
            now.len(),
            received.len(),
            "nothing more arrives: {}",
            describe_requests(&now)
        );
        now
    };
    let got: Vec<u64> = received.iter().map(Received::seq).collect();
    let want: Vec<u64> = expected.iter().map(seq_of).collect();
    assert_eq!(
        got,
        want,
        "the hook gets exactly sig-a's commits and tags, in seq order, once each; received {}",
        describe_requests(&received)
    );
    for (request, event) in received.iter().zip(&expected) {
        let kind = event["type"].as_str().expect("type");
        let seq = seq_of(event);
        assert_eq!(request.method, "POST", "deliveries are POSTs");
        assert_eq!(
            request.json(),
            *event,
            "the body is the event as GET /v1/events shows it"
        );
        assert!(
            request
                .header("content-type")
                .is_some_and(|v| v.starts_with("application/json")),
            "Content-Type: {:?}",
            request.headers
        );
        assert_eq!(request.header("x-grove-event"), Some(kind), "X-Grove-Event");
        assert_eq!(
            request.header("x-grove-delivery"),
            Some(format!("{id}:{seq}").as_str()),
            "X-Grove-Delivery"
        );
        let signature = request
            .header("x-grove-signature")
            .unwrap_or_else(|| panic!("no X-Grove-Signature: {:?}", request.headers));
        assert_eq!(
            signature,
            sign(secret, &request.body),
            "X-Grove-Signature must be sha256=HEX(HMAC-SHA256(secret, body)) over the exact body"
        );
        assert_ne!(signature, sign("wrong secret", &request.body));
    }
    assert_eq!(received[0].json()["commit"], c1.as_str());
    assert_eq!(received.last().expect("some").json()["commit"], c3.as_str());

    let status = show_hook(&grove, &id)["status"].clone();
    assert_eq!(status["deliveries_ok"], expected.len() as u64, "{status}");
    assert_eq!(status["deliveries_failed"], 0, "{status}");
    assert_eq!(status["consecutive_failures"], 0, "{status}");
    assert!(
        status["delivered_seq"]
            .as_u64()
            .is_some_and(|s| s >= *want.last().expect("some")),
        "delivered_seq reaches the last delivered event: {status}"
    );
    let attempts = deliveries(&grove, &id);
    assert_eq!(
        attempts.len(),
        expected.len(),
        "one attempt per event: {attempts:?}"
    );
    for (attempt, event) in attempts.iter().zip(&expected) {
        assert_eq!(attempt["event_seq"], event["seq"], "{attempt}");
        assert_eq!(attempt["type"], event["type"], "{attempt}");
        assert_eq!(attempt["ok"], true, "{attempt}");
        assert_eq!(attempt["status"], 200, "{attempt}");
        assert_eq!(attempt["manual"], false, "{attempt}");
        assert!(attempt["started_unix_ms"].is_u64() && attempt["duration_ms"].is_u64());
    }

    // Delivered again by hand: the same body, signed, with its delivery id.
    let reply = grove.http(
        "POST",
        &format!("/v1/hooks/{id}/deliveries"),
        Some(&json!({ "seq": want[0] }).to_string()),
    );
    assert_eq!(reply.status, 200, "redelivery: {reply:?}");
    let attempt = reply.json();
    assert_eq!(attempt["event_seq"], want[0], "{attempt}");
    assert_eq!(attempt["ok"], true, "{attempt}");
    assert_eq!(attempt["manual"], true, "{attempt}");
    assert_eq!(attempt["status"], 200, "{attempt}");
    let again = signed.wait_for("the redelivery", DELIVERY_TIMEOUT, |all| {
        all.len() > expected.len()
    });
    let again = &again[expected.len()];
    assert_eq!(again.json(), expected[0], "the redelivered body");
    assert_eq!(
        again.header("x-grove-signature"),
        Some(sign(secret, &again.body).as_str())
    );
    assert_eq!(
        again.header("x-grove-delivery"),
        Some(format!("{id}:{}", want[0]).as_str())
    );

    // The branch glob: commits on rel-1, tags named rel-*, the branch rel-1 itself; never the
    // volume rel-vol (its event names no branch) nor commits on main.
    let expected_by_branch: Vec<Value> = events_after(&grove, branch_start, "")
        .into_iter()
        .filter(|e| {
            let name = e["branch"].as_str().or(e["tag"].as_str());
            [
                "commit.created",
                "tag.created",
                "volume.created",
                "branch.created",
            ]
            .contains(&e["type"].as_str().unwrap_or_default())
                && name.is_some_and(|n| n.starts_with("rel-"))
        })
        .collect();
    let kinds: Vec<&str> = expected_by_branch
        .iter()
        .map(|e| e["type"].as_str().expect("type"))
        .collect();
    assert_eq!(
        kinds,
        [
            "tag.created",
            "branch.created",
            "commit.created",
            "tag.created"
        ],
        "events naming rel-*: {expected_by_branch:?}"
    );
    let received = by_branch.wait_taken(expected_by_branch.len(), DELIVERY_TIMEOUT);
    thread::sleep(QUIET);
    let received_now = by_branch.received();
    assert_eq!(
        received_now.len(),
        received.len(),
        "the branch-glob hook gets nothing more: {}",
        describe_requests(&received_now)
    );
    let bodies: Vec<Value> = received_now.iter().map(Received::json).collect();
    assert_eq!(
        bodies,
        expected_by_branch,
        "the branch-glob hook gets the events naming rel-*, in order; received {}",
        describe_requests(&received_now)
    );
    assert!(
        received_now
            .iter()
            .all(|r| r.header("x-grove-signature").is_none()),
        "a hook without a secret sends no signature"
    );
}

/// A receiver that refuses connections holds back only its hook: commits and writes stay
/// prompt, the first event is retried (with backoff) before the second is tried, and once the
/// receiver is back both arrive in order; the attempts show the failures, then the successes.
#[test]
fn retries_after_the_receiver_was_down() {
    require_nbd_tools();
    let grove = Grove::start();
    let receiver = Receiver::start();
    grove.create_volume("rt", "16MiB");
    let hook = add_hook(
        &grove,
        &json!({"url": receiver.url(), "events": ["commit.created"], "volume": "rt"}),
    );
    let id = hook_id(&hook);
    receiver.down();

    let main = grove.unix_uri("rt");
    let started = Instant::now();
    write_pattern(&main, 0x11, 0, 64 * KIB);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "a qemu-io write took {took:?} while the receiver was down"
    );
    let c1 = prompt_commit(&grove, "rt", "first while down");
    write_pattern(&main, 0x22, 64 * KIB, 64 * KIB);
    let c2 = prompt_commit(&grove, "rt", "second while down");
    let s1 = seq_of(&commit_event(&grove, &c1));
    let s2 = seq_of(&commit_event(&grove, &c2));

    // Wait for two failed attempts at the first event.
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    loop {
        let attempts = deliveries(&grove, &id);
        let failed = attempts
            .iter()
            .filter(|a| a["ok"] == false && a["event_seq"] == s1)
            .count();
        if failed >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "two failed attempts at event {s1} expected within {DELIVERY_TIMEOUT:?}: {attempts:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let status = show_hook(&grove, &id)["status"].clone();
    assert!(
        status["consecutive_failures"]
            .as_u64()
            .is_some_and(|f| f >= 2)
            && status["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "the status shows the failures: {status}"
    );
    assert!(
        receiver.received().is_empty(),
        "nothing can arrive while down"
    );
    // The API answers promptly meanwhile.
    let started = Instant::now();
    let reply = grove.http("GET", "/v1/volumes/rt", None);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(
        started.elapsed() < PROMPT,
        "the API is slow while a hook fails"
    );

    receiver.up();
    let received = receiver.wait_taken(2, Duration::from_secs(30));
    thread::sleep(QUIET);
    let received_now = receiver.received();
    assert_eq!(received_now.len(), received.len(), "no more deliveries");
    let got: Vec<u64> = received_now.iter().map(Received::seq).collect();
    assert_eq!(
        got,
        vec![s1, s2],
        "both commits arrive once, in order: {}",
        describe_requests(&received_now)
    );
    assert_eq!(received_now[0].json(), commit_event(&grove, &c1));
    assert_eq!(received_now[1].json(), commit_event(&grove, &c2));

    let attempts = deliveries(&grove, &id);
    let summary: Vec<(u64, bool)> = attempts
        .iter()
        .map(|a| (a["event_seq"].as_u64().expect("seq"), a["ok"] == true))
        .collect();
    let first_ok = summary
        .iter()
        .position(|&(seq, ok)| seq == s1 && ok)
        .unwrap_or_else(|| panic!("no successful attempt at {s1}: {attempts:?}"));
    assert!(first_ok >= 2, "failed attempts come first: {attempts:?}");
    assert!(
        summary[..first_ok]
            .iter()
            .all(|&(seq, ok)| seq == s1 && !ok),
        "event {s1} is retried before event {s2} is tried: {attempts:?}"
    );
    assert_eq!(
        &summary[first_ok..],
        &[(s1, true), (s2, true)],
        "then event {s1}, then {s2}, taken: {attempts:?}"
    );
    for attempt in &attempts[..first_ok] {
        assert_eq!(attempt["status"], Value::Null, "no HTTP status: {attempt}");
        assert!(
            attempt["error"].as_str().is_some_and(|e| !e.is_empty()),
            "a failed attempt says why: {attempt}"
        );
        assert_eq!(attempt["manual"], false);
    }
    // Backoff: the second attempt came about a second after the first.
    let t0 = attempts[0]["started_unix_ms"].as_u64().expect("started");
    let t1 = attempts[1]["started_unix_ms"].as_u64().expect("started");
    assert!(t1 >= t0 + 900, "retries back off (1 s first): {attempts:?}");
    let status = show_hook(&grove, &id)["status"].clone();
    assert_eq!(status["consecutive_failures"], 0, "{status}");
    assert_eq!(status["failing"], false, "{status}");
    assert_eq!(status["deliveries_ok"], 2, "{status}");
    assert!(
        status["deliveries_failed"].as_u64().is_some_and(|f| f >= 2),
        "{status}"
    );
    assert!(
        status["delivered_seq"].as_u64().is_some_and(|s| s >= s2),
        "{status}"
    );
}

/// A receiver answering 500 gets the same event five times with doubling delays, and then a
/// `hook.failed` event names the hook, the event and the error; the hook shows as failing, and
/// commits stay prompt.
#[test]
fn hook_failed_after_five_failures() {
    let grove = Grove::start();
    let receiver = Receiver::start();
    receiver.answer(500, "boom: receiver broken");
    grove.create_volume("hf", "16MiB");
    let hook = add_hook(
        &grove,
        &json!({"url": receiver.url(), "events": ["commit.created"], "volume": "hf"}),
    );
    let id = hook_id(&hook);
    let c1 = prompt_commit(&grove, "hf", "one");
    let s1 = seq_of(&commit_event(&grove, &c1));

    let deadline = Instant::now() + Duration::from_secs(40);
    let failed = loop {
        let failed = events_after(&grove, 0, "&type=hook.failed");
        if let Some(event) = failed.iter().find(|e| e["hook"] == id.as_str()) {
            break event.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no hook.failed event within 40 s; receiver got {}",
            describe_requests(&receiver.received())
        );
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(failed["type"], "hook.failed");
    assert_eq!(failed["event_seq"], s1, "{failed}");
    assert_eq!(failed["attempts"], 5, "{failed}");
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("boom") || error.contains("500"),
        "hook.failed says what went wrong: {failed}"
    );
    let received = receiver.received();
    assert!(
        received.len() >= 5 && received.iter().all(|r| r.seq() == s1),
        "the same event was tried again and again: {}",
        describe_requests(&received)
    );
    // The delays double: about 1, 2, 4, 8 s.
    for (index, pair) in received[..5].windows(2).enumerate() {
        let gap = pair[1].at.duration_since(pair[0].at);
        let floor = Duration::from_millis(900) * (1 << index);
        assert!(
            gap >= floor,
            "retry {} came {gap:?} after the previous one, expected at least {floor:?}",
            index + 1
        );
    }
    let status = show_hook(&grove, &id)["status"].clone();
    assert_eq!(status["failing"], true, "{status}");
    assert!(
        status["consecutive_failures"]
            .as_u64()
            .is_some_and(|f| f >= 5),
        "{status}"
    );
    assert!(
        status["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{status}"
    );
    let attempts = deliveries(&grove, &id);
    assert!(
        attempts.len() >= 5
            && attempts
                .iter()
                .all(|a| a["ok"] == false && a["status"] == 500 && a["event_seq"] == s1),
        "five failed attempts with status 500: {attempts:?}"
    );
    let listed = grove.cli_ok(&["hook", "list"]);
    assert!(
        listed.contains(&id) && listed.contains("failing"),
        "`grove hook list` shows the hook failing:\n{listed}"
    );
    // A failing hook does not slow commits down.
    prompt_commit(&grove, "hf", "two");
    delete_hook(&grove, &id);
}

/// Delivery progress is durable: events delivered before `kill -9` may come again but only
/// those; an event that had not been taken when the server died is delivered after the
/// restart; after SIGTERM nothing is delivered twice.
#[test]
fn progress_survives_kill9_and_sigterm() {
    let mut grove = Grove::start();
    let receiver = Receiver::start();
    grove.create_volume("dur", "16MiB");
    let hook = add_hook(
        &grove,
        &json!({"url": receiver.url(), "events": ["commit.created"], "volume": "dur", "secret": "k"}),
    );
    let id = hook_id(&hook);
    let c1 = grove.commit("dur", "c1");
    let c2 = grove.commit("dur", "c2");
    receiver.wait_taken(2, DELIVERY_TIMEOUT);
    // An event the receiver has not taken when the server dies.
    receiver.answer(500, "not now");
    let c3 = grove.commit("dur", "c3");
    let s3 = seq_of(&commit_event(&grove, &c3));
    receiver.wait_for("a failed attempt at c3", DELIVERY_TIMEOUT, |all| {
        all.iter().any(|r| r.seq() == s3 && r.status == 500)
    });
    grove.kill9();
    let killed_at = Instant::now();
    receiver.answer(200, "ok");
    grove.spawn();
    let listed = grove.http("GET", "/v1/hooks", None).json();
    assert!(
        listed
            .as_array()
            .is_some_and(|hooks| hooks.iter().any(|h| h["id"] == id.as_str()
                && h["url"] == receiver.url().as_str()
                && h["has_secret"] == true)),
        "the hook survives kill -9: {listed}"
    );
    let c4 = grove.commit("dur", "c4");
    let c5 = grove.commit("dur", "c5");
    let seqs: Vec<u64> = [&c1, &c2, &c3, &c4, &c5]
        .iter()
        .map(|c| seq_of(&commit_event(&grove, c)))
        .collect();
    receiver.wait_for("c3, c4 and c5 taken", DELIVERY_TIMEOUT, |all| {
        seqs[2..]
            .iter()
            .all(|s| all.iter().any(|r| r.taken() && r.seq() == *s))
    });
    thread::sleep(QUIET);
    let received = receiver.received();
    let before: Vec<u64> = received
        .iter()
        .filter(|r| r.taken() && r.at < killed_at)
        .map(Received::seq)
        .collect();
    let after: Vec<u64> = received
        .iter()
        .filter(|r| r.taken() && r.at >= killed_at)
        .map(Received::seq)
        .collect();
    assert_eq!(
        before,
        seqs[..2],
        "before the kill: c1 and c2 taken: {}",
        describe_requests(&received)
    );
    // After: possibly a repeat of the last events taken before the kill, then c3, c4, c5.
    let repeated = after.len().saturating_sub(3);
    assert!(
        repeated <= 2
            && after[..repeated] == seqs[2 - repeated..2]
            && after[repeated..] == seqs[2..],
        "after kill -9 every event comes, in order, and only events taken just before the kill may repeat: expected {:?} (optionally preceded by a suffix of {:?}), got {after:?}\n{}",
        &seqs[2..],
        &seqs[..2],
        describe_requests(&received)
    );
    for request in received.iter().filter(|r| r.taken()) {
        assert_eq!(
            request.header("x-grove-signature"),
            Some(sign("k", &request.body).as_str()),
            "signed after the restart too"
        );
    }

    // kill -9 while deliveries are busy (a slow receiver, events queued up): after the
    // restart every event comes, in order, and only events taken just before the kill repeat.
    receiver.delay(Duration::from_millis(150));
    let busy_from = receiver.received().len();
    let mut busy = Vec::new();
    for index in 0..10 {
        let reply = api_commit(&grove, "dur", "main", &format!("busy {index}"));
        assert_eq!(reply.status, 201, "{reply:?}");
        busy.push(reply.json()["id"].as_str().expect("id").to_string());
    }
    let busy: Vec<u64> = busy
        .iter()
        .map(|c| seq_of(&commit_event(&grove, c)))
        .collect();
    receiver.wait_for("four busy events taken", DELIVERY_TIMEOUT, |all| {
        all[busy_from..].iter().filter(|r| r.taken()).count() >= 4
    });
    grove.kill9();
    let killed_at = Instant::now();
    receiver.delay(Duration::ZERO);
    grove.spawn();
    receiver.wait_for("every busy event taken", DELIVERY_TIMEOUT, |all| {
        all.iter()
            .any(|r| r.taken() && r.at >= killed_at && r.seq() == busy[9])
    });
    thread::sleep(QUIET);
    let received = receiver.received();
    let before: Vec<u64> = received[busy_from..]
        .iter()
        .filter(|r| r.taken() && r.at < killed_at)
        .map(Received::seq)
        .collect();
    let after: Vec<u64> = received[busy_from..]
        .iter()
        .filter(|r| r.taken() && r.at >= killed_at)
        .map(Received::seq)
        .collect();
    // The receiver accepts connections by polling, so a delivery the old process sent just
    // before the kill can be read just after it: then the next event comes first, and the
    // new process's resumption (at or before it) follows.
    let (mut before, mut after) = (before, after);
    if after.len() > 1 && busy.get(before.len()) == after.first() && after[1] <= after[0] {
        before.push(after.remove(0));
    }
    let taken = before.len();
    assert!(
        taken >= 4 && before[..] == busy[..taken],
        "before the kill the busy events came in order: {before:?} of {busy:?}"
    );
    let resumed_at = busy.iter().position(|s| Some(s) == after.first());
    assert!(
        resumed_at.is_some_and(|k| k <= taken && after[..] == busy[k..]),
        "after kill -9 the hook resumes at or before the first event not taken ({}), then goes on in order with nothing missing: before the kill {before:?}, after {after:?}, events {busy:?}",
        busy.get(taken).copied().unwrap_or_default()
    );
    let repeated = taken - resumed_at.unwrap_or(taken);
    assert!(
        repeated <= 8,
        "{repeated} events were delivered again after kill -9; only the last few may be: before {before:?}, after {after:?}"
    );
    let seqs: Vec<u64> = seqs.iter().chain(&busy).copied().collect();
    let last = *seqs.last().expect("events");

    // SIGTERM once the hook is idle: nothing is delivered twice.
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    while show_hook(&grove, &id)["status"]["delivered_seq"]
        .as_u64()
        .unwrap_or(0)
        < last
    {
        assert!(
            Instant::now() < deadline,
            "delivered_seq does not reach {last}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(500));
    let count_before_term = receiver.received().len();
    let status = grove.terminate();
    assert!(
        status.success() || std::os::unix::process::ExitStatusExt::signal(&status) == Some(15),
        "SIGTERM ends grove cleanly: {status}"
    );
    grove.spawn();
    let c6 = grove.commit("dur", "c6");
    let s6 = seq_of(&commit_event(&grove, &c6));
    receiver.wait_for("c6 taken", DELIVERY_TIMEOUT, |all| {
        all.iter().any(|r| r.taken() && r.seq() == s6)
    });
    thread::sleep(QUIET);
    let received = receiver.received();
    let after_term: Vec<u64> = received[count_before_term..]
        .iter()
        .map(Received::seq)
        .collect();
    assert_eq!(
        after_term,
        vec![s6],
        "after a graceful restart the hook resumes after the last event it delivered: {}",
        describe_requests(&received)
    );
}

/// A pre-commit hook that refuses vetoes the commit (409 `vetoed_by_hook` with its reason)
/// and nothing changes; while it is called it reads the candidate commit over NBD, which holds
/// exactly the branch's data; writes to the branch wait for it; when it approves, the commit
/// gets the id the hook was told.
#[test]
fn pre_commit_veto_read_and_approve() {
    require_nbd_tools();
    let grove = Grove::start();
    let receiver = Receiver::start();
    let size = 8 * MIB;
    grove.create_volume("pc", "8MiB");
    let main = grove.unix_uri("pc");
    write_pattern(&main, 0x11, 0, MIB);
    let c0 = grove.commit("pc", "base");
    write_pattern(&main, 0x22, MIB, 512 * KIB);
    let expected = image(size as usize, &[(0x11, 0, MIB), (0x22, MIB, 512 * KIB)]);

    let nbd_port = grove.nbd_port;
    let scratch = grove.root().join("candidate.img");
    receiver.inspect(Arc::new(move |call: &Value| {
        let export = call["export"]
            .as_str()
            .ok_or_else(|| format!("no export in the call: {call}"))?;
        read_export(&format!("nbd://127.0.0.1:{nbd_port}/{export}"), &scratch)
    }));
    receiver.answer(403, "no commits on fridays");
    let hook = add_hook(
        &grove,
        &json!({
            "url": receiver.url(),
            "events": ["pre-commit"],
            "volume": "pc",
            "branch": "main",
            "timeout_ms": 30000,
        }),
    );
    let id = hook_id(&hook);
    let events_before = last_seq(&grove);

    let reply = api_commit(&grove, "pc", "main", "friday release");
    assert_vetoed(&reply, "no commits on fridays", "a vetoed commit");
    let received = receiver.wait_for("the pre-commit call", DELIVERY_TIMEOUT, |all| {
        !all.is_empty()
    });
    let call = received[0].json();
    assert_eq!(received[0].method, "POST");
    assert_eq!(call["type"], "pre-commit", "{call}");
    assert_eq!(received[0].header("x-grove-event"), Some("pre-commit"));
    assert_eq!(call["volume"], "pc", "{call}");
    assert_eq!(call["branch"], "main", "{call}");
    assert_eq!(call["parent"], c0.as_str(), "{call}");
    assert_eq!(call["message"], "friday release", "{call}");
    assert_eq!(call["author"], "hook-tester", "{call}");
    assert_eq!(
        call["changed_blocks"], 128,
        "512 KiB of 4 KiB blocks: {call}"
    );
    assert_eq!(
        call["changed_extents"],
        json!([{"offset_bytes": MIB, "len_bytes": 512 * KIB}]),
        "{call}"
    );
    let vetoed = call["commit"].as_str().expect("commit id").to_string();
    assert_eq!(call["export"], format!("pc@{vetoed}").as_str(), "{call}");
    match received[0].note.clone().expect("inspected") {
        Ok(bytes) => {
            if let Some(difference) = first_difference(&expected, &bytes) {
                panic!("the candidate read during the call differs: {difference}");
            }
        }
        Err(error) => panic!("the hook could not read the candidate over NBD:\n{error}"),
    }

    // Nothing changed.
    assert_eq!(commit_ids(&grove, "pc"), vec![c0.clone()]);
    let gone = grove.http("GET", &format!("/v1/volumes/pc/commits/{vetoed}"), None);
    assert_eq!(
        gone.status, 404,
        "the vetoed commit does not exist: {gone:?}"
    );
    let created = events_after(&grove, events_before, "&type=commit.created");
    assert!(
        created.is_empty(),
        "a vetoed commit logs no commit.created: {created:?}"
    );
    assert_patterns(
        &main,
        &[(0x11, 0, MIB), (0x22, MIB, 512 * KIB), (0, 2 * MIB, MIB)],
    );

    // The CLI reports the veto too.
    let out = grove.cli_err(&["commit", "pc", "-m", "again"]);
    assert!(
        out.stderr.contains("no commits on fridays"),
        "`grove commit` shows the hook's reason\n{}",
        out.report()
    );
    assert_eq!(commit_ids(&grove, "pc"), vec![c0.clone()]);

    // Approve, slowly: a write to the branch started during the call waits for it.
    receiver.answer(200, "fine");
    receiver.delay(Duration::from_millis(1500));
    let calls_before = receiver.inspected();
    let committer = {
        let api = grove.api();
        thread::spawn(move || {
            support::http(
                "POST",
                &format!("{api}/v1/volumes/pc/branches/main/commits"),
                Some(&json!({"message": "approved"}).to_string()),
            )
        })
    };
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    while receiver.inspected() == calls_before {
        assert!(Instant::now() < deadline, "the approving call never came");
        thread::sleep(Duration::from_millis(10));
    }
    let writer = {
        let uri = grove.tcp_uri("pc");
        thread::spawn(move || {
            write_pattern(&uri, 0x33, 2 * MIB, 64 * KIB);
            Instant::now()
        })
    };
    let written_at = writer.join().expect("the writer");
    let reply = committer.join().expect("the committer");
    assert_eq!(reply.status, 201, "an approved commit is made: {reply:?}");
    let made = reply.json()["id"].as_str().expect("id").to_string();
    let received = receiver.received();
    let approved = received.last().expect("the approving call");
    let call = approved.json();
    assert_eq!(
        made, call["commit"],
        "the commit gets the id the hook was told: {call}"
    );
    assert_eq!(call["parent"], c0.as_str(), "{call}");
    assert_eq!(call["message"], "approved", "{call}");
    assert!(
        written_at > approved.answered_at,
        "a write to the branch completed {:?} before the pre-commit hook answered; writes must wait",
        approved.answered_at.duration_since(written_at)
    );
    match approved.note.clone().expect("inspected") {
        Ok(bytes) => {
            if let Some(difference) = first_difference(&expected, &bytes) {
                panic!("the candidate read during the approving call differs: {difference}");
            }
        }
        Err(error) => panic!("the hook could not read the candidate over NBD:\n{error}"),
    }
    assert_eq!(commit_ids(&grove, "pc"), vec![made.clone(), c0.clone()]);
    let event = commit_event(&grove, &made);
    assert_eq!(event["parents"], json!([c0]), "{event}");
    // The commit holds what the hook read; the write made during the call is on the head only.
    assert_patterns(
        &grove.unix_uri(&format!("pc@{made}")),
        &[
            (0x11, 0, MIB),
            (0x22, MIB, 512 * KIB),
            (0, 2 * MIB, 64 * KIB),
        ],
    );
    assert_patterns(
        &main,
        &[
            (0x11, 0, MIB),
            (0x22, MIB, 512 * KIB),
            (0x33, 2 * MIB, 64 * KIB),
        ],
    );
    // Other branches are not this hook's business.
    grove.cli_ok(&["branch", "create", "pc", "side", "--from", &made]);
    let calls = receiver.received().len();
    grove.commit("pc@side", "no hook here");
    assert_eq!(
        receiver.received().len(),
        calls,
        "the branch glob keeps the hook off other branches"
    );
    delete_hook(&grove, &id);
}

/// A pre-commit hook that answers after its timeout vetoes the commit, promptly; with
/// `allow_on_timeout` the commit goes through, but a refusal still vetoes.
#[test]
fn pre_commit_timeout() {
    require_nbd_tools();
    let grove = Grove::start();
    let receiver = Receiver::start();
    grove.create_volume("pt", "8MiB");
    write_pattern(&grove.unix_uri("pt"), 0x5a, 0, 64 * KIB);
    receiver.delay(Duration::from_millis(3000));
    let strict = add_hook(
        &grove,
        &json!({"url": receiver.url(), "events": ["pre-commit"], "timeout_ms": 500}),
    );
    assert_eq!(strict["timeout_ms"], 500, "{strict}");
    let events_before = last_seq(&grove);
    let started = Instant::now();
    let reply = api_commit(&grove, "pt", "main", "too slow");
    let took = started.elapsed();
    reply.assert_error(&[409], "a commit whose hook timed out");
    assert_eq!(reply.json()["error"]["code"], "vetoed_by_hook", "{reply:?}");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(2500),
        "the veto comes at the hook's timeout (500 ms), took {took:?}"
    );
    assert!(
        events_after(&grove, events_before, "&type=commit.created").is_empty(),
        "no commit after a timeout"
    );
    let log = grove.cli_json(&["log", "pt"]);
    assert!(
        log.as_array().is_some_and(|l| l.is_empty()),
        "no commit in the log: {log}"
    );
    // The branch keeps its data and takes writes again.
    let main = grove.unix_uri("pt");
    assert_patterns(&main, &[(0x5a, 0, 64 * KIB)]);
    let started = Instant::now();
    write_pattern(&main, 0x5b, 64 * KIB, 64 * KIB);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a write after a timed-out pre-commit took {:?}",
        started.elapsed()
    );
    delete_hook(&grove, &hook_id(&strict));

    let lenient = add_hook(
        &grove,
        &json!({"url": receiver.url(), "events": ["pre-commit"], "timeout_ms": 500, "allow_on_timeout": true}),
    );
    assert_eq!(lenient["allow_on_timeout"], true, "{lenient}");
    let started = Instant::now();
    let reply = api_commit(&grove, "pt", "main", "slow but allowed");
    let took = started.elapsed();
    assert_eq!(
        reply.status, 201,
        "allow_on_timeout lets it through: {reply:?}"
    );
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    let made = reply.json()["id"].as_str().expect("id").to_string();
    assert_eq!(commit_ids(&grove, "pt"), vec![made.clone()]);
    assert_patterns(
        &grove.unix_uri(&format!("pt@{made}")),
        &[(0x5a, 0, 64 * KIB), (0x5b, 64 * KIB, 64 * KIB)],
    );
    // A refusal still vetoes.
    receiver.delay(Duration::ZERO);
    receiver.answer(403, "refused in time");
    let reply = api_commit(&grove, "pt", "main", "refused");
    assert_vetoed(
        &reply,
        "refused in time",
        "allow_on_timeout does not allow refusals",
    );
    assert_eq!(commit_ids(&grove, "pt"), vec![made]);
}

/// pre-delete vetoes deleting a branch, a tag, a commit and a volume; pre-merge vetoes a merge
/// and is told what it would do; nothing changes until the hook approves.
#[test]
fn pre_delete_and_pre_merge_veto() {
    require_nbd_tools();
    let mut grove = Grove::start();
    let receiver = Receiver::start();
    grove.create_volume("pd", "8MiB");
    let main = grove.unix_uri("pd");
    write_pattern(&main, 0x11, 0, 64 * KIB);
    let c0 = grove.commit("pd", "base");
    grove.cli_ok(&["branch", "create", "pd", "feature", "--from", &c0]);
    grove.cli_ok(&["branch", "create", "pd", "scratch", "--from", &c0]);
    grove.cli_ok(&["tag", "create", "pd", "t1", &c0]);
    write_pattern(&grove.unix_uri("pd@feature"), 0x22, 64 * KIB, 64 * KIB);
    let cf = grove.commit("pd@feature", "feature work");

    receiver.answer(403, "protected by policy");
    let hook = add_hook(
        &grove,
        &json!({"url": receiver.url(), "events": ["pre-delete", "pre-merge"], "volume": "pd"}),
    );
    let id = hook_id(&hook);

    // Deletes.
    let out = grove.cli_err(&["branch", "delete", "pd", "scratch"]);
    assert!(
        out.stderr.contains("protected by policy"),
        "`grove branch delete` shows the veto\n{}",
        out.report()
    );
    let reply = grove.http("DELETE", "/v1/volumes/pd/branches/scratch", None);
    assert_vetoed(&reply, "protected by policy", "branch delete");
    assert!(
        branch_names(&grove, "pd").contains(&"scratch".to_string()),
        "a vetoed branch delete keeps the branch"
    );
    let reply = grove.http("DELETE", "/v1/volumes/pd/tags/t1", None);
    assert_vetoed(&reply, "protected by policy", "tag delete");
    let tags = grove.cli_json(&["tag", "list", "pd"]);
    assert!(
        support::json_has_str(&tags, "t1"),
        "the tag is still there: {tags}"
    );
    let reply = grove.http("DELETE", &format!("/v1/volumes/pd/commits/{cf}"), None);
    assert_vetoed(&reply, "protected by policy", "commit delete");
    assert!(commit_ids(&grove, "pd@feature").contains(&cf));
    let reply = grove.http("DELETE", "/v1/volumes/pd", None);
    assert_vetoed(&reply, "protected by policy", "volume delete");
    let out = grove.cli_err(&["volume", "delete", "pd"]);
    assert!(
        out.stderr.contains("protected by policy"),
        "{}",
        out.report()
    );
    let shown = grove.http("GET", "/v1/volumes/pd", None);
    assert_eq!(shown.status, 200, "the volume is still there: {shown:?}");

    let calls: Vec<Value> = receiver.received().iter().map(Received::json).collect();
    let find = |kind: &str| -> Value {
        calls
            .iter()
            .find(|c| c["kind"] == kind)
            .cloned()
            .unwrap_or_else(|| panic!("no pre-delete call of kind {kind}: {calls:?}"))
    };
    assert!(calls.iter().all(|c| c["type"] == "pre-delete"), "{calls:?}");
    let call = find("branch");
    assert_eq!(
        (&call["volume"], &call["branch"]),
        (&json!("pd"), &json!("scratch"))
    );
    let call = find("tag");
    assert_eq!(
        (&call["volume"], &call["tag"]),
        (&json!("pd"), &json!("t1"))
    );
    let call = find("commit");
    assert_eq!(
        (&call["volume"], &call["commit"]),
        (&json!("pd"), &json!(cf))
    );
    let call = find("volume");
    assert_eq!(call["volume"], "pd", "{call}");
    assert!(receiver
        .received()
        .iter()
        .all(|r| r.header("x-grove-event") == Some("pre-delete")));

    // Merge.
    grove.wait_no_sessions();
    let calls_before = receiver.received().len();
    let out = grove.cli_err(&["merge", "pd", "--from", "feature", "--into", "main"]);
    assert!(
        out.stderr.contains("protected by policy"),
        "`grove merge` shows the veto\n{}",
        out.report()
    );
    let reply = grove.http(
        "POST",
        "/v1/volumes/pd/merges",
        Some(&json!({"from": "feature", "into": "main"}).to_string()),
    );
    assert_vetoed(&reply, "protected by policy", "merge");
    assert_eq!(
        head_commit(&grove, "pd", "main").as_deref(),
        Some(c0.as_str()),
        "a vetoed merge leaves the target where it was"
    );
    let received = receiver.received();
    let merge_call = received[calls_before].clone();
    assert_eq!(merge_call.header("x-grove-event"), Some("pre-merge"));
    let call = merge_call.json();
    assert_eq!(call["type"], "pre-merge", "{call}");
    assert_eq!(call["volume"], "pd", "{call}");
    assert_eq!(call["into"], "main", "{call}");
    assert_eq!(call["from"], "feature", "{call}");
    assert!(call["strategy"].is_string(), "{call}");
    assert_eq!(call["merge"]["outcome"], "fast_forward", "{call}");
    assert!(
        call["merge"]["conflicts"]
            .as_array()
            .is_some_and(|c| c.is_empty()),
        "{call}"
    );
    assert!(call["merge"]["taken"].is_array(), "{call}");
    assert_patterns(&main, &[(0x11, 0, 64 * KIB), (0, 64 * KIB, 64 * KIB)]);

    // Blocking hooks survive a crash.
    grove.restart_after_kill9();
    let main = grove.unix_uri("pd");
    let reply = grove.http("DELETE", "/v1/volumes/pd/branches/scratch", None);
    assert_vetoed(&reply, "protected by policy", "branch delete after kill -9");

    // Approved, both go through.
    receiver.answer(200, "ok");
    grove.cli_ok(&["branch", "delete", "pd", "scratch"]);
    assert!(!branch_names(&grove, "pd").contains(&"scratch".to_string()));
    grove.wait_no_sessions();
    grove.cli_ok(&["merge", "pd", "--from", "feature", "--into", "main"]);
    assert_eq!(
        head_commit(&grove, "pd", "main").as_deref(),
        Some(cf.as_str())
    );
    assert_patterns(&main, &[(0x11, 0, 64 * KIB), (0x22, 64 * KIB, 64 * KIB)]);
    delete_hook(&grove, &id);
}

/// An exec hook gets each event on stdin with GROVE_EVENT and GROVE_DELIVERY; events are
/// redelivered by hand over the API and with `grove hook redeliver`; `grove hook
/// list/show/deliveries/delete` work; bad hooks are refused with 400 and unknown ones 404.
#[test]
fn exec_hook_redelivery_cli_and_bad_input() {
    let grove = Grove::start();
    grove.create_volume("ex", "8MiB");
    let events_file = grove.root().join("events.jsonl");
    let env_file = grove.root().join("env.txt");
    let script =
        r#"cat >> "$0"; echo >> "$0"; printf '%s %s\n' "$GROVE_EVENT" "$GROVE_DELIVERY" >> "$1""#;
    let id = grove
        .cli_ok(&[
            "hook",
            "add",
            "--exec",
            "/bin/sh",
            "--arg=-c",
            &format!("--arg={script}"),
            &format!("--arg={}", events_file.display()),
            &format!("--arg={}", env_file.display()),
            "--event",
            "commit.created",
            "--volume",
            "ex",
        ])
        .trim()
        .to_string();
    assert!(
        !id.is_empty() && !id.contains(char::is_whitespace),
        "{id:?}"
    );
    let hook = show_hook(&grove, &id);
    assert_eq!(hook["url"], Value::Null, "{hook}");
    assert_eq!(
        hook["exec"],
        json!([
            "/bin/sh",
            "-c",
            script,
            events_file.display().to_string(),
            env_file.display().to_string()
        ]),
        "{hook}"
    );

    let c1 = grove.commit("ex", "one");
    let c2 = grove.commit("ex", "two");
    let e1 = commit_event(&grove, &c1);
    let e2 = commit_event(&grove, &c2);
    let read_lines = |path: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    };
    let wait_lines = |count: usize| -> Vec<Value> {
        let deadline = Instant::now() + DELIVERY_TIMEOUT;
        loop {
            let lines = read_lines(&events_file);
            if lines.len() >= count {
                return lines
                    .iter()
                    .map(|l| {
                        serde_json::from_str(l)
                            .unwrap_or_else(|e| panic!("stdin was not one JSON event ({e}): {l}"))
                    })
                    .collect();
            }
            assert!(
                Instant::now() < deadline,
                "the exec hook wrote {} of {count} events: {lines:?}",
                lines.len()
            );
            thread::sleep(Duration::from_millis(20));
        }
    };
    let got = wait_lines(2);
    assert_eq!(
        got,
        vec![e1.clone(), e2.clone()],
        "stdin carries the events"
    );
    let s1 = seq_of(&e1);
    let s2 = seq_of(&e2);
    assert_eq!(
        read_lines(&env_file),
        vec![
            format!("commit.created {id}:{s1}"),
            format!("commit.created {id}:{s2}")
        ],
        "GROVE_EVENT and GROVE_DELIVERY"
    );

    // Redelivery by hand: API, then CLI.
    let reply = grove.http(
        "POST",
        &format!("/v1/hooks/{id}/deliveries"),
        Some(&json!({"seq": s1}).to_string()),
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    let attempt = reply.json();
    assert_eq!(attempt["event_seq"], s1, "{attempt}");
    assert_eq!(attempt["type"], "commit.created", "{attempt}");
    assert_eq!(attempt["ok"], true, "{attempt}");
    assert_eq!(attempt["manual"], true, "{attempt}");
    assert_eq!(attempt["status"], 0, "exit code 0: {attempt}");
    let got = wait_lines(3);
    assert_eq!(got[2], e1, "the redelivered event");
    let out = grove.cli_ok(&["hook", "redeliver", &id, &s2.to_string()]);
    assert!(out.contains("ok"), "{out}");
    let got = wait_lines(4);
    assert_eq!(got[3], e2, "the event redelivered with the CLI");
    assert_eq!(
        read_lines(&env_file)[2..],
        [
            format!("commit.created {id}:{s1}"),
            format!("commit.created {id}:{s2}")
        ]
    );
    let attempt = grove.cli_json(&["hook", "redeliver", &id, &s1.to_string()]);
    assert_eq!(attempt["manual"], true, "{attempt}");
    wait_lines(5);

    // Deliveries, list and show.
    let attempts = grove.cli_json(&["hook", "deliveries", &id]);
    let attempts = attempts.as_array().expect("array").clone();
    let manual: Vec<(u64, bool)> = attempts
        .iter()
        .map(|a| (a["event_seq"].as_u64().expect("seq"), a["manual"] == true))
        .collect();
    assert_eq!(
        manual,
        vec![(s1, false), (s2, false), (s1, true), (s2, true), (s1, true)],
        "{attempts:?}"
    );
    assert!(attempts.iter().all(|a| a["ok"] == true), "{attempts:?}");
    let table = grove.cli_ok(&["hook", "deliveries", &id]);
    assert!(
        table.contains(&s1.to_string()) && table.contains("commit.created"),
        "{table}"
    );
    let listed = grove.cli_json(&["hook", "list"]);
    assert!(
        listed
            .as_array()
            .is_some_and(|hooks| hooks.len() == 1 && hooks[0]["id"] == id.as_str()),
        "{listed}"
    );
    let table = grove.cli_ok(&["hook", "list"]);
    assert!(
        table.contains(&id) && table.contains("commit.created"),
        "{table}"
    );
    let shown = grove.cli_json(&["hook", "show", &id]);
    assert_eq!(shown["id"], id.as_str(), "{shown}");
    assert_eq!(shown["status"]["deliveries_ok"], 5, "{shown}");
    let text = grove.cli_ok(&["hook", "show", &id]);
    assert!(text.contains(&id), "{text}");

    // A failing program: its exit code and stderr are the attempt's status and error.
    let failing = add_hook(
        &grove,
        &json!({"exec": ["/bin/sh", "-c", "cat > /dev/null; echo nope >&2; exit 3"], "events": ["tag.created"], "volume": "nothing-matches"}),
    );
    let failing_id = hook_id(&failing);
    let reply = grove.http(
        "POST",
        &format!("/v1/hooks/{failing_id}/deliveries"),
        Some(&json!({"seq": s1}).to_string()),
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    let attempt = reply.json();
    assert_eq!(attempt["ok"], false, "{attempt}");
    assert_eq!(attempt["status"], 3, "{attempt}");
    assert!(
        attempt["error"]
            .as_str()
            .is_some_and(|e| e.contains("nope")),
        "{attempt}"
    );
    let out = grove.cli_err(&["hook", "redeliver", &failing_id, &s1.to_string()]);
    assert!(!out.success(), "{}", out.report());
    delete_hook(&grove, &failing_id);

    // Unknown hooks and events.
    let reply = grove.http(
        "POST",
        &format!("/v1/hooks/{id}/deliveries"),
        Some(&json!({"seq": 999_999}).to_string()),
    );
    reply.assert_error(&[404], "redelivering an unknown event");
    for (method, path, body) in [
        ("GET", "/v1/hooks/h0000000000000000".to_string(), None),
        ("DELETE", "/v1/hooks/h0000000000000000".to_string(), None),
        (
            "GET",
            "/v1/hooks/h0000000000000000/deliveries".to_string(),
            None,
        ),
        (
            "POST",
            "/v1/hooks/h0000000000000000/deliveries".to_string(),
            Some(json!({"seq": s1}).to_string()),
        ),
    ] {
        let reply = grove.http(method, &path, body.as_deref());
        reply.assert_error(&[404], &format!("{method} {path}"));
    }
    grove.cli_err(&["hook", "show", "h0000000000000000"]);
    grove.cli_err(&["hook", "delete", "h0000000000000000"]);

    // Delete.
    let out = grove.cli_ok(&["hook", "delete", &id]);
    assert!(out.contains(&id), "{out}");
    let reply = grove.http("GET", &format!("/v1/hooks/{id}"), None);
    reply.assert_error(&[404], "a deleted hook");
    let listed = grove.cli_json(&["hook", "list"]);
    assert_eq!(listed, json!([]), "no hooks left");
    grove.commit("ex", "after the delete");
    thread::sleep(QUIET);
    assert_eq!(
        read_lines(&events_file).len(),
        5,
        "a deleted hook gets nothing more"
    );

    // Bad input: 400 with the error shape, and nothing is added.
    let url = "http://127.0.0.1:9/hook";
    let bad: Vec<(&str, Value)> = vec![
        (
            "ftp url",
            json!({"url": "ftp://example.com/x", "events": ["commit.created"]}),
        ),
        (
            "url without scheme",
            json!({"url": "example.com/hook", "events": ["commit.created"]}),
        ),
        (
            "empty url",
            json!({"url": "", "events": ["commit.created"]}),
        ),
        (
            "url without host",
            json!({"url": "http://", "events": ["commit.created"]}),
        ),
        (
            "url with spaces",
            json!({"url": "http://exa mple.com/hook", "events": ["commit.created"]}),
        ),
        (
            "unknown event",
            json!({"url": url, "events": ["commit.made"]}),
        ),
        ("empty events", json!({"url": url, "events": []})),
        ("no events", json!({"url": url})),
        (
            "url and exec",
            json!({"url": url, "exec": ["/bin/true"], "events": ["commit.created"]}),
        ),
        (
            "neither url nor exec",
            json!({"events": ["commit.created"]}),
        ),
        (
            "empty exec",
            json!({"exec": [], "events": ["commit.created"]}),
        ),
        (
            "bad volume glob",
            json!({"url": url, "events": ["commit.created"], "volume": "vol-[a"}),
        ),
        (
            "bad branch glob",
            json!({"url": url, "events": ["commit.created"], "branch": "rel-{a"}),
        ),
        (
            "timeout 0",
            json!({"url": url, "events": ["commit.created"], "timeout_ms": 0}),
        ),
        (
            "timeout too long",
            json!({"url": url, "events": ["commit.created"], "timeout_ms": 300_001}),
        ),
        (
            "negative timeout",
            json!({"url": url, "events": ["commit.created"], "timeout_ms": -5}),
        ),
        (
            "events not a list",
            json!({"url": url, "events": "commit.created"}),
        ),
    ];
    let mut accepted = Vec::new();
    for (what, body) in &bad {
        let reply = grove.http("POST", "/v1/hooks", Some(&body.to_string()));
        if reply.status == 201 {
            accepted.push(format!("{what}: {body} -> {}", reply.body));
            delete_hook(&grove, &hook_id(&reply.json()));
            continue;
        }
        reply.assert_error(&[400], &format!("{what}: {body}"));
    }
    let reply = grove.http("POST", "/v1/hooks", Some("{not json"));
    reply.assert_error(&[400], "a body that is not JSON");
    let out = grove.cli_err(&[
        "hook",
        "add",
        "ftp://example.com/x",
        "--event",
        "commit.created",
    ]);
    assert!(out.stderr.contains("url"), "{}", out.report());
    grove.cli_err(&["hook", "add", url, "--event", "commit.made"]);
    assert_eq!(
        grove.cli_json(&["hook", "list"]),
        json!([]),
        "refused hooks are not added"
    );
    // The limits themselves are fine.
    for timeout in [1, 300_000] {
        let hook = add_hook(
            &grove,
            &json!({"url": url, "events": ["commit.created"], "timeout_ms": timeout}),
        );
        assert_eq!(hook["timeout_ms"], timeout, "{hook}");
        delete_hook(&grove, &hook_id(&hook));
    }
    assert!(
        accepted.is_empty(),
        "bad hooks were accepted with 201:\n{}",
        accepted.join("\n")
    );
}
