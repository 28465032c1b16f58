//! `GET /v1/pool`, `POST /v1/pool/reclaim` and `/v1/pool/scrub`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use grove_engine::Pool;

use super::{blocking, location};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Acting, OptionalJsonBody};
use crate::model::{PoolStatus, ScrubReport, SpaceReport, StartScrub};

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

/// Start a scrub: read every live data block of the pool and check it against its checksum.
///
/// The scrub runs in the background, online, within a bandwidth budget (`rate`, default
/// 64 MiB/s); `GET /v1/pool/scrub` follows it. Each bad block it finds is logged as a
/// `data.corrupted` event, unless a read already reported that block, and the end as a
/// `scrub.completed` event. Blocks of volumes with checksums off are read and counted as
/// unchecked. The body may be left out.
#[utoipa::path(
    post,
    path = "/v1/pool/scrub",
    tag = "pool",
    request_body(content = Option<StartScrub>, description = "Optional bandwidth budget"),
    responses(
        (status = 202, description = "The scrub started; its report so far", body = ScrubReport,
            headers(("location" = String, description = "Where to follow it: /v1/pool/scrub"))),
        (status = 400, description = "Invalid rate or body", body = ErrorBody),
        (status = 409, description = "A scrub is already running", body = ErrorBody),
    )
)]
pub async fn start_scrub(
    Acting(pool): Acting,
    OptionalJsonBody(request): OptionalJsonBody<StartScrub>,
) -> Result<impl IntoResponse, ApiError> {
    let report = pool.start_scrub(request.rate.map(|rate| rate.bytes()))?;
    let headers = location("/v1/pool/scrub".to_string());
    Ok((
        StatusCode::ACCEPTED,
        headers,
        Json(ScrubReport::from(report)),
    ))
}

/// Stop the running scrub; it ends within one chunk of blocks with state `stopped`.
/// Answers with its report (as it was when asked); stopping a finished scrub changes nothing.
#[utoipa::path(
    delete,
    path = "/v1/pool/scrub",
    tag = "pool",
    responses(
        (status = 200, description = "The scrub's report", body = ScrubReport),
        (status = 404, description = "No scrub has run since the server started", body = ErrorBody),
    )
)]
pub async fn stop_scrub(State(pool): State<Pool>) -> Result<Json<ScrubReport>, ApiError> {
    scrub_reply(pool.stop_scrub())
}

/// The running scrub's progress, or the last scrub's result.
#[utoipa::path(
    get,
    path = "/v1/pool/scrub",
    tag = "pool",
    responses(
        (status = 200, description = "The running or last scrub", body = ScrubReport),
        (status = 404, description = "No scrub has run since the server started", body = ErrorBody),
    )
)]
pub async fn scrub_status(State(pool): State<Pool>) -> Result<Json<ScrubReport>, ApiError> {
    scrub_reply(pool.scrub_status())
}

/// A scrub's report, or 404 when none ran since the server started.
fn scrub_reply(report: Option<grove_engine::ScrubReport>) -> Result<Json<ScrubReport>, ApiError> {
    match report {
        Some(report) => Ok(Json(report.into())),
        None => Err(ApiError::not_found(
            "no scrub has run since the server started (POST /v1/pool/scrub starts one)",
        )),
    }
}
