//! The pages over a real run of Rust tasks: dashboard, task list (filters, search, keyset pages),
//! task detail (timeline, workflow), workers and queues, all rendered and escaped.

mod support;

use std::time::Duration;

use axum::http::StatusCode;
use monitor::Monitor;
use serde_json::json;
use support::{TestWorker, call, eventually};
use task_core::client::SendOptions;

async fn page(router: &axum::Router, path: &str) -> String {
    let (status, body) = call(router, "GET", path, "").await;
    assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
    assert!(body.starts_with("<!doctype html>"), "GET {path}: {body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_renders_a_run_of_rust_tasks() {
    let (config, db) = support::config();
    let monitor = Monitor::start(&config).await.expect("the monitor starts");
    let router = monitor.router();
    let queue = format!("test.{}", support::unique("monitor-pages"));
    let worker = TestWorker::start(&queue, 4).await;
    let node = worker.hostname.clone();
    let client = support::client(&queue).await;

    let root = client
        .send_task("diag.add", vec![json!(2), json!(3)], Default::default())
        .send()
        .await
        .unwrap();
    root.get(Duration::from_secs(30)).await.unwrap();
    let child = client
        .send_task("diag.add", vec![json!(5), json!(1)], Default::default())
        .options(SendOptions {
            parent_id: Some(root.id().to_owned()),
            root_id: Some(root.id().to_owned()),
            ..SendOptions::default()
        })
        .send()
        .await
        .unwrap();
    let fail = client
        .send_task(
            "diag.fail",
            vec![json!("card declined")],
            Default::default(),
        )
        .send()
        .await
        .unwrap();
    let script = client
        .send_task(
            "diag.echo",
            vec![json!("<script>alert(1)</script>")],
            Default::default(),
        )
        .send()
        .await
        .unwrap();
    let mut more = Vec::new();
    for i in 0..20 {
        more.push(
            client
                .send_task("diag.add", vec![json!(i), json!(0)], Default::default())
                .send()
                .await
                .unwrap(),
        );
    }
    for r in [&child, &script].into_iter().chain(more.iter()) {
        r.get(Duration::from_secs(30)).await.unwrap();
    }
    let _ = fail.get(Duration::from_secs(30)).await;
    let pool = monitor.state().store().pool().clone();
    eventually(
        "all 24 tasks to be stored finished",
        Duration::from_secs(30),
        || async {
            let (n,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM tasks WHERE worker = $1 AND state IN ('SUCCESS', 'FAILURE')",
            )
            .bind(&node)
            .fetch_one(&pool)
            .await
            .unwrap();
            (n == 24).then_some(())
        },
    )
    .await;

    // Dashboard: workers, counts, failures grouped by task and exception.
    let html = page(&router, "/").await;
    assert!(html.contains("workers online"), "{html}");
    assert!(
        html.contains("diag.fail") && html.contains("<code>ValueError</code>"),
        "{html}"
    );
    assert!(html.contains("<svg"), "the throughput chart: {html}");
    assert!(html.contains(&queue), "the worker's queue: {html}");

    // Task list: filters, escaping, keyset pages.
    let html = page(&router, &format!("/tasks?workername={node}&limit=500")).await;
    for id in [root.id(), child.id(), fail.id(), script.id()] {
        assert!(html.contains(id), "{id} missing");
    }
    assert!(
        html.contains("&#60;script&#62;") || html.contains("&lt;script&gt;"),
        "escaped args"
    );
    assert!(!html.contains("<script>alert"), "nothing unescaped");
    let html = page(&router, &format!("/tasks?workername={node}&state=FAILURE")).await;
    assert!(html.contains(fail.id()) && !html.contains(root.id()));
    let html = page(
        &router,
        &format!("/tasks?workername={node}&search=-state%3ASUCCESS+name%3Adiag.*"),
    )
    .await;
    assert!(html.contains(fail.id()) && !html.contains(script.id()));
    let html = page(&router, "/tasks?search=colour%3Ared").await;
    assert!(html.contains("unknown qualifier"), "{html}");

    let mut seen = std::collections::HashSet::new();
    let mut next = Some(format!("/tasks?workername={node}&limit=15"));
    let mut pages = 0;
    while let Some(path) = next.take() {
        let html = page(&router, &path.replace("&#38;", "&").replace("&amp;", "&")).await;
        pages += 1;
        for id in std::iter::once(&root).chain(&more).map(|r| r.id()) {
            if html.contains(id) {
                assert!(seen.insert(id.to_owned()), "{id} on two pages");
            }
        }
        next = html
            .split("<a href=\"")
            .filter_map(|s| s.split_once("\">older"))
            .map(|(href, _)| href.to_owned())
            .next();
        assert!(pages < 5, "the pages end");
    }
    assert_eq!(pages, 2, "24 tasks at 15 a page");
    assert_eq!(seen.len(), 21, "every task once");

    // Task detail: timeline, queue wait, result, workflow.
    let html = page(&router, &format!("/task/{}", root.id())).await;
    for text in [
        "Timeline",
        "received",
        "started",
        "succeeded",
        "Queue wait",
        "diag.add",
    ] {
        assert!(html.contains(text), "{text} missing: {html}");
    }
    assert!(
        html.contains(&format!("/task/{}", child.id())),
        "the child is linked"
    );
    let html = page(&router, &format!("/task/{}", fail.id())).await;
    assert!(
        html.contains("card declined") && html.contains("Traceback"),
        "{html}"
    );
    let (status, _) = call(&router, "GET", "/task/no-such-task", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Workers and queues.
    let html = page(&router, "/workers").await;
    assert!(html.contains(&node) && html.contains("online"), "{html}");
    let html = page(&router, "/queues").await;
    assert!(html.contains(&queue), "{html}");

    worker.stop().await;
    monitor.stop().await.unwrap();
    support::delete_queue(&config.events_queue).await;
    use task_core::Broker;
    client.broker().delete_queue(&queue).await.unwrap();
    support::drop_database(&db).await;
}
