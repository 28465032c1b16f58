//! The API's error type and its wire form, `{"error": {"code": "...", "message": "..."}}`.
//!
//! Engine errors become HTTP statuses in exactly one place, [`engine_error_status`]; request
//! problems the API finds itself (malformed JSON, bad query strings, unknown routes) use the
//! same body shape so that clients parse one thing.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use grove_engine::Error as EngineError;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::model::ByteRange;

/// An error as the API reports it: an HTTP status, a stable machine-readable code and a message
/// for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// For a merge refused on conflicts: the conflicting ranges.
    pub conflicts: Option<Vec<ByteRange>>,
}

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ErrorDetail {
    /// Stable code: `not_found`, `already_exists`, `invalid_argument`, `invalid_request`,
    /// `ambiguous`, `conflict`, `read_only`, `out_of_range`, `no_space`, `corrupt`, `io_error`,
    /// `poisoned`, `closed`, `not_ready`, `unsupported_media_type`, `payload_too_large`,
    /// `method_not_allowed`, `merge_conflict`, `internal`.
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
    /// Only with code `merge_conflict`: the byte ranges both sides changed to different
    /// content, in order. Absent from every other error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflicts: Option<Vec<ByteRange>>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            conflicts: None,
        }
    }

    /// A merge with strategy `fail` met conflicts and changed nothing: 409 with the ranges.
    pub fn merge_conflict(message: impl Into<String>, conflicts: Vec<ByteRange>) -> Self {
        ApiError {
            conflicts: Some(conflicts),
            ..ApiError::new(StatusCode::CONFLICT, "merge_conflict", message)
        }
    }

    /// A request the API refuses before it reaches the engine: bad JSON, query or path.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// A field value the API refuses (a name, size or ref).
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }

    /// A blocking hook refused the operation, which changed nothing.
    pub fn vetoed(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::CONFLICT, "vetoed_by_hook", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
                conflicts: self.conflicts.clone(),
            },
        }
    }
}

/// The one mapping from engine errors to HTTP statuses and error codes.
pub fn engine_error_status(error: &EngineError) -> (StatusCode, &'static str) {
    match error {
        EngineError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
        EngineError::AlreadyExists { .. } => (StatusCode::CONFLICT, "already_exists"),
        EngineError::InvalidArgument(_) => (StatusCode::BAD_REQUEST, "invalid_argument"),
        EngineError::Ambiguous { .. } => (StatusCode::BAD_REQUEST, "ambiguous"),
        EngineError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
        EngineError::ReadOnly(_) => (StatusCode::CONFLICT, "read_only"),
        EngineError::OutOfRange { .. } => (StatusCode::BAD_REQUEST, "out_of_range"),
        EngineError::NoSpace => (StatusCode::INSUFFICIENT_STORAGE, "no_space"),
        EngineError::Corrupt { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "corrupt"),
        EngineError::Poisoned => (StatusCode::INTERNAL_SERVER_ERROR, "poisoned"),
        EngineError::Io(_) => (StatusCode::INTERNAL_SERVER_ERROR, "io_error"),
        EngineError::Closed => (StatusCode::SERVICE_UNAVAILABLE, "closed"),
        // The engine's error enum is non-exhaustive: a variant added later is a server error
        // until it is given a status here.
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        let (status, code) = engine_error_status(&error);
        // The code already says "invalid argument" or "conflict"; the message need not repeat it.
        let message = match error {
            EngineError::InvalidArgument(message) | EngineError::Conflict(message) => message,
            other => other.to_string(),
        };
        ApiError {
            status,
            code,
            message,
            conflicts: None,
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonDataError(inner) => {
                ApiError::invalid_request(format!("invalid request body: {}", detail(&inner)))
            }
            JsonRejection::JsonSyntaxError(inner) => {
                ApiError::invalid_request(format!("malformed JSON body: {}", detail(&inner)))
            }
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the request body must be JSON, sent with `Content-Type: application/json`",
            ),
            other => body_rejection(other.status(), other.body_text()),
        }
    }
}

