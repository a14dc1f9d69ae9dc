//! Celery's task settings and result meta, with tasks defined here and run by an in-process worker
//! on the real RabbitMQ and Redis, and results read by the real Python `celery` where Python is
//! the one that must understand them.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use task_core::client::Routes;
use task_core::task::AutoRetry;
use task_core::{
    AmqpBroker, Broker, Client, RedisBackend, Registry, Task, TaskContext, TaskError, TaskOptions,
    TaskState, Worker, WorkerConfig,
};
use tokio::sync::oneshot;

/// Runs `worker/tests/python/interop.py` with a JSON config and returns its JSON output.
async fn python(cfg: Value) -> Value {
    let script = common::workspace_root().join("worker/tests/python/interop.py");
    let mut cfg = cfg;
    let obj = cfg.as_object_mut().unwrap();
    obj.entry("broker")
        .or_insert_with(|| common::amqp_url().replace("/%2f", "//").into());
    obj.entry("backend")
        .or_insert_with(|| common::redis_url().into());
    let out = tokio::process::Command::new(common::python())
        .arg(script)
        .arg(cfg.to_string())
        .output()
        .await
        .expect("run the Python helper");
    assert!(
        out.status.success(),
        "python helper failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad output {:?}: {e}", String::from_utf8_lossy(&out.stdout)))
}

/// A worker in this process on its own RabbitMQ connection, stopped (and its connection closed,
/// so RabbitMQ takes back what it had not acknowledged) by [`InProcess::stop`].
struct InProcess {
    stop: oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<task_core::Result<()>>,
    broker: AmqpBroker,
}

impl InProcess {
    async fn start(queue: &str, registry: Registry, config: WorkerConfig) -> Self {
        let broker = AmqpBroker::connect(&common::amqp_url()).await.unwrap();
        let backend = RedisBackend::connect(&common::redis_url()).await.unwrap();
        let config = WorkerConfig {
            queues: vec![queue.to_owned()],
            ..config
        };
        // Shared with the next worker, as in production: it counts starts across workers.
        let coordinator = task_core::coord::Coordinator::from_backend(&backend);
        let worker =
            Worker::new(config, registry, broker.clone(), backend).with_coordinator(coordinator);
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            worker
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .map(drop)
        });
        InProcess {
            stop,
            handle,
            broker,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.handle.await.unwrap().unwrap();
        self.broker.close().await;
    }
}

fn config() -> WorkerConfig {
    WorkerConfig {
        concurrency: 4,
        prefetch: 8,
        ..WorkerConfig::default()
    }
}

async fn client(queue: &str) -> Client {
    Client::connect(&common::amqp_url(), &common::redis_url())
        .await
        .unwrap()
        .with_default_queue(queue)
}

/// `test.declined(message)`: fails with `ValueError`.
struct Declined;
impl Task for Declined {
    const NAME: &'static str = "test.declined";
    type Args = (String,);
    type Output = ();
    async fn run(&self, _ctx: TaskContext, (m,): (String,)) -> Result<(), TaskError> {
        Err(TaskError::abort("ValueError", m))
    }
}

/// `test.parent()`: sends two `diag.add` children and returns their ids.
struct Parent;
impl Task for Parent {
    const NAME: &'static str = "test.parent";
    type Args = ();
    type Output = Vec<String>;
    async fn run(&self, ctx: TaskContext, (): ()) -> Result<Vec<String>, TaskError> {
        let mut ids = Vec::new();
        for x in [1, 2] {
            let r = ctx
                .client()
                .task::<task_core::diag::Add>(task_core::diag::AddArgs::new(x, 1))
                .parent(&ctx)
                .send()
                .await
                .map_err(|e| TaskError::retry(e.to_string()))?;
            ids.push(r.id().to_owned());
        }
        Ok(ids)
    }
}

/// `test.unreachable()`: the gateway is down; retried on `ConnectionError`, twice, with back-off.
#[derive(Clone, Default)]
struct Unreachable {
    attempts: Arc<Mutex<Vec<tokio::time::Instant>>>,
}
impl Task for Unreachable {
    const NAME: &'static str = "test.unreachable";
    type Args = ();
    type Output = ();
    fn options() -> TaskOptions {
        TaskOptions::default().autoretry(
            AutoRetry::on(["ConnectionError"])
                .max_retries(Some(2))
                .backoff(Duration::from_millis(400), Duration::from_secs(5)),
        )
    }
    async fn run(&self, _ctx: TaskContext, (): ()) -> Result<(), TaskError> {
        self.attempts
            .lock()
            .unwrap()
            .push(tokio::time::Instant::now());
        Err(TaskError::fail("ConnectionError", "gateway unreachable"))
    }
}

