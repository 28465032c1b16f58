//! `/v1/volumes` and `/v1/volumes/{vol}`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use grove_engine::Pool;

use super::{blocking, location};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiPath, JsonBody};
use crate::model::{CreateVolume, Volume};
use crate::validate;

/// List volumes.
#[utoipa::path(
    get,
    path = "/v1/volumes",
    tag = "volumes",
    responses(
        (status = 200, description = "Every volume, by name", body = [Volume]),
        (status = 500, description = "Server error", body = ErrorBody),
    )
)]
pub async fn list_volumes(State(pool): State<Pool>) -> Result<Json<Vec<Volume>>, ApiError> {
    let volumes = blocking(pool, |pool| Ok(pool.volumes())).await?;
    Ok(Json(volumes.into_iter().map(Volume::from).collect()))
}

/// Create a volume.
///
/// The volume starts empty (reads return zeros) with one branch, `main`, and no commits.
#[utoipa::path(
    post,
    path = "/v1/volumes",
    tag = "volumes",
    request_body = CreateVolume,
    responses(
        (status = 201, description = "The new volume", body = Volume,
            headers(("location" = String, description = "Path of the new volume"))),
        (status = 400, description = "Invalid name, size or body", body = ErrorBody),
        (status = 409, description = "A volume with that name exists", body = ErrorBody),
        (status = 507, description = "No space left in the pool", body = ErrorBody),
    )
)]
pub async fn create_volume(
    State(pool): State<Pool>,
    JsonBody(request): JsonBody<CreateVolume>,
) -> Result<impl IntoResponse, ApiError> {
    validate::volume_name(&request.name)?;
    let size_bytes = validate::volume_size(request.size)?;
    let info = pool.create_volume(&request.name, size_bytes).await?;
    let headers = location(format!("/v1/volumes/{}", info.name));
    Ok((StatusCode::CREATED, headers, Json(Volume::from(info))))
}

/// Show a volume.
#[utoipa::path(
    get,
    path = "/v1/volumes/{vol}",
    tag = "volumes",
    params(("vol" = String, Path, description = "Volume name")),
    responses(
        (status = 200, description = "The volume", body = Volume),
        (status = 400, description = "Invalid volume name", body = ErrorBody),
        (status = 404, description = "No such volume", body = ErrorBody),
    )
)]
pub async fn show_volume(
    State(pool): State<Pool>,
    ApiPath(volume): ApiPath<String>,
) -> Result<Json<Volume>, ApiError> {
    validate::volume_name(&volume)?;
    let info = blocking(pool, move |pool| Ok(pool.volume(&volume)?)).await?;
    Ok(Json(info.into()))
}

/// Delete a volume with all its branches, commits and tags.
#[utoipa::path(
    delete,
    path = "/v1/volumes/{vol}",
    tag = "volumes",
    params(("vol" = String, Path, description = "Volume name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Invalid volume name", body = ErrorBody),
        (status = 404, description = "No such volume", body = ErrorBody),
        (status = 409, description = "The volume is in use", body = ErrorBody),
    )
)]
pub async fn delete_volume(
    State(pool): State<Pool>,
    ApiPath(volume): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    validate::volume_name(&volume)?;
    pool.delete_volume(&volume).await?;
    Ok(StatusCode::NO_CONTENT)
}
