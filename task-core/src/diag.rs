//! Diagnostic tasks, registered by every worker: `diag.add(x, y)`, `diag.echo(value)`,
//! `diag.sleep(ms)` and `diag.fail(message)`. They check a deployment end to end (Python's
//! `send_task('diag.add', (2, 3))` returns 5) and drive the benchmarks.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};

use crate::registry::Registry;
use crate::task::{Task, TaskContext, TaskError};

/// Registers the four diagnostic tasks.
pub fn register(registry: &mut Registry) -> &mut Registry {
    registry
        .register(Add)
        .register(Echo)
        .register(Sleep)
        .register(Fail)
}

/// `diag.add(x, y)`: integer addition (checked) or floating-point addition.
#[derive(Debug, Clone, Copy)]
pub struct Add;

/// Arguments of `diag.add`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AddArgs {
    /// Left operand.
    pub x: Number,
    /// Right operand.
    pub y: Number,
}

impl AddArgs {
    /// Integer operands.
    pub fn new(x: i64, y: i64) -> Self {
        AddArgs {
            x: x.into(),
            y: y.into(),
        }
    }
}

impl Task for Add {
    const NAME: &'static str = "diag.add";
    type Args = AddArgs;
    type Output = Number;

    async fn run(&self, _ctx: TaskContext, a: AddArgs) -> Result<Number, TaskError> {
        if let (Some(x), Some(y)) = (a.x.as_i64(), a.y.as_i64()) {
            return x.checked_add(y).map(Number::from).ok_or_else(|| {
                TaskError::abort(
                    "OverflowError",
                    format!("{x} + {y} overflows a 64-bit integer"),
                )
            });
        }
        let (x, y) = (
            a.x.as_f64().unwrap_or(f64::NAN),
            a.y.as_f64().unwrap_or(f64::NAN),
        );
        Number::from_f64(x + y)
            .ok_or_else(|| TaskError::abort("ValueError", format!("{x} + {y} is not finite")))
    }
}

/// `diag.echo(value)`: returns its argument.
#[derive(Debug, Clone, Copy)]
pub struct Echo;

/// Arguments of `diag.echo`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EchoArgs {
    /// Any value.
    pub value: Value,
}

impl Task for Echo {
    const NAME: &'static str = "diag.echo";
    type Args = EchoArgs;
    type Output = Value;

    async fn run(&self, _ctx: TaskContext, a: EchoArgs) -> Result<Value, TaskError> {
        Ok(a.value)
    }
}

/// `diag.sleep(ms)`: waits, then returns the milliseconds waited. It ignores its soft time limit, so
/// it shows what happens to a task that does.
#[derive(Debug, Clone, Copy)]
pub struct Sleep;

/// Arguments of `diag.sleep`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SleepArgs {
    /// Milliseconds to wait.
    pub ms: u64,
}

impl Task for Sleep {
    const NAME: &'static str = "diag.sleep";
    type Args = SleepArgs;
    type Output = u64;

    async fn run(&self, _ctx: TaskContext, a: SleepArgs) -> Result<u64, TaskError> {
        tokio::time::sleep(Duration::from_millis(a.ms)).await;
        Ok(a.ms)
    }
}

/// `diag.fail(message)`: fails with `ValueError(message)` and is never retried.
#[derive(Debug, Clone, Copy)]
pub struct Fail;

/// Arguments of `diag.fail`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailArgs {
    /// The error message.
    pub message: String,
}

impl Task for Fail {
    const NAME: &'static str = "diag.fail";
    type Args = FailArgs;
    type Output = Value;

    async fn run(&self, _ctx: TaskContext, a: FailArgs) -> Result<Value, TaskError> {
        Err(TaskError::abort("ValueError", a.message))
    }
}
