//! `POST /v1/volumes/{vol}/merges`.

use axum::extract::State;
use axum::Json;
use grove_engine::{MergeOutcome, Pool};

use super::resolve_ref;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiPath, JsonBody};
use crate::model::{ByteRange, CreateMerge, MergeReport};
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
        (status = 409, description = "Conflicts with strategy `fail` (code `merge_conflict`, ranges in `error.conflicts`), or uncommitted writes or open sessions on the branch", body = ErrorBody),
        (status = 507, description = "No space left in the pool", body = ErrorBody),
    )
)]
pub async fn merge(
    State(pool): State<Pool>,
    ApiPath(volume): ApiPath<String>,
    JsonBody(request): JsonBody<CreateMerge>,
) -> Result<Json<MergeReport>, ApiError> {
    validate::volume_name(&volume)?;
    let request = validate::merge_request(&volume, request)?;
    resolve_ref(&pool, &volume, &request.from).await?;
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
             strategy \"ours\" or \"theirs\" to settle them",
            report.into,
            format_size(report.conflict_bytes),
            report.conflict_bytes,
        );
        let conflicts = report.conflicts.into_iter().map(ByteRange::from).collect();
        return Err(ApiError::merge_conflict(message, conflicts));
    }
    Ok(Json(report.into()))
}
