//! `GET /api/workers` and the worker controls, as Flower's `api/workers.py` and `api/control.py`.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::{ApiError, ApiResult, asked, truthy};
use crate::AppState;
use crate::actions::{self, Asked};

/// `?refresh=1` asks the workers now, `?workername=` narrows to one (and fetches its task
/// lists), `?status=1` answers `{node: online}` from the stored heartbeats.
pub(super) async fn list(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let refresh = truthy(params.get("refresh").map(String::as_str));
    let workername = params.get("workername").map(String::as_str);
    if truthy(params.get("status").map(String::as_str)) {
        let now = task_core::events::unix_now();
        let workers = state.store().workers().await?;
        let status: Map<String, Value> = workers
            .into_iter()
            .map(|w| {
                let online = w.online(now);
                (w.hostname, Value::Bool(online))
            })
            .collect();
        return Ok(Json(Value::Object(status)));
    }
    let nodes = state.inspector().workers(refresh, workername).await?;
    match workername {
        Some(name) => match nodes.get(name) {
            Some(info) => Ok(Json(json!({ name: info }))),
            None => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("Unknown worker '{name}'"),
            )),
        },
        None => Ok(Json(serde_json::to_value(nodes).unwrap_or_default())),
    }
}

/// 404 unless `worker` answered an inspect or sent events.
async fn known(state: &AppState, worker: &str) -> ApiResult<()> {
    if state
        .inspector()
        .workers(false, None)
        .await?
        .contains_key(worker)
        || state
            .store()
            .workers()
            .await?
            .iter()
            .any(|w| w.hostname == worker)
    {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("Unknown worker '{worker}'"),
        ))
    }
}

/// Sends `method` to `worker` and answers Flower's way: `{"message": …}` on an `ok` reply, 403
/// with the reason otherwise.
async fn control(
    state: &AppState,
    asked: &Asked,
    worker: &str,
    method: &'static str,
    arguments: Value,
    success: impl FnOnce(&Value) -> String,
    failure: impl FnOnce(&str) -> String,
) -> ApiResult<Response> {
    known(state, worker).await?;
    let detail = json!({"method": method, "arguments": arguments});
    let Some(entry) = actions::note(state, audit_action(method), worker, detail, asked).await?
    else {
        return Ok(Json(json!({"message": "Already done (the same request_id)"})).into_response());
    };
    let replies = match state.control(method, arguments, worker).await {
        Ok(r) => r,
        Err(e) => {
            actions::failed(
                state,
                asked,
                "worker.control.failed",
                worker,
                entry,
                &e.to_string(),
            )
            .await;
            return Err(e.into());
        }
    };
    let reply = replies
        .into_iter()
        .find(|(node, _)| node == worker)
        .map(|(_, r)| r);
    match reply {
        Some(r) if r.get("ok").is_some() => {
            Ok(Json(json!({"message": success(&r["ok"])})).into_response())
        }
        other => {
            let reason = other
                .as_ref()
                .and_then(|r| r.get("error"))
                .and_then(Value::as_str)
                .unwrap_or("Unknown reason")
                .to_owned();
            tracing::warn!(worker, method, reason, "control command failed");
            actions::failed(
                state,
                asked,
                "worker.control.failed",
                worker,
                entry,
                &reason,
            )
            .await;
            Ok((StatusCode::FORBIDDEN, failure(&reason)).into_response())
        }
    }
}

/// The audit log's name for a control command.
fn audit_action(method: &str) -> &'static str {
    match method {
        "pool_grow" => "worker.pool_grow",
        "pool_shrink" => "worker.pool_shrink",
        "add_consumer" => "worker.add_consumer",
        "cancel_consumer" => "worker.cancel_consumer",
        "rate_limit" => "worker.rate_limit",
        "time_limit" => "worker.time_limit",
        _ => "worker.control",
    }
}

fn n(params: &HashMap<String, String>) -> ApiResult<i64> {
    match params.get("n") {
        None => Ok(1),
        Some(v) => v.parse().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("n must be an integer, not `{v}`"),
            )
        }),
    }
}

fn queue(params: &HashMap<String, String>) -> ApiResult<String> {
    params
        .get("queue")
        .filter(|q| !q.is_empty())
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "Missing argument queue"))
}

