//! What happens to one delivery, from decoding to acknowledgement.
//!
//! Along the way the delivery is listed in the request registry (reserved, scheduled, active),
//! reported as Celery events (received, started, succeeded/failed/retried/revoked/rejected) and
//! counted in the metrics. Printable arguments are redacted once, here, and only the redacted
//! copies go to events, inspect replies, stored extended fields, logs and error reports.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tracing::Instrument;

use super::State;
use super::flow::{self, Admission};
use super::order::Place;
use super::requests::{Phase, RequestInfo, Tracked};
use crate::backend::{ExceptionInfo, ResultBackend, TaskMeta, TaskState};
use crate::broker::{Broker, Delivery};
use crate::canvas::tracer as canvas;
use crate::error::{Error, Result};
use crate::events::repr;
use crate::metrics::{Outcome as Metric, UNREGISTERED_TASK};
use crate::protocol::{RawMessage, TaskMessage, format_datetime};
use crate::registry::PreparedRun;
use crate::task::{SoftLimit, TaskContext, TaskError};

/// How a run ended.
enum Outcome {
    Returned(Result<crate::registry::Returned, TaskError>),
    Panicked(String),
    SoftLimit(f64),
    HardLimit(f64),
    Terminated,
}

/// A decoded message with what the worker shows of it.
struct Request {
    message: TaskMessage,
    /// Arguments as stored with results (sensitive ones redacted).
    args: Vec<Value>,
    kwargs: Map<String, Value>,
    args_repr: String,
    kwargs_repr: String,
    received: tokio::time::Instant,
}

/// Handles one delivery completely. Never panics; every path settles the delivery.
pub(super) async fn handle(state: Arc<State>, delivery: Delivery, place: Place) {
    let message = match TaskMessage::decode_in(&delivery.message, state.config.clock.timezone()) {
        Ok(m) => m,
        Err(e) => {
            let label = task_label(&state, delivery.message.task_name().unwrap_or_default());
            state.metrics.received(label, &delivery.queue);
            let exc = ExceptionInfo::new("kombu.exceptions", "DecodeError", e.to_string());
            return dead_letter(&state, delivery, &format!("undecodable message: {e}"), exc).await;
        }
    };
    let Some(task) = state.registry.get(&message.headers.task) else {
        let name = &message.headers.task;
        state.metrics.received(UNREGISTERED_TASK, &delivery.queue);
        let exc = ExceptionInfo::new("celery.exceptions", "NotRegistered", name.clone());
        return dead_letter(&state, delivery, &format!("unknown task `{name}`"), exc).await;
    };
    let span = tracing::info_span!(
        "task",
        task_id = %message.headers.id,
        task = %message.headers.task,
        retries = message.headers.retries
    );
    let options = task.options();
    let (args, kwargs) = crate::redact::redact(
        &message.args,
        &message.kwargs,
        &options.sensitive,
        task.fields(),
    );
    let (args_repr, kwargs_repr) = if options.sensitive.is_empty() {
        (
            message
                .headers
                .argsrepr
                .clone()
                .unwrap_or_else(|| repr::args_repr(&args)),
            message
                .headers
                .kwargsrepr
                .clone()
                .unwrap_or_else(|| repr::kwargs_repr(&kwargs)),
        )
    } else {
        (repr::args_repr(&args), repr::kwargs_repr(&kwargs))
    };
    let request = Request {
        message,
        args,
        kwargs,
        args_repr,
        kwargs_repr,
        received: tokio::time::Instant::now(),
    };
    run_task(state, delivery, request, task, place)
        .instrument(span)
        .await
}

