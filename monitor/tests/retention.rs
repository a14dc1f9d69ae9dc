//! Retention against the real PostgreSQL: with `SUCCESS=7d,FAILURE=90d,*=30d`, a success from
//! ten days ago and a task last seen received forty days ago go; a failure from ten days ago, a
//! success from yesterday and a recent task in another state stay; a second sweep deletes
//! nothing; `off` deletes nothing whatever the age.

mod support;

use monitor::Monitor;
use serde_json::{Map, Value, json};

fn event(kind: &str, uuid: &str, days_ago: f64, now: f64) -> Map<String, Value> {
    let v = json!({
        "type": kind,
        "uuid": uuid,
        "name": "test.retention",
        "hostname": "celery@retention",
        "timestamp": now - days_ago * 86400.0,
        "runtime": 0.01,
    });
    v.as_object().unwrap().clone()
}

#[tokio::test]
async fn old_rows_go_by_their_state_and_the_rest_stay() {
    let (mut config, db) = support::config();
    // The monitor's own sweeper stays off: the test sweeps, and checks what each sweep did.
    config.retention = monitor::retention::parse("off").unwrap();
    let retention = monitor::retention::parse("SUCCESS=7d,FAILURE=90d,*=30d").unwrap();
    let monitor = Monitor::start(&config).await.expect("the monitor starts");
    let store = monitor.state().store().clone();
    let now = task_core::events::unix_now();
    let events = vec![
        event("task-received", "old-success", 10.5, now),
        event("task-succeeded", "old-success", 10.0, now),
        event("task-received", "old-failure", 10.5, now),
        event("task-failed", "old-failure", 10.0, now),
        event("task-received", "new-success", 1.5, now),
        event("task-succeeded", "new-success", 1.0, now),
        event("task-received", "old-received", 40.0, now),
        event("task-received", "new-received", 2.0, now),
    ];
    store.write_batch(&events).await.unwrap();

    let deleted = monitor::retention::sweep(&store, &retention, now)
        .await
        .unwrap();
    assert_eq!(deleted, 2);
    for (uuid, kept) in [
        ("old-success", false),
        ("old-received", false),
        ("old-failure", true),
        ("new-success", true),
        ("new-received", true),
    ] {
        assert_eq!(store.task(uuid).await.unwrap().is_some(), kept, "{uuid}");
    }
    assert_eq!(
        monitor::retention::sweep(&store, &retention, now)
            .await
            .unwrap(),
        0
    );
    // Off keeps everything, whatever its age.
    let off = monitor::retention::parse("off").unwrap();
    assert_eq!(
        monitor::retention::sweep(&store, &off, now + 1e9)
            .await
            .unwrap(),
        0
    );

    monitor.stop().await.unwrap();
    support::drop_database(&db).await;
}
