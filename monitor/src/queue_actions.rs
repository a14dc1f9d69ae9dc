//! Acting on a queue: pause and resume its consumption across the workers, and purge it.
//!
//! Pausing asks every worker consuming the queue (by `active_queues`) to cancel its consumer
//! (`cancel_consumer`, Celery's control command, so Python workers pause too) and remembers
//! which workers those were; resuming asks the same workers to consume it again
//! (`add_consumer`). Messages wait in the queue meanwhile. A worker started while the queue is
//! paused consumes it as its own settings say: the pause holds for the workers that were
//! running. Purging (admin) drops the queue's ready messages — not those a worker holds
//! unacknowledged — and records how many went against how many the operator was shown.
//! Each is written to the audit log before it is done.

use serde::Serialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::actions::{Asked, failed, note_many};
use crate::error::{Error, Result};

/// A paused queue.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Paused {
    pub queue: String,
    pub workers: Vec<String>,
    pub actor: String,
    pub reason: String,
    pub paused_at: chrono::DateTime<chrono::Utc>,
}

/// Every paused queue.
pub async fn paused(state: &AppState) -> Result<Vec<Paused>> {
    Ok(sqlx::query_as(
        "SELECT queue, workers, actor, reason, paused_at FROM paused_queues ORDER BY queue",
    )
    .fetch_all(state.store().pool())
    .await?)
}

/// The workers consuming `queue` now, by their `active_queues` replies.
async fn consumers_of(state: &AppState, queue: &str) -> Result<Vec<String>> {
    let replies = task_core::control::broadcast(
        state.amqp(),
        "active_queues",
        json!({}),
        None,
        state.inspect_timeout(),
        None,
    )
    .await?;
    let mut workers: Vec<String> = replies
        .into_iter()
        .filter(|(_, v)| {
            v.as_array()
                .is_some_and(|qs| qs.iter().any(|q| q["name"] == queue))
        })
        .map(|(w, _)| w)
        .collect();
    workers.sort();
    Ok(workers)
}

fn need_reason(asked: &Asked, what: &str) -> Result<String> {
    asked
        .reason
        .clone()
        .ok_or_else(|| Error::BadRequest(format!("a reason is required to {what}")))
}

/// What a queue action did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Done {
    pub queue: String,
    /// The workers told (pause, resume).
    pub workers: Vec<String>,
    /// Those that did not answer yes.
    pub refused: Vec<String>,
    /// Messages purged.
    pub purged: Option<u64>,
    pub repeated: bool,
}

async fn tell(state: &AppState, method: &str, queue: &str, workers: &[String]) -> Vec<String> {
    let mut refused = Vec::new();
    for w in workers {
        let ok = match state.control(method, json!({"queue": queue}), w).await {
            Ok(replies) => replies.iter().any(|(_, r)| r.get("ok").is_some()),
            Err(_) => false,
        };
        if !ok {
            refused.push(w.clone());
        }
    }
    refused
}

/// Stops every worker consuming `queue`.
pub async fn pause(state: &AppState, queue: &str, asked: &Asked) -> Result<Done> {
    let reason = need_reason(asked, "pause a queue")?;
    let already: Option<(String,)> =
        sqlx::query_as("SELECT queue FROM paused_queues WHERE queue = $1")
            .bind(queue)
            .fetch_optional(state.store().pool())
            .await?;
    if already.is_some() {
        return Err(Error::Conflict(format!("`{queue}` is paused already")));
    }
    let workers = consumers_of(state, queue).await?;
    if workers.is_empty() {
        return Err(Error::Conflict(format!("no worker consumes `{queue}`")));
    }
    let Some(entry) = note_many(
        state,
        "queue.pause",
        queue,
        i32::try_from(workers.len()).unwrap_or(i32::MAX),
        json!({"workers": workers}),
        asked,
    )
    .await?
    else {
        return Ok(Done {
            queue: queue.to_owned(),
            repeated: true,
            ..Done::default()
        });
    };
    sqlx::query(
        "INSERT INTO paused_queues (queue, workers, actor, reason) VALUES ($1, $2, $3, $4)",
    )
    .bind(queue)
    .bind(&workers)
    .bind(&asked.actor)
    .bind(&reason)
    .execute(state.store().pool())
    .await?;
    let refused = tell(state, "cancel_consumer", queue, &workers).await;
    if !refused.is_empty() {
        let e = format!("not confirmed by {}", refused.join(", "));
        failed(state, asked, "queue.pause.failed", queue, entry, &e).await;
    }
    tracing::info!(queue, workers = ?workers, "queue paused");
    Ok(Done {
        queue: queue.to_owned(),
        workers,
        refused,
        ..Done::default()
    })
}