/// Runs a decoded message of a registered task.
async fn run_task(
    state: Arc<State>,
    delivery: Delivery,
    request: Request,
    task: Arc<dyn crate::registry::ErasedTask>,
    mut place: Place,
) {
    let message = &request.message;
    let id = message.headers.id.clone();
    let name = message.headers.task.clone();
    state.metrics.received(&name, &delivery.queue);
    let tracked = state.requests.track(RequestInfo {
        id: id.clone(),
        name: name.clone(),
        args: request.args_repr.clone(),
        kwargs: request.kwargs_repr.clone(),
        queue: delivery.queue.clone(),
        priority: message.priority,
        redelivered: delivery.redelivered,
    });
    if state.events.task_events() {
        state
            .events
            .task("task-received", &id, received_fields(&request));
    }

    // A redelivery, or a message that may wait or be sent back to the delay queues before it
    // starts, is checked against its stored result now: a finished task's copy is settled here
    // rather than deferred again (the start check below catches the rest).
    if (delivery.redelivered || message.headers.eta.is_some())
        && let Some(status) = finished(&state, &id).await
    {
        tracing::info!(state = %status, redelivered = delivery.redelivered, "task already finished; acknowledging the duplicate");
        state.stats.duplicates.fetch_add(1, Ordering::Relaxed);
        return settle(delivery, true).await;
    }
    // A copy of a task this process is still running: its channel was closed under it (RabbitMQ's
    // consumer_timeout, a lost connection) and everything unacknowledged came back. Wait for the
    // original instead of running it a second time, then settle the copy by its result.
    if delivery.redelivered && state.requests.running_elsewhere(&id, &tracked) {
        tracing::warn!("a redelivered copy of a task still running here; waiting for the original");
        drop(place);
        while state.requests.running_elsewhere(&id, &tracked) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        place = state.line.join();
        if finished(&state, &id).await.is_some() {
            state.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            return settle(delivery, true).await;
        }
    }
    if state.revoked.contains(&id) {
        return revoke(&state, delivery, &request, Revoked::ById).await;
    }
    if expired(&state, message) {
        return revoke(&state, delivery, &request, Revoked::Expired).await;
    }
    if let Some(eta) = message.headers.eta {
        let wait = (eta - state.config.clock.now())
            .to_std()
            .unwrap_or_default();
        if wait > state.config.eta_hold {
            return defer(&state, delivery, wait).await;
        }
        if !wait.is_zero() {
            tracked.set(Phase::Scheduled(eta));
            drop(place);
            if wait_or_stop(&state, tokio::time::sleep(wait))
                .await
                .is_none()
            {
                return settle(delivery, false).await;
            }
            place = state.line.join();
            tracked.set(Phase::Reserved);
        }
        if state.revoked.contains(&id) {
            return revoke(&state, delivery, &request, Revoked::ById).await;
        }
    }
    let run = match task.prepare(message.args.clone(), message.kwargs.clone()) {
        Ok(run) => run,
        Err(reason) => {
            // serde's message quotes the value it rejected, which may be a sensitive one.
            let reason = if task.options().sensitive.is_empty() {
                reason
            } else {
                "the arguments do not match the task's (details withheld: it has sensitive \
                 arguments)"
                    .to_owned()
            };
            let exc = ExceptionInfo::new("builtins", "TypeError", format!("{name}: {reason}"));
            drop(tracked);
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

    // A limit may keep it waiting: it waits out of the line, and joins again once admitted.
    let kept = (!flow::limited(&state, &name, &options)).then_some(place);
    let permits = match flow::admit(&state, message, &options, task.fields()).await {
        Admission::Go(permits) => permits,
        Admission::Defer(wait) => {
            if let Some(status) = finished(&state, &id).await {
                tracing::info!(state = %status, "task already finished; acknowledging the duplicate");
                state.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                return settle(delivery, true).await;
            }
            return defer(&state, delivery, wait).await;
        }
        Admission::Stopped => return settle(delivery, false).await,
    };
    let place = kept.unwrap_or_else(|| state.line.join());
    place.turn().await;
    let Some(Ok(slot)) = wait_or_stop(&state, state.slots.clone().acquire_owned()).await else {
        return settle(delivery, false).await;
    };
    drop(place);
    if state.revoked.contains(&id) || tracked.is_terminated() {
        return revoke(&state, delivery, &request, Revoked::ById).await;
    }
    if expired(&state, message) {
        return revoke(&state, delivery, &request, Revoked::Expired).await;
    }

    // Duplicates also arrive without the redelivered flag (a retry whose ack was lost, a publish
    // retried after a lost confirm, the delay queues' at-least-once dead-lettering), so every
    // start is counted and checked against the stored result.
    match claim_start(&state, message).await {
        Start::Finished(status) => {
            tracing::info!(state = %status, redelivered = delivery.redelivered, "task already finished; acknowledging the duplicate");
            state.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            return settle(delivery, true).await;
        }
        // A second start means the first never finished: its worker died. Celery's default
        // then is FAILURE `WorkerLostError`, not another run.
        Start::Again(n) if !options.reject_on_worker_lost => {
            drop(tracked);
            state
                .metrics
                .completed(&name, &delivery.queue, Metric::Failure, None);
            let exc = ExceptionInfo::new(
                "celery.exceptions",
                "WorkerLostError",
                format!(
                    "Worker exited prematurely: the task started {} time(s) before without finishing",
                    n - 1
                ),
            );
            let meta = failure(&state, &request, &delivery.queue, exc);
            return match store(&state, &meta).await {
                Ok(()) => {
                    canvas::after_store(&state.client, message, &meta).await;
                    settle(delivery, true).await
                }
                Err(_) => settle(delivery, false).await,
            };
        }
        Start::Again(n) if n > MAX_RESTARTS + 1 => {
            drop(tracked);
            let before = n - 1;
            let exc = ExceptionInfo::new(
                "celery.exceptions",
                "WorkerLostError",
                format!("started {before} times without finishing"),
            );
            return dead_letter(
                &state,
                delivery,
                &format!("started {before} times without finishing: a poison message (it crashes or wedges the worker)"),
                exc,
            )
            .await;
        }
        Start::First | Start::Again(_) => {}
    }
    let started = state.config.clock.now();
    tracked.set(Phase::Active(crate::events::unix_now()));
    state
        .metrics
        .queue_wait(&name, &delivery.queue, request.received.elapsed());
    state.events.task("task-started", &id, Map::new());
    let ignore_result = message.headers.ignore_result || options.ignore_result;
    let store_errors = !ignore_result || options.store_errors_even_if_ignored;
    if options.track_started && !ignore_result {
        let meta = base_meta(
            &state,
            &request,
            &delivery.queue,
            TaskState::Started,
            json!({"pid": std::process::id(), "hostname": state.hostname}),
        );
        if let Err(e) = state.backend().store(&meta).await {
            tracing::warn!(error = %e, "could not store STARTED");
        }
    }

    let overrides = state.overrides(&name);
    let soft = message
        .headers
        .soft_time_limit
        .map(Duration::from_secs_f64)
        .or(overrides.soft_time_limit.unwrap_or(options.soft_time_limit));
    let hard = message
        .headers
        .time_limit
        .map(Duration::from_secs_f64)
        .or(overrides.time_limit.unwrap_or(options.time_limit));
    let ctx = TaskContext {
        id: id.clone(),
        name: name.clone(),
        retries: message.headers.retries,
        max_retries: options.max_retries,
        redelivered: delivery.redelivered,
        queue: delivery.queue.clone(),
        root_id: message.headers.root_id.clone(),
        parent_id: message.headers.parent_id.clone(),
        eta: message.headers.eta,
        expires: message.headers.expires,
        hostname: state.hostname.clone(),
        client: state.client.clone(),
        soft: SoftLimit {
            deadline: soft.map(|s| tokio::time::Instant::now() + s),
            watched: Arc::default(),
        },
        coordinator: Some(state.coordinator()),
        children: Arc::default(),
    };
    let hook_ctx = ctx.clone();
    // Celery's `task_acks_late=False`: acknowledged as it starts, so it never starts twice (and
    // is lost if this process dies while it runs).
    let held = if options.acks_late {
        Held::Unacked(delivery)
    } else {
        let early = Held::Acked {
            queue: delivery.queue.clone(),
            message: delivery.message.clone(),
        };
        settle(delivery, true).await;
        early
    };
    let queue = held.queue().to_owned();
    crate::signals::prerun(&crate::signals::Prerun {
        task_id: &id,
        task: &name,
        args: &request.args,
        kwargs: &request.kwargs,
        retries: message.headers.retries,
        hostname: &state.hostname,
    });
    tracing::debug!("started");
    let clock = tokio::time::Instant::now();
    let outcome = execute(run, ctx, soft, hard, &tracked).await;
    let runtime = clock.elapsed();
    state.count_total(&name);

    let mut on_success = None;
    let mut meta = match ended(outcome, &options) {
        Ended::Success(returned) => {
            let value = returned.value;
            on_success = Some(returned.on_success);
            state.stats.succeeded.fetch_add(1, Ordering::Relaxed);
            state
                .metrics
                .completed(&name, &queue, Metric::Success, Some(runtime));
            tracing::debug!("succeeded");
            if state.events.task_events() {
                let mut fields = Map::new();
                fields.insert("result".into(), repr::repr(&value).into());
                fields.insert("runtime".into(), json!(runtime.as_secs_f64()));
                state.events.task("task-succeeded", &id, fields);
            }
            // Celery's tracer: callbacks and the next chain step go out before the result is
            // stored, and what was sent becomes `children` (after the tasks the run sent itself).
            let mut children = sent_children(&hook_ctx);
            match canvas::on_success(&state.client, message, &value).await {
                Ok(sent) => children.extend(sent),
                Err(e) => {
                    tracing::error!(error = %e, "could not send the callbacks or the next chain step; requeueing");
                    return held.settle(false).await;
                }
            }
            let mut meta = base_meta(&state, &request, &queue, TaskState::Success, value);
            meta.children = Value::Array(children);
            meta
        }
        Ended::Retry(retry_with) => match retry(&state, &held, &request, &retry_with).await {
            Ok(Some(meta)) => {
                let outcome = if meta.status == TaskState::Retry {
                    Metric::Retry
                } else {
                    Metric::Failure
                };
                state
                    .metrics
                    .completed(&name, &queue, outcome, Some(runtime));
                meta
            }
            Ok(None) => {
                state
                    .metrics
                    .completed(&name, &queue, Metric::Retry, Some(runtime));
                let exc = retry_with.stored_exception();
                hooks_after(
                    &task,
                    &hook_ctx,
                    TaskState::Retry,
                    Some(&exc),
                    None,
                    runtime,
                );
                return held.settle(true).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "could not schedule the retry; requeueing");
                return match held {
                    Held::Unacked(delivery) => {
                        requeue_after_failure(&state, delivery, "the retry publish").await
                    }
                    Held::Acked { .. } => tracing::error!(
                        "the retry is lost: the message was acknowledged before the run (acks_late off)"
                    ),
                };
            }
        },
        Ended::Terminated => {
            state
                .metrics
                .completed(&name, &queue, Metric::Revoked, Some(runtime));
            hooks_after(&task, &hook_ctx, TaskState::Revoked, None, None, runtime);
            return match held {
                Held::Unacked(delivery) => {
                    revoke(&state, delivery, &request, Revoked::Terminated).await
                }
                Held::Acked { .. } => {
                    revoke_acked(&state, &queue, &request, Revoked::Terminated).await
                }
            };
        }
        Ended::Failure(exc) => {
            state
                .metrics
                .completed(&name, &queue, Metric::Failure, Some(runtime));
            failure(&state, &request, &queue, exc)
        }
    };
    meta.date_started = Some(started);
    let stored = match meta.status {
        TaskState::Success if ignore_result => Ok(()),
        TaskState::Failure if !store_errors => Ok(()),
        _ => store(&state, &meta).await,
    };
    match stored {
        Ok(()) => {
            canvas::after_store(&state.client, message, &meta).await;
            let exc = meta.exception_info();
            if meta.status == TaskState::Success
                && let Some(hook) = on_success
                && std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook(&hook_ctx)))
                    .is_err()
            {
                tracing::error!("the task's on_success hook panicked");
            }
            let retval = (meta.status == TaskState::Success).then_some(&meta.result);
            hooks_after(&task, &hook_ctx, meta.status, exc.as_ref(), retval, runtime);
            // The run is over: the slot and the limits' permits go to the next task while the
            // acknowledgement waits to share a frame with others (see `broker::amqp_settle`).
            drop((slot, permits));
            held.settle(true).await
        }
        // The next attempt is already published: requeueing this one would run the task twice,
        // and a RETRY state is only informational.
        Err(e) if meta.status == TaskState::Retry => {
            tracing::warn!(error = %e, "could not store RETRY; the retry is scheduled anyway");
            held.settle(true).await
        }
        Err(e) => {
            tracing::error!(error = %e, "could not store the result; requeueing the message");
            held.settle(false).await
        }
    }
}

