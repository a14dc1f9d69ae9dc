//! Dead letters against the real services: messages of a task no worker knows are
//! dead-lettered; the monitor lists their queue, reads them twice without taking any, and once
//! the task is deployed replays one by id (API) and the rest in bulk (the page's form), each run
//! once and each replay in the audit log; a replay without a reason, or repeated, moves nothing.

mod support;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use monitor::Monitor;
use serde_json::{Value, json};
use support::{TestWorker, call, eventually, get_json, post_json};
use task_core::{ResultBackend, Task, TaskContext, TaskError, TaskState};
use tower::ServiceExt;

/// Runs of [`Later`].
static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Deployed only after its first messages were sent.
#[derive(Debug, Clone, Copy)]
struct Later;

impl Task for Later {
    const NAME: &'static str = "test.deployed_later";
    type Args = (u32,);
    type Output = u32;

    async fn run(&self, _ctx: TaskContext, (n,): (u32,)) -> Result<u32, TaskError> {
        RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(n * 10)
    }
}

async fn ready_count(queue: &str) -> u64 {
    monitor::broker::QueueProbe::new(support::amqp_url())
        .stats(queue)
        .await
        .unwrap()
        .map_or(0, |s| s.messages)
}

/// Sends `n` tasks of [`Later`] to a worker that does not know it, and waits until all `n` are
/// in `dlq`; their ids, in the order sent.
async fn dead_letter_later(client: &task_core::Client, dlq: &str, n: u32) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 1..=n {
        let sent = client
            .send_task(Later::NAME, vec![json!(i)], Default::default())
            .send()
            .await
            .unwrap();
        ids.push(sent.id().to_owned());
    }
    eventually(
        &format!("{n} dead letters"),
        Duration::from_secs(30),
        || async { (ready_count(dlq).await == u64::from(n)).then_some(()) },
    )
    .await;
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_read_without_loss_and_replayed_once_each() {
    let (config, db) = support::config();
    let monitor = Monitor::start(&config).await.expect("the monitor starts");
    let router = monitor.router();
    let queue = format!("test.{}", support::unique("monitor-dlq"));
    let dlq = format!("{queue}.dlq");
    let worker = TestWorker::start(&queue, 2).await;
    let client = support::client(&queue).await;

    let ids = dead_letter_later(&client, &dlq, 3).await;

    // Listed, and read twice: nothing is taken out.
    let list = get_json(&router, "/api/dead-letters").await;
    let row = list
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == dlq.as_str())
        .unwrap_or_else(|| panic!("{dlq} is listed: {list}"));
    assert_eq!(row["messages"], 3);
    // Two workers' slots dead-letter them in either order; each read sees the same one.
    let mut orders = Vec::new();
    for _ in 0..2 {
        let peek = get_json(&router, &format!("/api/dead-letters/{dlq}")).await;
        let messages = peek["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 3, "{peek}");
        let mut got: Vec<String> = messages
            .iter()
            .map(|m| m["task_id"].as_str().unwrap().to_owned())
            .collect();
        orders.push(got.clone());
        got.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(got, want);
        assert_eq!(messages[0]["task"], Later::NAME);
        assert_eq!(messages[0]["original_queue"], queue.as_str());
        assert!(
            messages[0]["reason"]
                .as_str()
                .unwrap()
                .contains("unknown task"),
            "{peek}"
        );
        assert!(messages[0]["dead_lettered_at"].is_string());
    }
    assert_eq!(orders[0], orders[1], "reading keeps the queue's order");
    assert_eq!(ready_count(&dlq).await, 3, "reading took nothing");
    let (status, page) = call(&router, "GET", &format!("/dead-letters/{dlq}"), "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("Replay all 3") && page.contains(&ids[0]),
        "{page}"
    );
    let (status, page) = call(&router, "GET", "/dead-letters", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(&dlq), "{page}");
    let (status, _) = call(
        &router,
        "GET",
        "/api/dead-letters/not-a-dead-letter-queue",
        "",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // The task is deployed.
    worker.stop().await;
    let worker = TestWorker::start_with(&queue, 2, |r| {
        r.register(Later);
    })
    .await;

    // No reason: refused, nothing moves.
    let (status, body) = call(
        &router,
        "POST",
        &format!("/api/dead-letters/{dlq}/replay?task_id={}", ids[1]),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(ready_count(&dlq).await, 3);

    // One by id through the API.
    let replay_one = format!(
        "/api/dead-letters/{dlq}/replay?task_id={}&reason=deployed&request_id=one-{}",
        ids[1], ids[1]
    );
    let done = post_json(&router, &replay_one, "").await;
    assert_eq!(done["replayed"], 1, "{done}");
    let backend = client.backend().clone();
    let result = |id: String| {
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
    assert_eq!(result(ids[1].clone()).await.result, json!(20));
    assert_eq!(ready_count(&dlq).await, 2);
    // The same request again does nothing.
    let again = post_json(&router, &replay_one, "").await;
    assert_eq!(again["repeated"], true, "{again}");

    // The rest through the page's bulk form.
    let form = format!(
        "request_id=bulk-{}&reason=the+task+is+deployed+now&note=release+42&oldest=2",
        ids[0]
    );
    let response = router
        .clone()
        .oneshot(
            Request::post(format!("/dead-letters/{dlq}/replay"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Body::from(form))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    // A bulk replay is a tracked job: its page has the progress.
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let job = location
        .strip_prefix("/jobs/")
        .expect("the job's page")
        .to_owned();
    let finished = eventually("the replay job to finish", Duration::from_secs(30), || {
        let (router, job) = (router.clone(), job.clone());
        async move {
            let j = get_json(&router, &format!("/api/jobs/{job}")).await;
            (j["job"]["state"] == "done").then(|| j["job"].clone())
        }
    })
    .await;
    assert_eq!(
        (
            finished["kind"].as_str(),
            finished["total"].as_i64(),
            finished["done"].as_i64()
        ),
        (Some("replay"), Some(2), Some(2)),
        "{finished}"
    );
    assert_eq!(finished["pending"], 0, "{finished}");
    for (id, want) in [(&ids[0], 10), (&ids[2], 30)] {
        assert_eq!(result(id.clone()).await.result, json!(want));
    }
    assert_eq!(ready_count(&dlq).await, 0);
    assert_eq!(
        RUNS.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "each replayed task ran once"
    );

    // Each ran once; each replay is in the audit log with its count and reason.
    let log: Value = get_json(&router, "/api/audit").await;
    let entries: Vec<&Value> = log
        .as_array()
        .or_else(|| log["entries"].as_array())
        .unwrap()
        .iter()
        .filter(|e| {
            (e["action"] == "dead-letter.replay" || e["action"] == "dead-letter.bulk_replay")
                && e["target"] == dlq.as_str()
        })
        .collect();
    assert_eq!(entries.len(), 2, "{log}");
    let counts: Vec<i64> = entries
        .iter()
        .map(|e| e["count"].as_i64().unwrap())
        .collect();
    assert!(counts.contains(&1) && counts.contains(&2), "{counts:?}");
    assert!(
        entries
            .iter()
            .any(|e| e["reason"] == "the task is deployed now: release 42")
    );

    worker.stop().await;
    support::delete_queue(&dlq).await;
    monitor.stop().await.unwrap();
    support::drop_database(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_replay_job_skips_what_succeeded_since_stops_when_aborted_and_resumes_after_a_restart()
 {
    let (config, db) = support::config();
    let queue = format!("test.{}", support::unique("monitor-dlq-job"));
    let dlq = format!("{queue}.dlq");
    let worker = TestWorker::start(&queue, 2).await;
    let client = support::client(&queue).await;
    let ids = dead_letter_later(&client, &dlq, 4).await;
    worker.stop().await;
    // One of them was run some other way meanwhile: it stays, the job says why.
    client
        .backend()
        .store(&task_core::TaskMeta::new(
            ids[0].clone(),
            TaskState::Success,
            json!(10),
        ))
        .await
        .unwrap();

    // Jobs a stopped monitor left: one aborted before it began, one half done (two items
    // recorded and gone from the queue: here, the first two are simply taken out).
    let monitor = Monitor::start(&config).await.expect("the monitor starts");
    monitor.stop().await.unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::Executor::execute(conn, "SET search_path = monitor").await?;
                Ok(())
            })
        })
        .connect(&config.database_url)
        .await
        .unwrap();
    let filter = json!({"dlq": dlq});
    let (aborted,): (i64,) = sqlx::query_as(
        "INSERT INTO jobs (kind, filter, total, actor, reason, abort_requested) VALUES ('replay', $1, 4, 'ops', 'test', true) RETURNING id",
    )
    .bind(&filter)
    .fetch_one(&pool)
    .await
    .unwrap();
    let (resumed,): (i64,) = sqlx::query_as(
        "INSERT INTO jobs (kind, filter, total, actor, reason) VALUES ('replay', $1, 4, 'ops', 'test') RETURNING id",
    )
    .bind(&filter)
    .fetch_one(&pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO job_items (job_id, seq, task_id, status, message) VALUES ($1, 1, 'earlier-a', 'done', 'replayed'), ($1, 2, 'earlier-b', 'done', 'replayed')")
        .bind(resumed)
        .execute(&pool)
        .await
        .unwrap();

    let worker = TestWorker::start_with(&queue, 2, |r| {
        r.register(Later);
    })
    .await;
    let monitor = Monitor::start(&config)
        .await
        .expect("the monitor starts again");
    let router = monitor.router();
    let job = |id: i64| {
        let router = router.clone();
        async move { get_json(&router, &format!("/api/jobs/{id}")).await }
    };
    let done = eventually(
        "the resumed job to finish",
        Duration::from_secs(30),
        || async {
            let j = job(resumed).await;
            (j["job"]["state"] != "running").then_some(j)
        },
    )
    .await;
    assert_eq!(done["job"]["state"], "done", "{done}");
    // Two recorded before the restart, two more now: the oldest two messages of the queue,
    // one replayed and one (succeeded since) skipped, or both replayed.
    assert_eq!(done["job"]["pending"], 0, "{done}");
    assert_eq!(
        done["job"]["done"].as_i64().unwrap() + done["job"]["skipped"].as_i64().unwrap(),
        4,
        "{done}"
    );
    let aborted = eventually(
        "the aborted job to stop",
        Duration::from_secs(30),
        || async {
            let j = job(aborted).await;
            (j["job"]["state"] != "running").then_some(j)
        },
    )
    .await;
    assert_eq!(aborted["job"]["state"], "aborted", "{aborted}");
    assert_eq!(aborted["job"]["done"], 0, "{aborted}");

    // A job over what is left, through the API: the succeeded one is skipped and stays.
    let started = post_json(
        &router,
        &format!(
            "/api/dead-letters/{dlq}/replay?job=true&oldest=4&reason=deployed&request_id=rest"
        ),
        "",
    )
    .await;
    let id = started["job"]
        .as_i64()
        .unwrap_or_else(|| panic!("{started}"));
    let again = post_json(
        &router,
        &format!(
            "/api/dead-letters/{dlq}/replay?job=true&oldest=4&reason=deployed&request_id=rest"
        ),
        "",
    )
    .await;
    assert_eq!(again["job"], id, "the same request starts one job");
    let finished = eventually(
        "the API's job to finish",
        Duration::from_secs(30),
        || async {
            let j = job(id).await;
            (j["job"]["state"] == "done").then_some(j)
        },
    )
    .await;
    let problems = finished["problems"].as_array().unwrap();
    assert!(
        problems
            .iter()
            .all(|p| p["task_id"] == ids[0].as_str() && p["status"] == "skipped"),
        "{finished}"
    );
    eventually("every other task to run", Duration::from_secs(30), || async {
        let mut ran = 0;
        for id in &ids[1..] {
            if matches!(client.backend().get(id).await.unwrap(), Some(m) if m.status == TaskState::Success) {
                ran += 1;
            }
        }
        (ran == 3).then_some(())
    })
    .await;
    assert_eq!(ready_count(&dlq).await, 1, "the succeeded one stays");
    let (status, _) = call(
        &router,
        "POST",
        &format!("/api/dead-letters/{dlq}/replay?job=true&oldest=0&reason=x"),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    worker.stop().await;
    support::delete_queue(&dlq).await;
    monitor.stop().await.unwrap();
    pool.close().await;
    support::drop_database(&db).await;
}
