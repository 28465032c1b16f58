//! `/v1/volumes/{vol}/tags` and `/v1/volumes/{vol}/tags/{tag}`.
//!
//! Tag names may contain '/': clients send it percent-encoded as %2F inside the path segment.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use grove_engine::Pool;

use super::{blocking, encode_segment, location};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Acting, ApiPath, JsonBody};
use crate::hooks::Hooks;
use crate::model::{CreateTag, Tag};
use crate::validate;

/// List the tags of a volume.
#[utoipa::path(
    get,
    path = "/v1/volumes/{vol}/tags",
    tag = "tags",
    params(("vol" = String, Path, description = "Volume name")),
    responses(
        (status = 200, description = "Every tag of the volume", body = [Tag]),
        (status = 400, description = "Invalid volume name", body = ErrorBody),
        (status = 404, description = "No such volume", body = ErrorBody),
    )
)]
pub async fn list_tags(
    State(pool): State<Pool>,
    ApiPath(volume): ApiPath<String>,
) -> Result<Json<Vec<Tag>>, ApiError> {
    validate::volume_name(&volume)?;
    let tags = blocking(pool, move |pool| Ok(pool.tags(&volume)?)).await?;
    Ok(Json(tags.into_iter().map(Tag::from).collect()))
}

/// Tag a commit.
///
/// A branch as `ref` tags its head commit.
#[utoipa::path(
    post,
    path = "/v1/volumes/{vol}/tags",
    tag = "tags",
    params(("vol" = String, Path, description = "Volume name")),
    request_body = CreateTag,
    responses(
        (status = 201, description = "The new tag", body = Tag,
            headers(("location" = String, description = "Path of the new tag"))),
        (status = 400, description = "Invalid name, ref or body, or a branch with no commits", body = ErrorBody),
        (status = 404, description = "No such volume or ref", body = ErrorBody),
        (status = 409, description = "A tag or branch with that name exists", body = ErrorBody),
    )
)]
pub async fn create_tag(
    Acting(pool): Acting,
    ApiPath(volume): ApiPath<String>,
    JsonBody(request): JsonBody<CreateTag>,
) -> Result<impl IntoResponse, ApiError> {
    validate::volume_name(&volume)?;
    validate::new_ref_name("tag", &request.name)?;
    let target = validate::ref_in_volume(&volume, &request.target)?;
    let info = pool.create_tag(&volume, &request.name, &target).await?;
    let headers = location(format!(
        "/v1/volumes/{}/tags/{}",
        info.volume,
        encode_segment(&info.name)
    ));
    Ok((StatusCode::CREATED, headers, Json(Tag::from(info))))
}

/// Show a tag.
#[utoipa::path(
    get,
    path = "/v1/volumes/{vol}/tags/{tag}",
    tag = "tags",
    params(
        ("vol" = String, Path, description = "Volume name"),
        ("tag" = String, Path, description = "Tag name, with '/' sent as %2F"),
    ),
    responses(
        (status = 200, description = "The tag", body = Tag),
        (status = 400, description = "Invalid name", body = ErrorBody),
        (status = 404, description = "No such volume or tag", body = ErrorBody),
    )
)]
pub async fn show_tag(
    State(pool): State<Pool>,
    ApiPath((volume, tag)): ApiPath<(String, String)>,
) -> Result<Json<Tag>, ApiError> {
    validate::volume_name(&volume)?;
    validate::tag_name(&tag)?;
    let info = blocking(pool, move |pool| {
        pool.tags(&volume)?
            .into_iter()
            .find(|info| info.name == tag)
            .ok_or_else(|| {
                ApiError::not_found(format!("tag {tag:?} of volume {volume:?} not found"))
            })
    })
    .await?;
    Ok(Json(info.into()))
}

/// Delete a tag. The commit stays while a branch or another tag reaches it.
#[utoipa::path(
    delete,
    path = "/v1/volumes/{vol}/tags/{tag}",
    tag = "tags",
    params(
        ("vol" = String, Path, description = "Volume name"),
        ("tag" = String, Path, description = "Tag name, with '/' sent as %2F"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Invalid name", body = ErrorBody),
        (status = 404, description = "No such volume or tag", body = ErrorBody),
    )
)]
pub async fn delete_tag(
    Acting(pool): Acting,
    Extension(hooks): Extension<Hooks>,
    ApiPath((volume, tag)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    validate::volume_name(&volume)?;
    validate::tag_name(&tag)?;
    if !pool.tags(&volume)?.iter().any(|info| info.name == tag) {
        return Err(ApiError::not_found(format!(
            "tag {tag:?} of volume {volume:?} not found"
        )));
    }
    let payload = serde_json::json!({"kind": "tag", "volume": volume, "tag": tag});
    hooks
        .check("pre-delete", &volume, Some(&tag), payload)
        .await?;
    pool.delete_tag(&volume, &tag).await?;
    Ok(StatusCode::NO_CONTENT)
}