/// The delivery while its task runs: still unacknowledged (acks late, the default), or
/// acknowledged as it started.
// One per running task, on its stack: boxing the delivery would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Held {
    Unacked(Delivery),
    Acked { queue: String, message: RawMessage },
}

impl Held {
    fn queue(&self) -> &str {
        match self {
            Held::Unacked(d) => &d.queue,
            Held::Acked { queue, .. } => queue,
        }
    }

    fn message(&self) -> &RawMessage {
        match self {
            Held::Unacked(d) => &d.message,
            Held::Acked { message, .. } => message,
        }
    }

    async fn settle(self, ack: bool) {
        match self {
            Held::Unacked(delivery) => settle(delivery, ack).await,
            Held::Acked { .. } if !ack => tracing::error!(
                "cannot give the message back: it was acknowledged before the run (acks_late off)"
            ),
            Held::Acked { .. } => {}
        }
    }
}

/// How a run ended, once the task's retry policy has had its say.
enum Ended {
    Success(crate::registry::Returned),
    Retry(RetryWith),
    Failure(ExceptionInfo),
    Terminated,
}

/// A retry to schedule.
struct RetryWith {
    reason: String,
    after: Option<Duration>,
    /// The error that caused it (Celery's `retry(exc=…)`): stored with RETRY, and the FAILURE
    /// once retries run out.
    cause: Option<ExceptionInfo>,
    max_retries: Option<u32>,
    backoff: crate::Backoff,
}

