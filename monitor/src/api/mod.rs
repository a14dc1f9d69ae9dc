//! The HTTP surface: the pages (`/`, `/tasks`, `/task/<id>`, `/workers`, `/queues`, `/live`),
//! Flower's API (`/api/...`, same paths, parameters and JSON shapes as Flower 2.2, so scripts
//! written for Flower keep working), `/metrics`, `/livez` and `/readyz`.

mod beat;
mod health;
mod jobs;
mod queues;
pub(crate) mod tasks;
mod workers;

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::AppState;
use crate::error::Error;

/// The router over `state`.
pub fn app(state: AppState) -> Router {
    let router = Router::new()
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
        .route("/api/task/rate-limit/{name}", post(workers::rate_limit))
        .route("/api/task/timeout/{name}", post(workers::time_limit))
        .route("/api/task/retry/{id}", post(tasks::retry))
        .route("/api/audit", get(tasks::audit))
        .route("/api/queues/length", get(queues::length))
        .route("/", get(crate::pages::dashboard))
        .route("/tasks", get(crate::pages::tasks))
        .route("/task/{id}", get(crate::pages::task))
        .route("/task/{id}/retry", post(crate::pages::retry))
        .route("/audit", get(crate::pages::audit))
        .route("/audit.csv", get(crate::pages::audit_csv))
        .route("/workers", get(crate::pages::workers))
        .route("/queues", get(crate::pages::queues))
        .route("/queues/{queue}", get(crate::pages::queue))
        .route("/queues/{queue}/{verb}", post(crate::pages::queue_action))
        .route("/api/queues/paused", get(queues::paused))
        .route("/api/queues/{queue}/{verb}", post(queues::act))
        .route("/dead-letters", get(crate::pages::dead_letters))
        .route(
            "/dead-letters/{queue}",
            get(crate::pages::dead_letter_queue),
        )
        .route(
            "/dead-letters/{queue}/replay",
            post(crate::pages::replay_dead_letters),
        )
        .route(
            "/beat",
            get(crate::pages::beat).post(crate::pages::beat_add),
        )
        .route("/beat/{name}/{verb}", post(crate::pages::beat_change))
        .route("/api/beat", get(beat::overview).post(beat::add))
        .route("/api/beat/{name}/{verb}", post(beat::change))
        .route(
            "/jobs",
            get(crate::pages::jobs).post(crate::pages::job_start),
        )
        .route("/jobs/new", get(crate::pages::job_new))
        .route("/jobs/{id}", get(crate::pages::job))
        .route("/jobs/{id}/abort", post(crate::pages::job_abort))
        .route("/api/jobs", get(jobs::list).post(jobs::start))
        .route("/api/jobs/preview", get(jobs::preview))
        .route("/api/jobs/{id}", get(jobs::get))
        .route("/api/jobs/{id}/abort", post(jobs::abort))
        .route("/api/dead-letters", get(queues::dead_letters))
        .route("/api/dead-letters/{queue}", get(queues::peek_dead_letters))
        .route(
            "/api/dead-letters/{queue}/replay",
            post(queues::replay_dead_letters),
        )
        .route("/live", get(crate::pages::live))
        .route("/metrics", get(health::metrics))
        .route("/livez", get(health::livez))
        .route("/readyz", get(health::readyz));
    let router = match state.access().guard() {
        Some(guard) => router.merge(guard.routes()),
        None => router,
    };
    let access = state.access().clone();
    router
        .layer(axum::middleware::from_fn_with_state(
            access.clone(),
            crate::access::identify,
        ))
        .layer(axum::middleware::from_fn_with_state(
            access,
            crate::access::authenticate,
        ))
        .layer(axum::middleware::from_fn(same_origin_only))
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
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
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

/// Refuses a state-changing request a browser sent from another site (CSRF): one whose
/// `Sec-Fetch-Site` is `cross-site` or `same-site` (another port on the same host counts), or
/// whose `Origin` is not the monitor's own (`Host`). Requests without those headers (curl,
/// Python, Flower scripts) are not from a browser page and pass.
async fn same_origin_only(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use axum::http::{Method, header};
    if matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    ) {
        return next.run(request).await;
    }
    let headers = request.headers();
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &axum::http::HeaderValue| v.to_str().ok())
    };
    let refused = |why: &str| {
        tracing::warn!(why, path = %request.uri().path(), "cross-site request refused");
        (
            StatusCode::FORBIDDEN,
            format!(
                "Refused: {why}. Use the monitor's own pages, or call the API without a browser."
            ),
        )
            .into_response()
    };
    if let Some(site) = text("sec-fetch-site")
        && matches!(site, "cross-site" | "same-site")
    {
        return refused("the request came from another site");
    }
    if let Some(origin) = text(header::ORIGIN.as_str()) {
        let authority = origin.split_once("://").map(|(_, a)| a);
        if authority.is_none() || authority != text(header::HOST.as_str()) {
            return refused("the request's Origin is not this monitor");
        }
    }
    next.run(request).await
}

/// Who asks and why: the actor from the request's headers ([`crate::audit::actor`]), `reason`
/// and `request_id` from its parameters (both optional on Flower's API, which has neither).
pub(crate) fn asked(
    headers: &axum::http::HeaderMap,
    params: &std::collections::HashMap<String, String>,
) -> crate::actions::Asked {
    crate::actions::Asked {
        actor: crate::audit::actor(headers),
        reason: crate::audit::reason(params.get("reason").map(String::as_str)),
        request_id: params
            .get("request_id")
            .map(|r| r.trim().chars().take(100).collect::<String>())
            .filter(|r| !r.is_empty()),
    }
}

/// Flower's boolean query arguments: `1`, `true`, `yes`, `on` (any case).
pub(crate) fn truthy(v: Option<&str>) -> bool {
    v.is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}
