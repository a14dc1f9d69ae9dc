//! Worker behaviour with paused time on the in-memory broker and backend: retries and back-off,
//! countdown, expiry, soft and hard time limits, panics, rate limits, redelivery and shutdown.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use task_core::diag::{self, AddArgs, SleepArgs};
use task_core::{
    Backoff, Broker, Client, Clock, Error, MemoryBackend, MemoryBroker, ResultBackend, Task,
    TaskContext, TaskError, TaskOptions, TaskState, WorkerConfig,
};
use tokio::time::Instant;

const Q: &str = "celery";

fn config() -> WorkerConfig {
    WorkerConfig {
        concurrency: 4,
        prefetch: 16,
        clock: Clock::tokio(),
        ..WorkerConfig::default()
    }
}

struct Setup {
    broker: MemoryBroker,
    backend: MemoryBackend,
    client: Client,
}

fn setup() -> Setup {
    let (broker, backend) = (MemoryBroker::new(), MemoryBackend::new());
    let client = Client::new(broker.clone(), backend.clone());
    Setup {
        broker,
        backend,
        client,
    }
}

/// Fails with a retry until its `n`-th attempt, recording when each attempt started.
#[derive(Clone, Default)]
struct Flaky {
    attempts: Arc<Mutex<Vec<Instant>>>,
}

impl Task for Flaky {
    const NAME: &'static str = "test.flaky";
    type Args = (u32,);
    type Output = u32;

    fn options() -> TaskOptions {
        TaskOptions::default()
            .max_retries(Some(4))
            .backoff(Backoff {
                base: Duration::from_secs(2),
                max: Duration::from_secs(5),
                jitter: false,
            })
    }

    async fn run(&self, ctx: TaskContext, (succeed_on,): (u32,)) -> Result<u32, TaskError> {
        self.attempts.lock().unwrap().push(Instant::now());
        if ctx.retries + 1 < succeed_on {
            Err(TaskError::retry("not yet"))
        } else {
            Ok(ctx.retries)
        }
    }
}

#[tokio::test(start_paused = true)]
async fn retries_follow_the_capped_exponential_back_off() {
    let s = setup();
    let flaky = Flaky::default();
    let mut registry = common::diag_registry();
    registry.register(flaky.clone());
    let worker =
        common::RunningWorker::start(config(), registry, s.broker.clone(), s.backend.clone());

    let start = Instant::now();
    let r = s.client.task::<Flaky>((4,)).send().await.unwrap();
    assert_eq!(
        r.get(Duration::from_secs(60)).await.unwrap(),
        3,
        "succeeds on its 4th attempt"
    );
    let at: Vec<Duration> = flaky
        .attempts
        .lock()
        .unwrap()
        .iter()
        .map(|t| *t - start)
        .collect();
    // Back-off 2 s, 4 s, then capped at 5 s.
    let gaps: Vec<u64> = at
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis() as u64)
        .collect();
    assert_eq!(at.len(), 4);
    for (gap, expected) in gaps.iter().zip([2000, 4000, 5000]) {
        assert!((expected..expected + 50).contains(gap), "gaps {gaps:?}");
    }

    // One more attempt than the budget allows ends in FAILURE.
    let r = s.client.task::<Flaky>((6,)).send().await.unwrap();
    match r.get(Duration::from_secs(60)).await {
        Err(Error::TaskFailed { exception, .. }) => {
            assert_eq!(exception.exc_type, "MaxRetriesExceededError")
        }
        other => panic!("expected MaxRetriesExceededError, got {other:?}"),
    }
    let stats = worker.stop().await;
    assert_eq!(stats.retried.load(Ordering::Relaxed), 3 + 4);
}

#[tokio::test(start_paused = true)]
async fn countdown_and_eta_are_not_run_early() {
    let s = setup();
    let worker = common::RunningWorker::start(
        config(),
        common::diag_registry(),
        s.broker.clone(),
        s.backend.clone(),
    );
    let r = s
        .client
        .task::<diag::Add>(AddArgs::new(1, 1))
        .countdown(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert_eq!(r.state().await.unwrap(), TaskState::Pending);
    assert_eq!(r.get(Duration::from_secs(5)).await.unwrap(), 2.into());

    let eta = chrono::Utc::now() + chrono::Duration::hours(3);
    let r = s
        .client
        .task::<diag::Add>(AddArgs::new(2, 2))
        .eta(eta)
        .send()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3 * 3600 - 5)).await;
    assert_eq!(r.state().await.unwrap(), TaskState::Pending);
    assert_eq!(r.get(Duration::from_secs(10)).await.unwrap(), 4.into());
    worker.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_message_arriving_with_a_far_eta_is_handed_back_to_the_broker() {
    let s = setup();
    // Published straight to the queue with an ETA an hour away, as Python's client does.
    let mut call = s
        .client
        .task::<diag::Add>(AddArgs::new(5, 5))
        .message()
        .unwrap();
    call.headers.eta = Some(chrono::Utc::now() + chrono::Duration::hours(1));
    s.broker.publish(Q, &call.encode().unwrap()).await.unwrap();
    let worker = common::RunningWorker::start(
        config(),
        common::diag_registry(),
        s.broker.clone(),
        s.backend.clone(),
    );
    let r = s.client.result::<Value>(call.headers.id.clone());
    assert_eq!(
        r.get(Duration::from_secs(3700)).await.unwrap(),
        Value::from(10)
    );
    let stats = worker.stop().await;
    assert_eq!(
        stats.deferred.load(Ordering::Relaxed),
        1,
        "deferred once, not held"
    );
}

