//! `/v1/volumes/{vol}/branches`, `/v1/volumes/{vol}/branches/{branch}` and
//! `/v1/volumes/{vol}/branches/{branch}/reset`.
//!
//! Branch names may contain '/': clients send it percent-encoded as %2F inside the path
//! segment (`/v1/volumes/vm/branches/feature%2Fx`), and the path extractor decodes it.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use grove_engine::Pool;

use super::{blocking, encode_segment, location, resolve_ref};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Acting, ApiPath, JsonBody};
use crate::hooks::Hooks;
use crate::model::{Branch, CreateBranch, ResetBranch, SetProtection};
use crate::validate;

/// List the branches of a volume.
#[utoipa::path(
    get,
    path = "/v1/volumes/{vol}/branches",
    tag = "branches",
    params(("vol" = String, Path, description = "Volume name")),
    responses(
        (status = 200, description = "Every branch of the volume", body = [Branch]),
        (status = 400, description = "Invalid volume name", body = ErrorBody),
        (status = 404, description = "No such volume", body = ErrorBody),
    )
)]
pub async fn list_branches(
    State(pool): State<Pool>,
    ApiPath(volume): ApiPath<String>,
) -> Result<Json<Vec<Branch>>, ApiError> {
    validate::volume_name(&volume)?;
    let branches = blocking(pool, move |pool| Ok(pool.branches(&volume)?)).await?;
    Ok(Json(branches.into_iter().map(Branch::from).collect()))
}

/// Create a branch.
///
/// The branch starts at `from` (default `main`); creating it copies nothing.
#[utoipa::path(
    post,
    path = "/v1/volumes/{vol}/branches",
    tag = "branches",
    params(("vol" = String, Path, description = "Volume name")),
    request_body = CreateBranch,
    responses(
        (status = 201, description = "The new branch", body = Branch,
            headers(("location" = String, description = "Path of the new branch"))),
        (status = 400, description = "Invalid name, ref or body", body = ErrorBody),
        (status = 404, description = "No such volume or ref", body = ErrorBody),
        (status = 409, description = "A branch or tag with that name exists", body = ErrorBody),
    )
)]
pub async fn create_branch(
    Acting(pool): Acting,
    ApiPath(volume): ApiPath<String>,
    JsonBody(request): JsonBody<CreateBranch>,
) -> Result<impl IntoResponse, ApiError> {
    validate::volume_name(&volume)?;
    validate::new_ref_name("branch", &request.name)?;
    let from = request
        .from
        .as_deref()
        .map(|from| validate::ref_in_volume(&volume, from))
        .transpose()?;
    let info = pool
        .create_branch(&volume, &request.name, from.as_deref())
        .await?;
    let headers = location(format!(
        "/v1/volumes/{}/branches/{}",
        info.volume,
        encode_segment(&info.name)
    ));
    Ok((StatusCode::CREATED, headers, Json(Branch::from(info))))
}

/// Show a branch.
#[utoipa::path(
    get,
    path = "/v1/volumes/{vol}/branches/{branch}",
    tag = "branches",
    params(
        ("vol" = String, Path, description = "Volume name"),
        ("branch" = String, Path, description = "Branch name, with '/' sent as %2F"),
    ),
    responses(
        (status = 200, description = "The branch", body = Branch),
        (status = 400, description = "Invalid name", body = ErrorBody),
        (status = 404, description = "No such volume or branch", body = ErrorBody),
    )
)]
pub async fn show_branch(
    State(pool): State<Pool>,
    ApiPath((volume, branch)): ApiPath<(String, String)>,
) -> Result<Json<Branch>, ApiError> {
    validate::volume_name(&volume)?;
    validate::branch_name(&branch)?;
    let info = blocking(pool, move |pool| Ok(pool.branch(&volume, &branch)?)).await?;
    Ok(Json(info.into()))
}

