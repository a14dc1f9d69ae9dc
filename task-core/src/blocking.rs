//! Blocking work inside a task, kept off the worker's async threads.
//!
//! Task bodies run on the worker's tokio runtime, beside everything that keeps deliveries alive:
//! the acknowledgements of every other task, lapin's heartbeats and channel traffic, Redis round
//! trips, the event publisher. A body that blocks its thread (CPU-heavy work, a synchronous
//! library or driver, `std::thread::sleep`) takes that thread from all of them; a few such tasks
//! take every thread, acknowledgements stop, heartbeats are missed, RabbitMQ closes the connection,
//! and every unacknowledged message is redelivered while the originals still run. Wrap such work in
//! [`run_blocking`]: it runs on tokio's blocking pool, and the task awaits it like any future.
//!
//! ```no_run
//! # async fn hash(password: String) -> String {
//! let digest = task_core::blocking::run_blocking(move |_cancel| {
//!     // A synchronous, CPU-heavy call.
//!     format!("{:x}", password.len())
//! })
//! .await;
//! # digest }
//! ```
//!
//! **Time limits, and what they cannot stop.** When a task's hard time limit passes (or it is
//! terminated by `revoke --terminate`, or abandoned at the shutdown deadline), the worker drops the
//! future awaiting [`run_blocking`]: the task is reported at once (FAILURE with
//! `TimeLimitExceeded` for a time limit), its message is acknowledged, and its concurrency slot is
//! given back, so the worker goes on taking messages. A thread cannot be killed, though: the
//! closure keeps running on its blocking thread until it returns, and its result is dropped. The
//! [`Cancel`] handle given to the closure turns cancelled at that moment, so code that checks
//! [`Cancel::is_cancelled`] between steps stops early; code that never checks runs to the end,
//! outside the worker's concurrency (tokio's blocking pool holds up to 512 threads by default).
//! [`abandoned`] counts such threads still running, and each is logged when abandoned and when it
//! finally returns. Side effects of an abandoned closure still happen; if the task is retried they
//! may happen twice, as with any task stopped half-way.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

const RUNNING: u8 = 0;
const FINISHED: u8 = 1;
const ABANDONED: u8 = 2;

static STILL_RUNNING: AtomicUsize = AtomicUsize::new(0);

/// Blocking closures whose task was abandoned (time limit, termination, shutdown deadline) and
/// that are still running in this process.
pub fn abandoned() -> usize {
    STILL_RUNNING.load(Ordering::SeqCst)
}

/// Tells a blocking closure that nobody waits for it any more.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicU8>);

impl Cancel {
    /// Whether the task awaiting this closure was abandoned; the closure should return soon.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst) == ABANDONED
    }
}

/// Marks the closure abandoned if the awaiting future is dropped before it finished.
struct Abandon(Cancel);

impl Drop for Abandon {
    fn drop(&mut self) {
        if (self.0)
            .0
            .compare_exchange(RUNNING, ABANDONED, Ordering::SeqCst, Ordering::SeqCst)
            == Ok(RUNNING)
        {
            STILL_RUNNING.fetch_add(1, Ordering::SeqCst);
            tracing::warn!(
                "a blocking section's task was abandoned; its thread runs on until the closure \
                 returns (see task_core::blocking)"
            );
        }
    }
}

/// Runs `f` on tokio's blocking pool and returns its value; see the module docs for time limits.
///
/// A panic in `f` resumes in the awaiting task, so the worker reports it as the task's panic.
///
/// # Panics
///
/// If the runtime shuts down before `f` could start.
pub async fn run_blocking<F, T>(f: F) -> T
where
    F: FnOnce(&Cancel) -> T + Send + 'static,
    T: Send + 'static,
{
    let cancel = Cancel::default();
    let guard = Abandon(cancel.clone());
    let span = tracing::Span::current();
    let joined = tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&cancel)));
        if cancel
            .0
            .compare_exchange(RUNNING, FINISHED, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            STILL_RUNNING.fetch_sub(1, Ordering::SeqCst);
            tracing::info!("an abandoned blocking section returned; its result is dropped");
        }
        match out {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
    .await;
    drop(guard);
    match joined {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => panic!("a blocking section could not run: the runtime is shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[tokio::test(flavor = "current_thread")]
    async fn the_runtime_thread_stays_free_while_a_closure_blocks() {
        // On a single-threaded runtime a blocking body would stop the ticker completely.
        let ticks = Arc::new(AtomicUsize::new(0));
        let ticker = {
            let ticks = ticks.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    ticks.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        let v = run_blocking(|_| {
            std::thread::sleep(Duration::from_millis(300));
            7
        })
        .await;
        ticker.abort();
        assert_eq!(v, 7);
        assert!(
            ticks.load(Ordering::SeqCst) >= 5,
            "the runtime kept running"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abandoned_closure_is_told_and_counted_until_it_returns() {
        let (saw_tx, saw_rx) = std::sync::mpsc::channel();
        let started = Instant::now();
        let limited = tokio::time::timeout(
            Duration::from_millis(100),
            run_blocking(move |cancel| {
                while !cancel.is_cancelled() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                saw_tx.send(started.elapsed()).unwrap();
            }),
        )
        .await;
        assert!(limited.is_err(), "the awaiting future gave up at its limit");
        let stopped_after = tokio::task::spawn_blocking(move || {
            saw_rx.recv_timeout(Duration::from_secs(10)).unwrap()
        })
        .await
        .unwrap();
        assert!(stopped_after >= Duration::from_millis(100));
        back_to_zero().await;

        // One that ignores the signal runs on and is counted meanwhile.
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let limited = tokio::time::timeout(
            Duration::from_millis(50),
            run_blocking(move |_| release_rx.recv_timeout(Duration::from_secs(10))),
        )
        .await;
        assert!(limited.is_err());
        assert_eq!(abandoned(), 1);
        release_tx.send(()).unwrap();
        back_to_zero().await;
    }

    async fn back_to_zero() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while abandoned() != 0 {
            assert!(
                Instant::now() < deadline,
                "the abandoned count did not come back to 0"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_panic_resumes_in_the_awaiting_task() {
        let joined = tokio::spawn(run_blocking(|_| -> u32 { panic!("boom") })).await;
        let panic = joined.unwrap_err().into_panic();
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"boom"));
    }
}
