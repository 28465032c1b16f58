//! `/v1/volumes/{vol}/merges`: merges, and merges left in progress for manual resolution
//! (`/v1/volumes/{vol}/merges/{merge_branch}` with `conclude` and `abort`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use grove_engine::{MergeOutcome, Pool};

use super::{blocking, location, resolve_ref};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Acting, ApiPath, JsonBody, OptionalJsonBody};
use crate::hooks::Hooks;
use crate::model::{ByteRange, Commit, ConcludeMerge, CreateMerge, MergeInProgress, MergeReport};
use crate::size::format_size;
use crate::validate;

/// Merge a ref into a branch.
///
/// A three-way merge against the nearest common ancestor: blocks changed only on the merged
/// side are taken from it (shared, not copied), blocks changed only on the branch stay, and
/// blocks both sides changed to different content are conflicts, settled by `strategy`. The
/// result is a merge commit with two parents; a branch whose latest commit is an ancestor of
/// the merged one is fast-forwarded instead. The branch must have no uncommitted writes and
/// no open sessions (its content changes under them).
///
/// With strategy `fail` (the default), conflicts change nothing and answer 409 with code
/// `merge_conflict` and the conflicting byte ranges in `error.conflicts`. A dry run changes
/// nothing and answers 200 with the report, conflicts included (outcome `conflicts`).
///
/// With strategy `manual`, conflicts leave the merge in progress (outcome `in_progress`): the
/// branch stays as it is, and a writable merge branch (`merge_branch`, default `merge-INTO`,
/// exported over NBD as `VOL@MERGE_BRANCH`) holds the merge so far, the conflicting ranges
/// with the branch's content. Write the resolved content there, then conclude or abort.
#[utoipa::path(
    post,
    path = "/v1/volumes/{vol}/merges",
    tag = "history",
    params(("vol" = String, Path, description = "Volume name")),
    request_body = CreateMerge,
    responses(
        (status = 200, description = "What the merge did (or would do, on a dry run)", body = MergeReport),
        (status = 400, description = "Invalid ref, name, message or body; a source branch with no commits; volumes with no shared history", body = ErrorBody),
        (status = 404, description = "No such volume, branch or ref", body = ErrorBody),
        (status = 409, description = "Conflicts with strategy `fail` (code `merge_conflict`, ranges in `error.conflicts`), uncommitted writes or open sessions on the branch, a merge branch name already taken, or a merge branch as target", body = ErrorBody),
        (status = 507, description = "No space left in the pool", body = ErrorBody),
    )
)]
pub async fn merge(
    Acting(pool): Acting,
    Extension(hooks): Extension<Hooks>,
    ApiPath(volume): ApiPath<String>,
    JsonBody(request): JsonBody<CreateMerge>,
) -> Result<Json<MergeReport>, ApiError> {
    validate::volume_name(&volume)?;
    let mut request = validate::merge_request(&volume, request)?;
    resolve_ref(&pool, &volume, &request.from).await?;
    if !request.dry_run && hooks.has_blocking("pre-merge", &volume, Some(&request.into)) {
        // The hooks see what the merge would do.
        let preview = grove_engine::MergeRequest {
            dry_run: true,
            ..request.clone()
        };
        let preview = pool.merge(&volume, preview).await?;
        // What merges is what the hooks saw, or nothing.
        request.expect = Some((preview.from_commit, preview.ours_commit));
        let preview = MergeReport::from(preview);
        let payload = serde_json::json!({
            "volume": volume,
            "into": request.into,
            "from": request.from,
            "strategy": request.strategy,
            "merge": preview,
        });
        hooks
            .check("pre-merge", &volume, Some(&request.into), payload)
            .await?;
    }
    let from = request.from.clone();
    let report = pool.merge(&volume, request).await?;
    if report.outcome == MergeOutcome::Conflicts && !report.dry_run {
        let ranges = match report.conflicts.len() {
            1 => "1 range".to_string(),
            n => format!("{n} ranges"),
        };
        let message = format!(
            "merging {from} into {volume}@{} conflicts: both sides changed {} ({} bytes) in \
             {ranges} differently since their common ancestor; nothing changed. Merge with \
             strategy \"ours\" or \"theirs\" to settle them, or \"manual\" to resolve them \
             by hand",
            report.into,
            format_size(report.conflict_bytes),
            report.conflict_bytes,
        );
        let conflicts = report.conflicts.into_iter().map(ByteRange::from).collect();
        return Err(ApiError::merge_conflict(message, conflicts));
    }
    Ok(Json(report.into()))
}

/// List the merges of a volume waiting for manual resolution.
#[utoipa::path(
    get,
    path = "/v1/volumes/{vol}/merges",
    tag = "history",
    params(("vol" = String, Path, description = "Volume name")),
    responses(
        (status = 200, description = "Merges in progress", body = [MergeInProgress]),
        (status = 400, description = "Invalid volume name", body = ErrorBody),
        (status = 404, description = "No such volume", body = ErrorBody),
    )
)]
pub async fn list_merges(
    State(pool): State<Pool>,
    ApiPath(volume): ApiPath<String>,
) -> Result<Json<Vec<MergeInProgress>>, ApiError> {
    validate::volume_name(&volume)?;
    let merges = blocking(pool, move |pool| Ok(pool.merges_in_progress(&volume)?)).await?;
    Ok(Json(
        merges.into_iter().map(MergeInProgress::from).collect(),
    ))
}

