//! Queue actions against the real services: pausing a queue stops its worker consuming (sent
//! tasks wait in the queue, the page says paused), resuming starts it again (they run); purging
//! drops a queue's ready messages and says how many; each in the audit log; no reason, or
//! resuming a queue that is not paused, is refused.

mod support;

use std::time::Duration;

use axum::http::StatusCode;
use monitor::Monitor;
use serde_json::{Value, json};
use support::{TestWorker, call, eventually, get_json, post_json};
use task_core::{ResultBackend, TaskState};

async fn stats(queue: &str) -> monitor::broker::QueueStats {
    monitor::broker::QueueProbe::new(support::amqp_url())
        .stats(queue)
        .await
        .unwrap()
        .expect("the queue exists")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_are_paused_resumed_and_purged_with_a_reason() {
    let (config, db) = support::config();
    let monitor = Monitor::start(&config).await.expect("the monitor starts");
    let router = monitor.router();
    let queue = format!("test.{}", support::unique("monitor-pause"));
    let worker = TestWorker::start(&queue, 2).await;
    let client = support::client(&queue).await;

    let (status, body) = call(&router, "POST", &format!("/api/queues/{queue}/pause"), "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = call(
        &router,
        "POST",
        &format!("/api/queues/{queue}/resume?reason=x"),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // Paused: the worker stops consuming, tasks wait.
    let paused = eventually(
        "the worker answers and is told to pause",
        Duration::from_secs(30),
        || async {
            let (status, body) = call(
                &router,
                "POST",
                &format!("/api/queues/{queue}/pause?reason=ledger+migration"),
                "",
            )
            .await;
            (status == StatusCode::OK).then(|| serde_json::from_str::<Value>(&body).unwrap())
        },
    )
    .await;
    assert_eq!(paused["workers"], json!([worker.hostname]), "{paused}");
    assert_eq!(paused["refused"], json!([]), "{paused}");
    eventually("no consumer left", Duration::from_secs(10), || async {
        (stats(&queue).await.consumers == 0).then_some(())
    })
    .await;
    let mut sent = Vec::new();
    for n in 0..5 {
        sent.push(
            client
                .send_task("diag.add", vec![json!(n), json!(1)], Default::default())
                .send()
                .await
                .unwrap(),
        );
    }
    eventually("five tasks waiting", Duration::from_secs(10), || async {
        (stats(&queue).await.messages == 5).then_some(())
    })
    .await;
    let (status, page) = call(&router, "GET", &format!("/queues/{queue}"), "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("paused")
            && page.contains("<b>5</b> ready")
            && page.contains("ledger migration"),
        "{page}"
    );
    let (status, page) = call(&router, "GET", "/queues", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(&format!("/queues/{queue}")), "{page}");
    let listed = get_json(&router, "/api/queues/paused").await;
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["queue"] == queue.as_str()),
        "{listed}"
    );

    // Resumed: they run.
    let resumed = post_json(
        &router,
        &format!("/api/queues/{queue}/resume?reason=migration+done"),
        "",
    )
    .await;
    assert_eq!(resumed["workers"], json!([worker.hostname]), "{resumed}");
    let backend = client.backend().clone();
    for r in &sent {
        let id = r.id().to_owned();
        eventually(&format!("{id} runs"), Duration::from_secs(30), || async {
            backend
                .get(&id)
                .await
                .ok()
                .flatten()
                .filter(|m| m.status == TaskState::Success)
        })
        .await;
    }

    // Purged: a queue nobody consumes, seven messages.
    let idle = format!("test.{}", support::unique("monitor-purge"));
    let idle_client = support::client(&idle).await;
    for n in 0..7 {
        idle_client
            .send_task("diag.add", vec![json!(n), json!(1)], Default::default())
            .send()
            .await
            .unwrap();
    }
    let purged = post_json(
        &router,
        &format!("/api/queues/{idle}/purge?reason=test+data&shown=7"),
        "",
    )
    .await;
    assert_eq!(purged["purged"], 7, "{purged}");
    assert_eq!(stats(&idle).await.messages, 0);

    let log = get_json(&router, "/api/audit?limit=100").await;
    let entries = log
        .as_array()
        .or_else(|| log["entries"].as_array())
        .unwrap();
    let find = |action: &str, target: &str| {
        entries
            .iter()
            .find(|e| e["action"] == action && e["target"] == target)
            .unwrap_or_else(|| panic!("{action} {target} in the audit log: {log}"))
            .clone()
    };
    assert_eq!(find("queue.pause", &queue)["reason"], "ledger migration");
    assert_eq!(find("queue.resume", &queue)["count"], 1);
    let purge = find("queue.purge", &idle);
    assert_eq!(
        (purge["count"].clone(), purge["detail"]["shown"].clone()),
        (json!(7), json!(7))
    );

    support::delete_queue(&idle).await;
    worker.stop().await;
    monitor.stop().await.unwrap();
    support::drop_database(&db).await;
}
