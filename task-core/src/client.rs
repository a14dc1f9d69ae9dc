//! Sending tasks and reading their results.
//!
//! ```no_run
//! # async fn demo() -> task_core::Result<()> {
//! use std::time::Duration;
//! use task_core::{Client, diag};
//!
//! let client = Client::connect("amqp://guest:guest@127.0.0.1:5672/%2f", "redis://127.0.0.1:6379/0").await?;
//! let sum = client
//!     .task::<diag::Add>(diag::AddArgs::new(2, 3))
//!     .countdown(Duration::from_secs(5))
//!     .send()
//!     .await?
//!     .get(Duration::from_secs(30))
//!     .await?;
//! assert_eq!(sum, 5.into());
//! # Ok(()) }
//! ```

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::backend::{AnyBackend, ResultBackend, TaskMeta, TaskState};
use crate::broker::{AnyBroker, Broker};
use crate::error::{Error, Result};
use crate::protocol::{ContentType, TaskMessage};
use crate::task::{Task, TaskOptions, encode_args};

/// The queue tasks go to when nothing else says: Celery's default.
pub const DEFAULT_QUEUE: &str = "celery";

/// Sends tasks and reads results. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    broker: AnyBroker,
    backend: AnyBackend,
    default_queue: String,
    serializer: ContentType,
    origin: String,
    sent_events: Option<crate::events::Events>,
    routes: Routes,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("broker", &self.inner.broker)
            .field("backend", &self.inner.backend)
            .field("default_queue", &self.inner.default_queue)
            .finish()
    }
}

impl Client {
    /// A client on an existing broker and backend.
    pub fn new(broker: impl Into<AnyBroker>, backend: impl Into<AnyBackend>) -> Self {
        Client {
            inner: Arc::new(ClientInner {
                broker: broker.into(),
                backend: backend.into(),
                default_queue: DEFAULT_QUEUE.to_owned(),
                serializer: ContentType::Json,
                origin: format!("gen{}@{}", std::process::id(), crate::hostname()),
                sent_events: None,
                routes: Routes::default(),
            }),
        }
    }

    /// Connects to a broker and a backend by URL (`amqp://`, `redis://`, `memory://`).
    pub async fn connect(broker_url: &str, backend_url: &str) -> Result<Self> {
        let broker = AnyBroker::connect(broker_url).await?;
        let backend = AnyBackend::connect_with_broker(backend_url, &broker).await?;
        Ok(Client::new(broker, backend))
    }

    fn with(&self, f: impl FnOnce(&mut ClientInner)) -> Self {
        let mut inner = ClientInner {
            broker: self.inner.broker.clone(),
            backend: self.inner.backend.clone(),
            default_queue: self.inner.default_queue.clone(),
            serializer: self.inner.serializer,
            origin: self.inner.origin.clone(),
            sent_events: self.inner.sent_events.clone(),
            routes: self.inner.routes.clone(),
        };
        f(&mut inner);
        Client {
            inner: Arc::new(inner),
        }
    }

    /// A client sending to `queue` when neither the call nor the task names one.
    pub fn with_default_queue(&self, queue: impl Into<String>) -> Self {
        let queue = queue.into();
        self.with(|i| i.default_queue = queue)
    }

    /// A client that picks the queue of a task by its name (Celery's `task_routes`) when the call
    /// and the task name none.
    ///
    /// ```
    /// # async fn demo(client: task_core::Client) {
    /// use task_core::client::Routes;
    /// let client = client.with_routes(
    ///     Routes::new().route("billing.*", "billing").route("diag.sleep", "slow"),
    /// );
    /// # let _ = client; }
    /// ```
    pub fn with_routes(&self, routes: Routes) -> Self {
        self.with(|i| i.routes = routes)
    }

    /// The queue a task of this name goes to when the call and the task name none: the first
    /// matching route, else the default queue.
    pub fn queue_for(&self, task: &str) -> &str {
        self.inner
            .routes
            .queue_for(task)
            .unwrap_or(&self.inner.default_queue)
    }

