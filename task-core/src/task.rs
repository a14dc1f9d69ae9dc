//! Typed tasks: a name, typed arguments and result, options, and the error that says what to do
//! next.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use task_core::{Task, TaskContext, TaskError};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Add { x: i64, y: i64 }
//!
//! struct AddTask;
//! impl Task for AddTask {
//!     const NAME: &'static str = "example.add";
//!     type Args = Add;
//!     type Output = i64;
//!     async fn run(&self, _ctx: TaskContext, a: Add) -> Result<i64, TaskError> {
//!         a.x.checked_add(a.y).ok_or_else(|| TaskError::abort("OverflowError", "sum overflows"))
//!     }
//! }
//! ```
//!
//! Arguments arrive as Celery's `(args, kwargs)`. A struct's fields are filled from positional
//! arguments in declaration order and from keyword arguments by name, so Python's
//! `send_task("example.add", (2, 3))` and `send_task("example.add", kwargs={"x": 2, "y": 3})` both
//! work; tuples take positional arguments only.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::backend::{ExceptionInfo, TaskState};
use crate::backoff::{Backoff, RateLimit};
use crate::client::Client;

/// A task type.
pub trait Task: Send + Sync + 'static {
    /// The registered name (the `task` header).
    const NAME: &'static str;
    /// Arguments, decoded from Celery's `(args, kwargs)`.
    type Args: Serialize + DeserializeOwned + Send + 'static;
    /// Return value, stored as the result.
    type Output: Serialize + DeserializeOwned + Send + 'static;

    /// Options used by workers running the task and by clients sending it.
    fn options() -> TaskOptions {
        TaskOptions::default()
    }

    /// Runs the task once.
    fn run(
        &self,
        ctx: TaskContext,
        args: Self::Args,
    ) -> impl Future<Output = Result<Self::Output, TaskError>> + Send;

    /// Called after a success is stored (Celery's `Task.on_success`).
    ///
    /// Hooks are for instrumentation and must be quick: they run on the worker's task, between
    /// storing the result and acknowledging the message. A panic in a hook is caught and logged.
    fn on_success(&self, ctx: &TaskContext, output: &Self::Output) {
        let _ = (ctx, output);
    }

    /// Called after a failure is stored: an error the task returned, a panic, a time limit
    /// (Celery's `Task.on_failure`).
    fn on_failure(&self, ctx: &TaskContext, exception: &ExceptionInfo) {
        let _ = (ctx, exception);
    }

    /// Called when a retry has been scheduled (Celery's `Task.on_retry`).
    fn on_retry(&self, ctx: &TaskContext, exception: &ExceptionInfo) {
        let _ = (ctx, exception);
    }

    /// Called last, whatever the outcome, with the state the run ended in (Celery's
    /// `Task.after_return`).
    fn after_return(&self, ctx: &TaskContext, state: TaskState) {
        let _ = (ctx, state);
    }
}

/// Per-task options. Per-message values (time limits, expiry, priority, queue) override these.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskOptions {
    /// Queue the task is sent to (default `celery`).
    pub queue: Option<String>,
    /// Retries allowed after the first run; `None` = unlimited. Default 3.
    pub max_retries: Option<u32>,
    /// Wait between retries when the task does not say how long.
    pub backoff: Backoff,
    /// Cooperative limit: after it the task is told to stop (see [`TaskContext::soft_time_limit`]).
    pub soft_time_limit: Option<Duration>,
    /// Hard limit: after it the task is abandoned and fails with `TimeLimitExceeded`.
    pub time_limit: Option<Duration>,
    /// Default expiry for sent messages, counted from sending.
    pub expires: Option<Duration>,
    /// Default message priority.
    pub priority: Option<u8>,
    /// Do not store results.
    pub ignore_result: bool,
    /// At most this many starts per second, across every worker sharing the coordinator (per
    /// worker without one). The `rate_limit` control command changes it at run time.
    pub rate_limit: Option<RateLimit>,
    /// Store STARTED when execution begins.
    pub track_started: bool,
    /// Cluster-wide limits per key (a payer, a terminal): waited for before the task takes a
    /// concurrency slot.
    pub key_limits: Vec<KeyLimit>,
    /// Argument names whose values never appear in events, inspect replies, stored results'
    /// extended fields, logs or error reports (they print as `'***'`).
    pub sensitive: Vec<String>,
    /// Acknowledge the message after the result is stored (the default: a worker that dies
    /// mid-run leaves the message to be redelivered). `false` acknowledges just before the task
    /// starts, as Celery's default `task_acks_late=False`: at most one start, and a crash loses it.
    pub acks_late: bool,
    /// When a worker died while running the task (the message comes back after its start): run it
    /// again (`true`, the default here) or store FAILURE `WorkerLostError` and drop it (`false`,
    /// Celery's default `task_reject_on_worker_lost=False`).
    pub reject_on_worker_lost: bool,
    /// Store FAILURE even when results are ignored (Celery's `task_store_errors_even_if_ignored`).
    pub store_errors_even_if_ignored: bool,
    /// Errors that are retried automatically (Celery's `autoretry_for`).
    pub autoretry: Option<AutoRetry>,
}

