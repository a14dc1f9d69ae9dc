//! The task routes of Flower's `api/tasks.py` and `api/control.py`: listing and details from the
//! store, results from the result backend, sending and revoking through task-core's client.

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::NaiveDateTime;
use serde_json::{Map, Value, json};
use task_core::{ResultBackend, TaskMeta, TaskState};

use super::{ApiError, ApiResult, asked, truthy};
use crate::AppState;
use crate::actions;
use crate::event::TaskRecord;
use crate::store::TaskQuery;

/// A task as Flower's `Task.as_dict()` gives it: every field of Celery's event state, `null`
/// where unknown. `children` are the ids of the tasks naming it as parent.
pub fn flower_task(t: &TaskRecord, children: &[String]) -> Map<String, Value> {
    let v = json!({
        "uuid": t.uuid,
        "name": t.name,
        "state": t.state,
        "received": t.received,
        "sent": t.sent,
        "started": t.started,
        "rejected": t.rejected,
        "succeeded": t.succeeded,
        "failed": t.failed,
        "retried": t.retried,
        "revoked": t.revoked,
        "args": t.args,
        "kwargs": t.kwargs,
        "eta": t.eta,
        "expires": t.expires,
        "retries": t.retries,
        "worker": t.worker,
        "result": t.result,
        "exception": t.exception,
        "timestamp": t.timestamp,
        "runtime": t.runtime,
        "traceback": t.traceback,
        "exchange": t.exchange,
        "routing_key": t.routing_key,
        "clock": t.clock.unwrap_or(0),
        "client": t.client,
        "root": t.root_id,
        "root_id": t.root_id,
        "parent": t.parent_id,
        "parent_id": t.parent_id,
        "children": children,
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!("a json! object"),
    }
}

/// Flower's `received_start`/`received_end`: `YYYY-MM-DD HH:MM`, read as UTC.
fn minute(name: &str, value: Option<&String>) -> ApiResult<Option<f64>> {
    let Some(v) = value.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    NaiveDateTime::parse_from_str(v, "%Y-%m-%d %H:%M")
        .map(|t| Some(t.and_utc().timestamp() as f64))
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("Invalid {name} `{v}`, expected format 'YYYY-MM-DD HH:MM'"),
            )
        })
}

fn all_is_none(v: Option<&String>) -> Option<String> {
    v.filter(|v| !v.is_empty() && v.as_str() != "All").cloned()
}

/// `GET /api/tasks`: `{uuid: task}` in the requested order (newest first by default), with
/// Flower's parameters, plus `before=<received>:<uuid>` for keyset paging.
pub(super) async fn list(
    State(state): State<AppState>,
    Query(p): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let number = |k: &str| -> ApiResult<Option<u64>> {
        p.get(k)
            .filter(|v| !v.is_empty())
            .map(|v| {
                v.parse::<i64>().map(|n| n.max(0) as u64).map_err(|_| {
                    ApiError::new(StatusCode::BAD_REQUEST, format!("{k} must be an integer"))
                })
            })
            .transpose()
    };
    let search = match p.get("search") {
        Some(s) => {
            crate::search::parse(s).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?
        }
        None => Vec::new(),
    };
    let before = match p.get("before").filter(|v| !v.is_empty()) {
        Some(c) => {
            let parsed = c
                .split_once(':')
                .and_then(|(t, id)| Some((t.parse::<f64>().ok()?, id.to_owned())));
            Some(parsed.ok_or_else(|| {
                ApiError::new(StatusCode::BAD_REQUEST, "before must be <received>:<uuid>")
            })?)
        }
        None => None,
    };
    let query = TaskQuery {
        name: all_is_none(p.get("taskname")),
        state: all_is_none(p.get("state")),
        worker: all_is_none(p.get("workername")),
        received_start: minute("received_start", p.get("received_start"))?,
        received_end: minute("received_end", p.get("received_end"))?,
        search,
        sort_by: p.get("sort_by").filter(|v| !v.is_empty()).cloned(),
        offset: number("offset")?.unwrap_or(0),
        limit: number("limit")?,
        before,
    };
    let tasks = state.store().tasks(&query).await?;
    let ids: Vec<String> = tasks.iter().map(|t| t.uuid.clone()).collect();
    let children = state.store().children(&ids).await?;
    let mut out = Map::new();
    for t in &tasks {
        let mut task = flower_task(t, children.get(&t.uuid).map_or(&[], Vec::as_slice));
        // Flower's list leaves `worker` out when it is unknown.
        if task.get("worker").is_some_and(Value::is_null) {
            task.remove("worker");
        }
        out.insert(t.uuid.clone(), Value::Object(task));
    }
    Ok(Json(Value::Object(out)))
}

