//! The OpenAPI document, generated from the route annotations so that it lists exactly the
//! routes the router serves.

use std::sync::OnceLock;

use utoipa::OpenApi;

use crate::routes;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "grove",
        description = "Control plane of grove, a block-device versioning appliance: volumes, \
            clones, branches, commits, tags, diffs, merges, blame, sessions, pool status and scrubs.\n\n\
            Errors are JSON `{\"error\": {\"code\": \"...\", \"message\": \"...\"}}` with a 4xx or \
            5xx status. A merge refused on conflicts (409, code `merge_conflict`) also lists the \
            conflicting byte ranges in `error.conflicts`.\n\n\
            Branch and tag names may contain '/'. In a path segment, send it percent-encoded as \
            %2F: `/v1/volumes/vm/branches/feature%2Fx`. Refs in bodies and query strings are \
            names within the volume (a branch, tag, or commit id or unique prefix), or full refs \
            `VOL@NAME` naming the same volume; diff, merge and reset also take full refs of a \
            volume sharing its history (a clone or a clone's source).",
        license(name = "Apache-2.0")
    ),
    tags(
        (name = "volumes", description = "Sparse block volumes"),
        (name = "branches", description = "Writable heads of a volume"),
        (name = "commits", description = "Immutable snapshots and history"),
        (name = "tags", description = "Names for commits"),
        (name = "history", description = "Diffs, blame and merges"),
        (name = "events", description = "The durable event log, paged or streamed"),
        (name = "hooks", description = "Webhooks and exec hooks, blocking or not"),
        (name = "sessions", description = "Live NBD and iSCSI sessions"),
        (name = "pool", description = "Pool capacity, use, space reclamation and scrubs"),
        (name = "health", description = "Liveness, readiness and this document"),
    )
)]
struct ApiDoc;

/// The API's OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut document = ApiDoc::openapi();
    document.info.version = env!("CARGO_PKG_VERSION").to_string();
    document.merge(routes::api_router().into_openapi());
    document
}

