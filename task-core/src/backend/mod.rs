//! Result backends: where task states and return values live, in Celery's format.
//!
//! The contract (ARCHITECTURE.md §3.2): a state is stored under `celery-task-meta-<id>` as Celery's
//! JSON meta and announced with a PUBLISH of the same bytes on the channel of the same name, so
//! Python's `AsyncResult.get()` works. PENDING is never written (an unknown id reads as PENDING), and
//! a SUCCESS is never overwritten.

mod chord;
mod memory;
mod redis_backend;
mod rpc;

pub use chord::{ChordMember, ChordPart, ChordProgress};

pub use memory::MemoryBackend;
pub use redis_backend::RedisBackend;
pub use rpc::RpcBackend;

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Default time a result is kept: one day, as Celery's `result_expires`.
pub const DEFAULT_RESULT_TTL: Duration = Duration::from_secs(86_400);

/// Celery's task states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum TaskState {
    /// Unknown id, or not yet picked up. Never stored.
    Pending,
    /// Received by a worker (events only).
    Received,
    /// Execution began.
    Started,
    /// Failed and scheduled to run again.
    Retry,
    /// Finished with a return value.
    Success,
    /// Finished with an error.
    Failure,
    /// Revoked or expired before it ran.
    Revoked,
    /// Rejected by the worker (events only).
    Rejected,
    /// Ran, result intentionally not stored.
    Ignored,
    /// A state the task set itself (Python's `update_state('PROGRESS', meta=…)`); not ready.
    #[serde(other)]
    Custom,
}

impl TaskState {
    /// SUCCESS, FAILURE and REVOKED: the task will not change state again.
    pub fn is_ready(self) -> bool {
        matches!(
            self,
            TaskState::Success | TaskState::Failure | TaskState::Revoked
        )
    }

    /// The upper-case name Celery uses.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "PENDING",
            TaskState::Received => "RECEIVED",
            TaskState::Started => "STARTED",
            TaskState::Retry => "RETRY",
            TaskState::Success => "SUCCESS",
            TaskState::Failure => "FAILURE",
            TaskState::Revoked => "REVOKED",
            TaskState::Rejected => "REJECTED",
            TaskState::Ignored => "IGNORED",
            TaskState::Custom => "CUSTOM",
        }
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An exception as Celery stores it: `{exc_type, exc_message: [..], exc_module}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExceptionInfo {
    /// Class name (`ValueError`, `TimeLimitExceeded`, ...).
    pub exc_type: String,
    /// The exception's `args`.
    pub exc_message: Vec<Value>,
    /// Module the class lives in (`builtins`, `celery.exceptions`).
    pub exc_module: String,
}

impl ExceptionInfo {
    /// An exception with one message argument.
    pub fn new(module: &str, kind: &str, message: impl Into<String>) -> Self {
        ExceptionInfo {
            exc_type: kind.to_owned(),
            exc_message: vec![Value::String(message.into())],
            exc_module: module.to_owned(),
        }
    }

    /// An exception whose arguments are given as values (`TimeLimitExceeded(30)`).
    pub fn with_args(module: &str, kind: &str, args: Vec<Value>) -> Self {
        ExceptionInfo {
            exc_type: kind.to_owned(),
            exc_message: args,
            exc_module: module.to_owned(),
        }
    }

    /// The traceback text stored with a failure of a Rust task, shaped as Python's so that
    /// `AsyncResult.traceback`, Flower and log tools show it as they show Python's: the frame names
    /// the task, the last line is what `traceback.format_exception` prints for this exception.
    pub fn traceback(&self, task: &str) -> String {
        format!(
            "Traceback (most recent call last):\n  File \"<rust>\", line 0, in {task}\n{}\n",
            self.python_line()
        )
    }

    /// `ValueError: message` (built-ins unqualified, others as `module.Type`), as Python prints
    /// the last line of a traceback.
    fn python_line(&self) -> String {
        let name = match self.exc_module.as_str() {
            "builtins" | "__main__" | "" => self.exc_type.clone(),
            module => format!("{module}.{}", self.exc_type),
        };
        match self.exc_message.as_slice() {
            [] => name,
            _ => format!("{name}: {}", self.message()),
        }
    }

    /// The message arguments joined as text.
    pub fn message(&self) -> String {
        self.exc_message
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl std::fmt::Display for ExceptionInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.exc_type, self.message())
    }
}

/// Celery's result meta. Field order matches what Celery writes; unknown fields are ignored on read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskMeta {
    /// Current state.
    pub status: TaskState,
    /// Return value; the exception dict for FAILURE, RETRY and REVOKED.
    #[serde(default)]
    pub result: Value,
    /// Traceback text, if any.
    #[serde(default)]
    pub traceback: Option<String>,
    /// Child result tuples (`[]` when none).
    #[serde(default)]
    pub children: Value,
    /// When the task reached a ready state.
    #[serde(default, with = "opt_iso")]
    pub date_done: Option<DateTime<Utc>>,
    /// When execution began (extension; Celery ignores it).
    #[serde(default, with = "opt_iso", skip_serializing_if = "Option::is_none")]
    pub date_started: Option<DateTime<Utc>>,
    /// Group id, when the task ran as part of a group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// Parent task id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// Task name (Celery's `result_extended`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Positional arguments (`result_extended`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<Value>>,
    /// Keyword arguments (`result_extended`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kwargs: Option<Map<String, Value>>,
    /// Worker node name (`result_extended`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Retry count (`result_extended`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Queue the task came from (`result_extended`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// The task id.
    pub task_id: String,
    /// Where an `rpc://` backend sends this state: the task message's `reply_to` and
    /// correlation id. Never stored or sent as part of the meta.
    #[serde(skip)]
    pub reply_to: Option<ReplyTo>,
}

