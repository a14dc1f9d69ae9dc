//! A monitor test environment: a fresh PostgreSQL database, an events queue of the test's own
//! (other tests, and other crates' tests, send events to the same `celeryev` exchange, so every
//! assertion picks out this test's task ids and node names), an in-process Rust worker with task
//! events on, and helpers to call the router with `oneshot`.

#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use monitor::Config;
use serde_json::Value;
use sqlx::PgPool;
use task_core::{AmqpBroker, RedisBackend, Registry, Worker, WorkerConfig};
use tokio::sync::oneshot;
use tower::ServiceExt;

pub fn admin_url() -> String {
    std::env::var("DATABASE_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// A database name that does not exist yet (the monitor creates it) and its URL.
pub fn fresh_database() -> (String, String) {
    let name = format!("monitor_test_{}", uuid::Uuid::new_v4().simple());
    let url = admin_url()
        .rsplit_once('/')
        .map(|(base, _)| format!("{base}/{name}"))
        .expect("a database URL");
    (name, url)
}

pub async fn drop_database(name: &str) {
    if let Ok(admin) = PgPool::connect(&admin_url()).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&admin)
        .await;
    }
}

/// Settings for a test: a fresh database, an events queue of its own that RabbitMQ deletes ten
/// minutes after the test stops reading it, short batches.
pub fn config() -> (Config, String) {
    let (db_name, db_url) = fresh_database();
    let mut c = Config::from_env().expect("the monitor's environment parses");
    c.bind = "127.0.0.1:0".parse().unwrap();
    c.database_url = db_url;
    c.broker_url = amqp_url();
    c.result_backend = redis_url();
    c.events_queue = unique("test.monitor.events");
    c.events_ttl = Duration::from_secs(600);
    c.events_queue_expires = Some(Duration::from_secs(600));
    c.events_max_length = 200_000;
    c.batch_wait = Duration::from_millis(50);
    c.inspect_timeout = Duration::from_millis(1500);
    // Tests share one Redis: a monitor walking it would take in every other test's results.
    // The reconciliation test calls it directly.
    c.reconcile_every = Duration::from_secs(24 * 3600);
    // Some tests write events with timestamps long past; the retention test sweeps itself.
    c.retention = monitor::retention::Retention::default();
    (c, db_name)
}

/// Polls `check` every 25 ms until it returns `Some`, failing with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Calls `router` once: the status and the body as text.
pub async fn call(router: &Router, method: &str, path: &str, body: &str) -> (StatusCode, String) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 64 << 20)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// `GET path` that must answer 200 with JSON.
pub async fn get_json(router: &Router, path: &str) -> Value {
    let (status, body) = call(router, "GET", path, "").await;
    assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
}

/// `POST path` with `body` that must answer 200 with JSON.
pub async fn post_json(router: &Router, path: &str, body: &str) -> Value {
    let (status, text) = call(router, "POST", path, body).await;
    assert_eq!(status, StatusCode::OK, "POST {path}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {path}: not JSON ({e}): {text}"))
}

/// An in-process Rust worker with the diagnostic tasks and task events on.
pub struct TestWorker {
    pub hostname: String,
    pub queue: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<
        tokio::task::JoinHandle<task_core::Result<std::sync::Arc<task_core::worker::WorkerStats>>>,
    >,
}

impl TestWorker {
    pub async fn start(queue: &str, concurrency: usize) -> Self {
        Self::start_with(queue, concurrency, |_| {}).await
    }

    /// A worker with the diagnostic tasks and whatever `more` registers.
    pub async fn start_with(
        queue: &str,
        concurrency: usize,
        more: impl FnOnce(&mut Registry),
    ) -> Self {
        let hostname = format!("{}@test", unique("rs"));
        let broker = AmqpBroker::connect(&amqp_url()).await.expect("RabbitMQ");
        let backend = RedisBackend::connect(&redis_url()).await.expect("Redis");
        let mut registry = Registry::new();
        task_core::diag::register(&mut registry);
        more(&mut registry);
        let config = WorkerConfig {
            hostname: hostname.clone(),
            queues: vec![queue.to_owned()],
            concurrency,
            prefetch: task_core::worker::default_prefetch(concurrency),
            task_events: true,
            ..WorkerConfig::default()
        };
        let worker = Worker::new(config, registry, broker, backend);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(worker.run(async move {
            let _ = stopped.await;
        }));
        TestWorker {
            hostname,
            queue: queue.to_owned(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Whether the worker's run has returned (e.g. after a remote `shutdown`).
    pub fn finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the worker and waits for it (its last events are flushed).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(60), task).await;
        }
    }
}

/// A task client on the test queue.
pub async fn client(queue: &str) -> task_core::Client {
    task_core::Client::connect(&amqp_url(), &redis_url())
        .await
        .expect("RabbitMQ and Redis")
        .with_default_queue(queue)
}

/// Deletes a test's events queue.
pub async fn delete_queue(name: &str) {
    monitor::broker::QueueProbe::new(amqp_url())
        .delete(name)
        .await
        .expect("delete the events queue");
}