#[tokio::test(start_paused = true)]
async fn expired_tasks_are_revoked_not_run() {
    let s = setup();
    let worker = common::RunningWorker::start(
        config(),
        common::diag_registry(),
        s.broker.clone(),
        s.backend.clone(),
    );
    let r = s
        .client
        .task::<diag::Add>(AddArgs::new(1, 2))
        .countdown(Duration::from_secs(60))
        .expires_in(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    match r.get(Duration::from_secs(120)).await {
        Err(Error::TaskFailed {
            state, exception, ..
        }) => {
            assert_eq!(state, TaskState::Revoked);
            assert_eq!(exception.exc_type, "TaskRevokedError");
            assert_eq!(exception.message(), "expired");
        }
        other => panic!("expected REVOKED, got {other:?}"),
    }
    let stats = worker.stop().await;
    assert_eq!(stats.revoked.load(Ordering::Relaxed), 1);
    assert_eq!(stats.succeeded.load(Ordering::Relaxed), 0);
}

/// Handles its soft limit: stops work and returns what it has.
struct Careful;

impl Task for Careful {
    const NAME: &'static str = "test.careful";
    type Args = (u64,);
    type Output = String;

    async fn run(&self, ctx: TaskContext, (work_ms,): (u64,)) -> Result<String, TaskError> {
        let soft = ctx.soft_time_limit();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(work_ms)) => Ok("finished".into()),
            _ = soft => {
                // Clean-up that takes a while but ends before the hard limit.
                tokio::time::sleep(Duration::from_millis(500)).await;
                Ok("stopped cleanly at the soft limit".into())
            }
        }
    }
}

/// Watches its soft limit but ignores it.
struct Stubborn;

impl Task for Stubborn {
    const NAME: &'static str = "test.stubborn";
    type Args = ();
    type Output = ();