impl RetryWith {
    fn stored_exception(&self) -> ExceptionInfo {
        self.cause.clone().unwrap_or_else(|| {
            ExceptionInfo::new("celery.exceptions", "Retry", self.reason.clone())
        })
    }
}

fn ended(outcome: Outcome, options: &crate::TaskOptions) -> Ended {
    match outcome {
        Outcome::Returned(Ok(returned)) => Ended::Success(returned),
        Outcome::Returned(Err(TaskError::Retry {
            reason,
            after,
            cause,
        })) => Ended::Retry(RetryWith {
            reason,
            after,
            cause,
            max_retries: options.max_retries,
            backoff: options.backoff,
        }),
        Outcome::Returned(Err(e @ TaskError::Failed { .. })) => {
            let exc = e.exception();
            match &options.autoretry {
                Some(policy) if policy.matches(&exc) => Ended::Retry(RetryWith {
                    reason: exc.to_string(),
                    after: None,
                    cause: Some(exc),
                    max_retries: policy.max_retries.unwrap_or(options.max_retries),
                    backoff: policy.backoff.unwrap_or(options.backoff),
                }),
                _ => Ended::Failure(exc),
            }
        }
        Outcome::Returned(Err(e)) => Ended::Failure(e.exception()),
        Outcome::Panicked(msg) => Ended::Failure(ExceptionInfo::new(
            "builtins",
            "RuntimeError",
            format!("task panicked: {msg}"),
        )),
        Outcome::SoftLimit(secs) => Ended::Failure(ExceptionInfo::new(
            "celery.exceptions",
            "SoftTimeLimitExceeded",
            format!("soft time limit ({secs}s) exceeded"),
        )),
        // As Celery's worker: `TimeLimitExceeded(<hard limit>)`, a number.
        Outcome::HardLimit(secs) => Ended::Failure(ExceptionInfo::with_args(
            "celery.exceptions",
            "TimeLimitExceeded",
            vec![seconds_value(secs)],
        )),
        Outcome::Terminated => Ended::Terminated,
    }
}

