//! What the worker does with a message's `embed` once the task has run, as Celery's tracer
//! (`celery/app/trace.py`) and `Backend.mark_as_done` / `mark_as_failure` do:
//!
//! - **Success, before the result is stored**: the `callbacks` (link) are sent with the result
//!   (one callback alone; several as one group, group callbacks each on their own), then the next
//!   chain step (the *last* element of `embed.chain`) with the result in front of its arguments
//!   (unless immutable) and the rest of the chain in its own `embed.chain`. Each carries
//!   `parent_id` = this task and this task's `root_id`. What was sent becomes `children`.
//! - **Success or failure, after the result is stored**: a chord header task (`group` header and
//!   `embed.chord`) records its result in the backend's chord keys; the one that completes the
//!   chord fires the body with the list of results (or fails it with `ChordError`).
//! - **Failure, after the result is stored**: every task still waiting in `embed.chain` is stored
//!   as FAILURE with the same exception (so the chain's result does not stay PENDING), and the
//!   `errbacks` are sent as one group with `(task_id,)`, the old-style call Celery uses for
//!   errbacks it cannot inspect (a Rust worker can inspect none).

use serde_json::{Map, Value, json};

use super::apply::apply;
use super::signature::{Signature, signatures_in};
use crate::backend::{ChordPart, ChordProgress, ExceptionInfo, ResultBackend, TaskMeta, TaskState};
use crate::client::Client;
use crate::error::Result;
use crate::protocol::TaskMessage;

fn lineage(message: &TaskMessage) -> Map<String, Value> {
    let h = &message.headers;
    let mut extra = Map::new();
    extra.insert("parent_id".into(), h.id.clone().into());
    extra.insert(
        "root_id".into(),
        h.root_id.clone().unwrap_or_else(|| h.id.clone()).into(),
    );
    extra
}

fn parse_all(message: &TaskMessage, key: &str) -> Vec<Signature> {
    signatures_in(message.embed.get(key))
        .into_iter()
        .filter_map(|s| {
            s.map_err(
                |e| tracing::error!(embed = key, error = %e, "ignoring an unreadable signature"),
            )
            .ok()
        })
        .collect()
}