pub(super) async fn pool_grow(
    State(state): State<AppState>,
    Path(worker): Path<String>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let asked = asked(&headers, &params);
    let n = n(&params)?;
    control(
        &state,
        &asked,
        &worker,
        "pool_grow",
        json!({"n": n}),
        |_| format!("Growing '{worker}' worker's pool by {n}"),
        |reason| format!("Failed to grow '{worker}' worker's pool: {reason}"),
    )
    .await
}

pub(super) async fn pool_shrink(
    State(state): State<AppState>,
    Path(worker): Path<String>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let asked = asked(&headers, &params);
    let n = n(&params)?;
    control(
        &state,
        &asked,
        &worker,
        "pool_shrink",
        json!({"n": n}),
        |_| format!("Shrinking '{worker}' worker's pool by {n}"),
        |reason| format!("Failed to shrink '{worker}' worker's pool: {reason}"),
    )
    .await
}

pub(super) async fn add_consumer(
    State(state): State<AppState>,
    Path(worker): Path<String>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let asked = asked(&headers, &params);
    let queue = queue(&params)?;
    control(
        &state,
        &asked,
        &worker,
        "add_consumer",
        json!({"queue": queue}),
        |ok| ok.as_str().unwrap_or_default().to_owned(),
        |reason| format!("Failed to add '{queue}' consumer to '{worker}' worker: {reason}"),
    )
    .await
}

pub(super) async fn cancel_consumer(
    State(state): State<AppState>,
    Path(worker): Path<String>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let asked = asked(&headers, &params);
    let queue = queue(&params)?;
    control(
        &state,
        &asked,
        &worker,
        "cancel_consumer",
        json!({"queue": queue}),
        |ok| ok.as_str().unwrap_or_default().to_owned(),
        |reason| format!("Failed to cancel '{queue}' consumer from '{worker}' worker: {reason}"),
    )
    .await
}

/// Flower sends `shutdown` without waiting for a reply (the worker may be gone before it
/// answers).
pub(super) async fn shutdown(
    State(state): State<AppState>,
    Path(worker): Path<String>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    known(&state, &worker).await?;
    let asked = asked(&headers, &params);
    let Some(entry) = actions::note(&state, "worker.shutdown", &worker, json!({}), &asked).await?
    else {
        return Ok(Json(
            json!({"message": "Already done (the same request_id)"}),
        ));
    };
    if let Err(e) = state.cast("shutdown", json!({}), &worker).await {
        actions::failed(
            &state,
            &asked,
            "worker.control.failed",
            &worker,
            entry,
            &e.to_string(),
        )
        .await;
        return Err(e.into());
    }
    tracing::info!(worker, "shutdown requested through the API");
    Ok(Json(json!({"message": "Shutting down!"})))
}

fn workername(params: &HashMap<String, String>) -> ApiResult<String> {
    params
        .get("workername")
        .filter(|w| !w.is_empty())
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "Missing argument workername"))
}

/// Flower's `POST /api/task/rate-limit/<taskname>?workername=&ratelimit=` (`10/m`, `2/s`, a
/// number per second, or empty to lift it): Celery's `rate_limit` command to that worker.
pub(super) async fn rate_limit(
    State(state): State<AppState>,
    Path(task): Path<String>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let asked = asked(&headers, &params);
    let worker = workername(&params)?;
    let rate = params
        .get("ratelimit")
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "Missing argument ratelimit"))?;
    control(
        &state,
        &asked,
        &worker,
        "rate_limit",
        json!({"task_name": task, "rate_limit": rate}),
        |_| "new rate limit set successfully".to_owned(),
        |reason| format!("Failed to set rate limit: '{reason}'"),
    )
    .await
}

/// Flower's `POST /api/task/timeout/<taskname>?workername=&soft=&hard=` (seconds): Celery's
/// `time_limit` command to that worker.
pub(super) async fn time_limit(
    State(state): State<AppState>,
    Path(task): Path<String>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let asked = asked(&headers, &params);
    let worker = workername(&params)?;
    let seconds = |k: &str| -> ApiResult<Option<f64>> {
        match params.get(k).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) => v.parse::<f64>().map(Some).map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("{k} must be a number of seconds, not `{v}`"),
                )
            }),
        }
    };
    let (soft, hard) = (seconds("soft")?, seconds("hard")?);
    control(
        &state,
        &asked,
        &worker,
        "time_limit",
        json!({"task_name": task, "soft": soft, "hard": hard}),
        |_| "time limits set successfully".to_owned(),
        |reason| format!("Failed to set timeouts: '{reason}'"),
    )
    .await
}
