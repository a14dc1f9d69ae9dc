//! The set of tasks a worker can run, keyed by name, with their types erased.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde_json::{Map, Value};

use crate::backend::{ExceptionInfo, TaskState};
use crate::task::{Task, TaskContext, TaskError, TaskOptions, decode_args};

/// A task run whose arguments have been decoded, ready to start.
pub(crate) type PreparedRun =
    Box<dyn FnOnce(TaskContext) -> BoxFuture<'static, Result<Returned, TaskError>> + Send>;

/// What a successful run returned: the value to store, and the task's `on_success` hook, to call
/// with the typed output once the value is stored.
pub(crate) struct Returned {
    pub(crate) value: Value,
    pub(crate) on_success: Box<dyn FnOnce(&TaskContext) + Send>,
}

/// A registered task, independent of its argument and result types.
pub(crate) trait ErasedTask: Send + Sync {
    fn options(&self) -> &TaskOptions;
    /// The argument struct's field names in order (`None` for tuples and plain values).
    fn fields(&self) -> Option<&'static [&'static str]>;
    /// Decodes the arguments; an error is a reason for dead-lettering (wrong argument shape).
    fn prepare(&self, args: Vec<Value>, kwargs: Map<String, Value>) -> Result<PreparedRun, String>;
    /// [`Task::on_failure`].
    fn on_failure(&self, ctx: &TaskContext, exception: &ExceptionInfo);
    /// [`Task::on_retry`].
    fn on_retry(&self, ctx: &TaskContext, exception: &ExceptionInfo);
    /// [`Task::after_return`].
    fn after_return(&self, ctx: &TaskContext, state: TaskState);
}

struct Entry<T: Task> {
    task: Arc<T>,
    options: TaskOptions,
}

impl<T: Task> ErasedTask for Entry<T> {
    fn options(&self) -> &TaskOptions {
        &self.options
    }

    fn fields(&self) -> Option<&'static [&'static str]> {
        crate::task::field_names::<T::Args>()
    }

    fn prepare(&self, args: Vec<Value>, kwargs: Map<String, Value>) -> Result<PreparedRun, String> {
        let args: T::Args = decode_args(args, kwargs)?;
        let task = self.task.clone();
        Ok(Box::new(move |ctx| {
            Box::pin(async move {
                let output = task.run(ctx, args).await?;
                let value = serde_json::to_value(&output).map_err(|e| {
                    TaskError::abort(
                        "kombu.exceptions.EncodeError",
                        format!("the result cannot be serialized: {e}"),
                    )
                })?;
                Ok(Returned {
                    value,
                    on_success: Box::new(move |ctx| task.on_success(ctx, &output)),
                })
            })
        }))
    }

    fn on_failure(&self, ctx: &TaskContext, exception: &ExceptionInfo) {
        self.task.on_failure(ctx, exception);
    }

    fn on_retry(&self, ctx: &TaskContext, exception: &ExceptionInfo) {
        self.task.on_retry(ctx, exception);
    }

    fn after_return(&self, ctx: &TaskContext, state: TaskState) {
        self.task.after_return(ctx, state);
    }
}

/// Tasks by name.
#[derive(Clone, Default)]
pub struct Registry {
    tasks: BTreeMap<String, Arc<dyn ErasedTask>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.tasks.keys()).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a task with its own options. A later registration of the same name replaces it.
    pub fn register<T: Task>(&mut self, task: T) -> &mut Self {
        self.register_with(task, T::options())
    }

    /// Registers a task with the given options.
    pub fn register_with<T: Task>(&mut self, task: T, options: TaskOptions) -> &mut Self {
        self.tasks.insert(
            T::NAME.to_owned(),
            Arc::new(Entry {
                task: Arc::new(task),
                options,
            }),
        );
        self
    }

    /// Registered names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tasks.keys().map(String::as_str)
    }

    /// Whether `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.tasks.contains_key(name)
    }

    /// The options of a registered task.
    pub fn options(&self, name: &str) -> Option<&TaskOptions> {
        self.tasks.get(name).map(|t| t.options())
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<dyn ErasedTask>> {
        self.tasks.get(name).cloned()
    }
}
