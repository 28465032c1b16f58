//! `/v1/volumes`, `/v1/volumes/{vol}` and `/v1/volumes/{vol}/clones`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use grove_engine::Pool;

use super::{blocking, location};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Acting, ApiPath, JsonBody};
use crate::hooks::Hooks;
use crate::model::{CreateClone, CreateVolume, Volume, VolumeDetail, VolumeSpaceScan};
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
/// Unless `checksums` is false, every block written gets a crc32c that every read checks.
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
    Acting(pool): Acting,
    JsonBody(request): JsonBody<CreateVolume>,
) -> Result<impl IntoResponse, ApiError> {
    validate::volume_name(&request.name)?;
    let size_bytes = validate::volume_size(request.size)?;
    let options = grove_engine::VolumeOptions {
        checksums: request.checksums,
    };
    let info = pool
        .create_volume_with(&request.name, size_bytes, options)
        .await?;
    let headers = location(format!("/v1/volumes/{}", info.name));
    Ok((StatusCode::CREATED, headers, Json(Volume::from(info))))
}

/// Show a volume, with the space figures of the latest space scan.
///
/// `space` says what the volume's refs hold and what deleting the volume, each branch or each
/// commit would free, as of the scan named by its `generation` and `computed_unix`; it is null
/// until a scan has seen the volume. `POST /v1/pool/reclaim` runs a scan now.
#[utoipa::path(
    get,
    path = "/v1/volumes/{vol}",
    tag = "volumes",
    params(("vol" = String, Path, description = "Volume name")),
    responses(
        (status = 200, description = "The volume and its space figures", body = VolumeDetail),
        (status = 400, description = "Invalid volume name", body = ErrorBody),
        (status = 404, description = "No such volume", body = ErrorBody),
    )
)]
pub async fn show_volume(
    State(pool): State<Pool>,
    ApiPath(volume): ApiPath<String>,
) -> Result<Json<VolumeDetail>, ApiError> {
    validate::volume_name(&volume)?;
    let detail = blocking(pool, move |pool| {
        let info = pool.volume(&volume)?;
        let report = pool.space_report();
        // A scan older than the volume measured another volume of the same name, if any.
        let space = report.as_ref().and_then(|report| {
            report
                .volumes
                .get(&volume)
                .filter(|_| report.computed_unix >= info.created_unix)
                .map(|space| VolumeSpaceScan::new(report, space))
        });
        Ok(VolumeDetail {
            volume: info.into(),
            space,
        })
    })
    .await?;
    Ok(Json(detail))
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
        (status = 409, description = "The volume is in use, or another volume's history continues from it (its clones, or branches merged from its commits)", body = ErrorBody),
    )
)]
pub async fn delete_volume(
    Acting(pool): Acting,
    Extension(hooks): Extension<Hooks>,
    ApiPath(volume): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    validate::volume_name(&volume)?;
    pool.volume(&volume)?;
    let payload = serde_json::json!({"kind": "volume", "volume": volume});
    hooks.check("pre-delete", &volume, None, payload).await?;
    pool.delete_volume(&volume).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// List the volumes cloned from a volume.
#[utoipa::path(
    get,
    path = "/v1/volumes/{vol}/clones",
    tag = "volumes",
    params(("vol" = String, Path, description = "Source volume name")),
    responses(
        (status = 200, description = "Every volume whose origin is this volume", body = [Volume]),
        (status = 400, description = "Invalid volume name", body = ErrorBody),
        (status = 404, description = "No such volume", body = ErrorBody),
    )
)]
pub async fn list_clones(
    State(pool): State<Pool>,
    ApiPath(volume): ApiPath<String>,
) -> Result<Json<Vec<Volume>>, ApiError> {
    validate::volume_name(&volume)?;
    let clones = blocking(pool, move |pool| {
        pool.volume(&volume)?;
        Ok(pool
            .volumes()
            .into_iter()
            .filter(|info| info.origin.as_ref().is_some_and(|o| o.volume == volume))
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(Json(clones.into_iter().map(Volume::from).collect()))
}

/// Clone a volume.
///
/// Creates a new volume from a ref of this one, in O(1): the clone shares every block with its
/// source and copies nothing; writes to either side afterwards stay apart. The clone's
/// history continues from the source's, so refs of the two can be diffed and merged. A
/// volume another volume's history continues from cannot be deleted until that one is.
#[utoipa::path(
    post,
    path = "/v1/volumes/{vol}/clones",
    tag = "volumes",
    params(("vol" = String, Path, description = "Source volume name")),
    request_body = CreateClone,
    responses(
        (status = 201, description = "The new volume", body = Volume,
            headers(("location" = String, description = "Path of the new volume"))),
        (status = 400, description = "Invalid name, ref or body", body = ErrorBody),
        (status = 404, description = "No such volume or ref", body = ErrorBody),
        (status = 409, description = "A volume with that name exists", body = ErrorBody),
    )
)]
pub async fn create_clone(
    Acting(pool): Acting,
    ApiPath(volume): ApiPath<String>,
    JsonBody(request): JsonBody<CreateClone>,
) -> Result<impl IntoResponse, ApiError> {
    validate::volume_name(&volume)?;
    validate::volume_name(&request.name)?;
    let source = request
        .source
        .as_deref()
        .unwrap_or(grove_engine::MAIN_BRANCH);
    let source = validate::ref_in_volume(&volume, source)?;
    let info = pool.clone_volume(&source, &request.name).await?;
    let headers = location(format!("/v1/volumes/{}", info.name));
    Ok((StatusCode::CREATED, headers, Json(Volume::from(info))))
}
