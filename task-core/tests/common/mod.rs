//! Helpers for tests against the real services (RabbitMQ, Redis) that `scripts/test` starts.
#![allow(dead_code, unreachable_pub)]

pub mod sentinel;
pub mod tls;

use std::future::Future;
use std::time::Duration;

use task_core::{AmqpBroker, AnyBackend, AnyBroker, RedisBackend, Registry, Worker, WorkerConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// RabbitMQ for tests (`AMQP_URL`, default the local broker).
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Redis for tests (`REDIS_URL`, default the local server, database 0).
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

pub async fn amqp() -> AmqpBroker {
    AmqpBroker::connect(&amqp_url())
        .await
        .expect("RabbitMQ must be running on 127.0.0.1:5672 (scripts/test starts it)")
}

pub async fn redis() -> RedisBackend {
    RedisBackend::connect(&redis_url())
        .await
        .expect("Redis must be running on 127.0.0.1:6379 (scripts/test starts it)")
}

/// A queue name no other test uses.
pub fn unique_queue(prefix: &str) -> String {
    format!("test.{prefix}.{}", uuid::Uuid::new_v4().simple())
}

/// Polls `check` every 20 ms until it returns `Some`, failing with `what` after `timeout`.
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
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A worker running in this process until stopped.
pub struct RunningWorker {
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<task_core::Result<std::sync::Arc<task_core::worker::WorkerStats>>>,
}

impl RunningWorker {
    pub fn start(
        config: WorkerConfig,
        registry: Registry,
        broker: impl Into<AnyBroker>,
        backend: impl Into<AnyBackend>,
    ) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let worker = Worker::new(config, registry, broker, backend);
        let handle = tokio::spawn(worker.run(async {
            let _ = stopped.await;
        }));
        RunningWorker {
            stop: Some(stop),
            handle,
        }
    }

    pub async fn stop(mut self) -> std::sync::Arc<task_core::worker::WorkerStats> {
        let _ = self.stop.take().map(|s| s.send(()));
        self.handle.await.expect("worker task").expect("worker run")
    }
}

pub fn config(queue: &str) -> WorkerConfig {
    WorkerConfig {
        queues: vec![queue.to_owned()],
        concurrency: 8,
        prefetch: 32,
        ..WorkerConfig::default()
    }
}

pub fn diag_registry() -> Registry {
    let mut r = Registry::new();
    task_core::diag::register(&mut r);
    r
}

/// The virtualenv Python with `celery` installed (`scripts/python-venv`, which `scripts/test`
/// runs, creates `.venv`).
pub fn python() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned();
    let p = root.join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/python-venv",
        p.display()
    );
    p
}
