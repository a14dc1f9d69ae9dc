//! Operator actions against the real services, each in the audit log: a failed task retried
//! through the API and through the task page's form (it succeeds once its cause is fixed; the
//! same form posted twice retries once), a revoke with a reason, a worker control, refusals
//! (a task that has not failed, a form without a reason, a cross-site post), the audit page and
//! its CSV export, and the log refusing to be changed.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use monitor::Monitor;
use serde_json::{Value, json};
use support::{TestWorker, call, eventually, get_json};
use task_core::{Task, TaskContext, TaskError};
use tower::ServiceExt;

/// Whether the cause of `test.until_fixed`'s failure has been fixed.
static FIXED: AtomicBool = AtomicBool::new(false);

/// Fails with a `ConnectionError` until [`FIXED`], then returns "ok".
#[derive(Debug, Clone, Copy)]
struct UntilFixed;

impl Task for UntilFixed {
    const NAME: &'static str = "test.until_fixed";
    type Args = (u32,);
    type Output = String;

    async fn run(&self, _ctx: TaskContext, (n,): (u32,)) -> Result<String, TaskError> {
        if FIXED.load(Ordering::SeqCst) {
            Ok(format!("ok {n}"))
        } else {
            Err(TaskError::abort(
                "ConnectionError",
                "the ledger is unreachable",
            ))
        }
    }
}