/// Seconds as Python would print them: `30` for a whole number, `2.5` otherwise.
fn seconds_value(secs: f64) -> Value {
    if secs.fract() == 0.0 && secs.abs() < 1e15 {
        Value::from(secs as i64)
    } else {
        Value::from(secs)
    }
}

/// The tasks the run sent with [`crate::client::Call::parent`], as Celery's child tuples.
fn sent_children(ctx: &TaskContext) -> Vec<Value> {
    ctx.children
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|id| json!([[id, null], null]))
        .collect()
}

/// The task's own hooks for how the run ended, then `after_return` and the `task_postrun` signal.
/// A panic in a hook is logged and goes no further.
fn hooks_after(
    task: &Arc<dyn crate::registry::ErasedTask>,
    ctx: &TaskContext,
    state: TaskState,
    exception: Option<&ExceptionInfo>,
    retval: Option<&Value>,
    runtime: Duration,
) {
    let guarded = |what: &str, f: &dyn Fn()| {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
            tracing::error!(hook = what, "a task hook panicked");
        }
    };
    if let Some(exc) = exception {
        match state {
            TaskState::Failure => guarded("on_failure", &|| task.on_failure(ctx, exc)),
            TaskState::Retry => guarded("on_retry", &|| task.on_retry(ctx, exc)),
            _ => {}
        }
    }
    guarded("after_return", &|| task.after_return(ctx, state));
    crate::signals::postrun(&crate::signals::Postrun {
        task_id: &ctx.id,
        task: &ctx.name,
        state,
        retval,
        exception,
        runtime,
    });
}

/// The fields of `task-received`, the only event Celery's state takes the name and arguments
/// from.
fn received_fields(request: &Request) -> Map<String, Value> {
    let h = &request.message.headers;
    let mut f = Map::new();
    f.insert("name".into(), h.task.clone().into());
    f.insert("args".into(), request.args_repr.clone().into());
    f.insert("kwargs".into(), request.kwargs_repr.clone().into());
    f.insert("root_id".into(), json!(h.root_id));
    f.insert("parent_id".into(), json!(h.parent_id));
    f.insert("retries".into(), json!(h.retries));
    f.insert("eta".into(), json!(h.eta.map(format_datetime)));
    f.insert("expires".into(), json!(h.expires.map(format_datetime)));
    f
}

fn exception_fields(exc: &ExceptionInfo, task: &str) -> Map<String, Value> {
    let mut f = Map::new();
    f.insert(
        "exception".into(),
        repr::exception_repr(&exc.exc_type, &exc.message()).into(),
    );
    f.insert("traceback".into(), exc.traceback(task).into());
    f
}

fn failure(state: &State, request: &Request, queue: &str, exc: ExceptionInfo) -> TaskMeta {
    state.stats.failed.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(exception = %exc, "failed");
    let id = &request.message.headers.id;
    let task = &request.message.headers.task;
    let fields = exception_fields(&exc, task);
    // A panic is reported by Sentry's panic hook already, inside the task's scope.
    let panicked = exc.exc_type == "RuntimeError" && exc.message().starts_with("task panicked");
    if !panicked {
        report(
            state,
            request,
            &exc,
            fields.get("traceback").and_then(Value::as_str),
        );
    }
    state.events.task("task-failed", id, fields);
    let mut meta = base_meta(state, request, queue, TaskState::Failure, Value::Null);
    meta.result = serde_json::to_value(&exc).unwrap_or(Value::Null);
    meta.traceback = Some(exc.traceback(task));
    meta
}

