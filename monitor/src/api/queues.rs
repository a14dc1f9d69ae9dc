//! `GET /api/queues/length`.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::ApiResult;
use crate::AppState;

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
