//! Route handlers, one module per resource. Each handler validates its input, calls the pool,
//! and converts the answer to a wire type; engine calls that are not `async` run on the
//! blocking thread pool so that a slow metadata read never stalls the runtime.

pub mod branches;
pub mod commits;
pub mod events;
pub mod health;
pub mod history;
pub mod hooks;
pub mod merges;
pub mod pool;
pub mod sessions;
pub mod tags;
pub mod volumes;

use axum::http::{header, HeaderValue};
use grove_engine::{Error as EngineError, Pool, ResolvedRef};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;

/// Every route of the API with its OpenAPI description.
pub(crate) fn api_router() -> OpenApiRouter<Pool> {
    OpenApiRouter::new()
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(health::openapi_json))
        .routes(routes!(pool::pool_status))
        .routes(routes!(pool::reclaim))
        .routes(routes!(
            pool::scrub_status,
            pool::start_scrub,
            pool::stop_scrub
        ))
        .routes(routes!(sessions::list_sessions))
        .routes(routes!(events::list_events))
        .routes(routes!(events::stream_events))
        .routes(routes!(hooks::list_hooks, hooks::create_hook))
        .routes(routes!(hooks::show_hook, hooks::delete_hook))
        .routes(routes!(hooks::list_deliveries, hooks::redeliver))
        .routes(routes!(volumes::list_volumes, volumes::create_volume))
        .routes(routes!(volumes::show_volume, volumes::delete_volume))
        .routes(routes!(volumes::list_clones, volumes::create_clone))
        .routes(routes!(branches::list_branches, branches::create_branch))
        .routes(routes!(branches::show_branch, branches::delete_branch))
        .routes(routes!(branches::reset_branch))
        .routes(routes!(branches::set_protection))
        .routes(routes!(commits::create_commit))
        .routes(routes!(commits::show_commit, commits::delete_commit))
        .routes(routes!(commits::log))
        .routes(routes!(commits::lineage))
        .routes(routes!(history::diff))
        .routes(routes!(history::blame))
        .routes(routes!(merges::list_merges, merges::merge))
        .routes(routes!(merges::show_merge))
        .routes(routes!(merges::conclude_merge))
        .routes(routes!(merges::abort_merge))
        .routes(routes!(tags::list_tags, tags::create_tag))
        .routes(routes!(tags::show_tag, tags::delete_tag))
}

/// Runs a synchronous engine call on the blocking thread pool.
pub(crate) async fn blocking<T, F>(pool: Pool, call: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&Pool) -> Result<T, ApiError> + Send + 'static,
{
    tokio::task::spawn_blocking(move || call(&pool))
        .await
        .map_err(|error| {
            ApiError::internal(format!("the request failed inside the server: {error}"))
        })?
}

/// Resolves a ref given in the context of `volume` (see `validate::ref_in_context`) before an
/// operation uses it, so that an unknown volume or ref is reported by the names the client
/// gave.
pub(crate) async fn resolve_ref(
    pool: &Pool,
    volume: &str,
    reference: &str,
) -> Result<ResolvedRef, ApiError> {
    let (volume, reference) = (volume.to_string(), reference.to_string());
    blocking(pool.clone(), move |pool| {
        pool.volume(&volume)?;
        match pool.resolve_in(&volume, &reference) {
            // A bare name that is no ref of the volume is also tried as a volume name.
            Err(EngineError::NotFound { .. }) if !reference.contains('@') => {
                Err(ApiError::not_found(format!(
                    "no branch, tag or commit {reference:?} in volume {volume:?}, and no volume of that name"
                )))
            }
            resolved => Ok(resolved?),
        }
    })
    .await
}

/// A path segment for a name: '/' in branch and tag names is sent as %2F. Names are validated
/// before they get here, so no other character needs escaping.
pub(crate) fn encode_segment(name: &str) -> String {
    name.replace('/', "%2F")
}

/// A `Location` header for a created resource.
pub(crate) fn location(path: String) -> [(header::HeaderName, HeaderValue); 1] {
    // Paths are built from validated names, which are visible ASCII; a failure here would be a
    // bug, so fall back to the collection root rather than panic.
    let value = HeaderValue::from_str(&path).unwrap_or(HeaderValue::from_static("/v1"));
    [(header::LOCATION, value)]
}