/// Show a merge in progress: its conflicting ranges and how much was written since.
#[utoipa::path(
    get,
    path = "/v1/volumes/{vol}/merges/{merge_branch}",
    tag = "history",
    params(
        ("vol" = String, Path, description = "Volume name"),
        ("merge_branch" = String, Path, description = "Merge branch name, with '/' sent as %2F"),
    ),
    responses(
        (status = 200, description = "The merge in progress", body = MergeInProgress),
        (status = 400, description = "Invalid name", body = ErrorBody),
        (status = 404, description = "No such volume, or no merge in progress on that branch", body = ErrorBody),
    )
)]
pub async fn show_merge(
    State(pool): State<Pool>,
    ApiPath((volume, branch)): ApiPath<(String, String)>,
) -> Result<Json<MergeInProgress>, ApiError> {
    validate::volume_name(&volume)?;
    validate::branch_name(&branch)?;
    let merge = blocking(pool, move |pool| {
        Ok(pool.merge_in_progress(&volume, &branch)?)
    })
    .await?;
    Ok(Json(merge.into()))
}

/// Conclude a merge in progress.
///
/// Commits the merge branch as it is now with two parents (the target branch's latest commit
/// and the merged commit), moves the target branch to that commit and deletes the merge
/// branch. Refused while sessions are attached to either branch, and when the target branch
/// got commits or writes since the merge began (abort and merge again); nothing changes then.
#[utoipa::path(
    post,
    path = "/v1/volumes/{vol}/merges/{merge_branch}/conclude",
    tag = "history",
    params(
        ("vol" = String, Path, description = "Volume name"),
        ("merge_branch" = String, Path, description = "Merge branch name, with '/' sent as %2F"),
    ),
    request_body(content = Option<ConcludeMerge>, description = "Optional message and author"),
    responses(
        (status = 201, description = "The merge commit", body = Commit,
            headers(("location" = String, description = "Path of the new commit"))),
        (status = 400, description = "Invalid name, message, author or body", body = ErrorBody),
        (status = 404, description = "No such volume, or no merge in progress on that branch", body = ErrorBody),
        (status = 409, description = "Open sessions on either branch, or the target branch moved on", body = ErrorBody),
        (status = 507, description = "No space left in the pool", body = ErrorBody),
    )
)]
pub async fn conclude_merge(
    Acting(pool): Acting,
    ApiPath((volume, branch)): ApiPath<(String, String)>,
    Extension(hooks): Extension<Hooks>,
    OptionalJsonBody(request): OptionalJsonBody<ConcludeMerge>,
) -> Result<impl IntoResponse, ApiError> {
    validate::volume_name(&volume)?;
    validate::branch_name(&branch)?;
    let ConcludeMerge { message, author } = request;
    let merge = pool.merge_in_progress(&volume, &branch)?;
    if hooks.has_blocking("pre-merge", &volume, Some(&merge.into)) {
        let into = merge.into.clone();
        let payload = serde_json::json!({
            "volume": volume,
            "into": into,
            "from": merge.from,
            "strategy": "manual",
            "merge_in_progress": MergeInProgress::from(merge),
        });
        hooks
            .check("pre-merge", &volume, Some(&into), payload)
            .await?;
    }
    if let Some(message) = &message {
        validate::commit_message(message)?;
    }
    validate::commit_author(author.as_deref())?;
    let info = pool
        .conclude_merge(&volume, &branch, message, author)
        .await?;
    let headers = location(format!("/v1/volumes/{}/commits/{}", info.volume, info.id));
    Ok((StatusCode::CREATED, headers, Json(Commit::from(info))))
}

/// Abort a merge in progress: delete its merge branch with everything written on it. The
/// target branch never changed.
#[utoipa::path(
    post,
    path = "/v1/volumes/{vol}/merges/{merge_branch}/abort",
    tag = "history",
    params(
        ("vol" = String, Path, description = "Volume name"),
        ("merge_branch" = String, Path, description = "Merge branch name, with '/' sent as %2F"),
    ),
    responses(
        (status = 204, description = "Aborted"),
        (status = 400, description = "Invalid name", body = ErrorBody),
        (status = 404, description = "No such volume, or no merge in progress on that branch", body = ErrorBody),
        (status = 409, description = "Open sessions on the merge branch", body = ErrorBody),
    )
)]
pub async fn abort_merge(
    Acting(pool): Acting,
    ApiPath((volume, branch)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    validate::volume_name(&volume)?;
    validate::branch_name(&branch)?;
    pool.abort_merge(&volume, &branch).await?;
    Ok(StatusCode::NO_CONTENT)
}
