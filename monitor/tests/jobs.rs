//! Bulk actions by filter against the real services: the preview counts what a retry applies
//! to (failed tasks of the filter, not the successful one); a start without a reason, or after
//! the filter grew past the count shown, is refused; the job retries each failed task once
//! (each retry succeeds, the job and each retry in the audit log, the same form twice one job);
//! a retry job over 300 failed tasks is aborted part-way and says so.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use monitor::Monitor;
use serde_json::{Value, json};
use support::{TestWorker, call, eventually, get_json, post_json};
use task_core::{ResultBackend, Task, TaskContext, TaskError, TaskState};

static FIXED: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Clone, Copy)]
struct Flaky;

impl Task for Flaky {
    const NAME: &'static str = "test.bulk_flaky";
    type Args = (u32,);
    type Output = u32;

    async fn run(&self, _ctx: TaskContext, (n,): (u32,)) -> Result<u32, TaskError> {
        if FIXED.load(Ordering::SeqCst) {
            Ok(n)
        } else {
            Err(TaskError::abort("ConnectionError", "the gateway is down"))
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct AlwaysFails;

impl Task for AlwaysFails {
    const NAME: &'static str = "test.bulk_always_fails";
    type Args = (u32,);
    type Output = u32;

    async fn run(&self, _ctx: TaskContext, _: (u32,)) -> Result<u32, TaskError> {
        Err(TaskError::abort("ConnectionError", "still down"))
    }
}

async fn count(router: &axum::Router, path: &str) -> usize {
    get_json(router, path)
        .await
        .as_object()
        .map_or(0, |m| m.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_jobs_preview_run_once_each_and_abort() {
    let (config, db) = support::config();
    let monitor = Monitor::start(&config).await.expect("the monitor starts");
    let router = monitor.router();
    let queue = format!("test.{}", support::unique("monitor-jobs"));
    let worker = TestWorker::start_with(&queue, 4, |r| {
        r.register(Flaky);
        r.register(AlwaysFails);
    })
    .await;
    let client = support::client(&queue).await;

    let mut failed = Vec::new();
    for n in 0..5u32 {
        let r = client.task::<Flaky>((n,)).send().await.unwrap();
        assert!(r.get(Duration::from_secs(30)).await.is_err());
        failed.push(r.id().to_owned());
    }
    FIXED.store(true, Ordering::SeqCst);
    let ok = client.task::<Flaky>((9,)).send().await.unwrap();
    ok.get(Duration::from_secs(30)).await.unwrap();
    let list = format!("/api/tasks?taskname={}&state=FAILURE", Flaky::NAME);
    eventually(
        "five failures in the store",
        Duration::from_secs(30),
        || async { (count(&router, &list).await == 5).then_some(()) },
    )
    .await;

    // The preview: the failed ones only.
    let filter = format!("action=retry&taskname={}", Flaky::NAME);
    let preview = get_json(&router, &format!("/api/jobs/preview?{filter}")).await;
    assert_eq!(preview["count"], 5, "{preview}");
    let (status, page) = call(&router, "GET", &format!("/jobs/new?{filter}"), "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("matches <b>5</b>") && page.contains(&failed[0]),
        "{page}"
    );

    // Refused: no reason; fewer shown than the filter matches now. No job is made.
    let (status, body) = call(
        &router,
        "POST",
        &format!("/api/jobs?{filter}&expected=5"),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = call(
        &router,
        "POST",
        &format!("/api/jobs?{filter}&expected=4&reason=x"),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("matches 5 tasks now"), "{body}");
    assert_eq!(
        get_json(&router, "/api/jobs")
            .await
            .as_array()
            .unwrap()
            .len(),
        0
    );

    // The job: each failed task retried once, each retry succeeding.
    let start = format!("/api/jobs?{filter}&expected=5&reason=gateway+back&request_id=bulk-1");
    let job = post_json(&router, &start, "").await["job"]
        .as_i64()
        .unwrap();
    assert_eq!(
        post_json(&router, &start, "").await["job"],
        job,
        "the same request, one job"
    );
    let done = eventually("the job is done", Duration::from_secs(60), || async {
        let v = get_json(&router, &format!("/api/jobs/{job}")).await;
        (v["job"]["state"] == "done").then_some(v)
    })
    .await;
    assert_eq!(done["job"]["total"], 5, "{done}");
    assert_eq!(done["job"]["done"], 5, "{done}");
    assert_eq!(done["problems"], json!([]), "{done}");
    let log = get_json(&router, "/api/audit?limit=100").await;
    let entries: Vec<&Value> = log
        .as_array()
        .or_else(|| log["entries"].as_array())
        .unwrap()
        .iter()
        .collect();
    let retries: Vec<&&Value> = entries
        .iter()
        .filter(|e| {
            e["action"] == "task.retry"
                && e["reason"] == format!("gateway back (job {job})").as_str()
        })
        .collect();
    assert_eq!(retries.len(), 5, "{log}");
    let mut originals: Vec<&str> = retries
        .iter()
        .map(|e| e["target"].as_str().unwrap())
        .collect();
    originals.sort();
    let mut want: Vec<&str> = failed.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(originals, want, "each failed task retried once");
    let backend = client.backend().clone();
    for e in &retries {
        let id = e["detail"]["task_id"].as_str().unwrap().to_owned();
        eventually(
            &format!("retry {id} succeeds"),
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
        .await;
    }
    let bulk = entries
        .iter()
        .find(|e| e["action"] == "tasks.bulk_retry")
        .expect("the job is in the audit log");
    assert_eq!(bulk["count"], 5);
    let (status, _) = call(
        &router,
        "POST",
        &format!("/api/jobs/{job}/abort?reason=late"),
        "",
    )
    .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a finished job cannot be aborted"
    );
    let (status, page) = call(&router, "GET", &format!("/jobs/{job}"), "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("<b>5</b> done"), "{page}");

    // A retry job over 300 failed tasks, aborted at once: it stops part-way.
    let mut sent = Vec::new();
    for n in 0..300u32 {
        sent.push(client.task::<AlwaysFails>((n,)).send().await.unwrap());
    }
    for r in &sent {
        let _ = r.get(Duration::from_secs(60)).await;
    }
    let failures = format!(
        "/api/tasks?taskname={}&state=FAILURE&limit=1000",
        AlwaysFails::NAME
    );
    eventually(
        "300 failures in the store",
        Duration::from_secs(60),
        || async { (count(&router, &failures).await == 300).then_some(()) },
    )
    .await;
    let filter = format!("action=retry&taskname={}", AlwaysFails::NAME);
    let job = post_json(
        &router,
        &format!("/api/jobs?{filter}&expected=300&reason=try+again"),
        "",
    )
    .await["job"]
        .as_i64()
        .unwrap();
    post_json(
        &router,
        &format!("/api/jobs/{job}/abort?reason=still+failing"),
        "",
    )
    .await;
    let aborted = eventually("the job stops", Duration::from_secs(60), || async {
        let v = get_json(&router, &format!("/api/jobs/{job}")).await;
        (v["job"]["state"] != "running").then_some(v)
    })
    .await;
    assert_eq!(aborted["job"]["state"], "aborted", "{aborted}");
    assert!(
        aborted["job"]["pending"].as_i64().unwrap() > 0,
        "stopped part-way: {aborted}"
    );
    let (status, page) = call(&router, "GET", "/jobs", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("aborted") && page.contains("try again"),
        "{page}"
    );

    worker.stop().await;
    monitor.stop().await.unwrap();
    support::drop_database(&db).await;
}
