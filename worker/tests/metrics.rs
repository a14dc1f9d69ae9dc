//! The worker binary's `/metrics`, `/livez` and `/readyz`: the metrics parse as OpenMetrics (with
//! Python's `prometheus_client`, the parser Prometheus' own tooling follows) and count exactly
//! the work done; readiness follows the result backend's Redis while liveness does not.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Map, Value, json};
use task_core::diag::{self, AddArgs, FailArgs};
use task_core::{Broker, Client, Error};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

/// `/metrics` of the worker at `addr`, parsed by `examples/python/parse_metrics.py`.
async fn scrape(addr: SocketAddr) -> Metrics {
    let (status, text) = common::http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    let script = common::workspace_root().join("examples/python/parse_metrics.py");
    let mut child = Command::new(common::python())
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run parse_metrics.py");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "prometheus_client rejects /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    Metrics(serde_json::from_slice(&out.stdout).expect("parse_metrics.py prints JSON"))
}

/// Families as prometheus_client reads them: name → {type, samples}.
struct Metrics(Map<String, Value>);

impl Metrics {
    fn family_type(&self, family: &str) -> &str {
        self.0[family]["type"].as_str().unwrap_or_default()
    }

    /// The samples named `sample` whose labels include `labels`.
    fn matching<'a>(
        &'a self,
        sample: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Map<String, Value>> + 'a {
        self.0
            .values()
            .flat_map(|f| f["samples"].as_array().into_iter().flatten())
            .filter_map(Value::as_object)
            .filter(move |s| {
                s["name"] == sample && labels.iter().all(|(k, v)| s["labels"][*k] == *v)
            })
    }

    /// The value of the one sample named `sample` with these labels (among others), or 0 when
    /// there is none (a series not created yet).
    fn value(&self, sample: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<_> = self.matching(sample, labels).collect();
        assert!(
            found.len() <= 1,
            "{sample} {labels:?}: several samples {found:?}"
        );
        found
            .first()
            .map_or(0.0, |s| s["value"].as_f64().expect("a number"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_openmetrics_and_count_the_work_done() {
    let queue = common::unique_queue("metrics");
    let worker = common::WorkerProcess::spawn(&queue, &[("WORKER_CONCURRENCY", "4")]);
    worker.ready().await;
    let addr = worker.metrics_addr().await;
    let client = Client::connect(&common::amqp_url(), &common::redis_url())
        .await
        .unwrap()
        .with_default_queue(&queue);

    let mut adds = Vec::new();
    for i in 0..20 {
        adds.push(
            client
                .task::<diag::Add>(AddArgs::new(i, 1))
                .send()
                .await
                .unwrap(),
        );
    }
    let mut fails = Vec::new();
    for i in 0..3 {
        let args = FailArgs {
            message: format!("boom {i}"),
        };
        fails.push(client.task::<diag::Fail>(args).send().await.unwrap());
    }
    let unknown = client
        .send_task("metrics.no_such_task", vec![json!(1)], Map::new())
        .send()
        .await
        .unwrap();

    let timeout = Duration::from_secs(30);
    for (i, r) in adds.iter().enumerate() {
        assert_eq!(r.get(timeout).await.unwrap(), (i as i64 + 1).into());
    }
    for r in &fails {
        let err = r.get(timeout).await.unwrap_err();
        assert!(
            matches!(&err, Error::TaskFailed { exception, .. } if exception.exc_type == "ValueError"),
            "{err}"
        );
    }
    let err = unknown.get(timeout).await.unwrap_err();
    assert!(
        matches!(&err, Error::TaskFailed { exception, .. } if exception.exc_type == "NotRegistered"),
        "{err}"
    );

    // The worker counts a delivery before it stores its result, so everything is counted now.
    let m = scrape(addr).await;
    assert_eq!(m.family_type("tq_tasks_received"), "counter");
    assert_eq!(m.family_type("tq_tasks_completed"), "counter");
    assert_eq!(m.family_type("tq_task_runtime_seconds"), "histogram");
    assert_eq!(m.family_type("tq_task_queue_wait_seconds"), "histogram");
    assert_eq!(m.family_type("tq_worker_active_tasks"), "gauge");
    assert_eq!(m.family_type("tq_build"), "info");

    let q = queue.as_str();
    let received = |task| m.value("tq_tasks_received_total", &[("task", task), ("queue", q)]);
    let completed = |task, outcome| {
        m.value(
            "tq_tasks_completed_total",
            &[("task", task), ("queue", q), ("outcome", outcome)],
        )
    };
    let runs = |task| {
        m.value(
            "tq_task_runtime_seconds_count",
            &[("task", task), ("queue", q)],
        )
    };
    let waits = |task| {
        m.value(
            "tq_task_queue_wait_seconds_count",
            &[("task", task), ("queue", q)],
        )
    };
    let unregistered = task_core::metrics::UNREGISTERED_TASK;

    assert_eq!(received("diag.add"), 20.0);
    assert_eq!(received("diag.fail"), 3.0);
    assert_eq!(received(unregistered), 1.0);
    assert_eq!(completed("diag.add", "success"), 20.0);
    assert_eq!(completed("diag.fail", "failure"), 3.0);
    assert_eq!(completed(unregistered, "dead_lettered"), 1.0);
    // Nothing else was settled, and an unknown name creates no series of its own.
    let settled: f64 = m
        .matching("tq_tasks_completed_total", &[("queue", q)])
        .map(|s| s["value"].as_f64().unwrap())
        .sum();
    assert_eq!(settled, 24.0);
    assert_eq!(
        m.matching(
            "tq_tasks_received_total",
            &[("task", "metrics.no_such_task")]
        )
        .count()
            + m.matching(
                "tq_tasks_completed_total",
                &[("task", "metrics.no_such_task")]
            )
            .count(),
        0,
        "the unknown task name became a label value"
    );

    assert_eq!(runs("diag.add"), 20.0);
    assert_eq!(runs("diag.fail"), 3.0);
    assert_eq!(runs(unregistered), 0.0);
    assert_eq!(waits("diag.add"), 20.0);
    assert_eq!(waits("diag.fail"), 3.0);
    let inf_bucket = m.value(
        "tq_task_runtime_seconds_bucket",
        &[("task", "diag.add"), ("queue", q), ("le", "+Inf")],
    );
    assert_eq!(inf_bucket, 20.0);
    let sum = m.value(
        "tq_task_runtime_seconds_sum",
        &[("task", "diag.add"), ("queue", q)],
    );
    assert!(
        (0.0..2.0).contains(&sum),
        "20 additions ran for {sum} s in all"
    );

    let concurrency = m.matching("tq_worker_concurrency", &[]).collect::<Vec<_>>();
    assert_eq!(concurrency.len(), 1, "{concurrency:?}");
    assert_eq!(concurrency[0]["value"], 4.0);
    assert!(
        concurrency[0]["labels"]["worker"]
            .as_str()
            .is_some_and(|w| w.starts_with("celery@")),
        "{concurrency:?}"
    );
    assert_eq!(
        m.value("tq_build_info", &[("version", env!("CARGO_PKG_VERSION"))]),
        1.0
    );

    drop(worker);
    client.broker().delete_queue(&queue).await.unwrap();
}

/// A free TCP port on 127.0.0.1 (bound, then released for the process that needs it).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().unwrap().port()
}

/// A private `redis-server` without persistence, killed when dropped.
fn redis_server(port: u16) -> Child {
    Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--bind", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start redis-server (Debian's redis-server package)")
}

async fn redis_answers(url: &str) -> Option<()> {
    let client = redis::Client::open(url).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.ok()?;
    (pong == "PONG").then_some(())
}

/// `/readyz`: its status and its JSON body.
async fn readyz(addr: SocketAddr) -> (u16, BTreeMap<String, String>) {
    let (status, body) = common::http_get(addr, "/readyz").await;
    let body = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("/readyz body is not a JSON object of strings ({e}): {body}"));
    (status, body)
}

