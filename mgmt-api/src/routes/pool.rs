//! `GET /v1/pool`.

use axum::extract::State;
use axum::Json;
use grove_engine::Pool;

use super::blocking;
use crate::error::{ApiError, ErrorBody};
use crate::model::PoolStatus;

/// Capacity, used and free bytes of the pool.
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
    let stats = blocking(pool, |pool| Ok(pool.stats()?)).await?;
    Ok(Json(stats.into()))
}
