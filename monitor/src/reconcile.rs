//! Reconciliation with the result backend, for what the events did not tell: every
//! `MONITOR_RECONCILE_EVERY`,
//!
//! - a task still PENDING, RECEIVED, STARTED or RETRY with no event for a minute is looked up
//!   in the result backend, and a finished result there moves its row to that state (events
//!   lost while the queue was full, a worker that died after storing its result, a monitor
//!   that was down past the events queue's TTL);
//! - the backend's results are walked a step at a time (Redis `SCAN`, a few thousand keys per
//!   round, never holding the server), and a task the store has never heard of gets a row from
//!   its result (workers running without task events, Python workers with `-E` off): name,
//!   state, arguments, result or exception, worker, queue, when it finished.
//!
//! A row is only ever moved forward to a finished state, never back; events arriving later
//! merge into it as usual.

use std::time::Duration;

use serde_json::Value;
use task_core::{ResultBackend, TaskMeta, TaskState};
use tokio::sync::watch;

use crate::AppState;
use crate::error::Result;

/// A task without an event for this long is looked up.
const STALE_AFTER: f64 = 60.0;
/// Rows looked up per round.
const STALE_BATCH: i64 = 500;
/// Keys asked of `SCAN` per step, and steps per round.
const SCAN_COUNT: usize = 1_000;
const SCAN_STEPS: usize = 5;

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// The exception of a FAILURE/REVOKED/RETRY meta as the events print it: `Type('message')`.
fn exception(meta: &TaskMeta) -> Option<String> {
    let exc_type = meta.result.get("exc_type").and_then(Value::as_str)?;
    let message = match meta.result.get("exc_message") {
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| {
                p.as_str()
                    .map_or_else(|| p.to_string(), |s| format!("'{s}'"))
            })
            .collect::<Vec<_>>()
            .join(", "),
        Some(Value::String(s)) => format!("'{s}'"),
        Some(other) => other.to_string(),
        None => String::new(),
    };
    Some(format!("{exc_type}({message})"))
}

fn done_at(meta: &TaskMeta, now: f64) -> f64 {
    meta.date_done
        .map(|d| d.timestamp_millis() as f64 / 1000.0)
        .unwrap_or(now)
}

/// Moves stale unfinished rows whose result is finished: how many.
pub async fn sweep_stale(state: &AppState, now: f64) -> Result<u64> {
    let pool = state.store().pool();
    let stale: Vec<(String,)> = sqlx::query_as(
        "SELECT uuid FROM tasks WHERE state IN ('PENDING', 'RECEIVED', 'STARTED', 'RETRY') \
         AND \"timestamp\" < $1 ORDER BY \"timestamp\" LIMIT $2",
    )
    .bind(now - STALE_AFTER)
    .bind(STALE_BATCH)
    .fetch_all(pool)
    .await?;
    let mut moved = 0;
    for (uuid,) in stale {
        let Some(meta) = state.client().backend().get(&uuid).await? else {
            continue;
        };
        if !meta.status.is_ready() {
            continue;
        }
        let at = done_at(&meta, now);
        let success = meta.status == TaskState::Success;
        let n = sqlx::query(
            "UPDATE tasks SET state = $2, result = COALESCE($3, result), \
             exception = COALESCE($4, exception), traceback = COALESCE($5, traceback), \
             worker = COALESCE(worker, $6), \"timestamp\" = GREATEST(\"timestamp\", $7), \
             succeeded = CASE WHEN $2 = 'SUCCESS' THEN $7 ELSE succeeded END, \
             failed = CASE WHEN $2 = 'FAILURE' THEN $7 ELSE failed END, \
             revoked = CASE WHEN $2 = 'REVOKED' THEN $7 ELSE revoked END, updated_at = now() \
             WHERE uuid = $1 AND state IN ('PENDING', 'RECEIVED', 'STARTED', 'RETRY')",
        )
        .bind(&uuid)
        .bind(meta.status.as_str())
        .bind(if success { text(&meta.result) } else { None })
        .bind(if success { None } else { exception(&meta) })
        .bind(&meta.traceback)
        .bind(&meta.worker)
        .bind(at)
        .execute(pool)
        .await?
        .rows_affected();
        moved += n;
    }
    Ok(moved)
}

