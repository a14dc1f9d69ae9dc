//! What happens to one delivery, from decoding to acknowledgement.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};
use tracing::Instrument;

use super::State;
use crate::backend::{ExceptionInfo, ResultBackend, TaskMeta, TaskState};
use crate::broker::{Broker, Delivery};
use crate::error::{Error, Result};
use crate::protocol::{RawMessage, TaskMessage, format_datetime};
use crate::registry::PreparedRun;
use crate::task::{SoftLimit, TaskContext, TaskError};

/// How a run ended.
enum Outcome {
    Returned(Result<Value, TaskError>),
    Panicked(String),
    SoftLimit(f64),
    HardLimit(f64),
}

/// Handles one delivery completely. Never panics; every path settles the delivery.
pub(super) async fn handle(state: Arc<State>, delivery: Delivery) {
    let message = match TaskMessage::decode(&delivery.message) {
        Ok(m) => m,
        Err(e) => {
            let exc = ExceptionInfo::new("kombu.exceptions", "DecodeError", e.to_string());
            return dead_letter(&state, delivery, &format!("undecodable message: {e}"), exc).await;
        }
    };
    let Some(task) = state.registry.get(&message.headers.task) else {
        let name = &message.headers.task;
        let exc = ExceptionInfo::new("celery.exceptions", "NotRegistered", name.clone());
        return dead_letter(&state, delivery, &format!("unknown task `{name}`"), exc).await;
    };
    let span = tracing::info_span!(
        "task",
        task_id = %message.headers.id,
        task = %message.headers.task,
        retries = message.headers.retries
    );
    run_task(state, delivery, message, task)
        .instrument(span)
        .await
}

