//! Every route against a real engine pool in a temporary directory.

#![allow(clippy::unwrap_used)]

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use grove_engine::{Pool, PoolOptions};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tempfile::TempDir;
use tower::ServiceExt;

struct Api {
    router: Router,
    pool: Pool,
    _dir: TempDir,
}

struct Reply {
    status: StatusCode,
    location: Option<String>,
    content_type: Option<String>,
    body: Value,
}

impl Reply {
    #[track_caller]
    fn expect(self, status: StatusCode) -> Value {
        assert_eq!(self.status, status, "body: {}", self.body);
        self.body
    }

    /// Asserts an error reply with `status` and `code`, and returns its message.
    #[track_caller]
    fn expect_error(self, status: StatusCode, code: &str) -> String {
        assert_eq!(self.status, status, "body: {}", self.body);
        let error = self.body["error"].as_object().expect("an error object");
        assert_eq!(error.len(), 2, "{}", self.body);
        assert_eq!(error["code"], code, "{}", self.body);
        error["message"].as_str().expect("a message").to_string()
    }
}

impl Api {
    fn new() -> Api {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = Pool::open(PoolOptions::new(dir.path())).expect("open pool");
        Api {
            router: grove_mgmt_api::router(pool.clone()),
            pool,
            _dir: dir,
        }
    }

    async fn send(&self, request: Request<Body>) -> Reply {
        let response = self
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("infallible");
        let status = response.status();
        let header_text = |name| {
            response
                .headers()
                .get(name)
                .map(|v: &header::HeaderValue| v.to_str().expect("ASCII header").to_string())
        };
        let location = header_text(header::LOCATION);
        let content_type = header_text(header::CONTENT_TYPE);
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                panic!("not JSON ({error}): {}", String::from_utf8_lossy(&bytes))
            })
        };
        Reply {
            status,
            location,
            content_type,
            body,
        }
    }

    async fn call(&self, method: Method, uri: &str, body: Option<Value>) -> Reply {
        let request = Request::builder().method(method).uri(uri);
        let request = match body {
            Some(body) => request
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string())),
            None => request.body(Body::empty()),
        };
        self.send(request.expect("request")).await
    }

    async fn raw_post(&self, uri: &str, content_type: Option<&str>, body: &str) -> Reply {
        let mut request = Request::builder().method(Method::POST).uri(uri);
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        self.send(request.body(Body::from(body.to_string())).expect("request"))
            .await
    }

    async fn get(&self, uri: &str) -> Reply {
        self.call(Method::GET, uri, None).await
    }

    async fn post(&self, uri: &str, body: Value) -> Reply {
        self.call(Method::POST, uri, Some(body)).await
    }

    async fn delete(&self, uri: &str) -> Reply {
        self.call(Method::DELETE, uri, None).await
    }

    async fn volume(&self, name: &str) {
        self.post("/v1/volumes", json!({"name": name, "size": "64MiB"}))
            .await
            .expect(StatusCode::CREATED);
    }

    async fn commit(&self, volume: &str, branch: &str, message: &str) -> String {
        let branch = branch.replace('/', "%2F");
        let commit = self
            .post(
                &format!("/v1/volumes/{volume}/branches/{branch}/commits"),
                json!({"message": message}),
            )
            .await
            .expect(StatusCode::CREATED);
        commit["id"].as_str().expect("id").to_string()
    }
}

#[tokio::test]
async fn volume_lifecycle() {
    let api = Api::new();
    assert_eq!(
        api.get("/v1/volumes").await.expect(StatusCode::OK),
        json!([])
    );

    let reply = api
        .post("/v1/volumes", json!({"name": "vm-1", "size": "10GiB"}))
        .await;
    assert_eq!(reply.location.as_deref(), Some("/v1/volumes/vm-1"));
    let volume = reply.expect(StatusCode::CREATED);
    assert_eq!(volume["name"], "vm-1");
    assert_eq!(volume["size_bytes"], 10u64 << 30);
    assert_eq!(volume["branches"], 1);
    assert_eq!(volume["commits"], 0);

    let volume = api
        .post("/v1/volumes", json!({"name": "vm-2", "size": 1048576}))
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(volume["size_bytes"], 1 << 20);

    let list = api.get("/v1/volumes").await.expect(StatusCode::OK);
    let names: Vec<_> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v["name"].clone())
        .collect();
    assert_eq!(names, [json!("vm-1"), json!("vm-2")]);

    let shown = api.get("/v1/volumes/vm-1").await.expect(StatusCode::OK);
    assert_eq!(shown["size_bytes"], 10u64 << 30);

    api.post("/v1/volumes", json!({"name": "vm-1", "size": "1GiB"}))
        .await
        .expect_error(StatusCode::CONFLICT, "already_exists");

    assert_eq!(
        api.delete("/v1/volumes/vm-1")
            .await
            .expect(StatusCode::NO_CONTENT),
        Value::Null
    );
    api.get("/v1/volumes/vm-1")
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    api.delete("/v1/volumes/vm-1")
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn volume_requests_are_validated() {
    let api = Api::new();
    let cases = [
        (
            json!({"name": "VM", "size": "1GiB"}),
            "invalid_argument",
            "invalid volume name",
        ),
        (
            json!({"name": "", "size": "1GiB"}),
            "invalid_argument",
            "invalid volume name",
        ),
        (
            json!({"name": "vm", "size": "10XB"}),
            "invalid_request",
            "invalid size \"10XB\"",
        ),
        (
            json!({"name": "vm", "size": -5}),
            "invalid_request",
            "must not be negative",
        ),
        (
            json!({"name": "vm", "size": 1.5}),
            "invalid_request",
            "whole number",
        ),
        (
            json!({"name": "vm", "size": 4095}),
            "invalid_argument",
            "multiple of the 4096-byte",
        ),
        (
            json!({"name": "vm", "size": 0}),
            "invalid_argument",
            "at least one",
        ),
        (
            json!({"name": "vm", "size": "2PiB"}),
            "invalid_argument",
            "largest volume",
        ),
        (
            json!({"name": "vm"}),
            "invalid_request",
            "missing field `size`",
        ),
        (
            json!({"name": 5, "size": 4096}),
            "invalid_request",
            "invalid type",
        ),
        (
            json!({"name": "vm", "size": 4096, "color": "red"}),
            "invalid_request",
            "unknown field `color`",
        ),
        (json!(["vm"]), "invalid_request", "invalid"),
    ];
    for (body, code, needle) in cases {
        let message = api
            .post("/v1/volumes", body.clone())
            .await
            .expect_error(StatusCode::BAD_REQUEST, code);
        assert!(message.contains(needle), "{body}: {message}");
    }

    let message = api
        .raw_post(
            "/v1/volumes",
            Some("application/json"),
            "{\"name\": \"vm\",",
        )
        .await
        .expect_error(StatusCode::BAD_REQUEST, "invalid_request");
    assert!(message.starts_with("malformed JSON body"), "{message}");
    let huge = format!(
        "{{\"name\": \"vm\", \"size\": 4096, \"x\": \"{}\"}}",
        "a".repeat(3 << 20)
    );
    api.raw_post("/v1/volumes", Some("application/json"), &huge)
        .await
        .expect_error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    api.raw_post("/v1/volumes", None, "{\"name\": \"vm\", \"size\": 4096}")
        .await
        .expect_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    api.raw_post(
        "/v1/volumes",
        Some("text/plain"),
        "{\"name\": \"vm\", \"size\": 4096}",
    )
    .await
    .expect_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");

    api.get("/v1/volumes/Bad_Name")
        .await
        .expect_error(StatusCode::BAD_REQUEST, "invalid_argument");
    assert_eq!(
        api.get("/v1/volumes").await.expect(StatusCode::OK),
        json!([])
    );
}