/// A body that could not be read at all: too large, or the connection failed.
pub(crate) fn body_rejection(status: StatusCode, text: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(status, "payload_too_large", "the request body is too large")
    } else if status.is_client_error() {
        ApiError::new(status, "invalid_request", text)
    } else {
        ApiError::new(status, "internal", text)
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        if rejection.status().is_client_error() {
            ApiError::invalid_request(rejection.body_text())
        } else {
            ApiError::internal(rejection.body_text())
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        match rejection {
            QueryRejection::FailedToDeserializeQueryString(inner) => {
                ApiError::invalid_request(format!("invalid query string: {}", detail(&inner)))
            }
            other => ApiError::invalid_request(other.body_text()),
        }
    }
}

/// The underlying parse error of a rejection, without axum's generic preamble.
fn detail(rejection: &dyn std::error::Error) -> String {
    match rejection.source() {
        Some(source) => source.to_string(),
        None => rejection.to_string(),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), code = self.code, message = %self.message, "request failed");
        }
        (self.status, Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_engine_error_has_a_fitting_status() {
        let cases: Vec<(EngineError, StatusCode, &str)> = vec![
            (
                EngineError::NotFound {
                    what: "volume \"x\"".into(),
                },
                StatusCode::NOT_FOUND,
                "not_found",
            ),
            (
                EngineError::AlreadyExists { what: "x".into() },
                StatusCode::CONFLICT,
                "already_exists",
            ),
            (
                EngineError::InvalidArgument("bad".into()),
                StatusCode::BAD_REQUEST,
                "invalid_argument",
            ),
            (
                EngineError::Ambiguous {
                    prefix: "ab".into(),
                    count: 2,
                },
                StatusCode::BAD_REQUEST,
                "ambiguous",
            ),
            (
                EngineError::Conflict("main".into()),
                StatusCode::CONFLICT,
                "conflict",
            ),
            (
                EngineError::ReadOnly("v@t".into()),
                StatusCode::CONFLICT,
                "read_only",
            ),
            (
                EngineError::OutOfRange {
                    offset_bytes: 1,
                    len_bytes: 2,
                    size_bytes: 0,
                },
                StatusCode::BAD_REQUEST,
                "out_of_range",
            ),
            (
                EngineError::NoSpace,
                StatusCode::INSUFFICIENT_STORAGE,
                "no_space",
            ),
            (
                EngineError::Corrupt {
                    what: "page".into(),
                    at: "7".into(),
                },
                StatusCode::INTERNAL_SERVER_ERROR,
                "corrupt",
            ),
            (
                EngineError::Poisoned,
                StatusCode::INTERNAL_SERVER_ERROR,
                "poisoned",
            ),
            (
                EngineError::Io(std::io::Error::other("disk")),
                StatusCode::INTERNAL_SERVER_ERROR,
                "io_error",
            ),
            (
                EngineError::Closed,
                StatusCode::SERVICE_UNAVAILABLE,
                "closed",
            ),
        ];
        for (error, status, code) in cases {
            let message = match &error {
                EngineError::InvalidArgument(message) | EngineError::Conflict(message) => {
                    message.clone()
                }
                other => other.to_string(),
            };
            let api = ApiError::from(error);
            assert_eq!((api.status, api.code), (status, code), "{message}");
            assert_eq!(api.message, message);
        }
    }

    #[test]
    fn body_has_the_documented_shape() {
        let body = serde_json::to_value(ApiError::not_found("volume \"x\" not found").body())
            .expect("serializable");
        assert_eq!(
            body,
            serde_json::json!({"error": {"code": "not_found", "message": "volume \"x\" not found"}})
        );
    }

    #[test]
    fn merge_conflicts_carry_their_ranges() {
        let conflict = ApiError::merge_conflict(
            "two ranges conflict",
            vec![ByteRange {
                offset_bytes: 4096,
                len_bytes: 8192,
            }],
        );
        assert_eq!(conflict.status, StatusCode::CONFLICT);
        let body = serde_json::to_value(conflict.body()).expect("serializable");
        assert_eq!(
            body,
            serde_json::json!({"error": {"code": "merge_conflict", "message": "two ranges conflict",
                "conflicts": [{"offset_bytes": 4096, "len_bytes": 8192}]}})
        );
        let parsed: ErrorBody = serde_json::from_value(body).expect("parses back");
        assert_eq!(parsed, conflict.body());
    }
}