/// Runs a decoded message of a registered task.
async fn run_task(
    state: Arc<State>,
    delivery: Delivery,
    message: TaskMessage,
    task: Arc<dyn crate::registry::ErasedTask>,
) {
    let id = message.headers.id.clone();

    if delivery.redelivered
        && let Ok(Some(meta)) = state.backend().get(&id).await
        && meta.status.is_ready()
    {
        tracing::info!(state = %meta.status, "redelivered task already finished; acknowledging");
        state.stats.duplicates.fetch_add(1, Ordering::Relaxed);
        return settle(delivery, true).await;
    }
    if expired(&state, &message) {
        return revoke_expired(&state, delivery, &message).await;
    }
    if let Some(eta) = message.headers.eta {
        let wait = (eta - state.config.clock.now())
            .to_std()
            .unwrap_or_default();
        if wait > state.config.eta_hold {
            return defer(&state, delivery, wait).await;
        }
        if !wait.is_zero()
            && wait_or_stop(&state, tokio::time::sleep(wait))
                .await
                .is_none()
        {
            return settle(delivery, false).await;
        }
    }
    let run = match task.prepare(message.args.clone(), message.kwargs.clone()) {
        Ok(run) => run,
        Err(reason) => {
            let exc = ExceptionInfo::new(
                "builtins",
                "TypeError",
                format!("{}: {reason}", message.headers.task),
            );
            return dead_letter(
                &state,
                delivery,
                &format!("invalid arguments: {reason}"),
                exc,
            )
            .await;
        }
    };
    let options = task.options().clone();

    let Some(Ok(_slot)) = wait_or_stop(&state, state.slots.clone().acquire_owned()).await else {
        return settle(delivery, false).await;
    };
    if let Some(limit) = options.rate_limit {
        let due = state.limiter.reserve(&message.headers.task, limit);
        if wait_or_stop(&state, tokio::time::sleep_until(due))
            .await
            .is_none()
        {
            return settle(delivery, false).await;
        }
    }
    if expired(&state, &message) {
        return revoke_expired(&state, delivery, &message).await;
    }

    let started = state.config.clock.now();
    let ignore_result = message.headers.ignore_result || options.ignore_result;
    if options.track_started && !ignore_result {
        let meta = base_meta(
            &state,
            &message,
            &delivery.queue,
            TaskState::Started,
            json!({"pid": std::process::id(), "hostname": state.config.hostname}),
        );
        if let Err(e) = state.backend().store(&meta).await {
            tracing::warn!(error = %e, "could not store STARTED");
        }
    }

    let soft = message
        .headers
        .soft_time_limit
        .map(Duration::from_secs_f64)
        .or(options.soft_time_limit);
    let hard = message
        .headers
        .time_limit
        .map(Duration::from_secs_f64)
        .or(options.time_limit);
    let ctx = TaskContext {
        id: id.clone(),
        name: message.headers.task.clone(),
        retries: message.headers.retries,
        max_retries: options.max_retries,
        redelivered: delivery.redelivered,
        queue: delivery.queue.clone(),
        root_id: message.headers.root_id.clone(),
        parent_id: message.headers.parent_id.clone(),
        eta: message.headers.eta,
        expires: message.headers.expires,
        hostname: state.config.hostname.clone(),
        client: state.client.clone(),
        soft: SoftLimit {
            deadline: soft.map(|s| tokio::time::Instant::now() + s),
            watched: Arc::default(),
        },
    };
    tracing::debug!("started");
    let outcome = execute(run, ctx, soft, hard).await;

    let mut meta = match outcome {
        Outcome::Returned(Ok(value)) => {
            state.stats.succeeded.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("succeeded");
            if ignore_result {
                return settle(delivery, true).await;
            }
            base_meta(&state, &message, &delivery.queue, TaskState::Success, value)
        }
        Outcome::Returned(Err(TaskError::Retry { reason, after })) => {
            match retry(&state, &delivery, &message, &options, &reason, after).await {
                Ok(Some(meta)) => meta,
                Ok(None) => return settle(delivery, true).await,
                Err(e) => {
                    tracing::error!(error = %e, "could not schedule the retry; requeueing");
                    return settle(delivery, false).await;
                }
            }
        }
        Outcome::Returned(Err(e)) => failure(&state, &message, &delivery.queue, e.exception()),
        Outcome::Panicked(msg) => failure(
            &state,
            &message,
            &delivery.queue,
            ExceptionInfo::new("builtins", "RuntimeError", format!("task panicked: {msg}")),
        ),
        Outcome::SoftLimit(secs) => failure(
            &state,
            &message,
            &delivery.queue,
            ExceptionInfo::new(
                "celery.exceptions",
                "SoftTimeLimitExceeded",
                format!("soft time limit ({secs}s) exceeded"),
            ),
        ),
        Outcome::HardLimit(secs) => failure(
            &state,
            &message,
            &delivery.queue,
            ExceptionInfo::new("celery.exceptions", "TimeLimitExceeded", format!("{secs}")),
        ),
    };
    meta.date_started = Some(started);
    let stored = if ignore_result && meta.status == TaskState::Success {
        Ok(())
    } else {
        store(&state, &meta).await
    };
    match stored {
        Ok(()) => settle(delivery, true).await,
        // The next attempt is already published: requeueing this one would run the task twice,
        // and a RETRY state is only informational.
        Err(e) if meta.status == TaskState::Retry => {
            tracing::warn!(error = %e, "could not store RETRY; the retry is scheduled anyway");
            settle(delivery, true).await
        }
        Err(e) => {
            tracing::error!(error = %e, "could not store the result; requeueing the message");
            settle(delivery, false).await
        }
    }
}

fn failure(state: &State, message: &TaskMessage, queue: &str, exc: ExceptionInfo) -> TaskMeta {
    state.stats.failed.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(exception = %exc, "failed");
    let mut meta = base_meta(state, message, queue, TaskState::Failure, Value::Null);
    meta.result = serde_json::to_value(&exc).unwrap_or(Value::Null);
    meta
}