/// `GET /api/task/types`: the task names seen.
pub(super) async fn types(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let names: Vec<(String,)> =
        sqlx::query_as("SELECT DISTINCT name FROM tasks WHERE name IS NOT NULL ORDER BY name")
            .fetch_all(state.store().pool())
            .await
            .map_err(crate::Error::from)?;
    Ok(Json(
        json!({"task-types": names.into_iter().map(|(n,)| n).collect::<Vec<_>>()}),
    ))
}

/// `GET /api/task/info/<id>`: the stored task; a task the events never showed but the result
/// backend knows is answered from its result.
pub(super) async fn info(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    if let Some(t) = state.store().task(&id).await? {
        let children = state.store().children(std::slice::from_ref(&id)).await?;
        let task = flower_task(&t, children.get(&id).map_or(&[], Vec::as_slice));
        return Ok(Json(Value::Object(task)));
    }
    match state.client().backend().get(&id).await? {
        Some(meta) => Ok(Json(Value::Object(flower_task(&from_result(&meta), &[])))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("Unknown task '{id}'"),
        )),
    }
}

/// A task record from a stored result alone.
pub(crate) fn from_result(meta: &TaskMeta) -> TaskRecord {
    let done = meta.date_done.map(|d| d.timestamp_micros() as f64 / 1e6);
    let mut t = TaskRecord::new(meta.task_id.clone());
    t.state = meta.status.as_str().to_owned();
    t.name = meta.name.clone();
    t.worker = meta.worker.clone();
    t.retries = meta.retries.and_then(|r| i32::try_from(r).ok());
    t.parent_id = meta.parent_id.clone();
    t.queue = meta.queue.clone();
    t.started = meta.date_started.map(|d| d.timestamp_micros() as f64 / 1e6);
    t.timestamp = done;
    match meta.status {
        TaskState::Success => {
            t.succeeded = done;
            t.result = Some(result_repr(meta));
        }
        TaskState::Failure => {
            t.failed = done;
            t.exception = Some(result_repr(meta));
            t.traceback = meta.traceback.clone();
        }
        TaskState::Revoked => t.revoked = done,
        _ => {}
    }
    t
}

/// What Flower shows as a result: the value for a success, the exception's repr otherwise.
fn result_repr(meta: &TaskMeta) -> String {
    match meta.exception_info() {
        Some(exc) if meta.status != TaskState::Success => {
            task_core::events::repr::exception_repr(&exc.exc_type, &exc.message())
        }
        _ => task_core::events::repr::repr(&meta.result),
    }
}

/// The JSON `result` of `/api/task/result`: the value itself for a success (Flower's
/// `safe_result`), the exception's repr for a failure or a revoke.
fn result_value(meta: &TaskMeta) -> Value {
    match meta.status {
        TaskState::Success => meta.result.clone(),
        _ => match meta.exception_info() {
            Some(exc) => {
                task_core::events::repr::exception_repr(&exc.exc_type, &exc.message()).into()
            }
            None => meta.result.clone(),
        },
    }
}

/// `GET /api/task/result/<id>?timeout=`: `{"task-id", "state"}`, plus `result` (and `traceback`
/// for a failure) once it is ready.
pub(super) async fn result(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(p): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let timeout = match p.get("timeout").filter(|v| !v.is_empty()) {
        Some(t) => Some(
            t.parse::<f64>()
                .ok()
                .filter(|t| t.is_finite() && *t >= 0.0)
                .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "Invalid timeout"))?,
        ),
        None => None,
    };
    let backend = state.client().backend();
    let meta = match timeout {
        Some(t) if t > 0.0 => match backend.wait(&id, Duration::from_secs_f64(t)).await {
            Ok(m) => Some(m),
            Err(task_core::Error::Timeout(_)) => backend.get(&id).await?,
            Err(e) => return Err(e.into()),
        },
        _ => backend.get(&id).await?,
    };
    let mut out = json!({"task-id": id, "state": "PENDING"});
    if let Some(meta) = meta {
        out["state"] = meta.status.as_str().into();
        if meta.status.is_ready() {
            out["result"] = result_value(&meta);
            if meta.status == TaskState::Failure {
                out["traceback"] = json!(meta.traceback);
            }
        }
    }
    Ok(Json(out))
}