/// A caller's reply queue and the correlation id its reply carries (Celery's `rpc://`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    /// The queue (the message's `reply_to`).
    pub queue: String,
    /// The message's `correlation_id`, or the task id.
    pub correlation_id: String,
}

impl TaskMeta {
    /// A meta in `status` with nothing else filled in.
    pub fn new(task_id: impl Into<String>, status: TaskState, result: Value) -> Self {
        TaskMeta {
            status,
            result,
            traceback: None,
            children: Value::Array(Vec::new()),
            date_done: status.is_ready().then(Utc::now),
            date_started: None,
            group_id: None,
            parent_id: None,
            name: None,
            args: None,
            kwargs: None,
            worker: None,
            retries: None,
            queue: None,
            task_id: task_id.into(),
            reply_to: None,
        }
    }

    /// A FAILURE (or RETRY/REVOKED) carrying an exception.
    pub fn exception(task_id: impl Into<String>, status: TaskState, exc: &ExceptionInfo) -> Self {
        let result = serde_json::to_value(exc).unwrap_or(Value::Null);
        TaskMeta::new(task_id, status, result)
    }

    /// The stored exception, for exception states.
    pub fn exception_info(&self) -> Option<ExceptionInfo> {
        matches!(
            self.status,
            TaskState::Failure | TaskState::Retry | TaskState::Revoked
        )
        .then(|| serde_json::from_value(self.result.clone()).ok())
        .flatten()
    }

    /// Serializes to the JSON bytes stored in the backend.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        Ok(serde_json::to_vec(self)?)
    }

    /// Serializes as Celery's `result_serializer` would: JSON, or msgpack (a map).
    pub fn encode(&self, serializer: crate::protocol::ContentType) -> Result<Vec<u8>> {
        match serializer {
            crate::protocol::ContentType::Json => self.to_json(),
            crate::protocol::ContentType::Msgpack => {
                encode_stored(serializer, &serde_json::to_value(self)?)
            }
        }
    }

    /// Parses stored bytes: JSON, or msgpack as a Celery worker with `result_serializer='msgpack'`
    /// stores them (a JSON meta always starts with `{`, a msgpack map never does).
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let json = bytes
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_none_or(|b| *b == b'{');
        if json {
            return serde_json::from_slice(bytes)
                .map_err(|e| Error::Backend(format!("unreadable task meta: {e}")));
        }
        let value = crate::protocol::decode_value(crate::protocol::ContentType::Msgpack, bytes)
            .map_err(|e| Error::Backend(format!("unreadable task meta (msgpack): {e}")))?;
        serde_json::from_value(value)
            .map_err(|e| Error::Backend(format!("unreadable task meta (msgpack): {e}")))
    }
}

/// A value as a backend stores it under `serializer` (Celery's `result_serializer`).
pub(crate) fn encode_stored(
    serializer: crate::protocol::ContentType,
    value: &Value,
) -> Result<Vec<u8>> {
    crate::protocol::encode_value(serializer, value)
        .map_err(|e| Error::Serialization(format!("cannot encode a result: {e}")))
}

/// A stored value, JSON or msgpack (whichever serializer the writer used: a JSON document starts
/// with `{` or `[`, a msgpack map or array never does).
pub(crate) fn decode_stored(bytes: &[u8]) -> Option<Value> {
    let json = bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_none_or(|b| *b == b'{' || *b == b'[');
    let content = if json {
        crate::protocol::ContentType::Json
    } else {
        crate::protocol::ContentType::Msgpack
    };
    crate::protocol::decode_value(content, bytes).ok()
}