/// `test.invalid()`: an error the policy does not name, and one it must never retry.
struct Invalid;
impl Task for Invalid {
    const NAME: &'static str = "test.invalid";
    type Args = (bool,);
    type Output = ();
    fn options() -> TaskOptions {
        TaskOptions::default().autoretry(AutoRetry::on(["Exception"]).except(["KeyError"]))
    }
    async fn run(&self, _ctx: TaskContext, (abort,): (bool,)) -> Result<(), TaskError> {
        if abort {
            Err(TaskError::abort(
                "ConnectionError",
                "permanent: never retried",
            ))
        } else {
            Err(TaskError::fail(
                "KeyError",
                "excluded by dont_autoretry_for",
            ))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sees_rust_failures_as_celery_writes_them() {
    let queue = common::unique_queue("meta");
    let mut registry = Registry::new();
    task_core::diag::register(&mut registry);
    let unreachable = Unreachable::default();
    registry
        .register(Declined)
        .register(Parent)
        .register(unreachable.clone())
        .register(Invalid);
    let worker = InProcess::start(&queue, registry, config()).await;
    let client = client(&queue).await;

    let declined = client
        .send_task(
            "test.declined",
            vec![json!("bad value")],
            Default::default(),
        )
        .send()
        .await
        .unwrap();
    let limited = client
        .task::<task_core::diag::Sleep>(task_core::diag::SleepArgs { ms: 30_000 })
        .time_limits(None, Some(Duration::from_secs(1)))
        .send()
        .await
        .unwrap();
    let parent = client.task::<Parent>(()).send().await.unwrap();
    let gateway = client.task::<Unreachable>(()).send().await.unwrap();
    let (not_named, aborted) = (
        client.task::<Invalid>((false,)).send().await.unwrap(),
        client.task::<Invalid>((true,)).send().await.unwrap(),
    );

    // RETRY carries the error that caused it, on the Rust side too.
    let retry_meta = common::eventually("a RETRY state", Duration::from_secs(20), || async {
        gateway
            .meta()
            .await
            .unwrap()
            .filter(|m| m.status == TaskState::Retry)
    })
    .await;
    let exc = retry_meta.exception_info().unwrap();
    assert_eq!(
        (exc.exc_module.as_str(), exc.exc_type.as_str()),
        ("builtins", "ConnectionError")
    );
    assert!(
        retry_meta
            .traceback
            .as_deref()
            .unwrap()
            .ends_with("ConnectionError: gateway unreachable\n")
    );

    let ids = json!([
        declined.id(),
        limited.id(),
        parent.id(),
        gateway.id(),
        not_named.id(),
        aborted.id()
    ]);
    let seen = python(json!({"read_many": ids, "timeout": 40})).await;
    let [declined, limited, parent, gateway, not_named, aborted] =
        <[Value; 6]>::try_from(seen.as_array().unwrap().clone()).unwrap();

    // `ValueError` raised in Rust is `ValueError` in Python, with a Python-style traceback.
    let e = &declined["exception"];
    assert_eq!(
        (e["class"].as_str(), e["module"].as_str()),
        (Some("ValueError"), Some("builtins")),
        "{declined}"
    );
    assert_eq!(e["args"], json!(["bad value"]));
    let tb = declined["traceback"].as_str().expect("a traceback");
    assert!(
        tb.starts_with("Traceback (most recent call last):\n"),
        "{tb}"
    );
    assert!(tb.contains("in test.declined"), "{tb}");
    assert!(tb.ends_with("ValueError: bad value\n"), "{tb}");

    // A hard time limit is `celery.exceptions.TimeLimitExceeded(1)`: the limit, as a number.
    let e = &limited["exception"];
    assert_eq!(e["class"], "TimeLimitExceeded", "{limited}");
    assert_eq!(e["is_time_limit"], true, "{limited}");
    assert_eq!(e["args"], json!([1]), "{limited}");

    // Tasks sent by a task are its children.
    let children = parent["children"].as_array().expect("children").clone();
    let sent = parent["result"].as_array().unwrap();
    assert_eq!(children.len(), 2, "{parent}");
    for (child, id) in children.iter().zip(sent) {
        assert_eq!(child[0][0], *id, "{parent}");
    }

    // autoretry_for: RETRY twice with the ConnectionError, then FAILURE with it (not
    // MaxRetriesExceededError), the waits growing as the back-off says.
    let e = &gateway["exception"];
    assert_eq!(e["class"], "ConnectionError", "{gateway}");
    assert_eq!(e["is_connection_error"], true);
    let attempts = unreachable.attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 3, "a first run and two retries");
    let waits: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    // Retry n waits within [d/2, d] for d = 400 ms × 2ⁿ.
    assert!(waits[0] >= Duration::from_millis(200), "{waits:?}");
    assert!(waits[1] >= Duration::from_millis(400), "{waits:?}");
    // A kind the policy excludes, and an abort, fail at once.
    assert_eq!(not_named["exception"]["class"], "KeyError", "{not_named}");
    assert_eq!(
        aborted["exception"]["class"], "ConnectionError",
        "{aborted}"
    );
    for r in [&not_named, &aborted] {
        let id = r["id"].as_str().unwrap();
        let meta = client.result::<Value>(id).meta().await.unwrap().unwrap();
        assert_eq!(meta.retries, Some(0), "{r}");
    }
    eprintln!("retry waits with a 400 ms back-off factor: {waits:?}");
    worker.stop().await;
    client.broker().delete_queue(&queue).await.unwrap();
}

/// What the hooks and signals saw, in order.
static EVENTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn seen(event: String) {
    EVENTS.lock().unwrap().push(event);
}

/// `test.hooked(fail)`: records its hooks.
struct Hooked;
impl Task for Hooked {
    const NAME: &'static str = "test.hooked";
    type Args = (bool,);
    type Output = String;
    async fn run(&self, _ctx: TaskContext, (fail,): (bool,)) -> Result<String, TaskError> {
        if fail {
            Err(TaskError::abort("ValueError", "asked to fail"))
        } else {
            Ok("done".into())
        }
    }
    fn on_success(&self, ctx: &TaskContext, output: &String) {
        seen(format!("on_success {} {output}", ctx.id));
    }
    fn on_failure(&self, ctx: &TaskContext, exception: &task_core::backend::ExceptionInfo) {
        seen(format!("on_failure {} {}", ctx.id, exception.exc_type));
    }
    fn after_return(&self, ctx: &TaskContext, state: TaskState) {
        seen(format!("after_return {} {state}", ctx.id));
    }
}

/// `test.quiet(store)`: fails; results are ignored, errors stored only when `store` says.
struct Quiet;
impl Task for Quiet {
    const NAME: &'static str = "test.quiet";
    type Args = ();
    type Output = ();
    fn options() -> TaskOptions {
        TaskOptions::default().ignore_result(true)
    }
    async fn run(&self, _ctx: TaskContext, (): ()) -> Result<(), TaskError> {
        Err(TaskError::abort("ValueError", "ignored"))
    }
}

/// `test.loud()`: as `test.quiet`, with `store_errors_even_if_ignored`.
struct Loud;
impl Task for Loud {
    const NAME: &'static str = "test.loud";
    type Args = ();
    type Output = ();
    fn options() -> TaskOptions {
        TaskOptions::default()
            .ignore_result(true)
            .store_errors_even_if_ignored(true)
    }
    async fn run(&self, _ctx: TaskContext, (): ()) -> Result<(), TaskError> {
        Err(TaskError::abort("ValueError", "stored anyway"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_signals_ignored_errors_and_routes() {
    let queue = common::unique_queue("hooks");
    let routed = common::unique_queue("routed");
    let mut registry = Registry::new();
    registry.register(Hooked).register(Quiet).register(Loud);
    task_core::diag::register(&mut registry);
    let prerun = task_core::signals::on_prerun(|run| {
        seen(format!("prerun {} {}", run.task_id, run.task));
    });
    let postrun = task_core::signals::on_postrun(|run| {
        seen(format!("postrun {} {}", run.task_id, run.state));
    });
    let worker = InProcess::start(&queue, registry, config()).await;
    let routed_worker = {
        let mut r = Registry::new();
        task_core::diag::register(&mut r);
        InProcess::start(&routed, r, config()).await
    };
    // task_routes: `diag.*` goes to the routed queue, the rest to the default one.
    let client = client(&queue)
        .await
        .with_routes(Routes::new().route("diag.*", routed.as_str()));

    let ok = client.task::<Hooked>((false,)).send().await.unwrap();
    let failed = client.task::<Hooked>((true,)).send().await.unwrap();
    assert_eq!(ok.get(Duration::from_secs(20)).await.unwrap(), "done");
    assert!(failed.get(Duration::from_secs(20)).await.is_err());

    let quiet = client.task::<Quiet>(()).send().await.unwrap();
    let loud = client.task::<Loud>(()).send().await.unwrap();
    let loud_meta = loud.get(Duration::from_secs(20)).await;
    assert!(
        matches!(&loud_meta, Err(task_core::Error::TaskFailed { exception, .. }) if exception.message() == "stored anyway"),
        "{loud_meta:?}"
    );
    let quiet_id = quiet.id().to_owned();
    common::eventually("test.quiet to finish", Duration::from_secs(20), || async {
        let events = EVENTS.lock().unwrap();
        events
            .iter()
            .any(|e| *e == format!("postrun {quiet_id} FAILURE"))
            .then_some(())
    })
    .await;
    assert_eq!(
        quiet.meta().await.unwrap(),
        None,
        "an ignored result's FAILURE is not stored"
    );

    let sum = client
        .task::<task_core::diag::Add>(task_core::diag::AddArgs::new(2, 3))
        .send()
        .await
        .unwrap();
    assert_eq!(sum.get(Duration::from_secs(20)).await.unwrap(), 5.into());
    let meta = sum.meta().await.unwrap().unwrap();
    assert_eq!(
        meta.queue.as_deref(),
        Some(routed.as_str()),
        "routed by name"
    );

    prerun.disconnect();
    postrun.disconnect();
    let events = EVENTS.lock().unwrap().clone();
    let of = |id: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e.contains(id))
            .map(|e| e.replace(id, "<id>"))
            .collect()
    };
    assert_eq!(
        of(ok.id()),
        [
            "prerun <id> test.hooked",
            "on_success <id> done",
            "after_return <id> SUCCESS",
            "postrun <id> SUCCESS"
        ]
    );
    assert_eq!(
        of(failed.id()),
        [
            "prerun <id> test.hooked",
            "on_failure <id> ValueError",
            "after_return <id> FAILURE",
            "postrun <id> FAILURE"
        ]
    );
    worker.stop().await;
    routed_worker.stop().await;
    client.broker().delete_queue(&queue).await.unwrap();
    client.broker().delete_queue(&routed).await.unwrap();
}

/// Starts of each stuck task, by name.
static STARTS: Mutex<Option<HashMap<&'static str, u32>>> = Mutex::new(None);

fn starts(name: &'static str) -> u32 {
    STARTS
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|m| m.get(name).copied())
        .unwrap_or(0)
}

macro_rules! stuck_task {
    ($ty:ident, $name:literal, $options:expr) => {
        struct $ty;
        impl Task for $ty {
            const NAME: &'static str = $name;
            type Args = ();
            type Output = ();
            fn options() -> TaskOptions {
                $options
            }
            async fn run(&self, _ctx: TaskContext, (): ()) -> Result<(), TaskError> {
                *STARTS
                    .lock()
                    .unwrap()
                    .get_or_insert_with(HashMap::new)
                    .entry($name)
                    .or_default() += 1;
                // Never finishes while the first worker lives: it stops under it.
                static RUNS: AtomicU32 = AtomicU32::new(0);
                if RUNS.fetch_add(1, Ordering::SeqCst) == 0 {
                    std::future::pending::<()>().await;
                }
                Ok(())
            }
        }
    };
}

stuck_task!(StuckLate, "test.stuck_late", TaskOptions::default());
stuck_task!(
    StuckEarly,
    "test.stuck_early",
    TaskOptions::default().acks_late(false)
);
stuck_task!(
    StuckLost,
    "test.stuck_lost",
    TaskOptions::default().reject_on_worker_lost(false)
);

fn stuck_registry() -> Registry {
    let mut r = Registry::new();
    r.register(StuckLate)
        .register(StuckEarly)
        .register(StuckLost);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_late_and_reject_on_worker_lost_decide_what_a_lost_worker_leaves() {
    let queue = common::unique_queue("lost");
    let config = WorkerConfig {
        shutdown_timeout: Duration::from_millis(200),
        ..config()
    };
    let first = InProcess::start(&queue, stuck_registry(), config.clone()).await;
    let client = client(&queue).await;
    let late = client.task::<StuckLate>(()).send().await.unwrap();
    let early = client.task::<StuckEarly>(()).send().await.unwrap();
    let lost = client.task::<StuckLost>(()).send().await.unwrap();
    common::eventually("all three to start", Duration::from_secs(20), || async {
        (starts("test.stuck_late") == 1
            && starts("test.stuck_early") == 1
            && starts("test.stuck_lost") == 1)
            .then_some(())
    })
    .await;
    // The worker dies with all three running: RabbitMQ takes back what it had not acknowledged,
    // all of it at once when the connection closes.
    first.stop().await;
    let back = common::eventually(
        "the unacknowledged messages back",
        Duration::from_secs(20),
        || async {
            let n = client.broker().queue_length(&queue).await.unwrap();
            (n >= 2).then_some(n)
        },
    )
    .await;
    assert_eq!(
        back, 2,
        "acks_late=False acknowledged its message as it started; the other two come back"
    );

    let second = InProcess::start(&queue, stuck_registry(), config).await;
    // Default (acks late, run again after a lost worker): it runs again and succeeds.
    late.get(Duration::from_secs(20)).await.unwrap();
    assert_eq!(starts("test.stuck_late"), 2);
    // reject_on_worker_lost=False: FAILURE WorkerLostError, not a second run.
    let outcome = python(json!({"read": lost.id(), "timeout": 20})).await;
    assert_eq!(outcome["state"], "FAILURE", "{outcome}");
    assert_eq!(
        outcome["exception"]["class"], "WorkerLostError",
        "{outcome}"
    );
    assert_eq!(starts("test.stuck_lost"), 1);
    assert_eq!(starts("test.stuck_early"), 1);
    assert_eq!(
        early.meta().await.unwrap(),
        None,
        "never finished, never stored"
    );
    second.stop().await;
    client.broker().delete_queue(&queue).await.unwrap();
}

/// The exact ETA a naive time means depends on the worker's time zone (Celery's `timezone`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naive_eta_and_expires_are_read_in_the_workers_timezone() {
    let queue = common::unique_queue("tz");
    let zone: task_core::clock::Tz = "Asia/Tokyo".parse().unwrap();
    let config = WorkerConfig {
        clock: task_core::Clock::system().with_timezone(zone),
        ..config()
    };
    let mut registry = Registry::new();
    task_core::diag::register(&mut registry);
    let worker = InProcess::start(&queue, registry, config).await;
    let base = json!({"queue": queue, "task": "diag.add", "args": [1, 2], "timeout": 20});
    let with = |extra: Value| {
        let mut cfg = base.clone();
        cfg.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        cfg
    };
    // A naive ETA 3 s ahead in Tokyo: read as UTC it would be 9 hours away.
    let (eta, expired) = tokio::join!(
        python(with(json!({"naive_eta_in": "Asia/Tokyo", "eta_in": 3}))),
        python(with(
            json!({"naive_expires_in": "Asia/Tokyo", "expires_in": -60, "options": {"countdown": 1}})
        )),
    );
    assert_eq!(eta["result"], json!(3), "{eta}");
    let elapsed = eta["elapsed"].as_f64().unwrap();
    assert!(elapsed >= 2.5, "ran after {elapsed} s");
    // Expired a minute ago in Tokyo (9 hours ahead if read as UTC).
    assert_eq!(expired["state"], "REVOKED", "{expired}");
    eprintln!("naive Tokyo ETA 3 s ahead ran after {elapsed:.2} s");
    worker.stop().await;
    let broker = AmqpBroker::connect(&common::amqp_url()).await.unwrap();
    broker.delete_queue(&queue).await.unwrap();
}