/// Automatic retries for errors of some kinds, as Celery's `autoretry_for`, `retry_kwargs`,
/// `retry_backoff`, `retry_backoff_max`, `retry_jitter` and `dont_autoretry_for`.
///
/// It applies to [`TaskError::Failed`] (an error the task raised), never to
/// [`TaskError::Abort`] (a failure the task says is permanent). Kinds are matched by name: the
/// exception type (`ConnectionError`) or the qualified name (`billing.GatewayTimeout`);
/// `Exception` matches every kind, as catching `Exception` does in Python.
///
/// ```
/// use std::time::Duration;
/// use task_core::task::{AutoRetry, TaskOptions};
///
/// let options = TaskOptions::default().autoretry(
///     AutoRetry::on(["ConnectionError", "TimeoutError"])
///         .max_retries(Some(5))
///         .backoff(Duration::from_secs(2), Duration::from_secs(120)),
/// );
/// # let _ = options;
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AutoRetry {
    /// Kinds retried.
    pub on: Vec<String>,
    /// Kinds never retried even when `on` matches (`dont_autoretry_for`).
    pub except: Vec<String>,
    /// Retry budget for these retries; `None` keeps the task's `max_retries`.
    pub max_retries: Option<Option<u32>>,
    /// Wait between these retries; `None` uses the task's back-off.
    pub backoff: Option<Backoff>,
}

impl AutoRetry {
    /// Retries errors of these kinds.
    pub fn on<I, S>(kinds: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        AutoRetry {
            on: kinds.into_iter().map(Into::into).collect(),
            except: Vec::new(),
            max_retries: None,
            backoff: None,
        }
    }

    /// Never retries these kinds (Celery's `dont_autoretry_for`).
    pub fn except<I, S>(mut self, kinds: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.except.extend(kinds.into_iter().map(Into::into));
        self
    }

    /// Sets the retry budget for these errors (`retry_kwargs={'max_retries': n}`).
    pub fn max_retries(mut self, n: Option<u32>) -> Self {
        self.max_retries = Some(n);
        self
    }

    /// Exponential back-off with jitter: the `n`-th retry waits about `min(max, factor × 2ⁿ)`
    /// (Celery's `retry_backoff=factor`, `retry_backoff_max=max`, `retry_jitter=True`).
    pub fn backoff(mut self, factor: Duration, max: Duration) -> Self {
        self.backoff = Some(Backoff {
            base: factor,
            max,
            jitter: true,
        });
        self
    }

    /// Sets the back-off exactly.
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = Some(backoff);
        self
    }

    /// Whether an error of this kind is retried.
    pub fn matches(&self, exception: &ExceptionInfo) -> bool {
        let qualified = format!("{}.{}", exception.exc_module, exception.exc_type);
        let hit = |kinds: &[String]| {
            kinds
                .iter()
                .any(|k| *k == exception.exc_type || *k == qualified)
        };
        let any = self
            .on
            .iter()
            .any(|k| k == "Exception" || k == "builtins.Exception");
        (any || hit(&self.on)) && !hit(&self.except)
    }
}

