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
