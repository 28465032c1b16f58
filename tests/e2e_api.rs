//! End-to-end: input validation in the CLI and the REST API. Bad names, sizes and refs are
//! refused with a clear error (CLI: stderr and a non-zero exit; API: a 4xx status and the JSON
//! body `{"error":{"code","message"}}`), and `/v1/openapi.json` describes the /v1 paths.

mod support;

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::{json, Value};
use support::{
    free_port, grove_bin, json_has_str, nbdinfo_size, require_nbd_tools, run, Grove, Launch, MIB,
    TOOL_TIMEOUT,
};

fn volume_names(grove: &Grove) -> Value {
    grove.cli_json(&["volume", "list"])
}

#[test]
fn cli_refuses_bad_names_sizes_and_refs() {
    let grove = Grove::start();
    let too_long = "a".repeat(64);
    let longest = "b".repeat(63);

    // Volume names: 1-63 of lowercase letters, digits and '-'.
    for bad in [
        "Bad_Name",
        too_long.as_str(),
        "UPPER",
        "a.b",
        "a/b",
        "a@b",
        "a b",
        "",
    ] {
        grove.cli_err(&["volume", "create", bad, "--size", "64MiB"]);
    }
    grove.create_volume(&longest, "64MiB");
    grove.create_volume("ok-1", "64MiB");
    let listed = volume_names(&grove);
    assert!(
        json_has_str(&listed, &longest) && json_has_str(&listed, "ok-1"),
        "valid names are created: {listed}"
    );
    for bad in ["Bad_Name", too_long.as_str(), "UPPER"] {
        assert!(
            !json_has_str(&listed, bad),
            "refused name {bad} must not exist: {listed}"
        );
    }

    // Sizes.
    for bad in ["abc", "-1GiB", "12QiB", "", "1.5.5GiB", "GiB", "0x"] {
        grove.cli_err(&["volume", "create", "sz", "--size", bad]);
    }
    assert!(
        !json_has_str(&volume_names(&grove), "sz"),
        "no volume may come out of a bad size"
    );

    // Duplicates and unknown volumes.
    grove.create_volume("dup", "64MiB");
    grove.cli_err(&["volume", "create", "dup", "--size", "64MiB"]);
    for args in [
        vec!["volume", "show", "nope"],
        vec!["volume", "delete", "nope"],
        vec!["branch", "list", "nope"],
        vec!["branch", "create", "nope", "dev"],
        vec!["commit", "nope", "-m", "x"],
        vec!["tag", "list", "nope"],
        vec!["log", "nope"],
    ] {
        grove.cli_err(&args);
    }

    // Branch and tag names: 1-128 of letters, digits, '-', '_', '.', '/'.
    let longest_branch = "c".repeat(128);
    let too_long_branch = "c".repeat(129);
    grove.cli_ok(&["branch", "create", "dup", "feature/x.y_Z-1"]);
    grove.cli_ok(&["branch", "create", "dup", &longest_branch]);
    for bad in [
        "bad name",
        "a*b",
        too_long_branch.as_str(),
        "",
        "a@b",
        "a:b",
    ] {
        grove.cli_err(&["branch", "create", "dup", bad]);
    }
    grove.cli_err(&["branch", "create", "dup", "feature/x.y_Z-1"]);
    let commit = grove.commit("dup", "tagged");
    grove.cli_ok(&["tag", "create", "dup", "v1.0", &format!("dup@{commit}")]);
    for bad in ["bad tag", "a*b", too_long_branch.as_str()] {
        grove.cli_err(&["tag", "create", "dup", bad, &format!("dup@{commit}")]);
    }
    grove.cli_err(&["tag", "create", "dup", "v1.0", &format!("dup@{commit}")]);
    let branches = grove.cli_json(&["branch", "list", "dup"]);
    assert!(
        json_has_str(&branches, "feature/x.y_Z-1") && json_has_str(&branches, &longest_branch),
        "valid branch names are created: {branches}"
    );
    assert!(
        !json_has_str(&branches, "bad name") && !json_has_str(&branches, &too_long_branch),
        "refused branch names must not exist: {branches}"
    );

    // Unknown refs.
    grove.cli_err(&["branch", "create", "dup", "b2", "--from", "dup@no-such-ref"]);
    grove.cli_err(&["tag", "create", "dup", "t2", "dup@0000000000000000"]);
    grove.cli_err(&["log", "dup@no-such-ref"]);
    grove.cli_err(&["branch", "delete", "dup", "no-such-branch"]);
    grove.cli_err(&["tag", "delete", "dup", "no-such-tag"]);

    // GROVE_API instead of --api.
    let out = run(
        Command::new(grove_bin())
            .args(["volume", "list", "--json"])
            .env("GROVE_API", grove.api()),
        TOOL_TIMEOUT,
    );
    out.assert_success();
    assert!(
        out.stdout.contains("dup"),
        "GROVE_API selects the server\n{}",
        out.report()
    );

    // No server at the address: an error on stderr, no panic.
    let out = run(
        Command::new(grove_bin())
            .args(["--api", &format!("http://127.0.0.1:{}", free_port())])
            .args(["volume", "list"]),
        TOOL_TIMEOUT,
    );
    out.assert_failure();
    assert!(
        !out.stderr.trim().is_empty() && !out.combined().contains("panicked"),
        "an unreachable API is reported on stderr\n{}",
        out.report()
    );
}

