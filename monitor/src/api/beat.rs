//! The beat over HTTP: `GET /api/beat` (the leader and every entry),
//! `POST /api/beat/<entry>/<pause|resume|run|remove>?reason=&request_id=`, and `POST /api/beat`
//! with an entry's JSON definition (the scheduler's `EntrySpec`) to add or replace one.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::{ApiError, ApiResult, asked};
use crate::AppState;
use crate::beat::{self, Change};

pub(super) async fn overview(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    Ok(Json(json!(beat::overview(&state).await?)))
}

pub(super) async fn change(
    State(state): State<AppState>,
    Path((name, verb)): Path<(String, String)>,
    headers: HeaderMap,
    Query(p): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let change = match verb.as_str() {
        "pause" => Change::Pause,
        "resume" => Change::Resume,
        "run" => Change::RunNow,
        "remove" => Change::Remove,
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no change `{other}` (pause, resume, run, remove)"),
            ));
        }
    };
    let done = beat::change(&state, &name, &change, &asked(&headers, &p)).await?;
    Ok(Json(json!(done)))
}

pub(super) async fn add(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(p): Query<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let spec: scheduler::EntrySpec = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body must be an entry's JSON definition: {e}"),
        )
    })?;
    let name = spec.name.clone();
    let done = beat::change(
        &state,
        &name,
        &Change::Add(Box::new(spec)),
        &asked(&headers, &p),
    )
    .await?;
    Ok(Json(json!(done)))
}
