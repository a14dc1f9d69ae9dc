//! The HTTP surface: the pages (`/`, `/tasks`, `/task/<id>`, `/workers`, `/queues`, `/live`),
//! Flower's API (`/api/...`, same paths, parameters and JSON shapes as Flower 2.2, so scripts
//! written for Flower keep working), `/metrics`, `/livez` and `/readyz`.

mod health;
mod queues;
mod tasks;
mod workers;

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::AppState;
use crate::error::Error;

/// The router over `state`.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/api/workers", get(workers::list))
        .route("/api/worker/shutdown/{worker}", post(workers::shutdown))
        .route("/api/worker/pool/grow/{worker}", post(workers::pool_grow))
        .route(
            "/api/worker/pool/shrink/{worker}",
            post(workers::pool_shrink),
        )
        .route(
            "/api/worker/queue/add-consumer/{worker}",
            post(workers::add_consumer),
        )
        .route(
            "/api/worker/queue/cancel-consumer/{worker}",
            post(workers::cancel_consumer),
        )
        .route("/api/tasks", get(tasks::list))
        .route("/api/task/types", get(tasks::types))
        .route("/api/task/info/{id}", get(tasks::info))
        .route("/api/task/result/{id}", get(tasks::result))
        .route("/api/task/async-apply/{name}", post(tasks::send))
        .route("/api/task/send-task/{name}", post(tasks::send))
        .route("/api/task/revoke/{id}", post(tasks::revoke))
        .route("/api/queues/length", get(queues::length))
        .route("/", get(crate::pages::dashboard))
        .route("/tasks", get(crate::pages::tasks))
        .route("/task/{id}", get(crate::pages::task))
        .route("/workers", get(crate::pages::workers))
        .route("/queues", get(crate::pages::queues))
        .route("/live", get(crate::pages::live))
        .route("/metrics", get(health::metrics))
        .route("/livez", get(health::livez))
        .route("/readyz", get(health::readyz))
        .with_state(state)
}

/// An error as an HTTP answer: plain text, the status by kind.
#[derive(Debug)]
pub(crate) struct ApiError(StatusCode, String);

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError(status, message.into())
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        if status.is_server_error() {
            tracing::warn!(error = %e, "API request failed");
        }
        ApiError(status, e.to_string())
    }
}

impl From<task_core::Error> for ApiError {
    fn from(e: task_core::Error) -> Self {
        Error::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// Flower's boolean query arguments: `1`, `true`, `yes`, `on` (any case).
pub(crate) fn truthy(v: Option<&str>) -> bool {
    v.is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}
