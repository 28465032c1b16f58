//! `/v1/hooks`: webhooks and exec hooks, their delivery attempts, and deliveries by hand.

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::location;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Acting, ApiPath, JsonBody};
use crate::hooks::{Attempt, CreateHook, Hook, Hooks};

/// List the hooks with how their deliveries are going.
#[utoipa::path(
    get,
    path = "/v1/hooks",
    tag = "hooks",
    responses((status = 200, description = "Every hook", body = [Hook]))
)]
pub async fn list_hooks(Extension(hooks): Extension<Hooks>) -> Json<Vec<Hook>> {
    Json(hooks.list())
}

/// Add a hook.
///
/// Event types (`commit.created`, ...) are delivered from the event log in order, at least
/// once, from the next event on: a webhook gets a POST of the event's JSON (as in
/// `GET /v1/events`) with `X-Grove-Event`, `X-Grove-Delivery` (`HOOK:SEQ`) and, with a secret,
/// `X-Grove-Signature: sha256=HEX` (HMAC-SHA256 of the body); an exec hook gets it on stdin.
/// A 2xx answer (exit 0) takes the event; anything else is retried with exponential backoff
/// (1 s doubling to 5 min), and after 5 failures a `hook.failed` event is logged.
///
/// Blocking types (`pre-commit`, `pre-merge`, `pre-delete`) are called before the operation
/// with its details; a non-2xx answer (or no answer within `timeout_ms`, unless
/// `allow_on_timeout`) refuses it with 409 `vetoed_by_hook` and the hook's answer.
#[utoipa::path(
    post,
    path = "/v1/hooks",
    tag = "hooks",
    request_body = CreateHook,
    responses(
        (status = 201, description = "The new hook", body = Hook,
            headers(("location" = String, description = "Path of the new hook"))),
        (status = 400, description = "Invalid url, program, event type, glob or timeout", body = ErrorBody),
    )
)]
pub async fn create_hook(
    Acting(pool): Acting,
    Extension(hooks): Extension<Hooks>,
    JsonBody(request): JsonBody<CreateHook>,
) -> Result<impl IntoResponse, ApiError> {
    let hook = hooks.create(&pool, request).await?;
    let headers = location(format!("/v1/hooks/{}", hook.id));
    Ok((StatusCode::CREATED, headers, Json(hook)))
}

/// Show a hook.
#[utoipa::path(
    get,
    path = "/v1/hooks/{id}",
    tag = "hooks",
    params(("id" = String, Path, description = "Hook id")),
    responses(
        (status = 200, description = "The hook", body = Hook),
        (status = 404, description = "No such hook", body = ErrorBody),
    )
)]
pub async fn show_hook(
    Extension(hooks): Extension<Hooks>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Hook>, ApiError> {
    Ok(Json(hooks.get(&id)?))
}

/// Delete a hook; deliveries in progress stop.
#[utoipa::path(
    delete,
    path = "/v1/hooks/{id}",
    tag = "hooks",
    params(("id" = String, Path, description = "Hook id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such hook", body = ErrorBody),
    )
)]
pub async fn delete_hook(
    Acting(pool): Acting,
    Extension(hooks): Extension<Hooks>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    hooks.delete(&pool, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A hook's recent delivery attempts (the last 100 since the server started), oldest first.
#[utoipa::path(
    get,
    path = "/v1/hooks/{id}/deliveries",
    tag = "hooks",
    params(("id" = String, Path, description = "Hook id")),
    responses(
        (status = 200, description = "Recent attempts", body = [Attempt]),
        (status = 404, description = "No such hook", body = ErrorBody),
    )
)]
pub async fn list_deliveries(
    Extension(hooks): Extension<Hooks>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Vec<Attempt>>, ApiError> {
    Ok(Json(hooks.attempts(&id)?))
}

/// Body of `POST /v1/hooks/{id}/deliveries`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Redeliver {
    /// The event to deliver again.
    pub seq: u64,
}

/// Deliver an event to a hook again, now (once, whatever its filters say), and answer how it
/// went.
#[utoipa::path(
    post,
    path = "/v1/hooks/{id}/deliveries",
    tag = "hooks",
    params(("id" = String, Path, description = "Hook id")),
    request_body = Redeliver,
    responses(
        (status = 200, description = "The attempt", body = Attempt),
        (status = 404, description = "No such hook or event", body = ErrorBody),
    )
)]
pub async fn redeliver(
    Extension(hooks): Extension<Hooks>,
    ApiPath(id): ApiPath<String>,
    JsonBody(request): JsonBody<Redeliver>,
) -> Result<Json<Attempt>, ApiError> {
    Ok(Json(hooks.redeliver(&id, request.seq).await?))
}
