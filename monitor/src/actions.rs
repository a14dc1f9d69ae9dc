//! The actions operators take through the monitor, shared by the API and the pages, each
//! recorded in the audit log ([`crate::audit`]) before it is taken.

use serde_json::{Value, json};
use task_core::client::SendOptions;
use task_core::{ResultBackend, TaskState};

use crate::AppState;
use crate::audit::Action;
use crate::error::{Error, Result};

/// Who asks, why, and the request's id (see [`crate::audit`]).
#[derive(Debug, Clone)]
pub struct Asked {
    pub actor: String,
    pub reason: Option<String>,
    pub request_id: Option<String>,
}

/// A retry sent (or, for a repeated request, sent earlier).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retried {
    /// The new task's id.
    pub task_id: String,
    /// False when this request had been made before and nothing was sent now.
    pub sent_now: bool,
}

/// Sends a failed or revoked task again: the same name, arguments and queue, a new id, with the
/// original as its parent (so the workflow tree shows both). The arguments come from the stored
/// result (Celery's `result_extended`, which Rust workers write by default); events carry only
/// their printed forms, which cannot be sent.
pub async fn retry(state: &AppState, id: &str, asked: &Asked) -> Result<Retried> {
    let meta = state
        .client()
        .backend()
        .get(id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no stored result for task '{id}'")))?;
    if !matches!(meta.status, TaskState::Failure | TaskState::Revoked) {
        return Err(Error::Conflict(format!(
            "only a failed or revoked task can be retried; '{id}' is {}",
            meta.status.as_str()
        )));
    }
    let (Some(name), Some(args)) = (meta.name.clone(), meta.args.clone()) else {
        return Err(Error::Conflict(format!(
            "the stored result of '{id}' does not hold the task's arguments: the worker must \
             store extended results (Celery's result_extended = True; Rust workers do by default)"
        )));
    };
    let kwargs = meta.kwargs.clone().unwrap_or_default();
    let record = state.store().task(id).await?;
    let queue = meta
        .queue
        .clone()
        .or_else(|| record.as_ref().and_then(|t| t.routing_key.clone()))
        .or_else(|| record.as_ref().and_then(|t| t.queue.clone()));
    let root = record
        .as_ref()
        .and_then(|t| t.root_id.clone())
        .unwrap_or_else(|| id.to_owned());
    let new_id = uuid::Uuid::new_v4().to_string();
    let entry = state
        .store()
        .record(&Action {
            actor: asked.actor.clone(),
            action: "task.retry",
            target: id.to_owned(),
            count: 1,
            reason: asked.reason.clone(),
            detail: json!({"task_id": new_id, "name": name, "queue": queue}),
            request_id: asked.request_id.clone(),
        })
        .await?;
    let entry = match entry {
        Ok(e) => e,
        Err(earlier) => {
            let task_id = earlier.detail["task_id"].as_str().unwrap_or_default();
            return Ok(Retried {
                task_id: task_id.to_owned(),
                sent_now: false,
            });
        }
    };
    let options = SendOptions {
        task_id: Some(new_id.clone()),
        queue: queue.clone(),
        parent_id: Some(id.to_owned()),
        root_id: Some(root),
        ..SendOptions::default()
    };
    let sent = state
        .client()
        .send_task(&name, args, kwargs)
        .options(options)
        .send()
        .await;
    if let Err(e) = sent {
        failed(
            state,
            asked,
            "task.retry.failed",
            id,
            entry.id,
            &e.to_string(),
        )
        .await;
        return Err(e.into());
    }
    tracing::info!(id, new_id, task = name, actor = asked.actor, "task retried");
    Ok(Retried {
        task_id: new_id,
        sent_now: true,
    })
}

/// Revokes `id` (and stops it where it runs when `terminate`), recorded first.
pub async fn revoke(state: &AppState, id: &str, terminate: bool, asked: &Asked) -> Result<bool> {
    let entry = state
        .store()
        .record(&Action {
            actor: asked.actor.clone(),
            action: "task.revoke",
            target: id.to_owned(),
            count: 1,
            reason: asked.reason.clone(),
            detail: json!({"terminate": terminate}),
            request_id: asked.request_id.clone(),
        })
        .await?;
    let Ok(entry) = entry else {
        return Ok(false);
    };
    if let Err(e) = state
        .client()
        .revoke(
            &[id.to_owned()],
            terminate,
            task_core::worker::DEFAULT_REVOKE_TTL,
        )
        .await
    {
        failed(
            state,
            asked,
            "task.revoke.failed",
            id,
            entry.id,
            &e.to_string(),
        )
        .await;
        return Err(e.into());
    }
    tracing::info!(id, terminate, actor = asked.actor, "task revoked");
    Ok(true)
}

/// Records any other action (a worker control, a task sent) before it is taken; `Ok(false)`
/// when this request was made before.
pub async fn note(
    state: &AppState,
    action: &'static str,
    target: &str,
    detail: Value,
    asked: &Asked,
) -> Result<Option<i64>> {
    note_many(state, action, target, 1, detail, asked).await
}

/// [`note`] for an action on `count` things (workers told, messages purged).
pub async fn note_many(
    state: &AppState,
    action: &'static str,
    target: &str,
    count: i32,
    detail: Value,
    asked: &Asked,
) -> Result<Option<i64>> {
    Ok(state
        .store()
        .record(&Action {
            actor: asked.actor.clone(),
            action,
            target: target.to_owned(),
            count,
            reason: asked.reason.clone(),
            detail,
            request_id: asked.request_id.clone(),
        })
        .await?
        .ok()
        .map(|e| e.id))
}

/// Records that the action of entry `of` failed.
pub async fn failed(
    state: &AppState,
    asked: &Asked,
    action: &'static str,
    target: &str,
    of: i64,
    error: &str,
) {
    let entry = Action {
        actor: asked.actor.clone(),
        action,
        target: target.to_owned(),
        count: 0,
        reason: asked.reason.clone(),
        detail: json!({"entry": of, "error": error}),
        request_id: None,
    };
    if let Err(e) = state.store().record(&entry).await {
        tracing::error!(error = %e, target, action, "the failure of an action could not be recorded");
    }
}
