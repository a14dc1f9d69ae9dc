//! The monitor's task histograms and Flower's metric names, from real events: three `diag.add`
//! runs appear in `tq_task_runtime_seconds` and `tq_task_queue_wait_seconds`, and with
//! MONITOR_FLOWER_METRICS in `flower_events_total`, `flower_task_runtime_seconds`,
//! `flower_task_prefetch_time_seconds`, `flower_worker_prefetched_tasks` (back to zero),
//! `flower_worker_online` and `flower_worker_number_of_currently_executing_tasks`, in one
//! OpenMetrics exposition.

mod support;

use std::time::Duration;

use axum::http::StatusCode;
use monitor::Monitor;
use serde_json::json;
use support::{TestWorker, call};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_histograms_and_flower_aliases_come_from_the_events() {
    let (mut config, db) = support::config();
    config.flower_metrics = true;
    let monitor = Monitor::start(&config).await.expect("the monitor starts");
    let router = monitor.router();
    let queue = format!("test.{}", support::unique("monitor-metrics"));
    let worker = TestWorker::start(&queue, 2).await;
    let client = support::client(&queue).await;
    for n in 0..3 {
        let r = client
            .send_task("diag.add", vec![json!(n), json!(1)], Default::default())
            .send()
            .await
            .unwrap();
        r.get(Duration::from_secs(30)).await.unwrap();
    }
    let w = &worker.hostname;
    // Celery's task-received names no queue: it is known only from task-sent events.
    let runtime = "tq_task_runtime_seconds_count{task=\"diag.add\",queue=\"\"} 3".to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let online = format!("flower_worker_online{{worker=\"{w}\"}} 1");
    let text = loop {
        let (status, text) = call(&router, "GET", "/metrics", "").await;
        assert_eq!(status, StatusCode::OK);
        if text.contains(&runtime) && text.contains(&online) {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{runtime} and {online} within 30 s:\n{}",
            text.lines()
                .filter(|l| l.contains("diag.add") || l.contains("worker"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for want in [
        "tq_task_queue_wait_seconds_count{task=\"diag.add\",queue=\"\"} 3".to_owned(),
        format!(
            "flower_events_total{{worker=\"{w}\",type=\"task-succeeded\",task=\"diag.add\"}} 3"
        ),
        format!("flower_events_total{{worker=\"{w}\",type=\"task-received\",task=\"diag.add\"}} 3"),
        format!("flower_task_runtime_seconds_count{{worker=\"{w}\",task=\"diag.add\"}} 3"),
        format!("flower_task_prefetch_time_seconds{{worker=\"{w}\",task=\"diag.add\"}}"),
        format!("flower_worker_prefetched_tasks{{worker=\"{w}\",task=\"diag.add\"}} 0"),
        format!("flower_worker_number_of_currently_executing_tasks{{worker=\"{w}\"}}"),
    ] {
        assert!(text.contains(&want), "{want} in:\n{text}");
    }
    assert_eq!(text.matches("# EOF").count(), 1, "one exposition");
    assert!(text.ends_with("# EOF\n"));

    worker.stop().await;
    monitor.stop().await.unwrap();
    support::drop_database(&db).await;
}