/// Which key a [`KeyLimit`] counts against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    /// The value of the named argument (keyword, or positional by field order): one key per
    /// distinct value, e.g. one per payer.
    Arg(String),
    /// One fixed key, e.g. a gateway terminal shared by several task types.
    Fixed(String),
}

/// A cluster-wide limit on a task type per key.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyLimit {
    /// The key.
    pub key: LimitKey,
    /// At most this many starts per second per key.
    pub rate: Option<RateLimit>,
    /// At most this many running at once per key.
    pub concurrency: Option<u32>,
}

impl KeyLimit {
    /// A limit keyed by the value of argument `name`.
    pub fn by_arg(name: impl Into<String>) -> Self {
        KeyLimit {
            key: LimitKey::Arg(name.into()),
            rate: None,
            concurrency: None,
        }
    }
    /// A limit on one fixed key.
    pub fn fixed(key: impl Into<String>) -> Self {
        KeyLimit {
            key: LimitKey::Fixed(key.into()),
            rate: None,
            concurrency: None,
        }
    }
    /// Sets the rate per key.
    pub fn rate(mut self, rate: RateLimit) -> Self {
        self.rate = Some(rate);
        self
    }
    /// Sets the concurrency per key.
    pub fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = Some(n.max(1));
        self
    }
}

impl Default for TaskOptions {
    fn default() -> Self {
        TaskOptions {
            queue: None,
            max_retries: Some(3),
            backoff: Backoff::default(),
            soft_time_limit: None,
            time_limit: None,
            expires: None,
            priority: None,
            ignore_result: false,
            rate_limit: None,
            track_started: false,
            key_limits: Vec::new(),
            sensitive: Vec::new(),
            acks_late: true,
            reject_on_worker_lost: true,
            store_errors_even_if_ignored: false,
            autoretry: None,
        }
    }
}

impl TaskOptions {
    /// Sets the default queue.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }
    /// Sets the retry budget (`None` = unlimited).
    pub fn max_retries(mut self, n: Option<u32>) -> Self {
        self.max_retries = n;
        self
    }
    /// Sets the retry back-off.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }
    /// Sets the soft and hard time limits.
    pub fn time_limits(mut self, soft: Option<Duration>, hard: Option<Duration>) -> Self {
        self.soft_time_limit = soft;
        self.time_limit = hard;
        self
    }
    /// Sets the default expiry.
    pub fn expires(mut self, after: Duration) -> Self {
        self.expires = Some(after);
        self
    }
    /// Sets the default priority.
    pub fn priority(mut self, p: u8) -> Self {
        self.priority = Some(p);
        self
    }
    /// Stops results from being stored.
    pub fn ignore_result(mut self, yes: bool) -> Self {
        self.ignore_result = yes;
        self
    }
    /// Sets the rate limit (cluster-wide with a coordinator).
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = Some(limit);
        self
    }
    /// Adds a cluster-wide limit per key.
    pub fn key_limit(mut self, limit: KeyLimit) -> Self {
        self.key_limits.push(limit);
        self
    }
    /// Marks arguments as sensitive (see [`TaskOptions::sensitive`]).
    pub fn sensitive<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.sensitive.extend(names.into_iter().map(Into::into));
        self
    }
    /// Stores STARTED when execution begins.
    pub fn track_started(mut self, yes: bool) -> Self {
        self.track_started = yes;
        self
    }
    /// Waits `delay` before every retry that does not say how long (Celery's
    /// `default_retry_delay`; without it the back-off grows from 1 s).
    pub fn default_retry_delay(mut self, delay: Duration) -> Self {
        self.backoff = Backoff {
            base: delay,
            max: delay,
            jitter: false,
        };
        self
    }
    /// Acknowledges after the result is stored (`true`, the default) or just before the task
    /// starts (`false`, Celery's default); see [`TaskOptions::acks_late`].
    pub fn acks_late(mut self, yes: bool) -> Self {
        self.acks_late = yes;
        self
    }
    /// Runs a task again after its worker died mid-run (`true`, the default) or stores FAILURE
    /// `WorkerLostError` (`false`); see [`TaskOptions::reject_on_worker_lost`].
    pub fn reject_on_worker_lost(mut self, yes: bool) -> Self {
        self.reject_on_worker_lost = yes;
        self
    }
    /// Stores failures even when results are ignored.
    pub fn store_errors_even_if_ignored(mut self, yes: bool) -> Self {
        self.store_errors_even_if_ignored = yes;
        self
    }
    /// Retries errors of some kinds automatically (see [`AutoRetry`]).
    pub fn autoretry(mut self, policy: AutoRetry) -> Self {
        self.autoretry = Some(policy);
        self
    }
}