    /// A client encoding bodies with `serializer`.
    pub fn with_serializer(&self, serializer: ContentType) -> Self {
        self.with(|i| i.serializer = serializer)
    }

    /// A client that sends a `task-sent` event for every task it publishes (Celery's
    /// `task_send_sent_event`), as node `gen<pid>@<host>`. Events go to RabbitMQ's `celeryev`
    /// exchange; with the in-memory broker there is nowhere to send them. Call inside a runtime.
    pub fn with_sent_events(&self) -> Self {
        let events = crate::events::Events::start(
            crate::events::EventSink::for_broker(&self.inner.broker),
            self.inner.origin.clone(),
            true,
        );
        self.with(|i| i.sent_events = Some(events))
    }

    /// Revokes tasks everywhere: stored in the coordinator of the result backend's Redis (so
    /// workers that start later or are disconnected now still discard them) and broadcast to the
    /// workers that are up; with `terminate` a running one is stopped. Python's
    /// `app.control.revoke` reaches the same workers, without the stored copy.
    pub async fn revoke(&self, ids: &[String], terminate: bool, ttl: Duration) -> Result<()> {
        match &self.inner.backend {
            AnyBackend::Redis(redis) => {
                let coordinator = crate::coord::Coordinator::from_backend(redis);
                self.revoke_in(&coordinator, ids, terminate, ttl).await
            }
            AnyBackend::Memory(_) | AnyBackend::Rpc(_) => {
                self.revoke_in(&crate::coord::Coordinator::memory(), ids, terminate, ttl)
                    .await
            }
        }
    }

    /// [`Client::revoke`] with the revoke stored in `coordinator` (one with another key prefix).
    pub async fn revoke_in(
        &self,
        coordinator: &crate::coord::Coordinator,
        ids: &[String],
        terminate: bool,
        ttl: Duration,
    ) -> Result<()> {
        coordinator.revoke(ids, ttl).await?;
        if let AnyBroker::Amqp(amqp) = &self.inner.broker {
            crate::control::cast(
                amqp,
                "revoke",
                serde_json::json!({"task_id": ids, "terminate": terminate, "signal": "SIGTERM"}),
                None,
            )
            .await?;
        }
        Ok(())
    }

    /// The node name put in `origin` (`gen<pid>@<host>`).
    pub(crate) fn origin(&self) -> &str {
        &self.inner.origin
    }

    /// The body encoding used when a call names none.
    pub(crate) fn serializer(&self) -> ContentType {
        self.inner.serializer
    }

    /// The queue used when a call names none.
    pub(crate) fn default_queue(&self) -> &str {
        &self.inner.default_queue
    }

    /// The broker.
    pub fn broker(&self) -> &AnyBroker {
        &self.inner.broker
    }

    /// The result backend.
    pub fn backend(&self) -> &AnyBackend {
        &self.inner.backend
    }

    /// Starts a typed call of `T` (options default to `T::options()`).
    pub fn task<T: Task>(&self, args: T::Args) -> Call<'_, T::Output> {
        let options = T::options();
        let mut call = self.call_with(T::NAME, encode_args(&args), &options);
        call.options.queue = options.queue.clone();
        call.sensitive = options.sensitive.clone();
        call.fields = crate::task::field_names::<T::Args>();
        call
    }

    /// Starts an untyped call by name, as Python's `send_task` (the result is any JSON value).
    pub fn send_task(
        &self,
        name: &str,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
    ) -> Call<'_, Value> {
        self.call_with(name, Ok((args, kwargs)), &TaskOptions::default())
    }

    fn call_with<O>(
        &self,
        name: &str,
        args: std::result::Result<(Vec<Value>, Map<String, Value>), String>,
        options: &TaskOptions,
    ) -> Call<'_, O> {
        Call {
            client: self,
            name: name.to_owned(),
            args,
            options: SendOptions {
                expires: options.expires.map(|d| Utc::now() + d),
                priority: options.priority,
                soft_time_limit: options.soft_time_limit,
                time_limit: options.time_limit,
                ignore_result: options.ignore_result,
                ..SendOptions::default()
            },
            sensitive: Vec::new(),
            fields: None,
            siblings: None,
            _output: PhantomData,
        }
    }

    /// Publishes a prepared message to `queue`; a future ETA is kept by the broker.
    pub async fn publish(&self, queue: &str, message: &TaskMessage) -> Result<()> {
        let raw = message.encode()?;
        let delay = message
            .headers
            .eta
            .and_then(|eta| (eta - Utc::now()).to_std().ok())
            .filter(|d| !d.is_zero());
        match delay {
            Some(delay) => self.inner.broker.publish_delayed(queue, &raw, delay).await,
            None => self.inner.broker.publish(queue, &raw).await,
        }
    }

    /// A handle on the result of a task id.
    pub fn result<O>(&self, task_id: impl Into<String>) -> AsyncResult<O> {
        AsyncResult {
            id: task_id.into(),
            backend: self.inner.backend.clone(),
            _output: PhantomData,
        }
    }
}

