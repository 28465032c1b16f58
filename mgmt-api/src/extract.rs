//! Extractors that report failures in the API's JSON error shape instead of axum's plain-text
//! rejections.

use axum::body::{Body, Bytes};
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::Json;
use grove_engine::Pool;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A JSON request body. Malformed JSON, wrong types, missing or unknown fields are refused with
/// 400; a body sent with another content type with 415.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(value) = Json::<T>::from_request(request, state).await?;
        Ok(JsonBody(value))
    }
}

/// A JSON request body that may be left out: a request with no body and no content type
/// reads as `T::default()`; anything else is checked as [`JsonBody`] checks it.
pub struct OptionalJsonBody<T>(pub T);

impl<S, T> FromRequest<S> for OptionalJsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Default,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        if request.headers().contains_key(CONTENT_TYPE) {
            let JsonBody(value) = JsonBody::from_request(request, state).await?;
            return Ok(OptionalJsonBody(value));
        }
        let (parts, body) = request.into_parts();
        let bytes = Bytes::from_request(Request::from_parts(parts.clone(), body), state)
            .await
            .map_err(|rejection| ApiError::invalid_argument(rejection.body_text()))?;
        if bytes.is_empty() {
            return Ok(OptionalJsonBody(T::default()));
        }
        let request = Request::from_parts(parts, Body::from(bytes));
        let JsonBody(value) = JsonBody::from_request(request, state).await?;
        Ok(OptionalJsonBody(value))
    }
}

/// The pool, acting for the caller: the changes a request makes are logged as made by the
/// `X-Grove-Actor` header's value (1-128 printable ASCII characters), or else by
/// `api@CLIENT_IP`.
pub struct Acting(pub Pool);

/// The header naming who a request acts for.
pub const ACTOR_HEADER: &str = "x-grove-actor";

impl FromRequestParts<Pool> for Acting {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, pool: &Pool) -> Result<Self, Self::Rejection> {
        let actor = match parts.headers.get(ACTOR_HEADER) {
            Some(value) => value
                .to_str()
                .ok()
                .filter(|v| {
                    (1..=128).contains(&v.len())
                        && v.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
                })
                .ok_or_else(|| {
                    ApiError::invalid_argument(
                        "X-Grove-Actor must be 1-128 printable ASCII characters",
                    )
                })?
                .to_string(),
            None => match parts.extensions.get::<ConnectInfo<SocketAddr>>() {
                Some(ConnectInfo(address)) => format!("api@{}", address.ip()),
                None => "api".to_string(),
            },
        };
        Ok(Acting(pool.with_actor(actor)))
    }
}

/// Path parameters, percent-decoded (so `feature%2Fx` arrives as `feature/x`).
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(value) = Path::<T>::from_request_parts(parts, state).await?;
        Ok(ApiPath(value))
    }
}

/// A query string.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Query(value) = Query::<T>::from_request_parts(parts, state).await?;
        Ok(ApiQuery(value))
    }
}
