//! The worker binary's promises to an operator: a bad setting stops it with one line naming the
//! variable; SIGTERM drains within `WORKER_SHUTDOWN_TIMEOUT`; a second signal stops it at once.

mod common;

use std::time::Duration;

use serde_json::json;
use task_core::{Broker, Client};

/// Runs the worker with `env` and returns (exit code, stderr) when it refuses to start.
async fn refused(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_worker"));
    cmd.env("WORKER_TASKS", "diag")
        .env("METRICS_BIND", "off")
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("a worker with a bad setting exits")
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_setting_stops_the_worker_with_one_line_naming_it() {
    for (env, name) in [
        (("WORKER_CONCURRENCY", "0"), "WORKER_CONCURRENCY"),
        (("WORKER_CONCURRENCY", "many"), "WORKER_CONCURRENCY"),
        (("BROKER_URL", "http://127.0.0.1:5672"), "BROKER_URL"),
        (("RESULT_BACKEND", "mysql://x"), "RESULT_BACKEND"),
        (("WORKER_TASKS", "diag,nonsense"), "WORKER_TASKS"),
        (("LOG_FORMAT", "xml"), "LOG_FORMAT"),
        (("WORKER_REVOKE_TTL", "0"), "WORKER_REVOKE_TTL"),
    ] {
        let (code, stderr) = refused(&[env]).await;
        assert_eq!(code, Some(2), "{env:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{env:?}: more than one line: {stderr}");
        assert!(lines[0].contains(name), "{env:?}: {stderr}");
    }
    // Settings checked after parsing fail the same way (exit 1, one `worker: …` line).
    for (env, name) in [
        (("METRICS_BIND", "not-an-address"), "METRICS_BIND"),
        (("WORKER_QUEUES", "celery, ,x"), "WORKER_QUEUES"),
    ] {
        let (code, stderr) = refused(&[env]).await;
        assert_ne!(code, Some(0), "{env:?}: {stderr}");
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("worker: "))
            .collect();
        assert_eq!(errors.len(), 1, "{env:?}: {stderr}");
        assert!(errors[0].contains(name), "{env:?}: {stderr}");
    }
}

async fn start_long_task(queue: &str) -> (Client, String) {
    let client = Client::connect(&common::amqp_url(), &common::redis_url())
        .await
        .unwrap()
        .with_default_queue(queue);
    let r = client
        .send_task("diag.sleep", vec![json!(60_000)], Default::default())
        .send()
        .await
        .unwrap();
    (client, r.id().to_owned())
}

async fn wait_started(worker: &common::WorkerProcess, node: &str) {
    let amqp = task_core::AmqpBroker::connect(&common::amqp_url())
        .await
        .unwrap();
    common::eventually(
        "the long task to start",
        Duration::from_secs(20),
        || async {
            let replies = task_core::control::broadcast(
                &amqp,
                "active",
                json!({}),
                Some(&[node.to_owned()]),
                Duration::from_secs(2),
                Some(1),
            )
            .await
            .ok()?;
            let (_, active) = replies.into_iter().next()?;
            (active.as_array()?.len() == 1).then_some(())
        },
    )
    .await;
    let _ = worker;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shutdown_timeout_ends_the_drain_and_the_message_comes_back() {
    let queue = common::unique_queue("shutdown-timeout");
    let node = format!("timeout-{}@test", uuid::Uuid::new_v4().simple());
    let mut worker = common::WorkerProcess::spawn(
        &queue,
        &[
            ("WORKER_HOSTNAME", node.as_str()),
            ("WORKER_SHUTDOWN_TIMEOUT", "1"),
        ],
    );
    worker.ready().await;
    let (client, _) = start_long_task(&queue).await;
    wait_started(&worker, &node).await;
    let asked = std::time::Instant::now();
    worker.signal("TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), worker.child.wait())
        .await
        .expect("the worker exits after its shutdown timeout")
        .unwrap();
    assert!(status.success(), "{status}");
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_secs(1),
        "exited before the timeout: {took:?}"
    );
    assert!(
        worker
            .log_text()
            .contains("tasks still running at the shutdown deadline"),
        "{}",
        worker.log_text()
    );
    // The abandoned task's message is back in the queue for another worker.
    common::eventually(
        "the message to be requeued",
        Duration::from_secs(10),
        || async { (client.broker().queue_length(&queue).await.ok()? == 1).then_some(()) },
    )
    .await;
    client.broker().delete_queue(&queue).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_the_worker_at_once() {
    let queue = common::unique_queue("second-signal");
    let node = format!("second-{}@test", uuid::Uuid::new_v4().simple());
    let mut worker = common::WorkerProcess::spawn(&queue, &[("WORKER_HOSTNAME", node.as_str())]);
    worker.ready().await;
    let (client, _) = start_long_task(&queue).await;
    wait_started(&worker, &node).await;
    worker.signal("TERM");
    common::eventually("the drain to begin", Duration::from_secs(10), || async {
        worker.log_text().contains("draining").then_some(())
    })
    .await;
    // Still draining: the task has most of a minute left and the timeout is 30 s.
    assert!(worker.child.try_wait().unwrap().is_none());
    worker.signal("TERM");
    let status = tokio::time::timeout(Duration::from_secs(10), worker.child.wait())
        .await
        .expect("the worker exits at the second signal")
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(
        worker.log_text().contains("second signal"),
        "{}",
        worker.log_text()
    );
    common::eventually(
        "the message to be requeued",
        Duration::from_secs(10),
        || async { (client.broker().queue_length(&queue).await.ok()? == 1).then_some(()) },
    )
    .await;
    client.broker().delete_queue(&queue).await.unwrap();
}