#[tokio::test]
async fn branches_with_slashes_in_their_names() {
    let api = Api::new();
    api.volume("vm").await;

    let reply = api
        .post("/v1/volumes/vm/branches", json!({"name": "feature/x"}))
        .await;
    assert_eq!(
        reply.location.as_deref(),
        Some("/v1/volumes/vm/branches/feature%2Fx")
    );
    let branch = reply.expect(StatusCode::CREATED);
    assert_eq!(branch["name"], "feature/x");
    assert_eq!(branch["volume"], "vm");

    let branch = api
        .get("/v1/volumes/vm/branches/feature%2Fx")
        .await
        .expect(StatusCode::OK);
    assert_eq!(branch["name"], "feature/x");
    // Lower-case escapes decode the same way.
    api.get("/v1/volumes/vm/branches/feature%2fx")
        .await
        .expect(StatusCode::OK);

    let message = api
        .get("/v1/volumes/vm/branches/feature/x")
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    assert!(message.contains("%2F"), "{message}");

    let list = api
        .get("/v1/volumes/vm/branches")
        .await
        .expect(StatusCode::OK);
    let mut names: Vec<_> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|b| b["name"].as_str().unwrap_or("").to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["feature/x", "main"]);

    api.post("/v1/volumes/vm/branches", json!({"name": "feature/x"}))
        .await
        .expect_error(StatusCode::CONFLICT, "already_exists");
    api.post("/v1/volumes/vm/branches", json!({"name": ".."}))
        .await
        .expect_error(StatusCode::BAD_REQUEST, "invalid_argument");
    let message = api
        .delete("/v1/volumes/vm/branches/main")
        .await
        .expect_error(StatusCode::CONFLICT, "conflict");
    assert!(message.contains("main"), "{message}");

    assert_eq!(
        api.delete("/v1/volumes/vm/branches/feature%2Fx")
            .await
            .expect(StatusCode::NO_CONTENT),
        Value::Null
    );
    api.get("/v1/volumes/vm/branches/feature%2Fx")
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn branches_start_from_refs_of_the_volume() {
    let api = Api::new();
    api.volume("vm").await;
    api.volume("other").await;
    let first = api.commit("vm", "main", "first").await;
    let second = api.commit("vm", "main", "second").await;
    api.post("/v1/volumes/vm/tags", json!({"name": "v1", "ref": first}))
        .await
        .expect(StatusCode::CREATED);

    let from_main = api
        .post("/v1/volumes/vm/branches", json!({"name": "a"}))
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(from_main["head_commit"], second.as_str());
    let from_tag = api
        .post(
            "/v1/volumes/vm/branches",
            json!({"name": "b", "from": "v1"}),
        )
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(from_tag["head_commit"], first.as_str());
    let from_prefix = api
        .post(
            "/v1/volumes/vm/branches",
            json!({"name": "c", "from": &first[..8]}),
        )
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(from_prefix["head_commit"], first.as_str());
    let from_full_ref = api
        .post(
            "/v1/volumes/vm/branches",
            json!({"name": "d", "from": "vm@b"}),
        )
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(from_full_ref["head_commit"], first.as_str());

    api.post(
        "/v1/volumes/vm/branches",
        json!({"name": "e", "from": "other@main"}),
    )
    .await
    .expect_error(StatusCode::BAD_REQUEST, "invalid_argument");
    api.post(
        "/v1/volumes/vm/branches",
        json!({"name": "e", "from": "nope"}),
    )
    .await
    .expect_error(StatusCode::NOT_FOUND, "not_found");
    api.post("/v1/volumes/vm/branches", json!({"name": "bad name"}))
        .await
        .expect_error(StatusCode::BAD_REQUEST, "invalid_argument");
    api.post(
        "/v1/volumes/vm/branches",
        json!({"name": "e", "form": "main"}),
    )
    .await
    .expect_error(StatusCode::BAD_REQUEST, "invalid_request");
    api.post("/v1/volumes/nope/branches", json!({"name": "e"}))
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    api.get("/v1/volumes/nope/branches")
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn commits_and_log() {
    let api = Api::new();
    api.volume("vm").await;

    let reply = api
        .post(
            "/v1/volumes/vm/branches/main/commits",
            json!({"message": "base", "author": "ana", "meta": {"dataset:version": "3"}}),
        )
        .await;
    let location = reply.location.clone().expect("location");
    let commit = reply.expect(StatusCode::CREATED);
    let id = commit["id"].as_str().expect("id").to_string();
    assert_eq!(id.len(), 32);
    assert!(id
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_eq!(location, format!("/v1/volumes/vm/commits/{id}"));
    assert_eq!(commit["volume"], "vm");
    assert_eq!(commit["branch"], "main");
    assert_eq!(commit["message"], "base");
    assert_eq!(commit["author"], "ana");
    assert_eq!(commit["meta"], json!({"dataset:version": "3"}));
    assert_eq!(commit["parents"], json!([]));

    assert_eq!(api.get(&location).await.expect(StatusCode::OK), commit);
    let by_prefix = api
        .get(&format!("/v1/volumes/vm/commits/{}", &id[..6]))
        .await
        .expect(StatusCode::OK);
    assert_eq!(by_prefix["id"], id.as_str());
    let upper = api
        .get(&format!(
            "/v1/volumes/vm/commits/{}",
            id.to_ascii_uppercase()
        ))
        .await
        .expect(StatusCode::OK);
    assert_eq!(upper["id"], id.as_str());

    let second = api.commit("vm", "main", "second").await;
    api.post("/v1/volumes/vm/branches", json!({"name": "dev/1"}))
        .await
        .expect(StatusCode::CREATED);
    let on_dev = api.commit("vm", "dev/1", "on dev").await;

    let log = api.get("/v1/volumes/vm/log").await.expect(StatusCode::OK);
    let ids: Vec<_> = log
        .as_array()
        .expect("array")
        .iter()
        .map(|c| c["id"].clone())
        .collect();
    assert_eq!(ids, [json!(second), json!(id)]);
    let log = api
        .get("/v1/volumes/vm/log?ref=dev%2F1&limit=2")
        .await
        .expect(StatusCode::OK);
    let ids: Vec<_> = log
        .as_array()
        .expect("array")
        .iter()
        .map(|c| c["id"].clone())
        .collect();
    assert_eq!(ids, [json!(on_dev), json!(second)]);
    let log = api
        .get("/v1/volumes/vm/log?ref=vm@main&limit=1")
        .await
        .expect(StatusCode::OK);
    assert_eq!(log.as_array().map(Vec::len), Some(1));
    let log = api
        .get(&format!("/v1/volumes/vm/log?ref={}", &id[..8]))
        .await
        .expect(StatusCode::OK);
    assert_eq!(log.as_array().map(Vec::len), Some(1));

    api.get("/v1/volumes/vm/log?limit=0")
        .await
        .expect_error(StatusCode::BAD_REQUEST, "invalid_argument");
    api.get("/v1/volumes/vm/log?limit=many")
        .await
        .expect_error(StatusCode::BAD_REQUEST, "invalid_request");
    api.get("/v1/volumes/vm/log?limt=1")
        .await
        .expect_error(StatusCode::BAD_REQUEST, "invalid_request");
    api.get("/v1/volumes/vm/log?ref=a%20b")
        .await
        .expect_error(StatusCode::BAD_REQUEST, "invalid_argument");
    api.get("/v1/volumes/vm/log?ref=nope")
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    api.get("/v1/volumes/nope/log")
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");

    api.get("/v1/volumes/vm/commits/xyz")
        .await
        .expect_error(StatusCode::BAD_REQUEST, "invalid_argument");
    api.get(&format!("/v1/volumes/vm/commits/{}", "0".repeat(32)))
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");

    for body in [
        json!({"message": ""}),
        json!({"message": "m", "author": ""}),
        json!({"message": "m", "meta": {"bad key": "v"}}),
    ] {
        api.post("/v1/volumes/vm/branches/main/commits", body)
            .await
            .expect_error(StatusCode::BAD_REQUEST, "invalid_argument");
    }
    for body in [
        json!({}),
        json!({"message": "m", "extra": 1}),
        json!({"message": "m", "meta": {"k": 1}}),
    ] {
        api.post("/v1/volumes/vm/branches/main/commits", body)
            .await
            .expect_error(StatusCode::BAD_REQUEST, "invalid_request");
    }
    api.post(
        "/v1/volumes/vm/branches/nope/commits",
        json!({"message": "m"}),
    )
    .await
    .expect_error(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn tags() {
    let api = Api::new();
    api.volume("vm").await;
    api.post(
        "/v1/volumes/vm/tags",
        json!({"name": "early", "ref": "main"}),
    )
    .await
    .expect_error(StatusCode::BAD_REQUEST, "invalid_argument");
    let id = api.commit("vm", "main", "base").await;

    let reply = api
        .post(
            "/v1/volumes/vm/tags",
            json!({"name": "release/1.0", "ref": "main"}),
        )
        .await;
    assert_eq!(
        reply.location.as_deref(),
        Some("/v1/volumes/vm/tags/release%2F1.0")
    );
    let tag = reply.expect(StatusCode::CREATED);
    assert_eq!(tag["name"], "release/1.0");
    assert_eq!(tag["commit"], id.as_str());

    let shown = api
        .get("/v1/volumes/vm/tags/release%2F1.0")
        .await
        .expect(StatusCode::OK);
    assert_eq!(shown, tag);
    assert_eq!(
        api.get("/v1/volumes/vm/tags").await.expect(StatusCode::OK),
        json!([tag])
    );

    api.post(
        "/v1/volumes/vm/tags",
        json!({"name": "release/1.0", "ref": "main"}),
    )
    .await
    .expect_error(StatusCode::CONFLICT, "already_exists");
    api.post("/v1/volumes/vm/tags", json!({"name": "t", "ref": "nope"}))
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    api.post("/v1/volumes/vm/tags", json!({"name": "t"}))
        .await
        .expect_error(StatusCode::BAD_REQUEST, "invalid_request");
    api.post("/v1/volumes/vm/tags", json!({"name": "t t", "ref": "main"}))
        .await
        .expect_error(StatusCode::BAD_REQUEST, "invalid_argument");

    let by_commit = api
        .post(
            "/v1/volumes/vm/tags",
            json!({"name": "t2", "ref": format!("vm@{}", &id[..10])}),
        )
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(by_commit["commit"], id.as_str());

    assert_eq!(
        api.delete("/v1/volumes/vm/tags/release%2F1.0")
            .await
            .expect(StatusCode::NO_CONTENT),
        Value::Null
    );
    api.get("/v1/volumes/vm/tags/release%2F1.0")
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    api.delete("/v1/volumes/vm/tags/release%2F1.0")
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn pool_sessions_and_probes() {
    let api = Api::new();
    api.volume("vm").await;

    let pool = api.get("/v1/pool").await.expect(StatusCode::OK);
    for field in [
        "capacity_bytes",
        "used_bytes",
        "free_bytes",
        "metadata_bytes",
    ] {
        assert!(pool[field].is_u64(), "{field}: {pool}");
    }
    assert!(pool["io_backend"].is_string());

    assert_eq!(
        api.get("/v1/sessions").await.expect(StatusCode::OK),
        json!([])
    );
    let client = grove_engine::SessionClient {
        protocol: "nbd".into(),
        address: "127.0.0.1:5000".into(),
    };
    let session = api.pool.open_session("vm", client).expect("open session");
    let sessions = api.get("/v1/sessions").await.expect(StatusCode::OK);
    assert_eq!(sessions[0]["id"], session.id());
    assert_eq!(sessions[0]["export"], "vm");
    assert_eq!(
        sessions[0]["target"],
        json!({"kind": "branch", "volume": "vm", "branch": "main"})
    );
    assert_eq!(sessions[0]["client"]["protocol"], "nbd");
    assert_eq!(sessions[0]["counters"]["read_ops"], 0);
    api.delete("/v1/volumes/vm")
        .await
        .expect_error(StatusCode::CONFLICT, "conflict");
    drop(session);
    assert_eq!(
        api.get("/v1/sessions").await.expect(StatusCode::OK),
        json!([])
    );

    assert_eq!(
        api.get("/healthz").await.expect(StatusCode::OK),
        json!({"status": "ok"})
    );
    assert_eq!(
        api.get("/readyz").await.expect(StatusCode::OK),
        json!({"status": "ready"})
    );

    let reply = api.get("/v1/openapi.json").await;
    assert_eq!(reply.content_type.as_deref(), Some("application/json"));
    let document = reply.expect(StatusCode::OK);
    assert!(document["paths"]["/v1/volumes/{vol}/branches/{branch}/commits"]["post"].is_object());
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_json() {
    let api = Api::new();
    api.get("/v2/volumes")
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    api.get("/")
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    api.call(Method::PUT, "/v1/volumes", None)
        .await
        .expect_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    api.delete("/v1/pool")
        .await
        .expect_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    api.get("/v1/volumes/vm/branches/%FF")
        .await
        .expect_error(StatusCode::BAD_REQUEST, "invalid_request");
}

// ---------------------------------------------------------------------------------------------
// History: diff, blame, merges, reset, commit deletion, clones and space.

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

impl Api {
    /// Writes `len` bytes of `byte` at `offset` through an engine session on `export`.
    async fn write(&self, export: &str, offset: u64, byte: u8, len: u64) {
        let session = self.session(export);
        session
            .write(offset, &vec![byte; len as usize], true)
            .await
            .expect("write");
    }

    /// Reads `len` bytes at `offset` of `export`.
    async fn read(&self, export: &str, offset: u64, len: u64) -> Vec<u8> {
        self.session(export).read(offset, len).await.expect("read")
    }

    #[track_caller]
    fn session(&self, export: &str) -> std::sync::Arc<grove_engine::Session> {
        let client = grove_engine::SessionClient {
            protocol: "test".into(),
            address: "local".into(),
        };
        self.pool
            .open_session(export, client)
            .expect("open session")
    }

    async fn branch(&self, volume: &str, name: &str, from: &str) {
        self.post(
            &format!("/v1/volumes/{volume}/branches"),
            json!({"name": name, "from": from}),
        )
        .await
        .expect(StatusCode::CREATED);
    }

    async fn head_of(&self, volume: &str, branch: &str) -> Value {
        let branch = branch.replace('/', "%2F");
        self.get(&format!("/v1/volumes/{volume}/branches/{branch}"))
            .await
            .expect(StatusCode::OK)
    }
}

fn ranges(value: &Value) -> Vec<(u64, u64)> {
    value
        .as_array()
        .expect("an array of ranges")
        .iter()
        .map(|r| {
            (
                r["offset_bytes"].as_u64().expect("offset_bytes"),
                r["len_bytes"].as_u64().expect("len_bytes"),
            )
        })
        .collect()
}

/// Asserts an error reply carrying conflicting ranges (code `merge_conflict`).
#[track_caller]
fn expect_merge_conflict(reply: Reply) -> (String, Vec<(u64, u64)>) {
    assert_eq!(reply.status, StatusCode::CONFLICT, "body: {}", reply.body);
    let error = &reply.body["error"];
    assert_eq!(error["code"], "merge_conflict", "{}", reply.body);
    (
        error["message"].as_str().expect("message").to_string(),
        ranges(&error["conflicts"]),
    )
}

#[tokio::test]
async fn diffs_between_siblings_ancestors_and_heads() {
    let api = Api::new();
    api.volume("vm").await;
    api.write("vm", 0, 0xaa, 8 * KIB).await;
    let base = api.commit("vm", "main", "base").await;
    api.branch("vm", "dev/1", "main").await;
    api.write("vm@dev/1", 8 * KIB, 0xbb, 4 * KIB).await;
    api.write("vm", 64 * KIB, 0xcc, 4 * KIB).await;
    let main2 = api.commit("vm", "main", "main 2").await;
    api.commit("vm", "dev/1", "dev 1").await;

    // Siblings: what each side changed since they split.
    let diff = api
        .get("/v1/volumes/vm/diff?from=main&to=dev/1")
        .await
        .expect(StatusCode::OK);
    assert_eq!(
        ranges(&diff["extents"]),
        [(8 * KIB, 4 * KIB), (64 * KIB, 4 * KIB)]
    );
    assert_eq!(diff["extent_count"], 2);
    assert_eq!(diff["changed_bytes"], 8 * KIB);
    assert_eq!(diff["changed_blocks"], 2);
    assert_eq!(diff["block_size_bytes"], 4096);
    assert_eq!(diff["extents_truncated"], false);
    assert!(diff["candidate_blocks"].as_u64().expect("candidates") >= 2);
    assert!(diff["note"].as_str().expect("note").contains("identical"));
    assert_eq!(diff["from"]["name"], "vm");
    assert_eq!(diff["from"]["kind"], "branch");
    assert_eq!(diff["to"]["name"], "vm@dev/1");
    assert_eq!(diff["to"]["branch"], "dev/1");

    // Ancestor and descendant, by commit id, prefix and full ref.
    let diff = api
        .get(&format!(
            "/v1/volumes/vm/diff?from={}&to=vm@{main2}",
            &base[..8]
        ))
        .await
        .expect(StatusCode::OK);
    assert_eq!(ranges(&diff["extents"]), [(64 * KIB, 4 * KIB)]);
    assert_eq!(diff["from"]["kind"], "commit");
    assert_eq!(diff["from"]["commit"], base.as_str());
    let same = api
        .get(&format!("/v1/volumes/vm/diff?from={main2}&to=main"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(same["extent_count"], 0);
    assert_eq!(same["changed_bytes"], 0);

    // A head with uncommitted writes.
    api.write("vm", MIB, 0xdd, 12 * KIB).await;
    let diff = api
        .get(&format!("/v1/volumes/vm/diff?from={main2}&to=main"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(ranges(&diff["extents"]), [(MIB, 12 * KIB)]);

    // A limit cuts the list, not the counts.
    let diff = api
        .get("/v1/volumes/vm/diff?from=main&to=dev/1&limit=1")
        .await
        .expect(StatusCode::OK);
    assert_eq!(ranges(&diff["extents"]).len(), 1);
    assert_eq!(diff["extent_count"], 3);
    assert_eq!(diff["extents_truncated"], true);

    // Bad input.
    api.volume("other").await;
    let cases: [(&str, StatusCode, &str); 10] = [
        (
            "/v1/volumes/vm/diff?from=main",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/volumes/vm/diff?from=a%20b&to=main",
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
        (
            "/v1/volumes/vm/diff?from=main&to=main&limit=0",
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
        (
            "/v1/volumes/vm/diff?from=main&to=main&color=red",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/volumes/vm/diff?from=nope&to=main",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "/v1/volumes/vm/diff?from=main&to=vm@nope",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "/v1/volumes/vm/diff?from=main&to=ffffffffffff",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "/v1/volumes/nope/diff?from=main&to=main",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "/v1/volumes/vm/diff?from=main&to=other@main",
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
        (
            "/v1/volumes/Bad/diff?from=main&to=main",
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
    ];
    for (uri, status, code) in cases {
        let message = api.get(uri).await.expect_error(status, code);
        assert!(!message.is_empty(), "{uri}");
    }
    let message = api
        .get("/v1/volumes/vm/diff?from=nope&to=main")
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    assert!(message.contains("\"nope\""), "{message}");
    let message = api
        .get("/v1/volumes/vm/diff?from=main&to=other")
        .await
        .expect_error(StatusCode::BAD_REQUEST, "invalid_argument");
    assert!(message.contains("unrelated"), "{message}");
}

#[tokio::test]
async fn blame_credits_each_range_to_its_writer() {
    let api = Api::new();
    api.volume("vm").await;
    api.write("vm", 0, 0x11, 16 * KIB).await;
    let first = api.commit("vm", "main", "first").await;
    api.write("vm", 4 * KIB, 0x22, 4 * KIB).await;
    let second = api.commit("vm", "main", "second").await;
    api.write("vm", 12 * KIB, 0x33, 4 * KIB).await;

    let blame = api
        .get("/v1/volumes/vm/blame?offset=0&length=32KiB")
        .await
        .expect(StatusCode::OK);
    assert_eq!(blame["ref"]["name"], "vm");
    assert_eq!(blame["offset_bytes"], 0);
    assert_eq!(blame["len_bytes"], 32 * KIB);
    let parts: Vec<(u64, u64, String, Option<String>)> = blame["ranges"]
        .as_array()
        .expect("ranges")
        .iter()
        .map(|r| {
            (
                r["offset_bytes"].as_u64().expect("offset"),
                r["len_bytes"].as_u64().expect("len"),
                r["state"].as_str().expect("state").to_string(),
                r["commit"]["id"].as_str().map(str::to_string),
            )
        })
        .collect();
    let committed = |offset, len, id: &str| (offset, len, "committed".into(), Some(id.into()));
    assert_eq!(
        parts,
        [
            committed(0, 4 * KIB, &first),
            committed(4 * KIB, 4 * KIB, &second),
            committed(8 * KIB, 4 * KIB, &first),
            (12 * KIB, 4 * KIB, "uncommitted".into(), None),
            (16 * KIB, 16 * KIB, "never_written".into(), None),
        ]
    );

    // An unaligned range within a commit, by tag.
    api.post("/v1/volumes/vm/tags", json!({"name": "v1", "ref": first}))
        .await
        .expect(StatusCode::CREATED);
    let blame = api
        .get("/v1/volumes/vm/blame?ref=v1&offset=5000&length=100")
        .await
        .expect(StatusCode::OK);
    assert_eq!(blame["ref"]["kind"], "tag");
    assert_eq!(
        blame["ranges"],
        json!([{"offset_bytes": 5000, "len_bytes": 100, "state": "committed",
            "commit": blame["ranges"][0]["commit"].clone()}])
    );
    assert_eq!(blame["ranges"][0]["commit"]["message"], "first");

    for (uri, status, code) in [
        (
            "/v1/volumes/vm/blame?offset=0",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/volumes/vm/blame?offset=abc&length=1",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/volumes/vm/blame?offset=64MiB&length=1",
            StatusCode::BAD_REQUEST,
            "out_of_range",
        ),
        (
            "/v1/volumes/vm/blame?offset=0&length=18446744073709551615",
            StatusCode::BAD_REQUEST,
            "out_of_range",
        ),
        (
            "/v1/volumes/vm/blame?ref=nope&offset=0&length=1",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "/v1/volumes/vm/blame?ref=other@main&offset=0&length=1",
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
        (
            "/v1/volumes/nope/blame?offset=0&length=1",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ] {
        api.get(uri).await.expect_error(status, code);
    }
}

#[tokio::test]
async fn merges_with_every_strategy() {
    let api = Api::new();
    api.volume("vm").await;
    api.write("vm", 0, 0x01, 64 * KIB).await;
    let base = api.commit("vm", "main", "base").await;
    api.branch("vm", "feature/a", "main").await;
    api.branch("vm", "b", "main").await;

    // Fast-forward: main has nothing of its own.
    api.write("vm@feature/a", 0, 0xaa, 4 * KIB).await;
    let a1 = api.commit("vm", "feature/a", "a1").await;
    let report = api
        .post(
            "/v1/volumes/vm/merges",
            json!({"from": "feature/a", "into": "main"}),
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(report["outcome"], "fast_forward");
    assert_eq!(report["commit"]["id"], a1.as_str());
    assert_eq!(report["base"], base.as_str());
    assert_eq!(api.head_of("vm", "main").await["head_commit"], a1.as_str());
    // Again: up to date.
    let report = api
        .post(
            "/v1/volumes/vm/merges",
            json!({"from": "feature/a", "into": "main"}),
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(report["outcome"], "up_to_date");
    assert_eq!(report["commit"], Value::Null);

    // A clean three-way merge: b changed other blocks.
    api.write("vm@b", 16 * KIB, 0xbb, 8 * KIB).await;
    let b1 = api.commit("vm", "b", "b1").await;
    let report = api
        .post(
            "/v1/volumes/vm/merges",
            json!({"from": "vm@b", "into": "main", "message": "take b", "author": "ana"}),
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(report["outcome"], "merged");
    assert_eq!(ranges(&report["taken"]), [(16 * KIB, 8 * KIB)]);
    assert_eq!(report["taken_bytes"], 8 * KIB);
    assert_eq!(report["conflicts"], json!([]));
    let merged = report["commit"].clone();
    assert_eq!(merged["message"], "take b");
    assert_eq!(merged["author"], "ana");
    assert_eq!(merged["parents"], json!([a1, b1]));
    let data = api.read("vm", 0, 32 * KIB).await;
    assert!(data[..4096].iter().all(|&b| b == 0xaa));
    assert!(data[4096..16384].iter().all(|&b| b == 0x01));
    assert!(data[16384..24576].iter().all(|&b| b == 0xbb));
    assert!(data[24576..].iter().all(|&b| b == 0x01));

    // Conflicts: both sides change block 1 differently, and b also changes block 10 alone.
    api.write("vm", 4 * KIB, 0xc1, 4 * KIB).await;
    let ours = api.commit("vm", "main", "ours").await;
    api.write("vm@b", 4 * KIB, 0xc2, 4 * KIB).await;
    api.write("vm@b", 40 * KIB, 0xc3, 4 * KIB).await;
    api.commit("vm", "b", "theirs").await;

    let dry = api
        .post(
            "/v1/volumes/vm/merges",
            json!({"from": "b", "into": "main", "dry_run": true}),
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(dry["outcome"], "conflicts");
    assert_eq!(dry["dry_run"], true);
    assert_eq!(ranges(&dry["conflicts"]), [(4 * KIB, 4 * KIB)]);
    assert_eq!(dry["conflict_bytes"], 4 * KIB);

    let (message, conflicts) = expect_merge_conflict(
        api.post(
            "/v1/volumes/vm/merges",
            json!({"from": "b", "into": "main"}),
        )
        .await,
    );
    assert_eq!(conflicts, [(4 * KIB, 4 * KIB)]);
    assert!(message.contains("nothing changed"), "{message}");
    // Nothing changed.
    assert_eq!(
        api.head_of("vm", "main").await["head_commit"],
        ours.as_str()
    );
    assert!(api
        .read("vm", 4 * KIB, 4 * KIB)
        .await
        .iter()
        .all(|&b| b == 0xc1));
    assert!(api
        .read("vm", 40 * KIB, 4 * KIB)
        .await
        .iter()
        .all(|&b| b == 0x01));

    // Dry run with a strategy: what would be taken, nothing changes.
    let dry = api
        .post(
            "/v1/volumes/vm/merges",
            json!({"from": "b", "into": "main", "strategy": "theirs", "dry_run": true}),
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(dry["outcome"], "merged");
    assert_eq!(dry["commit"], Value::Null);
    assert_eq!(
        api.head_of("vm", "main").await["head_commit"],
        ours.as_str()
    );

    // ours: keep main's block 1, take block 10.
    api.branch("vm", "try-ours", "main").await;
    let report = api
        .post(
            "/v1/volumes/vm/merges",
            json!({"from": "b", "into": "try-ours", "strategy": "ours"}),
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(report["outcome"], "merged");
    assert_eq!(ranges(&report["conflicts"]), [(4 * KIB, 4 * KIB)]);
    assert_eq!(ranges(&report["taken"]), [(40 * KIB, 4 * KIB)]);
    assert!(api
        .read("vm@try-ours", 4 * KIB, 4 * KIB)
        .await
        .iter()
        .all(|&b| b == 0xc1));
    assert!(api
        .read("vm@try-ours", 40 * KIB, 4 * KIB)
        .await
        .iter()
        .all(|&b| b == 0xc3));

    // theirs: take both.
    let report = api
        .post(
            "/v1/volumes/vm/merges",
            json!({"from": "b", "into": "main", "strategy": "theirs"}),
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(report["outcome"], "merged");
    assert_eq!(
        ranges(&report["taken"]),
        [(4 * KIB, 4 * KIB), (40 * KIB, 4 * KIB)]
    );
    assert!(api
        .read("vm", 4 * KIB, 4 * KIB)
        .await
        .iter()
        .all(|&b| b == 0xc2));
    assert!(api
        .read("vm", 40 * KIB, 4 * KIB)
        .await
        .iter()
        .all(|&b| b == 0xc3));

    // Bad input changes nothing.
    let head = api.head_of("vm", "main").await["head_commit"].clone();
    api.write("vm@try-ours", 0, 0xee, 4 * KIB).await;
    for (body, status, code) in [
        (
            json!({"from": "b", "into": "try-ours"}),
            StatusCode::CONFLICT,
            "conflict",
        ),
        (
            json!({"from": "nope", "into": "main"}),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            json!({"from": "b", "into": "nope"}),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            json!({"from": "b", "into": "main", "strategy": "mine"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"from": "b", "into": "a b"}),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
        (
            json!({"from": "b", "into": "main", "message": ""}),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
        (
            json!({"from": "b", "into": "main", "squash": true}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"into": "main"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
    ] {
        api.post("/v1/volumes/vm/merges", body.clone())
            .await
            .expect_error(status, code);
    }
    api.volume("other").await;
    api.write("other", 0, 0x77, 4 * KIB).await;
    api.commit("other", "main", "unrelated").await;
    let message = api
        .post(
            "/v1/volumes/vm/merges",
            json!({"from": "other@main", "into": "main"}),
        )
        .await
        .expect_error(StatusCode::BAD_REQUEST, "invalid_argument");
    assert!(message.contains("unrelated"), "{message}");
    api.post(
        "/v1/volumes/nope/merges",
        json!({"from": "b", "into": "main"}),
    )
    .await
    .expect_error(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(api.head_of("vm", "main").await["head_commit"], head);
}

#[tokio::test]
async fn reset_moves_a_branch_back() {
    let api = Api::new();
    api.volume("vm").await;
    api.write("vm", 0, 0x01, 8 * KIB).await;
    let first = api.commit("vm", "main", "first").await;
    api.branch("vm", "release/1", "main").await;
    api.write("vm@release/1", 0, 0x02, 8 * KIB).await;
    let second = api.commit("vm", "release/1", "second").await;
    api.write("vm@release/1", 4 * KIB, 0x03, 4 * KIB).await;

    let reply = api
        .post(
            "/v1/volumes/vm/branches/release%2F1/reset",
            json!({"to": first}),
        )
        .await;
    let message = reply.expect_error(StatusCode::CONFLICT, "conflict");
    assert!(message.contains("uncommitted"), "{message}");
    let branch = api.head_of("vm", "release/1").await;
    assert_eq!(branch["head_commit"], second.as_str());
    assert_eq!(branch["uncommitted_blocks"], 1);

    // Sessions attached to the branch block a reset.
    let session = api.session("vm@release/1");
    api.post(
        "/v1/volumes/vm/branches/release%2F1/reset",
        json!({"to": first, "discard_uncommitted": true}),
    )
    .await
    .expect_error(StatusCode::CONFLICT, "conflict");
    drop(session);

    let branch = api
        .post(
            "/v1/volumes/vm/branches/release%2F1/reset",
            json!({"to": &first[..10], "discard_uncommitted": true}),
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(branch["name"], "release/1");
    assert_eq!(branch["head_commit"], first.as_str());
    assert_eq!(branch["uncommitted_blocks"], 0);
    assert!(api
        .read("vm@release/1", 0, 8 * KIB)
        .await
        .iter()
        .all(|&b| b == 0x01));
    // The commit left behind is still there by id.
    assert!(api
        .read(&format!("vm@{second}"), 0, 8 * KIB)
        .await
        .iter()
        .all(|&b| b == 0x02));

    for (uri, body, status, code) in [
        (
            "/v1/volumes/vm/branches/release%2F1/reset",
            json!({"to": "nope"}),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "/v1/volumes/vm/branches/nope/reset",
            json!({"to": first}),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "/v1/volumes/vm/branches/main/reset",
            json!({"to": first, "force": true}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/volumes/vm/branches/main/reset",
            json!({}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/volumes/vm/branches/main/reset",
            json!({"to": "a b"}),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
    ] {
        api.post(uri, body).await.expect_error(status, code);
    }
    api.volume("fresh").await;
    api.post(
        "/v1/volumes/fresh/branches/main/reset",
        json!({"to": "main"}),
    )
    .await
    .expect_error(StatusCode::BAD_REQUEST, "invalid_argument");
}

#[tokio::test]
async fn commits_are_deleted_by_squashing() {
    let api = Api::new();
    api.volume("vm").await;
    api.write("vm", 0, 0x01, 4 * KIB).await;
    let first = api.commit("vm", "main", "first").await;
    api.write("vm", 4 * KIB, 0x02, 4 * KIB).await;
    let second = api.commit("vm", "main", "second").await;
    api.write("vm", 8 * KIB, 0x03, 4 * KIB).await;
    let third = api.commit("vm", "main", "third").await;
    api.post("/v1/volumes/vm/tags", json!({"name": "v1", "ref": first}))
        .await
        .expect(StatusCode::CREATED);

    // Needed commits are refused and stay.
    let message = api
        .delete(&format!("/v1/volumes/vm/commits/{first}"))
        .await
        .expect_error(StatusCode::CONFLICT, "conflict");
    assert!(message.contains("tag"), "{message}");
    api.delete(&format!("/v1/volumes/vm/commits/{third}"))
        .await
        .expect_error(StatusCode::CONFLICT, "conflict");
    for (uri, status, code) in [
        (
            "/v1/volumes/vm/commits/ffffffffffffffff".to_string(),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "/v1/volumes/vm/commits/xyz".to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
        (
            format!("/v1/volumes/nope/commits/{second}"),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ] {
        api.delete(&uri).await.expect_error(status, code);
    }
    let log = api.get("/v1/volumes/vm/log").await.expect(StatusCode::OK);
    assert_eq!(log.as_array().expect("log").len(), 3);

    // The middle one folds into its child.
    assert_eq!(
        api.delete(&format!("/v1/volumes/vm/commits/{}", &second[..12]))
            .await
            .expect(StatusCode::NO_CONTENT),
        Value::Null
    );
    api.get(&format!("/v1/volumes/vm/commits/{second}"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    let log = api.get("/v1/volumes/vm/log").await.expect(StatusCode::OK);
    let ids: Vec<&str> = log
        .as_array()
        .expect("log")
        .iter()
        .map(|c| c["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, [third.as_str(), first.as_str()]);
    assert_eq!(log[0]["parents"], json!([first]));
    assert_eq!(log[0]["changed_blocks"], 2);
    let data = api.read(&format!("vm@{third}"), 0, 12 * KIB).await;
    assert!(data[..4096].iter().all(|&b| b == 0x01));
    assert!(data[4096..8192].iter().all(|&b| b == 0x02));
    assert!(data[8192..].iter().all(|&b| b == 0x03));
}

#[tokio::test]
async fn clones_and_space_figures() {
    let api = Api::new();
    api.volume("vm").await;
    api.write("vm", 0, 0x0a, 64 * KIB).await;
    let first = api.commit("vm", "main", "first").await;

    // No scan has run yet in this pool (nothing spawned the reclaimer).
    let shown = api.get("/v1/volumes/vm").await.expect(StatusCode::OK);
    assert_eq!(shown["space"], Value::Null);
    assert_eq!(shown["name"], "vm");
    assert_eq!(
        api.get("/v1/pool").await.expect(StatusCode::OK)["space"],
        Value::Null
    );

    let reply = api
        .post(
            "/v1/volumes/vm/clones",
            json!({"name": "vm-copy", "ref": &first[..8]}),
        )
        .await;
    assert_eq!(reply.location.as_deref(), Some("/v1/volumes/vm-copy"));
    let clone = reply.expect(StatusCode::CREATED);
    assert_eq!(clone["name"], "vm-copy");
    assert_eq!(clone["size_bytes"], 64 * MIB);
    assert_eq!(
        clone["origin"],
        json!({"volume": "vm", "source": format!("vm@{first}"), "commit": first})
    );
    assert_eq!(
        api.get("/v1/volumes/vm").await.expect(StatusCode::OK)["origin"],
        Value::Null
    );
    let clones = api
        .get("/v1/volumes/vm/clones")
        .await
        .expect(StatusCode::OK);
    assert_eq!(clones.as_array().expect("clones").len(), 1);
    assert_eq!(clones[0]["name"], "vm-copy");

    // Independent writes afterwards.
    api.write("vm-copy", 0, 0x0b, 4 * KIB).await;
    assert!(api.read("vm", 0, 4 * KIB).await.iter().all(|&b| b == 0x0a));
    assert!(api
        .read("vm-copy", 0, 4 * KIB)
        .await
        .iter()
        .all(|&b| b == 0x0b));
    assert!(api
        .read("vm-copy", 4 * KIB, 60 * KIB)
        .await
        .iter()
        .all(|&b| b == 0x0a));
    // Related volumes diff across.
    let diff = api
        .get("/v1/volumes/vm/diff?from=main&to=vm-copy@main")
        .await
        .expect(StatusCode::OK);
    assert_eq!(ranges(&diff["extents"]), [(0, 4 * KIB)]);

    let message = api
        .delete("/v1/volumes/vm")
        .await
        .expect_error(StatusCode::CONFLICT, "conflict");
    assert!(message.contains("vm-copy"), "{message}");
    for (uri, body, status, code) in [
        (
            "/v1/volumes/vm/clones",
            json!({"name": "vm-copy"}),
            StatusCode::CONFLICT,
            "already_exists",
        ),
        (
            "/v1/volumes/vm/clones",
            json!({"name": "Bad"}),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
        (
            "/v1/volumes/vm/clones",
            json!({"name": "c2", "ref": "nope"}),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "/v1/volumes/vm/clones",
            json!({"name": "c2", "ref": "other@main"}),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
        ),
        (
            "/v1/volumes/nope/clones",
            json!({"name": "c2"}),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "/v1/volumes/vm/clones",
            json!({"name": "c2", "size": 4096}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
    ] {
        api.post(uri, body).await.expect_error(status, code);
    }
    api.get("/v1/volumes/nope/clones")
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    let names: Vec<Value> = api
        .get("/v1/volumes")
        .await
        .expect(StatusCode::OK)
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| v["name"].clone())
        .collect();
    assert_eq!(names, [json!("vm"), json!("vm-copy")]);

    // A scan measures every volume, branch and commit.
    let report = api
        .post("/v1/pool/reclaim", json!({}))
        .await
        .expect(StatusCode::OK);
    assert!(report["generation"].is_u64() && report["reclaimed_bytes"].is_u64());
    let vm = &report["volumes"]["vm"];
    assert_eq!(vm["referenced_bytes"], 64 * KIB);
    assert!(vm["branches"]["main"].is_u64(), "{report}");
    assert!(vm["commits"][&first].is_u64(), "{report}");
    assert!(report["volumes"]["vm-copy"]["branches"]["main"].is_u64());

    let shown = api.get("/v1/volumes/vm-copy").await.expect(StatusCode::OK);
    let space = &shown["space"];
    assert_eq!(space["generation"], report["generation"]);
    assert_eq!(space["referenced_bytes"], 64 * KIB);
    // The clone's own block is the only data it holds alone.
    assert!(
        space["exclusive_bytes"].as_u64().expect("exclusive") >= 4 * KIB,
        "{shown}"
    );
    let pool = api.get("/v1/pool").await.expect(StatusCode::OK);
    assert_eq!(pool["space"]["generation"], report["generation"]);
    assert_eq!(pool["space"]["volumes"]["vm"]["referenced_bytes"], 64 * KIB);

    // Deleting the clone, then its source, works in that order.
    api.delete("/v1/volumes/vm-copy")
        .await
        .expect(StatusCode::NO_CONTENT);
    api.delete("/v1/volumes/vm")
        .await
        .expect(StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn history_crosses_into_clones() {
    let api = Api::new();
    api.volume("vm").await;
    api.write("vm", 0, 0x0a, 64 * KIB).await;
    let first = api.commit("vm", "main", "first").await;
    api.post("/v1/volumes/vm/clones", json!({"name": "cp", "ref": first}))
        .await
        .expect(StatusCode::CREATED);
    api.write("cp", 0, 0x0b, 4 * KIB).await;
    let work = api.commit("cp", "main", "clone work").await;

    // The source merges the clone's work back: a fast-forward to the clone's commit.
    let report = api
        .post(
            "/v1/volumes/vm/merges",
            json!({"from": "cp@main", "into": "main"}),
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(report["outcome"], "fast_forward", "{report}");
    assert_eq!(report["commit"]["id"], work.as_str());
    assert_eq!(
        api.head_of("vm", "main").await["head_commit"],
        work.as_str()
    );
    assert!(api.read("vm", 0, 4 * KIB).await.iter().all(|&b| b == 0x0b));
    // The source's history now continues from the clone's commit: neither can go.
    api.delete("/v1/volumes/cp")
        .await
        .expect_error(StatusCode::CONFLICT, "conflict");
    api.delete("/v1/volumes/vm")
        .await
        .expect_error(StatusCode::CONFLICT, "conflict");

    // A reset across volumes, back to the source's own commit.
    let branch = api
        .post(
            "/v1/volumes/vm/branches/main/reset",
            json!({"to": format!("vm@{first}")}),
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(branch["head_commit"], first.as_str());
    assert!(api.read("vm", 0, 4 * KIB).await.iter().all(|&b| b == 0x0a));
}

// ---------------------------------------------------------------------------------------------
// Checksums and scrubs.

#[tokio::test]
async fn volumes_have_checksums_unless_created_without() {
    let api = Api::new();
    let on = api
        .post("/v1/volumes", json!({"name": "on", "size": "1MiB"}))
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(on["checksums"], true, "{on}");
    let off = api
        .post(
            "/v1/volumes",
            json!({"name": "off", "size": "1MiB", "checksums": false}),
        )
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(off["checksums"], false, "{off}");
    let explicit = api
        .post(
            "/v1/volumes",
            json!({"name": "also-on", "size": "1MiB", "checksums": true}),
        )
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(explicit["checksums"], true);

    assert_eq!(
        api.get("/v1/volumes/off").await.expect(StatusCode::OK)["checksums"],
        false
    );
    let listed: Vec<(Value, Value)> = api
        .get("/v1/volumes")
        .await
        .expect(StatusCode::OK)
        .as_array()
        .expect("array")
        .iter()
        .map(|v| (v["name"].clone(), v["checksums"].clone()))
        .collect();
    assert_eq!(
        listed,
        [
            (json!("also-on"), json!(true)),
            (json!("off"), json!(false)),
            (json!("on"), json!(true)),
        ]
    );
    // A clone keeps its source's setting.
    let clone = api
        .post("/v1/volumes/off/clones", json!({"name": "off-2"}))
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(clone["checksums"], false, "{clone}");

    api.post(
        "/v1/volumes",
        json!({"name": "bad", "size": "1MiB", "checksums": "no"}),
    )
    .await
    .expect_error(StatusCode::BAD_REQUEST, "invalid_request");
    api.post(
        "/v1/volumes",
        json!({"name": "bad", "size": "1MiB", "checksum": false}),
    )
    .await
    .expect_error(StatusCode::BAD_REQUEST, "invalid_request");
    api.get("/v1/volumes/bad")
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
}

/// Distinct content for block `i`.
fn block(i: u64) -> Vec<u8> {
    (0..4096u64).map(|b| (b * 7 + i * 131) as u8).collect()
}

impl Api {
    /// Flips a byte of the block of `data.grove` that holds `content`.
    fn damage(&self, content: &[u8]) {
        use std::os::unix::fs::FileExt;
        let path = self._dir.path().join("data.grove");
        let image = std::fs::read(&path).expect("read data.grove");
        let at = image
            .chunks_exact(4096)
            .position(|b| b == content)
            .expect("the block is in data.grove");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open data.grove");
        file.write_all_at(&[content[100] ^ 0x40], (at * 4096 + 100) as u64)
            .expect("damage data.grove");
    }

    /// Polls `GET /v1/pool/scrub` until the scrub is no longer running.
    async fn scrub_result(&self) -> Value {
        for _ in 0..1000 {
            let report = self.get("/v1/pool/scrub").await.expect(StatusCode::OK);
            if report["state"] != "running" {
                return report;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the scrub is still running after 10 s");
    }

    /// `GET` of a route that answers text, such as `/metrics`.
    async fn text(&self, uri: &str) -> String {
        let request = Request::builder()
            .uri(uri)
            .body(Body::empty())
            .expect("request");
        let response = self
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("infallible");
        assert_eq!(response.status(), StatusCode::OK);
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        String::from_utf8(bytes.to_vec()).expect("UTF-8")
    }
}

/// The value of an unlabelled sample in a scrape.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.split_once(' ')?;
        (series == name).then(|| value.parse().ok()).flatten()
    })
}

#[tokio::test]
async fn scrubs_check_every_block_and_report_damage() {
    let api = Api::new();
    api.get("/v1/pool/scrub")
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    api.volume("vm").await;
    let session = api.session("vm");
    for i in 0..8 {
        session
            .write(i * 4 * KIB, &block(i), false)
            .await
            .expect("write");
    }
    session.flush().await.expect("flush");

    // No body at all: the default rate.
    let reply = api.raw_post("/v1/pool/scrub", None, "").await;
    assert_eq!(reply.location.as_deref(), Some("/v1/pool/scrub"));
    let started = reply.expect(StatusCode::ACCEPTED);
    assert_eq!(started["state"], "running", "{started}");
    assert_eq!(started["rate_bytes_per_second"], 64 * MIB);
    assert_eq!(started["finished_unix"], Value::Null);
    let clean = api.scrub_result().await;
    assert_eq!(clean["state"], "completed", "{clean}");
    assert_eq!(clean["checked_blocks"], 8);
    assert_eq!(clean["bad_blocks"], 0);
    assert_eq!(clean["errors"], json!([]));
    assert_eq!(clean["failure"], Value::Null);
    assert!(clean["finished_unix"].is_u64());
    let metrics = api.text("/metrics").await;
    assert_eq!(sample(&metrics, "grove_checksum_errors_total"), Some(0.0));
    assert_eq!(sample(&metrics, "grove_scrub_checked_blocks"), Some(8.0));
    assert_eq!(sample(&metrics, "grove_scrub_running"), Some(0.0));

    api.damage(&block(5));
    let started = api
        .post("/v1/pool/scrub", json!({"rate": "1GiB"}))
        .await
        .expect(StatusCode::ACCEPTED);
    assert_eq!(started["rate_bytes_per_second"], 1u64 << 30);
    let report = api.scrub_result().await;
    assert_eq!(report["state"], "completed", "{report}");
    assert_eq!(report["checked_blocks"], 8);
    assert_eq!(report["bad_blocks"], 1);
    let errors = report["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), 1, "{report}");
    assert_eq!(errors[0]["export"], "vm");
    assert_eq!(errors[0]["offset_bytes"], 5 * 4 * KIB);
    assert!(errors[0]["data_block"].is_u64());
    // Reads of the block fail; its neighbours read fine.
    assert!(matches!(
        session.read(5 * 4 * KIB, 4 * KIB).await,
        Err(grove_engine::Error::Corrupt { .. })
    ));
    assert_eq!(
        session.read(4 * 4 * KIB, 4 * KIB).await.expect("read"),
        block(4)
    );
    let metrics = api.text("/metrics").await;
    assert!(
        sample(&metrics, "grove_checksum_errors_total").unwrap_or_default() >= 2.0,
        "{metrics}"
    );
    assert_eq!(sample(&metrics, "grove_scrub_bad_blocks"), Some(1.0));
    // One event for the block, from the scrub that found it first.
    api.pool.flush().await.expect("flush");
    let events = api
        .get("/v1/events?type=data.corrupted")
        .await
        .expect(StatusCode::OK);
    let events = events["events"].as_array().expect("events").clone();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["volume"], "vm");
    assert_eq!(events[0]["offset_bytes"], 5 * 4 * KIB);
    assert_eq!(events[0]["found_by"], "scrub");
    let completed = api
        .get("/v1/events?type=scrub.completed")
        .await
        .expect(StatusCode::OK);
    assert_eq!(completed["events"].as_array().map(Vec::len), Some(2));

    // Bad requests start nothing.
    for (body, code) in [
        (json!({"rate": 0}), "invalid_argument"),
        (json!({"rate": "fast"}), "invalid_request"),
        (json!({"rate": -1}), "invalid_request"),
        (json!({"speed": 1}), "invalid_request"),
    ] {
        api.post("/v1/pool/scrub", body)
            .await
            .expect_error(StatusCode::BAD_REQUEST, code);
    }
    assert_eq!(
        api.get("/v1/pool/scrub").await.expect(StatusCode::OK)["state"],
        "completed"
    );

    // One at a time: at 1 byte per second this one runs until the test ends.
    let slow = api
        .post("/v1/pool/scrub", json!({"rate": 1}))
        .await
        .expect(StatusCode::ACCEPTED);
    assert_eq!(slow["state"], "running");
    api.raw_post("/v1/pool/scrub", None, "")
        .await
        .expect_error(StatusCode::CONFLICT, "conflict");
    assert_eq!(
        api.get("/v1/pool/scrub").await.expect(StatusCode::OK)["state"],
        "running"
    );
    let metrics = api.text("/metrics").await;
    assert_eq!(sample(&metrics, "grove_scrub_running"), Some(1.0));

    // Stopped on request, it ends as "stopped" and another can start.
    api.delete("/v1/pool/scrub").await.expect(StatusCode::OK);
    let mut state = Value::Null;
    for _ in 0..100 {
        state = api.get("/v1/pool/scrub").await.expect(StatusCode::OK)["state"].clone();
        if state != "running" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(state, "stopped");
    api.raw_post("/v1/pool/scrub", None, "")
        .await
        .expect(StatusCode::ACCEPTED);
}
