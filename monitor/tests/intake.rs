//! The event intake against the real RabbitMQ and PostgreSQL: events published to `celeryev`
//! (singly and as `task.multi` lists, out of order) end up merged in the store, and the queue
//! is declared as configured.

mod support;

use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use monitor::Monitor;
use serde_json::{Value, json};
use support::{eventually, get_json};

async fn publish(ch: &lapin::Channel, routing_key: &str, body: &Value) {
    ch.basic_publish(
        "celeryev".into(),
        routing_key.into(),
        BasicPublishOptions::default(),
        &serde_json::to_vec(body).unwrap(),
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(1),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_and_batched_events_merge_into_one_row_per_task_and_worker() {
    let (config, db) = support::config();
    let monitor = Monitor::start(&config).await.expect("the monitor starts");
    let router = monitor.router();
    let connection = monitor::broker::connect(&support::amqp_url())
        .await
        .unwrap();
    let ch = connection.create_channel().await.unwrap();

    let node = format!("{}@test", support::unique("raw"));
    let (a, b) = (
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
    );
    let now = task_core::events::unix_now();
    let ev = |kind: &str, uuid: &str, dt: f64, extra: Value| {
        let mut e = json!({"type": kind, "uuid": uuid, "hostname": node, "timestamp": now + dt,
            "utcoffset": 0, "pid": 1, "clock": 1});
        e.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        e
    };
    let received = |uuid: &str| {
        ev(
            "task-received",
            uuid,
            0.0,
            json!({"name": "diag.add", "args": "(2, 3)",
            "kwargs": "{}", "root_id": uuid, "parent_id": null, "retries": 0, "eta": null,
            "expires": null}),
        )
    };
    // Task a: the result first, its task-received last, in a Celery `task.multi` list.
    publish(
        &ch,
        "task.multi",
        &json!([
            ev(
                "task-succeeded",
                &a,
                0.2,
                json!({"result": "5", "runtime": 0.1})
            ),
            ev("task-started", &a, 0.1, json!({})),
        ]),
    )
    .await;
    publish(&ch, "task.received", &received(&a)).await;
    // Task b: in order, one message each, ending in a failure.
    publish(&ch, "task.received", &received(&b)).await;
    publish(&ch, "task.started", &ev("task-started", &b, 0.1, json!({}))).await;
    publish(
        &ch,
        "task.failed",
        &ev(
            "task-failed",
            &b,
            0.2,
            json!({"exception": "ValueError('bad')", "traceback": "Traceback ..."}),
        ),
    )
    .await;
    // A worker, and a message that is not an event.
    publish(
        &ch,
        "worker.heartbeat",
        &json!({"type": "worker-heartbeat", "hostname": node,
        "timestamp": now, "freq": 2.0, "active": 0, "processed": 2, "loadavg": [0.5, 0.4, 0.3],
        "sw_ident": "rs-task-core", "sw_ver": "0.1.0", "sw_sys": "Linux", "pid": 1, "clock": 2}),
    )
    .await;
    publish(&ch, "task.bogus", &json!(42)).await;
    // Task c: started on a worker whose last heartbeat is long past: "lost?" on the pages.
    let c = uuid::Uuid::new_v4().to_string();
    let gone = format!("{}@test", support::unique("gone"));
    publish(
        &ch,
        "worker.heartbeat",
        &json!({"type": "worker-heartbeat", "hostname": gone,
        "timestamp": now - 600.0, "freq": 2.0, "active": 1, "processed": 0}),
    )
    .await;
    publish(
        &ch,
        "task.started",
        &json!({"type": "task-started", "uuid": c, "hostname": gone,
        "timestamp": now - 601.0}),
    )
    .await;

    let store = monitor.state().store().clone();
    let task_a = eventually(
        "task a to be SUCCESS with its name",
        Duration::from_secs(30),
        || async {
            let t = store.task(&a).await.unwrap()?;
            (t.state == "SUCCESS" && t.name.is_some()).then_some(t)
        },
    )
    .await;
    assert_eq!(task_a.name.as_deref(), Some("diag.add"));
    assert_eq!(task_a.args.as_deref(), Some("(2, 3)"));
    assert_eq!(task_a.result.as_deref(), Some("5"));
    assert_eq!(task_a.runtime, Some(0.1));
    assert_eq!(task_a.worker.as_deref(), Some(node.as_str()));
    assert!(task_a.received.is_some() && task_a.started.is_some() && task_a.succeeded.is_some());
    assert_eq!(
        task_a.timestamp, task_a.succeeded,
        "the state's time is the success's"
    );

    let task_b = eventually("task b to be FAILURE", Duration::from_secs(30), || async {
        let t = store.task(&b).await.unwrap()?;
        (t.state == "FAILURE").then_some(t)
    })
    .await;
    assert_eq!(task_b.exception.as_deref(), Some("ValueError('bad')"));
    assert_eq!(task_b.traceback.as_deref(), Some("Traceback ..."));

    let status = eventually(
        "the worker to be stored",
        Duration::from_secs(30),
        || async {
            let s = get_json(&router, "/api/workers?status=1").await;
            s.get(&node).cloned()
        },
    )
    .await;
    assert_eq!(status, json!(true), "a fresh heartbeat is online");
    let w = store
        .workers()
        .await
        .unwrap()
        .into_iter()
        .find(|w| w.hostname == node)
        .unwrap();
    assert_eq!(w.processed, Some(2));
    assert_eq!(w.loadavg, Some(vec![0.5, 0.4, 0.3]));

    // The listing filters by name, state and search, with Flower's shape.
    let failed = get_json(
        &router,
        &format!("/api/tasks?state=FAILURE&search=uuid:{b}"),
    )
    .await;
    assert_eq!(failed.as_object().unwrap().len(), 1, "{failed}");
    assert_eq!(failed[&b]["exception"], "ValueError('bad')");
    let not_failed = get_json(
        &router,
        &format!("/api/tasks?search=-state:FAILURE%20uuid:{b}"),
    )
    .await;
    assert!(not_failed.as_object().unwrap().is_empty(), "{not_failed}");
    let info = get_json(&router, &format!("/api/task/info/{a}")).await;
    assert_eq!(info["state"], "SUCCESS");
    assert_eq!(info["root_id"], a.as_str());

    eventually("task c to be stored", Duration::from_secs(30), || async {
        store
            .task(&c)
            .await
            .unwrap()
            .filter(|t| t.state == "STARTED")
    })
    .await;
    let (_, html) = support::call(&router, "GET", &format!("/tasks?search=uuid:{c}"), "").await;
    assert!(html.contains(&c) && html.contains("lost?"), "{html}");
    let (_, html) = support::call(&router, "GET", &format!("/tasks?search=uuid:{a}"), "").await;
    assert!(html.contains(&a) && !html.contains("lost?"), "{html}");
    let (_, html) = support::call(&router, "GET", &format!("/task/{c}"), "").await;
    assert!(html.contains("may be lost"), "{html}");

    let status = monitor.state().intake_status();
    eventually(
        "the non-event to be counted",
        Duration::from_secs(30),
        || async { (status.malformed() >= 1).then_some(()) },
    )
    .await;
    let metrics = support::call(&router, "GET", "/metrics", "").await.1;
    assert!(
        metrics.lines().any(|l| l
            .starts_with(r#"tq_monitor_tasks_completed_total{task="diag.add",outcome="failure"}"#)),
        "{metrics}"
    );
    assert!(
        metrics.contains("tq_monitor_last_event_timestamp_seconds"),
        "{metrics}"
    );

    // The queue is durable, bounded and bound as configured: a second declare with other
    // arguments is refused with a message naming the settings.
    let mut other = config.clone();
    other.events_max_length += 1;
    let e = monitor::intake::declare(&other.intake())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("MONITOR_EVENTS_MAX_LENGTH"), "{e}");

    monitor.stop().await.unwrap();
    support::delete_queue(&config.events_queue).await;
    let _ = connection.close(200, "done".into()).await;
    support::drop_database(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_pages_hear_of_each_committed_batch() {
    use futures_util::StreamExt;
    let (config, db) = support::config();
    let monitor = Monitor::start(&config).await.expect("the monitor starts");
    let response = tower::ServiceExt::oneshot(
        monitor.router(),
        axum::http::Request::get("/live")
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(
        response.headers()["content-type"],
        "text/event-stream",
        "{:?}",
        response.headers()
    );
    let mut body = response.into_body().into_data_stream();

    let connection = monitor::broker::connect(&support::amqp_url())
        .await
        .unwrap();
    let ch = connection.create_channel().await.unwrap();
    let id = uuid::Uuid::new_v4().to_string();
    publish(
        &ch,
        "task.started",
        &json!({"type": "task-started", "uuid": id,
        "hostname": "live@test", "timestamp": task_core::events::unix_now()}),
    )
    .await;
    let frame = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let chunk = body.next().await.expect("the stream stays open").unwrap();
            let text = String::from_utf8_lossy(&chunk).into_owned();
            if text.contains("event: batch") {
                return text;
            }
        }
    })
    .await
    .expect("a batch event within 30 s");
    assert!(frame.contains(r#""events":"#), "{frame}");
    // The page that listens to it, and keeps a no-JavaScript fallback.
    let (_, html) = support::call(&monitor.router(), "GET", "/workers", "").await;
    assert!(html.contains(r#"new EventSource("/live")"#), "{html}");
    assert!(html.contains(r#"<noscript><meta http-equiv="refresh" content="5"></noscript>"#));

    drop(body);
    monitor.stop().await.unwrap();
    support::delete_queue(&config.events_queue).await;
    let _ = connection.close(200, "done".into()).await;
    support::drop_database(&db).await;
}
