//! The management API's request bodies and query strings, through the real axum router
//! (`grove_mgmt_api::router`) over a small pool on the in-memory simulation backend.
//!
//! Input layout: requests, each `route u8 | name u8 | len u16 LE | bytes`. The route byte picks
//! one of [`ROUTES`] (a method and a path template), the name byte the value of the path's
//! `{vol}`/`{branch}`/... segments from [`NAMES`], and the bytes are the JSON body (or the
//! query string of a GET). Each input starts from the same pool, so a crash reproduces.
//!
//! No request may panic or be answered 500. Hook creation is left out of the router (a hook
//! would make network calls or run programs); its body is only deserialized.

#![no_main]

use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use grove_engine::io::sim::SimDisk;
use grove_engine::io::FileKind;
use grove_engine::{CommitRequest, Pool, SessionClient, BLOCK_SIZE};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

/// Requests sent per input.
const REQUESTS_MAX: usize = 8;
const CACHE_BYTES: u64 = 1 << 20;

/// Method and path of each route fuzzed; `{}` is replaced by the chosen name.
const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/volumes"),
    ("POST", "/v1/volumes/{}/clones"),
    ("POST", "/v1/volumes/v/branches"),
    ("POST", "/v1/volumes/{}/branches"),
    ("POST", "/v1/volumes/v/branches/{}/reset"),
    ("PUT", "/v1/volumes/v/branches/{}/protection"),
    ("POST", "/v1/volumes/v/branches/{}/commits"),
    ("POST", "/v1/volumes/v/tags"),
    ("POST", "/v1/volumes/v/merges"),
    ("POST", "/v1/volumes/v/merges/{}/conclude"),
    ("POST", "/v1/volumes/v/merges/{}/abort"),
    ("GET", "/v1/volumes/v/log"),
    ("GET", "/v1/volumes/v/diff"),
    ("GET", "/v1/volumes/v/blame"),
    ("GET", "/v1/events"),
    ("GET", "/v1/volumes/v/commits/{}/lineage"),
    ("GET", "/v1/volumes/{}"),
    ("DELETE", "/v1/volumes/v/branches/{}"),
    ("DELETE", "/v1/volumes/v/tags/{}"),
    ("DELETE", "/v1/volumes/{}"),
    ("GET", "/v1/pool"),
    ("HOOK", ""),
];

/// Path segment values: existing refs, odd names, an encoded slash, a commit prefix.
const NAMES: &[&str] = &[
    "v", "main", "dev", "t1", "merge-1", "nope", "x%2Fy", "..", "%00", "a%20b", "0", "ffff",
];

struct Golden {
    data: Vec<u8>,
    meta: Vec<u8>,
    journal: Vec<u8>,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

/// A pool with volume `v`: a commit on main, branch `dev` with its own commit, tag `t1`.
fn golden() -> &'static Golden {
    static GOLDEN: OnceLock<Golden> = OnceLock::new();
    GOLDEN.get_or_init(|| {
        let disk = SimDisk::new();
        runtime().block_on(async {
            let pool = Pool::open_with_backend(disk.backend(), CACHE_BYTES, None).expect("create");
            let message = |m: &str| CommitRequest {
                message: m.to_string(),
                ..Default::default()
            };
            let client = SessionClient {
                protocol: "fuzz".to_string(),
                address: "sim".to_string(),
            };
            pool.create_volume("v", 64 * BLOCK_SIZE)
                .await
                .expect("volume");
            let main = pool.open_session("v", client.clone()).expect("session");
            main.write(0, &[1; 8192], false).await.expect("write");
            drop(main);
            pool.commit("v", "main", message("first"))
                .await
                .expect("commit");
            pool.create_branch("v", "dev", None).await.expect("branch");
            let dev = pool.open_session("v@dev", client).expect("session");
            dev.write(BLOCK_SIZE, &[2; 4096], false)
                .await
                .expect("write");
            drop(dev);
            pool.commit("v", "dev", message("second"))
                .await
                .expect("commit");
            pool.create_tag("v", "t1", "main").await.expect("tag");
            pool.flush().await.expect("flush");
        });
        Golden {
            data: disk.file_image(FileKind::Data),
            meta: disk.file_image(FileKind::Meta),
            journal: disk.file_image(FileKind::Journal),
        }
    })
}

fuzz_target!(|input: &[u8]| {
    let golden = golden();
    let disk = SimDisk::new();
    disk.corrupt(FileKind::Data, 0, &golden.data);
    disk.corrupt(FileKind::Meta, 0, &golden.meta);
    disk.corrupt(FileKind::Journal, 0, &golden.journal);
    runtime().block_on(async {
        let pool = Pool::open_with_backend(disk.backend(), CACHE_BYTES, None).expect("reopen");
        let router = grove_mgmt_api::router(pool);
        let mut rest = input;
        for _ in 0..REQUESTS_MAX {
            let [route, name, lo, hi, tail @ ..] = rest else {
                break;
            };
            let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
            let (bytes, tail) = tail.split_at(len);
            rest = tail;
            let (method, template) = ROUTES[usize::from(*route) % ROUTES.len()];
            if method == "HOOK" {
                let _ = serde_json::from_slice::<grove_mgmt_api::hooks::CreateHook>(bytes);
                continue;
            }
            let path = template.replace("{}", NAMES[usize::from(*name) % NAMES.len()]);
            let request = if method == "GET" {
                let Ok(query) = std::str::from_utf8(bytes) else {
                    continue;
                };
                Request::builder()
                    .method(method)
                    .uri(format!("{path}?{query}"))
                    .body(Body::empty())
            } else {
                Request::builder()
                    .method(Method::from_bytes(method.as_bytes()).expect("a method"))
                    .uri(path)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(bytes.to_vec()))
            };
            // Query strings that are not valid URIs never reach a server.
            let Ok(request) = request else {
                continue;
            };
            let response = router.clone().oneshot(request).await.expect("infallible");
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .expect("a body")
                .to_bytes();
            assert_ne!(
                status,
                StatusCode::INTERNAL_SERVER_ERROR,
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
    });
});