async fn assert_live(addr: SocketAddr) {
    assert_eq!(
        common::http_get(addr, "/livez").await,
        (200, "ok".to_owned())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_result_backend_and_livez_does_not() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let mut redis = redis_server(port);
    common::eventually(
        "the private redis-server to answer",
        Duration::from_secs(10),
        || redis_answers(&url),
    )
    .await;

    let queue = common::unique_queue("readyz");
    let worker = common::WorkerProcess::spawn(&queue, &[("RESULT_BACKEND", url.as_str())]);
    worker.ready().await;
    let addr = worker.metrics_addr().await;
    let wait = Duration::from_secs(30);
    common::eventually("/readyz to be 200 with Redis up", wait, || async {
        assert_live(addr).await;
        let (status, body) = readyz(addr).await;
        (status == 200).then_some(body)
    })
    .await;

    let pid = redis.id().expect("redis-server pid").to_string();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -TERM redis-server");
    tokio::time::timeout(Duration::from_secs(10), redis.wait())
        .await
        .expect("redis-server to exit after SIGTERM")
        .unwrap();

    let down = common::eventually("/readyz to be 503 with Redis stopped", wait, || async {
        assert_live(addr).await;
        let (status, body) = readyz(addr).await;
        (status == 503).then_some(body)
    })
    .await;
    println!("/readyz with Redis stopped: {down:?}");
    assert!(
        down.get("backend")
            .is_some_and(|b| b.starts_with("unreachable")),
        "{down:?}"
    );
    assert_eq!(
        down.get("broker").map(String::as_str),
        Some("ok"),
        "{down:?}"
    );

    let _redis = redis_server(port);
    let up = common::eventually("/readyz to be 200 with Redis back", wait, || async {
        assert_live(addr).await;
        let (status, body) = readyz(addr).await;
        (status == 200).then_some(body)
    })
    .await;
    assert_eq!(up.get("backend").map(String::as_str), Some("ok"), "{up:?}");

    // And the worker works again: a task's result reaches the restarted Redis.
    let client = Client::connect(&common::amqp_url(), &url)
        .await
        .unwrap()
        .with_default_queue(&queue);
    let sum = client
        .task::<diag::Add>(AddArgs::new(2, 3))
        .send()
        .await
        .unwrap()
        .get(wait)
        .await
        .unwrap();
    assert_eq!(sum, 5.into());
    assert_live(addr).await;

    drop(worker);
    client.broker().delete_queue(&queue).await.unwrap();
}