/// Which queue each task name goes to, as Celery's `task_routes`: glob patterns (`*` any run of
/// characters, `?` one character) tried in order, the first match wins.
///
/// An explicit [`Call::queue`] and a task's own [`TaskOptions::queue`] take precedence, as
/// `apply_async(queue=…)` and `Task.queue` do in Celery.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    routes: Vec<(String, String)>,
}

impl Routes {
    /// No routes: everything goes to the default queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends tasks whose name matches `pattern` to `queue`.
    pub fn route(mut self, pattern: impl Into<String>, queue: impl Into<String>) -> Self {
        self.routes.push((pattern.into(), queue.into()));
        self
    }

    /// The queue of the first route matching `task`.
    pub fn queue_for(&self, task: &str) -> Option<&str> {
        self.routes
            .iter()
            .find(|(pattern, _)| glob_match(pattern.as_bytes(), task.as_bytes()))
            .map(|(_, queue)| queue.as_str())
    }
}

/// Shell-style matching with `*` and `?` (what Celery's `task_routes` globs use in practice).
fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Per-call options, as Celery's `apply_async`.
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    /// Task id (default: a new UUID).
    pub task_id: Option<String>,
    /// Queue.
    pub queue: Option<String>,
    /// Do not run before.
    pub eta: Option<DateTime<Utc>>,
    /// Discard after.
    pub expires: Option<DateTime<Utc>>,
    /// Message priority.
    pub priority: Option<u8>,
    /// Body encoding (default: the client's).
    pub serializer: Option<ContentType>,
    /// Soft time limit.
    pub soft_time_limit: Option<Duration>,
    /// Hard time limit.
    pub time_limit: Option<Duration>,
    /// Do not store the result.
    pub ignore_result: bool,
    /// Parent task id (sets `parent_id`; `root_id` follows `root_id`).
    pub parent_id: Option<String>,
    /// Workflow root id.
    pub root_id: Option<String>,
}

/// A call being prepared; [`Call::send`] publishes it.
#[must_use = "a call does nothing until it is sent"]
pub struct Call<'a, O> {
    client: &'a Client,
    name: String,
    args: std::result::Result<(Vec<Value>, Map<String, Value>), String>,
    options: SendOptions,
    sensitive: Vec<String>,
    fields: Option<&'static [&'static str]>,
    /// The sending task's list of children, when sent with [`Call::parent`].
    siblings: Option<Arc<std::sync::Mutex<Vec<String>>>>,
    _output: PhantomData<fn() -> O>,
}

impl<O> std::fmt::Debug for Call<'_, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call")
            .field("name", &self.name)
            .field("options", &self.options)
            .finish()
    }
}

