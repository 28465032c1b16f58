//! grove's control plane: the REST API under `/v1` over an engine [`Pool`], with its OpenAPI
//! document at `/v1/openapi.json` and the probes `/healthz` and `/readyz`.
//!
//! It validates every request before it reaches the engine, maps engine errors to HTTP statuses
//! in one place ([`error::engine_error_status`]) and answers every failure, including malformed
//! requests and unknown routes, as `{"error": {"code": "...", "message": "..."}}`.
//!
//! It must never know NBD or iSCSI, nor touch the disk itself: everything goes through the
//! engine's public API.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod error;
pub mod extract;
pub mod hooks;
pub mod metrics;
pub mod model;
pub mod openapi;
pub mod routes;
pub mod size;
pub mod validate;

use std::future::Future;
use std::time::Instant;

use axum::extract::Request;
use axum::http::{Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use grove_engine::Pool;

use crate::error::ApiError;
pub use crate::openapi::openapi;

/// The API's router over `pool`.
pub fn router(pool: Pool) -> Router {
    // Never fires (the router keeps the sender): streams end when their clients go.
    let (stop, stopping) = tokio::sync::watch::channel(false);
    router_with(
        pool,
        Stopping {
            receiver: stopping,
            _sender: Some(std::sync::Arc::new(stop)),
        },
    )
}

/// Set when the server stops: long-lived answers (event streams) end then.
#[derive(Clone)]
pub struct Stopping {
    pub receiver: tokio::sync::watch::Receiver<bool>,
    /// Keeps a signal that never fires open (a closed one would end streams at once).
    _sender: Option<std::sync::Arc<tokio::sync::watch::Sender<bool>>>,
}

fn router_with(pool: Pool, stopping: Stopping) -> Router {
    let (router, _) = routes::api_router().split_for_parts();
    // Starts the hooks' delivery tasks (on the current runtime, if any).
    let hooks = hooks::Hooks::start(pool.clone());
    let metrics = metrics::Metrics::new(pool.clone(), hooks.clone());
    router
        .route("/metrics", axum::routing::get(serve_metrics))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(log_request))
        .layer(axum::Extension(hooks))
        .layer(axum::Extension(stopping))
        .layer(axum::Extension(metrics))
        .with_state(pool)
}

/// `GET /metrics`: OpenMetrics text to scrapers that accept it (Prometheus), the classic
/// Prometheus text format otherwise.
async fn serve_metrics(
    axum::Extension(metrics): axum::Extension<metrics::Metrics>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let openmetrics = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    let text = tokio::task::spawn_blocking(move || metrics.encode())
        .await
        .map_err(|e| ApiError::internal(format!("collecting metrics failed: {e}")))?
        .map_err(|e| ApiError::internal(format!("encoding metrics failed: {e}")))?;
    let answer = if openmetrics {
        (
            [(axum::http::header::CONTENT_TYPE, metrics::OPENMETRICS)],
            text,
        )
    } else {
        (
            [(axum::http::header::CONTENT_TYPE, metrics::PROMETHEUS_TEXT)],
            metrics::to_prometheus_text(&text),
        )
    };
    Ok(answer.into_response())
}

/// Serves the API on `listener` until the task is dropped or the listener fails.
pub async fn serve(pool: Pool, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    serve_with_shutdown(pool, listener, std::future::pending()).await
}

/// Serves the API on `listener` until `shutdown` completes; then stops accepting connections
/// and returns once the requests in flight are answered.
pub async fn serve_with_shutdown(
    pool: Pool,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let stopping = Stopping {
        receiver: stopping,
        _sender: None,
    };
    let app =
        router_with(pool, stopping).into_make_service_with_connect_info::<std::net::SocketAddr>();
    let shutdown = async move {
        shutdown.await;
        // Event streams end, so that draining does not wait on them.
        let _ = stop.send(true);
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    let path = uri.path();
    let mut message = format!("no route for {method} {path}");
    if path.contains("/branches/") || path.contains("/tags/") {
        message.push_str(" (a '/' inside a branch or tag name must be sent as %2F)");
    }
    ApiError::not_found(message)
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    // The route's template, so that ids and names do not make a label each.
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let metrics = request.extensions().get::<metrics::Metrics>().cloned();
    let started = Instant::now();
    let response = next.run(request).await;
    if let Some(metrics) = metrics {
        metrics.observe_api(
            method.as_str(),
            &route,
            response.status().as_u16(),
            started.elapsed(),
        );
    }
    tracing::debug!(
        %method,
        path,
        status = response.status().as_u16(),
        latency_us = started.elapsed().as_micros() as u64,
        "api request"
    );
    response
}