/// How a task run ended when it did not succeed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TaskError {
    /// A temporary failure: run the task again later (after `after`, or the task's back-off), while
    /// retries remain.
    #[error("retry requested: {reason}")]
    Retry {
        /// Why (stored with the RETRY state).
        reason: String,
        /// How long to wait; `None` uses the task's back-off.
        after: Option<Duration>,
        /// The error that caused the retry, stored with RETRY and, once retries run out, with
        /// FAILURE (Celery's `self.retry(exc=…)`); `None` stores Celery's `Retry`.
        cause: Option<ExceptionInfo>,
    },
    /// An error the task raised: FAILURE, unless the task's [`AutoRetry`] policy retries this
    /// kind (Python's uncaught exception).
    #[error("{kind}: {message}")]
    Failed {
        /// Exception type Python sees (`ConnectionError`, or `module.Name`).
        kind: String,
        /// Message.
        message: String,
    },
    /// A permanent failure: store FAILURE and never retry (a declined card, invalid input).
    #[error("{kind}: {message}")]
    Abort {
        /// Exception type Python sees (`ValueError`, or `module.Name`).
        kind: String,
        /// Message.
        message: String,
    },
}

impl TaskError {
    /// A retry after the task's back-off.
    pub fn retry(reason: impl Into<String>) -> Self {
        TaskError::Retry {
            reason: reason.into(),
            after: None,
            cause: None,
        }
    }

    /// A retry after a given wait.
    pub fn retry_after(after: Duration, reason: impl Into<String>) -> Self {
        TaskError::Retry {
            reason: reason.into(),
            after: Some(after),
            cause: None,
        }
    }

    /// A retry caused by an error of `kind` (Celery's `self.retry(exc=Kind(message))`): RETRY is
    /// stored with that exception, and when retries run out the task fails with it.
    pub fn retry_because(kind: impl Into<String>, message: impl Into<String>) -> Self {
        let message = message.into();
        TaskError::Retry {
            cause: Some(exception_of(&kind.into(), &message)),
            reason: message,
            after: None,
        }
    }

    /// An error the task raised, retried when the task's [`AutoRetry`] policy names its kind.
    pub fn fail(kind: impl Into<String>, message: impl Into<String>) -> Self {
        TaskError::Failed {
            kind: kind.into(),
            message: message.into(),
        }
    }

    /// Sets the wait of a retry (no effect on other errors).
    pub fn after(mut self, wait: Duration) -> Self {
        if let TaskError::Retry { after, .. } = &mut self {
            *after = Some(wait);
        }
        self
    }

    /// A permanent failure with an exception type and message.
    pub fn abort(kind: impl Into<String>, message: impl Into<String>) -> Self {
        TaskError::Abort {
            kind: kind.into(),
            message: message.into(),
        }
    }

    /// The exception stored in the result backend for this error.
    ///
    /// A kind without a module is a Python built-in (`ValueError` is `builtins.ValueError`, which
    /// Python's `AsyncResult.get()` raises as `ValueError`); `module.Name` keeps its module, and
    /// Python raises that class when the module is imported, else a class of that name it makes
    /// up under `celery.exceptions`.
    pub fn exception(&self) -> ExceptionInfo {
        match self {
            TaskError::Retry {
                cause: Some(cause), ..
            } => cause.clone(),
            TaskError::Retry { reason, .. } => {
                ExceptionInfo::new("celery.exceptions", "Retry", reason.clone())
            }
            TaskError::Abort { kind, message } | TaskError::Failed { kind, message } => {
                exception_of(kind, message)
            }
        }
    }
}

