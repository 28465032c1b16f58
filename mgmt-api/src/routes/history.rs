//! Comparing and explaining history: `GET /v1/volumes/{vol}/diff` and
//! `GET /v1/volumes/{vol}/blame`.

use axum::extract::State;
use axum::Json;
use grove_engine::{Pool, BLOCK_SIZE, MAIN_BRANCH};

use super::{blocking, resolve_ref};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiPath, ApiQuery};
use crate::model::{
    BlameQuery, BlameRange, BlameReport, ByteRange, DiffQuery, DiffReport, ResolvedRef, DIFF_NOTE,
};
use crate::validate;

/// The blocks that differ between two refs.
///
/// Costs the blocks changed on the two histories since they met, not the volume size. Refs
/// may name a volume sharing this one's history (a clone or its source); other volumes are
/// refused. A block counts as changed when the two refs map it to different data, so a block
/// rewritten with identical content may be reported too (`note` says so).
#[utoipa::path(
    get,
    path = "/v1/volumes/{vol}/diff",
    tag = "history",
    params(("vol" = String, Path, description = "Volume name"), DiffQuery),
    responses(
        (status = 200, description = "The changed byte ranges and their counts", body = DiffReport),
        (status = 400, description = "Invalid ref or limit, or volumes with no shared history", body = ErrorBody),
        (status = 404, description = "No such volume or ref", body = ErrorBody),
    )
)]
pub async fn diff(
    State(pool): State<Pool>,
    ApiPath(volume): ApiPath<String>,
    ApiQuery(query): ApiQuery<DiffQuery>,
) -> Result<Json<DiffReport>, ApiError> {
    validate::volume_name(&volume)?;
    let from = validate::ref_in_context(&volume, &query.from)?;
    let to = validate::ref_in_context(&volume, &query.to)?;
    let limit = validate::diff_limit(query.limit)?;
    resolve_ref(&pool, &volume, &from).await?;
    resolve_ref(&pool, &volume, &to).await?;
    let diff = pool.diff(&volume, &from, &to).await?;
    let ranges = diff.byte_ranges();
    let extent_count = ranges.len() as u64;
    let extents: Vec<ByteRange> = ranges
        .into_iter()
        .take(limit)
        .map(|(offset_bytes, len_bytes)| ByteRange {
            offset_bytes,
            len_bytes,
        })
        .collect();
    Ok(Json(DiffReport {
        extents_truncated: (extents.len() as u64) < extent_count,
        from: diff.from.clone().into(),
        to: diff.to.clone().into(),
        block_size_bytes: BLOCK_SIZE,
        extents,
        extent_count,
        changed_bytes: diff.changed_bytes(),
        changed_blocks: diff.blocks.len(),
        candidate_blocks: diff.candidate_blocks,
        note: DIFF_NOTE.to_string(),
    }))
}

/// Who last wrote each part of a byte range of a ref.
///
/// The range is cut into parts, in order, each credited to the commit whose change put its
/// content there (following merges into the merged side's history), to the branch head's
/// uncommitted writes, or to nobody (never written: it reads as zeros).
#[utoipa::path(
    get,
    path = "/v1/volumes/{vol}/blame",
    tag = "history",
    params(("vol" = String, Path, description = "Volume name"), BlameQuery),
    responses(
        (status = 200, description = "The range, part by part", body = BlameReport),
        (status = 400, description = "Invalid ref, offset or length, or a range past the end of the volume", body = ErrorBody),
        (status = 404, description = "No such volume or ref", body = ErrorBody),
    )
)]
pub async fn blame(
    State(pool): State<Pool>,
    ApiPath(volume): ApiPath<String>,
    ApiQuery(query): ApiQuery<BlameQuery>,
) -> Result<Json<BlameReport>, ApiError> {
    validate::volume_name(&volume)?;
    let reference = query.reference.as_deref().unwrap_or(MAIN_BRANCH);
    let refspec = validate::ref_in_volume(&volume, reference)?;
    let (offset_bytes, len_bytes) = (query.offset.bytes(), query.length.bytes());
    let target: ResolvedRef = {
        let refspec = refspec.clone();
        blocking(pool.clone(), move |pool| Ok(pool.resolve(&refspec)?)).await?
    }
    .into();
    let ranges = pool.blame(&refspec, offset_bytes, len_bytes).await?;
    Ok(Json(BlameReport {
        target,
        offset_bytes,
        len_bytes,
        ranges: ranges.into_iter().map(BlameRange::from).collect(),
    }))
}
