//! Helpers for tests that run the `worker` binary against the real services.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

pub fn unique_queue(prefix: &str) -> String {
    format!("test.{prefix}.{}", uuid::Uuid::new_v4().simple())
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// The virtualenv Python with `celery` installed (`scripts/test` creates `.venv`).
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("INTEROP_PYTHON") {
        return p.into();
    }
    let p = workspace_root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/test (it creates the virtualenv with celery)",
        p.display()
    );
    p
}

/// A `worker` process, killed when dropped.
pub struct WorkerProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl WorkerProcess {
    pub fn spawn(queue: &str, extra: &[(&str, &str)]) -> Self {
        let log =
            std::env::temp_dir().join(format!("worker-{}.log", uuid::Uuid::new_v4().simple()));
        let file = std::fs::File::create(&log).expect("worker log file");
        // `WORKER_BIN` runs the tests against another build (a release one, an older one).
        let bin = std::env::var_os("WORKER_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_worker")));
        let mut cmd = Command::new(bin);
        cmd.env("BROKER_URL", amqp_url())
            .env("RESULT_BACKEND", redis_url())
            .env("WORKER_QUEUES", queue)
            .env("WORKER_TASKS", "diag")
            .env("RUST_LOG", "info")
            .env("LOG_FORMAT", "json")
            .env("METRICS_BIND", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .kill_on_drop(true);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn the worker binary");
        WorkerProcess { child, log }
    }

    pub fn pid(&self) -> i32 {
        self.child.id().expect("worker pid") as i32
    }

    pub fn signal(&self, signal: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{signal} failed");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address the worker serves `/metrics`, `/livez` and `/readyz` on, from its log (the
    /// tests bind port 0).
    pub async fn metrics_addr(&self) -> SocketAddr {
        eventually(
            "the worker to log its metrics address",
            Duration::from_secs(30),
            || async {
                self.log_text()
                    .lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .find(|l| l["message"] == "serving /metrics, /livez and /readyz")
                    .and_then(|l| l["addr"].as_str()?.parse().ok())
            },
        )
        .await
    }

    /// Waits until the worker logs that it is consuming.
    pub async fn ready(&self) {
        eventually(
            "the worker to start consuming",
            Duration::from_secs(30),
            || async { self.log_text().contains("worker ready").then_some(()) },
        )
        .await;
    }
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

/// `GET http://<addr><path>`: the status and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"));
    let status = response.status().as_u16();
    (status, response.text().await.expect("a text body"))
}

/// Counts SUCCESS announcements per task id, as seen on Redis pub/sub.
pub fn count_successes(
    mut pubsub: redis::aio::PubSub,
) -> tokio::sync::watch::Receiver<std::collections::HashMap<String, u32>> {
    let (tx, rx) = tokio::sync::watch::channel(std::collections::HashMap::new());
    tokio::spawn(async move {
        use futures_util::StreamExt as _;
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            let payload: Vec<u8> = msg.get_payload().unwrap_or_default();
            if let Ok(meta) = serde_json::from_slice::<serde_json::Value>(&payload)
                && meta["status"] == "SUCCESS"
            {
                let id = meta["task_id"].as_str().unwrap_or_default().to_owned();
                tx.send_modify(|m| *m.entry(id).or_default() += 1);
            }
        }
    });
    rx
}

/// `GET <path>` on the RabbitMQ management API at `127.0.0.1:<port>` as guest: the JSON, or why
/// not (a node that is down, a queue that is gone).
pub async fn management_get(port: u16, path: &str) -> Result<serde_json::Value, String> {
    let url = format!("http://127.0.0.1:{port}/api/{path}");
    let response = reqwest::Client::new()
        .get(&url)
        .basic_auth("guest", Some("guest"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("GET {url}: {}", response.status()));
    }
    response.json().await.map_err(|e| format!("GET {url}: {e}"))
}

/// How often each task started, from a worker's JSON log with `task_core::worker=debug` (its
/// `started` line, in the task's span): results alone cannot show a task that ran twice, since
/// the second run's store changes nothing.
pub fn starts(log: &str) -> std::collections::HashMap<String, u32> {
    let mut n = std::collections::HashMap::new();
    for line in log
        .lines()
        .filter(|l| l.contains("\"message\":\"started\""))
    {
        if let Some(rest) = line.split("\"task_id\":\"").nth(1)
            && let Some(id) = rest.split('"').next()
        {
            *n.entry(id.to_owned()).or_default() += 1;
        }
    }
    n
}