/// The exception for a kind (`ValueError`, `module.Name`) and a message.
fn exception_of(kind: &str, message: &str) -> ExceptionInfo {
    match kind.rsplit_once('.') {
        Some((module, name)) => ExceptionInfo::new(module, name, message),
        None => ExceptionInfo::new("builtins", kind, message),
    }
}

/// What a running task knows about itself, and its way to send more tasks.
#[derive(Clone)]
pub struct TaskContext {
    /// Task id (stable across retries and redeliveries).
    pub id: String,
    /// Task name.
    pub name: String,
    /// Retries so far (0 on the first run).
    pub retries: u32,
    /// Retry budget (`None` = unlimited).
    pub max_retries: Option<u32>,
    /// Whether the broker delivered this message before (a previous worker may have run it).
    pub redelivered: bool,
    /// Queue the message came from.
    pub queue: String,
    /// Workflow root id.
    pub root_id: Option<String>,
    /// Parent task id.
    pub parent_id: Option<String>,
    /// The message's ETA, if it had one.
    pub eta: Option<DateTime<Utc>>,
    /// The message's expiry, if any.
    pub expires: Option<DateTime<Utc>>,
    /// Worker node name.
    pub hostname: String,
    pub(crate) client: Client,
    pub(crate) soft: SoftLimit,
    pub(crate) coordinator: Option<crate::coord::Coordinator>,
    /// Ids of the tasks sent with [`crate::client::Call::parent`] during the run: the
    /// `children` stored with the result.
    pub(crate) children: Arc<Mutex<Vec<String>>>,
}

impl std::fmt::Debug for TaskContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskContext")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("retries", &self.retries)
            .field("redelivered", &self.redelivered)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

/// The soft time limit of one run.
#[derive(Clone, Debug, Default)]
pub(crate) struct SoftLimit {
    pub(crate) deadline: Option<tokio::time::Instant>,
    pub(crate) watched: Arc<AtomicBool>,
}

impl TaskContext {
    /// The cluster-wide coordinator the worker shares with its peers (Redis), for idempotency
    /// keys, per-key locks and limits inside a task; `None` when the worker runs without one.
    pub fn coordinator(&self) -> Option<&crate::coord::Coordinator> {
        self.coordinator.as_ref()
    }

    /// A client to send further tasks with (shares the worker's connections).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Resolves when the soft time limit passes (never, if there is none).
    ///
    /// Calling this tells the worker the task handles its soft limit: it is then left to finish
    /// (until the hard limit) after the soft limit passes. A task that never calls it is stopped at
    /// the soft limit and fails with `SoftTimeLimitExceeded`, which is what an uncaught
    /// `SoftTimeLimitExceeded` does in Celery.
    pub fn soft_time_limit(&self) -> impl Future<Output = ()> + Send + 'static {
        self.soft.watched.store(true, Ordering::SeqCst);
        let deadline = self.soft.deadline;
        async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        }
    }

    /// Whether a failure now would exhaust the retry budget.
    pub fn is_last_attempt(&self) -> bool {
        self.max_retries.is_some_and(|max| self.retries >= max)
    }
}