/// Sends `sig`; a signature this crate cannot send (a `celery.map`, a malformed chain) is
/// logged and skipped, since requeueing would only fail again. `None` when skipped.
async fn send(
    client: &Client,
    sig: &Signature,
    partial: Vec<Value>,
    extra: Map<String, Value>,
) -> Result<Option<Value>> {
    match apply(client, sig, partial, extra).await {
        Ok(tuple) => Ok(Some(tuple)),
        Err(crate::Error::Config(reason)) => {
            tracing::error!(task = %sig.task, %reason, "cannot send a canvas signature; skipping it");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Sends the callbacks and the next chain step after a success; returns the `children` to
/// store. An error means something could not be published (the caller requeues the message).
pub(crate) async fn on_success(
    client: &Client,
    message: &TaskMessage,
    result: &Value,
) -> Result<Vec<Value>> {
    let mut children = Vec::new();
    let callbacks = parse_all(message, "callbacks");
    if callbacks.len() == 1 {
        children.extend(
            send(
                client,
                &callbacks[0],
                vec![result.clone()],
                lineage(message),
            )
            .await?,
        );
    } else if !callbacks.is_empty() {
        let (groups, tasks): (Vec<_>, Vec<_>) = callbacks
            .into_iter()
            .partition(|s| s.subtask_type.as_deref() == Some("group"));
        for g in &groups {
            children.extend(send(client, g, vec![result.clone()], lineage(message)).await?);
        }
        if !tasks.is_empty() {
            let g = super::signature::group(tasks);
            children.extend(send(client, &g, vec![result.clone()], lineage(message)).await?);
        }
    }
    let mut chain = parse_all(message, "chain");
    if let Some(next) = chain.pop() {
        let mut extra = lineage(message);
        extra.insert(
            "chain".into(),
            Value::Array(chain.iter().map(Signature::to_value).collect()),
        );
        children.extend(send(client, &next, vec![result.clone()], extra).await?);
    }
    Ok(children)
}

/// After the result is stored: the chord part, and on failure the chain's tasks and errbacks.
pub(crate) async fn after_store(client: &Client, message: &TaskMessage, meta: &TaskMeta) {
    let failed = match meta.status {
        TaskState::Success => false,
        TaskState::Failure => true,
        _ => return,
    };
    if message.embed.get("chord").is_some_and(|c| !c.is_null())
        && let Err(e) = chord_part_return(client, message, meta.status, &meta.result).await
    {
        tracing::error!(error = %e, group = ?message.headers.group, "could not record the chord part; the chord body may not run");
    }
    if !failed {
        return;
    }
    let exc = meta
        .exception_info()
        .unwrap_or_else(|| ExceptionInfo::new("builtins", "Exception", meta.result.to_string()));
    for step in parse_all(message, "chain") {
        let Some(id) = step.id() else {
            tracing::warn!(task = %step.task, "a chained task without an id cannot be marked failed");
            continue;
        };
        let mut failed = TaskMeta::exception(id, TaskState::Failure, &exc);
        failed.group_id = step
            .options
            .get("group_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if step.options.contains_key("chord") {
            tracing::warn!(
                task_id = id,
                "a chained chord header task that never ran is not counted in its chord"
            );
        }
        if let Err(e) = client.backend().store(&failed).await {
            tracing::warn!(task_id = id, error = %e, "could not mark a chained task failed");
        }
    }
    let errbacks = parse_all(message, "errbacks");
    if !errbacks.is_empty() {
        let extra = lineage(message);
        let g = super::signature::group(errbacks);
        if let Err(e) = apply(client, &g, vec![json!(message.headers.id)], extra).await {
            tracing::error!(error = %e, "could not send the errbacks");
        }
    }
}

async fn chord_part_return(
    client: &Client,
    message: &TaskMessage,
    state: TaskState,
    result: &Value,
) -> Result<()> {
    let Some(group_id) = message.headers.group.as_deref() else {
        tracing::warn!("a chord header task without a `group` header cannot count in its chord");
        return Ok(());
    };
    let body = Signature::from_value(&message.embed["chord"]).map_err(crate::Error::Config)?;
    let part = ChordPart {
        group_id,
        task_id: &message.headers.id,
        group_index: message.headers.group_index,
        state,
        result,
        fallback_size: body.extra.get("chord_size").and_then(Value::as_u64),
    };
    let backend = client.backend();
    let (members, claim) = match backend.chord_part_return(&part).await? {
        ChordProgress::Complete { members, claim } => (members, claim),
        ChordProgress::Waiting { ready, total } => {
            tracing::debug!(group_id, ready, ?total, "chord part recorded");
            return Ok(());
        }
        ChordProgress::AlreadyDone => return Ok(()),
    };
    if let Some(bad) = members
        .iter()
        .find(|m| m.state == "FAILURE" || m.state == "REVOKED")
    {
        let cause = serde_json::from_value::<ExceptionInfo>(bad.result.clone())
            .map(|e| format!("{}({:?})", e.exc_type, e.message()))
            .unwrap_or_else(|_| bad.result.to_string());
        let exc = ExceptionInfo::new(
            "celery.exceptions",
            "ChordError",
            format!("Dependency {} raised {cause}", bad.task_id),
        );
        tracing::warn!(group_id, %exc, "chord failed");
        fail_body(client, &body, &exc).await;
        return backend.chord_abandon(group_id).await;
    }
    let results: Vec<Value> = members.into_iter().map(|m| m.result).collect();
    tracing::info!(group_id, size = results.len(), body = %body.task, "chord complete; sending its body");
    let sent = apply(client, &body, vec![Value::Array(results)], lineage(message)).await;
    if let Err(e) = &sent {
        let exc = ExceptionInfo::new(
            "celery.exceptions",
            "ChordError",
            format!("Callback error: {e}"),
        );
        fail_body(client, &body, &exc).await;
    }
    if !backend.chord_cleanup(group_id, &claim).await? {
        tracing::warn!(
            group_id,
            "chord claim lost before cleanup; its keys are left to expire"
        );
    }
    sent.map(|_| ())
}

async fn fail_body(client: &Client, body: &Signature, exc: &ExceptionInfo) {
    let Some(id) = body.id() else {
        tracing::warn!(body = %body.task, "chord body has no id; its failure cannot be stored");
        return;
    };
    let mut meta = TaskMeta::exception(id, TaskState::Failure, exc);
    meta.group_id = body
        .options
        .get("group_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    if let Err(e) = client.backend().store(&meta).await {
        tracing::error!(task_id = id, error = %e, "could not store the chord body's failure");
    }
}