/// The document as JSON, built once.
pub(crate) fn document_json() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        // Serializing a tree of plain strings, maps and numbers cannot fail; an empty object
        // keeps the endpoint answering even so.
        openapi().to_json().unwrap_or_else(|_| "{}".to_string())
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    const ROUTES: &[(&str, &str)] = &[
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/v1/openapi.json"),
        ("get", "/v1/pool"),
        ("post", "/v1/pool/reclaim"),
        ("get", "/v1/pool/scrub"),
        ("post", "/v1/pool/scrub"),
        ("delete", "/v1/pool/scrub"),
        ("get", "/v1/sessions"),
        ("get", "/v1/volumes"),
        ("post", "/v1/volumes"),
        ("get", "/v1/volumes/{vol}"),
        ("delete", "/v1/volumes/{vol}"),
        ("get", "/v1/volumes/{vol}/clones"),
        ("post", "/v1/volumes/{vol}/clones"),
        ("get", "/v1/volumes/{vol}/branches"),
        ("post", "/v1/volumes/{vol}/branches"),
        ("get", "/v1/volumes/{vol}/branches/{branch}"),
        ("delete", "/v1/volumes/{vol}/branches/{branch}"),
        ("post", "/v1/volumes/{vol}/branches/{branch}/commits"),
        ("post", "/v1/volumes/{vol}/branches/{branch}/reset"),
        ("put", "/v1/volumes/{vol}/branches/{branch}/protection"),
        ("get", "/v1/volumes/{vol}/commits/{id}"),
        ("delete", "/v1/volumes/{vol}/commits/{id}"),
        ("get", "/v1/volumes/{vol}/log"),
        ("get", "/v1/volumes/{vol}/commits/{id}/lineage"),
        ("get", "/v1/volumes/{vol}/diff"),
        ("get", "/v1/volumes/{vol}/blame"),
        ("post", "/v1/volumes/{vol}/merges"),
        ("get", "/v1/events"),
        ("get", "/v1/events/stream"),
        ("get", "/v1/hooks"),
        ("post", "/v1/hooks"),
        ("get", "/v1/hooks/{id}"),
        ("delete", "/v1/hooks/{id}"),
        ("get", "/v1/hooks/{id}/deliveries"),
        ("post", "/v1/hooks/{id}/deliveries"),
        ("get", "/v1/volumes/{vol}/merges"),
        ("get", "/v1/volumes/{vol}/merges/{merge_branch}"),
        ("post", "/v1/volumes/{vol}/merges/{merge_branch}/conclude"),
        ("post", "/v1/volumes/{vol}/merges/{merge_branch}/abort"),
        ("get", "/v1/volumes/{vol}/tags"),
        ("post", "/v1/volumes/{vol}/tags"),
        ("get", "/v1/volumes/{vol}/tags/{tag}"),
        ("delete", "/v1/volumes/{vol}/tags/{tag}"),
    ];

    fn document() -> serde_json::Value {
        serde_json::from_str(document_json()).expect("the document is JSON")
    }

    #[test]
    fn lists_every_route_and_no_other() {
        let document = document();
        let paths = document["paths"].as_object().expect("paths");
        let mut listed = BTreeSet::new();
        for (path, item) in paths {
            for method in item.as_object().expect("path item").keys() {
                if ["get", "post", "put", "patch", "delete", "head", "options"]
                    .contains(&method.as_str())
                {
                    listed.insert((method.clone(), path.clone()));
                }
            }
        }
        let expected: BTreeSet<_> = ROUTES
            .iter()
            .map(|(method, path)| (method.to_string(), path.to_string()))
            .collect();
        assert_eq!(listed, expected);
    }

    #[test]
    fn every_operation_is_described() {
        let document = document();
        for (method, path) in ROUTES {
            let operation = &document["paths"][path][method];
            assert!(
                operation["summary"].is_string(),
                "{method} {path} has no summary"
            );
            assert!(operation["tags"].is_array(), "{method} {path} has no tag");
            assert!(operation["responses"]
                .as_object()
                .is_some_and(|r| !r.is_empty()));
            let placeholders = path.matches('{').count();
            let path_params = operation["parameters"]
                .as_array()
                .map(|params| params.iter().filter(|p| p["in"] == "path").count())
                .unwrap_or(0);
            assert_eq!(path_params, placeholders, "{method} {path} path parameters");
        }
        let log_params = document["paths"]["/v1/volumes/{vol}/log"]["get"]["parameters"]
            .as_array()
            .expect("log parameters")
            .iter()
            .map(|p| p["name"].as_str().unwrap_or_default().to_string())
            .collect::<BTreeSet<_>>();
        assert_eq!(log_params, ["limit", "ref", "vol"].map(String::from).into());
        let query_params = |path: &str| {
            document["paths"][path]["get"]["parameters"]
                .as_array()
                .expect("parameters")
                .iter()
                .map(|p| p["name"].as_str().unwrap_or_default().to_string())
                .collect::<BTreeSet<_>>()
        };
        assert_eq!(
            query_params("/v1/volumes/{vol}/diff"),
            ["from", "limit", "to", "vol"].map(String::from).into()
        );
        assert_eq!(
            query_params("/v1/volumes/{vol}/blame"),
            ["length", "offset", "ref", "vol"].map(String::from).into()
        );
    }

    #[test]
    fn merge_conflicts_are_documented() {
        let document = document();
        let detail = &document["components"]["schemas"]["ErrorDetail"];
        assert!(detail["properties"]["conflicts"].is_object(), "{detail}");
        let responses = &document["paths"]["/v1/volumes/{vol}/merges"]["post"]["responses"];
        for status in ["200", "400", "404", "409"] {
            assert!(responses[status].is_object(), "merge response {status}");
        }
        assert!(responses["409"]["description"]
            .as_str()
            .unwrap_or_default()
            .contains("merge_conflict"));
    }

    #[test]
    fn has_a_schema_for_every_body() {
        let document = document();
        let schemas = document["components"]["schemas"]
            .as_object()
            .expect("schemas");
        for name in [
            "Volume",
            "CreateVolume",
            "ByteSize",
            "Branch",
            "CreateBranch",
            "Commit",
            "CreateCommit",
            "Tag",
            "CreateTag",
            "PoolStatus",
            "PoolSpace",
            "VolumeDetail",
            "VolumeOrigin",
            "VolumeSpace",
            "VolumeSpaceScan",
            "VolumeSpaceTotals",
            "SpaceReport",
            "StartScrub",
            "ScrubReport",
            "ScrubState",
            "ScrubError",
            "CreateClone",
            "ResetBranch",
            "ByteRange",
            "ResolvedRef",
            "DiffReport",
            "BlameReport",
            "BlameRange",
            "CreateMerge",
            "MergeStrategy",
            "MergeReport",
            "MergeInProgress",
            "ConcludeMerge",
            "MergeOutcome",
            "Session",
            "SessionTarget",
            "SessionClient",
            "SessionCounters",
            "Health",
            "ErrorBody",
            "ErrorDetail",
        ] {
            assert!(schemas.contains_key(name), "no schema {name}");
        }
        assert!(schemas["CreateTag"]["properties"].get("ref").is_some());
        assert_eq!(
            schemas["CreateVolume"]["properties"]["checksums"]["default"],
            true
        );
        assert!(schemas["Volume"]["required"]
            .as_array()
            .is_some_and(|required| required.contains(&"checksums".into())));
        assert_eq!(
            document["openapi"].as_str().map(|v| v.starts_with("3.")),
            Some(true)
        );
        assert_eq!(document["info"]["version"], env!("CARGO_PKG_VERSION"));
    }
}