mod opt_iso {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        v: &Option<DateTime<Utc>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(t) => s.serialize_str(&crate::protocol::format_datetime(*t)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<DateTime<Utc>>, D::Error> {
        Ok(Option::<String>::deserialize(d)?.and_then(|s| crate::protocol::parse_datetime(&s)))
    }
}

/// What [`ResultBackend::store`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// The meta was written and published.
    Stored,
    /// A SUCCESS or a REVOKED was already stored, so nothing was written.
    KeptSuccess,
}

/// Storage of task results.
pub trait ResultBackend: Clone + Send + Sync + 'static {
    /// Stores a state, unless a SUCCESS or a REVOKED is already stored for that id (both are
    /// final: a revoked task that runs anyway must not look as if it had been allowed to), and
    /// announces it to waiters.
    fn store(&self, meta: &TaskMeta) -> impl Future<Output = Result<StoreOutcome>> + Send;

    /// The stored meta, or `None` (PENDING) when nothing is stored.
    fn get(&self, task_id: &str) -> impl Future<Output = Result<Option<TaskMeta>>> + Send;

    /// Waits until the task reaches a ready state (SUCCESS, FAILURE, REVOKED) or `timeout` passes.
    fn wait(
        &self,
        task_id: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<TaskMeta>> + Send;

    /// Deletes a stored result.
    fn forget(&self, task_id: &str) -> impl Future<Output = Result<()>> + Send;
}

/// The key (and pub/sub channel) Celery uses for a task's meta.
pub fn meta_key(task_id: &str) -> String {
    format!("celery-task-meta-{task_id}")
}

/// The key (and channel) of a saved group, and the prefix of a chord's keys.
pub fn group_key(group_id: &str) -> String {
    format!("celery-taskset-meta-{group_id}")
}

/// A result backend chosen at run time from a URL: `redis://…`, `sentinel://…`, `memory://`
/// or `rpc://`.
#[derive(Clone, Debug)]
pub enum AnyBackend {
    /// Redis, in Celery's format.
    Redis(RedisBackend),
    /// In-process map.
    Memory(MemoryBackend),
    /// Replies to the caller's queue (`rpc://`); nothing stored.
    Rpc(RpcBackend),
}

impl AnyBackend {
    /// Connects to the backend a URL names. `memory://` gives a fresh in-process backend;
    /// `rpc://` replies through a broker, so it is made with [`AnyBackend::connect_with_broker`].
    pub async fn connect(url: &str) -> Result<Self> {
        if url.starts_with("rpc://") {
            return Err(Error::Config(
                "RESULT_BACKEND rpc:// replies through the broker: make it with \
                 AnyBackend::connect_with_broker"
                    .into(),
            ));
        }
        if url.starts_with("memory://") {
            Ok(AnyBackend::Memory(MemoryBackend::new()))
        } else if crate::redis_url::is_redis_url(url) {
            Ok(AnyBackend::Redis(RedisBackend::connect(url).await?))
        } else {
            Err(Error::Config(format!(
                "RESULT_BACKEND `{}` is not supported (use redis://host:port/db, \
                 sentinel://host:26379;sentinel://… or memory://)",
                crate::redact_url(url)
            )))
        }
    }

    /// [`AnyBackend::connect`], with `rpc://` replying through `broker` (Celery's RPC backend:
    /// results go to each caller's `reply_to` queue, nothing is stored).
    pub async fn connect_with_broker(url: &str, broker: &crate::AnyBroker) -> Result<Self> {
        if url == "rpc://" || url == "rpc:///" {
            return Ok(AnyBackend::Rpc(RpcBackend::new(broker.clone())));
        }
        Self::connect(url).await
    }

    /// Stores results with `serializer` (Celery's `result_serializer`: `json`, the default, or
    /// `msgpack`). Results are read in either form whatever this says.
    pub fn with_serializer(self, serializer: crate::protocol::ContentType) -> Self {
        match self {
            AnyBackend::Redis(r) => AnyBackend::Redis(r.with_serializer(serializer)),
            AnyBackend::Rpc(r) => AnyBackend::Rpc(r.with_serializer(serializer)),
            m @ AnyBackend::Memory(_) => m,
        }
    }

    /// Sets how long stored results are kept.
    pub fn with_ttl(self, ttl: Duration) -> Self {
        match self {
            AnyBackend::Redis(r) => AnyBackend::Redis(r.with_ttl(ttl)),
            m @ (AnyBackend::Memory(_) | AnyBackend::Rpc(_)) => m,
        }
    }
}

/// Chords and saved groups, on whichever backend this is (see `chord.rs` for the keys).
impl AnyBackend {
    /// A step of a walk over every stored result; see [`RedisBackend::scan_task_ids`]. The
    /// other backends have nothing to walk: `(0, [])`.
    pub async fn scan_task_ids(&self, cursor: u64, count: usize) -> Result<(u64, Vec<String>)> {
        match self {
            AnyBackend::Redis(r) => r.scan_task_ids(cursor, count).await,
            AnyBackend::Memory(_) | AnyBackend::Rpc(_) => Ok((0, Vec::new())),
        }
    }

