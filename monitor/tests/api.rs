//! Flower's API over a Rust worker, against the real services: a run of Rust tasks (a success, a
//! failure, one sent and one revoked through the API) appears in `/api/tasks` with the right
//! states; workers, queues and the worker controls answer as Flower's do.

mod support;

use std::time::Duration;

use axum::http::StatusCode;
use monitor::Monitor;
use serde_json::{Value, json};
use support::{TestWorker, call, eventually, get_json, post_json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_of_rust_tasks_appears_in_the_task_list_with_its_states() {
    let (config, db) = support::config();
    let monitor = Monitor::start(&config).await.expect("the monitor starts");
    let router = monitor.router();
    let queue = format!("test.{}", support::unique("monitor-api"));
    let worker = TestWorker::start(&queue, 2).await;
    let node = worker.hostname.clone();
    let client = support::client(&queue).await;

    let add = client
        .send_task("diag.add", vec![json!(2), json!(3)], Default::default())
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
    assert_eq!(add.get(Duration::from_secs(30)).await.unwrap(), json!(5));
    assert!(fail.get(Duration::from_secs(30)).await.is_err());

    let tasks = eventually(
        "both tasks to reach their final state in /api/tasks",
        Duration::from_secs(30),
        || async {
            let tasks = get_json(&router, &format!("/api/tasks?workername={node}")).await;
            (tasks[add.id()]["state"] == "SUCCESS" && tasks[fail.id()]["state"] == "FAILURE")
                .then_some(tasks)
        },
    )
    .await;
    let ok = &tasks[add.id()];
    assert_eq!(ok["name"], "diag.add", "{ok}");
    assert_eq!(ok["args"], "(2, 3)", "{ok}");
    assert_eq!(ok["result"], "5", "{ok}");
    assert_eq!(ok["worker"], node.as_str(), "{ok}");
    assert!(ok["runtime"].as_f64().is_some_and(|r| r >= 0.0), "{ok}");
    for stage in ["received", "started", "succeeded", "timestamp"] {
        assert!(ok[stage].as_f64().is_some(), "{stage} missing: {ok}");
    }
    let bad = &tasks[fail.id()];
    assert_eq!(bad["name"], "diag.fail", "{bad}");
    assert!(
        bad["exception"]
            .as_str()
            .is_some_and(|e| e.contains("card declined")),
        "{bad}"
    );
    assert!(
        bad["traceback"].is_string() && bad["failed"].is_number(),
        "{bad}"
    );

    // Filters: by state and task name.
    let failures = get_json(
        &router,
        &format!("/api/tasks?state=FAILURE&taskname=diag.fail&workername={node}"),
    )
    .await;
    assert_eq!(
        failures.as_object().unwrap().keys().collect::<Vec<_>>(),
        vec![fail.id()]
    );
    let (status, body) = call(&router, "GET", "/api/tasks?sort_by=colour", "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // Details and results.
    let info = get_json(&router, &format!("/api/task/info/{}", add.id())).await;
    assert_eq!(info["state"], "SUCCESS");
    assert_eq!(info["children"], json!([]));
    let result = get_json(&router, &format!("/api/task/result/{}", add.id())).await;
    assert_eq!(
        result,
        json!({"task-id": add.id(), "state": "SUCCESS", "result": 5})
    );
    let result = get_json(&router, &format!("/api/task/result/{}", fail.id())).await;
    assert_eq!(result["state"], "FAILURE", "{result}");
    assert!(
        result["result"]
            .as_str()
            .is_some_and(|r| r.contains("card declined")),
        "{result}"
    );
    assert!(
        result.get("traceback").is_some(),
        "a failure carries the traceback key: {result}"
    );
    let (status, _) = call(&router, "GET", "/api/task/info/no-such-task", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Sending through the API, then revoking a task that waits behind busy slots.
    let sent = post_json(
        &router,
        "/api/task/send-task/diag.add",
        &json!({"args": [20, 22], "queue": queue}).to_string(),
    )
    .await;
    // Read back from the result backend as Flower does: a fast worker may be done already.
    assert!(
        ["PENDING", "STARTED", "SUCCESS"].contains(&sent["state"].as_str().unwrap_or("")),
        "{sent}"
    );
    let sent_id = sent["task-id"].as_str().unwrap().to_owned();
    let value = client
        .result::<Value>(&sent_id)
        .get(Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(value, json!(42));
    let (status, body) = call(&router, "POST", "/api/task/send-task/diag.add", "[1]").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    let sleeps: Vec<_> = futures_util::future::join_all((0..2).map(|_| {
        client
            .send_task(
                "diag.sleep",
                Vec::new(),
                json!({"ms": 3000}).as_object().cloned().unwrap(),
            )
            .send()
    }))
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect();
    let waiting = post_json(
        &router,
        "/api/task/async-apply/diag.add",
        &json!({"args": [1, 1], "queue": queue}).to_string(),
    )
    .await;
    let waiting_id = waiting["task-id"].as_str().unwrap().to_owned();
    let reply = post_json(&router, &format!("/api/task/revoke/{waiting_id}"), "").await;
    assert_eq!(reply["message"], format!("Revoked '{waiting_id}'"));
    for s in &sleeps {
        s.get(Duration::from_secs(30)).await.unwrap();
    }
    // The worker stores REVOKED in the backend and sends task-revoked; both must agree.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let t = get_json(&router, &format!("/api/task/info/{waiting_id}")).await;
        if t["state"] == "REVOKED" {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let stored = client.result::<Value>(&waiting_id).meta().await.unwrap();
            panic!("the revoked task is not REVOKED after 30 s: monitor {t}, backend {stored:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // Workers: inspect replies in Flower's shape, online status from heartbeats.
    let workers = eventually(
        "the worker to answer inspect",
        Duration::from_secs(30),
        || async {
            let w = get_json(&router, "/api/workers?refresh=1").await;
            w.get(&node).cloned()
        },
    )
    .await;
    for key in ["stats", "active_queues", "registered", "conf", "timestamp"] {
        assert!(workers.get(key).is_some(), "{key} missing: {workers}");
    }
    assert!(workers["stats"]["broker"].get("alternates").is_none());
    let one = get_json(
        &router,
        &format!("/api/workers?refresh=1&workername={node}"),
    )
    .await;
    for key in ["scheduled", "active", "reserved", "revoked"] {
        assert!(one[&node].get(key).is_some(), "{key} missing: {one}");
    }
    let status = get_json(&router, "/api/workers?status=1").await;
    assert_eq!(status[&node], json!(true), "{status}");
    let (status, _) = call(&router, "GET", "/api/workers?workername=nobody@nowhere", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Queues: the worker's queue with its length, and in /metrics with its consumer.
    let lengths = get_json(&router, "/api/queues/length").await;
    let ours = lengths["active_queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == queue.as_str())
        .unwrap_or_else(|| panic!("{queue} missing: {lengths}"));
    assert_eq!(ours["messages"], json!(0), "{lengths}");
    let (_, metrics) = call(&router, "GET", "/metrics", "").await;
    for line in [
        format!(r#"tq_queue_messages{{queue="{queue}",state="ready"}} 0"#),
        format!(r#"tq_queue_consumers{{queue="{queue}"}} 1"#),
        format!(r#"tq_worker_up{{worker="{node}"}} 1"#),
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing:\n{metrics}"
        );
    }
    assert!(
        metrics.lines().any(|l| l
            .starts_with(r#"tq_monitor_tasks_completed_total{task="diag.add",outcome="success"}"#)),
        "{metrics}"
    );

    // Controls.
    let grown = post_json(&router, &format!("/api/worker/pool/grow/{node}?n=2"), "").await;
    assert_eq!(
        grown["message"],
        format!("Growing '{node}' worker's pool by 2")
    );
    let shrunk = post_json(&router, &format!("/api/worker/pool/shrink/{node}"), "").await;
    assert_eq!(
        shrunk["message"],
        format!("Shrinking '{node}' worker's pool by 1")
    );
    let extra = format!("{queue}.extra");
    let added = post_json(
        &router,
        &format!("/api/worker/queue/add-consumer/{node}?queue={extra}"),
        "",
    )
    .await;
    assert_eq!(added["message"], format!("add consumer {extra}"), "{added}");
    let cancelled = post_json(
        &router,
        &format!("/api/worker/queue/cancel-consumer/{node}?queue={extra}"),
        "",
    )
    .await;
    assert!(
        cancelled["message"]
            .as_str()
            .is_some_and(|m| m.contains(&extra)),
        "{cancelled}"
    );
    let (status, _) = call(&router, "POST", "/api/worker/pool/grow/nobody@nowhere", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Flower's rate-limit and timeout routes, answered by the worker's control commands.
    let limited = post_json(
        &router,
        &format!("/api/task/rate-limit/diag.add?workername={node}&ratelimit=10/m"),
        "",
    )
    .await;
    assert_eq!(limited["message"], "new rate limit set successfully");
    let (status, body) = call(
        &router,
        "POST",
        &format!("/api/task/rate-limit/diag.add?workername={node}&ratelimit=fast"),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("Failed to set rate limit"), "{body}");
    let timed = post_json(
        &router,
        &format!("/api/task/timeout/diag.add?workername={node}&soft=30&hard=60"),
        "",
    )
    .await;
    assert_eq!(timed["message"], "time limits set successfully");
    let (status, _) = call(&router, "POST", "/api/task/timeout/diag.add?soft=1", "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "workername is required");
    // Lifted again, so the rest of the run is not held back.
    post_json(
        &router,
        &format!("/api/task/rate-limit/diag.add?workername={node}&ratelimit="),
        "",
    )
    .await;

    // Probes.
    let (status, body) = call(&router, "GET", "/livez", "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    let (status, body) = call(&router, "GET", "/readyz", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"backend": "ok", "broker": "ok", "intake": "ok", "store": "ok"})
    );

    // Shutdown through the API ends the worker's run.
    let bye = post_json(&router, &format!("/api/worker/shutdown/{node}"), "").await;
    assert_eq!(bye["message"], "Shutting down!");
    eventually(
        "the worker to stop after the shutdown command",
        Duration::from_secs(30),
        || async { worker.finished().then_some(()) },
    )
    .await;
    worker.stop().await;

    monitor.stop().await.unwrap();
    support::delete_queue(&config.events_queue).await;
    let broker = task_core::AmqpBroker::connect(&support::amqp_url())
        .await
        .unwrap();
    use task_core::Broker;
    for q in [&queue, &extra] {
        let _ = broker.delete_queue(q).await;
    }
    support::drop_database(&db).await;
}