async fn post_form(
    router: &axum::Router,
    path: &str,
    form: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, Option<String>, String) {
    let mut request = Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/x-www-form-urlencoded");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = router
        .clone()
        .oneshot(request.body(Body::from(form.to_owned())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let location = response
        .headers()
        .get("location")
        .map(|l| l.to_str().unwrap().to_owned());
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        location,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

async fn state_of(router: &axum::Router, id: &str) -> Value {
    eventually(
        &format!("task {id} to reach a final state in the monitor"),
        Duration::from_secs(30),
        || async {
            let (status, body) = call(router, "GET", &format!("/api/task/info/{id}"), "").await;
            let v: Value = serde_json::from_str(&body).ok()?;
            (status == StatusCode::OK
                && matches!(v["state"].as_str(), Some("SUCCESS" | "FAILURE" | "REVOKED")))
            .then_some(v)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_task_is_retried_and_every_action_is_in_the_audit_log() {
    let (config, db) = support::config();
    let monitor = Monitor::start(&config).await.expect("the monitor starts");
    let router = monitor.router();
    let queue = format!("test.{}", support::unique("monitor-actions"));
    let worker = TestWorker::start_with(&queue, 2, |r| {
        r.register(UntilFixed);
    })
    .await;
    let client = support::client(&queue).await;

    // Two failures while the ledger is "down".
    let first = client.task::<UntilFixed>((1,)).send().await.unwrap();
    let second = client.task::<UntilFixed>((2,)).send().await.unwrap();
    for r in [&first, &second] {
        assert!(r.get(Duration::from_secs(30)).await.is_err());
        assert_eq!(state_of(&router, r.id()).await["state"], "FAILURE");
    }
    // A task that did not fail cannot be retried.
    let ok = client
        .send_task("diag.add", vec![json!(2), json!(3)], Default::default())
        .send()
        .await
        .unwrap();
    assert_eq!(ok.get(Duration::from_secs(30)).await.unwrap(), json!(5));
    let (status, body) = call(&router, "POST", &format!("/api/task/retry/{}", ok.id()), "").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("is SUCCESS"), "{body}");
    let (status, _) = call(&router, "POST", "/api/task/retry/no-such-task", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    FIXED.store(true, Ordering::SeqCst);

    // Through the API, with a reason, as an operator behind an authenticating proxy.
    let request = Request::builder()
        .method("POST")
        .uri(format!(
            "/api/task/retry/{}?reason=ledger%20back",
            first.id()
        ))
        .header("x-forwarded-user", "alice")
        .body(Body::empty())
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let answer: Value = serde_json::from_slice(&body).unwrap();
    let retried = answer["task-id"].as_str().unwrap().to_owned();
    assert_ne!(retried, first.id());
    assert_eq!(answer["retry-of"], first.id());
    let info = state_of(&router, &retried).await;
    assert_eq!(info["state"], "SUCCESS", "{info}");
    assert_eq!(info["result"], "'ok 1'", "{info}");
    assert_eq!(info["parent_id"], first.id(), "{info}");
    let result = client.result::<String>(&retried);
    assert_eq!(result.get(Duration::from_secs(30)).await.unwrap(), "ok 1");

    // Through the task page: the form is there, a reason is required, and the same form
    // posted twice retries once.
    let page = eventually(
        "the failed task's page with its retry form",
        Duration::from_secs(30),
        || async {
            let (_, page) = call(&router, "GET", &format!("/task/{}", second.id()), "").await;
            page.contains("Retry under a new id").then_some(page)
        },
    )
    .await;
    let request_id = page
        .split("name=\"request_id\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("the form's request id")
        .to_owned();
    let path = format!("/task/{}/retry", second.id());
    let (status, _, body) = post_form(
        &router,
        &path,
        &format!("request_id={request_id}&reason="),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // A page of another site posting the form is refused.
    let (status, _, body) = post_form(
        &router,
        &path,
        &format!("request_id={request_id}&reason=x"),
        &[
            ("origin", "http://evil.example"),
            ("host", "127.0.0.1:5555"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _, body) = post_form(
        &router,
        &path,
        &format!("request_id={request_id}&reason=x"),
        &[("sec-fetch-site", "cross-site")],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let form = format!("request_id={request_id}&reason=the+cause+was+fixed&note=ledger+restarted");
    let same_origin = [
        ("origin", "http://127.0.0.1:5555"),
        ("host", "127.0.0.1:5555"),
    ];
    let (status, location, _) = post_form(&router, &path, &form, &same_origin).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let location = location.unwrap();
    let (status, again, _) = post_form(&router, &path, &form, &same_origin).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(
        again.as_deref(),
        Some(location.as_str()),
        "one retry for one form"
    );
    let new_id = location
        .trim_start_matches("/task/")
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(state_of(&router, &new_id).await["state"], "SUCCESS");
    eventually("the retry's page", Duration::from_secs(30), || async {
        let (_, page) = call(&router, "GET", &location, "").await;
        page.contains("Sent as a retry of").then_some(())
    })
    .await;

    // A revoke with a reason, and a worker control.
    let waiting = client
        .send_task("diag.sleep", vec![json!(60_000)], Default::default())
        .countdown(Duration::from_secs(3600))
        .send()
        .await
        .unwrap();
    let (status, body) = call(
        &router,
        "POST",
        &format!("/api/task/revoke/{}?reason=not%20needed", waiting.id()),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let node = worker.hostname.clone();
    let (status, body) = call(
        &router,
        "POST",
        &format!("/api/worker/pool/grow/{node}?n=1"),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // The log: newest first, who, what, on what, why.
    let log = get_json(&router, "/api/audit").await;
    let entries = log["entries"].as_array().unwrap();
    let find = |action: &str, target: &str| {
        entries
            .iter()
            .find(|e| e["action"] == action && e["target"] == target)
            .unwrap_or_else(|| panic!("{action} on {target} in {log}"))
            .clone()
    };
    let api_retry = find("task.retry", first.id());
    assert_eq!(api_retry["actor"], "alice");
    assert_eq!(api_retry["reason"], "ledger back");
    assert_eq!(api_retry["detail"]["task_id"], retried.as_str());
    let form_retry = find("task.retry", second.id());
    assert_eq!(form_retry["actor"], "anonymous");
    assert_eq!(
        form_retry["reason"],
        "the cause was fixed: ledger restarted"
    );
    assert_eq!(form_retry["request_id"], request_id.as_str());
    assert_eq!(
        entries
            .iter()
            .filter(|e| e["action"] == "task.retry" && e["target"] == second.id())
            .count(),
        1
    );
    assert_eq!(find("task.revoke", waiting.id())["reason"], "not needed");
    assert_eq!(
        find("worker.pool_grow", &node)["detail"]["arguments"]["n"],
        1
    );
    assert!(
        entries
            .iter()
            .all(|e| e["action"] != "task.retry" || e["target"] != ok.id()),
        "a refused retry is not an action"
    );

    let (status, page) = call(&router, "GET", "/audit", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("ledger back") && page.contains("alice"),
        "{page}"
    );
    let (status, csv) = call(&router, "GET", "/audit.csv", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(csv.starts_with("id,at_utc,actor,action,target,count,reason,detail\r\n"));
    assert!(
        csv.contains(&format!("alice,task.retry,{}", first.id())),
        "{csv}"
    );

    // Nobody changes the log, not even with the monitor's own connection.
    let refused = sqlx::query("UPDATE audit_log SET reason = 'edited'")
        .execute(monitor.state().store().pool())
        .await
        .expect_err("the audit log is append-only");
    assert!(refused.to_string().contains("append-only"), "{refused}");
    let refused = sqlx::query("DELETE FROM audit_log")
        .execute(monitor.state().store().pool())
        .await
        .expect_err("the audit log is append-only");
    assert!(refused.to_string().contains("append-only"), "{refused}");

    worker.stop().await;
    monitor.stop().await.unwrap();
    support::delete_queue(&config.events_queue).await;
    support::drop_database(&db).await;
}