    /// Writes a chord's header size; see [`RedisBackend::set_chord_size`].
    pub async fn set_chord_size(&self, group_id: &str, size: u64) -> Result<()> {
        match self {
            AnyBackend::Redis(b) => b.set_chord_size(group_id, size).await,
            AnyBackend::Memory(b) => b.set_chord_size(group_id, size).await,
            AnyBackend::Rpc(_) => Err(no_store_for_groups()),
        }
    }

    /// Records a header task's result; see [`ChordProgress`].
    pub async fn chord_part_return(&self, part: &ChordPart<'_>) -> Result<ChordProgress> {
        match self {
            AnyBackend::Redis(b) => b.chord_part_return(part).await,
            AnyBackend::Memory(b) => b.chord_part_return(part).await,
            AnyBackend::Rpc(_) => Err(no_store_for_groups()),
        }
    }

    /// Cleans up after the body was fired.
    pub async fn chord_cleanup(&self, group_id: &str, claim: &str) -> Result<bool> {
        match self {
            AnyBackend::Redis(b) => b.chord_cleanup(group_id, claim).await,
            AnyBackend::Memory(b) => b.chord_cleanup(group_id, claim).await,
            AnyBackend::Rpc(_) => Err(no_store_for_groups()),
        }
    }

    /// Gives up a chord that failed.
    pub async fn chord_abandon(&self, group_id: &str) -> Result<()> {
        match self {
            AnyBackend::Redis(b) => b.chord_abandon(group_id).await,
            AnyBackend::Memory(b) => b.chord_abandon(group_id).await,
            AnyBackend::Rpc(_) => Err(no_store_for_groups()),
        }
    }

    /// Saves a group's result tuple (Celery's `save_group`).
    pub async fn save_group(&self, group_id: &str, tuple: &Value) -> Result<()> {
        match self {
            AnyBackend::Redis(b) => b.save_group(group_id, tuple).await,
            AnyBackend::Memory(b) => b.save_group(group_id, tuple).await,
            AnyBackend::Rpc(_) => Err(no_store_for_groups()),
        }
    }

    /// A saved group's result tuple.
    pub async fn restore_group(&self, group_id: &str) -> Result<Option<Value>> {
        match self {
            AnyBackend::Redis(b) => b.restore_group(group_id).await,
            AnyBackend::Memory(b) => b.restore_group(group_id).await,
            AnyBackend::Rpc(_) => Err(no_store_for_groups()),
        }
    }
}

/// Chords and saved groups need results that stay somewhere; Celery refuses them on `rpc://` too.
fn no_store_for_groups() -> Error {
    Error::Config(
        "chords and saved groups need a result backend that stores results (redis://); \
         rpc:// only replies to the caller"
            .into(),
    )
}

impl From<RpcBackend> for AnyBackend {
    fn from(b: RpcBackend) -> Self {
        AnyBackend::Rpc(b)
    }
}

impl From<MemoryBackend> for AnyBackend {
    fn from(b: MemoryBackend) -> Self {
        AnyBackend::Memory(b)
    }
}

impl From<RedisBackend> for AnyBackend {
    fn from(b: RedisBackend) -> Self {
        AnyBackend::Redis(b)
    }
}

impl ResultBackend for AnyBackend {
    async fn store(&self, meta: &TaskMeta) -> Result<StoreOutcome> {
        match self {
            AnyBackend::Redis(b) => b.store(meta).await,
            AnyBackend::Memory(b) => b.store(meta).await,
            AnyBackend::Rpc(b) => b.store(meta).await,
        }
    }

    async fn get(&self, task_id: &str) -> Result<Option<TaskMeta>> {
        match self {
            AnyBackend::Redis(b) => b.get(task_id).await,
            AnyBackend::Memory(b) => b.get(task_id).await,
            AnyBackend::Rpc(b) => b.get(task_id).await,
        }
    }

    async fn wait(&self, task_id: &str, timeout: Duration) -> Result<TaskMeta> {
        match self {
            AnyBackend::Redis(b) => b.wait(task_id, timeout).await,
            AnyBackend::Memory(b) => b.wait(task_id, timeout).await,
            AnyBackend::Rpc(b) => b.wait(task_id, timeout).await,
        }
    }

    async fn forget(&self, task_id: &str) -> Result<()> {
        match self {
            AnyBackend::Redis(b) => b.forget(task_id).await,
            AnyBackend::Memory(b) => b.forget(task_id).await,
            AnyBackend::Rpc(b) => b.forget(task_id).await,
        }
    }
}
