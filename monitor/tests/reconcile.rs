//! Reconciliation with the real Redis result backend: a task whose events stopped at STARTED a
//! few minutes ago, but whose result says SUCCESS, is moved to SUCCESS with its result; tasks no
//! event told of (a SUCCESS and a FAILURE stored as a worker without events would) are found by
//! walking the backend and shown from their results, with name, arguments, worker and the
//! exception; a second pass changes nothing.

mod support;

use monitor::Monitor;
use serde_json::{Map, Value, json};
use task_core::backend::ExceptionInfo;
use task_core::{ResultBackend, TaskMeta, TaskState};

fn event(kind: &str, uuid: &str, at: f64) -> Map<String, Value> {
    json!({"type": kind, "uuid": uuid, "name": "test.reconcile", "hostname": "celery@gone",
           "timestamp": at, "args": "(1,)", "kwargs": "{}"})
    .as_object()
    .unwrap()
    .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_follow_the_results_the_events_missed() {
    let (config, db) = support::config();
    let monitor = Monitor::start(&config).await.expect("the monitor starts");
    let state = monitor.state().clone();
    let store = state.store().clone();
    let backend = state.client().backend().clone();
    let now = task_core::events::unix_now();

    // Events stopped at STARTED five minutes ago; the result is there.
    let stuck = uuid::Uuid::new_v4().to_string();
    store
        .write_batch(&[
            event("task-received", &stuck, now - 301.0),
            event("task-started", &stuck, now - 300.0),
        ])
        .await
        .unwrap();
    let mut meta = TaskMeta::new(&stuck, TaskState::Success, json!(42));
    meta.date_done = Some(chrono::Utc::now());
    backend.store(&meta).await.unwrap();

    // Results no event told of.
    let quiet_ok = uuid::Uuid::new_v4().to_string();
    let mut meta = TaskMeta::new(&quiet_ok, TaskState::Success, json!({"paid": true}));
    meta.name = Some("billing.quiet".into());
    meta.args = Some(vec![json!("sub-1")]);
    meta.worker = Some("celery@no-events".into());
    meta.queue = Some("billing".into());
    meta.date_done = Some(chrono::Utc::now());
    backend.store(&meta).await.unwrap();
    let quiet_failed = uuid::Uuid::new_v4().to_string();
    let mut meta = TaskMeta::exception(
        &quiet_failed,
        TaskState::Failure,
        &ExceptionInfo::new("builtins", "ValueError", "bad card"),
    );
    meta.name = Some("billing.quiet".into());
    meta.traceback = Some("Traceback (most recent call last):\nValueError: bad card".into());
    backend.store(&meta).await.unwrap();

    assert_eq!(
        monitor::reconcile::sweep_stale(&state, now).await.unwrap(),
        1
    );
    let row = store.task(&stuck).await.unwrap().unwrap();
    assert_eq!(
        (row.state.as_str(), row.result.as_deref()),
        ("SUCCESS", Some("42"))
    );
    assert_eq!(
        row.received,
        Some(now - 301.0),
        "what the events said is kept"
    );

    // The walk over every result (other tests' too), to its end.
    let mut cursor = 0;
    let mut added = 0;
    for round in 0.. {
        let (next, n) = monitor::reconcile::discover(&state, cursor, now)
            .await
            .unwrap();
        added += n;
        cursor = next;
        if cursor == 0 {
            break;
        }
        assert!(round < 10_000, "the walk ends");
    }
    assert!(added >= 2, "{added}");
    let ok = store
        .task(&quiet_ok)
        .await
        .unwrap()
        .expect("found from its result");
    assert_eq!(ok.state, "SUCCESS");
    assert_eq!(ok.name.as_deref(), Some("billing.quiet"));
    assert_eq!(ok.args.as_deref(), Some("[\"sub-1\"]"));
    assert_eq!(ok.worker.as_deref(), Some("celery@no-events"));
    assert_eq!(ok.routing_key.as_deref(), Some("billing"));
    assert_eq!(ok.result.as_deref(), Some("{\"paid\":true}"));
    let failed = store
        .task(&quiet_failed)
        .await
        .unwrap()
        .expect("found from its result");
    assert_eq!(failed.state, "FAILURE");
    assert_eq!(failed.exception.as_deref(), Some("ValueError('bad card')"));
    assert!(failed.traceback.unwrap().contains("ValueError: bad card"));

    // Nothing moves twice.
    assert_eq!(
        monitor::reconcile::sweep_stale(&state, now).await.unwrap(),
        0
    );

    for id in [&stuck, &quiet_ok, &quiet_failed] {
        backend.forget(id).await.unwrap();
    }
    monitor.stop().await.unwrap();
    support::drop_database(&db).await;
}