    async fn run(&self, ctx: TaskContext, _: ()) -> Result<(), TaskError> {
        let _soft = ctx.soft_time_limit();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn soft_and_hard_time_limits() {
    let s = setup();
    let mut registry = common::diag_registry();
    registry.register(Careful).register(Stubborn);
    let worker =
        common::RunningWorker::start(config(), registry, s.broker.clone(), s.backend.clone());
    let t = Duration::from_secs(60);
    let secs = Some;

    // Ignores the soft limit and never looks: stopped there, as an uncaught SoftTimeLimitExceeded.
    let start = Instant::now();
    let r = s
        .client
        .task::<diag::Sleep>(SleepArgs { ms: 20_000 })
        .time_limits(secs(Duration::from_secs(1)), None)
        .send()
        .await
        .unwrap();
    match r.get(t).await {
        Err(Error::TaskFailed { exception, .. }) => {
            assert_eq!(exception.exc_type, "SoftTimeLimitExceeded")
        }
        other => panic!("expected SoftTimeLimitExceeded, got {other:?}"),
    }
    assert!(
        start.elapsed() < Duration::from_millis(1100),
        "{:?}",
        start.elapsed()
    );

    // Watches the soft limit and finishes in time: SUCCESS with its partial result.
    let r = s
        .client
        .task::<Careful>((20_000,))
        .time_limits(secs(Duration::from_secs(1)), secs(Duration::from_secs(5)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.get(t).await.unwrap(), "stopped cleanly at the soft limit");

    // Watches but keeps going: cut at the hard limit.
    let start = Instant::now();
    let r = s
        .client
        .task::<Stubborn>(())
        .time_limits(secs(Duration::from_secs(1)), secs(Duration::from_secs(3)))
        .send()
        .await
        .unwrap();
    match r.get(t).await {
        Err(Error::TaskFailed { exception, .. }) => {
            assert_eq!(exception.exc_type, "TimeLimitExceeded");
            assert_eq!(exception.exc_module, "celery.exceptions");
        }
        other => panic!("expected TimeLimitExceeded, got {other:?}"),
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_millis(3100),
        "{took:?}"
    );

    // Only a hard limit: cut there.
    let r = s
        .client
        .task::<diag::Sleep>(SleepArgs { ms: 20_000 })
        .time_limits(None, secs(Duration::from_secs(2)))
        .send()
        .await
        .unwrap();
    match r.get(t).await {
        Err(Error::TaskFailed { exception, .. }) => assert_eq!(exception.message(), "2"),
        other => panic!("expected TimeLimitExceeded, got {other:?}"),
    }
    // Within its limits: fine.
    let r = s
        .client
        .task::<diag::Sleep>(SleepArgs { ms: 500 })
        .time_limits(secs(Duration::from_secs(1)), secs(Duration::from_secs(2)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.get(t).await.unwrap(), 500);
    worker.stop().await;
}

struct Panics;

impl Task for Panics {
    const NAME: &'static str = "test.panics";
    type Args = (String,);
    type Output = ();

    async fn run(&self, _ctx: TaskContext, (msg,): (String,)) -> Result<(), TaskError> {
        panic!("{msg}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_task_fails_with_its_message_and_the_worker_survives() {
    let s = setup();
    let mut registry = common::diag_registry();
    registry.register(Panics);
    let worker =
        common::RunningWorker::start(config(), registry, s.broker.clone(), s.backend.clone());
    let r = s
        .client
        .task::<Panics>(("index out of range".into(),))
        .send()
        .await
        .unwrap();
    match r.get(Duration::from_secs(10)).await {
        Err(Error::TaskFailed { exception, .. }) => {
            assert_eq!(exception.exc_type, "RuntimeError");
            assert!(
                exception.message().contains("index out of range"),
                "{exception}"
            );
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    let r = s
        .client
        .task::<diag::Add>(AddArgs::new(20, 22))
        .send()
        .await
        .unwrap();
    assert_eq!(r.get(Duration::from_secs(10)).await.unwrap(), 42.into());
    worker.stop().await;
}

/// Counts its runs.
#[derive(Clone, Default)]
struct Counted {
    runs: Arc<AtomicU32>,
    started: Arc<Mutex<Vec<Instant>>>,
}

impl Task for Counted {
    const NAME: &'static str = "test.counted";
    type Args = ();
    type Output = u32;

    fn options() -> TaskOptions {
        TaskOptions::default().rate_limit("2/s".parse().unwrap())
    }

    async fn run(&self, _ctx: TaskContext, _: ()) -> Result<u32, TaskError> {
        self.started.lock().unwrap().push(Instant::now());
        Ok(self.runs.fetch_add(1, Ordering::SeqCst) + 1)
    }
}

#[tokio::test(start_paused = true)]
async fn rate_limits_space_out_starts() {
    let s = setup();
    let counted = Counted::default();
    let mut registry = common::diag_registry();
    registry.register(counted.clone());
    let worker =
        common::RunningWorker::start(config(), registry, s.broker.clone(), s.backend.clone());
    let mut results = Vec::new();
    for _ in 0..5 {
        results.push(s.client.task::<Counted>(()).send().await.unwrap());
    }
    for r in results {
        r.get(Duration::from_secs(10)).await.unwrap();
    }
    let started = counted.started.lock().unwrap().clone();
    for w in started.windows(2) {
        assert!(
            w[1] - w[0] >= Duration::from_millis(499),
            "starts {started:?}"
        );
    }
    worker.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_redelivered_message_of_a_finished_task_is_not_run_again() {
    let s = setup();
    let counted = Counted::default();
    let mut registry = common::diag_registry();
    registry.register(counted.clone());
    // A previous worker ran the task and stored SUCCESS, then died before acknowledging.
    let message = s.client.task::<Counted>(()).message().unwrap();
    s.backend
        .store(&task_core::TaskMeta::new(
            message.headers.id.clone(),
            TaskState::Success,
            1.into(),
        ))
        .await
        .unwrap();
    s.broker
        .publish(Q, &message.encode().unwrap())
        .await
        .unwrap();
    let mut consumer = s.broker.consume(&[Q.to_owned()], 1).await.unwrap();
    drop(consumer.next().await);
    drop(consumer);

    let worker =
        common::RunningWorker::start(config(), registry, s.broker.clone(), s.backend.clone());
    common::eventually(
        "the redelivery to be handled",
        Duration::from_secs(5),
        || async { (s.broker.queue_length(Q).await.unwrap() == 0).then_some(()) },
    )
    .await;
    let stats = worker.stop().await;
    assert_eq!(stats.duplicates.load(Ordering::Relaxed), 1);
    assert_eq!(counted.runs.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn shutdown_finishes_running_tasks_and_gives_back_the_rest() {
    let s = setup();
    let config = WorkerConfig {
        concurrency: 2,
        prefetch: 8,
        ..config()
    };
    let worker = common::RunningWorker::start(
        config,
        common::diag_registry(),
        s.broker.clone(),
        s.backend.clone(),
    );
    let mut results = Vec::new();
    for _ in 0..5 {
        results.push(
            s.client
                .task::<diag::Sleep>(SleepArgs { ms: 10_000 })
                .send()
                .await
                .unwrap(),
        );
    }
    // Let the worker take all five (two run, three wait for a slot), then stop it.
    common::eventually(
        "all messages prefetched",
        Duration::from_secs(5),
        || async { (s.broker.queue_length(Q).await.unwrap() == 0).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = worker.stop().await;
    let mut states = Vec::new();
    for r in &results {
        states.push(r.state().await.unwrap());
    }
    assert_eq!(
        states.iter().filter(|s| **s == TaskState::Success).count(),
        2,
        "{states:?}"
    );
    assert_eq!(
        s.broker.queue_length(Q).await.unwrap(),
        3,
        "unstarted messages are back in the queue"
    );
    assert_eq!(stats.succeeded.load(Ordering::Relaxed), 2);
}
