//! `GET /v1/sessions`.

use axum::extract::State;
use axum::Json;
use grove_engine::Pool;

use super::blocking;
use crate::error::{ApiError, ErrorBody};
use crate::model::Session;

/// Live I/O sessions (NBD and iSCSI connections) with their counters.
#[utoipa::path(
    get,
    path = "/v1/sessions",
    tag = "sessions",
    responses(
        (status = 200, description = "Live sessions", body = [Session]),
        (status = 500, description = "Server error", body = ErrorBody),
    )
)]
pub async fn list_sessions(State(pool): State<Pool>) -> Result<Json<Vec<Session>>, ApiError> {
    let sessions = blocking(pool, |pool| Ok(pool.sessions())).await?;
    Ok(Json(sessions.into_iter().map(Session::from).collect()))
}