/// Delete a branch.
///
/// The space only its head held (writes since its latest commit) returns to the pool. Its
/// commits stay, reachable by id, until they are deleted (`DELETE
/// /v1/volumes/{vol}/commits/{id}`).
#[utoipa::path(
    delete,
    path = "/v1/volumes/{vol}/branches/{branch}",
    tag = "branches",
    params(
        ("vol" = String, Path, description = "Volume name"),
        ("branch" = String, Path, description = "Branch name, with '/' sent as %2F"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Invalid name", body = ErrorBody),
        (status = 404, description = "No such volume or branch", body = ErrorBody),
        (status = 409, description = "The branch cannot be deleted (main, or in use)", body = ErrorBody),
    )
)]
pub async fn delete_branch(
    Acting(pool): Acting,
    Extension(hooks): Extension<Hooks>,
    ApiPath((volume, branch)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    validate::volume_name(&volume)?;
    validate::branch_name(&branch)?;
    pool.branch(&volume, &branch)?;
    let payload = serde_json::json!({"kind": "branch", "volume": volume, "branch": branch});
    hooks
        .check("pre-delete", &volume, Some(&branch), payload)
        .await?;
    pool.delete_branch(&volume, &branch).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Reset a branch: move its head to a commit (a rollback).
///
/// The head then reads exactly as the target commit and continues from it, as if the branch
/// had just been made there. Commits the branch leaves behind stay, reachable by id, until
/// they are deleted; discarded writes return to the pool.
/// Uncommitted writes on the head are refused unless `discard_uncommitted` is set; a branch
/// with open sessions is refused (their device would change under them).
#[utoipa::path(
    post,
    path = "/v1/volumes/{vol}/branches/{branch}/reset",
    tag = "branches",
    params(
        ("vol" = String, Path, description = "Volume name"),
        ("branch" = String, Path, description = "Branch name, with '/' sent as %2F"),
    ),
    request_body = ResetBranch,
    responses(
        (status = 200, description = "The branch after the reset", body = Branch),
        (status = 400, description = "Invalid name, ref or body; a target branch with no commits; a volume with no shared history", body = ErrorBody),
        (status = 404, description = "No such volume, branch or ref", body = ErrorBody),
        (status = 409, description = "Uncommitted writes without discard_uncommitted, or open sessions on the branch", body = ErrorBody),
    )
)]
pub async fn reset_branch(
    Acting(pool): Acting,
    ApiPath((volume, branch)): ApiPath<(String, String)>,
    JsonBody(request): JsonBody<ResetBranch>,
) -> Result<Json<Branch>, ApiError> {
    validate::volume_name(&volume)?;
    validate::branch_name(&branch)?;
    let target = validate::ref_in_context(&volume, &request.to)?;
    resolve_ref(&pool, &volume, &target).await?;
    let info = pool
        .reset_branch(&volume, &branch, &target, request.discard_uncommitted)
        .await?;
    Ok(Json(info.into()))
}

/// Protect a branch, or lift its protection.
///
/// Only merges change a protected branch (and only when its blocking `pre-merge` hooks pass):
/// its NBD exports are read-only, resets and deletes are refused. Refused while sessions are
/// attached to it.
#[utoipa::path(
    put,
    path = "/v1/volumes/{vol}/branches/{branch}/protection",
    tag = "branches",
    params(
        ("vol" = String, Path, description = "Volume name"),
        ("branch" = String, Path, description = "Branch name, with '/' sent as %2F"),
    ),
    request_body = SetProtection,
    responses(
        (status = 200, description = "The branch", body = Branch),
        (status = 400, description = "Invalid name or body", body = ErrorBody),
        (status = 404, description = "No such volume or branch", body = ErrorBody),
        (status = 409, description = "Sessions are attached to the branch", body = ErrorBody),
    )
)]
pub async fn set_protection(
    Acting(pool): Acting,
    ApiPath((volume, branch)): ApiPath<(String, String)>,
    JsonBody(request): JsonBody<SetProtection>,
) -> Result<Json<Branch>, ApiError> {
    validate::volume_name(&volume)?;
    validate::branch_name(&branch)?;
    let info = pool
        .set_protected(&volume, &branch, request.protected)
        .await?;
    Ok(Json(info.into()))
}