/// One round of the walk over the backend's results from `cursor`: the next cursor (0: the
/// walk is over) and how many rows were added.
pub async fn discover(state: &AppState, cursor: u64, now: f64) -> Result<(u64, u64)> {
    let pool = state.store().pool();
    let mut cursor = cursor;
    let mut added = 0;
    for _ in 0..SCAN_STEPS {
        let (next, ids) = state
            .client()
            .backend()
            .scan_task_ids(cursor, SCAN_COUNT)
            .await?;
        cursor = next;
        if !ids.is_empty() {
            let known: Vec<(String,)> =
                sqlx::query_as("SELECT uuid FROM tasks WHERE uuid = ANY($1)")
                    .bind(&ids)
                    .fetch_all(pool)
                    .await?;
            let known: std::collections::HashSet<String> =
                known.into_iter().map(|(u,)| u).collect();
            for id in ids.iter().filter(|id| !known.contains(*id)) {
                let Some(meta) = state.client().backend().get(id).await? else {
                    continue;
                };
                added += insert(state, &meta, now).await?;
            }
        }
        if cursor == 0 {
            break;
        }
    }
    Ok((cursor, added))
}

async fn insert(state: &AppState, meta: &TaskMeta, now: f64) -> Result<u64> {
    let at = done_at(meta, now);
    let success = meta.status == TaskState::Success;
    let started = meta
        .date_started
        .map(|d| d.timestamp_millis() as f64 / 1000.0);
    let n = sqlx::query(
        "INSERT INTO tasks (uuid, name, state, args, kwargs, parent_id, retries, started, \
         succeeded, failed, revoked, \"timestamp\", runtime, result, exception, traceback, \
         worker, routing_key) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, \
         CASE WHEN $3 = 'SUCCESS' THEN $9 END, CASE WHEN $3 = 'FAILURE' THEN $9 END, \
         CASE WHEN $3 = 'REVOKED' THEN $9 END, $9, $10, $11, $12, $13, $14, $15) \
         ON CONFLICT (uuid) DO NOTHING",
    )
    .bind(&meta.task_id)
    .bind(&meta.name)
    .bind(meta.status.as_str())
    .bind(
        meta.args
            .as_ref()
            .map(|a| Value::from(a.clone()).to_string()),
    )
    .bind(
        meta.kwargs
            .as_ref()
            .map(|k| Value::Object(k.clone()).to_string()),
    )
    .bind(&meta.parent_id)
    .bind(meta.retries.map(|r| i32::try_from(r).unwrap_or(i32::MAX)))
    .bind(started)
    .bind(at)
    .bind(started.map(|s| (at - s).max(0.0)))
    .bind(if success { text(&meta.result) } else { None })
    .bind(if success { None } else { exception(meta) })
    .bind(&meta.traceback)
    .bind(&meta.worker)
    .bind(&meta.queue)
    .execute(state.store().pool())
    .await?
    .rows_affected();
    Ok(n)
}

/// Runs both every `every` until `stop` says so.
pub async fn run(state: AppState, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut cursor = 0;
    loop {
        // The first round after one interval: a monitor that just started has its backlog of
        // events to write first.
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(every) => {}
        }
        let now = task_core::events::unix_now();
        match sweep_stale(&state, now).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(moved = n, "reconciled unfinished tasks with their results"),
            Err(e) => {
                tracing::warn!(error = %e, "reconciling unfinished tasks failed; trying again later")
            }
        }
        match discover(&state, cursor, now).await {
            Ok((next, added)) => {
                cursor = next;
                if added > 0 {
                    tracing::info!(added, "tasks known only from their results added");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "walking the result backend failed; trying again later")
            }
        }
    }
}
