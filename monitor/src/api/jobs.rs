//! Bulk jobs over HTTP: `GET /api/jobs/preview?action=&search=&state=&taskname=&workername=`
//! (`{"count"}`), `POST /api/jobs?action=&…filter…&expected=&reason=&request_id=` (`{"job"}`),
//! `GET /api/jobs`, `GET /api/jobs/<id>`, `POST /api/jobs/<id>/abort?reason=`.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::{ApiError, ApiResult, asked};
use crate::AppState;
use crate::jobs::{self, Filter, Kind};

fn kind_and_filter(p: &HashMap<String, String>) -> ApiResult<(Kind, Filter)> {
    let kind = p
        .get("action")
        .and_then(|a| Kind::parse(a))
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "action must be retry or revoke"))?;
    let get = |k: &str| p.get(k).cloned().unwrap_or_default();
    Ok((
        kind,
        Filter {
            search: get("search"),
            state: get("state"),
            taskname: get("taskname"),
            workername: get("workername"),
            dlq: String::new(),
        },
    ))
}

pub(super) async fn preview(
    State(state): State<AppState>,
    Query(p): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let (kind, filter) = kind_and_filter(&p)?;
    let count = jobs::preview(&state, kind, &filter).await?;
    Ok(Json(json!({"action": kind.name(), "count": count})))
}

pub(super) async fn start(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(p): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let (kind, filter) = kind_and_filter(&p)?;
    let expected = p
        .get("expected")
        .and_then(|e| e.parse().ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "expected (the count the preview gave) is required",
            )
        })?;
    let id = jobs::start(&state, kind, &filter, expected, &asked(&headers, &p)).await?;
    Ok(Json(json!({"job": id})))
}

pub(super) async fn list(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    Ok(Json(json!(jobs::list(&state, 100).await?)))
}

pub(super) async fn get(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> ApiResult<Json<Value>> {
    let job = jobs::get(&state, id)
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no job {id}")))?;
    let problems = jobs::problems(&state, id, 1000).await?;
    Ok(Json(json!({"job": job, "problems": problems})))
}

pub(super) async fn abort(
    State(state): State<AppState>,
    Path(id): Path<i64>,
    headers: HeaderMap,
    Query(p): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    jobs::abort(&state, id, &asked(&headers, &p)).await?;
    Ok(Json(json!({"job": id, "abort_requested": true})))
}
