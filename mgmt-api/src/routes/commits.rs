//! Commits: `POST /v1/volumes/{vol}/branches/{branch}/commits`,
//! `GET` and `DELETE /v1/volumes/{vol}/commits/{id}`, and `GET /v1/volumes/{vol}/log`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use grove_engine::events::extent_summary;
use grove_engine::lineage::Direction;
use grove_engine::{Pool, MAIN_BRANCH};
use serde_json::json;

use super::{blocking, location};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Acting, ApiPath, ApiQuery, JsonBody};
use crate::hooks::Hooks;
use crate::model::{Commit, CreateCommit, LineageGraph, LineageQuery, LogQuery};
use crate::validate;

/// Changed ranges a pre-commit hook is given at most (`changed_extents_complete` says if
/// that is all).
const PRE_COMMIT_EXTENTS: usize = 10_000;

/// Commit the head of a branch.
///
/// Every write acknowledged before the request is in the commit.
#[utoipa::path(
    post,
    path = "/v1/volumes/{vol}/branches/{branch}/commits",
    tag = "commits",
    params(
        ("vol" = String, Path, description = "Volume name"),
        ("branch" = String, Path, description = "Branch name, with '/' sent as %2F"),
    ),
    request_body = CreateCommit,
    responses(
        (status = 201, description = "The new commit", body = Commit,
            headers(("location" = String, description = "Path of the new commit"))),
        (status = 400, description = "Invalid name, message, author, metadata or body", body = ErrorBody),
        (status = 404, description = "No such volume or branch", body = ErrorBody),
        (status = 507, description = "No space left in the pool", body = ErrorBody),
    )
)]
pub async fn create_commit(
    Acting(pool): Acting,
    Extension(hooks): Extension<Hooks>,
    ApiPath((volume, branch)): ApiPath<(String, String)>,
    JsonBody(request): JsonBody<CreateCommit>,
) -> Result<impl IntoResponse, ApiError> {
    validate::volume_name(&volume)?;
    validate::branch_name(&branch)?;
    let request = validate::commit_request(&volume, request)?;
    let info = if hooks.has_blocking("pre-commit", &volume, Some(&branch)) {
        // Held still (writes to the branch wait) while the hooks look at it; a veto drops it.
        let candidate = pool.prepare_commit(&volume, &branch).await?;
        let (changed_extents, complete) = extent_summary(&candidate.changed, PRE_COMMIT_EXTENTS);
        let payload = json!({
            "volume": volume,
            "branch": branch,
            "commit": candidate.commit.to_hex(),
            "export": candidate.export(),
            "parent": candidate.parent.map(|id| id.to_hex()),
            "message": request.message,
            "author": request.author,
            "meta": request.meta,
            "changed_blocks": candidate.changed.len(),
            "changed_extents": changed_extents,
            "changed_extents_complete": complete,
        });
        hooks
            .check("pre-commit", &volume, Some(&branch), payload)
            .await?;
        candidate.commit(request).await?
    } else {
        pool.commit(&volume, &branch, request).await?
    };
    let headers = location(format!("/v1/volumes/{}/commits/{}", info.volume, info.id));
    Ok((StatusCode::CREATED, headers, Json(Commit::from(info))))
}

/// Show a commit by full id or unique prefix.
#[utoipa::path(
    get,
    path = "/v1/volumes/{vol}/commits/{id}",
    tag = "commits",
    params(
        ("vol" = String, Path, description = "Volume name"),
        ("id" = String, Path, description = "Commit id (32 hex digits) or a unique prefix of one"),
    ),
    responses(
        (status = 200, description = "The commit", body = Commit),
        (status = 400, description = "Invalid id, or a prefix matching several commits", body = ErrorBody),
        (status = 404, description = "No such volume or commit", body = ErrorBody),
    )
)]
pub async fn show_commit(
    State(pool): State<Pool>,
    ApiPath((volume, id)): ApiPath<(String, String)>,
) -> Result<Json<Commit>, ApiError> {
    validate::volume_name(&volume)?;
    let id = validate::commit_id_prefix(&id)?;
    let info = blocking(pool, move |pool| Ok(pool.commit_info(&volume, &id)?)).await?;
    Ok(Json(info.into()))
}