fn report(_state: &State, request: &Request, exc: &ExceptionInfo, traceback: Option<&str>) {
    let id = &request.message.headers.id;
    crate::telemetry::report_task_failure(
        &request.message.headers.task,
        id,
        &format!("{} {}", request.args_repr, request.kwargs_repr),
        &format!("{}.{}", exc.exc_module, exc.exc_type),
        &exc.message(),
        traceback,
    );
}

/// Runs a prepared task under its time limits, on its own tokio task so a panic is caught.
async fn execute(
    run: PreparedRun,
    ctx: TaskContext,
    soft: Option<Duration>,
    hard: Option<Duration>,
    tracked: &Tracked,
) -> Outcome {
    let watched = ctx.soft.watched.clone();
    let (name, id) = (ctx.name.clone(), ctx.id.clone());
    let start = tokio::time::Instant::now();
    // If this run is abandoned (shutdown deadline), the task is stopped with it rather than left
    // running while its message is redelivered elsewhere.
    let scoped = crate::telemetry::in_task_scope(&name, &id, run(ctx));
    let mut guard = AbortOnDrop(tokio::spawn(scoped.in_current_span()));
    let handle = &mut guard.0;
    let terminated = tracked.terminated();
    tokio::pin!(terminated);
    type Joined =
        std::result::Result<Result<crate::registry::Returned, TaskError>, tokio::task::JoinError>;
    let joined = |r: Joined| match r {
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
            _ = &mut terminated => {
                handle.abort();
                return Outcome::Terminated;
            }
            _ = tokio::time::sleep_until(start + soft) => {
                if !watched.load(Ordering::SeqCst) {
                    handle.abort();
                    return Outcome::SoftLimit(soft.as_secs_f64());
                }
            }
        }
    }
    let deadline = async {
        match hard {
            Some(hard) => tokio::time::sleep_until(start + hard).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = &mut *handle => joined(r),
        _ = &mut terminated => {
            handle.abort();
            Outcome::Terminated
        }
        _ = deadline => {
            handle.abort();
            Outcome::HardLimit(hard.unwrap_or_default().as_secs_f64())
        }
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
pub(super) async fn wait_or_stop<F: std::future::Future>(
    state: &State,
    fut: F,
) -> Option<F::Output> {
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
    request: &Request,
    queue: &str,
    status: TaskState,
    result: Value,
) -> TaskMeta {
    let message = &request.message;
    let mut meta = TaskMeta::new(message.headers.id.clone(), status, result);
    // Celery's clients send the task id as the correlation id too.
    meta.reply_to = message
        .reply_to
        .as_ref()
        .filter(|q| !q.is_empty())
        .map(|q| crate::backend::ReplyTo {
            queue: q.clone(),
            correlation_id: message.headers.id.clone(),
        });
    meta.parent_id = message.headers.parent_id.clone();
    meta.group_id = message.headers.group.clone();
    if state.config.result_extended {
        meta.name = Some(message.headers.task.clone());
        meta.args = Some(request.args.clone());
        meta.kwargs = Some(request.kwargs.clone());
        meta.worker = Some(state.hostname.clone());
        meta.retries = Some(message.headers.retries);
        meta.queue = Some(queue.to_owned());
    }
    meta
}

/// Stores a state, retrying with back-off for as long as the backend is unreachable.
///
/// The delivery is held meanwhile: giving it back would run the task again, and while the
/// backend is down the redelivery could not even tell that it already ran. A shutdown ends the
/// wait at its deadline (the run is abandoned and the message redelivered).
async fn store(state: &State, meta: &TaskMeta) -> Result<()> {
    let mut backoff = Duration::from_millis(100);
    let mut failures = 0u32;
    loop {
        match state.backend().store(meta).await {
            Ok(_) => {
                if failures > 0 {
                    tracing::info!(task_id = %meta.task_id, failures, "result stored after the backend came back");
                }
                return Ok(());
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(task_id = %meta.task_id, error = %e, "result backend unavailable; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Times a message whose earlier starts never finished may be started again before it is
/// dead-lettered as poison (so it runs at most this many times plus one).
pub(crate) const MAX_RESTARTS: u64 = 5;

/// The state of `id`'s stored result if it is a finished one.
async fn finished(state: &State, id: &str) -> Option<TaskState> {
    match state.backend().get(id).await {
        Ok(Some(meta)) if meta.status.is_ready() => Some(meta.status),
        _ => None,
    }
}

/// What the start counter and the stored result say about a message about to run.
enum Start {
    /// Its first start.
    First,
    /// Its `n`-th start (n > 1), and no finished result: an earlier start never finished.
    Again(u64),
    /// Its result is stored, in this finished state: a duplicate.
    Finished(TaskState),
}

/// Counts a start of `message` (its id and retry number; the counter lives a day) and reads its
/// stored result, in one round trip when the coordinator and the result backend are the same
/// Redis database (the worker binary's setup). Redis unreachable counts as a first start: the
/// task runs rather than waits for Redis.
async fn claim_start(state: &State, message: &TaskMessage) -> Start {
    const TTL: Duration = Duration::from_secs(24 * 3600);
    let id = &message.headers.id;
    let key = format!("starts:{id}:{}", message.headers.retries);
    let shared = match state.backend() {
        crate::backend::AnyBackend::Redis(redis) => {
            state
                .coordinator
                .count_and_get(
                    &key,
                    TTL,
                    &redis.connection(),
                    &crate::backend::meta_key(id),
                )
                .await
        }
        _ => None,
    };
    // `done`: the state of a finished stored result.
    let (count, done) = match shared {
        Some(Ok((n, bytes))) => {
            let meta = bytes.and_then(|b| TaskMeta::from_json(&b).ok());
            (Some(n), meta.map(|m| m.status).filter(|s| s.is_ready()))
        }
        Some(Err(e)) => {
            tracing::debug!(error = %e, "cannot count starts");
            (None, None)
        }
        None => {
            let done = finished(state, id).await;
            let count = state.coordinator.count(&key, TTL).await;
            if let Err(e) = &count {
                tracing::debug!(error = %e, "cannot count starts");
            }
            (count.ok(), done)
        }
    };
    match (done, count) {
        (Some(status), _) => Start::Finished(status),
        (None, Some(n)) if n > 1 => Start::Again(n),
        _ => Start::First,
    }
}

/// Gives a message back after a failure of ours (a publish the broker refused or could not
/// take), waiting first so the next delivery does not fail the same way at once, and
/// dead-letters it after [`MAX_REQUEUES`] such failures instead of cycling for ever.
async fn requeue_after_failure(state: &State, delivery: Delivery, what: &str) {
    const MAX_REQUEUES: u64 = 10;
    let id = delivery.message.task_id().unwrap_or("").to_owned();
    let n = state
        .coordinator
        .count(&format!("requeues:{id}"), Duration::from_secs(24 * 3600))
        .await
        .unwrap_or(1);
    if n > MAX_REQUEUES {
        let exc = ExceptionInfo::new("celery.exceptions", "Reject", what.to_owned());
        let reason = format!("{what} failed {n} times");
        return dead_letter(state, delivery, &reason, exc).await;
    }
    let wait = Duration::from_millis(100u64 << n.min(7));
    tracing::warn!(
        what,
        attempt = n,
        ?wait,
        "giving the message back after a failure"
    );
    let _ = wait_or_stop(state, tokio::time::sleep(wait)).await;
    settle(delivery, false).await
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

/// Why a task is stored as REVOKED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Revoked {
    /// Its id was revoked before it started.
    ById,
    /// Its `expires` passed.
    Expired,
    /// It was stopped while running (`revoke --terminate`).
    Terminated,
}

async fn revoke(state: &State, delivery: Delivery, request: &Request, why: Revoked) {
    let queue = delivery.queue.clone();
    match record_revoke(state, &queue, request, why).await {
        Ok(()) => settle(delivery, true).await,
        Err(_) => settle(delivery, false).await,
    }
}

/// [`revoke`] for a task whose message was acknowledged as it started.
async fn revoke_acked(state: &State, queue: &str, request: &Request, why: Revoked) {
    let _ = record_revoke(state, queue, request, why).await;
}

/// Counts, announces and stores a revoke.
async fn record_revoke(state: &State, queue: &str, request: &Request, why: Revoked) -> Result<()> {
    let message = &request.message;
    state.stats.revoked.fetch_add(1, Ordering::Relaxed);
    if why != Revoked::Terminated {
        state
            .metrics
            .completed(&message.headers.task, queue, Metric::Revoked, None);
    }
    tracing::info!(reason = ?why, "revoked; not running it");
    let text = match why {
        Revoked::Expired => "expired",
        Revoked::ById => "revoked",
        Revoked::Terminated => "terminated",
    };
    let mut fields = Map::new();
    fields.insert("terminated".into(), json!(why == Revoked::Terminated));
    fields.insert(
        "signum".into(),
        if why == Revoked::Terminated {
            json!(15)
        } else {
            Value::Null
        },
    );
    fields.insert("expired".into(), json!(why == Revoked::Expired));
    state
        .events
        .task("task-revoked", &message.headers.id, fields);
    let exc = ExceptionInfo::new("celery.exceptions", "TaskRevokedError", text);
    let mut meta = base_meta(state, request, queue, TaskState::Revoked, Value::Null);
    meta.result = serde_json::to_value(&exc).unwrap_or(Value::Null);
    store(state, &meta).await
}

/// Hands a message back to the broker's delay queues to come back after `wait`.
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
            tracing::error!(error = %e, "could not defer a message; requeueing");
            requeue_after_failure(state, delivery, "the deferral").await
        }
    }
}

/// Schedules the next attempt, or returns the FAILURE meta when retries are exhausted.
/// `Ok(None)`: retried, nothing to store (results ignored).
async fn retry(
    state: &State,
    held: &Held,
    request: &Request,
    with: &RetryWith,
) -> Result<Option<TaskMeta>> {
    let message = &request.message;
    let queue = held.queue();
    let retries = message.headers.retries;
    let reason = &with.reason;
    if with.max_retries.is_some_and(|max| retries >= max) {
        tracing::warn!(task_id = %message.headers.id, %reason, "retries exhausted");
        // As Celery's `Task.retry`: the error that caused the retries, else
        // `MaxRetriesExceededError`.
        let exc = with.cause.clone().unwrap_or_else(|| {
            ExceptionInfo::new(
                "celery.exceptions",
                "MaxRetriesExceededError",
                format!(
                    "Can't retry {}[{}]: {} retries used; last error: {reason}",
                    message.headers.task, message.headers.id, retries
                ),
            )
        });
        return Ok(Some(failure(state, request, queue, exc)));
    }
    let wait = with.after.unwrap_or_else(|| with.backoff.delay(retries));
    let eta = state.config.clock.now() + chrono::Duration::from_std(wait).unwrap_or_default();
    let mut next: RawMessage = held.message().clone();
    next.headers
        .insert("retries".into(), Value::from(retries + 1));
    next.headers
        .insert("eta".into(), Value::String(format_datetime(eta)));
    // Before the next attempt exists: sent after, its `task-received` can overtake this event
    // and leave Celery's state at RETRY for a task that went on to succeed. If the publish
    // fails the message is requeued, so the task is retried all the same.
    let exc = with.stored_exception();
    state.events.task(
        "task-retried",
        &message.headers.id,
        exception_fields(&exc, &message.headers.task),
    );
    state
        .broker()
        .publish_delayed(queue, &next, wait)
        .await
        .map_err(|e| Error::Broker(format!("retry publish: {e}")))?;
    state.stats.retried.fetch_add(1, Ordering::Relaxed);
    tracing::info!(task_id = %message.headers.id, %reason, ?wait, retry = retries + 1, "retry scheduled");
    if message.headers.ignore_result
        || state
            .registry
            .options(&message.headers.task)
            .is_some_and(|o| o.ignore_result)
    {
        return Ok(None);
    }
    // Celery stores the exception that caused the retry, with its traceback.
    let mut meta = base_meta(state, request, queue, TaskState::Retry, Value::Null);
    meta.result = serde_json::to_value(&exc).unwrap_or(Value::Null);
    meta.traceback = Some(exc.traceback(&message.headers.task));
    Ok(Some(meta))
}

/// The `task` label of a message: its name once registered, else [`UNREGISTERED_TASK`], so a
/// stray producer cannot add series.
fn task_label<'a>(state: &State, name: &'a str) -> &'a str {
    match state.registry.get(name) {
        Some(_) => name,
        None => UNREGISTERED_TASK,
    }
}

/// Dead-letters bad input with a reason, records FAILURE when the id is known, logs once.
async fn dead_letter(state: &State, delivery: Delivery, reason: &str, exc: ExceptionInfo) {
    let task_id = delivery.message.task_id().map(str::to_owned);
    let task_name = delivery.message.task_name().unwrap_or("unknown").to_owned();
    tracing::warn!(queue = %delivery.queue, task_id = ?task_id, task = %task_name, reason, "dead-lettering a message");
    if let Err(e) = state
        .broker()
        .dead_letter(&delivery.queue, &delivery.message, reason)
        .await
    {
        tracing::error!(error = %e, "could not dead-letter; requeueing in a second");
        // Not at once: the next delivery would most likely fail the same way.
        let _ = wait_or_stop(state, tokio::time::sleep(Duration::from_secs(1))).await;
        return settle(delivery, false).await;
    }
    state.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
    state.metrics.completed(
        task_label(state, &task_name),
        &delivery.queue,
        Metric::DeadLettered,
        None,
    );
    if let Some(id) = task_id {
        let mut fields = Map::new();
        fields.insert("requeue".into(), json!(false));
        state.events.task("task-rejected", &id, fields);
        let mut meta = TaskMeta::exception(id, TaskState::Failure, &exc);
        if let Some(name) = delivery.message.task_name() {
            meta.name = Some(name.to_owned());
        }
        meta.worker = Some(state.hostname.clone());
        meta.queue = Some(delivery.queue.clone());
        if let Err(e) = store(state, &meta).await {
            tracing::warn!(error = %e, "could not record the dead-lettered task's FAILURE");
        }
    }
    settle(delivery, true).await
}
