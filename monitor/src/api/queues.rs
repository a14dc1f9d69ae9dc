//! `GET /api/queues/length`, and the dead-letter queues: `GET /api/dead-letters`,
//! `GET /api/dead-letters/<queue>?limit=`, `POST /api/dead-letters/<queue>/replay`.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use serde_json::{Value, json};

use super::{ApiError, ApiResult, asked};
use crate::AppState;
use crate::dead_letters::{self, Which};

/// `{"active_queues": [{"name", "messages", …}]}`: Flower's shape. `messages` is the ready count;
/// with the management API (`MONITOR_BROKER_API`) every queue is listed and, as Flower passes the
/// API's fields through, `messages_ready`, `messages_unacknowledged` and `consumers` are added.
pub(super) async fn length(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let queues = state.queue_stats().await?;
    let list: Vec<Value> = queues
        .into_iter()
        .map(|(name, s)| match s.unacked {
            Some(unacked) => json!({
                "name": name,
                "messages": s.messages + unacked + s.dead_lettering.unwrap_or(0),
                "messages_ready": s.messages,
                "messages_unacknowledged": unacked,
                "consumers": s.consumers,
            }),
            None => json!({"name": name, "messages": s.messages}),
        })
        .collect();
    Ok(Json(json!({ "active_queues": list })))
}

/// `[{"name", "messages", "consumers"}]`: every dead-letter queue.
pub(super) async fn dead_letters(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let list: Vec<Value> = dead_letters::list(&state)
        .await?
        .into_iter()
        .map(|(name, s)| json!({"name": name, "messages": s.messages, "consumers": s.consumers}))
        .collect();
    Ok(Json(Value::Array(list)))
}

/// The first `limit` (100) messages of a dead-letter queue, left in it.
pub(super) async fn peek_dead_letters(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    Query(p): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let limit = match p.get("limit") {
        Some(l) => l.parse().map_err(|_| {
            ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "limit must be a number",
            )
        })?,
        None => 100,
    };
    let letters = dead_letters::peek(&state, &queue, limit).await?;
    Ok(Json(json!({"queue": queue, "messages": letters})))
}

/// `?task_id=` (that task's message) or `?oldest=N` (at most N from the head), `reason`
/// required, `request_id` optional: `{"replayed", "succeeded_since", "repeated"}`. With
/// `job=true` and `oldest=N`, a tracked replay job instead: `{"job": id}` (`GET /api/jobs/<id>`).
pub(super) async fn replay_dead_letters(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    headers: HeaderMap,
    Query(p): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let bad = |m: &str| ApiError::new(axum::http::StatusCode::BAD_REQUEST, m);
    if p.get("job").is_some_and(|j| j == "true" || j == "1") {
        let n = p
            .get("oldest")
            .and_then(|n| n.parse::<i64>().ok())
            .ok_or_else(|| bad("a replay job needs oldest=<the count you were shown>"))?;
        let id = crate::jobs::start_replay(&state, &queue, n, &asked(&headers, &p)).await?;
        return Ok(Json(json!({"job": id})));
    }
    let which = match (p.get("task_id"), p.get("oldest")) {
        (Some(id), None) if !id.is_empty() => Which::Task(id.clone()),
        (None, Some(n)) => Which::Oldest(n.parse().map_err(|_| bad("oldest must be a number"))?),
        _ => return Err(bad("give task_id or oldest (one of them)")),
    };
    let done = dead_letters::replay(&state, &queue, &which, &asked(&headers, &p)).await?;
    Ok(Json(json!(done)))
}

/// `POST /api/queues/<queue>/<pause|resume|purge>?reason=&request_id=&shown=`.
pub(super) async fn act(
    State(state): State<AppState>,
    Path((queue, verb)): Path<(String, String)>,
    headers: HeaderMap,
    Query(p): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let asked = asked(&headers, &p);
    let done = match verb.as_str() {
        "pause" => crate::queue_actions::pause(&state, &queue, &asked).await?,
        "resume" => crate::queue_actions::resume(&state, &queue, &asked).await?,
        "purge" => {
            let shown = p.get("shown").and_then(|s| s.parse().ok()).unwrap_or(0);
            crate::queue_actions::purge(&state, &queue, shown, &asked).await?
        }
        other => {
            return Err(ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                format!("no action `{other}` (pause, resume, purge)"),
            ));
        }
    };
    Ok(Json(crate::queue_actions::to_json(&done)))
}

/// `GET /api/queues/paused`: the queues the monitor paused, with the workers it told.
pub(super) async fn paused(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    Ok(Json(json!(crate::queue_actions::paused(&state).await?)))
}
