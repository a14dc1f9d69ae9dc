//! `/metrics`, `/livez` and `/readyz`.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use task_core::ResultBackend;

use crate::AppState;
use crate::metrics::OPENMETRICS_CONTENT_TYPE;

/// A worker whose last event is older than this leaves `tq_worker_up`.
const WORKER_SERIES_KEEP: f64 = 3600.0;
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    let now = task_core::events::unix_now();
    match state.store().workers().await {
        Ok(workers) => state.metrics().set_workers(
            workers
                .into_iter()
                .filter(|w| now - w.last_heartbeat < WORKER_SERIES_KEEP)
                .map(|w| {
                    let up = w.online(now);
                    (w.hostname, up, w.active)
                }),
        ),
        Err(e) => tracing::warn!(error = %e, "cannot read workers for /metrics"),
    }
    match state.queue_stats_now().await {
        Ok(queues) => state.metrics().set_queues(queues),
        Err(e) => tracing::warn!(error = %e, "cannot read queues for /metrics"),
    }
    (
        [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
        state.metrics().encode(),
    )
        .into_response()
}

/// 200 while the process serves HTTP: it checks no dependency, so a broker blip never restarts
/// every replica.
pub(super) async fn livez() -> &'static str {
    "ok"
}

async fn check<F, E>(f: F) -> String
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    match tokio::time::timeout(CHECK_TIMEOUT, f).await {
        Ok(Ok(())) => "ok".into(),
        Ok(Err(e)) => format!("unreachable: {e}"),
        Err(_) => format!("unreachable: no answer within {CHECK_TIMEOUT:?}"),
    }
}

/// 200 when the store, the broker and the result backend answer and the intake is consuming;
/// 503 otherwise. The JSON body names each check.
pub(super) async fn readyz(
    State(state): State<AppState>,
) -> (StatusCode, Json<BTreeMap<&'static str, String>>) {
    let (store, broker, backend) = tokio::join!(
        check(state.store().ping()),
        check(state.client().broker().ping()),
        check(async {
            state
                .client()
                .backend()
                .get("monitor-readyz-probe")
                .await
                .map(|_| ())
        }),
    );
    let intake = if state.intake_status().consuming() {
        "ok".to_owned()
    } else {
        "not consuming the events queue".to_owned()
    };
    let body = BTreeMap::from([
        ("store", store),
        ("broker", broker),
        ("backend", backend),
        ("intake", intake),
    ]);
    let ready = body.values().all(|v| v == "ok");
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}