/// Fills a task's arguments from Celery's positional and keyword arguments.
pub fn decode_args<A: DeserializeOwned>(
    args: Vec<Value>,
    kwargs: Map<String, Value>,
) -> Result<A, String> {
    if kwargs.is_empty() {
        let empty = args.is_empty();
        return match serde_json::from_value(Value::Array(args)) {
            Ok(a) => Ok(a),
            Err(e) if empty => serde_json::from_value(Value::Null)
                .or_else(|_| serde_json::from_value(Value::Object(Map::new())))
                .map_err(|_| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
    }
    if args.is_empty() {
        return serde_json::from_value(Value::Object(kwargs)).map_err(|e| e.to_string());
    }
    let fields = field_names::<A>().ok_or_else(|| {
        "positional and keyword arguments were both given, but this task takes positional \
         arguments only"
            .to_owned()
    })?;
    if args.len() > fields.len() {
        return Err(format!(
            "takes {} arguments but {} were given",
            fields.len(),
            args.len() + kwargs.len()
        ));
    }
    let mut merged = Map::new();
    for (name, value) in fields.iter().zip(args) {
        merged.insert((*name).to_owned(), value);
    }
    for (name, value) in kwargs {
        if merged.contains_key(&name) {
            return Err(format!("got multiple values for argument `{name}`"));
        }
        merged.insert(name, value);
    }
    serde_json::from_value(Value::Object(merged)).map_err(|e| e.to_string())
}

/// Encodes a task's arguments as Celery's `(args, kwargs)`: a sequence becomes positional
/// arguments, a struct or map keyword arguments, `()` nothing, anything else one positional argument.
pub fn encode_args<A: Serialize>(args: &A) -> Result<(Vec<Value>, Map<String, Value>), String> {
    match serde_json::to_value(args).map_err(|e| e.to_string())? {
        Value::Array(items) => Ok((items, Map::new())),
        Value::Object(map) => Ok((Vec::new(), map)),
        Value::Null => Ok((Vec::new(), Map::new())),
        other => Ok((vec![other], Map::new())),
    }
}

/// The field names of a struct type, found by asking its `Deserialize` impl.
pub(crate) fn field_names<A: DeserializeOwned>() -> Option<&'static [&'static str]> {
    use serde::de::{self, Visitor};
    struct Probe(Option<&'static [&'static str]>);
    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("probe")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<T: std::fmt::Display>(_: T) -> Self {
            Stop
        }
    }
    impl<'de> de::Deserializer<'de> for &mut Probe {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.0 = Some(fields);
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut probe = Probe(None);
    let _ = A::deserialize(&mut probe);
    probe.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Xy {
        x: i64,
        y: i64,
    }

    fn kw(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn structs_take_positional_keyword_or_mixed_arguments() {
        assert_eq!(
            decode_args::<Xy>(vec![json!(1), json!(2)], Map::new()),
            Ok(Xy { x: 1, y: 2 })
        );
        assert_eq!(
            decode_args::<Xy>(vec![], kw(json!({"y": 2, "x": 1}))),
            Ok(Xy { x: 1, y: 2 })
        );
        assert_eq!(
            decode_args::<Xy>(vec![json!(1)], kw(json!({"y": 2}))),
            Ok(Xy { x: 1, y: 2 })
        );
    }

    #[test]
    fn wrong_shapes_are_explained() {
        assert!(
            decode_args::<Xy>(vec![json!(1)], Map::new())
                .unwrap_err()
                .contains("invalid length")
        );
        assert!(
            decode_args::<Xy>(vec![json!("a"), json!(2)], Map::new())
                .unwrap_err()
                .contains("invalid type")
        );
        assert!(decode_args::<Xy>(vec![json!(1), json!(2), json!(3)], Map::new()).is_err());
        assert!(
            decode_args::<Xy>(vec![json!(1)], kw(json!({"x": 2})))
                .unwrap_err()
                .contains("multiple values")
        );
        assert!(
            decode_args::<(i64, i64)>(vec![json!(1)], kw(json!({"y": 2})))
                .unwrap_err()
                .contains("positional")
        );
    }

    #[test]
    fn unit_and_tuples() {
        assert_eq!(decode_args::<()>(vec![], Map::new()), Ok(()));
        assert_eq!(
            decode_args::<(i64, String)>(vec![json!(1), json!("a")], Map::new()),
            Ok((1, "a".into()))
        );
        assert_eq!(
            encode_args(&(1, 2)).unwrap(),
            (vec![json!(1), json!(2)], Map::new())
        );
        assert_eq!(
            encode_args(&Xy { x: 1, y: 2 }).unwrap(),
            (vec![], kw(json!({"x": 1, "y": 2})))
        );
        assert_eq!(encode_args(&()).unwrap(), (vec![], Map::new()));
    }

    #[test]
    fn errors_map_to_python_exceptions() {
        let e = TaskError::abort("ValueError", "bad").exception();
        assert_eq!(
            (e.exc_module.as_str(), e.exc_type.as_str()),
            ("builtins", "ValueError")
        );
        let e = TaskError::abort("billing.CardDeclined", "5051").exception();
        assert_eq!(
            (e.exc_module.as_str(), e.exc_type.as_str()),
            ("billing", "CardDeclined")
        );
    }
}