/// `POST /api/task/async-apply/<name>` and `/api/task/send-task/<name>`: body
/// `{"args": [...], "kwargs": {...}}` plus the options `queue`, `countdown`, `expires` (seconds),
/// `task_id` and `priority`. Both publish by name: the monitor has no task registry to check.
pub(super) async fn send(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let bad = |m: &str| ApiError::new(StatusCode::BAD_REQUEST, m);
    let options: Map<String, Value> = if body.is_empty() {
        Map::new()
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(bad("invalid options")),
            Err(e) => return Err(bad(&e.to_string())),
        }
    };
    let args = match options.get("args") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err(bad("args must be an array")),
    };
    let kwargs = match options.get("kwargs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(k)) => k.clone(),
        Some(_) => return Err(bad("kwargs must be an object")),
    };
    let seconds = |k: &str| -> ApiResult<Option<Duration>> {
        match options.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .or_else(|| v.as_str()?.parse().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(|s| Some(Duration::from_secs_f64(s)))
                .ok_or_else(|| bad("Invalid option")),
        }
    };
    let client = state.client();
    let mut call = client.send_task(&name, args, kwargs);
    if let Some(q) = options.get("queue").and_then(Value::as_str) {
        call = call.queue(q);
    }
    if let Some(d) = seconds("countdown")? {
        call = call.countdown(d);
    }
    if let Some(d) = seconds("expires")? {
        call = call.expires_in(d);
    }
    if let Some(id) = options.get("task_id").and_then(Value::as_str) {
        call = call.task_id(id);
    }
    if let Some(p) = options.get("priority").and_then(Value::as_u64) {
        call = call.priority(u8::try_from(p).map_err(|_| bad("Invalid option"))?);
    }
    let sent = call.send().await?;
    let state_now = sent.state().await.map(|s| s.as_str()).unwrap_or("PENDING");
    tracing::info!(task = name, id = sent.id(), "task sent through the API");
    Ok(Json(json!({"task-id": sent.id(), "state": state_now})))
}

/// `POST /api/task/revoke/<id>?terminate=&reason=&request_id=`: stored in the coordinator and
/// broadcast, so workers that start later still discard it; recorded in the audit log first.
pub(super) async fn revoke(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(p): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let terminate = truthy(p.get("terminate").map(String::as_str));
    actions::revoke(&state, &id, terminate, &asked(&headers, &p)).await?;
    Ok(Json(json!({"message": format!("Revoked '{id}'")})))
}

/// `POST /api/task/retry/<id>?reason=&request_id=`: sends a failed or revoked task again under a
/// new id (its parent is the original), recorded in the audit log first. 404 without a stored
/// result, 409 when the task is not failed or revoked or its arguments were not stored.
pub(super) async fn retry(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(p): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let r = actions::retry(&state, &id, &asked(&headers, &p)).await?;
    Ok(Json(
        json!({"task-id": r.task_id, "retry-of": id, "sent": r.sent_now}),
    ))
}

/// `GET /api/audit?before=<id>&limit=`: the audit log, newest first (keyset by entry id).
pub(super) async fn audit(
    State(state): State<AppState>,
    Query(p): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let bad = |m: &str| ApiError::new(StatusCode::BAD_REQUEST, m);
    let before = match p.get("before") {
        Some(b) => Some(
            b.parse::<i64>()
                .map_err(|_| bad("before must be an entry id"))?,
        ),
        None => None,
    };
    let limit = match p.get("limit") {
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=1000).contains(l))
            .ok_or_else(|| bad("limit must be 1 to 1000"))?,
        None => 100,
    };
    let entries = state.store().audit(before, limit).await?;
    Ok(Json(json!({ "entries": entries })))
}