/// Tells the workers a pause stopped to consume `queue` again.
pub async fn resume(state: &AppState, queue: &str, asked: &Asked) -> Result<Done> {
    need_reason(asked, "resume a queue")?;
    let row: Option<(Vec<String>,)> =
        sqlx::query_as("SELECT workers FROM paused_queues WHERE queue = $1")
            .bind(queue)
            .fetch_optional(state.store().pool())
            .await?;
    let Some((workers,)) = row else {
        return Err(Error::Conflict(format!("`{queue}` is not paused")));
    };
    let Some(entry) = note_many(
        state,
        "queue.resume",
        queue,
        i32::try_from(workers.len()).unwrap_or(i32::MAX),
        json!({"workers": workers}),
        asked,
    )
    .await?
    else {
        return Ok(Done {
            queue: queue.to_owned(),
            repeated: true,
            ..Done::default()
        });
    };
    let refused = tell(state, "add_consumer", queue, &workers).await;
    if !refused.is_empty() {
        // Those may be gone (a pod replaced): the queue is not paused for anyone still running.
        let e = format!(
            "not confirmed by {} (gone, or consuming it already)",
            refused.join(", ")
        );
        failed(state, asked, "queue.resume.failed", queue, entry, &e).await;
    }
    sqlx::query("DELETE FROM paused_queues WHERE queue = $1")
        .bind(queue)
        .execute(state.store().pool())
        .await?;
    tracing::info!(queue, workers = ?workers, "queue resumed");
    Ok(Done {
        queue: queue.to_owned(),
        workers,
        refused,
        ..Done::default()
    })
}

/// Drops `queue`'s ready messages; `shown` is the count the operator saw.
pub async fn purge(state: &AppState, queue: &str, shown: u64, asked: &Asked) -> Result<Done> {
    need_reason(asked, "purge a queue")?;
    let Some(stats) = state.queue_probe().stats(queue).await? else {
        return Err(Error::NotFound(format!("no queue `{queue}`")));
    };
    let Some(entry) = note_many(
        state,
        "queue.purge",
        queue,
        i32::try_from(stats.messages).unwrap_or(i32::MAX),
        json!({"shown": shown, "ready_before": stats.messages}),
        asked,
    )
    .await?
    else {
        return Ok(Done {
            queue: queue.to_owned(),
            repeated: true,
            ..Done::default()
        });
    };
    match state.queue_probe().purge(queue).await {
        Ok(n) => {
            tracing::warn!(queue, purged = n, shown, actor = %asked.actor, "queue purged");
            Ok(Done {
                queue: queue.to_owned(),
                purged: Some(n),
                ..Done::default()
            })
        }
        Err(e) => {
            failed(
                state,
                asked,
                "queue.purge.failed",
                queue,
                entry,
                &e.to_string(),
            )
            .await;
            Err(e)
        }
    }
}

/// The paused state of each queue, for the queues page.
pub async fn paused_names(state: &AppState) -> Vec<String> {
    paused(state)
        .await
        .map(|p| p.into_iter().map(|p| p.queue).collect())
        .unwrap_or_default()
}

/// JSON for the API.
pub fn to_json(done: &Done) -> Value {
    json!(done)
}