impl<'a, O> Call<'a, O> {
    /// Runs no earlier than `delay` from now.
    pub fn countdown(mut self, delay: Duration) -> Self {
        self.options.eta = chrono::Duration::from_std(delay)
            .ok()
            .map(|d| Utc::now() + d);
        self
    }
    /// Runs no earlier than `eta`.
    pub fn eta(mut self, eta: DateTime<Utc>) -> Self {
        self.options.eta = Some(eta);
        self
    }
    /// Discarded as REVOKED if not started within `after`.
    pub fn expires_in(mut self, after: Duration) -> Self {
        self.options.expires = chrono::Duration::from_std(after)
            .ok()
            .map(|d| Utc::now() + d);
        self
    }
    /// Discarded as REVOKED if not started by `at`.
    pub fn expires_at(mut self, at: DateTime<Utc>) -> Self {
        self.options.expires = Some(at);
        self
    }
    /// Message priority (effective on queues declared with `x-max-priority`).
    pub fn priority(mut self, priority: u8) -> Self {
        self.options.priority = Some(priority);
        self
    }
    /// Target queue.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.options.queue = Some(queue.into());
        self
    }
    /// Task id, for idempotent sending (the same id is the same task).
    pub fn task_id(mut self, id: impl Into<String>) -> Self {
        self.options.task_id = Some(id.into());
        self
    }
    /// Body encoding.
    pub fn serializer(mut self, serializer: ContentType) -> Self {
        self.options.serializer = Some(serializer);
        self
    }
    /// Soft and hard time limits for this message.
    pub fn time_limits(mut self, soft: Option<Duration>, hard: Option<Duration>) -> Self {
        self.options.soft_time_limit = soft;
        self.options.time_limit = hard;
        self
    }
    /// Do not store the result.
    pub fn ignore_result(mut self, yes: bool) -> Self {
        self.options.ignore_result = yes;
        self
    }
    /// Marks the call as sent by another task: it becomes one of that task's `children` in its
    /// stored result (as a task applied inside a Celery task is).
    pub fn parent(mut self, ctx: &crate::TaskContext) -> Self {
        self.options.parent_id = Some(ctx.id.clone());
        self.options.root_id = ctx.root_id.clone().or_else(|| Some(ctx.id.clone()));
        self.siblings = Some(ctx.children.clone());
        self
    }
    /// Replaces every option at once.
    pub fn options(mut self, options: SendOptions) -> Self {
        self.options = options;
        self
    }

    /// The message this call will publish.
    pub fn message(&self) -> Result<TaskMessage> {
        let (args, kwargs) = self.args.clone().map_err(Error::Serialization)?;
        self.message_of(args, kwargs)
    }

    fn message_of(&self, args: Vec<Value>, kwargs: Map<String, Value>) -> Result<TaskMessage> {
        let id = self
            .options
            .task_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let mut m = TaskMessage::new(self.name.clone(), id);
        let h = &mut m.headers;
        let (shown_args, shown_kwargs) =
            crate::redact::redact(&args, &kwargs, &self.sensitive, self.fields);
        h.argsrepr = Some(crate::events::repr::args_repr(&shown_args));
        h.kwargsrepr = Some(crate::events::repr::kwargs_repr(&shown_kwargs));
        h.origin = Some(self.client.inner.origin.clone());
        h.eta = self.options.eta;
        h.expires = self.options.expires;
        h.soft_time_limit = self.options.soft_time_limit.map(|d| d.as_secs_f64());
        h.time_limit = self.options.time_limit.map(|d| d.as_secs_f64());
        h.ignore_result = self.options.ignore_result;
        h.parent_id = self.options.parent_id.clone();
        if let Some(root) = &self.options.root_id {
            h.root_id = Some(root.clone());
        }
        m.args = args;
        m.kwargs = kwargs;
        m.priority = self.options.priority;
        m.content_type = self
            .options
            .serializer
            .unwrap_or(self.client.inner.serializer);
        Ok(m)
    }

    /// Publishes the call (waiting for the broker's confirm) and returns a handle on its result.
    pub async fn send(mut self) -> Result<AsyncResult<O>> {
        let (args, kwargs) = std::mem::replace(&mut self.args, Ok(Default::default()))
            .map_err(Error::Serialization)?;
        let message = self.message_of(args, kwargs)?;
        let queue = match self.options.queue.as_deref() {
            Some(queue) => queue,
            None => self.client.queue_for(&self.name),
        };
        self.client.publish(queue, &message).await?;
        if let Some(children) = &self.siblings {
            children
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(message.headers.id.clone());
        }
        if let Some(events) = &self.client.inner.sent_events {
            let h = &message.headers;
            let mut f = Map::new();
            f.insert("root_id".into(), serde_json::json!(h.root_id));
            f.insert("parent_id".into(), serde_json::json!(h.parent_id));
            f.insert("name".into(), h.task.clone().into());
            f.insert("args".into(), serde_json::json!(h.argsrepr));
            f.insert("kwargs".into(), serde_json::json!(h.kwargsrepr));
            f.insert("retries".into(), serde_json::json!(h.retries));
            f.insert(
                "eta".into(),
                serde_json::json!(h.eta.map(crate::protocol::format_datetime)),
            );
            f.insert(
                "expires".into(),
                serde_json::json!(h.expires.map(crate::protocol::format_datetime)),
            );
            f.insert("queue".into(), queue.into());
            f.insert("exchange".into(), "".into());
            f.insert("routing_key".into(), queue.into());
            events.task("task-sent", &h.id, f);
        }
        Ok(self.client.result(message.headers.id))
    }
}

