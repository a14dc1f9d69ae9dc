//! Diagnostic tasks, registered by every worker: `diag.add(x, y)`, `diag.echo(value)`,
//! `diag.sleep(ms)`, `diag.block(ms)` (holds a thread of the blocking pool, as synchronous code
//! does through [`crate::blocking`]), `diag.fail(message)`, `diag.flaky(fails)` (retried `fails`
//! times, then succeeds) and `diag.limited(key, ms)` (at most one running per `key` across the
//! cluster, at most 20 starts per second per key; returns when it started and ended). They check
//! a deployment end to end (Python's `send_task('diag.add', (2, 3))` returns 5), show retries and
//! flow control to an operator, and drive the benchmarks.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};

use crate::registry::Registry;
use crate::task::{Task, TaskContext, TaskError};

/// Registers the diagnostic tasks.
pub fn register(registry: &mut Registry) -> &mut Registry {
    registry
        .register(Add)
        .register(Echo)
        .register(Sleep)
        .register(Block)
        .register(Fail)
        .register(Flaky)
        .register(Limited)
}

/// `diag.flaky(fails)`: asks to be retried (at once) until it has been retried `fails` times,
/// then returns the number of retries.
#[derive(Debug, Clone, Copy)]
pub struct Flaky;

/// Arguments of `diag.flaky`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlakyArgs {
    /// Retries before it succeeds.
    pub fails: u32,
}

impl Task for Flaky {
    const NAME: &'static str = "diag.flaky";
    type Args = FlakyArgs;
    type Output = u32;

    fn options() -> crate::TaskOptions {
        crate::TaskOptions::default().max_retries(None)
    }

    async fn run(&self, ctx: TaskContext, a: FlakyArgs) -> Result<u32, TaskError> {
        if ctx.retries < a.fails {
            return Err(TaskError::retry_after(
                Duration::ZERO,
                format!("flaky: attempt {} of {}", ctx.retries + 1, a.fails + 1),
            ));
        }
        Ok(ctx.retries)
    }
}

/// `diag.limited(key, ms)`: sleeps `ms` under the cluster-wide limits of its `key` (one at a
/// time, 20 starts per second) and returns `{"start": t0, "end": t1}` in Unix seconds.
#[derive(Debug, Clone, Copy)]
pub struct Limited;

/// Arguments of `diag.limited`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LimitedArgs {
    /// The key the limits count against.
    pub key: String,
    /// Milliseconds to hold it.
    pub ms: u64,
}

/// Starts per second per key of `diag.limited`.
pub const LIMITED_RATE: f64 = 20.0;

impl Task for Limited {
    const NAME: &'static str = "diag.limited";
    type Args = LimitedArgs;
    type Output = Value;

    fn options() -> crate::TaskOptions {
        crate::TaskOptions::default().key_limit(
            crate::task::KeyLimit::by_arg("key")
                .concurrency(1)
                .rate(crate::RateLimit {
                    per_second: LIMITED_RATE,
                }),
        )
    }

    async fn run(&self, _ctx: TaskContext, a: LimitedArgs) -> Result<Value, TaskError> {
        let start = crate::events::unix_now();
        tokio::time::sleep(Duration::from_millis(a.ms)).await;
        Ok(serde_json::json!({"start": start, "end": crate::events::unix_now()}))
    }
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

/// `diag.block(ms)`: blocks a thread for `ms` milliseconds with `std::thread::sleep`, through
/// [`crate::blocking::run_blocking`], and returns the milliseconds it blocked. It stops early
/// (within 10 ms) when its task is abandoned, as blocking code should.
#[derive(Debug, Clone, Copy)]
pub struct Block;

/// Arguments of `diag.block`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockArgs {
    /// Milliseconds to block.
    pub ms: u64,
}

impl Task for Block {
    const NAME: &'static str = "diag.block";
    type Args = BlockArgs;
    type Output = u64;

    async fn run(&self, _ctx: TaskContext, a: BlockArgs) -> Result<u64, TaskError> {
        Ok(crate::blocking::run_blocking(move |cancel| {
            let start = std::time::Instant::now();
            let total = Duration::from_millis(a.ms);
            while start.elapsed() < total && !cancel.is_cancelled() {
                std::thread::sleep(
                    total
                        .saturating_sub(start.elapsed())
                        .min(Duration::from_millis(10)),
                );
            }
            u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
        })
        .await)
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