/// Delete a commit, squashing it into its children.
///
/// Each child records the deleted commit's changes as its own and takes its parents, so every
/// other commit keeps its content; the space only the deleted commit held returns to the pool.
/// Refused while a tag names the commit or it is a branch's latest commit: delete the tag or
/// reset the branch first.
#[utoipa::path(
    delete,
    path = "/v1/volumes/{vol}/commits/{id}",
    tag = "commits",
    params(
        ("vol" = String, Path, description = "Volume name"),
        ("id" = String, Path, description = "Commit id (32 hex digits) or a unique prefix of one"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Invalid id, or a prefix matching several commits", body = ErrorBody),
        (status = 404, description = "No such volume or commit", body = ErrorBody),
        (status = 409, description = "A tag or a branch head still needs the commit", body = ErrorBody),
    )
)]
pub async fn delete_commit(
    Acting(pool): Acting,
    Extension(hooks): Extension<Hooks>,
    ApiPath((volume, id)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    validate::volume_name(&volume)?;
    let id = validate::commit_id_prefix(&id)?;
    let commit = pool.commit_info(&volume, &id)?;
    let payload = json!({"kind": "commit", "volume": volume, "commit": commit.id.to_hex(), "branch": commit.branch});
    hooks
        .check("pre-delete", &volume, Some(&commit.branch), payload)
        .await?;
    pool.delete_commit(&volume, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// History of a ref, newest first, following first parents.
#[utoipa::path(
    get,
    path = "/v1/volumes/{vol}/log",
    tag = "commits",
    params(("vol" = String, Path, description = "Volume name"), LogQuery),
    responses(
        (status = 200, description = "Commits, newest first", body = [Commit]),
        (status = 400, description = "Invalid ref or limit", body = ErrorBody),
        (status = 404, description = "No such volume or ref", body = ErrorBody),
    )
)]
pub async fn log(
    State(pool): State<Pool>,
    ApiPath(volume): ApiPath<String>,
    ApiQuery(query): ApiQuery<LogQuery>,
) -> Result<Json<Vec<Commit>>, ApiError> {
    validate::volume_name(&volume)?;
    let reference = query.reference.as_deref().unwrap_or(MAIN_BRANCH);
    let refspec = validate::ref_in_volume(&volume, reference)?;
    let limit = validate::log_limit(query.limit)?;
    let commits = blocking(pool, move |pool| Ok(pool.log(&refspec, Some(limit))?)).await?;
    Ok(Json(commits.into_iter().map(Commit::from).collect()))
}

/// Lineage of a commit: what it was derived from (`upstream`: parents and sources, across
/// volumes, back to the original data) or what was derived from it (`downstream`).
///
/// Sources are the commits named in the commit request and the commits read by a job (export
/// names with `?job=ID`) whose sessions wrote the commit's data; each commit also lists the
/// sessions that wrote it.
#[utoipa::path(
    get,
    path = "/v1/volumes/{vol}/commits/{id}/lineage",
    tag = "commits",
    params(
        ("vol" = String, Path, description = "Volume name"),
        ("id" = String, Path, description = "Commit id (32 hex digits) or a unique prefix of one"),
        LineageQuery,
    ),
    responses(
        (status = 200, description = "The commits reached and how they derive", body = LineageGraph),
        (status = 400, description = "Invalid id, direction or depth", body = ErrorBody),
        (status = 404, description = "No such volume or commit", body = ErrorBody),
    )
)]
pub async fn lineage(
    State(pool): State<Pool>,
    ApiPath((volume, id)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<LineageQuery>,
) -> Result<Json<LineageGraph>, ApiError> {
    validate::volume_name(&volume)?;
    let id = validate::commit_id_prefix(&id)?;
    let direction = match query.direction.as_deref() {
        None | Some("upstream") => Direction::Upstream,
        Some("downstream") => Direction::Downstream,
        Some(other) => {
            return Err(ApiError::invalid_argument(format!(
                "invalid direction {other:?}: use upstream or downstream"
            )))
        }
    };
    let depth = match query.depth {
        None => LINEAGE_DEPTH_DEFAULT,
        Some(depth) if (1..=LINEAGE_DEPTH_MAX).contains(&depth) => depth,
        Some(depth) => {
            return Err(ApiError::invalid_argument(format!(
                "invalid depth {depth}: use 1-{LINEAGE_DEPTH_MAX}"
            )))
        }
    };
    let graph = blocking(pool, move |pool| {
        Ok(pool.lineage(&volume, &id, direction, depth)?)
    })
    .await?;
    Ok(Json(graph.into()))
}

const LINEAGE_DEPTH_DEFAULT: usize = 100;
const LINEAGE_DEPTH_MAX: usize = 1000;
