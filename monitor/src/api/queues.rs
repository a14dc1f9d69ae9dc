//! `GET /api/queues/length`.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::ApiResult;
use crate::AppState;

/// `{"active_queues": [{"name", "messages"}]}` for every queue the workers report consuming.
pub(super) async fn length(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let queues = state.queue_stats().await?;
    let list: Vec<Value> = queues
        .into_iter()
        .map(|(name, s)| json!({"name": name, "messages": s.messages}))
        .collect();
    Ok(Json(json!({ "active_queues": list })))
}