/// Replaces `{param}` path segments by `{}` so that parameter names do not matter.
fn normalize_path(path: &str) -> String {
    path.split('/')
        .map(|segment| {
            if segment.starts_with('{') && segment.ends_with('}') {
                "{}"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn resolve<'a>(document: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let pointer = reference.trim_start_matches('#');
            let target = document
                .pointer(pointer)
                .unwrap_or_else(|| panic!("openapi.json: dangling $ref {reference}"));
            resolve(document, target)
        }
        None => schema,
    }
}

fn is_integer_schema(document: &Value, schema: &Value) -> bool {
    let schema = resolve(document, schema);
    let of_integer = |types: &Value| match types {
        Value::String(kind) => kind == "integer",
        Value::Array(kinds) => kinds.iter().any(|kind| kind == "integer"),
        _ => false,
    };
    of_integer(&schema["type"])
        || ["oneOf", "anyOf", "allOf"].iter().any(|key| {
            schema[key]
                .as_array()
                .map(|items| items.iter().any(|item| is_integer_schema(document, item)))
                .unwrap_or(false)
        })
}

/// Builds a `POST /v1/volumes` body from the request schema the OpenAPI document declares.
fn volume_body_builder(document: &Value) -> impl Fn(&str, Option<Value>) -> String {
    let post = &document["paths"]["/v1/volumes"]["post"];
    let schema = resolve(
        document,
        &post["requestBody"]["content"]["application/json"]["schema"],
    );
    let properties = schema["properties"]
        .as_object()
        .unwrap_or_else(|| {
            panic!("openapi.json must describe the POST /v1/volumes JSON body: {post}")
        })
        .clone();
    let name_key = properties
        .keys()
        .find(|key| key.as_str() == "name")
        .or_else(|| properties.keys().find(|key| key.contains("name")))
        .unwrap_or_else(|| panic!("no name property in the volume request schema: {schema}"))
        .clone();
    let size_key = properties
        .keys()
        .find(|key| key.contains("size"))
        .unwrap_or_else(|| panic!("no size property in the volume request schema: {schema}"))
        .clone();
    let size_is_integer = is_integer_schema(document, &properties[&size_key]);
    move |name: &str, size: Option<Value>| {
        let size = size.unwrap_or_else(|| {
            if size_is_integer {
                json!(64 * MIB)
            } else {
                json!("64MiB")
            }
        });
        let mut body = serde_json::Map::new();
        body.insert(name_key.clone(), json!(name));
        body.insert(size_key.clone(), size);
        Value::Object(body).to_string()
    }
}

#[test]
fn http_api_errors_and_openapi_document() {
    let mut grove = Grove::start();
    grove.assert_healthy();
    let ready = grove.http("GET", "/readyz", None);
    assert_eq!(ready.status, 200, "/readyz: {ready:?}");

    // The OpenAPI document.
    let reply = grove.http("GET", "/v1/openapi.json", None);
    assert_eq!(reply.status, 200, "/v1/openapi.json: {reply:?}");
    let document = reply.json();
    assert!(
        document["openapi"]
            .as_str()
            .map(|version| version.starts_with('3'))
            .unwrap_or(false),
        "openapi.json must be an OpenAPI 3 document: {}",
        document["openapi"]
    );
    let paths: BTreeSet<String> = document["paths"]
        .as_object()
        .expect("openapi.json has paths")
        .keys()
        .map(|path| normalize_path(path))
        .collect();
    for required in [
        "/v1/volumes",
        "/v1/volumes/{}",
        "/v1/volumes/{}/branches",
        "/v1/volumes/{}/branches/{}",
        "/v1/volumes/{}/branches/{}/commits",
        "/v1/volumes/{}/commits/{}",
        "/v1/volumes/{}/log",
        "/v1/volumes/{}/tags",
    ] {
        assert!(
            paths.contains(required),
            "openapi.json misses {required}; it lists {paths:?}"
        );
    }
    assert!(
        document["paths"]["/v1/volumes"]["post"].is_object()
            && document["paths"]["/v1/volumes"]["get"].is_object(),
        "openapi.json documents GET and POST /v1/volumes"
    );

    // Creating volumes over HTTP, with the body the document describes.
    let body = volume_body_builder(&document);
    let created = grove.http("POST", "/v1/volumes", Some(&body("api-vol", None)));
    assert!(
        (200..300).contains(&created.status),
        "POST /v1/volumes with a valid body: {created:?}"
    );
    let shown = grove.http("GET", "/v1/volumes/api-vol", None);
    assert_eq!(shown.status, 200, "GET /v1/volumes/api-vol: {shown:?}");
    assert!(json_has_str(&shown.json(), "api-vol"));
    let listed = grove.http("GET", "/v1/volumes", None);
    assert_eq!(listed.status, 200);
    assert!(json_has_str(&listed.json(), "api-vol"), "{listed:?}");

    grove
        .http("POST", "/v1/volumes", Some(&body("api-vol", None)))
        .assert_error(&[409], "creating a volume twice");
    for bad_name in ["Bad_Name", &"a".repeat(64), "", "a b", "a/b"] {
        grove
            .http("POST", "/v1/volumes", Some(&body(bad_name, None)))
            .assert_error(&[400, 422], &format!("volume name {bad_name:?}"));
    }
    for bad_size in [
        json!("abc"),
        json!(-1),
        json!("-1GiB"),
        json!(null),
        json!([1]),
    ] {
        grove
            .http(
                "POST",
                "/v1/volumes",
                Some(&body("sized", Some(bad_size.clone()))),
            )
            .assert_error(&[400, 422], &format!("volume size {bad_size}"));
    }
    grove
        .http("POST", "/v1/volumes", Some("{not json"))
        .assert_error(&[400, 415, 422], "a malformed JSON body");
    grove
        .http("POST", "/v1/volumes", Some("{}"))
        .assert_error(&[400, 422], "an empty JSON object");

    // Unknown things: 404 with the JSON error body.
    let commit_like = "0123456789abcdef0123456789abcdef";
    for path in [
        "/v1/volumes/nope".to_string(),
        "/v1/volumes/nope/branches".to_string(),
        "/v1/volumes/api-vol/branches/nope".to_string(),
        format!("/v1/volumes/api-vol/commits/{commit_like}"),
        "/v1/volumes/nope/tags".to_string(),
        "/v1/volumes/nope/log".to_string(),
        "/v1/no-such-endpoint".to_string(),
    ] {
        let reply = grove.http("GET", &path, None);
        reply.assert_error(&[404], &format!("GET {path}"));
        assert!(
            reply.content_type.contains("json"),
            "GET {path}: errors are served as JSON, Content-Type was {:?}",
            reply.content_type
        );
    }
    grove
        .http("DELETE", "/v1/volumes/nope", None)
        .assert_error(&[404], "DELETE an unknown volume");
    grove
        .http(
            "POST",
            "/v1/volumes/nope/branches/main/commits",
            Some(r#"{"message":"x"}"#),
        )
        .assert_error(&[404], "commit on an unknown volume");
    grove
        .http(
            "GET",
            "/v1/volumes/api-vol/log?ref=api-vol@no-such-ref",
            None,
        )
        .assert_error(&[400, 404], "log of an unknown ref");
    grove
        .http("GET", "/v1/volumes/Bad_Name", None)
        .assert_error(&[400, 404, 422], "GET an invalid volume name");

    // The CLI sees what the API created, and the API what the CLI created.
    grove.create_volume("cli-vol", "64MiB");
    let listed = grove.http("GET", "/v1/volumes", None);
    assert!(json_has_str(&listed.json(), "cli-vol"), "{listed:?}");
    assert!(json_has_str(
        &grove.cli_json(&["volume", "list"]),
        "api-vol"
    ));

    // Deleting works, and a deleted volume is gone.
    let deleted = grove.http("DELETE", "/v1/volumes/api-vol", None);
    assert!(
        (200..300).contains(&deleted.status),
        "DELETE /v1/volumes/api-vol: {deleted:?}"
    );
    grove
        .http("GET", "/v1/volumes/api-vol", None)
        .assert_error(&[404], "GET a deleted volume");
    grove.assert_healthy();
}

#[test]
fn serve_takes_config_file_env_and_default_data_dir() {
    require_nbd_tools();
    for launch in [
        Launch::ConfigFile,
        Launch::ConfigFileOverriddenByFlag,
        Launch::EnvDataDir,
        Launch::DefaultDataDir,
    ] {
        let mut grove = Grove::start_with(launch, &[]);
        grove.create_volume("conf", "16MiB");
        assert_eq!(
            nbdinfo_size(&grove.unix_uri("conf")),
            16 * MIB,
            "{launch:?}: the volume is served"
        );
        let entries = std::fs::read_dir(&grove.data_dir)
            .map(|entries| entries.count())
            .unwrap_or(0);
        assert!(
            entries > 0,
            "{launch:?}: the pool must live in {}",
            grove.data_dir.display()
        );
        if launch != Launch::DefaultDataDir {
            assert!(
                !grove.root().join("grove-data").exists(),
                "{launch:?}: nothing may be written to ./grove-data when a data directory is given"
            );
        }
        grove.terminate();
        grove.spawn();
        assert!(
            json_has_str(&grove.cli_json(&["volume", "list"]), "conf"),
            "{launch:?}: the volume survives a restart with the same configuration"
        );
        grove.assert_healthy();
    }
}