/// A handle on a task's result.
pub struct AsyncResult<O> {
    id: String,
    backend: AnyBackend,
    _output: PhantomData<fn() -> O>,
}

impl<O> std::fmt::Debug for AsyncResult<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncResult").field("id", &self.id).finish()
    }
}

impl<O> Clone for AsyncResult<O> {
    fn clone(&self) -> Self {
        AsyncResult {
            id: self.id.clone(),
            backend: self.backend.clone(),
            _output: PhantomData,
        }
    }
}

impl<O: DeserializeOwned> AsyncResult<O> {
    /// The task id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The current state (PENDING when nothing is stored).
    pub async fn state(&self) -> Result<TaskState> {
        Ok(self
            .meta()
            .await?
            .map(|m| m.status)
            .unwrap_or(TaskState::Pending))
    }

    /// The stored meta, if any.
    pub async fn meta(&self) -> Result<Option<TaskMeta>> {
        self.backend.get(&self.id).await
    }

    /// Waits for the task to finish and returns its value; a failure or revocation is
    /// [`Error::TaskFailed`], no result within `timeout` is [`Error::Timeout`].
    pub async fn get(&self, timeout: Duration) -> Result<O> {
        let meta = self.backend.wait(&self.id, timeout).await?;
        Self::value(meta)
    }

    fn value(meta: TaskMeta) -> Result<O> {
        match meta.status {
            TaskState::Success => serde_json::from_value(meta.result).map_err(|e| {
                Error::Serialization(format!(
                    "result of task {} does not decode: {e}",
                    meta.task_id
                ))
            }),
            state => Err(Error::TaskFailed {
                task_id: meta.task_id.clone(),
                state,
                exception: meta.exception_info().unwrap_or_else(|| {
                    crate::backend::ExceptionInfo::new(
                        "builtins",
                        "Exception",
                        meta.result.to_string(),
                    )
                }),
            }),
        }
    }
}

impl<O: Serialize> AsyncResult<O> {
    /// Drops the typing, for code that handles results of many task types.
    pub fn untyped(self) -> AsyncResult<Value> {
        AsyncResult {
            id: self.id,
            backend: self.backend,
            _output: PhantomData,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_globs_in_order() {
        let routes = Routes::new()
            .route("billing.charge", "charges")
            .route("billing.*", "billing")
            .route("diag.?leep", "slow")
            .route("*.report*", "reports");
        assert_eq!(routes.queue_for("billing.charge"), Some("charges"));
        assert_eq!(routes.queue_for("billing.refund"), Some("billing"));
        assert_eq!(routes.queue_for("diag.sleep"), Some("slow"));
        assert_eq!(routes.queue_for("diag.sleepy"), None);
        assert_eq!(routes.queue_for("x.reports.daily"), Some("reports"));
        assert_eq!(routes.queue_for("diag.add"), None);
        assert!(glob_match(b"*", b""));
        assert!(!glob_match(b"a*b", b"ac"));
        assert!(glob_match(b"a*b*c", b"a-b-b-c"));
    }
}
