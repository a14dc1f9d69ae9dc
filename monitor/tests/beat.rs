//! The beat page and API against the real Redis, RabbitMQ and an in-process scheduler replica:
//! an entry added through the API is fired by the replica, which the page names as the leader;
//! it is paused through the page's form, run now, resumed and removed through the API, each
//! change in the scheduler's store and in the audit log; no reason, an unknown entry and an
//! invalid definition are refused and change nothing.

mod support;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use monitor::Monitor;
use serde_json::{Value, json};
use support::{TestWorker, call, eventually, get_json, post_json};
use task_core::{ResultBackend, TaskState};
use tower::ServiceExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_entries_are_seen_and_changed_through_the_monitor() {
    let (mut config, db) = support::config();
    config.scheduler_prefix = format!("{}:", support::unique("test:monitor-beat"));
    let monitor = Monitor::start(&config).await.expect("the monitor starts");
    let router = monitor.router();
    let queue = format!("test.{}", support::unique("monitor-beat"));
    let worker = TestWorker::start(&queue, 2).await;
    let client = support::client(&queue).await;
    let store = scheduler::Store::connect(&support::redis_url(), &config.scheduler_prefix)
        .await
        .unwrap();

    // Refused: no reason, an invalid definition, an unknown entry.
    let spec =
        json!({"name": "adds", "task": "diag.add", "every": "1s", "args": [2, 3], "queue": queue});
    let (status, body) = call(&router, "POST", "/api/beat", &spec.to_string()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let bad = json!({"name": "bad", "task": "diag.add", "every": "often"});
    let (status, body) = call(&router, "POST", "/api/beat?reason=try", &bad.to_string()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("often"), "{body}");
    let (status, _) = call(&router, "POST", "/api/beat/nothing/pause?reason=x", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(store.list().await.unwrap().is_empty(), "nothing was added");

    // Added through the API, fired by a replica.
    let added = post_json(&router, "/api/beat?reason=new+report", &spec.to_string()).await;
    assert_eq!(added["entry"], "adds", "{added}");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let beat = scheduler::Beat::new(
        store.clone(),
        client.clone(),
        scheduler::BeatConfig::new("beat-a"),
    );
    let replica = tokio::spawn(beat.run(async move {
        let _ = stopped.await;
    }));
    let fired = eventually(
        "the replica leads and fires the entry",
        Duration::from_secs(30),
        || async {
            let v = get_json(&router, "/api/beat").await;
            let entry = &v["entries"][0];
            (v["leader"]["node_id"] == "beat-a" && entry["last_task_id"].is_string())
                .then(|| entry["last_task_id"].as_str().unwrap().to_owned())
        },
    )
    .await;
    let backend = client.backend().clone();
    let succeeded = |id: String| {
        let backend = backend.clone();
        async move {
            eventually(
                &format!("{id} succeeds"),
                Duration::from_secs(30),
                || async {
                    backend
                        .get(&id)
                        .await
                        .ok()
                        .flatten()
                        .filter(|m| m.status == TaskState::Success)
                },
            )
            .await
        }
    };
    assert_eq!(succeeded(fired).await.result, json!(5));
    let (status, page) = call(&router, "GET", "/beat", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("beat-a") && page.contains("every 1s") && page.contains("diag.add"),
        "{page}"
    );

    // Paused through the page's form (without a reason: refused).
    let form = |reason: &str| {
        Request::post("/beat/adds/pause")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::from(format!("request_id=p1&reason={reason}")))
            .unwrap()
    };
    let response = router.clone().oneshot(form("")).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(!store.get("adds").await.unwrap().unwrap().paused);
    let response = router
        .clone()
        .oneshot(form("month+end+freeze"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert!(store.get("adds").await.unwrap().unwrap().paused);
    let paused = get_json(&router, "/api/beat").await;
    assert_eq!(paused["entries"][0]["paused"], true, "{paused}");

    // Run now while paused: the task runs, the entry stays paused.
    let run = post_json(&router, "/api/beat/adds/run?reason=needed+today", "").await;
    let id = run["task_id"].as_str().unwrap().to_owned();
    assert_eq!(succeeded(id.clone()).await.result, json!(5));
    assert!(store.get("adds").await.unwrap().unwrap().paused);

    // Resumed and removed through the API.
    post_json(&router, "/api/beat/adds/resume?reason=freeze+over", "").await;
    assert!(!store.get("adds").await.unwrap().unwrap().paused);
    post_json(&router, "/api/beat/adds/remove?reason=report+retired", "").await;
    assert!(store.get("adds").await.unwrap().is_none());

    // Every change is in the audit log, with its reason; the run with its task id.
    let log: Value = get_json(&router, "/api/audit").await;
    let entries: Vec<&Value> = log
        .as_array()
        .or_else(|| log["entries"].as_array())
        .unwrap()
        .iter()
        .filter(|e| e["target"] == "adds")
        .collect();
    let actions: Vec<&str> = entries
        .iter()
        .rev()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "beat.add",
            "beat.pause",
            "beat.run",
            "beat.resume",
            "beat.remove"
        ],
        "{log}"
    );
    let run_entry = entries.iter().find(|e| e["action"] == "beat.run").unwrap();
    assert_eq!(run_entry["detail"]["task_id"], id.as_str());
    assert_eq!(run_entry["reason"], "needed today");

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), replica).await;
    worker.stop().await;
    monitor.stop().await.unwrap();
    support::drop_database(&db).await;
}
