//! Process-wide signals around every task run, for instrumentation: Celery's `task_prerun` and
//! `task_postrun`.
//!
//! Handlers are plain functions called on the worker's task, in the order they were connected;
//! they must be quick (count, time, log), and a panic in one is caught and logged. Arguments are
//! the redacted copies the worker shows everywhere else: sensitive values arrive as `'***'`.
//! Per-task hooks are the task's own methods ([`crate::Task::on_success`] and the others).
//!
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use task_core::signals;
//!
//! static STARTED: AtomicU64 = AtomicU64::new(0);
//! let connection = signals::on_prerun(|run| {
//!     STARTED.fetch_add(1, Ordering::Relaxed);
//!     tracing::debug!(task = run.task, id = run.task_id, "starting");
//! });
//! connection.disconnect();
//! ```

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::backend::{ExceptionInfo, TaskState};

/// Sent just before a task starts.
#[derive(Debug)]
#[non_exhaustive]
pub struct Prerun<'a> {
    /// Task id.
    pub task_id: &'a str,
    /// Task name.
    pub task: &'a str,
    /// Positional arguments (sensitive ones redacted).
    pub args: &'a [Value],
    /// Keyword arguments (sensitive ones redacted).
    pub kwargs: &'a Map<String, Value>,
    /// Retries so far.
    pub retries: u32,
    /// Worker node name.
    pub hostname: &'a str,
}

/// Sent after a task ran, once its outcome is stored.
#[derive(Debug)]
#[non_exhaustive]
pub struct Postrun<'a> {
    /// Task id.
    pub task_id: &'a str,
    /// Task name.
    pub task: &'a str,
    /// How the run ended: SUCCESS, FAILURE, RETRY or REVOKED (terminated).
    pub state: TaskState,
    /// The return value, on SUCCESS.
    pub retval: Option<&'a Value>,
    /// The exception, on FAILURE and RETRY.
    pub exception: Option<&'a ExceptionInfo>,
    /// How long the task ran.
    pub runtime: Duration,
}

type PrerunHandler = dyn Fn(&Prerun<'_>) + Send + Sync;
type PostrunHandler = dyn Fn(&Postrun<'_>) + Send + Sync;

struct Signal<H: ?Sized> {
    name: &'static str,
    handlers: RwLock<Vec<(u64, Arc<H>)>>,
}

impl<H: ?Sized> Signal<H> {
    const fn new(name: &'static str) -> Self {
        Signal {
            name,
            handlers: RwLock::new(Vec::new()),
        }
    }

    fn send(&self, call: impl Fn(&H)) {
        let handlers: Vec<Arc<H>> = {
            let h = self.handlers.read().unwrap_or_else(|p| p.into_inner());
            if h.is_empty() {
                return;
            }
            h.iter().map(|(_, f)| f.clone()).collect()
        };
        for f in handlers {
            if std::panic::catch_unwind(AssertUnwindSafe(|| call(&f))).is_err() {
                tracing::error!(signal = self.name, "a signal handler panicked");
            }
        }
    }

    fn connect(&self, f: Arc<H>) -> u64 {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        self.handlers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push((id, f));
        id
    }

    fn disconnect(&self, id: u64) {
        self.handlers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(i, _)| *i != id);
    }
}

static PRERUN: Signal<PrerunHandler> = Signal::new("task_prerun");
static POSTRUN: Signal<PostrunHandler> = Signal::new("task_postrun");
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A connected handler; it stays connected until [`Connection::disconnect`] (dropping this
/// handle does not disconnect it, as with Celery's `connect`).
#[derive(Debug)]
#[must_use = "keep the connection to disconnect the handler later, or call .forever()"]
pub struct Connection {
    id: u64,
    postrun: bool,
}

impl Connection {
    /// Disconnects the handler.
    pub fn disconnect(self) {
        if self.postrun {
            POSTRUN.disconnect(self.id);
        } else {
            PRERUN.disconnect(self.id);
        }
    }

    /// Keeps the handler connected for the life of the process.
    pub fn forever(self) {}
}

/// Connects a handler to `task_prerun`.
pub fn on_prerun(f: impl Fn(&Prerun<'_>) + Send + Sync + 'static) -> Connection {
    let id = PRERUN.connect(Arc::new(f));
    Connection { id, postrun: false }
}

/// Connects a handler to `task_postrun`.
pub fn on_postrun(f: impl Fn(&Postrun<'_>) + Send + Sync + 'static) -> Connection {
    let id = POSTRUN.connect(Arc::new(f));
    Connection { id, postrun: true }
}

pub(crate) fn prerun(event: &Prerun<'_>) {
    PRERUN.send(|f| f(event));
}

pub(crate) fn postrun(event: &Postrun<'_>) {
    POSTRUN.send(|f| f(event));
}
