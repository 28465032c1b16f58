//! `GET /v1/pool` and `POST /v1/pool/reclaim`.

use axum::extract::State;
use axum::Json;
use grove_engine::Pool;

use super::blocking;
use crate::error::{ApiError, ErrorBody};
use crate::extract::Acting;
use crate::model::{PoolStatus, SpaceReport};

/// Capacity, used and free bytes of the pool, with the totals of the latest space scan.
#[utoipa::path(
    get,
    path = "/v1/pool",
    tag = "pool",
    responses(
        (status = 200, description = "Pool capacity and use", body = PoolStatus),
        (status = 500, description = "The pool could not be read", body = ErrorBody),
    )
)]
pub async fn pool_status(State(pool): State<Pool>) -> Result<Json<PoolStatus>, ApiError> {
    let status = blocking(pool, |pool| {
        let stats = pool.stats()?;
        Ok(PoolStatus::new(
            stats,
            pool.space_report().as_ref(),
            pool.is_failed(),
            pool.last_event_seq(),
        ))
    })
    .await?;
    Ok(Json(status))
}

/// Run a space scan now.
///
/// Returns to the pool whatever no branch, commit or tag references any more (a squashed
/// commit's blocks, a reset head's old writes, a deleted clone's blocks), and measures what
/// each volume, branch and commit holds alone. Waits for a scan already running, then runs
/// its own; writes go on meanwhile. The freed space is reusable, and counted out of
/// `used_bytes`, when the answer arrives.
#[utoipa::path(
    post,
    path = "/v1/pool/reclaim",
    tag = "pool",
    responses(
        (status = 200, description = "What the scan freed and measured", body = SpaceReport),
        (status = 500, description = "The scan failed", body = ErrorBody),
        (status = 503, description = "The pool is closed", body = ErrorBody),
    )
)]
pub async fn reclaim(Acting(pool): Acting) -> Result<Json<SpaceReport>, ApiError> {
    let report = pool.reclaim().await?;
    Ok(Json(report.into()))
}