/// Runs a prepared task under its time limits, on its own tokio task so a panic is caught.
async fn execute(
    run: PreparedRun,
    ctx: TaskContext,
    soft: Option<Duration>,
    hard: Option<Duration>,
) -> Outcome {
    let watched = ctx.soft.watched.clone();
    let start = tokio::time::Instant::now();
    // If this run is abandoned (shutdown deadline), the task is stopped with it rather than left
    // running while its message is redelivered elsewhere.
    let mut guard = AbortOnDrop(tokio::spawn(run(ctx).in_current_span()));
    let handle = &mut guard.0;
    let joined = |r: std::result::Result<Result<Value, TaskError>, tokio::task::JoinError>| match r
    {
        Ok(r) => Outcome::Returned(r),
        Err(e) if e.is_panic() => {
            let payload = e.into_panic();
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "non-text panic payload".to_owned());
            Outcome::Panicked(msg)
        }
        Err(_) => Outcome::Panicked("task was cancelled".to_owned()),
    };
    if let Some(soft) = soft.filter(|s| hard.is_none_or(|h| *s < h)) {
        tokio::select! {
            r = &mut *handle => return joined(r),
            _ = tokio::time::sleep_until(start + soft) => {
                if !watched.load(Ordering::SeqCst) {
                    handle.abort();
                    return Outcome::SoftLimit(soft.as_secs_f64());
                }
            }
        }
    }
    match hard {
        Some(hard) => match tokio::time::timeout_at(start + hard, &mut *handle).await {
            Ok(r) => joined(r),
            Err(_) => {
                handle.abort();
                Outcome::HardLimit(hard.as_secs_f64())
            }
        },
        None => joined(handle.await),
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Waits for `fut` unless shutdown begins first (then `None`: the message is given back).
async fn wait_or_stop<F: std::future::Future>(state: &State, fut: F) -> Option<F::Output> {
    let mut stopping = state.stopping.clone();
    if *stopping.borrow() {
        return None;
    }
    tokio::select! {
        out = fut => Some(out),
        _ = stopping.wait_for(|s| *s) => None,
    }
}

fn expired(state: &State, message: &TaskMessage) -> bool {
    message
        .headers
        .expires
        .is_some_and(|e| e <= state.config.clock.now())
}

fn base_meta(
    state: &State,
    message: &TaskMessage,
    queue: &str,
    status: TaskState,
    result: Value,
) -> TaskMeta {
    let mut meta = TaskMeta::new(message.headers.id.clone(), status, result);
    meta.parent_id = message.headers.parent_id.clone();
    meta.group_id = message.headers.group.clone();
    if state.config.result_extended {
        meta.name = Some(message.headers.task.clone());
        meta.args = Some(message.args.clone());
        meta.kwargs = Some(message.kwargs.clone());
        meta.worker = Some(state.config.hostname.clone());
        meta.retries = Some(message.headers.retries);
        meta.queue = Some(queue.to_owned());
    }
    meta
}

/// Stores a state, retrying for a while if the backend is unreachable.
async fn store(state: &State, meta: &TaskMeta) -> Result<()> {
    let mut backoff = Duration::from_millis(100);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match state.backend().store(meta).await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() + backoff < deadline => {
                tracing::warn!(task_id = %meta.task_id, error = %e, "result backend unavailable; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

async fn settle(delivery: Delivery, ack: bool) {
    let queue = delivery.queue.clone();
    let result = if ack {
        delivery.ack().await
    } else {
        delivery.reject(true).await
    };
    if let Err(e) = result {
        // The channel is gone: the broker will redeliver, and the redelivery is deduplicated.
        tracing::warn!(queue, error = %e, "could not settle a delivery; it will be redelivered");
    }
}

async fn revoke_expired(state: &State, delivery: Delivery, message: &TaskMessage) {
    state.stats.revoked.fetch_add(1, Ordering::Relaxed);
    tracing::info!(task_id = %message.headers.id, task = %message.headers.task, "expired; revoking");
    let exc = ExceptionInfo::new("celery.exceptions", "TaskRevokedError", "expired");
    let mut meta = base_meta(
        state,
        message,
        &delivery.queue,
        TaskState::Revoked,
        Value::Null,
    );
    meta.result = serde_json::to_value(&exc).unwrap_or(Value::Null);
    match store(state, &meta).await {
        Ok(()) => settle(delivery, true).await,
        Err(_) => settle(delivery, false).await,
    }
}

/// Hands a message whose ETA is far away back to the broker's delay queues.
async fn defer(state: &State, delivery: Delivery, wait: Duration) {
    match state
        .broker()
        .publish_delayed(&delivery.queue, &delivery.message, wait)
        .await
    {
        Ok(()) => {
            state.stats.deferred.fetch_add(1, Ordering::Relaxed);
            settle(delivery, true).await
        }
        Err(e) => {
            tracing::error!(error = %e, "could not defer a message with a future ETA; requeueing");
            settle(delivery, false).await
        }
    }
}

/// Schedules the next attempt, or returns the FAILURE meta when retries are exhausted.
/// `Ok(None)`: retried, nothing to store (results ignored).
async fn retry(
    state: &State,
    delivery: &Delivery,
    message: &TaskMessage,
    options: &crate::TaskOptions,
    reason: &str,
    after: Option<Duration>,
) -> Result<Option<TaskMeta>> {
    let retries = message.headers.retries;
    if options.max_retries.is_some_and(|max| retries >= max) {
        state.stats.failed.fetch_add(1, Ordering::Relaxed);
        let exc = ExceptionInfo::new(
            "celery.exceptions",
            "MaxRetriesExceededError",
            format!(
                "Can't retry {}[{}]: {} retries used; last error: {reason}",
                message.headers.task, message.headers.id, retries
            ),
        );
        tracing::warn!(task_id = %message.headers.id, %reason, "retries exhausted");
        let mut meta = base_meta(
            state,
            message,
            &delivery.queue,
            TaskState::Failure,
            Value::Null,
        );
        meta.result = serde_json::to_value(&exc).unwrap_or(Value::Null);
        return Ok(Some(meta));
    }
    let wait = after.unwrap_or_else(|| options.backoff.delay(retries));
    let eta = state.config.clock.now() + chrono::Duration::from_std(wait).unwrap_or_default();
    let mut next: RawMessage = delivery.message.clone();
    next.headers
        .insert("retries".into(), Value::from(retries + 1));
    next.headers
        .insert("eta".into(), Value::String(format_datetime(eta)));
    state
        .broker()
        .publish_delayed(&delivery.queue, &next, wait)
        .await
        .map_err(|e| Error::Broker(format!("retry publish: {e}")))?;
    state.stats.retried.fetch_add(1, Ordering::Relaxed);
    tracing::info!(task_id = %message.headers.id, %reason, ?wait, retry = retries + 1, "retry scheduled");
    if message.headers.ignore_result || options.ignore_result {
        return Ok(None);
    }
    let exc = ExceptionInfo::new("celery.exceptions", "Retry", reason.to_owned());
    let mut meta = base_meta(
        state,
        message,
        &delivery.queue,
        TaskState::Retry,
        Value::Null,
    );
    meta.result = serde_json::to_value(&exc).unwrap_or(Value::Null);
    Ok(Some(meta))
}

/// Dead-letters bad input with a reason, records FAILURE when the id is known, logs once.
async fn dead_letter(state: &State, delivery: Delivery, reason: &str, exc: ExceptionInfo) {
    let task_id = delivery.message.task_id().map(str::to_owned);
    tracing::warn!(queue = %delivery.queue, task_id = ?task_id, task = ?delivery.message.task_name(), reason, "dead-lettering a message");
    if let Err(e) = state
        .broker()
        .dead_letter(&delivery.queue, &delivery.message, reason)
        .await
    {
        tracing::error!(error = %e, "could not dead-letter; requeueing");
        return settle(delivery, false).await;
    }
    state.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
    if let Some(id) = task_id {
        let mut meta = TaskMeta::exception(id, TaskState::Failure, &exc);
        if let Some(name) = delivery.message.task_name() {
            meta.name = Some(name.to_owned());
        }
        meta.worker = Some(state.config.hostname.clone());
        meta.queue = Some(delivery.queue.clone());
        if let Err(e) = store(state, &meta).await {
            tracing::warn!(error = %e, "could not record the dead-lettered task's FAILURE");
        }
    }
    settle(delivery, true).await
}
