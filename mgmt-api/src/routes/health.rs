//! `/healthz`, `/readyz` and `/v1/openapi.json`.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use grove_engine::Pool;

use super::blocking;
use crate::error::{ApiError, ErrorBody};
use crate::model::Health;

/// Liveness: the server answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses((status = 200, description = "The server is up", body = Health))
)]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Readiness: the pool is open and answers.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready to serve", body = Health),
        (status = 503, description = "The pool is closed or failed", body = ErrorBody),
    )
)]
pub async fn readyz(State(pool): State<Pool>) -> Result<Json<Health>, ApiError> {
    blocking(pool, |pool| {
        if pool.is_failed() {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "pool_failed",
                "not ready: the pool failed after an I/O error and must be reopened (restart grove)",
            ));
        }
        pool.stats().map_err(|error| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                format!("not ready: {error}"),
            )
        })
    })
    .await?;
    Ok(Json(Health {
        status: "ready".into(),
    }))
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "health",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json",
        body = Object))
)]
pub async fn openapi_json() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::document_json(),
    )
}
